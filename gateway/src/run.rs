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
        let id = SpiffeId::gateway(&config.cluster.trust_domain, &config.cluster.name.0)?;
        let (cert, _renewal, trust) = match (&config.ca_dir, &config.token_file, &config.ca_root) {
            // Files mode: issued from the cluster CA directly.
            (Some(ca_dir), _, _) => {
                let ca = boot::load_cluster_ca(ca_dir, &config.cluster)?;
                let signer: Arc<dyn CertificateSigner> = Arc::new(ca.clone());
                let (cert, renewal) = boot::issued_cert(id, signer, DEFAULT_LEAF_TTL).await?;
                let trust = TrustStore::with_bundles([TrustBundle::new(
                    config.cluster.trust_domain.clone(),
                    vec![ca.root().clone()],
                    1,
                )])?;
                (cert, renewal, trust)
            }
            // Kubernetes: from the controller's CA, proven with the
            // gateway's ServiceAccount token; no CA key in the pod.
            (None, Some(token_file), Some(ca_root)) => {
                let (signer, trust) =
                    boot::remote_signer(controller, &config.cluster, token_file, ca_root)?;
                let (cert, renewal) = boot::issued_cert_retrying(
                    id,
                    signer,
                    DEFAULT_LEAF_TTL,
                    "check `controller`, and that tokenFile holds the gateway ServiceAccount's projected token (the controller's gatewayServiceAccount) or a `<token> gateway` line of its caTokens",
                )
                .await;
                (cert, renewal, trust)
            }
            _ => bail!(
                "the gateway needs a certificate: set caDir (the directory `isthmus ca cluster` wrote), or tokenFile and caRoot to get one from the controller's CA"
            ),
        };
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
