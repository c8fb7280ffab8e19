//! A peer with a valid certificate that misbehaves on the stream: an
//! oversized or a malformed message closes that stream with a counted,
//! logged reason; the controller and its other peers carry on.

use std::time::Duration;

use isthmus_core::identity::verify::Expect;
use isthmus_core::testing::{assert_eventually, leaf};
use isthmus_federation::catalog::ExportPolicy;
use isthmus_federation::session::MAX_MESSAGE_BYTES;
use isthmus_federation::testing::{TestCluster, service_yaml};
use isthmus_proto::common::v1 as pbc;
use isthmus_proto::federation::v1::peer_federation_client::PeerFederationClient;
use isthmus_proto::federation::v1::{self as pb, peer_message::Message};
use prost::Message as _;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_messages_close_that_stream_only() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    let eu = TestCluster::new(root.path(), "eu", "europe-west1");
    eu.write(
        "helloworld.yaml",
        &service_yaml("helloworld", 5000, true, ""),
    );
    let trusted = [east.bundle(), west.bundle(), eu.bundle()];
    let hb = Duration::from_millis(200);
    let lease = Duration::from_secs(300);
    let e = east
        .start(
            east.config(
                &[
                    (&west, ExportPolicy::default()),
                    (&eu, ExportPolicy::default()),
                ],
                hb,
                lease,
            ),
            &trusted,
        )
        .await;
    let _eu = eu
        .start(
            eu.config(&[(&east, ExportPolicy::default())], hb, lease),
            &trusted,
        )
        .await;
    assert_eventually(
        "east imports from eu",
        Duration::from_secs(10),
        async || east.service_entry("sample", "helloworld").is_some(),
    )
    .await;

    // "West", with west's genuine controller certificate, dials east.
    let certs = leaf(&west.ca, &west.controller_id(), Duration::from_secs(3600));
    let trust = isthmus_core::identity::TrustStore::with_bundles([east.bundle()]).unwrap();
    let tls = isthmus_core::tls::client_config(
        Some(certs),
        trust,
        Expect::Exactly(east.controller_id()),
        &[],
    );
    let channel =
        isthmus_federation::transport::channel(e.federation_addr.to_string(), tls).unwrap();
    let mut client =
        PeerFederationClient::new(channel).max_encoding_message_size(4 * MAX_MESSAGE_BYTES);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let msg = |m| pb::PeerMessage { message: Some(m) };
    tx.send(msg(Message::Hello(pb::Hello {
        protocol_version: pb::PROTOCOL_VERSION,
        cluster_name: "west".into(),
        trust_domain: "west.local".into(),
        epoch: "e".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut inbound = client
        .federate(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // A snapshot of valid services, over the limit (~1 KiB each).
    let bulk = "x".repeat(1000);
    let services = (0..MAX_MESSAGE_BYTES / 1000 + 100)
        .map(|i| pb::ExportedService {
            key: Some(pbc::ServiceKey {
                namespace: "ns".into(),
                name: format!("s{i}"),
            }),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "TCP".into(),
                app_protocol: bulk.clone(),
            }],
            ..Default::default()
        })
        .map(|s| s.encode_to_vec().into())
        .collect();
    tx.send(msg(Message::Snapshot(pb::Snapshot {
        epoch: "e".into(),
        revision: 1,
        services,
    })))
    .await
    .unwrap();

    // East ends that stream, counts why, and imports nothing from it.
    // (`last_disconnect_reason` is shared with east's own dialer, which
    // keeps failing to reach a west that does not listen; the termination
    // counter is the session's own record.)
    let metrics = e.metrics_addr;
    assert_eventually(
        "the stream to fake west is closed as too large",
        Duration::from_secs(10),
        async || {
            isthmus_core::admin::http_get(metrics, "/metrics")
                .await
                .is_ok_and(|m| m.contains("reason=\"message_too_large\""))
        },
    )
    .await;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), inbound.message())
        .await
        .unwrap_or(Ok(None))
    {}
    let west_status = e
        .status()
        .into_iter()
        .find(|p| p.cluster == "west")
        .unwrap();
    assert_eq!(west_status.imported, 0);
    // The controller carries on: eu is still connected and its import stays.
    let eu_status = e.status().into_iter().find(|p| p.cluster == "eu").unwrap();
    assert!(eu_status.connected, "{eu_status:?}");
    assert!(east.service_entry("sample", "helloworld").is_some());

    // A small but malformed snapshot (a service name that is not a DNS
    // label) is refused the same way, and counted as malformed.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(msg(Message::Hello(pb::Hello {
        protocol_version: pb::PROTOCOL_VERSION,
        cluster_name: "west".into(),
        trust_domain: "west.local".into(),
        epoch: "e2".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let _inbound = client
        .federate(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let bad = pb::ExportedService {
        key: Some(pbc::ServiceKey {
            namespace: "ns".into(),
            name: "Not_A_Label".into(),
        }),
        ..Default::default()
    };
    tx.send(msg(Message::Snapshot(pb::Snapshot {
        epoch: "e2".into(),
        revision: 1,
        services: vec![bad.encode_to_vec().into()],
    })))
    .await
    .unwrap();
    assert_eventually(
        "the malformed snapshot is refused",
        Duration::from_secs(10),
        async || {
            isthmus_core::admin::http_get(metrics, "/metrics")
                .await
                .is_ok_and(|m| m.contains("reason=\"malformed\""))
        },
    )
    .await;
    assert_eq!(
        e.status()
            .into_iter()
            .find(|p| p.cluster == "west")
            .unwrap()
            .imported,
        0
    );
}
