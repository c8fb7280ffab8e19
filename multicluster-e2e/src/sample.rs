//! The built-in sample app (Istio's helloworld): each answer names its
//! cluster, version, instance and zone, and the caller's identity as the
//! sidecar passed it on (XFCC). Tests make it fail on purpose
//! ([`App::set`]) and read what it received (`x-seen-<header>` answer
//! headers). The one sample app of the demo, the e2e suite and the
//! sidecar's tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Who an app instance is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster: String,
    pub version: String,
    pub instance: String,
    pub zone: String,
}

/// How the app answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    /// Every answer has this status.
    Status(u16),
    /// Every answer waits this long first.
    Delay(Duration),
}

/// Request headers a test may look at, echoed as `x-seen-<name>`.
pub const ECHOED: [&str; 6] = [
    "x-forwarded-client-cert",
    "x-request-id",
    "traceparent",
    "x-b3-traceid",
    "x-isthmus-peer",
    "host",
];

/// A running app; dropping or [`App::stop`] closes it and every
/// connection it holds (an instance dying).
#[derive(Debug)]
pub struct App {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    mode: Arc<Mutex<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    pub fn stop(&self) {
        self.task.abort();
    }
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    /// Changes how every following answer is made.
    pub fn set(&self, m: Mode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves on `addr`. `pad` bytes of filler follow the first line (the
/// benchmark's 1 KiB answers).
pub async fn start(addr: SocketAddr, who: Identity, pad: usize) -> std::io::Result<App> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    let mode = Arc::new(Mutex::new(Mode::Ok));
    let modes = mode.clone();
    let line = format!(
        "helloworld {} from {} instance {} zone {}",
        who.version, who.cluster, who.instance, who.zone
    );
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let (line, counter, modes) = (line.clone(), counter.clone(), modes.clone());
            conns.spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (line, counter, modes) = (line.clone(), counter.clone(), modes.clone());
                    async move {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let m = *modes.lock().unwrap_or_else(|e| e.into_inner());
                        let mut status = 200;
                        match m {
                            Mode::Ok => {}
                            Mode::Status(s) => status = s,
                            Mode::Delay(d) => tokio::time::sleep(d).await,
                        }
                        let caller = req
                            .headers()
                            .get("x-forwarded-client-cert")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.split("URI=").nth(1))
                            .unwrap_or("plaintext")
                            .to_owned();
                        let mut body = format!("{line} caller {caller}\n");
                        if pad > body.len() {
                            body.push_str(&"x".repeat(pad - body.len() - 1));
                            body.push('\n');
                        }
                        let mut resp = Response::builder().status(status);
                        for h in ECHOED {
                            if let Some(v) = req.headers().get(h) {
                                resp = resp.header(format!("x-seen-{h}"), v);
                            }
                        }
                        Ok::<_, std::convert::Infallible>(
                            resp.body(Full::new(Bytes::from(body)))
                                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
            // Reap finished connections.
            while conns.try_join_next().is_some() {}
        }
    });
    Ok(App {
        addr,
        hits,
        mode,
        task,
    })
}
