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
            print!("{}", table(&peers, time::OffsetDateTime::now_utc()));
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

/// The peers as `kubectl get` shows objects: aligned columns, ages
/// instead of timestamps, and why a peer is disconnected only while it
/// is (a start-up dial error is no news about a peer that is up).
fn table(peers: &[PeerStatus], now: time::OffsetDateTime) -> String {
    let age = |t: &Option<String>| -> String {
        let Some(t) = t else { return "-".into() };
        match time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
            Ok(t) => format!("{} ago", human((now - t).whole_seconds().max(0))),
            Err(_) => t.clone(),
        }
    };
    let mut rows = vec![
        [
            "CLUSTER",
            "CONNECTED",
            "SESSIONS",
            "STALE",
            "SYNCED",
            "LAST EVENT",
            "EXPORTED",
            "IMPORTED",
            "LAG",
            "DISCONNECTED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in peers {
        let disconnected = if p.connected {
            String::new()
        } else {
            match (&p.last_disconnect, &p.last_disconnect_reason) {
                (t @ Some(_), Some(r)) => format!("{}: {r}", age(t)),
                (t @ Some(_), None) => age(t),
                _ => "never connected".into(),
            }
        };
        rows.push(vec![
            p.cluster.clone(),
            if p.connected { "yes" } else { "no" }.into(),
            p.sessions.to_string(),
            if p.stale { "yes" } else { "no" }.into(),
            age(&p.last_full_sync),
            age(&p.last_event),
            p.exported.to_string(),
            p.imported.to_string(),
            p.revision_lag.to_string(),
            disconnected,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// `kubectl`'s ages: 45s, 5m12s, 3h4m, 2d5h.
fn human(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(cluster: &str, connected: bool) -> PeerStatus {
        PeerStatus {
            cluster: cluster.into(),
            address: "127.0.0.1:15012".into(),
            connected,
            stale: !connected,
            last_full_sync: Some("2026-12-03T10:00:00Z".into()),
            last_event: Some("2026-12-03T10:04:48Z".into()),
            last_disconnect: Some("2026-12-03T09:59:00Z".into()),
            last_disconnect_reason: Some("cannot open the federation stream".into()),
            last_dial_error: None,
            sessions: usize::from(connected),
            exported: 3,
            imported: 12,
            revision_lag: 0,
        }
    }

    #[test]
    fn the_table_reads_as_kubectl_get() {
        let now = time::OffsetDateTime::parse(
            "2026-12-03T10:05:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let t = table(&[peer("west", true), peer("eu-central", false)], now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        // Columns line up: every row has CONNECTED where the header has it.
        let col = lines[0].find("CONNECTED").unwrap();
        assert_eq!(&lines[1][col..col + 3], "yes", "{t}");
        assert_eq!(&lines[2][col..col + 2], "no", "{t}");
        // Ages, not timestamps.
        assert!(
            lines[1].contains("5m0s ago") && lines[1].contains("12s ago"),
            "{t}"
        );
        assert!(!t.contains("2026-12-03"), "{t}");
        // A connected peer shows no old dial error; a disconnected one
        // says since when and why.
        assert!(!lines[1].contains("cannot open"), "{t}");
        assert!(
            lines[2].ends_with("6m0s ago: cannot open the federation stream"),
            "{t}"
        );
    }

    #[test]
    fn ages_are_kubectls() {
        assert_eq!(human(45), "45s");
        assert_eq!(human(312), "5m12s");
        assert_eq!(human(3 * 3600 + 240), "3h4m");
        assert_eq!(human(2 * 86400 + 5 * 3600), "2d5h");
    }
}
