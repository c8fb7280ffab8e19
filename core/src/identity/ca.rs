//! The certificate hierarchy: one root per trust domain, one intermediate
//! per cluster, short-lived leaves signed from CSRs.
//!
//! Files follow Istio's `cacerts` layout, so operators recognise them and
//! stock tools (openssl, curl) accept them:
//!
//! | directory | files |
//! | --- | --- |
//! | root (`isthmus ca init`) | `root-cert.pem`, `root-key.pem` |
//! | cluster (`isthmus ca cluster`) | `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem` (intermediate, root) |
//! | leaf (`isthmus ca issue`) | `cert.pem`, `key.pem`, `cert-chain.pem` (leaf, intermediate), `root-cert.pem` |
//!
//! A leaf's identity is decided by the CA's caller (who checked the
//! requester's credential), never by what the CSR asks for: a CSR naming
//! another identity is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use super::pem;
use super::spiffe::{SpiffeId, SpiffeIdError, TrustDomain, validate_cluster_name};

/// Default lifetime of workload, gateway and controller certificates.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest leaf lifetime the CA grants, whatever is asked.
pub const MAX_LEAF_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default lifetime of a cluster intermediate.
pub const DEFAULT_CLUSTER_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of a trust domain root.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of `notBefore`, so small clock skew between hosts does not
/// make a fresh certificate "not yet valid".
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// Errors of the CA and of loading its files. Messages name the file or
/// identity and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "cannot read {path}: {source}; run `isthmus ca init` / `isthmus ca cluster` to create it"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}; check the directory exists and is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} already exists; refusing to overwrite a CA key (choose another --out or remove it)"
    )]
    Exists { path: PathBuf },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("invalid identity: {0}")]
    Identity(#[from] SpiffeIdError),
    #[error(
        "identity {id} is in trust domain {got}, but this CA signs for {want}; use the CA of {got}"
    )]
    WrongTrustDomain {
        id: SpiffeId,
        got: TrustDomain,
        want: TrustDomain,
    },
    #[error(
        "identity {id} is bound to cluster {got:?}, but this is the CA of cluster {want:?}; cluster identities are issued only by their own cluster's CA"
    )]
    WrongCluster {
        id: SpiffeId,
        got: String,
        want: String,
    },
    #[error("identity {0} names a CA, not a workload, gateway or controller")]
    NotALeafIdentity(SpiffeId),
    #[error("CSR is invalid: {0}")]
    BadCsr(String),
    #[error("CSR asks for {asked:?} but the caller is authorised only as {authorised}")]
    CsrIdentityMismatch {
        asked: Vec<String>,
        authorised: SpiffeId,
    },
    #[error("this CA's certificate expires at {0}; rotate it with `isthmus ca cluster`")]
    CaExpired(OffsetDateTime),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A leaf certificate chain as issued: leaf first, then the intermediate.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    pub chain: Vec<CertificateDer<'static>>,
    pub root: CertificateDer<'static>,
    pub id: SpiffeId,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl IssuedChain {
    /// Leaf then intermediates, PEM.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem::cert_to_pem(c)).collect()
    }
}

/// The root CA of one trust domain.
#[derive(Debug)]
pub struct RootCa {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// The intermediate CA of one cluster.
#[derive(Debug)]
pub struct ClusterCa {
    trust_domain: TrustDomain,
    cluster: String,
    cert: CertificateDer<'static>,
    root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

fn new_key() -> Result<KeyPair, rcgen::Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn validity(
    params: &mut CertificateParams,
    ttl: Duration,
    cap: Option<OffsetDateTime>,
) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    let not_before = now - CLOCK_SKEW_ALLOWANCE;
    let mut not_after = now + ttl;
    if let Some(cap) = cap {
        not_after = not_after.min(cap);
    }
    params.not_before = not_before;
    params.not_after = not_after;
    (not_before, not_after)
}

fn ca_params(
    td: &TrustDomain,
    common_name: String,
    id: &SpiffeId,
    path_len: u8,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn not_after_of(der: &CertificateDer<'_>, path: &Path) -> Result<OffsetDateTime, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::BadFile {
        path: path.to_owned(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    Ok(cert.validity().not_after.to_datetime())
}

/// The single SPIFFE URI SAN of a CA certificate, parsed.
fn ca_identity(der: &CertificateDer<'_>, path: &Path) -> Result<SpiffeId, CaError> {
    let bad = |reason: String| CaError::BadFile {
        path: path.to_owned(),
        reason,
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| bad(format!("not X.509: {e}")))?;
    let uris = super::verify::uri_sans(&cert).map_err(|e| bad(e.to_string()))?;
    match uris.as_slice() {
        [one] => one.parse().map_err(|e: SpiffeIdError| bad(e.to_string())),
        _ => Err(bad(format!(
            "expected exactly one spiffe:// URI SAN naming the CA, found {}",
            uris.len()
        ))),
    }
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    super::write_atomic(path, contents.as_bytes(), private).map_err(|source| CaError::Write {
        path: path.to_owned(),
        source,
    })
}

fn read_file(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn refuse_overwrite(path: &Path) -> Result<(), CaError> {
    if path.exists() {
        Err(CaError::Exists {
            path: path.to_owned(),
        })
    } else {
        Ok(())
    }
}

fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(&read_file(path)?).map_err(|e| CaError::BadFile {
        path: path.to_owned(),
        reason: format!("not a PKCS#8 private key: {e}"),
    })
}

fn load_cert(path: &Path) -> Result<CertificateDer<'static>, CaError> {
    let text = read_file(path)?;
    let mut certs = pem::certs_from_pem(&text).map_err(|reason| CaError::BadFile {
        path: path.to_owned(),
        reason,
    })?;
    if certs.is_empty() {
        return Err(CaError::BadFile {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs.swap_remove(0))
}

impl RootCa {
    /// Creates a new root for `trust_domain`.
    pub fn generate(trust_domain: &TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        let id = SpiffeId::from_segments(trust_domain, &[])?;
        let mut params = ca_params(
            trust_domain,
            format!("Isthmus root CA {trust_domain}"),
            &id,
            1,
        )?;
        validity(&mut params, ttl, None);
        let key = new_key()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `root-cert.pem` and `root-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join("root-cert.pem");
        let cert = load_cert(&cert_path)?;
        let key = load_key(&dir.join("root-key.pem"))?;
        let id = ca_identity(&cert, &cert_path)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self {
            trust_domain: id.trust_domain().clone(),
            cert,
            issuer,
        })
    }

    /// Writes `root-cert.pem` and `root-key.pem` (mode 0600) into `dir`,
    /// refusing to overwrite an existing key.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let key_path = dir.join("root-key.pem");
        refuse_overwrite(&key_path)?;
        write_file(&key_path, &self.issuer.key().serialize_pem(), true)?;
        write_file(
            &dir.join("root-cert.pem"),
            &pem::cert_to_pem(&self.cert),
            false,
        )
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues the intermediate CA of `cluster`. Its URI SAN
    /// `spiffe://<td>/cluster/<name>` binds it to the cluster: the
    /// verifier accepts a gateway or controller identity only when it was
    /// issued by the intermediate of the cluster it names.
    pub fn issue_cluster(&self, cluster: &str, ttl: Duration) -> Result<ClusterCa, CaError> {
        validate_cluster_name(cluster)?;
        let id = SpiffeId::cluster_ca(&self.trust_domain, cluster)?;
        let mut params = ca_params(
            &self.trust_domain,
            format!("Isthmus cluster CA {cluster}"),
            &id,
            0,
        )?;
        let root_not_after = not_after_of(&self.cert, Path::new("root-cert.pem"))?;
        let (_, not_after) = validity(&mut params, ttl, Some(root_not_after));
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ClusterCa {
            trust_domain: self.trust_domain.clone(),
            cluster: cluster.to_owned(),
            cert: cert.der().clone(),
            root: self.cert.clone(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }
}

impl ClusterCa {
    /// Loads `ca-cert.pem`, `ca-key.pem` and `root-cert.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join("ca-cert.pem");
        let cert = load_cert(&cert_path)?;
        let root = load_cert(&dir.join("root-cert.pem"))?;
        let key = load_key(&dir.join("ca-key.pem"))?;
        let id = ca_identity(&cert, &cert_path)?;
        let cluster = match id.bound_cluster() {
            Some(c) => c.to_owned(),
            None => {
                return Err(CaError::BadFile {
                    path: cert_path,
                    reason: format!(
                        "URI SAN {id} does not name a cluster (spiffe://<td>/cluster/<name>); is this a root certificate?"
                    ),
                });
            }
        };
        let not_after = not_after_of(&cert, &cert_path)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self {
            trust_domain: id.trust_domain().clone(),
            cluster,
            cert,
            root,
            issuer,
            not_after,
        })
    }

    /// Writes the Istio `cacerts` layout into `dir`, refusing to
    /// overwrite an existing key.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let key_path = dir.join("ca-key.pem");
        refuse_overwrite(&key_path)?;
        write_file(&key_path, &self.issuer.key().serialize_pem(), true)?;
        let ca_pem = pem::cert_to_pem(&self.cert);
        let root_pem = pem::cert_to_pem(&self.root);
        write_file(&dir.join("ca-cert.pem"), &ca_pem, false)?;
        write_file(&dir.join("root-cert.pem"), &root_pem, false)?;
        write_file(&dir.join("cert-chain.pem"), &(ca_pem + &root_pem), false)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Signs `csr` for `authorised`, the identity the caller has proved.
    ///
    /// Only the CSR's public key is used. The CSR may name no SAN or
    /// exactly `authorised`; anything else is refused. The lifetime is
    /// `ttl` capped at [`MAX_LEAF_TTL`] and at this CA's own expiry.
    pub fn sign_csr(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        authorised: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        self.check_identity(authorised)?;
        let request = CertificateSigningRequestParams::from_der(csr)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let asked: Vec<String> = request
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if !(asked.is_empty() || asked == [authorised.to_string()]) {
            return Err(CaError::CsrIdentityMismatch {
                asked,
                authorised: authorised.clone(),
            });
        }
        if OffsetDateTime::now_utc() >= self.not_after {
            return Err(CaError::CaExpired(self.not_after));
        }

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::URI(authorised.to_string().try_into()?)];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after) =
            validity(&mut params, ttl.min(MAX_LEAF_TTL), Some(self.not_after));
        let cert = params.signed_by(&request.public_key, &self.issuer)?;
        Ok(IssuedChain {
            // The root goes last: TLS peers ignore it when they trust it
            // already, and first contact (link) pins it by fingerprint.
            chain: vec![cert.der().clone(), self.cert.clone(), self.root.clone()],
            root: self.root.clone(),
            id: authorised.clone(),
            not_before,
            not_after,
        })
    }

    fn check_identity(&self, id: &SpiffeId) -> Result<(), CaError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                id: id.clone(),
                got: id.trust_domain().clone(),
                want: self.trust_domain.clone(),
            });
        }
        match id.role() {
            super::spiffe::Role::ClusterCa { .. } | super::spiffe::Role::TrustDomain => {
                return Err(CaError::NotALeafIdentity(id.clone()));
            }
            _ => {}
        }
        if let Some(cluster) = id.bound_cluster()
            && cluster != self.cluster
        {
            return Err(CaError::WrongCluster {
                id: id.clone(),
                got: cluster.to_owned(),
                want: self.cluster.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "testing"))]
impl ClusterCa {
    /// Signs a leaf with arbitrary URI SANs and validity, bypassing every
    /// policy check. Only for tests of the verifier (malformed, expired,
    /// mis-bound certificates); never compiled into the binary.
    pub fn forge_leaf(
        &self,
        uris: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair), CaError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = uris
            .iter()
            .map(|u| Ok(SanType::URI((*u).to_owned().try_into()?)))
            .collect::<Result<_, rcgen::Error>>()?;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((vec![cert.der().clone(), self.cert.clone()], key))
    }
}

/// A fresh private key and a CSR for `id`, made where the key will live.
#[derive(Debug)]
pub struct KeyAndCsr {
    pub key: KeyPair,
    pub csr: CertificateSigningRequestDer<'static>,
}

impl KeyAndCsr {
    /// Generates an ECDSA P-256 key and a CSR naming `id`.
    pub fn generate(id: &SpiffeId) -> Result<Self, CaError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            key,
            csr: csr.der().clone(),
        })
    }

    /// The CSR, PEM.
    pub fn csr_pem(&self) -> String {
        pem::encode("CERTIFICATE REQUEST", self.csr.as_ref())
    }
}

/// Writes a leaf's files (`cert.pem`, `key.pem` when the key is known,
/// `cert-chain.pem`, `root-cert.pem`) into `dir`.
pub fn write_leaf(dir: &Path, issued: &IssuedChain, key: Option<&KeyPair>) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if let Some(key) = key {
        write_file(&dir.join("key.pem"), &key.serialize_pem(), true)?;
    }
    write_file(
        &dir.join("cert.pem"),
        &pem::cert_to_pem(&issued.chain[0]),
        false,
    )?;
    write_file(&dir.join("cert-chain.pem"), &issued.chain_pem(), false)?;
    write_file(
        &dir.join("root-cert.pem"),
        &pem::cert_to_pem(&issued.root),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    #[test]
    fn csr_for_another_identity_is_refused() {
        let root = RootCa::generate(&td("east.local"), DEFAULT_ROOT_TTL).unwrap();
        let ca = root.issue_cluster("east", DEFAULT_CLUSTER_CA_TTL).unwrap();
        let wanted = SpiffeId::workload(&td("east.local"), "prod", "admin").unwrap();
        let authorised = SpiffeId::workload(&td("east.local"), "dev", "app").unwrap();
        let req = KeyAndCsr::generate(&wanted).unwrap();
        let err = ca
            .sign_csr(&req.csr, &authorised, DEFAULT_LEAF_TTL)
            .unwrap_err();
        assert!(matches!(err, CaError::CsrIdentityMismatch { .. }), "{err}");
    }

    #[test]
    fn cluster_ca_issues_only_its_own_cluster_and_trust_domain() {
        let root = RootCa::generate(&td("mesh.local"), DEFAULT_ROOT_TTL).unwrap();
        let east = root.issue_cluster("east", DEFAULT_CLUSTER_CA_TTL).unwrap();
        let west_gw = SpiffeId::gateway(&td("mesh.local"), "west").unwrap();
        let req = KeyAndCsr::generate(&west_gw).unwrap();
        let err = east
            .sign_csr(&req.csr, &west_gw, DEFAULT_LEAF_TTL)
            .unwrap_err();
        assert!(matches!(err, CaError::WrongCluster { .. }), "{err}");

        let other_td = SpiffeId::workload(&td("other.local"), "a", "b").unwrap();
        let req = KeyAndCsr::generate(&other_td).unwrap();
        let err = east
            .sign_csr(&req.csr, &other_td, DEFAULT_LEAF_TTL)
            .unwrap_err();
        assert!(matches!(err, CaError::WrongTrustDomain { .. }), "{err}");
    }

    #[test]
    fn leaf_lifetime_defaults_and_caps() {
        let root = RootCa::generate(&td("east.local"), DEFAULT_ROOT_TTL).unwrap();
        let ca = root.issue_cluster("east", DEFAULT_CLUSTER_CA_TTL).unwrap();
        let id = SpiffeId::workload(&td("east.local"), "a", "b").unwrap();
        let req = KeyAndCsr::generate(&id).unwrap();
        let issued = ca.sign_csr(&req.csr, &id, DEFAULT_LEAF_TTL).unwrap();
        let life = issued.not_after - issued.not_before;
        assert_eq!(
            life,
            time::Duration::hours(24) + time::Duration::seconds(60)
        );
        let issued = ca
            .sign_csr(&req.csr, &id, Duration::from_secs(365 * 24 * 3600))
            .unwrap();
        let life = issued.not_after - issued.not_before;
        assert!(life <= time::Duration::days(7) + time::Duration::seconds(60));
    }

    #[test]
    fn files_round_trip_and_keys_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootCa::generate(&td("east.local"), DEFAULT_ROOT_TTL).unwrap();
        root.write(dir.path()).unwrap();
        assert!(matches!(
            root.write(dir.path()),
            Err(CaError::Exists { .. })
        ));
        let loaded = RootCa::load(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain().as_str(), "east.local");
        let cdir = dir.path().join("east");
        loaded
            .issue_cluster("east", DEFAULT_CLUSTER_CA_TTL)
            .unwrap()
            .write(&cdir)
            .unwrap();
        let ca = ClusterCa::load(&cdir).unwrap();
        assert_eq!(ca.cluster(), "east");
        assert_eq!(ca.root(), loaded.cert());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(cdir.join("ca-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
