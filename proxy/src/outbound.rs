//! Outbound (15001): the app's requests, as an HTTP forward proxy
//! (absolute-form or Host), h2c, or transparently redirected.
//!
//! Per request: normalize the path, route (VirtualService), apply faults,
//! admit under the connection-pool limit, then try targets — a retry
//! never goes back to an endpoint this request already tried — within the
//! per-try and route timeouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode, Uri};
use isthmus_core::model::istio::{Retries, TransportFailure};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::Ctx;
use crate::http::{Record, local_reply, request_id, strip_hop_by_hop};
use crate::lb::{NoTarget, Outcome, Target, Want};
use crate::path;
use crate::routes::{Decision, Dest};
use crate::telemetry::{Reporter, flags};
use crate::upstream::{Body, UpstreamError, full, incoming, sni};

/// Bodies up to this size are buffered so the request can be retried;
/// larger or unsized ones stream and get one attempt.
const RETRY_BUFFER: u64 = 64 * 1024;

/// Accepts outbound connections until the drain starts.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, transparent: bool) {
    let drain = ctx.drain.clone();
    crate::http::accept_loop(listener, drain.clone(), "outbound", |stream, peer| {
        let original = if transparent {
            match original_dst(&stream) {
                Ok(a) => Some(a),
                Err(e) => {
                    warn!(peer = %peer, error = %e, "no original destination on a transparent connection (is the iptables REDIRECT rule in place?); closing");
                    return;
                }
            }
        } else {
            None
        };
        let ctx = ctx.clone();
        tokio::spawn(crate::http::serve_connection(
            stream,
            drain.clone(),
            move |req| {
                let ctx = ctx.clone();
                async move { handle(ctx, req, peer, original).await }
            },
        ));
    })
    .await;
}

/// The destination before an iptables REDIRECT.
fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP address"))
}

async fn handle(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    peer: SocketAddr,
    original: Option<SocketAddr>,
) -> Response<Body> {
    let mut rec = Record::new(Reporter::source, peer, &req, &ctx.log);
    rec.labels.source_workload = ctx.own.workload.clone();
    rec.labels.source_workload_namespace = ctx.own.namespace.clone();
    rec.labels.source_principal = ctx.own.principal.clone();
    rec.labels.source_cluster = ctx.own.cluster.clone();
    let resp = route(&ctx, req, &mut rec, original).await;
    rec.finish(&ctx.metrics, &ctx.log, resp.status());
    resp
}

async fn route(
    ctx: &Ctx,
    req: Request<Incoming>,
    rec: &mut Record,
    original: Option<SocketAddr>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let id = match parts.headers.get("x-request-id") {
        Some(v) => v.to_str().unwrap_or("").to_owned(),
        None => {
            let id = request_id();
            if let Ok(v) = HeaderValue::from_str(&id) {
                parts.headers.insert("x-request-id", v);
            }
            id
        }
    };
    rec.request_id = id;
    let Some(authority) = authority_of(&parts, original) else {
        rec.labels.response_flags = flags::BAD_REQUEST;
        return local_reply(
            StatusCode::BAD_REQUEST,
            "missing Host header",
            "the request has no Host header and no absolute URI",
        );
    };
    if ctx.log.enabled() {
        rec.authority = authority.clone();
    }
    let query = parts.uri.query().map(str::to_owned);
    let norm = match crate::http::normalized_path(parts.uri.path(), rec) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let table = ctx.table.borrow().clone();
    let decision = match table.route(
        &ctx.workload.namespace,
        &authority,
        parts.method.as_str(),
        &norm,
        &parts.headers,
    ) {
        Ok(d) => d,
        Err(e) => {
            rec.labels.response_flags = flags::BAD_REQUEST;
            return local_reply(StatusCode::BAD_REQUEST, &e, "bad host");
        }
    };
    let (dest, route_name, timeout, retries, fault) = match decision {
        Decision::Mesh {
            dest,
            route_name,
            timeout,
            retries,
            fault,
        } => (dest, route_name, timeout, retries, fault),
        Decision::Passthrough => {
            // Boxed, so the mesh path's future does not carry its size.
            return Box::pin(passthrough(ctx, parts, body, &authority, original, rec)).await;
        }
        Decision::NotFound(why) => {
            rec.labels.response_flags = flags::NO_ROUTE;
            rec.reason = Some(why.clone());
            return local_reply(StatusCode::NOT_FOUND, &why, "no route");
        }
    };
    rec.route = route_name;
    rec.labels.destination_service = dest.host.as_str().into();
    rec.labels.destination_service_name = dest.key.name.as_str().into();
    rec.labels.destination_service_namespace = dest.key.namespace.as_str().into();
    rec.labels.connection_security_policy = "mutual_tls";

    if let Some(f) = &fault {
        if let Some((pct, delay)) = f.delay
            && rand::random_range(0.0..100.0) < pct
        {
            tokio::time::sleep(delay).await;
            rec.labels.response_flags = flags::FAULT_DELAY;
        }
        if let Some((pct, status)) = f.abort
            && rand::random_range(0.0..100.0) < pct
        {
            rec.labels.response_flags = flags::FAULT_ABORT;
            return local_reply(
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "fault filter abort",
                "fault injection (VirtualService)",
            );
        }
    }

    let _slot = match ctx.lb.admit(&dest.key, dest.dr.as_deref()) {
        Ok(s) => s,
        Err(why) => {
            rec.labels.response_flags = flags::OVERFLOW;
            rec.reason = Some(why.clone());
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                &why,
            );
        }
    };

    // Upstream request parts: origin path normalized, hop-by-hop gone,
    // peer metadata added.
    let downstream_h2 = parts.version == hyper::Version::HTTP_2;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(hyper::header::HOST);
    parts.headers.remove(crate::http::PEER_HEADER);
    parts.headers.insert(
        crate::http::PEER_HEADER,
        ctx.own.peer_header[usize::from(downstream_h2)].clone(),
    );
    let pq = match &query {
        Some(q) => format!("{}?{q}", path::encode(&norm)),
        None => path::encode(&norm),
    };
    let uri: Uri = match format!("http://{}:{}{pq}", dest.host, dest.port.port).parse() {
        Ok(u) => u,
        Err(e) => return local_reply(StatusCode::BAD_REQUEST, &format!("bad URI: {e}"), "bad uri"),
    };
    parts.uri = uri;
    parts.version = hyper::Version::HTTP_2;

    // Buffer small bodies so they can be retried.
    let size = body.size_hint().exact();
    let (buffered, mut streaming): (Option<Bytes>, Option<Body>) = match size {
        Some(n) if n <= RETRY_BUFFER => match body.collect().await {
            Ok(b) => (Some(b.to_bytes()), None),
            Err(e) => {
                return local_reply(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the request body: {e}"),
                    "request body",
                );
            }
        },
        _ => (None, Some(incoming(body))),
    };

    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    let attempts = if buffered.is_some() {
        1 + retries.attempts
    } else {
        1
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_error: Option<Response<Body>> = None;
    for attempt in 0..attempts {
        let state = table.state.clone();
        let want = Want {
            key: &dest.key,
            scope: dest.scope,
            port: &dest.port,
            subset: &dest.subset_labels,
            dr: dest.dr.as_deref(),
            exclude: &tried,
        };
        let target = match ctx.lb.pick(&state, &want) {
            Ok(t) => t,
            Err(NoTarget::NoHealthy) => {
                if let Some(r) = last_error {
                    return r;
                }
                rec.labels.response_flags = flags::NO_HEALTHY_UPSTREAM;
                return local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                    &format!(
                        "no ready endpoint of {} (subset {:?}) here, and no peer cluster serving it through the gateway",
                        dest.host,
                        dest.subset.as_deref().unwrap_or("")
                    ),
                );
            }
        };
        rec.attempts = attempt + 1;
        rec.upstream = Some(target.addr());
        describe_target(rec, &target, ctx);
        let body = match (&buffered, streaming.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s,
            (None, None) => full(Bytes::new()),
        };
        let req = Request::from_parts(parts.clone(), body);
        let per_try = retries.per_try_timeout;
        let limit = match (per_try, deadline) {
            (Some(p), Some(d)) => Some((Instant::now() + p).min(d)),
            (Some(p), None) => Some(Instant::now() + p),
            (None, d) => d,
        };
        let send = send(ctx, &target, &dest, req);
        let result = match limit {
            Some(l) => match tokio::time::timeout_at(l.into(), send).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Timeout),
            },
            None => send.await,
        };
        let more = attempt + 1 < attempts && deadline.is_none_or(|d| Instant::now() < d);
        match result {
            Ok(resp) => {
                let status = resp.status();
                let failed = status.is_server_error();
                ctx.lb.record(
                    &state,
                    &dest.key,
                    dest.dr.as_deref(),
                    &target,
                    if failed {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    },
                );
                let (mut p, b) = resp.into_parts();
                strip_hop_by_hop(&mut p.headers);
                let retry = more && retry_status(retries, status, &p.headers);
                let resp = Response::from_parts(p, incoming(b));
                if retry {
                    debug!(status = %status, upstream = %target.addr(), "retrying");
                    tried.push(target.addr());
                    // If no other target is left, this answer is the one
                    // the caller gets.
                    last_error = Some(resp);
                    backoff(attempt).await;
                    continue;
                }
                // An earlier failed attempt's flag does not describe
                // the answer that came back.
                if rec.labels.response_flags != flags::FAULT_DELAY {
                    rec.labels.response_flags = flags::NONE;
                    rec.reason = None;
                }
                return resp;
            }
            Err(f) => {
                ctx.lb.record(
                    &state,
                    &dest.key,
                    dest.dr.as_deref(),
                    &target,
                    Outcome::Failure,
                );
                let (status, flag, text, cond) = match &f {
                    Failure::Upstream(UpstreamError::Connect(e)) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        flags::UPSTREAM_CONNECT_FAILURE,
                        format!(
                            "upstream connect error or disconnect/reset before headers. reset reason: connection failure ({e})"
                        ),
                        Some(TransportFailure::Connect),
                    ),
                    Failure::Upstream(UpstreamError::Reset(e)) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        flags::UPSTREAM_RESET,
                        format!(
                            "upstream connect error or disconnect/reset before headers. reset reason: {e}"
                        ),
                        Some(TransportFailure::Reset),
                    ),
                    Failure::Timeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        flags::UPSTREAM_TIMEOUT,
                        "upstream request timeout".to_owned(),
                        None,
                    ),
                };
                rec.labels.response_flags = flag;
                rec.reason = Some(text.clone());
                let overall_timeout =
                    matches!(f, Failure::Timeout) && deadline.is_some_and(|d| Instant::now() >= d);
                let retryable = match cond {
                    None => per_try.is_some(),
                    Some(c) => retries.retry_on.iter().any(|r| r.on_failure(c)),
                };
                if more && retryable && !overall_timeout {
                    tried.push(target.addr());
                    last_error = Some(local_reply(status, &text, flag));
                    backoff(attempt).await;
                    continue;
                }
                return local_reply(status, &text, flag);
            }
        }
    }
    last_error.unwrap_or_else(|| {
        local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            "retries exhausted",
        )
    })
}

/// The request's host[:port]: absolute-form URI, else Host (with the
/// original destination's port in transparent mode).
fn authority_of(
    parts: &hyper::http::request::Parts,
    original: Option<SocketAddr>,
) -> Option<String> {
    if let Some(a) = parts.uri.authority() {
        return Some(a.as_str().to_owned());
    }
    let host = parts.headers.get(hyper::header::HOST)?.to_str().ok()?;
    match original {
        Some(o) if !host.contains(':') => Some(format!("{host}:{}", o.port())),
        _ => Some(host.to_owned()),
    }
}

fn describe_target(rec: &mut Record, t: &Target, ctx: &Ctx) {
    match t {
        Target::Local { workload, .. } => {
            rec.labels.destination_workload = workload.as_str().into();
            rec.labels.destination_cluster = ctx.own.cluster.clone();
        }
        Target::Remote { .. } => {
            rec.labels.destination_workload = crate::telemetry::unknown();
            rec.labels.destination_cluster = "remote".into();
        }
    }
}

#[derive(Debug)]
enum Failure {
    Upstream(UpstreamError),
    Timeout,
}

async fn send(
    ctx: &Ctx,
    target: &Target,
    dest: &Dest,
    req: Request<Body>,
) -> Result<Response<Incoming>, Failure> {
    let sni = sni(dest.port.port, dest.subset.as_deref(), &dest.host);
    let max_age = match target {
        Target::Remote { .. } => Some(crate::upstream::REMOTE_MAX_AGE),
        Target::Local { .. } => None,
    };
    ctx.mesh
        .send(target.addr(), &sni, &dest.key.namespace, max_age, req)
        .await
        .map_err(Failure::Upstream)
}

fn retry_status(r: &Retries, status: StatusCode, headers: &hyper::HeaderMap) -> bool {
    let grpc = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok());
    r.retry_on
        .iter()
        .any(|c| c.on_answer(status.as_u16(), grpc))
}

/// Envoy's retry back-off: 25 ms base, doubling, jittered.
async fn backoff(attempt: u32) {
    let cap = 25u64 << attempt.min(4);
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..=cap))).await;
}

/// Forwards a request for a name outside the mesh as is (HTTP/1.1,
/// plaintext): Istio's ALLOW_ANY.
async fn passthrough(
    ctx: &Ctx,
    mut parts: hyper::http::request::Parts,
    body: Incoming,
    authority: &str,
    original: Option<SocketAddr>,
    rec: &mut Record,
) -> Response<Body> {
    rec.labels.destination_service = authority.into();
    rec.labels.destination_cluster = "PassthroughCluster".into();
    rec.labels.connection_security_policy = "none";
    strip_hop_by_hop(&mut parts.headers);
    let target = match original {
        Some(o) => o.to_string(),
        None => authority.to_owned(),
    };
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match format!("http://{target}{pq}").parse() {
        Ok(u) => u,
        Err(e) => return local_reply(StatusCode::BAD_REQUEST, &format!("bad URI: {e}"), "bad uri"),
    };
    parts.version = hyper::Version::HTTP_11;
    if !parts.headers.contains_key(hyper::header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority)
    {
        parts.headers.insert(hyper::header::HOST, v);
    }
    match ctx
        .app
        .request(Request::from_parts(parts, incoming(body)))
        .await
    {
        Ok(r) => r.map(incoming),
        Err(e) => {
            rec.labels.response_flags = flags::UPSTREAM_CONNECT_FAILURE;
            local_reply(
                StatusCode::BAD_GATEWAY,
                &format!("passthrough to {target} failed: {e}"),
                "passthrough",
            )
        }
    }
}
