//! Reads the TLS ClientHello's SNI without terminating TLS.
//!
//! Only as many bytes as the ClientHello needs are read, with a size limit
//! and a deadline; they are kept so the gateway can forward them unchanged
//! once a tunnel is open. The SNI must be Istio's AUTO_PASSTHROUGH form,
//! `outbound_.<port>_.<subset>_.<fqdn>`, so Envoy sidecars work unchanged.

use std::time::Duration;

use isthmus_core::model::{Scope, ServiceKey};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest ClientHello accepted (handshake message bytes). Real ones are
/// under 2 KiB; post-quantum key shares push them past 1 KiB more.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// How long a client may take to send its ClientHello.
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection from a sidecar was closed before routing. The
/// `label` goes into metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not a TLS handshake (first byte {0:#04x}); sidecars must send TLS to port 15443")]
    NotTls(u8),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("connection closed before the ClientHello was complete")]
    Truncated,
    #[error("no ClientHello within {CLIENT_HELLO_TIMEOUT:?}")]
    Timeout,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello has no server name (SNI); the gateway routes by SNI only")]
    NoSni,
    #[error(
        "SNI {0:?} is not of the form outbound_.<port>_.<subset>_.<service>.<namespace>.svc.cluster.local"
    )]
    BadTarget(String),
    #[error("read error: {0}")]
    Io(String),
}

impl SniError {
    /// Stable label for `isthmus_gateway_sni_errors_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            SniError::NotTls(_) => "not_tls",
            SniError::TooLarge => "too_large",
            SniError::Truncated => "truncated",
            SniError::Timeout => "timeout",
            SniError::Malformed(_) => "malformed",
            SniError::NoSni => "no_sni",
            SniError::BadTarget(_) => "bad_target",
            SniError::Io(_) => "io",
        }
    }
}

/// A ClientHello read off the wire.
#[derive(Debug, Clone)]
pub struct ClientHello {
    /// Every byte read, to be forwarded unchanged.
    pub raw: Vec<u8>,
    pub sni: String,
}

/// Where the sidecar wants to go, from the SNI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub port: u16,
    /// Empty: any endpoint.
    pub subset: String,
    pub host: String,
    pub service: ServiceKey,
    pub scope: Scope,
}

/// Parses `outbound_.<port>_.<subset>_.<fqdn>` (subset may be empty).
pub fn parse_target(sni: &str) -> Result<Target, SniError> {
    let bad = || SniError::BadTarget(sni.to_owned());
    let rest = sni.strip_prefix("outbound_.").ok_or_else(bad)?;
    let (port, rest) = rest.split_once("_.").ok_or_else(bad)?;
    let (subset, host) = rest.split_once("_.").ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    if !subset
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(bad());
    }
    let (service, scope) = ServiceKey::from_host(host).ok_or_else(bad)?;
    Ok(Target {
        port,
        subset: subset.to_owned(),
        host: host.to_owned(),
        service,
        scope,
    })
}

/// Reads one ClientHello (possibly spread over several TLS records) and
/// extracts its SNI, within [`MAX_CLIENT_HELLO`] and [`CLIENT_HELLO_TIMEOUT`].
///
/// # Cancel safety
/// Not cancel safe: bytes read are lost if the future is dropped.
pub async fn read_client_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<ClientHello, SniError> {
    match tokio::time::timeout(CLIENT_HELLO_TIMEOUT, read_inner(r)).await {
        Ok(res) => res,
        Err(_) => Err(SniError::Timeout),
    }
}

async fn read_inner<R: AsyncRead + Unpin>(r: &mut R) -> Result<ClientHello, SniError> {
    let mut raw = Vec::with_capacity(1024);
    let mut handshake = Vec::with_capacity(1024);
    let mut needed: Option<usize> = None;
    loop {
        // One TLS record header.
        let mut hdr = [0u8; 5];
        read_exact(r, &mut hdr).await?;
        if hdr[0] != 0x16 {
            return Err(SniError::NotTls(hdr[0]));
        }
        if hdr[1] != 0x03 {
            return Err(SniError::Malformed("record version"));
        }
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        if len == 0 || handshake.len() + len > MAX_CLIENT_HELLO + 4 {
            return Err(if len == 0 {
                SniError::Malformed("empty record")
            } else {
                SniError::TooLarge
            });
        }
        raw.extend_from_slice(&hdr);
        let start = raw.len();
        raw.resize(start + len, 0);
        read_exact(r, &mut raw[start..]).await?;
        handshake.extend_from_slice(&raw[start..]);
        if needed.is_none() && handshake.len() >= 4 {
            if handshake[0] != 0x01 {
                return Err(SniError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let n = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if n > MAX_CLIENT_HELLO {
                return Err(SniError::TooLarge);
            }
            needed = Some(n + 4);
        }
        if let Some(n) = needed
            && handshake.len() >= n
        {
            let sni = parse_sni(&handshake[4..n])?;
            return Ok(ClientHello { raw, sni });
        }
    }
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), SniError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(SniError::Truncated),
        Err(e) => Err(SniError::Io(e.to_string())),
    }
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.0.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<usize, SniError> {
        Ok(self.take(1, what)?[0] as usize)
    }
    fn u16(&mut self, what: &'static str) -> Result<usize, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
}

/// Extracts the host_name from a ClientHello body (RFC 8446 §4.1.2,
/// RFC 6066 §3).
fn parse_sni(body: &[u8]) -> Result<String, SniError> {
    let mut c = Cursor(body);
    c.take(2 + 32, "version and random")?;
    let n = c.u8("session id length")?;
    c.take(n, "session id")?;
    let n = c.u16("cipher suites length")?;
    c.take(n, "cipher suites")?;
    let n = c.u8("compression methods length")?;
    c.take(n, "compression methods")?;
    if c.0.is_empty() {
        return Err(SniError::NoSni);
    }
    let n = c.u16("extensions length")?;
    let mut exts = Cursor(c.take(n, "extensions")?);
    while !exts.0.is_empty() {
        let ty = exts.u16("extension type")?;
        let len = exts.u16("extension length")?;
        let data = exts.take(len, "extension data")?;
        if ty != 0 {
            continue;
        }
        let mut list = Cursor(data);
        let n = list.u16("server name list length")?;
        let mut names = Cursor(list.take(n, "server name list")?);
        while !names.0.is_empty() {
            let kind = names.u8("server name type")?;
            let n = names.u16("server name length")?;
            let name = names.take(n, "server name")?;
            if kind == 0 {
                if name.is_empty()
                    || !name
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                {
                    return Err(SniError::Malformed("server name is not a DNS name"));
                }
                return Ok(String::from_utf8_lossy(name).into_owned());
            }
        }
        return Err(SniError::NoSni);
    }
    Err(SniError::NoSni)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello from rustls for `sni`.
    fn hello(sni: &str) -> Vec<u8> {
        isthmus_core::tls::install_crypto_provider();
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            sni.to_owned().try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn reads_the_sni_of_a_real_client_hello_and_keeps_every_byte() {
        let sni = "outbound_.5000_.v1_.helloworld.sample.svc.cluster.local";
        let bytes = hello(sni);
        let mut input = bytes.clone();
        input.extend_from_slice(b"more");
        let mut r = &input[..];
        let ch = read_client_hello(&mut r).await.unwrap();
        assert_eq!(ch.sni, sni);
        assert_eq!(ch.raw, bytes);
        assert_eq!(r, b"more");
    }

    #[tokio::test]
    async fn a_client_hello_split_across_records_is_reassembled() {
        let bytes = hello("outbound_.80_._.a.b.svc.clusterset.local");
        let body = &bytes[5..];
        let (a, b) = body.split_at(body.len() / 2);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        let ch = read_client_hello(&mut &split[..]).await.unwrap();
        assert_eq!(ch.sni, "outbound_.80_._.a.b.svc.clusterset.local");
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors_not_panics() {
        assert_eq!(
            read_client_hello(&mut &b"GET / HTTP/1.1\r\n"[..])
                .await
                .unwrap_err(),
            SniError::NotTls(b'G')
        );
        let bytes = hello("outbound_.80_._.a.b.svc.cluster.local");
        for cut in [3, 5, 20, bytes.len() - 1] {
            assert_eq!(
                read_client_hello(&mut &bytes[..cut]).await.unwrap_err(),
                SniError::Truncated,
                "cut {cut}"
            );
        }
        // Oversized: a handshake header announcing 1 MiB.
        let big = [0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x10, 0x00, 0x00];
        assert_eq!(
            read_client_hello(&mut &big[..]).await.unwrap_err(),
            SniError::TooLarge
        );
        // Random bytes after a valid record header never panic.
        for seed in 0..200u32 {
            let mut v = vec![0x16, 0x03, 0x01, 0x00, 0x40];
            v.extend(
                (0..64).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 97) >> 7) as u8),
            );
            let _ = read_client_hello(&mut &v[..]).await;
        }
    }

    #[test]
    fn istio_outbound_form() {
        let t = parse_target("outbound_.5000_.v2_.helloworld.sample.svc.cluster.local").unwrap();
        assert_eq!(
            (t.port, t.subset.as_str(), t.scope),
            (5000, "v2", Scope::Local)
        );
        assert_eq!(t.service, ServiceKey::new("sample", "helloworld"));
        let t = parse_target("outbound_.80_._.a.b.svc.clusterset.local").unwrap();
        assert_eq!((t.subset.as_str(), t.scope), ("", Scope::ClusterSet));
        for bad in [
            "helloworld.sample.svc.cluster.local",
            "outbound_.0_._.a.b.svc.cluster.local",
            "outbound_.99999_._.a.b.svc.cluster.local",
            "outbound_.80_._.example.com",
            "outbound_.80_.v/1_.a.b.svc.cluster.local",
            "inbound_.80_._.a.b.svc.cluster.local",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
