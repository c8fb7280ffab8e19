//! Graceful shutdown: stop accepting, let each connection finish, force
//! the rest at a deadline.
//!
//! A [`DrainTrigger`] and any number of [`DrainWatcher`] clones. Listeners
//! stop accepting when [`DrainWatcher::signaled`] resolves; every
//! connection holds a watcher clone until it ends ([`DrainWatcher::release_after`]);
//! [`DrainTrigger::start_drain_and_wait`] returns when the last clone is
//! dropped or the deadline passes. Holding the watcher for the
//! connection's whole life (not just until the signal) is what makes open
//! connections block exit (the bug of istio/ztunnel#171).

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Starts a drain. Not cloneable: one owner decides when to shut down.
#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    holders: Weak<()>,
}

/// Observes a drain and, while alive, holds it open.
#[derive(Debug, Clone)]
pub struct DrainWatcher {
    signal: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
    _holder: Arc<()>,
}

/// Observes a drain without holding it open, and can mint a holding
/// [`DrainWatcher`] for each unit of work (one per tunnel). Long-lived
/// objects that outlive their work (a shared context, a QUIC connection
/// that peers keep alive) keep this, not a watcher, or the drain would
/// wait for them until its deadline.
#[derive(Debug, Clone)]
pub struct DrainSignal {
    signal: watch::Receiver<bool>,
    done: mpsc::WeakSender<()>,
    holder: Weak<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every watcher was released before the deadline.
    Drained,
    /// The deadline passed with this many watchers still held.
    DeadlineExceeded { still_open: usize },
}

/// A new drain pair.
pub fn new() -> (DrainTrigger, DrainWatcher) {
    let (signal, rx) = watch::channel(false);
    let (done_tx, done_rx) = mpsc::channel(1);
    let holder = Arc::new(());
    let trigger = DrainTrigger {
        signal,
        done: done_rx,
        holders: Arc::downgrade(&holder),
    };
    let watcher = DrainWatcher {
        signal: rx,
        _done: done_tx,
        _holder: holder,
    };
    (trigger, watcher)
}

impl DrainTrigger {
    /// Signals every watcher, then waits until all are dropped or
    /// `deadline` passes.
    pub async fn start_drain_and_wait(mut self, deadline: Duration) -> DrainOutcome {
        self.signal.send_replace(true);
        // recv() yields None once every Sender (one per watcher) is gone.
        match tokio::time::timeout(deadline, self.done.recv()).await {
            Ok(_) => DrainOutcome::Drained,
            Err(_) => DrainOutcome::DeadlineExceeded {
                still_open: self.holders.strong_count(),
            },
        }
    }

    /// Watchers still alive.
    pub fn open(&self) -> usize {
        self.holders.strong_count()
    }
}

impl DrainWatcher {
    /// Resolves once a drain has started.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future loses nothing, and a new call
    /// resolves at once if the drain already started.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An Err means the trigger was dropped without draining: treat as
        // a drain so nothing waits for ever.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// True once a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// A non-holding observer of this drain.
    pub fn signal(&self) -> DrainSignal {
        DrainSignal {
            signal: self.signal.clone(),
            done: self._done.downgrade(),
            holder: Arc::downgrade(&self._holder),
        }
    }

    /// Runs `fut` while holding this watcher, so the drain waits for it.
    pub async fn release_after<F: Future>(self, fut: F) -> F::Output {
        let out = fut.await;
        drop(self);
        out
    }
}

impl DrainSignal {
    /// Resolves once a drain has started.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// True once a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// A watcher that holds the drain open while alive; `None` once the
    /// drain has completed (nothing is waiting any more).
    pub fn hold(&self) -> Option<DrainWatcher> {
        Some(DrainWatcher {
            signal: self.signal.clone(),
            _done: self.done.upgrade()?,
            _holder: self.holder.upgrade()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_held_watchers_then_finishes() {
        let (trigger, watcher) = new();
        let conn = watcher.clone();
        let task = tokio::spawn(conn.release_after(async {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }));
        let w2 = watcher.clone();
        let acceptor = tokio::spawn(async move { w2.signaled().await });
        drop(watcher);
        let outcome = trigger.start_drain_and_wait(Duration::from_secs(10)).await;
        assert_eq!(outcome, DrainOutcome::Drained);
        task.await.unwrap();
        acceptor.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_does_not_hold_the_drain_but_its_holders_do() {
        let (trigger, watcher) = new();
        let signal = watcher.signal();
        let held = signal.hold().unwrap();
        drop(watcher);
        let work = tokio::spawn(held.release_after(tokio::time::sleep(Duration::from_secs(2))));
        // `signal` is still alive: it must not keep the drain open.
        let outcome = trigger.start_drain_and_wait(Duration::from_secs(10)).await;
        assert_eq!(outcome, DrainOutcome::Drained);
        work.await.unwrap();
        assert!(signal.is_draining());
        assert!(
            signal.hold().is_none(),
            "no holder can be minted after the drain completed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_forces_an_end_and_counts_stragglers() {
        let (trigger, watcher) = new();
        let stuck = watcher.clone();
        let _t = tokio::spawn(stuck.release_after(futures::future::pending::<()>()));
        drop(watcher);
        let outcome = trigger.start_drain_and_wait(Duration::from_secs(5)).await;
        assert_eq!(outcome, DrainOutcome::DeadlineExceeded { still_open: 1 });
    }
}
