//! Istio's VirtualService, PeerAuthentication and AuthorizationPolicy, as
//! far as the sidecar reads them, parsed from the JSON of the object's
//! `spec` into domain types. Everything is checked here, once: a regex
//! that does not compile, a percentage over 100 or a field Isthmus does
//! not implement is an error naming the object, never a surprise on the
//! data path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::istio::PolicyError;
use crate::config::parse_duration;

/// Expands a host as Istio does: a short name is in `namespace`;
/// `<svc>.<ns>` and `<svc>.<ns>.svc` get the cluster suffix.
pub fn qualify_host(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.');
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.svc.cluster.local"),
        1 => format!("{host}.svc.cluster.local"),
        2 if host.ends_with(".svc") => format!("{host}.cluster.local"),
        _ => host.to_owned(),
    }
}

fn err(kind: &'static str, namespace: &str, name: &str, detail: String) -> PolicyError {
    PolicyError::Spec {
        kind,
        namespace: namespace.into(),
        name: name.into(),
        detail,
    }
}

/// A compiled regular expression, matched against the whole value
/// (Istio's RE2 semantics).
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    fn new(re: &str) -> Result<Self, String> {
        regex::Regex::new(&format!("^(?:{re})$"))
            .map(Pattern)
            .map_err(|e| format!("regex {re:?} does not compile: {e}"))
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}
impl Eq for Pattern {}

impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// Istio's `StringMatch`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(re) => re.0.is_match(value),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatchSpec {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

impl StringMatchSpec {
    fn compile(self) -> Result<StringMatch, String> {
        match (self.exact, self.prefix, self.regex) {
            (Some(e), None, None) => Ok(StringMatch::Exact(e)),
            (None, Some(p), None) => Ok(StringMatch::Prefix(p)),
            (None, None, Some(r)) => Pattern::new(&r).map(StringMatch::Regex),
            _ => Err("a match needs exactly one of exact, prefix, regex".into()),
        }
    }
}

/// One `http[].match[]` entry: every part given must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct HttpMatch {
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, StringMatch>,
}

/// A weighted destination of a route.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteDestination {
    /// Fully qualified host.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
}

/// `retries`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Retries {
    /// Retries after the first try (Istio's `attempts`).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Envoy retry conditions: `5xx`, `gateway-error`, `connect-failure`,
    /// `refused-stream`, `reset`, `retriable-4xx`, or status codes.
    pub retry_on: Vec<String>,
}

impl Default for Retries {
    /// Istio's default: 2 retries on connection failures, refused
    /// streams and 503.
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: ["connect-failure", "refused-stream", "reset", "503"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// `fault`: percentages are 0..=100.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Fault {
    pub delay: Option<(f64, Duration)>,
    pub abort: Option<(f64, u16)>,
}
impl Eq for Fault {}

/// One `http[]` route.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HttpRoute {
    pub name: String,
    /// Empty: matches every request.
    pub matches: Vec<HttpMatch>,
    pub route: Vec<RouteDestination>,
    pub timeout: Option<Duration>,
    pub retries: Retries,
    pub fault: Option<Fault>,
}

/// A VirtualService's data-path meaning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    /// Fully qualified hosts.
    pub hosts: Vec<String>,
    pub http: Vec<HttpRoute>,
    #[serde(skip)]
    pub spec_json: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VsSpec {
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<HttpRouteSpec>,
    #[serde(default)]
    tcp: Vec<serde_json::Value>,
    #[serde(default)]
    tls: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteSpec {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "match")]
    matches: Vec<HttpMatchSpec>,
    #[serde(default)]
    route: Vec<RouteSpec>,
    timeout: Option<String>,
    retries: Option<RetriesSpec>,
    fault: Option<FaultSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpMatchSpec {
    #[serde(default)]
    name: String,
    uri: Option<StringMatchSpec>,
    method: Option<StringMatchSpec>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatchSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    destination: DestinationSpec,
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationSpec {
    host: String,
    subset: Option<String>,
    port: Option<PortSpec>,
}

#[derive(Debug, Deserialize)]
struct PortSpec {
    number: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RetriesSpec {
    attempts: Option<u32>,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FaultSpec {
    delay: Option<DelaySpec>,
    abort: Option<AbortSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DelaySpec {
    fixed_delay: String,
    percentage: Option<PercentSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AbortSpec {
    http_status: u16,
    percentage: Option<PercentSpec>,
}

#[derive(Debug, Deserialize)]
struct PercentSpec {
    value: f64,
}

impl VirtualService {
    /// Parses `spec`. Hosts and destinations resolve in the object's
    /// namespace, as Istio does.
    pub fn from_spec(
        namespace: &str,
        name: &str,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let e = |d: String| err("VirtualService", namespace, name, d);
        let s: VsSpec = serde_json::from_value(spec.clone()).map_err(|x| e(x.to_string()))?;
        if s.gateways.iter().any(|g| g != "mesh") {
            return Err(e(format!(
                "gateways {:?}: Isthmus sidecars apply only mesh routes; drop the gateways field or use [mesh]",
                s.gateways
            )));
        }
        if !s.tcp.is_empty() || !s.tls.is_empty() {
            return Err(e(
                "tcp and tls routes are not supported by the Isthmus sidecar; use http routes"
                    .into(),
            ));
        }
        if s.hosts.is_empty() {
            return Err(e("hosts is empty; name the service(s) this routes".into()));
        }
        let dur = |field: String, v: &str| {
            parse_duration(v).ok_or_else(|| {
                e(format!(
                    "{field} {v:?} is not a duration; use e.g. 500ms or 2s"
                ))
            })
        };
        let mut http = Vec::new();
        for (i, r) in s.http.into_iter().enumerate() {
            let at = |f: &str| format!("http[{i}].{f}");
            let mut matches = Vec::new();
            for (j, m) in r.matches.into_iter().enumerate() {
                let _ = m.name;
                let c = |x: Option<StringMatchSpec>, f: &str| {
                    x.map(StringMatchSpec::compile)
                        .transpose()
                        .map_err(|d| e(format!("{}: {d}", at(&format!("match[{j}].{f}")))))
                };
                let uri = c(m.uri, "uri")?;
                let method = c(m.method, "method")?;
                let mut headers = BTreeMap::new();
                for (h, v) in m.headers {
                    let v = c(Some(v), &format!("headers.{h}"))?.expect("some");
                    headers.insert(h.to_ascii_lowercase(), v);
                }
                matches.push(HttpMatch {
                    uri,
                    method,
                    headers,
                });
            }
            if r.route.is_empty() && r.fault.as_ref().and_then(|f| f.abort.as_ref()).is_none() {
                return Err(e(format!(
                    "{} is empty; give at least one destination",
                    at("route")
                )));
            }
            let single = r.route.len() == 1;
            let mut route = Vec::new();
            for d in r.route {
                let weight = d.weight.unwrap_or(if single { 100 } else { 0 });
                route.push(RouteDestination {
                    host: qualify_host(&d.destination.host, namespace),
                    subset: d.destination.subset.filter(|s| !s.is_empty()),
                    port: d.destination.port.map(|p| p.number),
                    weight,
                });
            }
            if !route.is_empty() && route.iter().all(|d| d.weight == 0) {
                return Err(e(format!(
                    "{}: every weight is 0; weights should add up to 100",
                    at("route")
                )));
            }
            let timeout = r
                .timeout
                .as_deref()
                .map(|t| dur(at("timeout"), t))
                .transpose()?;
            let retries = match r.retries {
                None => Retries::default(),
                Some(rs) => Retries {
                    attempts: rs.attempts.unwrap_or(0).min(10),
                    per_try_timeout: rs
                        .per_try_timeout
                        .as_deref()
                        .map(|t| dur(at("retries.perTryTimeout"), t))
                        .transpose()?,
                    retry_on: match rs.retry_on {
                        Some(list) => list
                            .split(',')
                            .map(|c| c.trim().to_owned())
                            .filter(|c| !c.is_empty())
                            .collect(),
                        None => Retries::default().retry_on,
                    },
                },
            };
            let pct = |p: Option<PercentSpec>, f: &str| -> Result<f64, PolicyError> {
                let v = p.map_or(100.0, |p| p.value);
                if !(0.0..=100.0).contains(&v) {
                    return Err(e(format!(
                        "{} {v} is not between 0 and 100",
                        at(&format!("fault.{f}.percentage.value"))
                    )));
                }
                Ok(v)
            };
            let fault = match r.fault {
                None => None,
                Some(f) => Some(Fault {
                    delay: match f.delay {
                        None => None,
                        Some(d) => Some((
                            pct(d.percentage, "delay")?,
                            dur(at("fault.delay.fixedDelay"), &d.fixed_delay)?,
                        )),
                    },
                    abort: match f.abort {
                        None => None,
                        Some(a) => {
                            if !(200..=599).contains(&a.http_status) {
                                return Err(e(format!(
                                    "{} {} is not an HTTP status",
                                    at("fault.abort.httpStatus"),
                                    a.http_status
                                )));
                            }
                            Some((pct(a.percentage, "abort")?, a.http_status))
                        }
                    },
                }),
            };
            http.push(HttpRoute {
                name: r.name,
                matches,
                route,
                timeout,
                retries,
                fault,
            });
        }
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            hosts: s.hosts.iter().map(|h| qualify_host(h, namespace)).collect(),
            http,
            spec_json: spec.to_string(),
        })
    }
}

/// Mutual TLS mode (`mtls.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum MtlsMode {
    /// Only mTLS.
    Strict,
    /// mTLS and plaintext (Istio's default).
    #[default]
    Permissive,
    /// Only plaintext.
    Disable,
}

/// A PeerAuthentication's meaning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `selector.matchLabels`; `None` applies to the whole namespace (or
    /// the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` (UNSET): inherit from the parent scope.
    pub mode: Option<MtlsMode>,
    #[serde(skip)]
    pub spec_json: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PaSpec {
    selector: Option<SelectorSpec>,
    mtls: Option<MtlsSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct MtlsSpec {
    mode: Option<String>,
}

impl PeerAuthentication {
    pub fn from_spec(
        namespace: &str,
        name: &str,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let e = |d: String| err("PeerAuthentication", namespace, name, d);
        let s: PaSpec = if spec.is_null() {
            PaSpec::default()
        } else {
            serde_json::from_value(spec.clone()).map_err(|x| e(x.to_string()))?
        };
        let mode = match s.mtls.and_then(|m| m.mode).as_deref() {
            None | Some("UNSET") => None,
            Some("STRICT") => Some(MtlsMode::Strict),
            Some("PERMISSIVE") => Some(MtlsMode::Permissive),
            Some("DISABLE") => Some(MtlsMode::Disable),
            Some(other) => {
                return Err(e(format!(
                    "mtls.mode {other:?} is not a mode; use STRICT, PERMISSIVE, DISABLE or UNSET"
                )));
            }
        };
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            selector: s.selector.map(|s| s.match_labels),
            mode,
            spec_json: spec.to_string(),
        })
    }
}

/// ALLOW or DENY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum AuthzAction {
    Allow,
    Deny,
}

/// A value pattern of AuthorizationPolicy: exact, `prefix*`, `*suffix` or
/// `*`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Glob(pub String);

impl Glob {
    pub fn matches(&self, v: &str) -> bool {
        let p = self.0.as_str();
        if p == "*" {
            return true;
        }
        if let Some(prefix) = p.strip_suffix('*') {
            return v.starts_with(prefix);
        }
        if let Some(suffix) = p.strip_prefix('*') {
            return v.ends_with(suffix);
        }
        v == p
    }
}

fn any(list: &[Glob], v: &str) -> bool {
    list.iter().any(|g| g.matches(v))
}

/// One `from[].source` or `to[].operation`: each present list must match
/// (positive lists: one of; negative lists: none of).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Source {
    pub principals: Option<Vec<Glob>>,
    pub not_principals: Vec<Glob>,
    pub namespaces: Option<Vec<Glob>>,
    pub not_namespaces: Vec<Glob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Operation {
    pub methods: Option<Vec<Glob>>,
    pub not_methods: Vec<Glob>,
    pub paths: Option<Vec<Glob>>,
    pub not_paths: Vec<Glob>,
}

/// A rule: matches when one of `from` and one of `to` match (an empty
/// list matches everything).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
}

/// What an AuthorizationPolicy is evaluated against.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Istio's principal form (`<td>/ns/<ns>/sa/<sa>`), `None` for
    /// plaintext.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub method: &'a str,
    /// The normalized path, without the query.
    pub path: &'a str,
}

fn field(list: &Option<Vec<Glob>>, not: &[Glob], v: Option<&str>) -> bool {
    let pos = match list {
        None => true,
        Some(l) => v.is_some_and(|v| any(l, v)),
    };
    let neg = not.is_empty() || !v.is_some_and(|v| any(not, v));
    pos && neg
}

impl Rule {
    pub fn matches(&self, r: &RequestFacts<'_>) -> bool {
        let from = self.from.is_empty()
            || self.from.iter().any(|s| {
                field(&s.principals, &s.not_principals, r.principal)
                    && field(&s.namespaces, &s.not_namespaces, r.namespace)
            });
        let to = self.to.is_empty()
            || self.to.iter().any(|o| {
                field(&o.methods, &o.not_methods, Some(r.method))
                    && field(&o.paths, &o.not_paths, Some(r.path))
            });
        from && to
    }
}

/// An AuthorizationPolicy's meaning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub action: AuthzAction,
    /// ALLOW with no rules allows nothing; DENY with no rules denies
    /// nothing (Istio).
    pub rules: Vec<Rule>,
    #[serde(skip)]
    pub spec_json: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApSpec {
    selector: Option<SelectorSpec>,
    action: Option<String>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Vec<FromSpec>,
    #[serde(default)]
    to: Vec<ToSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSpec {
    source: SourceSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    operation: OperationSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceSpec {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OperationSpec {
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

fn globs(v: Option<Vec<String>>) -> Option<Vec<Glob>> {
    v.map(|l| l.into_iter().map(Glob).collect())
}

impl AuthorizationPolicy {
    pub fn from_spec(
        namespace: &str,
        name: &str,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let e = |d: String| err("AuthorizationPolicy", namespace, name, d);
        let s: ApSpec = if spec.is_null() {
            ApSpec::default()
        } else {
            serde_json::from_value(spec.clone()).map_err(|x| {
                e(format!(
                    "{x} (Isthmus supports from.source principals/namespaces and to.operation methods/paths, with their not- forms)"
                ))
            })?
        };
        let action = match s.action.as_deref() {
            None | Some("ALLOW") => AuthzAction::Allow,
            Some("DENY") => AuthzAction::Deny,
            Some(other) => {
                return Err(e(format!(
                    "action {other:?} is not supported; use ALLOW or DENY"
                )));
            }
        };
        let rules = s
            .rules
            .into_iter()
            .map(|r| Rule {
                from: r
                    .from
                    .into_iter()
                    .map(|f| Source {
                        principals: globs(f.source.principals),
                        not_principals: globs(f.source.not_principals).unwrap_or_default(),
                        namespaces: globs(f.source.namespaces),
                        not_namespaces: globs(f.source.not_namespaces).unwrap_or_default(),
                    })
                    .collect(),
                to: r
                    .to
                    .into_iter()
                    .map(|t| Operation {
                        methods: globs(t.operation.methods),
                        not_methods: globs(t.operation.not_methods).unwrap_or_default(),
                        paths: globs(t.operation.paths),
                        not_paths: globs(t.operation.not_paths).unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            selector: s.selector.map(|s| s.match_labels),
            action,
            rules,
            spec_json: spec.to_string(),
        })
    }

    /// Whether this policy applies to a workload in `namespace` with
    /// `labels` (`root` is the mesh-wide namespace, `istio-system`).
    pub fn applies_to(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        root: &str,
    ) -> bool {
        (self.namespace == namespace || self.namespace == root)
            && self
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// Whether any rule matches.
    pub fn matches(&self, r: &RequestFacts<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn virtual_service_routes_parse_with_their_defaults() {
        let vs = VirtualService::from_spec(
            "sample",
            "helloworld",
            &json!({
                "hosts": ["helloworld"],
                "http": [
                    {"match": [{"uri": {"prefix": "/v2"}, "headers": {"X-User": {"exact": "tester"}}}],
                     "route": [{"destination": {"host": "helloworld", "subset": "v2"}}],
                     "timeout": "2s",
                     "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,connect-failure"}},
                    {"route": [
                        {"destination": {"host": "helloworld", "subset": "v1"}, "weight": 90},
                        {"destination": {"host": "helloworld.sample.svc.clusterset.local", "subset": "v2"}, "weight": 10}],
                     "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 10}}}}
                ]
            }),
        )
        .unwrap();
        assert_eq!(vs.hosts, ["helloworld.sample.svc.cluster.local"]);
        let first = &vs.http[0];
        assert_eq!(
            first.matches[0].headers["x-user"],
            StringMatch::Exact("tester".into())
        );
        assert_eq!(first.route[0].weight, 100);
        assert_eq!(first.retries.attempts, 3);
        assert_eq!(
            first.retries.per_try_timeout,
            Some(Duration::from_millis(500))
        );
        let second = &vs.http[1];
        assert_eq!(second.retries, Retries::default());
        assert_eq!(
            second.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
            [90, 10]
        );
        assert_eq!(
            second.route[1].host,
            "helloworld.sample.svc.clusterset.local"
        );
        assert_eq!(second.fault.as_ref().unwrap().abort, Some((10.0, 503)));
    }

    #[test]
    fn bad_virtual_services_name_the_field_and_the_fix() {
        let cases = [
            (
                json!({"hosts": ["a"], "http": [{"match": [{"uri": {"regex": "(["}}], "route": [{"destination": {"host": "a"}}]}]}),
                "http[0].match[0].uri: regex",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}], "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 150}}}}]}),
                "not between 0 and 100",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": []}]}),
                "give at least one destination",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}], "timeout": "soon"}]}),
                "http[0].timeout \"soon\"",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}], "mirror": {"host": "b"}}]}),
                "unknown field `mirror`",
            ),
            (
                json!({"hosts": ["a"], "gateways": ["ingress"], "http": []}),
                "mesh routes",
            ),
        ];
        for (spec, want) in cases {
            let e = VirtualService::from_spec("ns", "bad", &spec)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("VirtualService ns/bad: "), "{e}");
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    #[test]
    fn authorization_rules_follow_istio_semantics() {
        let ap = AuthorizationPolicy::from_spec(
            "sample",
            "deny-admin",
            &json!({"action": "DENY", "rules": [{
                "from": [{"source": {"notPrincipals": ["east.local/ns/ops/sa/*"]}}],
                "to": [{"operation": {"paths": ["/admin*"], "methods": ["GET", "POST"]}}]
            }]}),
        )
        .unwrap();
        let facts = |p: Option<&'static str>, path: &'static str| RequestFacts {
            principal: p,
            namespace: None,
            method: "GET",
            path,
        };
        assert!(ap.matches(&facts(Some("east.local/ns/sample/sa/web"), "/admin/x")));
        assert!(!ap.matches(&facts(Some("east.local/ns/ops/sa/root"), "/admin/x")));
        assert!(!ap.matches(&facts(Some("east.local/ns/sample/sa/web"), "/public")));
        // Plaintext has no principal: notPrincipals matches it.
        assert!(ap.matches(&facts(None, "/admin")));
        let e = AuthorizationPolicy::from_spec(
            "sample",
            "bad",
            &json!({"rules": [{"when": [{"key": "request.headers[x]", "values": ["1"]}]}]}),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `when`"), "{e}");
        assert!(
            AuthorizationPolicy::from_spec("s", "x", &json!({"action": "CUSTOM"}))
                .unwrap_err()
                .to_string()
                .contains("use ALLOW or DENY")
        );
    }

    #[test]
    fn hosts_qualify_in_the_objects_namespace() {
        assert_eq!(qualify_host("a", "ns"), "a.ns.svc.cluster.local");
        assert_eq!(qualify_host("a.b", "ns"), "a.b.svc.cluster.local");
        assert_eq!(qualify_host("a.b.svc", "ns"), "a.b.svc.cluster.local");
        assert_eq!(
            qualify_host("a.b.svc.clusterset.local", "ns"),
            "a.b.svc.clusterset.local"
        );
    }
}
