//! Retries, timeouts, outlier detection and connection-pool limits through real sidecars, written and by default.

use std::time::{Duration, Instant};

use isthmus_proxy::testing::*;
use serde_json::json;

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
    let a = c.get_with(&format!("{URL}/"), &[]).await;
    let took = t.elapsed();
    assert_eq!(a.status, 504, "{a:?}");
    assert_eq!(a.body.trim(), "upstream request timeout");
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(700),
        "{took:?}"
    );
    // Without the timeout the slow answer arrives.
    one.publish(|_| {}).await;
    assert_eq!(c.get_with(&format!("{URL}/"), &[]).await.status, 200);
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
        .map(|_| {
            tokio::spawn(async move { Client::new(proxy).get_with(&format!("{URL}/"), &[]).await })
        })
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
