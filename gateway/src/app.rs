//! Builds a gateway: binds every listener (so port conflicts fail at
//! startup), starts serving, and returns the bound addresses and a
//! shutdown handle.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::{self, ConfigDump};
use isthmus_core::drain::{self, DrainOutcome, DrainTrigger};
use isthmus_core::identity::verify::Expect;
use isthmus_core::identity::{SpiffeId, TrustStore};
use isthmus_core::model::MeshState;
use isthmus_core::readiness::Ready;
use isthmus_core::telemetry::LogControl;
pub use isthmus_core::tls::CertSource;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::pool::PeerPool;
use crate::{Ctx, inbound, outbound, quic};

/// What a gateway needs from outside: its certificate, the trust bundles
/// of every peer, and the mesh state (from the controller's config
/// stream; tests feed it directly).
#[derive(Debug)]
pub struct Deps {
    pub certs: Arc<dyn CertSource>,
    pub trust: Arc<TrustStore>,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub logs: Option<LogControl>,
}

/// A running gateway.
#[derive(Debug)]
pub struct Bound {
    pub sidecar_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub ready: Ready,
    trigger: DrainTrigger,
    endpoint: quinn::Endpoint,
    pool: Arc<PeerPool>,
    quit: mpsc::Receiver<String>,
}

struct StateDump(watch::Receiver<Arc<MeshState>>);
impl ConfigDump for StateDump {
    fn name(&self) -> &str {
        "mesh"
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&**self.0.borrow()).unwrap_or_default()
    }
}

struct PeersDump(Arc<PeerPool>, watch::Receiver<Arc<MeshState>>);
impl ConfigDump for PeersDump {
    fn name(&self) -> &str {
        "peers"
    }
    fn dump(&self) -> serde_json::Value {
        let paths = self.0.paths();
        let peers: Vec<_> = self
            .1
            .borrow()
            .peers
            .values()
            .map(|p| {
                serde_json::json!({
                    "cluster": p.cluster,
                    "address": p.address.to_string(),
                    "health": format!("{:?}", self.0.health(&p.cluster)),
                    "rtt_us": paths.get(&p.cluster).map(|(d, _)| d.as_micros() as u64),
                    "packet_size": paths.get(&p.cluster).map(|(_, m)| *m),
                })
            })
            .collect();
        serde_json::Value::Array(peers)
    }
}

/// Binds and starts a gateway.
pub async fn build(config: GatewayConfig, deps: Deps) -> anyhow::Result<Bound> {
    isthmus_core::tls::install_crypto_provider();
    let ready = Ready::new();
    let first_config = ready.register("first config from the controller");
    let (trigger, drain) = drain::new();
    let mut registry = isthmus_core::metrics::new_registry("gateway");
    let metrics = Metrics::register(&mut registry);

    // Peers allowed to connect: their gateway identities, kept in step
    // with the mesh state.
    let allowed: Arc<RwLock<BTreeSet<SpiffeId>>> = Arc::default();
    let server = quic::server_config(
        deps.certs.clone(),
        deps.trust.clone(),
        Expect::OneOf(allowed.clone()),
        config.idle_timeout,
        config.max_udp_payload,
    );
    let endpoint = quic::endpoint(server, config.peer_addr, config.max_udp_payload).with_context(|| {
        format!(
            "cannot bind the QUIC peer listener to udp/{}; is another gateway running? (listen.peers in the config)",
            config.peer_addr
        )
    })?;
    let sidecars = TcpListener::bind(config.sidecar_addr).await.with_context(|| {
        format!(
            "cannot bind the sidecar listener to tcp/{}; is another gateway running? (listen.sidecars in the config)",
            config.sidecar_addr
        )
    })?;
    let sidecar_addr = sidecars.local_addr()?;
    let peer_addr = endpoint.local_addr()?;

    let client_certs = deps.certs.clone();
    let client_trust = deps.trust.clone();
    let (idle, mtu) = (config.idle_timeout, config.max_udp_payload);
    let pool = PeerPool::new(
        config.cluster.name.0.clone(),
        endpoint.clone(),
        Box::new(move |expect| {
            quic::client_config(
                client_certs.clone(),
                client_trust.clone(),
                Expect::Exactly(expect.clone()),
                idle,
                mtu,
            )
        }),
        config.connections_per_peer as usize,
        metrics.clone(),
    );

    let ctx = Arc::new(Ctx {
        cluster: config.cluster.name.0.clone(),
        locality: config.cluster.locality.clone(),
        state: deps.state.clone(),
        pool: pool.clone(),
        metrics,
        drain: drain.signal(),
    });

    // Follow the mesh state: peers to connect to and to accept.
    let mut state = deps.state.clone();
    let sync_pool = pool.clone();
    let sync_drain = drain.signal();
    tokio::spawn(
        async move {
            let mut first = Some(first_config);
            loop {
                {
                    let s = state.borrow_and_update().clone();
                    let ids: BTreeSet<SpiffeId> = s
                        .peers
                        .values()
                        .filter_map(|p| SpiffeId::gateway(&p.trust_domain, &p.cluster).ok())
                        .collect();
                    *allowed.write().unwrap_or_else(|e| e.into_inner()) = ids;
                    sync_pool.sync(&s.peers);
                    if s.version > 0 && first.take().is_some() {
                        info!(
                            version = s.version,
                            peers = s.peers.len(),
                            "first mesh config applied; ready"
                        );
                    }
                }
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { break },
                    _ = sync_drain.signaled() => break,
                }
            }
        }
        .instrument(info_span!("state")),
    );

    let servers = admin::start_servers(
        "gateway",
        &config.admin,
        vec![
            Arc::new(StateDump(deps.state.clone())) as Arc<dyn ConfigDump>,
            Arc::new(PeersDump(pool.clone(), deps.state.clone())),
            Arc::new(isthmus_core::admin::FixedDump(
                "cluster",
                config.cluster.name.0.clone().into(),
            )),
        ],
        deps.logs,
        registry,
        ready.clone(),
        &drain,
    )
    .await?;

    tokio::spawn(inbound::serve(endpoint.clone(), ctx.clone()).instrument(info_span!("inbound")));
    tokio::spawn(outbound::serve(sidecars, ctx).instrument(info_span!("outbound")));
    drop(drain);
    info!(cluster = %config.cluster.name, sidecars = %sidecar_addr, peers = %peer_addr, "gateway listening");
    Ok(Bound {
        sidecar_addr,
        peer_addr,
        admin_addr: servers.admin,
        metrics_addr: servers.metrics,
        readiness_addr: servers.readiness,
        ready,
        trigger,
        endpoint,
        pool,
        quit: servers.quit,
    })
}

impl Bound {
    /// RTT and QUIC packet size towards each connected peer.
    pub fn peer_paths(&self) -> std::collections::BTreeMap<String, (Duration, u16)> {
        self.pool.paths()
    }

    /// This gateway's view of a peer's health.
    pub fn peer_health(&self, cluster: &str) -> crate::pool::Health {
        self.pool.health(cluster)
    }

    /// Drains: stops accepting, lets tunnels finish until `deadline`, then
    /// closes QUIC cleanly and waits for peers to learn it (`wait_idle`),
    /// so they do not sit out their idle timeout.
    pub async fn shutdown(self, deadline: Duration) -> DrainOutcome {
        let outcome = self.trigger.start_drain_and_wait(deadline).await;
        if let DrainOutcome::DeadlineExceeded { still_open } = outcome {
            warn!(
                still_open,
                "drain deadline passed; closing remaining tunnels"
            );
        }
        self.pool.close_all();
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"gateway shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        outcome
    }

    /// Runs until SIGTERM/SIGINT or `/quitquitquit`, then shuts down; a
    /// second signal during the drain exits at once.
    pub async fn wait_termination(mut self, deadline: Duration) -> DrainOutcome {
        let why = isthmus_core::signal::stop_requested(&mut self.quit).await;
        info!(reason = %why, "shutting down");
        isthmus_core::signal::second_signal_exits(self.shutdown(deadline)).await
    }
}
