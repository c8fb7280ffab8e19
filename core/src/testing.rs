//! Test helpers (feature `testing`): in-memory PKIs, certificate
//! resolvers, TLS handshakes over real loopback sockets, and
//! `assert_eventually`.

use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::identity::ca::{DEFAULT_CLUSTER_CA_TTL, DEFAULT_ROOT_TTL, KeyAndCsr};
use crate::identity::rotation::{StaticCert, certified_key};
use crate::identity::{ClusterCa, RootCa, SpiffeId, TrustBundle, TrustDomain};

/// One trust domain with its root.
#[derive(Debug)]
pub struct TestDomain {
    pub td: TrustDomain,
    pub root: RootCa,
}

impl TestDomain {
    pub fn new(td: &str) -> Self {
        crate::tls::install_crypto_provider();
        let td = TrustDomain::new(td).expect("valid trust domain");
        let root = RootCa::generate(&td, DEFAULT_ROOT_TTL).expect("root CA");
        Self { td, root }
    }

    /// The bundle of this domain, sequence 1.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.td.clone(), vec![self.root.cert().clone()], 1)
    }

    /// A cluster CA under this root.
    pub fn cluster(&self, name: &str) -> Arc<ClusterCa> {
        Arc::new(
            self.root
                .issue_cluster(name, DEFAULT_CLUSTER_CA_TTL)
                .expect("cluster CA"),
        )
    }
}

/// Issues a certificate for `id` from `ca` (through a CSR) and returns a
/// resolver serving it.
pub fn leaf(ca: &ClusterCa, id: &SpiffeId, ttl: Duration) -> Arc<StaticCert> {
    let req = KeyAndCsr::generate(id).expect("key and CSR");
    let issued = ca.sign_csr(&req.csr, id, ttl).expect("sign");
    let key = certified_key(&crate::tls::provider(), &issued, req.key.serialize_der())
        .expect("certified key");
    Arc::new(StaticCert(Arc::new(key)))
}

/// A resolver for an arbitrary chain and key (e.g. from `forge_leaf`).
pub fn resolver(
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: &rcgen::KeyPair,
) -> Arc<StaticCert> {
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .expect("key");
    Arc::new(StaticCert(Arc::new(CertifiedKey::new(chain, signing))))
}

/// Runs a TLS echo server on 127.0.0.1:0: each connection completes the
/// handshake, then echoes until EOF. Handshake results (the client's
/// verified identity, or the error) are sent on the returned channel.
pub async fn tls_echo_server(
    cfg: rustls::ServerConfig,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<Option<SpiffeId>, String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let id =
                            crate::identity::peer_identity(tls.get_ref().1.peer_certificates())
                                .ok();
                        let _ = tx.send(Ok(id));
                        let mut buf = [0u8; 4096];
                        loop {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if tls.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = tls.shutdown().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Connects with `cfg`, sends `msg`, and returns the echo, or the error.
pub async fn tls_roundtrip(
    cfg: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::try_from("isthmus.invalid").expect("static name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; msg.len()];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Polls `check` with exponential waits (1 ms doubling to 100 ms) until it
/// returns true or `timeout` passes; panics with `what` on timeout.
pub async fn assert_eventually(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wait = Duration::from_millis(1);
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    }
}
