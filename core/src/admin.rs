//! The three small HTTP servers every Isthmus binary runs, each on its own
//! port so a slow stats scrape never shares a socket with probes:
//!
//! | port | path | what |
//! | --- | --- | --- |
//! | 15000 (loopback only) | `/config_dump`, `/logging`, `/quitquitquit` | admin |
//! | 15020 | `/metrics`, `/stats/prometheus` | Prometheus (OpenMetrics) |
//! | 15021 | `/healthz/ready` | readiness probe |

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::drain::DrainWatcher;
use crate::readiness::Ready;
use crate::telemetry::LogControl;

/// A section of `/config_dump`, registered by a subsystem.
pub trait ConfigDump: Send + Sync {
    /// Key of the section in the dump.
    fn name(&self) -> &str;
    /// The section's current state.
    fn dump(&self) -> serde_json::Value;
}

/// A section whose value never changes (`cluster`: the component's
/// cluster name, so a reader of several dumps knows which is which).
#[derive(Debug)]
pub struct FixedDump(pub &'static str, pub serde_json::Value);

impl ConfigDump for FixedDump {
    fn name(&self) -> &str {
        self.0
    }
    fn dump(&self) -> serde_json::Value {
        self.1.clone()
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot bind the {name} server to {addr}: {source}; is another process using the port? (choose another with the config file)"
)]
pub struct BindError {
    pub name: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// A listener bound at startup (so port conflicts fail early), served
/// later.
#[derive(Debug)]
pub struct BoundServer {
    name: &'static str,
    listener: TcpListener,
    router: Router,
}

impl BoundServer {
    /// Binds `addr` for `router`.
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        router: Router,
    ) -> Result<Self, BindError> {
        let listener =
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError { name, addr, source })?;
        Ok(Self {
            name,
            listener,
            router,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until the drain starts, then finishes open requests.
    pub fn spawn(self, drain: DrainWatcher) -> tokio::task::JoinHandle<()> {
        let name = self.name;
        tokio::spawn(async move {
            let stop = drain.clone();
            let served = axum::serve(self.listener, self.router)
                .with_graceful_shutdown(async move { stop.signaled().await });
            if let Err(e) = drain.release_after(served.into_future()).await {
                tracing::warn!(server = name, error = %e, "server stopped with an error");
            }
        })
    }
}

/// The three standard servers of a component, bound and serving.
#[derive(Debug)]
pub struct Servers {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    /// Receives `/quitquitquit` requests.
    pub quit: mpsc::Receiver<String>,
}

/// Binds the admin, metrics and readiness servers of `cfg` (failing at
/// startup on a busy port) and serves them until the drain.
pub async fn start_servers(
    component: &'static str,
    cfg: &crate::config::AdminSection,
    sections: Vec<Arc<dyn ConfigDump>>,
    logs: Option<LogControl>,
    registry: Registry,
    ready: Ready,
    drain: &DrainWatcher,
) -> Result<Servers, BindError> {
    let (quit_tx, quit) = mpsc::channel(1);
    let admin = BoundServer::bind(
        "admin",
        cfg.admin,
        admin_router(AdminState {
            component,
            sections: Arc::new(sections),
            logs,
            quit: quit_tx,
        }),
    )
    .await?;
    let metrics =
        BoundServer::bind("metrics", cfg.metrics, metrics_router(Arc::new(registry))).await?;
    let readiness = BoundServer::bind("readiness", cfg.readiness, readiness_router(ready)).await?;
    let out = Servers {
        admin: admin.local_addr(),
        metrics: metrics.local_addr(),
        readiness: readiness.local_addr(),
        quit,
    };
    serve_on_own_thread(component, [admin, metrics, readiness], drain.clone()).map_err(
        |source| BindError {
            name: "admin thread",
            addr: out.admin,
            source,
        },
    )?;
    Ok(out)
}

/// Serves `servers` on a thread of their own (`<component>-admin`) with a
/// one-thread runtime, as ztunnel and Linkerd's proxy do: a scrape, a
/// config dump or a readiness probe never waits behind forwarding, and a
/// sidecar's one data-plane worker never runs them. The thread ends once
/// the servers have finished after the drain (or the drain's owner is
/// gone).
fn serve_on_own_thread(
    component: &'static str,
    servers: [BoundServer; 3],
    drain: DrainWatcher,
) -> std::io::Result<()> {
    let mut moved = Vec::with_capacity(servers.len());
    for s in servers {
        moved.push((s.name, s.listener.into_std()?, s.router));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("{component}-admin"))
        .spawn(move || {
            rt.block_on(async move {
                let mut running = Vec::with_capacity(moved.len());
                for (name, listener, router) in moved {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => running.push(
                            BoundServer {
                                name,
                                listener,
                                router,
                            }
                            .spawn(drain.clone()),
                        ),
                        Err(e) => {
                            tracing::error!(server = name, error = %e, "cannot serve this listener on the admin thread")
                        }
                    }
                }
                drop(drain);
                for r in running {
                    let _ = r.await;
                }
            });
        })?;
    Ok(())
}

/// GETs `path` from an admin, metrics or readiness server (HTTP/1.1,
/// one request); returns the body of a 2xx answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut raw),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status: u16 = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    if !(200..300).contains(&status) {
        return Err(std::io::Error::other(format!(
            "{path} answered {status}: {}",
            body.trim()
        )));
    }
    Ok(body.to_owned())
}

/// `/healthz/ready`: 200 `ready`, or 503 naming the pending blockers.
pub fn readiness_router(ready: Ready) -> Router {
    Router::new()
        .route(
            "/healthz/ready",
            get(|State(ready): State<Ready>| async move {
                let pending = ready.pending();
                if pending.is_empty() {
                    (StatusCode::OK, "ready\n".to_owned())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: waiting for {}\n", pending.join(", ")),
                    )
                }
            }),
        )
        .with_state(ready)
}

/// `/metrics` and `/stats/prometheus` (the path Istio's scrape
/// annotations use) serving the same registry.
pub fn metrics_router(registry: Arc<Registry>) -> Router {
    async fn scrape(State(registry): State<Arc<Registry>>) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                crate::metrics::OPENMETRICS_CONTENT_TYPE,
            )],
            crate::metrics::encode(&registry),
        )
            .into_response()
    }
    Router::new()
        .route("/metrics", get(scrape))
        .route("/stats/prometheus", get(scrape))
        .with_state(registry)
}

/// State of the admin server.
#[derive(Clone)]
pub struct AdminState {
    pub component: &'static str,
    pub sections: Arc<Vec<Arc<dyn ConfigDump>>>,
    pub logs: Option<LogControl>,
    /// `/quitquitquit` sends here; the app drains on receipt.
    pub quit: mpsc::Sender<String>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("component", &self.component)
            .field(
                "sections",
                &self
                    .sections
                    .iter()
                    .map(|s| s.name().to_owned())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[derive(Debug, serde::Deserialize)]
struct LevelQuery {
    level: Option<String>,
}

/// The admin API: `/` (index), `/config_dump`, `/logging` (GET shows,
/// POST `?level=<filter>` changes), POST `/quitquitquit` (drain and exit).
pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/",
            get(|State(s): State<AdminState>| async move {
                format!(
                    "isthmus {} admin\n  GET  /config_dump\n  GET  /logging\n  POST /logging?level=<filter>\n  POST /quitquitquit\n",
                    s.component
                )
            }),
        )
        .route(
            "/config_dump",
            get(|State(s): State<AdminState>| async move {
                let mut dump = serde_json::Map::new();
                dump.insert("component".into(), s.component.into());
                dump.insert("version".into(), env!("CARGO_PKG_VERSION").into());
                for section in s.sections.iter() {
                    dump.insert(section.name().to_owned(), section.dump());
                }
                axum::Json(serde_json::Value::Object(dump))
            }),
        )
        .route(
            "/logging",
            get(|State(s): State<AdminState>| async move {
                match &s.logs {
                    Some(l) => (StatusCode::OK, format!("{}\n", l.current())),
                    None => (StatusCode::NOT_FOUND, "logging is not controlled by this process\n".into()),
                }
            })
            .post(|State(s): State<AdminState>, Query(q): Query<LevelQuery>| async move {
                let (Some(logs), Some(level)) = (&s.logs, q.level) else {
                    return (
                        StatusCode::BAD_REQUEST,
                        "usage: POST /logging?level=<filter>, e.g. level=info,isthmus_gateway=debug\n".to_owned(),
                    );
                };
                match logs.set(&level) {
                    Ok(()) => (StatusCode::OK, format!("{level}\n")),
                    Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }),
        )
        .route(
            "/quitquitquit",
            post(|State(s): State<AdminState>| async move {
                let _ = s.quit.try_send("POST /quitquitquit".to_owned());
                "draining\n"
            }),
        )
        .with_state(state)
}
