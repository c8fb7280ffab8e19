//! rustls verifiers for SPIFFE identities.
//!
//! Both directions run the same check ([`TrustStore::verify_peer`]):
//! 1. the leaf carries exactly one URI SAN, and it is a well-formed SPIFFE
//!    ID (no NUL bytes, no odd paths: see [`super::spiffe`]);
//! 2. the chain verifies against the bundle **of that ID's trust domain**
//!    only, at the handshake's time, with the right key usage;
//! 3. a cluster-bound identity (gateway, controller) must be issued by the
//!    intermediate CA of the cluster it names, so in a shared-root mesh one
//!    cluster's CA cannot mint another cluster's gateway;
//! 4. the identity matches what the caller expects ([`Expect`]).
//!
//! The verified identity reaches the caller through [`peer_identity`].

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::spiffe::{Role, SpiffeId, SpiffeIdError, TrustDomain};
use super::trust::TrustStore;

/// Why a peer certificate was refused. Messages say what to check.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("peer certificate is not valid X.509: {0}")]
    Malformed(String),
    #[error(
        "peer certificate has no spiffe:// URI SAN; it was not issued by an Isthmus or SPIFFE CA"
    )]
    NoUriSan,
    #[error("peer certificate has {0} URI SANs; an X.509-SVID must have exactly one")]
    MultipleUriSans(usize),
    #[error("peer certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(#[source] SpiffeIdError),
    #[error(
        "no trust bundle for trust domain {0}: link that cluster (`isthmus link`) or add its root to the trust bundles"
    )]
    UnknownTrustDomain(TrustDomain),
    #[error("certificate of {id} has expired; check its rotation (and the clocks)")]
    Expired { id: SpiffeId },
    #[error("certificate of {id} is not valid yet; check the clocks of both hosts")]
    NotYetValid { id: SpiffeId },
    #[error(
        "certificate of {id} does not chain to a root of trust domain {td}: {detail}; was it issued by another trust domain's CA?"
    )]
    Untrusted {
        id: SpiffeId,
        td: TrustDomain,
        detail: String,
    },
    #[error(
        "certificate of {id} is bound to cluster {cluster:?} but was not issued by that cluster's CA"
    )]
    ClusterBinding { id: SpiffeId, cluster: String },
    #[error("peer is {got}, but {want} was expected")]
    Unexpected { got: SpiffeId, want: String },
}

/// The identities a verifier accepts, after the chain checks.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Any identity of any trust domain in the store (inbound sidecars:
    /// AuthorizationPolicy decides later).
    AnyTrusted,
    /// Exactly this identity (a client dialing a known server).
    Exactly(SpiffeId),
    /// One of a set that may change at run time (a gateway accepting the
    /// configured peers' gateways).
    OneOf(Arc<RwLock<BTreeSet<SpiffeId>>>),
    /// Any workload of this namespace, in any trusted domain (a sidecar
    /// dialing an endpoint of a service: namespace sameness across
    /// clusters).
    InNamespace(String),
}

impl Expect {
    fn check(&self, id: &SpiffeId) -> Result<(), VerifyError> {
        let ok = match self {
            Expect::AnyTrusted => true,
            Expect::Exactly(want) => want == id,
            Expect::OneOf(set) => set.read().unwrap_or_else(|e| e.into_inner()).contains(id),
            Expect::InNamespace(ns) => {
                matches!(id.role(), Role::Workload { namespace, .. } if namespace == ns)
            }
        };
        if ok {
            return Ok(());
        }
        let want = match self {
            Expect::AnyTrusted => unreachable!("AnyTrusted accepts every identity"),
            Expect::Exactly(w) => w.to_string(),
            Expect::OneOf(set) => {
                let set = set.read().unwrap_or_else(|e| e.into_inner());
                let names: Vec<String> = set.iter().map(|s| s.to_string()).collect();
                format!("one of [{}]", names.join(", "))
            }
            Expect::InNamespace(ns) => format!("a workload of namespace {ns}"),
        };
        Err(VerifyError::Unexpected {
            got: id.clone(),
            want,
        })
    }
}

/// Every URI SAN of a parsed certificate.
pub(crate) fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, VerifyError> {
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push((*uri).to_owned());
                    }
                }
            }
            ParsedExtension::ParseError { error }
                if ext.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME =>
            {
                return Err(VerifyError::Malformed(format!("subjectAltName: {error}")));
            }
            _ => {}
        }
    }
    Ok(uris)
}

/// The SPIFFE ID of a leaf certificate, without checking its chain.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let uris = uri_sans(&parsed)?;
    match uris.as_slice() {
        [] => Err(VerifyError::NoUriSan),
        [one] => one.parse().map_err(VerifyError::InvalidSpiffeId),
        many => Err(VerifyError::MultipleUriSans(many.len())),
    }
}

/// Which side of the handshake is being verified (the EKU it needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a TLS server.
    Server,
    /// The peer is a TLS client.
    Client,
}

impl TrustStore {
    /// Verifies a peer's chain and returns its SPIFFE ID (see the module
    /// docs for the checks, in order).
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
        sig_algs: &WebPkiSupportedAlgorithms,
        expect: &Expect,
    ) -> Result<SpiffeId, VerifyError> {
        let id = spiffe_id_of(end_entity)?;
        let entry = self
            .get(id.trust_domain())
            .ok_or_else(|| VerifyError::UnknownTrustDomain(id.trust_domain().clone()))?;
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| VerifyError::Malformed(format!("{e:?}")))?;
        let eku = match usage {
            Usage::Server => webpki::KeyUsage::server_auth(),
            Usage::Client => webpki::KeyUsage::client_auth(),
        };
        let bound_cluster = id.bound_cluster().map(str::to_owned);
        let binding_ok = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
            let Some(cluster) = &bound_cluster else {
                return Ok(());
            };
            // The leaf's direct issuer must be the named cluster's CA.
            let issuer = path
                .intermediate_certificates()
                .next()
                .ok_or(webpki::Error::UnknownIssuer)?;
            match spiffe_id_of(&issuer.der()) {
                Ok(ca_id)
                    if ca_id.trust_domain() == id.trust_domain()
                        && ca_id.role() == (Role::ClusterCa { cluster }) =>
                {
                    Ok(())
                }
                _ => Err(webpki::Error::UnknownIssuer),
            }
        };
        let result = ee.verify_for_usage(
            sig_algs.all,
            &entry.anchors,
            intermediates,
            now,
            eku,
            None,
            Some(&binding_ok),
        );
        if let Err(e) = result {
            return Err(match e {
                webpki::Error::CertExpired { .. } => VerifyError::Expired { id },
                webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid { id },
                webpki::Error::UnknownIssuer if bound_cluster.is_some() => {
                    // Tell apart "no path at all" from "a path, but not
                    // through the right cluster CA".
                    let any_path = ee
                        .verify_for_usage(
                            sig_algs.all,
                            &entry.anchors,
                            intermediates,
                            now,
                            eku,
                            None,
                            None,
                        )
                        .is_ok();
                    if any_path {
                        VerifyError::ClusterBinding {
                            cluster: bound_cluster.unwrap_or_default(),
                            id,
                        }
                    } else {
                        VerifyError::Untrusted {
                            td: id.trust_domain().clone(),
                            id,
                            detail: format!("{e:?}"),
                        }
                    }
                }
                other => VerifyError::Untrusted {
                    td: id.trust_domain().clone(),
                    id,
                    detail: format!("{other:?}"),
                },
            });
        }
        expect.check(&id)?;
        Ok(id)
    }
}

/// Carries a [`VerifyError`] inside a rustls error. rustls prints the
/// inner error with `Debug`, so `Debug` here is the operator's message.
struct Reason(VerifyError);

impl std::fmt::Debug for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Reason {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        let ce = match e {
            // Standard variants send the standard alerts to the peer.
            VerifyError::Expired { .. } => CertificateError::Expired,
            VerifyError::NotYetValid { .. } => CertificateError::NotValidYet,
            other => CertificateError::Other(rustls::OtherError(Arc::new(Reason(other)))),
        };
        rustls::Error::InvalidCertificate(ce)
    }
}

/// The SPIFFE ID of the peer of an established TLS session (QUIC or TCP).
/// The chain was checked during the handshake by one of the verifiers
/// below; this only reads the identity back out.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, VerifyError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(VerifyError::NoCertificate)?;
    spiffe_id_of(leaf)
}

/// The handshake-signature methods every verifier here shares: checked
/// with the provider's algorithms held in `self.algs`.
macro_rules! handshake_signatures_via_algs {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Verifies servers for a client (implements rustls's
/// [`ServerCertVerifier`]). The TLS server name is ignored: SPIFFE
/// identities live in the URI SAN, and [`Expect`] pins them.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    store: Arc<TrustStore>,
    expect: Expect,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(store: Arc<TrustStore>, expect: Expect, provider: &CryptoProvider) -> Self {
        Self {
            store,
            expect,
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.store
            .verify_peer(
                end_entity,
                intermediates,
                now,
                Usage::Server,
                &self.algs,
                &self.expect,
            )
            .map_err(|e| {
                tracing::debug!(error = %e, "refused server certificate");
                e
            })?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_via_algs!();
}

/// Verifies a server during first contact (link), before its trust
/// bundle is known: the presented chain must contain a root whose SHA-256
/// fingerprint is `fingerprint`, and verify to it as `expect`. The server
/// sends its root in its chain for this.
#[derive(Debug)]
pub struct PinnedRootVerifier {
    fingerprint: String,
    expect: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedRootVerifier {
    pub fn new(fingerprint: &str, expect: SpiffeId, provider: &CryptoProvider) -> Self {
        Self {
            fingerprint: fingerprint.to_ascii_lowercase(),
            expect,
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedRootVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let root = intermediates
            .iter()
            .find(|c| super::trust::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::from(VerifyError::Untrusted {
                    id: self.expect.clone(),
                    td: self.expect.trust_domain().clone(),
                    detail: format!(
                        "no certificate in the server's chain has the token's root fingerprint {}",
                        self.fingerprint
                    ),
                })
            })?;
        let bundle = super::trust::TrustBundle::new(
            self.expect.trust_domain().clone(),
            vec![root.clone().into_owned()],
            1,
        );
        let store = TrustStore::with_bundles([bundle])
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        store.verify_peer(
            end_entity,
            intermediates,
            now,
            Usage::Server,
            &self.algs,
            &Expect::Exactly(self.expect.clone()),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_via_algs!();
}

/// Verifies clients for a server (implements rustls's
/// [`ClientCertVerifier`]); client certificates are mandatory.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    store: Arc<TrustStore>,
    expect: Expect,
    algs: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    pub fn new(store: Arc<TrustStore>, expect: Expect, provider: &CryptoProvider) -> Self {
        Self {
            store,
            expect,
            algs: provider.signature_verification_algorithms,
            mandatory: true,
        }
    }

    /// Lets clients connect without a certificate (a presented one is
    /// still verified in full). The application must then refuse
    /// anonymous requests where it needs an identity.
    pub fn optional(mut self) -> Self {
        self.mandatory = false;
        self
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients have exactly one identity to present, and
        // listing every peer's root would leak the federation's shape.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.store
            .verify_peer(
                end_entity,
                intermediates,
                now,
                Usage::Client,
                &self.algs,
                &self.expect,
            )
            .map_err(|e| {
                tracing::debug!(error = %e, "refused client certificate");
                e
            })?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_via_algs!();
}
