//! `kind: Gateway` configuration.

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_core::config::{
    AdminSection, ClusterSection, FieldError, FromConfig, Reader, check_kind,
};

/// Default TCP listener for local sidecars (TLS passthrough by SNI).
pub const DEFAULT_SIDECAR_ADDR: &str = "0.0.0.0:15443";
/// Default UDP listener for peer gateways (QUIC).
pub const DEFAULT_PEER_ADDR: &str = "0.0.0.0:15443";
/// Default QUIC idle timeout; keep-alives run at a third of the lowest
/// idle timeout either side may use (see quinn-rs/quinn#1670).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default ceiling of QUIC packet size (UDP payload): Ethernet MTU less
/// IP and UDP headers. MTU discovery probes up to this.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1452;

/// The largest QUIC packet size the gateway accepts. quinn sends up to
/// ten packets per UDP segmentation-offload batch, and a batch must fit
/// one IP datagram (65,507 bytes of UDP payload): above this every batch
/// fails to send and throughput collapses (measured: 5 MB/s at 6600).
pub const MAX_UDP_PAYLOAD: u16 = 6550;

/// The gateway's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GatewayConfig {
    pub cluster: ClusterSection,
    /// The local controller's config and CA endpoint (host:port, 15010).
    pub controller: String,
    /// Files mode: the cluster CA directory the gateway issues its own
    /// certificate from. Without it (Kubernetes), the gateway asks the
    /// controller's CA with `tokenFile` and checks it against `caRoot`.
    pub ca_dir: Option<std::path::PathBuf>,
    /// The gateway's projected ServiceAccount token (audience
    /// `isthmus-ca`), or a bootstrap token `<token> gateway` of the
    /// controller's caTokens.
    pub token_file: Option<std::path::PathBuf>,
    /// This cluster's root certificate (`root-cert.pem`).
    pub ca_root: Option<std::path::PathBuf>,
    pub sidecar_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub idle_timeout: Duration,
    /// QUIC connections kept to each peer gateway.
    pub connections_per_peer: u32,
    /// QUIC packet size (UDP payload). At the default, MTU discovery
    /// probes from 1200 up to 1452 (Ethernet). Above it, the operator
    /// declares a path that carries larger packets (jumbo frames,
    /// loopback) and packets start at this size, up to
    /// [`MAX_UDP_PAYLOAD`]: probing up to it instead lost the probes to
    /// queueing under bulk load and quinn fell back to 1200
    /// (BENCHMARKS.md).
    pub max_udp_payload: u16,
    pub admin: AdminSection,
}

impl FromConfig for GatewayConfig {
    fn read(r: &Reader<'_>) -> Option<Self> {
        check_kind(r, "Gateway");
        let cluster = r.section::<ClusterSection>("cluster");
        let controller = r.required("controller");
        let ca_dir = r.optional("caDir");
        let token_file = r.optional("tokenFile");
        let ca_root = r.optional("caRoot");
        let listen = r.object("listen");
        let sidecar_addr = listen.or("sidecars", DEFAULT_SIDECAR_ADDR.parse().expect("default"));
        let peer_addr = listen.or("peers", DEFAULT_PEER_ADDR.parse().expect("default"));
        listen.finish();
        let idle_timeout = r.or("idleTimeout", DEFAULT_IDLE_TIMEOUT);
        let connections_per_peer = r.or("connectionsPerPeer", 2u32);
        let max_udp_payload = match r.or("maxUdpPayload", u32::from(DEFAULT_MAX_UDP_PAYLOAD)) {
            n @ 1200..=6550 => n as u16,
            n => {
                r.error(
                    "maxUdpPayload",
                    format!("{n} is out of range (QUIC needs at least 1200 bytes; above {MAX_UDP_PAYLOAD} a batch of ten packets no longer fits one UDP send)"),
                    format!("use 1200 to {MAX_UDP_PAYLOAD}: 1452 (the default) for Ethernet paths, up to {MAX_UDP_PAYLOAD} on jumbo-frame networks"),
                );
                DEFAULT_MAX_UDP_PAYLOAD
            }
        };
        let admin = r.section::<AdminSection>("admin");
        Some(Self {
            cluster: cluster?,
            controller: controller?,
            ca_dir,
            token_file,
            ca_root,
            sidecar_addr,
            peer_addr,
            idle_timeout,
            connections_per_peer,
            max_udp_payload,
            admin: admin?,
        })
    }

    fn validate(&self, errors: &mut Vec<FieldError>) {
        if self.idle_timeout < Duration::from_secs(3) {
            errors.push(FieldError {
                path: "idleTimeout".into(),
                message: format!("{:?} is too short to carry keep-alives", self.idle_timeout),
                fix: "use at least 3s (default 30s)".into(),
            });
        }
        if !(1..=64).contains(&self.connections_per_peer) {
            errors.push(FieldError {
                path: "connectionsPerPeer".into(),
                message: format!("{} is out of range", self.connections_per_peer),
                fix: "use 1 to 64 (default 2; one QUIC connection is driven by one task)".into(),
            });
        }
    }
}
