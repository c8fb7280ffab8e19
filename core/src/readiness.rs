//! Readiness from named blockers: each subsystem registers a blocker and
//! drops it when ready (listener bound, first config, certificate loaded);
//! `/healthz/ready` lists what is still pending.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Shared readiness state.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    pending: Arc<Mutex<BTreeMap<String, usize>>>,
}

/// Holds readiness back until dropped.
#[derive(Debug)]
#[must_use = "readiness is blocked only while this is held"]
pub struct BlockReady {
    ready: Ready,
    name: String,
}

impl Ready {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks readiness until the returned guard is dropped.
    pub fn register(&self, name: impl Into<String>) -> BlockReady {
        let name = name.into();
        *self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.clone())
            .or_default() += 1;
        BlockReady {
            ready: self.clone(),
            name,
        }
    }

    /// Names of the blockers still held, sorted.
    pub fn pending(&self) -> Vec<String> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        let mut map = self.ready.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_blocker_is_dropped() {
        let r = Ready::new();
        let a = r.register("listener");
        let b1 = r.register("config");
        let b2 = r.register("config");
        assert_eq!(r.pending(), vec!["config", "listener"]);
        drop(a);
        drop(b1);
        assert_eq!(r.pending(), vec!["config"]);
        assert!(!r.is_ready());
        drop(b2);
        assert!(r.is_ready());
    }
}
