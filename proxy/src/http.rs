//! What both listeners share: the HTTP server loop (HTTP/1.1 and h2c or
//! h2 on one port), error answers, and the per-request record that
//! becomes a metric and an access log line.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use isthmus_core::drain::DrainSignal;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::telemetry::AccessLog;
use crate::telemetry::{Metrics, Reporter, RequestLabels};
use crate::upstream::{Body, full};

/// Largest request head (request line and headers) accepted; more is
/// answered 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves HTTP on one accepted connection until it closes or a drain
/// starts (then in-flight requests finish and the connection closes).
pub async fn serve_connection<IO, F, Fut>(io: IO, drain: DrainSignal, handler: F)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let Some(_hold) = drain.hold() else { return };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD_BYTES)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(1024);
    let svc = service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h(req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Accepts connections until the drain starts, handing each (with
/// Nagle off) to `on_connection`. Accept errors (fd exhaustion) are
/// logged and retried after a pause.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    drain: DrainSignal,
    what: &'static str,
    mut on_connection: impl FnMut(tokio::net::TcpStream, SocketAddr),
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed (out of file descriptors?); retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.signaled() => return,
        };
        let _ = stream.set_nodelay(true);
        on_connection(stream, peer);
    }
}

/// An answer made here (not by an upstream), with a reason header for
/// operators.
pub fn local_reply(status: StatusCode, body: &str, reason: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{body}\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    if let Ok(v) = HeaderValue::from_str(reason) {
        r.headers_mut().insert("x-isthmus-reason", v);
    }
    r
}

/// The normalized path of a request, or the 400 that refuses it (both
/// listeners use this, so routing and authorization see one path).
pub fn normalized_path(path: &str, rec: &mut Record) -> Result<String, Box<Response<Body>>> {
    crate::path::normalize(path).map_err(|e| {
        rec.labels.response_flags = crate::telemetry::flags::BAD_REQUEST;
        let reply = local_reply(
            StatusCode::BAD_REQUEST,
            &format!("bad path: {e}"),
            "bad path",
        );
        Box::new(reply)
    })
}

/// Hop-by-hop headers never forwarded (and forbidden in HTTP/2).
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

pub fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<String> = h
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
    let trailers = h
        .get("te")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if trailers {
        h.insert("te", HeaderValue::from_static("trailers"));
    }
}

/// A random x-request-id (UUID v4 form).
pub fn request_id() -> String {
    let b: [u8; 16] = rand::random();
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        let x = match i {
            6 => (x & 0x0f) | 0x40,
            8 => (x & 0x3f) | 0x80,
            _ => *x,
        };
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        s.push(char::from(HEX[usize::from(x >> 4)]));
        s.push(char::from(HEX[usize::from(x & 0x0f)]));
    }
    s
}

/// What is known of one request as it goes, for telemetry.
#[derive(Debug)]
pub struct Record {
    pub start: Instant,
    pub labels: RequestLabels,
    pub method: hyper::Method,
    /// Path and query, for the access log (empty when it is off).
    pub path: String,
    /// For the access log (empty when it is off).
    pub authority: String,
    pub request_id: String,
    pub downstream: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub route: Option<String>,
    pub attempts: u32,
    pub reason: Option<String>,
    /// Why dry-run AuthorizationPolicies would have denied the request.
    pub dry_run: Option<String>,
}

impl Record {
    pub fn new(
        reporter: Reporter,
        downstream: SocketAddr,
        req: &Request<Incoming>,
        log: &AccessLog,
    ) -> Self {
        let protocol = if req.version() == hyper::Version::HTTP_2 {
            if reporter == Reporter::source {
                "http"
            } else {
                "grpc_or_http2"
            }
        } else {
            "http"
        };
        let is_grpc = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        Self {
            start: Instant::now(),
            labels: RequestLabels {
                reporter,
                source_workload: crate::telemetry::unknown(),
                source_workload_namespace: crate::telemetry::unknown(),
                source_principal: crate::telemetry::unknown(),
                source_cluster: crate::telemetry::unknown(),
                destination_service: crate::telemetry::unknown(),
                destination_service_name: crate::telemetry::unknown(),
                destination_service_namespace: crate::telemetry::unknown(),
                destination_workload: crate::telemetry::unknown(),
                destination_cluster: crate::telemetry::unknown(),
                request_protocol: if is_grpc { "grpc" } else { protocol },
                response_code: 0,
                response_flags: crate::telemetry::flags::NONE,
                connection_security_policy: "unknown",
            },
            method: req.method().clone(),
            path: match req.uri().path_and_query() {
                Some(p) if log.enabled() => p.as_str().to_owned(),
                _ => String::new(),
            },
            authority: String::new(),
            request_id: String::new(),
            downstream,
            upstream: None,
            route: None,
            attempts: 0,
            reason: None,
            dry_run: None,
        }
    }

    /// Counts the request and writes its access log line.
    pub fn finish(mut self, metrics: &Metrics, log: &AccessLog, status: StatusCode) {
        self.labels.response_code = status.as_u16();
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        metrics.requests.get_or_create(&self.labels).inc();
        metrics.duration.get_or_create(&self.labels).observe(ms);
        if log.enabled() {
            let l = &self.labels;
            log.write(serde_json::json!({
                "start_time": time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                "reporter": format!("{:?}", l.reporter),
                "method": self.method.as_str(),
                "path": self.path,
                "authority": self.authority,
                "protocol": l.request_protocol,
                "response_code": l.response_code,
                "response_flags": l.response_flags,
                "duration_ms": (ms * 1000.0).round() / 1000.0,
                "x_request_id": self.request_id,
                "downstream_peer": self.downstream.to_string(),
                "upstream_host": self.upstream.map(|u| u.to_string()),
                "route_name": self.route,
                "attempts": self.attempts,
                "source_principal": l.source_principal,
                "source_workload": l.source_workload,
                "source_cluster": l.source_cluster,
                "destination_service": l.destination_service,
                "destination_workload": l.destination_workload,
                "destination_cluster": l.destination_cluster,
                "connection_security_policy": l.connection_security_policy,
                "reason": self.reason,
                "dry_run_denied": self.dry_run,
            }));
        }
    }
}

/// Metadata a source sidecar sends its peer (Istio's peer metadata
/// exchange, in one header): trusted only on mTLS connections.
pub const PEER_HEADER: &str = "x-isthmus-peer";

/// `h2`: the app sent the request over HTTP/2 (h2c, gRPC), so the
/// destination sidecar speaks HTTP/2 to its app too (Istio decides the
/// same from the port's protocol).
pub fn peer_header(cluster: &str, namespace: &str, workload: &str, h2: bool) -> HeaderValue {
    let proto = if h2 { ";proto=h2" } else { "" };
    HeaderValue::from_str(&format!(
        "cluster={cluster};namespace={namespace};workload={workload}{proto}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("cluster=unknown"))
}

/// What a peer header says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerMeta {
    pub cluster: Option<String>,
    pub workload: Option<String>,
    pub h2: bool,
}

pub fn parse_peer_header(v: &HeaderValue) -> PeerMeta {
    let mut m = PeerMeta::default();
    for part in v.to_str().unwrap_or("").split(';') {
        match part.split_once('=') {
            Some(("cluster", c)) => m.cluster = Some(c.to_owned()),
            Some(("workload", w)) => m.workload = Some(w.to_owned()),
            Some(("proto", "h2")) => m.h2 = true,
            _ => {}
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::request_id;

    #[test]
    fn request_ids_are_random_uuid_v4() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        for id in [a, b] {
            let groups: Vec<&str> = id.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12],
                "{id}"
            );
            assert!(
                id.chars()
                    .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)),
                "{id}"
            );
            assert!(groups[2].starts_with('4'), "version 4: {id}");
            assert!(
                matches!(&groups[3][..1], "8" | "9" | "a" | "b"),
                "RFC 4122 variant: {id}"
            );
        }
    }
}
