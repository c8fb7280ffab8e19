//! The CA service (`isthmus.ca.v1.CertificateService`) on the local port:
//! signs CSRs of this cluster's workloads and gateway with the cluster CA.
//!
//! Files mode authenticates callers with bootstrap tokens: a file
//! (`caTokens` in the config) of lines `<token> <identity>`, where the
//! identity is `<namespace>/<serviceAccount>` or `gateway`. The caller
//! sends `authorization: Bearer <token>`; the certificate names the
//! identity the token maps to, never what the CSR asks for (a CSR naming
//! another identity is refused). Kubernetes mode will check a projected
//! ServiceAccount token with a TokenReview instead (docs/architecture.md).

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

/// The CA service.
#[derive(Debug, Clone)]
pub struct CaService {
    pub ca: Arc<ClusterCa>,
    pub tokens_file: PathBuf,
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
        // Read at each request: tokens can be added without a restart.
        let tokens = load_tokens(&self.tokens_file, &self.ca).map_err(|e| {
            warn!(error = %e, "CA token file unusable");
            Status::unavailable("the CA's token file is unusable; see the controller's log")
        })?;
        let Some(id) = tokens.get(&token).cloned() else {
            return Err(Status::unauthenticated("unknown bootstrap token"));
        };
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
