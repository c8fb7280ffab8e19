//! Process signals: the first SIGTERM or SIGINT starts a drain, a second
//! one ends the process at once (istio/ztunnel's order, without a grace
//! period of our own racing Kubernetes').

use std::time::Duration;

use tracing::warn;

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

/// The drain deadline for this process, from the environment's
/// `TERMINATION_GRACE_PERIOD_SECONDS` (the pod's
/// `terminationGracePeriodSeconds`, when a manifest passes it), as
/// [`drain_deadline`] reads it.
pub fn drain_deadline_from_env() -> Duration {
    let grace = std::env::var("TERMINATION_GRACE_PERIOD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok());
    drain_deadline(grace)
}

/// Runs `drain` (a component's shutdown) to completion, unless another
/// SIGTERM/SIGINT arrives first: then the process exits at once with
/// status 1 (the operator's "stop now").
pub async fn second_signal_exits<F: Future>(drain: F) -> F::Output {
    tokio::select! {
        out = drain => out,
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
