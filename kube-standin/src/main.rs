//! `isthmus-kube-standin`: the API stand-in on a port, for driving by
//! hand with kubectl (`--kubeconfig` the file it writes).

use std::net::SocketAddr;

use isthmus_kube_standin::ApiServer;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut kubeconfig = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => addr = args.next().unwrap_or_default().parse()?,
            "--kubeconfig" => kubeconfig = args.next(),
            _ => anyhow::bail!(
                "usage: isthmus-kube-standin [--listen 127.0.0.1:PORT] [--kubeconfig FILE]"
            ),
        }
    }
    let api = ApiServer::builder().addr(addr).start().await?;
    if let Some(path) = kubeconfig {
        api.write_kubeconfig(path.as_ref(), "standin")?;
    }
    println!("kube API stand-in on {}", api.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
