//! (feature `testing`) Controllers on loopback for tests: each cluster
//! with its own trust domain, CA, manifest directory and federation port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::config::{AdminSection, ClusterName, ClusterSection};
use isthmus_core::identity::{ClusterCa, SpiffeId, TrustBundle, TrustStore};
use isthmus_core::model::Locality;
use isthmus_core::testing::{TestDomain, leaf};

use crate::app::{Bound, Deps, build};
use crate::catalog::ExportPolicy;
use crate::config::{ControllerConfig, PeerConfig};

/// One cluster of a test mesh.
#[derive(Debug)]
pub struct TestCluster {
    pub name: String,
    pub locality: Locality,
    pub domain: TestDomain,
    pub ca: Arc<ClusterCa>,
    pub dir: PathBuf,
    pub federation: SocketAddr,
}

pub use isthmus_e2e::kit::{free_port, unused_port};

impl TestCluster {
    pub fn new(root: &Path, name: &str, region: &str) -> Self {
        let domain = TestDomain::new(&format!("{name}.local"));
        let ca = domain.cluster(name);
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            name: name.into(),
            locality: Locality::new(region, &format!("{region}-a")),
            domain,
            ca,
            dir,
            federation: free_port(),
        }
    }

    pub fn bundle(&self) -> TrustBundle {
        self.domain.bundle()
    }

    /// TLS to this cluster's controller's local port, as a sidecar or
    /// gateway does (`certs`: the caller's certificate, if it has one).
    pub fn local_tls(
        &self,
        certs: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
    ) -> rustls::ClientConfig {
        isthmus_core::tls::client_config(
            certs,
            isthmus_core::identity::TrustStore::with_bundles([self.bundle()]).unwrap(),
            isthmus_core::identity::verify::Expect::Exactly(self.controller_id()),
            &[b"h2"],
        )
    }

    pub fn controller_id(&self) -> SpiffeId {
        SpiffeId::controller(&self.domain.td, &self.name).unwrap()
    }

    /// Writes a manifest file into this cluster's directory, atomically
    /// (the source never reads it half-written: an empty file is a valid
    /// manifest with nothing in it).
    pub fn write(&self, file: &str, yaml: &str) {
        isthmus_core::identity::write_atomic_with(
            &self.dir.join(file),
            yaml.as_bytes(),
            false,
            false,
        )
        .unwrap();
    }

    /// The ServiceEntry file for `ns/name`, if written.
    pub fn service_entry(&self, ns: &str, name: &str) -> Option<serde_json::Value> {
        let path = self
            .dir
            .join(crate::IMPORTS_DIR)
            .join(format!("{ns}.{name}-clusterset.yaml"));
        let text = std::fs::read_to_string(path).ok()?;
        serde_saphyr::from_str(&text).ok()
    }

    pub fn config(
        &self,
        peers: &[(&TestCluster, ExportPolicy)],
        heartbeat: Duration,
        lease: Duration,
    ) -> ControllerConfig {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        ControllerConfig {
            cluster: ClusterSection {
                name: ClusterName(self.name.clone()),
                trust_domain: self.domain.td.clone(),
                locality: self.locality.clone(),
            },
            ca_dir: self.dir.join("ca"),
            source: crate::config::SourceConfig::Files {
                dir: self.dir.clone(),
            },
            federation_addr: self.federation,
            local_addr: any,
            dashboard_addr: any,
            gateway_address: "127.0.0.1:15443".into(),
            advertise_address: None,
            ca_tokens: None,
            state_dir: self.dir.join(".isthmus"),
            stale_lease: lease,
            heartbeat,
            peers: peers
                .iter()
                .map(|(p, policy)| PeerConfig {
                    name: ClusterName(p.name.clone()),
                    address: p.federation.to_string(),
                    trust_domain: p.domain.td.clone(),
                    trust_bundle: None,
                    export_to: policy.clone(),
                })
                .collect(),
            admin: AdminSection {
                admin: any,
                metrics: any,
                readiness: any,
            },
        }
    }

    /// Starts this cluster's controller, trusting `peers`' roots.
    pub async fn start(&self, config: ControllerConfig, trusted: &[TrustBundle]) -> Bound {
        let trust =
            TrustStore::with_bundles(std::iter::once(self.bundle()).chain(trusted.iter().cloned()))
                .unwrap();
        build(
            config,
            Deps {
                certs: leaf(&self.ca, &self.controller_id(), Duration::from_secs(86400)),
                trust,
                logs: None,
                ca: Some(self.ca.clone()),
            },
        )
        .await
        .unwrap()
    }
}

/// A Service with one ready endpoint (its Pod labelled `version: v1`),
/// and (optionally) its ServiceExport.
pub fn service_yaml(name: &str, port: u16, exported: bool, created: &str) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: sample}}\nspec: {{ports: [{{name: http, port: {port}}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: sample, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         endpoints:\n  - {{addresses: [\"127.0.0.10\"], conditions: {{ready: true}}, zone: z, targetRef: {{kind: Pod, name: {name}-0}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-0, namespace: sample, labels: {{app: {name}, version: v1}}}}\n"
    );
    if exported {
        y.push_str(&format!(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: sample, creationTimestamp: \"{created}\"}}\n"
        ));
    }
    y
}
