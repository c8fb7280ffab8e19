//! What each component does before it serves, written once: check that a
//! CA directory is this cluster's, issue and renew its certificate, and
//! subscribe to the local controller's config stream. Each component's
//! `run` (`isthmus_federation::run`, `isthmus_gateway::run`,
//! `isthmus_proxy::run`) is built on these; the command line only parses
//! and dispatches.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use isthmus_proto::config::v1::Node;
use tokio::sync::{oneshot, watch};

use crate::config::ClusterSection;
use crate::identity::verify::Expect;
use crate::identity::{CertificateSigner, ClusterCa, RotatingCert, SpiffeId, TrustStore};
use crate::model::MeshState;

/// Loads the cluster CA in `dir` and checks it is `cluster`'s: a CA of
/// another cluster would issue certificates every peer refuses.
pub fn load_cluster_ca(dir: &Path, cluster: &ClusterSection) -> anyhow::Result<Arc<ClusterCa>> {
    let ca = ClusterCa::load(dir)?;
    if ca.cluster() != cluster.name.0 || ca.trust_domain() != &cluster.trust_domain {
        bail!(
            "{} is the CA of cluster {:?} in {}, but the config says cluster {:?} in {}; point caDir at this cluster's CA (`isthmus ca cluster`)",
            dir.display(),
            ca.cluster(),
            ca.trust_domain(),
            cluster.name.0,
            cluster.trust_domain
        );
    }
    Ok(Arc::new(ca))
}

/// A certificate for `id` from `signer`, renewed in the background for as
/// long as the returned task handle lives (it is aborted on drop).
pub async fn issued_cert(
    id: SpiffeId,
    signer: Arc<dyn CertificateSigner>,
    ttl: Duration,
) -> anyhow::Result<(Arc<RotatingCert>, Renewal)> {
    let cert = RotatingCert::issue(id.clone(), signer.as_ref(), ttl, crate::tls::provider())
        .await
        .with_context(|| format!("cannot issue a certificate for {id}"))?;
    let renewal = Renewal(cert.spawn_renewal(signer, ttl));
    Ok((cert, renewal))
}

/// Renews a certificate until dropped.
#[derive(Debug)]
pub struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The config stream of this cluster's controller, subscribed.
#[derive(Debug)]
pub struct Subscription {
    /// Complete mesh states, newest first.
    pub state: watch::Receiver<Arc<MeshState>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Subscribes `node` to the controller at `controller` (its local port,
/// 15010), checked to be `cluster`'s controller, presenting `cert`. Peers' trust bundles from the stream go into `trust`. Reconnects
/// until the subscription is dropped.
pub fn subscribe(
    controller: SocketAddr,
    cluster: &ClusterSection,
    cert: &Arc<RotatingCert>,
    trust: &Arc<TrustStore>,
    node: Node,
) -> anyhow::Result<Subscription> {
    let (tx, state) = watch::channel(Arc::new(MeshState::default()));
    let (stop, stopped) = oneshot::channel::<()>();
    let trust = trust.clone();
    let tls = crate::tls::client_config(
        Some(cert.clone() as Arc<dyn rustls::client::ResolvesClientCert>),
        trust.clone(),
        controller_identity(cluster)?,
        &[b"h2"],
    );
    tokio::spawn(crate::meshconfig::subscribe_loop(
        controller,
        tls,
        node,
        tx,
        trust,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Subscription {
        state,
        stop: Some(stop),
    })
}

/// What a local proxy accepts as its controller: this cluster's, only.
pub fn controller_identity(cluster: &ClusterSection) -> anyhow::Result<Expect> {
    Ok(Expect::Exactly(SpiffeId::controller(
        &cluster.trust_domain,
        &cluster.name.0,
    )?))
}

/// The controller's address from a component's config (`controller:`).
pub fn controller_address(value: &str) -> anyhow::Result<SocketAddr> {
    value.parse().with_context(|| {
        format!("controller {value:?} must be an IP:port (the controller's local port, 15010)")
    })
}

/// Runs `serve` on a multi-thread runtime named `name` with `workers`
/// worker threads (`None`: one per core).
pub fn block_on_runtime<F: Future<Output = anyhow::Result<()>>>(
    name: &str,
    workers: Option<usize>,
    serve: impl FnOnce() -> F,
) -> anyhow::Result<()> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n.max(1));
    }
    let rt = b.thread_name(name).enable_all().build()?;
    rt.block_on(serve())
}
