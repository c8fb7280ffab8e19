//! Istio's request metrics and a JSON access log.
//!
//! `istio_requests_total` and `istio_request_duration_milliseconds` carry
//! Istio's label names so its dashboards and Kiali read them; the
//! sidecar's own series are under `isthmus_proxy_`. The access log is one
//! JSON object per line on stdout, written by a task of its own through a
//! bounded queue: a slow stdout drops lines (counted), never requests.

use std::io::Write;
use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

/// A label value: shared, so the values a sidecar knows up front (its
/// own workload, cluster, principal; `unknown`) cost no allocation per
/// request.
pub type Label = Arc<str>;

/// The `unknown` label value Istio uses for what is not known.
pub fn unknown() -> Label {
    static UNKNOWN: LazyLock<Label> = LazyLock::new(|| Arc::from("unknown"));
    UNKNOWN.clone()
}

/// Istio's standard request labels (the ones this sidecar knows).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_cluster: Label,
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub destination_workload: Label,
    pub destination_cluster: Label,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub destination_service: String,
    pub endpoint: String,
}

fn duration_histogram() -> Histogram {
    // Istio's default buckets, in milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

/// Every sidecar series.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub ejections: Family<EjectionLabels, Counter>,
    pub access_log_dropped: Counter,
    /// Requests evaluated by dry-run AuthorizationPolicies, by what they
    /// would have decided.
    pub dry_run: Family<ResultLabels, Counter>,
    /// Requests matched by an AUDIT AuthorizationPolicy.
    pub audited: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            rejected: Family::default(),
            ejections: Family::default(),
            access_log_dropped: Counter::default(),
            dry_run: Family::default(),
            audited: Counter::default(),
        };
        registry.register(
            "istio_requests",
            "Requests handled, as Istio reports them",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            m.duration.clone(),
        );
        let sub = isthmus_core::metrics::sub_registry(registry, "proxy");
        sub.register(
            "connections_rejected",
            "Inbound connections or requests refused before routing, by reason",
            m.rejected.clone(),
        );
        sub.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        sub.register(
            "authorization_dry_run",
            "Requests evaluated by dry-run (istio.io/dry-run) AuthorizationPolicies, by the verdict they would have given; never enforced",
            m.dry_run.clone(),
        );
        sub.register(
            "authorization_audited",
            "Requests matched by an AUDIT AuthorizationPolicy",
            m.audited.clone(),
        );
        sub.register(
            "access_log_dropped",
            "Access log lines dropped because stdout was too slow",
            m.access_log_dropped.clone(),
        );
        m
    }
}

/// Where access log lines go.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<serde_json::Value>>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer task (`enabled = false`: logging does nothing).
    pub fn start(enabled: bool, dropped: Counter) -> Self {
        if !enabled {
            return Self { tx: None, dropped };
        }
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(4096);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Some(line) = rx.blocking_recv() {
                    let _ = serde_json::to_writer(&mut buf, &line);
                    buf.push(b'\n');
                    while let Ok(more) = rx.try_recv() {
                        let _ = serde_json::to_writer(&mut buf, &more);
                        buf.push(b'\n');
                        if buf.len() > 60 * 1024 {
                            break;
                        }
                    }
                    let mut out = stdout.lock();
                    let _ = out.write_all(&buf).and_then(|()| out.flush());
                    buf.clear();
                }
            })
            .expect("spawn the access log thread");
        Self {
            tx: Some(tx),
            dropped,
        }
    }

    /// A log whose lines go to the returned receiver (tests, the demo).
    pub fn channel(dropped: Counter) -> (Self, mpsc::Receiver<serde_json::Value>) {
        let (tx, rx) = mpsc::channel(65536);
        (
            Self {
                tx: Some(tx),
                dropped,
            },
            rx,
        )
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, line: serde_json::Value) {
        if let Some(tx) = &self.tx
            && tx.try_send(line).is_err()
        {
            self.dropped.inc();
        }
    }
}

/// Istio's `response_flags` for the ways a request can end here.
pub mod flags {
    /// Upstream answered.
    pub const NONE: &str = "-";
    /// No healthy upstream.
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    /// Upstream connection failure.
    pub const UPSTREAM_CONNECT_FAILURE: &str = "UF";
    /// Upstream request timeout.
    pub const UPSTREAM_TIMEOUT: &str = "UT";
    /// Upstream reset.
    pub const UPSTREAM_RESET: &str = "UR";
    /// Upstream overflow (connection pool limits).
    pub const OVERFLOW: &str = "UO";
    /// No route (unknown service or port).
    pub const NO_ROUTE: &str = "NR";
    /// Fault injection abort.
    pub const FAULT_ABORT: &str = "FI";
    /// Fault injection delay (the request then went on).
    pub const FAULT_DELAY: &str = "DI";
    /// Denied by authorization policy.
    pub const RBAC_DENIED: &str = "RBAC";
    /// Bad request (400 before routing).
    pub const BAD_REQUEST: &str = "DPE";
}
