//! `isthmus analyze` on a directory of manifests: every finding with its
//! code, severity and object, in a table and as JSON, and an exit status a
//! CI job can use.

use std::process::Command;

fn analyze(dir: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .arg("analyze")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = "apiVersion: v1
kind: Service
metadata: {name: helloworld, namespace: sample}
spec: {ports: [{name: http, port: 5000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hw-1, namespace: sample, labels: {kubernetes.io/service-name: helloworld}}
endpoints: [{addresses: ['127.0.1.10'], targetRef: {kind: Pod, name: helloworld-v1-0}}]
---
apiVersion: v1
kind: Pod
metadata: {name: helloworld-v1-0, namespace: sample, labels: {app: helloworld, version: v1}}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: helloworld, namespace: sample}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: helloworld, namespace: sample}
spec: {host: helloworld, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: helloworld, namespace: sample}
spec: {hosts: [helloworld], http: [{route: [{destination: {host: helloworld, subset: v1}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sample, namespace: sample}
spec: {selector: {matchLabels: {app: helloworld}}, rules: [{from: [{source: {namespaces: [sample]}}]}]}
";

#[test]
fn a_clean_directory_passes_and_every_kind_of_problem_is_found() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.yaml"), GOOD).unwrap();
    let (code, out, err) = analyze(dir.path(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no problems found"), "{out}");

    std::fs::create_dir(dir.path().join("more")).unwrap();
    std::fs::write(
        dir.path().join("more/bad.yaml"),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: canary, namespace: sample}
spec: {hosts: [helloworld], http: [{route: [{destination: {host: helloworld, subset: v2}, weight: 90}, {destination: {host: nosuch}, weight: 10}]}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ghost, namespace: sample}
spec: {host: ghost}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-jwt, namespace: sample}
spec: {action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-web, namespace: sample}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: orphan, namespace: sample}
",
    )
    .unwrap();
    std::fs::write(dir.path().join("broken.yaml"), "kind: [unclosed\n").unwrap();

    let (code, out, err) = analyze(dir.path(), &[]);
    assert_eq!(code, 1, "errors fail the run: {out}{err}");
    for line in [
        "[ISM0000] (",
        "error [ISM0001] (AuthorizationPolicy sample/deny-jwt) rules[0].from[0].source.requestPrincipals: request authentication (JWT) is not supported",
        "denies every request to the workloads it selects until fixed",
        "error [ISM0002] (VirtualService sample/canary) http[0] routes to subset \"v2\" of helloworld.sample.svc.cluster.local, which no DestinationRule defines",
        "warning [ISM0003] (DestinationRule sample/ghost) host ghost.sample.svc.cluster.local is not a Service of this cluster",
        "warning [ISM0004] (PeerAuthentication sample/strict-web) selector {\"app\": \"web\"} matches no workload in sample",
        "error [ISM0005] (ServiceExport sample/orphan) there is no Service sample/orphan",
        "warning [ISM0006] (VirtualService sample/canary) http[0] routes to nosuch.sample.svc.cluster.local, which is not a Service in this cluster",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(
        out.contains("broken.yaml:1"),
        "a file that does not parse names its line: {out}"
    );

    // JSON: the same findings, as data.
    let (code, out, _) = analyze(dir.path(), &["-o", "json"]);
    assert_eq!(code, 1);
    let findings: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let codes: std::collections::BTreeSet<&str> = findings
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes.into_iter().collect::<Vec<_>>(),
        [
            "ISM0000", "ISM0001", "ISM0002", "ISM0003", "ISM0004", "ISM0005", "ISM0006"
        ]
    );
    assert!(
        findings
            .iter()
            .all(|f| f["severity"] == "error" || f["severity"] == "warning")
    );

    // Warnings alone pass unless asked to fail on them.
    std::fs::remove_file(dir.path().join("more/bad.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();
    std::fs::write(
        dir.path().join("warn.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ghost, namespace: sample}\nspec: {host: ghost}\n",
    )
    .unwrap();
    assert_eq!(analyze(dir.path(), &[]).0, 0);
    assert_eq!(analyze(dir.path(), &["--fail-on", "warning"]).0, 1);
}
