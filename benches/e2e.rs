//! End-to-end benchmark on the demo path, one run: three clusters as
//! processes (the demo's), east's instances down so east's traffic
//! crosses to west: client → east sidecar → east gateway → QUIC → west
//! gateway → west sidecar → app, against the same app directly. Then
//! failover time (instances killed → first answer from the next cluster,
//! with a request every 10 ms) and propagation time (ServiceExport
//! removed / restored in west → east's sidecar config changes).
//!
//! `cargo bench --bench e2e` (needs `wrk`). `ISTHMUS_BENCH_SECONDS`
//! (default 5) and `ISTHMUS_BENCH_ROUNDS` (default 3); medians.

use std::path::Path;
use std::time::{Duration, Instant};

use isthmus_e2e::load::{Run, env, median, wrk};
use isthmus_e2e::{Client, Harness, demo_clusters};

const URL: &str = "http://helloworld.sample.svc.cluster.local:5000/";

/// Sends a request every 10 ms from east until an answer comes from `to`;
/// returns the time since `since`.
async fn until_served_by(h: &Harness, since: Instant, to: &str) -> Duration {
    let mut c = Client::new(h.cluster("east").client().outbound());
    loop {
        let a = c.get(URL).await;
        if a.cluster() == Some(to) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "never served by {to}: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env("ISTHMUS_BENCH_SECONDS", 5);
    let rounds = env("ISTHMUS_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(
        Path::new(env!("CARGO_BIN_EXE_isthmus")),
        dir.path(),
        demo_clusters(80),
    )
    .unwrap()
    .log_level("error");
    h.start_all(Duration::from_secs(60)).await.unwrap();

    // Propagation: west withdraws and restores its export.
    let (mut withdraw, mut restore) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        h.set_exported("west", false).unwrap();
        while h.imported("east").await.contains(&"west".to_owned()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        withdraw.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        h.set_exported("west", true).unwrap();
        while !h.imported("east").await.contains(&"west".to_owned()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        restore.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    // The cross-cluster path.
    h.kill_instance("east", "helloworld-v1-0").unwrap();
    h.kill_instance("east", "helloworld-v1-1").unwrap();
    until_served_by(&h, Instant::now(), "west").await;
    let proxied = h.cluster("east").client().outbound();
    let direct = h
        .cluster("west")
        .workload("helloworld-v1-0")
        .app
        .as_ref()
        .unwrap()
        .addr;
    let host = "helloworld.sample.svc.cluster.local:5000";
    wrk(direct, host, 2, 10, None);
    wrk(proxied, host, 2, 10, None);
    let (mut fd, mut fp, mut md, mut mp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        fd.push(wrk(direct, host, seconds, 10, Some(10)));
        fp.push(wrk(proxied, host, seconds, 10, Some(10)));
        md.push(wrk(direct, host, seconds, 32, None));
        mp.push(wrk(proxied, host, seconds, 32, None));
    }

    // Failover: west's instances die (→ eu), then come back (→ west).
    let (mut to_eu, mut back) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        h.kill_instance("west", "helloworld-v1-0").unwrap();
        h.kill_instance("west", "helloworld-v2-0").unwrap();
        to_eu.push(until_served_by(&h, t, "eu").await.as_secs_f64() * 1000.0);
        let t = Instant::now();
        h.revive_instance("west", "helloworld-v1-0").await.unwrap();
        h.revive_instance("west", "helloworld-v2-0").await.unwrap();
        back.push(until_served_by(&h, t, "west").await.as_secs_f64() * 1000.0);
    }

    let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    println!(
        "\n## End to end: east client → two sidecars, two gateways (QUIC) → west app; {rounds} rounds x {seconds} s, medians\n"
    );
    println!("| load | path | rps | p50 µs | p90 µs | p99 µs | errors |");
    println!("|---|---|---|---|---|---|---|");
    for (load, d, p) in [("~1000 rps", &fd, &fp), ("max (32 conns)", &md, &mp)] {
        for (name, runs) in [
            ("direct to west's app", d),
            ("east → west through the mesh", p),
        ] {
            println!(
                "| {load} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                m(runs, |r| r.rps),
                m(runs, |r| r.p50),
                m(runs, |r| r.p90),
                m(runs, |r| r.p99),
                runs.iter().map(|r| r.errors).sum::<u64>()
            );
        }
    }
    println!(
        "\nthroughput ratio (mesh / direct, max rate): {:.2}; p50 latency ratio at ~1000 rps: {:.1}",
        median(mp.iter().zip(&md).map(|(p, d)| p.rps / d.rps).collect()),
        median(fp.iter().zip(&fd).map(|(p, d)| p.p50 / d.p50).collect())
    );
    println!(
        "failover west → eu (instances killed → first answer from eu): median {:.0} ms of {:?}",
        median(to_eu.clone()),
        to_eu.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
    println!(
        "failback eu → west (instances back → first answer from west): median {:.0} ms",
        median(back)
    );
    println!(
        "propagation to east's sidecar: export withdrawn median {:.0} ms, restored median {:.0} ms",
        median(withdraw),
        median(restore)
    );
}
