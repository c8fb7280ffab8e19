//! ServiceExport status, as the Multi-Cluster Services API defines it
//! (kube mode): conditions `Valid` (`Valid`, or `NoService`,
//! `InvalidServiceType`), `Ready` (`Exported`, or `Pending` while the
//! export is invalid) and `Conflict` (`NoConflict`, or `PortConflict`
//! when clusters export the service with different ports), written by
//! server-side apply to the status subresource with field manager
//! `isthmus` — only when they differ from what the object shows, so at
//! steady state nothing is written. A `409` from another field manager is
//! reported, never forced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::drain::DrainSignal;
use isthmus_core::model::ServiceKey;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::warn;

use crate::catalog::{Catalog, ExportState};
use crate::import::Conflict;
use crate::k8s::{self, FIELD_MANAGER};
use crate::objects::{ExportCondition, Kind};

/// How soon a failed status write is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// The conditions a ServiceExport should show.
pub fn desired(
    key: &ServiceKey,
    state: &ExportState,
    conflicts: &[Conflict],
    cluster: &str,
) -> Vec<ExportCondition> {
    let cond = |t: &str, status: bool, reason: &str, message: String| ExportCondition {
        type_: t.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: state.generation,
        last_transition: String::new(),
    };
    let mut out = Vec::with_capacity(3);
    match &state.invalid {
        None => {
            out.push(cond("Valid", true, "Valid", format!("Service {key} found")));
            out.push(cond(
                "Ready",
                true,
                "Exported",
                "exported to the clusters linked with this one".into(),
            ));
        }
        Some((reason, message)) => {
            out.push(cond("Valid", false, reason, message.clone()));
            out.push(cond(
                "Ready",
                false,
                "Pending",
                "not exported until the export is valid".into(),
            ));
        }
    }
    let mine: Vec<&Conflict> = conflicts
        .iter()
        .filter(|c| c.service == *key && (c.excluded == cluster || c.winner == cluster))
        .collect();
    match mine.first() {
        None => out.push(cond(
            "Conflict",
            false,
            "NoConflict",
            "every cluster exports this service alike".into(),
        )),
        Some(c) if c.excluded == cluster => out.push(cond(
            "Conflict",
            true,
            "PortConflict",
            format!(
                "{}; cluster {}'s older export defines the service and this cluster's endpoints are left out",
                c.reason, c.winner
            ),
        )),
        Some(c) => out.push(cond(
            "Conflict",
            true,
            "PortConflict",
            format!(
                "cluster {}'s export differs ({}); this cluster's older export defines the service",
                c.excluded, c.reason
            ),
        )),
    }
    out
}

/// Compares conditions as written: the transition times aside.
fn same(a: &[ExportCondition], b: &[ExportCondition]) -> bool {
    let key = |c: &ExportCondition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let (a, b): (BTreeSet<_>, BTreeSet<_>) =
        (a.iter().map(key).collect(), b.iter().map(key).collect());
    a == b
}

/// What the status writer follows.
#[derive(Debug)]
pub struct Inputs {
    /// Whether the cluster has been listed.
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// Each ServiceExport as the catalogue judged it.
    pub states: watch::Receiver<Arc<BTreeMap<ServiceKey, ExportState>>>,
    /// The status each ServiceExport shows now.
    pub observed: watch::Receiver<crate::source::kube::ObservedExports>,
    /// The last merge's conflicts.
    pub conflicts: watch::Receiver<Arc<Vec<Conflict>>>,
    /// Whether this replica holds the leader Lease.
    pub leader: watch::Receiver<bool>,
}

/// Keeps every ServiceExport's status true to the catalogue and the
/// conflicts of the last merge.
pub async fn run(client: kube::Client, cluster: String, inputs: Inputs, shutdown: DrainSignal) {
    let Inputs {
        mut catalog,
        mut states,
        mut observed,
        mut conflicts,
        mut leader,
    } = inputs;
    // What was written, with what the object showed then: not written
    // again until one of the two changes.
    let mut written: BTreeMap<ServiceKey, (Vec<ExportCondition>, Vec<ExportCondition>)> =
        BTreeMap::new();
    let mut reported: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut resource = None;
    loop {
        let listed = catalog.borrow_and_update().listed;
        let export_states = states.borrow_and_update().clone();
        let shown = observed.borrow_and_update().clone();
        let conf = conflicts.borrow_and_update().clone();
        let mut failed = false;
        if listed && *leader.borrow_and_update() {
            written.retain(|k, _| export_states.contains_key(k));
            for (key, state) in export_states.iter() {
                let want = desired(key, state, &conf, &cluster);
                let now_shown = shown.get(key).cloned().unwrap_or_default();
                if same(&want, &now_shown)
                    || written
                        .get(key)
                        .is_some_and(|(w, seen)| same(w, &want) && seen == &now_shown)
                {
                    continue;
                }
                // A lost Lease stops writes at once.
                if !*leader.borrow() {
                    break;
                }
                let ar = match &resource {
                    Some(ar) => ar,
                    None => resource.insert(k8s::api_resource(
                        Kind::ServiceExport,
                        k8s::mcs_version(&client).await.as_deref(),
                    )),
                };
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &key.namespace, ar);
                let conditions: Vec<_> = want
                    .iter()
                    .map(|c| {
                        let kept = now_shown
                            .iter()
                            .find(|o| o.type_ == c.type_ && o.status == c.status)
                            .map(|o| o.last_transition.clone())
                            .filter(|t| !t.is_empty());
                        json!({
                            "type": c.type_, "status": c.status, "reason": c.reason,
                            "message": c.message, "observedGeneration": c.observed_generation,
                            "lastTransitionTime": kept.unwrap_or_else(now),
                        })
                    })
                    .collect();
                let patch = json!({
                    "apiVersion": ar.api_version, "kind": "ServiceExport",
                    "status": {"conditions": conditions},
                });
                match api
                    .patch_status(
                        &key.name,
                        &PatchParams::apply(FIELD_MANAGER),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        reported.remove(key);
                        written.insert(key.clone(), (want, now_shown.clone()));
                    }
                    // Gone meanwhile (the next catalogue drops it), or the
                    // MCS version changed: look the version up again.
                    Err(kube::Error::Api(s)) if s.code == 404 => resource = None,
                    Err(e) => {
                        let conflict = k8s::status_code(&e) == Some(409);
                        if reported.insert(key.clone()) {
                            warn!(
                                service_export = %key,
                                error = %k8s::explain(&e, "patch", &format!("{}/status", k8s::qualified(ar))),
                                "cannot write the ServiceExport's status{}",
                                if conflict { "; another field manager owns its conditions and Isthmus does not force" } else { "" }
                            );
                        }
                        // A conflict waits for a change; other failures retry.
                        failed |= !conflict;
                        if k8s::status_code(&e).is_none() {
                            resource = None;
                        }
                    }
                }
            }
        }
        tokio::select! {
            r = catalog.changed() => if r.is_err() { return },
            r = states.changed() => if r.is_err() { return },
            r = observed.changed() => if r.is_err() { return },
            r = conflicts.changed() => if r.is_err() { return },
            r = leader.changed() => {
                if r.is_err() { return }
                // A new term: what the object shows decides, not what a
                // previous term wrote.
                written.clear();
            }
            _ = tokio::time::sleep(RETRY), if failed => {}
            _ = shutdown.signaled() => return,
        }
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(invalid: Option<(&'static str, String)>) -> ExportState {
        ExportState {
            generation: 2,
            invalid,
        }
    }

    #[test]
    fn conditions_follow_mcs() {
        let key = ServiceKey::new("sample", "web");
        let ok = desired(&key, &state(None), &[], "east");
        let show: Vec<_> = ok
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            show,
            [
                ("Valid", "True", "Valid"),
                ("Ready", "True", "Exported"),
                ("Conflict", "False", "NoConflict")
            ]
        );
        assert!(ok.iter().all(|c| c.observed_generation == 2));

        let no_svc = desired(
            &key,
            &state(Some(("NoService", "no Service".into()))),
            &[],
            "east",
        );
        assert_eq!(
            (no_svc[0].status.as_str(), no_svc[0].reason.as_str()),
            ("False", "NoService")
        );
        assert_eq!(no_svc[1].reason, "Pending");

        let conflict = Conflict {
            service: key.clone(),
            winner: "west".into(),
            excluded: "east".into(),
            reason: "ports differ".into(),
        };
        let lost = desired(&key, &state(None), std::slice::from_ref(&conflict), "east");
        assert_eq!(
            (lost[2].status.as_str(), lost[2].reason.as_str()),
            ("True", "PortConflict")
        );
        assert!(lost[2].message.contains("west"), "{}", lost[2].message);
        // The winner shows the conflict too; an uninvolved cluster does not.
        assert_eq!(
            desired(&key, &state(None), std::slice::from_ref(&conflict), "west")[2].status,
            "True"
        );
        assert_eq!(
            desired(&key, &state(None), &[conflict], "north")[2].status,
            "False"
        );
        // Transition times do not make a difference.
        let mut again = ok.clone();
        again[0].last_transition = "2026-01-01T00:00:00Z".into();
        assert!(same(&ok, &again));
    }
}
