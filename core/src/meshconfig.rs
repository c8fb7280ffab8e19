//! The mesh config stream (`isthmus.config.v1.MeshConfig`, port 15010):
//! the conversions between [`MeshState`] and its wire form, shared by the
//! controller (server) and the gateway and sidecars (clients), and the
//! client's reconnect loop.
//!
//! A subscriber gets the full state first (`full_state`, applied
//! sync-then-swap) and then changes (upserts and removals by resource
//! key). Trust bundles ride along, so a gateway learns every peer's
//! roots from its own controller.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::common::v1 as pbc;
use isthmus_proto::config::v1 as pb;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::identity::{TrustBundle, TrustDomain, TrustStore};
use crate::model::istio::{self, DRY_RUN_ANNOTATION};
use crate::model::{
    AuthorizationPolicy, DestinationRule, Endpoint, EndpointGroup, ImportedService, LocalService,
    MeshState, PeerAuthentication, PeerGateway, RemoteCluster, ServicePort, VirtualService,
};
use crate::wire;

fn ports(p: &[ServicePort]) -> Vec<pb::Port> {
    p.iter()
        .map(|p| pb::Port {
            name: p.name.clone(),
            port: u32::from(p.port),
            target_port: u32::from(p.target_port),
            protocol: p.protocol.clone(),
            app_protocol: String::new(),
        })
        .collect()
}

fn unports(p: Vec<pb::Port>) -> Result<Vec<ServicePort>, String> {
    p.into_iter()
        .map(|p| {
            Ok(ServicePort {
                name: p.name,
                port: u16::try_from(p.port).map_err(|_| format!("port {} out of range", p.port))?,
                target_port: u16::try_from(p.target_port)
                    .map_err(|_| format!("target port {} out of range", p.target_port))?,
                protocol: p.protocol,
            })
        })
        .collect()
}

/// A resource's identity in the stream.
fn resource_key(r: &pb::Resource) -> Option<pb::ResourceKey> {
    use pb::resource::Resource as R;
    let (kind, namespace, name) = match r.resource.as_ref()? {
        R::LocalService(s) => (
            "LocalService".to_owned(),
            s.key.as_ref()?.namespace.clone(),
            s.key.as_ref()?.name.clone(),
        ),
        R::ImportedService(s) => (
            "ImportedService".to_owned(),
            s.key.as_ref()?.namespace.clone(),
            s.key.as_ref()?.name.clone(),
        ),
        R::Policy(p) => (
            format!("Policy/{}", p.kind),
            p.namespace.clone(),
            p.name.clone(),
        ),
        R::PeerGateway(g) => (
            "PeerGateway".to_owned(),
            String::new(),
            g.cluster_name.clone(),
        ),
        R::TrustBundle(b) => (
            "TrustBundle".to_owned(),
            String::new(),
            b.trust_domain.clone(),
        ),
    };
    Some(pb::ResourceKey {
        kind,
        namespace,
        name,
    })
}

/// The wire form of a mesh state and the bundles to distribute, keyed.
pub fn to_resources(
    state: &MeshState,
    bundles: &[TrustBundle],
) -> BTreeMap<(String, String, String), pb::Resource> {
    use pb::resource::Resource as R;
    let mut out = Vec::new();
    for s in state.local.values() {
        out.push(R::LocalService(pb::LocalService {
            key: Some(pbc::ServiceKey::from(&s.key)),
            ports: ports(&s.ports),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| pb::Endpoint {
                    address: e.address.to_string(),
                    ports: e
                        .ports
                        .iter()
                        .map(|(k, v)| (k.clone(), u32::from(*v)))
                        .collect(),
                    ready: e.ready,
                    locality: Some(pbc::Locality::from(&e.locality)),
                    labels: e.labels.clone().into_iter().collect(),
                    identity: String::new(),
                    workload: e.workload.clone(),
                })
                .collect(),
            exported_to: s.exported_to.iter().cloned().collect(),
        }));
    }
    for s in state.imported.values() {
        out.push(R::ImportedService(pb::ImportedService {
            key: Some(pbc::ServiceKey::from(&s.key)),
            ports: ports(&s.ports),
            clusters: s
                .clusters
                .iter()
                .map(|c| pb::RemoteCluster {
                    cluster_name: c.cluster.clone(),
                    locality: Some(pbc::Locality::from(&c.locality)),
                    healthy: c.groups.iter().map(|g| g.healthy).sum(),
                    total: c.groups.iter().map(|g| g.total).sum(),
                    groups: c
                        .groups
                        .iter()
                        .map(|g| pb::EndpointGroupRef {
                            locality: Some(pbc::Locality::from(&g.locality)),
                            labels: g.labels.clone().into_iter().collect(),
                            healthy: g.healthy,
                            total: g.total,
                        })
                        .collect(),
                    stale: c.stale,
                })
                .collect(),
        }));
    }
    for g in state.peers.values() {
        out.push(R::PeerGateway(pb::PeerGateway {
            cluster_name: g.cluster.clone(),
            trust_domain: g.trust_domain.to_string(),
            address: g.address.to_string(),
            locality: Some(pbc::Locality::from(&g.locality)),
        }));
    }
    let policy = |kind: &str, api: &str, ns: &str, name: &str, spec: &str| {
        R::Policy(pb::Policy {
            kind: kind.into(),
            api_version: api.into(),
            namespace: ns.into(),
            name: name.into(),
            spec_json: spec.as_bytes().to_vec(),
            generation: 0,
            annotations: Default::default(),
        })
    };
    for p in state.destination_rules.values() {
        let api = "networking.istio.io/v1";
        out.push(policy(
            "DestinationRule",
            api,
            &p.namespace,
            &p.name,
            &p.spec_json,
        ));
    }
    for p in state.virtual_services.values() {
        let api = "networking.istio.io/v1";
        out.push(policy(
            "VirtualService",
            api,
            &p.namespace,
            &p.name,
            &p.spec_json,
        ));
    }
    for p in state.peer_authentications.values() {
        let api = "security.istio.io/v1";
        out.push(policy(
            "PeerAuthentication",
            api,
            &p.namespace,
            &p.name,
            &p.spec_json,
        ));
    }
    for p in state.authorization_policies.values() {
        let api = "security.istio.io/v1";
        let mut r = policy(
            "AuthorizationPolicy",
            api,
            &p.namespace,
            &p.name,
            &p.spec_json,
        );
        if p.dry_run
            && let R::Policy(pol) = &mut r
        {
            pol.annotations
                .insert(DRY_RUN_ANNOTATION.into(), "true".into());
        }
        out.push(r);
    }
    for b in bundles {
        out.push(R::TrustBundle(pbc::TrustBundle::from(b)));
    }
    out.into_iter()
        .filter_map(|r| {
            let r = pb::Resource { resource: Some(r) };
            let k = resource_key(&r)?;
            Some(((k.kind, k.namespace, k.name), r))
        })
        .collect()
}

/// What a subscriber holds: resources by key.
pub type Held = BTreeMap<(String, String, String), pb::Resource>;

/// Applies an update to `held` (full state replaces it whole).
pub fn apply_update(held: &mut Held, update: pb::ConfigUpdate) {
    if update.full_state {
        held.clear();
    }
    for k in update.removals {
        held.remove(&(k.kind, k.namespace, k.name));
    }
    for r in update.upserts {
        if let Some(k) = resource_key(&r) {
            held.insert((k.kind, k.namespace, k.name), r);
        }
    }
}

/// The mesh state and trust bundles that `held` describes. Resources
/// that do not parse are skipped with a warning naming them.
pub fn to_state(held: &Held, version: u64) -> (MeshState, Vec<TrustBundle>) {
    use pb::resource::Resource as R;
    let mut state = MeshState {
        version,
        ..Default::default()
    };
    let mut bundles = Vec::new();
    for ((kind, ns, name), r) in held {
        let result: Result<(), String> = (|| {
            match r.resource.clone().ok_or("empty resource")? {
                R::LocalService(s) => {
                    let k = wire::service_key(s.key)?;
                    let mut endpoints = Vec::new();
                    for e in s.endpoints {
                        endpoints.push(Endpoint {
                            address: e
                                .address
                                .parse()
                                .map_err(|_| format!("endpoint address {:?}", e.address))?,
                            ports: e
                                .ports
                                .into_iter()
                                .map(|(k, v)| {
                                    Ok((k, u16::try_from(v).map_err(|_| format!("port {v}"))?))
                                })
                                .collect::<Result<_, String>>()?,
                            ready: e.ready,
                            locality: wire::locality(e.locality),
                            labels: e.labels.into_iter().collect(),
                            workload: e.workload,
                        });
                    }
                    state.local.insert(
                        k.clone(),
                        Arc::new(LocalService {
                            key: k,
                            ports: unports(s.ports)?,
                            endpoints,
                            exported_to: s.exported_to.into_iter().collect(),
                        }),
                    );
                }
                R::ImportedService(s) => {
                    let k = wire::service_key(s.key)?;
                    state.imported.insert(
                        k.clone(),
                        Arc::new(ImportedService {
                            key: k,
                            ports: unports(s.ports)?,
                            clusters: s
                                .clusters
                                .into_iter()
                                .map(|c| RemoteCluster {
                                    cluster: c.cluster_name,
                                    locality: wire::locality(c.locality),
                                    groups: c
                                        .groups
                                        .into_iter()
                                        .map(|g| EndpointGroup {
                                            locality: wire::locality(g.locality),
                                            labels: g.labels.into_iter().collect(),
                                            healthy: g.healthy,
                                            total: g.total,
                                        })
                                        .collect(),
                                    stale: c.stale,
                                })
                                .collect(),
                        }),
                    );
                }
                R::PeerGateway(g) => {
                    state.peers.insert(
                        g.cluster_name.clone(),
                        PeerGateway {
                            cluster: g.cluster_name,
                            trust_domain: TrustDomain::new(&g.trust_domain)
                                .map_err(|e| e.to_string())?,
                            address: g
                                .address
                                .parse()
                                .map_err(|_| format!("gateway address {:?}", g.address))?,
                            locality: wire::locality(g.locality),
                        },
                    );
                }
                R::Policy(p) if p.kind == "DestinationRule" => {
                    let spec: serde_json::Value =
                        serde_json::from_slice(&p.spec_json).map_err(|e| e.to_string())?;
                    let dr = DestinationRule::from_spec(&p.namespace, &p.name, &spec)
                        .map_err(|e| e.to_string())?;
                    state
                        .destination_rules
                        .insert(dr.service.clone(), Arc::new(dr));
                }
                R::Policy(p)
                    if p.kind == "AuthorizationPolicy" || p.kind == "PeerAuthentication" =>
                {
                    // Security policy is never skipped: one that cannot be
                    // read is kept in its strictest form (deny / STRICT).
                    let key = format!("{}/{}", p.namespace, p.name);
                    let ap = p.kind == "AuthorizationPolicy";
                    let problem = match serde_json::from_slice::<serde_json::Value>(&p.spec_json) {
                        Ok(spec) if ap => {
                            let annotations = p.annotations.into_iter().collect();
                            let (v, e) = AuthorizationPolicy::from_object(
                                &p.namespace,
                                &p.name,
                                &annotations,
                                &spec,
                            );
                            state.authorization_policies.insert(key, Arc::new(v));
                            e
                        }
                        Ok(spec) => {
                            let (v, e) =
                                PeerAuthentication::from_object(&p.namespace, &p.name, &spec);
                            state.peer_authentications.insert(key, Arc::new(v));
                            e
                        }
                        Err(json) => {
                            let kind = if ap {
                                "AuthorizationPolicy"
                            } else {
                                "PeerAuthentication"
                            };
                            let e = istio::err(
                                kind,
                                &p.namespace,
                                &p.name,
                                format!("the spec is not JSON: {json}"),
                            );
                            let raw = String::from_utf8_lossy(&p.spec_json).into_owned();
                            if ap {
                                let v = AuthorizationPolicy::strictest(None, &e, raw);
                                state.authorization_policies.insert(key, Arc::new(v));
                            } else {
                                let v = PeerAuthentication::strictest(None, &e, raw);
                                state.peer_authentications.insert(key, Arc::new(v));
                            }
                            Some(e)
                        }
                    };
                    if let Some(e) = problem {
                        warn!(error = %e, "security policy cannot be applied as written; enforcing its strictest form (AuthorizationPolicy: deny every request; PeerAuthentication: STRICT) until it is fixed");
                    }
                }
                R::Policy(p) => {
                    let spec: serde_json::Value =
                        serde_json::from_slice(&p.spec_json).map_err(|e| e.to_string())?;
                    let key = format!("{}/{}", p.namespace, p.name);
                    match p.kind.as_str() {
                        "VirtualService" => {
                            let v = VirtualService::from_spec(&p.namespace, &p.name, &spec)
                                .map_err(|e| e.to_string())?;
                            state.virtual_services.insert(key, Arc::new(v));
                        }
                        other => return Err(format!("unknown policy kind {other:?}")),
                    }
                }
                R::TrustBundle(b) => bundles.push(TrustBundle::try_from(b)?),
            }
            Ok(())
        })();
        if let Err(e) = result {
            warn!(resource.kind = %kind, resource.namespace = %ns, resource.name = %name, error = %e, "config resource skipped");
        }
    }
    (state, bundles)
}

/// Subscribes to the controller at `addr` until `stop` resolves: publishes
/// each complete state on `tx` and upserts received trust bundles into
/// `trust`. The controller's local port is TLS: `tls` checks it is this
/// cluster's controller (and presents the caller's certificate, if it has
/// one). Reconnects with backoff (200 ms doubling to 10 s); a
/// reconnect gets a full state again, applied sync-then-swap.
pub async fn subscribe_loop(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    node: pb::Node,
    tx: watch::Sender<Arc<MeshState>>,
    trust: Arc<TrustStore>,
    stop: impl Future<Output = ()>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let run = async {
        loop {
            let result = async {
                let channel = crate::tls::grpc_channel(addr.to_string(), tls.clone())?;
                let mut client = pb::mesh_config_client::MeshConfigClient::new(channel)
                    .max_decoding_message_size(64 * 1024 * 1024);
                let resume_version = tx.borrow().version;
                let mut stream = client
                    .subscribe(pb::SubscribeRequest {
                        node: Some(node.clone()),
                        resume_version,
                    })
                    .await
                    .map_err(|s| format!("subscribe: {}", s.message()))?
                    .into_inner();
                let mut held = Held::new();
                let mut got_full = false;
                loop {
                    let update = match stream.message().await {
                        Ok(Some(u)) => u,
                        Ok(None) => {
                            return Err::<(), String>("controller closed the stream".into());
                        }
                        Err(s) => return Err(format!("stream: {}", s.message())),
                    };
                    got_full |= update.full_state;
                    let version = update.version;
                    apply_update(&mut held, update);
                    if !got_full {
                        continue;
                    }
                    let (state, bundles) = to_state(&held, version);
                    for b in bundles {
                        if let Err(e) = trust.upsert(b) {
                            warn!(error = %e, "trust bundle from the controller is unusable");
                        }
                    }
                    tx.send_replace(Arc::new(state));
                    backoff.reset();
                }
            }
            .await;
            if let Err(e) = result {
                let wait = backoff.next_delay();
                warn!(controller = %addr, error = %e, retry_in = ?wait, "config stream down; keeping the last config");
                tokio::time::sleep(wait).await;
            }
        }
    };
    tokio::select! {
        _ = run => {}
        _ = stop => info!("config stream stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(kind: &str, spec: &[u8]) -> Held {
        let r = pb::Resource {
            resource: Some(pb::resource::Resource::Policy(pb::Policy {
                kind: kind.into(),
                api_version: "security.istio.io/v1".into(),
                namespace: "sample".into(),
                name: "p".into(),
                spec_json: spec.to_vec(),
                generation: 1,
                annotations: Default::default(),
            })),
        };
        Held::from([((format!("Policy/{kind}"), "sample".into(), "p".into()), r)])
    }

    #[test]
    fn security_policy_whose_spec_is_not_json_is_kept_strictest_with_the_reason() {
        let (s, _) = to_state(&policy("AuthorizationPolicy", b"{not json"), 1);
        let ap = &s.authorization_policies["sample/p"];
        assert!(ap.selector.is_none(), "the whole namespace");
        assert!(
            ap.unenforceable
                .as_deref()
                .is_some_and(|w| w.contains("the spec is not JSON")),
            "{ap:?}"
        );
        let (s, _) = to_state(&policy("PeerAuthentication", b"\xff"), 1);
        let pa = &s.peer_authentications["sample/p"];
        assert_eq!(
            pa.mode_for(8080),
            Some(crate::model::istio::MtlsMode::Strict)
        );
        assert!(
            pa.unenforceable
                .as_deref()
                .is_some_and(|w| w.contains("not JSON"))
        );
    }
}
