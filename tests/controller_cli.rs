//! Two `isthmus controller` processes, set up the way a user would (PKI
//! from `isthmus ca`, YAML configs), checked through `isthmus status`;
//! one is killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_isthmus")
}

fn isthmus(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn free_port() -> u16 {
    isthmus_e2e::kit::unused_port()
}

use isthmus_e2e::Proc;

struct Cluster {
    name: &'static str,
    dir: PathBuf,
    federation: u16,
    admin: u16,
}

impl Cluster {
    fn new(root: &Path, name: &'static str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        let s = |p: PathBuf| p.to_str().unwrap().to_owned();
        let td = format!("{name}.local");
        assert!(
            isthmus(&[
                "ca",
                "init",
                "--trust-domain",
                &td,
                "--out",
                &s(dir.join("root"))
            ])
            .status
            .success()
        );
        assert!(
            isthmus(&[
                "ca",
                "cluster",
                name,
                "--ca",
                &s(dir.join("root")),
                "--out",
                &s(dir.join("ca"))
            ])
            .status
            .success()
        );
        Self {
            name,
            dir,
            federation: free_port(),
            admin: free_port(),
        }
    }

    fn write_config(&self, peer: &Cluster, region: &str) -> PathBuf {
        self.write_config_with(Some(peer), region)
    }

    fn write_config_with(&self, peer: Option<&Cluster>, region: &str) -> PathBuf {
        let peers = match peer {
            Some(peer) => format!(
                "peers:\n  - name: {peer}\n    address: \"127.0.0.1:{pfed}\"\n    trustDomain: {peer}.local\n    trustBundle: {pdir}/root/root-cert.pem\n",
                peer = peer.name,
                pfed = peer.federation,
                pdir = peer.dir.display()
            ),
            None => String::new(),
        };
        let yaml = format!(
            r#"kind: Controller
cluster: {{ name: {name}, trustDomain: {name}.local, locality: {{ region: {region} }} }}
caDir: {dir}/ca
sourceDir: {dir}/manifests
listen: {{ federation: "127.0.0.1:{fed}", local: "127.0.0.1:0" }}
gatewayAddress: "127.0.0.1:15443"
heartbeatInterval: 200ms
staleLease: 3s
{peers}admin: {{ admin: "127.0.0.1:{admin}", metrics: "127.0.0.1:0", readiness: "127.0.0.1:0" }}
"#,
            name = self.name,
            dir = self.dir.display(),
            fed = self.federation,
            admin = self.admin,
        );
        let path = self.dir.join("controller.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    fn start(&self, config: &Path) -> Proc {
        Proc::spawn(
            self.name,
            Command::new(bin())
                .args(["controller", "--config", config.to_str().unwrap()])
                .env("ISTHMUS_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap()
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = isthmus(&[
            "status",
            "--controller",
            &format!("127.0.0.1:{}", self.admin),
            "-o",
            "json",
        ]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn service_entry(&self) -> PathBuf {
        self.dir
            .join("manifests/isthmus-imports/sample.helloworld-clusterset.yaml")
    }
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut wait = Duration::from_millis(10);
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(200));
    }
}

const HELLOWORLD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: helloworld, namespace: sample}\nspec: {ports: [{name: http, port: 5000}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: hw-1, namespace: sample, labels: {kubernetes.io/service-name: helloworld}}\nendpoints: [{addresses: [\"127.0.2.10\"]}]\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: helloworld, namespace: sample}\n";

#[test]
fn controllers_as_processes_federate_and_status_tells_the_truth_through_a_kill() {
    let root = tempfile::tempdir().unwrap();
    let east = Cluster::new(root.path(), "east");
    let west = Cluster::new(root.path(), "west");
    std::fs::write(west.dir.join("manifests/helloworld.yaml"), HELLOWORLD).unwrap();
    let east_cfg = east.write_config(&west, "us-east1");
    let west_cfg = west.write_config(&east, "us-west1");
    for cfg in [&east_cfg, &west_cfg] {
        let out = isthmus(&["config", "check", cfg.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _east_p = east.start(&east_cfg);
    let west_p = west.start(&west_cfg);

    eventually("east imports helloworld", Duration::from_secs(20), || {
        east.service_entry().exists()
    });
    let s = east.status().unwrap();
    let p = &s["peers"][0];
    assert_eq!(p["cluster"], "west");
    assert_eq!(p["connected"], true);
    assert_eq!(p["imported"], 1);
    let table = isthmus(&[
        "status",
        "--controller",
        &format!("127.0.0.1:{}", east.admin),
    ]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("CLUSTER")
            && table
                .lines()
                .any(|l| l.starts_with("west") && l.contains("yes")),
        "{table}"
    );

    // A policy that cannot be applied as written shows in `isthmus status`
    // (the table and JSON), with what it does instead.
    std::fs::write(
        east.dir.join("manifests/policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-jwt, namespace: sample}\nspec: {action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}\n",
    )
    .unwrap();
    eventually(
        "the refused policy in status",
        Duration::from_secs(10),
        || {
            east.status().is_some_and(|s| {
                s["config_problems"]
                    .as_array()
                    .is_some_and(|p| p.len() == 1)
            })
        },
    );
    let table = isthmus(&[
        "status",
        "--controller",
        &format!("127.0.0.1:{}", east.admin),
    ]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("configuration not applied as written:")
            && table.contains("AuthorizationPolicy sample/deny-jwt: rules[0].from[0].source.requestPrincipals: request authentication (JWT) is not supported")
            && table.contains("denies every request to the workloads it selects until fixed"),
        "{table}"
    );

    // SIGKILL west: east keeps the import, stale, then withdraws it.
    west_p.kill();
    eventually("east marks west stale", Duration::from_secs(10), || {
        east.status()
            .is_some_and(|s| s["peers"][0]["stale"] == true && s["peers"][0]["connected"] == false)
    });
    assert!(east.service_entry().exists(), "withdrawn before the lease");
    let s = east.status().unwrap();
    assert!(
        s["peers"][0]["last_disconnect_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{s}"
    );
    eventually(
        "withdrawal after the 3s lease",
        Duration::from_secs(15),
        || !east.service_entry().exists(),
    );

    // A status query to something that is not a controller says so.
    let out = isthmus(&[
        "status",
        "--controller",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the controller's admin API")
    );
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn clusters_link_with_a_one_time_token_and_bad_tokens_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let east = Cluster::new(root.path(), "east");
    let west = Cluster::new(root.path(), "west");
    let eu = Cluster::new(root.path(), "eu");
    std::fs::write(west.dir.join("manifests/helloworld.yaml"), HELLOWORLD).unwrap();
    let east_cfg = east.write_config_with(None, "us-east1");
    let west_cfg = west.write_config_with(None, "us-west1");
    let eu_cfg = eu.write_config_with(None, "europe-west1");
    let _e = east.start(&east_cfg);
    let _w = west.start(&west_cfg);
    let _u = eu.start(&eu_cfg);

    let token = stdout(&isthmus(&[
        "link",
        "create",
        "--config",
        east_cfg.to_str().unwrap(),
    ]));
    assert!(token.starts_with("isthmus1."), "{token}");
    stdout(&isthmus(&[
        "link",
        "apply",
        "--config",
        west_cfg.to_str().unwrap(),
        &token,
    ]));
    eventually(
        "east imports west's helloworld after linking",
        Duration::from_secs(20),
        || east.service_entry().exists(),
    );
    let s = east.status().unwrap();
    assert_eq!(s["peers"][0]["cluster"], "west");
    assert_eq!(s["peers"][0]["connected"], true);

    // The same token again, from eu: refused as reused.
    stdout(&isthmus(&[
        "link",
        "apply",
        "--config",
        eu_cfg.to_str().unwrap(),
        &token,
    ]));
    eventually("eu's link refused", Duration::from_secs(20), || {
        eu.status().is_some_and(|s| {
            s["pending_links"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("already used"))
        })
    });
    assert!(
        east.status().unwrap()["peers"].as_array().unwrap().len() == 1,
        "eu must not become east's peer"
    );

    // Tampered and expired tokens are refused by `link apply` itself.
    let mut bad = token.clone().into_bytes();
    let i = bad.len() / 2;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    let out = isthmus(&[
        "link",
        "apply",
        "--config",
        eu_cfg.to_str().unwrap(),
        &String::from_utf8(bad).unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tampered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let short = stdout(&isthmus(&[
        "link",
        "create",
        "--config",
        east_cfg.to_str().unwrap(),
        "--ttl",
        "1s",
    ]));
    std::thread::sleep(Duration::from_millis(1100));
    let out = isthmus(&[
        "link",
        "apply",
        "--config",
        eu_cfg.to_str().unwrap(),
        &short,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
