//! Command-line interface.

use clap::{Parser, Subcommand};
use isthmus_core::telemetry::LogFormat;

mod admin_get;
mod analyze;
mod ca;
mod config;
mod controller;
#[cfg(feature = "demo")]
mod demo;
mod gateway;
mod link;
mod proxy;
#[cfg(feature = "demo")]
mod sample;
mod status;
mod verify;

/// Isthmus: one service mesh across several Kubernetes clusters.
#[derive(Debug, Parser)]
#[command(name = "isthmus", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `info,isthmus_gateway=debug`.
    #[arg(long, global = true, env = "ISTHMUS_LOG")]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and manage the PKI: a root per trust domain, an intermediate
    /// per cluster, leaf certificates from CSRs.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Check configuration files.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Run three clusters on this machine (a demo and a playground).
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Run a cluster's east-west gateway.
    Gateway(gateway::GatewayArgs),
    /// Peer two clusters with a one-time token.
    #[command(subcommand)]
    Link(link::LinkCommand),
    /// Run a cluster's federation controller.
    Controller(controller::ControllerArgs),
    /// Run the sidecar beside one workload.
    Proxy(proxy::ProxyArgs),
    /// GET an admin path and print it (used by the network-namespace tests).
    #[command(hide = true)]
    AdminGet(admin_get::AdminGetArgs),
    /// The demo's sample app (used by the network-namespace tests).
    #[command(hide = true)]
    #[cfg(feature = "demo")]
    SampleApp(sample::SampleArgs),
    /// Show what a controller knows of its peers.
    Status(status::StatusArgs),
    /// Check that the mesh works end to end: federation, gateway paths,
    /// a request through a sidecar carrying the caller's identity.
    Verify(verify::VerifyArgs),
    /// Check a cluster's configuration (a directory of manifests, or what
    /// a running controller could not apply), with codes and severities.
    Analyze(analyze::AnalyzeArgs),
}

/// Runs one command.
pub fn run(
    command: Command,
    logs: Option<isthmus_core::telemetry::LogControl>,
) -> anyhow::Result<()> {
    match command {
        Command::Ca(c) => ca::run(c),
        Command::Config(c) => config::run(c),
        Command::Controller(c) => controller::run(c, logs),
        Command::Link(c) => link::run(c),
        #[cfg(feature = "demo")]
        Command::Demo(c) => demo::run(c),
        Command::Gateway(c) => gateway::run(c, logs),
        Command::Proxy(c) => proxy::run(c, logs),
        Command::Status(c) => status::run(c),
        Command::Verify(c) => verify::run(c),
        Command::Analyze(c) => analyze::run(c),
        #[cfg(feature = "demo")]
        Command::SampleApp(c) => sample::run(c),
        Command::AdminGet(c) => admin_get::run(c),
    }
}

/// An admin API's `/config_dump` (5 s at most), or what went wrong.
async fn admin_dump(addr: std::net::SocketAddr) -> Result<serde_json::Value, String> {
    let body = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        isthmus_core::admin::http_get(addr, "/config_dump"),
    )
    .await
    .map_err(|_| "no answer in 5 s".to_owned())?
    .map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}"))
}

/// A controller's `/config_dump` (its admin address), checked to be a
/// controller's.
fn controller_dump(addr: std::net::SocketAddr) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dump = rt.block_on(admin_dump(addr)).map_err(|e| match e.starts_with("not JSON") {
        true => anyhow::anyhow!("the admin API at {addr} answered something that is {e}"),
        false => anyhow::anyhow!("cannot reach the controller's admin API at {addr} ({e}); is it running, and is this its admin address?"),
    })?;
    if dump["component"] != "controller" {
        anyhow::bail!(
            "{addr} is the admin API of a {}, not a controller",
            dump["component"]
        );
    }
    Ok(dump)
}
