//! From peers' catalogues to imported services: the merge (a pure
//! function of the local exports and the peers' catalogues). Writing the
//! imports into the cluster is a [`crate::sink::Sink`]'s.
//!
//! Conflicts follow the MCS rules: among the clusters exporting a service
//! (this one included, if it exports it too), the oldest export defines
//! its ports; a cluster whose ports or protocols differ is left out of the
//! import and the conflict is reported (ServiceExport condition
//! `Conflict`; in files mode a status file and the admin API).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use isthmus_core::model::{ImportedService, Locality, RemoteCluster, ServiceKey, ServicePort};

use crate::export::Export;

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
