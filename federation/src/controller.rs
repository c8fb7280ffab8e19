//! The controller's moving parts: shared state, the federation gRPC
//! service, dialers, and the reconciler that turns catalogues into
//! ServiceEntries and mesh state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use futures::{Stream, StreamExt};
use isthmus_core::drain::DrainSignal;
use isthmus_core::identity::{Role, SpiffeId, TrustBundle, TrustDomain, TrustStore};
use isthmus_core::model::{LocalService, Locality, MeshState, PeerGateway, ServiceKey};
use isthmus_proto::federation::v1::peer_federation_client::PeerFederationClient;
use isthmus_proto::federation::v1::peer_federation_server::PeerFederation;
use isthmus_proto::federation::v1::{LinkRequest, LinkResponse, PeerMessage};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::catalog::Catalog;
use crate::import::{Conflict, Imports, PeerCatalog, merge};
use crate::link::{PeerFile, Token, TokenStore};
use crate::peer::{MAX_MESSAGE_BYTES, PeerState, PeerStatus, session};
use crate::sink::{Sink, SinkReport};
use crate::transport::{self, PeerInfo};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// [`crate::peer::EndReason::as_str`].
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub kind: String,
    /// What was done instead: `ignored`, `denies_every_request`, `strict`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// Controller metrics (`isthmus_federation_*`).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub peers: Family<StateLabel, Gauge>,
    pub terminations: Family<ReasonLabel, Counter>,
    pub services_exported: Gauge,
    pub services_imported: Gauge,
    pub conflicts: Gauge,
    /// From a peer's catalogue change arriving to the ServiceEntry files
    /// written, seconds.
    pub apply_latency: Histogram,
    /// Objects refused or applied in their strictest form, counted once
    /// each time one becomes a problem.
    pub config_rejected: Family<RejectedLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            peers: Family::default(),
            terminations: Family::default(),
            services_exported: Gauge::default(),
            services_imported: Gauge::default(),
            conflicts: Gauge::default(),
            apply_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            config_rejected: Family::default(),
        };
        registry.register(
            "isthmus_config_rejected",
            "Configuration objects refused or applied in their strictest form, by kind and what was done instead (ignored, denies_every_request, strict); isthmus status lists them",
            m.config_rejected.clone(),
        );
        let sub = isthmus_core::metrics::sub_registry(registry, "federation");
        sub.register(
            "peers",
            "Peers by state (connected, stale, disconnected)",
            m.peers.clone(),
        );
        sub.register(
            "stream_terminations",
            "Federation streams ended, by reason",
            m.terminations.clone(),
        );
        sub.register(
            "services_exported",
            "Services this cluster exports",
            m.services_exported.clone(),
        );
        sub.register(
            "services_imported",
            "Services imported from peers",
            m.services_imported.clone(),
        );
        sub.register(
            "export_conflicts",
            "Services whose exports conflict between clusters",
            m.conflicts.clone(),
        );
        sub.register(
            "import_apply_seconds",
            "Time from a catalogue change to ServiceEntries written",
            m.apply_latency.clone(),
        );
        m
    }
}

/// State every task of one controller shares.
#[derive(Debug)]
pub struct Shared {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub locality: Locality,
    pub gateway_address: String,
    /// Random per process: revisions are comparable only within it.
    pub epoch: String,
    pub heartbeat: Duration,
    pub lease: Duration,
    pub trust: Arc<TrustStore>,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// Configured and linked peers; linked ones appear at run time.
    pub peers: RwLock<BTreeMap<String, Arc<PeerState>>>,
    /// Peer controller identities the federation port accepts.
    pub allowed: Arc<RwLock<BTreeSet<SpiffeId>>>,
    pub state_dir: PathBuf,
    pub tokens: TokenStore,
    /// Where peers reach us, sent when linking.
    pub advertised: Option<String>,
    pub client_tls: ClientTls,
    /// Poked whenever a peer's catalogue or connection changes.
    pub changed: Arc<Notify>,
    pub shutdown: DrainSignal,
    pub metrics: Metrics,
    pub conflicts: std::sync::Mutex<Vec<Conflict>>,
}

/// Builds the client TLS config for dialing a peer controller.
pub struct ClientTls(pub Box<dyn Fn(&SpiffeId) -> rustls::ClientConfig + Send + Sync>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl Shared {
    pub fn status(&self) -> Vec<PeerStatus> {
        self.peers().iter().map(|p| p.status()).collect()
    }

    /// Every peer, by name.
    pub fn peers(&self) -> Vec<Arc<PeerState>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn peer(&self, name: &str) -> Option<Arc<PeerState>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Adds a peer (configured or linked): trusts its bundle, accepts its
    /// controller on the federation port, and dials it when our name sorts
    /// first. Returns false if it was already known.
    pub fn add_peer(self: &Arc<Self>, peer: PeerState, bundle: Option<TrustBundle>) -> bool {
        if let Some(b) = bundle
            && let Err(e) = self.trust.upsert(b)
        {
            warn!(peer.cluster = %peer.name, error = %e, "peer trust bundle unusable");
        }
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        if peers.contains_key(&peer.name) {
            return false;
        }
        if let Ok(id) = SpiffeId::controller(&peer.trust_domain, &peer.name) {
            self.allowed
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        }
        let peer = Arc::new(peer);
        peers.insert(peer.name.clone(), peer.clone());
        drop(peers);
        if peer.name > self.cluster {
            tokio::spawn(
                dial_loop(self.clone(), peer.clone()).instrument(
                    info_span!("federation", peer.cluster = %peer.name, side = "client"),
                ),
            );
        }
        self.changed.notify_one();
        true
    }
}

/// The gRPC service peers call.
#[derive(Debug, Clone)]
pub struct FederationService {
    pub shared: Arc<Shared>,
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<PeerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl PeerFederation for FederationService {
    async fn link(&self, request: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        let shared = &self.shared;
        let r = request.into_inner();
        isthmus_core::identity::spiffe::validate_cluster_name(&r.cluster_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.cluster_name == shared.cluster {
            return Err(Status::invalid_argument(format!(
                "a cluster cannot link to itself ({})",
                r.cluster_name
            )));
        }
        let bundle = r
            .trust_bundle
            .ok_or_else(|| Status::invalid_argument("link request without a trust bundle"))?;
        let td = TrustDomain::new(&bundle.trust_domain)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let roots: Vec<rustls_pki_types::CertificateDer<'static>> = bundle
            .roots_der
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect();
        let peer_bundle = TrustBundle::new(td.clone(), roots.clone(), bundle.sequence.max(1));
        // Refuse an unusable bundle before spending the token.
        TrustStore::with_bundles([peer_bundle.clone()])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        shared
            .tokens
            .redeem(&r.token_id, &r.token, &r.cluster_name, &r.proof)
            .map_err(|e| {
                warn!(joining = %r.cluster_name, error = %e, "link refused");
                Status::permission_denied(e.to_string())
            })?;
        let file = PeerFile {
            name: r.cluster_name.clone(),
            address: r.controller_address.clone(),
            trust_domain: td.to_string(),
            trust_bundle_pem: roots
                .iter()
                .map(isthmus_core::identity::pem::cert_to_pem)
                .collect(),
            pending_token: None,
            link_error: None,
        };
        file.write(&shared.state_dir)
            .map_err(|e| Status::internal(format!("cannot record the peer: {e}")))?;
        shared.add_peer(
            PeerState::new(
                &r.cluster_name,
                &r.controller_address,
                td,
                Default::default(),
            ),
            Some(peer_bundle),
        );
        info!(peer.cluster = %r.cluster_name, address = %r.controller_address, "linked");
        let own = shared
            .trust
            .get(&shared.trust_domain)
            .ok_or_else(|| Status::internal("own trust bundle missing"))?;
        Ok(Response::new(LinkResponse {
            cluster_name: shared.cluster.clone(),
            trust_bundle: Some(isthmus_proto::common::v1::TrustBundle {
                trust_domain: own.bundle.trust_domain.to_string(),
                roots_der: own
                    .bundle
                    .roots
                    .iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect(),
                sequence: own.bundle.sequence,
                refresh_hint_seconds: 300,
            }),
        }))
    }

    type FederateStream = MessageStream;

    async fn federate(
        &self,
        request: Request<Streaming<PeerMessage>>,
    ) -> Result<Response<MessageStream>, Status> {
        let info = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified peer identity"))?;
        let identity = info.identity.ok_or_else(|| {
            Status::unauthenticated(
                "federation needs a client certificate; link the clusters first",
            )
        })?;
        let cluster = match identity.role() {
            Role::Controller { cluster } => cluster.to_owned(),
            _ => {
                return Err(Status::permission_denied(format!(
                    "{identity} is not a controller identity"
                )));
            }
        };
        let peer = self.shared.peer(&cluster).ok_or_else(|| {
            Status::permission_denied(format!(
                "cluster {cluster:?} is not a peer of {}; link it first",
                self.shared.cluster
            ))
        })?;
        if identity.trust_domain() != &peer.trust_domain {
            return Err(Status::permission_denied(format!(
                "{} is not in {}'s trust domain {}",
                identity, cluster, peer.trust_domain
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        tokio::spawn(
            session(shared, peer, tx, request.into_inner())
                .instrument(info_span!("federation", peer.cluster = %cluster, side = "server")),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

/// Dials `peer` for as long as the controller runs (only the side whose
/// cluster name sorts first dials, so a pair shares one stream).
pub async fn dial_loop(shared: Arc<Shared>, peer: Arc<PeerState>) {
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
                        session(shared.clone(), peer.clone(), tx, resp.into_inner())
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
                        if i.disconnected_since.is_none() && !i.connected {
                            i.disconnected_since = Some(tokio::time::Instant::now());
                        }
                        let now = std::time::SystemTime::now();
                        if i.connected {
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

/// At startup, ServiceEntries are first written once every peer has sent
/// its full catalogue, or this long after our own catalogue was listed,
/// whichever is first: writing as each peer arrives would rewrite every
/// file once per peer.
pub const INITIAL_SYNC_GRACE: Duration = Duration::from_secs(3);

/// A disconnected peer is marked stale after this long (at most half the
/// lease; at least two heartbeats): brief reconnects under load must not
/// flip every ServiceEntry's stale label back and forth.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// How long the reconciler waits after a change for more to arrive.
pub const COALESCE: Duration = Duration::from_millis(3);

/// Marks silent peers stale and withdraws them after the lease; merges
/// catalogues; writes ServiceEntries; publishes mesh state. Runs until
/// shutdown.
pub async fn reconcile_loop(
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
    mesh: watch::Sender<Arc<MeshState>>,
) {
    let (to_sink, from_reconcile) = watch::channel(None);
    tokio::spawn(sink_loop(shared.clone(), sink, from_reconcile).in_current_span());
    let mut catalog = shared.catalog.clone();
    let mut version = 0u64;
    let tick = (shared.heartbeat / 2).max(Duration::from_millis(20));
    let started = tokio::time::Instant::now();
    let mut listed_at = None;
    let mut initial_sync_done = false;
    // The heavy pass (merge, render, write, publish) runs only when
    // something changed; ticks only do liveness bookkeeping.
    let mut dirty = true;
    let mut local_dirty = true;
    // The last merge: our catalogue and the peers' it read, and its result.
    let mut last_merge: Option<(Arc<Catalog>, Vec<PeerCatalog>, Arc<Imports>)> = None;
    let mut local_cache: Option<LocalCache> = None;
    loop {
        let woke = tokio::time::Instant::now();
        // Liveness bookkeeping.
        let all_peers = shared.peers();
        for p in &all_peers {
            let mut i = p.lock();
            if let Some(since) = i.disconnected_since {
                let down = since.elapsed();
                // Damped, but always well before the lease withdraws.
                let stale_after = (shared.heartbeat * 2).max(STALE_AFTER.min(shared.lease / 2));
                if down >= stale_after && !i.stale && i.imports.is_some() {
                    i.stale = true;
                    dirty = true;
                    warn!(peer.cluster = %p.name, down = ?down, lease = ?shared.lease, "peer control plane unreachable: its services are kept, marked stale");
                }
                if down >= shared.lease && i.imports.is_some() {
                    i.imports = None;
                    i.applied = None;
                    dirty = true;
                    warn!(peer.cluster = %p.name, lease = ?shared.lease, "peer unreachable for the whole lease: its services are withdrawn");
                }
            }
        }
        // Until every peer has synced (or the grace passed), more imports
        // are on their way; the pass that ends the wait writes files.
        if !initial_sync_done {
            // The grace counts from our own list: peers send their
            // catalogues as soon as they have listed theirs, about when we
            // have ours.
            if listed_at.is_none() && catalog.borrow().listed {
                listed_at = Some(tokio::time::Instant::now());
            }
            let all_synced = all_peers.iter().all(|p| p.lock().last_full_sync.is_some());
            // A source that never lists does not hold peers' imports back
            // for ever (nothing is written until it lists, see below).
            initial_sync_done = all_synced
                || listed_at.is_some_and(|t| t.elapsed() >= INITIAL_SYNC_GRACE)
                || started.elapsed() >= INITIAL_SYNC_GRACE * 10;
            if initial_sync_done {
                dirty = true;
                info!(after = ?started.elapsed(), peers_synced = all_synced, "initial sync done; writing ServiceEntries");
            }
        }
        // Until the initial sync is done, a peer's snapshot landing does
        // not start a pass: merging 10,000 services again as each of them
        // lands is work thrown away (and the config stream's clients would
        // see the mesh fill in piecemeal). Our own catalogue's changes
        // are published at once, with what peers had (restored from disk).
        if dirty && (initial_sync_done || local_dirty) {
            dirty = false;
            local_dirty = false;
            let cat = catalog.borrow_and_update().clone();
            let peers: Vec<PeerCatalog> = all_peers
                .iter()
                .filter_map(|p| {
                    let i = p.lock();
                    Some(PeerCatalog {
                        cluster: p.name.clone(),
                        locality: i.locality.clone(),
                        stale: i.stale,
                        exports: Arc::clone(i.imports.as_ref()?),
                    })
                })
                .collect();
            // Until the source's first list this cluster's own exports are
            // unknown; writing then could flip a conflict and rewrite files.
            let write = cat.listed && initial_sync_done;
            // Merging is blocking work at 10,000 services: off the runtime's
            // workers (rendering and writing files is the sink task's). The
            // last merge stands before the initial sync (see above), and
            // when its inputs are these (a peer only connected or
            // disconnected).
            let reuse = last_merge.as_ref().and_then(|(c, inputs, imports)| {
                (!initial_sync_done || (Arc::ptr_eq(c, &cat) && same_merge_inputs(inputs, &peers)))
                    .then(|| imports.clone())
            });
            let imports = match reuse {
                Some(imports) => imports,
                None => {
                    let (cluster, cat2, inputs) =
                        (shared.cluster.clone(), cat.clone(), peers.clone());
                    let merge_started = std::time::Instant::now();
                    let Ok(imports) = tokio::task::spawn_blocking(move || {
                        merge((&cluster, &cat2.exports), &inputs)
                    })
                    .await
                    else {
                        return;
                    };
                    debug!(services = imports.services.len(), took = ?merge_started.elapsed(), "catalogues merged");
                    let imports = Arc::new(imports);
                    last_merge = Some((cat.clone(), peers, imports.clone()));
                    imports
                }
            };
            for c in &imports.conflicts {
                tracing::debug!(service = %c.service, winner = %c.winner, excluded = %c.excluded, reason = %c.reason, "export conflict");
            }
            shared.metrics.conflicts.set(imports.conflicts.len() as i64);
            *shared.conflicts.lock().unwrap_or_else(|e| e.into_inner()) = imports.conflicts.clone();
            shared
                .metrics
                .services_exported
                .set(cat.exports.len() as i64);
            shared
                .metrics
                .services_imported
                .set(imports.services.len() as i64);
            let (mut up, mut stale, mut down) = (0, 0, 0);
            let mut gateways = BTreeMap::new();
            for p in &all_peers {
                let i = p.lock();
                match (i.connected, i.stale) {
                    (true, _) => up += 1,
                    (false, true) => stale += 1,
                    _ => down += 1,
                }
                if let Ok(address) = i.gateway.parse() {
                    gateways.insert(
                        p.name.clone(),
                        PeerGateway {
                            cluster: p.name.clone(),
                            trust_domain: p.trust_domain.clone(),
                            address,
                            locality: i.locality.clone(),
                        },
                    );
                }
            }
            shared
                .metrics
                .peers
                .get_or_create(&StateLabel { state: "connected" })
                .set(up);
            shared
                .metrics
                .peers
                .get_or_create(&StateLabel { state: "stale" })
                .set(stale);
            shared
                .metrics
                .peers
                .get_or_create(&StateLabel {
                    state: "disconnected",
                })
                .set(down);

            // The local part (every local service with the peers it is
            // exported to) changes only with our catalogue or the peers'
            // policies; rebuilding it copies every local service.
            let policies: Vec<(String, crate::catalog::ExportPolicy)> = all_peers
                .iter()
                .map(|p| (p.name.clone(), p.policy.clone()))
                .collect();
            let local = match &local_cache {
                Some((c, p, local)) if Arc::ptr_eq(c, &cat) && *p == policies => local.clone(),
                _ => cat.with_export_targets(policies.iter().map(|(n, p)| (n.as_str(), p))),
            };
            local_cache = Some((cat.clone(), policies, local.clone()));
            let next = MeshState {
                version: 0,
                local,
                imported: imports.services.clone(),
                peers: gateways,
                destination_rules: cat.destination_rules.clone(),
                virtual_services: cat.virtual_services.clone(),
                peer_authentications: cat.peer_authentications.clone(),
                authorization_policies: cat.authorization_policies.clone(),
            };
            let changed = {
                let cur = mesh.borrow();
                !cur.same_content(&next) || version == 0
            };
            if changed {
                version += 1;
                mesh.send_replace(Arc::new(MeshState { version, ..next }));
            }
            // Files follow in their own task: the mesh state above (what
            // the config stream serves) and the next merge never wait for
            // disk, and a slow disk coalesces to the newest state.
            if write {
                to_sink.send_replace(Some((woke, imports.clone())));
            }
        }
        tokio::select! {
            r = catalog.changed() => {
                if r.is_err() {
                    return;
                }
                dirty = true;
                local_dirty = true;
            }
            _ = shared.changed.notified() => dirty = true,
            _ = tokio::time::sleep(tick) => continue,
            _ = shared.shutdown.signaled() => return,
        }
        // Coalesce a burst (several peers syncing at once) into one pass;
        // short enough not to show in propagation latency.
        tokio::time::sleep(COALESCE).await;
    }
}

/// Whether a merge of `now` would read what `last` was: the same peers'
/// catalogues by identity (a snapshot or delta makes a new one; `last`
/// holds them, so no address is reused), staleness and locality.
fn same_merge_inputs(last: &[PeerCatalog], now: &[PeerCatalog]) -> bool {
    last.len() == now.len()
        && last.iter().zip(now).all(|(a, b)| {
            a.cluster == b.cluster
                && Arc::ptr_eq(&a.exports, &b.exports)
                && a.stale == b.stale
                && a.locality == b.locality
        })
}

/// The local part of the last mesh state, with the catalogue and peers'
/// policies it was built from.
type LocalCache = (
    Arc<Catalog>,
    Vec<(String, crate::catalog::ExportPolicy)>,
    BTreeMap<ServiceKey, Arc<LocalService>>,
);

/// The imported services to write, and when the change that produced
/// them was picked up.
type SinkInput = Option<(tokio::time::Instant, Arc<Imports>)>;

/// Hands the newest merged state to the sink. A pass writes only the
/// services that differ from the last pass it completed; the first pass
/// (and the one after a failure) has the sink compare everything.
async fn sink_loop(
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
    mut input: watch::Receiver<SinkInput>,
) {
    let mut written: Option<Arc<Imports>> = None;
    let writer = match BackgroundThread::start("isthmus-sink") {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "cannot start the import writer thread; no imports will be written (check the process's thread limit)");
            return;
        }
    };
    loop {
        tokio::select! {
            r = input.changed() => if r.is_err() { return },
            _ = shared.shutdown.signaled() => return,
        }
        let Some((since, services)) = input.borrow_and_update().clone() else {
            continue;
        };
        if written.as_ref().is_some_and(|w| Arc::ptr_eq(w, &services)) {
            continue;
        }
        let (sink2, last, pass) = (sink.clone(), written.take(), services.clone());
        let Some(outcome) = writer
            .run(move || match &last {
                None => sink2.apply_all(&pass),
                Some(prev) => sink2.apply_change(prev, &pass),
            })
            .await
        else {
            return;
        };
        match outcome {
            Ok(r) => {
                written = Some(services);
                if !r.written.is_empty() || !r.deleted.is_empty() {
                    info!(
                        written = r.written.len(),
                        deleted = r.deleted.len(),
                        "imports updated"
                    );
                }
                if r != SinkReport::default() {
                    shared
                        .metrics
                        .apply_latency
                        .observe(since.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                warn!(error = %e, "import pass failed; retrying in 1 s");
                // Retry the same state (unless a newer one arrives).
                input.mark_changed();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shared.shutdown.signaled() => return,
                }
            }
        }
    }
}

/// How much nicer than the rest of the process the ServiceEntry writer
/// runs (Linux `nice` steps).
pub const SINK_NICENESS: i32 = 10;

/// A thread for background blocking work at a lower CPU priority than the
/// runtime's workers: writing 10,000 ServiceEntry files is bulk work that
/// may wait, heartbeats and merges may not. (The blocking pool's threads
/// are shared and cannot be reniced back, hence a thread of its own.)
struct BackgroundThread {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl BackgroundThread {
    fn start(name: &str) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                #[cfg(target_os = "linux")]
                {
                    // PRIO_PROCESS with a thread id renices that thread only.
                    let tid = rustix::thread::gettid();
                    let now = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
                    if let Err(e) = rustix::process::setpriority_process(Some(tid), now + SINK_NICENESS) {
                        debug!(error = %e, "cannot lower the writer thread's priority; it runs at the process's");
                    }
                }
                // Ends when the last sender is dropped.
                for job in rx {
                    job();
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the thread; `None` if it panicked.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.await.ok()
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
        for file in PeerFile::load_all(&shared.state_dir) {
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
            if shared.add_peer(
                PeerState::new(&file.name, &file.address, td, Default::default()),
                bundle,
            ) {
                info!(peer.cluster = %file.name, "linked peer added");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shared.shutdown.signaled() => return,
        }
    }
}

/// First contact from the joining side: calls the issuer's `Link`,
/// trusting it only through the token's pinned root.
async fn link_with(shared: &Arc<Shared>, mut file: PeerFile, encoded: &str) {
    let fail = |mut file: PeerFile, reason: String| {
        warn!(peer.cluster = %file.name, %reason, "link failed");
        file.link_error = Some(reason);
        let _ = file.write(&shared.state_dir);
    };
    let token = match Token::decode(encoded) {
        Ok(t) => t,
        Err(e) => return fail(file, e.to_string()),
    };
    let Ok(expect) = token.payload.identity.parse::<SpiffeId>() else {
        return fail(
            file,
            format!(
                "token names an invalid identity {:?}",
                token.payload.identity
            ),
        );
    };
    let Some(advertised) = shared.advertised.clone() else {
        return fail(
            file,
            "this controller has no address peers can reach: set advertiseAddress".into(),
        );
    };
    let own = match shared.trust.get(&shared.trust_domain) {
        Some(b) => b.bundle.clone(),
        None => return fail(file, "own trust bundle missing".into()),
    };
    let cfg = isthmus_core::tls::pinned_client_config(&token.payload.root_fingerprint, expect, &[]);
    let channel = match transport::channel(token.payload.address.clone(), cfg) {
        Ok(c) => c,
        Err(e) => return fail(file, e),
    };
    let request = LinkRequest {
        token_id: token.payload.token_id.clone(),
        proof: token.proof(&shared.cluster),
        cluster_name: shared.cluster.clone(),
        controller_address: advertised,
        trust_bundle: Some(isthmus_proto::common::v1::TrustBundle {
            trust_domain: own.trust_domain.to_string(),
            roots_der: own.roots.iter().map(|c| c.as_ref().to_vec()).collect(),
            sequence: own.sequence,
            refresh_hint_seconds: 300,
        }),
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
            );
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
        return fail(file, "the issuer answered without its trust bundle".into());
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
        );
    }
    file.trust_bundle_pem = roots
        .iter()
        .map(isthmus_core::identity::pem::cert_to_pem)
        .collect();
    file.pending_token = None;
    file.link_error = None;
    if let Err(e) = file.write(&shared.state_dir) {
        warn!(error = %e, "cannot record the linked peer");
        return;
    }
    info!(peer.cluster = %file.name, "linked; federating");
    // peers_loop adds it on its next scan.
}
