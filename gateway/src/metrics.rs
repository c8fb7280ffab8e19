//! Gateway metrics. Istio's `istio_tcp_*` names (with `source_cluster` and
//! `destination_cluster`) so existing dashboards and Kiali read them; the
//! gateway's own series under `isthmus_gateway_`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of Istio's TCP metrics, as ztunnel reports them.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer_cluster: String,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    Outbound,
    Inbound,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub peer_cluster: String,
    pub direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub peer_cluster: String,
    pub direction: Direction,
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabels {
    pub destination_service: String,
    pub from_cluster: String,
    pub to_cluster: String,
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Every gateway series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub peer_connections: Family<PeerLabels, Gauge>,
    pub peer_up: Family<PeerLabels, Gauge>,
    pub peer_rtt_us: Family<PeerLabels, Gauge>,
    pub streams_opened: Family<StreamLabels, Counter>,
    pub streams_refused: Family<RefusedLabels, Counter>,
    pub failovers: Family<FailoverLabels, Counter>,
    pub sni_errors: Family<ReasonLabels, Counter>,
    pub connections_unrouted: Family<ReasonLabels, Counter>,
}

impl Metrics {
    /// Registers every series in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the destination",
            m.tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the destination",
            m.tcp_received_bytes.clone(),
        );
        let sub = isthmus_core::metrics::sub_registry(registry, "gateway");
        sub.register(
            "peer_connections",
            "Open QUIC connections per peer gateway",
            m.peer_connections.clone(),
        );
        sub.register(
            "peer_up",
            "1 while the peer gateway answers probes",
            m.peer_up.clone(),
        );
        sub.register(
            "peer_rtt_microseconds",
            "Smoothed QUIC RTT to the peer gateway",
            m.peer_rtt_us.clone(),
        );
        sub.register(
            "streams_opened",
            "Tunnel streams opened",
            m.streams_opened.clone(),
        );
        sub.register(
            "streams_refused",
            "Tunnel streams refused, by reason",
            m.streams_refused.clone(),
        );
        sub.register(
            "failovers",
            "Connections moved to another cluster, with from, to and reason",
            m.failovers.clone(),
        );
        sub.register(
            "sni_errors",
            "Sidecar connections closed for a bad ClientHello, by reason",
            m.sni_errors.clone(),
        );
        sub.register(
            "connections_unrouted",
            "Sidecar connections no cluster could take, by reason",
            m.connections_unrouted.clone(),
        );
        m
    }
}
