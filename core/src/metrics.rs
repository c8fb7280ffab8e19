//! The metrics registry: one tree, sub-registries per subsystem, exposed
//! as OpenMetrics text on the metrics port.
//!
//! Istio's metric names (`istio_requests_total`, `istio_tcp_*`) are
//! registered at the root without a prefix so existing dashboards read
//! them; Isthmus's own series live under `isthmus_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label value written when a value is unknown (Istio's convention).
pub const UNKNOWN: &str = "unknown";

/// Labels of `isthmus_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfo {
    pub version: String,
    pub component: String,
}

/// A root registry with `isthmus_build_info{version,component} 1`.
pub fn new_registry(component: &str) -> Registry {
    let mut registry = Registry::default();
    let info = Family::<BuildInfo, Gauge>::default();
    info.get_or_create(&BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        component: component.to_owned(),
    })
    .set(1);
    registry.register("isthmus_build_info", "Isthmus build information", info);
    registry
}

/// The sub-registry for Isthmus's own series of one subsystem:
/// `isthmus_<subsystem>_...`.
pub fn sub_registry<'a>(registry: &'a mut Registry, subsystem: &str) -> &'a mut Registry {
    registry.sub_registry_with_prefix(format!("isthmus_{subsystem}"))
}

/// Encodes the registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Content type of [`encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
