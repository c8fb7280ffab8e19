//! `isthmus controller`: the per-cluster federation controller.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use isthmus_core::identity::ca::DEFAULT_LEAF_TTL;
use isthmus_core::identity::pem::certs_from_pem;
use isthmus_core::identity::{
    CertificateSigner, ClusterCa, RotatingCert, SpiffeId, TrustBundle, TrustStore,
};
use isthmus_core::telemetry::LogControl;
use isthmus_federation::app::{Deps, build};
use isthmus_federation::config::ControllerConfig;

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Controller config file (kind: Controller).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: ControllerArgs, logs: Option<LogControl>) -> anyhow::Result<()> {
    let config: ControllerConfig = isthmus_core::config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("controller")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let ca = Arc::new(ClusterCa::load(&config.ca_dir)?);
        if ca.cluster() != config.cluster.name.0 || ca.trust_domain() != &config.cluster.trust_domain {
            bail!(
                "{} is the CA of cluster {:?} in {}, but the config says cluster {:?} in {}; point caDir at this cluster's CA (`isthmus ca cluster`)",
                config.ca_dir.display(),
                ca.cluster(),
                ca.trust_domain(),
                config.cluster.name.0,
                config.cluster.trust_domain
            );
        }
        let id = SpiffeId::controller(&config.cluster.trust_domain, &config.cluster.name.0)?;
        let signer: Arc<dyn CertificateSigner> = Arc::new(ca.clone());
        let cert = RotatingCert::issue(id, signer.as_ref(), DEFAULT_LEAF_TTL, isthmus_core::tls::provider()).await?;
        let _renewal = cert.spawn_renewal(signer, DEFAULT_LEAF_TTL);

        let mut bundles = vec![TrustBundle::new(config.cluster.trust_domain.clone(), vec![ca.root().clone()], 1)];
        for p in &config.peers {
            let Some(path) = &p.trust_bundle else {
                tracing::warn!(peer.cluster = %p.name, "no trustBundle for this peer: it cannot be verified until linked");
                continue;
            };
            let text = std::fs::read_to_string(path).with_context(|| format!("peer {}: cannot read trustBundle {}", p.name, path.display()))?;
            let roots = certs_from_pem(&text).map_err(|e| anyhow::anyhow!("peer {}: {}: {e}", p.name, path.display()))?;
            bundles.push(TrustBundle::new(p.trust_domain.clone(), roots, 1));
        }
        let trust = TrustStore::with_bundles(bundles)?;
        let bound = build(config, Deps { certs: cert, trust, logs, ca: Some(ca) }).await?;
        println!(
            "controller running: federation {}, admin {}, metrics {}, readiness {}",
            bound.federation_addr, bound.admin_addr, bound.metrics_addr, bound.readiness_addr
        );
        bound.wait_termination(isthmus_core::signal::drain_deadline_from_env()).await;
        Ok(())
    })
}
