//! (feature `testing`) A three-cluster gateway harness on loopback: east (us-east1), west
//! (us-west1), eu (europe-west1), each with its own trust domain and CA,
//! a real gateway, and TLS workloads behind it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::app::{self, Bound, Deps};
use crate::config::GatewayConfig;
use isthmus_core::config::{AdminSection, ClusterName, ClusterSection};
use isthmus_core::identity::verify::Expect;
use isthmus_core::identity::{ClusterCa, SpiffeId, TrustStore};
use isthmus_core::model::*;
use isthmus_core::testing::{TestDomain, leaf, tls_echo_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

pub const DAY: Duration = Duration::from_secs(86400);
pub const SVC_PORT: u16 = 5000;

pub fn svc_key() -> ServiceKey {
    ServiceKey::new("sample", "helloworld")
}

pub fn sni(subset: &str) -> String {
    format!("outbound_.{SVC_PORT}_.{subset}_.helloworld.sample.svc.cluster.local")
}

/// One cluster's PKI and locality.
#[derive(Debug)]
pub struct Cluster {
    pub name: &'static str,
    pub locality: Locality,
    pub domain: TestDomain,
    pub ca: Arc<ClusterCa>,
}

impl Cluster {
    pub fn new(name: &'static str, region: &str, zone: &str) -> Self {
        let domain = TestDomain::new(&format!("{name}.local"));
        let ca = domain.cluster(name);
        Self {
            name,
            locality: Locality::new(region, zone),
            domain,
            ca,
        }
    }
    pub fn gateway_id(&self) -> SpiffeId {
        SpiffeId::gateway(&self.domain.td, self.name).unwrap()
    }
    pub fn workload_id(&self, sa: &str) -> SpiffeId {
        SpiffeId::workload(&self.domain.td, "sample", sa).unwrap()
    }
}

/// The three clusters, all trusting each other.
#[derive(Debug)]
pub struct Mesh {
    pub clusters: Vec<Cluster>,
    pub trust: Arc<TrustStore>,
}

impl Default for Mesh {
    fn default() -> Self {
        Self::new()
    }
}

impl Mesh {
    pub fn new() -> Self {
        let clusters = vec![
            Cluster::new("east", "us-east1", "us-east1-a"),
            Cluster::new("west", "us-west1", "us-west1-a"),
            Cluster::new("eu", "europe-west1", "europe-west1-b"),
        ];
        let trust = TrustStore::with_bundles(clusters.iter().map(|c| c.domain.bundle())).unwrap();
        Self { clusters, trust }
    }
    pub fn get(&self, name: &str) -> &Cluster {
        self.clusters.iter().find(|c| c.name == name).unwrap()
    }
}

pub fn config(c: &Cluster) -> GatewayConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    GatewayConfig {
        cluster: ClusterSection {
            name: ClusterName(c.name.into()),
            trust_domain: c.domain.td.clone(),
            locality: c.locality.clone(),
        },
        controller: "127.0.0.1:15010".into(),
        ca_dir: None,
        token_file: None,
        ca_root: None,
        sidecar_addr: any,
        peer_addr: any,
        idle_timeout: Duration::from_secs(30),
        connections_per_peer: 2,
        max_udp_payload: crate::config::DEFAULT_MAX_UDP_PAYLOAD,
        admin: AdminSection {
            admin: any,
            metrics: any,
            readiness: any,
        },
    }
}

/// Starts a gateway for `c` with an empty state; returns it and the
/// sender that feeds its state.
pub async fn gateway(mesh: &Mesh, c: &Cluster) -> (Bound, watch::Sender<Arc<MeshState>>) {
    gateway_with(mesh, c, crate::config::DEFAULT_MAX_UDP_PAYLOAD).await
}

/// [`gateway`] with a given QUIC packet size ceiling.
pub async fn gateway_with(
    mesh: &Mesh,
    c: &Cluster,
    max_udp_payload: u16,
) -> (Bound, watch::Sender<Arc<MeshState>>) {
    let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
    let mut config = config(c);
    config.max_udp_payload = max_udp_payload;
    let deps = Deps {
        certs: leaf(&c.ca, &c.gateway_id(), DAY),
        trust: mesh.trust.clone(),
        state: rx,
        logs: None,
    };
    (app::build(config, deps).await.unwrap(), tx)
}

/// A workload server: TLS echo with the cluster's workload identity, that
/// also says which cluster it is in. Returns its address and the stream
/// of client identities it verified.
pub async fn backend(
    c: &Cluster,
    trust: Arc<TrustStore>,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Result<Option<SpiffeId>, String>>,
) {
    let cfg = isthmus_core::tls::server_config(
        leaf(&c.ca, &c.workload_id("helloworld"), DAY),
        trust,
        Some(Expect::AnyTrusted),
        &[],
    );
    tls_echo_server(cfg).await
}

pub fn local_service(
    endpoint: Option<SocketAddr>,
    exported_to: &[&str],
    locality: &Locality,
) -> Arc<LocalService> {
    Arc::new(LocalService {
        key: svc_key(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: SVC_PORT,
            target_port: SVC_PORT,
            protocol: "TCP".into(),
        }],
        endpoints: endpoint
            .into_iter()
            .map(|a| Endpoint {
                address: a.ip(),
                ports: [("http".to_owned(), a.port())].into(),
                ready: true,
                locality: locality.clone(),
                labels: [("version".to_owned(), "v1".to_owned())].into(),
                workload: "helloworld-0".into(),
            })
            .collect(),
        exported_to: exported_to
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
    })
}

pub fn remote(c: &Cluster, healthy: u32) -> RemoteCluster {
    RemoteCluster {
        cluster: c.name.into(),
        locality: c.locality.clone(),
        groups: std::sync::Arc::from([EndpointGroup {
            locality: c.locality.clone(),
            labels: [("version".to_owned(), "v1".to_owned())].into(),
            healthy,
            total: healthy,
        }]),
        stale: false,
    }
}

pub fn peers(mesh: &Mesh, addrs: &BTreeMap<&str, SocketAddr>) -> BTreeMap<String, PeerGateway> {
    addrs
        .iter()
        .map(|(name, addr)| {
            let c = mesh.get(name);
            (
                name.to_string(),
                PeerGateway {
                    cluster: name.to_string(),
                    trust_domain: c.domain.td.clone(),
                    address: *addr,
                    locality: c.locality.clone(),
                },
            )
        })
        .collect()
}

/// A workload client in `c`: TLS through the gateway at `gw` with `sni`,
/// expecting `server` at the other end; sends `msg` and returns the echo
/// and the server's identity.
pub async fn call(
    c: &Cluster,
    trust: Arc<TrustStore>,
    gw: SocketAddr,
    sni: &str,
    server: Expect,
    msg: &[u8],
) -> Result<(Vec<u8>, SpiffeId), String> {
    let cfg = isthmus_core::tls::client_config(
        Some(leaf(&c.ca, &c.workload_id("sleep"), DAY)),
        trust,
        server,
        &[],
    );
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(gw)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).ok();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
    let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    let id = isthmus_core::identity::peer_identity(tls.get_ref().1.peer_certificates())
        .map_err(|e| e.to_string())?;
    tls.write_all(msg)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .map_err(|_| "read timed out".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    Ok((buf, id))
}

pub use isthmus_e2e::kit::{metric, scrape};
