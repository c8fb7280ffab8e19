//! Sidecars on loopback with real mTLS between them, sample apps behind
//! them, and Istio policies fed as the config stream would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::model::*;
use isthmus_proxy::testing::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

#[tokio::test]
async fn mtls_end_to_end_carries_the_callers_identity_and_istio_telemetry() {
    let one = One::new().await;
    let mut c = one.client();
    let a = c
        .get(
            &format!("{URL}/hello"),
            &[(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )],
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.starts_with("east helloworld-v"), "{}", a.body);
    // The app sees the caller's own SPIFFE ID (end-to-end mTLS), the
    // propagated trace context and a request ID the sidecar added.
    let xfcc = a.header("x-seen-x-forwarded-client-cert");
    assert!(
        xfcc.contains("URI=spiffe://east.local/ns/sample/sa/sleep"),
        "{xfcc}"
    );
    assert!(
        xfcc.starts_with("By=spiffe://east.local/ns/sample/sa/helloworld"),
        "{xfcc}"
    );
    assert_eq!(
        a.header("x-seen-traceparent"),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(a.header("x-seen-x-request-id").len(), 36);
    // Peer metadata is for the sidecars only.
    assert_eq!(a.header("x-seen-x-isthmus-peer"), "");

    // Short names resolve in the caller's namespace; other forms too.
    for url in [
        "http://helloworld:5000/x",
        "http://helloworld.sample:5000/x",
        "http://helloworld.sample.svc:5000/x",
    ] {
        assert_eq!(c.get(url, &[]).await.status, 200, "{url}");
    }
    // Unknown service and unknown port: 404 naming what to check.
    let a = c
        .get("http://nosuch.sample.svc.cluster.local:5000/", &[])
        .await;
    assert_eq!(a.status, 404);
    assert!(a.body.contains("no service nosuch.sample"), "{}", a.body);
    let a = c.get("http://helloworld:81/", &[]).await;
    assert_eq!(a.status, 404);
    assert!(
        a.body.contains("has no port 81 (its ports: 5000)"),
        "{}",
        a.body
    );

    // Istio's metrics, on both sides.
    let src = scrape(one.client.sidecar.metrics_addr).await;
    let n = metric(
        &src,
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "source_workload=\"sleep\"",
            "destination_service=\"helloworld.sample.svc.cluster.local\"",
            "response_code=\"200\"",
            "connection_security_policy=\"mutual_tls\"",
            "destination_cluster=\"east\"",
        ],
    );
    assert_eq!(n, 4.0, "{src}");
    let mut dst = scrape(one.v1.sidecar.metrics_addr).await;
    dst.push_str(&scrape(one.v2.sidecar.metrics_addr).await);
    let n = metric(
        &dst,
        "istio_requests_total",
        &[
            "reporter=\"destination\"",
            "source_workload=\"sleep\"",
            "source_principal=\"east.local/ns/sample/sa/sleep\"",
            "source_cluster=\"east\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert_eq!(n, 4.0, "{dst}");
    assert!(
        dst.contains("istio_request_duration_milliseconds_bucket"),
        "{dst}"
    );

    // The config dump shows the workload's effective policy.
    let dump = isthmus_core::admin::http_get(one.v1.sidecar.admin_addr, "/config_dump")
        .await
        .unwrap();
    assert!(dump.contains("\"mtls_mode\":\"Permissive\""), "{dump}");
}

#[tokio::test]
async fn a_90_10_split_lands_within_statistical_bounds() {
    let one = One::new().await;
    one.publish(|s| {
        policy(
            s,
            "VirtualService",
            "helloworld",
            json!({"hosts": ["helloworld"], "http": [{"route": [
                {"destination": {"host": "helloworld", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "helloworld", "subset": "v2"}, "weight": 10}]}]}),
        )
    })
    .await;
    let mut c = one.client();
    let answers = many(&mut c, 1000, "/", &[]).await;
    let (v1, v2) = (count(&answers, 200, "v1"), count(&answers, 200, "v2"));
    assert_eq!(v1 + v2, 1000, "{:?}", tally(&answers));
    // Binomial(1000, 0.1): mean 100, sd 9.5; ±4 sd.
    assert!((62..=138).contains(&v2), "v2 got {v2} of 1000");
}

#[tokio::test]
async fn header_method_and_path_matches_route_to_their_subsets() {
    let one = One::new().await;
    one.publish(|s| {
        policy(
            s,
            "VirtualService",
            "helloworld",
            json!({"hosts": ["helloworld"], "http": [
                {"match": [{"headers": {"x-user": {"exact": "tester"}}}],
                 "route": [{"destination": {"host": "helloworld", "subset": "v2"}}]},
                {"match": [{"uri": {"prefix": "/beta/"}}, {"uri": {"regex": "/v[0-9]+/canary"}}],
                 "route": [{"destination": {"host": "helloworld", "subset": "v2"}}]},
                {"match": [{"method": {"exact": "DELETE"}}],
                 "route": [{"destination": {"host": "helloworld", "subset": "v2"}}]},
                {"route": [{"destination": {"host": "helloworld", "subset": "v1"}}]}]}),
        )
    })
    .await;
    let mut c = one.client();
    let check = |a: &Answer, v: &str| {
        assert_eq!(a.status, 200, "{a:?}");
        assert!(
            a.body.contains(&format!(" {v} ")),
            "{} should be {v}",
            a.body
        );
    };
    for _ in 0..5 {
        check(&c.get(&format!("{URL}/"), &[]).await, "v1");
        check(
            &c.get(&format!("{URL}/"), &[("x-user", "tester")]).await,
            "v2",
        );
        check(
            &c.get(&format!("{URL}/"), &[("x-user", "other")]).await,
            "v1",
        );
        check(&c.get(&format!("{URL}/beta/x"), &[]).await, "v2");
        check(&c.get(&format!("{URL}/betax"), &[]).await, "v1");
        check(&c.get(&format!("{URL}/v12/canary"), &[]).await, "v2");
        check(&c.get(&format!("{URL}/v12/canary/x"), &[]).await, "v1");
        check(&c.request("DELETE", &format!("{URL}/"), &[]).await, "v2");
        // The route sees the normalized path.
        check(&c.get(&format!("{URL}/alpha/../beta/x"), &[]).await, "v2");
    }
}

#[tokio::test]
async fn retries_turn_a_503_into_success() {
    let one = One::new().await;
    one.v2.app.set(Mode::Status(503));
    // Control: without retries, about half fail.
    one.publish(|s| {
        policy(
            s,
            "VirtualService",
            "helloworld",
            json!({"hosts": ["helloworld"], "http": [{"route": [{"destination": {"host": "helloworld"}}],
                   "retries": {"attempts": 0}}]}),
        );
        // No ejection during this test.
        policy(s, "DestinationRule", "helloworld", json!({"host": "helloworld",
            "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1000}}}));
    })
    .await;
    let mut c = one.client();
    let answers = many(&mut c, 40, "/", &[]).await;
    let failed = answers.iter().filter(|a| a.status == 503).count();
    assert!(failed >= 10, "control: {:?}", tally(&answers));

    one.publish(|s| {
        policy(
            s,
            "VirtualService",
            "helloworld",
            json!({"hosts": ["helloworld"], "http": [{"route": [{"destination": {"host": "helloworld"}}],
                   "retries": {"attempts": 2, "retryOn": "5xx"}}]}),
        );
        policy(s, "DestinationRule", "helloworld", json!({"host": "helloworld",
            "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1000}}}));
    })
    .await;
    let before = one.v2.app.hits();
    let answers = many(&mut c, 40, "/", &[]).await;
    assert_eq!(count(&answers, 200, "v1"), 40, "{:?}", tally(&answers));
    assert!(one.v2.app.hits() > before, "the failing endpoint was tried");
}

#[tokio::test]
async fn route_timeouts_fire() {
    let one = One::new().await;
    one.v1.app.set(Mode::Delay(Duration::from_millis(800)));
    one.v2.app.set(Mode::Delay(Duration::from_millis(800)));
    one.publish(|s| {
        policy(
            s,
            "VirtualService",
            "helloworld",
            json!({"hosts": ["helloworld"], "http": [{"route": [{"destination": {"host": "helloworld"}}],
                   "timeout": "150ms"}]}),
        )
    })
    .await;
    let mut c = one.client();
    let t = Instant::now();
    let a = c.get(&format!("{URL}/"), &[]).await;
    let took = t.elapsed();
    assert_eq!(a.status, 504, "{a:?}");
    assert_eq!(a.body.trim(), "upstream request timeout");
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(700),
        "{took:?}"
    );
    // Without the timeout the slow answer arrives.
    one.publish(|_| {}).await;
    assert_eq!(c.get(&format!("{URL}/"), &[]).await.status, 200);
}

#[tokio::test]
async fn fault_abort_and_delay_happen_at_their_percentages() {
    let one = One::new().await;
    one.publish(|s| {
        policy(
            s,
            "VirtualService",
            "helloworld",
            json!({"hosts": ["helloworld"], "http": [{"route": [{"destination": {"host": "helloworld"}}],
                   "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 30}}}}]}),
        )
    })
    .await;
    let mut c = one.client();
    let hits = one.v1.app.hits() + one.v2.app.hits();
    let answers = many(&mut c, 500, "/", &[]).await;
    let aborted = answers.iter().filter(|a| a.status == 418).count();
    // Binomial(500, 0.3): mean 150, sd 10.2; ±4 sd.
    assert!((109..=191).contains(&aborted), "{:?}", tally(&answers));
    assert_eq!(
        one.v1.app.hits() + one.v2.app.hits() - hits,
        (500 - aborted) as u64,
        "aborted requests never reach the app"
    );

    one.publish(|s| {
        policy(
            s,
            "VirtualService",
            "helloworld",
            json!({"hosts": ["helloworld"], "http": [{"route": [{"destination": {"host": "helloworld"}}],
                   "fault": {"delay": {"fixedDelay": "50ms", "percentage": {"value": 50}}}}]}),
        )
    })
    .await;
    let mut delayed = 0;
    for _ in 0..60 {
        let t = Instant::now();
        assert_eq!(c.get(&format!("{URL}/"), &[]).await.status, 200);
        if t.elapsed() >= Duration::from_millis(50) {
            delayed += 1;
        }
    }
    // Binomial(60, 0.5): mean 30, sd 3.9; ±4 sd (a slow machine can only
    // add delays, so the upper bound is loose).
    assert!((14..=50).contains(&delayed), "{delayed} of 60 delayed");
}

#[tokio::test]
async fn an_endpoint_failing_5xx_is_ejected_and_returns_after_its_ejection_time() {
    let one = One::new().await;
    one.publish(|s| {
        policy(
            s,
            "VirtualService",
            "helloworld",
            json!({"hosts": ["helloworld"], "http": [{"route": [{"destination": {"host": "helloworld"}}],
                   "retries": {"attempts": 0}}]}),
        );
        policy(s, "DestinationRule", "helloworld", json!({"host": "helloworld",
            "trafficPolicy": {"outlierDetection": {
                "consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "1s", "maxEjectionPercent": 50}}}));
    })
    .await;
    one.v2.app.set(Mode::Status(500));
    let mut c = one.client();
    let answers = many(&mut c, 60, "/", &[]).await;
    let failures = answers.iter().filter(|a| a.status == 500).count();
    // Round robin: v2's first 3 failures eject it; then v1 only.
    assert_eq!(failures, 3, "{:?}", tally(&answers));
    let m = scrape(one.client.sidecar.metrics_addr).await;
    assert_eq!(
        metric(&m, "isthmus_proxy_outlier_ejections_total", &[]),
        1.0,
        "{m}"
    );

    // Healed, it comes back after its ejection time.
    one.v2.app.set(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answers = many(&mut c, 20, "/", &[]).await;
    assert_eq!(count(&answers, 200, "v2"), 10, "{:?}", tally(&answers));
}

#[tokio::test]
async fn connection_pool_limits_answer_503_with_the_reason() {
    let one = One::new().await;
    one.v1.app.set(Mode::Delay(Duration::from_millis(300)));
    one.v2.app.set(Mode::Delay(Duration::from_millis(300)));
    one.publish(|s| {
        policy(
            s,
            "DestinationRule",
            "helloworld",
            json!({"host": "helloworld",
            "trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 2}}}}),
        );
    })
    .await;
    let proxy = one.client.sidecar.outbound_addr;
    let tasks: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { Client::new(proxy).get(&format!("{URL}/"), &[]).await }))
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let over: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!(
        answers.iter().filter(|a| a.status == 200).count(),
        2,
        "{:?}",
        tally(&answers)
    );
    assert_eq!(over.len(), 4);
    assert!(
        over[0]
            .header("x-isthmus-reason")
            .contains("connectionPool limit of 2"),
        "{:?}",
        over[0].headers
    );
}

#[tokio::test]
async fn malformed_requests_get_a_4xx_and_the_proxy_keeps_serving() {
    let one = One::new().await;
    let proxy = one.client.sidecar.outbound_addr;
    let raw = |req: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
        s.write_all(&req).await.unwrap();
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out))
            .await
            .expect("an answer, not a hang")
            .unwrap_or(0);
        String::from_utf8_lossy(&out[..n]).into_owned()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"GET /a HTTP/1.1\r\nHost: exa mple\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            b"GET /a HTTP/1.1\r\nHost: helloworld:99999\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (b"GET /a HTTP/1.1\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (
            b"GET /a%zz HTTP/1.1\r\nHost: helloworld:5000\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            b"GET /a%00 HTTP/1.1\r\nHost: helloworld:5000\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            b"GET /a b c HTTP/1.1\r\nHost: helloworld:5000\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (b"\x16\x03\x01garbage\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (
            [
                b"GET / HTTP/1.1\r\nHost: helloworld:5000\r\nX-Big: ".to_vec(),
                vec![b'a'; 100 * 1024],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
            // hyper answers oversized heads with 431 (Request Header
            // Fields Too Large), the precise 4xx for it.
            "HTTP/1.1 431",
        ),
    ];
    for (req, want) in cases {
        let out = raw(req.clone()).await;
        assert!(
            out.starts_with(want),
            "{:?} got {out:?}",
            String::from_utf8_lossy(&req[..req.len().min(60)])
        );
        // Still serving.
        let a = Client::new(proxy).get(&format!("{URL}/ok"), &[]).await;
        assert_eq!(a.status, 200);
    }
}

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
        .get("http://helloworld.sample.svc.clusterset.local:5000/", &[])
        .await;
    assert!(a.body.starts_with("east "), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_with_zero_errors() {
    use isthmus_core::identity::{CertificateSigner, RotatingCert};
    let mesh = Mesh::new();
    let east = mesh.get("east");
    let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
    let t = mesh.trust.clone();
    // Two-second certificates, renewed at about half their life: over the
    // run every sidecar rotates at least twice and the first certificates
    // expire, so a handshake with a stale one would fail.
    let ttl = Duration::from_secs(2);
    let signer: Arc<dyn CertificateSigner> = Arc::new(east.ca.clone());
    let mut certs = Vec::new();
    let mut renewals = Vec::new();
    let mut cert = async |sa: &str| {
        let c = RotatingCert::issue(
            east.workload_id(sa),
            signer.as_ref(),
            ttl,
            isthmus_core::tls::provider(),
        )
        .await
        .unwrap();
        renewals.push(c.spawn_renewal(signer.clone(), ttl));
        certs.push(c.clone());
        c
    };
    let client = workload_with_certs(
        east,
        t.clone(),
        rx.clone(),
        "sleep",
        "v1",
        "us-east1-a",
        None,
        cert("sleep").await,
    )
    .await;
    let v1 = workload_with_certs(
        east,
        t.clone(),
        rx.clone(),
        "helloworld-v1",
        "v1",
        "us-east1-a",
        None,
        cert("helloworld").await,
    )
    .await;
    let v2 = workload_with_certs(
        east,
        t,
        rx,
        "helloworld-v2",
        "v2",
        "us-east1-a",
        None,
        cert("helloworld").await,
    )
    .await;
    let mut s = MeshState::default();
    s.local.insert(
        ServiceKey::new(NS, "helloworld"),
        helloworld(east, &[&v1, &v2], &[]),
    );
    publish(&tx, s, &[&client.sidecar, &v1.sidecar, &v2.sidecar]).await;

    // Four clients in a loop; every 250 ms the client sidecar's pool is
    // emptied, so new mTLS handshakes happen throughout.
    let proxy = client.sidecar.outbound_addr;
    let deadline = Instant::now() + Duration::from_secs(5);
    let loads: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::new(proxy);
                let (mut ok, mut bad) = (0, Vec::new());
                while Instant::now() < deadline {
                    let a = c.get(&format!("{URL}/"), &[]).await;
                    if a.status == 200 {
                        ok += 1
                    } else {
                        bad.push(a)
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        client.sidecar.ctx.mesh.clear();
    }
    let mut total = 0;
    for l in loads {
        let (ok, bad) = l.await.unwrap();
        assert!(bad.is_empty(), "failed requests during rotation: {bad:?}");
        total += ok;
    }
    assert!(total > 200, "{total} requests");
    for c in &certs {
        assert!(
            c.rotations() >= 2,
            "{} rotated {} times",
            c.id(),
            c.rotations()
        );
    }
}

/// Removes an iptables rule on drop.
struct Rule(Vec<String>);
impl Drop for Rule {
    fn drop(&mut self) {
        let mut args = self.0.clone();
        args[2] = "-D".into();
        let _ = std::process::Command::new("iptables").args(&args).status();
    }
}

#[tokio::test]
async fn transparent_mode_routes_connections_redirected_by_iptables() {
    // The REDIRECT a Kubernetes init container installs, scoped to one
    // made-up destination so nothing else on the machine is touched.
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let has_iptables = std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(root && has_iptables) {
        if std::env::var_os("ISTHMUS_SKIP_NETNS").is_some() {
            eprintln!(
                "SKIPPED transparent mode: needs root and iptables (ISTHMUS_SKIP_NETNS is set)"
            );
            return;
        }
        panic!(
            "transparent mode test needs root and iptables; run as root, or set ISTHMUS_SKIP_NETNS=1 to skip it"
        );
    }
    let one = One::new().await;
    let east = one.mesh.get("east");
    let app = app("east", "legacy", "v1").await;
    let mut cfg = config(east, "legacy", "sleep", &[], "us-east1-a", app.addr, None);
    cfg.transparent_addr = Some("127.0.0.1:0".parse().unwrap());
    let sidecar = isthmus_proxy::app::build(
        cfg,
        isthmus_proxy::app::Deps {
            certs: isthmus_core::testing::leaf(&east.ca, &east.workload_id("sleep"), DAY),
            trust: one.mesh.trust.clone(),
            state: one.tx.subscribe(),
            logs: None,
            access_log: None,
        },
    )
    .await
    .unwrap();
    let port = sidecar.transparent_addr.unwrap().port();
    let dest = format!("127.0.{}.{}", 100 + std::process::id() % 100, 7);
    let args: Vec<String> = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        &dest,
        "--dport",
        "5000",
        "-j",
        "REDIRECT",
        "--to-ports",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(
        std::process::Command::new("iptables")
            .args(&args)
            .status()
            .unwrap()
            .success()
    );
    let _rule = Rule(args);
    // The app dials the service's address as if it were a ClusterIP; the
    // sidecar reads the original destination and routes by Host.
    let mut s = tokio::net::TcpStream::connect(format!("{dest}:5000"))
        .await
        .unwrap();
    s.write_all(b"GET /transparent HTTP/1.1\r\nHost: helloworld\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("east helloworld-v"), "{out}");
    assert!(
        out.contains("URI=spiffe://east.local/ns/sample/sa/sleep"),
        "end-to-end mTLS with the workload's identity: {out}"
    );
}

#[tokio::test]
async fn h2c_and_grpc_cross_two_sidecars_with_trailers() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let one = One::new().await;
    let east = one.mesh.get("east");
    // A gRPC-style app: HTTP/2 only (h2c), answers with trailers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let te = req.headers().get("te").cloned();
                        let path = req.uri().path().to_owned();
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let body = Full::new(Bytes::from(format!("h2 app got {path}")))
                            .with_trailers(async move { Some(Ok(trailers)) });
                        let mut resp = hyper::Response::new(body);
                        resp.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        if let Some(te) = te {
                            resp.headers_mut().insert("x-seen-te", te);
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let server = isthmus_proxy::app::build(
        config(
            east,
            "grpc",
            "grpc",
            &[("app", "grpc")],
            "us-east1-a",
            app_addr,
            None,
        ),
        isthmus_proxy::app::Deps {
            certs: isthmus_core::testing::leaf(&east.ca, &east.workload_id("grpc"), DAY),
            trust: one.mesh.trust.clone(),
            state: one.tx.subscribe(),
            logs: None,
            access_log: None,
        },
    )
    .await
    .unwrap();
    let inbound = server.inbound_addr;
    one.publish(|s| {
        s.local.insert(
            ServiceKey::new(NS, "grpc"),
            Arc::new(LocalService {
                key: ServiceKey::new(NS, "grpc"),
                ports: vec![ServicePort {
                    name: "grpc".into(),
                    port: 7000,
                    target_port: 7000,
                    protocol: "TCP".into(),
                }],
                endpoints: vec![Endpoint {
                    address: inbound.ip(),
                    ports: [("grpc".to_owned(), inbound.port())].into(),
                    ready: true,
                    locality: Locality::new("us-east1", "us-east1-a"),
                    labels: Default::default(),
                    workload: "grpc-0".into(),
                }],
                exported_to: Default::default(),
            }),
        );
    })
    .await;
    // An h2c client (prior knowledge), as gRPC clients are.
    let tcp = tokio::net::TcpStream::connect(one.client.sidecar.outbound_addr)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = hyper::Request::post("http://grpc.sample.svc.cluster.local:7000/demo.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-seen-te"], "trailers");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("trailers cross both sidecars");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "h2 app got /demo.Echo/Say");
    }
    let m = scrape(server.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                "request_protocol=\"grpc\"",
                "response_code=\"200\""
            ]
        ),
        3.0,
        "{m}"
    );
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

#[tokio::test]
async fn with_no_policy_written_retries_and_ejection_are_on() {
    // The fixture's DestinationRule has subsets only: no retries, no
    // outlierDetection written anywhere.
    let one = One::new().await;
    one.v2.app.set(Mode::Status(503));
    let mut c = one.client();
    let answers = many(&mut c, 60, "/", &[]).await;
    // Istio's default retries (503) turn every failure into success…
    assert_eq!(count(&answers, 200, "v1"), 60, "{:?}", tally(&answers));
    // …and Isthmus's default detection ejects the failing endpoint after
    // 5 consecutive errors, so it stops being tried.
    let hits = one.v2.app.hits();
    assert!(hits >= 5, "v2 tried {hits} times");
    many(&mut c, 30, "/", &[]).await;
    assert_eq!(one.v2.app.hits(), hits, "ejected: no more attempts");
}
