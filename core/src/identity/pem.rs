//! PEM encoding and decoding of certificates and keys.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Encodes DER bytes as one PEM block with `tag`.
pub fn encode(tag: &str, der: &[u8]) -> String {
    ::pem::encode_config(
        &::pem::Pem::new(tag, der),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

/// One certificate as a PEM block.
pub fn cert_to_pem(cert: &CertificateDer<'_>) -> String {
    encode("CERTIFICATE", cert.as_ref())
}

/// Every CERTIFICATE block of `text`, in order. Other blocks are skipped.
pub fn certs_from_pem(text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))
}
