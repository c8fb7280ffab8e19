//! The `isthmus` command: parses arguments and dispatches. Each
//! subcommand lives in `cli/`.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    isthmus_core::tls::install_crypto_provider();
    // Proxies and gateways hold two sockets per connection: take the
    // hard limit (as ztunnel does) rather than the usual soft 1024.
    let nofile = rlimit::increase_nofile_limit(u64::MAX);
    let logs = isthmus_core::telemetry::init(args.log_level.as_deref(), args.log_format);
    if let Err(e) = nofile {
        tracing::warn!(error = %e, "cannot raise the open-files limit; many connections may fail with EMFILE (check `ulimit -n`)");
    }
    match cli::run(args.command, logs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
