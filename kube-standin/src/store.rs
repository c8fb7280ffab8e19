//! The stand-in's state: objects with one global resourceVersion counter
//! (as etcd's revision), a bounded history of changes for watches to
//! resume from, and the watches themselves. Every operation takes the
//! one lock, so a watch registered after a list never misses a change.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::fields::{self, Path, Scope};
use crate::resources::Resource;
use crate::selector::{FieldSelector, LabelSelector};

/// An API error, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn not_found(res: &Resource, name: &str) -> Self {
        Self {
            details: json!({"name": name, "group": res.group, "kind": res.plural}),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", res.qualified()),
            )
        }
    }

    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if !self.details.is_null() {
            s["details"] = self.details.clone();
        }
        s
    }
}

/// Who owns which fields of an object.
#[derive(Debug, Clone, PartialEq)]
struct Managed {
    manager: String,
    /// `Apply` or `Update`.
    operation: &'static str,
    subresource: &'static str,
    api_version: String,
    time: String,
    fields: BTreeSet<Path>,
}

#[derive(Debug, Clone)]
struct Stored {
    /// The object without `managedFields`.
    obj: Value,
    managed: Vec<Managed>,
}

impl Stored {
    /// The object as the API returns it.
    fn render(&self) -> Value {
        let mut o = self.obj.clone();
        if !self.managed.is_empty() {
            let mf: Vec<Value> = self
                .managed
                .iter()
                .map(|m| {
                    let mut e = json!({
                        "manager": m.manager, "operation": m.operation,
                        "apiVersion": m.api_version, "time": m.time,
                        "fieldsType": "FieldsV1", "fieldsV1": fields::to_fields_v1(&m.fields),
                    });
                    if !m.subresource.is_empty() {
                        e["subresource"] = json!(m.subresource);
                    }
                    e
                })
                .collect();
            o["metadata"]["managedFields"] = Value::Array(mf);
        }
        o
    }
}

/// A change, kept for watches to resume from.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    res: String,
    namespace: String,
    old: Option<Value>,
    new: Option<Value>,
}

/// What a watch asked for.
#[derive(Debug, Clone)]
pub struct WatchFilter {
    /// Metadata only (`as=PartialObjectMetadata`).
    pub meta_only: bool,
    pub res: String,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The watch event for a change, if this watch sees it.
    fn event(&self, c: &Change) -> Option<Value> {
        if c.res != self.res || self.namespace.as_ref().is_some_and(|n| *n != c.namespace) {
            return None;
        }
        let was = c.old.as_ref().filter(|o| self.matches(o));
        let is = c.new.as_ref().filter(|o| self.matches(o));
        let (kind, obj) = match (was, is, &c.new) {
            (None, Some(n), _) => ("ADDED", n),
            (Some(_), Some(n), _) => ("MODIFIED", n),
            // No longer selected: gone, as far as this watch knows.
            (Some(_), None, Some(n)) => ("DELETED", n),
            (Some(o), None, None) => ("DELETED", o),
            (None, None, _) => return None,
        };
        let obj = if self.meta_only {
            metadata_only(obj)
        } else {
            obj.clone()
        };
        Some(json!({"type": kind, "object": obj}))
    }
}

#[derive(Debug)]
struct Watch {
    filter: WatchFilter,
    /// The (kind, apiVersion) of bookmarks, if the watch asked for them.
    bookmarks: Option<(&'static str, String)>,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// A token the TokenReview API knows.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub audiences: Vec<String>,
}

/// Object key: (qualified resource, namespace, name).
type Key = (String, String, String);

#[derive(Debug)]
pub struct Store {
    objects: BTreeMap<Key, Stored>,
    rv: u64,
    history: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    floor: u64,
    pub history_limit: usize,
    watches: Vec<Watch>,
    pub tokens: BTreeMap<String, TokenInfo>,
}

/// How a write is made.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    pub manager: String,
    pub dry_run: bool,
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Everything but metadata and status: what `generation` counts.
fn spec_part(o: &Value) -> Value {
    let mut v = o.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

impl Default for Store {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            floor: 1,
            history_limit: 10_000,
            watches: Vec::new(),
            tokens: BTreeMap::new(),
        }
    }
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn key(res: &Resource, ns: &str, name: &str) -> Key {
        (
            res.qualified(),
            if res.namespaced { ns } else { "" }.to_owned(),
            name.to_owned(),
        )
    }

    /// The stored object a write starts from.
    fn existing(&self, res: &Resource, ns: &str, name: &str) -> Result<Stored, ApiError> {
        self.objects
            .get(&Self::key(res, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    pub fn get(&self, res: &Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(res, ns, name))
            .map(Stored::render)
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Objects of `res` (in `ns`, or every namespace), sorted by
    /// namespace and name, after `after` (a continue position).
    pub fn list(
        &self,
        res: &Resource,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        after: Option<&(String, String)>,
        limit: usize,
    ) -> (Vec<Value>, Option<(String, String)>) {
        let q = res.qualified();
        let start = after
            .map(|(n, m)| (q.clone(), n.clone(), m.clone()))
            .unwrap_or((q.clone(), String::new(), String::new()));
        let mut out = Vec::new();
        let mut last = None;
        for ((r, n, m), s) in self.objects.range(start.clone()..) {
            if *r != q {
                break;
            }
            if after.is_some() && (r, n, m) == (&start.0, &start.1, &start.2) {
                continue;
            }
            if ns.is_some_and(|ns| ns != n) {
                continue;
            }
            if !labels.matches(&s.obj) || !fields.matches(&s.obj) {
                continue;
            }
            if out.len() == limit {
                return (out, last);
            }
            out.push(s.render());
            last = Some((n.clone(), m.clone()));
        }
        (out, None)
    }

    /// How many objects of `res` satisfy `pred`.
    pub fn count(&self, res: &Resource, pred: impl Fn(&Value) -> bool) -> usize {
        let q = res.qualified();
        self.objects
            .range((q.clone(), String::new(), String::new())..)
            .take_while(|((r, _, _), _)| *r == q)
            .filter(|(_, s)| pred(&s.obj))
            .count()
    }

    /// Whether a list or watch may start from `rv`.
    pub fn check_not_compacted(&self, rv: u64) -> Result<(), ApiError> {
        if rv < self.floor {
            Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {rv} ({})", self.floor),
            ))
        } else {
            Ok(())
        }
    }

    /// Registers a watch from `rv` (`None`: now, with a synthetic ADDED
    /// for each existing object). Returns the receiver of its lines.
    pub fn watch(
        &mut self,
        filter: WatchFilter,
        res: &Resource,
        rv: Option<u64>,
        bookmarks: bool,
    ) -> Result<mpsc::UnboundedReceiver<Bytes>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        match rv {
            Some(rv) => {
                self.check_not_compacted(rv)?;
                for c in self.history.iter().filter(|c| c.rv > rv) {
                    if let Some(e) = filter.event(c) {
                        let _ = tx.send(line(&e));
                    }
                }
            }
            None => {
                let (objs, _) = self.list(
                    res,
                    filter.namespace.as_deref(),
                    &filter.labels,
                    &filter.fields,
                    None,
                    usize::MAX,
                );
                for o in objs {
                    let o = if filter.meta_only {
                        metadata_only(&o)
                    } else {
                        o
                    };
                    let _ = tx.send(line(&json!({"type": "ADDED", "object": o})));
                }
            }
        }
        self.watches.push(Watch {
            filter,
            bookmarks: bookmarks.then(|| (res.kind, res.api_version())),
            tx,
        });
        Ok(rx)
    }

    /// Sends a bookmark (the current resourceVersion) to every watch that
    /// asked for them. It goes through the watch's queue, behind every
    /// event it covers, so a client that resumes from it loses nothing.
    pub fn send_bookmarks(&mut self) {
        let rv = self.rv.to_string();
        self.watches.retain(|w| {
            let Some((kind, api_version)) = &w.bookmarks else {
                return !w.tx.is_closed();
            };
            let b = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": rv}}});
            w.tx.send(line(&b)).is_ok()
        });
    }

    /// Ends every watch (as an API server restart or a load balancer
    /// timeout does).
    pub fn cut_watches(&mut self) {
        self.watches.clear();
    }

    /// Drops the change history: every watch or continue from an earlier
    /// resourceVersion gets 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    fn record(&mut self, res: &Resource, ns: &str, old: Option<Value>, new: Option<Value>) {
        let c = Change {
            rv: self.rv,
            res: res.qualified(),
            namespace: ns.to_owned(),
            old,
            new,
        };
        self.watches.retain(|w| match w.filter.event(&c) {
            Some(e) => w.tx.send(line(&e)).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.history.push_back(c);
        while self.history.len() > self.history_limit {
            if let Some(c) = self.history.pop_front() {
                self.floor = c.rv;
            }
        }
    }

    /// Stores `obj` (new or changed) and tells the watches; a write that
    /// changes nothing is not made (no new resourceVersion, no event).
    fn commit(
        &mut self,
        res: &Resource,
        mut stored: Stored,
        old: Option<&Stored>,
        ctx: &WriteCtx,
    ) -> Value {
        if let Some(old) = old
            && old.obj == stored.obj
            && old
                .managed
                .iter()
                .map(|m| (&m.manager, &m.fields))
                .eq(stored.managed.iter().map(|m| (&m.manager, &m.fields)))
        {
            return old.render();
        }
        if let Some(old) = old {
            let gen_ = old.obj["metadata"]["generation"].as_u64().unwrap_or(1);
            let bumped = spec_part(&old.obj) != spec_part(&stored.obj);
            stored.obj["metadata"]["generation"] = json!(if bumped { gen_ + 1 } else { gen_ });
        }
        if ctx.dry_run {
            return stored.render();
        }
        self.rv += 1;
        stored.obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let ns = stored.obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = stored.obj["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let rendered = stored.render();
        let old_rendered = old.map(Stored::render);
        self.objects
            .insert(Self::key(res, &ns, &name), stored.clone());
        self.record(res, &ns, old_rendered, Some(rendered.clone()));
        rendered
    }

    /// Fills the metadata the server owns for a new object.
    fn new_meta(res: &Resource, ns: &str, name: &str, obj: &mut Value) {
        let m = obj
            .as_object_mut()
            .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
        if let Some(Value::Object(m)) = m {
            m.insert("name".into(), json!(name));
            if res.namespaced {
                m.insert("namespace".into(), json!(ns));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(uid()));
            m.insert("creationTimestamp".into(), json!(now_rfc3339()));
            m.insert("generation".into(), json!(1));
            m.remove("resourceVersion");
            m.remove("managedFields");
            m.remove("deletionTimestamp");
        }
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind);
    }

    fn scope(res: &Resource, status: bool) -> Scope {
        if status {
            Scope::Status
        } else {
            Scope::Main {
                status_subresource: res.status,
            }
        }
    }

    /// Gives `manager` (an Update) the fields that changed from `old` to
    /// `new`, taking them from anyone else.
    fn take_changed(
        managed: &mut Vec<Managed>,
        old: &Value,
        new: &Value,
        res: &Resource,
        scope: Scope,
        manager: &str,
    ) {
        let changed = fields::changed(old, new, scope);
        if changed.is_empty() {
            return;
        }
        for m in managed.iter_mut() {
            m.fields.retain(|p| !changed.contains(p));
        }
        let present: BTreeSet<Path> = changed
            .into_iter()
            .filter(|p| fields::get(new, p).is_some())
            .collect();
        let sub = if scope == Scope::Status { "status" } else { "" };
        match managed
            .iter_mut()
            .find(|m| m.manager == manager && m.operation == "Update" && m.subresource == sub)
        {
            Some(m) => {
                m.fields.extend(present);
                m.time = now_rfc3339();
            }
            None if !present.is_empty() => managed.push(Managed {
                manager: manager.to_owned(),
                operation: "Update",
                subresource: sub,
                api_version: res.api_version(),
                time: now_rfc3339(),
                fields: present,
            }),
            None => {}
        }
        managed.retain(|m| !m.fields.is_empty());
    }

    pub fn create(
        &mut self,
        res: &Resource,
        ns: &str,
        mut obj: Value,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("{} is invalid: metadata.name: Required value", res.kind),
                )
            })?
            .to_owned();
        check_name(res, &name)?;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .filter(|_| ns.is_empty())
            .unwrap_or(ns)
            .to_owned();
        if self.objects.contains_key(&Self::key(res, &ns, &name)) {
            return Err(ApiError {
                details: json!({"name": name, "group": res.group, "kind": res.plural}),
                ..ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", res.qualified()),
                )
            });
        }
        Self::new_meta(res, &ns, &name, &mut obj);
        let mut managed = Vec::new();
        Self::take_changed(
            &mut managed,
            &json!({}),
            &obj,
            res,
            Self::scope(res, false),
            &ctx.manager,
        );
        Ok(self.commit(res, Stored { obj, managed }, None, ctx))
    }

    /// PUT: replaces the object (or its status), with optimistic
    /// concurrency when the body carries a resourceVersion.
    pub fn replace(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        obj: Value,
        status: bool,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let old = self.existing(res, ns, name)?;
        check_resource_version(res, name, &obj, &old.obj)?;
        self.replace_checked(res, name, old, obj, status, ctx)
    }

    /// The object after a write of `new` in the given scope: the server's
    /// metadata kept, the status (or everything but it) from `old`.
    fn scoped_replace(res: &Resource, old: &Value, new: &mut Value, status: bool) -> Value {
        let mut out = if status { old.clone() } else { new.clone() };
        if status {
            match new.get("status") {
                Some(s) => out["status"] = s.clone(),
                None => {
                    if let Some(m) = out.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            return out;
        }
        // The server's metadata stays; labels and annotations are the
        // writer's.
        let mut meta = old["metadata"].clone();
        for f in ["labels", "annotations", "finalizers", "ownerReferences"] {
            match new["metadata"].get(f) {
                Some(v) => meta[f] = v.clone(),
                None => {
                    if let Some(m) = meta.as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        out["metadata"] = meta;
        out["apiVersion"] = json!(res.api_version());
        out["kind"] = json!(res.kind);
        if res.status {
            match old.get("status") {
                Some(s) => out["status"] = s.clone(),
                None => {
                    if let Some(m) = out.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        out
    }

    /// A JSON merge patch (RFC 7386); strategic merge patches are read
    /// the same way (see the behaviour table).
    pub fn merge_patch(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        patch: &Value,
        status: bool,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let old = self.existing(res, ns, name)?;
        check_resource_version(res, name, patch, &old.obj)?;
        let mut new = old.obj.clone();
        json_merge(&mut new, patch);
        self.replace_checked(res, name, old, new, status, ctx)
    }

    /// A JSON patch (RFC 6902): add, remove, replace, test.
    pub fn json_patch(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        ops: &Value,
        status: bool,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let old = self.existing(res, ns, name)?;
        let mut new = old.obj.clone();
        for op in ops.as_array().ok_or_else(|| {
            ApiError::new(400, "BadRequest", "a JSON patch is a list of operations")
        })? {
            apply_json_op(&mut new, op)
                .map_err(|e| ApiError::new(422, "Invalid", format!("JSON patch: {e}")))?;
        }
        self.replace_checked(res, name, old, new, status, ctx)
    }

    fn replace_checked(
        &mut self,
        res: &Resource,
        name: &str,
        old: Stored,
        mut new: Value,
        status: bool,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        if new["metadata"]["name"].as_str() != Some(name) {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"{name}\" is invalid: metadata.name: field is immutable",
                    res.kind
                ),
            ));
        }
        let merged = Self::scoped_replace(res, &old.obj, &mut new, status);
        let mut managed = old.managed.clone();
        Self::take_changed(
            &mut managed,
            &old.obj,
            &merged,
            res,
            Self::scope(res, status),
            &ctx.manager,
        );
        Ok(self.commit(
            res,
            Stored {
                obj: merged,
                managed,
            },
            Some(&old),
            ctx,
        ))
    }

    /// Server-side apply of `applied` by `ctx.manager`: creates the object
    /// if needed; a field another manager owns with a different value is
    /// a conflict (409) unless `force`; fields the manager applied before
    /// and no longer applies are removed unless someone else owns them.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        applied: &Value,
        status: bool,
        force: bool,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        if ctx.manager.is_empty() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "PATCH with application/apply-patch+yaml requires fieldManager to be set",
            ));
        }
        if applied["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n != name)
        {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            ));
        }
        if !res
            .api_version()
            .eq(applied["apiVersion"].as_str().unwrap_or(""))
            || applied["kind"].as_str() != Some(res.kind)
        {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!(
                    "an applied object must have apiVersion {} and kind {}",
                    res.api_version(),
                    res.kind
                ),
            ));
        }
        check_name(res, name)?;
        let scope = Self::scope(res, status);
        let sub = if status { "status" } else { "" };
        let key = Self::key(res, ns, name);
        let old = self.objects.get(&key).cloned();
        let (mut obj, mut managed) = match &old {
            Some(s) => (s.obj.clone(), s.managed.clone()),
            None => {
                let mut o = json!({});
                Self::new_meta(res, ns, name, &mut o);
                (o, Vec::new())
            }
        };
        let new_fields = fields::leaves(applied, scope);
        let mut conflicts = Vec::new();
        for m in &managed {
            if m.manager == ctx.manager && m.operation == "Apply" {
                continue;
            }
            for p in m.fields.intersection(&new_fields) {
                if fields::get(&obj, p) != fields::get(applied, p) {
                    conflicts.push((m.manager.clone(), p.clone()));
                }
            }
        }
        if !conflicts.is_empty() {
            if !force {
                let causes: Vec<Value> = conflicts
                    .iter()
                    .map(|(m, p)| {
                        json!({"type": "FieldManagerConflict",
                               "message": format!("conflict with \"{m}\""),
                               "field": format!(".{}", p.join("."))})
                    })
                    .collect();
                let list: Vec<String> = conflicts
                    .iter()
                    .map(|(m, p)| format!("- conflict with \"{m}\": .{}", p.join(".")))
                    .collect();
                return Err(ApiError {
                    details: json!({"name": name, "group": res.group, "kind": res.plural, "causes": causes}),
                    ..ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Apply failed with {} conflict{}: {}",
                            conflicts.len(),
                            if conflicts.len() == 1 { "" } else { "s" },
                            list.join("\n")
                        ),
                    )
                });
            }
            let taken: BTreeSet<&Path> = conflicts.iter().map(|(_, p)| p).collect();
            for m in managed.iter_mut() {
                if !(m.manager == ctx.manager && m.operation == "Apply") {
                    m.fields.retain(|p| !taken.contains(p));
                }
            }
        }
        // What this manager applied before and no longer does goes,
        // unless another manager owns it too.
        let previous: BTreeSet<Path> = managed
            .iter()
            .find(|m| m.manager == ctx.manager && m.operation == "Apply" && m.subresource == sub)
            .map(|m| m.fields.clone())
            .unwrap_or_default();
        for p in previous.difference(&new_fields) {
            let owned_elsewhere = managed.iter().any(|m| {
                !(m.manager == ctx.manager && m.operation == "Apply") && m.fields.contains(p)
            });
            if !owned_elsewhere {
                fields::remove(&mut obj, p);
            }
        }
        fields::merge(&mut obj, applied, scope);
        managed.retain(|m| {
            !(m.manager == ctx.manager && m.operation == "Apply" && m.subresource == sub)
        });
        // Fields set by this apply that were this manager's by Update
        // become its by Apply.
        for m in managed.iter_mut() {
            if m.manager == ctx.manager {
                m.fields.retain(|p| !new_fields.contains(p));
            }
        }
        managed.retain(|m| !m.fields.is_empty());
        let time = old
            .as_ref()
            .and_then(|o| {
                o.managed
                    .iter()
                    .find(|m| {
                        m.manager == ctx.manager && m.operation == "Apply" && m.fields == new_fields
                    })
                    .map(|m| m.time.clone())
            })
            .unwrap_or_else(now_rfc3339);
        if !new_fields.is_empty() {
            managed.push(Managed {
                manager: ctx.manager.clone(),
                operation: "Apply",
                subresource: sub,
                api_version: res.api_version(),
                time,
                fields: new_fields,
            });
        }
        Ok(self.commit(res, Stored { obj, managed }, old.as_ref(), ctx))
    }

    pub fn delete(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let key = Self::key(res, ns, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        if !ctx.dry_run {
            self.objects.remove(&key);
            self.rv += 1;
            let mut gone = old.render();
            gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            self.record(res, &key.1, Some(old.render()), None);
            // The DELETED event carries the object at its deletion.
            if let Some(c) = self.history.back_mut() {
                c.old = Some(gone);
            }
        }
        Ok(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": name, "group": res.group, "kind": res.plural, "uid": old.obj["metadata"]["uid"]},
        }))
    }
}

fn check_name(res: &Resource, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
                res.kind
            ),
        ))
    }
}

/// Optimistic concurrency: a write that names a resourceVersion applies
/// only to that version.
fn check_resource_version(
    res: &Resource,
    name: &str,
    write: &Value,
    live: &Value,
) -> Result<(), ApiError> {
    match write["metadata"]["resourceVersion"].as_str() {
        Some(rv) if rv != live["metadata"]["resourceVersion"].as_str().unwrap_or("") => {
            Err(conflict_rv(res, name))
        }
        _ => Ok(()),
    }
}

fn conflict_rv(res: &Resource, name: &str) -> ApiError {
    ApiError {
        details: json!({"name": name, "group": res.group, "kind": res.plural}),
        ..ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                res.qualified()
            ),
        )
    }
}

/// An object as `PartialObjectMetadata` (what clients asking for
/// `as=PartialObjectMetadata` get).
pub fn metadata_only(o: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]})
}

/// One watch event as a line of the stream.
pub fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

/// RFC 7386.
fn json_merge(dst: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *dst = patch.clone();
        return;
    };
    if !dst.is_object() {
        *dst = Value::Object(Map::new());
    }
    if let Some(d) = dst.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                d.remove(k);
            } else {
                json_merge(d.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn pointer_parts(p: &str) -> Vec<String> {
    p.split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn apply_json_op(doc: &mut Value, op: &Value) -> Result<(), String> {
    let kind = op["op"].as_str().ok_or("an operation without \"op\"")?;
    let path = op["path"].as_str().ok_or("an operation without \"path\"")?;
    let parts = pointer_parts(path);
    let (last, parents) = parts.split_last().ok_or("the root cannot be patched")?;
    let parent_ptr: String = parents
        .iter()
        .map(|p| format!("/{}", p.replace('~', "~0").replace('/', "~1")))
        .collect();
    if kind == "test" {
        return if doc.pointer(path) == Some(&op["value"]) {
            Ok(())
        } else {
            Err(format!("test failed at {path}"))
        };
    }
    let parent = doc
        .pointer_mut(&parent_ptr)
        .ok_or_else(|| format!("no such path {parent_ptr:?}"))?;
    match (kind, parent) {
        ("add" | "replace", Value::Object(m)) => {
            if kind == "replace" && !m.contains_key(last) {
                return Err(format!("no such path {path:?}"));
            }
            m.insert(last.clone(), op["value"].clone());
        }
        ("remove", Value::Object(m)) => {
            m.remove(last)
                .ok_or_else(|| format!("no such path {path:?}"))?;
        }
        ("add", Value::Array(a)) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| format!("bad index in {path:?}"))?
            };
            if i > a.len() {
                return Err(format!("index out of range in {path:?}"));
            }
            a.insert(i, op["value"].clone());
        }
        ("replace" | "remove", Value::Array(a)) => {
            let i = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < a.len())
                .ok_or_else(|| format!("bad index in {path:?}"))?;
            if kind == "replace" {
                a[i] = op["value"].clone();
            } else {
                a.remove(i);
            }
        }
        (k, _) => return Err(format!("unsupported operation {k:?} at {path:?}")),
    }
    Ok(())
}
