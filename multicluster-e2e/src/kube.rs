//! The kube tier: each cluster's objects live in a Kubernetes API of its
//! own — the in-repo stand-in on a loopback port, served from a runtime
//! thread of its own so that blocking `kubectl` calls from the tests never
//! starve it — and are written with stock `kubectl`, as a user would.
//! Controllers run in kube mode against it; their link tokens and peers
//! are Secrets there; sidecars prove their ServiceAccount with a token the
//! API's TokenReview vouches for.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The namespace the controller's Lease, link tokens and peers live in.
pub const CONTROLLER_NAMESPACE: &str = "isthmus-system";

#[cfg(feature = "kube")]
pub use with_api::KubeApi;

/// A Service address in front of several replicas, as kube-proxy gives
/// one: each connection goes to the next replica that accepts it (a
/// stopped replica refuses, as one whose endpoint is gone).
#[derive(Debug)]
pub struct ServiceVip {
    rt: Option<tokio::runtime::Runtime>,
}

impl ServiceVip {
    /// Listens on `vip` and spreads connections over `backends`.
    pub fn start(vip: SocketAddr, backends: Vec<SocketAddr>) -> anyhow::Result<Self> {
        let rt = own_runtime(&format!("vip-{vip}"))?;
        let listener = std::net::TcpListener::bind(vip)
            .with_context(|| format!("cannot bind the Service address {vip}"))?;
        listener.set_nonblocking(true)?;
        rt.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let mut next = 0usize;
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let start = next;
                next = next.wrapping_add(1);
                let backends = backends.clone();
                tokio::spawn(async move {
                    for i in 0..backends.len() {
                        let b = backends[(start + i) % backends.len()];
                        if let Ok(mut out) = tokio::net::TcpStream::connect(b).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { rt: Some(rt) })
    }
}

/// A runtime on a thread of its own, so that blocking calls from the
/// tests (kubectl) never starve what it serves.
fn own_runtime(name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
}

impl Drop for ServiceVip {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Built without the `kube` feature (the demo binary, which does not carry
/// the stand-in): no cluster can have an API.
#[cfg(not(feature = "kube"))]
#[derive(Debug)]
pub enum KubeApi {}

#[cfg(not(feature = "kube"))]
impl KubeApi {
    pub fn start(_: std::net::SocketAddr, _: &Path, _: &str) -> anyhow::Result<Self> {
        bail!("this build has no kube tier (enable isthmus-e2e's `kube` feature)")
    }
    pub fn kubeconfig(&self) -> &Path {
        match *self {}
    }
    pub fn add_service_account_token(&self, _: &str, _: &str, _: &str) {
        match *self {}
    }
    pub fn kubectl(&self, _: &[&str], _: Option<&str>) -> anyhow::Result<String> {
        match *self {}
    }
}

#[cfg(feature = "kube")]
mod with_api {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use anyhow::Context;
    use isthmus_kube_standin::{ApiServer, TokenInfo};

    /// One cluster's API server.
    #[derive(Debug)]
    pub struct KubeApi {
        rt: Option<tokio::runtime::Runtime>,
        server: Arc<ApiServer>,
        kubeconfig: PathBuf,
    }

    impl KubeApi {
        /// Starts an API server on `addr` (port 0: a free one) and writes a
        /// kubeconfig for it (context `context`) to `kubeconfig`.
        pub fn start(addr: SocketAddr, kubeconfig: &Path, context: &str) -> anyhow::Result<Self> {
            let rt = super::own_runtime(&format!("kube-api-{context}"))?;
            let server = on(&rt, ApiServer::builder().addr(addr).start())?
                .with_context(|| format!("cannot start {context}'s API stand-in on {addr}"))?;
            server.write_kubeconfig(kubeconfig, context)?;
            Ok(Self {
                rt: Some(rt),
                server: Arc::new(server),
                kubeconfig: kubeconfig.to_owned(),
            })
        }

        /// A kubeconfig for this API.
        pub fn kubeconfig(&self) -> &Path {
            &self.kubeconfig
        }

        /// The server itself: its objects and counters.
        pub fn server(&self) -> &ApiServer {
            &self.server
        }

        /// An outage: the API server stops answering and every watch is cut;
        /// its objects stay.
        pub fn stop(&self) -> anyhow::Result<()> {
            let s = self.server.clone();
            on(self.rt(), async move { s.stop().await })
        }

        /// Serves again after [`stop`](Self::stop).
        pub fn resume(&self) -> anyhow::Result<()> {
            let s = self.server.clone();
            on(self.rt(), async move { s.resume().await })?
        }

        /// A projected ServiceAccount token (audience `isthmus-ca`) that this
        /// API's TokenReview accepts for `namespace/sa`.
        pub fn add_service_account_token(&self, token: &str, namespace: &str, sa: &str) {
            self.server.add_token(
                token,
                TokenInfo {
                    username: format!("system:serviceaccount:{namespace}:{sa}"),
                    uid: format!("{namespace}-{sa}"),
                    groups: vec!["system:serviceaccounts".into()],
                    audiences: vec!["isthmus-ca".into()],
                },
            );
        }

        /// Runs stock kubectl against this API; its stdout, or an error with
        /// its stderr.
        pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
            super::kubectl(&self.kubeconfig, None, args, stdin)
        }

        fn rt(&self) -> &tokio::runtime::Runtime {
            self.rt.as_ref().expect("runtime lives until drop")
        }
    }

    impl Drop for KubeApi {
        fn drop(&mut self) {
            if let Some(rt) = self.rt.take() {
                rt.shutdown_background();
            }
        }
    }

    /// Runs `f` on `rt` and waits for it from any thread, async or not.
    fn on<T: Send + 'static>(
        rt: &tokio::runtime::Runtime,
        f: impl Future<Output = T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .context("the API stand-in's runtime did not answer")
    }
}

/// Runs `kubectl --kubeconfig FILE [--context C] ARGS`.
pub fn kubectl(
    kubeconfig: &Path,
    context: Option<&str>,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(kubeconfig);
    if let Some(c) = context {
        cmd.args(["--context", c]);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run kubectl (is it on PATH?)")?;
    let input = child.stdin.take();
    if let (Some(mut i), Some(s)) = (input, stdin) {
        i.write_all(s.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
