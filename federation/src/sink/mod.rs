//! Where a controller's imports go: the reconciler hands a [`Sink`] the
//! desired imports and the sink makes the cluster hold exactly those,
//! reporting what it wrote. Rendering (`service_entry.rs`: ServiceEntry
//! today, ServiceImport next) is apart from the I/O (`files.rs` now; a
//! Kubernetes sink with server-side apply plugs in beside it).
//!
//! The reconciler calls a sink from one dedicated, lower-priority thread
//! (`controller.rs`, `sink_loop`): bulk writes may wait, heartbeats and
//! merges may not. So the methods are blocking.

pub mod export_status;
pub mod files;
pub mod kube;
pub mod service_entry;

use std::fmt;

use crate::import::Imports;
pub use files::FilesSink;
pub use service_entry::Seed;

/// What one sink pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkReport {
    pub written: Vec<String>,
    pub unchanged: usize,
    pub deleted: Vec<String>,
}

/// A pass that could not complete. The reconciler retries the same state
/// (unless a newer one arrives); the message names where and what to
/// check.
#[derive(Debug, thiserror::Error)]
#[error("cannot write imports to {target}: {source} ({hint})")]
pub struct SinkError {
    /// Where the sink writes (a directory, an API server).
    pub target: String,
    pub hint: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Makes the cluster hold the desired imports.
pub trait Sink: fmt::Debug + Send + Sync + 'static {
    /// Makes the cluster hold exactly `desired`: writes what differs from
    /// what is there, removes what Isthmus wrote for services no longer
    /// imported, never touches objects it does not own. The first pass,
    /// and the one after a failure.
    fn apply_all(&self, desired: &Imports) -> Result<SinkReport, SinkError>;

    /// The pass after a successful one: only what changed from `prev` to
    /// `next` is rendered and written, so one service moving among 10,000
    /// costs one write.
    fn apply_change(&self, prev: &Imports, next: &Imports) -> Result<SinkReport, SinkError>;

    /// What a previous run imported, read back from what it wrote: a
    /// restarted controller starts from it (marked stale) so it neither
    /// loses imports nor rewrites them before its peers have re-synced.
    fn seed(&self) -> Seed;

    /// Where the sink writes, for operators' messages.
    fn target(&self) -> String;
}
