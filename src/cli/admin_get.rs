//! `isthmus admin-get ADDR PATH` (hidden): prints a GET of an admin,
//! metrics or readiness path (the admin API listens on loopback only, so
//! the network-namespace tests read it from inside the namespace).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct AdminGetArgs {
    pub addr: SocketAddr,
    pub path: String,
}

pub fn run(args: AdminGetArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = rt
        .block_on(isthmus_core::admin::http_get(args.addr, &args.path))
        .with_context(|| format!("GET {}{}", args.addr, args.path))?;
    print!("{body}");
    Ok(())
}
