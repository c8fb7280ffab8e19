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
pub fn transport(idle_timeout: Duration, max_udp_payload: u16) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    // A payload above the Ethernet default is the operator saying the path
    // carries jumbo frames: packets start at that size. Probing up to it
    // instead fails under bulk load (the probes are lost to queueing and
    // quinn falls back to 1200 bytes), and per-packet work is most of a
    // tunnel's CPU. The default keeps probing from 1200 up to 1452.
    if max_udp_payload > crate::config::DEFAULT_MAX_UDP_PAYLOAD {
        t.initial_mtu(max_udp_payload);
    }
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(idle_timeout).expect("idle timeout fits a VarInt"),
    ));
    t.keep_alive_interval(Some(idle_timeout / 3));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    t.send_window(u64::from(CONNECTION_RECEIVE_WINDOW));
    // Ask the peer to acknowledge every 8th ack-eliciting packet (ACK
    // frequency extension) instead of every 2nd: on a bulk tunnel, ACK
    // processing is a large share of per-packet CPU on both sides.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(8));
    t.ack_frequency_config(Some(ack));
    // Datagrams are not used.
    t.datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// The endpoint: accepts packets up to `max_udp_payload` (advertised to
/// peers as the `max_udp_payload_size` transport parameter).
pub fn endpoint(
    server: quinn::ServerConfig,
    addr: std::net::SocketAddr,
    max_udp_payload: u16,
) -> std::io::Result<quinn::Endpoint> {
    let mut ep = quinn::EndpointConfig::default();
    ep.max_udp_payload_size(max_udp_payload)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let socket = std::net::UdpSocket::bind(addr)?;
    size_socket_buffers(&socket);
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(ep, Some(server), socket, runtime)
}

/// Socket buffer size asked for on the UDP socket. The Linux default
/// (~208 KiB) overflows under a single bulk tunnel: the drops show as
/// `RcvbufErrors` in /proc/net/snmp and make congestion control back off.
/// The kernel caps the request at `net.core.rmem_max` / `wmem_max`.
pub const UDP_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

fn size_socket_buffers(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(UDP_SOCKET_BUFFER);
    let (rcv, snd) = (
        s.recv_buffer_size().unwrap_or(0),
        s.send_buffer_size().unwrap_or(0),
    );
    // Linux reports double the granted size (it counts bookkeeping).
    if rcv < UDP_SOCKET_BUFFER {
        tracing::info!(
            granted = rcv,
            wanted = UDP_SOCKET_BUFFER,
            send = snd,
            "UDP receive buffer is smaller than wanted; raise net.core.rmem_max for bulk tunnels"
        );
    }
}

/// Server side: peers must present a gateway certificate in `peers`.
/// 0-RTT stays off (rustls' `max_early_data_size` is 0): a replayed
/// tunnel open is not idempotent.
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    store: Arc<TrustStore>,
    peers: Expect,
    idle_timeout: Duration,
    max_udp_payload: u16,
) -> quinn::ServerConfig {
    let tls = isthmus_core::tls::server_config(certs, store, Some(peers), &[ALPN]);
    let crypto =
        QuicServerConfig::try_from(Arc::new(tls)).expect("TLS 1.3 config with an initial suite");
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(idle_timeout, max_udp_payload));
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
    max_udp_payload: u16,
) -> quinn::ClientConfig {
    let tls = isthmus_core::tls::client_config(Some(certs), store, expect, &[ALPN]);
    let crypto =
        QuicClientConfig::try_from(Arc::new(tls)).expect("TLS 1.3 config with an initial suite");
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(idle_timeout, max_udp_payload));
    cfg
}
