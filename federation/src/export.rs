//! A service as this cluster exports it to peers, and its federation
//! wire form: the conversions between the protocol's messages and the
//! model, written once (the session and the catalogue both use them).

use std::sync::Arc;

use isthmus_core::model::{EndpointGroup, ServiceKey, ServicePort};
use isthmus_core::wire;
use isthmus_proto::common::v1 as pbc;
use isthmus_proto::federation::v1 as pb;

/// A service as exported to peers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Export {
    pub key: ServiceKey,
    pub ports: Vec<ServicePort>,
    pub groups: Arc<[EndpointGroup]>,
    /// The ServiceExport's creationTimestamp in Unix seconds (0: unknown):
    /// the oldest export wins a conflict. Seconds, not the RFC 3339 text,
    /// so offsets compare right and nothing is parsed per snapshot.
    pub created: i64,
    /// The export encoded for the federation protocol, made once (or kept
    /// as received) and shared by every snapshot and delta that sends it.
    #[serde(skip)]
    pub encoded: std::sync::OnceLock<prost::bytes::Bytes>,
}

impl PartialEq for Export {
    fn eq(&self, other: &Self) -> bool {
        // The encoding follows from the rest.
        self.key == other.key
            && self.ports == other.ports
            && self.groups == other.groups
            && self.created == other.created
    }
}

impl Eq for Export {}

impl Export {
    /// The encoded `ExportedService`.
    pub fn encoded(&self) -> prost::bytes::Bytes {
        self.encoded
            .get_or_init(|| prost::Message::encode_to_vec(&export_to_pb(self)).into())
            .clone()
    }
}

pub fn export_to_pb(e: &Export) -> pb::ExportedService {
    pb::ExportedService {
        key: Some(pbc::ServiceKey::from(&e.key)),
        ports: e
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name.clone(),
                port: u32::from(p.port),
                protocol: p.protocol.clone(),
                app_protocol: String::new(),
            })
            .collect(),
        endpoints: e
            .groups
            .iter()
            .map(|g| pb::EndpointGroup {
                locality: Some(pbc::Locality::from(&g.locality)),
                labels: g.labels.clone().into_iter().collect(),
                healthy: g.healthy,
                total: g.total,
            })
            .collect(),
        export_created_unix: e.created,
    }
}

/// An export from its encoding (kept, to pass on unchanged).
pub fn export_from_bytes(encoded: prost::bytes::Bytes) -> Result<Export, String> {
    use prost::Message as _;
    let s = pb::ExportedService::decode(encoded.clone())
        .map_err(|e| format!("undecodable service: {e}"))?;
    let e = export_from_pb(s)?;
    let _ = e.encoded.set(encoded);
    Ok(e)
}

pub fn export_from_pb(s: pb::ExportedService) -> Result<Export, String> {
    let key = wire::service_key(s.key)?;
    let mut ports = Vec::new();
    for p in s.ports {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{key}: port {} out of range", p.port))?;
        ports.push(ServicePort {
            name: p.name,
            port,
            target_port: port,
            protocol: p.protocol,
        });
    }
    let groups = s
        .endpoints
        .into_iter()
        .map(|g| EndpointGroup {
            locality: wire::locality(g.locality),
            labels: g.labels.into_iter().collect(),
            healthy: g.healthy.min(g.total),
            total: g.total,
        })
        .collect();
    Ok(Export {
        key,
        ports,
        groups,
        created: s.export_created_unix.max(0),
        encoded: Default::default(),
    })
}
