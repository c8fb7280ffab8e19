//! Two and three gateways on loopback with real TLS workloads behind them:
//! end-to-end identity, export checks, failover, peer death, garbage on
//! the wire, and peer authentication.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::verify::Expect;
use isthmus_core::model::{DestinationRule, ImportedService, MeshState};
use isthmus_core::testing::assert_eventually;
use isthmus_gateway::app::Bound;
use isthmus_gateway::pool::Health;
use isthmus_gateway::testing::*;
use tokio::sync::watch;

/// A running three-cluster topology: the client lives in east; west and
/// eu serve helloworld.
struct Topology {
    mesh: Mesh,
    gws: BTreeMap<&'static str, (Bound, watch::Sender<Arc<MeshState>>)>,
    backends: BTreeMap<&'static str, SocketAddr>,
    ids: BTreeMap<
        &'static str,
        tokio::sync::mpsc::UnboundedReceiver<
            Result<Option<isthmus_core::identity::SpiffeId>, String>,
        >,
    >,
}

/// How each serving cluster is set up.
#[derive(Clone, Copy)]
struct Serving {
    exported_to_east: bool,
    has_endpoints: bool,
}

const OK: Serving = Serving {
    exported_to_east: true,
    has_endpoints: true,
};

impl Topology {
    async fn start(west: Serving, eu: Serving, dr: Option<DestinationRule>) -> Self {
        let mesh = Mesh::new();
        let mut gws = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for c in &mesh.clusters {
            gws.insert(c.name, gateway(&mesh, c).await);
            if c.name != "east" {
                let (addr, rx) = backend(c, mesh.trust.clone()).await;
                backends.insert(c.name, addr);
                ids.insert(c.name, rx);
            }
        }
        let mut t = Self {
            mesh,
            gws,
            backends,
            ids,
        };
        t.publish(west, eu, dr);
        // Each gateway applies its state (peers allowed in, pool synced)
        // before it reports ready.
        for (name, (gw, _)) in &t.gws {
            let ready = gw.ready.clone();
            assert_eventually(
                &format!("{name} gateway ready"),
                Duration::from_secs(10),
                async || ready.is_ready(),
            )
            .await;
        }
        t
    }

    /// Sends every gateway its state.
    fn publish(&mut self, west: Serving, eu: Serving, dr: Option<DestinationRule>) {
        let addrs: BTreeMap<&str, SocketAddr> = self
            .gws
            .iter()
            .map(|(n, (b, _))| (*n, b.peer_addr))
            .collect();
        for c in &self.mesh.clusters {
            let mut s = MeshState {
                version: 1,
                peers: peers(
                    &self.mesh,
                    &addrs
                        .iter()
                        .filter(|(n, _)| **n != c.name)
                        .map(|(n, a)| (*n, *a))
                        .collect(),
                ),
                ..Default::default()
            };
            if let Some(dr) = &dr {
                s.destination_rules.insert(svc_key(), Arc::new(dr.clone()));
            }
            match c.name {
                "east" => {
                    s.imported.insert(
                        svc_key(),
                        Arc::new(ImportedService {
                            key: svc_key(),
                            ports: vec![],
                            // The catalogue says both have healthy endpoints.
                            clusters: vec![
                                remote(self.mesh.get("west"), 1),
                                remote(self.mesh.get("eu"), 1),
                            ],
                        }),
                    );
                }
                name => {
                    let cfg = if name == "west" { west } else { eu };
                    let exported: &[&str] = if cfg.exported_to_east { &["east"] } else { &[] };
                    let ep = cfg.has_endpoints.then(|| self.backends[name]);
                    s.local
                        .insert(svc_key(), local_service(ep, exported, &c.locality));
                }
            }
            self.gws[c.name].1.send_replace(Arc::new(s));
        }
    }

    fn east_gw(&self) -> SocketAddr {
        self.gws["east"].0.sidecar_addr
    }

    /// One call from east's workload; returns the serving cluster's name.
    async fn call(&self) -> Result<String, String> {
        let east = self.mesh.get("east");
        let servers = Expect::OneOf(Arc::new(std::sync::RwLock::new(
            ["west", "eu"]
                .iter()
                .map(|n| self.mesh.get(n).workload_id("helloworld"))
                .collect(),
        )));
        let (echo, server) = call(
            east,
            self.mesh.trust.clone(),
            self.east_gw(),
            &sni(""),
            servers,
            b"hello",
        )
        .await?;
        assert_eq!(echo, b"hello");
        Ok(server
            .trust_domain()
            .as_str()
            .trim_end_matches(".local")
            .to_owned())
    }
}

/// West is preferred over eu for east's traffic.
fn prefer_west() -> DestinationRule {
    DestinationRule::from_spec(
        "sample",
        "helloworld",
        &serde_json::json!({"host": "helloworld", "trafficPolicy": {"loadBalancer": {"localityLbSetting": {"failover": [{"from": "us-east1", "to": "us-west1"}]}}}}),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sees_the_clients_own_identity_end_to_end() {
    let mut t = Topology::start(OK, OK, Some(prefer_west())).await;
    assert_eq!(t.call().await.unwrap(), "west");
    // West's workload verified east's *workload*, not a gateway.
    let seen = t
        .ids
        .get_mut("west")
        .unwrap()
        .recv()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, Some(t.mesh.get("east").workload_id("sleep")));

    // Both sides count the connection with Istio's labels.
    // Byte counts are recorded when the connection closes (as ztunnel
    // does); the close travels through both gateways after the client
    // hangs up.
    let east_metrics = t.gws["east"].0.metrics_addr;
    assert_eventually(
        "east to record the closed connection",
        Duration::from_secs(5),
        async || {
            metric(
                &scrape(east_metrics).await,
                "istio_tcp_connections_closed_total",
                &[],
            ) == 1.0
        },
    )
    .await;
    let m = scrape(east_metrics).await;
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "source_cluster=\"east\"",
                "destination_cluster=\"west\""
            ]
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            "istio_tcp_sent_bytes_total",
            &["destination_cluster=\"west\""]
        ) > 5.0
    );
    let m = scrape(t.gws["west"].0.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\"", "source_cluster=\"east\""]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_not_exported_to_the_caller_is_refused() {
    let no = Serving {
        exported_to_east: false,
        has_endpoints: true,
    };
    let t = Topology::start(no, no, None).await;
    let err = t.call().await.unwrap_err();
    assert!(err.contains("handshake") || err.contains("read"), "{err}");
    for gw in ["west", "eu"] {
        let m = scrape(t.gws[gw].0.metrics_addr).await;
        assert_eq!(
            metric(
                &m,
                "isthmus_gateway_streams_refused_total",
                &["peer_cluster=\"east\"", "reason=\"not_exported\""]
            ),
            1.0,
            "{gw}: {m}"
        );
    }
    let m = scrape(t.gws["east"].0.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "isthmus_gateway_connections_unrouted_total",
            &["all_clusters_failed"]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_in_the_first_cluster_the_second_serves_with_zero_errors() {
    let empty = Serving {
        exported_to_east: true,
        has_endpoints: false,
    };
    let t = Topology::start(empty, OK, Some(prefer_west())).await;
    for _ in 0..30 {
        assert_eq!(t.call().await.unwrap(), "eu");
    }
    let m = scrape(t.gws["east"].0.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "isthmus_gateway_failovers_total",
            &[
                "from_cluster=\"west\"",
                "to_cluster=\"eu\"",
                "reason=\"no_healthy_endpoint\""
            ]
        ),
        30.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_decides_when_everything_is_healthy() {
    let t = Topology::start(OK, OK, Some(prefer_west())).await;
    for _ in 0..10 {
        assert_eq!(t.call().await.unwrap(), "west");
    }
}

/// Runs `t`'s west gateway in a runtime of its own so it can be killed:
/// dropping the runtime stops every task and closes its sockets without a
/// QUIC CONNECTION_CLOSE, as a crashed process would.
#[test]
fn a_killed_peer_gateway_leaves_rotation_within_a_second_with_zero_failed_new_connections() {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let west_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    main.block_on(async {
        let mesh = Mesh::new();
        let (east, east_tx) = gateway(&mesh, mesh.get("east")).await;
        let (eu, eu_tx) = gateway(&mesh, mesh.get("eu")).await;
        let (west_backend, _) = backend(mesh.get("west"), mesh.trust.clone()).await;
        let (eu_backend, _) = backend(mesh.get("eu"), mesh.trust.clone()).await;
        // West's gateway, on its own runtime, with west's real PKI.
        let west_c = mesh.get("west");
        let (west, west_tx) = {
            let _guard = west_rt.enter();
            let handle = west_rt.handle().clone();
            let cfg = config(west_c);
            let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
            let deps = isthmus_gateway::app::Deps {
                certs: isthmus_core::testing::leaf(&west_c.ca, &west_c.gateway_id(), DAY),
                trust: mesh.trust.clone(),
                state: rx,
                logs: None,
            };
            let b = handle.spawn(isthmus_gateway::app::build(cfg, deps)).await.unwrap().unwrap();
            (b, tx)
        };
        let addrs: BTreeMap<&str, SocketAddr> = [("east", east.peer_addr), ("west", west.peer_addr), ("eu", eu.peer_addr)].into();
        let others = |me: &str| -> BTreeMap<&str, SocketAddr> { addrs.iter().filter(|(n, _)| **n != me).map(|(n, a)| (*n, *a)).collect() };
        let mut s = MeshState { version: 1, peers: peers(&mesh, &others("east")), ..Default::default() };
        s.imported.insert(svc_key(), Arc::new(ImportedService {
            key: svc_key(),
            ports: vec![],
            clusters: vec![remote(mesh.get("west"), 1), remote(mesh.get("eu"), 1)],
        }));
        s.destination_rules.insert(svc_key(), Arc::new(prefer_west()));
        east_tx.send_replace(Arc::new(s));
        for (name, tx, backend) in [("west", &west_tx, west_backend), ("eu", &eu_tx, eu_backend)] {
            let mut s = MeshState { version: 1, peers: peers(&mesh, &others(name)), ..Default::default() };
            s.local.insert(svc_key(), local_service(Some(backend), &["east"], &mesh.get(name).locality));
            tx.send_replace(Arc::new(s));
        }

        let east_c = mesh.get("east");
        let servers = Expect::OneOf(Arc::new(std::sync::RwLock::new(
            ["west", "eu"].iter().map(|n| mesh.get(n).workload_id("helloworld")).collect(),
        )));
        let any_subset = sni("");
        let east_sidecars = east.sidecar_addr;
        let one = || call(east_c, mesh.trust.clone(), east_sidecars, &any_subset, servers.clone(), b"x");
        // Every gateway has applied its state before traffic starts.
        for ready in [east.ready.clone(), eu.ready.clone(), west.ready.clone()] {
            assert_eventually("gateways ready", Duration::from_secs(10), async || ready.is_ready()).await;
        }
        // Warm: west serves (first calls may race the peers' first probes).
        let warm = tokio::time::Instant::now();
        let mut served = 0;
        while served < 5 {
            match one().await {
                Ok((_, id)) if id.trust_domain().as_str() == "west.local" => served += 1,
                other => {
                    assert!(warm.elapsed() < Duration::from_secs(20), "west does not serve: {other:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }

        // Kill west's gateway; watch east's view of it every 10 ms.
        let east = Arc::new(east);
        let watcher = {
            let east = east.clone();
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                while east.peer_health("west") == Health::Up && start.elapsed() < Duration::from_secs(5) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (east.peer_health("west"), start.elapsed())
            })
        };
        let killed_at = tokio::time::Instant::now();
        drop(west);
        west_rt.shutdown_background();

        // New connections keep succeeding, and move to eu.
        let mut failures = Vec::new();
        let mut served_by_eu = 0;
        while killed_at.elapsed() < Duration::from_secs(3) {
            match one().await {
                Ok((_, id)) if id.trust_domain().as_str() == "eu.local" => served_by_eu += 1,
                Ok((_, id)) => failures.push(format!("served by {id} after the kill")),
                Err(e) => failures.push(e),
            }
        }
        let (health, detected) = watcher.await.unwrap();
        assert_eq!(health, Health::Down, "west never marked down");
        assert!(failures.is_empty(), "failed new connections: {failures:?}");
        assert!(served_by_eu > 3, "eu served {served_by_eu}");
        assert!(detected <= Duration::from_secs(1), "west marked down after {detected:?}");
        eprintln!("west detected down after {detected:?}; eu served {served_by_eu} new connections, 0 failed");
        let _ = Arc::try_unwrap(east).unwrap().shutdown(Duration::from_secs(1)).await;
        let _ = eu.shutdown(Duration::from_secs(1)).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_becomes_ready_after_its_first_config() {
    let mesh = Mesh::new();
    let (gw, tx) = gateway(&mesh, mesh.get("east")).await;
    assert_eq!(gw.ready.pending(), vec!["first config from the controller"]);
    tx.send_replace(Arc::new(MeshState {
        version: 1,
        ..Default::default()
    }));
    let ready = gw.ready.clone();
    assert_eventually("gateway ready", Duration::from_secs(5), async || {
        ready.is_ready()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_open_tunnels_finish_and_takes_no_new_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut t = Topology::start(OK, OK, Some(prefer_west())).await;
    let east_c = t.mesh.get("east");
    let cfg = isthmus_core::tls::client_config(
        Some(isthmus_core::testing::leaf(
            &east_c.ca,
            &east_c.workload_id("sleep"),
            DAY,
        )),
        t.mesh.trust.clone(),
        Expect::AnyTrusted,
        &[],
    );
    let tcp = tokio::net::TcpStream::connect(t.east_gw()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(sni("")).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    tls.write_all(b"a").await.unwrap();
    tls.read_exact(&mut buf).await.unwrap();

    let (east, _tx) = t.gws.remove("east").unwrap();
    let addr = east.sidecar_addr;
    let drain = tokio::spawn(east.shutdown(Duration::from_secs(20)));
    assert_eventually(
        "the sidecar listener to close",
        Duration::from_secs(5),
        async || tokio::net::TcpStream::connect(addr).await.is_err(),
    )
    .await;
    // The open tunnel still carries bytes, and holds the drain open.
    tls.write_all(b"b").await.unwrap();
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"b");
    assert!(!drain.is_finished());
    // When it ends, the drain completes well before its deadline.
    tls.shutdown().await.unwrap();
    drop(tls);
    let outcome = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, isthmus_core::drain::DrainOutcome::Drained);
}
