//! A raw QUIC peer talking to a gateway: garbage resets only its stream,
//! headers are checked against the certificate, and peers with the wrong
//! root or cluster name never get in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::verify::Expect;
use isthmus_core::identity::{SpiffeId, TrustStore};
use isthmus_core::model::MeshState;
use isthmus_core::testing::{TestDomain, leaf};
use isthmus_gateway::header::{read_frame, write_frame};
use isthmus_gateway::quic;
use isthmus_gateway::testing::*;
use isthmus_proto::tunnel::v1::{TunnelRequest, TunnelResponse, tunnel_response::Code};

/// Connects to `server` as the holder of `certs`, expecting `expect`.
async fn dial(
    certs: Arc<isthmus_core::identity::rotation::StaticCert>,
    trust: Arc<TrustStore>,
    expect: SpiffeId,
    server: SocketAddr,
) -> Result<quinn::Connection, String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quic::client_config(
        certs,
        trust,
        Expect::Exactly(expect),
        Duration::from_secs(10),
        1452,
    ));
    let connecting = ep.connect(server, "gw").map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    // The server may still refuse our certificate after our side is done:
    // a round trip tells.
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let probe = TunnelRequest {
        source_cluster: "east".into(),
        probe: true,
        ..Default::default()
    };
    write_frame(&mut s, &probe)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(5),
        read_frame::<_, TunnelResponse>(&mut r),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// West's gateway, accepting east as a peer, serving helloworld to east.
async fn west(mesh: &Mesh) -> isthmus_gateway::app::Bound {
    let (gw, tx) = gateway(mesh, mesh.get("west")).await;
    let (backend, _) = backend(mesh.get("west"), mesh.trust.clone()).await;
    let mut s = MeshState {
        version: 1,
        peers: peers(mesh, &[("east", "127.0.0.1:9".parse().unwrap())].into()),
        ..Default::default()
    };
    s.local.insert(
        svc_key(),
        local_service(Some(backend), &["east"], &mesh.get("west").locality),
    );
    tx.send_replace(Arc::new(s));
    // Keep the sender alive with the gateway.
    std::mem::forget(tx);
    let ready = gw.ready.clone();
    isthmus_core::testing::assert_eventually(
        "west gateway ready",
        Duration::from_secs(10),
        async || ready.is_ready(),
    )
    .await;
    gw
}

async fn ask(conn: &quinn::Connection, req: &TunnelRequest) -> Result<TunnelResponse, String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut s, req).await.map_err(|e| e.to_string())?;
    read_frame(&mut r).await.map_err(|e| e.to_string())
}

fn east_cert(mesh: &Mesh) -> Arc<isthmus_core::identity::rotation::StaticCert> {
    let east = mesh.get("east");
    leaf(&east.ca, &east.gateway_id(), DAY)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_stream_resets_that_stream_only() {
    let mesh = Mesh::new();
    let gw = west(&mesh).await;
    let conn = dial(
        east_cert(&mesh),
        mesh.trust.clone(),
        mesh.get("west").gateway_id(),
        gw.peer_addr,
    )
    .await
    .unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "random bytes",
            (0..300u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("oversized header", vec![0xff, 0xff, 1, 2, 3]),
        ("not protobuf", vec![0x00, 0x04, 0xff, 0xff, 0xff, 0xff]),
        ("truncated", vec![0x00, 0x40, 0x0a]),
    ];
    for (what, bytes) in cases {
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let _ = s.finish();
        let got = tokio::time::timeout(Duration::from_secs(6), r.read_to_end(1024))
            .await
            .expect(what);
        assert!(
            matches!(got, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) if code.into_inner() == 2),
            "{what}: {got:?}"
        );
    }
    // The connection survives: a well-formed tunnel still works.
    let ok = ask(
        &conn,
        &TunnelRequest {
            service: "helloworld.sample.svc.cluster.local".into(),
            port: u32::from(SVC_PORT),
            source_cluster: "east".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ok.code(), Code::Ok, "{ok:?}");
    assert_eq!(ok.serving_cluster, "west");
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "isthmus_gateway_streams_refused_total",
            &["reason=\"malformed_request\""]
        ),
        4.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_checked_against_exports_and_the_certificate() {
    let mesh = Mesh::new();
    let gw = west(&mesh).await;
    let conn = dial(
        east_cert(&mesh),
        mesh.trust.clone(),
        mesh.get("west").gateway_id(),
        gw.peer_addr,
    )
    .await
    .unwrap();
    let base = TunnelRequest {
        service: "helloworld.sample.svc.cluster.local".into(),
        port: u32::from(SVC_PORT),
        source_cluster: "east".into(),
        ..Default::default()
    };
    let cases = [
        (
            TunnelRequest {
                source_cluster: "eu".into(),
                ..base.clone()
            },
            Code::SourceMismatch,
        ),
        (
            TunnelRequest {
                service: "other.sample.svc.cluster.local".into(),
                ..base.clone()
            },
            Code::UnknownService,
        ),
        (
            TunnelRequest {
                service: "example.com".into(),
                ..base.clone()
            },
            Code::UnknownService,
        ),
        (
            TunnelRequest {
                port: 9999,
                ..base.clone()
            },
            Code::UnknownPort,
        ),
        (
            TunnelRequest {
                subset: "v9".into(),
                ..base.clone()
            },
            Code::UnknownSubset,
        ),
    ];
    for (req, want) in cases {
        let resp = ask(&conn, &req).await.unwrap();
        assert_eq!(resp.code(), want, "{req:?}: {resp:?}");
        assert!(!resp.message.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_an_unknown_root_is_refused() {
    let mesh = Mesh::new();
    let gw = west(&mesh).await;
    // Control: east's real gateway certificate gets in, so a refusal
    // below is about the certificate, not the setup.
    dial(
        east_cert(&mesh),
        mesh.trust.clone(),
        mesh.get("west").gateway_id(),
        gw.peer_addr,
    )
    .await
    .expect("east's own gateway certificate is accepted");
    // A gateway certificate for "east" from a root west has never seen.
    let rogue = TestDomain::new("east.local");
    let ca = rogue.cluster("east");
    let cert = leaf(&ca, &SpiffeId::gateway(&rogue.td, "east").unwrap(), DAY);
    let err = dial(
        cert,
        mesh.trust.clone(),
        mesh.get("west").gateway_id(),
        gw.peer_addr,
    )
    .await
    .unwrap_err();
    assert!(!err.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_clusters_name_is_refused() {
    let mesh = Mesh::new();
    let gw = west(&mesh).await;
    dial(
        east_cert(&mesh),
        mesh.trust.clone(),
        mesh.get("west").gateway_id(),
        gw.peer_addr,
    )
    .await
    .expect("east's own gateway certificate is accepted");
    // A valid gateway certificate from a trusted root, but for a cluster
    // west does not peer with.
    let east = mesh.get("east");
    let stranger_ca = east.domain.cluster("stranger");
    let cert = leaf(
        &stranger_ca,
        &SpiffeId::gateway(&east.domain.td, "stranger").unwrap(),
        DAY,
    );
    assert!(
        dial(
            cert,
            mesh.trust.clone(),
            mesh.get("west").gateway_id(),
            gw.peer_addr
        )
        .await
        .is_err()
    );

    // And from the other side: a server presenting eu's gateway
    // certificate where west's was expected is refused by the client.
    let (eu_gw, _eu_tx) = gateway(&mesh, mesh.get("eu")).await;
    let err = dial(
        east_cert(&mesh),
        mesh.trust.clone(),
        mesh.get("west").gateway_id(),
        eu_gw.peer_addr,
    )
    .await
    .unwrap_err();
    assert!(err.contains("was expected"), "{err}");
}
