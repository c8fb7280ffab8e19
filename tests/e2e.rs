//! End-to-end scenarios on the multi-cluster harness: every component a
//! real process of the built binary, on loopback ranges 127.0.N.0/24.

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use isthmus_e2e::{Client, Harness, demo_clusters, failures};

/// Each scenario runs ~15 processes; on 2 cores they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NET: AtomicU8 = AtomicU8::new(40);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_isthmus"))
}

async fn three_clusters(dir: &Path) -> Harness {
    let base = NET.fetch_add(3, Ordering::Relaxed);
    let dir = isthmus_e2e::scenario_dir(dir, base);
    let mut h = Harness::new(bin(), &dir, demo_clusters(base)).unwrap();
    h.start_all(Duration::from_secs(30)).await.unwrap();
    h
}

use isthmus_e2e::HELLO_URL as URL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_cluster_call_keeps_the_callers_identity() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let h = three_clusters(dir.path()).await;
    // eu runs one instance; from eu's client, local first.
    let mut c = Client::new(h.cluster("eu").client().outbound());
    let a = c.get(URL).await;
    assert_eq!(a.cluster(), Some("eu"), "{a:?}");
    // east has no v2: a clusterset name with subset routing is covered
    // elsewhere; here the clusterset host from east reaches every cluster.
    let mut c = Client::new(h.cluster("east").client().outbound());
    let a = c.get(URL).await;
    assert_eq!(a.cluster(), Some("east"), "{a:?}");
    assert!(
        a.body
            .contains("caller spiffe://east.local/ns/sample/sa/sleep"),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_goes_zone_then_region_then_other_region_and_fails_back() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = three_clusters(dir.path()).await;
    let mut all = Vec::new();
    // east's client is in us-east1-a: its zone's instance answers.
    let a = h.traffic("east", 10).await;
    assert!(a.iter().all(|x| x == "east"), "{a:?}");
    let inst = |h: &Harness| {
        h.cluster("east")
            .workload("helloworld-v1-0")
            .app
            .as_ref()
            .unwrap()
            .hits()
    };
    let before = inst(&h);
    h.traffic("east", 10).await;
    assert_eq!(inst(&h) - before, 10, "same zone first");

    // Zone a dies: zone b of the same region, zero failures.
    h.kill_instance("east", "helloworld-v1-0").unwrap();
    let a = h.traffic("east", 20).await;
    assert!(failures(&a).is_empty(), "{a:?}");
    assert!(a.iter().all(|x| x == "east"), "{a:?}");
    all.extend(a);

    // Region us-east1 dies: west (the DestinationRule's failover target),
    // not eu.
    h.kill_instance("east", "helloworld-v1-1").unwrap();
    let a = h.traffic("east", 30).await;
    assert!(failures(&a).is_empty(), "{a:?}");
    assert!(a.iter().all(|x| x == "west"), "{a:?}");
    all.extend(a);

    // West dies too: eu.
    h.kill_instance("west", "helloworld-v1-0").unwrap();
    h.kill_instance("west", "helloworld-v2-0").unwrap();
    let a = h.traffic("east", 30).await;
    assert!(failures(&a).is_empty(), "{a:?}");
    let took = h
        .until("east", "moves to eu", |a| a.iter().all(|x| x == "eu"))
        .await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    all.extend(a);

    // Failback: east's instances return and take the traffic again.
    h.revive_instance("east", "helloworld-v1-0").await.unwrap();
    h.revive_instance("east", "helloworld-v1-1").await.unwrap();
    h.until("east", "fails back to east", |a| {
        a.iter().all(|x| x == "east")
    })
    .await;
    assert!(failures(&all).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_process_costs_zero_failed_new_requests() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = three_clusters(dir.path()).await;
    // east has no instance left: its traffic crosses to west.
    h.kill_instance("east", "helloworld-v1-0").unwrap();
    h.kill_instance("east", "helloworld-v1-1").unwrap();
    h.until("east", "crosses to west", |a| a.iter().all(|x| x == "west"))
        .await;
    // Steady traffic while west's gateway process is SIGKILLed.
    let load = {
        let proxy = h.cluster("east").client().outbound();
        tokio::spawn(async move {
            let mut c = Client::new(proxy);
            let mut out = Vec::new();
            for _ in 0..150 {
                out.push(c.get(URL).await.label());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    h.kill_gateway("west");
    let a = load.await.unwrap();
    assert!(failures(&a).is_empty(), "{:?}", failures(&a));
    assert!(
        a.iter().any(|x| x == "west") && a.iter().any(|x| x == "eu"),
        "{a:?}"
    );
    let last: Vec<&String> = a.iter().rev().take(50).collect();
    assert!(last.iter().all(|x| *x == "eu"), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_unexport_propagate_and_a_controller_restart_loses_no_import() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = three_clusters(dir.path()).await;
    assert_eq!(h.imported("east").await, ["eu", "west"]);

    // Withdraw west's export: gone from east's sidecars.
    let t = std::time::Instant::now();
    h.set_exported("west", false).unwrap();
    while h.imported("east").await.contains(&"west".to_owned()) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "unexport did not propagate"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unexport = t.elapsed();
    // Export again: back.
    let t = std::time::Instant::now();
    h.set_exported("west", true).unwrap();
    while !h.imported("east").await.contains(&"west".to_owned()) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "export did not propagate"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "unexport seen in east's sidecar after {unexport:?}, export after {:?}",
        t.elapsed()
    );

    // east's controller is SIGKILLed and restarted: its sidecars keep
    // their imports throughout, and afterwards they are all still there.
    let entries = |h: &Harness| {
        let mut v: Vec<String> = std::fs::read_dir(h.cluster("east").manifests())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    };
    let files_before = entries(&h);
    h.restart_controller("east", &["eu", "west"]).await.unwrap();
    for _ in 0..10 {
        assert_eq!(h.imported("east").await, ["eu", "west"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        entries(&h),
        files_before,
        "no ServiceEntry lost or added by the restart"
    );
}

#[test]
fn the_demo_comes_up_prints_ready_and_survives_its_failover_scenario() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _serial = rt.block_on(SERIAL.lock());
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let net = NET.fetch_add(3, Ordering::Relaxed).to_string();
    let out = std::process::Command::new(bin())
        .args(["demo", "--scenario", "failover", "--net", &net, "--dir"])
        .arg(&demo)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.lines().any(|l| l.starts_with("ready")), "{stdout}");
    assert!(stdout.contains("curl -x http://127.0."), "{stdout}");
    // A cross-cluster answer right away: v2 runs only in west.
    assert!(
        stdout.contains("with x-subset: v2 → helloworld v2 from west")
            && stdout.contains("caller spiffe://east.local/ns/sample/sa/sleep"),
        "{stdout}"
    );
    assert!(stdout.contains("traffic now served by west"), "{stdout}");
    assert!(stdout.contains("traffic now served by eu"), "{stdout}");
    assert!(stdout.contains("failed 0"), "{stdout}");
    // A second run reuses the directory (it is a demo directory).
    let out = std::process::Command::new(bin())
        .args(["demo", "--duration", "1s", "--net", &net, "--dir"])
        .arg(&demo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Any other non-empty directory is refused, untouched.
    std::fs::write(dir.path().join("precious"), "x").unwrap();
    let out = std::process::Command::new(bin())
        .args(["demo", "--duration", "1s", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a demo directory"));
    assert!(dir.path().join("precious").exists());
}

/// `kill <demo pid>` (SIGTERM, as `timeout`, systemd or a CI runner
/// send) stops every process the demo started, so the next demo can bind
/// its addresses.
#[test]
fn isthmus_verify_passes_on_the_demo_and_sigterm_leaves_no_process_behind() {
    use std::io::BufRead as _;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _serial = rt.block_on(SERIAL.lock());
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let net = NET.fetch_add(3, Ordering::Relaxed).to_string();
    let mut child = std::process::Command::new(bin())
        .args(["demo", "--net", &net, "--dir"])
        .arg(&demo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.starts_with("ready"));
    assert!(ready, "the demo never printed ready");
    let demo_pid = child.id();
    let ours = || -> Vec<String> {
        let needle = demo.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                (pid != demo_pid && cmd.contains(&needle)).then(|| format!("{pid}: {cmd}"))
            })
            .collect()
    };
    let before = ours();
    assert!(before.len() >= 10, "the demo's processes: {before:?}");

    // `isthmus verify --demo`: federation between every pair, a QUIC path
    // from every gateway to every other, and a request from east that
    // west answers with east's caller identity.
    let verify = |extra: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(["verify", "--demo", "--net", &net])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let t = std::time::Instant::now();
    let (ok, text, err) = loop {
        // Gateways measure their paths' RTT once traffic or probes flowed.
        let r = verify(&[]);
        if r.0 || t.elapsed() > Duration::from_secs(15) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(ok, "{text}{err}");
    let passes = text.lines().filter(|l| l.starts_with("PASS")).count();
    assert_eq!(passes, 6 + 6 + 1, "{text}");
    assert!(
        text.contains("PASS  east ↔ west: federation connected"),
        "{text}"
    );
    assert!(
        text.contains("PASS  eu → east: gateway QUIC handshake done"),
        "{text}"
    );
    assert!(
        text.contains("helloworld v2 from west")
            && text.contains("caller spiffe://east.local/ns/sample/sa/sleep"),
        "{text}"
    );
    // A controller that is not there fails verify, naming it and the fix.
    let bogus = format!("127.0.{net}.9:15000");
    let (ok, text, err) = verify(&["--controller", &bogus]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("FAIL  controller at {bogus}: unreachable"))
            && text.contains("is it running")
            && err.contains("1 of 14 checks failed"),
        "{text}{err}"
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &demo_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the demo ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM: stopping")),
        "{rest:?}"
    );
    // Children are reaped as the harness drops; nothing of the demo runs.
    assert_eq!(ours(), Vec::<String>::new(), "left running after SIGTERM");
}

/// The network-namespace tier needs root; CI runs as root. Elsewhere it
/// fails with the reason unless ISTHMUS_SKIP_NETNS is set, which skips it
/// and says so.
fn netns_or_skip(test: &str) -> bool {
    match isthmus_e2e::netns::available() {
        Ok(()) => true,
        Err(why) if std::env::var_os("ISTHMUS_SKIP_NETNS").is_some() => {
            eprintln!("SKIPPED {test}: {why} (ISTHMUS_SKIP_NETNS is set)");
            false
        }
        Err(why) => panic!("{test} {why}; run as root, or set ISTHMUS_SKIP_NETNS=1 to skip it"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_a_partition_makes_the_peer_stale_then_withdrawn_and_traffic_moves_and_healing_restores_it()
 {
    if !netns_or_skip("netns partition") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let base = NET.fetch_add(3, Ordering::Relaxed);
    let kept = std::env::var_os("ISTHMUS_E2E_KEEP").map(|k| Path::new(&k).join(base.to_string()));
    let mut h = Harness::new_netns(
        bin(),
        kept.as_deref().unwrap_or(dir.path()),
        demo_clusters(base),
    )
    .unwrap()
    .stale_lease(Duration::from_secs(6))
    .unwrap();
    h.start_all(Duration::from_secs(30)).await.unwrap();
    let a = h.traffic("east", 5).await;
    assert!(a.iter().all(|x| x == "east"), "{a:?}");
    // East's instances gone: west serves (the failover target).
    h.kill_instance("east", "helloworld-v1-0").unwrap();
    h.kill_instance("east", "helloworld-v1-1").unwrap();
    h.until("east", "crosses to west", |a| a.iter().all(|x| x == "west"))
        .await;

    // Partition east from west (iptables DROP inside both namespaces).
    let cut = std::time::Instant::now();
    h.partition("east", "west").unwrap();
    let moved = h
        .until("east", "moves to eu", |a| a.iter().all(|x| x == "eu"))
        .await;
    assert!(moved < Duration::from_secs(3), "moved after {moved:?}");
    // The control plane: west stale, then withdrawn after the lease.
    while h.peer_stale("east", "west").await != Some(true) {
        assert!(
            cut.elapsed() < Duration::from_secs(6),
            "west never marked stale"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stale_after = cut.elapsed();
    while h.imported("east").await.contains(&"west".to_owned()) {
        assert!(
            cut.elapsed() < Duration::from_secs(15),
            "west's exports never withdrawn"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let withdrawn_after = cut.elapsed();
    assert!(
        withdrawn_after >= Duration::from_secs(6),
        "withdrawn before the lease: {withdrawn_after:?}"
    );
    eprintln!(
        "partition: traffic moved in {moved:?}, west stale after {stale_after:?}, withdrawn after {withdrawn_after:?}"
    );
    let a = h.traffic("east", 10).await;
    assert!(
        failures(&a).is_empty() && a.iter().all(|x| x == "eu"),
        "{a:?}"
    );

    // Heal: west comes back, imports return, traffic returns to west.
    h.heal("east", "west").unwrap();
    let healed = std::time::Instant::now();
    while !h.imported("east").await.contains(&"west".to_owned()) {
        assert!(
            healed.elapsed() < Duration::from_secs(15),
            "west's exports never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.until("east", "returns to west", |a| a.iter().all(|x| x == "west"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_root_is_not_trusted_is_refused_and_imports_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let base = NET.fetch_add(3, Ordering::Relaxed);
    let specs = vec![
        isthmus_e2e::ClusterSpec::new("east", "us-east1", base, &[("v1", "us-east1-a")]),
        isthmus_e2e::ClusterSpec::new("rogue", "us-east1", base + 1, &[("v1", "us-east1-a")]),
        isthmus_e2e::ClusterSpec::new("decoy", "us-east1", base + 2, &[]),
    ];
    let mut h = Harness::new(bin(), dir.path(), specs).unwrap();
    // East is configured to peer with "rogue" but holds the wrong root for
    // it (decoy's); rogue holds east's real root. Neither side can prove
    // itself to the other: east refuses rogue's certificate, and rogue's
    // dial is refused by east as from an unknown trust domain.
    let root = |c: &str| h.cluster(c).dir.join("root/root-cert.pem");
    let peer = |name: &str, net: u8, bundle: &Path| {
        format!(
            "peers: [{{name: {name}, address: \"127.0.{net}.1:15012\", trustDomain: {name}.local, trustBundle: {}}}]\n",
            bundle.display()
        )
    };
    let append = |c: &str, text: String| {
        let p = h.cluster(c).dir.join("controller.yaml");
        let mut y = std::fs::read_to_string(&p).unwrap();
        y.push_str(&text);
        std::fs::write(p, y).unwrap();
    };
    append("east", peer("rogue", base + 1, &root("decoy")));
    append("rogue", peer("east", base, &root("east")));
    for c in ["east", "rogue"] {
        h.start_controller(c).unwrap();
        h.start_gateway(c).unwrap();
        for w in ["sleep", "helloworld-v1-0"] {
            h.start_workload(c, w).await.unwrap();
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    isthmus_e2e::wait_ready(
        h.cluster("east").client().readiness(),
        deadline,
        "east sleep",
    )
    .await
    .unwrap();
    // Several dial rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let body = isthmus_core::admin::http_get(h.cluster("east").controller_admin(), "/config_dump")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rogue = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["cluster"] == "rogue")
        .unwrap()
        .clone();
    assert_eq!(rogue["connected"], false, "{rogue}");
    let reason = rogue["last_disconnect_reason"].as_str().unwrap_or("");
    assert!(
        reason.to_lowercase().contains("certificate")
            || reason.contains("issuer")
            || reason.contains("trust"),
        "the reason names the certificate problem: {rogue}"
    );
    assert_eq!(rogue["imported"], 0);
    assert!(h.imported("east").await.is_empty());
    // East's own service still answers.
    let mut c = Client::new(h.cluster("east").client().outbound());
    assert_eq!(c.get(URL).await.cluster(), Some("east"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_cross_cluster_load_with_zero_errors() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let base = NET.fetch_add(3, Ordering::Relaxed);
    // Four-second workload certificates from each controller's CA,
    // renewed at about half their life: over 12 s each sidecar rotates
    // several times and its first certificates expire. The sidecars are
    // the sidecar-only `isthmus-proxy` binary, as a sidecar image ships it.
    let mut h = Harness::new(bin(), dir.path(), demo_clusters(base))
        .unwrap()
        .log_level("warn,isthmus_core::identity::rotation=info")
        .proxy_bin(Path::new(env!("CARGO_BIN_EXE_isthmus-proxy")))
        .certificate_ttl(Duration::from_secs(4))
        .unwrap();
    h.start_all(Duration::from_secs(30)).await.unwrap();
    // East's traffic crosses to west: new end-to-end mTLS sessions every
    // few seconds (connections through the gateway are renewed).
    h.kill_instance("east", "helloworld-v1-0").unwrap();
    h.kill_instance("east", "helloworld-v1-1").unwrap();
    h.until("east", "crosses to west", |a| a.iter().all(|x| x == "west"))
        .await;
    let load: Vec<_> = (0..3)
        .map(|_| {
            let proxy = h.cluster("east").client().outbound();
            tokio::spawn(async move {
                let mut c = Client::new(proxy);
                let t = std::time::Instant::now();
                let mut out = Vec::new();
                while t.elapsed() < Duration::from_secs(12) {
                    out.push(c.get(URL).await.label());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for l in load {
        all.extend(l.await.unwrap());
    }
    assert!(all.len() > 300, "{} requests", all.len());
    assert!(failures(&all).is_empty(), "{:?}", failures(&all));
    for (cluster, name) in [
        ("east", "sleep"),
        ("west", "helloworld-v1-0"),
        ("west", "helloworld-v2-0"),
    ] {
        let log =
            std::fs::read_to_string(h.root.join("logs").join(format!("{cluster}-{name}.log")))
                .unwrap();
        let rotations = log.matches("certificate rotated").count();
        assert!(
            rotations >= 3,
            "{cluster}/{name} rotated {rotations} times:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_regions_30_ms_apart_keep_traffic_local_and_cross_with_the_delay() {
    if !netns_or_skip("netns region delay") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let base = NET.fetch_add(3, Ordering::Relaxed);
    let mut h = Harness::new_netns(bin(), dir.path(), demo_clusters(base)).unwrap();
    h.region_delay(Duration::from_millis(30)).await.unwrap();
    h.start_all(Duration::from_secs(40)).await.unwrap();
    let timed = async |h: &Harness| {
        let mut c = Client::new(h.cluster("east").client().outbound());
        let mut out = Vec::new();
        for _ in 0..10 {
            let t = std::time::Instant::now();
            let a = c.get(URL).await;
            out.push((a.label(), t.elapsed()));
        }
        out
    };
    // Local answers do not pay the delay.
    let local = timed(&h).await;
    assert!(local.iter().all(|(w, _)| w == "east"), "{local:?}");
    let fastest_local = local.iter().map(|(_, d)| *d).min().unwrap();
    assert!(fastest_local < Duration::from_millis(30), "{local:?}");
    // Crossing to west pays it both ways (request and answer).
    h.kill_instance("east", "helloworld-v1-0").unwrap();
    h.kill_instance("east", "helloworld-v1-1").unwrap();
    h.until("east", "crosses to west", |a| a.iter().all(|x| x == "west"))
        .await;
    let remote = timed(&h).await;
    assert!(remote.iter().all(|(w, _)| w == "west"), "{remote:?}");
    let fastest = remote.iter().map(|(_, d)| *d).min().unwrap();
    assert!(fastest >= Duration::from_millis(60), "{remote:?}");
    // The gateway measures it too (QUIC RTT towards west).
    let m = isthmus_core::admin::http_get(h.cluster("east").gateway_metrics(), "/metrics")
        .await
        .unwrap();
    let rtt: f64 = m
        .lines()
        .find(|l| l.starts_with("isthmus_gateway_peer_rtt_microseconds") && l.contains("west"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(rtt >= 60_000.0, "east→west RTT {rtt} µs\n{m}");
    eprintln!(
        "local answers from {fastest_local:?}, west's from {fastest:?}, QUIC RTT {:.1} ms",
        rtt / 1000.0
    );
}
