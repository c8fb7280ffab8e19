//! gRPC over our own mTLS: tonic's built-in TLS takes CA files only, while
//! Isthmus needs the SPIFFE verifiers of `isthmus_core::identity` (bundle
//! of the peer's own trust domain, cluster binding). So the server accepts
//! TLS itself and hands tonic finished streams that carry the verified
//! identity, and the client dials through a connector doing the same.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use isthmus_core::identity::{SpiffeId, peer_identity};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::debug;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is on the other end of a request (a request extension).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// `None` for a client without a certificate (first contact only).
    pub identity: Option<SpiffeId>,
}

/// A server-side TLS stream whose peer has been verified.
#[derive(Debug)]
pub struct TlsIo {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsIo {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP on `listener`, completes mTLS with `cfg` (ALPN h2 is
/// added), and yields verified streams. Failed handshakes are logged
/// with the verifier's reason and dropped. The accept task (and so the
/// listening socket) ends when the stream is dropped or, with `hold`,
/// when a drain starts; `hold` keeps the drain open until the socket is
/// closed, so a restart after `shutdown` can bind the same port.
pub fn incoming(
    listener: TcpListener,
    mut cfg: rustls::ServerConfig,
    hold: Option<isthmus_core::drain::DrainWatcher>,
) -> ReceiverStream<Result<TlsIo, std::io::Error>> {
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let draining = async {
            match &hold {
                Some(h) => h.signaled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(draining);
        loop {
            let (tcp, addr) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
                // A drain stops accepting at once (the port is free for a
                // restart) while open connections finish.
                _ = &mut draining => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        // Anonymous clients get in (first contact); every
                        // handler but Link demands an identity.
                        let identity = peer_identity(tls.get_ref().1.peer_certificates()).ok();
                        let _ = tx
                            .send(Ok(TlsIo {
                                inner: tls,
                                info: PeerInfo { addr, identity },
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(peer.addr = %addr, error = %e, "TLS handshake refused (check the peer's certificate and trust bundle)")
                    }
                    Err(_) => debug!(peer.addr = %addr, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazy gRPC channel to `addr` over mTLS with `cfg` (ALPN h2 is added),
/// with HTTP/2 keep-alives so a silently dropped connection is noticed
/// (hyperium/tonic#1254).
pub fn channel(
    addr: String,
    cfg: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, String> {
    isthmus_core::tls::grpc_channel(addr, cfg)
}
