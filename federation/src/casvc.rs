//! The CA service (`isthmus.ca.v1.CertificateService`) on the local port:
//! signs CSRs of this cluster's workloads and gateway with the cluster CA.
//!
//! Files mode authenticates callers with bootstrap tokens: a file
//! (`caTokens` in the config) of lines `<token> <identity>`, where the
//! identity is `<namespace>/<serviceAccount>` or `gateway`. The caller
//! sends `authorization: Bearer <token>`; the certificate names the
//! identity the token maps to, never what the CSR asks for (a CSR naming
//! another identity is refused).
//!
//! Kubernetes mode checks the caller's projected ServiceAccount token
//! (audience [`CA_AUDIENCE`]) with a TokenReview instead: the API server
//! says whose token it is, and the certificate names that ServiceAccount
//! (`spiffe://<td>/ns/<ns>/sa/<sa>`), or the gateway's identity for the
//! gateway's ServiceAccount. A token for another audience, an expired or
//! forged one, is refused with the API server's reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::ca::DEFAULT_LEAF_TTL;
use isthmus_core::identity::pem::cert_to_pem;
use isthmus_core::identity::{ClusterCa, SpiffeId};
use isthmus_proto::ca::v1::certificate_service_server::CertificateService;
use isthmus_proto::ca::v1::{SignRequest, SignResponse};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// Parses a token file into token → identity.
pub fn load_tokens(path: &Path, ca: &ClusterCa) -> Result<BTreeMap<String, SpiffeId>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read caTokens {}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| {
            format!(
                "{}:{}: {why}; write `<token> <namespace>/<serviceAccount>` or `<token> gateway`",
                path.display(),
                n + 1
            )
        };
        let (token, who) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad("expected two fields"))?;
        let who = who.trim();
        let id = if who == "gateway" {
            SpiffeId::gateway(ca.trust_domain(), ca.cluster())
        } else {
            let (ns, sa) = who
                .split_once('/')
                .ok_or_else(|| bad("identity is not namespace/serviceAccount"))?;
            SpiffeId::workload(ca.trust_domain(), ns, sa)
        }
        .map_err(|e| bad(&e.to_string()))?;
        if token.len() < 16 {
            return Err(bad("token shorter than 16 characters"));
        }
        out.insert(token.to_owned(), id);
    }
    Ok(out)
}

/// The audience a projected ServiceAccount token must carry for the CA.
pub const CA_AUDIENCE: &str = "isthmus-ca";

/// How the CA service learns who a caller is.
#[derive(Clone)]
pub enum Authenticator {
    /// Bootstrap tokens from a file, re-read at each request.
    TokenFile(PathBuf),
    /// Projected ServiceAccount tokens, checked with a TokenReview.
    TokenReview {
        client: kube::Client,
        /// The gateway's ServiceAccount (namespace, name): its token gets
        /// the cluster's gateway identity.
        gateway: (String, String),
    },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::TokenFile(p) => f.debug_tuple("TokenFile").field(p).finish(),
            Authenticator::TokenReview { gateway, .. } => f
                .debug_struct("TokenReview")
                .field("gateway", gateway)
                .finish_non_exhaustive(),
        }
    }
}

impl Authenticator {
    /// The identity `token` proves.
    async fn identify(&self, token: &str, ca: &ClusterCa) -> Result<SpiffeId, Status> {
        match self {
            Authenticator::TokenFile(path) => {
                // Read at each request: tokens can be added without a restart.
                let tokens = load_tokens(path, ca).map_err(|e| {
                    warn!(error = %e, "CA token file unusable");
                    Status::unavailable("the CA's token file is unusable; see the controller's log")
                })?;
                tokens
                    .get(token)
                    .cloned()
                    .ok_or_else(|| Status::unauthenticated("unknown bootstrap token"))
            }
            Authenticator::TokenReview { client, gateway } => {
                let (ns, sa) = token_review(client, token).await?;
                if (ns.as_str(), sa.as_str()) == (gateway.0.as_str(), gateway.1.as_str()) {
                    SpiffeId::gateway(ca.trust_domain(), ca.cluster())
                } else {
                    SpiffeId::workload(ca.trust_domain(), &ns, &sa)
                }
                .map_err(|e| Status::permission_denied(e.to_string()))
            }
        }
    }
}

/// Asks the API server whose token this is: (namespace, ServiceAccount).
async fn token_review(client: &kube::Client, token: &str) -> Result<(String, String), Status> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![CA_AUDIENCE.to_owned()]),
        },
        ..Default::default()
    };
    let done = api
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| {
            let why = crate::k8s::explain(&e, "create", "tokenreviews.authentication.k8s.io");
            warn!(error = %why, "cannot review a CA caller's token");
            Status::unavailable(format!("cannot check the token: {why}"))
        })?;
    let status = done.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Status::unauthenticated(format!(
            "the API server refused the token: {} (a sidecar presents its projected ServiceAccount token with audience {CA_AUDIENCE})",
            status.error.unwrap_or_else(|| "not authenticated".into())
        )));
    }
    if status
        .audiences
        .as_ref()
        .is_some_and(|a| !a.iter().any(|a| a == CA_AUDIENCE))
    {
        return Err(Status::unauthenticated(format!(
            "the token is not for audience {CA_AUDIENCE}"
        )));
    }
    let user = status.user.and_then(|u| u.username).unwrap_or_default();
    let mut parts = user
        .strip_prefix("system:serviceaccount:")
        .unwrap_or("")
        .splitn(2, ':');
    match (parts.next(), parts.next()) {
        (Some(ns), Some(sa)) if !ns.is_empty() && !sa.is_empty() => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        _ => Err(Status::permission_denied(format!(
            "{user:?} is not a ServiceAccount; only ServiceAccount tokens get workload certificates"
        ))),
    }
}

/// The CA service.
#[derive(Debug, Clone)]
pub struct CaService {
    pub ca: Arc<ClusterCa>,
    pub auth: Authenticator,
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        let id = self.auth.identify(&token, &self.ca).await?;
        let req = request.into_inner();
        let csr =
            CertificateSigningRequestDer::from_pem_slice(req.csr_pem.as_bytes()).map_err(|e| {
                Status::invalid_argument(format!("csr_pem is not a PEM CERTIFICATE REQUEST: {e}"))
            })?;
        // A workload may ask for a shorter life, never a longer one.
        let ttl = match req.requested_ttl_seconds {
            0 => DEFAULT_LEAF_TTL,
            s => Duration::from_secs(s).min(DEFAULT_LEAF_TTL),
        };
        let issued = self
            .ca
            .sign_csr(&csr, &id, ttl)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        info!(identity = %id, not_after = %issued.not_after, "certificate issued");
        Ok(Response::new(SignResponse {
            cert_chain_pem: issued.chain.iter().map(cert_to_pem).collect(),
            root_certs_pem: vec![cert_to_pem(&issued.root)],
            spiffe_id: id.to_string(),
            not_after_unix: issued.not_after.unix_timestamp(),
        }))
    }
}
