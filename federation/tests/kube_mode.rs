//! Controllers in kube mode (`source: {kube: ...}`) against the in-repo
//! API stand-in on loopback, driven with stock `kubectl`: the kube
//! source's watches, the ServiceEntry sink by server-side apply, MCS
//! ServiceExport status, and the API server's faults (outage,
//! compaction, RBAC, a CRD not installed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use isthmus_core::model::ServiceKey;
use isthmus_core::testing::assert_eventually;
use isthmus_federation::app::Bound;
use isthmus_federation::catalog::ExportPolicy;
use isthmus_federation::config::{ControllerConfig, KubeSource, SourceConfig};
use isthmus_federation::leader::LeaseConfig;
use isthmus_federation::testing::TestCluster;
use isthmus_kube_standin::ApiServer;
use serde_json::{Value, json};

const HB: Duration = Duration::from_millis(100);
const LEASE: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(15);

const SE: &str = "serviceentries.networking.istio.io";
const SVCEX: &str = "serviceexports.multicluster.x-k8s.io";
const SVCIM: &str = "serviceimports.multicluster.x-k8s.io";

/// One cluster: its API stand-in, a kubeconfig for it, its controller's
/// identity.
struct Kube {
    api: ApiServer,
    kubeconfig: PathBuf,
    cluster: TestCluster,
}

impl Kube {
    async fn new(root: &Path, name: &str, region: &str, api: ApiServer) -> Self {
        let cluster = TestCluster::new(root, name, region);
        let kubeconfig = root.join(format!("{name}.kubeconfig"));
        api.write_kubeconfig(&kubeconfig, name).unwrap();
        Self {
            api,
            kubeconfig,
            cluster,
        }
    }

    /// A cluster with an API stand-in of its own.
    async fn fresh(root: &Path, name: &str, region: &str) -> Self {
        Self::new(root, name, region, ApiServer::start().await.unwrap()).await
    }

    fn config(&self, peers: &[&Kube]) -> ControllerConfig {
        let peers: Vec<(&TestCluster, ExportPolicy)> = peers
            .iter()
            .map(|p| (&p.cluster, ExportPolicy::default()))
            .collect();
        let mut c = self.cluster.config(&peers, HB, LEASE);
        c.source = SourceConfig::Kube(KubeSource {
            kubeconfig: Some(self.kubeconfig.clone()),
            context: None,
            namespace: "isthmus-system".into(),
            leader_election: LeaseConfig {
                name: "isthmus-controller".into(),
                lease_duration: Duration::from_secs(2),
            },
            gateway_service_account: ("isthmus-system".into(), "isthmus-gateway".into()),
            watch: Default::default(),
        });
        c
    }

    async fn start(&self, peers: &[&Kube]) -> Bound {
        let bundles: Vec<_> = peers.iter().map(|p| p.cluster.bundle()).collect();
        self.cluster.start(self.config(peers), &bundles).await
    }

    /// Runs stock kubectl against this cluster's API; its stdout.
    async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        let stdin = stdin.map(str::to_owned);
        let out = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            cmd.stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn().expect("kubectl is installed");
            if let Some(s) = stdin {
                child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
            }
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply --server-side` of a manifest.
    async fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "--server-side", "-f", "-"], Some(yaml))
            .await;
    }
}

/// Two clusters, each with its own API stand-in.
async fn east_and_west(root: &Path) -> (Kube, Kube) {
    let east = Kube::fresh(root, "east", "us-east1").await;
    let west = Kube::fresh(root, "west", "us-west1").await;
    (east, west)
}

/// A Service with `pods` ready endpoints whose Pods carry `version`, a
/// Node with its topology labels, and (optionally) the ServiceExport:
/// objects a real API server accepts (loopback addresses aside).
fn workload(name: &str, port: u16, pods: usize, version: &str, exported: bool) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n  labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: r1-a}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: sample}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: {port}, targetPort: 8080}}]\n---\n"
    );
    let mut endpoints = String::new();
    for i in 0..pods {
        y.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}-{i}\n  namespace: sample\n  labels: {{app: {name}, version: {version}, pod-template-hash: h{i}}}\nspec:\n  nodeName: node-1\n  containers: [{{name: app, image: sample}}]\n---\n"
        ));
        endpoints.push_str(&format!(
            "- addresses: [\"127.0.0.{}\"]\n  conditions: {{ready: true}}\n  nodeName: node-1\n  targetRef: {{kind: Pod, namespace: sample, name: {name}-{i}}}\n",
            10 + i
        ));
    }
    y.push_str(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abc\n  namespace: sample\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
    ));
    if exported {
        y.push_str(&format!(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: sample}}\n"
        ));
    }
    y
}

/// A ServiceExport's condition `type`: (status, reason).
fn condition(api: &ApiServer, name: &str, type_: &str) -> Option<(String, String)> {
    let o = api.get(SVCEX, "sample", name)?;
    let c = o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
    ))
}

fn pair(a: &str, b: &str) -> Option<(String, String)> {
    Some((a.to_owned(), b.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exported_with_kubectl_in_one_cluster_is_a_service_entry_in_the_other() {
    let root = tempfile::tempdir().unwrap();
    let (east, west) = east_and_west(root.path()).await;
    west.apply(&workload("web", 80, 2, "v2", true)).await;
    let _e = east.start(&[&west]).await;
    let w = west.start(&[&east]).await;

    // West's export: its status says so, as MCS defines it.
    assert_eventually(
        "west's ServiceExport is Valid and Ready",
        WAIT,
        async || {
            condition(&west.api, "web", "Valid") == pair("True", "Valid")
                && condition(&west.api, "web", "Ready") == pair("True", "Exported")
                && condition(&west.api, "web", "Conflict") == pair("False", "NoConflict")
        },
    )
    .await;
    // Endpoint labels come from the Pods (EndpointSlices carry none), per
    // pod labels left out; the locality from the Node.
    let cat = w.shared.catalog.borrow().clone();
    let export = &cat.exports[&ServiceKey::new("sample", "web")];
    assert_eq!(export.groups.len(), 1, "{:?}", export.groups);
    let g = &export.groups[0];
    assert_eq!(
        g.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
        ["app=web", "version=v2"]
    );
    assert_eq!((g.healthy, g.total), (2, 2));
    assert_eq!(g.locality.zone, "r1-a");

    // East: a ServiceEntry, written by server-side apply as `isthmus`,
    // that stock kubectl lists.
    assert_eventually("east has the ServiceEntry", WAIT, async || {
        east.api.get(SE, "sample", "web-clusterset").is_some()
    })
    .await;
    let listed = east
        .kubectl(&["get", "serviceentries", "-A", "-o", "name"], None)
        .await;
    assert!(
        listed.contains("serviceentry.networking.istio.io/web-clusterset"),
        "{listed}"
    );
    let se = east.api.get(SE, "sample", "web-clusterset").unwrap();
    assert_eq!(
        se["spec"]["hosts"],
        json!(["web.sample.svc.clusterset.local"])
    );
    assert_eq!(
        se["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "isthmus"
    );
    let managers: Vec<&str> = se["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, ["isthmus"]);
    assert_eq!(
        se["spec"]["endpoints"][0]["labels"]["topology.istio.io/cluster"],
        "west"
    );

    // And the MCS ServiceImport, for tools that read MCS.
    assert_eventually("east has the ServiceImport", WAIT, async || {
        east.api
            .get(SVCIM, "sample", "web")
            .is_some_and(|si| si["status"]["clusters"] == json!([{"cluster": "west"}]))
    })
    .await;
    let si = east.api.get(SVCIM, "sample", "web").unwrap();
    assert_eq!(si["spec"]["type"], "ClusterSetIP");
    assert_eq!(
        si["spec"]["ports"],
        json!([{"name": "http", "port": 80, "protocol": "TCP"}])
    );

    // Idle: no writes at all, on either side.
    let (se_writes, si_writes, status_writes) = (
        east.api.writes(SE),
        east.api.writes(SVCIM),
        west.api.writes(SVCEX),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(east.api.writes(SE), se_writes, "writes while idle");
    assert_eq!(east.api.writes(SVCIM), si_writes, "writes while idle");
    assert_eq!(
        west.api.writes(SVCEX),
        status_writes,
        "status writes while idle"
    );

    // A third pod: one write, to that ServiceEntry.
    west.apply(
        &workload("web", 80, 3, "v2", true)
            .split("---\n")
            .filter(|d| !d.contains("kind: Node"))
            .collect::<Vec<_>>()
            .join("---\n"),
    )
    .await;
    assert_eventually("east's weight follows west's pods", WAIT, async || {
        east.api.get(SE, "sample", "web-clusterset").unwrap()["spec"]["endpoints"][0]["weight"] == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(east.api.writes(SE), se_writes + 1, "one write per change");
    assert_eq!(
        east.api.writes(SVCIM),
        si_writes,
        "the ServiceImport did not change"
    );

    // Unexport with kubectl: the ServiceEntry goes.
    west.kubectl(&["delete", "serviceexport", "web", "-n", "sample"], None)
        .await;
    assert_eventually(
        "east's ServiceEntry and ServiceImport are deleted",
        WAIT,
        async || {
            east.api.get(SE, "sample", "web-clusterset").is_none()
                && east.api.get(SVCIM, "sample", "web").is_none()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_status_names_what_is_wrong() {
    let root = tempfile::tempdir().unwrap();
    let east = Kube::fresh(root.path(), "east", "us-east1").await;
    east.apply(
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: ghost, namespace: sample}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: sample}\nspec: {type: ExternalName, externalName: db.example.com}\n---\n\
         apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: db, namespace: sample}\n",
    )
    .await;
    let _e = east.start(&[]).await;
    assert_eventually("NoService and InvalidServiceType", WAIT, async || {
        condition(&east.api, "ghost", "Valid") == pair("False", "NoService")
            && condition(&east.api, "db", "Valid") == pair("False", "InvalidServiceType")
            && condition(&east.api, "ghost", "Ready") == pair("False", "Pending")
    })
    .await;
    let yaml = east
        .kubectl(
            &[
                "get",
                "serviceexport",
                "ghost",
                "-n",
                "sample",
                "-o",
                "yaml",
            ],
            None,
        )
        .await;
    assert!(yaml.contains("no Service sample/ghost"), "{yaml}");
    // The Service appears: the export becomes valid.
    east.apply(&workload("ghost", 80, 1, "v1", false)).await;
    assert_eventually("the export becomes valid", WAIT, async || {
        condition(&east.api, "ghost", "Valid") == pair("True", "Valid")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_entry_owned_by_another_manager_is_reported_not_forced() {
    let root = tempfile::tempdir().unwrap();
    let (east, west) = east_and_west(root.path()).await;
    west.apply(&workload("web", 80, 1, "v1", true)).await;
    west.apply(&workload("api", 81, 1, "v1", true)).await;
    // Someone else's ServiceEntry, with Isthmus's name and other hosts.
    east.kubectl(
        &["apply", "--server-side", "--field-manager=platform-team", "-f", "-"],
        Some("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: web-clusterset, namespace: sample}\nspec: {hosts: [web.legacy.example], resolution: DNS}\n"),
    )
    .await;
    let _e = east.start(&[&west]).await;
    let _w = west.start(&[&east]).await;
    assert_eventually("the other import is written", WAIT, async || {
        east.api.get(SE, "sample", "api-clusterset").is_some()
    })
    .await;
    let se = east.api.get(SE, "sample", "web-clusterset").unwrap();
    assert_eq!(
        se["spec"]["hosts"],
        json!(["web.legacy.example"]),
        "forced: {se}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_keeps_the_last_state_and_a_relist_collects_what_was_missed() {
    let root = tempfile::tempdir().unwrap();
    let (east, west) = east_and_west(root.path()).await;
    west.apply(&workload("web", 80, 1, "v1", true)).await;
    west.apply(&workload("api", 81, 1, "v1", true)).await;
    let _e = east.start(&[&west]).await;
    let w = west.start(&[&east]).await;
    assert_eventually("east imports both", WAIT, async || {
        east.api.get(SE, "sample", "web-clusterset").is_some()
            && east.api.get(SE, "sample", "api-clusterset").is_some()
    })
    .await;

    // West's API server goes down: west keeps exporting what it had.
    west.api.stop().await;
    assert_eventually("west's source reports the outage", WAIT, async || {
        source_state(&w, "Service").await.0 == "failing"
    })
    .await;
    let (_, error) = source_state(&w, "Service").await;
    assert!(error.contains("cannot reach the API server"), "{error}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        w.shared.catalog.borrow().exports.len(),
        2,
        "stale, not empty"
    );
    assert!(east.api.get(SE, "sample", "web-clusterset").is_some());

    // Meanwhile "api" is unexported and history is compacted: west must
    // relist (410 Gone) and find it gone.
    assert!(west.api.remove(SVCEX, "sample", "api"));
    west.api.compact();
    west.api.resume().await.unwrap();
    assert_eventually("east drops the unexported service", WAIT, async || {
        east.api.get(SE, "sample", "api-clusterset").is_none()
    })
    .await;
    assert!(east.api.get(SE, "sample", "web-clusterset").is_some());
    assert_eventually("west's source is synced again", WAIT, async || {
        source_state(&w, "Service").await.0 == "synced"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crd_and_a_forbidden_kind_are_explained_and_the_rest_works() {
    let root = tempfile::tempdir().unwrap();
    // No Istio security CRDs here; RBAC forbids listing Nodes.
    let api = ApiServer::builder()
        .without("peerauthentications.security.istio.io")
        .start()
        .await
        .unwrap();
    api.deny("list", "nodes");
    let east = Kube::new(root.path(), "east", "us-east1", api).await;
    east.apply(&workload("web", 80, 1, "v1", true)).await;
    let e = east.start(&[]).await;
    assert_eventually("both problems are reported", WAIT, async || {
        source_state(&e, "PeerAuthentication").await.0 == "not installed"
            && source_state(&e, "Node").await.0 == "failing"
    })
    .await;
    let (_, missing) = source_state(&e, "PeerAuthentication").await;
    assert!(missing.contains("install Istio's CRDs"), "{missing}");
    let (_, forbidden) = source_state(&e, "Node").await;
    assert!(
        forbidden.contains("list nodes forbidden") && forbidden.contains("isthmus-controller"),
        "{forbidden}"
    );
    // Nodes never listed: nothing is published yet (a half-read cluster
    // would misplace every endpoint).
    assert!(!e.shared.catalog.borrow().listed);
    // RBAC fixed: the watcher's backoff retries and the cluster appears,
    // the missing CRD still counting as "none".
    east.api.allow_all();
    assert_eventually(
        "the export is published",
        Duration::from_secs(40),
        async || e.shared.catalog.borrow().exports.len() == 1,
    )
    .await;
}

/// The controller's source state for a kind, from its `/config_dump`:
/// (state, error).
async fn source_state(b: &Bound, kind: &str) -> (String, String) {
    let dump: Value = serde_json::from_str(
        &isthmus_core::admin::http_get(b.admin_addr, "/config_dump")
            .await
            .unwrap(),
    )
    .unwrap();
    let k = &dump["source"][kind];
    (
        k["state"].as_str().unwrap_or("").to_owned(),
        k["error"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_writes_and_a_handover_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let api = ApiServer::start().await.unwrap();
    let a = Kube::new(&root.path().join("a"), "east", "us-east1", api).await;
    // A second replica of the same cluster, on the same API server.
    let b_cluster = TestCluster::new(&root.path().join("b"), "east", "us-east1");
    a.apply(&workload("web", 80, 1, "v1", true)).await;
    let ra = a.start(&[]).await;
    assert_eventually("replica a leads", WAIT, async || {
        lease_holder(&a.api).is_some()
    })
    .await;
    let mut b_config = a.config(&[]);
    b_config.federation_addr = b_cluster.federation;
    b_config.state_dir = root.path().join("b/state");
    let rb = b_cluster.start(b_config, &[]).await;
    assert_eventually("web's status is written", WAIT, async || {
        condition(&a.api, "web", "Valid") == pair("True", "Valid")
    })
    .await;
    let first = lease_holder(&a.api).unwrap();
    assert!(*ra.shared.writer.borrow() && !*rb.shared.writer.borrow());

    // A change both replicas see: one status write, by the leader.
    let before = a.api.writes(SVCEX);
    a.apply("apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: api, namespace: sample}\n")
        .await;
    assert_eventually("api's status is written", WAIT, async || {
        condition(&a.api, "api", "Valid") == pair("False", "NoService")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The apply itself, and one status write.
    assert_eq!(a.api.writes(SVCEX), before + 2);

    // The leader stops: it releases the Lease and b takes over.
    ra.shutdown(Duration::from_secs(5)).await;
    assert_eventually("replica b leads", WAIT, async || {
        lease_holder(&a.api).is_some_and(|h| h != first) && *rb.shared.writer.borrow()
    })
    .await;
    let lease = a
        .api
        .get(
            "leases.coordination.k8s.io",
            "isthmus-system",
            "isthmus-controller",
        )
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
    a.apply("apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: db, namespace: sample}\n")
        .await;
    assert_eventually("the new leader writes db's status", WAIT, async || {
        condition(&a.api, "db", "Valid") == pair("False", "NoService")
    })
    .await;
}

/// Who holds the leader Lease, if anyone.
fn lease_holder(api: &ApiServer) -> Option<String> {
    api.get(
        "leases.coordination.k8s.io",
        "isthmus-system",
        "isthmus-controller",
    )?["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_what_a_token_review_proves() {
    use isthmus_core::caclient::{BearerToken, RemoteSigner};
    use isthmus_core::identity::{RotatingCert, SpiffeId};
    use isthmus_kube_standin::TokenInfo;

    let root = tempfile::tempdir().unwrap();
    let api = ApiServer::start().await.unwrap();
    let sa = |ns: &str, name: &str, aud: &str| TokenInfo {
        username: format!("system:serviceaccount:{ns}:{name}"),
        uid: format!("{ns}-{name}"),
        groups: vec!["system:serviceaccounts".into()],
        audiences: vec![aud.into()],
    };
    api.add_token("web-projected", sa("sample", "web", "isthmus-ca"));
    api.add_token(
        "gw-projected",
        sa("isthmus-system", "isthmus-gateway", "isthmus-ca"),
    );
    api.add_token(
        "web-for-the-api",
        sa("sample", "web", "https://kubernetes.default.svc"),
    );
    let east = Kube::new(root.path(), "east", "us-east1", api).await;
    let e = east.start(&[]).await;
    let provider = isthmus_core::tls::provider();
    // The sidecar's token file, rotated in place as the kubelet does.
    let token_file = root.path().join("token");
    let signer = RemoteSigner {
        addr: e.local_addr,
        token: BearerToken::File(token_file.clone()),
        tls: east.cluster.local_tls(None),
    };
    let issue = async |id: &SpiffeId, token: &str| {
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        RotatingCert::issue(
            id.clone(),
            &signer,
            Duration::from_secs(600),
            provider.clone(),
        )
        .await
        .map(|c| c.certified_key().cert.len())
    };
    let td = &east.cluster.domain.td;
    let web = SpiffeId::workload(td, "sample", "web").unwrap();
    assert!(issue(&web, "web-projected").await.is_ok());
    let gateway = SpiffeId::gateway(td, "east").unwrap();
    assert!(issue(&gateway, "gw-projected").await.is_ok());

    // Another ServiceAccount's identity, a token for another audience, an
    // unknown token: refused, with the reason.
    let other = SpiffeId::workload(td, "sample", "db").unwrap();
    let err = issue(&other, "web-projected")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("PermissionDenied"), "{err}");
    let err = issue(&web, "web-for-the-api")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Unauthenticated") && err.contains("audience"),
        "{err}"
    );
    let err = issue(&web, "forged").await.unwrap_err().to_string();
    assert!(err.contains("refused the token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_live_in_secrets_and_survive_a_restart() {
    use isthmus_federation::state_store::{apply_token, create_token};
    let root = tempfile::tempdir().unwrap();
    let (east, west) = east_and_west(root.path()).await;
    let e = east.start(&[]).await;
    let _w = west.start(&[]).await;
    let source = |k: &Kube| KubeSource {
        kubeconfig: Some(k.kubeconfig.clone()),
        ..KubeSource::default()
    };
    // What `isthmus link create --context east` and `isthmus link apply
    // --context west <token>` do, once the controllers published their
    // link details.
    assert_eventually("both published their link details", WAIT, async || {
        east.api
            .get("configmaps", "isthmus-system", "isthmus-cluster")
            .is_some()
            && west
                .api
                .get("configmaps", "isthmus-system", "isthmus-cluster")
                .is_some()
    })
    .await;
    let (token, info) = create_token(&source(&east), "isthmus-system", Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(info.cluster, "east");
    // Applied in the cluster that made it: refused.
    let own = apply_token(&source(&east), "isthmus-system", &token)
        .await
        .unwrap_err();
    assert!(own.contains("created by cluster east itself"), "{own}");
    assert_eq!(
        apply_token(&source(&west), "isthmus-system", &token)
            .await
            .unwrap(),
        "west"
    );

    west.apply(&workload("web", 80, 1, "v1", true)).await;
    assert_eventually("east imports west's service", WAIT, async || {
        east.api.get(SE, "sample", "web-clusterset").is_some()
    })
    .await;
    // The token is spent, recorded in east's Secret; each side keeps the
    // other as a peer Secret.
    let secret = east
        .api
        .get(
            "secrets",
            "isthmus-system",
            &format!("isthmus-link-{}", token.payload.token_id),
        )
        .unwrap();
    let record = base64_decode(secret["data"]["token.json"].as_str().unwrap());
    assert!(record.contains("\"used_by\":\"west\""), "{record}");
    for (k, peer) in [(&east, "west"), (&west, "east")] {
        let s = k
            .api
            .get("secrets", "isthmus-system", &format!("isthmus-peer-{peer}"))
            .unwrap();
        let text = base64_decode(s["data"]["peer.yaml"].as_str().unwrap());
        assert!(
            text.contains("BEGIN CERTIFICATE") && !text.contains("pending_token: isthmus1"),
            "{text}"
        );
    }

    // East restarts with an empty disk (a rescheduled pod): its peers come
    // back from the Secrets and it still imports what west exports.
    e.shutdown(Duration::from_secs(5)).await;
    let mut config = east.config(&[]);
    config.state_dir = root.path().join("fresh-disk");
    let _e2 = east.cluster.start(config, &[]).await;
    west.apply(&workload("api", 81, 1, "v1", true)).await;
    assert_eventually(
        "the restarted east imports a new service",
        WAIT,
        async || east.api.get(SE, "sample", "api-clusterset").is_some(),
    )
    .await;
}

fn base64_decode(s: &str) -> String {
    use base64::Engine as _;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_api_server_stops_writing_before_its_lease_expires() {
    let root = tempfile::tempdir().unwrap();
    let east = Kube::fresh(root.path(), "east", "us-east1").await;
    let e = east.start(&[]).await;
    assert_eventually("east leads", WAIT, async || *e.shared.writer.borrow()).await;
    east.api.stop().await;
    let cut = std::time::Instant::now();
    // The Lease lasts 2 s: writes stop within two thirds of that after the
    // last renewal (one renewal period may have passed before the cut).
    assert_eventually("writes stop", Duration::from_secs(3), async || {
        !*e.shared.writer.borrow()
    })
    .await;
    assert!(
        cut.elapsed() < Duration::from_secs(2),
        "{:?}",
        cut.elapsed()
    );
}

/// Two replicas of west's controller on one API server; east knows only
/// the first one's address (as a peer reaching west through one Service
/// address reaches only some of its replicas). Each west replica still
/// hears east, so either can serve its sidecars and write; a handover
/// loses and duplicates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_hears_its_peers_and_a_handover_loses_and_duplicates_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (east, west) = east_and_west(root.path()).await;
    east.apply(&workload("web", 80, 1, "v1", true)).await;
    west.apply(&workload("api", 8080, 2, "v1", true)).await;
    let e = east.start(&[&west]).await;
    let w1 = west.start(&[&east]).await;
    assert_eventually("west's first replica leads", WAIT, async || {
        lease_holder(&west.api).is_some() && *w1.shared.writer.borrow()
    })
    .await;
    // The second replica: west's identity and configuration, ports of
    // its own.
    let w2_ports = TestCluster::new(&root.path().join("w2"), "west", "us-west1");
    let mut c = west.config(&[&east]);
    c.federation_addr = w2_ports.federation;
    c.state_dir = root.path().join("w2/state");
    let w2 = west.cluster.start(c, &[east.cluster.bundle()]).await;
    assert!(!*w2.shared.writer.borrow());

    // East dials only w1; w2, hearing nothing from east, dials it itself.
    let imports_web = |b: &Bound| {
        b.shared
            .peer("east")
            .is_some_and(|p| p.status().connected && p.status().imported == 1)
    };
    assert_eventually("both west replicas import east's web", WAIT, async || {
        imports_web(&w1) && imports_web(&w2)
    })
    .await;
    assert_eventually("east talks to both west replicas", WAIT, async || {
        e.shared
            .peer("west")
            .is_some_and(|p| p.status().sessions == 2)
    })
    .await;
    assert_eventually(
        "each cluster has the other's ServiceEntry",
        WAIT,
        async || {
            east.api.get(SE, "sample", "api-clusterset").is_some()
                && west.api.get(SE, "sample", "web-clusterset").is_some()
        },
    )
    .await;
    // Both replicas hold the same merged view for their sidecars.
    let imported = |b: &Bound| {
        let m = b.mesh.borrow();
        let mut v: Vec<String> = m.imported.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(imported(&w1), imported(&w2));
    assert_eq!(imported(&w2), ["sample/web"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (east_writes, west_writes) = (east.api.writes(SE), west.api.writes(SE));

    // w1 stops: w2 takes the Lease. East keeps west's services (its
    // session with w2 carries them: never stale), and w2 finds nothing
    // to rewrite.
    w1.shutdown(Duration::from_secs(5)).await;
    assert_eventually("w2 leads", WAIT, async || *w2.shared.writer.borrow()).await;
    for _ in 0..10 {
        let p = e.shared.peer("west").unwrap().status();
        assert!(p.connected && !p.stale && p.imported == 1, "{p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(east.api.writes(SE), east_writes, "east rewrote an import");
    assert_eq!(
        west.api.writes(SE),
        west_writes,
        "the new leader rewrote an import"
    );
    assert!(west.api.get(SE, "sample", "web-clusterset").is_some());

    // A change after the handover reaches west's API through w2.
    east.apply(&workload("db", 5432, 1, "v1", true)).await;
    assert_eventually("w2 writes east's new export", WAIT, async || {
        west.api.get(SE, "sample", "db-clusterset").is_some()
    })
    .await;
}

/// `namespaces` and `labelSelector` limit what is read: one watcher per
/// namespace (a Role there is enough), and the API server filters by
/// label; what they hide is as if absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_and_a_label_selector_limit_what_is_read() {
    let root = tempfile::tempdir().unwrap();
    let (east, west) = east_and_west(root.path()).await;
    let labelled = |y: String, name: &str| {
        y.replace(
            &format!("metadata: {{name: {name}, namespace: sample}}"),
            &format!("metadata: {{name: {name}, namespace: sample, labels: {{mesh: isthmus}}}}"),
        )
    };
    // sample/web: labelled; sample/api: not; other/db: labelled, but in
    // a namespace not read.
    west.apply(&labelled(workload("web", 80, 1, "v1", true), "web"))
        .await;
    west.apply(&workload("api", 8080, 1, "v1", true)).await;
    west.apply(
        &labelled(workload("db", 5432, 1, "v1", true), "db")
            .replace("namespace: sample", "namespace: other"),
    )
    .await;
    let _e = east.start(&[&west]).await;
    let mut c = west.config(&[&east]);
    if let SourceConfig::Kube(k) = &mut c.source {
        k.watch.namespaces = vec!["sample".into()];
        k.watch.label_selector = Some("mesh=isthmus".into());
    }
    let bundles = [east.cluster.bundle()];
    let w = west.cluster.start(c, &bundles).await;
    assert_eventually("east imports web", WAIT, async || {
        east.api.get(SE, "sample", "web-clusterset").is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exports: Vec<String> = w
        .shared
        .catalog
        .borrow()
        .exports
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(exports, ["sample/web"]);
    assert!(east.api.get(SE, "sample", "api-clusterset").is_none());
    assert!(east.api.get(SE, "other", "db-clusterset").is_none());
    // Health per namespace; api's and db's exports are not this
    // controller's to report on (no status written).
    let (state, _) = source_state(&w, "Service/sample").await;
    assert_eq!(state, "synced");
    assert_eq!(source_state(&w, "Node").await.0, "synced");
    assert!(condition(&west.api, "web", "Valid").is_some());
    assert_eq!(condition(&west.api, "api", "Valid"), None);
}
