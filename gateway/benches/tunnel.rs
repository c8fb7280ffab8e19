//! Gateway data-path benchmark, against direct loopback TCP in the same
//! run: bulk throughput with 1 and 8 connections, warm request/response
//! latency (1 B and 1 KiB), and the added cost of a new connection.
//!
//! `cargo bench -p isthmus-gateway --bench tunnel` (release build). The
//! path is client → east gateway (TCP, SNI) → QUIC → west gateway → TCP
//! backend. The client sends a real TLS ClientHello first (the gateways
//! route on it) and then raw bytes: gateways never look past the
//! ClientHello, so this measures exactly their cost. Every figure is the
//! median of several runs; the machine is shared and noisy. The warm
//! round trips take the direct path, the gateways and two plain TCP
//! relays (the floor any two userspace hops cost here) in alternating
//! blocks.
//!
//! `ISTHMUS_BENCH_QUICK=1`: throughput only; `ISTHMUS_BENCH_LATENCY=1`:
//! latency only; `ISTHMUS_BENCH_MTU=N`: QUIC packet size;
//! `ISTHMUS_BENCH_WORKERS=N`: the gateways' runtime threads (default 2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::model::{ImportedService, MeshState};
use isthmus_gateway::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RUNS: usize = 5;
const BULK_FOR: Duration = Duration::from_millis(1500);
const ROUND_TRIPS: usize = 3000;
const NEW_CONNECTIONS: usize = 400;

fn client_hello(sni: &str) -> Vec<u8> {
    isthmus_core::tls::install_crypto_provider();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), sni.to_owned().try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Reads and discards; at EOF answers with the byte count.
async fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    addr
}

/// Echoes everything.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[derive(Clone, Copy)]
struct Paths {
    /// Where the client connects: a backend directly, or east's gateway.
    sink: SocketAddr,
    echo: SocketAddr,
    /// The echo backend behind two plain TCP relays (the floor).
    relayed_echo: SocketAddr,
}

async fn open(addr: SocketAddr, hello: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(hello).await.unwrap();
    s
}

async fn bulk(addr: SocketAddr, hello: &[u8], conns: usize) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let hello = hello.to_vec();
            tokio::spawn(async move {
                let mut s = open(addr, &hello).await;
                let chunk = vec![0x5au8; 128 * 1024];
                let t = Instant::now();
                while t.elapsed() < BULK_FOR {
                    s.write_all(&chunk).await.unwrap();
                }
                s.shutdown().await.unwrap();
                let mut n = [0u8; 8];
                s.read_exact(&mut n).await.unwrap();
                u64::from_be_bytes(n)
            })
        })
        .collect();
    let mut total = 0u64;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Warm round trips of `size` bytes on one connection per path, in
/// blocks: a block of consecutive round trips on one path (its first
/// ones, while caches warm up, not counted), then a block on the next,
/// and round again. Each path runs warm, as a busy connection does, and
/// all paths share the same stretches of this shared machine: a drift in
/// its wake-up times cannot land on one path's series only. One series
/// per path.
async fn round_trips(paths: &[SocketAddr], hello: &[u8], size: usize) -> Vec<Vec<Duration>> {
    const BLOCKS: usize = 6;
    const WARM: usize = 50;
    let mut conns = Vec::new();
    for &addr in paths {
        let mut s = open(addr, hello).await;
        let mut back = vec![0u8; hello.len()];
        s.read_exact(&mut back).await.unwrap();
        conns.push(s);
    }
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; size];
    let mut out = vec![Vec::with_capacity(ROUND_TRIPS); paths.len()];
    for _ in 0..BLOCKS {
        for (s, out) in conns.iter_mut().zip(&mut out) {
            for i in 0..WARM + ROUND_TRIPS / BLOCKS {
                let t = Instant::now();
                s.write_all(&msg).await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
                if i >= WARM {
                    out.push(t.elapsed());
                }
            }
        }
    }
    out
}

/// A plain TCP relay (accept, connect on, copy both ways): what any
/// userspace hop costs on this machine, without QUIC, TLS or routing.
async fn relay(to: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut a, _) = l.accept().await.unwrap();
            a.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut b = TcpStream::connect(to).await.unwrap();
                b.set_nodelay(true).unwrap();
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    });
    addr
}

async fn new_connections(addr: SocketAddr, hello: &[u8]) -> Vec<Duration> {
    let mut out = Vec::with_capacity(NEW_CONNECTIONS);
    let mut back = vec![0u8; hello.len()];
    for _ in 0..NEW_CONNECTIONS {
        let t = Instant::now();
        let mut s = open(addr, hello).await;
        s.read_exact(&mut back).await.unwrap();
        out.push(t.elapsed());
    }
    out
}

async fn measure(direct: Paths, via: Paths, hello_sink: Vec<u8>, hello_echo: Vec<u8>, mode: Mode) {
    println!("| measure | direct | through gateways | ratio / added |");
    println!("| --- | --- | --- | --- |");
    let conns: &[usize] = if mode == Mode::Latency { &[] } else { &[1, 8] };
    for &conns in conns {
        let mut d = Vec::new();
        let mut g = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..RUNS {
            d.push(bulk(direct.sink, &hello_sink, conns).await);
            let (c0, t0) = (cpu_seconds(), Instant::now());
            g.push(bulk(via.sink, &hello_sink, conns).await);
            cpu.push((cpu_seconds() - c0) / t0.elapsed().as_secs_f64());
        }
        eprintln!(
            "(gateway bulk, {conns} conn: process CPU {:.2} cores of 2)",
            median(cpu)
        );
        let (d, g) = (median(d), median(g));
        println!(
            "| bulk throughput, {conns} connection(s) | {d:.0} MB/s | {g:.0} MB/s | {:.3} × direct |",
            g / d
        );
    }
    if mode == Mode::Throughput {
        return;
    }
    for size in [1usize, 1024] {
        // p50 and p99 of each run, per path: direct, gateways, relays.
        let mut p50 = [Vec::new(), Vec::new(), Vec::new()];
        let mut p99 = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..RUNS {
            let runs = round_trips(
                &[direct.echo, via.echo, via.relayed_echo],
                &hello_echo,
                size,
            )
            .await;
            for (i, mut r) in runs.into_iter().enumerate() {
                p50[i].push(us(pct(&mut r, 0.5)));
                p99[i].push(us(pct(&mut r, 0.99)));
            }
        }
        for (q, runs) in [("p50", p50), ("p99", p99)] {
            let [d, g, r] = runs.map(median);
            println!(
                "| warm round trip {size} B, {q} | {d:.1} µs | {g:.1} µs | +{:.1} µs (two plain TCP relays: +{:.1} µs) |",
                g - d,
                r - d
            );
        }
    }
    let mut d50 = Vec::new();
    let mut g50 = Vec::new();
    let mut d99 = Vec::new();
    let mut g99 = Vec::new();
    for _ in 0..RUNS {
        let mut d = new_connections(direct.echo, &hello_echo).await;
        let mut g = new_connections(via.echo, &hello_echo).await;
        d50.push(us(pct(&mut d, 0.5)));
        g50.push(us(pct(&mut g, 0.5)));
        d99.push(us(pct(&mut d, 0.99)));
        g99.push(us(pct(&mut g, 0.99)));
    }
    let (d50, g50, d99, g99) = (median(d50), median(g50), median(d99), median(g99));
    println!(
        "| new connection to first byte, p50 | {d50:.1} µs | {g50:.1} µs | +{:.1} µs |",
        g50 - d50
    );
    println!(
        "| new connection to first byte, p99 | {d99:.1} µs | {g99:.1} µs | +{:.1} µs |",
        g99 - d99
    );
}

/// CPU seconds this process has used (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5); 11 and 12 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// What one pass measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    All,
    Throughput,
    Latency,
}

fn main() {
    // ISTHMUS_BENCH_QUICK=1: only bulk throughput, for quick iteration;
    // ISTHMUS_BENCH_LATENCY=1: only the warm and new-connection latency.
    let mode = if std::env::var_os("ISTHMUS_BENCH_QUICK").is_some() {
        Mode::Throughput
    } else if std::env::var_os("ISTHMUS_BENCH_LATENCY").is_some() {
        Mode::Latency
    } else {
        Mode::All
    };
    // ISTHMUS_BENCH_MTU=N: QUIC packet size (maxUdpPayload). Loopback's
    // MTU is 65,536 and direct TCP uses 64 KiB segments on it, so the
    // tunnel gets the largest packets the gateway takes; a second,
    // throughput-only pass shows the Ethernet default.
    let mtu: u16 = std::env::var("ISTHMUS_BENCH_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(isthmus_gateway::config::MAX_UDP_PAYLOAD);
    println!("\nQUIC maxUdpPayload = {mtu}\n");
    run(mtu, mode);
    let default = isthmus_gateway::config::DEFAULT_MAX_UDP_PAYLOAD;
    if mtu != default && mode != Mode::Latency {
        println!("\nQUIC maxUdpPayload = {default} (the default, for Ethernet paths)\n");
        run(default, Mode::Throughput);
    }
}

fn run(max_udp_payload: u16, mode: Mode) {
    // ISTHMUS_BENCH_WORKERS=N: the gateways' runtime threads (default 2).
    let workers = std::env::var("ISTHMUS_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mesh = Mesh::new();
        let (east, east_tx) = gateway_with(&mesh, mesh.get("east"), max_udp_payload).await;
        let (west, west_tx) = gateway_with(&mesh, mesh.get("west"), max_udp_payload).await;
        let sink_addr = sink().await;
        let echo_addr = echo().await;

        // West exports two services: "sink" and "echo" (helloworld's key
        // with different names).
        let mut ws = MeshState {
            version: 1,
            peers: peers(&mesh, &[("east", east.peer_addr)].into()),
            ..Default::default()
        };
        let mut es = MeshState {
            version: 1,
            peers: peers(&mesh, &[("west", west.peer_addr)].into()),
            ..Default::default()
        };
        for (name, addr) in [("sink", sink_addr), ("echo", echo_addr)] {
            let key = isthmus_core::model::ServiceKey::new("sample", name);
            let mut svc =
                (*local_service(Some(addr), &["east"], &mesh.get("west").locality)).clone();
            svc.key = key.clone();
            ws.local.insert(key.clone(), Arc::new(svc));
            es.imported.insert(
                key.clone(),
                Arc::new(ImportedService {
                    key,
                    ports: vec![],
                    clusters: vec![remote(mesh.get("west"), 1)],
                }),
            );
        }
        west_tx.send_replace(Arc::new(ws));
        east_tx.send_replace(Arc::new(es));
        tokio::time::sleep(Duration::from_millis(300)).await;

        let hello_sink = client_hello(&format!(
            "outbound_.{SVC_PORT}_._.sink.sample.svc.cluster.local"
        ));
        let hello_echo = client_hello(&format!(
            "outbound_.{SVC_PORT}_._.echo.sample.svc.cluster.local"
        ));
        let relayed_echo = relay(relay(echo_addr).await).await;
        let direct = Paths {
            sink: sink_addr,
            echo: echo_addr,
            relayed_echo,
        };
        let via = Paths {
            sink: east.sidecar_addr,
            echo: east.sidecar_addr,
            relayed_echo,
        };

        // The client runs on a thread and runtime of its own, like a
        // separate process: its wakeups do not queue behind the gateways'.
        let client = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(measure(direct, via, hello_sink, hello_echo, mode));
        });
        while !client.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.join().unwrap();
        println!("\n(east → west path: {:?})", east.peer_paths());
        let _ = east.shutdown(Duration::from_secs(1)).await;
        let _ = west.shutdown(Duration::from_secs(1)).await;
    });
}
