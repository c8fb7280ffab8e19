//! What every task of one controller shares: the controller's identity,
//! its catalogue, its peers and what is known of each.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use isthmus_core::drain::DrainSignal;
use isthmus_core::identity::{SpiffeId, TrustDomain, TrustStore};
use isthmus_core::model::{Locality, ServiceKey};
use isthmus_proto::federation::v1 as pb;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::catalog::{Catalog, ExportPolicy};
use crate::export::Export;
use crate::import::Conflict;
use crate::metrics::Metrics;

/// State every task of one controller shares.
#[derive(Debug)]
pub struct Shared {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub locality: Locality,
    pub gateway_address: String,
    /// Random per process: revisions are comparable only within it.
    pub epoch: String,
    pub heartbeat: Duration,
    pub lease: Duration,
    pub trust: Arc<TrustStore>,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// Configured and linked peers; linked ones appear at run time.
    pub peers: RwLock<BTreeMap<String, Arc<PeerState>>>,
    /// Peer controller identities the federation port accepts.
    pub allowed: Arc<RwLock<BTreeSet<SpiffeId>>>,
    /// Link tokens and linked peers: the state directory, or Secrets.
    pub state: crate::state_store::StateStore,
    /// The peer records as of the last scan (for `/config_dump`).
    pub peer_records: Mutex<Vec<crate::link::PeerFile>>,
    /// Where peers reach us, sent when linking.
    pub advertised: Option<String>,
    pub client_tls: ClientTls,
    /// Poked whenever a peer's catalogue or connection changes.
    pub changed: Arc<Notify>,
    pub shutdown: DrainSignal,
    pub metrics: Metrics,
    /// Export conflicts from the last merge (the kube sink reflects the
    /// ones involving this cluster in its ServiceExports' status).
    pub conflicts: watch::Sender<Arc<Vec<Conflict>>>,
    /// Whether this replica may write to the cluster: always in files
    /// mode; in kube mode while it holds the leader Lease.
    pub writer: watch::Sender<bool>,
}

/// Builds the client TLS config for dialing a peer controller.
pub struct ClientTls(pub Box<dyn Fn(&SpiffeId) -> rustls::ClientConfig + Send + Sync>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl Shared {
    pub fn status(&self) -> Vec<PeerStatus> {
        self.peers().iter().map(|p| p.status()).collect()
    }

    /// Every peer, by name.
    pub fn peers(&self) -> Vec<Arc<PeerState>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn peer(&self, name: &str) -> Option<Arc<PeerState>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// A configured peer and what is known of it.
#[derive(Debug)]
pub struct PeerState {
    pub name: String,
    pub address: String,
    pub trust_domain: TrustDomain,
    pub policy: ExportPolicy,
    pub(crate) inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// The peer's exports to us when no live session has synced: the
    /// last primary session's (kept until the stale lease runs out), or
    /// what a previous run wrote. `None` before the first sync and after
    /// withdrawal. See [`Inner::imports`].
    pub held: Option<Imports>,
    pub locality: Locality,
    pub gateway: String,
    /// Sessions started (each session's generation).
    pub session: u64,
    /// Live sessions by generation. A peer cluster may run several
    /// controller replicas, and each of ours may hold a session with
    /// several of them: each session has its own link state.
    pub live: BTreeMap<u64, Link>,
    /// Link state of ended sessions, by the peer process's epoch, for a
    /// reconnect of the same process to resume from (at most
    /// [`PARKED_LINKS`]).
    pub parked: BTreeMap<String, Link>,
    pub stale: bool,
    pub last_full_sync: Option<SystemTime>,
    pub last_event: Option<SystemTime>,
    pub last_disconnect: Option<(SystemTime, String)>,
    /// A failed dial while a session (the peer's own dial) was up: kept
    /// apart, so `status` never shows a connected peer with a fresh
    /// "disconnect".
    pub last_dial_error: Option<(SystemTime, String)>,
    pub disconnected_since: Option<Instant>,
    pub flaps: u32,
}

/// Ended sessions' link states kept per peer for resuming: one per
/// replica of a peer running two. Each may hold a copy of the peer's
/// catalogue (shared with the one in force until either changes), so a
/// peer that restarts often does not pile copies up.
pub const PARKED_LINKS: usize = 2;

/// One session's state: with one process of the peer (its `epoch`).
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// The peer process's epoch (empty until its Hello).
    pub epoch: String,
    /// Whether this side dialed the session.
    pub dialed: bool,
    /// A newer session with the same process took over: this one ends.
    pub evicted: bool,
    /// What that process sent us (inbound).
    pub imports: Option<Imports>,
    pub applied: Option<(String, u64)>,
    /// What we sent it (outbound), and what it acknowledged.
    pub out_revision: u64,
    pub out_sent: BTreeMap<ServiceKey, Arc<Export>>,
    pub out_history: VecDeque<pb::Delta>,
    pub out_acked: u64,
    pub last_used: Option<Instant>,
}

/// A peer's exports to us, shared with the reconciler's passes
/// (copy-on-write: a delta copies the map only while a pass still holds
/// the previous one).
pub(crate) type Imports = Arc<BTreeMap<ServiceKey, Arc<Export>>>;

impl Inner {
    /// Whether a session with any of the peer's processes is established
    /// (its Hello checked).
    pub(crate) fn connected(&self) -> bool {
        self.live.values().any(|l| !l.epoch.is_empty())
    }

    /// The peer's exports to us as in force: the primary session's (the
    /// oldest live one that has synced), else [`held`](Self::held).
    pub(crate) fn imports(&self) -> Option<&Imports> {
        self.live
            .values()
            .find_map(|l| l.imports.as_ref())
            .or(self.held.as_ref())
    }

    /// Where to resume the peer's stream from, offered in our Hello before
    /// we know which of its processes answers: the most recently ended
    /// session's (a live one's state is its own session's).
    pub(crate) fn resume_point(&self) -> Option<(String, u64)> {
        self.parked
            .values()
            .filter(|l| l.applied.is_some())
            .max_by_key(|l| l.last_used)
            .and_then(|l| l.applied.clone())
    }

    /// Ends session `generation`'s link: kept for a reconnect of the same
    /// process, the oldest parked one forgotten beyond [`PARKED_LINKS`].
    pub(crate) fn park(&mut self, generation: u64) {
        let Some(mut link) = self.live.remove(&generation) else {
            return;
        };
        // What was in force stays in force when the last synced session
        // ends (until the stale lease runs out).
        if link.imports.is_some() && self.live.values().all(|l| l.imports.is_none()) {
            self.held = link.imports.clone();
        }
        if link.epoch.is_empty() || link.evicted {
            return;
        }
        link.last_used = Some(Instant::now());
        self.parked.insert(link.epoch.clone(), link);
        while self.parked.len() > PARKED_LINKS {
            let oldest = self
                .parked
                .iter()
                .min_by_key(|(_, l)| l.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.parked.remove(&k),
                None => break,
            };
        }
    }
}

/// What `isthmus status` shows of one peer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PeerStatus {
    pub cluster: String,
    pub address: String,
    pub connected: bool,
    pub stale: bool,
    pub last_full_sync: Option<String>,
    pub last_event: Option<String>,
    pub last_disconnect: Option<String>,
    pub last_disconnect_reason: Option<String>,
    /// `<time> <reason>` of the last failed dial while connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dial_error: Option<String>,
    /// Live sessions: one per process of the peer's that we talk to
    /// (several when either cluster runs several controller replicas).
    #[serde(default)]
    pub sessions: usize,
    pub exported: usize,
    pub imported: usize,
    /// Revisions sent but not yet acknowledged.
    pub revision_lag: u64,
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl PeerState {
    pub fn new(name: &str, address: &str, trust_domain: TrustDomain, policy: ExportPolicy) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
            trust_domain,
            policy,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> PeerStatus {
        let i = self.lock();
        PeerStatus {
            cluster: self.name.clone(),
            address: self.address.clone(),
            connected: i.connected(),
            stale: i.stale,
            last_full_sync: i.last_full_sync.map(rfc3339),
            last_event: i.last_event.map(rfc3339),
            last_disconnect: i.last_disconnect.as_ref().map(|(t, _)| rfc3339(*t)),
            last_disconnect_reason: i.last_disconnect.as_ref().map(|(_, r)| r.clone()),
            last_dial_error: i
                .last_dial_error
                .as_ref()
                .map(|(t, r)| format!("{} {r}", rfc3339(*t))),
            sessions: i.live.len(),
            exported: i.live.values().map(|l| l.out_sent.len()).max().unwrap_or(0),
            imported: i.imports().map_or(0, |m| m.len()),
            revision_lag: i
                .live
                .values()
                .map(|l| l.out_revision.saturating_sub(l.out_acked))
                .max()
                .unwrap_or(0),
        }
    }

    /// How long to wait before dialing again: 100 ms after a session that
    /// lasted, doubling per flap up to 30 s (flapping peers are damped).
    pub(crate) fn redial_delay(&self) -> Duration {
        let flaps = self.lock().flaps.min(8);
        (Duration::from_millis(100) * 2u32.pow(flaps)).min(Duration::from_secs(30))
    }
}
