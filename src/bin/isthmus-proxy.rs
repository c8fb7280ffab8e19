//! `isthmus-proxy`: the sidecar alone, for sidecar images. The same
//! flags and behaviour as `isthmus proxy`, in a binary without the
//! controller and the gateway: a sidecar runs once per pod, and the code
//! it maps is resident memory on every one of them (BENCHMARKS.md). For
//! the same reason its four flags are read here rather than with clap,
//! whose parser and help renderer are code pages on every pod for a
//! command line read once.

use std::path::PathBuf;
use std::process::ExitCode;

use isthmus_core::telemetry::LogFormat;

const USAGE: &str = "\
The Isthmus sidecar: routing, mTLS and telemetry beside one workload.

Usage: isthmus-proxy --config <CONFIG> [OPTIONS]

Options:
      --config <CONFIG>          Sidecar config file (kind: Proxy)
      --workers <WORKERS>        Worker threads of the data plane [env: ISTHMUS_PROXY_WORKERS=] [default: 1]
      --log-level <LOG_LEVEL>    Log filter (RUST_LOG syntax), e.g. `info` [env: ISTHMUS_LOG=]
      --log-format <LOG_FORMAT>  Log format: text or json [default: text]
  -h, --help                     Print help
  -V, --version                  Print version
";

#[derive(Debug, PartialEq)]
struct Args {
    config: PathBuf,
    workers: usize,
    log_level: Option<String>,
    log_format: LogFormat,
}

#[derive(Debug, PartialEq)]
enum Parsed {
    Run(Args),
    Help,
    Version,
}

/// Reads the command line (without the program name); `env` looks up
/// the environment variables that stand in for flags.
fn parse(
    mut argv: impl Iterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Parsed, String> {
    let mut config = None;
    let mut workers = None;
    let mut log_level = None;
    let mut log_format = None;
    while let Some(arg) = argv.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--config" | "--workers" | "--log-level" | "--log-format" => {}
            other => {
                return Err(format!(
                    "unexpected argument {other:?}; the flags are --config, --workers, --log-level and --log-format (see --help)"
                ));
            }
        }
        let value = match inline.or_else(|| argv.next()) {
            Some(v) => v,
            None => return Err(format!("{flag} needs a value (see --help)")),
        };
        match flag.as_str() {
            "--config" => config = Some(PathBuf::from(value)),
            "--workers" => workers = Some(value),
            "--log-level" => log_level = Some(value),
            _ => {
                log_format = Some(
                    value
                        .parse::<LogFormat>()
                        .map_err(|e| format!("--log-format: {e}"))?,
                )
            }
        }
    }
    let Some(config) = config else {
        return Err("--config <CONFIG> is required: the sidecar config file (kind: Proxy)".into());
    };
    let workers = match workers.or_else(|| env("ISTHMUS_PROXY_WORKERS")) {
        None => 1,
        Some(w) => w.trim().parse().map_err(|_| {
            format!("workers {w:?} is not a number of threads (--workers or ISTHMUS_PROXY_WORKERS)")
        })?,
    };
    Ok(Parsed::Run(Args {
        config,
        workers,
        log_level: log_level.or_else(|| env("ISTHMUS_LOG")),
        log_format: log_format.unwrap_or_default(),
    }))
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("isthmus-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Parsed, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        parse(args.iter().map(|a| (*a).to_owned()), move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn flags_in_both_spellings_and_their_defaults() {
        assert_eq!(
            run(&["--config", "p.yaml"], &[]),
            Ok(Parsed::Run(Args {
                config: "p.yaml".into(),
                workers: 1,
                log_level: None,
                log_format: LogFormat::Text,
            }))
        );
        assert_eq!(
            run(
                &[
                    "--config=p.yaml",
                    "--workers=3",
                    "--log-level",
                    "debug",
                    "--log-format=json"
                ],
                &[]
            ),
            Ok(Parsed::Run(Args {
                config: "p.yaml".into(),
                workers: 3,
                log_level: Some("debug".into()),
                log_format: LogFormat::Json,
            }))
        );
    }

    #[test]
    fn environment_stands_in_for_flags_and_flags_win() {
        let env = [("ISTHMUS_PROXY_WORKERS", "2"), ("ISTHMUS_LOG", "warn")];
        let Ok(Parsed::Run(a)) = run(&["--config", "p.yaml"], &env) else {
            panic!()
        };
        assert_eq!((a.workers, a.log_level.as_deref()), (2, Some("warn")));
        let Ok(Parsed::Run(a)) = run(&["--config", "p.yaml", "--workers", "4"], &env) else {
            panic!()
        };
        assert_eq!(a.workers, 4);
    }

    #[test]
    fn bad_command_lines_say_what_to_write() {
        let e = run(&[], &[]).unwrap_err();
        assert!(e.contains("--config <CONFIG> is required"), "{e}");
        let e = run(&["--config"], &[]).unwrap_err();
        assert!(e.contains("--config needs a value"), "{e}");
        let e = run(&["--config", "p", "--wrokers", "2"], &[]).unwrap_err();
        assert!(
            e.contains("\"--wrokers\"") && e.contains("--workers"),
            "{e}"
        );
        let e = run(&["--config", "p", "--workers", "many"], &[]).unwrap_err();
        assert!(e.contains("\"many\""), "{e}");
        let e = run(&["--config", "p"], &[("ISTHMUS_PROXY_WORKERS", "x")]).unwrap_err();
        assert!(e.contains("ISTHMUS_PROXY_WORKERS"), "{e}");
        let e = run(&["--config", "p", "--log-format", "xml"], &[]).unwrap_err();
        assert!(e.contains("xml") && e.contains("json"), "{e}");
        assert_eq!(run(&["--config", "p", "--help"], &[]), Ok(Parsed::Help));
        assert_eq!(run(&["-V"], &[]), Ok(Parsed::Version));
    }
}
