//! rustls configurations for Isthmus: TLS 1.3 only, the aws-lc-rs provider,
//! SPIFFE verification in both directions.

use std::sync::{Arc, Once};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::{ClientConfig, ServerConfig};

use crate::identity::SpiffeId;
use crate::identity::TrustStore;
use crate::identity::verify::{
    Expect, PinnedRootVerifier, SpiffeClientVerifier, SpiffeServerVerifier,
};

/// A certificate source usable on both sides of a handshake: a
/// `RotatingCert` in production, a `StaticCert` in tests.
pub trait CertSource: ResolvesServerCert + ResolvesClientCert {}
impl<T: ResolvesServerCert + ResolvesClientCert> CertSource for T {}

static INSTALL: Once = Once::new();

/// Installs aws-lc-rs as the process-wide rustls provider. Call first thing
/// in `main` and in test setup; later calls do nothing.
pub fn install_crypto_provider() {
    INSTALL.call_once(|| {
        // Another component may have installed the same provider first.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// The provider every Isthmus TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    install_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// A TLS 1.3 server config. With `clients = Some(expect)`, client
/// certificates are mandatory and checked with [`SpiffeClientVerifier`].
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    store: Arc<TrustStore>,
    clients: Option<Expect>,
    alpn: &[&[u8]],
) -> ServerConfig {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3");
    let builder = match clients {
        Some(expect) => builder.with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            store, expect, &provider,
        ))),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(certs);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No resumption: a resumed TLS 1.3 session skips certificate
    // verification and keeps the identity of the first handshake, so a
    // peer whose trust domain was removed, or whose certificate expired,
    // would still get in, and rotated certificates would never be shown.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg
}

/// Like [`server_config`] with client certificates optional: a presented
/// certificate is verified in full, but anonymous clients get in (for
/// first-contact RPCs such as link; every other handler must demand an
/// identity).
pub fn server_config_optional_clients(
    certs: Arc<dyn ResolvesServerCert>,
    store: Arc<TrustStore>,
    clients: Expect,
    alpn: &[&[u8]],
) -> ServerConfig {
    let provider = provider();
    let verifier = SpiffeClientVerifier::new(store, clients, &provider).optional();
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(certs);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg
}

/// A client config for first contact: the server is trusted only through
/// the root fingerprint pinned by a link token. No client certificate.
pub fn pinned_client_config(fingerprint: &str, expect: SpiffeId, alpn: &[&[u8]]) -> ClientConfig {
    let provider = provider();
    let verifier = PinnedRootVerifier::new(fingerprint, expect, &provider);
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

/// A TLS 1.3 client config that accepts only servers matching `expect`
/// and presents `certs` when asked.
pub fn client_config(
    certs: Option<Arc<dyn ResolvesClientCert>>,
    store: Arc<TrustStore>,
    expect: Expect,
    alpn: &[&[u8]],
) -> ClientConfig {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            store, expect, &provider,
        )));
    let mut cfg = match certs {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // See server_config: every handshake verifies the peer in full.
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

/// HTTP/2 receive windows of the control-plane gRPC streams (federation,
/// config stream), both ends: large enough that a big snapshot is not
/// paced by window updates, and still a bound on what one peer can make
/// this process buffer.
pub const GRPC_STREAM_WINDOW: u32 = 4 << 20;
/// The connection-wide window: two streams' worth.
pub const GRPC_CONNECTION_WINDOW: u32 = 8 << 20;

/// A lazily connecting gRPC channel to `addr` over TLS with `cfg` (ALPN
/// h2 is set here). The server is checked by `cfg`'s verifier (SPIFFE),
/// not by DNS name. HTTP/2 keep-alives detect a dead peer on an idle
/// long-lived stream.
pub fn grpc_channel(
    addr: String,
    mut cfg: ClientConfig,
) -> Result<tonic::transport::Channel, String> {
    use std::time::Duration;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{addr:?} is not a host:port address: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        // A 10,000-service snapshot is ~1 MB: with HTTP/2's 64 KiB default
        // window it crawls in round trips when the receiver is busy.
        .initial_stream_window_size(GRPC_STREAM_WINDOW)
        .initial_connection_window_size(GRPC_CONNECTION_WINDOW);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let addr = addr.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls_pki_types::ServerName::try_from("isthmus-controller")
                    .expect("static name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}
