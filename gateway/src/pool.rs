//! Pooled QUIC connections to peer gateways, with liveness.
//!
//! Each peer gets `connections_per_peer` connections (one QUIC connection
//! is driven by one task, so one connection would cap a peer at one core);
//! streams are spread round-robin. A prober per peer opens a probe stream
//! every [`PROBE_INTERVAL`]; [`PROBE_FAILURES_TO_DOWN`] misses in a row
//! take the peer out of rotation (within a second of its death, where
//! QUIC's idle timeout alone would take 30 s). Passive detection counts
//! transport failures of real tunnel opens and ejects a peer that keeps
//! failing, for a growing time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use isthmus_core::backoff::Backoff;
use isthmus_core::identity::SpiffeId;
use isthmus_core::model::PeerGateway;
use isthmus_proto::tunnel::v1::{TunnelRequest, TunnelResponse, tunnel_response::Code};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::header::{read_frame, write_frame};
use crate::metrics::{Direction, Metrics, PeerLabels, StreamLabels};

/// Time between liveness probes of one peer.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a probe may take before it counts as missed.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(150);
/// Missed probes in a row that take a peer out of rotation. Worst case
/// detection: interval + 3 × (timeout + interval) = 850 ms < 1 s. Three
/// rather than two: on a loaded machine two slow probes in a row took a
/// live peer out of rotation (seen in CI as a second peer marked down
/// while the first was really killed).
pub const PROBE_FAILURES_TO_DOWN: u32 = 3;
/// How long opening a QUIC connection (handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long opening a tunnel (stream + header exchange) may take before
/// the gateway tries the next cluster.
pub const OPEN_TIMEOUT: Duration = Duration::from_millis(800);
/// Consecutive transport failures that eject a peer (passive detection).
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// First ejection time; doubles with each ejection, up to 5 minutes.
pub const BASE_EJECTION: Duration = Duration::from_secs(5);

/// Why a tunnel could not be opened to a peer.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no gateway address known for cluster {0}")]
    UnknownPeer(String),
    #[error("cannot connect to the gateway of {cluster} at {addr}: {detail}")]
    Connect {
        cluster: String,
        addr: SocketAddr,
        detail: String,
    },
    #[error("tunnel to {0} timed out")]
    Timeout(String),
    #[error("stream to {cluster} failed: {detail}")]
    Stream { cluster: String, detail: String },
    #[error("{cluster} refused: {code:?} ({message})")]
    Refused {
        cluster: String,
        code: Code,
        message: String,
    },
}

impl OpenError {
    /// Transport failures count against the peer's health; refusals are
    /// the peer's considered answer and do not.
    pub fn is_transport(&self) -> bool {
        !matches!(self, OpenError::Refused { .. } | OpenError::UnknownPeer(_))
    }

    /// Stable label for metrics and logs.
    pub fn reason(&self) -> String {
        match self {
            OpenError::UnknownPeer(_) => "unknown_peer".into(),
            OpenError::Connect { .. } => "connect_failed".into(),
            OpenError::Timeout(_) => "timeout".into(),
            OpenError::Stream { .. } => "stream_failed".into(),
            OpenError::Refused { code, .. } => code.as_str_name().to_ascii_lowercase(),
        }
    }
}

/// A peer's health as the data path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Probes are failing.
    Down,
    /// Passive detection ejected it until the given time.
    Ejected,
}

#[derive(Debug)]
struct HealthState {
    up: bool,
    probe_misses: u32,
    transport_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// One peer gateway.
#[derive(Debug)]
pub struct Peer {
    cluster: String,
    gateway: RwLock<PeerGateway>,
    slots: Vec<tokio::sync::Mutex<Option<Connection>>>,
    next: AtomicUsize,
    health: Mutex<HealthState>,
    prober: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Peer {
    pub fn health(&self) -> Health {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if !h.up {
            Health::Down
        } else if h.ejected_until.is_some_and(|t| Instant::now() < t) {
            Health::Ejected
        } else {
            Health::Up
        }
    }
}

/// Builds the QUIC client config for a peer (its expected identity).
pub type ClientConfigFor = Box<dyn Fn(&SpiffeId) -> quinn::ClientConfig + Send + Sync>;

/// All peers of this gateway.
pub struct PeerPool {
    local_cluster: String,
    endpoint: quinn::Endpoint,
    client_config: ClientConfigFor,
    connections_per_peer: usize,
    peers: RwLock<BTreeMap<String, Arc<Peer>>>,
    metrics: Metrics,
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool")
            .field("local_cluster", &self.local_cluster)
            .field(
                "peers",
                &self
                    .peers
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PeerPool {
    pub fn new(
        local_cluster: String,
        endpoint: quinn::Endpoint,
        client_config: ClientConfigFor,
        connections_per_peer: usize,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            local_cluster,
            endpoint,
            client_config,
            connections_per_peer: connections_per_peer.max(1),
            peers: RwLock::default(),
            metrics,
        })
    }

    /// Makes the pool match `gateways`: new peers get a prober, removed
    /// ones are closed, moved ones reconnect.
    pub fn sync(self: &Arc<Self>, gateways: &BTreeMap<String, PeerGateway>) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        peers.retain(|name, peer| {
            let keep = gateways.get(name).is_some_and(|g| *peer.gateway.read().unwrap_or_else(|e| e.into_inner()) == *g);
            if !keep {
                info!(peer.cluster = %name, "peer gateway removed or moved; closing its connections");
                if let Some(t) = peer.prober.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    t.abort();
                }
                for slot in &peer.slots {
                    if let Ok(mut s) = slot.try_lock()
                        && let Some(c) = s.take()
                    {
                        c.close(VarInt::from_u32(0), b"peer removed");
                    }
                }
                self.metrics.peer_up.get_or_create(&PeerLabels { peer_cluster: name.clone() }).set(0);
            }
            keep
        });
        for (name, gw) in gateways {
            if name == &self.local_cluster || peers.contains_key(name) {
                continue;
            }
            let peer = Arc::new(Peer {
                cluster: name.clone(),
                gateway: RwLock::new(gw.clone()),
                slots: (0..self.connections_per_peer)
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                next: AtomicUsize::new(0),
                // Optimistic until the first probe says otherwise, so a
                // fresh gateway does not refuse its first connections.
                health: Mutex::new(HealthState {
                    up: true,
                    probe_misses: 0,
                    transport_failures: 0,
                    ejections: 0,
                    ejected_until: None,
                }),
                prober: Mutex::new(None),
            });
            let task = tokio::spawn(
                Arc::clone(self)
                    .probe_loop(Arc::clone(&peer))
                    .instrument(info_span!("prober", peer.cluster = %name)),
            );
            *peer.prober.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
            peers.insert(name.clone(), peer);
        }
    }

    /// The peer named `cluster`, if configured.
    pub fn peer(&self, cluster: &str) -> Option<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
            .cloned()
    }

    /// Health of `cluster` (unknown peers are down).
    pub fn health(&self, cluster: &str) -> Health {
        self.peer(cluster).map_or(Health::Down, |p| p.health())
    }

    /// Path figures of each connected peer (first connection): smoothed
    /// RTT and current QUIC packet size.
    pub fn paths(&self) -> BTreeMap<String, (Duration, u16)> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        peers
            .iter()
            .filter_map(|(name, p)| {
                let slot = p.slots.first()?.try_lock().ok()?;
                let c = slot.as_ref()?;
                Some((name.clone(), (c.rtt(), c.stats().path.current_mtu)))
            })
            .collect()
    }

    /// A live connection on the next slot of `peer`, connecting if needed.
    async fn connection(&self, peer: &Peer) -> Result<Connection, OpenError> {
        let i = peer.next.fetch_add(1, Ordering::Relaxed) % peer.slots.len();
        self.connection_in_slot(peer, i).await
    }

    async fn connection_in_slot(&self, peer: &Peer, i: usize) -> Result<Connection, OpenError> {
        let mut slot = peer.slots[i].lock().await;
        if let Some(c) = slot.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let gw = peer
            .gateway
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let expect =
            SpiffeId::gateway(&gw.trust_domain, &gw.cluster).map_err(|e| OpenError::Connect {
                cluster: gw.cluster.clone(),
                addr: gw.address,
                detail: e.to_string(),
            })?;
        let connect_err = |detail: String| OpenError::Connect {
            cluster: gw.cluster.clone(),
            addr: gw.address,
            detail,
        };
        let connecting = self
            .endpoint
            .connect_with((self.client_config)(&expect), gw.address, "isthmus-gateway")
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(connect_err(e.to_string())),
            Err(_) => {
                return Err(connect_err(format!(
                    "no handshake within {CONNECT_TIMEOUT:?}"
                )));
            }
        };
        debug!(peer.cluster = %gw.cluster, slot = i, "QUIC connection established");
        let gauge = self
            .metrics
            .peer_connections
            .get_or_create(&PeerLabels {
                peer_cluster: gw.cluster.clone(),
            })
            .clone();
        gauge.inc();
        let watched = conn.clone();
        tokio::spawn(async move {
            let reason = watched.closed().await;
            debug!(%reason, "QUIC connection closed");
            gauge.dec();
        });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a tunnel stream to `cluster` and exchanges headers. On OK the
    /// stream is ready for raw bytes; otherwise the error says why, and
    /// transport failures count against the peer's health.
    pub async fn open(
        &self,
        cluster: &str,
        req: &TunnelRequest,
    ) -> Result<(SendStream, RecvStream, TunnelResponse), OpenError> {
        let peer = self
            .peer(cluster)
            .ok_or_else(|| OpenError::UnknownPeer(cluster.to_owned()))?;
        let result = match tokio::time::timeout(OPEN_TIMEOUT, self.open_on(&peer, req)).await {
            Ok(r) => r,
            Err(_) => Err(OpenError::Timeout(cluster.to_owned())),
        };
        match &result {
            Ok(_) => self.record_success(&peer),
            Err(e) if e.is_transport() => self.record_transport_failure(&peer, e),
            Err(_) => {}
        }
        result
    }

    async fn open_on(
        &self,
        peer: &Peer,
        req: &TunnelRequest,
    ) -> Result<(SendStream, RecvStream, TunnelResponse), OpenError> {
        let conn = self.connection(peer).await?;
        let stream_err = stream_error(&peer.cluster);
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        if !req.probe {
            self.metrics
                .streams_opened
                .get_or_create(&StreamLabels {
                    peer_cluster: peer.cluster.clone(),
                    direction: Direction::Outbound,
                })
                .inc();
        }
        write_frame(&mut send, req)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let resp: TunnelResponse = read_frame(&mut recv)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        match resp.code() {
            Code::Ok => Ok((send, recv, resp)),
            code => Err(OpenError::Refused {
                cluster: peer.cluster.clone(),
                code,
                message: resp.message,
            }),
        }
    }

    fn record_success(&self, peer: &Peer) {
        let mut h = peer.health.lock().unwrap_or_else(|e| e.into_inner());
        h.transport_failures = 0;
    }

    fn record_transport_failure(&self, peer: &Peer, e: &OpenError) {
        let mut h = peer.health.lock().unwrap_or_else(|e| e.into_inner());
        h.transport_failures += 1;
        if h.transport_failures >= EJECT_AFTER_FAILURES {
            h.ejections += 1;
            let time = (BASE_EJECTION * 2u32.saturating_pow(h.ejections - 1))
                .min(Duration::from_secs(300));
            h.ejected_until = Some(Instant::now() + time);
            h.transport_failures = 0;
            warn!(peer.cluster = %peer.cluster, error = %e, ejected_for = ?time, "peer gateway ejected after repeated tunnel failures");
        }
    }

    async fn probe_loop(self: Arc<Self>, peer: Arc<Peer>) {
        let labels = PeerLabels {
            peer_cluster: peer.cluster.clone(),
        };
        let up_gauge = self.metrics.peer_up.get_or_create(&labels).clone();
        let rtt_gauge = self.metrics.peer_rtt_us.get_or_create(&labels).clone();
        up_gauge.set(1);
        let mut backoff = Backoff::new(PROBE_INTERVAL, Duration::from_secs(2));
        // Datagrams received on each slot's connection when the current
        // probe started: one that receives nothing during a whole missed
        // probe is silent.
        let received = |peer: &Peer, slot: usize| -> Option<(u64, Connection)> {
            let guard = peer.slots[slot].try_lock().ok()?;
            let conn = guard.as_ref()?.clone();
            Some((conn.stats().udp_rx.datagrams, conn))
        };
        let probe = TunnelRequest {
            source_cluster: self.local_cluster.clone(),
            probe: true,
            ..Default::default()
        };
        loop {
            // Probe every slot in turn, so a dead connection in any slot is
            // noticed and replaced.
            let slot = peer.next.load(Ordering::Relaxed) % peer.slots.len();
            let rx_before: Vec<Option<u64>> = (0..peer.slots.len())
                .map(|i| received(&peer, i).map(|x| x.0))
                .collect();
            let started = Instant::now();
            let result = tokio::time::timeout(PROBE_TIMEOUT, async {
                let conn = self.connection_in_slot(&peer, slot).await?;
                let stream_err = stream_error(&peer.cluster);
                let (mut send, mut recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| stream_err(e.to_string()))?;
                write_frame(&mut send, &probe)
                    .await
                    .map_err(|e| stream_err(e.to_string()))?;
                let _ = send.finish();
                let resp: TunnelResponse = read_frame(&mut recv)
                    .await
                    .map_err(|e| stream_err(e.to_string()))?;
                Ok::<_, OpenError>((resp, conn.rtt()))
            })
            .await;
            let ok = match result {
                Ok(Ok((resp, rtt))) if resp.code() == Code::Ok => {
                    rtt_gauge.set(rtt.as_micros() as i64);
                    true
                }
                Ok(Ok((resp, _))) => {
                    debug!(code = ?resp.code(), "probe answered but not OK (draining?)");
                    false
                }
                Ok(Err(e)) => {
                    debug!(error = %e, "probe failed");
                    false
                }
                Err(_) => false,
            };
            let wait = {
                let mut h = peer.health.lock().unwrap_or_else(|e| e.into_inner());
                if ok {
                    h.probe_misses = 0;
                    if !h.up {
                        h.up = true;
                        up_gauge.set(1);
                        info!("peer gateway is back: returning it to rotation");
                    }
                    backoff.reset();
                    PROBE_INTERVAL
                } else {
                    h.probe_misses += 1;
                    if h.up && h.probe_misses >= PROBE_FAILURES_TO_DOWN {
                        h.up = false;
                        up_gauge.set(0);
                        warn!(
                            misses = h.probe_misses,
                            down_after = ?started.elapsed(),
                            "peer gateway stopped answering probes: taken out of rotation (check the peer's gateway process and UDP reachability)"
                        );
                        // A connection that received not one datagram during
                        // the whole missed probe belongs to a dead peer:
                        // close it now,
                        // so its tunnels end and their sidecars retry
                        // elsewhere instead of waiting out the idle
                        // timeout. One still receiving is left alone (a
                        // peer slow under load is not dead).
                        for (i, before) in rx_before.iter().enumerate() {
                            if let Some((n, conn)) = received(&peer, i)
                                && before.is_some_and(|b| n <= b)
                            {
                                debug!(slot = i, "closing a silent connection to a dead peer");
                                conn.close(VarInt::from_u32(0), b"peer unresponsive");
                            }
                        }
                    }
                    if h.up {
                        PROBE_INTERVAL
                    } else {
                        backoff.next_delay()
                    }
                }
            };
            // Connections are not closed on a missed probe: a false
            // positive under load would kill live tunnels. A restarted
            // peer answers old connections with a stateless reset, which
            // closes them; the next use then reconnects.
            peer.next.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }

    /// Stops probing and closes every connection (drain).
    pub fn close_all(&self) {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        for peer in peers.values() {
            if let Some(t) = peer.prober.lock().unwrap_or_else(|e| e.into_inner()).take() {
                t.abort();
            }
        }
    }
}

/// Turns a stream failure towards `cluster` into an [`OpenError`].
fn stream_error(cluster: &str) -> impl Fn(String) -> OpenError + '_ {
    move |detail| OpenError::Stream {
        cluster: cluster.to_owned(),
        detail,
    }
}
