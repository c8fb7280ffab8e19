//! Trust bundles keyed by trust domain.
//!
//! A root vouches only for identities of its own trust domain: the store
//! never offers one domain's roots to verify another domain's identity.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use rustls_pki_types::{CertificateDer, TrustAnchor};
use sha2::{Digest, Sha256};

use super::spiffe::TrustDomain;

/// Why a bundle was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle for {0} has no root certificate")]
    Empty(TrustDomain),
    #[error("trust bundle for {td}: root #{index} is not a usable trust anchor: {reason}")]
    BadRoot {
        td: TrustDomain,
        index: usize,
        reason: String,
    },
}

/// The roots of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    pub roots: Vec<CertificateDer<'static>>,
    /// Monotonic per trust domain: a bundle replaces the one held only if
    /// its sequence is higher (SPIFFE federation refresh semantics).
    pub sequence: u64,
}

/// Lowercase hex SHA-256 of a certificate's DER: the fingerprint printed
/// in link tokens and by `isthmus ca`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

impl TrustBundle {
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
        sequence: u64,
    ) -> Self {
        Self {
            trust_domain,
            roots,
            sequence,
        }
    }

    /// Fingerprints of the roots, in order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(fingerprint).collect()
    }

    fn anchors(&self) -> Result<Vec<TrustAnchor<'static>>, BundleError> {
        if self.roots.is_empty() {
            return Err(BundleError::Empty(self.trust_domain.clone()));
        }
        self.roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadRoot {
                        td: self.trust_domain.clone(),
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect()
    }
}

/// A bundle with its parsed trust anchors.
#[derive(Debug)]
pub struct BundleEntry {
    pub bundle: TrustBundle,
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
}

/// What [`TrustStore::upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Added,
    Replaced,
    /// The store already holds this sequence or a newer one.
    Stale,
}

/// Bundles of every trusted trust domain; shared by verifiers, updated in
/// place when peers rotate their roots. New handshakes see updates at once.
#[derive(Debug, Default)]
pub struct TrustStore {
    inner: RwLock<BTreeMap<TrustDomain, Arc<BundleEntry>>>,
}

impl TrustStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `bundles`.
    pub fn with_bundles(
        bundles: impl IntoIterator<Item = TrustBundle>,
    ) -> Result<Arc<Self>, BundleError> {
        let store = Self::new();
        for b in bundles {
            store.upsert(b)?;
        }
        Ok(Arc::new(store))
    }

    /// Adds or replaces the bundle of its trust domain if its sequence is
    /// newer. An invalid bundle changes nothing.
    pub fn upsert(&self, bundle: TrustBundle) -> Result<Upsert, BundleError> {
        let anchors = bundle.anchors()?;
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let outcome = match map.get(&bundle.trust_domain) {
            Some(held) if held.bundle.sequence >= bundle.sequence => return Ok(Upsert::Stale),
            Some(_) => Upsert::Replaced,
            None => Upsert::Added,
        };
        map.insert(
            bundle.trust_domain.clone(),
            Arc::new(BundleEntry { bundle, anchors }),
        );
        Ok(outcome)
    }

    /// Forgets a trust domain (peer unlinked).
    pub fn remove(&self, td: &TrustDomain) -> bool {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(td)
            .is_some()
    }

    pub fn get(&self, td: &TrustDomain) -> Option<Arc<BundleEntry>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(td)
            .cloned()
    }

    /// Every bundle held, by trust domain.
    pub fn bundles(&self) -> Vec<TrustBundle> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.bundle.clone())
            .collect()
    }
}
