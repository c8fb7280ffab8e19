//! (feature `testing`) Sidecars with sample apps on loopback, fed mesh
//! state directly, plus a small HTTP/1.1 client that talks to a sidecar
//! as `curl -x` does. PKI and gateways come from the gateway's harness,
//! so the remote tier runs through real gateways and real QUIC.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_core::config::{AdminSection, ClusterName, ClusterSection};
use isthmus_core::identity::TrustStore;
use isthmus_core::model::*;
pub use isthmus_gateway::testing::{Cluster, DAY, Mesh, metric, scrape};
use tokio::sync::watch;

use crate::app::{self, Bound, Deps};
use crate::config::{ProxyConfig, WorkloadSection};

pub const NS: &str = "sample";
pub const PORT: u16 = 5000;
pub const HOST: &str = "helloworld.sample.svc.cluster.local:5000";
pub const URL: &str = "http://helloworld.sample.svc.cluster.local:5000";

pub use isthmus_e2e::client::{Answer, Client};
pub use isthmus_e2e::sample::{App, Mode};

/// The lab's sample app on a loopback port: answers
/// `helloworld <version> from <cluster> instance <name> …`, and echoes the
/// headers a test may look at as `x-seen-<name>`.
pub async fn app(cluster: &str, name: &str, version: &str) -> App {
    isthmus_e2e::sample::start(
        "127.0.0.1:0".parse().expect("address"),
        isthmus_e2e::sample::Identity {
            cluster: cluster.into(),
            version: version.into(),
            instance: name.into(),
            zone: String::new(),
        },
        0,
    )
    .await
    .expect("the sample app binds a loopback port")
}

/// A workload: its app and its sidecar.
#[derive(Debug)]
pub struct Workload {
    pub name: String,
    pub version: String,
    pub zone: String,
    pub app: App,
    pub sidecar: Bound,
    /// The sidecar's access log lines.
    pub log: Mutex<tokio::sync::mpsc::Receiver<serde_json::Value>>,
}

impl Workload {
    /// Access log lines written so far (and not taken before).
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        let mut rx = self.log.lock().unwrap();
        let mut out = Vec::new();
        while let Ok(l) = rx.try_recv() {
            out.push(l);
        }
        out
    }
}

/// Sidecar config for a workload of `c`.
pub fn config(
    c: &Cluster,
    name: &str,
    sa: &str,
    labels: &[(&str, &str)],
    zone: &str,
    app: SocketAddr,
    gateway: Option<SocketAddr>,
) -> ProxyConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    ProxyConfig {
        cluster: ClusterSection {
            name: ClusterName(c.name.into()),
            trust_domain: c.domain.td.clone(),
            locality: c.locality.clone(),
        },
        workload: WorkloadSection {
            name: name.into(),
            namespace: NS.into(),
            service_account: sa.into(),
            app,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            zone: zone.into(),
        },
        controller: "127.0.0.1:15010".into(),
        token_file: None,
        ca_root: None,
        gateway: gateway.map(|g| g.to_string()),
        outbound_addr: any,
        inbound_addr: any,
        transparent_addr: None,
        access_log: std::env::var_os("ISTHMUS_TEST_ACCESS_LOG").is_some(),
        certificate_ttl: crate::config::DEFAULT_CERTIFICATE_TTL,
        admin: AdminSection {
            admin: any,
            metrics: any,
            readiness: any,
        },
    }
}

/// Starts a workload (app + sidecar) in `c`.
pub async fn workload(
    c: &Cluster,
    trust: Arc<TrustStore>,
    state: watch::Receiver<Arc<MeshState>>,
    name: &str,
    version: &str,
    zone: &str,
    gateway: Option<SocketAddr>,
) -> Workload {
    let sa = name.split('-').next().unwrap_or(name);
    let certs = isthmus_core::testing::leaf(&c.ca, &c.workload_id(sa), DAY);
    workload_with_certs(c, trust, state, name, version, zone, gateway, certs).await
}

/// [`workload`] with the given certificate source (a `RotatingCert` in
/// rotation tests).
#[allow(clippy::too_many_arguments)]
pub async fn workload_with_certs(
    c: &Cluster,
    trust: Arc<TrustStore>,
    state: watch::Receiver<Arc<MeshState>>,
    name: &str,
    version: &str,
    zone: &str,
    gateway: Option<SocketAddr>,
    certs: Arc<dyn crate::app::CertSource>,
) -> Workload {
    let app = app(c.name, name, version).await;
    let sa = name.split('-').next().unwrap_or(name);
    let cfg = config(
        c,
        name,
        sa,
        &[("app", sa), ("version", version)],
        zone,
        app.addr,
        gateway,
    );
    let (log, log_rx) = crate::telemetry::AccessLog::channel(Default::default());
    let sidecar = app::build(
        cfg,
        Deps {
            certs,
            trust,
            state,
            logs: None,
            access_log: Some(log),
        },
    )
    .await
    .unwrap();
    Workload {
        log: Mutex::new(log_rx),
        name: name.into(),
        version: version.into(),
        zone: zone.into(),
        app,
        sidecar,
    }
}

/// `helloworld.sample` with these workloads as endpoints (their
/// sidecars' inbound addresses; zone under the cluster's region).
pub fn helloworld(c: &Cluster, endpoints: &[&Workload], exported_to: &[&str]) -> Arc<LocalService> {
    Arc::new(LocalService {
        key: ServiceKey::new(NS, "helloworld"),
        ports: vec![ServicePort {
            name: "http".into(),
            port: PORT,
            target_port: PORT,
            protocol: "TCP".into(),
        }],
        endpoints: endpoints
            .iter()
            .map(|w| Endpoint {
                address: w.sidecar.inbound_addr.ip(),
                ports: [("http".to_owned(), w.sidecar.inbound_addr.port())].into(),
                ready: true,
                locality: Locality::new(&c.locality.region, &w.zone),
                labels: [
                    ("app".to_owned(), "helloworld".to_owned()),
                    ("version".to_owned(), w.version.clone()),
                ]
                .into(),
                workload: w.name.clone(),
            })
            .collect(),
        exported_to: exported_to.iter().map(|s| s.to_string()).collect(),
    })
}

/// Parses a policy and puts it in `state`, as the config stream would.
pub fn policy(state: &mut MeshState, kind: &str, name: &str, spec: serde_json::Value) {
    let key = format!("{NS}/{name}");
    match kind {
        "VirtualService" => {
            let p = VirtualService::from_spec(NS, name, &spec).unwrap();
            state.virtual_services.insert(key, Arc::new(p));
        }
        "DestinationRule" => {
            let p = DestinationRule::from_spec(NS, name, &spec).unwrap();
            state
                .destination_rules
                .insert(p.service.clone(), Arc::new(p));
        }
        "PeerAuthentication" => {
            let p = PeerAuthentication::from_spec(NS, name, &spec).unwrap();
            state.peer_authentications.insert(key, Arc::new(p));
        }
        "AuthorizationPolicy" => {
            let p = AuthorizationPolicy::from_spec(NS, name, &spec).unwrap();
            state.authorization_policies.insert(key, Arc::new(p));
        }
        other => panic!("unknown kind {other}"),
    }
}

/// Puts a security policy object (AuthorizationPolicy or
/// PeerAuthentication) into `state` the way a sidecar receives it: encoded
/// as the controller sends it and decoded by the sidecar's own config
/// stream reader, so an object that cannot be applied as written arrives
/// as the reader makes it (its strictest form), never dropped.
pub fn streamed_policy(
    state: &mut MeshState,
    kind: &str,
    name: &str,
    annotations: &[(&str, &str)],
    spec: serde_json::Value,
) {
    use isthmus_proto::config::v1 as pb;
    let r = pb::Resource {
        resource: Some(pb::resource::Resource::Policy(pb::Policy {
            kind: kind.into(),
            api_version: "security.istio.io/v1".into(),
            namespace: NS.into(),
            name: name.into(),
            spec_json: spec.to_string().into_bytes(),
            generation: 1,
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })),
    };
    let held = isthmus_core::meshconfig::Held::from([(
        (format!("Policy/{kind}"), NS.to_owned(), name.to_owned()),
        r,
    )]);
    let (decoded, _) = isthmus_core::meshconfig::to_state(&held, 0);
    assert!(
        decoded.authorization_policies.len() + decoded.peer_authentications.len() == 1,
        "the config stream reader kept {kind} {name}"
    );
    state
        .authorization_policies
        .extend(decoded.authorization_policies);
    state
        .peer_authentications
        .extend(decoded.peer_authentications);
}

/// Publishes `state` with the next version and waits until `sidecars`
/// have applied it.
pub async fn publish(
    tx: &watch::Sender<Arc<MeshState>>,
    mut state: MeshState,
    sidecars: &[&Bound],
) {
    state.version = tx.borrow().version + 1;
    let v = state.version;
    tx.send_replace(Arc::new(state));
    for s in sidecars {
        let mut t = s.ctx.table.clone();
        tokio::time::timeout(Duration::from_secs(5), t.wait_for(|t| t.state.version >= v))
            .await
            .expect("sidecar applies the new state within 5 s")
            .unwrap();
    }
}

/// Counts answers by status and who served them (`<cluster> <name>
/// <version>`).
pub fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        // `helloworld <version> from <cluster> instance <name> …`, keyed
        // as `<status> <cluster> <name> <version>`; other answers by
        // their first words.
        let w: Vec<&str> = a.body.split_whitespace().collect();
        let who = match w.as_slice() {
            ["helloworld", version, "from", cluster, "instance", name, ..] => {
                format!("{cluster} {name} {version}")
            }
            _ => w.iter().take(3).copied().collect::<Vec<_>>().join(" "),
        };
        *m.entry(format!("{} {who}", a.status)).or_default() += 1;
    }
    m
}

impl std::fmt::Debug for One {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("One").finish_non_exhaustive()
    }
}

/// One cluster (east) with a client workload (`sleep`) and helloworld
/// v1 and v2, each behind a sidecar, fed mesh state directly.
pub struct One {
    pub mesh: Mesh,
    pub tx: watch::Sender<Arc<MeshState>>,
    pub client: Workload,
    pub v1: Workload,
    pub v2: Workload,
}

impl One {
    pub async fn new() -> Self {
        Self::with_v2_in("us-east1-a").await
    }

    /// The same, with helloworld-v2 in `zone` of us-east1.
    pub async fn with_v2_in(zone: &str) -> Self {
        let mesh = Mesh::new();
        let east = mesh.get("east");
        let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
        let t = mesh.trust.clone();
        let client = workload(
            east,
            t.clone(),
            rx.clone(),
            "sleep",
            "v1",
            "us-east1-a",
            None,
        )
        .await;
        let v1 = workload(
            east,
            t.clone(),
            rx.clone(),
            "helloworld-v1",
            "v1",
            "us-east1-a",
            None,
        )
        .await;
        let v2 = workload(east, t, rx, "helloworld-v2", "v2", zone, None).await;
        let one = Self {
            mesh,
            tx,
            client,
            v1,
            v2,
        };
        one.publish(|_| {}).await;
        one
    }

    /// helloworld with its two subsets.
    pub fn base(&self) -> MeshState {
        let east = self.mesh.get("east");
        let mut s = MeshState::default();
        s.local.insert(
            ServiceKey::new(NS, "helloworld"),
            helloworld(east, &[&self.v1, &self.v2], &[]),
        );
        policy(
            &mut s,
            "DestinationRule",
            "helloworld",
            serde_json::json!({"host": "helloworld", "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}}]}),
        );
        s
    }

    /// Publishes the base state edited by `edit` and waits until every
    /// sidecar applied it.
    pub async fn publish(&self, edit: impl FnOnce(&mut MeshState)) {
        let mut s = self.base();
        edit(&mut s);
        publish(
            &self.tx,
            s,
            &[&self.client.sidecar, &self.v1.sidecar, &self.v2.sidecar],
        )
        .await;
    }

    pub fn client(&self) -> Client {
        Client::new(self.client.sidecar.outbound_addr)
    }
}

/// `n` GETs of `path` on helloworld.
pub async fn many(c: &mut Client, n: usize, path: &str, headers: &[(&str, &str)]) -> Vec<Answer> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(c.get_with(&format!("{URL}{path}"), headers).await);
    }
    out
}

/// Answers with `status` from helloworld `version`.
pub fn count(answers: &[Answer], status: u16, version: &str) -> usize {
    answers
        .iter()
        .filter(|a| a.status == status && a.body.contains(&format!(" {version} ")))
        .count()
}
