//! Certificate rotation under continuous handshakes, over real TLS on
//! loopback: no handshake fails, connections opened before a rotation keep
//! working, and new handshakes see the new certificate.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::verify::Expect;
use isthmus_core::identity::{CertificateSigner, RotatingCert, SpiffeId, TrustStore};
use isthmus_core::testing::{TestDomain, assert_eventually, tls_echo_server};
use isthmus_core::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Short enough that renewal (at ~half the lifetime) happens several
/// times in a few seconds.
const TTL: Duration = Duration::from_secs(2);

async fn connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("isthmus.invalid").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

async fn echo(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    msg: &[u8],
) -> Result<(), String> {
    tls.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0; msg.len()];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    if buf != msg {
        return Err("echo mismatch".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_handshakes_across_rotations_never_fail() {
    let east = TestDomain::new("east.local");
    let ca = east.cluster("east");
    let signer: Arc<dyn CertificateSigner> = Arc::new(ca.clone());
    let store = TrustStore::with_bundles([east.bundle()]).unwrap();
    let server_id = SpiffeId::gateway(&east.td, "east").unwrap();
    let client_id = SpiffeId::workload(&east.td, "sample", "sleep").unwrap();

    // Both sides rotate: the server's certificate and the client's.
    let server_cert = RotatingCert::issue(server_id.clone(), signer.as_ref(), TTL, tls::provider())
        .await
        .unwrap();
    let client_cert = RotatingCert::issue(client_id.clone(), signer.as_ref(), TTL, tls::provider())
        .await
        .unwrap();
    let _s = server_cert.spawn_renewal(signer.clone(), TTL);
    let _c = client_cert.spawn_renewal(signer.clone(), TTL);

    let server_cfg = tls::server_config(
        server_cert.clone(),
        store.clone(),
        Some(Expect::AnyTrusted),
        &[],
    );
    let (addr, mut results) = tls_echo_server(server_cfg).await;
    let client_cfg = Arc::new(tls::client_config(
        Some(client_cert.clone()),
        store,
        Expect::Exactly(server_id),
        &[],
    ));

    // A connection opened before any rotation.
    let mut early = connect(client_cfg.clone(), addr).await.unwrap();
    echo(&mut early, b"before").await.unwrap();

    // Handshake continuously until both sides have rotated at least twice
    // (bounded: at most 20 s and 20,000 handshakes).
    let mut ok = 0u32;
    let mut failed = Vec::new();
    let mut server_certs_seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while (server_cert.rotations() < 2 || client_cert.rotations() < 2)
        && tokio::time::Instant::now() < deadline
        && ok + (failed.len() as u32) < 20_000
    {
        match connect(client_cfg.clone(), addr).await {
            Ok(mut tls) => {
                let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                server_certs_seen.insert(presented.as_ref().to_vec());
                match echo(&mut tls, b"ping").await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            Err(e) => failed.push(e),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        server_cert.rotations() >= 2 && client_cert.rotations() >= 2,
        "rotation did not happen: server {}, client {}",
        server_cert.rotations(),
        client_cert.rotations()
    );
    assert!(
        failed.is_empty(),
        "{} of {} handshakes failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 20, "only {ok} handshakes ran");
    eprintln!(
        "{ok} handshakes across {} server and {} client rotations, 0 failed",
        server_cert.rotations(),
        client_cert.rotations()
    );
    // Handshakes saw the certificate change, and a new handshake now
    // presents the current (latest) certificate.
    assert!(
        server_certs_seen.len() >= 2,
        "saw {} distinct server certificates",
        server_certs_seen.len()
    );
    let before = server_cert.certified_key().cert[0].clone();
    let fresh = connect(client_cfg.clone(), addr).await.unwrap();
    let after = server_cert.certified_key().cert[0].clone();
    let presented = &fresh.get_ref().1.peer_certificates().unwrap()[0];
    assert!(
        *presented == before || *presented == after,
        "a new handshake did not use the latest certificate"
    );
    drop(fresh);

    // The connection from before the rotations still works, even though
    // the certificate it was made with has since expired.
    assert_eventually(
        "the first certificate to expire",
        Duration::from_secs(5),
        async || {
            time::OffsetDateTime::now_utc() > server_cert.not_after() - time::Duration::seconds(2)
        },
    )
    .await;
    echo(&mut early, b"after").await.unwrap();

    // Every handshake the server saw carried the client's identity.
    while let Ok(r) = results.try_recv() {
        assert_eq!(r.unwrap(), Some(client_id.clone()));
    }
}
