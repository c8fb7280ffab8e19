//! `isthmus link create|apply` against clusters' APIs (kube mode), as a
//! user runs them with kubeconfig contexts: the binary, the API stand-in.

use std::process::Command;

use isthmus_kube_standin::ApiServer;
use serde_json::json;

fn cluster_info(api: &ApiServer, cluster: &str, address: &str) {
    api.put(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "isthmus-cluster", "namespace": "isthmus-system"},
        "data": {"cluster.json": json!({
            "cluster": cluster, "trustDomain": format!("{cluster}.local"), "address": address,
            "identity": format!("spiffe://{cluster}.local/cluster/{cluster}/controller"),
            "rootFingerprint": "ab".repeat(32),
        }).to_string()},
    }))
    .unwrap();
}

fn isthmus(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_create_and_apply_with_kubeconfig_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let (east, west) = (
        ApiServer::start().await.unwrap(),
        ApiServer::start().await.unwrap(),
    );
    // One kubeconfig with both clusters, as users have.
    let kc = dir.path().join("kubeconfig");
    let (a, b) = (east.kubeconfig("east"), west.kubeconfig("west"));
    let merged = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n{}{}contexts:\n{}{}users:\n{}{}",
        section(&a, "clusters:", "contexts:"),
        section(&b, "clusters:", "contexts:"),
        section(&a, "contexts:", "current-context:"),
        section(&b, "contexts:", "current-context:"),
        section(&a, "users:", ""),
        section(&b, "users:", ""),
    );
    std::fs::write(&kc, merged).unwrap();
    let kc = kc.to_str().unwrap().to_owned();

    // No controller in east yet: the error says what to check.
    let out = tokio::task::spawn_blocking({
        let kc = kc.clone();
        move || isthmus(&["link", "create", "--kubeconfig", &kc, "--context", "east"])
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the Isthmus controller running"), "{err}");

    cluster_info(&east, "east", "127.0.1.1:15012");
    cluster_info(&west, "west", "127.0.2.1:15012");
    let out = tokio::task::spawn_blocking({
        let kc = kc.clone();
        move || {
            isthmus(&[
                "link",
                "create",
                "--kubeconfig",
                &kc,
                "--context",
                "east",
                "--ttl",
                "10m",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(token.starts_with("isthmus1."), "{token}");
    let tokens: Vec<_> = east
        .list("secrets")
        .into_iter()
        .filter(|s| s["metadata"]["labels"]["isthmus.io/state"] == "link-token")
        .collect();
    assert_eq!(tokens.len(), 1);

    let out = tokio::task::spawn_blocking({
        let (kc, token) = (kc.clone(), token.clone());
        move || {
            isthmus(&[
                "link",
                "apply",
                "--kubeconfig",
                &kc,
                "--context",
                "west",
                &token,
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer = west
        .get("secrets", "isthmus-system", "isthmus-peer-east")
        .expect("a pending peer Secret");
    assert_eq!(peer["metadata"]["labels"]["isthmus.io/state"], "peer");
}

/// The lines of a kubeconfig between two top-level keys (without them).
fn section(kubeconfig: &str, from: &str, to: &str) -> String {
    let start = kubeconfig.find(from).unwrap() + from.len() + 1;
    let end = if to.is_empty() {
        kubeconfig.len()
    } else {
        kubeconfig[start..].find(to).unwrap() + start
    };
    kubeconfig[start..end].to_owned()
}
