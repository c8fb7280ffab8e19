//! `isthmus gateway`: the east-west gateway ([`isthmus_gateway::run`]).

use std::path::PathBuf;

use clap::Args;
use isthmus_core::telemetry::LogControl;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Gateway config file (kind: Gateway).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: GatewayArgs, logs: Option<LogControl>) -> anyhow::Result<()> {
    isthmus_gateway::run(&args.config, logs)
}
