//! `isthmus config check`: validate configuration files before deploying.

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use isthmus_core::config::{ConfigError, parse, peek_kind};
use isthmus_federation::config::ControllerConfig;
use isthmus_gateway::config::GatewayConfig;
use isthmus_proxy::config::ProxyConfig;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate files (kind: Controller, Gateway or Proxy) and report every
    /// problem with its field path and fix. Prints the effective config
    /// (defaults filled in) as JSON with --show.
    Check {
        files: Vec<PathBuf>,
        #[arg(long)]
        show: bool,
    },
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    let ConfigCommand::Check { files, show } = cmd;
    if files.is_empty() {
        bail!("no file given: isthmus config check FILE...");
    }
    let mut failed = 0;
    for path in &files {
        match check(path) {
            Ok(effective) => {
                println!("✔ {}: valid", path.display());
                if show {
                    println!("{}", serde_json::to_string_pretty(&effective)?);
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("✘ {e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} file(s) invalid", files.len());
    }
    Ok(())
}

fn check(path: &PathBuf) -> Result<serde_json::Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.clone(),
        error,
    })?;
    let json = |v: Result<serde_json::Value, serde_json::Error>| v.unwrap_or_default();
    Ok(match peek_kind(&text).as_deref() {
        Some("Gateway") => json(serde_json::to_value(parse::<GatewayConfig>(path, &text)?)),
        Some("Proxy") => json(serde_json::to_value(parse::<ProxyConfig>(path, &text)?)),
        // Controller, or no/unknown kind: the controller schema reports it.
        _ => json(serde_json::to_value(parse::<ControllerConfig>(
            path, &text,
        )?)),
    })
}
