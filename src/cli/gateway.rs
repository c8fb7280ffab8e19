//! `isthmus gateway`: the east-west gateway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use isthmus_core::identity::ca::DEFAULT_LEAF_TTL;
use isthmus_core::identity::{
    CertificateSigner, ClusterCa, RotatingCert, SpiffeId, TrustBundle, TrustStore,
};
use isthmus_core::model::MeshState;
use isthmus_core::telemetry::LogControl;
use isthmus_gateway::app::{Deps, build};
use isthmus_gateway::config::GatewayConfig;
use isthmus_proto::config::v1::{Node, node::Kind};

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Gateway config file (kind: Gateway).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: GatewayArgs, logs: Option<LogControl>) -> anyhow::Result<()> {
    let config: GatewayConfig = isthmus_core::config::load(&args.config)?;
    let controller: SocketAddr = config.controller.parse().with_context(|| {
        format!(
            "controller {:?} must be an IP:port (the controller's local port, 15010)",
            config.controller
        )
    })?;
    // The data plane gets its own multi-thread runtime (STYLE: separate
    // control and data planes; QUIC drivers spread across cores).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("gateway")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let Some(ca_dir) = &config.ca_dir else {
            bail!("caDir is required: the gateway issues its certificate from the cluster CA (the controller's CA service is not available yet)");
        };
        let ca = Arc::new(ClusterCa::load(ca_dir)?);
        if ca.cluster() != config.cluster.name.0 || ca.trust_domain() != &config.cluster.trust_domain {
            bail!(
                "{} is the CA of cluster {:?} in {}, but the config says {:?} in {}",
                ca_dir.display(),
                ca.cluster(),
                ca.trust_domain(),
                config.cluster.name.0,
                config.cluster.trust_domain
            );
        }
        let id = SpiffeId::gateway(&config.cluster.trust_domain, &config.cluster.name.0)?;
        let signer: Arc<dyn CertificateSigner> = Arc::new(ca.clone());
        let cert = RotatingCert::issue(id, signer.as_ref(), DEFAULT_LEAF_TTL, isthmus_core::tls::provider()).await?;
        let _renewal = cert.spawn_renewal(signer, DEFAULT_LEAF_TTL);
        let trust = TrustStore::with_bundles([TrustBundle::new(config.cluster.trust_domain.clone(), vec![ca.root().clone()], 1)])?;

        // Mesh state and peers' bundles from the controller.
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(MeshState::default()));
        let node = Node {
            kind: Kind::Gateway as i32,
            name: format!("{}-gateway", config.cluster.name),
            ..Default::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let controller_id = SpiffeId::controller(&config.cluster.trust_domain, &config.cluster.name.0)?;
        let tls = isthmus_core::tls::client_config(
            Some(cert.clone()),
            trust.clone(),
            isthmus_core::identity::verify::Expect::Exactly(controller_id),
            &[b"h2"],
        );
        tokio::spawn(isthmus_core::meshconfig::subscribe_loop(controller, tls, node, tx, trust.clone(), async move {
            let _ = stop_rx.await;
        }));
        let bound = build(config, Deps { certs: cert, trust, state: rx, logs }).await?;
        println!(
            "gateway running: sidecars tcp/{}, peers udp/{}, admin {}, metrics {}, readiness {}",
            bound.sidecar_addr, bound.peer_addr, bound.admin_addr, bound.metrics_addr, bound.readiness_addr
        );
        bound.wait_termination(isthmus_core::signal::drain_deadline_from_env()).await;
        let _ = stop_tx.send(());
        Ok(())
    })
}
