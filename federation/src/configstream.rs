//! The config stream server (`isthmus.config.v1.MeshConfig` on the local
//! port, 15010): each subscriber gets the full mesh state, then only
//! what changed (resources upserted or removed by key), including the
//! trust bundles of this cluster and all its peers.
//!
//! The local port is gRPC over TLS with the controller's certificate
//! (`app.rs`): subscribers check it is their own cluster's controller; a
//! client certificate is optional (a sidecar asking the CA service for its
//! first one has none) and verified in full when presented.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use isthmus_core::identity::TrustStore;
use isthmus_core::meshconfig::{Held, to_resources};
use isthmus_core::model::MeshState;
use isthmus_proto::config::v1::mesh_config_server::MeshConfig;
use isthmus_proto::config::v1::{ConfigUpdate, ResourceKey, SubscribeRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

/// How often bundles are re-checked when the mesh state is quiet (a
/// peer's root rotation arrives through the trust store, not the state).
const BUNDLE_RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ConfigService {
    pub cluster: String,
    pub trust_domain: String,
    pub mesh: watch::Receiver<Arc<MeshState>>,
    pub trust: Arc<TrustStore>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl MeshConfig for ConfigService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let node = request.into_inner().node.unwrap_or_default();
        info!(node.name = %node.name, node.kind = ?node.kind(), "config subscriber connected");
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        // Spawned so a failed send tells us the subscriber has gone.
        tokio::spawn(async move {
            let mut mesh = this.mesh.clone();
            let mut sent: Option<Held> = None;
            loop {
                let state = mesh.borrow_and_update().clone();
                let now = to_resources(&state, &this.trust.bundles());
                let update = match &sent {
                    None => ConfigUpdate {
                        version: state.version,
                        full_state: true,
                        upserts: now.values().cloned().collect(),
                        removals: vec![],
                        cluster_name: this.cluster.clone(),
                        trust_domain: this.trust_domain.clone(),
                    },
                    Some(prev) => ConfigUpdate {
                        version: state.version,
                        full_state: false,
                        upserts: now
                            .iter()
                            .filter(|(k, v)| prev.get(*k) != Some(*v))
                            .map(|(_, v)| v.clone())
                            .collect(),
                        removals: prev
                            .keys()
                            .filter(|k| !now.contains_key(*k))
                            .map(|(kind, namespace, name)| ResourceKey {
                                kind: kind.clone(),
                                namespace: namespace.clone(),
                                name: name.clone(),
                            })
                            .collect(),
                        cluster_name: this.cluster.clone(),
                        trust_domain: this.trust_domain.clone(),
                    },
                };
                let worth_sending =
                    update.full_state || !update.upserts.is_empty() || !update.removals.is_empty();
                if worth_sending && tx.send(Ok(update)).await.is_err() {
                    debug!(node.name = %node.name, "config subscriber gone");
                    return;
                }
                sent = Some(now);
                tokio::select! {
                    changed = mesh.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(BUNDLE_RECHECK) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
