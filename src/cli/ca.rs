//! `isthmus ca`: the PKI on disk, in Istio's `cacerts` layout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use isthmus_core::config::parse_duration;
use isthmus_core::identity::ca::{KeyAndCsr, write_leaf};
use isthmus_core::identity::trust::fingerprint;
use isthmus_core::identity::{ClusterCa, RootCa, SpiffeId, TrustDomain};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration; use e.g. 24h, 30m or 8760h"))
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the root CA of a trust domain (root-cert.pem, root-key.pem).
    Init {
        /// Trust domain, e.g. east.isthmus.local.
        #[arg(long)]
        trust_domain: TrustDomain,
        /// Directory to write; an existing key is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// Root lifetime (ca::DEFAULT_ROOT_TTL).
        #[arg(long, value_parser = duration, default_value = "87600h")]
        ttl: Duration,
    },
    /// Create the intermediate CA of a cluster (ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem).
    Cluster {
        /// Cluster name (a DNS label, e.g. east).
        name: String,
        /// Root CA directory (from `isthmus ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// Directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Intermediate lifetime, capped at the root's expiry
        /// (ca::DEFAULT_CLUSTER_CA_TTL).
        #[arg(long, value_parser = duration, default_value = "8760h")]
        ttl: Duration,
    },
    /// Issue a leaf certificate for a SPIFFE ID from a cluster CA
    /// (cert.pem, key.pem, cert-chain.pem, root-cert.pem).
    Issue {
        /// SPIFFE ID, e.g. spiffe://east.isthmus.local/ns/default/sa/app or
        /// spiffe://east.isthmus.local/cluster/east/gateway.
        #[arg(long)]
        spiffe_id: SpiffeId,
        /// Cluster CA directory (from `isthmus ca cluster`).
        #[arg(long)]
        ca: PathBuf,
        /// Directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Sign this CSR (PEM) instead of generating a key here; then no
        /// key.pem is written and the private key never leaves its owner.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Leaf lifetime, at most 168h (ca::DEFAULT_LEAF_TTL).
        #[arg(long, value_parser = duration, default_value = "24h")]
        ttl: Duration,
    },
}

pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            trust_domain,
            out,
            ttl,
        } => {
            let root = RootCa::generate(&trust_domain, ttl)?;
            root.write(&out)?;
            println!(
                "root CA for trust domain {trust_domain} written to {}",
                out.display()
            );
            println!("  root-cert.pem  sha256 {}", fingerprint(root.cert()));
            println!("  root-key.pem   (mode 0600; keep it offline)");
        }
        CaCommand::Cluster { name, ca, out, ttl } => {
            let root = RootCa::load(&ca)?;
            let cluster = root.issue_cluster(&name, ttl)?;
            cluster.write(&out)?;
            println!(
                "cluster CA for {name} (trust domain {}) written to {}",
                root.trust_domain(),
                out.display()
            );
            println!("  ca-cert.pem    sha256 {}", fingerprint(cluster.cert()));
        }
        CaCommand::Issue {
            spiffe_id,
            ca,
            out,
            csr,
            ttl,
        } => {
            let cluster = ClusterCa::load(&ca)?;
            let (csr, key) = match csr {
                Some(path) => (read_csr(&path)?, None),
                None => {
                    let req = KeyAndCsr::generate(&spiffe_id)?;
                    (req.csr, Some(req.key))
                }
            };
            let issued = cluster.sign_csr(&csr, &spiffe_id, ttl)?;
            write_leaf(&out, &issued, key.as_ref())?;
            println!("certificate for {spiffe_id} written to {}", out.display());
            println!("  valid until {}", issued.not_after);
        }
    }
    Ok(())
}

fn read_csr(path: &Path) -> anyhow::Result<CertificateSigningRequestDer<'static>> {
    let text =
        std::fs::read(path).with_context(|| format!("cannot read CSR {}", path.display()))?;
    CertificateSigningRequestDer::from_pem_slice(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: no PEM CERTIFICATE REQUEST block ({e}); create one with `openssl req -new`",
            path.display()
        )
    })
}
