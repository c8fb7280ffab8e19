//! The sidecar proxy (`isthmus proxy`).
//!
//! Beside each workload: outbound (15001) routes the app's HTTP requests
//! with Istio's VirtualService and DestinationRule over pooled HTTP/2 +
//! mTLS to the destination's sidecar, or through the local east-west
//! gateway when the service lives in another cluster; inbound (15006)
//! terminates mTLS, applies PeerAuthentication and AuthorizationPolicy to
//! the caller's own identity, and forwards to the app. Metrics follow
//! Istio's names; the access log is JSON.

pub mod app;
pub mod config;
pub mod http;
pub mod inbound;
pub mod lb;
pub mod outbound;
pub mod path;
pub mod routes;
pub mod run;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod upstream;

use std::sync::Arc;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use isthmus_core::drain::DrainSignal;
use isthmus_core::identity::SpiffeId;
use tokio::sync::watch;

/// What every request handler reads.
pub struct Ctx {
    pub cluster: String,
    pub workload: config::WorkloadSection,
    /// This workload's SPIFFE ID.
    pub identity: SpiffeId,
    /// Istio's principal form of `identity` (no `spiffe://`).
    pub principal: String,
    /// This workload's own metric label values, made once.
    pub own: OwnLabels,
    pub table: watch::Receiver<Arc<routes::Table>>,
    pub lb: lb::Balancers,
    pub mesh: upstream::MeshPool,
    /// HTTP/1.1 client for the local app and passthrough.
    pub app: Client<HttpConnector, upstream::Body>,
    /// HTTP/2 (h2c) client for the local app, for h2c and gRPC callers.
    pub app_h2: Client<HttpConnector, upstream::Body>,
    pub inbound_tls: Arc<rustls::ServerConfig>,
    pub metrics: telemetry::Metrics,
    pub log: telemetry::AccessLog,
    /// Observes the drain; each connection holds it open with `hold()`.
    pub drain: DrainSignal,
}

/// The label values naming this sidecar's own workload.
#[derive(Debug, Clone)]
pub struct OwnLabels {
    pub cluster: telemetry::Label,
    pub workload: telemetry::Label,
    pub namespace: telemetry::Label,
    pub principal: telemetry::Label,
    /// The peer-metadata header this sidecar sends: for an HTTP/1.1
    /// caller, and for an HTTP/2 one.
    pub peer_header: [hyper::header::HeaderValue; 2],
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("cluster", &self.cluster)
            .field("identity", &self.identity.to_string())
            .finish_non_exhaustive()
    }
}
