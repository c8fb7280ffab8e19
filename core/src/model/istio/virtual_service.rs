//! VirtualService: HTTP routes (matches, weights, retries, timeouts, faults).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{PolicyError, StringMatch, StringMatchSpec, err, qualify_host};
use crate::config::parse_duration;

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
    pub retry_on: Vec<RetryOn>,
}

impl Default for Retries {
    /// Istio's default: 2 retries on connection failures, refused
    /// streams and 503.
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Reset,
                RetryOn::Status(503),
            ],
        }
    }
}

/// One `retryOn` condition: Envoy's names, as Istio passes them on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RetryOn {
    /// `5xx`: any 5xx answer, and every transport failure.
    FiveXx,
    /// `gateway-error`: 502, 503, 504, and every transport failure.
    GatewayError,
    /// `connect-failure`: the upstream could not be reached.
    ConnectFailure,
    /// `refused-stream`: the upstream refused the stream (counted with
    /// resets: both are the upstream going away before an answer).
    RefusedStream,
    /// `reset`: the connection was reset before an answer.
    Reset,
    /// `retriable-4xx`: 409.
    Retriable4xx,
    /// A gRPC status in the answer's headers: `cancelled` (1),
    /// `deadline-exceeded` (4), `resource-exhausted` (8), `internal` (13),
    /// `unavailable` (14, and HTTP 503).
    Grpc(u8),
    /// An HTTP status code (`503`).
    Status(u16),
}

/// A transport failure before an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    Connect,
    Reset,
}

impl RetryOn {
    /// Parses one condition of `retryOn`; the error names the accepted
    /// ones.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "5xx" => RetryOn::FiveXx,
            "gateway-error" => RetryOn::GatewayError,
            "connect-failure" => RetryOn::ConnectFailure,
            "refused-stream" => RetryOn::RefusedStream,
            "reset" => RetryOn::Reset,
            "retriable-4xx" => RetryOn::Retriable4xx,
            "cancelled" => RetryOn::Grpc(1),
            "deadline-exceeded" => RetryOn::Grpc(4),
            "resource-exhausted" => RetryOn::Grpc(8),
            "internal" => RetryOn::Grpc(13),
            "unavailable" => RetryOn::Grpc(14),
            other => match other.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => RetryOn::Status(code),
                _ => {
                    return Err(format!(
                        "{other:?} is not a retry condition Isthmus knows; use 5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or an HTTP status code"
                    ));
                }
            },
        })
    }

    /// Whether a failure before any answer is retried.
    pub fn on_failure(self, f: TransportFailure) -> bool {
        match self {
            RetryOn::FiveXx | RetryOn::GatewayError => true,
            RetryOn::ConnectFailure => f == TransportFailure::Connect,
            RetryOn::Reset | RetryOn::RefusedStream => f == TransportFailure::Reset,
            _ => false,
        }
    }

    /// Whether an answer with `status` (and `grpc_status` from its
    /// headers, for gRPC) is retried.
    pub fn on_answer(self, status: u16, grpc_status: Option<u8>) -> bool {
        match self {
            RetryOn::FiveXx => (500..=599).contains(&status),
            RetryOn::GatewayError => (502..=504).contains(&status),
            RetryOn::Retriable4xx => status == 409,
            RetryOn::Grpc(14) => status == 503 || grpc_status == Some(14),
            RetryOn::Grpc(code) => grpc_status == Some(code),
            RetryOn::Status(code) => status == code,
            RetryOn::ConnectFailure | RetryOn::RefusedStream | RetryOn::Reset => false,
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
        if let Some(i) = s.hosts.iter().position(|h| h.is_empty() || h.contains('*')) {
            return Err(e(format!(
                "hosts[{i}] {:?}: a wildcard or empty host cannot be routed by sidecars (Istio refuses \"*\" for mesh routes too); name the service(s)",
                s.hosts[i]
            )));
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
                            .map(str::trim)
                            .filter(|c| !c.is_empty())
                            .map(|c| {
                                RetryOn::parse(c)
                                    .map_err(|d| e(format!("{}: {d}", at("retries.retryOn"))))
                            })
                            .collect::<Result<_, _>>()?,
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
            (
                json!({"hosts": ["*"], "http": [{"route": [{"destination": {"host": "a"}}]}]}),
                "hosts[0] \"*\": a wildcard or empty host cannot be routed",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}], "retries": {"attempts": 2, "retryOn": "5xx,connect-failures"}}]}),
                "http[0].retries.retryOn: \"connect-failures\" is not a retry condition",
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
    fn retry_conditions_follow_envoys_meaning() {
        use TransportFailure::{Connect, Reset};
        let p = |s: &str| RetryOn::parse(s).unwrap();
        assert!(p("5xx").on_failure(Connect) && p("5xx").on_answer(500, None));
        assert!(!p("5xx").on_answer(404, None));
        assert!(
            p("gateway-error").on_answer(504, None) && !p("gateway-error").on_answer(500, None)
        );
        assert!(
            p("connect-failure").on_failure(Connect) && !p("connect-failure").on_failure(Reset)
        );
        assert!(p("refused-stream").on_failure(Reset) && p("reset").on_failure(Reset));
        assert!(
            p("retriable-4xx").on_answer(409, None) && !p("retriable-4xx").on_answer(404, None)
        );
        assert!(p("unavailable").on_answer(503, None) && p("unavailable").on_answer(200, Some(14)));
        assert!(
            p("resource-exhausted").on_answer(200, Some(8))
                && !p("internal").on_answer(200, Some(8))
        );
        assert!(p("503").on_answer(503, None) && !p("503").on_failure(Connect));
        assert!(RetryOn::parse("600").is_err() && RetryOn::parse("5XX").is_err());
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
