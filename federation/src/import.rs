//! From peers' catalogues to imported services, `ServiceEntry` objects,
//! and the files sink that writes them.
//!
//! Conflicts follow the MCS rules: among the clusters exporting a service
//! (this one included, if it exports it too), the oldest export defines
//! its ports; a cluster whose ports or protocols differ is left out of the
//! import and the conflict is reported (ServiceExport condition
//! `Conflict`; in files mode a status file and the admin API).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use isthmus_core::model::{ImportedService, Locality, RemoteCluster, ServiceKey, ServicePort};
use serde_json::json;

use crate::catalog::Export;

/// Label marking objects Isthmus owns (and may rewrite or delete).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "isthmus");

/// What one peer exports to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCatalog {
    pub cluster: String,
    pub locality: Locality,
    /// Its control plane is unreachable: entries kept, marked stale.
    pub stale: bool,
    pub exports: Arc<BTreeMap<ServiceKey, Arc<Export>>>,
}

/// A conflict between two clusters' exports of one service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    pub service: ServiceKey,
    /// The cluster whose (older) export defines the service.
    pub winner: String,
    /// The cluster left out.
    pub excluded: String,
    pub reason: String,
}

/// Imports computed from every peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imports {
    pub services: BTreeMap<ServiceKey, Arc<ImportedService>>,
    pub conflicts: Vec<Conflict>,
}

fn port_signature(ports: &[ServicePort]) -> BTreeSet<(u16, String)> {
    ports
        .iter()
        .map(|p| (p.port, p.protocol.to_ascii_uppercase()))
        .collect()
}

/// One cluster's export of a service: (cluster, export, the peer's
/// catalogue, or `None` for this cluster).
type Exporter<'a> = (&'a str, &'a Export, Option<&'a PeerCatalog>);

/// Merges the peers' catalogues. `local` is this cluster's own exports
/// (name, catalogue), which take part in conflict resolution but are not
/// imported.
pub fn merge(local: (&str, &BTreeMap<ServiceKey, Arc<Export>>), peers: &[PeerCatalog]) -> Imports {
    let mut by_service: BTreeMap<&ServiceKey, Vec<Exporter<'_>>> = BTreeMap::new();
    for (k, e) in local.1 {
        by_service.entry(k).or_default().push((local.0, e, None));
    }
    for p in peers {
        for (k, e) in p.exports.iter() {
            by_service
                .entry(k)
                .or_default()
                .push((&p.cluster, e, Some(p)));
        }
    }
    let mut out = Imports::default();
    for (key, mut exporters) in by_service {
        // Oldest export first; an unknown creation time sorts last; the
        // cluster name breaks ties so every controller agrees.
        exporters.sort_by(|a, b| {
            let ka = (a.1.created == 0, a.1.created, a.0);
            let kb = (b.1.created == 0, b.1.created, b.0);
            ka.cmp(&kb)
        });
        let (winner, reference, _) = exporters[0];
        let mut clusters = Vec::with_capacity(exporters.len());
        for (cluster, export, peer) in &exporters {
            // Equal ports (the usual case) need no signature.
            if export.ports != reference.ports
                && port_signature(&export.ports) != port_signature(&reference.ports)
            {
                out.conflicts.push(Conflict {
                    service: key.clone(),
                    winner: winner.to_owned(),
                    excluded: cluster.to_string(),
                    reason: format!(
                        "ports {:?} differ from {winner}'s older export {:?}",
                        port_signature(&export.ports),
                        port_signature(&reference.ports)
                    ),
                });
                continue;
            }
            if let Some(peer) = peer {
                clusters.push(RemoteCluster {
                    cluster: peer.cluster.clone(),
                    locality: peer.locality.clone(),
                    groups: export.groups.clone(),
                    stale: peer.stale,
                });
            }
        }
        if !clusters.is_empty() {
            out.services.insert(
                key.clone(),
                Arc::new(ImportedService {
                    key: key.clone(),
                    ports: reference.ports.clone(),
                    clusters,
                }),
            );
        }
    }
    out
}

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

/// What one sink pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkReport {
    pub written: Vec<String>,
    pub unchanged: usize,
    pub deleted: Vec<String>,
}

/// Writes ServiceEntries as YAML files under `<cluster dir>/isthmus-imports/`.
///
/// Files are compared with what this sink last wrote (kept in memory, so
/// a pass over 10,000 services reads nothing back) and with the file on
/// disk the first time. Writes are atomic renames without fsync: readers
/// never see half a file, and a crash only loses what the next run
/// rewrites anyway.
#[derive(Debug)]
pub struct FilesSink {
    dir: PathBuf,
    written: std::sync::Mutex<BTreeMap<String, String>>,
}

impl FilesSink {
    pub fn new(cluster_dir: &Path) -> Self {
        Self {
            dir: cluster_dir.join(crate::IMPORTS_DIR),
            written: Default::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the directory hold exactly `entries`: each written atomically
    /// and only if its content changed; files Isthmus wrote for services
    /// no longer imported are deleted (files without the ownership label
    /// are never touched).
    pub fn apply(&self, entries: &[serde_json::Value]) -> std::io::Result<SinkReport> {
        std::fs::create_dir_all(&self.dir)?;
        let mut report = SinkReport::default();
        let mut wanted = BTreeSet::new();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        for e in entries {
            let (file, text) = render(e)?;
            let path = self.dir.join(&file);
            wanted.insert(file.clone());
            let same = match written.get(&file) {
                Some(prev) => *prev == text,
                None => std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()),
            };
            if same {
                written.insert(file, text);
                report.unchanged += 1;
                continue;
            }
            isthmus_core::identity::write_atomic_with(&path, text.as_bytes(), false, false)?;
            written.insert(file.clone(), text);
            report.written.push(file);
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if wanted.contains(&file) || !file.ends_with(".yaml") {
                continue;
            }
            let owned = std::fs::read_to_string(entry.path())
                .map(|t| t.contains(&format!("{}: {}", MANAGED_BY.0, MANAGED_BY.1)))
                .unwrap_or(false);
            if owned {
                std::fs::remove_file(entry.path())?;
                written.remove(&file);
                report.deleted.push(file);
            }
        }
        Ok(report)
    }

    /// The incremental pass after a full [`apply`](Self::apply): writes
    /// `upserts` whose text changed and deletes the entries of `removed`
    /// (namespace, ServiceEntry name) that this sink wrote. Costs what
    /// changed, not what exists: one service moving among 10,000 renders
    /// and writes one file.
    pub fn update(
        &self,
        upserts: &[serde_json::Value],
        removed: &[(String, String)],
    ) -> std::io::Result<SinkReport> {
        std::fs::create_dir_all(&self.dir)?;
        let mut report = SinkReport::default();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        for e in upserts {
            let (file, text) = render(e)?;
            if written.get(&file) == Some(&text) {
                report.unchanged += 1;
                continue;
            }
            isthmus_core::identity::write_atomic_with(
                &self.dir.join(&file),
                text.as_bytes(),
                false,
                false,
            )?;
            written.insert(file.clone(), text);
            report.written.push(file);
        }
        for (ns, name) in removed {
            let file = file_name(ns, name);
            if !written.contains_key(&file) {
                continue;
            }
            // Forgotten only once gone: a failed delete is retried.
            match std::fs::remove_file(self.dir.join(&file)) {
                Ok(()) => report.deleted.push(file.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            written.remove(&file);
        }
        Ok(report)
    }
}

/// A ServiceEntry's file name and text.
fn render(e: &serde_json::Value) -> std::io::Result<(String, String)> {
    let ns = e["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = e["metadata"]["name"].as_str().unwrap_or("unnamed");
    let text = format!(
        "# Written by Isthmus; edits are overwritten. Delete the ServiceExport in the\n# exporting cluster to withdraw it.\n{}",
        serde_saphyr::to_string(e).map_err(std::io::Error::other)?
    );
    Ok((file_name(ns, name), text))
}

/// The file a ServiceEntry is written to.
fn file_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}.yaml")
}

/// Reads back the ServiceEntries a previous run wrote, as each exporting
/// cluster's catalogue (ports, locality, weight as healthy count). A
/// restarted controller starts from these, marked stale, so it neither
/// loses imports nor rewrites files before peers have re-synced; a peer
/// that never comes back is withdrawn after the lease as usual.
pub fn seed(sink: &FilesSink) -> BTreeMap<String, (Locality, BTreeMap<ServiceKey, Arc<Export>>)> {
    let mut out: BTreeMap<String, (Locality, BTreeMap<ServiceKey, Arc<Export>>)> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(sink.dir()) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !text.contains(&format!("{}: {}", MANAGED_BY.0, MANAGED_BY.1)) {
            continue;
        }
        let Ok(se) = serde_saphyr::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let Some((key, _)) = se["spec"]["hosts"][0]
            .as_str()
            .and_then(ServiceKey::from_host)
        else {
            continue;
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
    out
}
