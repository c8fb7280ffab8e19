//! Kube-mode controller benchmark: controllers reading and writing
//! Kubernetes API stand-ins on loopback (the in-repo `kube-standin`, real
//! HTTP, the real kube-rs client), federating over real gRPC and mTLS.
//!
//! `cargo bench --bench kube` (`ISTHMUS_BENCH_ONLY=propagation|sync|writes|memory`
//! runs one):
//!
//! - propagation: a ServiceExport created in cluster A's API until the
//!   ServiceEntry is readable from every other cluster's API (watch,
//!   federation, server-side apply included), 2 and 10 clusters;
//! - sync: 10 clusters each exporting the same 1,000 services, from a cold
//!   start until every cluster's API holds 1,000 ServiceEntries with 9
//!   clusters each;
//! - writes: API writes per export change (per object kind) and during an
//!   idle minute;
//! - memory: an `isthmus controller` process watching 10,000 Services with
//!   40,000 endpoints (and their Pods) through its kube source.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isthmus_federation::app::Bound;
use isthmus_federation::catalog::ExportPolicy;
use isthmus_federation::config::{ControllerConfig, KubeSource, SourceConfig};
use isthmus_federation::leader::LeaseConfig;
use isthmus_federation::testing::TestCluster;
use isthmus_kube_standin::ApiServer;
use serde_json::{Value, json};

const HB: Duration = Duration::from_secs(1);
const LEASE: Duration = Duration::from_secs(300);
const SE: &str = "serviceentries.networking.istio.io";
const SI: &str = "serviceimports.multicluster.x-k8s.io";
const SVCEX: &str = "serviceexports.multicluster.x-k8s.io";

struct Kube {
    api: ApiServer,
    kubeconfig: PathBuf,
    cluster: TestCluster,
}

async fn mesh(root: &Path, n: usize) -> Vec<Kube> {
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("c{i:02}");
        let api = ApiServer::builder()
            .history_limit(200_000)
            .start()
            .await
            .unwrap();
        let kubeconfig = root.join(format!("{name}.kubeconfig"));
        api.write_kubeconfig(&kubeconfig, &name).unwrap();
        out.push(Kube {
            api,
            kubeconfig,
            cluster: TestCluster::new(root, &name, &format!("region-{i}")),
        });
    }
    out
}

fn kube_source(kubeconfig: &Path) -> SourceConfig {
    SourceConfig::Kube(KubeSource {
        kubeconfig: Some(kubeconfig.to_owned()),
        leader_election: LeaseConfig {
            lease_duration: Duration::from_secs(2),
            ..LeaseConfig::default()
        },
        ..KubeSource::default()
    })
}

fn config(all: &[Kube], i: usize) -> ControllerConfig {
    let me = &all[i];
    let peers: Vec<(&TestCluster, ExportPolicy)> = all
        .iter()
        .filter(|p| p.cluster.name != me.cluster.name)
        .map(|p| (&p.cluster, ExportPolicy::default()))
        .collect();
    let mut c = me.cluster.config(&peers, HB, LEASE);
    c.source = kube_source(&me.kubeconfig);
    c
}

async fn start_all(all: &[Kube]) -> Vec<Bound> {
    let bundles: Vec<_> = all.iter().map(|k| k.cluster.bundle()).collect();
    let mut out = Vec::new();
    for i in 0..all.len() {
        out.push(all[i].cluster.start(config(all, i), &bundles).await);
    }
    out
}

/// A Service with `endpoints` endpoints, their Pods, and (optionally)
/// its ServiceExport, as API objects.
fn service(name: &str, endpoints: usize, exported: bool) -> Vec<Value> {
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"ports": [{"name": "http", "port": 8080}]},
    })];
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            out.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{name}-{e}"), "namespace": "bench",
                             "labels": {"app": name, "version": format!("v{}", e % 2)}},
            }));
            json!({"addresses": [format!("10.{}.{}.{}", (e / 65536) % 256, (e / 256) % 256, e % 256)],
                   "zone": format!("z{}", e % 3),
                   "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("{name}-{e}")}})
        })
        .collect();
    out.push(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": eps,
    }));
    if exported {
        out.push(export(name));
    }
    out
}

fn export(name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": name, "namespace": "bench"}})
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn connected(bound: &[Bound]) {
    let t = Instant::now();
    while !bound.iter().all(|b| b.status().iter().all(|p| p.connected)) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "mesh did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes to the objects Isthmus writes, in every cluster but the first.
fn import_writes(all: &[Kube]) -> (u64, u64) {
    all[1..].iter().fold((0, 0), |(se, si), k| {
        (se + k.api.writes(SE), si + k.api.writes(SI))
    })
}

/// (p50 ms, p99 ms, ServiceEntry writes per change per cluster,
/// ServiceImport writes per change per cluster).
async fn propagation(n: usize, samples: usize) -> (f64, f64, f64, f64) {
    let root = tempfile::tempdir().unwrap();
    let all = mesh(root.path(), n).await;
    for s in 0..samples {
        for o in service(&format!("p{s}"), 1, false) {
            all[0].api.put(o).unwrap();
        }
    }
    let bound = start_all(&all).await;
    connected(&bound).await;
    // Everything listed and idle before the first sample.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = import_writes(&all);
    let mut lat = Vec::new();
    for s in 0..samples {
        let name = format!("p{s}");
        let t = Instant::now();
        all[0].api.put(export(&name)).unwrap();
        let se = format!("{name}-clusterset");
        while !all[1..]
            .iter()
            .all(|k| k.api.get(SE, "bench", &se).is_some())
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "propagation timed out"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the ServiceImports' second write (status) land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = import_writes(&all);
    let changes = (samples * (n - 1)) as f64;
    for b in bound {
        b.shutdown(Duration::from_secs(1)).await;
    }
    (
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        (after.0 - before.0) as f64 / changes,
        (after.1 - before.1) as f64 / changes,
    )
}

/// Seconds from starting 10 controllers (each API already holding `n`
/// exported services) until every API holds `n` ServiceEntries with 9
/// clusters each.
async fn initial_sync(n: usize) -> f64 {
    let root = tempfile::tempdir().unwrap();
    let all = mesh(root.path(), 10).await;
    for k in &all {
        for i in 0..n {
            for o in service(&format!("s{i}"), 1, true) {
                k.api.put(o).unwrap();
            }
        }
    }
    let t = Instant::now();
    let bound = start_all(&all).await;
    loop {
        let full = |se: &Value| se["spec"]["endpoints"].as_array().map_or(0, Vec::len) == 9;
        if std::env::var("ISTHMUS_BENCH_VERBOSE").is_ok() {
            let counts: Vec<usize> = all.iter().map(|k| k.api.count(SE, full)).collect();
            eprintln!("{:.1}s {counts:?}", t.elapsed().as_secs_f64());
        }
        let done = all.iter().all(|k| k.api.count(SE, full) == n);
        if done {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "sync timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t.elapsed().as_secs_f64();
    for b in bound {
        b.shutdown(Duration::from_secs(1)).await;
    }
    took
}

/// API writes (by any client) to every cluster during a minute with no
/// change, after a mesh of 3 has synced 20 services each way.
async fn idle_writes() -> u64 {
    let root = tempfile::tempdir().unwrap();
    let all = mesh(root.path(), 3).await;
    for k in &all {
        for i in 0..20 {
            for o in service(&format!("{}-s{i}", k.cluster.name), 2, true) {
                k.api.put(o).unwrap();
            }
        }
    }
    let bound = start_all(&all).await;
    let t = Instant::now();
    while !all.iter().all(|k| k.api.count(SE, |_| true) == 40) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "idle scenario did not sync"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kinds = [
        SE,
        SI,
        SVCEX,
        "leases.coordination.k8s.io",
        "secrets",
        "configmaps",
    ];
    let count = |all: &[Kube]| -> u64 {
        all.iter()
            .map(|k| kinds.iter().map(|r| k.api.writes(r)).sum::<u64>())
            .sum()
    };
    let before = count(&all);
    let leases_before: u64 = all
        .iter()
        .map(|k| k.api.writes("leases.coordination.k8s.io"))
        .sum();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let leases: u64 = all
        .iter()
        .map(|k| k.api.writes("leases.coordination.k8s.io"))
        .sum::<u64>()
        - leases_before;
    let total = count(&all) - before;
    for b in bound {
        b.shutdown(Duration::from_secs(1)).await;
    }
    // Lease renewals are the election's heartbeat, not state writes.
    total - leases
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// (MiB resident, seconds to list) of an `isthmus controller` process
/// watching `services` Services with 4 endpoints each.
async fn memory(services: usize) -> (f64, f64) {
    let root = tempfile::tempdir().unwrap();
    let all = mesh(root.path(), 1).await;
    let k = &all[0];
    for i in 0..services {
        for o in service(&format!("m{i}"), 4, true) {
            k.api.put(o).unwrap();
        }
    }
    let ca = root.path().join("ca");
    k.cluster.ca.write(&ca).unwrap();
    let metrics = isthmus_federation::testing::free_port();
    let cfg = root.path().join("controller.yaml");
    std::fs::write(
        &cfg,
        format!(
            "kind: Controller\ncluster: {{name: c00, trustDomain: c00.local}}\ncaDir: {}\nsource: {{kube: {{kubeconfig: {}}}}}\nstateDir: {}\n\
             listen: {{federation: \"127.0.0.1:0\", local: \"127.0.0.1:0\"}}\ngatewayAddress: \"127.0.0.1:15443\"\n\
             admin: {{admin: \"127.0.0.1:0\", metrics: \"{metrics}\", readiness: \"127.0.0.1:0\"}}\n",
            ca.display(),
            k.kubeconfig.display(),
            root.path().join("state").display()
        ),
    )
    .unwrap();
    let t = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(["controller", "--config", cfg.to_str().unwrap()])
        .env("ISTHMUS_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the controller exited: {status}");
        }
        let text = isthmus_core::admin::http_get(metrics, "/metrics")
            .await
            .unwrap_or_default();
        if isthmus_e2e::kit::metric(&text, "isthmus_federation_services_exported", &[])
            >= services as f64
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the controller did not list"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (rss as f64 / 1024.0, took)
}

fn main() {
    isthmus_core::tls::install_crypto_provider();
    if let Ok(filter) = std::env::var("ISTHMUS_BENCH_LOG") {
        isthmus_core::telemetry::init(Some(&filter), Default::default());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::var("ISTHMUS_BENCH_ONLY").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    rt.block_on(async {
        println!("| measure | result | target |");
        println!("| --- | --- | --- |");
        if run("propagation") {
            for (n, samples) in [(2, 40), (10, 20)] {
                let (p50, p99, se, si) = propagation(n, samples).await;
                println!(
                    "| propagation, {n} clusters ({samples} exports): ServiceExport created in A's API → ServiceEntry readable in every other API | p50 {p50:.1} ms, p99 {p99:.1} ms | p99 ≤ 50 ms at 10 clusters |"
                );
                println!(
                    "| API writes per new import, per importing cluster ({n} clusters) | ServiceEntry {se:.2}, ServiceImport {si:.2} (object + status) | one per object that changed |"
                );
            }
        }
        if run("sync") {
            let n: usize = std::env::var("ISTHMUS_BENCH_SYNC_N")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1000);
            let s = initial_sync(n).await;
            println!("| initial sync, 10 × {n} services, cold start → every API holds 1,000 ServiceEntries × 9 clusters | {s:.2} s | ≤ 2 s |");
        }
        if run("writes") {
            let w = idle_writes().await;
            println!("| API writes in an idle minute, 3 clusters × 20 services (Lease renewals aside) | {w} | 0 |");
        }
        if run("memory") {
            let (mib, took) = memory(10_000).await;
            println!("| controller RSS watching 10,000 Services, 40,000 endpoints and their Pods (kube source) | {mib:.0} MiB (listed in {took:.1} s) | istiod ≈ 180 MB |");
        }
    });
}
