//! Upstream connections: pooled HTTP/2 over mTLS to destination sidecars
//! (and, for the remote tier, to the local gateway with Istio's SNI), the
//! peer's SPIFFE identity checked against its trust domain's bundle;
//! pooled HTTP/1.1 to the local app.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::identity::TrustStore;
use isthmus_core::identity::verify::Expect;
use isthmus_core::tls::CertSource;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

/// Errors crossing the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn incoming(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// How an upstream attempt failed before a response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failure: {0}")]
    Connect(String),
    #[error("reset before response headers: {0}")]
    Reset(String),
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Key {
    addr: SocketAddr,
    sni: String,
    namespace: String,
}

/// HTTP/2-over-mTLS connections by destination, shared by requests.
pub struct MeshPool {
    certs: Arc<dyn CertSource>,
    trust: Arc<TrustStore>,
    conns: Mutex<HashMap<Key, (http2::SendRequest<Body>, Instant)>>,
    /// One connect at a time per destination, so a burst shares it.
    connecting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for MeshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshPool").finish_non_exhaustive()
    }
}

impl MeshPool {
    pub fn new(certs: Arc<dyn CertSource>, trust: Arc<TrustStore>) -> Self {
        Self {
            certs,
            trust,
            conns: Mutex::default(),
            connecting: Mutex::default(),
        }
    }

    fn cached(&self, key: &Key, max_age: Option<Duration>) -> Option<http2::SendRequest<Body>> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .get(key)
            .filter(|(s, born)| !s.is_closed() && max_age.is_none_or(|m| born.elapsed() < m))
            .map(|(s, _)| s.clone())
    }

    async fn sender(
        &self,
        key: &Key,
        max_age: Option<Duration>,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        if let Some(s) = self.cached(key, max_age) {
            return Ok(s);
        }
        let gate = {
            let mut c = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
            c.entry(key.clone()).or_default().clone()
        };
        let _held = gate.lock().await;
        if let Some(s) = self.cached(key, max_age) {
            return Ok(s);
        }
        // Boxed: a connect (TCP, TLS handshake, HTTP/2 handshake) is a
        // large future, and inline it would make every request's future,
        // moved and polled on each request, that much larger too.
        let s = Box::pin(self.connect(key)).await?;
        // A replaced connection finishes its requests in flight, then
        // closes (its last sender is dropped).
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), (s.clone(), Instant::now()));
        Ok(s)
    }

    async fn connect(&self, key: &Key) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            UpstreamError::Connect(format!("{what} {}: {e}", key.addr))
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(key.addr))
            .await
            .map_err(|_| fail("connect", &"timed out"))?
            .map_err(|e| fail("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        let cfg = isthmus_core::tls::client_config(
            Some(self.certs.clone()),
            self.trust.clone(),
            Expect::InNamespace(key.namespace.clone()),
            &[b"h2"],
        );
        let name = ServerName::try_from(key.sni.clone()).map_err(|e| fail("server name", &e))?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
        )
        .await
        .map_err(|_| fail("TLS handshake with", &"timed out"))?
        .map_err(|e| fail("TLS handshake with", &e))?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail("HTTP/2 handshake with", &e))?;
        let addr = key.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(upstream = %addr, error = %e, "upstream connection closed");
            }
        });
        Ok(send)
    }

    /// Sends `req` to `addr` over mTLS with `sni`, accepting only a
    /// workload of `namespace` as the server. A pooled connection older
    /// than `max_age` is not used for new requests.
    pub async fn send(
        &self,
        addr: SocketAddr,
        sni: &str,
        namespace: &str,
        max_age: Option<Duration>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = Key {
            addr,
            sni: sni.to_owned(),
            namespace: namespace.to_owned(),
        };
        let mut s = self.sender(&key, max_age).await?;
        s.ready()
            .await
            .map_err(|e| UpstreamError::Connect(format!("{addr}: {e}")))?;
        s.send_request(req).await.map_err(|e| {
            // A refused stream (GOAWAY, REFUSED_STREAM) never reached the
            // app: as safe to retry as a connection failure.
            if e.is_canceled() || e.is_closed() {
                self.conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
            }
            UpstreamError::Reset(format!("{addr}: {e}"))
        })
    }

    /// Drops the pooled connections to `addr` (the gateway, when the
    /// remote clusters change: new connections let it choose again).
    pub fn clear_addr(&self, addr: SocketAddr) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| k.addr != addr);
    }

    /// Drops every pooled connection (after a certificate rotation new
    /// connections show the new certificate; old ones finish).
    pub fn clear(&self) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// How long a connection through the gateway serves new requests. The
/// gateway picks a cluster per connection, so a pooled connection stays
/// with the cluster it got; renewing it lets traffic fail back (or
/// rebalance) when a better cluster returns, like Envoy's
/// `max_connection_duration`.
pub const REMOTE_MAX_AGE: Duration = Duration::from_secs(5);

/// Istio's SNI for a mesh destination.
pub fn sni(port: u16, subset: Option<&str>, host: &str) -> String {
    format!("outbound_.{port}_.{}_.{host}", subset.unwrap_or(""))
}
