//! `isthmus demo`: three clusters on this machine — east (us-east1, zones
//! a and b), west (us-west1), eu (europe-west1) — on 127.0.1.0/24,
//! 127.0.2.0/24 and 127.0.3.0/24, each with its own trust domain and CA,
//! a controller, a gateway, and sidecars in front of the built-in
//! helloworld app (v1 in east and west, v2 in west). Every component is a
//! real process of this binary; clusters are peered with `isthmus link`
//! tokens. The manifests stay editable while the demo runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use isthmus_e2e::{Client, Harness, demo_clusters};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Scenario {
    /// Steady traffic from east while east's, then west's instances die,
    /// then come back.
    Failover,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the clusters' manifests, PKI and logs go (a previous demo
    /// directory is reused after wiping its state).
    #[arg(long, default_value = "/tmp/isthmus-demo")]
    pub dir: PathBuf,
    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C.
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    /// Run a scripted scenario, then exit.
    #[arg(long)]
    pub scenario: Option<Scenario>,
    /// Third octet of the first cluster's loopback range.
    #[arg(long, default_value_t = 1, hide = true)]
    pub net: u8,
}

fn duration(s: &str) -> Result<Duration, String> {
    isthmus_core::config::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration; use e.g. 30s or 5m"))
}

const MARKER: &str = ".isthmus-demo";
const URL: &str = "http://helloworld.sample.svc.cluster.local:5000/hello";

fn prepare(dir: &PathBuf) -> anyhow::Result<()> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        if !dir.join(MARKER).exists() {
            bail!(
                "{} exists and is not a demo directory; choose another with --dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot clear the previous demo in {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(MARKER),
        "written by isthmus demo; removed by the next one\n",
    )?;
    Ok(())
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    prepare(&args.dir)?;
    let bin = std::env::current_exe().context("cannot find this binary")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let started = Instant::now();
        let mut h = Harness::new(&bin, &args.dir, demo_clusters(args.net))?;
        // SIGTERM (what `timeout`, systemd or a CI runner sends) or SIGINT,
        // at any point: the harness is dropped, which stops every
        // controller, gateway and sidecar process it started.
        let outcome = tokio::select! {
            r = demo(&mut h, &args, started) => r,
            sig = isthmus_core::signal::shutdown_requested() => {
                println!("\n{sig}: stopping");
                Ok(())
            }
        };
        drop(h);
        println!(
            "demo stopped; manifests and logs stay in {}",
            args.dir.display()
        );
        outcome
    })
}

/// Brings the mesh up, prints the guide, then runs the scenario or waits.
async fn demo(h: &mut Harness, args: &DemoArgs, started: Instant) -> anyhow::Result<()> {
    println!(
        "starting 3 clusters (east, west, eu) in {}",
        args.dir.display()
    );
    h.start_all(Duration::from_secs(60)).await.with_context(|| {
        format!(
            "the demo did not come up (is another demo running? its addresses are 127.0.{}-{}.x); logs are in {}",
            args.net,
            args.net + 2,
            args.dir.join("logs").display()
        )
    })?;
    let samples = samples(h).await?;
    print_guide(h, args);
    println!("{samples}");
    println!("ready ({:.1} s)", started.elapsed().as_secs_f64());
    match args.scenario {
        Some(Scenario::Failover) => failover(h).await,
        None => {
            match args.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
            Ok(())
        }
    }
}

/// A VirtualService in east sends `x-subset: v2` to subset v2, which only
/// west runs; the demo makes both calls once and shows the answers.
const EAST_VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: helloworld, namespace: sample}\n\
spec:\n  hosts: [helloworld]\n  http:\n  - match: [{headers: {x-subset: {exact: v2}}}]\n    route: [{destination: {host: helloworld, subset: v2}}]\n\
\x20 - route: [{destination: {host: helloworld}}]\n";

async fn samples(h: &Harness) -> anyhow::Result<String> {
    h.apply("east", "helloworld-virtualservice.yaml", EAST_VS)?;
    let mut c = Client::new(h.cluster("east").client().outbound());
    let local = c.get(URL).await;
    // The VirtualService reaches the sidecar within a config update.
    let deadline = Instant::now() + Duration::from_secs(10);
    let remote = loop {
        let a = c.get_with(URL, &[("x-subset", "v2")]).await;
        if a.cluster() == Some("west") || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if remote.cluster() != Some("west") {
        bail!(
            "the cross-cluster sample call did not reach west: {} {}",
            remote.status,
            remote.body.trim()
        );
    }
    Ok(format!(
        "from east's client:\n  {}\n  with x-subset: v2 → {}",
        local.body.trim(),
        remote.body.trim()
    ))
}

fn print_guide(h: &Harness, args: &DemoArgs) {
    let east = h.cluster("east");
    let client = east.client().outbound();
    let me = std::env::args().next().unwrap_or_else(|| "isthmus".into());
    println!();
    for c in &h.clusters {
        println!(
            "  {:<5} {:<13} manifests {}  controller admin {}  gateway admin {}",
            c.spec.name,
            c.spec.region,
            c.manifests().display(),
            c.controller_admin(),
            c.gateway_admin()
        );
    }
    println!(
        "\ncall helloworld from east's client sidecar (curl -x speaks to it as a forward proxy):\n\
         \x20 curl -x http://{client} {URL}\n\
         \x20 curl -x http://{client} -H 'x-subset: v2' {URL}   # v2 runs only in west: crosses clusters\n\
         \x20 curl -x http://{client} http://helloworld.sample.svc.clusterset.local:5000/hello\n\
         see what east's controller knows of its peers, and check the whole mesh:\n\
         \x20 {me} status --controller {}\n\
         \x20 {me} verify --demo --net {net}\n\
         withdraw west's export (watch `status` and east's imports change), then restore it:\n\
         \x20 mv {m}/helloworld-export.yaml {d}/\n\
         \x20 mv {d}/helloworld-export.yaml {m}/\n\
         watch a failover: run `{me} demo --scenario failover` instead.\n\
         sidecar config dump and Istio metrics:\n\
         \x20 curl http://{}/config_dump   curl http://{}/stats/prometheus\n\
         logs: {}\n",
        east.controller_admin(),
        east.client().admin(),
        east.client().metrics(),
        args.dir.join("logs").display(),
        m = h.cluster("west").manifests().display(),
        d = args.dir.display(),
        net = args.net,
    );
}

/// Steady traffic from east; east's instances die, then west's; then
/// all come back. Prints each move and how long it took.
async fn failover(h: &mut Harness) -> anyhow::Result<()> {
    let proxy = h.cluster("east").client().outbound();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, String)>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let load = tokio::spawn(async move {
        let mut c = Client::new(proxy);
        let (mut sent, mut failed) = (0u64, 0u64);
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let a = c.get(URL).await;
            sent += 1;
            let who = if a.ok() {
                a.cluster().unwrap_or("?").to_owned()
            } else {
                failed += 1;
                format!("failed ({} {})", a.status, a.body.trim())
            };
            let _ = tx.send((Instant::now(), who));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (sent, failed)
    });
    // Waits until `n` answers in a row come from `to`; prints the move.
    async fn moved(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>,
        since: Instant,
        what: &str,
        to: &str,
    ) -> anyhow::Result<()> {
        let mut streak = 0;
        let mut first: Option<Instant> = None;
        while streak < 10 {
            let Some((t, who)) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .ok()
                .flatten()
            else {
                bail!("{what}: no answer from {to} within 30 s");
            };
            if who.starts_with("failed") {
                println!("  {who}");
            }
            if who == to {
                first.get_or_insert(t);
                streak += 1;
            } else {
                first = None;
                streak = 0;
            }
        }
        let took = first.map_or(Duration::ZERO, |f| f.saturating_duration_since(since));
        println!(
            "{what}: traffic now served by {to}, {:.0} ms after the change",
            took.as_secs_f64() * 1000.0
        );
        Ok(())
    }
    println!("\nfailover scenario: a request from east every 20 ms");
    moved(&mut rx, Instant::now(), "start", "east").await?;
    let t = Instant::now();
    h.kill_instance("east", "helloworld-v1-0")?;
    h.kill_instance("east", "helloworld-v1-1")?;
    moved(&mut rx, t, "east's helloworld instances killed", "west").await?;
    let t = Instant::now();
    h.kill_instance("west", "helloworld-v1-0")?;
    h.kill_instance("west", "helloworld-v2-0")?;
    moved(&mut rx, t, "west's helloworld instances killed", "eu").await?;
    let t = Instant::now();
    for (c, w) in [
        ("east", "helloworld-v1-0"),
        ("east", "helloworld-v1-1"),
        ("west", "helloworld-v1-0"),
        ("west", "helloworld-v2-0"),
    ] {
        h.revive_instance(c, w).await?;
    }
    moved(&mut rx, t, "all instances back", "east").await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = load.await?;
    println!("requests sent {sent}, failed {failed}");
    if failed > 0 {
        bail!("{failed} of {sent} requests failed during the failover scenario");
    }
    Ok(())
}
