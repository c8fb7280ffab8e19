//! Endpoint choice: locality tiers, the remote tier through the local
//! gateway, load-balancing policy, passive outlier detection and
//! connection-pool limits.
//!
//! Tiers, best first: same zone, same region, other regions of this
//! cluster, then (for `…svc.cluster.local`) the remote tier. For
//! `…svc.clusterset.local` the remote tier ranks by the best locality of
//! the clusters behind it (same region as tier 1, else tier 2) and shares
//! a tier with local endpoints by weight (its weight is the remote
//! clusters' healthy endpoints), so T_i = W_i / ΣW_j holds across
//! clusters. The gateway then picks the cluster.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_core::model::istio::LbPolicy;
use isthmus_core::model::{
    DestinationRule, Locality, MeshState, OutlierDetection, Scope, ServiceKey, ServicePort,
};
use tracing::{info, warn};

use crate::telemetry::{EjectionLabels, Metrics};

/// Where one attempt goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A sidecar of this cluster.
    Local { addr: SocketAddr, workload: String },
    /// The local east-west gateway, which picks a remote cluster.
    Remote { gateway: SocketAddr },
}

impl Target {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Local { addr, .. } => *addr,
            Target::Remote { gateway } => *gateway,
        }
    }
}

/// A target while a pick weighs it, borrowed from the mesh state: only
/// the one chosen is copied out, so a pick costs the same allocations
/// whether the service has one endpoint or a thousand.
#[derive(Debug, Clone, Copy)]
enum Cand<'a> {
    Local {
        addr: SocketAddr,
        workload: &'a str,
        locality: &'a Locality,
    },
    Remote {
        gateway: SocketAddr,
    },
}

impl Cand<'_> {
    fn addr(&self) -> SocketAddr {
        match self {
            Cand::Local { addr, .. } => *addr,
            Cand::Remote { gateway } => *gateway,
        }
    }

    fn owned(&self) -> Target {
        match *self {
            Cand::Local { addr, workload, .. } => Target::Local {
                addr,
                workload: workload.to_owned(),
            },
            Cand::Remote { gateway } => Target::Remote { gateway },
        }
    }
}

/// Why nothing could be picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoTarget {
    /// No endpoint at all is ready (or all were tried).
    NoHealthy,
}

/// What to pick for.
#[derive(Debug)]
pub struct Want<'a> {
    pub key: &'a ServiceKey,
    pub scope: Scope,
    pub port: &'a ServicePort,
    pub subset: &'a BTreeMap<String, String>,
    pub dr: Option<&'a DestinationRule>,
    /// Already tried in this request (retries go elsewhere).
    pub exclude: &'a [SocketAddr],
}

#[derive(Debug, Default)]
struct EpState {
    in_flight: u32,
    consecutive_errors: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

/// Per-service state kept across config updates.
#[derive(Debug, Default)]
pub struct ServiceLb {
    rr: AtomicUsize,
    in_flight: AtomicU32,
    endpoints: Mutex<HashMap<SocketAddr, EpState>>,
}

/// Holds one in-flight slot of a service (and of an endpoint once
/// [`Slot::on`] is called); released on drop.
#[derive(Debug)]
pub struct Slot {
    lb: Arc<ServiceLb>,
    endpoint: Option<SocketAddr>,
}

impl Slot {
    pub fn on(&mut self, addr: SocketAddr) {
        self.release_endpoint();
        let mut eps = self.lb.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        eps.entry(addr).or_default().in_flight += 1;
        self.endpoint = Some(addr);
    }

    fn release_endpoint(&mut self) {
        if let Some(addr) = self.endpoint.take() {
            let mut eps = self.lb.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = eps.get_mut(&addr) {
                e.in_flight = e.in_flight.saturating_sub(1);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release_endpoint();
        self.lb.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How an attempt ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 5xx, connection failure, reset or timeout.
    Failure,
}

/// Isthmus's detection when no DestinationRule sets one: Istio's
/// numbers, except that every endpoint may be ejected (DESIGN: failover
/// works with no policy written; with Istio's 10 % a dead cluster's last
/// endpoints would stay in rotation).
fn default_outlier() -> OutlierDetection {
    OutlierDetection {
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    }
}

/// Balancers for every destination service.
#[derive(Debug)]
pub struct Balancers {
    services: Mutex<HashMap<ServiceKey, Arc<ServiceLb>>>,
    locality: Locality,
    gateway: Option<SocketAddr>,
    metrics: Metrics,
}

impl Balancers {
    pub fn new(locality: Locality, gateway: Option<SocketAddr>, metrics: Metrics) -> Self {
        Self {
            services: Mutex::default(),
            locality,
            gateway,
            metrics,
        }
    }

    pub fn service(&self, key: &ServiceKey) -> Arc<ServiceLb> {
        let mut s = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lb) = s.get(key) {
            return lb.clone();
        }
        let lb = Arc::new(ServiceLb::default());
        s.insert(key.clone(), lb.clone());
        lb
    }

    /// Takes a request slot of `key`, or says which limit is reached.
    pub fn admit(&self, key: &ServiceKey, dr: Option<&DestinationRule>) -> Result<Slot, String> {
        let lb = self.service(key);
        let n = lb.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = Slot { lb, endpoint: None };
        if let Some(max) = dr.and_then(|d| d.connection_pool.max_in_flight())
            && n > max
        {
            return Err(format!(
                "connectionPool limit of {max} requests in flight reached for {}.{} (DestinationRule {}/{})",
                key.name,
                key.namespace,
                dr.map_or("", |d| d.namespace.as_str()),
                dr.map_or("", |d| d.name.as_str()),
            ));
        }
        Ok(slot)
    }

    fn tier(&self, l: &Locality) -> u8 {
        if l.region == self.locality.region {
            if l.zone == self.locality.zone { 0 } else { 1 }
        } else {
            2
        }
    }

    /// Picks the next target.
    pub fn pick<'s>(&self, state: &'s MeshState, want: &Want<'_>) -> Result<Target, NoTarget> {
        let lb = self.service(want.key);
        let now = Instant::now();
        let eps = lb.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let usable = |addr: &SocketAddr| {
            !want.exclude.contains(addr)
                && eps
                    .get(addr)
                    .is_none_or(|e| e.ejected_until.is_none_or(|t| t <= now))
        };
        // Local candidates by tier (and all of them, for `distribute`).
        let mut all_locals: Vec<Cand<'s>> = Vec::new();
        let mut best: Option<(u8, Vec<Cand<'s>>)> = None;
        let mut consider = |tier: u8, t: Cand<'s>| match &mut best {
            Some((b, list)) if *b == tier => list.push(t),
            Some((b, _)) if *b < tier => {}
            _ => best = Some((tier, vec![t])),
        };
        if let Some(ls) = state.local.get(want.key) {
            for e in &ls.endpoints {
                if !e.ready || !e.matches(want.subset) {
                    continue;
                }
                let addr = e.target(want.port);
                if usable(&addr) {
                    let t = Cand::Local {
                        addr,
                        workload: &e.workload,
                        locality: &e.locality,
                    };
                    all_locals.push(t);
                    consider(self.tier(&e.locality), t);
                }
            }
        }
        // The remote tier.
        let mut remote_weight = 0u32;
        // A retry may go through the gateway again: it picks the cluster,
        // and a failed tunnel moves it to the next one.
        let gateway_usable = |gw: &SocketAddr| {
            eps.get(gw)
                .is_none_or(|e| e.ejected_until.is_none_or(|t| t <= now))
        };
        if let (Some(gw), Some(imp)) = (self.gateway, state.imported.get(want.key))
            && gateway_usable(&gw)
        {
            let mut tier = 3;
            for c in &imp.clusters {
                let h = c.healthy(want.subset);
                if h > 0 {
                    remote_weight += h;
                    if want.scope == Scope::ClusterSet {
                        tier = tier.min(if c.locality.region == self.locality.region {
                            1
                        } else {
                            2
                        });
                    }
                }
            }
            if remote_weight > 0 {
                consider(tier, Cand::Remote { gateway: gw });
            }
        }
        let policy = want.dr.map(|d| d.lb).unwrap_or_default();
        let choose = |locals: &[&Cand<'_>]| -> Target {
            let chosen = match policy {
                LbPolicy::RoundRobin => {
                    let i = lb.rr.fetch_add(1, Ordering::Relaxed);
                    locals[i % locals.len()]
                }
                LbPolicy::Random => locals[rand::random_range(0..locals.len())],
                LbPolicy::LeastRequest => {
                    // Power of two choices on requests in flight.
                    let a = locals[rand::random_range(0..locals.len())];
                    let b = locals[rand::random_range(0..locals.len())];
                    let load = |t: &Cand<'_>| eps.get(&t.addr()).map_or(0, |e| e.in_flight);
                    if load(b) < load(a) { b } else { a }
                }
            };
            chosen.owned()
        };
        // `localityLbSetting.distribute` for this caller's locality: the
        // share of each target locality among this cluster's endpoints
        // (localities with no usable endpoint drop out, the rest keep
        // their relative weights).
        if let Some((_, to)) = want.dr.and_then(|d| d.locality_lb.as_ref()).and_then(|l| {
            l.distribute
                .iter()
                .find(|(from, _)| self.locality.matches(from))
        }) {
            let options: Vec<(u32, Vec<&Cand<'_>>)> = to
                .iter()
                .map(|(pattern, w)| {
                    let members = all_locals
                        .iter()
                        .filter(|t| matches!(t, Cand::Local { locality, .. } if locality.matches(pattern)))
                        .collect::<Vec<_>>();
                    (*w, members)
                })
                .filter(|(w, m)| *w > 0 && !m.is_empty())
                .collect();
            let total: u32 = options.iter().map(|(w, _)| w).sum();
            if total > 0 {
                let mut x = rand::random_range(0..total);
                for (w, members) in &options {
                    if x < *w {
                        return Ok(choose(members));
                    }
                    x -= w;
                }
            }
        }
        let Some((_, candidates)) = best else {
            return Err(NoTarget::NoHealthy);
        };
        let locals: Vec<&Cand<'_>> = candidates
            .iter()
            .filter(|t| matches!(t, Cand::Local { .. }))
            .collect();
        if let Some(remote) = candidates.iter().find(|t| matches!(t, Cand::Remote { .. })) {
            let total = locals.len() as u32 + remote_weight;
            if locals.is_empty() || rand::random_range(0..total) >= locals.len() as u32 {
                return Ok(remote.owned());
            }
        }
        Ok(choose(&locals))
    }

    /// Records an attempt's outcome; ejects after enough consecutive
    /// failures, within the policy's ejection limit.
    pub fn record(
        &self,
        state: &MeshState,
        key: &ServiceKey,
        dr: Option<&DestinationRule>,
        target: &Target,
        outcome: Outcome,
    ) {
        let lb = self.service(key);
        let policy = dr
            .and_then(|d| d.outlier.clone())
            .unwrap_or_else(default_outlier);
        let addr = target.addr();
        let now = Instant::now();
        let mut eps = lb.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let e = eps.entry(addr).or_default();
        if outcome == Outcome::Success {
            e.consecutive_errors = 0;
            return;
        }
        e.consecutive_errors += 1;
        if e.consecutive_errors < policy.consecutive_errors.max(1)
            || e.ejected_until.is_some_and(|t| t > now)
        {
            return;
        }
        // Endpoints of the service (the remote tier counts as one).
        let total = state
            .local
            .get(key)
            .map_or(0, |s| s.endpoints.len())
            .saturating_add(usize::from(state.imported.contains_key(key)))
            .max(1);
        let ejected = eps
            .values()
            .filter(|e| e.ejected_until.is_some_and(|t| t > now))
            .count();
        // Like Envoy's always_eject_one_host: a limit that rounds to zero
        // still allows one.
        let allowed = (total * policy.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            warn!(service = %format!("{}.{}", key.name, key.namespace), endpoint = %addr, ejected, allowed,
                "endpoint keeps failing but maxEjectionPercent is reached; it stays in rotation");
            return;
        }
        let e = eps.get_mut(&addr).expect("entry exists");
        e.times_ejected += 1;
        let time = (policy.base_ejection_time * e.times_ejected).min(Duration::from_secs(300));
        e.ejected_until = Some(now + time);
        e.consecutive_errors = 0;
        self.metrics
            .ejections
            .get_or_create(&EjectionLabels {
                destination_service: format!("{}.{}", key.name, key.namespace),
                endpoint: addr.to_string(),
            })
            .inc();
        info!(
            service = %format!("{}.{}", key.name, key.namespace),
            endpoint = %addr,
            remote_tier = matches!(target, Target::Remote { .. }),
            ejection = ?time,
            "endpoint ejected by outlier detection"
        );
    }
}
