//! The reconciler: keeps peers' liveness (stale, then withdrawn after the
//! lease), merges the catalogues into imports and the mesh state the
//! config stream serves, and hands the imports to the sink on a thread of
//! its own. The decisions are pure functions ([`liveness`],
//! [`mesh_state`], [`crate::import::merge`]); the loop only runs them when
//! their inputs changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::TrustDomain;
use isthmus_core::model::{LocalService, Locality, MeshState, PeerGateway, ServiceKey};
use tokio::sync::watch;
use tracing::{Instrument, debug, error, info, warn};

use crate::catalog::{Catalog, ExportPolicy};
use crate::export::Export;
use crate::import::{Imports, PeerCatalog, merge};
use crate::metrics::StateLabel;
use crate::sink::{Sink, SinkReport};
use crate::state::Shared;

/// At startup, ServiceEntries are first written once every peer has sent
/// its full catalogue, or this long after our own catalogue was listed,
/// whichever is first: writing as each peer arrives would rewrite every
/// file once per peer.
pub const INITIAL_SYNC_GRACE: Duration = Duration::from_secs(3);

/// A disconnected peer is marked stale after this long (at most half the
/// lease; at least two heartbeats): brief reconnects under load must not
/// flip every ServiceEntry's stale label back and forth.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// How long the reconciler waits after a change for more to arrive.
pub const COALESCE: Duration = Duration::from_millis(3);

/// What the reconciler does with a peer's imports this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Keep,
    /// Its control plane is unreachable: keep its services, marked stale.
    MarkStale,
    /// Unreachable for the whole lease: withdraw its services.
    Withdraw,
}

/// The liveness decision for one peer: `down` is how long its control
/// plane has been unreachable (`None`: connected). Stale after twice the
/// heartbeat or [`STALE_AFTER`] (at most half the lease), withdrawn after
/// the lease; a peer holding no imports needs nothing.
pub fn liveness(
    down: Option<Duration>,
    stale: bool,
    holds_imports: bool,
    heartbeat: Duration,
    lease: Duration,
) -> Liveness {
    let Some(down) = down.filter(|_| holds_imports) else {
        return Liveness::Keep;
    };
    let stale_after = (heartbeat * 2).max(STALE_AFTER.min(lease / 2));
    if down >= lease {
        Liveness::Withdraw
    } else if down >= stale_after && !stale {
        Liveness::MarkStale
    } else {
        Liveness::Keep
    }
}

/// What the reconciler reads of one peer, at one moment.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub policy: ExportPolicy,
    pub connected: bool,
    pub stale: bool,
    pub locality: Locality,
    /// Its gateway's address as it announced it (may not parse).
    pub gateway: String,
    /// Its catalogue; `None` before the first sync and once withdrawn.
    pub exports: Option<Arc<BTreeMap<ServiceKey, Arc<Export>>>>,
}

/// The catalogues a merge reads: every peer that holds one.
pub fn peer_catalogs(peers: &[PeerView]) -> Vec<PeerCatalog> {
    peers
        .iter()
        .filter_map(|p| {
            Some(PeerCatalog {
                cluster: p.cluster.clone(),
                locality: p.locality.clone(),
                stale: p.stale,
                exports: Arc::clone(p.exports.as_ref()?),
            })
        })
        .collect()
}

/// Peers by state, for `isthmus_federation_peers{state}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounts {
    pub connected: i64,
    pub stale: i64,
    pub disconnected: i64,
}

impl PeerCounts {
    pub fn of(peers: &[PeerView]) -> Self {
        let mut c = Self::default();
        for p in peers {
            match (p.connected, p.stale) {
                (true, _) => c.connected += 1,
                (false, true) => c.stale += 1,
                _ => c.disconnected += 1,
            }
        }
        c
    }
}

/// The mesh state the config stream serves (version 0; the loop numbers
/// it): this cluster's services (`local`, with their export targets), the
/// merged imports, every peer gateway whose address parses, and this
/// cluster's policies.
pub fn mesh_state(
    cat: &Catalog,
    imports: &Imports,
    local: BTreeMap<ServiceKey, Arc<LocalService>>,
    peers: &[PeerView],
) -> MeshState {
    let peers = peers
        .iter()
        .filter_map(|p| {
            let address = p.gateway.parse().ok()?;
            Some((
                p.cluster.clone(),
                PeerGateway {
                    cluster: p.cluster.clone(),
                    trust_domain: p.trust_domain.clone(),
                    address,
                    locality: p.locality.clone(),
                },
            ))
        })
        .collect();
    MeshState {
        version: 0,
        local,
        imported: imports.services.clone(),
        peers,
        destination_rules: cat.destination_rules.clone(),
        virtual_services: cat.virtual_services.clone(),
        peer_authentications: cat.peer_authentications.clone(),
        authorization_policies: cat.authorization_policies.clone(),
    }
}

/// Marks silent peers stale and withdraws them after the lease; merges
/// catalogues; writes ServiceEntries; publishes mesh state. Runs until
/// shutdown.
pub async fn reconcile_loop(
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
    mesh: watch::Sender<Arc<MeshState>>,
) {
    let (to_sink, from_reconcile) = watch::channel(None);
    tokio::spawn(sink_loop(shared.clone(), sink, from_reconcile).in_current_span());
    let mut catalog = shared.catalog.clone();
    let mut version = 0u64;
    let tick = (shared.heartbeat / 2).max(Duration::from_millis(20));
    let started = tokio::time::Instant::now();
    let mut listed_at = None;
    let mut initial_sync_done = false;
    // The heavy pass (merge, render, write, publish) runs only when
    // something changed; ticks only do liveness bookkeeping.
    let mut dirty = true;
    let mut local_dirty = true;
    // The last merge: our catalogue and the peers' it read, and its result.
    let mut last_merge: Option<(Arc<Catalog>, Vec<PeerCatalog>, Arc<Imports>)> = None;
    let mut local_cache: Option<LocalCache> = None;
    loop {
        let woke = tokio::time::Instant::now();
        // Liveness bookkeeping.
        let all_peers = shared.peers();
        for p in &all_peers {
            let mut i = p.lock();
            let down = i.disconnected_since.map(|since| since.elapsed());
            match liveness(
                down,
                i.stale,
                i.imports().is_some(),
                shared.heartbeat,
                shared.lease,
            ) {
                Liveness::Keep => {}
                Liveness::MarkStale => {
                    i.stale = true;
                    dirty = true;
                    warn!(peer.cluster = %p.name, down = ?down.unwrap_or_default(), lease = ?shared.lease, "peer control plane unreachable: its services are kept, marked stale");
                }
                Liveness::Withdraw => {
                    i.stale = true;
                    // Every session with it has ended: nothing resumes
                    // onto what was withdrawn.
                    i.held = None;
                    i.parked.clear();
                    dirty = true;
                    warn!(peer.cluster = %p.name, lease = ?shared.lease, "peer unreachable for the whole lease: its services are withdrawn");
                }
            }
        }
        // Until every peer has synced (or the grace passed), more imports
        // are on their way; the pass that ends the wait writes files.
        if !initial_sync_done {
            // The grace counts from our own list: peers send their
            // catalogues as soon as they have listed theirs, about when we
            // have ours.
            if listed_at.is_none() && catalog.borrow().listed {
                listed_at = Some(tokio::time::Instant::now());
            }
            let all_synced = all_peers.iter().all(|p| p.lock().last_full_sync.is_some());
            // A source that never lists does not hold peers' imports back
            // for ever (nothing is written until it lists, see below).
            initial_sync_done = all_synced
                || listed_at.is_some_and(|t| t.elapsed() >= INITIAL_SYNC_GRACE)
                || started.elapsed() >= INITIAL_SYNC_GRACE * 10;
            if initial_sync_done {
                dirty = true;
                info!(after = ?started.elapsed(), peers_synced = all_synced, "initial sync done; writing ServiceEntries");
            }
        }
        // Until the initial sync is done, a peer's snapshot landing does
        // not start a pass: merging 10,000 services again as each of them
        // lands is work thrown away (and the config stream's clients would
        // see the mesh fill in piecemeal). Our own catalogue's changes
        // are published at once, with what peers had (restored from disk).
        if dirty && (initial_sync_done || local_dirty) {
            dirty = false;
            local_dirty = false;
            let cat = catalog.borrow_and_update().clone();
            let views: Vec<PeerView> = all_peers
                .iter()
                .map(|p| {
                    let i = p.lock();
                    PeerView {
                        cluster: p.name.clone(),
                        trust_domain: p.trust_domain.clone(),
                        policy: p.policy.clone(),
                        connected: i.connected(),
                        stale: i.stale,
                        locality: i.locality.clone(),
                        gateway: i.gateway.clone(),
                        exports: i.imports().cloned(),
                    }
                })
                .collect();
            let peers = peer_catalogs(&views);
            // Until the source's first list this cluster's own exports are
            // unknown; writing then could flip a conflict and rewrite files.
            let write = cat.listed && initial_sync_done;
            // Merging is blocking work at 10,000 services: off the runtime's
            // workers (rendering and writing files is the sink task's). The
            // last merge stands before the initial sync (see above), and
            // when its inputs are these (a peer only connected or
            // disconnected).
            let reuse = last_merge.as_ref().and_then(|(c, inputs, imports)| {
                (!initial_sync_done || (Arc::ptr_eq(c, &cat) && same_merge_inputs(inputs, &peers)))
                    .then(|| imports.clone())
            });
            let imports = match reuse {
                Some(imports) => imports,
                None => {
                    let (cluster, cat2, inputs) =
                        (shared.cluster.clone(), cat.clone(), peers.clone());
                    let merge_started = std::time::Instant::now();
                    let Ok(imports) = tokio::task::spawn_blocking(move || {
                        merge((&cluster, &cat2.exports), &inputs)
                    })
                    .await
                    else {
                        return;
                    };
                    debug!(services = imports.services.len(), took = ?merge_started.elapsed(), "catalogues merged");
                    let imports = Arc::new(imports);
                    last_merge = Some((cat.clone(), peers, imports.clone()));
                    imports
                }
            };
            for c in &imports.conflicts {
                tracing::debug!(service = %c.service, winner = %c.winner, excluded = %c.excluded, reason = %c.reason, "export conflict");
            }
            shared.metrics.conflicts.set(imports.conflicts.len() as i64);
            shared.conflicts.send_if_modified(|c| {
                let changed = **c != imports.conflicts;
                if changed {
                    *c = Arc::new(imports.conflicts.clone());
                }
                changed
            });
            shared
                .metrics
                .services_exported
                .set(cat.exports.len() as i64);
            shared
                .metrics
                .services_imported
                .set(imports.services.len() as i64);
            let counts = PeerCounts::of(&views);
            for (state, n) in [
                ("connected", counts.connected),
                ("stale", counts.stale),
                ("disconnected", counts.disconnected),
            ] {
                shared
                    .metrics
                    .peers
                    .get_or_create(&StateLabel { state })
                    .set(n);
            }

            // The local part (every local service with the peers it is
            // exported to) changes only with our catalogue or the peers'
            // policies; rebuilding it copies every local service.
            let policies: Vec<(String, ExportPolicy)> = views
                .iter()
                .map(|p| (p.cluster.clone(), p.policy.clone()))
                .collect();
            let local = match &local_cache {
                Some((c, p, local)) if Arc::ptr_eq(c, &cat) && *p == policies => local.clone(),
                _ => cat.with_export_targets(policies.iter().map(|(n, p)| (n.as_str(), p))),
            };
            local_cache = Some((cat.clone(), policies, local.clone()));
            let next = mesh_state(&cat, &imports, local, &views);
            let changed = {
                let cur = mesh.borrow();
                !cur.same_content(&next) || version == 0
            };
            if changed {
                version += 1;
                mesh.send_replace(Arc::new(MeshState { version, ..next }));
            }
            // Files follow in their own task: the mesh state above (what
            // the config stream serves) and the next merge never wait for
            // disk, and a slow disk coalesces to the newest state.
            if write {
                to_sink.send_replace(Some((woke, imports.clone())));
            }
        }
        tokio::select! {
            r = catalog.changed() => {
                if r.is_err() {
                    return;
                }
                dirty = true;
                local_dirty = true;
            }
            _ = shared.changed.notified() => dirty = true,
            _ = tokio::time::sleep(tick) => continue,
            _ = shared.shutdown.signaled() => return,
        }
        // Coalesce a burst (several peers syncing at once) into one pass;
        // short enough not to show in propagation latency.
        tokio::time::sleep(COALESCE).await;
    }
}

/// Whether a merge of `now` would read what `last` was: the same peers'
/// catalogues by identity (a snapshot or delta makes a new one; `last`
/// holds them, so no address is reused), staleness and locality.
fn same_merge_inputs(last: &[PeerCatalog], now: &[PeerCatalog]) -> bool {
    last.len() == now.len()
        && last.iter().zip(now).all(|(a, b)| {
            a.cluster == b.cluster
                && Arc::ptr_eq(&a.exports, &b.exports)
                && a.stale == b.stale
                && a.locality == b.locality
        })
}

/// The local part of the last mesh state, with the catalogue and peers'
/// policies it was built from.
type LocalCache = (
    Arc<Catalog>,
    Vec<(String, ExportPolicy)>,
    BTreeMap<ServiceKey, Arc<LocalService>>,
);

/// The imported services to write, and when the change that produced
/// them was picked up.
type SinkInput = Option<(tokio::time::Instant, Arc<Imports>)>;

/// Hands the newest merged state to the sink. A pass writes only the
/// services that differ from the last pass it completed; the first pass
/// (and the one after a failure) has the sink compare everything.
async fn sink_loop(
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
    mut input: watch::Receiver<SinkInput>,
) {
    let mut written: Option<Arc<Imports>> = None;
    let writer = match BackgroundThread::start("isthmus-sink") {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "cannot start the import writer thread; no imports will be written (check the process's thread limit)");
            return;
        }
    };
    let mut leader = shared.writer.subscribe();
    loop {
        tokio::select! {
            r = input.changed() => if r.is_err() { return },
            r = leader.changed() => {
                if r.is_err() { return }
                // Leadership changed hands: the next pass (if this
                // replica writes) compares everything with the cluster.
                written = None;
                input.mark_changed();
                continue;
            }
            _ = shared.shutdown.signaled() => return,
        }
        if !*leader.borrow_and_update() {
            continue;
        }
        let Some((since, services)) = input.borrow_and_update().clone() else {
            continue;
        };
        if written.as_ref().is_some_and(|w| Arc::ptr_eq(w, &services)) {
            continue;
        }
        let (sink2, last, pass) = (sink.clone(), written.take(), services.clone());
        let Some(outcome) = writer
            .run(move || match &last {
                None => sink2.apply_all(&pass),
                Some(prev) => sink2.apply_change(prev, &pass),
            })
            .await
        else {
            return;
        };
        match outcome {
            Ok(r) => {
                written = Some(services);
                if !r.written.is_empty() || !r.deleted.is_empty() {
                    info!(
                        written = r.written.len(),
                        deleted = r.deleted.len(),
                        "imports updated"
                    );
                }
                if r != SinkReport::default() {
                    shared
                        .metrics
                        .apply_latency
                        .observe(since.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                warn!(error = %e, "import pass failed; retrying in 1 s");
                // Retry the same state (unless a newer one arrives).
                input.mark_changed();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shared.shutdown.signaled() => return,
                }
            }
        }
    }
}

/// How much nicer than the rest of the process the ServiceEntry writer
/// runs (Linux `nice` steps).
pub const SINK_NICENESS: i32 = 10;

/// A thread for background blocking work at a lower CPU priority than the
/// runtime's workers: writing 10,000 ServiceEntry files is bulk work that
/// may wait, heartbeats and merges may not. (The blocking pool's threads
/// are shared and cannot be reniced back, hence a thread of its own.)
struct BackgroundThread {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl BackgroundThread {
    fn start(name: &str) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                #[cfg(target_os = "linux")]
                {
                    // PRIO_PROCESS with a thread id renices that thread only.
                    let tid = rustix::thread::gettid();
                    let now = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
                    if let Err(e) = rustix::process::setpriority_process(Some(tid), now + SINK_NICENESS) {
                        debug!(error = %e, "cannot lower the writer thread's priority; it runs at the process's");
                    }
                }
                // Ends when the last sender is dropped.
                for job in rx {
                    job();
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the thread; `None` if it panicked.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::model::EndpointGroup;

    const HB: Duration = Duration::from_millis(500);
    const LEASE: Duration = Duration::from_secs(60);

    fn export(name: &str, port: u16, created: i64, healthy: u32) -> (ServiceKey, Arc<Export>) {
        let key = ServiceKey::new("sample", name);
        let e = Export {
            key: key.clone(),
            ports: vec![isthmus_core::model::ServicePort {
                name: "http".into(),
                port,
                target_port: port,
                protocol: "TCP".into(),
            }],
            groups: Arc::from([EndpointGroup {
                locality: Locality::new("r", "z"),
                labels: Default::default(),
                healthy,
                total: healthy,
            }]),
            created,
            encoded: Default::default(),
        };
        (key, Arc::new(e))
    }

    fn peer(cluster: &str, exports: &[(ServiceKey, Arc<Export>)]) -> PeerView {
        PeerView {
            cluster: cluster.into(),
            trust_domain: TrustDomain::new(&format!("{cluster}.local")).unwrap(),
            policy: ExportPolicy::default(),
            connected: true,
            stale: false,
            locality: Locality::new(&format!("{cluster}-region"), ""),
            gateway: "127.0.9.1:15443".into(),
            exports: Some(Arc::new(exports.iter().cloned().collect())),
        }
    }

    #[test]
    fn a_silent_peer_goes_stale_then_is_withdrawn_after_the_lease() {
        let at = |secs: f64, stale: bool| {
            liveness(Some(Duration::from_secs_f64(secs)), stale, true, HB, LEASE)
        };
        assert_eq!(liveness(None, false, true, HB, LEASE), Liveness::Keep);
        assert_eq!(
            at(1.0, false),
            Liveness::Keep,
            "brief reconnects are damped"
        );
        assert_eq!(at(5.0, false), Liveness::MarkStale);
        assert_eq!(at(30.0, true), Liveness::Keep, "already stale");
        assert_eq!(at(60.0, true), Liveness::Withdraw);
        assert_eq!(at(61.0, false), Liveness::Withdraw);
        assert_eq!(
            liveness(Some(LEASE * 2), false, false, HB, LEASE),
            Liveness::Keep,
            "nothing to withdraw"
        );
        // A short lease: stale at half of it, not after it.
        let short = Duration::from_secs(4);
        assert_eq!(
            liveness(Some(Duration::from_secs(2)), false, true, HB, short),
            Liveness::MarkStale
        );
        // Stale is never sooner than two heartbeats.
        let slow = Duration::from_secs(5);
        assert_eq!(
            liveness(Some(Duration::from_secs(6)), false, true, slow, LEASE),
            Liveness::Keep
        );
    }

    #[test]
    fn the_merge_keeps_stale_peers_marked_drops_withdrawn_ones_and_reports_conflicts() {
        let mut west = peer(
            "west",
            &[export("web", 80, 100, 3), export("api", 8080, 50, 1)],
        );
        west.stale = true;
        west.connected = false;
        let mut eu = peer("eu", &[export("web", 80, 200, 2)]);
        let gone = PeerView {
            exports: None,
            connected: false,
            ..peer("asia", &[])
        };
        // eu exports api on another port, after west: eu is left out.
        eu.exports = Some(Arc::new(
            [export("web", 80, 200, 2), export("api", 9090, 60, 4)]
                .into_iter()
                .collect(),
        ));
        let views = [west, eu, gone];
        let catalogs = peer_catalogs(&views);
        assert_eq!(catalogs.len(), 2, "a withdrawn peer takes no part");
        let imports = merge(("east", &BTreeMap::new()), &catalogs);
        let web = &imports.services[&ServiceKey::new("sample", "web")];
        let clusters: Vec<(&str, bool)> = web
            .clusters
            .iter()
            .map(|c| (c.cluster.as_str(), c.stale))
            .collect();
        assert_eq!(
            clusters,
            [("west", true), ("eu", false)],
            "oldest export first"
        );
        let api = &imports.services[&ServiceKey::new("sample", "api")];
        assert_eq!(api.clusters.len(), 1);
        assert_eq!(api.clusters[0].cluster, "west");
        assert_eq!(imports.conflicts.len(), 1);
        assert_eq!(imports.conflicts[0].excluded, "eu");

        let counts = PeerCounts::of(&views);
        assert_eq!(
            (counts.connected, counts.stale, counts.disconnected),
            (1, 1, 1)
        );
    }

    #[test]
    fn the_mesh_state_carries_imports_gateways_and_this_clusters_policies() {
        let mut views = [peer("west", &[export("web", 80, 1, 1)]), peer("eu", &[])];
        views[1].gateway = "not an address".into();
        let imports = merge(("east", &BTreeMap::new()), &peer_catalogs(&views));
        let mut cat = Catalog::default();
        let (ap, _) = isthmus_core::model::AuthorizationPolicy::from_object(
            "sample",
            "deny",
            &BTreeMap::new(),
            &serde_json::json!({"action": "DENY", "rules": [{}]}),
        );
        cat.authorization_policies
            .insert("sample/deny".into(), Arc::new(ap));
        let m = mesh_state(&cat, &imports, BTreeMap::new(), &views);
        assert_eq!(m.imported.len(), 1);
        assert_eq!(
            m.peers.keys().collect::<Vec<_>>(),
            ["west"],
            "a gateway address that does not parse is left out"
        );
        assert_eq!(m.peers["west"].trust_domain.as_str(), "west.local");
        assert!(m.authorization_policies.contains_key("sample/deny"));
    }
}
