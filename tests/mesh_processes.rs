//! Two clusters as real processes (controller + gateway each), set up as a
//! user would with `isthmus ca` and YAML: a workload in east calls a
//! workload in west through east's gateway, QUIC, and west's gateway; the
//! server sees the client's own identity.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::identity::pem::certs_from_pem;
use isthmus_core::identity::rotation::StaticCert;
use isthmus_core::identity::verify::Expect;
use isthmus_core::identity::{SpiffeId, TrustBundle, TrustStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tests here each run six processes; on a 2-core machine they run
/// one at a time so each gets the CPU its timing assertions assume.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_isthmus")
}

fn ok(args: &[&str]) {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "isthmus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn port() -> u16 {
    isthmus_e2e::kit::unused_port()
}

use isthmus_e2e::Proc;

fn spawn(args: &[&str]) -> Proc {
    Proc::spawn(
        args[0],
        Command::new(bin())
            .args(args)
            .env("ISTHMUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
    .unwrap()
}

struct Cluster {
    name: &'static str,
    dir: PathBuf,
    federation: u16,
    local: u16,
    gateway: u16,
    gw_ready: u16,
    gw_admin: u16,
    gw_metrics: u16,
}

impl Cluster {
    fn new(root: &Path, name: &'static str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        let d = |p: &str| dir.join(p).to_str().unwrap().to_owned();
        ok(&[
            "ca",
            "init",
            "--trust-domain",
            &format!("{name}.local"),
            "--out",
            &d("root"),
        ]);
        ok(&["ca", "cluster", name, "--ca", &d("root"), "--out", &d("ca")]);
        Self {
            name,
            dir,
            federation: port(),
            local: port(),
            gateway: port(),
            gw_ready: port(),
            gw_admin: port(),
            gw_metrics: port(),
        }
    }

    fn workload(&self, sa: &str) -> (Arc<StaticCert>, SpiffeId) {
        let out = self.dir.join(format!("wl-{sa}"));
        let id = format!("spiffe://{}.local/ns/sample/sa/{sa}", self.name);
        ok(&[
            "ca",
            "issue",
            "--spiffe-id",
            &id,
            "--ca",
            self.dir.join("ca").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let chain =
            certs_from_pem(&std::fs::read_to_string(out.join("cert-chain.pem")).unwrap()).unwrap();
        let key = rcgen_key(&std::fs::read_to_string(out.join("key.pem")).unwrap());
        (
            isthmus_core::testing::resolver(chain, &key),
            id.parse().unwrap(),
        )
    }

    fn bundle(&self) -> TrustBundle {
        let roots =
            certs_from_pem(&std::fs::read_to_string(self.dir.join("root/root-cert.pem")).unwrap())
                .unwrap();
        TrustBundle::new(format!("{}.local", self.name).parse().unwrap(), roots, 1)
    }

    fn start(&self, peer: &Cluster, region: &str) -> (Proc, Proc) {
        self.start_with(&[peer], region)
    }

    fn start_with(&self, peers: &[&Cluster], region: &str) -> (Proc, Proc) {
        let peers: Vec<String> = peers
            .iter()
            .map(|p| {
                format!(
                    "{{name: {p}, address: \"127.0.0.1:{pf}\", trustDomain: {p}.local, trustBundle: {pd}/root/root-cert.pem}}",
                    p = p.name,
                    pf = p.federation,
                    pd = p.dir.display()
                )
            })
            .collect();
        let controller = format!(
            "kind: Controller\ncluster: {{name: {n}, trustDomain: {n}.local, locality: {{region: {region}}}}}\ncaDir: {d}/ca\nsource: {{files: {d}/manifests}}\n\
             listen: {{federation: \"127.0.0.1:{f}\", local: \"127.0.0.1:{l}\"}}\ngatewayAddress: \"127.0.0.1:{g}\"\nheartbeatInterval: 200ms\n\
             peers: [{peers}]\n\
             admin: {{admin: \"127.0.0.1:0\", metrics: \"127.0.0.1:0\", readiness: \"127.0.0.1:0\"}}\n",
            n = self.name,
            d = self.dir.display(),
            f = self.federation,
            l = self.local,
            g = self.gateway,
            peers = peers.join(", "),
        );
        let gateway = format!(
            "kind: Gateway\ncluster: {{name: {n}, trustDomain: {n}.local, locality: {{region: {region}}}}}\ncontroller: \"127.0.0.1:{l}\"\ncaDir: {d}/ca\n\
             listen: {{sidecars: \"127.0.0.1:{g}\", peers: \"127.0.0.1:{g}\"}}\n\
             admin: {{admin: \"127.0.0.1:{a}\", metrics: \"127.0.0.1:{m}\", readiness: \"127.0.0.1:{r}\"}}\n",
            a = self.gw_admin,
            m = self.gw_metrics,
            n = self.name,
            d = self.dir.display(),
            l = self.local,
            g = self.gateway,
            r = self.gw_ready,
        );
        let (c, g) = (
            self.dir.join("controller.yaml"),
            self.dir.join("gateway.yaml"),
        );
        std::fs::write(&c, controller).unwrap();
        std::fs::write(&g, gateway).unwrap();
        (
            spawn(&["controller", "--config", c.to_str().unwrap()]),
            spawn(&["gateway", "--config", g.to_str().unwrap()]),
        )
    }
}

fn rcgen_key(pem: &str) -> rcgen::KeyPair {
    rcgen::KeyPair::from_pem(pem).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_in_east_calls_west_through_both_gateways_with_its_own_identity() {
    let _serial = SERIAL.lock().await;
    isthmus_core::tls::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    let east = Cluster::new(root.path(), "east");
    let west = Cluster::new(root.path(), "west");
    let trust = TrustStore::with_bundles([east.bundle(), west.bundle()]).unwrap();

    // West's workload: a TLS echo server with west's workload identity.
    let (server_cert, server_id) = west.workload("helloworld");
    let (backend, mut seen) = isthmus_core::testing::tls_echo_server(
        isthmus_core::tls::server_config(server_cert, trust.clone(), Some(Expect::AnyTrusted), &[]),
    )
    .await;
    std::fs::write(
        west.dir.join("manifests/helloworld.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: helloworld, namespace: sample}}\nspec: {{ports: [{{name: http, port: 5000}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: hw-1, namespace: sample, labels: {{kubernetes.io/service-name: helloworld}}}}\n\
             ports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [\"127.0.0.1\"], zone: us-west1-a}}]\n---\n\
             apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: helloworld, namespace: sample}}\n",
            backend.port()
        ),
    )
    .unwrap();
    let _east = east.start(&west, "us-east1");
    let _west = west.start(&east, "us-west1");

    // Both gateways become ready once their controller has sent config.
    for c in [&east, &west] {
        let addr = format!("127.0.0.1:{}", c.gw_ready).parse().unwrap();
        let t = Instant::now();
        while isthmus_core::admin::http_get(addr, "/healthz/ready")
            .await
            .is_err()
        {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{} gateway never became ready",
                c.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // East's workload calls helloworld in west through east's gateway.
    let (client_cert, client_id) = east.workload("sleep");
    let cfg = Arc::new(isthmus_core::tls::client_config(
        Some(client_cert),
        trust,
        Expect::Exactly(server_id.clone()),
        &[],
    ));
    let sni = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
    let t = Instant::now();
    let echoed = loop {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", east.gateway))
                .await
                .map_err(|e| e.to_string())?;
            let name = rustls_pki_types::ServerName::try_from(sni).unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"hello from east")
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 15];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(buf)) => break buf,
            other => {
                // The import may not have reached east's gateway yet.
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "no cross-cluster call succeeded: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(&echoed, b"hello from east");
    // West's workload verified east's workload identity, end to end.
    let mut identities = Vec::new();
    while let Ok(r) = seen.try_recv() {
        identities.push(r);
    }
    assert!(identities.contains(&Ok(Some(client_id))), "{identities:?}");
}

fn helloworld(backend_port: u16, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: helloworld, namespace: sample}}\nspec: {{ports: [{{name: http, port: 5000}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: hw-1, namespace: sample, labels: {{kubernetes.io/service-name: helloworld}}}}\n\
         ports: [{{name: http, port: {backend_port}}}]\nendpoints: [{{addresses: [\"127.0.0.1\"], zone: {zone}}}]\n---\n\
         apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: helloworld, namespace: sample}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_process_moves_new_connections_to_the_next_cluster_with_zero_failures() {
    let _serial = SERIAL.lock().await;
    isthmus_core::tls::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    let east = Cluster::new(root.path(), "east");
    let west = Cluster::new(root.path(), "west");
    let eu = Cluster::new(root.path(), "eu");
    let trust = TrustStore::with_bundles([east.bundle(), west.bundle(), eu.bundle()]).unwrap();
    let mut ids = Vec::new();
    for c in [&west, &eu] {
        let (cert, id) = c.workload("helloworld");
        let (addr, _seen) = isthmus_core::testing::tls_echo_server(
            isthmus_core::tls::server_config(cert, trust.clone(), Some(Expect::AnyTrusted), &[]),
        )
        .await;
        std::fs::write(
            c.dir.join("manifests/helloworld.yaml"),
            helloworld(addr.port(), "z"),
        )
        .unwrap();
        ids.push(id);
    }
    // East prefers west (region failover rule), then eu.
    std::fs::write(
        east.dir.join("manifests/dr.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: hw, namespace: sample}\n\
         spec: {host: helloworld.sample.svc.clusterset.local, trafficPolicy: {loadBalancer: {localityLbSetting: {failover: [{from: us-east1, to: us-west1}]}}}}\n",
    )
    .unwrap();
    let _east = east.start_with(&[&west, &eu], "us-east1");
    let (_west_controller, west_gateway) = west.start_with(&[&east, &eu], "us-west1");
    let _eu = eu.start_with(&[&east, &west], "europe-west1");

    let (client_cert, _) = east.workload("sleep");
    let expect = Expect::OneOf(Arc::new(std::sync::RwLock::new(
        ids.iter().cloned().collect(),
    )));
    let cfg = Arc::new(isthmus_core::tls::client_config(
        Some(client_cert),
        trust,
        expect,
        &[],
    ));
    let call = || {
        let cfg = cfg.clone();
        async move {
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", east.gateway))
                    .await
                    .map_err(|e| e.to_string())?;
                let name = rustls_pki_types::ServerName::try_from(
                    "outbound_.5000_._.helloworld.sample.svc.cluster.local",
                )
                .unwrap();
                let mut tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                let server =
                    isthmus_core::identity::peer_identity(tls.get_ref().1.peer_certificates())
                        .map_err(|e| e.to_string())?;
                tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(
                    server
                        .trust_domain()
                        .as_str()
                        .trim_end_matches(".local")
                        .to_owned(),
                )
            };
            tokio::time::timeout(Duration::from_secs(5), attempt)
                .await
                .map_err(|_| "timed out".to_string())?
        }
    };
    // The mesh has converged: east's gateway sees both peers up (probes
    // answered, so each accepts east's identity), not only west.
    let admin = format!("127.0.0.1:{}", east.gw_admin).parse().unwrap();
    let t = Instant::now();
    loop {
        let dump = isthmus_core::admin::http_get(admin, "/config_dump")
            .await
            .unwrap_or_default();
        let up = serde_json::from_str::<serde_json::Value>(&dump)
            .map(|d| {
                d["peers"]
                    .as_array()
                    .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["health"] == "Up"))
            })
            .unwrap_or(false);
        if up {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "east's gateway never saw both peers up: {dump}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Warm: west serves (once everything has synced).
    let t = Instant::now();
    loop {
        if call().await.as_deref() == Ok("west") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "west never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGKILL west's gateway process.
    west_gateway.kill();
    let killed = Instant::now();
    let mut failures = Vec::new();
    let mut by_eu = 0;
    while killed.elapsed() < Duration::from_secs(3) {
        match call().await {
            Ok(c) if c == "eu" => by_eu += 1,
            Ok(c) => failures.push(format!("served by {c} after the kill")),
            Err(e) => failures.push(e),
        }
    }
    if !failures.is_empty() {
        let m = isthmus_core::admin::http_get(
            format!("127.0.0.1:{}", east.gw_metrics).parse().unwrap(),
            "/metrics",
        )
        .await
        .unwrap_or_default();
        let why: Vec<&str> = m
            .lines()
            .filter(|l| {
                l.contains("unrouted")
                    || l.contains("refused")
                    || l.contains("failover")
                    || l.contains("peer_up")
            })
            .collect();
        panic!("failed new connections after the kill: {failures:?}\neast gateway: {why:#?}");
    }
    assert!(by_eu > 3, "eu served {by_eu}");
    eprintln!(
        "after SIGKILL of west's gateway: {by_eu} new connections, all served by eu, 0 failed"
    );
}
