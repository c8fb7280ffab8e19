//! From a cluster's objects to its services, and to the catalogue each
//! peer may see.
//!
//! A Service is exported when a ServiceExport of the same namespace and
//! name exists; a peer's export policy narrows which exports it sees. The
//! catalogue carries ports and endpoint *counts* per label set and
//! locality, never addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use isthmus_core::model::istio::PolicyError;
use isthmus_core::model::problem::{ConfigProblem, Effect};
use isthmus_core::model::{
    AuthorizationPolicy, DestinationRule, Endpoint, EndpointGroup, LocalService, Locality,
    PeerAuthentication, ServiceKey, ServicePort, VirtualService,
};

use crate::export::Export;
use crate::objects::{Body, Kind};
use crate::source::Objects;

/// Which exports a peer may see (`peers[].exportTo` in the config).
/// Empty lists mean everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportPolicy {
    pub namespaces: BTreeSet<String>,
    pub services: BTreeSet<ServiceKey>,
}

impl ExportPolicy {
    pub fn allows(&self, key: &ServiceKey) -> bool {
        (self.namespaces.is_empty() && self.services.is_empty())
            || self.namespaces.contains(&key.namespace)
            || self.services.contains(key)
    }
}

/// This cluster's services and exports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Catalog {
    pub services: BTreeMap<ServiceKey, Arc<LocalService>>,
    pub exports: BTreeMap<ServiceKey, Arc<Export>>,
    /// Built from a complete list of the source (the default value, before
    /// the first list, is not).
    pub listed: bool,
    /// DestinationRules by the service they name (for the config stream).
    pub destination_rules: BTreeMap<ServiceKey, Arc<isthmus_core::model::DestinationRule>>,
    /// VirtualServices by `namespace/name`.
    pub virtual_services: BTreeMap<String, Arc<isthmus_core::model::VirtualService>>,
    /// PeerAuthentications by `namespace/name`.
    pub peer_authentications: BTreeMap<String, Arc<isthmus_core::model::PeerAuthentication>>,
    /// AuthorizationPolicies by `namespace/name`; one that cannot be
    /// enforced as written is here as one that denies every request.
    pub authorization_policies: BTreeMap<String, Arc<isthmus_core::model::AuthorizationPolicy>>,
    /// Objects refused or applied in their strictest form.
    pub problems: Vec<ConfigProblem>,
    /// Every ServiceExport: whether it is valid, and the status it shows
    /// (the kube sink writes what MCS defines from these). The controller
    /// takes them out and publishes them apart from the catalogue.
    pub export_states: BTreeMap<ServiceKey, ExportState>,
}

/// A ServiceExport as the catalogue judged it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportState {
    pub generation: u64,
    /// Why it cannot be exported: (MCS reason, message).
    pub invalid: Option<(&'static str, String)>,
}

/// Pod labels that name one pod or one rollout, not a version of the
/// workload: endpoints are grouped by label set, so keeping them would
/// make a group per pod (StatefulSets) or per rollout.
const PER_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
];

/// Parses every policy object of `kind` with `parse`, keyed by
/// `namespace/name`. `parse` returns the object to apply (an AP or PA
/// that cannot be applied as written comes back in its strictest form; a
/// routing object is left out) and what was wrong, which goes to
/// `problems` with `effect`.
fn policies<T>(
    objects: &Objects,
    kind: Kind,
    effect: Effect,
    problems: &mut Vec<ConfigProblem>,
    parse: impl Fn(&str, &str, &serde_json::Value, &BTreeMap<String, String>) -> Parsed<T>,
) -> BTreeMap<String, Arc<T>> {
    let mut out = BTreeMap::new();
    for o in objects.values().filter(|o| o.key.kind == kind) {
        let Body::Policy {
            spec, annotations, ..
        } = &o.body
        else {
            continue;
        };
        let (p, e) = parse(&o.key.namespace, &o.key.name, spec, annotations);
        if let Some(e) = e {
            problems.push(ConfigProblem::from_error(&e, effect));
        }
        if let Some(p) = p {
            out.insert(format!("{}/{}", o.key.namespace, o.key.name), Arc::new(p));
        }
    }
    out
}

/// What parsing one policy object gave: the object to apply, if any, and
/// what was wrong.
type Parsed<T> = (Option<T>, Option<PolicyError>);

/// A routing object that does not parse is left out.
fn strict<T>(r: Result<T, PolicyError>) -> Parsed<T> {
    match r {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(e)),
    }
}

impl Catalog {
    /// Builds the catalogue. `cluster_locality` fills in a region when no
    /// Node says one.
    pub fn build(objects: &Objects, cluster_locality: &Locality) -> Self {
        let nodes: BTreeMap<&str, (&str, &str)> = objects
            .values()
            .filter_map(|o| match &o.body {
                Body::Node { region, zone } => {
                    Some((o.key.name.as_str(), (region.as_str(), zone.as_str())))
                }
                _ => None,
            })
            .collect();
        // Zone → region, from the nodes, for endpoints that name only a zone.
        let zone_region: BTreeMap<&str, &str> = nodes.values().map(|(r, z)| (*z, *r)).collect();

        // EndpointSlices by (namespace, service): one pass, not one scan
        // of every object per Service (quadratic at 10,000 services).
        let mut slices: BTreeMap<(&str, &str), Vec<&crate::objects::Object>> = BTreeMap::new();
        for s in objects.values() {
            if let Body::EndpointSlice { service, .. } = &s.body {
                slices
                    .entry((s.key.namespace.as_str(), service.as_str()))
                    .or_default()
                    .push(s);
            }
        }
        let mut services = BTreeMap::new();
        let mut external_names = BTreeSet::new();
        for o in objects.values() {
            let Body::Service {
                ports,
                service_type,
            } = &o.body
            else {
                continue;
            };
            if service_type == "ExternalName" {
                external_names.insert(ServiceKey::new(&o.key.namespace, &o.key.name));
                continue;
            }
            let key = ServiceKey::new(&o.key.namespace, &o.key.name);
            let mut slice_ports: BTreeMap<String, u16> = BTreeMap::new();
            let mut endpoints = Vec::new();
            for s in slices
                .get(&(o.key.namespace.as_str(), o.key.name.as_str()))
                .into_iter()
                .flatten()
            {
                let Body::EndpointSlice {
                    ports: sp,
                    endpoints: eps,
                    ..
                } = &s.body
                else {
                    continue;
                };
                slice_ports.extend(sp.iter().map(|(k, v)| (k.clone(), *v)));
                for e in eps {
                    // Subset labels: its Pod's.
                    let labels: BTreeMap<String, String> = objects
                        .get(&crate::objects::ObjectKey {
                            kind: Kind::Pod,
                            namespace: o.key.namespace.clone(),
                            name: e.target.clone(),
                        })
                        .map(|p| {
                            p.labels
                                .iter()
                                .filter(|(k, _)| !PER_POD_LABELS.contains(&k.as_str()))
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let (region, zone) = match nodes.get(e.node_name.as_str()) {
                        Some((r, z)) => (
                            r.to_string(),
                            if e.zone.is_empty() {
                                z.to_string()
                            } else {
                                e.zone.clone()
                            },
                        ),
                        None => (
                            zone_region
                                .get(e.zone.as_str())
                                .map_or(cluster_locality.region.clone(), |r| r.to_string()),
                            e.zone.clone(),
                        ),
                    };
                    for addr in &e.addresses {
                        endpoints.push(Endpoint {
                            address: *addr,
                            ports: sp.clone(),
                            ready: e.ready,
                            locality: Locality {
                                region: region.clone(),
                                zone: zone.clone(),
                                subzone: String::new(),
                            },
                            labels: labels.clone(),
                            workload: e.target.clone(),
                        });
                    }
                }
            }
            let ports = ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    target_port: p
                        .target_port
                        .or_else(|| slice_ports.get(&p.name).copied())
                        .unwrap_or(p.port),
                    protocol: p.protocol.clone(),
                })
                .collect();
            services.insert(
                key.clone(),
                LocalService {
                    key,
                    ports,
                    endpoints,
                    exported_to: BTreeSet::new(),
                },
            );
        }

        let mut exports = BTreeMap::new();
        let mut export_states = BTreeMap::new();
        for o in objects
            .values()
            .filter(|o| o.key.kind == Kind::ServiceExport)
        {
            let key = ServiceKey::new(&o.key.namespace, &o.key.name);
            let generation = match &o.body {
                Body::ServiceExport { generation } => *generation,
                _ => 0,
            };
            let svc = services.get(&key);
            let invalid = match svc {
                Some(_) => None,
                None if external_names.contains(&key) => Some((
                    "InvalidServiceType",
                    format!("Service {key} is of type ExternalName, which cannot be exported"),
                )),
                None => Some((
                    "NoService",
                    format!("no Service {key}: create it, or delete this ServiceExport"),
                )),
            };
            export_states.insert(
                key.clone(),
                ExportState {
                    generation,
                    invalid,
                },
            );
            let Some(svc) = svc else {
                continue;
            };
            let mut groups: BTreeMap<(Locality, BTreeMap<String, String>), (u32, u32)> =
                BTreeMap::new();
            for e in &svc.endpoints {
                let g = groups
                    .entry((e.locality.clone(), e.labels.clone()))
                    .or_default();
                g.1 += 1;
                if e.ready {
                    g.0 += 1;
                }
            }
            exports.insert(
                key.clone(),
                Arc::new(Export {
                    key,
                    ports: svc.ports.clone(),
                    groups: groups
                        .into_iter()
                        .map(|((locality, labels), (healthy, total))| EndpointGroup {
                            locality,
                            labels,
                            healthy,
                            total,
                        })
                        .collect(),
                    created: time::OffsetDateTime::parse(
                        &o.created,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .map_or(0, |t| t.unix_timestamp().max(0)),
                    encoded: Default::default(),
                }),
            );
        }
        let mut problems = Vec::new();
        Self {
            services: services
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            exports,
            export_states,
            listed: true,
            destination_rules: policies(
                objects,
                Kind::DestinationRule,
                Effect::Ignored,
                &mut problems,
                |ns, name, spec, _| strict(DestinationRule::from_spec(ns, name, spec)),
            )
            .into_values()
            .map(|dr| (dr.service.clone(), dr))
            .collect(),
            virtual_services: policies(
                objects,
                Kind::VirtualService,
                Effect::Ignored,
                &mut problems,
                |ns, name, spec, _| strict(VirtualService::from_spec(ns, name, spec)),
            ),
            peer_authentications: policies(
                objects,
                Kind::PeerAuthentication,
                Effect::Strict,
                &mut problems,
                |ns, name, spec, _| {
                    let (p, e) = PeerAuthentication::from_object(ns, name, spec);
                    (Some(p), e)
                },
            ),
            authorization_policies: policies(
                objects,
                Kind::AuthorizationPolicy,
                Effect::DeniesEveryRequest,
                &mut problems,
                |ns, name, spec, annotations| {
                    let (p, e) = AuthorizationPolicy::from_object(ns, name, annotations, spec);
                    (Some(p), e)
                },
            ),
            problems,
        }
    }

    /// The exports `policy` lets a peer see.
    pub fn for_peer(&self, policy: &ExportPolicy) -> BTreeMap<ServiceKey, Arc<Export>> {
        self.exports
            .iter()
            .filter(|(k, _)| policy.allows(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Local services with `exported_to` filled in for the given peers'
    /// policies (what the gateway checks on ingress).
    pub fn with_export_targets<'a>(
        &self,
        peers: impl IntoIterator<Item = (&'a str, &'a ExportPolicy)> + Clone,
    ) -> BTreeMap<ServiceKey, Arc<LocalService>> {
        self.services
            .iter()
            .map(|(k, svc)| {
                let mut s = (**svc).clone();
                if self.exports.contains_key(k) {
                    s.exported_to = peers
                        .clone()
                        .into_iter()
                        .filter(|(_, p)| p.allows(k))
                        .map(|(n, _)| n.to_owned())
                        .collect();
                }
                (k.clone(), Arc::new(s))
            })
            .collect()
    }
}
