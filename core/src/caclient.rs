//! A [`CertificateSigner`] that asks the controller's CA service (local
//! port) to sign, authenticated with a bootstrap token.

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_proto::ca::v1::SignRequest;
use isthmus_proto::ca::v1::certificate_service_client::CertificateServiceClient;
use rustls_pki_types::CertificateSigningRequestDer;

use crate::identity::SpiffeId;
use crate::identity::ca::IssuedChain;
use crate::identity::pem::{certs_from_pem, encode};
use crate::identity::rotation::{CertificateSigner, SignError, SignFuture};

/// The token a caller presents to the CA service.
#[derive(Clone)]
pub enum BearerToken {
    /// A bootstrap token, as is.
    Static(String),
    /// A file read at every request: a projected ServiceAccount token,
    /// which the kubelet rotates in place.
    File(std::path::PathBuf),
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        match self {
            BearerToken::Static(_) => f.write_str("BearerToken::Static(..)"),
            BearerToken::File(p) => f.debug_tuple("BearerToken::File").field(p).finish(),
        }
    }
}

impl From<&str> for BearerToken {
    fn from(s: &str) -> Self {
        BearerToken::Static(s.to_owned())
    }
}

impl BearerToken {
    fn read(&self) -> Result<String, SignError> {
        match self {
            BearerToken::Static(s) => Ok(s.clone()),
            BearerToken::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_owned())
                .map_err(|e| {
                    SignError::Remote(format!("cannot read tokenFile {}: {e}", p.display()))
                }),
        }
    }
}

/// Signs through the CA service at `addr`.
#[derive(Clone)]
pub struct RemoteSigner {
    pub addr: SocketAddr,
    pub token: BearerToken,
    /// TLS to the controller's local port; checks the server is this
    /// cluster's controller (no client certificate: that is what is being
    /// asked for).
    pub tls: rustls::ClientConfig,
}

impl std::fmt::Debug for RemoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the token.
        f.debug_struct("RemoteSigner")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl CertificateSigner for RemoteSigner {
    fn sign(
        &self,
        csr: CertificateSigningRequestDer<'static>,
        id: SpiffeId,
        ttl: Duration,
    ) -> SignFuture {
        let this = self.clone();
        Box::pin(async move {
            let remote = |e: String| SignError::Remote(format!("{}: {e}", this.addr));
            let channel = crate::tls::grpc_channel(this.addr.to_string(), this.tls.clone())
                .map_err(|e| remote(format!("cannot reach the CA service: {e}")))?;
            let mut req = tonic::Request::new(SignRequest {
                csr_pem: encode("CERTIFICATE REQUEST", csr.as_ref()),
                requested_ttl_seconds: ttl.as_secs(),
            });
            let bearer = format!("Bearer {}", this.token.read()?)
                .parse()
                .map_err(|_| {
                    SignError::Remote("the token has characters not allowed in a header".into())
                })?;
            req.metadata_mut().insert("authorization", bearer);
            let resp = CertificateServiceClient::new(channel)
                .sign(req)
                .await
                .map_err(|s| remote(format!("{:?}: {}", s.code(), s.message())))?
                .into_inner();
            let got: SpiffeId = resp
                .spiffe_id
                .parse()
                .map_err(|e| SignError::Unusable(format!("{e}")))?;
            if got != id {
                return Err(SignError::Unusable(format!(
                    "asked for {id}, the CA issued {got}"
                )));
            }
            let chain = resp
                .cert_chain_pem
                .iter()
                .map(|p| certs_from_pem(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(SignError::Unusable)?
                .into_iter()
                .flatten()
                .collect::<Vec<_>>();
            let root = resp
                .root_certs_pem
                .first()
                .and_then(|p| certs_from_pem(p).ok()?.into_iter().next())
                .ok_or_else(|| SignError::Unusable("no root in the answer".into()))?;
            if chain.is_empty() {
                return Err(SignError::Unusable("empty chain".into()));
            }
            let not_after = time::OffsetDateTime::from_unix_timestamp(resp.not_after_unix)
                .map_err(|e| SignError::Unusable(e.to_string()))?;
            Ok(IssuedChain {
                chain,
                root,
                id,
                not_before: time::OffsetDateTime::now_utc(),
                not_after,
            })
        })
    }
}
