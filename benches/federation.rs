//! Federation benchmark: controllers over real gRPC and mTLS on loopback.
//!
//! `cargo bench --bench federation`
//!
//! - propagation: a ServiceExport file written in one cluster until the
//!   ServiceEntry file exists in the others (2 and 10 clusters);
//! - initial sync: 10 clusters each exporting N services of the same
//!   names, from start until every cluster has imported all N with 9
//!   clusters each (N = 1,000 and 10,000);
//! - memory: an `isthmus controller` process's resident memory before and
//!   after 10 remote clusters, each exporting 300 services with 4,000
//!   endpoints in all, have synced to it.

use std::path::Path;
use std::time::{Duration, Instant};

use isthmus_federation::catalog::ExportPolicy;
use isthmus_federation::testing::TestCluster;

// The default heartbeat.
const HB: Duration = Duration::from_secs(1);
const LEASE: Duration = Duration::from_secs(300);

fn service_file(prefix: &str, n: usize, endpoints: usize, created: &str) -> String {
    let mut y = String::with_capacity(n * 600);
    for i in 0..n {
        let name = format!("{prefix}{i}");
        y.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec: {{ports: [{{name: http, port: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\nendpoints:\n"
        ));
        for e in 0..endpoints {
            y.push_str(&format!(
                "  - {{addresses: [\"10.{}.{}.{}\"], zone: z{}, targetRef: {{kind: Pod, name: {name}-{e}}}}}\n",
                (e / 65536) % 256,
                (e / 256) % 256,
                e % 256,
                e % 3,
            ));
        }
        // Subset labels live on the Pods, as in a real cluster.
        for e in 0..endpoints {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-{e}, namespace: bench, labels: {{version: v{}}}}}\n",
                e % 2
            ));
        }
        y.push_str(&format!(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: bench, creationTimestamp: \"{created}\"}}\n---\n"
        ));
    }
    y
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn mesh(root: &Path, n: usize) -> Vec<TestCluster> {
    (0..n)
        .map(|i| TestCluster::new(root, &format!("c{i:02}"), &format!("region-{i}")))
        .collect()
}

async fn start_all(clusters: &[TestCluster]) -> Vec<isthmus_federation::app::Bound> {
    let mut out = Vec::new();
    for i in 0..clusters.len() {
        out.push(start_one(clusters, i).await);
    }
    out
}

/// Starts controller `i` with every other cluster as a peer.
async fn start_one(clusters: &[TestCluster], i: usize) -> isthmus_federation::app::Bound {
    let bundles: Vec<_> = clusters.iter().map(|c| c.bundle()).collect();
    let c = &clusters[i];
    let peers: Vec<(&TestCluster, ExportPolicy)> = clusters
        .iter()
        .filter(|p| p.name != c.name)
        .map(|p| (p, ExportPolicy::default()))
        .collect();
    c.start(c.config(&peers, HB, LEASE), &bundles).await
}

async fn propagation(n: usize, samples: usize) -> (f64, f64) {
    let root = tempfile::tempdir().unwrap();
    let clusters = mesh(root.path(), n);
    let bound = start_all(&clusters).await;
    // Wait for the mesh to be fully connected.
    let t = Instant::now();
    while !bound.iter().all(|b| b.status().iter().all(|p| p.connected)) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "mesh did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat = Vec::new();
    for s in 0..samples {
        let name = format!("p{s}-");
        let file = clusters[0].dir.join(format!("svc-{s}.yaml"));
        let t = Instant::now();
        std::fs::write(&file, service_file(&name, 1, 1, "")).unwrap();
        let paths: Vec<_> = clusters[1..]
            .iter()
            .map(|c| {
                c.dir
                    .join(isthmus_federation::IMPORTS_DIR)
                    .join(format!("bench.{name}0-clusterset.yaml"))
            })
            .collect();
        while !paths.iter().all(|p| p.exists()) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "propagation timed out"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        // Spread the samples over the source's poll cycle.
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    for b in bound {
        b.shutdown(Duration::from_secs(1)).await;
    }
    (pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

/// (start → synced, all own catalogues listed → synced, start → every
/// ServiceEntry file written, one controller restarted → re-synced), in
/// seconds.
async fn initial_sync(n: usize) -> (f64, f64, f64, f64) {
    let root = tempfile::tempdir().unwrap();
    let clusters = mesh(root.path(), 10);
    for (i, c) in clusters.iter().enumerate() {
        c.write(
            "services.yaml",
            &service_file("s", n, 1, &format!("2026-01-01T00:00:{i:02}Z")),
        );
    }
    let t = Instant::now();
    let bound = start_all(&clusters).await;
    let mut listed: Option<Instant> = None;
    loop {
        if listed.is_none() && bound.iter().all(|b| b.mesh.borrow().local.len() == n) {
            listed = Some(Instant::now());
        }
        let done = bound.iter().all(|b| {
            let m = b.mesh.borrow();
            m.imported.len() == n && m.imported.values().all(|s| s.clusters.len() == 9)
        });
        if done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "initial sync timed out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = Instant::now();
    let took = (done - t).as_secs_f64();
    let after_listed = (done - listed.unwrap_or(t)).as_secs_f64();
    // The files trail the mesh state (the sink writes at a lower priority).
    let files = |c: &TestCluster| {
        std::fs::read_dir(c.dir.join(isthmus_federation::IMPORTS_DIR))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".yaml"))
                    .count()
            })
            .unwrap_or(0)
    };
    while !clusters.iter().all(|c| files(c) == n) {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "ServiceEntries never all written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = t.elapsed().as_secs_f64();

    // One controller restarts while the other nine run (a controller pod
    // rescheduled): until it holds fresh catalogues from all nine. The
    // files it wrote give it stale imports at once; fresh means every
    // peer re-synced and nothing left stale.
    let mut bound = bound;
    let first = bound.remove(0);
    first.shutdown(Duration::from_secs(1)).await;
    let t = Instant::now();
    let restarted = start_one(&clusters, 0).await;
    loop {
        let fresh = restarted
            .status()
            .iter()
            .all(|p| p.last_full_sync.is_some() && !p.stale);
        let m = restarted.mesh.borrow().clone();
        let all = m.imported.len() == n
            && m.imported
                .values()
                .all(|s| s.clusters.len() == 9 && s.clusters.iter().all(|c| !c.stale));
        if fresh && all {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the restarted controller never re-synced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restart = t.elapsed().as_secs_f64();
    bound.push(restarted);
    for b in bound {
        b.shutdown(Duration::from_secs(1)).await;
    }
    (took, after_listed, written, restart)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

async fn memory_per_remote() -> (f64, f64, f64) {
    let root = tempfile::tempdir().unwrap();
    let clusters = mesh(root.path(), 11);
    let (measured, remotes) = clusters.split_first().unwrap();
    // The measured controller runs as a real process: its PKI and config
    // on disk, as a user would have them.
    measured.ca.write(&measured.dir.join("ca")).unwrap();
    let mut peers_yaml = String::new();
    for r in remotes {
        let pem = r.dir.join("root.pem");
        std::fs::write(
            &pem,
            isthmus_core::identity::pem::cert_to_pem(r.domain.root.cert()),
        )
        .unwrap();
        peers_yaml.push_str(&format!(
            "  - {{name: {}, address: \"{}\", trustDomain: {}, trustBundle: {}}}\n",
            r.name,
            r.federation,
            r.domain.td,
            pem.display()
        ));
    }
    let admin = isthmus_federation::testing::free_port();
    let cfg = measured.dir.join("controller.yaml");
    std::fs::write(
        &cfg,
        format!(
            "kind: Controller\ncluster: {{name: {}, trustDomain: {}}}\ncaDir: {}\nsource: {{files: {}}}\nlisten: {{federation: \"{}\", local: \"127.0.0.1:0\"}}\ngatewayAddress: \"127.0.0.1:15443\"\npeers:\n{peers_yaml}admin: {{admin: \"{admin}\", metrics: \"127.0.0.1:0\", readiness: \"127.0.0.1:0\"}}\n",
            measured.name,
            measured.domain.td,
            measured.dir.join("ca").display(),
            measured.dir.display(),
            measured.federation
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(["controller", "--config", cfg.to_str().unwrap()])
        .env("ISTHMUS_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kib(child.id());
    let per_cluster_endpoints = 4000;
    let per_service = per_cluster_endpoints / 300 + 1;
    let bundles: Vec<_> = clusters.iter().map(|c| c.bundle()).collect();
    let mut bound = Vec::new();
    for r in remotes {
        r.write(
            "services.yaml",
            &service_file(&format!("{}-s", r.name), 300, per_service, ""),
        );
        bound.push(
            r.start(
                r.config(&[(measured, ExportPolicy::default())], HB, LEASE),
                &bundles,
            )
            .await,
        );
    }
    let t = Instant::now();
    let se_dir = measured.dir.join(isthmus_federation::IMPORTS_DIR);
    while std::fs::read_dir(&se_dir).map_or(0, |d| d.count()) < 300 * remotes.len() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "memory scenario did not sync"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    for b in bound {
        b.shutdown(Duration::from_secs(1)).await;
    }
    let per = (after.saturating_sub(before)) as f64 / 1024.0 / remotes.len() as f64;
    (before as f64 / 1024.0, after as f64 / 1024.0, per)
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
    // ISTHMUS_BENCH_ONLY=propagation|sync1000|sync10000|memory runs one.
    let only = std::env::var("ISTHMUS_BENCH_ONLY").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    rt.block_on(async {
        println!("| measure | result | target |");
        println!("| --- | --- | --- |");
        if run("propagation") {
        let (p50, p99) = propagation(2, 60).await;
        println!("| propagation, 2 clusters (60 exports) | p50 {p50:.1} ms, p99 {p99:.1} ms | p99 ≤ 100 ms |");
        let (p50, p99) = propagation(10, 30).await;
        println!("| propagation to all 9 peers, 10 clusters (30 exports) | p50 {p50:.1} ms, p99 {p99:.1} ms | p99 ≤ 100 ms |");
        }
        if run("sync1000") {
            let (s, l, w, r) = initial_sync(1000).await;
            println!("| initial sync, 10 clusters × 1,000 services | {s:.2} s from start ({l:.2} s after the last cluster listed its own; all files {w:.2} s; one controller restarted: {r:.2} s) | — |");
        }
        if run("sync10000") {
            let (s, l, w, r) = initial_sync(10_000).await;
            println!("| initial sync, 10 clusters × 10,000 services | {s:.2} s from start ({l:.2} s after the last cluster listed its own; all files {w:.2} s; one controller restarted: {r:.2} s) | ≤ 5 s |");
        }
        if !run("memory") {
            return;
        }
        let (before, after, per) = memory_per_remote().await;
        println!("| controller memory per remote cluster (300 services, 4,000 endpoints each; RSS {before:.1} → {after:.1} MiB with 10 remotes) | {per:.2} MiB | ≤ 20 MB |");
    });
}
