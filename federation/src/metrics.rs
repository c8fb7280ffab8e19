//! The controller's own series: `isthmus_federation_*` and
//! `isthmus_config_rejected_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// [`crate::session::EndReason::as_str`].
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub kind: String,
    /// What was done instead: `ignored`, `denies_every_request`, `strict`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// Controller metrics (`isthmus_federation_*`).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub peers: Family<StateLabel, Gauge>,
    pub terminations: Family<ReasonLabel, Counter>,
    pub services_exported: Gauge,
    pub services_imported: Gauge,
    pub conflicts: Gauge,
    /// From a peer's catalogue change arriving to the ServiceEntry files
    /// written, seconds.
    pub apply_latency: Histogram,
    /// Objects refused or applied in their strictest form, counted once
    /// each time one becomes a problem.
    pub config_rejected: Family<RejectedLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            peers: Family::default(),
            terminations: Family::default(),
            services_exported: Gauge::default(),
            services_imported: Gauge::default(),
            conflicts: Gauge::default(),
            apply_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            config_rejected: Family::default(),
        };
        registry.register(
            "isthmus_config_rejected",
            "Configuration objects refused or applied in their strictest form, by kind and what was done instead (ignored, denies_every_request, strict); isthmus status lists them",
            m.config_rejected.clone(),
        );
        let sub = isthmus_core::metrics::sub_registry(registry, "federation");
        sub.register(
            "peers",
            "Peers by state (connected, stale, disconnected)",
            m.peers.clone(),
        );
        sub.register(
            "stream_terminations",
            "Federation streams ended, by reason",
            m.terminations.clone(),
        );
        sub.register(
            "services_exported",
            "Services this cluster exports",
            m.services_exported.clone(),
        );
        sub.register(
            "services_imported",
            "Services imported from peers",
            m.services_imported.clone(),
        );
        sub.register(
            "export_conflicts",
            "Services whose exports conflict between clusters",
            m.conflicts.clone(),
        );
        sub.register(
            "import_apply_seconds",
            "Time from a catalogue change to ServiceEntries written",
            m.apply_latency.clone(),
        );
        m
    }
}
