//! The HTTP side: routing Kubernetes API paths to the store, and the
//! watch stream (newline-delimited JSON events, chunked).

use std::convert::Infallible;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::Inner;
use crate::resources::Resource;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{ApiError, WatchFilter, WriteCtx};

type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted.
const MAX_BODY: usize = 3 * 1024 * 1024;

pub async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    // Connections live in this set: aborting `serve` cuts them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let inner = inner.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(inner, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next() => {}
        }
    }
}

/// Sends bookmarks to the watches that asked, every `every`.
pub async fn bookmarks(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.lock().send_bookmarks();
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap_or_default())).boxed())
        .unwrap_or_default()
}

fn error(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.status());
    if e.code == 429
        && let Ok(v) = http::HeaderValue::from_str("1")
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn not_served() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// `application/x-www-form-urlencoded` decoding of one query value.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Self(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (decode(k), decode(v)),
                    None => (decode(p), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

/// A resource path, parsed.
struct Target {
    res: Resource,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn verb(method: &Method, t: &Target, watch: bool) -> &'static str {
    match (method, &t.name) {
        (&Method::GET, None) if watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    }
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = Query::parse(req.uri().query());
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let cat = &inner.catalog;
    // Discovery and health.
    let doc = match segs.as_slice() {
        ["api"] => Some(Some(cat.core_versions())),
        ["api", "v1"] => Some(cat.resource_list("", "v1")),
        ["apis"] => Some(Some(cat.group_list())),
        ["apis", g] => Some(cat.group(g)),
        ["apis", g, v] => Some(cat.resource_list(g, v)),
        ["version"] => Some(Some(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-isthmus-standin",
            "platform": "linux/amd64", "goVersion": "none", "compiler": "rust",
        }))),
        ["openapi", "v3"] => Some(Some(cat.openapi_index())),
        ["openapi", "v3", "api", v] => Some(cat.openapi_doc("", v)),
        ["openapi", "v3", "apis", g, v] => Some(cat.openapi_doc(g, v)),
        ["openapi", "v2"] => Some(None),
        ["healthz" | "readyz" | "livez"] => {
            return Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
        }
        _ => None,
    };
    if let Some(doc) = doc {
        return match doc {
            Some(d) => json_response(200, &d),
            None => error(&not_served()),
        };
    }
    let Some(target) = route(&inner, &segs) else {
        return error(&not_served());
    };
    let method = req.method().clone();
    let watch = query.flag("watch");
    let verb = verb(&method, &target, watch);
    let resource = target.res.qualified();
    *inner
        .counts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((verb.to_owned(), resource.clone()))
        .or_default() += 1;
    if let Some(e) = fault(&inner, verb, &target, user(&inner, &req)) {
        return error(&e);
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('/').next())
        .unwrap_or("unknown")
        .to_owned();
    let meta_only = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let ctx = WriteCtx {
        manager: query.get("fieldManager").map(str::to_owned).unwrap_or(
            if content_type == "application/apply-patch+yaml" {
                String::new()
            } else {
                agent
            },
        ),
        dry_run: query.get("dryRun") == Some("All"),
    };
    let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
        let collected = http_body_util::Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await;
        let bytes = match collected {
            Ok(c) => c.to_bytes(),
            Err(_) => {
                return error(&ApiError::new(
                    413,
                    "RequestEntityTooLarge",
                    "request body too large",
                ));
            }
        };
        match parse_body(&bytes, &content_type) {
            Ok(v) => Some(v),
            Err(e) => return error(&e),
        }
    } else {
        None
    };
    match resource_request(
        &inner,
        &method,
        &target,
        &query,
        body,
        &content_type,
        meta_only,
        &ctx,
    ) {
        Ok(r) => r,
        Err(e) => error(&e),
    }
}

fn parse_body(bytes: &[u8], content_type: &str) -> Result<Value, ApiError> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Ok(v),
        Err(e) if content_type == "application/apply-patch+yaml" => {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| ApiError::new(400, "BadRequest", "the body is not UTF-8"))?;
            serde_saphyr::from_str(text).map_err(|y| {
                ApiError::new(
                    400,
                    "BadRequest",
                    format!("error decoding YAML: {y} (as JSON: {e})"),
                )
            })
        }
        Err(e) => Err(ApiError::new(
            400,
            "BadRequest",
            format!("error decoding the body: {e}"),
        )),
    }
}

fn route(inner: &Inner, segs: &[&str]) -> Option<Target> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let cat = &inner.catalog;
    let namespaced = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if cat
                .find(group, version, plural)
                .is_some_and(|r| r.namespaced) =>
        {
            Some((*ns, *plural, tail))
        }
        _ => None,
    };
    let (namespace, plural, tail) = match namespaced {
        Some((ns, p, t)) => (Some(ns.to_owned()), p, t),
        None => {
            let (p, t) = rest.split_first()?;
            (None, *p, t)
        }
    };
    let res = cat.find(group, version, plural)?;
    let (name, status) = match tail {
        [] => (None, false),
        [name] => (Some((*name).to_owned()), false),
        [name, "status"] if res.status => (Some((*name).to_owned()), true),
        _ => return None,
    };
    Some(Target {
        res,
        namespace,
        name,
        status,
    })
}

/// The user a request authenticates as: a TokenReview token's user, or
/// `admin` for any other bearer token (the stand-in does not
/// authenticate).
fn user(inner: &Inner, req: &Request<Incoming>) -> String {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t) => inner
            .lock()
            .tokens
            .get(t)
            .map(|i| i.username.clone())
            .unwrap_or_else(|| "admin".into()),
        None => "system:anonymous".into(),
    }
}

fn fault(inner: &Inner, verb: &str, t: &Target, user: String) -> Option<ApiError> {
    let mut f = inner.faults.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((n, code)) = f.fail_next {
        f.fail_next = (n > 1).then_some((n - 1, code));
        let reason = match code {
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            _ => "InternalError",
        };
        return Some(ApiError::new(
            code,
            reason,
            format!("injected failure ({code}) for {verb} {}", t.res.qualified()),
        ));
    }
    let resource = if t.status {
        format!("{}/status", t.res.qualified())
    } else {
        t.res.qualified()
    };
    let denied = f.denied.iter().any(|(v, r)| {
        (v == "*" || v == verb) && (r == "*" || *r == resource || *r == t.res.qualified())
    });
    if !denied {
        return None;
    }
    let plural = if t.status {
        format!("{}/status", t.res.plural)
    } else {
        t.res.plural.to_owned()
    };
    let scope = match &t.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let named = t
        .name
        .as_ref()
        .map(|n| format!(" \"{n}\""))
        .unwrap_or_default();
    Some(ApiError {
        details: json!({"group": t.res.group, "kind": t.res.plural}),
        ..ApiError::new(
            403,
            "Forbidden",
            format!(
                "{}{named} is forbidden: User \"{user}\" cannot {verb} resource \"{plural}\" in API group \"{}\" {scope}",
                t.res.qualified(),
                t.res.group
            ),
        )
    })
}

fn selectors(q: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let bad = |e: String| ApiError::new(400, "BadRequest", e);
    Ok((
        LabelSelector::parse(q.get("labelSelector").unwrap_or("")).map_err(bad)?,
        FieldSelector::parse(q.get("fieldSelector").unwrap_or("")).map_err(bad)?,
    ))
}

/// A continue token: the list's resourceVersion and the last key.
fn continue_token(rv: u64, ns: &str, name: &str) -> String {
    hex::encode(format!("{rv}/{ns}/{name}"))
}

fn parse_continue(t: &str) -> Option<(u64, String, String)> {
    let raw = String::from_utf8(hex::decode(t).ok()?).ok()?;
    let mut p = raw.splitn(3, '/');
    Some((
        p.next()?.parse().ok()?,
        p.next()?.to_owned(),
        p.next()?.to_owned(),
    ))
}

#[allow(clippy::too_many_arguments)]
fn resource_request(
    inner: &Arc<Inner>,
    method: &Method,
    t: &Target,
    q: &Query,
    body: Option<Value>,
    content_type: &str,
    meta_only: bool,
    ctx: &WriteCtx,
) -> Result<Response<Body>, ApiError> {
    let res = &t.res;
    let ns = t.namespace.clone().unwrap_or_default();
    if res.namespaced && t.name.is_some() && t.namespace.is_none() {
        return Err(not_served());
    }
    if res.review {
        return match (method, &t.name) {
            (&Method::POST, None) => token_review(inner, body.unwrap_or_default()),
            _ => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{} supports create only", res.qualified()),
            )),
        };
    }
    match (method, &t.name) {
        (&Method::GET, None) if q.flag("watch") => watch(inner, t, q, meta_only),
        (&Method::GET, None) => {
            let (labels, fields) = selectors(q)?;
            let limit = q
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let store = inner.lock();
            let (rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
                Some(c) => {
                    let (rv, n, m) = parse_continue(c).ok_or_else(|| {
                        ApiError::new(400, "BadRequest", "the continue token is not valid")
                    })?;
                    store.check_not_compacted(rv).map_err(|_| {
                        ApiError::new(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                        )
                    })?;
                    (rv, Some((n, m)))
                }
                None => (store.resource_version(), None),
            };
            let (items, next) = store.list(
                res,
                t.namespace.as_deref(),
                &labels,
                &fields,
                after.as_ref(),
                limit,
            );
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if let Some((n, m)) = next {
                meta["continue"] = json!(continue_token(rv, &n, &m));
            }
            let (kind, api_version, items) = if meta_only {
                (
                    "PartialObjectMetadataList".to_owned(),
                    "meta.k8s.io/v1".to_owned(),
                    items.iter().map(crate::store::metadata_only).collect(),
                )
            } else {
                (format!("{}List", res.kind), res.api_version(), items)
            };
            Ok(json_response(
                200,
                &json!({"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items}),
            ))
        }
        (&Method::GET, Some(name)) => {
            let o = inner.lock().get(res, &ns, name)?;
            Ok(json_response(
                200,
                &if meta_only {
                    crate::store::metadata_only(&o)
                } else {
                    o
                },
            ))
        }
        (&Method::POST, None) => {
            let obj = body.unwrap_or_default();
            let created = inner.lock().create(res, &ns, obj, ctx)?;
            Ok(json_response(201, &created))
        }
        (&Method::PUT, Some(name)) => {
            let obj = body.unwrap_or_default();
            let out = inner.lock().replace(res, &ns, name, obj, t.status, ctx)?;
            Ok(json_response(200, &out))
        }
        (&Method::PATCH, Some(name)) => {
            let patch = body.unwrap_or_default();
            let mut store = inner.lock();
            let out = match content_type {
                "application/apply-patch+yaml" => {
                    store.apply(res, &ns, name, &patch, t.status, q.flag("force"), ctx)?
                }
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    store.merge_patch(res, &ns, name, &patch, t.status, ctx)?
                }
                "application/json-patch+json" => {
                    store.json_patch(res, &ns, name, &patch, t.status, ctx)?
                }
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                        ),
                    ));
                }
            };
            Ok(json_response(200, &out))
        }
        (&Method::DELETE, Some(name)) => Ok(json_response(
            200,
            &inner.lock().delete(res, &ns, name, ctx)?,
        )),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not allowed here"),
        )),
    }
}

fn token_review(inner: &Inner, review: Value) -> Result<Response<Body>, ApiError> {
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let info = inner.lock().tokens.get(token).cloned();
    let status = match info {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(i) => {
            let shared: Vec<&String> = if wanted.is_empty() {
                i.audiences.iter().collect()
            } else {
                wanted.iter().filter(|a| i.audiences.contains(a)).collect()
            };
            if shared.is_empty() {
                json!({"authenticated": false,
                       "error": format!("token audiences {:?} is invalid for the target audiences {:?}", i.audiences, wanted)})
            } else {
                json!({"authenticated": true, "audiences": shared,
                       "user": {"username": i.username, "uid": i.uid, "groups": i.groups}})
            }
        }
    };
    let mut out = review;
    out["status"] = status;
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["kind"] = json!("TokenReview");
    Ok(json_response(201, &out))
}

fn watch(
    inner: &Arc<Inner>,
    t: &Target,
    q: &Query,
    meta_only: bool,
) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = selectors(q)?;
    let rv = match q.get("resourceVersion") {
        None | Some("" | "0") => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::new(400, "BadRequest", format!("invalid resourceVersion {v:?}"))
        })?),
    };
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let filter = WatchFilter {
        meta_only,
        res: t.res.qualified(),
        namespace: t.namespace.clone(),
        labels,
        fields,
    };
    let registered = inner
        .lock()
        .watch(filter, &t.res, rv, q.flag("allowWatchBookmarks"));
    let rx = match registered {
        Ok(rx) => rx,
        // A watch from a compacted version is told so in the stream, as
        // the API server does: one ERROR event with a 410 Status.
        Err(e) if e.code == 410 => {
            let line = crate::store::line(&json!({"type": "ERROR", "object": e.status()}));
            return Ok(stream_response(futures::stream::iter([line])));
        }
        Err(e) => return Err(e),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let s = futures::stream::unfold(rx, move |mut rx| async move {
        tokio::select! {
            m = rx.recv() => m.map(|b| (b, rx)),
            _ = tokio::time::sleep_until(deadline) => None,
        }
    });
    Ok(stream_response(s))
}

fn stream_response(
    s: impl futures::Stream<Item = Bytes> + Send + Sync + 'static,
) -> Response<Body> {
    use futures::StreamExt as _;
    let body = StreamBody::new(s.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(BodyExt::boxed(body))
        .unwrap_or_default()
}
