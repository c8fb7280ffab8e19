//! `isthmus analyze DIR | --controller ADDR`: configuration problems with
//! codes and severities, before or after they reach a cluster (istioctl
//! analyze's role). The exit status fails a CI job: 1 when a finding is at
//! or above `--fail-on` (default: error).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use isthmus_core::model::Locality;
use isthmus_core::model::problem::ConfigProblem;
use isthmus_federation::analyze::{CODES, Finding, Severity, analyze, read_dir};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    Error,
    Warning,
}

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// A directory of the cluster's manifests (the files source's layout;
    /// subdirectories included).
    #[arg(required_unless_present_any = ["controller", "list_codes"])]
    pub dir: Option<PathBuf>,
    /// Ask a running controller (its admin address) what it could not
    /// apply, instead of reading files.
    #[arg(long, conflicts_with = "dir")]
    pub controller: Option<SocketAddr>,
    #[arg(short = 'o', long, default_value = "table")]
    pub output: Output,
    /// The lowest severity that makes the exit status 1.
    #[arg(long, default_value = "error")]
    pub fail_on: FailOn,
    /// Print every code with its severity and meaning.
    #[arg(long)]
    pub list_codes: bool,
}

pub fn run(args: AnalyzeArgs) -> anyhow::Result<()> {
    if args.list_codes {
        for (code, severity, what) in CODES {
            println!("{code}  {:<7}  {what}", severity.as_str());
        }
        return Ok(());
    }
    let findings = match (&args.dir, args.controller) {
        (Some(dir), None) => {
            if !dir.is_dir() {
                bail!("{} is not a directory of manifests", dir.display());
            }
            let (objects, mut findings) = read_dir(dir);
            findings.extend(analyze(&objects, &Locality::default()));
            findings
        }
        (None, Some(addr)) => from_controller(addr)?,
        _ => bail!("give a directory of manifests or --controller ADDR"),
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
        Output::Table => {
            if findings.is_empty() {
                println!("✔ no problems found");
            }
            for f in &findings {
                println!(
                    "{} [{}] ({}) {}",
                    f.severity.as_str(),
                    f.code,
                    f.object,
                    f.message
                );
            }
        }
    }
    let failing = findings.iter().any(|f| match args.fail_on {
        FailOn::Error => f.severity == Severity::Error,
        FailOn::Warning => f.severity <= Severity::Warning,
    });
    if failing {
        std::process::exit(1);
    }
    Ok(())
}

/// What a running controller could not apply (`config_problems`).
fn from_controller(addr: SocketAddr) -> anyhow::Result<Vec<Finding>> {
    let dump = super::controller_dump(addr)?;
    let problems: Vec<ConfigProblem> = serde_json::from_value(dump["config_problems"].clone())
        .context("unexpected config_problems section")?;
    Ok(problems.iter().map(Finding::from_problem).collect())
}
