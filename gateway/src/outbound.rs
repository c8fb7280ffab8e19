//! Egress: TLS connections from local sidecars, routed by SNI into a QUIC
//! tunnel to the best cluster.
//!
//! The ClientHello is read and kept, not terminated. Clusters are tried in
//! order ([`crate::select`]); a refusal or failed open moves to the next
//! one before a single byte of the client's is forwarded. Every move is
//! counted (`isthmus_gateway_failovers_total`) with from, to and reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use isthmus_proto::tunnel::v1::TunnelRequest;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Ctx;
use crate::metrics::{Direction, FailoverLabels, ReasonLabels, RefusedLabels, TcpLabels};
use crate::pool::Health;
use crate::select::candidates;
use crate::sni::{parse_target, read_client_hello};
use crate::splice::splice;

/// Tunnel opens tried per connection at most (a second pass over the
/// healthy candidates included).
pub const MAX_ATTEMPTS: usize = 4;
/// A second pass over candidates that are still up is made only within
/// this time of the connection's arrival (the client is still waiting
/// for its TLS handshake).
pub const RETRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(3);

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// Accepts sidecar connections until the drain starts.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.drain.signaled() => break,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off a little rather than spin.
                warn!(error = %e, "accept failed on the sidecar listener");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let c = Arc::clone(&ctx);
        let held = ctx.drain.hold();
        tokio::spawn(
            async move {
                let _held = held;
                connection(tcp, c).await
            }
            .instrument(info_span!("sidecar_conn", src.addr = %remote)),
        );
    }
}

fn unrouted(ctx: &Ctx, reason: &str) {
    ctx.metrics
        .connections_unrouted
        .get_or_create(&ReasonLabels {
            reason: reason.into(),
        })
        .inc();
}

async fn connection(mut tcp: TcpStream, ctx: Arc<Ctx>) {
    let _ = tcp.set_nodelay(true);
    let refused = |reason: &str, e: &dyn std::fmt::Display| {
        ctx.metrics
            .sni_errors
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
        debug!(error = %e, "closing sidecar connection");
    };
    let hello = match read_client_hello(&mut tcp).await {
        Ok(h) => h,
        Err(e) => return refused(e.label(), &e),
    };
    let target = match parse_target(&hello.sni) {
        Ok(t) => t,
        Err(e) => return refused(e.label(), &e),
    };
    let state = ctx.state.borrow().clone();
    let Some(svc) = state.imported.get(&target.service) else {
        unrouted(&ctx, "unknown_service");
        debug!(service = %target.service, "no peer exports this service to us");
        return;
    };
    let dr = state
        .destination_rules
        .get(&target.service)
        .map(|d| d.as_ref());
    let subset = if target.subset.is_empty() {
        Default::default()
    } else {
        match dr.and_then(|d| d.subsets.get(&target.subset)) {
            Some(s) => s.clone(),
            None => {
                unrouted(&ctx, "unknown_subset");
                debug!(service = %target.service, subset = %target.subset, "no DestinationRule defines this subset");
                return;
            }
        }
    };
    let order = candidates(
        &ctx.cluster,
        &ctx.locality,
        svc,
        &subset,
        dr,
        |c| ctx.pool.health(c),
        &mut rand::rng(),
    );
    // The pool follows the mesh state in its own task; a connection can
    // arrive between a state change and that sync. Sync now rather than
    // refuse a peer the state already names.
    if order.iter().any(|c| ctx.pool.peer(&c.cluster).is_none()) {
        ctx.pool.sync(&state.peers);
    }
    if order.is_empty() {
        unrouted(&ctx, "no_healthy_cluster");
        debug!(service = %target.service, "no cluster has healthy endpoints");
        return;
    }
    let service = target.host.clone();
    let mut req = TunnelRequest {
        service: service.clone(),
        port: u32::from(target.port),
        subset: target.subset.clone(),
        source_cluster: ctx.cluster.clone(),
        connection_id: format!(
            "{}-{}",
            ctx.cluster,
            CONNECTION_IDS.fetch_add(1, Ordering::Relaxed)
        ),
        attempt: 0,
        probe: false,
    };
    // The nearest cluster by locality, healthy or not: serving elsewhere
    // because it is down is a failover too.
    let nearest = order
        .iter()
        .min_by_key(|c| c.tier)
        .map(|c| (c.cluster.clone(), c.health));
    let mut previous: Option<(String, String)> = match &nearest {
        Some((name, h)) if *h != Health::Up => Some((
            name.clone(),
            if *h == Health::Down {
                "peer_down".into()
            } else {
                "peer_ejected".into()
            },
        )),
        _ => None,
    };
    let arrived = tokio::time::Instant::now();
    // Clusters that answered with a refusal: their answer stands.
    let mut refused: Vec<String> = Vec::new();
    // First every candidate in order; then, if time allows, once more the
    // ones still up (a starved first pass can time out on a good peer).
    for (i, cand) in order
        .iter()
        .chain(order.iter())
        .take(MAX_ATTEMPTS)
        .enumerate()
    {
        if i >= order.len()
            && (refused.contains(&cand.cluster)
                || ctx.pool.health(&cand.cluster) != Health::Up
                || arrived.elapsed() >= RETRY_BUDGET)
        {
            continue;
        }
        req.attempt = i as u32;
        match ctx.pool.open(&cand.cluster, &req).await {
            Ok((mut send, recv, _resp)) => {
                if let Some((from, reason)) = previous.take() {
                    ctx.metrics
                        .failovers
                        .get_or_create(&FailoverLabels {
                            destination_service: service.clone(),
                            from_cluster: from.clone(),
                            to_cluster: cand.cluster.clone(),
                            reason: reason.clone(),
                        })
                        .inc();
                    if i > 0 {
                        info!(%service, from = %from, to = %cand.cluster, %reason, "failover");
                    } else {
                        debug!(%service, from = %from, to = %cand.cluster, %reason, "failover");
                    }
                }
                if send.write_all(&hello.raw).await.is_err() {
                    return;
                }
                let labels = TcpLabels {
                    reporter: "source",
                    source_cluster: ctx.cluster.clone(),
                    destination_cluster: cand.cluster.clone(),
                    destination_service: service,
                };
                ctx.metrics.tcp_opened.get_or_create(&labels).inc();
                let (r, w) = tcp.into_split();
                let moved = splice(r, w, send, recv).await;
                ctx.metrics
                    .tcp_sent_bytes
                    .get_or_create(&labels)
                    .inc_by(moved.to_quic + hello.raw.len() as u64);
                ctx.metrics
                    .tcp_received_bytes
                    .get_or_create(&labels)
                    .inc_by(moved.to_tcp);
                ctx.metrics.tcp_closed.get_or_create(&labels).inc();
                return;
            }
            Err(e) => {
                ctx.metrics
                    .streams_refused
                    .get_or_create(&RefusedLabels {
                        peer_cluster: cand.cluster.clone(),
                        direction: Direction::Outbound,
                        reason: e.reason(),
                    })
                    .inc();
                debug!(cluster = %cand.cluster, error = %e, "tunnel open failed; trying the next cluster");
                if !e.is_transport() {
                    refused.push(cand.cluster.clone());
                }
                previous = Some((cand.cluster.clone(), e.reason()));
            }
        }
    }
    unrouted(&ctx, "all_clusters_failed");
    warn!(%service, tried = order.len().min(MAX_ATTEMPTS), last = ?previous, "no cluster accepted the connection");
}
