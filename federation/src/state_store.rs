//! Where a controller keeps what linking taught it — the link tokens it
//! issued and the peers it linked with — so a restart (a rescheduled pod)
//! keeps its peers.
//!
//! - Files mode: the state directory (`<stateDir>/link-tokens/`,
//!   `<stateDir>/peers/`), as `link.rs` reads and writes it.
//! - Kube mode: Secrets in the controller's namespace, labelled
//!   `isthmus.io/state: link-token` (one per token,
//!   `isthmus-link-<id>`) or `isthmus.io/state: peer` (one per peer,
//!   `isthmus-peer-<cluster>`). Redeeming a token updates its Secret with
//!   optimistic concurrency, so with several replicas a token is still
//!   used once. The controller also publishes what `isthmus link create`
//!   needs to print a token (its cluster's name, trust domain, address,
//!   root fingerprint) in the ConfigMap [`CLUSTER_INFO`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};

use crate::k8s::{self, FIELD_MANAGER};
use crate::link::{IssuedToken, PeerFile, Token, TokenError, TokenStore, check_redeem};

/// The label saying what a state Secret holds.
pub const STATE_LABEL: &str = "isthmus.io/state";
/// The ConfigMap with this cluster's link details.
pub const CLUSTER_INFO: &str = "isthmus-cluster";

/// A controller's link tokens and linked peers.
#[derive(Clone)]
pub enum StateStore {
    Dir(PathBuf),
    Secrets {
        client: kube::Client,
        namespace: String,
    },
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What `isthmus link create` puts in a token, as the controller
/// publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    pub cluster: String,
    pub trust_domain: String,
    /// Where peers reach the controller (empty: not reachable, no token
    /// can be made).
    pub address: String,
    pub identity: String,
    pub root_fingerprint: String,
}

fn secret_data(key: &str, bytes: Vec<u8>) -> BTreeMap<String, ByteString> {
    BTreeMap::from([(key.to_owned(), ByteString(bytes))])
}

fn state_secret(name: String, namespace: &str, kind: &str, key: &str, bytes: Vec<u8>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (STATE_LABEL.to_owned(), kind.to_owned()),
                (
                    crate::sink::service_entry::MANAGED_BY.0.to_owned(),
                    crate::sink::service_entry::MANAGED_BY.1.to_owned(),
                ),
            ])),
            ..Default::default()
        },
        data: Some(secret_data(key, bytes)),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

fn peer_secret_name(cluster: &str) -> String {
    format!("isthmus-peer-{cluster}")
}

fn token_secret_name(token_id: &str) -> String {
    format!("isthmus-link-{}", token_id.to_ascii_lowercase())
}

impl StateStore {
    pub fn describe(&self) -> String {
        match self {
            StateStore::Dir(d) => format!("state directory {}", d.display()),
            StateStore::Secrets { namespace, .. } => {
                format!("Secrets labelled {STATE_LABEL} in namespace {namespace}")
            }
        }
    }

    /// The Secrets API and namespace, or the state directory.
    fn secrets(&self) -> Result<(Api<Secret>, &str), &std::path::Path> {
        match self {
            StateStore::Dir(d) => Err(d),
            StateStore::Secrets { client, namespace } => {
                Ok((Api::namespaced(client.clone(), namespace), namespace))
            }
        }
    }

    /// Every linked (or pending) peer.
    pub async fn peers(&self) -> Result<Vec<PeerFile>, String> {
        let (api, _) = match self.secrets() {
            Ok(s) => s,
            Err(d) => {
                return Ok(PeerFile::load_all(d));
            }
        };
        let list = api
            .list(&ListParams::default().labels(&format!("{STATE_LABEL}=peer")))
            .await
            .map_err(|e| k8s::explain(&e, "list", "secrets"))?;
        let mut out = Vec::new();
        for s in list.items {
            let name = s.metadata.name.clone().unwrap_or_default();
            let Some(bytes) = s.data.and_then(|mut d| d.remove("peer.yaml")) else {
                tracing::warn!(secret = %name, "peer Secret without peer.yaml; skipped");
                continue;
            };
            match std::str::from_utf8(&bytes.0)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_saphyr::from_str::<PeerFile>(t).map_err(|e| e.to_string()))
            {
                Ok(p) => out.push(p),
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "unreadable peer Secret skipped")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Records a peer (new, linked, or failed).
    pub async fn write_peer(&self, p: &PeerFile) -> Result<(), String> {
        let (api, ns) = match self.secrets() {
            Ok(s) => s,
            Err(d) => {
                return p.write(d).map_err(|e| e.to_string());
            }
        };
        let text = serde_saphyr::to_string(p).map_err(|e| e.to_string())?;
        let secret = state_secret(
            peer_secret_name(&p.name),
            ns,
            "peer",
            "peer.yaml",
            text.into_bytes(),
        );
        api.patch(
            &peer_secret_name(&p.name),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map(|_| ())
        .map_err(|e| k8s::explain(&e, "patch", "secrets"))
    }

    /// Records a newly created token.
    pub async fn add_token(&self, t: &Token) -> Result<(), String> {
        let (api, ns) = match self.secrets() {
            Ok(s) => s,
            Err(d) => {
                return TokenStore::new(d).add(t).map_err(|e| e.to_string());
            }
        };
        // Forget tokens that expired a day ago or more.
        if let Ok(old) = api
            .list(&ListParams::default().labels(&format!("{STATE_LABEL}=link-token")))
            .await
        {
            for s in old.items {
                let expired = s
                    .data
                    .as_ref()
                    .and_then(|d| d.get("token.json"))
                    .and_then(|b| serde_json::from_slice::<IssuedToken>(&b.0).ok())
                    .is_some_and(|t| t.is_old());
                if let (true, Some(name)) = (expired, s.metadata.name) {
                    let _ = api.delete(&name, &Default::default()).await;
                }
            }
        }
        let json = serde_json::to_vec(&IssuedToken::new(t)).map_err(|e| e.to_string())?;
        let secret = state_secret(
            token_secret_name(&t.payload.token_id),
            ns,
            "link-token",
            "token.json",
            json,
        );
        api.create(&PostParams::default(), &secret)
            .await
            .map(|_| ())
            .map_err(|e| k8s::explain(&e, "create", "secrets"))
    }

    /// Checks a Link request and marks its token used (once, whichever
    /// replica serves it).
    pub async fn redeem(
        &self,
        token_id: &str,
        presented: &str,
        joining_cluster: &str,
        proof: &[u8],
    ) -> Result<(), TokenError> {
        let (api, _) = match self.secrets() {
            Ok(s) => s,
            Err(d) => {
                return TokenStore::new(d).redeem(token_id, presented, joining_cluster, proof);
            }
        };
        if token_id.is_empty() || !token_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(TokenError::Unknown(token_id.to_owned()));
        }
        let name = token_secret_name(token_id);
        // A concurrent redeem on another replica: re-read and check again.
        for _ in 0..3 {
            let Ok(Some(mut secret)) = api.get_opt(&name).await else {
                return Err(TokenError::Unknown(token_id.to_owned()));
            };
            let Some(mut t) = secret
                .data
                .as_ref()
                .and_then(|d| d.get("token.json"))
                .and_then(|b| serde_json::from_slice::<IssuedToken>(&b.0).ok())
            else {
                return Err(TokenError::Unknown(token_id.to_owned()));
            };
            if !check_redeem(&mut t, presented, joining_cluster, proof)? {
                return Ok(());
            }
            let json =
                serde_json::to_vec(&t).map_err(|_| TokenError::Unknown(token_id.to_owned()))?;
            secret.data = Some(secret_data("token.json", json));
            match api.replace(&name, &PostParams::default(), &secret).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(_) => return Err(TokenError::Unknown(token_id.to_owned())),
            }
        }
        Err(TokenError::Unknown(token_id.to_owned()))
    }
}

/// Publishes this cluster's link details (kube mode), writing only when
/// they differ from what the ConfigMap holds.
pub async fn publish_cluster_info(
    client: &kube::Client,
    namespace: &str,
    info: &ClusterInfo,
) -> Result<(), String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let json = serde_json::to_string(info).map_err(|e| e.to_string())?;
    let current = api
        .get_opt(CLUSTER_INFO)
        .await
        .map_err(|e| k8s::explain(&e, "get", "configmaps"))?;
    if current
        .and_then(|c| c.data)
        .and_then(|mut d| d.remove("cluster.json"))
        .as_deref()
        == Some(json.as_str())
    {
        return Ok(());
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CLUSTER_INFO.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("cluster.json".to_owned(), json)])),
        ..Default::default()
    };
    api.patch(
        CLUSTER_INFO,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
    .map_err(|e| k8s::explain(&e, "patch", "configmaps"))
}

/// Reads a cluster's link details (for `isthmus link create --context`).
pub async fn cluster_info(client: &kube::Client, namespace: &str) -> Result<ClusterInfo, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api
        .get_opt(CLUSTER_INFO)
        .await
        .map_err(|e| k8s::explain(&e, "get", "configmaps"))?
        .ok_or_else(|| {
            format!(
                "no ConfigMap {namespace}/{CLUSTER_INFO}: is the Isthmus controller running in this cluster (namespace {namespace})?"
            )
        })?;
    let text = cm
        .data
        .and_then(|mut d| d.remove("cluster.json"))
        .ok_or_else(|| format!("ConfigMap {namespace}/{CLUSTER_INFO} has no cluster.json"))?;
    serde_json::from_str(&text).map_err(|e| format!("ConfigMap {namespace}/{CLUSTER_INFO}: {e}"))
}

/// `isthmus link create` against a cluster's API: a token from the link
/// details its controller published, recorded as a Secret there.
pub async fn create_token(
    source: &crate::config::KubeSource,
    namespace: &str,
    ttl: std::time::Duration,
) -> Result<(Token, ClusterInfo), String> {
    let (client, _) = crate::k8s::client(source)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let client = &client;
    let info = cluster_info(client, namespace).await?;
    if info.address.is_empty() {
        return Err(format!(
            "the controller of cluster {} has no address peers can dial; set advertiseAddress in its config",
            info.cluster
        ));
    }
    let token = Token::create(
        &info.cluster,
        &info.trust_domain,
        &info.address,
        &info.identity,
        &info.root_fingerprint,
        ttl,
    );
    StateStore::Secrets {
        client: client.clone(),
        namespace: namespace.to_owned(),
    }
    .add_token(&token)
    .await?;
    Ok((token, info))
}

/// `isthmus link apply` against a cluster's API: a pending peer Secret
/// its controller redeems. Returns this cluster's name.
pub async fn apply_token(
    source: &crate::config::KubeSource,
    namespace: &str,
    token: &Token,
) -> Result<String, String> {
    let (client, _) = crate::k8s::client(source)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let client = &client;
    let info = cluster_info(client, namespace).await?;
    if token.payload.cluster == info.cluster {
        return Err(format!(
            "this token was created by cluster {} itself; apply it in the other cluster",
            info.cluster
        ));
    }
    StateStore::Secrets {
        client: client.clone(),
        namespace: namespace.to_owned(),
    }
    .write_peer(&PeerFile::pending(token))
    .await?;
    Ok(info.cluster)
}
