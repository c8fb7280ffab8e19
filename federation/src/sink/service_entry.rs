//! Rendering imports as Istio `ServiceEntry` objects
//! (`networking.istio.io/v1`), and reading back the ones a previous run
//! wrote. No I/O here: sinks write what this renders.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_core::model::{ImportedService, Locality, ServiceKey, ServicePort};
use serde_json::json;

use crate::export::Export;

/// Label marking objects Isthmus owns (and may rewrite or delete).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "isthmus");

/// What a previous run imported, by exporting cluster: its locality and
/// its services.
pub type Seed = BTreeMap<String, (Locality, BTreeMap<ServiceKey, Arc<Export>>)>;

/// The `ServiceEntry` (`networking.istio.io/v1`) for an imported service:
/// host `<name>.<ns>.svc.clusterset.local`, one endpoint per exporting
/// cluster at the local gateway, with that cluster's locality and its
/// healthy endpoint count as weight.
pub fn service_entry_name(key: &ServiceKey) -> String {
    format!("{}-clusterset", key.name)
}

/// The ServiceEntry for one imported service (see [`service_entry_name`]):
pub fn service_entry(svc: &ImportedService, gateway: SocketAddr) -> serde_json::Value {
    let ports: Vec<_> = svc
        .ports
        .iter()
        .map(|p| {
            let name = if p.name.is_empty() { format!("port-{}", p.port) } else { p.name.clone() };
            json!({"number": p.port, "name": name, "protocol": if p.protocol.eq_ignore_ascii_case("UDP") { "UDP" } else { "TLS" }})
        })
        .collect();
    let endpoints: Vec<_> = svc
        .clusters
        .iter()
        .map(|c| {
            let port_map: serde_json::Map<String, serde_json::Value> = svc
                .ports
                .iter()
                .map(|p| {
                    let name = if p.name.is_empty() {
                        format!("port-{}", p.port)
                    } else {
                        p.name.clone()
                    };
                    (name, json!(gateway.port()))
                })
                .collect();
            let healthy: u32 = c.groups.iter().map(|g| g.healthy).sum();
            let mut labels = serde_json::Map::new();
            labels.insert("topology.istio.io/cluster".into(), json!(c.cluster));
            if c.stale {
                labels.insert("isthmus.io/stale".into(), json!("true"));
            }
            json!({
                "address": gateway.ip().to_string(),
                "ports": port_map,
                "locality": c.locality.to_string(),
                // Istio requires weight ≥ 1 when set; a cluster with no
                // healthy endpoint keeps weight 1 but the gateway skips it.
                "weight": healthy.max(1),
                "labels": labels,
            })
        })
        .collect();
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {
            "name": service_entry_name(&svc.key),
            "namespace": svc.key.namespace,
            "labels": {
                MANAGED_BY.0: MANAGED_BY.1,
                "isthmus.io/service": svc.key.name,
            },
        },
        "spec": {
            "hosts": [svc.key.clusterset_host()],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": ports,
            "endpoints": endpoints,
        }
    })
}

/// The MCS `ServiceImport` for an imported service (kube mode), for tools
/// that read the Multi-Cluster Services API: same name and namespace as
/// the service, type `ClusterSetIP`, its ports; and its status, the
/// clusters that export it. `api_version` is the served
/// `multicluster.x-k8s.io` version.
pub fn service_import(
    svc: &ImportedService,
    api_version: &str,
) -> (serde_json::Value, serde_json::Value) {
    let ports: Vec<_> = svc
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({"port": p.port, "protocol": if p.protocol.eq_ignore_ascii_case("UDP") { "UDP" } else { "TCP" }});
            if !p.name.is_empty() {
                port["name"] = json!(p.name);
            }
            port
        })
        .collect();
    let meta = json!({
        "name": svc.key.name,
        "namespace": svc.key.namespace,
        "labels": {MANAGED_BY.0: MANAGED_BY.1},
    });
    let object = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "metadata": meta,
        "spec": {"type": "ClusterSetIP", "ports": ports},
    });
    let clusters: Vec<_> = svc
        .clusters
        .iter()
        .map(|c| json!({"cluster": c.cluster}))
        .collect();
    let status = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "metadata": {"name": svc.key.name, "namespace": svc.key.namespace},
        "status": {"clusters": clusters},
    });
    (object, status)
}

/// Adds what one ServiceEntry Isthmus wrote says to `out`: for each
/// exporting cluster it names, the service with its ports, locality and
/// weight (as healthy count). Anything else is skipped.
pub fn read_back(se: &serde_json::Value, out: &mut Seed) {
    let Some((key, _)) = se["spec"]["hosts"][0]
        .as_str()
        .and_then(ServiceKey::from_host)
    else {
        return;
    };
    let ports: Vec<ServicePort> = se["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let port = u16::try_from(p["number"].as_u64()?).ok()?;
            Some(ServicePort {
                name: p["name"].as_str().unwrap_or("").to_owned(),
                port,
                target_port: port,
                protocol: if p["protocol"] == "UDP" {
                    "UDP".into()
                } else {
                    "TCP".into()
                },
            })
        })
        .collect();
    for ep in se["spec"]["endpoints"].as_array().into_iter().flatten() {
        let Some(cluster) = ep["labels"]["topology.istio.io/cluster"].as_str() else {
            continue;
        };
        let mut parts = ep["locality"].as_str().unwrap_or("").split('/');
        let locality = Locality {
            region: parts.next().unwrap_or("").to_owned(),
            zone: parts.next().unwrap_or("").to_owned(),
            subzone: parts.next().unwrap_or("").to_owned(),
        };
        let weight = ep["weight"].as_u64().unwrap_or(1) as u32;
        let slot = out
            .entry(cluster.to_owned())
            .or_insert_with(|| (locality.clone(), BTreeMap::new()));
        slot.1.insert(
            key.clone(),
            Arc::new(Export {
                key: key.clone(),
                ports: ports.clone(),
                groups: Arc::from([isthmus_core::model::EndpointGroup {
                    locality: locality.clone(),
                    labels: Default::default(),
                    healthy: weight,
                    total: weight,
                }]),
                created: 0,
                encoded: Default::default(),
            }),
        );
    }
}
