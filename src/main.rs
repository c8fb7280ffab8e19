//! The `isthmus` command: parses arguments and dispatches. Each
//! subcommand lives in `cli/`.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    isthmus_core::tls::install_crypto_provider();
    let logs = isthmus_core::telemetry::init(args.log_level.as_deref(), args.log_format);
    match cli::run(args.command, logs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
