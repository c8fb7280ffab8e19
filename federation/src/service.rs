//! The federation gRPC service peers call: `Link` (redeeming a one-time
//! token) and `Federate` (the catalogue stream, one session per peer).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use isthmus_core::identity::{Role, TrustBundle, TrustStore};
use isthmus_proto::federation::v1::peer_federation_server::PeerFederation;
use isthmus_proto::federation::v1::{LinkRequest, LinkResponse, PeerMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use crate::dial::add_peer;
use crate::link::PeerFile;
use crate::session::session;
use crate::state::{PeerState, Shared};
use crate::transport::PeerInfo;

/// The gRPC service peers call.
#[derive(Debug, Clone)]
pub struct FederationService {
    pub shared: Arc<Shared>,
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<PeerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl PeerFederation for FederationService {
    async fn link(&self, request: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        let shared = &self.shared;
        let r = request.into_inner();
        isthmus_core::identity::spiffe::validate_cluster_name(&r.cluster_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.cluster_name == shared.cluster {
            return Err(Status::invalid_argument(format!(
                "a cluster cannot link to itself ({})",
                r.cluster_name
            )));
        }
        let bundle = r
            .trust_bundle
            .ok_or_else(|| Status::invalid_argument("link request without a trust bundle"))?;
        let mut peer_bundle = TrustBundle::try_from(bundle).map_err(Status::invalid_argument)?;
        peer_bundle.sequence = peer_bundle.sequence.max(1);
        let (td, roots) = (peer_bundle.trust_domain.clone(), peer_bundle.roots.clone());
        // Refuse an unusable bundle before spending the token.
        TrustStore::with_bundles([peer_bundle.clone()])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        shared
            .state
            .redeem(&r.token_id, &r.token, &r.cluster_name, &r.proof)
            .await
            .map_err(|e| {
                warn!(joining = %r.cluster_name, error = %e, "link refused");
                Status::permission_denied(e.to_string())
            })?;
        let file = PeerFile {
            name: r.cluster_name.clone(),
            address: r.controller_address.clone(),
            trust_domain: td.to_string(),
            trust_bundle_pem: roots
                .iter()
                .map(isthmus_core::identity::pem::cert_to_pem)
                .collect(),
            pending_token: None,
            link_error: None,
        };
        shared
            .state
            .write_peer(&file)
            .await
            .map_err(|e| Status::internal(format!("cannot record the peer: {e}")))?;
        add_peer(
            shared,
            PeerState::new(
                &r.cluster_name,
                &r.controller_address,
                td,
                Default::default(),
            ),
            Some(peer_bundle),
        );
        info!(peer.cluster = %r.cluster_name, address = %r.controller_address, "linked");
        let own = shared
            .trust
            .get(&shared.trust_domain)
            .ok_or_else(|| Status::internal("own trust bundle missing"))?;
        Ok(Response::new(LinkResponse {
            cluster_name: shared.cluster.clone(),
            trust_bundle: Some((&own.bundle).into()),
        }))
    }

    type FederateStream = MessageStream;

    async fn federate(
        &self,
        request: Request<Streaming<PeerMessage>>,
    ) -> Result<Response<MessageStream>, Status> {
        let info = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified peer identity"))?;
        let identity = info.identity.ok_or_else(|| {
            Status::unauthenticated(
                "federation needs a client certificate; link the clusters first",
            )
        })?;
        let cluster = match identity.role() {
            Role::Controller { cluster } => cluster.to_owned(),
            _ => {
                return Err(Status::permission_denied(format!(
                    "{identity} is not a controller identity"
                )));
            }
        };
        let peer = self.shared.peer(&cluster).ok_or_else(|| {
            Status::permission_denied(format!(
                "cluster {cluster:?} is not a peer of {}; link it first",
                self.shared.cluster
            ))
        })?;
        if identity.trust_domain() != &peer.trust_domain {
            return Err(Status::permission_denied(format!(
                "{} is not in {}'s trust domain {}",
                identity, cluster, peer.trust_domain
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        tokio::spawn(
            session(shared, peer, tx, request.into_inner(), false)
                .instrument(info_span!("federation", peer.cluster = %cluster, side = "server")),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}
