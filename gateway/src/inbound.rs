//! Ingress: tunnels from peer gateways into this cluster.
//!
//! Every stream must name a service exported **to the asking cluster**
//! (the gateway is never an open relay: Istio CVE-2021-31921). The asking
//! cluster is the one in the peer's verified certificate, and the header's
//! `source_cluster` must agree. A garbled header resets that stream only.

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::{Role, peer_identity};
use isthmus_core::model::{Endpoint, ServiceKey};
use isthmus_proto::common::v1::Locality as PbLocality;
use isthmus_proto::tunnel::v1::{TunnelRequest, TunnelResponse, tunnel_response::Code};
use quinn::{RecvStream, SendStream, VarInt};
use rand::seq::SliceRandom;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};

use crate::Ctx;
use crate::header::{HeaderError, read_frame, write_frame};
use crate::metrics::{Direction, RefusedLabels, StreamLabels, TcpLabels};
use crate::splice::splice;

/// How long a peer may take to send the tunnel header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to one local endpoint may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Endpoints tried per tunnel before answering UPSTREAM_CONNECT_FAILED.
pub const UPSTREAM_ATTEMPTS: usize = 3;
/// Stream reset code for a header that could not be read.
pub const MALFORMED: VarInt = VarInt::from_u32(2);

/// Accepts QUIC connections until the drain starts. Connections are not
/// held through the drain (peers keep them alive); tunnels are, and new
/// streams during the drain are answered DRAINING so peers fail over.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<Ctx>) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = ctx.drain.signaled() => break,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        let c = Arc::clone(&ctx);
        tokio::spawn(
            connection(incoming, c).instrument(info_span!("peer_conn", peer.addr = %remote)),
        );
    }
}

async fn connection(incoming: quinn::Incoming, ctx: Arc<Ctx>) {
    let conn = match tokio::time::timeout(Duration::from_secs(5), incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Includes certificates refused by the verifier: the reason is
            // in the rustls error.
            warn!(error = %e, "peer gateway handshake failed (check its certificate and trust bundle)");
            return;
        }
        Err(_) => {
            debug!("peer gateway handshake timed out");
            return;
        }
    };
    let certs = conn.peer_identity().and_then(|any| {
        any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let peer_cluster = match peer_identity(certs.as_deref().map(|v| v.as_slice())) {
        Ok(id) => match id.role() {
            Role::Gateway { cluster } => cluster.to_owned(),
            _ => {
                warn!(identity = %id, "QUIC peer is not a gateway; closing");
                conn.close(VarInt::from_u32(1), b"not a gateway identity");
                return;
            }
        },
        Err(e) => {
            warn!(error = %e, "QUIC peer has no usable identity; closing");
            conn.close(VarInt::from_u32(1), b"no identity");
            return;
        }
    };
    let span = info_span!("peer", peer.cluster = %peer_cluster);
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(parent: &span, reason = %e, "peer connection ended");
                return;
            }
        };
        let c = Arc::clone(&ctx);
        let peer = peer_cluster.clone();
        // Each tunnel holds the drain open until it ends.
        let held = ctx.drain.hold();
        tokio::spawn(
            async move {
                let _held = held;
                stream(send, recv, peer, c).await
            }
            .instrument(span.clone()),
        );
    }
}

fn refuse(ctx: &Ctx, peer: &str, code: Code, message: String) -> TunnelResponse {
    ctx.metrics
        .streams_refused
        .get_or_create(&RefusedLabels {
            peer_cluster: peer.to_owned(),
            direction: Direction::Inbound,
            reason: code.as_str_name().to_ascii_lowercase(),
        })
        .inc();
    debug!(code = ?code, %message, "tunnel refused");
    TunnelResponse {
        code: code as i32,
        message,
        serving_cluster: ctx.cluster.clone(),
        endpoint_locality: None,
    }
}

async fn stream(mut send: SendStream, mut recv: RecvStream, peer: String, ctx: Arc<Ctx>) {
    let req: TunnelRequest = match tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut recv)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let reason = match e {
                HeaderError::Closed => "closed",
                HeaderError::TooLarge(_) => "oversized",
                HeaderError::Decode(_) => "malformed",
                HeaderError::Io(_) => "io",
            };
            refuse(
                &ctx,
                &peer,
                Code::MalformedRequest,
                format!("{reason}: {e}"),
            );
            let _ = send.reset(MALFORMED);
            let _ = recv.stop(MALFORMED);
            return;
        }
        Err(_) => {
            refuse(
                &ctx,
                &peer,
                Code::MalformedRequest,
                "no header in time".into(),
            );
            let _ = send.reset(MALFORMED);
            let _ = recv.stop(MALFORMED);
            return;
        }
    };
    let answer = |resp: TunnelResponse, mut send: SendStream| async move {
        let _ = write_frame(&mut send, &resp).await;
        let _ = send.finish();
    };
    if req.source_cluster != peer {
        let msg = format!(
            "header says source {:?} but the certificate says {peer:?}",
            req.source_cluster
        );
        return answer(refuse(&ctx, &peer, Code::SourceMismatch, msg), send).await;
    }
    if ctx.drain.is_draining() {
        return answer(
            refuse(
                &ctx,
                &peer,
                Code::Draining,
                "gateway is shutting down".into(),
            ),
            send,
        )
        .await;
    }
    if req.probe {
        let ok = TunnelResponse {
            code: Code::Ok as i32,
            serving_cluster: ctx.cluster.clone(),
            ..Default::default()
        };
        return answer(ok, send).await;
    }
    ctx.metrics
        .streams_opened
        .get_or_create(&StreamLabels {
            peer_cluster: peer.clone(),
            direction: Direction::Inbound,
        })
        .inc();

    let upstream = match route(&ctx, &peer, &req).await {
        Ok(u) => u,
        Err(resp) => return answer(resp, send).await,
    };
    let (tcp, ep) = upstream;
    let ok = TunnelResponse {
        code: Code::Ok as i32,
        message: String::new(),
        serving_cluster: ctx.cluster.clone(),
        endpoint_locality: Some(PbLocality {
            region: ep.locality.region.clone(),
            zone: ep.locality.zone.clone(),
            subzone: ep.locality.subzone.clone(),
        }),
    };
    if write_frame(&mut send, &ok).await.is_err() {
        return;
    }
    let labels = TcpLabels {
        reporter: "destination",
        source_cluster: peer.clone(),
        destination_cluster: ctx.cluster.clone(),
        destination_service: req.service.clone(),
    };
    ctx.metrics.tcp_opened.get_or_create(&labels).inc();
    let _ = tcp.set_nodelay(true);
    let (r, w) = tcp.into_split();
    let moved = splice(r, w, send, recv).await;
    // Seen from the destination: received = from the source, sent = back.
    ctx.metrics
        .tcp_received_bytes
        .get_or_create(&labels)
        .inc_by(moved.to_tcp);
    ctx.metrics
        .tcp_sent_bytes
        .get_or_create(&labels)
        .inc_by(moved.to_quic);
    ctx.metrics.tcp_closed.get_or_create(&labels).inc();
}

/// Checks the request against this cluster's exports and connects to an
/// endpoint, or says why not.
async fn route(
    ctx: &Ctx,
    peer: &str,
    req: &TunnelRequest,
) -> Result<(TcpStream, Endpoint), TunnelResponse> {
    let state = ctx.state.borrow().clone();
    let Some((key, _scope)) = ServiceKey::from_host(&req.service) else {
        return Err(refuse(
            ctx,
            peer,
            Code::UnknownService,
            format!("{:?} is not a service host", req.service),
        ));
    };
    let Some(svc) = state.local.get(&key) else {
        return Err(refuse(
            ctx,
            peer,
            Code::UnknownService,
            format!("no service {key} in {}", ctx.cluster),
        ));
    };
    if !svc.exported_to.contains(peer) {
        return Err(refuse(
            ctx,
            peer,
            Code::NotExported,
            format!("{key} is not exported to {peer}"),
        ));
    }
    let Ok(port16) = u16::try_from(req.port) else {
        return Err(refuse(
            ctx,
            peer,
            Code::UnknownPort,
            format!("port {} is out of range", req.port),
        ));
    };
    let Some(port) = svc.port(port16) else {
        return Err(refuse(
            ctx,
            peer,
            Code::UnknownPort,
            format!("{key} has no port {}", req.port),
        ));
    };
    let selector = if req.subset.is_empty() {
        Default::default()
    } else {
        match state
            .destination_rules
            .get(&key)
            .and_then(|dr| dr.subsets.get(&req.subset))
        {
            Some(labels) => labels.clone(),
            None => {
                return Err(refuse(
                    ctx,
                    peer,
                    Code::UnknownSubset,
                    format!("no subset {:?} for {key}", req.subset),
                ));
            }
        }
    };
    let mut eps: Vec<&Endpoint> = svc
        .endpoints
        .iter()
        .filter(|e| e.ready && e.matches(&selector))
        .collect();
    if eps.is_empty() {
        return Err(refuse(
            ctx,
            peer,
            Code::NoHealthyEndpoint,
            format!("{key} has no ready endpoint in {}", ctx.cluster),
        ));
    }
    // Same zone first, then the rest; random inside each group.
    eps.shuffle(&mut rand::rng());
    eps.sort_by_key(|e| u8::from(e.locality.zone != ctx.locality.zone));
    let mut last = String::new();
    for ep in eps.into_iter().take(UPSTREAM_ATTEMPTS) {
        let addr = ep.target(port);
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok((tcp, ep.clone())),
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out"),
        }
        debug!(endpoint = %addr, error = %last, "endpoint connect failed");
    }
    Err(refuse(ctx, peer, Code::UpstreamConnectFailed, last))
}
