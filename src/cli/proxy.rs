//! `isthmus proxy`: the sidecar beside one workload. The work is
//! [`isthmus_proxy::run`], shared with the sidecar-only `isthmus-proxy`
//! binary.

use std::path::PathBuf;

use clap::Args;
use isthmus_core::telemetry::LogControl;

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Sidecar config file (kind: Proxy).
    #[arg(long)]
    pub config: PathBuf,
    /// Worker threads of the data plane. One, like Linkerd's proxy: a
    /// sidecar serves one pod, and on a busy node a second thread mostly
    /// adds cross-thread wake-ups (BENCHMARKS.md). Raise it for pods
    /// that need more than one core of proxying.
    #[arg(long, env = "ISTHMUS_PROXY_WORKERS", default_value_t = 1)]
    pub workers: usize,
}

pub fn run(args: ProxyArgs, logs: Option<LogControl>) -> anyhow::Result<()> {
    isthmus_proxy::run::run(&args.config, args.workers, logs)
}
