//! The mesh as every Isthmus binary sees it: services, endpoints,
//! localities, imports from peers, peer gateways, and the parts of Istio's
//! policy API the data path needs.
//!
//! Wire types (protobuf, Kubernetes YAML) are converted into these once,
//! at the boundary; the data path only ever reads an immutable
//! `Arc<MeshState>` from a `watch` channel, swapped whole on each update.

pub mod istio;
pub mod problem;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::identity::TrustDomain;

pub use istio::{
    AuthorizationPolicy, ConnectionPool, DestinationRule, LocalityLbSetting, OutlierDetection,
    PeerAuthentication, VirtualService,
};

/// Where something runs (Kubernetes node labels). Empty means unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    pub fn new(region: &str, zone: &str) -> Self {
        Self {
            region: region.into(),
            zone: zone.into(),
            subzone: String::new(),
        }
    }

    /// Whether this locality matches a DestinationRule locality pattern
    /// (`region/zone/subzone`), as Istio matches them: each part given
    /// must be equal or `*`; parts left out match anything (`us-west1`
    /// and `us-west1/*` both mean the whole region).
    pub fn matches(&self, pattern: &str) -> bool {
        let parts = [&self.region, &self.zone, &self.subzone];
        pattern
            .split('/')
            .zip(parts)
            .all(|(p, v)| p == "*" || p == v.as_str())
    }
}

impl fmt::Display for Locality {
    /// Istio's `region/zone/subzone` form, trailing parts omitted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [&self.region, &self.zone, &self.subzone];
        let n = parts
            .iter()
            .rposition(|p| !p.is_empty())
            .map_or(0, |i| i + 1);
        let joined: Vec<&str> = parts[..n].iter().map(|s| s.as_str()).collect();
        f.write_str(&joined.join("/"))
    }
}

/// A Service by namespace and name. Serializes as `namespace/name` (so it
/// can key JSON maps in config dumps).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

/// Which endpoints a host name means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `<svc>.<ns>.svc.cluster.local`: local endpoints first, remote
    /// clusters as failover.
    Local,
    /// `<svc>.<ns>.svc.clusterset.local`: every cluster by locality and
    /// weight.
    ClusterSet,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `<name>.<ns>.svc.cluster.local`
    pub fn local_host(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// `<name>.<ns>.svc.clusterset.local`
    pub fn clusterset_host(&self) -> String {
        format!("{}.{}.svc.clusterset.local", self.name, self.namespace)
    }

    /// Parses a fully qualified service host name.
    pub fn from_host(host: &str) -> Option<(Self, Scope)> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let (rest, scope) = if let Some(r) = host.strip_suffix(".svc.cluster.local") {
            (r, Scope::Local)
        } else if let Some(r) = host.strip_suffix(".svc.clusterset.local") {
            (r, Scope::ClusterSet)
        } else {
            return None;
        };
        let (name, ns) = rest.split_once('.')?;
        (is_dns_label(name) && is_dns_label(ns)).then(|| (Self::new(ns, name), scope))
    }
}

/// Whether `s` is a DNS label as Kubernetes names namespaces and Services
/// (lower-case letters, digits and `-`, 1 to 63 bytes).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl serde::Serialize for ServiceKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    /// Port on the endpoints, unless an endpoint names its own.
    pub target_port: u16,
    pub protocol: String,
}

/// One endpoint of a local Service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Ports by service port name (EndpointSlice ports); otherwise the
    /// service's target port applies.
    pub ports: BTreeMap<String, u16>,
    pub ready: bool,
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
    /// Pod or instance name, for logs and metrics.
    pub workload: String,
}

impl Endpoint {
    /// The socket address serving `port` of the service.
    pub fn target(&self, port: &ServicePort) -> SocketAddr {
        let p = self
            .ports
            .get(&port.name)
            .copied()
            .unwrap_or(port.target_port);
        SocketAddr::new(self.address, p)
    }

    /// Whether every `selector` label matches.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// A Service of this cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LocalService {
    pub key: ServiceKey,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// Peer clusters this service is exported to.
    pub exported_to: BTreeSet<String>,
}

impl LocalService {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// Endpoints of a remote service sharing labels and locality, counted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EndpointGroup {
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
    pub healthy: u32,
    pub total: u32,
}

/// One peer cluster exporting an imported service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RemoteCluster {
    pub cluster: String,
    pub locality: Locality,
    /// Shared with the catalogue it came from: merging 10,000 services
    /// from ten peers copies pointers, not endpoint groups.
    pub groups: Arc<[EndpointGroup]>,
    /// The peer's control plane is unreachable: kept, not refreshed.
    pub stale: bool,
}

impl RemoteCluster {
    /// Healthy endpoints matching `subset` labels (all when empty).
    pub fn healthy(&self, subset: &BTreeMap<String, String>) -> u32 {
        self.groups
            .iter()
            .filter(|g| subset.iter().all(|(k, v)| g.labels.get(k) == Some(v)))
            .map(|g| g.healthy)
            .sum()
    }
}

/// A service imported from peers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportedService {
    pub key: ServiceKey,
    pub ports: Vec<ServicePort>,
    pub clusters: Vec<RemoteCluster>,
}

/// A peer cluster's east-west gateway.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerGateway {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    /// QUIC address of the gateway.
    pub address: SocketAddr,
    pub locality: Locality,
}

/// Everything the data path needs, immutable; replaced whole on change.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MeshState {
    /// Increases with every update.
    pub version: u64,
    pub local: BTreeMap<ServiceKey, Arc<LocalService>>,
    pub imported: BTreeMap<ServiceKey, Arc<ImportedService>>,
    pub peers: BTreeMap<String, PeerGateway>,
    /// DestinationRules by the service their host names.
    pub destination_rules: BTreeMap<ServiceKey, Arc<DestinationRule>>,
    /// VirtualServices by `namespace/name`.
    pub virtual_services: BTreeMap<String, Arc<VirtualService>>,
    /// PeerAuthentications by `namespace/name`.
    pub peer_authentications: BTreeMap<String, Arc<PeerAuthentication>>,
    /// AuthorizationPolicies by `namespace/name`.
    pub authorization_policies: BTreeMap<String, Arc<AuthorizationPolicy>>,
}

impl MeshState {
    /// Whether the parts sent to proxies differ (the version aside).
    pub fn same_content(&self, other: &MeshState) -> bool {
        self.local == other.local
            && self.imported == other.imported
            && self.peers == other.peers
            && self.destination_rules == other.destination_rules
            && self.virtual_services == other.virtual_services
            && self.peer_authentications == other.peer_authentications
            && self.authorization_policies == other.authorization_policies
    }
}

#[cfg(test)]
mod locality_tests {
    use super::Locality;

    #[test]
    fn locality_patterns_match_as_in_istio() {
        let l = Locality {
            region: "us-west1".into(),
            zone: "us-west1-a".into(),
            subzone: "rack-3".into(),
        };
        for p in [
            "us-west1",
            "us-west1/*",
            "*",
            "us-west1/us-west1-a",
            "us-west1/us-west1-a/*",
            "*/us-west1-a",
            "us-west1/*/rack-3",
            "us-west1/us-west1-a/rack-3",
        ] {
            assert!(l.matches(p), "{p}");
        }
        for p in [
            "us-east1",
            "us-east1/*",
            "us-west1/us-west1-b",
            "*/us-west1-b",
            "us-west1/us-west1-a/rack-4",
            "",
        ] {
            assert!(!l.matches(p), "{p}");
        }
        // A locality with no zone: a pattern naming one does not match.
        assert!(!Locality::new("eu", "").matches("eu/eu-1"));
        assert!(Locality::new("eu", "").matches("eu/*"));
    }
}
