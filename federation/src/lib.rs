//! The per-cluster federation controller (`isthmus controller`).
//!
//! Reads its cluster through a watch-style source (`files` now), exports
//! services with a ServiceExport, peers with other clusters by one-time
//! tokens, federates catalogues over gRPC and mTLS, writes imports as
//! ServiceEntries, and serves the config stream and the CA service to
//! local proxies. See docs/architecture.md for the parts.

pub mod analyze;
pub mod app;
pub mod casvc;
pub mod catalog;
pub mod config;
pub mod configstream;
pub mod dial;
pub mod export;
pub mod import;
pub mod k8s;
pub mod leader;
pub mod link;
pub mod metrics;
pub mod objects;
pub mod reconcile;
pub mod run;
pub mod service;
pub mod session;
pub mod sink;
pub mod source;
pub mod state;
pub mod state_store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;

/// Directory (under a cluster's manifest directory) where the files sink
/// writes imported ServiceEntries; the files source never reads it.
pub const IMPORTS_DIR: &str = "isthmus-imports";

pub use run::run;
