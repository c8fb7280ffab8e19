//! A gateway-style subscriber on a controller's config stream: full state,
//! then changes, with peers' trust bundles and gateways.

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::TrustStore;
use isthmus_core::meshconfig::subscribe_loop;
use isthmus_core::model::{MeshState, ServiceKey};
use isthmus_core::testing::assert_eventually;
use isthmus_federation::catalog::ExportPolicy;
use isthmus_federation::testing::{TestCluster, service_yaml};
use isthmus_proto::config::v1::{Node, node::Kind};

const HB: Duration = Duration::from_millis(100);

/// Subscribes to the controller of `cluster` at `addr` as a `kind` node
/// that starts knowing only its own root: the states it receives, its
/// trust store, and a sender that stops it.
fn subscribe(
    cluster: &TestCluster,
    addr: std::net::SocketAddr,
    kind: Kind,
    name: &str,
) -> (
    tokio::sync::watch::Receiver<Arc<MeshState>>,
    Arc<TrustStore>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, state) = tokio::sync::watch::channel(Arc::new(MeshState::default()));
    let trust = TrustStore::with_bundles([cluster.bundle()]).unwrap();
    let node = Node {
        kind: kind as i32,
        name: name.into(),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(subscribe_loop(
        addr,
        cluster.local_tls(None),
        node,
        tx,
        trust.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    (state, trust, stop_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sees_imports_peers_bundles_and_policies_and_then_changes() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    west.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, true, ""),
    );
    east.write(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: hw, namespace: sample}\nspec: {host: helloworld.sample.svc.clusterset.local, subsets: [{name: v1, labels: {version: v1}}]}\n",
    );
    let e = east
        .start(
            east.config(
                &[(&west, ExportPolicy::default())],
                HB,
                Duration::from_secs(300),
            ),
            &[west.bundle()],
        )
        .await;
    let _w = west
        .start(
            west.config(
                &[(&east, ExportPolicy::default())],
                HB,
                Duration::from_secs(300),
            ),
            &[east.bundle()],
        )
        .await;

    let (state, trust, stop_tx) = subscribe(&east, e.local_addr, Kind::Gateway, "east-gateway");

    let key = ServiceKey::new("sample", "helloworld");
    let s = state.clone();
    assert_eventually(
        "helloworld imported through the stream",
        Duration::from_secs(10),
        async || {
            s.borrow()
                .imported
                .get(&key)
                .is_some_and(|i| i.clusters.iter().any(|c| c.cluster == "west"))
        },
    )
    .await;
    let s = state.clone();
    assert_eventually(
        "west's gateway and bundle delivered",
        Duration::from_secs(10),
        async || s.borrow().peers.contains_key("west") && trust.get(&west.domain.td).is_some(),
    )
    .await;
    let dr = state
        .borrow()
        .destination_rules
        .get(&key)
        .cloned()
        .expect("DestinationRule delivered");
    assert_eq!(dr.subsets["v1"]["version"], "v1");

    // Unexport in west: the change reaches the subscriber.
    west.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, false, ""),
    );
    let s = state.clone();
    assert_eventually(
        "import withdrawn through the stream",
        Duration::from_secs(10),
        async || s.borrow().imported.is_empty(),
    )
    .await;
    let _ = stop_tx.send(());
}

/// Security policy that cannot be applied as written reaches the proxies
/// in its strictest form (never dropped), a dry-run policy keeps its
/// annotation, and every refused object is visible in the admin API and
/// the metrics without reading logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_that_cannot_be_applied_reach_proxies_strictest_and_are_reported() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    east.write(
        "policies.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-jwt, namespace: sample}
spec:
  action: DENY
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-like, namespace: sample, annotations: {istio.io/dry-run: 'true'}}
spec: {action: DENY, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: sample}
spec: {mtls: {mode: PERMISIVE}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-route, namespace: sample}
spec: {hosts: [web], http: [{route: [{destination: {host: web}}], timeout: soon}]}
",
    );
    let e = east
        .start(
            east.config(&[], HB, Duration::from_secs(300)),
            &[east.bundle()],
        )
        .await;
    let (state, _, stop_tx) = subscribe(&east, e.local_addr, Kind::Sidecar, "web-0");
    let s = state.clone();
    assert_eventually(
        "policies delivered through the stream",
        Duration::from_secs(10),
        async || {
            let s = s.borrow();
            s.authorization_policies.len() == 2 && s.peer_authentications.len() == 1
        },
    )
    .await;
    let s = state.borrow().clone();
    let deny = &s.authorization_policies["sample/deny-jwt"];
    assert!(
        deny.unenforceable
            .as_deref()
            .is_some_and(|w| w.contains("requestPrincipals")),
        "{deny:?}"
    );
    assert_eq!(
        deny.selector.as_ref().unwrap()["app"],
        "web",
        "still limited to what it selects"
    );
    let dry = &s.authorization_policies["sample/audit-like"];
    assert!(dry.dry_run && dry.unenforceable.is_none(), "{dry:?}");
    assert_eq!(
        s.peer_authentications["sample/default"].mode,
        Some(isthmus_core::model::istio::MtlsMode::Strict)
    );
    assert!(s.virtual_services.is_empty(), "a broken route is left out");

    let dump: serde_json::Value = serde_json::from_str(
        &isthmus_core::admin::http_get(e.admin_addr, "/config_dump")
            .await
            .unwrap(),
    )
    .unwrap();
    let problems = dump["config_problems"].as_array().unwrap();
    let seen: Vec<(&str, &str, &str)> = problems
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap(),
                p["name"].as_str().unwrap(),
                p["effect"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("VirtualService", "bad-route", "ignored"),
            ("PeerAuthentication", "default", "strict"),
            ("AuthorizationPolicy", "deny-jwt", "denies_every_request"),
        ],
        "{problems:?}"
    );
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap()
            .contains("http[0].timeout \"soon\" is not a duration"),
        "{problems:?}"
    );
    let m = isthmus_core::admin::http_get(e.metrics_addr, "/metrics")
        .await
        .unwrap();
    for (kind, reason) in [
        ("AuthorizationPolicy", "denies_every_request"),
        ("PeerAuthentication", "strict"),
        ("VirtualService", "ignored"),
    ] {
        let line =
            format!("isthmus_config_rejected_total{{kind=\"{kind}\",reason=\"{reason}\"}} 1");
        assert!(m.contains(&line), "{line} in\n{m}");
    }
    let _ = stop_tx.send(());
}
