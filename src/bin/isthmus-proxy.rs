//! `isthmus-proxy`: the sidecar alone, for sidecar images. The same
//! flags and behaviour as `isthmus proxy`, in a binary without the
//! controller and the gateway: a sidecar runs once per pod, and the code
//! it maps is resident memory on every one of them (BENCHMARKS.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use isthmus_core::telemetry::LogFormat;

/// The Isthmus sidecar: routing, mTLS and telemetry beside one workload.
#[derive(Debug, Parser)]
#[command(name = "isthmus-proxy", version, about, long_about = None)]
struct Args {
    /// Sidecar config file (kind: Proxy).
    #[arg(long)]
    config: PathBuf,
    /// Worker threads of the data plane (see `isthmus proxy --help`).
    #[arg(long, env = "ISTHMUS_PROXY_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Log filter (RUST_LOG syntax), e.g. `info`.
    #[arg(long, env = "ISTHMUS_LOG")]
    log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    isthmus_core::tls::install_crypto_provider();
    let nofile = rlimit::increase_nofile_limit(u64::MAX);
    let logs = isthmus_core::telemetry::init(args.log_level.as_deref(), args.log_format);
    if let Err(e) = nofile {
        tracing::warn!(error = %e, "cannot raise the open-files limit; many connections may fail with EMFILE (check `ulimit -n`)");
    }
    match isthmus_proxy::run::run(&args.config, args.workers, logs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
