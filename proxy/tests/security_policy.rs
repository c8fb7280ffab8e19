//! PeerAuthentication and AuthorizationPolicy through real sidecars with
//! real mTLS: what they enforce, and that a policy which cannot be applied
//! as written fails closed (deny; STRICT) instead of being dropped.

use std::collections::BTreeMap;

use isthmus_proxy::testing::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_allows_it() {
    let one = One::new().await;
    let inbound = one.v1.sidecar.inbound_addr;
    // PERMISSIVE (the default): plaintext reaches the app.
    let out = plaintext(inbound).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    one.publish(|s| {
        policy(
            s,
            "PeerAuthentication",
            "default",
            json!({"mtls": {"mode": "STRICT"}}),
        )
    })
    .await;
    let hits = one.v1.app.hits();
    let out = plaintext(inbound).await;
    assert_eq!(out, "", "STRICT closes plaintext connections");
    assert_eq!(one.v1.app.hits(), hits);
    let m = scrape(one.v1.sidecar.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "isthmus_proxy_connections_rejected_total",
            &["plaintext_under_strict"]
        ),
        1.0
    );
    // mTLS through the sidecars still works.
    let mut c = one.client();
    assert_eq!(
        many(&mut c, 4, "/", &[])
            .await
            .iter()
            .filter(|a| a.status == 200)
            .count(),
        4
    );
    // A workload-level PERMISSIVE overrides the namespace's STRICT.
    one.publish(|s| {
        policy(
            s,
            "PeerAuthentication",
            "default",
            json!({"mtls": {"mode": "STRICT"}}),
        );
        policy(
            s,
            "PeerAuthentication",
            "v1-legacy",
            json!({"selector": {"matchLabels": {"version": "v1"}}, "mtls": {"mode": "PERMISSIVE"}}),
        );
    })
    .await;
    assert!(plaintext(inbound).await.starts_with("HTTP/1.1 200"));
    assert_eq!(plaintext(one.v2.sidecar.inbound_addr).await, "");
}

#[tokio::test]
async fn authorization_policy_denies_with_403_and_the_log_names_the_caller() {
    let one = One::new().await;
    one.publish(|s| {
        policy(
            s,
            "AuthorizationPolicy",
            "deny-admin",
            json!({"action": "DENY", "rules": [{
            "from": [{"source": {"principals": ["east.local/ns/sample/sa/sleep"]}}],
            "to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}]}),
        );
        policy(
            s,
            "AuthorizationPolicy",
            "allow-sample",
            json!({"rules": [{
            "from": [{"source": {"namespaces": ["sample"]}}],
            "to": [{"operation": {"methods": ["GET"]}}]}]}),
        );
    })
    .await;
    let mut c = one.client();
    let a = c.get_with(&format!("{URL}/admin"), &[]).await;
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body.trim(), "RBAC: access denied");
    assert_eq!(c.get_with(&format!("{URL}/public"), &[]).await.status, 200);
    // ALLOW policies exist and none matches POST.
    assert_eq!(
        c.request("POST", &format!("{URL}/public"), &[])
            .await
            .status,
        403
    );

    // Paths that differ only by encoding, case of escapes, dot segments or
    // duplicate slashes get the same verdict.
    for p in [
        "/%61dmin",
        "/%2561dmin",
        "/public/../admin",
        "/./admin",
        "//admin",
        "/public%2F..%2Fadmin",
        "/admin/./x",
        "/x/%2e%2e/admin/y",
    ] {
        let a = c.get_with(&format!("{URL}{p}"), &[]).await;
        if p == "/%2561dmin" {
            // Decoded once: "/%61dmin" is not "/admin" (no double decoding).
            assert_eq!(a.status, 200, "{p}: {a:?}");
        } else {
            assert_eq!(a.status, 403, "{p}: {a:?}");
        }
    }
    // The access log names the caller and why.
    let lines: Vec<_> = one
        .v1
        .log_lines()
        .into_iter()
        .chain(one.v2.log_lines())
        .filter(|l| l["response_code"] == 403)
        .collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert_eq!(
            l["source_principal"], "east.local/ns/sample/sa/sleep",
            "{l}"
        );
        assert_eq!(l["response_flags"], "RBAC");
        assert!(l["reason"].as_str().unwrap().contains("sample/"), "{l}");
        // What was asked, of whom.
        assert!(matches!(l["method"].as_str(), Some("GET" | "POST")), "{l}");
        assert!(
            l["path"].as_str().is_some_and(|p| p.starts_with('/')),
            "{l}"
        );
        assert!(
            l["authority"]
                .as_str()
                .is_some_and(|a| a.contains("helloworld")),
            "{l}"
        );
    }
}

/// A plaintext request straight to a sidecar's inbound port: the answer,
/// or "" when the connection is closed without one.
async fn plaintext(inbound: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    s.write_all(b"GET /plain HTTP/1.1\r\nHost: helloworld\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

fn statuses(answers: &[Answer]) -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for a in answers {
        *out.entry(a.status).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn a_deny_policy_that_cannot_be_enforced_denies_where_it_applies() {
    let one = One::new().await;
    let mut c = one.client();
    assert_eq!(statuses(&many(&mut c, 4, "/", &[]).await)[&200], 4);
    // A DENY on v1 whose condition needs JWT, which Isthmus cannot check.
    // Dropped, it would deny nothing; kept, it denies every request to v1.
    one.publish(|s| {
        streamed_policy(
            s,
            "AuthorizationPolicy",
            "deny-unverified",
            &[],
            json!({"action": "DENY", "selector": {"matchLabels": {"version": "v1"}},
                   "rules": [{"when": [{"key": "request.auth.claims[iss]", "notValues": ["https://issuer"]}]}]}),
        )
    })
    .await;
    let v1_hits = one.v1.app.hits();
    let answers = many(&mut c, 12, "/", &[]).await;
    assert_eq!(one.v1.app.hits(), v1_hits, "nothing reached v1's app");
    assert_eq!(count(&answers, 200, "v1"), 0);
    let denied: Vec<_> = answers.iter().filter(|a| a.status == 403).collect();
    assert!(!denied.is_empty(), "{:?}", statuses(&answers));
    for a in &denied {
        assert!(
            a.header("x-isthmus-reason")
                .contains("sample/deny-unverified cannot be enforced as written"),
            "{a:?}"
        );
    }
    // The selector still limits it: v2 answers.
    assert_eq!(count(&answers, 200, "v2") + denied.len(), answers.len());
    assert!(count(&answers, 200, "v2") > 0);
}

#[tokio::test]
async fn an_allow_policy_that_cannot_be_enforced_denies_and_a_broken_update_never_loosens() {
    let one = One::new().await;
    let mut c = one.client();
    // The only ALLOW policy lets GET in.
    one.publish(|s| {
        streamed_policy(
            s,
            "AuthorizationPolicy",
            "allow-get",
            &[],
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        )
    })
    .await;
    assert_eq!(statuses(&many(&mut c, 4, "/", &[]).await)[&200], 4);
    assert_eq!(c.request("POST", &format!("{URL}/"), &[]).await.status, 403);
    // An update breaks it (a port must be a number). Dropped, the
    // workloads would have no ALLOW policy left and allow everything.
    one.publish(|s| {
        streamed_policy(
            s,
            "AuthorizationPolicy",
            "allow-get",
            &[],
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["http"]}}]}]}),
        )
    })
    .await;
    let answers = many(&mut c, 6, "/", &[]).await;
    assert_eq!(statuses(&answers), BTreeMap::from([(403, 6)]));
    assert_eq!(c.request("POST", &format!("{URL}/"), &[]).await.status, 403);
    // Fixed, it applies again.
    one.publish(|s| {
        streamed_policy(
            s,
            "AuthorizationPolicy",
            "allow-get",
            &[],
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["5000", "8080"]}}]}]}),
        )
    })
    .await;
    // The destination port is the workload's app port, which the test
    // apps pick at random: only a policy naming it matches.
    let answers = many(&mut c, 4, "/", &[]).await;
    assert_eq!(statuses(&answers), BTreeMap::from([(403, 4)]));
    let (p1, p2) = (one.v1.app.addr.port(), one.v2.app.addr.port());
    one.publish(|s| {
        streamed_policy(
            s,
            "AuthorizationPolicy",
            "allow-get",
            &[],
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": [p1.to_string(), p2.to_string()]}}]}]}),
        )
    })
    .await;
    assert_eq!(statuses(&many(&mut c, 4, "/", &[]).await)[&200], 4);
}

#[tokio::test]
async fn a_dry_run_policy_is_evaluated_and_reported_but_not_enforced() {
    let one = One::new().await;
    let mut c = one.client();
    one.publish(|s| {
        streamed_policy(
            s,
            "AuthorizationPolicy",
            "deny-sleep",
            &[("istio.io/dry-run", "true")],
            json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": ["east.local/ns/sample/sa/sleep"]}}]}]}),
        );
    })
    .await;
    let answers = many(&mut c, 6, "/", &[]).await;
    assert_eq!(statuses(&answers), BTreeMap::from([(200, 6)]));
    let mut denied_would = 0.0;
    for w in [&one.v1, &one.v2] {
        let m = scrape(w.sidecar.metrics_addr).await;
        denied_would += metric(&m, "isthmus_proxy_authorization_dry_run_total", &["denied"]);
    }
    assert_eq!(denied_would, 6.0);
    let lines: Vec<_> = one
        .v1
        .log_lines()
        .into_iter()
        .chain(one.v2.log_lines())
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        assert_eq!(l["response_code"], 200, "{l}");
        assert!(
            l["dry_run_denied"]
                .as_str()
                .is_some_and(|r| r.contains("sample/deny-sleep")),
            "{l}"
        );
    }
}

#[tokio::test]
async fn a_peer_authentication_that_cannot_be_applied_keeps_strict() {
    let one = One::new().await;
    let (v1, v2) = (one.v1.sidecar.inbound_addr, one.v2.sidecar.inbound_addr);
    // portLevelMtls: v1's app port is PERMISSIVE under a STRICT workload
    // mode; v2 stays under the namespace's STRICT.
    let p1 = one.v1.app.addr.port().to_string();
    one.publish(|s| {
        streamed_policy(
            s,
            "PeerAuthentication",
            "default",
            &[],
            json!({"mtls": {"mode": "STRICT"}}),
        );
        streamed_policy(
            s,
            "PeerAuthentication",
            "v1-port",
            &[],
            json!({"selector": {"matchLabels": {"version": "v1"}}, "mtls": {"mode": "STRICT"},
                   "portLevelMtls": {p1.clone(): {"mode": "PERMISSIVE"}}}),
        );
    })
    .await;
    assert!(plaintext(v1).await.starts_with("HTTP/1.1 200"));
    assert_eq!(plaintext(v2).await, "");
    // The same workload exception, written wrong: it cannot open v1 to
    // plaintext; it is STRICT until fixed.
    one.publish(|s| {
        streamed_policy(
            s,
            "PeerAuthentication",
            "default",
            &[],
            json!({"mtls": {"mode": "STRICT"}}),
        );
        streamed_policy(
            s,
            "PeerAuthentication",
            "v1-port",
            &[],
            json!({"selector": {"matchLabels": {"version": "v1"}}, "mtls": {"mode": "PERMISIVE"}}),
        );
    })
    .await;
    assert_eq!(plaintext(v1).await, "");
    // Even alone: a broken namespace-wide PeerAuthentication is STRICT.
    one.publish(|s| {
        streamed_policy(
            s,
            "PeerAuthentication",
            "default",
            &[],
            json!({"mtls": {"mode": "PERMISSIVE", "strict": false}}),
        );
    })
    .await;
    assert_eq!(plaintext(v2).await, "");
    // mTLS from a sidecar still gets through.
    let mut c = one.client();
    assert_eq!(statuses(&many(&mut c, 4, "/", &[]).await)[&200], 4);
}
