//! `isthmus status`: what a controller knows of its peers.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, ValueEnum};
use isthmus_core::model::problem::ConfigProblem;
use isthmus_federation::state::PeerStatus;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The controller's admin address (loopback, port 15000 by default).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub controller: SocketAddr,
    #[arg(short = 'o', long, default_value = "table")]
    pub output: Output,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let dump = super::controller_dump(args.controller)?;
    let peers: Vec<PeerStatus> =
        serde_json::from_value(dump["peers"].clone()).context("unexpected peers section")?;
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "peers": peers,
                "conflicts": dump["conflicts"],
                "pending_links": dump["pending_links"],
                "config_problems": dump["config_problems"],
            }))?
        ),
        Output::Table => {
            println!(
                "{:<12} {:<10} {:<6} {:<21} {:<21} {:>8} {:>8} {:>4}  LAST DISCONNECT",
                "CLUSTER",
                "CONNECTED",
                "STALE",
                "LAST FULL SYNC",
                "LAST EVENT",
                "EXPORTED",
                "IMPORTED",
                "LAG"
            );
            for p in &peers {
                let disconnect = match (&p.last_disconnect, &p.last_disconnect_reason) {
                    (Some(t), Some(r)) => format!("{t} ({r})"),
                    _ => "-".into(),
                };
                println!(
                    "{:<12} {:<10} {:<6} {:<21} {:<21} {:>8} {:>8} {:>4}  {}",
                    p.cluster,
                    if p.connected { "yes" } else { "no" },
                    if p.stale { "yes" } else { "no" },
                    p.last_full_sync.as_deref().unwrap_or("-"),
                    p.last_event.as_deref().unwrap_or("-"),
                    p.exported,
                    p.imported,
                    p.revision_lag,
                    disconnect
                );
            }
            if let Some(links) = dump["pending_links"].as_array().filter(|l| !l.is_empty()) {
                println!("\npending links:");
                for l in links {
                    match l["error"].as_str() {
                        Some(e) => println!("  {} at {}: failed: {e}", l["cluster"], l["address"]),
                        None => println!("  {} at {}: linking", l["cluster"], l["address"]),
                    }
                }
            }
            let problems: Vec<ConfigProblem> =
                serde_json::from_value(dump["config_problems"].clone()).unwrap_or_default();
            if !problems.is_empty() {
                println!("\nconfiguration not applied as written:");
                for p in &problems {
                    println!("  {p}");
                }
            }
            if let Some(c) = dump["conflicts"].as_array().filter(|c| !c.is_empty()) {
                println!("\nexport conflicts:");
                for c in c {
                    println!(
                        "  {}: {} wins, {} left out: {}",
                        c["service"], c["winner"], c["excluded"], c["reason"]
                    );
                }
            }
        }
    }
    Ok(())
}
