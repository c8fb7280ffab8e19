//! The kube tier of the end-to-end suite: three clusters, each with a
//! Kubernetes API of its own (the in-repo stand-in on loopback), every
//! Isthmus component a real process of the built binary, controllers in
//! kube mode, the cluster's objects written with stock kubectl. The files
//! tier's scenarios (a cross-cluster call, export and unexport, failover,
//! a controller restart) plus what only Kubernetes has: ServiceEntries
//! and export status a user reads with kubectl, and an API-server outage.
//!
//! `ISTHMUS_TEST_KUBECONFIG` (with `ISTHMUS_TEST_CONTEXTS=east,west`)
//! and `-- --ignored` run the kubectl-only scenario against real clusters
//! with Isthmus installed and linked; otherwise the test list shows it
//! ignored, with that reason.

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use isthmus_e2e::{Client, HELLO_URL, Harness, demo_clusters, failures};
use serde_json::Value;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NET: AtomicU8 = AtomicU8::new(100);

const SE: &str = "serviceentries.networking.istio.io";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_isthmus"))
}

async fn three_clusters(dir: &Path) -> Harness {
    let base = NET.fetch_add(3, Ordering::Relaxed);
    let dir = isthmus_e2e::scenario_dir(dir, base);
    let mut h = Harness::new_kube(bin(), &dir, demo_clusters(base)).unwrap();
    h.start_all(Duration::from_secs(30)).await.unwrap();
    h
}

/// `kubectl get -o json` of one object; `None` if it does not exist.
fn get(h: &Harness, cluster: &str, args: &[&str]) -> Option<Value> {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json", "--ignore-not-found"]);
    let out = h.cluster(cluster).kubectl(&a).unwrap();
    (!out.trim().is_empty()).then(|| serde_json::from_str(&out).unwrap())
}

/// The clusters helloworld's ServiceEntry in `cluster` sends to, as
/// `kubectl get serviceentry` shows them.
fn service_entry_clusters(h: &Harness, cluster: &str) -> Vec<String> {
    let Some(se) = get(
        h,
        cluster,
        &["serviceentry", "helloworld-clusterset", "-n", "sample"],
    ) else {
        return Vec::new();
    };
    let mut v: Vec<String> = se["spec"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["labels"]["topology.istio.io/cluster"].as_str())
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// `type=status` of the condition `type` of helloworld's ServiceExport.
fn export_condition(h: &Harness, cluster: &str, kind: &str) -> Option<(String, String)> {
    let ex = get(h, cluster, &["serviceexport", "helloworld", "-n", "sample"])?;
    ex["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

async fn eventually<W: std::fmt::Debug, T: std::fmt::Debug + PartialEq<W>>(
    what: &str,
    want: W,
    mut have: impl AsyncFnMut() -> T,
) -> Duration {
    let t = Instant::now();
    loop {
        let h = have().await;
        if h == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: {h:?} after 20 s, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_an_export_applied_with_kubectl_is_a_service_entry_and_a_cross_cluster_call_fails_over()
 {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = three_clusters(dir.path()).await;

    // What a user sees with kubectl: each cluster has helloworld's
    // ServiceEntry naming the other two, and its own export is valid,
    // ready and conflict-free, as MCS defines the conditions.
    for (c, want) in [
        ("east", ["eu", "west"]),
        ("west", ["east", "eu"]),
        ("eu", ["east", "west"]),
    ] {
        eventually(&format!("{c}'s ServiceEntry"), want.to_vec(), async || {
            service_entry_clusters(&h, c)
        })
        .await;
        eventually(
            &format!("{c}'s export status"),
            [
                Some(("True".into(), "Valid".into())),
                Some(("True".into(), "Exported".into())),
                Some(("False".into(), "NoConflict".into())),
            ],
            async || ["Valid", "Ready", "Conflict"].map(|k| export_condition(&h, c, k)),
        )
        .await;
    }
    let imports = get(&h, "east", &["serviceimport", "helloworld", "-n", "sample"])
        .expect("east has helloworld's ServiceImport");
    assert_eq!(imports["spec"]["type"], "ClusterSetIP", "{imports}");

    // `isthmus verify` on the kube tier: federation, gateway paths, and a
    // request through east's client sidecar.
    let mut args: Vec<String> = vec!["verify".into()];
    for c in &h.clusters {
        args.extend(["--controller".into(), c.controller_admin().to_string()]);
        args.extend(["--gateway".into(), c.gateway_admin().to_string()]);
    }
    args.extend([
        "--client".into(),
        h.cluster("east").client().outbound().to_string(),
    ]);
    let t = Instant::now();
    let out = loop {
        let out = std::process::Command::new(bin())
            .args(&args)
            .output()
            .unwrap();
        if out.status.success() || t.elapsed() > Duration::from_secs(15) {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("PASS")).count(),
        13,
        "{text}"
    );

    // Local first; the caller's identity reaches the app.
    let mut c = Client::new(h.cluster("east").client().outbound());
    let a = c.get(HELLO_URL).await;
    assert_eq!(a.cluster(), Some("east"), "{a:?}");
    assert!(
        a.body
            .contains("caller spiffe://east.local/ns/sample/sa/sleep"),
        "{a:?}"
    );

    // Both of east's instances die (their EndpointSlice endpoints turn
    // not ready, applied with kubectl): east's calls fail over to west as
    // its DestinationRule says, keeping the caller's identity.
    h.kill_instance("east", "helloworld-v1-0").unwrap();
    h.kill_instance("east", "helloworld-v1-1").unwrap();
    let took = h
        .until("east", "failover to west", |a| {
            a.iter().all(|c| c == "west")
        })
        .await;
    let a = c.get(HELLO_URL).await;
    assert!(
        a.body
            .contains("caller spiffe://east.local/ns/sample/sa/sleep"),
        "{a:?}"
    );
    // west's and eu's ServiceEntries see east's endpoints go unhealthy.
    eventually("east turns unhealthy in west's view", true, async || {
        get(
            &h,
            "west",
            &["serviceentry", "helloworld-clusterset", "-n", "sample"],
        )
        .is_some_and(|se| {
            se["spec"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["labels"]["topology.istio.io/cluster"] == "east" && e["weight"] == 1)
        })
    })
    .await;
    h.revive_instance("east", "helloworld-v1-0").await.unwrap();
    let back = h
        .until("east", "fail back to east", |a| {
            a.iter().all(|c| c == "east")
        })
        .await;
    eprintln!("kube tier: failover to west after {took:?}, back to east after {back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_unexport_and_export_with_kubectl_propagate_and_a_controller_restart_writes_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = three_clusters(dir.path()).await;
    eventually("east's ServiceEntry", vec!["eu", "west"], async || {
        service_entry_clusters(&h, "east")
    })
    .await;

    // `kubectl delete serviceexport` in west: gone from east's sidecars
    // and from east's ServiceEntry; west's ServiceImport elsewhere too.
    let t = Instant::now();
    h.set_exported("west", false).unwrap();
    while h.imported("east").await.contains(&"west".to_owned()) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "unexport did not reach east's sidecar"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let to_sidecar = t.elapsed();
    eventually("west leaves east's ServiceEntry", vec!["eu"], async || {
        service_entry_clusters(&h, "east")
    })
    .await;
    let a = h.traffic("east", 5).await;
    assert!(a.iter().all(|c| c == "east"), "{a:?}");

    // `kubectl apply` of the ServiceExport again: back.
    h.set_exported("west", true).unwrap();
    eventually(
        "west is back in east's ServiceEntry",
        vec!["eu", "west"],
        async || service_entry_clusters(&h, "east"),
    )
    .await;
    eventually("west is back in east's sidecar", true, async || {
        h.imported("east").await.contains(&"west".to_owned())
    })
    .await;
    eprintln!("kube tier: unexport reached east's sidecar after {to_sidecar:?}");

    // east's controller is SIGKILLed and restarted: its sidecars keep
    // their imports throughout; the new process waits out the dead one's
    // Lease, and then finds nothing to write.
    let api = h.cluster("east").api();
    let writes = api.server().writes(SE);
    h.restart_controller("east", &["eu", "west"]).await.unwrap();
    // The new process leads once the old Lease (3 s) has run out.
    let transitions = async || {
        get(
            &h,
            "east",
            &["lease", "isthmus-controller", "-n", "isthmus-system"],
        )
        .and_then(|l| l["spec"]["leaseTransitions"].as_u64())
    };
    eventually(
        "the restarted controller takes the Lease",
        Some(1),
        transitions,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let api = h.cluster("east").api();
    assert_eq!(
        api.server().writes(SE),
        writes,
        "the restart rewrote ServiceEntries that had not changed"
    );
    assert_eq!(service_entry_clusters(&h, "east"), ["eu", "west"]);
    assert_eq!(h.imported("east").await, ["eu", "west"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_an_api_server_outage_keeps_traffic_and_the_last_state_and_catches_up_after() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let h = three_clusters(dir.path()).await;
    eventually("east's ServiceEntry", vec!["eu", "west"], async || {
        service_entry_clusters(&h, "east")
    })
    .await;

    // east's API server goes down.
    h.cluster("east").api().stop().unwrap();
    let source = async || {
        let body = h
            .admin_get("east", h.cluster("east").controller_admin(), "/config_dump")
            .await
            .unwrap_or_default();
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        v["source"].clone()
    };
    let t = Instant::now();
    loop {
        let s = source().await;
        if s["Service"]["state"] == "failing"
            && s["Service"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot reach the API server"))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "east's controller never says its API is down: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last state stays in force: east still answers locally and
    // still knows west and eu.
    let a = h.traffic("east", 10).await;
    assert!(a.iter().all(|c| c == "east"), "{a:?}");
    assert_eq!(h.imported("east").await, ["eu", "west"]);
    // Federation does not need east's API: west withdraws its export and
    // east's sidecars drop it even now.
    h.set_exported("west", false).unwrap();
    eventually(
        "west leaves east's sidecar during the outage",
        vec!["eu".to_owned()],
        async || h.imported("east").await,
    )
    .await;

    // The API server is back: east's controller catches up and removes
    // west from the ServiceEntry it could not write during the outage.
    h.cluster("east").api().resume().unwrap();
    eventually("east's ServiceEntry catches up", vec!["eu"], async || {
        service_entry_clusters(&h, "east")
    })
    .await;
    eventually("east's source reports synced again", "synced", async || {
        source().await["Service"]["state"].clone()
    })
    .await;
    let a = h.traffic("east", 5).await;
    assert!(failures(&a).is_empty(), "{a:?}");
}

/// The kubectl-only scenario against real clusters: `kubectl apply` of a
/// ServiceExport in the first context makes a ServiceEntry in the second,
/// `kubectl delete` removes it. Needs Isthmus installed and the clusters
/// linked (see README, "On Kubernetes").
///
/// Ignored by default (the test list says so, with the reason); run it
/// with `ISTHMUS_TEST_KUBECONFIG=FILE ISTHMUS_TEST_CONTEXTS=a,b cargo test
/// --test e2e_kube -- --ignored`.
#[test]
#[ignore = "needs real clusters: ISTHMUS_TEST_KUBECONFIG=FILE ISTHMUS_TEST_CONTEXTS=a,b, then --ignored"]
fn kube_real_clusters_an_export_applied_with_kubectl_appears_in_the_peer() {
    let (Some(kubeconfig), Some(contexts)) = (
        std::env::var_os("ISTHMUS_TEST_KUBECONFIG"),
        std::env::var("ISTHMUS_TEST_CONTEXTS").ok(),
    ) else {
        panic!(
            "set ISTHMUS_TEST_KUBECONFIG (a kubeconfig) and ISTHMUS_TEST_CONTEXTS=<a>,<b> (two of its contexts, Isthmus installed and linked) to run this against real clusters"
        );
    };
    let kubeconfig = Path::new(&kubeconfig);
    let ctx: Vec<&str> = contexts.split(',').collect();
    assert!(
        ctx.len() >= 2,
        "ISTHMUS_TEST_CONTEXTS needs two contexts, got {contexts:?}"
    );
    let k = |c: &str, args: &[&str], stdin: Option<&str>| {
        isthmus_e2e::kube::kubectl(kubeconfig, Some(c), args, stdin)
            .unwrap_or_else(|e| panic!("{c}: {e}"))
    };
    let ns = "isthmus-e2e";
    let manifest = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: probe, namespace: {ns}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: probe, namespace: {ns}}}\n"
    );
    k(
        ctx[0],
        &["apply", "--server-side", "-f", "-"],
        Some(&manifest),
    );
    let t = Instant::now();
    let seen = |want: bool| loop {
        let out = k(
            ctx[1],
            &[
                "get",
                "serviceentries",
                "-n",
                ns,
                "--ignore-not-found",
                "-o",
                "name",
            ],
            None,
        );
        if out.contains("probe-clusterset") == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{}: probe's ServiceEntry present={}, want {want}",
            ctx[1],
            !want
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let appeared = seen(true);
    k(
        ctx[0],
        &["delete", "-n", ns, "serviceexport", "probe"],
        None,
    );
    let gone = seen(false);
    k(ctx[0], &["delete", "namespace", ns, "--wait=false"], None);
    eprintln!(
        "real clusters: ServiceEntry in {} after {appeared:?}, gone after {gone:?}",
        ctx[1]
    );
}

/// `/config_dump` of west's controller replica `r`.
async fn replica_dump(h: &Harness, cluster: &str, r: u8) -> Value {
    let body = h
        .admin_get(cluster, h.cluster(cluster).replica_admin(r), "/config_dump")
        .await
        .unwrap_or_default();
    serde_json::from_str(&body).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_two_controller_replicas_behind_one_address_both_serve_and_a_handover_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let base = NET.fetch_add(3, Ordering::Relaxed);
    let mut specs = demo_clusters(base);
    // west: two replicas behind one Service address; peers (east and eu
    // sort first and dial) reach whichever replica the Service picks.
    specs[1].controller_replicas = 2;
    let mut h = Harness::new_kube(bin(), dir.path(), specs).unwrap();
    h.start_all(Duration::from_secs(30)).await.unwrap();

    // Both replicas hold sessions with both peers and import both.
    for r in 0..2 {
        eventually(
            &format!("west replica {r} is connected to east and eu"),
            vec![(true, 1), (true, 1)],
            async || {
                let d = replica_dump(&h, "west", r).await;
                let mut v: Vec<(String, bool, u64)> = d["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        (
                            p["cluster"].as_str().unwrap_or_default().to_owned(),
                            p["connected"].as_bool().unwrap_or(false),
                            p["imported"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                v.sort();
                v.into_iter().map(|(_, c, i)| (c, i)).collect::<Vec<_>>()
            },
        )
        .await;
    }
    let leader = |d: &Value| d["leader"]["writes"].as_bool() == Some(true);
    let (d0, d1) = (
        replica_dump(&h, "west", 0).await,
        replica_dump(&h, "west", 1).await,
    );
    assert!(
        leader(&d0) != leader(&d1),
        "exactly one replica writes: {} {}",
        d0["leader"],
        d1["leader"]
    );
    let first = if leader(&d0) { 0 } else { 1 };
    eventually("west's ServiceEntry", vec!["east", "eu"], async || {
        service_entry_clusters(&h, "west")
    })
    .await;
    eventually("east's ServiceEntry", vec!["eu", "west"], async || {
        service_entry_clusters(&h, "east")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = h.cluster("west").api().server().writes(SE);

    // The leader is SIGKILLed: the other replica takes the Lease once it
    // runs out (3 s), rewrites nothing, and peers keep west's services
    // throughout (their sessions with the other replica carry them).
    h.kill_replica("west", first);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            h.imported("east").await,
            ["eu", "west"],
            "east lost west's services"
        );
        let a = h.traffic("west", 3).await;
        assert!(a.iter().all(|c| c == "west"), "{a:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let other = 1 - first;
    eventually("the other replica leads", true, async || {
        leader(&replica_dump(&h, "west", other).await)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        h.cluster("west").api().server().writes(SE),
        writes,
        "the new leader rewrote ServiceEntries that had not changed"
    );
    // It writes what changes next: east withdraws helloworld.
    h.set_exported("east", false).unwrap();
    eventually(
        "the new leader writes east's withdrawal",
        vec!["eu"],
        async || service_entry_clusters(&h, "west"),
    )
    .await;
    // West's sidecars, served by the surviving replica through the same
    // address, still reach eu across clusters when west's own instances die.
    h.kill_instance("west", "helloworld-v1-0").unwrap();
    h.kill_instance("west", "helloworld-v2-0").unwrap();
    h.until("west", "failover away from west", |a| {
        a.iter().all(|c| c == "east" || c == "eu")
    })
    .await;
}
