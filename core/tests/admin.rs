//! The admin, metrics and readiness servers over real HTTP on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::admin::{self, AdminState, BoundServer, ConfigDump};
use isthmus_core::drain;
use isthmus_core::readiness::Ready;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

struct Peers;
impl ConfigDump for Peers {
    fn name(&self) -> &str {
        "peers"
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::json!([{"cluster": "west", "connected": true}])
    }
}

#[tokio::test]
async fn readiness_reports_pending_blockers_until_released() {
    let ready = Ready::new();
    let (trigger, watcher) = drain::new();
    let srv = BoundServer::bind(
        "readiness",
        "127.0.0.1:0".parse().unwrap(),
        admin::readiness_router(ready.clone()),
    )
    .await
    .unwrap();
    let addr = srv.local_addr();
    let task = srv.spawn(watcher);

    let config = ready.register("first config");
    let cert = ready.register("certificate");
    let (code, body) = http(addr, "GET", "/healthz/ready").await;
    assert_eq!(code, 503);
    assert_eq!(body, "not ready: waiting for certificate, first config\n");
    drop(cert);
    drop(config);
    assert_eq!(
        http(addr, "GET", "/healthz/ready").await,
        (200, "ready\n".into())
    );

    assert_eq!(
        trigger.start_drain_and_wait(Duration::from_secs(5)).await,
        drain::DrainOutcome::Drained
    );
    task.await.unwrap();
}

#[tokio::test]
async fn metrics_are_served_on_both_paths() {
    let mut registry = isthmus_core::metrics::new_registry("gateway");
    let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
    isthmus_core::metrics::sub_registry(&mut registry, "tunnel").register(
        "streams",
        "Tunnel streams opened",
        counter.clone(),
    );
    counter.inc_by(3);
    let (_trigger, watcher) = drain::new();
    let srv = BoundServer::bind(
        "metrics",
        "127.0.0.1:0".parse().unwrap(),
        admin::metrics_router(Arc::new(registry)),
    )
    .await
    .unwrap();
    let addr = srv.local_addr();
    srv.spawn(watcher);
    for path in ["/metrics", "/stats/prometheus"] {
        let (code, body) = http(addr, "GET", path).await;
        assert_eq!(code, 200);
        assert!(
            body.contains("isthmus_build_info{version=\"0.1.0\",component=\"gateway\"} 1"),
            "{body}"
        );
        assert!(body.contains("isthmus_tunnel_streams_total 3"), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
    }
}

#[tokio::test]
async fn admin_dumps_state_and_quit_starts_a_drain() {
    let (quit_tx, mut quit_rx) = tokio::sync::mpsc::channel(1);
    let state = AdminState {
        component: "controller",
        sections: Arc::new(vec![Arc::new(Peers) as Arc<dyn ConfigDump>]),
        logs: None,
        quit: quit_tx,
    };
    let (_trigger, watcher) = drain::new();
    let srv = BoundServer::bind(
        "admin",
        "127.0.0.1:0".parse().unwrap(),
        admin::admin_router(state),
    )
    .await
    .unwrap();
    let addr = srv.local_addr();
    srv.spawn(watcher);

    let (code, body) = http(addr, "GET", "/config_dump").await;
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["component"], "controller");
    assert_eq!(dump["peers"][0]["cluster"], "west");

    // No log control in this process: says so rather than pretending.
    assert_eq!(http(addr, "GET", "/logging").await.0, 404);
    // quitquitquit is POST only.
    assert_eq!(http(addr, "GET", "/quitquitquit").await.0, 405);
    assert_eq!(http(addr, "POST", "/quitquitquit").await.0, 200);
    assert_eq!(quit_rx.recv().await.unwrap(), "POST /quitquitquit");
}

#[tokio::test]
async fn binding_a_busy_port_fails_at_startup_with_the_port_named() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = BoundServer::bind("metrics", addr, axum::Router::new())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("cannot bind the metrics server to {addr}")),
        "{msg}"
    );
}
