//! `kind: Controller` configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use isthmus_core::config::{
    AdminSection, ClusterName, ClusterSection, FieldError, FromConfig, Reader, check_kind,
};
use isthmus_core::identity::TrustDomain;

/// Default federation listener (peer controllers, mTLS).
pub const DEFAULT_FEDERATION_ADDR: &str = "0.0.0.0:15012";
/// Default local listener (sidecars and gateway: config stream, CA).
pub const DEFAULT_LOCAL_ADDR: &str = "0.0.0.0:15010";
/// Default dashboard listener.
pub const DEFAULT_DASHBOARD_ADDR: &str = "0.0.0.0:15080";
/// How long a peer's catalogue is kept (marked stale) after its control
/// plane becomes unreachable, before it is withdrawn.
pub const DEFAULT_STALE_LEASE: Duration = Duration::from_secs(300);

/// Where a controller reading the Kubernetes API keeps link tokens and
/// linked peers unless `stateDir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/isthmus";

/// The controller's namespace: the pod's (`POD_NAMESPACE`, from the
/// downward API), else `isthmus-system`.
fn default_namespace() -> String {
    std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "isthmus-system".into())
}

impl Default for KubeSource {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            context: None,
            namespace: default_namespace(),
            leader_election: crate::leader::LeaseConfig::default(),
            gateway_service_account: DEFAULT_GATEWAY_SA
                .split_once('/')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .unwrap_or_default(),
            watch: WatchSelection::default(),
        }
    }
}

/// The gateway's ServiceAccount unless `source.kube.gatewayServiceAccount`
/// says otherwise.
pub const DEFAULT_GATEWAY_SA: &str = "isthmus-system/isthmus-gateway";

/// Default heartbeat interval on federation streams; a peer silent for
/// three intervals is disconnected, and marked stale after two.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// A linked peer cluster (written by `isthmus link apply`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerConfig {
    pub name: ClusterName,
    /// The peer controller's federation address (host:port).
    pub address: String,
    pub trust_domain: TrustDomain,
    /// PEM file with the peer's trust bundle (roots), if known; the
    /// federation stream refreshes it.
    pub trust_bundle: Option<PathBuf>,
    /// What this peer may see of our exports.
    pub export_to: crate::catalog::ExportPolicy,
}

/// Where the controller reads its cluster from (`source:`), and so where
/// it writes its imports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceConfig {
    /// `source: {files: DIR}`: a directory of Kubernetes YAML, watched;
    /// imports are written as ServiceEntry files under
    /// `DIR/isthmus-imports/`. (`sourceDir: DIR` is the older spelling.)
    Files { dir: PathBuf },
    /// `source: {kube: {...}}`: the cluster's Kubernetes API; imports are
    /// written there as ServiceEntry objects by server-side apply.
    Kube(KubeSource),
}

/// How to reach the Kubernetes API (`source.kube`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeSource {
    /// A kubeconfig file; without it, the in-cluster configuration (the
    /// pod's ServiceAccount), else `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    pub context: Option<String>,
    /// The controller's own namespace: its Lease, its link tokens and
    /// peers (Secrets), its published link details (ConfigMap
    /// `isthmus-cluster`). Default: `POD_NAMESPACE`, else
    /// `isthmus-system`.
    pub namespace: String,
    /// The Lease that elects the one replica that writes
    /// (`leaderElection: {namespace, name, leaseDuration}`).
    pub leader_election: crate::leader::LeaseConfig,
    /// The gateway's ServiceAccount (namespace, name): the CA gives its
    /// token the cluster's gateway identity (`gatewayServiceAccount:
    /// isthmus-system/isthmus-gateway`, the default).
    pub gateway_service_account: (String, String),
    /// What is read (`namespaces`, `labelSelector`).
    pub watch: WatchSelection,
}

/// Limits on what the kube source reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WatchSelection {
    /// Only these namespaces (`namespaces: [a, b]`; empty: all). Each
    /// namespaced kind is watched per namespace, so a Role in each is
    /// enough to read. Nodes are always read cluster-wide.
    pub namespaces: Vec<String>,
    /// Only Services, ServiceExports and Istio policies with these labels
    /// (`labelSelector: "mesh=isthmus"`, Kubernetes selector syntax, the
    /// API server filters). An object it hides is as if absent: a
    /// ServiceExport whose Service is hidden reports `NoService`.
    /// EndpointSlices and Pods are selected through their Service.
    pub label_selector: Option<String>,
}

/// The controller's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ControllerConfig {
    pub cluster: ClusterSection,
    /// Directory of the cluster CA (`isthmus ca cluster` output).
    pub ca_dir: PathBuf,
    pub source: SourceConfig,
    pub federation_addr: SocketAddr,
    pub local_addr: SocketAddr,
    pub dashboard_addr: SocketAddr,
    /// Where peers reach this cluster's gateway (host:port).
    pub gateway_address: String,
    /// Where peers reach this controller (host:port); defaults to the
    /// federation listen address when that is not 0.0.0.0 / [::].
    pub advertise_address: Option<String>,
    /// Where the controller keeps link tokens and linked peers.
    pub state_dir: PathBuf,
    /// Bootstrap tokens for the CA service (`<token> <ns>/<sa>` or
    /// `<token> gateway` per line); without it the CA service is off.
    pub ca_tokens: Option<PathBuf>,
    pub stale_lease: Duration,
    pub heartbeat: Duration,
    pub peers: Vec<PeerConfig>,
    pub admin: AdminSection,
}

impl ControllerConfig {
    /// The address peers dial, if one is known.
    pub fn advertised(&self) -> Option<String> {
        self.advertise_address.clone().or_else(|| {
            (!self.federation_addr.ip().is_unspecified() && self.federation_addr.port() != 0)
                .then(|| self.federation_addr.to_string())
        })
    }
}

impl FromConfig for ControllerConfig {
    fn read(r: &Reader<'_>) -> Option<Self> {
        check_kind(r, "Controller");
        let cluster = r.section::<ClusterSection>("cluster");
        let ca_dir = r.required("caDir");
        let src = r.object("source");
        let files: Option<PathBuf> = src.optional("files");
        let kube = src.has("kube").then(|| {
            let k = src.object("kube");
            let defaults = crate::leader::LeaseConfig::default();
            let namespace: String = k.or("namespace", default_namespace());
            let le = k.object("leaderElection");
            let leader_election = crate::leader::LeaseConfig {
                name: le.or("name", defaults.name),
                lease_duration: le.or("leaseDuration", defaults.lease_duration),
            };
            le.finish();
            let gw: String = k.or("gatewayServiceAccount", DEFAULT_GATEWAY_SA.to_owned());
            let gateway_service_account = match gw.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => {
                    (ns.to_owned(), sa.to_owned())
                }
                _ => {
                    k.error(
                        "gatewayServiceAccount",
                        format!("{gw:?} is not namespace/name"),
                        format!("write it as namespace/name, e.g. {DEFAULT_GATEWAY_SA}"),
                    );
                    Default::default()
                }
            };
            let namespaces: Vec<String> = k.or("namespaces", Vec::new());
            for ns in &namespaces {
                if isthmus_core::identity::spiffe::validate_cluster_name(ns).is_err() {
                    k.error(
                        "namespaces",
                        format!("{ns:?} is not a namespace name"),
                        "write namespace names (lowercase letters, digits and '-')",
                    );
                }
            }
            let label_selector: Option<String> = k.optional("labelSelector");
            if label_selector
                .as_deref()
                .is_some_and(|l| l.trim().is_empty())
            {
                k.error(
                    "labelSelector",
                    "empty label selector",
                    "remove it to read every object, or write one such as mesh=isthmus",
                );
            }
            let out = KubeSource {
                kubeconfig: k.optional("kubeconfig"),
                context: k.optional("context"),
                namespace,
                leader_election,
                gateway_service_account,
                watch: WatchSelection {
                    namespaces,
                    label_selector,
                },
            };
            k.finish();
            out
        });
        src.finish();
        let short: Option<PathBuf> = r.optional("sourceDir");
        let source = match (files, short, kube) {
            (Some(d), None, None) | (None, Some(d), None) => Some(SourceConfig::Files { dir: d }),
            (None, None, Some(k)) => Some(SourceConfig::Kube(k)),
            (Some(_), Some(_), _) => {
                r.error(
                    "sourceDir",
                    "both source.files and sourceDir are set",
                    "keep source.files (sourceDir is its older spelling)",
                );
                None
            }
            (_, _, Some(_)) => {
                r.error(
                    "source",
                    "both a files directory and kube are set",
                    "keep one: source: {kube: {}} for a Kubernetes cluster, source: {files: DIR} for manifests in a directory",
                );
                None
            }
            (None, None, None) => {
                r.error(
                    "source",
                    "is missing: the controller must read its cluster from somewhere",
                    "set source: {kube: {}} (the cluster's API) or source: {files: <directory of the cluster's manifests>}",
                );
                None
            }
        };
        let listen = r.object("listen");
        let federation_addr = listen.or(
            "federation",
            DEFAULT_FEDERATION_ADDR.parse().expect("default"),
        );
        let local_addr = listen.or("local", DEFAULT_LOCAL_ADDR.parse().expect("default"));
        let dashboard_addr = listen.or(
            "dashboard",
            DEFAULT_DASHBOARD_ADDR.parse().expect("default"),
        );
        listen.finish();
        let gateway_address = r.required("gatewayAddress");
        let advertise_address = r.optional("advertiseAddress");
        let state_dir: Option<PathBuf> = r.optional("stateDir");
        let ca_tokens = r.optional("caTokens");
        let stale_lease = r.or("staleLease", DEFAULT_STALE_LEASE);
        let heartbeat = r.or("heartbeatInterval", DEFAULT_HEARTBEAT);
        let peers: Vec<Option<PeerConfig>> = r
            .list("peers")
            .iter()
            .map(|p| {
                let (name, address, trust_domain) = (
                    p.required("name"),
                    p.required("address"),
                    p.required("trustDomain"),
                );
                let trust_bundle = p.optional("trustBundle");
                let e = p.object("exportTo");
                let namespaces: Vec<String> = e.or("namespaces", Vec::new());
                let services: Vec<String> = e.or("services", Vec::new());
                let mut policy = crate::catalog::ExportPolicy {
                    namespaces: namespaces.into_iter().collect(),
                    ..Default::default()
                };
                for s in services {
                    match s.split_once('/') {
                        Some((ns, n)) if !ns.is_empty() && !n.is_empty() => {
                            policy
                                .services
                                .insert(isthmus_core::model::ServiceKey::new(ns, n));
                        }
                        _ => e.error(
                            "services",
                            format!("{s:?} is not namespace/name"),
                            "write services as namespace/name, e.g. sample/helloworld",
                        ),
                    }
                }
                e.finish();
                p.finish();
                Some(PeerConfig {
                    name: name?,
                    address: address?,
                    trust_domain: trust_domain?,
                    trust_bundle,
                    export_to: policy,
                })
            })
            .collect();
        let admin = r.section::<AdminSection>("admin");
        Some(Self {
            cluster: cluster?,
            ca_dir: ca_dir?,
            state_dir: state_dir.unwrap_or_else(|| match &source {
                Some(SourceConfig::Files { dir }) => dir.join(".isthmus"),
                _ => PathBuf::from(DEFAULT_STATE_DIR),
            }),
            source: source?,
            federation_addr,
            local_addr,
            dashboard_addr,
            gateway_address: gateway_address?,
            advertise_address,
            ca_tokens,
            stale_lease,
            heartbeat,
            peers: peers.into_iter().collect::<Option<_>>()?,
            admin: admin?,
        })
    }

    fn validate(&self, errors: &mut Vec<FieldError>) {
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.name == self.cluster.name {
                errors.push(FieldError {
                    path: format!("peers[{i}].name"),
                    message: format!("peer {} has this cluster's own name", p.name),
                    fix: "cluster names must be unique across the mesh; remove this peer".into(),
                });
            }
            if !names.insert(&p.name) {
                errors.push(FieldError {
                    path: format!("peers[{i}].name"),
                    message: format!("peer {} is listed twice", p.name),
                    fix: "keep one entry per peer".into(),
                });
            }
        }
        if self.heartbeat < Duration::from_millis(50) || self.heartbeat * 3 > self.stale_lease {
            errors.push(FieldError {
                path: "heartbeatInterval".into(),
                message: format!(
                    "{:?} must be at least 50ms and a third of staleLease at most",
                    self.heartbeat
                ),
                fix: "use e.g. 1s (the default)".into(),
            });
        }
        if self.stale_lease < Duration::from_secs(1) {
            errors.push(FieldError {
                path: "staleLease".into(),
                message: "a lease under 1s withdraws services on the first missed heartbeat".into(),
                fix: "use at least 1s (default 5m)".into(),
            });
        }
    }
}
