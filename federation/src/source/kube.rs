//! The `kube` source: the cluster's Kubernetes API, one kube-rs watcher
//! per kind (initial list, then watch with bookmarks; after a `410 Gone`
//! the watcher relists that kind and the [`Store`](super::Store) swaps it
//! whole; errors back off exponentially with jitter).
//!
//! While the API server is unreachable nothing changes: the last good
//! state stays in force (stale, not empty) and [`SourceHealth`] says what
//! fails. A kind whose CRD is not installed counts as listed and empty —
//! there can be no such objects — so the other kinds keep working; it is
//! looked for again every [`MISSING_RECHECK`]. Pods are watched for
//! their metadata only (their labels are all the catalogue needs).
//! ServiceExport is read at whichever of `v1beta1` / `v1alpha1` the
//! server serves.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _, stream::BoxStream};
use isthmus_core::model::ServiceKey;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event as WatchEvent};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{Event, Scope};
use crate::config::WatchSelection;
use crate::k8s;
use crate::objects::{ExportCondition, Kind, Object, ObjectKey, export_conditions, parse};

/// How often a failing kind checks whether the API server answers again.
const RECOVERY_PROBE: Duration = Duration::from_secs(2);

/// How often a kind whose CRD is missing is looked for again.
pub const MISSING_RECHECK: Duration = Duration::from_secs(15);

/// How one kind's watch is doing, for `/config_dump` and `isthmus
/// status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KindHealth {
    /// `plural.group` as served.
    pub resource: String,
    /// `listing`, `synced`, `failing` (the last good state stays in
    /// force), or `not installed`.
    pub state: &'static str,
    /// What failed, with what to check.
    pub error: Option<String>,
}

/// Each kind's [`KindHealth`].
#[derive(Debug, Clone, Default)]
pub struct SourceHealth(Arc<Mutex<BTreeMap<String, KindHealth>>>);

impl SourceHealth {
    fn set(&self, scope: &Scope, resource: &str, state: &'static str, error: Option<String>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(
            scope.to_string(),
            KindHealth {
                resource: resource.to_owned(),
                state,
                error,
            },
        );
    }

    /// By scope: the kind (`Service`), or with `namespaces` set the kind
    /// in one (`Service/sample`).
    pub fn snapshot(&self) -> BTreeMap<String, KindHealth> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Every ServiceExport's `status.conditions`, by service.
pub type ObservedExports = BTreeMap<ServiceKey, Vec<ExportCondition>>;

/// Reads a cluster from its API server.
#[derive(Clone)]
pub struct KubeSource {
    client: kube::Client,
    selection: WatchSelection,
    health: SourceHealth,
    /// ServiceExport status, kept apart from the objects: the
    /// controller's own status writes echo back through the watch, and
    /// must not rebuild the catalogue.
    observed: Arc<watch::Sender<ObservedExports>>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").finish_non_exhaustive()
    }
}

type Events = BoxStream<'static, Result<WatchEvent<Value>, watcher::Error>>;

impl KubeSource {
    pub fn new(client: kube::Client, selection: WatchSelection) -> Self {
        Self {
            client,
            selection,
            health: SourceHealth::default(),
            observed: Arc::new(watch::channel(ObservedExports::new()).0),
        }
    }

    /// The ServiceExports' status as the API server shows it.
    pub fn observed_exports(&self) -> watch::Receiver<ObservedExports> {
        self.observed.subscribe()
    }

    /// Records a ServiceExport's status (`None`: deleted).
    fn observe(&self, v: &Value, present: bool) {
        let Some(key) = key(Kind::ServiceExport, v) else {
            return;
        };
        let key = ServiceKey::new(&key.namespace, &key.name);
        let conditions = export_conditions(v);
        self.observed.send_if_modified(|m| {
            if present {
                if m.get(&key) == Some(&conditions) {
                    return false;
                }
                m.insert(key, conditions);
                true
            } else {
                m.remove(&key).is_some()
            }
        });
    }

    pub fn health(&self) -> SourceHealth {
        self.health.clone()
    }

    /// Watches every kind until `tx` closes.
    pub async fn run(self, tx: mpsc::Sender<Event>) {
        let mut tasks = tokio::task::JoinSet::new();
        for scope in self.scopes() {
            tasks.spawn(self.clone().watch_scope(scope, tx.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// What one watcher each covers: every kind, per namespace when
    /// `namespaces` limits them (Nodes are cluster-wide).
    pub fn scopes(&self) -> Vec<Scope> {
        let mut out = Vec::new();
        for kind in Kind::ALL {
            if kind == Kind::Node || self.selection.namespaces.is_empty() {
                out.push(kind.into());
            } else {
                out.extend(self.selection.namespaces.iter().map(|ns| Scope {
                    kind,
                    namespace: Some(ns.clone()),
                }));
            }
        }
        out
    }

    fn api<K>(&self, scope: &Scope, ar: &ApiResource) -> Api<K>
    where
        K: kube::Resource<DynamicType = ApiResource, Scope = kube::core::DynamicResourceScope>,
    {
        match &scope.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }

    /// Whether the API server answers a list of `ar` (one object's
    /// metadata).
    async fn answers(&self, scope: &Scope, ar: &ApiResource) -> bool {
        let api: Api<DynamicObject> = self.api(scope, ar);
        api.list_metadata(&kube::api::ListParams::default().limit(1))
            .await
            .is_ok()
    }

    fn stream(&self, scope: &Scope, ar: &ApiResource) -> Events {
        let mut cfg = watcher::Config::default();
        // The label selector picks Services, exports and policies;
        // endpoints and Pods follow their Service, Nodes are all read.
        if let Some(l) = &self.selection.label_selector
            && !matches!(scope.kind, Kind::Pod | Kind::EndpointSlice | Kind::Node)
        {
            cfg = cfg.labels(l);
        }
        let ar2 = ar.clone();
        if scope.kind == Kind::Pod {
            let api: Api<PartialObjectMeta<DynamicObject>> = self.api(scope, ar);
            watcher::watcher(api, cfg)
                .default_backoff()
                .map_ok(move |e| to_values(e, &ar2))
                .boxed()
        } else {
            let api: Api<DynamicObject> = self.api(scope, ar);
            watcher::watcher(api, cfg)
                .default_backoff()
                .map_ok(move |e| to_values(e, &ar2))
                .boxed()
        }
    }

    async fn watch_scope(self, scope: Scope, tx: mpsc::Sender<Event>) {
        let kind = scope.kind;
        // Whether this kind has ever been published (listed, or found
        // not installed): until then the store waits for it.
        let mut published = false;
        loop {
            let version = match kind {
                Kind::ServiceExport => k8s::mcs_version(&self.client).await,
                _ => None,
            };
            let ar = k8s::api_resource(kind, version.as_deref());
            let resource = k8s::qualified(&ar);
            // A kind found missing stays reported so until it lists (no
            // flapping back to "listing", no error logged again).
            let missing_before = self
                .health
                .snapshot()
                .get(&scope.to_string())
                .is_some_and(|h| h.state == "not installed");
            if !missing_before {
                self.health.set(&scope, &resource, "listing", None);
            }
            let mut events = self.stream(&scope, &ar);
            let mut last_error = String::new();
            // ServiceExports seen in a list in progress.
            let mut listed_exports = BTreeSet::new();
            // Between a list's Init and InitDone (or after a list
            // failed: the watcher lists again).
            let mut in_list = true;
            let missing = loop {
                // kube-rs resumes a watch without a word: while a kind is
                // failing, a cheap list tells when the API server answers
                // again, so status stops saying it is down. Not while a
                // list is due (the kind is synced only once it lists).
                let item = if last_error.is_empty() || in_list {
                    events.next().await
                } else {
                    tokio::select! {
                        biased;
                        item = events.next() => item,
                        () = tokio::time::sleep(RECOVERY_PROBE) => {
                            if self.answers(&scope, &ar).await {
                                info!(%resource, "the API server answers again; the watch resumes from its last version");
                                last_error.clear();
                                self.health.set(&scope, &resource, "synced", None);
                            }
                            continue;
                        }
                    }
                };
                let Some(item) = item else {
                    return;
                };
                let sent = match item {
                    Ok(WatchEvent::Init) => {
                        in_list = true;
                        listed_exports.clear();
                        tx.send(Event::Init(scope.clone())).await
                    }
                    Ok(WatchEvent::InitApply(v)) => match object(kind, &v) {
                        Some(o) if kind == Kind::ServiceExport => {
                            listed_exports.insert(ServiceKey::new(&o.key.namespace, &o.key.name));
                            self.observe(&v, true);
                            tx.send(Event::InitApply(o)).await
                        }
                        Some(o) => tx.send(Event::InitApply(o)).await,
                        None => Ok(()),
                    },
                    Ok(WatchEvent::InitDone) => {
                        if !last_error.is_empty() || !published {
                            info!(%resource, "listed; watching");
                        }
                        last_error.clear();
                        in_list = false;
                        published = true;
                        self.health.set(&scope, &resource, "synced", None);
                        if kind == Kind::ServiceExport {
                            let seen = std::mem::take(&mut listed_exports);
                            self.observed.send_if_modified(|m| {
                                let before = m.len();
                                m.retain(|k, _| {
                                    scope
                                        .namespace
                                        .as_ref()
                                        .is_some_and(|ns| *ns != k.namespace)
                                        || seen.contains(k)
                                });
                                m.len() != before
                            });
                        }
                        tx.send(Event::InitDone(scope.clone())).await
                    }
                    Ok(WatchEvent::Apply(v)) => match object(kind, &v) {
                        Some(o) => {
                            if kind == Kind::ServiceExport {
                                self.observe(&v, true);
                            }
                            tx.send(Event::Apply(o)).await
                        }
                        None => Ok(()),
                    },
                    Ok(WatchEvent::Delete(v)) => match key(kind, &v) {
                        Some(k) => {
                            if kind == Kind::ServiceExport {
                                self.observe(&v, false);
                            }
                            tx.send(Event::Delete(k)).await
                        }
                        None => Ok(()),
                    },
                    Err(e) => {
                        let (verb, err) = match &e {
                            watcher::Error::InitialListFailed(e) => {
                                in_list = true;
                                ("list", Some(e))
                            }
                            watcher::Error::WatchStartFailed(e)
                            | watcher::Error::WatchFailed(e) => ("watch", Some(e)),
                            _ => ("watch", None),
                        };
                        if err.and_then(k8s::status_code) == Some(404) {
                            break true;
                        }
                        let message = match err {
                            Some(err) => k8s::explain(err, verb, &resource),
                            None => format!("watch {resource}: {e}"),
                        };
                        if message != last_error {
                            warn!(%resource, error = %message, "the last good state stays in force");
                            last_error = message.clone();
                        }
                        self.health.set(&scope, &resource, "failing", Some(message));
                        Ok(())
                    }
                };
                if sent.is_err() {
                    return;
                }
            };
            if missing {
                let message = format!(
                    "{resource} is not served by the API server: {}; until then this cluster has none",
                    k8s::install_hint(kind)
                );
                if self
                    .health
                    .snapshot()
                    .get(&scope.to_string())
                    .is_none_or(|h| h.state != "not installed")
                {
                    error!(%resource, error = %message, "kind not installed");
                }
                self.health
                    .set(&scope, &resource, "not installed", Some(message));
                // There can be none: an empty list, so the other kinds
                // are published.
                if tx.send(Event::Init(scope.clone())).await.is_err()
                    || tx.send(Event::InitDone(scope.clone())).await.is_err()
                {
                    return;
                }
                published = true;
                let jitter = Duration::from_millis(rand::random::<u64>() % 2000);
                tokio::time::sleep(MISSING_RECHECK + jitter).await;
            }
        }
    }
}

fn to_values<K: serde::Serialize>(e: WatchEvent<K>, ar: &ApiResource) -> WatchEvent<Value> {
    let v = |k: K| {
        let mut v = serde_json::to_value(k).unwrap_or(Value::Null);
        // List items of built-in kinds come without apiVersion and kind,
        // and metadata-only objects as PartialObjectMetadata.
        v["apiVersion"] = Value::String(ar.api_version.clone());
        v["kind"] = Value::String(ar.kind.clone());
        v
    };
    match e {
        WatchEvent::Apply(k) => WatchEvent::Apply(v(k)),
        WatchEvent::Delete(k) => WatchEvent::Delete(v(k)),
        WatchEvent::Init => WatchEvent::Init,
        WatchEvent::InitApply(k) => WatchEvent::InitApply(v(k)),
        WatchEvent::InitDone => WatchEvent::InitDone,
    }
}

/// The parsed object; one that does not parse is reported and left out
/// (a change to it leaves its previous version in force).
fn object(kind: Kind, v: &Value) -> Option<Arc<Object>> {
    match parse(v) {
        Ok(Some(o)) => Some(Arc::new(o)),
        Ok(None) => None,
        Err(e) => {
            warn!(kind = ?kind, error = %e, "object ignored until fixed; its previous version stays in force");
            None
        }
    }
}

fn key(kind: Kind, v: &Value) -> Option<ObjectKey> {
    let meta = v.get("metadata")?;
    Some(ObjectKey {
        kind,
        namespace: if kind.namespaced() {
            meta.get("namespace")?.as_str()?.to_owned()
        } else {
            String::new()
        },
        name: meta.get("name")?.as_str()?.to_owned(),
    })
}
