//! DestinationRule: subsets, load balancing, locality, outlier detection, connection pool.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::PolicyError;
use crate::config::parse_duration;
use crate::model::{Scope, ServiceKey};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DrSpec {
    host: String,
    #[serde(default)]
    subsets: Vec<SubsetSpec>,
    traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubsetSpec {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrafficPolicySpec {
    load_balancer: Option<LoadBalancerSpec>,
    outlier_detection: Option<OutlierSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionPoolSpec {
    tcp: Option<TcpPoolSpec>,
    http: Option<HttpPoolSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcpPoolSpec {
    max_connections: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpPoolSpec {
    http1_max_pending_requests: Option<u32>,
    http2_max_requests: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadBalancerSpec {
    simple: Option<String>,
    locality_lb_setting: Option<LocalityLbSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocalityLbSpec {
    enabled: Option<bool>,
    #[serde(default)]
    failover: Vec<FailoverSpec>,
    #[serde(default)]
    failover_priority: Vec<String>,
    #[serde(default)]
    distribute: Vec<DistributeSpec>,
}

#[derive(Debug, Deserialize)]
struct FailoverSpec {
    from: String,
    to: String,
}

#[derive(Debug, Deserialize)]
struct DistributeSpec {
    from: String,
    to: BTreeMap<String, u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutlierSpec {
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    consecutive_gateway_errors: Option<u32>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<u32>,
}

/// Load-balancing algorithm (`loadBalancer.simple`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

/// `localityLbSetting`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct LocalityLbSetting {
    /// Region failover pairs: traffic from `from` goes to `to` next.
    pub failover: Vec<(String, String)>,
    /// Label keys; endpoints matching more leading keys of the caller come
    /// first.
    pub failover_priority: Vec<String>,
    /// Weighted distribution: from a locality prefix (`region/zone/*`), to
    /// locality prefixes with percentages.
    pub distribute: Vec<(String, BTreeMap<String, u32>)>,
}

/// `outlierDetection`, with Istio's defaults for unset fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutlierDetection {
    pub consecutive_errors: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    /// Istio's defaults: 5 consecutive errors, 10 s interval, 30 s base
    /// ejection, at most 10 % ejected. Isthmus turns passive detection on
    /// with these even with no DestinationRule (see DESIGN.md).
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// `connectionPool` limits, per destination service and sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`.
    pub max_pending: Option<u32>,
    /// `http.http2MaxRequests`.
    pub max_requests: Option<u32>,
}

impl ConnectionPool {
    /// Requests allowed in flight at once; more are answered 503.
    /// Isthmus multiplexes requests over HTTP/2, so a connection limit
    /// bounds concurrent requests like Envoy's HTTP/1 pool does, and
    /// pending requests add to it.
    pub fn max_in_flight(&self) -> Option<u32> {
        let conns = self
            .max_connections
            .map(|c| c.saturating_add(self.max_pending.unwrap_or(0)));
        match (conns, self.max_requests) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A DestinationRule's data-path meaning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    pub service: ServiceKey,
    pub scope: Scope,
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
    pub lb: LbPolicy,
    /// `None` when unset; `enabled: false` also gives `None`.
    pub locality_lb: Option<LocalityLbSetting>,
    /// `None` when unset (Isthmus's default detection applies).
    pub outlier: Option<OutlierDetection>,
    pub connection_pool: ConnectionPool,
    /// The spec as received, for passing on (config stream).
    #[serde(skip)]
    pub spec_json: String,
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Scope::Local => "cluster.local",
            Scope::ClusterSet => "clusterset.local",
        })
    }
}

impl DestinationRule {
    /// Parses `spec` (the object's `spec` as JSON). Short hosts resolve
    /// in the rule's namespace, as Istio does.
    pub fn from_spec(
        namespace: &str,
        name: &str,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let err = |detail: String| PolicyError::Spec {
            kind: "DestinationRule",
            namespace: namespace.into(),
            name: name.into(),
            detail,
        };
        let spec_text = spec.to_string();
        let spec: DrSpec = serde_json::from_value(spec.clone()).map_err(|e| err(e.to_string()))?;
        let host = super::qualify_host(&spec.host, namespace);
        let (service, scope) = ServiceKey::from_host(&host).ok_or_else(|| {
            err(format!(
                "host {:?} is not a service name; use <svc>, <svc>.<ns>, or <svc>.<ns>.svc.cluster.local / .svc.clusterset.local",
                spec.host
            ))
        })?;
        let mut subsets = BTreeMap::new();
        for s in spec.subsets {
            if subsets.insert(s.name.clone(), s.labels).is_some() {
                return Err(err(format!("subset {:?} is defined twice", s.name)));
            }
        }
        let tp = spec.traffic_policy.unwrap_or_default();
        let connection_pool = tp
            .connection_pool
            .map(|c| ConnectionPool {
                max_connections: c.tcp.and_then(|t| t.max_connections),
                max_pending: c.http.as_ref().and_then(|h| h.http1_max_pending_requests),
                max_requests: c.http.and_then(|h| h.http2_max_requests),
            })
            .unwrap_or_default();
        let lbs = tp.load_balancer.unwrap_or_default();
        let lb = match lbs.simple.as_deref() {
            None | Some("ROUND_ROBIN") | Some("UNSPECIFIED") => LbPolicy::RoundRobin,
            Some("LEAST_REQUEST") | Some("LEAST_CONN") => LbPolicy::LeastRequest,
            Some("RANDOM") => LbPolicy::Random,
            Some(other) => {
                return Err(err(format!(
                    "loadBalancer.simple {other:?} is not supported; use ROUND_ROBIN, LEAST_REQUEST or RANDOM"
                )));
            }
        };
        if let Some(l) = &lbs.locality_lb_setting {
            let at = "trafficPolicy.loadBalancer.localityLbSetting";
            if !l.failover.is_empty() && !l.distribute.is_empty() {
                return Err(err(format!(
                    "{at}: failover and distribute cannot both be set (Istio refuses it too); keep one"
                )));
            }
            for (i, d) in l.distribute.iter().enumerate() {
                let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
                if sum != 100 {
                    return Err(err(format!(
                        "{at}.distribute[{i}].to: weights add up to {sum}; they must add up to 100"
                    )));
                }
                if d.from.is_empty() || d.to.keys().any(|k| k.is_empty()) {
                    return Err(err(format!(
                        "{at}.distribute[{i}]: a locality is empty; write region/zone/subzone, with * for any"
                    )));
                }
            }
        }
        let locality_lb = match lbs.locality_lb_setting {
            Some(l) if l.enabled != Some(false) => Some(LocalityLbSetting {
                failover: l.failover.into_iter().map(|f| (f.from, f.to)).collect(),
                failover_priority: l.failover_priority,
                distribute: l.distribute.into_iter().map(|d| (d.from, d.to)).collect(),
            }),
            _ => None,
        };
        let outlier = match tp.outlier_detection {
            None => None,
            Some(o) => {
                let d = OutlierDetection::default();
                let dur = |field: &str, v: Option<String>, default: Duration| match v {
                    None => Ok(default),
                    Some(s) => parse_duration(&s).ok_or_else(|| {
                        err(format!(
                            "outlierDetection.{field} {s:?} is not a duration; use e.g. 10s"
                        ))
                    }),
                };
                Some(OutlierDetection {
                    consecutive_errors: o
                        .consecutive_5xx_errors
                        .or(o.consecutive_gateway_errors)
                        .unwrap_or(d.consecutive_errors),
                    interval: dur("interval", o.interval, d.interval)?,
                    base_ejection_time: dur(
                        "baseEjectionTime",
                        o.base_ejection_time,
                        d.base_ejection_time,
                    )?,
                    max_ejection_percent: o
                        .max_ejection_percent
                        .unwrap_or(d.max_ejection_percent)
                        .min(100),
                })
            }
        };
        Ok(Self {
            spec_json: spec_text,
            namespace: namespace.into(),
            name: name.into(),
            service,
            scope,
            subsets,
            lb,
            locality_lb,
            outlier,
            connection_pool,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_subsets_locality_and_outlier_detection() {
        let dr = DestinationRule::from_spec(
            "sample",
            "helloworld",
            &json!({
                "host": "helloworld",
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
                "trafficPolicy": {
                    "loadBalancer": {"simple": "LEAST_REQUEST", "localityLbSetting": {
                        "failover": [{"from": "us-east1", "to": "us-west1"}],
                        "failoverPriority": ["topology.istio.io/network"]
                    }},
                    "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "15s"}
                }
            }),
        )
        .unwrap();
        assert_eq!(dr.service, ServiceKey::new("sample", "helloworld"));
        assert_eq!(dr.scope, Scope::Local);
        assert_eq!(dr.subsets["v2"]["version"], "v2");
        assert_eq!(dr.lb, LbPolicy::LeastRequest);
        let l = dr.locality_lb.unwrap();
        assert_eq!(
            l.failover,
            vec![("us-east1".to_owned(), "us-west1".to_owned())]
        );
        let o = dr.outlier.unwrap();
        assert_eq!(
            (
                o.consecutive_errors,
                o.interval,
                o.base_ejection_time,
                o.max_ejection_percent
            ),
            (3, Duration::from_secs(1), Duration::from_secs(15), 10)
        );
    }

    #[test]
    fn bad_specs_name_the_object_and_the_fix() {
        let e = DestinationRule::from_spec("ns", "bad", &json!({"host": "a.b.example.com"}))
            .unwrap_err();
        assert!(e.to_string().starts_with("DestinationRule ns/bad: "), "{e}");
        let e = DestinationRule::from_spec(
            "ns",
            "bad",
            &json!({"host": "a", "trafficPolicy": {"outlierDetection": {"interval": "often"}}}),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("outlierDetection.interval \"often\""),
            "{e}"
        );
        let e = DestinationRule::from_spec(
            "ns",
            "bad",
            &json!({"host": "a", "trafficPolicy": {"loadBalancer": {"simple": "MAGLEV"}}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ROUND_ROBIN"), "{e}");
    }

    #[test]
    fn distribute_weights_must_add_up_to_100_and_exclude_failover() {
        let dr = |lb: serde_json::Value| {
            DestinationRule::from_spec(
                "sample",
                "hw",
                &json!({"host": "helloworld", "trafficPolicy": {"loadBalancer": {"localityLbSetting": lb}}}),
            )
        };
        assert!(dr(json!({"distribute": [{"from": "us-east1/*", "to": {"us-east1/*": 20, "us-west1/*": 80}}]})).is_ok());
        let e = dr(json!({"distribute": [{"from": "us-east1/*", "to": {"us-east1/*": 25, "us-west1/*": 80}}]}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("distribute[0].to: weights add up to 105; they must add up to 100"),
            "{e}"
        );
        let e = dr(json!({"failover": [{"from": "a", "to": "b"}], "distribute": [{"from": "a/*", "to": {"b/*": 100}}]}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("failover and distribute cannot both be set"),
            "{e}"
        );
    }

    #[test]
    fn hosts_parse_by_scope() {
        assert_eq!(
            ServiceKey::from_host("a.b.svc.clusterset.local"),
            Some((ServiceKey::new("b", "a"), Scope::ClusterSet))
        );
        assert_eq!(
            ServiceKey::from_host("a.b.svc.cluster.local."),
            Some((ServiceKey::new("b", "a"), Scope::Local))
        );
        assert_eq!(ServiceKey::from_host("a.svc.cluster.local"), None);
        assert_eq!(ServiceKey::from_host("A.b.svc.cluster.local"), None);
        assert_eq!(ServiceKey::from_host("example.com"), None);
    }
}
