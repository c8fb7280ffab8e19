//! One federation session with a peer controller, the same code on both
//! ends of the stream (see `proto/.../federation.proto` for the order).
//!
//! Outbound, this side sends its catalogue as filtered for the peer: a
//! snapshot, or, when the peer's `Hello` resumes from a revision of this
//! process's epoch still in history, only the deltas after it. Inbound, a
//! snapshot replaces the peer's catalogue whole (sync-then-swap) and a
//! delta must carry the next revision of the same epoch, or the stream is
//! closed and the next session starts from a snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use isthmus_core::identity::TrustBundle;
use isthmus_core::model::ServiceKey;
use isthmus_proto::common::v1 as pbc;
use isthmus_proto::federation::v1::{self as pb, goodbye::Reason, peer_message::Message};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::catalog::Catalog;
use crate::export::{Export, export_from_bytes};
use crate::state::{Link, PeerState, Shared};
use isthmus_core::wire;

/// Largest message accepted or sent on a federation stream.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Deltas kept per peer for resuming.
pub const HISTORY: usize = 256;
/// Sessions ending within this time of starting count as flaps.
pub const FLAP_WINDOW: Duration = Duration::from_secs(10);

fn msg(m: Message) -> pb::PeerMessage {
    pb::PeerMessage { message: Some(m) }
}

fn goodbye(reason: Reason, detail: &str) -> pb::PeerMessage {
    msg(Message::Goodbye(pb::Goodbye {
        reason: reason as i32,
        detail: detail.to_owned(),
    }))
}

/// Why a federation session ended: the metric label
/// (`isthmus_federation_stream_terminations_total{reason}`), typed so that
/// rewording a message never changes a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    MessageTooLarge,
    HeartbeatTimeout,
    Malformed,
    ProtocolViolation,
    IdentityMismatch,
    /// A newer session with the same peer took over.
    Replaced,
    PeerGoodbye,
    Closed,
    Shutdown,
    StreamError,
}

impl EndReason {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::MessageTooLarge => "message_too_large",
            EndReason::HeartbeatTimeout => "heartbeat_timeout",
            EndReason::Malformed => "malformed",
            EndReason::ProtocolViolation => "protocol_violation",
            EndReason::IdentityMismatch => "identity_mismatch",
            EndReason::Replaced => "replaced",
            EndReason::PeerGoodbye => "peer_goodbye",
            EndReason::Closed => "closed",
            EndReason::Shutdown => "shutdown",
            EndReason::StreamError => "stream_error",
        }
    }
}

/// How a session ended: the typed reason and the operator's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    pub reason: EndReason,
    pub message: String,
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn end(reason: EndReason, message: impl Into<String>) -> SessionEnd {
    SessionEnd {
        reason,
        message: message.into(),
    }
}

/// Runs one session until it ends; returns why it ended. `dialed`: this
/// side opened the stream.
pub(crate) async fn session<S>(
    shared: Arc<Shared>,
    peer: Arc<PeerState>,
    tx: mpsc::Sender<pb::PeerMessage>,
    mut rx: S,
    dialed: bool,
) -> SessionEnd
where
    S: Stream<Item = Result<pb::PeerMessage, tonic::Status>> + Unpin,
{
    let started = Instant::now();
    let generation = {
        let mut i = peer.lock();
        i.session += 1;
        let g = i.session;
        i.live.insert(
            g,
            Link {
                dialed,
                ..Link::default()
            },
        );
        g
    };
    let reason = run(&shared, &peer, generation, &tx, &mut rx).await;
    {
        let mut i = peer.lock();
        let established = i.live.get(&generation).is_some_and(|l| !l.epoch.is_empty());
        i.park(generation);
        // Disconnected once no session with any of the peer's processes
        // is left.
        if !i.connected() {
            if established || i.disconnected_since.is_none() {
                i.disconnected_since = Some(Instant::now());
            }
            i.last_disconnect = Some((SystemTime::now(), reason.message.clone()));
            if started.elapsed() < FLAP_WINDOW {
                i.flaps += 1;
            } else {
                i.flaps = 0;
            }
        }
    }
    shared
        .metrics
        .terminations
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: reason.reason.as_str(),
        })
        .inc();
    shared.changed.notify_one();
    info!(peer.cluster = %peer.name, %reason, "federation session ended");
    reason
}

async fn send(tx: &mpsc::Sender<pb::PeerMessage>, m: pb::PeerMessage) -> Result<(), SessionEnd> {
    tx.send(m)
        .await
        .map_err(|_| end(EndReason::Closed, "stream closed"))
}

async fn run<S>(
    shared: &Arc<Shared>,
    peer: &Arc<PeerState>,
    generation: u64,
    tx: &mpsc::Sender<pb::PeerMessage>,
    rx: &mut S,
) -> SessionEnd
where
    S: Stream<Item = Result<pb::PeerMessage, tonic::Status>> + Unpin,
{
    let hb = shared.heartbeat;
    let (resume_epoch, resume_revision) = peer.lock().resume_point().unwrap_or_default();
    let hello = pb::Hello {
        protocol_version: pb::PROTOCOL_VERSION,
        cluster_name: shared.cluster.clone(),
        trust_domain: shared.trust_domain.to_string(),
        locality: Some(pbc::Locality::from(&shared.locality)),
        gateway_address: shared.gateway_address.clone(),
        epoch: shared.epoch.clone(),
        resume_epoch,
        resume_revision,
        max_message_bytes: MAX_MESSAGE_BYTES as u32,
        heartbeat_interval_ms: hb.as_millis() as u32,
    };
    if let Err(e) = send(tx, msg(Message::Hello(hello))).await {
        return e;
    }
    // Their Hello first.
    let theirs = match tokio::time::timeout(hb * 3, rx.next()).await {
        Ok(Some(Ok(pb::PeerMessage {
            message: Some(Message::Hello(h)),
        }))) => h,
        Ok(Some(Ok(_))) => {
            let _ = tx
                .send(goodbye(
                    Reason::ProtocolViolation,
                    "first message must be Hello",
                ))
                .await;
            return end(
                EndReason::ProtocolViolation,
                "protocol violation: first message was not Hello",
            );
        }
        Ok(Some(Err(s))) => {
            return end(
                EndReason::StreamError,
                format!("stream error: {}", s.message()),
            );
        }
        Ok(None) => return end(EndReason::Closed, "stream closed before Hello"),
        Err(_) => {
            return end(
                EndReason::HeartbeatTimeout,
                "heartbeat timeout waiting for Hello",
            );
        }
    };
    if theirs.cluster_name != peer.name || theirs.trust_domain != peer.trust_domain.as_str() {
        let detail = format!(
            "Hello says cluster {:?} in {:?}, but this stream belongs to peer {:?} in {:?}",
            theirs.cluster_name,
            theirs.trust_domain,
            peer.name,
            peer.trust_domain.as_str()
        );
        let _ = tx.send(goodbye(Reason::IdentityMismatch, &detail)).await;
        warn!(peer.cluster = %peer.name, %detail, "peer refused: identity mismatch");
        return end(
            EndReason::IdentityMismatch,
            format!("identity mismatch: {detail}"),
        );
    }
    if theirs.protocol_version != pb::PROTOCOL_VERSION {
        let _ = tx
            .send(goodbye(
                Reason::ProtocolViolation,
                "unsupported protocol version",
            ))
            .await;
        return end(
            EndReason::ProtocolViolation,
            format!("protocol violation: version {}", theirs.protocol_version),
        );
    }
    if let Err(e) = claim(shared, peer, generation, &theirs.epoch) {
        return e;
    }
    {
        let mut i = peer.lock();
        i.disconnected_since = None;
        i.locality = wire::locality(theirs.locality.clone());
        i.gateway = theirs.gateway_address.clone();
        i.last_event = Some(SystemTime::now());
    }
    shared.changed.notify_one();

    if let Some(own) = shared.trust.get(&shared.trust_domain)
        && let Err(e) = send(
            tx,
            msg(Message::TrustBundle(pbc::TrustBundle::from(&own.bundle))),
        )
        .await
    {
        return e;
    }

    // Our catalogue: resume or snapshot, once the source has listed. An
    // unlisted catalogue is empty, not this cluster's: sent as a snapshot
    // it would make the peer swap in nothing (withdrawing every import)
    // until the real one followed.
    let mut catalog = shared.catalog.clone();
    let first = {
        let cat = catalog.borrow_and_update();
        cat.listed
            .then(|| first_messages(shared, peer, generation, &theirs, &cat))
    };
    let mut first_sent = first.is_some();
    for m in first.into_iter().flatten() {
        if let Err(e) = send(tx, m).await {
            return e;
        }
    }

    let mut ticker = tokio::time::interval(hb);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat_seq = 0u64;
    let mut last_heard = Instant::now();
    loop {
        if peer.lock().live.get(&generation).is_none_or(|l| l.evicted) {
            return end(
                EndReason::Replaced,
                "replaced by a newer session with the same controller process",
            );
        }
        // Biased: whatever the peer already sent is read before the
        // heartbeat check, so a runtime that was busy (a burst of large
        // snapshots) is not mistaken for a silent peer.
        tokio::select! {
            biased;
            _ = shared.shutdown.signaled() => {
                let _ = tx.send(goodbye(Reason::Shutdown, "controller shutting down")).await;
                return end(EndReason::Shutdown, "controller shutting down");
            }
            changed = catalog.changed() => {
                if changed.is_err() {
                    let _ = tx.send(goodbye(Reason::Shutdown, "controller shutting down")).await;
                    return end(EndReason::Shutdown, "controller shutting down");
                }
                let out = {
                    let cat = catalog.borrow_and_update();
                    let cat: &Catalog = &cat;
                    if first_sent {
                        let current = cat.for_peer(&peer.policy);
                        peer.lock()
                            .live
                            .get_mut(&generation)
                            .and_then(|link| delta(&shared.epoch, link, &current))
                            .map(|d| vec![msg(Message::Delta(d))])
                            .unwrap_or_default()
                    } else if cat.listed {
                        first_sent = true;
                        first_messages(shared, peer, generation, &theirs, cat)
                    } else {
                        Vec::new()
                    }
                };
                for m in out {
                    if let Err(e) = send(tx, m).await {
                        return e;
                    }
                }
            }
            next = rx.next() => {
                last_heard = Instant::now();
                let m = match next {
                    None => return end(EndReason::Closed, "peer closed the stream"),
                    Some(Err(s)) => {
                        let detail = s.message().to_owned();
                        if detail.contains("too large") || detail.contains("length") {
                            return end(EndReason::MessageTooLarge, format!("message too large: {detail}"));
                        }
                        return end(EndReason::StreamError, format!("stream error: {detail}"));
                    }
                    Some(Ok(pb::PeerMessage { message: None })) => {
                        let _ = tx.send(goodbye(Reason::Malformed, "empty message")).await;
                        return end(EndReason::Malformed, "malformed: empty message");
                    }
                    Some(Ok(pb::PeerMessage { message: Some(m) })) => m,
                };
                match handle(shared, peer, generation, tx, m).await {
                    Ok(()) => {}
                    Err(reason) => return reason,
                }
            }
            tick = ticker.tick() => {
                // A tick a whole interval late means this process did not
                // run (an overloaded node): the silence is ours, not the
                // peer's, so its clock restarts instead of ending a healthy
                // session and paying a resync.
                if tick.elapsed() > hb {
                    debug!(peer.cluster = %peer.name, late = ?tick.elapsed(), "heartbeat tick late; not counting the stall against the peer");
                    last_heard = Instant::now();
                }
                if last_heard.elapsed() > hb * 3 {
                    let _ = tx.send(goodbye(Reason::HeartbeatTimeout, "no message for three heartbeat intervals")).await;
                    return end(EndReason::HeartbeatTimeout, format!("heartbeat timeout: nothing heard for {:?}", last_heard.elapsed()));
                }
                heartbeat_seq += 1;
                let beat = pb::Heartbeat {
                    sequence: heartbeat_seq,
                    sent_unix_ms: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
                };
                if let Err(e) = send(tx, msg(Message::Heartbeat(beat))).await {
                    return e;
                }
            }
        }
    }
}

/// Binds session `generation` to the peer process that said Hello
/// (`epoch`): it resumes that process's parked link if there is one. Two
/// live sessions with the same process (both sides dialed at once, or a
/// reconnect while the old stream has not noticed it is dead) keep one:
/// the one the first-sorting cluster dialed, else the newer. Both ends
/// decide alike.
fn claim(
    shared: &Shared,
    peer: &PeerState,
    generation: u64,
    epoch: &str,
) -> Result<(), SessionEnd> {
    let mut i = peer.lock();
    let dialed = i.live.get(&generation).is_some_and(|l| l.dialed);
    let we_sort_first = shared.cluster < peer.name;
    let twin = i
        .live
        .iter()
        .find(|(g, l)| **g != generation && l.epoch == epoch && !l.evicted)
        .map(|(g, l)| (*g, l.dialed));
    if let Some((twin, twin_dialed)) = twin {
        let by_first = |d: bool| d == we_sort_first;
        if by_first(twin_dialed) && !by_first(dialed) {
            return Err(end(
                EndReason::Replaced,
                "a session with the same controller process is already live",
            ));
        }
        if let Some(t) = i.live.get_mut(&twin) {
            t.evicted = true;
        }
    }
    let parked = i.parked.remove(epoch).unwrap_or_default();
    if let Some(l) = i.live.get_mut(&generation) {
        *l = Link {
            epoch: epoch.to_owned(),
            dialed,
            last_used: Some(Instant::now()),
            ..parked
        };
    }
    Ok(())
}

/// What opens our side of a session: the deltas the peer missed when it
/// can resume from its last applied revision, else a full snapshot.
fn first_messages(
    shared: &Shared,
    peer: &PeerState,
    generation: u64,
    theirs: &pb::Hello,
    catalog: &Catalog,
) -> Vec<pb::PeerMessage> {
    let started = std::time::Instant::now();
    let current = catalog.for_peer(&peer.policy);
    let mut guard = peer.lock();
    let Some(i) = guard.live.get_mut(&generation) else {
        return Vec::new();
    };
    let can_resume = theirs.resume_epoch == shared.epoch
        && theirs.resume_revision <= i.out_revision
        && (theirs.resume_revision == i.out_revision
            || i.out_history
                .front()
                .is_some_and(|d| d.revision <= theirs.resume_revision + 1));
    let mut out: Vec<pb::PeerMessage> = Vec::new();
    if can_resume {
        out.extend(
            i.out_history
                .iter()
                .filter(|d| d.revision > theirs.resume_revision)
                .map(|d| msg(Message::Delta(d.clone()))),
        );
        if let Some(d) = delta(&shared.epoch, i, &current) {
            out.push(msg(Message::Delta(d)));
        }
        debug!(peer.cluster = %peer.name, from = theirs.resume_revision, deltas = out.len(), "resuming");
    } else {
        i.out_revision += 1;
        i.out_history.clear();
        out.push(msg(Message::Snapshot(pb::Snapshot {
            epoch: shared.epoch.clone(),
            revision: i.out_revision,
            services: current.values().map(|e| e.encoded()).collect(),
        })));
        debug!(peer.cluster = %peer.name, services = current.len(), took = ?started.elapsed(), "sending a snapshot");
        i.out_sent = current;
    }
    out
}

/// The delta from what was last sent to `current`, recorded in history.
fn delta(
    epoch: &str,
    i: &mut Link,
    current: &BTreeMap<ServiceKey, Arc<Export>>,
) -> Option<pb::Delta> {
    let upserts: Vec<_> = current
        .iter()
        .filter(|(k, v)| i.out_sent.get(*k) != Some(*v))
        .map(|(_, v)| v.encoded())
        .collect();
    let removals: Vec<_> = i
        .out_sent
        .keys()
        .filter(|k| !current.contains_key(*k))
        .map(pbc::ServiceKey::from)
        .collect();
    if upserts.is_empty() && removals.is_empty() {
        return None;
    }
    i.out_revision += 1;
    i.out_sent = current.clone();
    let d = pb::Delta {
        epoch: epoch.to_owned(),
        revision: i.out_revision,
        upserts,
        removals,
    };
    i.out_history.push_back(d.clone());
    while i.out_history.len() > HISTORY {
        i.out_history.pop_front();
    }
    Some(d)
}

async fn handle(
    shared: &Arc<Shared>,
    peer: &Arc<PeerState>,
    generation: u64,
    tx: &mpsc::Sender<pb::PeerMessage>,
    m: Message,
) -> Result<(), SessionEnd> {
    // This session's link (present while the session runs).
    fn link(i: &mut crate::state::Inner, generation: u64) -> Result<&mut Link, SessionEnd> {
        i.live
            .get_mut(&generation)
            .ok_or_else(|| end(EndReason::Replaced, "session ended"))
    }
    let ack = |epoch: String, revision: u64| {
        msg(Message::Ack(pb::Ack {
            epoch,
            revision,
            error: String::new(),
        }))
    };
    match m {
        Message::Snapshot(s) => {
            let started = std::time::Instant::now();
            let count = s.services.len();
            // Build the new set completely before swapping it in.
            let mut next = BTreeMap::new();
            for svc in s.services {
                match export_from_bytes(svc) {
                    Ok(e) => {
                        next.insert(e.key.clone(), Arc::new(e));
                    }
                    Err(e) => {
                        let _ = tx.send(goodbye(Reason::Malformed, &e)).await;
                        return Err(end(
                            EndReason::Malformed,
                            format!("malformed snapshot: {e}"),
                        ));
                    }
                }
            }
            {
                let mut i = peer.lock();
                // A snapshot equal to what is in force (a reconnect, a
                // restarted peer, another replica of the peer) keeps the
                // held set, so nothing downstream sees a change and no
                // merge runs.
                let same = i.imports().filter(|m| ***m == next).cloned();
                let l = link(&mut i, generation)?;
                if l.imports.as_deref() != Some(&next) {
                    l.imports = Some(same.unwrap_or_else(|| Arc::new(next)));
                }
                l.applied = Some((s.epoch.clone(), s.revision));
                i.stale = false;
                i.last_full_sync = Some(SystemTime::now());
                i.last_event = Some(SystemTime::now());
            }
            shared.changed.notify_one();
            debug!(peer.cluster = %peer.name, services = count, revision = s.revision, took = ?started.elapsed(), "snapshot applied");
            send(tx, ack(s.epoch, s.revision)).await
        }
        Message::Delta(d) => {
            let expected = link(&mut peer.lock(), generation)?.applied.clone();
            match expected {
                Some((epoch, rev)) if epoch == d.epoch && d.revision == rev + 1 => {}
                other => {
                    let detail = format!(
                        "delta {}:{} does not follow {:?}",
                        d.epoch, d.revision, other
                    );
                    let _ = tx.send(goodbye(Reason::ProtocolViolation, &detail)).await;
                    return Err(end(
                        EndReason::ProtocolViolation,
                        format!("protocol violation: {detail}"),
                    ));
                }
            }
            let mut upserts = Vec::new();
            for svc in d.upserts {
                match export_from_bytes(svc) {
                    Ok(e) => upserts.push(e),
                    Err(e) => {
                        let _ = tx.send(goodbye(Reason::Malformed, &e)).await;
                        return Err(end(EndReason::Malformed, format!("malformed delta: {e}")));
                    }
                }
            }
            let mut removals = Vec::new();
            for k in d.removals {
                match ServiceKey::try_from(k) {
                    Ok(k) => removals.push(k),
                    Err(e) => {
                        let _ = tx.send(goodbye(Reason::Malformed, &e)).await;
                        return Err(end(EndReason::Malformed, format!("malformed delta: {e}")));
                    }
                }
            }
            {
                let mut i = peer.lock();
                let l = link(&mut i, generation)?;
                let imports = Arc::make_mut(l.imports.get_or_insert_with(Default::default));
                for e in upserts {
                    imports.insert(e.key.clone(), Arc::new(e));
                }
                for k in removals {
                    imports.remove(&k);
                }
                l.applied = Some((d.epoch.clone(), d.revision));
                i.stale = false;
                i.last_event = Some(SystemTime::now());
            }
            shared.changed.notify_one();
            send(tx, ack(d.epoch, d.revision)).await
        }
        Message::Ack(a) => {
            if !a.error.is_empty() {
                warn!(peer.cluster = %peer.name, revision = a.revision, error = %a.error, "peer could not apply a revision");
            }
            let mut i = peer.lock();
            let l = link(&mut i, generation)?;
            if a.epoch == shared.epoch {
                l.out_acked = l.out_acked.max(a.revision);
            }
            Ok(())
        }
        Message::Heartbeat(_) => Ok(()),
        Message::TrustBundle(b) => {
            if b.trust_domain != peer.trust_domain.as_str() {
                let detail = format!(
                    "bundle for {:?} from peer of {:?}",
                    b.trust_domain,
                    peer.trust_domain.as_str()
                );
                let _ = tx.send(goodbye(Reason::IdentityMismatch, &detail)).await;
                return Err(end(
                    EndReason::IdentityMismatch,
                    format!("identity mismatch: {detail}"),
                ));
            }
            // The trust domain was checked above: it is the peer's.
            let bundle = TrustBundle::try_from(b).map_err(|e| end(EndReason::Malformed, e))?;
            match shared.trust.upsert(bundle) {
                Ok(outcome) => debug!(peer.cluster = %peer.name, ?outcome, "peer trust bundle"),
                Err(e) => {
                    warn!(peer.cluster = %peer.name, error = %e, "peer sent an unusable trust bundle; keeping the one held")
                }
            }
            Ok(())
        }
        Message::Goodbye(g) => Err(end(
            EndReason::PeerGoodbye,
            format!("goodbye from peer: {:?} {}", g.reason(), g.detail),
        )),
        Message::Hello(_) => {
            let _ = tx
                .send(goodbye(Reason::ProtocolViolation, "second Hello"))
                .await;
            Err(end(
                EndReason::ProtocolViolation,
                "protocol violation: second Hello",
            ))
        }
    }
}
