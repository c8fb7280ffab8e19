//! Certificates that renew themselves.
//!
//! A [`RotatingCert`] holds the current key and chain of one identity and
//! serves them to rustls as both a server and a client certificate
//! resolver. A renewal task generates a fresh key, sends a CSR to a
//! [`CertificateSigner`] at about half the lifetime (with jitter, so a
//! fleet started together does not renew together), and swaps the result
//! in. Established TLS sessions keep the keys they negotiated and are not
//! disturbed; the next handshake uses the new certificate.

use std::fmt::Debug;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, crypto::CryptoProvider};
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{info, warn};

use super::ca::{CaError, ClusterCa, IssuedChain, KeyAndCsr};
use super::spiffe::SpiffeId;
use crate::backoff::Backoff;

/// Boxed future returned by [`CertificateSigner::sign`].
pub type SignFuture = Pin<Box<dyn Future<Output = Result<IssuedChain, SignError>> + Send>>;

/// Why a signing request failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("certificate service: {0}")]
    Remote(String),
    #[error("issued certificate is unusable: {0}")]
    Unusable(String),
}

/// Something that turns a CSR into a chain: the local cluster CA in files
/// mode, the controller's CA service for sidecars and gateways.
pub trait CertificateSigner: Send + Sync + Debug {
    /// Signs `csr` for `id` with lifetime `ttl`.
    fn sign(
        &self,
        csr: CertificateSigningRequestDer<'static>,
        id: SpiffeId,
        ttl: Duration,
    ) -> SignFuture;
}

impl CertificateSigner for Arc<ClusterCa> {
    fn sign(
        &self,
        csr: CertificateSigningRequestDer<'static>,
        id: SpiffeId,
        ttl: Duration,
    ) -> SignFuture {
        let ca = Arc::clone(self);
        Box::pin(async move { Ok(ca.sign_csr(&csr, &id, ttl)?) })
    }
}

/// Builds a rustls [`CertifiedKey`] from an issued chain and its PKCS#8 key.
pub fn certified_key(
    provider: &CryptoProvider,
    chain: &IssuedChain,
    key_pkcs8: Vec<u8>,
) -> Result<CertifiedKey, SignError> {
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8)))
        .map_err(|e| SignError::Unusable(e.to_string()))?;
    Ok(CertifiedKey::new(chain.chain.clone(), signing))
}

/// When a certificate was obtained and when it expires. The lifetime that
/// matters for renewal starts at issuance, not at the backdated
/// `notBefore` (see [`super::ca::CLOCK_SKEW_ALLOWANCE`]).
#[derive(Debug, Clone, Copy)]
struct Validity {
    issued_at: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// The current certificate of one identity, renewed in the background.
#[derive(Debug)]
pub struct RotatingCert {
    id: SpiffeId,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Arc<CertifiedKey>, Validity)>,
    rotations: AtomicU64,
    changed: watch::Sender<u64>,
}

impl RotatingCert {
    /// Obtains the first certificate for `id` from `signer`.
    pub async fn issue(
        id: SpiffeId,
        signer: &dyn CertificateSigner,
        ttl: Duration,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<Self>, SignError> {
        let (key, validity) = fetch(&id, signer, ttl, &provider).await?;
        Ok(Arc::new(Self {
            id,
            provider,
            current: RwLock::new((Arc::new(key), validity)),
            rotations: AtomicU64::new(0),
            changed: watch::channel(0).0,
        }))
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The key and chain new handshakes use.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Expiry of the current certificate.
    pub fn not_after(&self) -> OffsetDateTime {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .not_after
    }

    /// How many times the certificate has been replaced.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// Notified with the rotation count after each swap.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Fetches a new certificate now and swaps it in.
    pub async fn rotate_now(
        &self,
        signer: &dyn CertificateSigner,
        ttl: Duration,
    ) -> Result<(), SignError> {
        let (key, validity) = fetch(&self.id, signer, ttl, &self.provider).await?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(key), validity);
        let n = self.rotations.fetch_add(1, Ordering::Relaxed) + 1;
        self.changed.send_replace(n);
        info!(identity = %self.id, not_after = %validity.not_after, "certificate rotated");
        Ok(())
    }

    /// When the current certificate should be renewed: at 45-55 % of its
    /// lifetime (uniform jitter), measured from now.
    pub fn refresh_in(&self) -> Duration {
        let v = self.current.read().unwrap_or_else(|e| e.into_inner()).1;
        refresh_delay(v, OffsetDateTime::now_utc(), rand::random_range(0.45..0.55))
    }

    /// Renews the certificate until the task is dropped or aborted.
    /// Failures are retried with backoff (1 s doubling to 30 s) and logged
    /// with the time left before expiry.
    pub fn spawn_renewal(
        self: &Arc<Self>,
        signer: Arc<dyn CertificateSigner>,
        ttl: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(this.refresh_in()).await;
                let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
                while let Err(e) = this.rotate_now(signer.as_ref(), ttl).await {
                    let left = this.not_after() - OffsetDateTime::now_utc();
                    warn!(
                        identity = %this.id,
                        error = %e,
                        expires_in = %left,
                        "certificate renewal failed; retrying (check the CA / controller is reachable)"
                    );
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        })
    }
}

fn refresh_delay(v: Validity, now: OffsetDateTime, fraction: f64) -> Duration {
    let life = (v.not_after - v.issued_at).max(time::Duration::ZERO);
    let at = v.issued_at + life * fraction;
    let wait = at - now;
    if wait.is_negative() {
        Duration::ZERO
    } else {
        wait.unsigned_abs()
    }
}

async fn fetch(
    id: &SpiffeId,
    signer: &dyn CertificateSigner,
    ttl: Duration,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, Validity), SignError> {
    let issued_at = OffsetDateTime::now_utc();
    let req = KeyAndCsr::generate(id)?;
    let issued = signer.sign(req.csr.clone(), id.clone(), ttl).await?;
    if &issued.id != id {
        return Err(SignError::Unusable(format!(
            "asked for {id}, got a certificate for {}",
            issued.id
        )));
    }
    let key = certified_key(provider, &issued, req.key.serialize_der())?;
    Ok((
        key,
        Validity {
            issued_at: issued_at.min(issued.not_after),
            not_after: issued.not_after,
        },
    ))
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl ResolvesClientCert for RotatingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A certificate that never changes (loaded from files, or in tests).
#[derive(Debug, Clone)]
pub struct StaticCert(pub Arc<CertifiedKey>);

impl ResolvesServerCert for StaticCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for StaticCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_at_the_fraction_of_lifetime() {
        let nb = OffsetDateTime::now_utc();
        let v = Validity {
            issued_at: nb,
            not_after: nb + time::Duration::hours(24),
        };
        let d = refresh_delay(v, nb, 0.5);
        assert_eq!(d, Duration::from_secs(12 * 3600));
        // Past the refresh point: renew at once.
        assert_eq!(
            refresh_delay(v, nb + time::Duration::hours(13), 0.5),
            Duration::ZERO
        );
    }
}
