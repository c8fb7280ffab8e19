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

    let (tx, state) = tokio::sync::watch::channel(Arc::new(MeshState::default()));
    // The subscriber starts knowing only its own root.
    let trust = TrustStore::with_bundles([east.bundle()]).unwrap();
    let node = Node {
        kind: Kind::Gateway as i32,
        name: "east-gateway".into(),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(subscribe_loop(
        e.local_addr,
        east.local_tls(None),
        node,
        tx,
        trust.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

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
