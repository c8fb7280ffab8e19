//! Running a sidecar from its config file: certificate from the
//! controller's CA, the config stream, then the listeners until a
//! termination signal. Shared by `isthmus proxy` and the sidecar-only
//! `isthmus-proxy` binary.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use isthmus_core::backoff::Backoff;
use isthmus_core::boot;
use isthmus_core::caclient::RemoteSigner;
use isthmus_core::identity::{CertificateSigner, SpiffeId, TrustBundle, TrustStore};
use isthmus_core::telemetry::LogControl;
use isthmus_proto::config::v1::{Node, node::Kind};
use tracing::warn;

use crate::app::{Deps, build};
use crate::config::ProxyConfig;

/// Runs the sidecar configured in `config_path` with `workers` data-plane
/// threads until it is told to stop.
pub fn run(config_path: &Path, workers: usize, logs: Option<LogControl>) -> anyhow::Result<()> {
    let config: ProxyConfig = isthmus_core::config::load(config_path)?;
    let controller = boot::controller_address(&config.controller)?;
    let Some(token_file) = &config.token_file else {
        bail!(
            "tokenFile is required: the sidecar gets its certificate from the controller's CA with a bootstrap token (a line `<token> {}/{}` of the controller's caTokens file)",
            config.workload.namespace,
            config.workload.service_account
        );
    };
    let Some(ca_root) = &config.ca_root else {
        bail!(
            "caRoot is required: the sidecar checks the controller against this cluster's root certificate before sending it the token (the CA directory's root-cert.pem)"
        );
    };
    let roots = std::fs::read_to_string(ca_root)
        .with_context(|| format!("cannot read caRoot {}", ca_root.display()))?;
    let roots = isthmus_core::identity::pem::certs_from_pem(&roots)
        .map_err(|e| anyhow::anyhow!("caRoot {}: {e}", ca_root.display()))?;
    // Read now to fail fast, and again at every renewal: a projected
    // ServiceAccount token is rotated in place by the kubelet.
    std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read tokenFile {}", token_file.display()))?;
    let token = isthmus_core::caclient::BearerToken::File(token_file.clone());
    boot::block_on_runtime("proxy", Some(workers), || async move {
        let w = &config.workload;
        let ttl = config.certificate_ttl;
        let id = SpiffeId::workload(
            &config.cluster.trust_domain,
            &w.namespace,
            &w.service_account,
        )?;
        // This cluster's root until the config stream brings the bundles.
        let trust = TrustStore::with_bundles([TrustBundle::new(
            config.cluster.trust_domain.clone(),
            roots,
            0,
        )])?;
        let signer: Arc<dyn CertificateSigner> = Arc::new(RemoteSigner {
            addr: controller,
            token,
            tls: isthmus_core::tls::client_config(
                None,
                trust.clone(),
                boot::controller_identity(&config.cluster)?,
                &[b"h2"],
            ),
        });
        // The controller may start after its sidecars: keep asking.
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let (cert, _renewal) = loop {
            match boot::issued_cert(id.clone(), signer.clone(), ttl).await {
                Ok(c) => break c,
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(identity = %id, error = %e, retry_in = ?wait,
                        "no certificate yet from the controller's CA (check `controller` and that the token in tokenFile is in its caTokens)");
                    tokio::time::sleep(wait).await;
                }
            }
        };
        // Bundles (this cluster's and every peer's) come with the config.
        let node = Node {
            kind: Kind::Sidecar as i32,
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            ..Default::default()
        };
        let sub = boot::subscribe(controller, &config.cluster, &cert, &trust, node)?;
        // The access log goes to stdout (a test may take it instead).
        let deps = Deps {
            access_log: None,
            state: sub.state.clone(),
            certs: cert,
            trust,
            logs,
        };
        let bound = build(config, deps).await?;
        eprintln!(
            "sidecar running: outbound tcp/{}, inbound tcp/{}, admin {}, metrics {}, readiness {}",
            bound.outbound_addr,
            bound.inbound_addr,
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
