//! Running a controller from its config file: this cluster's CA, the
//! controller's certificate, the trust store (own root and configured
//! peers' bundles), then [`crate::app::build`] until a termination signal.
//! `isthmus controller` calls this.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use isthmus_core::boot;
use isthmus_core::identity::ca::DEFAULT_LEAF_TTL;
use isthmus_core::identity::pem::certs_from_pem;
use isthmus_core::identity::{CertificateSigner, SpiffeId, TrustBundle, TrustStore};
use isthmus_core::telemetry::LogControl;

use crate::app::{Deps, build};
use crate::config::ControllerConfig;

/// Runs the controller configured in `config_path` until it is told to
/// stop.
pub fn run(config_path: &Path, logs: Option<LogControl>) -> anyhow::Result<()> {
    let config: ControllerConfig = isthmus_core::config::load(config_path)?;
    boot::block_on_runtime("controller", Some(2), || async move {
        let ca = boot::load_cluster_ca(&config.ca_dir, &config.cluster)?;
        let id = SpiffeId::controller(&config.cluster.trust_domain, &config.cluster.name.0)?;
        let signer: Arc<dyn CertificateSigner> = Arc::new(ca.clone());
        let (cert, _renewal) = boot::issued_cert(id, signer, DEFAULT_LEAF_TTL).await?;
        let mut bundles = vec![TrustBundle::new(
            config.cluster.trust_domain.clone(),
            vec![ca.root().clone()],
            1,
        )];
        for p in &config.peers {
            let Some(path) = &p.trust_bundle else {
                tracing::warn!(peer.cluster = %p.name, "no trustBundle for this peer: it cannot be verified until linked");
                continue;
            };
            let text = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "peer {}: cannot read trustBundle {}",
                    p.name,
                    path.display()
                )
            })?;
            let roots = certs_from_pem(&text)
                .map_err(|e| anyhow::anyhow!("peer {}: {}: {e}", p.name, path.display()))?;
            bundles.push(TrustBundle::new(p.trust_domain.clone(), roots, 1));
        }
        let trust = TrustStore::with_bundles(bundles)?;
        let bound = build(
            config,
            Deps {
                certs: cert,
                trust,
                logs,
                ca: Some(ca),
            },
        )
        .await?;
        println!(
            "controller running: federation {}, admin {}, metrics {}, readiness {}",
            bound.federation_addr, bound.admin_addr, bound.metrics_addr, bound.readiness_addr
        );
        bound
            .wait_termination(isthmus_core::signal::drain_deadline_from_env())
            .await;
        Ok(())
    })
}
