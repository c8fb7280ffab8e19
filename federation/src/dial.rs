//! Reaching peers: adding one (configured or linked), dialing it for as
//! long as the controller runs, and the joining side of a link (redeeming
//! a token against the issuer).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::{SpiffeId, TrustBundle, TrustDomain};
use isthmus_proto::federation::v1::LinkRequest;
use isthmus_proto::federation::v1::peer_federation_client::PeerFederationClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, info, info_span, warn};

use crate::link::{PeerFile, Token};
use crate::session::{MAX_MESSAGE_BYTES, session};
use crate::state::{PeerState, Shared};
use crate::transport;

/// Adds a peer (configured or linked): trusts its bundle, accepts its
/// controller on the federation port, and dials it (see [`dial_loop`]).
/// Returns false if it was already known.
pub fn add_peer(shared: &Arc<Shared>, peer: PeerState, bundle: Option<TrustBundle>) -> bool {
    if let Some(b) = bundle
        && let Err(e) = shared.trust.upsert(b)
    {
        warn!(peer.cluster = %peer.name, error = %e, "peer trust bundle unusable");
    }
    let mut peers = shared.peers.write().unwrap_or_else(|e| e.into_inner());
    if peers.contains_key(&peer.name) {
        return false;
    }
    if let Ok(id) = SpiffeId::controller(&peer.trust_domain, &peer.name) {
        shared
            .allowed
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }
    let peer = Arc::new(peer);
    peers.insert(peer.name.clone(), peer.clone());
    drop(peers);
    tokio::spawn(
        dial_loop(shared.clone(), peer.clone())
            .instrument(info_span!("federation", peer.cluster = %peer.name, side = "client")),
    );
    shared.changed.notify_one();
    true
}

/// Dials `peer` for as long as the controller runs. The side whose cluster
/// name sorts first dials at once and always, so a pair of single
/// controllers shares one stream. The other side dials only after
/// [`dial_grace`] with no session at all: when the peer runs several
/// controller replicas behind one address, each replica of ours must
/// still hear the peer, and the peer's dials reach only some of them.
pub async fn dial_loop(shared: Arc<Shared>, peer: Arc<PeerState>) {
    let first = peer.name > shared.cluster;
    let expect = match SpiffeId::controller(&peer.trust_domain, &peer.name) {
        Ok(id) => id,
        Err(e) => {
            warn!(peer.cluster = %peer.name, error = %e, "peer name is not a valid cluster name; not dialing");
            return;
        }
    };
    loop {
        if shared.shutdown.is_draining() {
            return;
        }
        if !first && !unconnected_for(&shared, &peer, dial_grace(shared.heartbeat)).await {
            return;
        }
        let reason = match transport::channel(peer.address.clone(), (shared.client_tls.0)(&expect))
        {
            Err(e) => e,
            Ok(channel) => {
                let mut client = PeerFederationClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                let (tx, rx) = mpsc::channel(64);
                match client.federate(ReceiverStream::new(rx)).await {
                    Ok(resp) => {
                        session(shared.clone(), peer.clone(), tx, resp.into_inner(), true)
                            .await
                            .message
                    }
                    Err(s) => {
                        let reason = format!(
                            "cannot open the federation stream to {} at {}: {}",
                            peer.name,
                            peer.address,
                            s.message()
                        );
                        let mut i = peer.lock();
                        // A peer that cannot be reached backs off to 3.2 s
                        // at most: the long damping is for sessions that
                        // connect and drop. (A link's first dials fail
                        // until the joining side has recorded our bundle;
                        // a 25 s back-off then delayed the whole link.)
                        i.flaps = (i.flaps + 1).min(5);
                        if i.disconnected_since.is_none() && !i.connected() {
                            i.disconnected_since = Some(tokio::time::Instant::now());
                        }
                        let now = std::time::SystemTime::now();
                        if i.connected() {
                            i.last_dial_error = Some((now, reason.clone()));
                        } else {
                            i.last_disconnect = Some((now, reason.clone()));
                        }
                        reason
                    }
                }
            }
        };
        let delay = peer.redial_delay();
        tracing::debug!(peer.cluster = %peer.name, %reason, ?delay, "redialing");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.shutdown.signaled() => return,
        }
    }
}

/// How long the side that sorts second waits, with no session with any
/// of the peer's processes, before dialing itself.
pub fn dial_grace(heartbeat: Duration) -> Duration {
    (heartbeat * 3).max(Duration::from_secs(1))
}

/// Waits until no session with `peer` has been up for `grace` (false:
/// the controller is shutting down).
async fn unconnected_for(shared: &Shared, peer: &PeerState, grace: Duration) -> bool {
    let step = (grace / 4).max(Duration::from_millis(50));
    let mut since: Option<tokio::time::Instant> = None;
    loop {
        if peer.lock().connected() {
            since = None;
        } else if since
            .get_or_insert_with(tokio::time::Instant::now)
            .elapsed()
            >= grace
        {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = shared.shutdown.signaled() => return false,
        }
    }
}

/// Watches `<stateDir>/peers`: adds linked peers, and redeems pending
/// link tokens (the joining side) against the issuing controller.
pub async fn peers_loop(shared: Arc<Shared>) {
    let mut in_progress: BTreeSet<String> = BTreeSet::new();
    let (done_tx, mut done_rx) = mpsc::channel::<String>(16);
    loop {
        while let Ok(name) = done_rx.try_recv() {
            in_progress.remove(&name);
        }
        let files = match shared.state.peers().await {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, store = %shared.state.describe(), "cannot read linked peers; retrying");
                Vec::new()
            }
        };
        *shared
            .peer_records
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = files.clone();
        for file in files {
            if let Some(token) = &file.pending_token {
                if file.link_error.is_none() && !in_progress.contains(&file.name) {
                    in_progress.insert(file.name.clone());
                    let (shared, token, done) = (shared.clone(), token.clone(), done_tx.clone());
                    let name = file.name.clone();
                    tokio::spawn(
                        async move {
                            link_with(&shared, file, &token).await;
                            let _ = done.send(name).await;
                        }
                        .instrument(info_span!("link")),
                    );
                }
                continue;
            }
            if shared.peer(&file.name).is_some() {
                continue;
            }
            let Ok(td) = TrustDomain::new(&file.trust_domain) else {
                warn!(peer.cluster = %file.name, "peer file has an invalid trust domain; skipped");
                continue;
            };
            let roots = isthmus_core::identity::pem::certs_from_pem(&file.trust_bundle_pem)
                .unwrap_or_default();
            let bundle = (!roots.is_empty()).then(|| TrustBundle::new(td.clone(), roots, 1));
            if add_peer(
                &shared,
                PeerState::new(&file.name, &file.address, td, Default::default()),
                bundle,
            ) {
                info!(peer.cluster = %file.name, "linked peer added");
            }
        }
        // A directory is cheap to scan; Secrets are read from the API
        // server, so less often.
        let every = match shared.state {
            crate::state_store::StateStore::Dir(_) => Duration::from_millis(200),
            crate::state_store::StateStore::Secrets { .. } => Duration::from_secs(2),
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown.signaled() => return,
        }
    }
}

/// First contact from the joining side: calls the issuer's `Link`,
/// trusting it only through the token's pinned root.
async fn link_with(shared: &Arc<Shared>, mut file: PeerFile, encoded: &str) {
    let fail = async |mut file: PeerFile, reason: String| {
        warn!(peer.cluster = %file.name, %reason, "link failed");
        file.link_error = Some(reason);
        if let Err(e) = shared.state.write_peer(&file).await {
            warn!(error = %e, "cannot record the failed link");
        }
    };
    let token = match Token::decode(encoded) {
        Ok(t) => t,
        Err(e) => return fail(file, e.to_string()).await,
    };
    let Ok(expect) = token.payload.identity.parse::<SpiffeId>() else {
        return fail(
            file,
            format!(
                "token names an invalid identity {:?}",
                token.payload.identity
            ),
        )
        .await;
    };
    let Some(advertised) = shared.advertised.clone() else {
        return fail(
            file,
            "this controller has no address peers can reach: set advertiseAddress".into(),
        )
        .await;
    };
    let own = match shared.trust.get(&shared.trust_domain) {
        Some(b) => b.bundle.clone(),
        None => return fail(file, "own trust bundle missing".into()).await,
    };
    let cfg = isthmus_core::tls::pinned_client_config(&token.payload.root_fingerprint, expect, &[]);
    let channel = match transport::channel(token.payload.address.clone(), cfg) {
        Ok(c) => c,
        Err(e) => return fail(file, e).await,
    };
    let request = LinkRequest {
        token_id: token.payload.token_id.clone(),
        proof: token.proof(&shared.cluster),
        cluster_name: shared.cluster.clone(),
        controller_address: advertised,
        trust_bundle: Some((&own).into()),
        token: token.encoded.clone(),
    };
    let mut client = PeerFederationClient::new(channel);
    let resp = match tokio::time::timeout(Duration::from_secs(10), client.link(request)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s))
            if s.code() == tonic::Code::PermissionDenied
                || s.code() == tonic::Code::InvalidArgument =>
        {
            return fail(
                file,
                format!(
                    "{} refused the link: {}",
                    token.payload.cluster,
                    s.message()
                ),
            )
            .await;
        }
        Ok(Err(s)) => {
            // Unreachable or a transport problem: retried on the next scan.
            warn!(peer.cluster = %file.name, error = %s.message(), "link attempt failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
        Err(_) => {
            warn!(peer.cluster = %file.name, "link attempt timed out; retrying");
            return;
        }
    };
    let Some(b) = resp
        .trust_bundle
        .filter(|b| b.trust_domain == token.payload.trust_domain)
    else {
        return fail(file, "the issuer answered without its trust bundle".into()).await;
    };
    let roots: Vec<rustls_pki_types::CertificateDer<'static>> = b
        .roots_der
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    if !roots
        .iter()
        .any(|r| isthmus_core::identity::trust::fingerprint(r) == token.payload.root_fingerprint)
    {
        return fail(
            file,
            "the issuer's trust bundle does not contain the root the token pinned".into(),
        )
        .await;
    }
    file.trust_bundle_pem = roots
        .iter()
        .map(isthmus_core::identity::pem::cert_to_pem)
        .collect();
    file.pending_token = None;
    file.link_error = None;
    if let Err(e) = shared.state.write_peer(&file).await {
        warn!(error = %e, "cannot record the linked peer");
        return;
    }
    info!(peer.cluster = %file.name, "linked; federating");
    // peers_loop adds it on its next scan.
}
