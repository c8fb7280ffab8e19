//! The east-west gateway (`isthmus gateway`).
//!
//! Sidecars reach it on TCP 15443 with TLS whose SNI names the service
//! (`outbound_.<port>_.<subset>_.<fqdn>`); it never terminates that TLS. It
//! carries each connection inside one bidirectional QUIC stream to a peer
//! gateway (UDP 15443, mTLS with cluster identities, ALPN `isthmus/1`),
//! choosing the cluster by locality, health and weight, and failing over
//! before any client byte is forwarded. Peers' tunnels are checked against
//! this cluster's exports and spliced to a local endpoint.

pub mod app;
pub mod config;
pub mod header;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod quic;
pub mod run;
pub mod select;
pub mod sni;
pub mod splice;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;

use isthmus_core::drain::DrainSignal;
use isthmus_core::model::{Locality, MeshState};
use tokio::sync::watch;

/// What every connection handler reads.
#[derive(Debug)]
pub struct Ctx {
    pub cluster: String,
    pub locality: Locality,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub pool: Arc<pool::PeerPool>,
    pub metrics: metrics::Metrics,
    /// Observes the drain; each tunnel holds it open with `hold()`.
    pub drain: DrainSignal,
}

pub use run::run;
