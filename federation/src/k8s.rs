//! The controller's Kubernetes client (kube-rs): connecting, the
//! resources it reads and writes, and errors explained for operators
//! (which verb on which resource RBAC refused, which CRD is missing).

use kube::core::{ApiResource, GroupVersionKind};

use crate::config::KubeSource;
use crate::objects::Kind;

/// The ClusterRole a controller's ServiceAccount needs (in `deploy/`).
pub const CLUSTER_ROLE: &str = "isthmus-controller";

/// The field manager of every write: `kubectl get -o yaml
/// --show-managed-fields` shows which fields Isthmus owns.
pub const FIELD_MANAGER: &str = "isthmus";

/// A client for the configured cluster: the kubeconfig (and context)
/// given, else the in-cluster configuration, else `$KUBECONFIG` /
/// `~/.kube/config`.
/// Returns the client and the API server's URL.
pub async fn client(cfg: &KubeSource) -> anyhow::Result<(kube::Client, String)> {
    use anyhow::Context as _;
    let options = kube::config::KubeConfigOptions {
        context: cfg.context.clone(),
        ..Default::default()
    };
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).with_context(|| {
                format!(
                    "source.kube.kubeconfig: cannot read {}; check the path and that it is a kubeconfig",
                    path.display()
                )
            })?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .with_context(|| {
                    format!(
                        "source.kube: the kubeconfig {} has no usable context {:?}",
                        path.display(),
                        cfg.context.as_deref().unwrap_or("(current)")
                    )
                })?
        }
        None if cfg.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("source.kube.context: not found in $KUBECONFIG or ~/.kube/config")?,
        None => kube::Config::infer().await.context(
            "source.kube: no in-cluster configuration (not in a pod?) and no kubeconfig; set source.kube.kubeconfig",
        )?,
    };
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .context("source.kube: cannot build the Kubernetes client")?;
    Ok((client, url))
}

/// The API resource of a kind, at `version` (the served one for
/// ServiceExport) or the kind's usual version.
pub fn api_resource(kind: Kind, version: Option<&str>) -> ApiResource {
    let (group, default_version, plural) = kind.api();
    let gvk = GroupVersionKind::gvk(
        group,
        version.unwrap_or(default_version),
        &format!("{kind:?}"),
    );
    ApiResource::from_gvk_with_plural(&gvk, plural)
}

/// The version of `multicluster.x-k8s.io` the server serves (v1beta1
/// preferred), if it serves the group.
pub async fn mcs_version(client: &kube::Client) -> Option<String> {
    let group = kube::discovery::group(client, "multicluster.x-k8s.io")
        .await
        .ok()?;
    let versions: Vec<String> = group.versions().map(str::to_owned).collect();
    ["v1beta1", "v1alpha1"]
        .into_iter()
        .find(|v| versions.iter().any(|s| s == v))
        .map(str::to_owned)
}

/// `plural.group` (`plural` for the core group), as RBAC and messages
/// name a resource.
pub fn qualified(ar: &ApiResource) -> String {
    if ar.group.is_empty() {
        ar.plural.clone()
    } else {
        format!("{}.{}", ar.plural, ar.group)
    }
}

/// How to install the CRD that serves a kind, for the "not installed"
/// error.
pub fn install_hint(kind: Kind) -> &'static str {
    match kind {
        Kind::ServiceExport => {
            "install the Multi-Cluster Services CRDs (sigs.k8s.io/mcs-api: serviceexports.multicluster.x-k8s.io, serviceimports.multicluster.x-k8s.io)"
        }
        Kind::DestinationRule
        | Kind::VirtualService
        | Kind::PeerAuthentication
        | Kind::AuthorizationPolicy => {
            "install Istio's CRDs (istioctl install, or the istio/base Helm chart)"
        }
        _ => "this is a built-in kind: check that the API server is a Kubernetes API server",
    }
}

/// The API's status code of an error, if it came from the API server.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// An operator's explanation of a failed request: what failed, where,
/// what to check.
pub fn explain(e: &kube::Error, verb: &str, resource: &str) -> String {
    match e {
        kube::Error::Api(s) => match s.code {
            403 => format!(
                "{verb} {resource} forbidden: {}; grant the controller's ServiceAccount `{verb}` on `{resource}` (the ClusterRole {CLUSTER_ROLE})",
                s.message
            ),
            404 => format!(
                "{verb} {resource}: not found on the API server ({})",
                s.message
            ),
            409 => format!("{verb} {resource}: conflict: {}", s.message),
            429 => format!(
                "{verb} {resource}: the API server is throttling requests (429); retrying with backoff"
            ),
            c if c >= 500 => format!(
                "{verb} {resource}: the API server failed ({c}: {}); retrying with backoff",
                s.message
            ),
            c => format!("{verb} {resource}: {c} {}: {}", s.reason, s.message),
        },
        other => format!(
            "{verb} {resource}: cannot reach the API server ({other}); check its address in the kubeconfig (or the in-cluster service) and the network"
        ),
    }
}
