//! Where a controller reads its cluster from, behind one watch-style
//! interface modelled on kube-rs's watcher: an initial list
//! (`Init`, `InitApply`…, `InitDone`), then changes (`Apply`, `Delete`),
//! and from time to time a full resync (another `Init`…`InitDone`).
//!
//! [`Store`] applies the events. A list is applied sync-then-swap: the new
//! set is built aside and replaces the old one whole at `InitDone`, so
//! consumers never see a half-listed cluster (never remove-then-add), and
//! objects missing from a resync are garbage: `Delete` events lost while a
//! watch was down do not leave stale objects behind.

pub mod files;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::objects::{Object, ObjectKey};

/// One event from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A full list starts.
    Init,
    /// An object of the list in progress.
    InitApply(Arc<Object>),
    /// The list is complete.
    InitDone,
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
    listing: Option<Objects>,
    tx: watch::Sender<Arc<Objects>>,
    /// Whether a first list has completed.
    ready: bool,
}

impl Store {
    /// A store and the receiver consumers watch. The receiver sees the
    /// first state only after the first complete list.
    pub fn new() -> (Self, watch::Receiver<Arc<Objects>>) {
        let (tx, rx) = watch::channel(Arc::new(Objects::new()));
        (
            Self {
                current: Objects::new(),
                listing: None,
                tx,
                ready: false,
            },
            rx,
        )
    }

    /// Applies one event; publishes when the visible state changed.
    pub fn apply(&mut self, event: Event) {
        self.apply_batch([event]);
    }

    /// Applies events in order and publishes once at the end if the
    /// visible state changed: a file of 10,000 services edited is 30,000
    /// events, and publishing copies the whole state.
    pub fn apply_batch(&mut self, events: impl IntoIterator<Item = Event>) {
        let mut changed = false;
        for event in events {
            changed |= self.apply_quietly(event);
        }
        if changed && self.ready {
            self.publish();
        }
    }

    /// Applies one event; whether the visible state changed.
    fn apply_quietly(&mut self, event: Event) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(Objects::new());
                false
            }
            Event::InitApply(o) => {
                self.listing
                    .get_or_insert_with(Objects::new)
                    .insert(o.key.clone(), o);
                false
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = !self.ready || listed != self.current;
                self.current = listed;
                self.ready = true;
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
        Arc::new(Object {
            key: ObjectKey {
                kind: Kind::ServiceExport,
                namespace: "ns".into(),
                name: name.into(),
            },
            created: String::new(),
            labels: Default::default(),
            body: Body::ServiceExport,
        })
    }

    #[test]
    fn a_batch_of_changes_is_published_whole() {
        let (mut store, mut rx) = Store::new();
        store.apply_batch([Event::Init, Event::InitApply(obj("a")), Event::InitDone]);
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
        let (mut store, rx) = Store::new();
        store.apply(Event::Init);
        store.apply(Event::InitApply(obj("a")));
        // Nothing visible mid-list.
        assert!(rx.borrow().is_empty());
        store.apply(Event::InitApply(obj("b")));
        store.apply(Event::InitDone);
        assert_eq!(rx.borrow().len(), 2);

        // A resync that no longer lists "a": the old state stays visible
        // until the list is done, then "a" is gone.
        store.apply(Event::Init);
        store.apply(Event::InitApply(obj("b")));
        assert_eq!(rx.borrow().len(), 2);
        store.apply(Event::InitDone);
        let names: Vec<_> = rx.borrow().keys().map(|k| k.name.clone()).collect();
        assert_eq!(names, ["b"]);

        store.apply(Event::Apply(obj("c")));
        store.apply(Event::Delete(obj("b").key.clone()));
        let names: Vec<_> = rx.borrow().keys().map(|k| k.name.clone()).collect();
        assert_eq!(names, ["c"]);
    }
}
