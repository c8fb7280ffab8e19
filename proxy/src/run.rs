//! Running a sidecar from its config file: certificate from the
//! controller's CA, the config stream, then the listeners until a
//! termination signal. Shared by `isthmus proxy` and the sidecar-only
//! `isthmus-proxy` binary.

use std::path::Path;

use anyhow::bail;
use isthmus_core::boot;
use isthmus_core::identity::SpiffeId;
use isthmus_core::telemetry::LogControl;
use isthmus_proto::config::v1::{Node, node::Kind};

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
    let (signer, trust) = boot::remote_signer(controller, &config.cluster, token_file, ca_root)?;
    boot::block_on_runtime("proxy", Some(workers), || async move {
        let w = &config.workload;
        let ttl = config.certificate_ttl;
        let id = SpiffeId::workload(
            &config.cluster.trust_domain,
            &w.namespace,
            &w.service_account,
        )?;
        // The controller may start after its sidecars: keep asking.
        let (cert, _renewal) = boot::issued_cert_retrying(
            id,
            signer,
            ttl,
            "check `controller` and that the token in tokenFile is in its caTokens, or is this pod's projected ServiceAccount token",
        )
        .await;
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
