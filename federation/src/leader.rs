//! Leader election on a `coordination.k8s.io/v1` Lease (kube mode): one
//! replica of a cluster's controller writes (ServiceEntries,
//! ServiceExport status) at a time; every replica reads the cluster,
//! federates and serves the config stream.
//!
//! As client-go's leader election: a replica takes the Lease when it is
//! free or its holder has not renewed it within `leaseDurationSeconds`
//! (measured on this replica's clock from when it last saw the record
//! change, so clock skew does not matter), renews it every third of the
//! duration, and stops writing **at once** when a renewal has not
//! succeeded within two thirds of it — before anyone else may take it.
//! Writes go through optimistic concurrency (the Lease's
//! resourceVersion), so two replicas cannot both win. On shutdown the
//! holder releases the Lease, and a standby takes over on its next try.

use std::time::Duration;

use isthmus_core::drain::DrainSignal;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::k8s;

/// The Lease's name (in the controller's namespace) and how long it
/// lasts (`source.kube.leaderElection: {name, leaseDuration}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseConfig {
    pub name: String,
    pub lease_duration: Duration,
}

/// Default Lease name.
pub const DEFAULT_LEASE_NAME: &str = "isthmus-controller";
/// Default Lease duration (client-go's).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_LEASE_NAME.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
        }
    }
}

/// This replica's identity in the Lease: the pod's name (`POD_NAME`, from
/// the downward API) or the host name, with a random suffix so two
/// processes on one host differ.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "isthmus".into());
    format!("{base}_{}", hex::encode(rand::random::<[u8; 4]>()))
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// What one attempt found.
enum Attempt {
    /// This replica holds the Lease (acquired or renewed).
    Held,
    /// Another replica holds it.
    Other(String),
}

/// Runs the election until shutdown, publishing whether this replica may
/// write on `leader`.
pub async fn run(
    client: kube::Client,
    namespace: String,
    cfg: LeaseConfig,
    me: String,
    leader: watch::Sender<bool>,
    shutdown: DrainSignal,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let retry = cfg.lease_duration / 3;
    let renew_deadline = cfg.lease_duration * 2 / 3;
    let mut last_held: Option<Instant> = None;
    // (resourceVersion, when this replica first saw it).
    let mut observed: Option<(String, Instant)> = None;
    let mut reported = String::new();
    loop {
        // Bounded: an API server that hangs must not keep this replica
        // writing past its Lease.
        let attempt =
            match tokio::time::timeout(retry, try_once(&api, &cfg, &me, &mut observed)).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(k8s::explain(&e, "update", "leases.coordination.k8s.io")),
                Err(_) => Err(format!(
                    "the API server did not answer within {retry:?} (leases.coordination.k8s.io)"
                )),
            };
        match attempt {
            Ok(Attempt::Held) => {
                if last_held.is_none() {
                    info!(lease = %format!("{namespace}/{}", cfg.name), identity = %me, "became the leader: this replica writes");
                }
                last_held = Some(Instant::now());
                reported.clear();
                leader.send_if_modified(|l| !std::mem::replace(l, true));
            }
            Ok(Attempt::Other(holder)) => {
                if last_held.take().is_some() || reported != holder {
                    info!(%holder, "another replica leads: this one stands by (reads, federates, serves; does not write)");
                    reported = holder;
                }
                leader.send_if_modified(|l| std::mem::replace(l, false));
            }
            Err(message) => {
                if reported != message {
                    warn!(error = %message, "leader election");
                    reported = message;
                }
                // Not renewed in time: stop writing before the Lease can
                // be taken by another replica.
                if last_held.is_some_and(|t| t.elapsed() >= renew_deadline) {
                    warn!("lost the lease (not renewed in time): writes stop");
                    last_held = None;
                    leader.send_if_modified(|l| std::mem::replace(l, false));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.signaled() => break,
        }
    }
    if last_held.is_some() {
        leader.send_replace(false);
        release(&api, &cfg, &me).await;
    }
}

async fn try_once(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    me: &str,
    observed: &mut Option<(String, Instant)>,
) -> Result<Attempt, kube::Error> {
    let secs = i32::try_from(cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(lease) = api.get_opt(&cfg.name).await? else {
        let fresh = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: api.namespace().map(str::to_owned),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &fresh).await {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Other(String::new())),
            Err(e) => Err(e),
        };
    };
    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
    let seen_at = match observed {
        Some((r, at)) if *r == rv => *at,
        _ => {
            let at = Instant::now();
            *observed = Some((rv.clone(), at));
            at
        }
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64);
    let free = holder.is_empty() || seen_at.elapsed() > duration;
    if holder != me && !free {
        return Ok(Attempt::Other(holder));
    }
    let mut next = lease;
    let mut s = spec;
    if holder != me {
        s.acquire_time = Some(now());
        s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
    }
    s.holder_identity = Some(me.to_owned());
    s.lease_duration_seconds = Some(secs);
    s.renew_time = Some(now());
    next.spec = Some(s);
    match api.replace(&cfg.name, &PostParams::default(), &next).await {
        Ok(l) => {
            *observed = l.metadata.resource_version.map(|r| (r, Instant::now()));
            Ok(Attempt::Held)
        }
        // Someone else wrote first: they hold it (or renewed it).
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Other(holder)),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up so a standby takes over without waiting for it to
/// expire.
async fn release(api: &Api<Lease>, cfg: &LeaseConfig, me: &str) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => info!("released the lease"),
        Err(e) => warn!(
            error = %k8s::explain(&e, "update", "leases.coordination.k8s.io"),
            "cannot release the lease; a standby takes over when it expires"
        ),
    }
}
