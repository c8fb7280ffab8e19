//! `isthmus controller`: the per-cluster federation controller
//! ([`isthmus_federation::run`]).

use std::path::PathBuf;

use clap::Args;
use isthmus_core::telemetry::LogControl;

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Controller config file (kind: Controller).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: ControllerArgs, logs: Option<LogControl>) -> anyhow::Result<()> {
    isthmus_federation::run(&args.config, logs)
}
