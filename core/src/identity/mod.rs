//! Identity and trust: SPIFFE IDs, the CA hierarchy, trust bundles keyed by
//! trust domain, rustls verifiers that check a peer against the bundle of
//! its own trust domain, and certificates that rotate without dropping
//! connections.

pub mod ca;
pub mod pem;
pub mod rotation;
pub mod spiffe;
pub mod trust;
pub mod verify;

pub use ca::{ClusterCa, IssuedChain, KeyAndCsr, RootCa};
pub use rotation::{CertificateSigner, RotatingCert};
pub use spiffe::{Role, SpiffeId, SpiffeIdError, TrustDomain};
pub use trust::{TrustBundle, TrustStore};
pub use verify::{Expect, VerifyError, peer_identity};

use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` atomically: a temporary file in the same
/// directory, fsync, rename. Readers see the old file or the new one, never
/// half of either. `private` makes the file mode 0600.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    write_atomic_with(path, contents, private, true)
}

/// [`write_atomic`] with the fsync optional: without it, readers still
/// never see a half-written file (the rename is atomic), but a crash may
/// lose the new contents. For files that are regenerated anyway.
pub fn write_atomic_with(
    path: &Path,
    contents: &[u8],
    private: bool,
    sync: bool,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(contents)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
