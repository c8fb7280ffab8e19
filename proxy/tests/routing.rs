//! VirtualService routing through real sidecars with real mTLS: identity end to end and Istio telemetry, weighted splits, matches, faults.

use std::time::{Duration, Instant};

use isthmus_proxy::testing::*;
use serde_json::json;

#[tokio::test]
async fn mtls_end_to_end_carries_the_callers_identity_and_istio_telemetry() {
    let one = One::new().await;
    let mut c = one.client();
    let a = c
        .get_with(
            &format!("{URL}/hello"),
            &[(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )],
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.body.contains(" from east instance helloworld-v"),
        "{}",
        a.body
    );
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
        assert_eq!(c.get_with(url, &[]).await.status, 200, "{url}");
    }
    // Unknown service and unknown port: 404 naming what to check.
    let a = c
        .get_with("http://nosuch.sample.svc.cluster.local:5000/", &[])
        .await;
    assert_eq!(a.status, 404);
    assert!(a.body.contains("no service nosuch.sample"), "{}", a.body);
    let a = c.get_with("http://helloworld:81/", &[]).await;
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
        check(&c.get_with(&format!("{URL}/"), &[]).await, "v1");
        check(
            &c.get_with(&format!("{URL}/"), &[("x-user", "tester")])
                .await,
            "v2",
        );
        check(
            &c.get_with(&format!("{URL}/"), &[("x-user", "other")]).await,
            "v1",
        );
        check(&c.get_with(&format!("{URL}/beta/x"), &[]).await, "v2");
        check(&c.get_with(&format!("{URL}/betax"), &[]).await, "v1");
        check(&c.get_with(&format!("{URL}/v12/canary"), &[]).await, "v2");
        check(&c.get_with(&format!("{URL}/v12/canary/x"), &[]).await, "v1");
        check(&c.request("DELETE", &format!("{URL}/"), &[]).await, "v2");
        // The route sees the normalized path.
        check(
            &c.get_with(&format!("{URL}/alpha/../beta/x"), &[]).await,
            "v2",
        );
    }
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
        assert_eq!(c.get_with(&format!("{URL}/"), &[]).await.status, 200);
        if t.elapsed() >= Duration::from_millis(50) {
            delayed += 1;
        }
    }
    // Binomial(60, 0.5): mean 30, sd 3.9; ±4 sd (a slow machine can only
    // add delays, so the upper bound is loose).
    assert!((14..=50).contains(&delayed), "{delayed} of 60 delayed");
}
