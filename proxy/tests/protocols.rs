//! What a sidecar carries and refuses: malformed requests, transparent (iptables) capture, h2c and gRPC with trailers; certificate rotation under load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::model::*;
use isthmus_proxy::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

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
        let a = Client::new(proxy).get_with(&format!("{URL}/ok"), &[]).await;
        assert_eq!(a.status, 200);
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
    assert!(out.contains("from east instance helloworld-v"), "{out}");
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
                    let a = c.get_with(&format!("{URL}/"), &[]).await;
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
