//! Running a gateway from its config file: its certificate from this
//! cluster's CA, the config stream of the local controller (mesh state
//! and peers' bundles), then [`crate::app::build`] until a termination
//! signal. `isthmus gateway` calls this.

use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use isthmus_core::boot;
use isthmus_core::identity::ca::DEFAULT_LEAF_TTL;
use isthmus_core::identity::{CertificateSigner, SpiffeId, TrustBundle, TrustStore};
use isthmus_core::telemetry::LogControl;
use isthmus_proto::config::v1::{Node, node::Kind};

use crate::app::{Deps, build};
use crate::config::GatewayConfig;

/// Runs the gateway configured in `config_path` until it is told to stop.
pub fn run(config_path: &Path, logs: Option<LogControl>) -> anyhow::Result<()> {
    let config: GatewayConfig = isthmus_core::config::load(config_path)?;
    let controller = boot::controller_address(&config.controller)?;
    // The data plane gets a multi-thread runtime of its own, one worker per
    // core (QUIC connection drivers spread across cores); admin, metrics
    // and readiness run on a thread of their own (core::admin).
    boot::block_on_runtime("gateway", None, || async move {
        let Some(ca_dir) = &config.ca_dir else {
            bail!(
                "caDir is required: the gateway issues its certificate from the cluster CA (the directory `isthmus ca cluster` wrote)"
            );
        };
        let ca = boot::load_cluster_ca(ca_dir, &config.cluster)?;
        let id = SpiffeId::gateway(&config.cluster.trust_domain, &config.cluster.name.0)?;
        let signer: Arc<dyn CertificateSigner> = Arc::new(ca.clone());
        let (cert, _renewal) = boot::issued_cert(id, signer, DEFAULT_LEAF_TTL).await?;
        let trust = TrustStore::with_bundles([TrustBundle::new(
            config.cluster.trust_domain.clone(),
            vec![ca.root().clone()],
            1,
        )])?;
        let node = Node {
            kind: Kind::Gateway as i32,
            name: format!("{}-gateway", config.cluster.name),
            ..Default::default()
        };
        let sub = boot::subscribe(controller, &config.cluster, &cert, &trust, node)?;
        let bound = build(
            config,
            Deps {
                certs: cert,
                trust,
                state: sub.state.clone(),
                logs,
            },
        )
        .await?;
        println!(
            "gateway running: sidecars tcp/{}, peers udp/{}, admin {}, metrics {}, readiness {}",
            bound.sidecar_addr,
            bound.peer_addr,
            bound.admin_addr,
            bound.metrics_addr,
            bound.readiness_addr
        );
        bound
            .wait_termination(isthmus_core::signal::drain_deadline_from_env())
            .await;
        drop(sub);
        Ok(())
    })
}
