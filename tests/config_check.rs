//! `isthmus config check` reports every bad field at once, with its path
//! and fix, and accepts a good file.

use std::process::Command;

fn check(yaml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(["config", "check", "--show"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn reports_every_problem_with_its_path() {
    let (ok, _, err) = check(
        r#"
kind: Controller
cluster:
  name: East_1
  trustDomain: east.isthmus.local
  locality: { region: us-east1, zon: a }
caDir: /etc/isthmus/ca
listen:
  federation: "0.0.0.0:99999"
gatewayAddress: 127.0.1.1:15443
staleLease: forever
peers:
  - name: west
    address: 127.0.2.1:15012
  - name: west
    address: 127.0.2.1:15012
    trustDomain: west.isthmus.local
admin:
  admin: 0.0.0.0:15000
"#,
    );
    assert!(!ok);
    for expected in [
        "cluster.name: cluster name \"East_1\" is invalid",
        "cluster.locality.zon: unknown field (fix: did you mean `zone`?)",
        "source: is missing: the controller must read its cluster from somewhere (fix: set source: {kube: {}} (the cluster's API) or source: {files: <directory of the cluster's manifests>})",
        "listen.federation: \"0.0.0.0:99999\" is not an address",
        "staleLease: \"forever\" is not a duration",
        "peers[0].trustDomain: missing",
        "admin.admin: 0.0.0.0:15000 is not a loopback address",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("problems found"), "{err}");
}

#[test]
fn cross_field_rules_run_on_a_readable_file() {
    let (ok, _, err) = check(
        r#"
kind: Controller
cluster: { name: east, trustDomain: east.local }
caDir: ca
sourceDir: manifests
gatewayAddress: 127.0.1.1:15443
peers:
  - { name: east, address: "127.0.2.1:15012", trustDomain: west.local }
admin: { metrics: "0.0.0.0:15021" }
"#,
    );
    assert!(!ok);
    assert!(
        err.contains("peers[0].name: peer east has this cluster's own name"),
        "{err}"
    );
    assert!(err.contains("port 15021 is used twice"), "{err}");
}

#[test]
fn a_valid_file_passes_with_defaults_filled_in() {
    let (ok, out, err) = check(
        r#"
kind: Gateway
cluster: { name: east, trustDomain: east.isthmus.local, locality: { region: us-east1, zone: us-east1-a } }
controller: 127.0.1.1:15010
"#,
    );
    assert!(ok, "{err}");
    assert!(out.contains("valid"), "{out}");
    assert!(out.contains("\"sidecar_addr\": \"0.0.0.0:15443\""), "{out}");
    assert!(out.contains("\"idle_timeout\""), "{out}");
}

#[test]
fn a_quic_packet_size_too_large_for_one_send_batch_is_refused_with_the_range() {
    let gateway = |payload: u32| {
        check(&format!(
            "kind: Gateway\ncluster: {{ name: east, trustDomain: east.isthmus.local }}\ncontroller: 127.0.1.1:15010\nmaxUdpPayload: {payload}\n"
        ))
    };
    let (ok, out, err) = gateway(6550);
    assert!(ok, "{err}");
    assert!(out.contains("\"max_udp_payload\": 6550"), "{out}");
    // Jumbo frames' 8952 would make every ten-packet batch overflow one
    // UDP send: refused, with the range that works.
    let (ok, _, err) = gateway(8952);
    assert!(!ok);
    assert!(err.contains("maxUdpPayload: 8952 is out of range"), "{err}");
    assert!(err.contains("use 1200 to 6550"), "{err}");
}

#[test]
fn malformed_yaml_names_the_line() {
    let (ok, _, err) = check("kind: Proxy\ncluster: [unclosed\n");
    assert!(!ok);
    assert!(err.contains("not valid YAML"), "{err}");
    assert!(err.contains("line") || err.contains(":2:"), "{err}");
}

#[test]
fn the_source_is_chosen_by_its_section_and_sourcedir_is_its_older_spelling() {
    let base = "kind: Controller\ncluster: { name: east, trustDomain: east.local }\ncaDir: ca\ngatewayAddress: 127.0.1.1:15443\n";
    let (ok, out, err) = check(&format!("{base}source: {{ files: manifests }}\n"));
    assert!(ok, "{err}");
    let (ok2, out2, err2) = check(&format!("{base}sourceDir: manifests\n"));
    assert!(ok2, "{err2}");
    let config = |o: &str| o.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(config(&out), config(&out2), "the same effective config");
    assert!(out.contains("\"dir\": \"manifests\""), "{out}");
    let (ok, _, err) = check(&format!(
        "{base}source: {{ files: manifests }}\nsourceDir: manifests\n"
    ));
    assert!(!ok);
    assert!(
        err.contains("sourceDir: both source.files and sourceDir are set (fix: keep source.files"),
        "{err}"
    );
    // Kube mode: every key has a default; wrong ones are named.
    let (ok, out, err) = check(&format!("{base}source: {{ kube: {{}} }}\n"));
    assert!(ok, "{err}");
    assert!(
        out.contains("\"kube\"") && out.contains("isthmus-controller"),
        "{out}"
    );
    let (ok, _, err) = check(&format!(
        "{base}source: {{ kube: {{ contxt: east, gatewayServiceAccount: gw, leaderElection: {{ leaseDuration: soon }} }} }}\n"
    ));
    assert!(!ok);
    for expected in [
        "source.kube.contxt: unknown field (fix: did you mean `context`?)",
        "source.kube.gatewayServiceAccount: \"gw\" is not namespace/name",
        "source.kube.leaderElection.leaseDuration: \"soon\" is not a duration",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    let (ok, _, err) = check(&format!(
        "{base}source: {{ kube: {{}}, files: manifests }}\n"
    ));
    assert!(!ok);
    assert!(
        err.contains("both a files directory and kube are set"),
        "{err}"
    );
}
