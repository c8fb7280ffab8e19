//! Sidecar benchmark with a standard load generator (wrk), one run:
//! client → sidecar → sidecar (mTLS, HTTP/2) → server, against client →
//! server directly, HTTP/1.1 keep-alive, 1 KiB answers; at a fixed
//! 1000 rps and at the maximum rate. The sidecars are real `isthmus
//! proxy` processes fed by a real controller (config stream and CA), so
//! their CPU and resident memory are read from /proc.
//!
//! `cargo bench --bench sidecar` (needs `wrk` on PATH: `apt-get install
//! wrk`). `ISTHMUS_BENCH_SECONDS` (default 10) sets each run's length,
//! `ISTHMUS_BENCH_ROUNDS` (default 3) the rounds; medians are reported.

use std::path::Path;
use std::time::{Duration, Instant};

use isthmus_e2e::load::{
    Run, cpu_times, env, median, relay_thread, rss_kib, stat_cpu_seconds, wrk,
};
use isthmus_e2e::{ClusterSpec, Harness};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env("ISTHMUS_BENCH_SECONDS", 10);
    let rounds = env("ISTHMUS_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let spec = ClusterSpec::new("bench", "us-east1", 90, &[("v1", "us-east1-a")]);
    let mut h = Harness::new(
        Path::new(env!("CARGO_BIN_EXE_isthmus")),
        dir.path(),
        vec![spec],
    )
    .unwrap()
    .log_level("error")
    // Sidecars as deployed: the sidecar-only binary.
    .proxy_bin(Path::new(env!("CARGO_BIN_EXE_isthmus-proxy")));
    h.start_controller("bench").unwrap();
    h.start_gateway("bench").unwrap();
    h.start_workload("bench", "sleep").await.unwrap();
    h.start_workload_with("bench", "helloworld-v1-0", 1024)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    h.wait_synced(deadline).await.unwrap();
    let c = h.cluster("bench");
    let client = c.client();
    let server = c.workload("helloworld-v1-0");
    let direct = server.app.as_ref().unwrap().addr;
    let proxied = client.outbound();
    let host = "helloworld.sample.svc.cluster.local:5000";
    let pids = [
        ("client sidecar", client.sidecar.as_ref().unwrap().pid()),
        ("server sidecar", server.sidecar.as_ref().unwrap().pid()),
    ];
    // The floor: the same two hops made by plain TCP relays (copy both
    // ways; no HTTP, TLS or policy), each on a thread of its own.
    let (relay_b, relay_b_stat) = relay_thread(direct);
    let (relayed, relay_a_stat) = relay_thread(relay_b);
    let relay_stats = [relay_a_stat, relay_b_stat];
    let sidecar_stats = pids.map(|(_, p)| format!("/proc/{p}/stat"));
    // A fixed-rate run (10 connections each sending every 10 ms ≈ 1000
    // rps) against `target`, and the vCPU per 1000 rps that each of the
    // processes or threads behind `stats` used meanwhile.
    let fixed_rate = |target, stats: &[String]| {
        let before: Vec<f64> = stats.iter().map(|s| stat_cpu_seconds(s)).collect();
        let t = Instant::now();
        let r = wrk(target, host, seconds, 10, Some(10));
        let wall = t.elapsed().as_secs_f64();
        let used: Vec<f64> = stats
            .iter()
            .zip(before)
            .map(|(s, b)| (stat_cpu_seconds(s) - b) / wall / (r.rps / 1000.0))
            .collect();
        (r, used)
    };
    // Warm up the paths (connections, pools).
    wrk(direct, host, 2, 10, None);
    wrk(proxied, host, 2, 10, None);
    wrk(relayed, host, 2, 10, None);

    if std::env::var_os("ISTHMUS_BENCH_PROBE").is_some() {
        for _ in 0..1 {
            eprintln!(
                "closed loop 1 conn direct  {:?}",
                wrk(direct, host, seconds, 1, None)
            );
            eprintln!(
                "closed loop 1 conn proxied {:?}",
                wrk(proxied, host, seconds, 1, None)
            );
        }
        for (name, pid) in &pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = after.split_whitespace().collect();
            eprintln!("{name} before fixed run: utime {} stime {}", f[11], f[12]);
        }
        eprintln!(
            "fixed proxied {:?}",
            wrk(proxied, host, seconds, 10, Some(10))
        );
        for (name, pid) in &pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = after.split_whitespace().collect();
            eprintln!("{name} after fixed run: utime {} stime {}", f[11], f[12]);
        }
        return;
    }
    let mut fixed_direct = Vec::new();
    let mut fixed_proxy = Vec::new();
    let mut max_direct = Vec::new();
    let mut max_proxy = Vec::new();
    let mut fixed_relay = Vec::new();
    let mut cpu = [Vec::new(), Vec::new()];
    let mut relay_cpu = Vec::new();
    let mut steal = Vec::new();
    for round in 0..rounds {
        let machine = cpu_times();
        // Fixed rate: 10 connections each sending every 10 ms ≈ 1000 rps.
        fixed_direct.push(wrk(direct, host, seconds, 10, Some(10)));
        let (r, used) = fixed_rate(proxied, &sidecar_stats);
        for (i, u) in used.into_iter().enumerate() {
            cpu[i].push(u);
        }
        fixed_proxy.push(r);
        let (r, used) = fixed_rate(relayed, &relay_stats);
        relay_cpu.extend(used);
        fixed_relay.push(r);
        // The fixed-rate runs are over: how much of the machine the
        // hypervisor gave to other guests meanwhile.
        steal.push(cpu_times().steal_since(&machine));
        max_direct.push(wrk(direct, host, seconds, 32, None));
        max_proxy.push(wrk(proxied, host, seconds, 32, None));
        eprintln!(
            "round {round} (CPU stolen by the hypervisor during the fixed-rate runs: {:.1} %): fixed direct {:?}\n         fixed proxied {:?}\n         fixed relayed {:?}\n         max direct {:?}\n         max proxied {:?}",
            steal.last().unwrap() * 100.0,
            fixed_direct.last().unwrap(),
            fixed_proxy.last().unwrap(),
            fixed_relay.last().unwrap(),
            max_direct.last().unwrap(),
            max_proxy.last().unwrap()
        );
    }
    let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    println!(
        "\n## Sidecar: wrk, HTTP/1.1 keep-alive, 1 KiB answers, {rounds} rounds x {seconds} s, medians\n"
    );
    println!("| load | path | rps | p50 µs | p90 µs | p99 µs | errors |");
    println!("|---|---|---|---|---|---|---|");
    for (load, paths) in [
        (
            "~1000 rps",
            vec![
                ("direct", &fixed_direct),
                ("two sidecars", &fixed_proxy),
                ("two plain TCP relays (floor)", &fixed_relay),
            ],
        ),
        (
            "max (32 conns)",
            vec![("direct", &max_direct), ("two sidecars", &max_proxy)],
        ),
    ] {
        for (name, runs) in paths {
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
    let added = |via: &[Run], f: fn(&Run) -> f64| {
        median(
            fixed_direct
                .iter()
                .zip(via)
                .map(|(d, p)| f(p) - f(d))
                .collect(),
        ) / 1000.0
    };
    for (name, via) in [
        ("two sidecars", &fixed_proxy),
        ("two plain TCP relays (floor)", &fixed_relay),
    ] {
        println!(
            "\nAdded latency at ~1000 rps, {name} minus direct, same round: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
            added(via, |r| r.p50),
            added(via, |r| r.p90),
            added(via, |r| r.p99)
        );
    }
    println!(
        "Plain TCP relay (floor): {:.3} vCPU per 1000 rps per relay",
        median(relay_cpu.clone())
    );
    println!(
        "CPU time stolen by the hypervisor during the fixed-rate runs: {:.1} % (median of rounds; max {:.1} %)",
        median(steal.clone()) * 100.0,
        steal.iter().cloned().fold(0.0, f64::max) * 100.0
    );
    println!(
        "Max-rate throughput ratio (two sidecars / direct): {:.2}",
        median(
            max_proxy
                .iter()
                .zip(&max_direct)
                .map(|(p, d)| p.rps / d.rps)
                .collect()
        )
    );
    for (i, (name, pid)) in pids.iter().enumerate() {
        let (pss, private) = isthmus_e2e::load::pss_private_kib(*pid);
        println!(
            "{name}: {:.3} vCPU per 1000 rps; resident {:.1} MiB now, peak {:.1} MiB; PSS {:.1} MiB, private {:.1} MiB",
            median(cpu[i].clone()),
            rss_kib(*pid, "VmRSS:") as f64 / 1024.0,
            rss_kib(*pid, "VmHWM:") as f64 / 1024.0,
            pss as f64 / 1024.0,
            private as f64 / 1024.0
        );
    }
}
