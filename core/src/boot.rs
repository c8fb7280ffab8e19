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

/// A signer that asks the controller's CA service at `controller`,
/// proving who this component is with the token in `token_file` (re-read
/// at every renewal: the kubelet rotates a projected ServiceAccount token
/// in place), and checking the controller against the root in `ca_root`
/// before sending it. Also returns the trust store of that root, which a
/// component uses until the config stream brings every bundle.
pub fn remote_signer(
    controller: SocketAddr,
    cluster: &ClusterSection,
    token_file: &Path,
    ca_root: &Path,
) -> anyhow::Result<(Arc<dyn CertificateSigner>, Arc<TrustStore>)> {
    let roots = std::fs::read_to_string(ca_root)
        .with_context(|| format!("cannot read caRoot {}", ca_root.display()))?;
    let roots = crate::identity::pem::certs_from_pem(&roots)
        .map_err(|e| anyhow::anyhow!("caRoot {}: {e}", ca_root.display()))?;
    // Read now to fail fast; again at every renewal.
    std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read tokenFile {}", token_file.display()))?;
    let trust = TrustStore::with_bundles([crate::identity::TrustBundle::new(
        cluster.trust_domain.clone(),
        roots,
        0,
    )])?;
    let signer: Arc<dyn CertificateSigner> = Arc::new(crate::caclient::RemoteSigner {
        addr: controller,
        token: crate::caclient::BearerToken::File(token_file.to_owned()),
        tls: crate::tls::client_config(
            None,
            trust.clone(),
            controller_identity(cluster)?,
            &[b"h2"],
        ),
    });
    Ok((signer, trust))
}

/// [`issued_cert`] from a remote signer, asking again with back-off until
/// it answers (the controller may start after the components it serves);
/// `hint` tells the operator what to check meanwhile.
pub async fn issued_cert_retrying(
    id: SpiffeId,
    signer: Arc<dyn CertificateSigner>,
    ttl: Duration,
    hint: &str,
) -> (Arc<RotatingCert>, Renewal) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match issued_cert(id.clone(), signer.clone(), ttl).await {
            Ok(c) => return c,
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(identity = %id, error = %e, retry_in = ?wait, "no certificate yet from the controller's CA ({hint})");
                tokio::time::sleep(wait).await;
            }
        }
    }
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

/// The controller's address from a component's config (`controller:`):
/// an IP:port, or a name:port resolved once at start (in Kubernetes the
/// controller's Service, whose address does not change).
pub fn controller_address(value: &str) -> anyhow::Result<SocketAddr> {
    resolve(
        "controller",
        value,
        "the controller's local port, 15010; in Kubernetes isthmus-controller.isthmus-system.svc:15010",
    )
}

/// An address from a config field: IP:port, or name:port resolved now
/// (Services' addresses do not change); `what` says what it should be.
pub fn resolve(field: &str, value: &str, what: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = value.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs as _;
    let mut addrs = value.to_socket_addrs().with_context(|| {
        format!("{field} {value:?} must be IP:port or a name:port that resolves ({what})")
    })?;
    addrs
        .next()
        .with_context(|| format!("{field} {value:?} resolves to no address ({what})"))
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
