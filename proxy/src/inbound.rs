//! Inbound (15006): mTLS from other sidecars (and the gateway's tunnels,
//! which carry the same end-to-end mTLS), plaintext only when
//! PeerAuthentication allows it; AuthorizationPolicy on the caller's
//! identity and the normalized path; then the local app.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use isthmus_core::identity::SpiffeId;
use isthmus_core::identity::spiffe::Role;
use isthmus_core::identity::verify::peer_identity;
use isthmus_core::model::MeshState;
use isthmus_core::model::istio::{self, MtlsMode, RequestFacts, Verdict};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::http::{PEER_HEADER, Record, local_reply, parse_peer_header, strip_hop_by_hop};
use crate::path;
use crate::routes::split_authority;
use crate::telemetry::{ReasonLabels, Reporter, flags};
use crate::upstream::{Body, incoming};

pub use isthmus_core::model::istio::ROOT_NAMESPACE;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The mTLS mode for `port` of a workload: workload-specific (its
/// `portLevelMtls` first), else namespace, else mesh-wide, else
/// PERMISSIVE (Istio's precedence and default). A PeerAuthentication that
/// cannot be applied as written counts as STRICT where it applies.
pub fn mtls_mode(
    state: &MeshState,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> MtlsMode {
    let (mut workload, mut ns, mut mesh) = (None, None, None);
    for pa in state.peer_authentications.values() {
        match &pa.selector {
            Some(sel)
                if pa.namespace == namespace
                    && sel.iter().all(|(k, v)| labels.get(k) == Some(v)) =>
            {
                workload = pa.mode_for(port).or(workload);
            }
            None if pa.namespace == namespace => ns = pa.mode.or(ns),
            None if pa.namespace == ROOT_NAMESPACE => mesh = pa.mode.or(mesh),
            _ => {}
        }
    }
    workload.or(ns).or(mesh).unwrap_or_default()
}

/// Istio's verdict over the AuthorizationPolicies that apply to this
/// workload (see [`isthmus_core::model::istio::authorize`]).
pub fn authorize(
    state: &MeshState,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    facts: &RequestFacts<'_>,
) -> Verdict {
    istio::authorize(
        state
            .authorization_policies
            .values()
            .map(|p| &**p)
            .filter(|p| p.applies_to(namespace, labels, ROOT_NAMESPACE)),
        facts,
    )
}

/// Accepts inbound connections until the drain starts.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    let drain = ctx.drain.clone();
    crate::http::accept_loop(listener, drain, "inbound", |stream, peer| {
        tokio::spawn(connection(ctx.clone(), stream, peer));
    })
    .await;
}

async fn connection(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    let reject = |reason: &'static str| {
        ctx.metrics
            .rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    let drain = ctx.drain.clone();
    let Ok(local) = stream.local_addr() else {
        return;
    };
    if first[0] == 0x16 {
        let acceptor = TlsAcceptor::from(ctx.inbound_tls.clone());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                reject("tls_handshake");
                warn!(peer = %peer, error = %e, "inbound mTLS handshake failed (is the caller's trust domain in this cluster's bundles?)");
                return;
            }
            Err(_) => {
                reject("tls_handshake_timeout");
                return;
            }
        };
        let id = match peer_identity(tls.get_ref().1.peer_certificates()) {
            Ok(id) => Arc::new(id),
            Err(e) => {
                reject("no_identity");
                warn!(peer = %peer, error = %e, "inbound mTLS peer has no usable identity");
                return;
            }
        };
        crate::http::serve_connection(tls, drain, move |req| {
            let ctx = ctx.clone();
            let id = id.clone();
            async move { handle(ctx, req, peer, local, Some(id)).await }
        })
        .await;
    } else {
        let state = ctx.table.borrow().state.clone();
        let port = ctx.workload.app.port();
        if mtls_mode(&state, &ctx.workload.namespace, &ctx.workload.labels, port)
            == MtlsMode::Strict
        {
            reject("plaintext_under_strict");
            warn!(peer = %peer, workload = %ctx.workload.name,
                "plaintext connection refused: PeerAuthentication is STRICT for this workload (send mTLS through a sidecar, or set PERMISSIVE)");
            return;
        }
        crate::http::serve_connection(stream, drain, move |req| {
            let ctx = ctx.clone();
            async move { handle(ctx, req, peer, local, None).await }
        })
        .await;
    }
}

async fn handle(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    id: Option<Arc<SpiffeId>>,
) -> Response<Body> {
    let mut rec = Record::new(Reporter::destination, peer, &req, &ctx.log);
    let resp = forward(&ctx, req, &mut rec, local, id.as_deref()).await;
    rec.finish(&ctx.metrics, &ctx.log, resp.status());
    resp
}

async fn forward(
    ctx: &Ctx,
    req: Request<Incoming>,
    rec: &mut Record,
    local: SocketAddr,
    id: Option<&SpiffeId>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    rec.labels.destination_workload = ctx.own.workload.clone();
    rec.labels.destination_cluster = ctx.own.cluster.clone();
    rec.request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    if ctx.log.enabled() {
        rec.authority = authority.clone();
    }
    if let Some((host, _)) = split_authority(&authority) {
        rec.labels.destination_service = host.into();
        if let Some((name, rest)) = host.split_once('.') {
            rec.labels.destination_service_name = name.into();
            rec.labels.destination_service_namespace = rest.split('.').next().unwrap_or("").into();
        }
    }
    let principal = id.map(|i| i.to_string().trim_start_matches("spiffe://").to_owned());
    // The caller's (namespace, service account), from its certificate.
    let service_account = id.and_then(|i| match i.role() {
        Role::Workload {
            namespace,
            service_account,
        } => Some((namespace, service_account)),
        _ => None,
    });
    let source_ns = service_account.map(|(ns, _)| ns);
    // HTTP/2 to the app when the caller's app spoke it (from a sidecar's
    // metadata) or the plaintext caller speaks it itself.
    let mut app_h2 = id.is_none() && parts.version == hyper::Version::HTTP_2;
    match id {
        Some(_) => {
            rec.labels.connection_security_policy = "mutual_tls";
            rec.labels.source_principal = principal.as_deref().unwrap_or_default().into();
            if let Some(ns) = source_ns {
                rec.labels.source_workload_namespace = ns.into();
            }
            if let Some(v) = parts.headers.get(PEER_HEADER) {
                let meta = parse_peer_header(v);
                app_h2 = meta.h2;
                if let Some(c) = meta.cluster {
                    rec.labels.source_cluster = c.into();
                }
                if let Some(w) = meta.workload {
                    rec.labels.source_workload = w.into();
                }
            }
        }
        None => rec.labels.connection_security_policy = "none",
    }
    parts.headers.remove(PEER_HEADER);

    let norm = match crate::http::normalized_path(parts.uri.path(), rec) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let state = ctx.table.borrow().state.clone();
    let facts = RequestFacts {
        principal: principal.as_deref(),
        namespace: source_ns,
        service_account,
        source_ip: Some(rec.downstream.ip()),
        destination_ip: Some(local.ip()),
        destination_port: ctx.workload.app.port(),
        host: &authority,
        method: parts.method.as_str(),
        path: &norm,
        headers: Some(&parts.headers),
    };
    let verdict = authorize(
        &state,
        &ctx.workload.namespace,
        &ctx.workload.labels,
        &facts,
    );
    if let Some(shadow) = &verdict.dry_run {
        let result = if shadow.is_ok() { "allowed" } else { "denied" };
        ctx.metrics
            .dry_run
            .get_or_create(&crate::telemetry::ResultLabels { result })
            .inc();
        if let Err(why) = shadow {
            rec.dry_run = Some(why.clone());
            debug!(principal = ?principal, path = %norm, reason = %why, "dry-run AuthorizationPolicy would deny this request (not enforced)");
        }
    }
    if let Some(policy) = &verdict.audit {
        ctx.metrics.audited.inc();
        info!(principal = ?principal, method = %parts.method, path = %norm, policy = %policy, "request audited by AUDIT policy");
    }
    if let Err(why) = verdict.result {
        rec.labels.response_flags = flags::RBAC_DENIED;
        debug!(principal = ?principal, path = %norm, reason = %why, "request denied");
        let resp = local_reply(StatusCode::FORBIDDEN, "RBAC: access denied", &why);
        rec.reason = Some(why);
        return resp;
    }

    strip_hop_by_hop(&mut parts.headers);
    // The caller's identity for the app, as Istio's XFCC; never taken
    // from the caller.
    parts.headers.remove("x-forwarded-client-cert");
    if let Some(i) = id {
        let v = format!("By={};URI={i}", ctx.identity);
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.insert("x-forwarded-client-cert", v);
        }
    }
    if !authority.is_empty()
        && let Ok(v) = HeaderValue::from_str(&authority)
    {
        parts.headers.insert(hyper::header::HOST, v);
    }
    let pq = match parts.uri.query() {
        Some(q) => format!("{}?{q}", path::encode(&norm)),
        None => path::encode(&norm),
    };
    parts.uri = match format!("http://{}{pq}", ctx.workload.app).parse() {
        Ok(u) => u,
        Err(e) => return local_reply(StatusCode::BAD_REQUEST, &format!("bad URI: {e}"), "bad uri"),
    };
    rec.upstream = Some(ctx.workload.app);
    let client = if app_h2 {
        parts.version = hyper::Version::HTTP_2;
        &ctx.app_h2
    } else {
        parts.version = hyper::Version::HTTP_11;
        &ctx.app
    };
    match client
        .request(Request::from_parts(parts, incoming(body)))
        .await
    {
        Ok(r) => {
            let (mut p, b) = r.into_parts();
            strip_hop_by_hop(&mut p.headers);
            Response::from_parts(p, incoming(b))
        }
        Err(e) => {
            rec.labels.response_flags = flags::UPSTREAM_CONNECT_FAILURE;
            warn!(app = %ctx.workload.app, error = %e, "the local app did not answer (is it running on workload.app?)");
            local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                "local app unreachable",
            )
        }
    }
}
