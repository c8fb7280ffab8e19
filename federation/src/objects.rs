//! The Kubernetes objects a controller reads, parsed once at the boundary
//! into domain types. Errors name the object and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

/// The kinds a source delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// Pods give endpoints their labels (an EndpointSlice's endpoints
    /// have none): only their metadata is read.
    Pod,
    ServiceExport,
    Node,
    DestinationRule,
    VirtualService,
    PeerAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    /// Every kind a controller reads.
    pub const ALL: [Kind; 9] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::ServiceExport,
        Kind::Node,
        Kind::DestinationRule,
        Kind::VirtualService,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
    ];

    fn from_manifest(api_version: &str, kind: &str) -> Option<Self> {
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        Some(match (group, kind) {
            ("", "Service") => Kind::Service,
            ("", "Node") => Kind::Node,
            ("", "Pod") => Kind::Pod,
            ("discovery.k8s.io", "EndpointSlice") => Kind::EndpointSlice,
            ("multicluster.x-k8s.io", "ServiceExport") => Kind::ServiceExport,
            ("networking.istio.io", "DestinationRule") => Kind::DestinationRule,
            ("networking.istio.io", "VirtualService") => Kind::VirtualService,
            ("security.istio.io", "PeerAuthentication") => Kind::PeerAuthentication,
            ("security.istio.io", "AuthorizationPolicy") => Kind::AuthorizationPolicy,
            _ => return None,
        })
    }

    /// Cluster-scoped kinds have no namespace.
    pub fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// (group, version, plural) on a Kubernetes API server. ServiceExport
    /// is `multicluster.x-k8s.io/v1alpha1` here; the kube source uses
    /// whichever version the server serves.
    pub fn api(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kind::Service => ("", "v1", "services"),
            Kind::EndpointSlice => ("discovery.k8s.io", "v1", "endpointslices"),
            Kind::Pod => ("", "v1", "pods"),
            Kind::ServiceExport => ("multicluster.x-k8s.io", "v1alpha1", "serviceexports"),
            Kind::Node => ("", "v1", "nodes"),
            Kind::DestinationRule => ("networking.istio.io", "v1", "destinationrules"),
            Kind::VirtualService => ("networking.istio.io", "v1", "virtualservices"),
            Kind::PeerAuthentication => ("security.istio.io", "v1", "peerauthentications"),
            Kind::AuthorizationPolicy => ("security.istio.io", "v1", "authorizationpolicies"),
        }
    }
}

/// Identifies an object within a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{:?} {}", self.kind, self.name)
        } else {
            write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServicePortSpec {
    pub name: String,
    pub port: u16,
    /// Numeric target port; a named target port resolves through the
    /// EndpointSlice's ports.
    pub target_port: Option<u16>,
    pub protocol: String,
    pub app_protocol: String,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub zone: String,
    pub node_name: String,
    /// The Pod `targetRef` names: its labels are the endpoint's (for
    /// DestinationRule subsets); the catalogue joins them.
    pub target: String,
}

/// What an object says, by kind.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Body {
    Service {
        ports: Vec<ServicePortSpec>,
        /// `spec.type`: ClusterIP (the default), NodePort, LoadBalancer,
        /// ExternalName (which MCS does not export).
        service_type: String,
    },
    EndpointSlice {
        /// The Service it belongs to (`kubernetes.io/service-name`).
        service: String,
        ports: BTreeMap<String, u16>,
        endpoints: Vec<SliceEndpoint>,
    },
    /// Its status is not part of the object as the controller keeps it:
    /// the controller's own status writes come back through the watch,
    /// and must not rebuild the catalogue (see [`export_conditions`]).
    ServiceExport {
        /// `metadata.generation`, for `observedGeneration`.
        generation: u64,
    },
    /// A Pod: its labels are the object's.
    Pod,
    Node {
        region: String,
        zone: String,
    },
    /// Istio policy: the spec travels as JSON (see architecture.md).
    Policy {
        api_version: String,
        spec: Value,
        generation: u64,
        /// The annotations that change a policy's meaning
        /// ([`CARRIED_ANNOTATIONS`]); the rest are not kept.
        annotations: BTreeMap<String, String>,
    },
}

/// One condition of a ServiceExport's status.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct ExportCondition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub observed_generation: u64,
    pub last_transition: String,
}

/// A parsed object.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Object {
    pub key: ObjectKey,
    /// `metadata.creationTimestamp` (RFC 3339), empty if unset: the oldest
    /// ServiceExport wins a conflict.
    pub created: String,
    pub labels: BTreeMap<String, String>,
    pub body: Body,
}

/// A ServiceExport manifest's `status.conditions`.
pub fn export_conditions(doc: &Value) -> Vec<ExportCondition> {
    doc.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            ExportCondition {
                type_: s("type"),
                status: s("status"),
                reason: s("reason"),
                message: s("message"),
                observed_generation: c
                    .get("observedGeneration")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                last_transition: s("lastTransitionTime"),
            }
        })
        .collect()
}

/// Annotations a policy object keeps: they change what it means.
pub const CARRIED_ANNOTATIONS: &[&str] = &[isthmus_core::model::istio::DRY_RUN_ANNOTATION];

/// Parses one manifest. `Ok(None)` for kinds a controller does not read
/// (Deployments, ConfigMaps, the ServiceEntries it writes itself).
pub fn parse(doc: &Value) -> Result<Option<Object>, String> {
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or("apiVersion is missing")?;
    let kind_s = doc
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("kind is missing")?;
    let Some(kind) = Kind::from_manifest(api_version, kind_s) else {
        return Ok(None);
    };
    let meta = doc
        .get("metadata")
        .ok_or_else(|| format!("{kind_s}: metadata is missing"))?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{kind_s}: metadata.name is missing"))?;
    let namespace = if kind.namespaced() {
        meta.get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned()
    } else {
        String::new()
    };
    let key = ObjectKey {
        kind,
        namespace,
        name: name.to_owned(),
    };
    let err = |field: &str, what: &str| format!("{key}: {field} {what}");
    let labels: BTreeMap<String, String> = meta
        .get("labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let spec = doc.get("spec");
    let body = match kind {
        Kind::Service => {
            let external =
                spec.and_then(|s| s.get("type")).and_then(Value::as_str) == Some("ExternalName");
            let no_ports = Vec::new();
            let ports = spec
                .and_then(|s| s.get("ports"))
                .and_then(Value::as_array)
                .or(external.then_some(&no_ports))
                .ok_or_else(|| {
                    err(
                        "spec.ports",
                        "is missing; a Service needs at least one port",
                    )
                })?;
            let mut out = Vec::new();
            for (i, p) in ports.iter().enumerate() {
                let port = p
                    .get("port")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        err(
                            &format!("spec.ports[{i}].port"),
                            "must be a number from 1 to 65535",
                        )
                    })?;
                let target_port =
                    match p.get("targetPort") {
                        None => Some(port),
                        Some(Value::Number(n)) => {
                            Some(n.as_u64().and_then(|n| u16::try_from(n).ok()).ok_or_else(
                                || err(&format!("spec.ports[{i}].targetPort"), "is out of range"),
                            )?)
                        }
                        Some(Value::String(_)) => None,
                        Some(_) => {
                            return Err(err(
                                &format!("spec.ports[{i}].targetPort"),
                                "must be a number or a port name",
                            ));
                        }
                    };
                let s = |k: &str, d: &str| p.get(k).and_then(Value::as_str).unwrap_or(d).to_owned();
                out.push(ServicePortSpec {
                    name: s("name", ""),
                    port,
                    target_port,
                    protocol: s("protocol", "TCP"),
                    app_protocol: s("appProtocol", ""),
                });
            }
            Body::Service {
                ports: out,
                service_type: spec
                    .and_then(|s| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("ClusterIP")
                    .to_owned(),
            }
        }
        Kind::EndpointSlice => {
            let service = labels
                .get("kubernetes.io/service-name")
                .cloned()
                .ok_or_else(|| {
                    err(
                        "metadata.labels",
                        "lacks kubernetes.io/service-name; which Service is this slice for?",
                    )
                })?;
            let ports = doc
                .get("ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .filter_map(|p| {
                            let n = u16::try_from(p.get("port")?.as_u64()?).ok()?;
                            Some((
                                p.get("name")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_owned(),
                                n,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut endpoints = Vec::new();
            for (i, e) in doc
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let mut addresses = Vec::new();
                for a in e
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let ip: IpAddr = a.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                        err(
                            &format!("endpoints[{i}].addresses"),
                            &format!("has {a}, not an IP address"),
                        )
                    })?;
                    addresses.push(ip);
                }
                if addresses.is_empty() {
                    return Err(err(&format!("endpoints[{i}].addresses"), "is empty"));
                }
                let cond = e.get("conditions");
                let flag = |k: &str| cond.and_then(|c| c.get(k)).and_then(Value::as_bool);
                // Kubernetes: a nil `ready` means ready; a terminating
                // endpoint counts as not ready even while `serving` (it
                // takes no new connections).
                let terminating = flag("terminating").unwrap_or(false);
                let ready = flag("ready").unwrap_or(!terminating) && !terminating;
                let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_owned();
                endpoints.push(SliceEndpoint {
                    addresses,
                    ready,
                    zone: s(e.get("zone")),
                    node_name: s(e.get("nodeName")),
                    target: s(e.get("targetRef").and_then(|t| t.get("name"))),
                });
            }
            Body::EndpointSlice {
                service,
                ports,
                endpoints,
            }
        }
        Kind::ServiceExport => Body::ServiceExport {
            generation: meta.get("generation").and_then(Value::as_u64).unwrap_or(0),
        },
        Kind::Pod => Body::Pod,
        Kind::Node => Body::Node {
            region: labels
                .get("topology.kubernetes.io/region")
                .cloned()
                .unwrap_or_default(),
            zone: labels
                .get("topology.kubernetes.io/zone")
                .cloned()
                .unwrap_or_default(),
        },
        _ => Body::Policy {
            api_version: api_version.to_owned(),
            // Istio reads a missing spec as an empty one (for an
            // AuthorizationPolicy: allow nothing); the kinds that need
            // fields say which when parsed.
            spec: spec.cloned().unwrap_or(Value::Null),
            generation: meta.get("generation").and_then(Value::as_u64).unwrap_or(0),
            annotations: CARRIED_ANNOTATIONS
                .iter()
                .filter_map(|k| {
                    let v = meta.get("annotations")?.get(*k)?.as_str()?;
                    Some(((*k).to_owned(), v.to_owned()))
                })
                .collect(),
        },
    };
    Ok(Some(Object {
        key,
        created: meta
            .get("creationTimestamp")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        labels,
        body,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn endpoint_readiness_follows_the_slice_conditions() {
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "sample",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "web-5"}},
            ]
        });
        let o = parse(&slice).unwrap().unwrap();
        let Body::EndpointSlice { endpoints, .. } = o.body else {
            panic!("{o:?}")
        };
        let ready: Vec<bool> = endpoints.iter().map(|e| e.ready).collect();
        assert_eq!(ready, [true, false, false, false, true]);
        assert_eq!(endpoints[4].target, "web-5");
    }
}
