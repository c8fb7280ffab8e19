//! Load generation for the benchmarks: `wrk` runs parsed into figures,
//! and a process's CPU and memory from /proc.

use std::net::SocketAddr;
use std::process::Command;

#[derive(Debug, Clone, Default)]
pub struct Run {
    pub rps: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub errors: u64,
}

/// A numeric benchmark setting from the environment.
pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// wrk's latency value in microseconds.
fn micros(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => f64::NAN,
    }
}

/// Runs wrk against `target` with `Host: host`; `delay_ms` makes each
/// connection send every `delay_ms` (a fixed rate).
pub fn wrk(target: SocketAddr, host: &str, seconds: u64, conns: u32, delay_ms: Option<u32>) -> Run {
    let script = std::env::temp_dir().join(format!("isthmus-wrk-{}.lua", std::process::id()));
    let mut lua = format!("wrk.headers[\"Host\"] = \"{host}\"\n");
    if let Some(d) = delay_ms {
        // wrk's per-request delay: each connection sends every `d` ms,
        // so `conns` connections offer conns * 1000 / d requests/s.
        lua.push_str(&format!("function delay() return {d} end\n"));
    }
    std::fs::write(&script, lua).unwrap();
    let out = Command::new("wrk")
        .args([
            if conns < 2 { "-t1" } else { "-t2" },
            &format!("-c{conns}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
            script.to_str().unwrap(),
            &format!("http://{target}/"),
        ])
        .output()
        .expect("wrk is installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = Run::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["50%", v] => r.p50 = micros(v),
            ["90%", v] => r.p90 = micros(v),
            ["99%", v] => r.p99 = micros(v),
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", ..] => {
                r.errors += w
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    assert!(
        r.rps > 0.0,
        "wrk failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    r
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) from a `stat` file of /proc: a
/// process's, or one thread's (`/proc/<pid>/task/<tid>/stat`).
pub fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

pub fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A process's proportional set size and private dirty memory, in KiB
/// (`/proc/<pid>/smaps_rollup`): what it costs beyond the binary's pages
/// that every process of the same binary shares.
pub fn pss_private_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Private_Dirty:"))
}

/// A plain TCP relay on a thread of its own (a one-thread runtime, as a
/// one-worker sidecar process has): accepts, connects to `to`, copies
/// both ways, nothing else. The floor that any userspace hop costs on
/// this machine, to set a proxy's figures against. Returns its address
/// and its thread's `stat` file, for its CPU time.
pub fn relay_thread(to: SocketAddr) -> (SocketAddr, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            let me = std::fs::read_link("/proc/thread-self").unwrap();
            tx.send(format!("{}/stat", me.display())).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((mut a, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let Ok(mut b) = tokio::net::TcpStream::connect(to).await else {
                            return;
                        };
                        let _ = a.set_nodelay(true);
                        let _ = b.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    });
                }
            });
        })
        .unwrap();
    // /proc/thread-self reads as "<pid>/task/<tid>".
    let stat = format!("/proc/{}", rx.recv().unwrap());
    (addr, stat)
}

/// This machine's CPU time so far, from the `cpu` line of /proc/stat
/// (clock ticks): all of it, and what the hypervisor stole (time a vCPU
/// wanted to run and another guest had the core).
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    pub total: u64,
    pub steal: u64,
}

pub fn cpu_times() -> CpuTimes {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let line = stat.lines().find(|l| l.starts_with("cpu ")).unwrap();
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap())
        .collect();
    CpuTimes {
        total: f.iter().sum(),
        steal: f.get(7).copied().unwrap_or(0),
    }
}

impl CpuTimes {
    /// The share of CPU time stolen between `earlier` and this reading.
    pub fn steal_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }
}
