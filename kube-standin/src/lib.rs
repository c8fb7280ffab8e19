//! A Kubernetes API server stand-in for tests: the one stand-in the
//! project allows, so that the real kube-rs client code (and stock
//! `kubectl`) runs against something on this machine, where no cluster
//! can run.
//!
//! It speaks the REST and watch protocol over plain HTTP/1.1 on a
//! loopback port for a fixed set of kinds ([`resources::ALL`]): discovery,
//! list (label and field selectors, `limit`/`continue`), get, create,
//! replace with optimistic concurrency, JSON merge and JSON patches,
//! server-side apply with `managedFields` and conflicts, the status
//! subresource, delete, watch (resume from a resourceVersion, bookmarks,
//! `410 Gone` after compaction), TokenReview. Tests drive faults through
//! [`ApiServer`]: compaction, cut watches, an outage, 429/500 responses,
//! RBAC denials, kinds "not installed". `docs/kube-standin.md` is the
//! behaviour table: what it does and what it does not.

mod fields;
mod http;
pub mod resources;
mod selector;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use resources::Resource;
pub use store::{ApiError, TokenInfo};

use resources::Catalog;
use store::{Store, WriteCtx};

/// Faults a test arranges.
#[derive(Debug, Default)]
struct Faults {
    /// The next N resource requests fail with this status code.
    fail_next: Option<(u32, u16)>,
    /// (verb, resource) pairs RBAC forbids; resource as `plural.group`
    /// (`plural` for the core group), `*` for any.
    denied: BTreeSet<(String, String)>,
}

#[derive(Debug)]
struct Inner {
    store: Mutex<Store>,
    catalog: Catalog,
    faults: Mutex<Faults>,
    /// Requests served, by (verb, resource).
    counts: Mutex<BTreeMap<(String, String), u64>>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How to start an [`ApiServer`].
#[derive(Debug, Clone)]
pub struct Builder {
    addr: SocketAddr,
    without: Vec<String>,
    bookmark_interval: Duration,
    history_limit: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            addr: ([127, 0, 0, 1], 0).into(),
            without: Vec::new(),
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
        }
    }
}

impl Builder {
    /// Where to listen (default: 127.0.0.1, a free port).
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Serves without this kind, as a cluster without its CRD
    /// (`serviceexports.multicluster.x-k8s.io`).
    pub fn without(mut self, qualified: &str) -> Self {
        self.without.push(qualified.to_owned());
        self
    }

    /// How often watches that asked for bookmarks get one.
    pub fn bookmark_interval(mut self, d: Duration) -> Self {
        self.bookmark_interval = d;
        self
    }

    /// How many changes are kept for watches to resume from.
    pub fn history_limit(mut self, n: usize) -> Self {
        self.history_limit = n;
        self
    }

    /// Binds and serves on the current Tokio runtime.
    pub async fn start(self) -> anyhow::Result<ApiServer> {
        let listener = TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let mut store = Store::default();
        store.history_limit = self.history_limit;
        let inner = Arc::new(Inner {
            store: Mutex::new(store),
            catalog: Catalog {
                served: resources::ALL
                    .iter()
                    .filter(|r| !self.without.contains(&r.qualified()))
                    .copied()
                    .collect(),
            },
            faults: Mutex::default(),
            counts: Mutex::default(),
        });
        let bookmarks = tokio::spawn(http::bookmarks(
            Arc::downgrade(&inner),
            self.bookmark_interval,
        ));
        let serving = tokio::spawn(http::serve(listener, inner.clone()));
        Ok(ApiServer {
            addr,
            inner,
            serving: Mutex::new(Some(serving)),
            bookmarks,
        })
    }
}

/// A running stand-in. Dropping it stops it.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    serving: Mutex<Option<JoinHandle<()>>>,
    bookmarks: JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(h) = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
        self.bookmarks.abort();
    }
}

impl ApiServer {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A stand-in with every kind, on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        Builder::default().start().await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig with one context, `context`, for this server.
    pub fn kubeconfig(&self, context: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {context}\n  cluster:\n    server: {url}\ncontexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: {context}\n    namespace: default\ncurrent-context: {context}\nusers:\n- name: {context}\n  user:\n    token: admin\n",
            url = self.url()
        )
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `path`.
    pub fn write_kubeconfig(&self, path: &Path, context: &str) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig(context))
    }

    /// Stops serving: the listener closes and every connection (watches
    /// included) is cut, as when the API server goes down. Objects stay.
    pub async fn stop(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = serving {
            h.abort();
            // Once it is gone, so are its connections: none serves another
            // request.
            let _ = h.await;
        }
        self.inner.lock().cut_watches();
    }

    /// Serves again on the same address after [`stop`](Self::stop).
    pub async fn resume(&self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        let h = tokio::spawn(http::serve(listener, self.inner.clone()));
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(())
    }

    /// Ends every open watch (the connection closes cleanly, as after a
    /// proxy's idle timeout); clients resume from their last version.
    pub fn cut_watches(&self) {
        self.inner.lock().cut_watches();
    }

    /// Forgets the change history: watches resuming from before now get
    /// `410 Gone` and must relist.
    pub fn compact(&self) {
        self.inner.lock().compact();
    }

    /// The next `n` resource requests fail with `code` (429 comes with
    /// `Retry-After: 1`).
    pub fn fail_next(&self, n: u32, code: u16) {
        self.inner
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail_next = Some((n, code));
    }

    /// RBAC forbids `verb` (`list`, `watch`, `patch`, … or `*`) on
    /// `resource` (`services`, `serviceentries.networking.istio.io`, `*`).
    pub fn deny(&self, verb: &str, resource: &str) {
        self.inner
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .denied
            .insert((verb.to_owned(), resource.to_owned()));
    }

    /// Lifts every [`deny`](Self::deny).
    pub fn allow_all(&self) {
        self.inner
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .denied
            .clear();
    }

    /// A token TokenReview accepts.
    pub fn add_token(&self, token: &str, info: TokenInfo) {
        self.inner.lock().tokens.insert(token.to_owned(), info);
    }

    /// How many `verb` requests (`list`, `watch`, `get`, `create`,
    /// `update`, `patch`, `delete`) reached `resource` (as in
    /// [`deny`](Self::deny)).
    pub fn requests(&self, verb: &str, resource: &str) -> u64 {
        self.inner
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Requests that write (`create`, `update`, `patch`, `delete`) to
    /// `resource`, whether or not they changed anything.
    pub fn writes(&self, resource: &str) -> u64 {
        ["create", "update", "patch", "delete"]
            .iter()
            .map(|v| self.requests(v, resource))
            .sum()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().resource_version()
    }

    fn resource(&self, qualified: &str) -> anyhow::Result<Resource> {
        self.inner
            .catalog
            .served
            .iter()
            .find(|r| r.qualified() == qualified)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("the stand-in does not serve {qualified}"))
    }

    /// One object, as `kubectl get -o json` shows it.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = self.resource(resource).ok()?;
        self.inner.lock().get(&res, namespace, name).ok()
    }

    /// Every object of `resource` in every namespace.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        let Ok(res) = self.resource(resource) else {
            return Vec::new();
        };
        self.inner
            .lock()
            .list(
                &res,
                None,
                &Default::default(),
                &Default::default(),
                None,
                usize::MAX,
            )
            .0
    }

    /// How many objects of `resource` satisfy `pred` (seen without their
    /// managedFields; cheaper than [`list`](Self::list) for polling).
    pub fn count(&self, resource: &str, pred: impl Fn(&Value) -> bool) -> usize {
        let Ok(res) = self.resource(resource) else {
            return 0;
        };
        self.inner.lock().count(&res, pred)
    }

    /// Creates or replaces an object from its manifest (a test's setup,
    /// as `kubectl apply --server-side --force-conflicts` would with
    /// field manager `test`).
    pub fn put(&self, manifest: Value) -> anyhow::Result<Value> {
        let api_version = manifest["apiVersion"].as_str().unwrap_or("");
        let kind = manifest["kind"].as_str().unwrap_or("");
        let res = self
            .inner
            .catalog
            .served
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("the stand-in does not serve {api_version} {kind}"))?;
        let ns = manifest["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let name = manifest["metadata"]["name"].as_str().unwrap_or("");
        let ctx = WriteCtx {
            manager: "test".into(),
            dry_run: false,
        };
        let mut store = self.inner.lock();
        let mut out = store
            .apply(&res, ns, name, &manifest, false, true, &ctx)
            .map_err(|e| anyhow::anyhow!(e.message))?;
        if res.status && manifest.get("status").is_some() {
            out = store
                .apply(&res, ns, name, &manifest, true, true, &ctx)
                .map_err(|e| anyhow::anyhow!(e.message))?;
        }
        Ok(out)
    }

    /// Deletes an object; whether it existed.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let Ok(res) = self.resource(resource) else {
            return false;
        };
        let ctx = WriteCtx {
            manager: "test".into(),
            dry_run: false,
        };
        self.inner
            .lock()
            .delete(&res, namespace, name, &ctx)
            .is_ok()
    }
}
