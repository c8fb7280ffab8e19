//! Two and three controllers over real gRPC and mTLS on loopback.

use std::time::Duration;

use isthmus_core::testing::assert_eventually;
use isthmus_federation::catalog::ExportPolicy;
use isthmus_federation::testing::{TestCluster, service_yaml};

const HB: Duration = Duration::from_millis(100);
const LEASE: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(10);

fn all() -> ExportPolicy {
    ExportPolicy::default()
}

/// Starts `a` with `b` as its one peer (seeing everything), trusting `b`.
async fn start_linked(a: &TestCluster, b: &TestCluster) -> isthmus_federation::app::Bound {
    a.start(a.config(&[(b, all())], HB, LEASE), &[b.bundle()])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_unexport_and_garbage_collection() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    west.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, true, "2026-01-01T00:00:00Z"),
    );
    let e = start_linked(&east, &west).await;
    let w = start_linked(&west, &east).await;

    assert_eventually("east imports helloworld", WAIT, async || {
        east.service_entry("sample", "helloworld").is_some()
    })
    .await;
    let se = east.service_entry("sample", "helloworld").unwrap();
    assert_eq!(
        se["spec"]["hosts"][0],
        "helloworld.sample.svc.clusterset.local"
    );
    assert_eq!(
        se["spec"]["endpoints"][0]["labels"]["topology.istio.io/cluster"],
        "west"
    );
    assert_eq!(
        se["spec"]["endpoints"][0]["locality"],
        "us-west1/us-west1-a"
    );
    assert_eq!(se["spec"]["endpoints"][0]["weight"], 1);
    // West imports nothing: east exports nothing.
    assert!(west.service_entry("sample", "helloworld").is_none());

    // Both sides report the peering truthfully.
    let s = e.status();
    assert!(s[0].connected && !s[0].stale, "{s:?}");
    assert_eq!(s[0].imported, 1);
    let s = w.status();
    assert_eq!((s[0].exported, s[0].imported), (1, 0));
    assert!(s[0].last_full_sync.is_some());

    // Unexport: the ServiceEntry is garbage-collected.
    west.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, false, ""),
    );
    assert_eventually("east drops helloworld", WAIT, async || {
        east.service_entry("sample", "helloworld").is_none()
    })
    .await;
    // The mesh state for the config stream follows.
    assert!(e.mesh.borrow().imported.is_empty());
    assert_eventually("west's acks caught up", WAIT, async || {
        w.status()[0].revision_lag == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_peer_export_policy_is_respected() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    let eu = TestCluster::new(root.path(), "eu", "europe-west1");
    west.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, true, ""),
    );
    let only_prod = ExportPolicy {
        namespaces: ["prod".to_owned()].into(),
        ..Default::default()
    };
    let trusted = [east.bundle(), west.bundle(), eu.bundle()];
    let _e = east
        .start(
            east.config(&[(&west, all()), (&eu, all())], HB, LEASE),
            &trusted,
        )
        .await;
    let w = west
        .start(
            west.config(&[(&east, all()), (&eu, only_prod)], HB, LEASE),
            &trusted,
        )
        .await;
    let eu_c = eu
        .start(
            eu.config(&[(&east, all()), (&west, all())], HB, LEASE),
            &trusted,
        )
        .await;
    assert_eventually("east imports helloworld", WAIT, async || {
        east.service_entry("sample", "helloworld").is_some()
    })
    .await;
    assert_eventually("eu synced with west", WAIT, async || {
        eu_c.status()
            .iter()
            .any(|p| p.cluster == "west" && p.last_full_sync.is_some())
    })
    .await;
    assert!(
        eu.service_entry("sample", "helloworld").is_none(),
        "eu must not see sample/helloworld"
    );
    // West's gateway would refuse eu too: exported_to names only east.
    let local = w.mesh.borrow().local.clone();
    let svc = local.values().next().unwrap();
    assert_eq!(svc.exported_to, ["east".to_owned()].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_nothing_and_rewrites_nothing_unchanged() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    west.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, true, ""),
    );
    let e = start_linked(&east, &west).await;
    let _w = start_linked(&west, &east).await;
    assert_eventually("east imports helloworld", WAIT, async || {
        east.service_entry("sample", "helloworld").is_some()
    })
    .await;
    let file = east
        .dir
        .join(isthmus_federation::IMPORTS_DIR)
        .join("sample.helloworld-clusterset.yaml");
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();

    e.shutdown(Duration::from_secs(2)).await;
    assert!(file.exists(), "shutting down must not withdraw imports");
    let e = start_linked(&east, &west).await;
    assert_eventually("east re-synced", WAIT, async || {
        e.status()[0].last_full_sync.is_some()
    })
    .await;
    // Let the reconciler run a few times after the sync.
    tokio::time::sleep(HB * 5).await;
    assert!(file.exists());
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        before,
        "unchanged ServiceEntry was rewritten"
    );
}

/// A restarted exporter reads its manifests again before it can say what
/// it exports; until then it must not send its peers an empty catalogue,
/// which they would swap in (sync-then-swap) and withdraw every import.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_exporter_never_makes_its_peer_withdraw_imports() {
    const N: usize = 1500;
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    // Big enough that listing it takes a while after the session is up.
    let yaml: Vec<String> = (0..N)
        .map(|i| service_yaml(&format!("svc-{i}"), 5000, true, ""))
        .collect();
    west.write("services.yaml", &yaml.join("---\n"));
    let e = start_linked(&east, &west).await;
    let w = start_linked(&west, &east).await;
    let imported = || e.mesh.borrow().imported.len();
    assert_eventually(
        "east imports all of west's services",
        WAIT * 3,
        async || imported() == N,
    )
    .await;
    let synced_before = e.status()[0].last_full_sync.clone();

    w.shutdown(Duration::from_secs(2)).await;
    let w = start_linked(&west, &east).await;
    // Watch east's mesh state through the restart until west's new
    // snapshot has landed, and a few passes after.
    let deadline = std::time::Instant::now() + WAIT * 3;
    let mut fewest = N;
    while e.status()[0].last_full_sync == synced_before {
        fewest = fewest.min(imported());
        assert!(std::time::Instant::now() < deadline, "west never re-synced");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for _ in 0..100 {
        fewest = fewest.min(imported());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(fewest, N, "east's imports dropped while west restarted");
    assert_eq!(imported(), N);
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_is_marked_stale_then_withdrawn_after_the_lease() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    west.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, true, ""),
    );
    let lease = Duration::from_secs(2);
    let e = east
        .start(east.config(&[(&west, all())], HB, lease), &[west.bundle()])
        .await;
    let w = west
        .start(west.config(&[(&east, all())], HB, lease), &[east.bundle()])
        .await;
    assert_eventually("east imports helloworld", WAIT, async || {
        east.service_entry("sample", "helloworld").is_some()
    })
    .await;

    w.shutdown(Duration::from_secs(2)).await;
    assert_eventually("west marked stale", WAIT, async || e.status()[0].stale).await;
    // Kept, labelled stale (the sink writes on a thread of its own).
    assert_eventually("the ServiceEntry says stale", WAIT, async || {
        east.service_entry("sample", "helloworld")
            .is_some_and(|se| se["spec"]["endpoints"][0]["labels"]["isthmus.io/stale"] == "true")
    })
    .await;
    assert!(!e.status()[0].connected);
    assert!(e.status()[0].last_disconnect_reason.is_some());
    assert_eventually("withdrawn after the lease", lease * 3, async || {
        east.service_entry("sample", "helloworld").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_an_unknown_root_or_another_clusters_name_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    // An impostor for "west" with its own root for west.local, which east
    // has never been given.
    let impostor = TestCluster::new(root.path(), "west", "us-west1");
    let mut impostor = impostor;
    impostor.dir = root.path().join("impostor");
    std::fs::create_dir_all(&impostor.dir).unwrap();
    impostor.federation = west.federation;
    impostor.write("svc.yaml", &service_yaml("stolen", 80, true, ""));
    let e = start_linked(&east, &west).await;
    let _i = impostor
        .start(
            impostor.config(&[(&east, all())], HB, LEASE),
            &[east.bundle()],
        )
        .await;

    // A peer with a trusted certificate, but for cluster eu, listening
    // where east expects west.
    let eu = TestCluster::new(root.path(), "eu", "europe-west1");
    let east2 = TestCluster::new(root.path(), "east2", "us-east1");
    let mut eu_as_west = eu;
    eu_as_west.dir = root.path().join("eu-as-west");
    std::fs::create_dir_all(&eu_as_west.dir).unwrap();
    eu_as_west.write("svc.yaml", &service_yaml("stolen", 80, true, ""));
    let eu_bundle = eu_as_west.bundle();
    let e2 = east2
        .start(
            east2.config(&[(&west, all())], HB, LEASE),
            &[west.bundle(), eu_bundle.clone()],
        )
        .await;
    let mut eu_cfg = eu_as_west.config(&[(&east2, all())], HB, LEASE);
    eu_cfg.federation_addr = isthmus_federation::testing::free_port();
    let _eu = eu_as_west.start(eu_cfg.clone(), &[east2.bundle()]).await;
    // Point east2's "west" at eu's listener.
    drop(e2);
    let mut cfg = east2.config(&[(&west, all())], HB, LEASE);
    cfg.peers[0].address = eu_cfg.federation_addr.to_string();
    cfg.federation_addr = isthmus_federation::testing::free_port();
    let e2 = east2.start(cfg, &[west.bundle(), eu_bundle]).await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    for (who, status, c) in [("east", e.status(), &east), ("east2", e2.status(), &east2)] {
        assert!(
            !status[0].connected,
            "{who} connected to an impostor: {status:?}"
        );
        assert!(status[0].last_full_sync.is_none(), "{who}: {status:?}");
        assert!(
            c.service_entry("sample", "stolen").is_none(),
            "{who} imported from an impostor"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_exports_are_reported_and_the_oldest_wins() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    let eu = TestCluster::new(root.path(), "eu", "europe-west1");
    west.write(
        "hw.yaml",
        &service_yaml("helloworld", 5000, true, "2026-01-01T00:00:00Z"),
    );
    eu.write(
        "hw.yaml",
        &service_yaml("helloworld", 8080, true, "2026-02-01T00:00:00Z"),
    );
    let trusted = [east.bundle(), west.bundle(), eu.bundle()];
    let e = east
        .start(
            east.config(&[(&west, all()), (&eu, all())], HB, LEASE),
            &trusted,
        )
        .await;
    let _w = west
        .start(
            west.config(&[(&east, all()), (&eu, all())], HB, LEASE),
            &trusted,
        )
        .await;
    let _u = eu
        .start(
            eu.config(&[(&east, all()), (&west, all())], HB, LEASE),
            &trusted,
        )
        .await;
    assert_eventually("conflict reported", WAIT, async || {
        !e.shared.conflicts.borrow().is_empty()
    })
    .await;
    let c = e.shared.conflicts.borrow()[0].clone();
    assert_eq!((c.winner.as_str(), c.excluded.as_str()), ("west", "eu"));
    // The sink writes on a thread of its own, after the merge.
    assert_eventually("east's ServiceEntry", WAIT, async || {
        east.service_entry("sample", "helloworld").is_some()
    })
    .await;
    let se = east.service_entry("sample", "helloworld").unwrap();
    assert_eq!(se["spec"]["ports"][0]["number"], 5000);
    assert_eq!(se["spec"]["endpoints"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_manifest_in_the_exporting_cluster_withdraws_nothing() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    west.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, true, ""),
    );
    let _e = start_linked(&east, &west).await;
    let _w = start_linked(&west, &east).await;
    assert_eventually("east imports helloworld", WAIT, async || {
        east.service_entry("sample", "helloworld").is_some()
    })
    .await;
    west.write(
        "helloworld.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [broken\n",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(east.service_entry("sample", "helloworld").is_some());
}

/// The side that sorts second dials when it hears nothing for the grace
/// period (east down); when east comes up both have dialed, and the pair
/// settles on one stream — the one east dialed — with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_both_sides_dial_one_stream_remains_and_nothing_is_lost() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    west.write("web.yaml", &service_yaml("web", 80, true, ""));
    east.write("db.yaml", &service_yaml("db", 5432, true, ""));
    let w = start_linked(&west, &east).await;
    // Past the grace west dials east itself (and fails: east is down).
    tokio::time::sleep(isthmus_federation::dial::dial_grace(HB) + HB * 5).await;
    let p = w.status();
    assert!(
        p[0].last_disconnect_reason.is_some(),
        "west has not dialed: {p:?}"
    );
    let e = start_linked(&east, &west).await;
    assert_eventually("both import", WAIT, async || {
        east.service_entry("sample", "web").is_some()
            && west.service_entry("sample", "db").is_some()
    })
    .await;
    assert_eventually("one stream", WAIT, async || {
        e.status()[0].sessions == 1 && w.status()[0].sessions == 1
    })
    .await;
    // And it stays one: no flapping between the two dials.
    let sessions = |b: &isthmus_federation::app::Bound| b.shared.peers()[0].status();
    for _ in 0..10 {
        tokio::time::sleep(HB * 2).await;
        let (a, b) = (sessions(&e), sessions(&w));
        assert!(
            a.connected && a.sessions == 1 && b.sessions == 1,
            "{a:?} {b:?}"
        );
    }
    assert!(east.service_entry("sample", "web").is_some());
    assert!(west.service_entry("sample", "db").is_some());
}
