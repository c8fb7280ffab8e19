//! Process signals: the first SIGTERM or SIGINT starts a drain, a second
//! one ends the process at once (istio/ztunnel's order, without a grace
//! period of our own racing Kubernetes').

use std::time::Duration;

use tracing::{info, warn};

use crate::drain::{DrainOutcome, DrainTrigger};

/// Resolves with the name of the first SIGTERM or SIGINT received.
pub async fn shutdown_requested() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}

/// Resolves with why the process should stop: the first SIGTERM/SIGINT,
/// or a `/quitquitquit` request arriving on `quit`.
pub async fn stop_requested(quit: &mut tokio::sync::mpsc::Receiver<String>) -> String {
    tokio::select! {
        s = shutdown_requested() => s.to_owned(),
        q = quit.recv() => q.unwrap_or_else(|| "admin".into()),
    }
}

/// The drain deadline: Kubernetes' `terminationGracePeriodSeconds` less a
/// margin, so the last seconds can close what is left before SIGKILL
/// (5 s, or 1 s for periods under 10 s). Without a grace period, 30 s.
pub fn drain_deadline(grace_period_secs: Option<u64>) -> Duration {
    match grace_period_secs {
        Some(s) if s >= 10 => Duration::from_secs(s - 5),
        Some(s) if s >= 2 => Duration::from_secs(s - 1),
        Some(_) => Duration::from_secs(1),
        None => Duration::from_secs(30),
    }
}

/// Drains when `stop` resolves (a signal, `/quitquitquit`, a test). A
/// second signal during the drain exits the process with status 1.
pub async fn drain_on(
    stop: impl Future<Output = String>,
    trigger: DrainTrigger,
    deadline: Duration,
) {
    let why = stop.await;
    info!(reason = %why, deadline = ?deadline, "draining: no new connections, waiting for open ones");
    tokio::select! {
        outcome = trigger.start_drain_and_wait(deadline) => match outcome {
            DrainOutcome::Drained => info!("drained"),
            DrainOutcome::DeadlineExceeded { still_open } => {
                warn!(still_open, "drain deadline passed; closing the remaining connections")
            }
        },
        sig = shutdown_requested() => {
            warn!(signal = sig, "second signal during drain: exiting now");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_leaves_a_margin_before_sigkill() {
        assert_eq!(drain_deadline(Some(30)), Duration::from_secs(25));
        assert_eq!(drain_deadline(Some(5)), Duration::from_secs(4));
        assert_eq!(drain_deadline(Some(0)), Duration::from_secs(1));
        assert_eq!(drain_deadline(None), Duration::from_secs(30));
    }
}
