//! Copies bytes both ways between a TCP connection and a QUIC stream,
//! with half-close carried across (TCP FIN ↔ QUIC FIN) and aborts carried
//! as aborts (TCP error → stream reset, stream reset → TCP close).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Application error code of a stream reset or stop: the other side went
/// away abnormally.
pub const ABORTED: VarInt = VarInt::from_u32(1);

/// Bytes moved by a finished splice.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// TCP → QUIC.
    pub to_quic: u64,
    /// QUIC → TCP.
    pub to_tcp: u64,
}

const CHUNK: usize = 64 * 1024;
/// A read gets at least this much room; below it the next read starts a
/// fresh chunk.
const MIN_READ: usize = 8 * 1024;

/// Runs until both directions are done.
pub async fn splice(
    mut tcp_r: OwnedReadHalf,
    mut tcp_w: OwnedWriteHalf,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Moved {
    let up_bytes = AtomicU64::new(0);
    let up = async {
        let n = &up_bytes;
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            // Reads fill one chunk until it is nearly full: small writes
            // (requests, answers) share a chunk instead of each holding
            // 64 KiB of its own until the peer acknowledges it.
            if buf.capacity() - buf.len() < MIN_READ {
                buf.reserve(CHUNK);
            }
            match tcp_r.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish();
                    break;
                }
                Ok(k) => {
                    n.fetch_add(k as u64, Ordering::Relaxed);
                    if send.write_chunk(buf.split().freeze()).await.is_err() {
                        // The peer stopped reading: nothing more to send.
                        break;
                    }
                }
                Err(_) => {
                    let _ = send.reset(ABORTED);
                    break;
                }
            }
        }
    };
    let down = async {
        let mut n = 0u64;
        let mut aborted = false;
        loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    n += chunk.bytes.len() as u64;
                    if tcp_w.write_all(&chunk.bytes).await.is_err() {
                        let _ = recv.stop(ABORTED);
                        break;
                    }
                }
                Ok(None) => {
                    let _ = tcp_w.shutdown().await;
                    break;
                }
                Err(_) => {
                    // Reset by the peer: abort the TCP side too (below).
                    aborted = true;
                    break;
                }
            }
        }
        (n, aborted)
    };
    let (to_tcp, aborted) = {
        tokio::pin!(up, down);
        tokio::select! {
            () = &mut up => down.await,
            (to_tcp, aborted) = &mut down => {
                // An aborted stream ends the tunnel: the TCP side may be
                // idle (a pooled HTTP/2 connection) and would otherwise
                // wait here forever. A clean end still lets the client
                // finish sending (half-close).
                if !aborted {
                    up.await;
                }
                (to_tcp, aborted)
            }
        }
    };
    let to_quic = up_bytes.load(Ordering::Relaxed);
    if aborted {
        // Our direction may have been cut mid-write: say so explicitly
        // rather than leave the stream to be dropped.
        let _ = send.reset(ABORTED);
    }
    if aborted && let Ok(tcp) = tcp_r.reunite(tcp_w) {
        // RST rather than FIN, so the client does not mistake an abort
        // for a clean end of stream.
        let _ = tcp.set_zero_linger();
        drop(tcp);
    }
    // A finished SendStream may be dropped: quinn keeps delivering its
    // data while the connection lives.
    Moved { to_quic, to_tcp }
}
