//! Builds a sidecar: binds every listener (a busy port fails at startup),
//! follows the mesh state, and returns the bound addresses and a
//! shutdown handle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
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

use crate::config::ProxyConfig;
use crate::routes::Table;
use crate::telemetry::{AccessLog, Metrics};
use crate::{Ctx, inbound, lb, outbound, upstream};

/// What a sidecar needs from outside: its workload certificate, the
/// trust bundles of every cluster, and the mesh state (from the
/// controller's config stream; tests feed it directly).
pub struct Deps {
    pub certs: Arc<dyn CertSource>,
    pub trust: Arc<TrustStore>,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub logs: Option<LogControl>,
    /// Where access log lines go instead of stdout (tests, the demo).
    pub access_log: Option<AccessLog>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

/// A running sidecar.
#[derive(Debug)]
pub struct Bound {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub transparent_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub ready: Ready,
    pub ctx: Arc<Ctx>,
    trigger: DrainTrigger,
    quit: mpsc::Receiver<String>,
}

struct StateDump(watch::Receiver<Arc<Table>>);
impl ConfigDump for StateDump {
    fn name(&self) -> &str {
        "mesh"
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&*self.0.borrow().state).unwrap_or_default()
    }
}

struct EffectiveDump {
    workload: crate::config::WorkloadSection,
    identity: String,
    table: watch::Receiver<Arc<Table>>,
}
impl ConfigDump for EffectiveDump {
    fn name(&self) -> &str {
        "workload"
    }
    fn dump(&self) -> serde_json::Value {
        let state = self.table.borrow().state.clone();
        let w = &self.workload;
        let authz: Vec<String> = state
            .authorization_policies
            .values()
            .filter(|p| p.applies_to(&w.namespace, &w.labels, inbound::ROOT_NAMESPACE))
            .map(|p| {
                let what = match &p.unenforceable {
                    Some(why) => format!(
                        "DENY-ALL {}/{} (cannot be enforced as written: {why})",
                        p.namespace, p.name
                    ),
                    None => format!("{:?} {}/{}", p.action, p.namespace, p.name),
                };
                if p.dry_run {
                    format!("{what} (dry-run: not enforced)")
                } else {
                    what
                }
            })
            .collect();
        let mode = inbound::mtls_mode(&state, &w.namespace, &w.labels, w.app.port());
        serde_json::json!({
            "identity": self.identity,
            "workload": w,
            "mtls_mode": format!("{mode:?}"),
            "authorization_policies": authz,
            "config_version": state.version,
        })
    }
}

async fn bind(addr: SocketAddr, what: &str, field: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot bind the {what} listener to tcp/{addr}; is another sidecar running? ({field} in the config)")
    })
}

/// Binds and starts a sidecar.
pub async fn build(config: ProxyConfig, deps: Deps) -> anyhow::Result<Bound> {
    isthmus_core::tls::install_crypto_provider();
    let ready = Ready::new();
    let first_config = ready.register("first config from the controller");
    let (trigger, drain) = drain::new();
    let mut registry = isthmus_core::metrics::new_registry("proxy");
    let metrics = Metrics::register(&mut registry);
    let log = match deps.access_log {
        Some(l) => l,
        None => AccessLog::start(config.access_log, metrics.access_log_dropped.clone()),
    };
    let w = &config.workload;
    let identity = SpiffeId::workload(
        &config.cluster.trust_domain,
        &w.namespace,
        &w.service_account,
    )
    .with_context(|| {
        format!(
            "workload namespace {:?} / serviceAccount {:?} do not make a SPIFFE ID",
            w.namespace, w.service_account
        )
    })?;
    let inbound_tls = Arc::new(isthmus_core::tls::server_config(
        deps.certs.clone(),
        deps.trust.clone(),
        Some(Expect::AnyTrusted),
        &[b"h2", b"http/1.1"],
    ));

    let outbound_l = bind(config.outbound_addr, "outbound", "listen.outbound").await?;
    let inbound_l = bind(config.inbound_addr, "inbound", "listen.inbound").await?;
    let transparent_l = match config.transparent_addr {
        Some(a) => Some(bind(a, "transparent outbound", "listen.transparent").await?),
        None => None,
    };

    let (table_tx, table_rx) = watch::channel(Arc::new(Table::new(deps.state.borrow().clone())));

    let gateway = config
        .gateway
        .as_deref()
        .map(|g| {
            isthmus_core::boot::resolve(
                "gateway",
                g,
                "the local east-west gateway's sidecar port, 15443",
            )
        })
        .transpose()?;
    let mut locality = config.cluster.locality.clone();
    if !w.zone.is_empty() {
        locality.zone = w.zone.clone();
    }
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    let app = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(http.clone());
    let app_h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(http);
    let principal = identity
        .to_string()
        .trim_start_matches("spiffe://")
        .to_owned();
    let ctx = Arc::new(Ctx {
        cluster: config.cluster.name.0.clone(),
        workload: w.clone(),
        own: crate::OwnLabels {
            cluster: config.cluster.name.0.as_str().into(),
            workload: w.name.as_str().into(),
            namespace: w.namespace.as_str().into(),
            principal: principal.as_str().into(),
            peer_header: [false, true].map(|h2| {
                crate::http::peer_header(&config.cluster.name.0, &w.namespace, &w.name, h2)
            }),
        },
        principal,
        identity: identity.clone(),
        table: table_rx.clone(),
        lb: lb::Balancers::new(locality, gateway, metrics.clone()),
        mesh: upstream::MeshPool::new(deps.certs.clone(), deps.trust.clone()),
        app,
        app_h2,
        inbound_tls,
        metrics,
        log,
        drain: drain.signal(),
    });

    // Follow the mesh state: rebuild the route table on each change.
    let mut state = deps.state.clone();
    let follow_drain = drain.signal();
    let follow_ctx = ctx.clone();
    tokio::spawn(
        async move {
            let mut first = Some(first_config);
            let mut imported = None;
            loop {
                let s = state.borrow_and_update().clone();
                let version = s.version;
                // Remote clusters changed (one came back, one left):
                // connections through the gateway are renewed so it can
                // choose again (failback in one config update, not after
                // REMOTE_MAX_AGE).
                if imported.as_ref().is_some_and(|i| *i != s.imported)
                    && let Some(gw) = gateway
                {
                    follow_ctx.mesh.clear_addr(gw);
                }
                imported = Some(s.imported.clone());
                table_tx.send_replace(Arc::new(Table::new(s)));
                if version > 0 && first.take().is_some() {
                    info!(version, "first mesh config applied; ready");
                }
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { break },
                    _ = follow_drain.signaled() => break,
                }
            }
        }
        .instrument(info_span!("state")),
    );

    let servers = admin::start_servers(
        "proxy",
        &config.admin,
        vec![
            Arc::new(StateDump(table_rx.clone())) as Arc<dyn ConfigDump>,
            Arc::new(EffectiveDump {
                workload: w.clone(),
                identity: identity.to_string(),
                table: table_rx,
            }),
        ],
        deps.logs,
        registry,
        ready.clone(),
        &drain,
    )
    .await?;

    let outbound_addr = outbound_l.local_addr()?;
    let inbound_addr = inbound_l.local_addr()?;
    let transparent_addr = transparent_l.as_ref().map(|l| l.local_addr()).transpose()?;
    tokio::spawn(
        outbound::serve(outbound_l, ctx.clone(), false).instrument(info_span!("outbound")),
    );
    if let Some(l) = transparent_l {
        tokio::spawn(outbound::serve(l, ctx.clone(), true).instrument(info_span!("transparent")));
    }
    tokio::spawn(inbound::serve(inbound_l, ctx.clone()).instrument(info_span!("inbound")));
    drop(drain);
    info!(workload = %identity, outbound = %outbound_addr, inbound = %inbound_addr, "sidecar listening");
    Ok(Bound {
        outbound_addr,
        inbound_addr,
        transparent_addr,
        admin_addr: servers.admin,
        metrics_addr: servers.metrics,
        readiness_addr: servers.readiness,
        ready,
        ctx,
        trigger,
        quit: servers.quit,
    })
}

impl Bound {
    /// Drains: stops accepting, lets requests in flight finish until
    /// `deadline`.
    pub async fn shutdown(self, deadline: Duration) -> DrainOutcome {
        let outcome = self.trigger.start_drain_and_wait(deadline).await;
        if let DrainOutcome::DeadlineExceeded { still_open } = outcome {
            warn!(
                still_open,
                "drain deadline passed; closing remaining connections"
            );
        }
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
