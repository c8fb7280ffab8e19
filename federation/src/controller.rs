//! The controller's moving parts: shared state, the federation gRPC
//! service, dialers, and the reconciler that turns catalogues into
//! ServiceEntries and mesh state.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use isthmus_core::drain::DrainSignal;
use isthmus_core::identity::{Role, SpiffeId, TrustDomain, TrustStore};
use isthmus_core::model::{Locality, MeshState, PeerGateway};
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
use tracing::{Instrument, info, info_span, warn};

use crate::catalog::Catalog;
use crate::import::{Conflict, FilesSink, PeerCatalog, merge, service_entry};
use crate::peer::{MAX_MESSAGE_BYTES, PeerState, PeerStatus, session};
use crate::transport::{self, PeerInfo};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
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
        };
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
    pub peers: BTreeMap<String, Arc<PeerState>>,
    /// Poked whenever a peer's catalogue or connection changes.
    pub changed: Arc<Notify>,
    pub shutdown: DrainSignal,
    pub metrics: Metrics,
    pub conflicts: std::sync::Mutex<Vec<Conflict>>,
}

impl Shared {
    pub fn status(&self) -> Vec<PeerStatus> {
        self.peers.values().map(|p| p.status()).collect()
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
    async fn link(&self, _request: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        Err(Status::unimplemented(
            "linking with a token is not available in this build; configure the peer with its trust bundle file (peers[].trustBundle)",
        ))
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
        let cluster = match info.identity.role() {
            Role::Controller { cluster } => cluster.to_owned(),
            _ => {
                return Err(Status::permission_denied(format!(
                    "{} is not a controller identity",
                    info.identity
                )));
            }
        };
        let peer = self.shared.peers.get(&cluster).cloned().ok_or_else(|| {
            Status::permission_denied(format!(
                "cluster {cluster:?} is not a peer of {}; link it first",
                self.shared.cluster
            ))
        })?;
        if info.identity.trust_domain() != &peer.trust_domain {
            return Err(Status::permission_denied(format!(
                "{} is not in {}'s trust domain {}",
                info.identity, cluster, peer.trust_domain
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
pub async fn dial_loop(
    shared: Arc<Shared>,
    peer: Arc<PeerState>,
    client_tls: impl Fn(&SpiffeId) -> rustls::ClientConfig,
) {
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
        let reason = match transport::channel(peer.address.clone(), client_tls(&expect)) {
            Err(e) => e,
            Ok(channel) => {
                let mut client = PeerFederationClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                let (tx, rx) = mpsc::channel(64);
                match client.federate(ReceiverStream::new(rx)).await {
                    Ok(resp) => session(shared.clone(), peer.clone(), tx, resp.into_inner()).await,
                    Err(s) => {
                        let reason = format!(
                            "cannot open the federation stream to {} at {}: {}",
                            peer.name,
                            peer.address,
                            s.message()
                        );
                        let mut i = peer.lock();
                        i.flaps = (i.flaps + 1).min(8);
                        if i.disconnected_since.is_none() && !i.connected {
                            i.disconnected_since = Some(tokio::time::Instant::now());
                        }
                        i.last_disconnect = Some((std::time::SystemTime::now(), reason.clone()));
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

/// Marks silent peers stale and withdraws them after the lease; merges
/// catalogues; writes ServiceEntries; publishes mesh state. Runs until
/// shutdown.
pub async fn reconcile_loop(
    shared: Arc<Shared>,
    sink: FilesSink,
    gateway: SocketAddr,
    mesh: watch::Sender<Arc<MeshState>>,
) {
    let mut catalog = shared.catalog.clone();
    let mut last_entries: Option<Vec<serde_json::Value>> = None;
    let mut version = 0u64;
    let tick = (shared.heartbeat / 2).max(Duration::from_millis(20));
    loop {
        let woke = tokio::time::Instant::now();
        // Liveness bookkeeping.
        for p in shared.peers.values() {
            let mut i = p.lock();
            if let Some(since) = i.disconnected_since {
                let down = since.elapsed();
                if down >= shared.heartbeat * 2 && !i.stale && i.imports.is_some() {
                    i.stale = true;
                    warn!(peer.cluster = %p.name, down = ?down, lease = ?shared.lease, "peer control plane unreachable: its services are kept, marked stale");
                }
                if down >= shared.lease && i.imports.is_some() {
                    i.imports = None;
                    i.applied = None;
                    warn!(peer.cluster = %p.name, lease = ?shared.lease, "peer unreachable for the whole lease: its services are withdrawn");
                }
            }
        }
        let cat = catalog.borrow_and_update().clone();
        let peers: Vec<PeerCatalog> = shared
            .peers
            .values()
            .filter_map(|p| {
                let i = p.lock();
                Some(PeerCatalog {
                    cluster: p.name.clone(),
                    locality: i.locality.clone(),
                    stale: i.stale,
                    exports: i.imports.clone()?,
                })
            })
            .collect();
        let imports = merge((&shared.cluster, &cat.exports), &peers);
        let entries: Vec<serde_json::Value> = imports
            .services
            .values()
            .map(|s| service_entry(s, gateway))
            .collect();
        // Until the source's first list this cluster's own exports are
        // unknown; writing then could flip a conflict and rewrite files.
        if cat.listed && last_entries.as_ref() != Some(&entries) {
            match sink.apply(&entries) {
                Ok(r) => {
                    if !r.written.is_empty() || !r.deleted.is_empty() {
                        info!(written = ?r.written, deleted = ?r.deleted, "ServiceEntries updated");
                    }
                    shared
                        .metrics
                        .apply_latency
                        .observe(woke.elapsed().as_secs_f64());
                    last_entries = Some(entries);
                }
                Err(e) => {
                    warn!(dir = %sink.dir().display(), error = %e, "cannot write ServiceEntries; will retry (check the directory is writable)")
                }
            }
        }
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
        for p in shared.peers.values() {
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

        let policies: Vec<(&str, &crate::catalog::ExportPolicy)> = shared
            .peers
            .values()
            .map(|p| (p.name.as_str(), &p.policy))
            .collect();
        let next = MeshState {
            version: 0,
            local: cat.with_export_targets(policies.iter().copied()),
            imported: imports.services.clone(),
            peers: gateways,
            destination_rules: Default::default(),
        };
        let changed = {
            let cur = mesh.borrow();
            cur.local != next.local
                || cur.imported != next.imported
                || cur.peers != next.peers
                || version == 0
        };
        if changed {
            version += 1;
            mesh.send_replace(Arc::new(MeshState { version, ..next }));
        }

        tokio::select! {
            r = catalog.changed() => if r.is_err() { return },
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = shared.shutdown.signaled() => return,
        }
    }
}
