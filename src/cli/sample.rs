//! `isthmus sample-app` (hidden): the demo's helloworld app as a process
//! of its own (the network-namespace tier runs it inside a namespace).

use std::net::SocketAddr;

use clap::Args;

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub cluster: String,
    #[arg(long = "app-version", default_value = "v1")]
    pub app_version: String,
    #[arg(long)]
    pub instance: String,
    #[arg(long, default_value = "")]
    pub zone: String,
}

pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let who = isthmus_e2e::sample::Identity {
            cluster: args.cluster,
            version: args.app_version,
            instance: args.instance,
            zone: args.zone,
        };
        let _app = isthmus_e2e::sample::start(args.listen, who, 0).await?;
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
