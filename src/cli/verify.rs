//! `isthmus verify`: is the mesh working, end to end? (The role of
//! `subctl verify` and `linkerd multicluster check`.) One line per check,
//! PASS or FAIL with what to fix; exits non-zero if any check fails.
//!
//! It reads the controllers' and gateways' admin APIs (each on its
//! loopback: run it where they are, or through `kubectl port-forward`) and
//! sends one request through a client sidecar.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The embedded demo's addresses (`isthmus demo`; `--net` as given
    /// to it): its three controllers, gateways and east's client.
    #[arg(long)]
    pub demo: bool,
    /// The demo's first network (127.0.NET.0/24).
    #[arg(long, default_value_t = 1, requires = "demo")]
    pub net: u8,
    /// A controller's admin address (repeat for each cluster).
    #[arg(long = "controller")]
    pub controllers: Vec<SocketAddr>,
    /// A gateway's admin address (repeat for each cluster).
    #[arg(long = "gateway")]
    pub gateways: Vec<SocketAddr>,
    /// A client sidecar's outbound address: a request goes through it.
    #[arg(long)]
    pub client: Option<SocketAddr>,
    /// The URL to request through the client sidecar.
    #[arg(
        long,
        default_value = "http://helloworld.sample.svc.cluster.local:5000/hello"
    )]
    pub url: String,
    /// A request header, `name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// The cluster that must answer (a cross-cluster request).
    #[arg(long)]
    pub expect_cluster: Option<String>,
}

/// One check's outcome.
struct Check {
    ok: bool,
    line: String,
}

fn pass(line: impl Into<String>) -> Check {
    Check {
        ok: true,
        line: line.into(),
    }
}

fn fail(line: impl Into<String>) -> Check {
    Check {
        ok: false,
        line: line.into(),
    }
}

pub fn run(mut args: VerifyArgs) -> anyhow::Result<()> {
    if args.demo {
        let n = args.net;
        for c in 0..3u8 {
            args.controllers
                .push(SocketAddr::from(([127, 0, n + c, 1], 15000)));
            args.gateways
                .push(SocketAddr::from(([127, 0, n + c, 2], 15000)));
        }
        // east's sleep client; subset v2 runs only in west.
        args.client = Some(SocketAddr::from(([127, 0, n, 10], 15001)));
        args.headers.push("x-subset: v2".into());
        args.expect_cluster = Some("west".into());
    }
    if args.controllers.is_empty() && args.gateways.is_empty() && args.client.is_none() {
        bail!(
            "nothing to verify: give --demo, or the admin addresses (--controller, --gateway) and a client sidecar (--client)"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let checks = rt.block_on(checks(&args));
    let failed = checks.iter().filter(|c| !c.ok).count();
    for c in &checks {
        println!("{}  {}", if c.ok { "PASS" } else { "FAIL" }, c.line);
    }
    if failed > 0 {
        bail!("{failed} of {} checks failed", checks.len());
    }
    println!("all {} checks passed", checks.len());
    Ok(())
}

async fn checks(args: &VerifyArgs) -> Vec<Check> {
    let mut out = Vec::new();
    // Federation: every controller connected to every peer it has, and
    // (given several) to each of the others.
    let mut names = Vec::new();
    let mut dumps = Vec::new();
    for &addr in &args.controllers {
        match super::admin_dump(addr).await {
            Ok(d) if d["component"] == "controller" => {
                names.push(d["cluster"].as_str().unwrap_or("?").to_owned());
                dumps.push((addr, d));
            }
            Ok(d) => out.push(fail(format!(
                "{addr} is the admin API of a {}, not a controller (fix: give the controller's admin address, port 15000)",
                d["component"]
            ))),
            Err(e) => out.push(fail(format!(
                "controller at {addr}: unreachable ({e}) (fix: is it running, and is this its admin address?)"
            ))),
        }
    }
    for (addr, d) in &dumps {
        let me = d["cluster"].as_str().unwrap_or("?");
        let peers = d["peers"].as_array().cloned().unwrap_or_default();
        for other in names.iter().filter(|n| *n != me) {
            if !peers.iter().any(|p| p["cluster"] == other.as_str()) {
                out.push(fail(format!(
                    "{me} ({addr}) is not linked with {other} (fix: isthmus link create in one, link apply in the other)"
                )));
            }
        }
        for p in &peers {
            let peer = p["cluster"].as_str().unwrap_or("?");
            let (connected, stale) = (p["connected"] == true, p["stale"] == true);
            if connected && !stale {
                out.push(pass(format!(
                    "{me} ↔ {peer}: federation connected ({} session(s), {} services imported)",
                    p["sessions"].as_u64().unwrap_or(1),
                    p["imported"]
                )));
            } else {
                out.push(fail(format!(
                    "{me} ↔ {peer}: federation {} — {} (fix: check that {peer}'s controller runs and that {me} can reach {}; `isthmus status --controller {addr}`)",
                    if connected { "stale" } else { "not connected" },
                    p["last_disconnect_reason"].as_str().unwrap_or("no reason recorded"),
                    p["address"].as_str().unwrap_or("its address"),
                )));
            }
        }
    }
    // Gateways: a QUIC path (handshake done, RTT measured) to every peer
    // gateway, and the peer up.
    for &addr in &args.gateways {
        match super::admin_dump(addr).await {
            Ok(d) if d["component"] == "gateway" => {
                let me = d["cluster"].as_str().unwrap_or("?").to_owned();
                let peers = d["peers"].as_array().cloned().unwrap_or_default();
                if peers.is_empty() {
                    out.push(fail(format!(
                        "{me}'s gateway knows no peer gateway (fix: the controller gives it the peers' gatewayAddress once linked)"
                    )));
                }
                for p in peers {
                    let peer = p["cluster"].as_str().unwrap_or("?");
                    match (p["health"].as_str(), p["rtt_us"].as_u64()) {
                        (Some("Up"), Some(rtt)) => out.push(pass(format!(
                            "{me} → {peer}: gateway QUIC handshake done, RTT {:.1} ms",
                            rtt as f64 / 1000.0
                        ))),
                        (health, _) => out.push(fail(format!(
                            "{me} → {peer}: gateway path {} (fix: UDP to {} must reach {peer}'s gateway; check its NodePort/LoadBalancer and firewalls)",
                            health.unwrap_or("unknown"),
                            p["address"].as_str().unwrap_or("its address")
                        ))),
                    }
                }
            }
            Ok(d) => out.push(fail(format!(
                "{addr} is the admin API of a {}, not a gateway",
                d["component"]
            ))),
            Err(e) => out.push(fail(format!(
                "gateway at {addr}: unreachable ({e}) (fix: is it running, and is this its admin address?)"
            ))),
        }
    }
    if let Some(client) = args.client {
        out.push(request(client, args).await);
    }
    out
}

/// One request through the client sidecar (as `curl -x`): answered, by
/// the expected cluster, with the caller's identity carried to the app.
async fn request(client: SocketAddr, args: &VerifyArgs) -> Check {
    let what = format!("request {} via {client}", args.url);
    let Some(rest) = args.url.strip_prefix("http://") else {
        return fail(format!("{what}: only http:// URLs (the sidecar adds mTLS)"));
    };
    let host = rest.split('/').next().unwrap_or(rest);
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n",
        args.url
    );
    for h in &args.headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(client).await?;
        s.write_all(head.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let answer = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            return fail(format!(
                "{what}: {e} (fix: is the client sidecar running there?)"
            ));
        }
        Err(_) => return fail(format!("{what}: no answer in 10 s")),
    };
    let status = answer.split_whitespace().nth(1).unwrap_or("?").to_owned();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_owned();
    if status != "200" {
        return fail(format!("{what}: {status} {body}"));
    }
    if let Some(c) = &args.expect_cluster
        && !body.contains(&format!("from {c}"))
    {
        return fail(format!(
            "{what}: answered, but not by {c}: {body} (fix: is {c}'s service exported, and are the clusters linked?)"
        ));
    }
    if !body.contains("caller spiffe://") {
        return fail(format!(
            "{what}: answered without the caller's identity: {body}"
        ));
    }
    pass(format!("{what}: {body}"))
}
