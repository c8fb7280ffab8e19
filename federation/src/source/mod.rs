//! Where a controller reads its cluster from, behind one watch-style
//! interface modelled on kube-rs's watcher, **per kind**: for each kind
//! an initial list (`Init(kind)`, `InitApply`…, `InitDone(kind)`), then
//! changes (`Apply`, `Delete`), and from time to time a relist of a kind.
//! A Kubernetes source runs one watcher per resource type (per namespace
//! when limited to some: a [`Scope`]), each relisting on its own (after a
//! 410 Gone, say); a relist replaces that scope only.
//!
//! [`Store`] applies the events. A list is applied sync-then-swap: the new
//! set of that kind is built aside and replaces the old one whole at
//! `InitDone`, so consumers never see a half-listed kind (never
//! remove-then-add), and objects missing from a relist are garbage:
//! `Delete` events lost while a watch was down do not leave stale objects
//! behind. Nothing is published before every kind the source reads has
//! listed once.
//!
//! Sources live beside this file (`files.rs`, `kube.rs`); the controller picks one
//! from its config's `source` section.

pub mod files;
pub mod kube;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::watch;

use crate::objects::{Kind, Object, ObjectKey};

/// What one list covers: a kind, in every namespace or in one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub kind: Kind,
    pub namespace: Option<String>,
}

impl From<Kind> for Scope {
    fn from(kind: Kind) -> Self {
        Self {
            kind,
            namespace: None,
        }
    }
}

impl Scope {
    /// Whether an object with `key` belongs to this scope.
    fn covers(&self, key: &ObjectKey) -> bool {
        key.kind == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{:?}/{ns}", self.kind),
            None => write!(f, "{:?}", self.kind),
        }
    }
}

/// One event from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A full list of one scope starts.
    Init(Scope),
    /// An object of a list in progress (of its own scope).
    InitApply(Arc<Object>),
    /// The list of this scope is complete: it replaces every object of
    /// the scope; others are untouched.
    InitDone(Scope),
    /// An object was created or changed.
    Apply(Arc<Object>),
    /// An object was deleted.
    Delete(ObjectKey),
}

/// The objects of one cluster, as of the last event.
pub type Objects = BTreeMap<ObjectKey, Arc<Object>>;

/// Applies a source's events and publishes the result.
#[derive(Debug)]
pub struct Store {
    current: Objects,
    /// Lists in progress, by scope.
    listing: BTreeMap<Scope, Objects>,
    /// Scopes whose first list has not completed yet.
    unlisted: BTreeSet<Scope>,
    tx: watch::Sender<Arc<Objects>>,
}

impl Store {
    /// A store for a source that reads `scopes`, and the receiver
    /// consumers watch. The receiver sees the first state only after each
    /// of `scopes` has completed a list.
    pub fn new(scopes: impl IntoIterator<Item = Scope>) -> (Self, watch::Receiver<Arc<Objects>>) {
        let (tx, rx) = watch::channel(Arc::new(Objects::new()));
        (
            Self {
                current: Objects::new(),
                listing: BTreeMap::new(),
                unlisted: scopes.into_iter().collect(),
                tx,
            },
            rx,
        )
    }

    /// Whether every kind has listed once.
    fn ready(&self) -> bool {
        self.unlisted.is_empty()
    }

    /// Applies one event; publishes when the visible state changed.
    pub fn apply(&mut self, event: Event) {
        self.apply_batch([event]);
    }

    /// Applies events in order and publishes once at the end if the
    /// visible state changed: a file of 10,000 services edited is 30,000
    /// events, and publishing copies the whole state.
    pub fn apply_batch(&mut self, events: impl IntoIterator<Item = Event>) {
        let was_ready = self.ready();
        let mut changed = false;
        for event in events {
            changed |= self.apply_quietly(event);
        }
        if self.ready() && (changed || !was_ready) {
            self.publish();
        }
    }

    /// Applies one event; whether the visible state changed.
    fn apply_quietly(&mut self, event: Event) -> bool {
        match event {
            Event::Init(scope) => {
                self.listing.insert(scope, Objects::new());
                false
            }
            Event::InitApply(o) => {
                if let Some(l) = self
                    .listing
                    .iter_mut()
                    .find_map(|(s, l)| s.covers(&o.key).then_some(l))
                {
                    l.insert(o.key.clone(), o);
                }
                false
            }
            Event::InitDone(scope) => {
                let listed = self.listing.remove(&scope).unwrap_or_default();
                self.unlisted.remove(&scope);
                let mut changed = false;
                self.current.retain(|k, v| {
                    let keep = !scope.covers(k) || listed.get(k) == Some(v);
                    changed |= !keep;
                    keep
                });
                for (k, o) in listed {
                    if let std::collections::btree_map::Entry::Vacant(e) = self.current.entry(k) {
                        e.insert(o);
                        changed = true;
                    }
                }
                changed
            }
            Event::Apply(o) => {
                if self.current.get(&o.key) == Some(&o) {
                    return false;
                }
                self.current.insert(o.key.clone(), o);
                true
            }
            Event::Delete(key) => self.current.remove(&key).is_some(),
        }
    }

    fn publish(&self) {
        self.tx.send_replace(Arc::new(self.current.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Body, Kind};

    fn obj(name: &str) -> Arc<Object> {
        of(Kind::ServiceExport, name)
    }

    fn of(kind: Kind, name: &str) -> Arc<Object> {
        Arc::new(Object {
            key: ObjectKey {
                kind,
                namespace: "ns".into(),
                name: name.into(),
            },
            created: String::new(),
            labels: Default::default(),
            body: Body::ServiceExport { generation: 1 },
        })
    }

    const SE: Kind = Kind::ServiceExport;

    #[test]
    fn a_batch_of_changes_is_published_whole() {
        let (mut store, mut rx) = Store::new([SE.into()]);
        store.apply_batch([
            Event::Init(SE.into()),
            Event::InitApply(obj("a")),
            Event::InitDone(SE.into()),
        ]);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        // Changes in one batch: one publication with all of them.
        store.apply_batch([
            Event::Apply(obj("b")),
            Event::Apply(obj("c")),
            Event::Delete(obj("a").key.clone()),
        ]);
        assert!(rx.has_changed().unwrap());
        let names: Vec<_> = rx
            .borrow_and_update()
            .keys()
            .map(|k| k.name.clone())
            .collect();
        assert_eq!(names, ["b", "c"]);
        // A batch that changes nothing publishes nothing.
        store.apply_batch([Event::Apply(obj("b")), Event::Delete(obj("zz").key.clone())]);
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn a_resync_swaps_whole_and_drops_what_it_no_longer_lists() {
        let (mut store, rx) = Store::new([SE.into()]);
        store.apply(Event::Init(SE.into()));
        store.apply(Event::InitApply(obj("a")));
        // Nothing visible mid-list.
        assert!(rx.borrow().is_empty());
        store.apply(Event::InitApply(obj("b")));
        store.apply(Event::InitDone(SE.into()));
        assert_eq!(rx.borrow().len(), 2);

        // A resync that no longer lists "a": the old state stays visible
        // until the list is done, then "a" is gone.
        store.apply(Event::Init(SE.into()));
        store.apply(Event::InitApply(obj("b")));
        assert_eq!(rx.borrow().len(), 2);
        store.apply(Event::InitDone(SE.into()));
        let names: Vec<_> = rx.borrow().keys().map(|k| k.name.clone()).collect();
        assert_eq!(names, ["b"]);

        store.apply(Event::Apply(obj("c")));
        store.apply(Event::Delete(obj("b").key.clone()));
        let names: Vec<_> = rx.borrow().keys().map(|k| k.name.clone()).collect();
        assert_eq!(names, ["c"]);
    }

    #[test]
    fn a_relist_of_one_kind_replaces_that_kind_only_and_nothing_shows_before_every_kind_listed() {
        let (svc, pol) = (Kind::Service, Kind::AuthorizationPolicy);
        let (mut store, mut rx) = Store::new([svc.into(), pol.into()]);
        store.apply_batch([
            Event::Init(svc.into()),
            Event::InitApply(of(svc, "web")),
            Event::InitDone(svc.into()),
        ]);
        assert!(
            !rx.has_changed().unwrap(),
            "policies not listed yet: publishing now would enforce no policy"
        );
        store.apply_batch([
            Event::Init(pol.into()),
            Event::InitApply(of(pol, "deny")),
            Event::InitDone(pol.into()),
        ]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 2);
        // The Service watcher relists (after a 410 Gone, say) with a new
        // service: the policy stays.
        store.apply_batch([
            Event::Init(svc.into()),
            Event::InitApply(of(svc, "api")),
            Event::InitDone(svc.into()),
        ]);
        let names: Vec<_> = rx
            .borrow_and_update()
            .keys()
            .map(|k| (k.kind, k.name.clone()))
            .collect();
        assert_eq!(names, [(svc, "api".into()), (pol, "deny".into())]);
        // An identical relist publishes nothing.
        store.apply_batch([
            Event::Init(pol.into()),
            Event::InitApply(of(pol, "deny")),
            Event::InitDone(pol.into()),
        ]);
        assert!(!rx.has_changed().unwrap());
    }
}
