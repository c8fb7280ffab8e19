//! Locality-aware load balancing: local first, then the remote tier through real gateways and QUIC; distribute.

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::model::*;
use isthmus_proxy::testing::*;
use serde_json::json;
use tokio::sync::watch;

#[tokio::test]
async fn locality_first_then_the_remote_tier_through_real_gateways() {
    let mesh = Mesh::new();
    let (east, west) = (mesh.get("east"), mesh.get("west"));
    let t = mesh.trust.clone();
    let (gw_east, gw_east_tx) = isthmus_gateway::testing::gateway(&mesh, east).await;
    let (gw_west, gw_west_tx) = isthmus_gateway::testing::gateway(&mesh, west).await;
    let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
    let (wtx, wrx) = watch::channel(Arc::new(MeshState::default()));
    let gw = Some(gw_east.sidecar_addr);
    let client = workload(east, t.clone(), rx.clone(), "sleep", "v1", "us-east1-a", gw).await;
    let near = workload(
        east,
        t.clone(),
        rx.clone(),
        "helloworld-a",
        "v1",
        "us-east1-a",
        gw,
    )
    .await;
    let far = workload(
        east,
        t.clone(),
        rx.clone(),
        "helloworld-b",
        "v1",
        "us-east1-b",
        gw,
    )
    .await;
    let remote = workload(
        west,
        t.clone(),
        wrx,
        "helloworld-w",
        "v1",
        "us-west1-a",
        None,
    )
    .await;

    let peers = isthmus_gateway::testing::peers(
        &mesh,
        &[("east", gw_east.peer_addr), ("west", gw_west.peer_addr)].into(),
    );
    let key = ServiceKey::new(NS, "helloworld");
    // West exports helloworld to east.
    let mut ws = MeshState {
        version: 1,
        ..Default::default()
    };
    ws.local
        .insert(key.clone(), helloworld(west, &[&remote], &["east"]));
    ws.peers = peers
        .iter()
        .filter(|(k, _)| *k == "east")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    gw_west_tx.send_replace(Arc::new(ws.clone()));
    wtx.send_replace(Arc::new(ws));

    let east_state = |ready_a: bool, ready_b: bool| {
        let mut s = MeshState::default();
        let mut svc = (*helloworld(east, &[&near, &far], &[])).clone();
        svc.endpoints[0].ready = ready_a;
        svc.endpoints[1].ready = ready_b;
        s.local.insert(key.clone(), Arc::new(svc));
        s.imported.insert(
            key.clone(),
            Arc::new(ImportedService {
                key: key.clone(),
                ports: helloworld(east, &[], &[]).ports.clone(),
                clusters: vec![isthmus_gateway::testing::remote(west, 1)],
            }),
        );
        s.peers = peers
            .iter()
            .filter(|(k, _)| *k == "west")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        policy(
            &mut s,
            "DestinationRule",
            "helloworld",
            json!({"host": "helloworld",
            "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "1s"}}}),
        );
        s
    };
    let s = east_state(true, true);
    gw_east_tx.send_replace(Arc::new(MeshState {
        version: 1,
        ..s.clone()
    }));
    let sidecars = [&client.sidecar, &near.sidecar, &far.sidecar];
    publish(&tx, s, &sidecars).await;
    isthmus_core::testing::assert_eventually(
        "gateways ready",
        Duration::from_secs(5),
        async || gw_east.ready.is_ready() && gw_west.ready.is_ready(),
    )
    .await;

    let mut c = Client::new(client.sidecar.outbound_addr);
    // Same zone first.
    let answers = many(&mut c, 20, "/", &[]).await;
    assert_eq!(
        tally(&answers).get("200 east helloworld-a v1"),
        Some(&20),
        "{:?}",
        tally(&answers)
    );
    // Its instance dies (the app stops answering: 503 from its sidecar,
    // and the controller marks it not ready): the other zone.
    near.app.set(Mode::Status(503));
    let answers = many(&mut c, 20, "/", &[]).await;
    assert_eq!(
        tally(&answers).get("200 east helloworld-b v1"),
        Some(&20),
        "zero failed requests: {:?}",
        tally(&answers)
    );
    publish(&tx, east_state(false, true), &sidecars).await;
    // Every local endpoint gone: the remote tier, through both gateways,
    // with the caller's identity intact end to end.
    publish(&tx, east_state(false, false), &sidecars).await;
    let answers = many(&mut c, 20, "/", &[]).await;
    assert_eq!(
        tally(&answers).get("200 west helloworld-w v1"),
        Some(&20),
        "{:?}",
        tally(&answers)
    );
    assert!(
        answers[0]
            .header("x-seen-x-forwarded-client-cert")
            .contains("URI=spiffe://east.local/ns/sample/sa/sleep"),
        "{:?}",
        answers[0].headers
    );
    let m = scrape(remote.sidecar.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                "source_cluster=\"east\"",
                "destination_cluster=\"west\""
            ]
        ),
        20.0,
        "{m}"
    );
    // Back home when local endpoints return (and the ejection of the
    // one that failed has run out).
    near.app.set(Mode::Ok);
    publish(&tx, east_state(true, true), &sidecars).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answers = many(&mut c, 10, "/", &[]).await;
    assert_eq!(
        tally(&answers).get("200 east helloworld-a v1"),
        Some(&10),
        "{:?}",
        tally(&answers)
    );
    // clusterset.local: every cluster by locality and weight; west is in
    // another region, so local endpoints keep it while they are healthy.
    let a = c
        .get_with("http://helloworld.sample.svc.clusterset.local:5000/", &[])
        .await;
    assert!(a.body.contains(" from east "), "{a:?}");
}

#[tokio::test]
async fn locality_distribute_splits_by_zone_where_plain_locality_keeps_all_in_zone() {
    // helloworld-v1 in the caller's zone a, helloworld-v2 in zone b.
    let one = One::with_v2_in("us-east1-b").await;
    let mut c = one.client();
    let answers = many(&mut c, 50, "/", &[]).await;
    assert_eq!(
        count(&answers, 200, "v1"),
        50,
        "same zone only: {:?}",
        tally(&answers)
    );

    one.publish(|s| {
        policy(
            s,
            "DestinationRule",
            "helloworld",
            json!({"host": "helloworld", "trafficPolicy": {"loadBalancer": {"localityLbSetting": {"distribute": [{"from": "us-east1/us-east1-a/*",
                "to": {"us-east1/us-east1-a/*": 75, "us-east1/us-east1-b/*": 25}}]}}}}),
        )
    })
    .await;
    let answers = many(&mut c, 400, "/", &[]).await;
    let zone_b = count(&answers, 200, "v2");
    assert_eq!(
        count(&answers, 200, "v1") + zone_b,
        400,
        "{:?}",
        tally(&answers)
    );
    // Binomial(400, 0.25): mean 100, sd 8.7; ±4 sd.
    assert!((65..=135).contains(&zone_b), "zone b got {zone_b} of 400");
}
