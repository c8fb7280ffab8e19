//! Builds a controller: binds every listener first (port conflicts fail
//! at startup), then starts the source, the federation server and
//! dialers, and the reconciler.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::{self, ConfigDump};
use isthmus_core::drain::{self, DrainOutcome, DrainTrigger};
use isthmus_core::identity::verify::Expect;
use isthmus_core::identity::{SpiffeId, TrustBundle, TrustStore};
use isthmus_core::model::MeshState;
use isthmus_core::model::problem::ConfigProblem;
use isthmus_core::readiness::Ready;
use isthmus_core::telemetry::LogControl;
pub use isthmus_core::tls::CertSource;
use isthmus_proto::federation::v1::peer_federation_server::PeerFederationServer;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{Instrument, info, info_span};

use crate::catalog::Catalog;
use crate::config::{ControllerConfig, SourceConfig};
use crate::dial::{add_peer, peers_loop};
use crate::metrics::{Metrics, RejectedLabels};
use crate::objects::Kind;
use crate::reconcile::reconcile_loop;
use crate::service::FederationService;
use crate::session::MAX_MESSAGE_BYTES;
use crate::sink::kube::KubeSink;
use crate::sink::{FilesSink, Sink};
use crate::source::Store;
use crate::source::files::FilesSource;
use crate::source::kube::{KubeSource, SourceHealth};
use crate::state::{ClientTls, Shared};
use crate::state::{PeerState, PeerStatus};
use crate::state_store::StateStore;

/// What a controller needs from outside: its certificate
/// (`spiffe://<td>/cluster/<name>/controller`) and the trust bundles of
/// its own and its peers' trust domains.
#[derive(Debug)]
pub struct Deps {
    pub certs: Arc<dyn CertSource>,
    pub trust: Arc<TrustStore>,
    pub logs: Option<LogControl>,
    /// The cluster CA, for the CA service (with `caTokens`).
    pub ca: Option<Arc<isthmus_core::identity::ClusterCa>>,
}

/// A running controller.
#[derive(Debug)]
pub struct Bound {
    pub federation_addr: SocketAddr,
    /// The config stream and CA service port for local proxies.
    pub local_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub ready: Ready,
    pub shared: Arc<Shared>,
    /// The merged view for the config stream.
    pub mesh: watch::Receiver<Arc<MeshState>>,
    trigger: DrainTrigger,
    quit: mpsc::Receiver<String>,
}

struct StatusDump(Arc<Shared>);
impl ConfigDump for StatusDump {
    fn name(&self) -> &str {
        "peers"
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(self.0.status()).unwrap_or_default()
    }
}

struct ConflictDump(Arc<Shared>);
impl ConfigDump for ConflictDump {
    fn name(&self) -> &str {
        "conflicts"
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&**self.0.conflicts.borrow()).unwrap_or_default()
    }
}

struct ProblemsDump(watch::Receiver<Arc<Catalog>>);
impl ConfigDump for ProblemsDump {
    fn name(&self) -> &str {
        "config_problems"
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&self.0.borrow().problems).unwrap_or_default()
    }
}

struct LinksDump(Arc<Shared>);
impl ConfigDump for LinksDump {
    fn name(&self) -> &str {
        "pending_links"
    }
    fn dump(&self) -> serde_json::Value {
        let records = self
            .0
            .peer_records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pending: Vec<_> = records
            .into_iter()
            .filter(|f| f.pending_token.is_some())
            .map(|f| serde_json::json!({"cluster": f.name, "address": f.address, "error": f.link_error}))
            .collect();
        serde_json::Value::Array(pending)
    }
}

struct SourceDump(SourceHealth);
impl ConfigDump for SourceDump {
    fn name(&self) -> &str {
        "source"
    }
    fn dump(&self) -> serde_json::Value {
        let kinds: serde_json::Map<String, serde_json::Value> = self
            .0
            .snapshot()
            .into_iter()
            .map(|(k, h)| (k, serde_json::to_value(h).unwrap_or_default()))
            .collect();
        serde_json::Value::Object(kinds)
    }
}

struct LeaderDump {
    identity: String,
    lease: String,
    writer: watch::Receiver<bool>,
}
impl ConfigDump for LeaderDump {
    fn name(&self) -> &str {
        "leader"
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "identity": self.identity,
            "lease": self.lease,
            "writes": *self.writer.borrow(),
        })
    }
}

struct MeshDump(watch::Receiver<Arc<MeshState>>);
impl ConfigDump for MeshDump {
    fn name(&self) -> &str {
        "mesh"
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&**self.0.borrow()).unwrap_or_default()
    }
}

/// The gRPC server both controller ports use: HTTP/2 keep-alives (a
/// dead peer is noticed in 30 s) and windows sized for 10,000-service
/// snapshots.
fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .initial_stream_window_size(Some(isthmus_core::tls::GRPC_STREAM_WINDOW))
        .initial_connection_window_size(Some(isthmus_core::tls::GRPC_CONNECTION_WINDOW))
}

/// Binds and starts a controller.
pub async fn build(config: ControllerConfig, deps: Deps) -> anyhow::Result<Bound> {
    isthmus_core::tls::install_crypto_provider();
    let ready = Ready::new();
    let first_list = ready.register("first list of the cluster's manifests");
    let (trigger, drain) = drain::new();
    let mut registry = isthmus_core::metrics::new_registry("controller");
    let metrics = Metrics::register(&mut registry);
    let gateway: SocketAddr = config.gateway_address.parse().with_context(|| {
        format!("gatewayAddress {:?} must be an IP:port (the local gateway's address for ServiceEntry endpoints)", config.gateway_address)
    })?;

    let listener = TcpListener::bind(config.federation_addr).await.with_context(|| {
        format!("cannot bind the federation listener to {}; is another controller running? (listen.federation)", config.federation_addr)
    })?;
    let federation_addr = listener.local_addr()?;
    let local_listener = TcpListener::bind(config.local_addr).await.with_context(|| {
        format!("cannot bind the local config/CA listener to {}; is another controller running? (listen.local)", config.local_addr)
    })?;
    let local_addr = local_listener.local_addr()?;

    // Source → store → catalogue. The sink follows the source: a cluster
    // read from files gets its imports as files beside its manifests, one
    // read from its API server gets them there.
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    let mut source_health = None;
    let mut scopes: Vec<crate::source::Scope> = Kind::ALL.iter().map(|&k| k.into()).collect();
    let mut observed_exports = None;
    let kube_client = match &config.source {
        SourceConfig::Files { dir } => {
            tokio::spawn(
                FilesSource::new(dir)
                    .run(events_tx)
                    .instrument(info_span!("source", dir = %dir.display())),
            );
            None
        }
        SourceConfig::Kube(k) => {
            let (client, url) = crate::k8s::client(k).await?;
            let source = KubeSource::new(client.clone(), k.watch.clone());
            scopes = source.scopes();
            source_health = Some(source.health());
            observed_exports = Some(source.observed_exports());
            tokio::spawn(
                source
                    .run(events_tx)
                    .instrument(info_span!("source", api = %url)),
            );
            Some((client, url))
        }
    };
    let (mut store, mut objects) = Store::new(scopes);
    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(Catalog::default()));
    let (export_states_tx, export_states_rx) = watch::channel(Arc::new(BTreeMap::new()));
    let locality = config.cluster.locality.clone();
    let problem_metric = metrics.config_rejected.clone();
    tokio::spawn(async move {
        let mut first = Some(first_list);
        let mut problems = BTreeSet::new();
        loop {
            tokio::select! {
                e = events_rx.recv() => match e {
                    Some(e) => {
                        // Whatever else is already queued goes in the same
                        // batch: one publication per burst, not per object.
                        let mut batch = vec![e];
                        while batch.len() < 4096 {
                            match events_rx.try_recv() {
                                Ok(e) => batch.push(e),
                                Err(_) => break,
                            }
                        }
                        store.apply_batch(batch);
                    }
                    None => return,
                },
                _ = objects.changed() => {
                    let snapshot = objects.borrow_and_update().clone();
                    let locality = locality.clone();
                    // CPU-heavy at 10,000 services: off the workers.
                    let started = std::time::Instant::now();
                    let Ok(cat) = tokio::task::spawn_blocking(move || Catalog::build(&snapshot, &locality)).await else {
                        return;
                    };
                    let mut cat = cat;
                    tracing::debug!(exports = cat.exports.len(), took = ?started.elapsed(), "catalogue built");
                    // ServiceExport status goes its own way: a status write
                    // (ours, echoed by the watch) changes nothing else, so
                    // it must not recompute merges and config pushes.
                    let states = std::mem::take(&mut cat.export_states);
                    export_states_tx.send_if_modified(|s| {
                        let changed = **s != states;
                        if changed {
                            *s = Arc::new(states);
                        }
                        changed
                    });
                    let now: BTreeSet<ConfigProblem> = cat.problems.iter().cloned().collect();
                    for p in now.difference(&problems) {
                        tracing::warn!(problem = %p, "configuration object cannot be applied as written");
                        problem_metric
                            .get_or_create(&RejectedLabels { kind: p.kind.clone(), reason: p.effect.as_str() })
                            .inc();
                    }
                    problems = now;
                    // Only a change is news: a relist that finds the same
                    // cluster (or a status echo) wakes no one.
                    catalog_tx.send_if_modified(|c| {
                        let changed = **c != cat;
                        if changed {
                            *c = Arc::new(cat);
                        }
                        changed
                    });
                    first.take();
                }
            }
        }
    });

    let allowed: Arc<RwLock<BTreeSet<SpiffeId>>> = Arc::default();
    let client_certs = deps.certs.clone();
    let client_trust = deps.trust.clone();
    let shared = Arc::new(Shared {
        cluster: config.cluster.name.0.clone(),
        trust_domain: config.cluster.trust_domain.clone(),
        locality: config.cluster.locality.clone(),
        gateway_address: config.gateway_address.clone(),
        epoch: hex::encode(rand::random::<[u8; 8]>()),
        heartbeat: config.heartbeat,
        lease: config.stale_lease,
        trust: deps.trust.clone(),
        catalog: catalog_rx,
        peers: RwLock::default(),
        allowed: allowed.clone(),
        state: match (&config.source, &kube_client) {
            (SourceConfig::Kube(k), Some((client, _))) => StateStore::Secrets {
                client: client.clone(),
                namespace: k.namespace.clone(),
            },
            _ => StateStore::Dir(config.state_dir.clone()),
        },
        peer_records: Default::default(),
        advertised: config.advertised(),
        client_tls: ClientTls(Box::new(move |expect| {
            isthmus_core::tls::client_config(
                Some(client_certs.clone()),
                client_trust.clone(),
                Expect::Exactly(expect.clone()),
                &[],
            )
        })),
        changed: Arc::new(Notify::new()),
        shutdown: drain.signal(),
        metrics,
        conflicts: watch::channel(Arc::new(Vec::new())).0,
        // Kube mode elects its writer; a files cluster has one controller.
        writer: watch::channel(kube_client.is_none()).0,
    });

    // Federation server: peers' controllers get in with mTLS; anonymous
    // clients only reach `Link`.
    let server_tls = isthmus_core::tls::server_config_optional_clients(
        deps.certs.clone(),
        deps.trust.clone(),
        Expect::OneOf(allowed),
        &[],
    );
    let service = PeerFederationServer::new(FederationService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let stop = shared.shutdown.clone();
    let server_drain = drain.clone();
    let accept_drain = drain.clone();
    tokio::spawn(
        async move {
            let served = grpc_server()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    crate::transport::incoming(listener, server_tls, Some(accept_drain)),
                    async move { stop.signaled().await },
                );
            if let Err(e) = server_drain.release_after(served).await {
                tracing::warn!(error = %e, "federation server stopped with an error");
            }
        }
        .instrument(info_span!("federation_server")),
    );

    // Peers from the config and from earlier links, seeded from the
    // ServiceEntries a previous run wrote.
    let mut leader_dump = None;
    let sink: Arc<dyn Sink> = match (&config.source, &kube_client) {
        (SourceConfig::Files { dir }, _) => Arc::new(FilesSink::new(dir, gateway)),
        (SourceConfig::Kube(k), Some((client, url))) => {
            if let Some(ca) = &deps.ca {
                let info = crate::state_store::ClusterInfo {
                    cluster: shared.cluster.clone(),
                    trust_domain: shared.trust_domain.to_string(),
                    address: shared.advertised.clone().unwrap_or_default(),
                    identity: SpiffeId::controller(&shared.trust_domain, &shared.cluster)?
                        .to_string(),
                    root_fingerprint: isthmus_core::identity::trust::fingerprint(ca.root()),
                };
                let (client, ns, stop) =
                    (client.clone(), k.namespace.clone(), shared.shutdown.clone());
                tokio::spawn(async move {
                    // Until it is there: `isthmus link create` reads it.
                    loop {
                        match crate::state_store::publish_cluster_info(&client, &ns, &info).await {
                            Ok(()) => return,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot publish this cluster's link details; retrying in 5 s")
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                            _ = stop.signaled() => return,
                        }
                    }
                });
            }
            let identity = crate::leader::identity();
            leader_dump = Some(LeaderDump {
                identity: identity.clone(),
                lease: format!("{}/{}", k.namespace, k.leader_election.name),
                writer: shared.writer.subscribe(),
            });
            tokio::spawn(
                drain
                    .clone()
                    .release_after(crate::leader::run(
                        client.clone(),
                        k.namespace.clone(),
                        k.leader_election.clone(),
                        identity.clone(),
                        shared.writer.clone(),
                        shared.shutdown.clone(),
                    ))
                    .instrument(info_span!("leader", %identity)),
            );
            tokio::spawn(
                crate::sink::export_status::run(
                    client.clone(),
                    shared.cluster.clone(),
                    crate::sink::export_status::Inputs {
                        catalog: shared.catalog.clone(),
                        states: export_states_rx.clone(),
                        observed: observed_exports
                            .clone()
                            .expect("a kube source observes its ServiceExports"),
                        conflicts: shared.conflicts.subscribe(),
                        leader: shared.writer.subscribe(),
                    },
                    shared.shutdown.clone(),
                )
                .instrument(info_span!("export_status")),
            );
            Arc::new(KubeSink::new(
                client.clone(),
                url.clone(),
                tokio::runtime::Handle::current(),
                gateway,
                shared.writer.subscribe(),
            ))
        }
        (SourceConfig::Kube(_), None) => unreachable!("a kube source has a client"),
    };
    let mut seeded = sink.seed();
    let mut initial: Vec<(PeerState, Option<TrustBundle>)> = config
        .peers
        .iter()
        .map(|p| {
            (
                PeerState::new(
                    &p.name.0,
                    &p.address,
                    p.trust_domain.clone(),
                    p.export_to.clone(),
                ),
                None,
            )
        })
        .collect();
    let records = match shared.state.peers().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, store = %shared.state.describe(), "cannot read linked peers at startup; they are added when readable");
            Vec::new()
        }
    };
    for f in records.into_iter().filter(|f| f.pending_token.is_none()) {
        let Ok(td) = isthmus_core::identity::TrustDomain::new(&f.trust_domain) else {
            continue;
        };
        let roots =
            isthmus_core::identity::pem::certs_from_pem(&f.trust_bundle_pem).unwrap_or_default();
        let bundle = (!roots.is_empty()).then(|| TrustBundle::new(td.clone(), roots, 1));
        initial.push((
            PeerState::new(&f.name, &f.address, td, Default::default()),
            bundle,
        ));
    }
    for (state, bundle) in initial {
        if let Some((locality, exports)) = seeded.remove(&state.name) {
            let mut i = state.lock();
            i.locality = locality;
            i.held = Some(Arc::new(exports));
            // Not stale yet: like any disconnected peer, it becomes stale
            // only if it does not reconnect within two heartbeats, so a
            // quick restart rewrites nothing.
            i.disconnected_since = Some(tokio::time::Instant::now());
        }
        add_peer(&shared, state, bundle);
    }
    tokio::spawn(peers_loop(shared.clone()).instrument(info_span!("peers")));

    let (mesh_tx, mesh_rx) = watch::channel(Arc::new(MeshState::default()));
    // The config stream for local sidecars and the gateway.
    let config_service = isthmus_proto::config::v1::mesh_config_server::MeshConfigServer::new(
        crate::configstream::ConfigService {
            cluster: shared.cluster.clone(),
            trust_domain: shared.trust_domain.to_string(),
            mesh: mesh_rx.clone(),
            trust: deps.trust.clone(),
        },
    )
    .max_encoding_message_size(64 * 1024 * 1024);
    // Who may get a certificate: bootstrap tokens from `caTokens`, or in
    // kube mode (without `caTokens`) projected ServiceAccount tokens
    // checked with a TokenReview.
    let auth = match (&config.ca_tokens, &config.source, &kube_client) {
        (Some(tokens), _, _) => {
            if let Some(ca) = &deps.ca {
                // Fail at startup, not at the first request, on a bad file.
                crate::casvc::load_tokens(tokens, ca).map_err(anyhow::Error::msg)?;
            }
            Some(crate::casvc::Authenticator::TokenFile(tokens.clone()))
        }
        (None, SourceConfig::Kube(k), Some((client, _))) => {
            Some(crate::casvc::Authenticator::TokenReview {
                client: client.clone(),
                gateway: k.gateway_service_account.clone(),
            })
        }
        _ => None,
    };
    let ca_service = match (&deps.ca, auth) {
        (Some(ca), Some(auth)) => Some(
            isthmus_proto::ca::v1::certificate_service_server::CertificateServiceServer::new(
                crate::casvc::CaService {
                    ca: ca.clone(),
                    auth,
                },
            ),
        ),
        _ => None,
    };
    let stop = shared.shutdown.clone();
    let local_drain = drain.clone();
    let local_accept_drain = drain.clone();
    // The local port is TLS too, with the controller's certificate:
    // sidecars check they reach their own cluster's controller before
    // sending a bootstrap token; a client certificate is optional (the CA
    // call has none yet) and verified in full when presented.
    let local_tls = isthmus_core::tls::server_config_optional_clients(
        deps.certs.clone(),
        deps.trust.clone(),
        Expect::AnyTrusted,
        &[b"h2"],
    );
    tokio::spawn(
        async move {
            let served = grpc_server()
                .add_service(config_service)
                .add_optional_service(ca_service)
                .serve_with_incoming_shutdown(
                    crate::transport::incoming(local_listener, local_tls, Some(local_accept_drain)),
                    async move { stop.signaled().await },
                );
            if let Err(e) = local_drain.release_after(served).await {
                tracing::warn!(error = %e, "config stream server stopped with an error");
            }
        }
        .instrument(info_span!("config_server")),
    );
    tokio::spawn(reconcile_loop(shared.clone(), sink, mesh_tx).instrument(info_span!("reconcile")));

    let servers = admin::start_servers(
        "controller",
        &config.admin,
        vec![
            Arc::new(StatusDump(shared.clone())) as Arc<dyn ConfigDump>,
            Arc::new(ConflictDump(shared.clone())),
            Arc::new(ProblemsDump(shared.catalog.clone())),
            Arc::new(LinksDump(shared.clone())),
            Arc::new(MeshDump(mesh_rx.clone())),
            Arc::new(admin::FixedDump("cluster", shared.cluster.clone().into())),
        ]
        .into_iter()
        .chain(source_health.map(|h| Arc::new(SourceDump(h)) as Arc<dyn ConfigDump>))
        .chain(leader_dump.map(|d| Arc::new(d) as Arc<dyn ConfigDump>))
        .collect(),
        deps.logs,
        registry,
        ready.clone(),
        &drain,
    )
    .await?;
    drop(drain);
    info!(cluster = %config.cluster.name, federation = %federation_addr, peers = shared.peers().len(), "controller running");
    Ok(Bound {
        federation_addr,
        local_addr,
        admin_addr: servers.admin,
        metrics_addr: servers.metrics,
        readiness_addr: servers.readiness,
        ready,
        shared,
        mesh: mesh_rx,
        trigger,
        quit: servers.quit,
    })
}

impl Bound {
    /// Per-peer status, as `isthmus status` shows it.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.shared.status()
    }

    /// Says goodbye to peers and stops.
    pub async fn shutdown(self, deadline: Duration) -> DrainOutcome {
        self.trigger.start_drain_and_wait(deadline).await
    }

    /// Runs until SIGTERM/SIGINT or `/quitquitquit`, then shuts down; a
    /// second signal during the drain exits at once.
    pub async fn wait_termination(mut self, deadline: Duration) -> DrainOutcome {
        let why = isthmus_core::signal::stop_requested(&mut self.quit).await;
        info!(reason = %why, "shutting down");
        isthmus_core::signal::second_signal_exits(self.shutdown(deadline)).await
    }
}
