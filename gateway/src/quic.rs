//! QUIC endpoint configuration for gateway-to-gateway tunnels.

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::TrustStore;
use isthmus_core::identity::verify::Expect;
use isthmus_proto::tunnel::v1::ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::ResolvesClientCert;
use rustls::server::ResolvesServerCert;

/// Concurrent tunnel streams one peer may open on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4096;
/// Per-stream receive window. Large enough for one tunnel to fill a fast
/// link at loopback RTTs; bounded so a peer cannot make us buffer more.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive window (all streams together).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;

/// Transport settings shared by both directions.
///
/// Keep-alive is a third of `idle_timeout`, and every Isthmus gateway uses
/// the same rule: the idle timeout is negotiated down to the smaller of
/// the two sides', so keep-alive must be tuned against the lowest either
/// side may use (quinn-rs/quinn#1670). The config check keeps
/// `idleTimeout` at 3 s or more.
pub fn transport(idle_timeout: Duration) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(idle_timeout).expect("idle timeout fits a VarInt"),
    ));
    t.keep_alive_interval(Some(idle_timeout / 3));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    t.send_window(u64::from(CONNECTION_RECEIVE_WINDOW));
    // Datagrams are not used.
    t.datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// Server side: peers must present a gateway certificate in `peers`.
/// 0-RTT stays off (rustls' `max_early_data_size` is 0): a replayed
/// tunnel open is not idempotent.
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    store: Arc<TrustStore>,
    peers: Expect,
    idle_timeout: Duration,
) -> quinn::ServerConfig {
    let tls = isthmus_core::tls::server_config(certs, store, Some(peers), &[ALPN]);
    let crypto =
        QuicServerConfig::try_from(Arc::new(tls)).expect("TLS 1.3 config with an initial suite");
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(idle_timeout));
    // Address validation costs a round trip per new connection; peers are
    // authenticated by mTLS anyway.
    cfg.migration(false);
    cfg
}

/// Client side: the server must be exactly `expect` (the peer cluster's
/// gateway identity).
pub fn client_config(
    certs: Arc<dyn ResolvesClientCert>,
    store: Arc<TrustStore>,
    expect: Expect,
    idle_timeout: Duration,
) -> quinn::ClientConfig {
    let tls = isthmus_core::tls::client_config(Some(certs), store, expect, &[ALPN]);
    let crypto =
        QuicClientConfig::try_from(Arc::new(tls)).expect("TLS 1.3 config with an initial suite");
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(idle_timeout));
    cfg
}
