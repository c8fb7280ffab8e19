//! The `kube` sink: imports as `ServiceEntry` objects
//! (`networking.istio.io/v1`) in the cluster's API, by server-side apply
//! with field manager [`FIELD_MANAGER`](crate::k8s::FIELD_MANAGER), only
//! the fields Isthmus renders, labelled
//! `app.kubernetes.io/managed-by: isthmus`.
//!
//! - What is already there is not written again: a full pass lists the
//!   ServiceEntries Isthmus manages (by label) and applies only those
//!   whose fields differ; an incremental pass applies what changed since
//!   the last one. At steady state the sink makes no request at all.
//! - Garbage: a full pass (the first, and every one after a failure)
//!   deletes the labelled ServiceEntries no import wants — exports that
//!   went away while the controller was down included.
//! - A `409 Conflict` (another field manager owns a field Isthmus
//!   renders) is reported and left alone, never forced; the other
//!   imports are written.
//! - A namespace that does not exist here is reported; the import waits
//!   for it.
//! - Where the cluster serves the Multi-Cluster Services API, each import
//!   is also an MCS `ServiceImport` (same name and namespace as the
//!   service; `spec.type: ClusterSetIP`, its ports; `status.clusters`,
//!   the exporting clusters), for tools that read MCS. Its spec changes
//!   only with the ports and its status only with the set of clusters, so
//!   an endpoint moving writes the ServiceEntry alone.
//!
//! The reconciler calls sinks from a dedicated thread; this one runs its
//! requests on the controller's runtime through a handle.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Mutex;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::ApiResource;
use serde_json::Value;
use tracing::warn;

use super::service_entry::{
    MANAGED_BY, Seed, read_back, service_entry, service_entry_name, service_import,
};
use super::{Sink, SinkError, SinkReport};
use crate::import::Imports;
use crate::k8s::{self, FIELD_MANAGER};

/// Writes imports to a Kubernetes API server.
pub struct KubeSink {
    client: kube::Client,
    runtime: tokio::runtime::Handle,
    gateway: SocketAddr,
    se: ApiResource,
    /// The API server's URL, for messages.
    url: String,
    /// What was last applied, by (namespace, name): an incremental pass
    /// skips what it would apply again.
    written: Mutex<BTreeMap<(String, String), Value>>,
    /// Objects refused with a conflict or a missing namespace, reported
    /// once until they go through.
    refused: Mutex<BTreeSet<(String, String)>>,
    /// Whether this replica holds the leader Lease: checked before every
    /// write, so a lost Lease stops a pass at once.
    leader: tokio::sync::watch::Receiver<bool>,
    /// ServiceImport at the served MCS version; `None` inside when the
    /// cluster has no MCS CRDs (no ServiceImports then). Looked up again
    /// on every full pass.
    mcs: Mutex<Option<Option<ApiResource>>>,
    /// ServiceImports last written: (object, status) by (namespace, name).
    si_written: Mutex<BTreeMap<(String, String), (Value, Value)>>,
}

impl std::fmt::Debug for KubeSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSink")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Writes in flight at once during a pass.
const WRITE_CONCURRENCY: usize = 8;

fn se_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry"),
        "serviceentries",
    )
}

/// Whether the live object already holds every field Isthmus renders.
fn holds(live: &Value, rendered: &Value) -> bool {
    let labels_ok = rendered["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| live["metadata"]["labels"].get(k) == Some(v));
    let spec_ok = rendered["spec"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| live["spec"].get(k) == Some(v));
    labels_ok && spec_ok
}

fn name_of(v: &Value) -> (String, String) {
    let s = |k: &str| v["metadata"][k].as_str().unwrap_or("").to_owned();
    (s("namespace"), s("name"))
}

enum Put {
    Written,
    /// Refused for a reason an operator fixes (conflict, no namespace).
    Refused(String),
}

impl KubeSink {
    pub fn new(
        client: kube::Client,
        url: String,
        runtime: tokio::runtime::Handle,
        gateway: SocketAddr,
        leader: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            leader,
            client,
            url,
            runtime,
            gateway,
            se: se_resource(),
            written: Mutex::default(),
            refused: Mutex::default(),
            mcs: Mutex::default(),
            si_written: Mutex::default(),
        }
    }

    /// The ServiceImport resource, if the cluster serves MCS.
    async fn service_imports(&self, refresh: bool) -> Option<ApiResource> {
        if !refresh && let Some(known) = self.mcs.lock().unwrap_or_else(|e| e.into_inner()).clone()
        {
            return known;
        }
        let found = k8s::mcs_version(&self.client).await.map(|v| {
            ApiResource::from_gvk_with_plural(
                &kube::core::GroupVersionKind::gvk("multicluster.x-k8s.io", &v, "ServiceImport"),
                "serviceimports",
            )
        });
        let mut known = self.mcs.lock().unwrap_or_else(|e| e.into_inner());
        if found.is_none() && known.as_ref().is_none_or(Option::is_some) {
            warn!(
                "the cluster serves no Multi-Cluster Services API (serviceimports.multicluster.x-k8s.io): imports are ServiceEntries only; install the MCS CRDs for ServiceImports"
            );
        }
        *known = Some(found.clone());
        found
    }

    /// Makes the ServiceImport of `svc` hold `want` (object, status).
    /// Returns what it wrote, for the report.
    async fn put_import(
        &self,
        ar: &ApiResource,
        want: &(Value, Value),
        live: Option<&Value>,
    ) -> Result<Option<String>, SinkError> {
        let mut wrote = None;
        let (ns, name) = name_of(&want.0);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, ar);
        let pp = PatchParams::apply(FIELD_MANAGER);
        let err = |e| self.error_on("patch", "serviceimports.multicluster.x-k8s.io", e);
        if !live.is_some_and(|l| holds(l, &want.0)) {
            self.may_write()?;
            match api.patch(&name, &pp, &Patch::Apply(&want.0)).await {
                Ok(_) => wrote = Some(format!("ServiceImport {ns}/{name}")),
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    warn!(service_import = %format!("{ns}/{name}"), error = %s.message, "ServiceImport not written (Isthmus does not force)");
                    return Ok(None);
                }
                Err(e) => return Err(err(e)),
            }
        }
        if !live.is_some_and(|l| l["status"] == want.1["status"]) {
            self.may_write()?;
            match api.patch_status(&name, &pp, &Patch::Apply(&want.1)).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    warn!(service_import = %format!("{ns}/{name}"), error = %s.message, "ServiceImport status not written (Isthmus does not force)");
                    return Ok(wrote);
                }
                Err(e) => return Err(err(e)),
            }
        }
        self.si_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((ns, name), want.clone());
        Ok(wrote)
    }

    /// Puts each (wanted, live) ServiceImport, up to
    /// [`WRITE_CONCURRENCY`] at a time.
    async fn put_imports(
        &self,
        ar: &ApiResource,
        items: Vec<((Value, Value), Option<Value>)>,
        report: &mut SinkReport,
    ) -> Result<(), SinkError> {
        use futures::StreamExt as _;
        let mut results = futures::stream::iter(items)
            .map(|(want, live)| async move { self.put_import(ar, &want, live.as_ref()).await })
            .buffer_unordered(WRITE_CONCURRENCY);
        while let Some(r) = results.next().await {
            report.written.extend(r?);
        }
        Ok(())
    }

    async fn imports_full_pass(
        &self,
        desired: &Imports,
        report: &mut SinkReport,
    ) -> Result<(), SinkError> {
        let Some(ar) = self.service_imports(true).await else {
            return Ok(());
        };
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let lp = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
        let live: BTreeMap<(String, String), Value> = api
            .list(&lp)
            .await
            .map_err(|e| self.error_on("list", "serviceimports.multicluster.x-k8s.io", e))?
            .items
            .into_iter()
            .filter_map(|o| {
                let v = serde_json::to_value(o).ok()?;
                Some((name_of(&v), v))
            })
            .collect();
        let mut wanted = BTreeSet::new();
        let mut items = Vec::new();
        for svc in desired.services.values() {
            let want = service_import(svc, &ar.api_version);
            let id = name_of(&want.0);
            wanted.insert(id.clone());
            items.push((want, live.get(&id).cloned()));
        }
        self.put_imports(&ar, items, report).await?;
        for (ns, name) in live.keys().filter(|k| !wanted.contains(*k)) {
            self.may_write()?;
            self.remove_import(&ar, ns, name, report).await?;
        }
        Ok(())
    }

    async fn remove_import(
        &self,
        ar: &ApiResource,
        ns: &str,
        name: &str,
        report: &mut SinkReport,
    ) -> Result<(), SinkError> {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, ar);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => report.deleted.push(format!("ServiceImport {ns}/{name}")),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(self.error_on("delete", "serviceimports.multicluster.x-k8s.io", e));
            }
        }
        self.si_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(ns.to_owned(), name.to_owned()));
        Ok(())
    }

    async fn imports_change_pass(
        &self,
        prev: &Imports,
        next: &Imports,
        report: &mut SinkReport,
    ) -> Result<(), SinkError> {
        let Some(ar) = self.service_imports(false).await else {
            return Ok(());
        };
        let mut items = Vec::new();
        for (k, svc) in &next.services {
            if prev.services.get(k) == Some(svc) {
                continue;
            }
            let want = service_import(svc, &ar.api_version);
            let last = self
                .si_written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&name_of(&want.0))
                .cloned();
            if last.as_ref() == Some(&want) {
                continue;
            }
            // What was written last stands for the live object.
            let live = last.map(|(mut o, st)| {
                o["status"] = st["status"].clone();
                o
            });
            items.push((want, live));
        }
        self.put_imports(&ar, items, report).await?;
        for k in prev
            .services
            .keys()
            .filter(|k| !next.services.contains_key(*k))
        {
            self.may_write()?;
            self.remove_import(&ar, &k.namespace, &k.name, report)
                .await?;
        }
        Ok(())
    }

    fn error(&self, verb: &str, e: kube::Error) -> SinkError {
        self.error_on(verb, "serviceentries.networking.istio.io", e)
    }

    fn error_on(&self, verb: &str, resource: &str, e: kube::Error) -> SinkError {
        SinkError {
            target: self.target(),
            hint: "the API server refused or could not be reached; the pass is retried",
            source: k8s::explain(&e, verb, resource).into(),
        }
    }

    async fn live(&self) -> Result<BTreeMap<(String, String), Value>, kube::Error> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &self.se);
        let lp = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
        let list = api.list(&lp).await?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| {
                let v = serde_json::to_value(o).ok()?;
                Some((name_of(&v), v))
            })
            .collect())
    }

    /// Fails unless this replica may write.
    fn may_write(&self) -> Result<(), SinkError> {
        if *self.leader.borrow() {
            Ok(())
        } else {
            Err(SinkError {
                target: self.target(),
                hint: "another replica holds the leader Lease and writes",
                source: "this replica lost the leader Lease; writes stopped".into(),
            })
        }
    }

    async fn put(&self, se: &Value) -> Result<Put, kube::Error> {
        let (ns, name) = name_of(se);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &self.se);
        match api
            .patch(&name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(se))
            .await
        {
            Ok(_) => Ok(Put::Written),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Put::Refused(format!(
                "ServiceEntry {ns}/{name}: another field manager owns fields Isthmus writes ({}); Isthmus does not force: remove that manager's fields (or the object) to let the import through",
                s.message
            ))),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(Put::Refused(format!(
                "ServiceEntry {ns}/{name}: {} — create namespace {ns} in this cluster to import the service",
                s.message
            ))),
            Err(e) => Err(e),
        }
    }

    async fn remove(&self, ns: &str, name: &str) -> Result<bool, kube::Error> {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &self.se);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Applies `se`, recording the outcome in `report`.
    /// Applies `ses`, up to [`WRITE_CONCURRENCY`] at a time (an API
    /// server across a network is latency-bound, not busy), recording
    /// each outcome in `report`. Each write checks the Lease first.
    async fn write_all(&self, ses: Vec<Value>, report: &mut SinkReport) -> Result<(), SinkError> {
        use futures::StreamExt as _;
        let mut results = futures::stream::iter(ses)
            .map(|se| async move {
                self.may_write()?;
                let outcome = self.put(&se).await.map_err(|e| self.error("patch", e))?;
                Ok::<_, SinkError>((se, outcome))
            })
            .buffer_unordered(WRITE_CONCURRENCY);
        while let Some(r) = results.next().await {
            let (se, outcome) = r?;
            let id = name_of(&se);
            match outcome {
                Put::Written => {
                    report.written.push(format!("{}/{}", id.0, id.1));
                    self.refused
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    self.written
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, se);
                }
                Put::Refused(why) => {
                    if self
                        .refused
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.clone())
                    {
                        warn!(error = %why, "import not written");
                    }
                    self.written
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                }
            }
        }
        Ok(())
    }

    async fn full_pass(&self, desired: &Imports) -> Result<SinkReport, SinkError> {
        let live = self.live().await.map_err(|e| self.error("list", e))?;
        let mut report = SinkReport::default();
        let mut wanted = BTreeSet::new();
        let mut to_write = Vec::new();
        for svc in desired.services.values() {
            let se = service_entry(svc, self.gateway);
            let id = name_of(&se);
            wanted.insert(id.clone());
            if live.get(&id).is_some_and(|l| holds(l, &se)) {
                report.unchanged += 1;
                self.written
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, se);
                continue;
            }
            to_write.push(se);
        }
        self.write_all(to_write, &mut report).await?;
        for (ns, name) in live.keys().filter(|k| !wanted.contains(*k)) {
            self.may_write()?;
            if self
                .remove(ns, name)
                .await
                .map_err(|e| self.error("delete", e))?
            {
                report.deleted.push(format!("{ns}/{name}"));
            }
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(ns.clone(), name.clone()));
        }
        self.imports_full_pass(desired, &mut report).await?;
        Ok(report)
    }

    async fn change_pass(&self, prev: &Imports, next: &Imports) -> Result<SinkReport, SinkError> {
        let mut report = SinkReport::default();
        let mut to_write = Vec::new();
        for (k, svc) in &next.services {
            if prev.services.get(k) == Some(svc) {
                continue;
            }
            let se = service_entry(svc, self.gateway);
            let same = self
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&name_of(&se))
                == Some(&se);
            if same {
                report.unchanged += 1;
                continue;
            }
            to_write.push(se);
        }
        self.write_all(to_write, &mut report).await?;
        for k in prev
            .services
            .keys()
            .filter(|k| !next.services.contains_key(*k))
        {
            let name = service_entry_name(k);
            self.may_write()?;
            if self
                .remove(&k.namespace, &name)
                .await
                .map_err(|e| self.error("delete", e))?
            {
                report.deleted.push(format!("{}/{name}", k.namespace));
            }
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(k.namespace.clone(), name));
        }
        self.imports_change_pass(prev, next, &mut report).await?;
        Ok(report)
    }
}

impl Sink for KubeSink {
    fn apply_all(&self, desired: &Imports) -> Result<SinkReport, SinkError> {
        self.runtime.block_on(self.full_pass(desired))
    }

    fn apply_change(&self, prev: &Imports, next: &Imports) -> Result<SinkReport, SinkError> {
        self.runtime.block_on(self.change_pass(prev, next))
    }

    fn seed(&self) -> Seed {
        let mut out = Seed::new();
        // Called on the runtime at startup: the list runs on its own
        // thread so this one can block, and for 5 s at most (an API
        // server down at startup must not hold the controller up).
        let (client, se) = (self.client.clone(), self.se.clone());
        let listed = std::thread::scope(|s| {
            s.spawn(|| {
                self.runtime.block_on(async {
                    let api: Api<DynamicObject> = Api::all_with(client, &se);
                    let lp =
                        ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
                    tokio::time::timeout(std::time::Duration::from_secs(5), api.list(&lp)).await
                })
            })
            .join()
        });
        match listed {
            Ok(Err(_)) => warn!(
                "reading back earlier imports timed out (is the API server up?); peers' services are rewritten as they arrive"
            ),
            Ok(Ok(Ok(list))) => {
                for o in list.items {
                    if let Ok(v) = serde_json::to_value(o) {
                        read_back(&v, &mut out);
                    }
                }
            }
            Ok(Ok(Err(e))) => warn!(
                error = %k8s::explain(&e, "list", "serviceentries.networking.istio.io"),
                "cannot read back earlier imports; peers' services are rewritten as they arrive"
            ),
            Err(_) => warn!("reading back earlier imports panicked"),
        }
        out
    }

    fn target(&self) -> String {
        format!("the Kubernetes API at {}", self.url)
    }
}
