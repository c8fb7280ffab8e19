//! Latency between regions for the network-namespace tier. This kernel has
//! no `netem` qdisc, so the harness relays cross-cluster traffic itself:
//! inside each namespace, iptables DNAT sends what is addressed to another
//! cluster's gateway (UDP, QUIC) or controller (TCP, federation) to a relay
//! on the bridge, which holds every datagram or chunk for the delay before
//! passing it on, both ways. Conntrack undoes the DNAT on replies, so each
//! side still sees the other's real address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

/// Relays, stopped on drop.
#[derive(Debug, Default)]
pub struct Relays {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Relays {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Relays {
    /// A UDP relay on `bind` to `target`, holding each datagram `delay`.
    pub async fn udp(
        &mut self,
        bind: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> std::io::Result<SocketAddr> {
        let front = Arc::new(UdpSocket::bind(bind).await?);
        let local = front.local_addr()?;
        let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        self.tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    continue;
                };
                let back = {
                    let mut f = flows.lock().await;
                    match f.get(&from) {
                        Some(s) => s.clone(),
                        None => {
                            let Ok(s) = UdpSocket::bind(SocketAddr::new(bind.ip(), 0)).await else {
                                continue;
                            };
                            let s = Arc::new(s);
                            f.insert(from, s.clone());
                            // Replies: from the target back to `from`.
                            let (s2, front2) = (s.clone(), front.clone());
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; 65536];
                                while let Ok((n, _)) = s2.recv_from(&mut buf).await {
                                    let data = buf[..n].to_vec();
                                    let front = front2.clone();
                                    tokio::spawn(async move {
                                        tokio::time::sleep(delay).await;
                                        let _ = front.send_to(&data, from).await;
                                    });
                                }
                            });
                            s
                        }
                    }
                };
                let data = buf[..n].to_vec();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = back.send_to(&data, target).await;
                });
            }
        }));
        Ok(local)
    }

    /// A TCP relay on `bind` to `target`, holding each chunk `delay`.
    pub async fn tcp(
        &mut self,
        bind: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(bind).await?;
        let local = listener.local_addr()?;
        self.tasks.push(tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, delay), pipe(sr, cw, delay));
                });
            }
        }));
        Ok(local)
    }
}

/// Copies `r` to `w`, each chunk `delay` late, in order; EOF passes on.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 65536];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
