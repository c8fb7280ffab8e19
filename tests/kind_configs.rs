//! Static checks of the kind configs (no container engine runs in CI):
//! they parse, names match files, subnets never overlap, and every node
//! carries the locality labels Isthmus reads.

use std::net::Ipv4Addr;

fn cidr(s: &str) -> (u32, u32) {
    let (ip, len) = s.split_once('/').expect("CIDR has a prefix length");
    let ip: Ipv4Addr = ip.parse().expect("IPv4 address");
    let len: u32 = len.parse().expect("prefix length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(ip) & mask, mask)
}

fn overlaps(a: &str, b: &str) -> bool {
    let ((na, ma), (nb, mb)) = (cidr(a), cidr(b));
    let m = ma & mb; // the shorter prefix
    na & m == nb & m
}

#[test]
fn kind_configs_are_consistent() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kind-configs");
    let mut subnets: Vec<(String, String)> = Vec::new();
    let mut names = Vec::new();
    for name in ["east", "west", "eu"] {
        let path = dir.join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(v["kind"], "Cluster", "{name}");
        assert_eq!(v["apiVersion"], "kind.x-k8s.io/v1alpha4", "{name}");
        assert_eq!(v["name"], name);
        names.push(name);
        for key in ["podSubnet", "serviceSubnet"] {
            let s = v["networking"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: networking.{key} missing"));
            subnets.push((format!("{name}.{key}"), s.to_owned()));
        }
        let nodes = v["nodes"].as_array().unwrap();
        assert!(nodes.iter().any(|n| n["role"] == "control-plane"), "{name}");
        for n in nodes {
            let labels = &n["labels"];
            let region = labels["topology.kubernetes.io/region"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: node without region label"));
            let zone = labels["topology.kubernetes.io/zone"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: node without zone label"));
            assert!(
                zone.starts_with(region),
                "{name}: zone {zone} not in region {region}"
            );
        }
    }
    for (i, (an, a)) in subnets.iter().enumerate() {
        for (bn, b) in &subnets[i + 1..] {
            assert!(!overlaps(a, b), "{an} {a} overlaps {bn} {b}");
        }
    }
    assert!(overlaps("10.0.0.0/8", "10.20.0.0/16") && !overlaps("10.10.0.0/16", "10.20.0.0/16"));
}

fn script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kind-configs")
        .join(name)
}

/// The quick-start scripts are shellcheck-clean (Debian's `shellcheck`;
/// `.ci/run` installs it).
#[test]
fn the_quick_start_scripts_pass_shellcheck() {
    let out = std::process::Command::new("shellcheck")
        .arg(script("up.sh"))
        .arg(script("down.sh"))
        .output()
        .expect("shellcheck is not installed: apt-get install shellcheck (.ci/run does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `up.sh --dry-run` prints every step a user's machine would run, in
/// order, needs none of Docker, kind or a cluster, and creates nothing.
#[test]
fn up_dry_run_prints_every_step_and_touches_nothing() {
    let state = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".isthmus-kind");
    let existed = state.exists();
    let out = std::process::Command::new("bash")
        .arg(script("up.sh"))
        .arg("--dry-run")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps = [
        "+ kind create cluster --config",
        "+ docker build -t isthmus:dev",
        "+ kind load docker-image isthmus:dev --name eu",
        "ca init --trust-domain west.local",
        "apply --server-side -k",
        "deploy/overlays/east | sed",
        "create secret generic isthmus-ca",
        "rollout status deployment/isthmus-controller",
        "link create --context kind-east",
        "link apply --context kind-west <token>",
        "link apply --context kind-eu <token>",
        "deploy/sample | sed",
        "get serviceentries -n sample",
        "curl -sS -x 127.0.0.1:15001",
        "port-forward deploy/isthmus-controller 25000:15000",
        "verify --controller 127.0.0.1:25000 --gateway 127.0.0.1:25001",
        "--client 127.0.0.1:25006",
    ];
    let mut at = 0;
    for s in steps {
        let found = text[at..]
            .find(s)
            .unwrap_or_else(|| panic!("{s:?} missing (or out of order) after byte {at}:\n{text}"));
        at += found;
    }
    // Three clusters: three pairs linked.
    assert_eq!(text.matches("link create").count(), 3, "{text}");
    assert_eq!(
        state.exists(),
        existed,
        "a dry run created {}",
        state.display()
    );

    let down = std::process::Command::new("bash")
        .arg(script("down.sh"))
        .args(["--dry-run", "--clusters", "east west"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&down.stdout);
    assert!(down.status.success(), "{text}");
    assert!(text.contains("+ kind delete cluster --name west"), "{text}");
}

/// A cluster without a kind config, or an unknown option: one line that
/// names the problem and the fix, and nothing run.
#[test]
fn up_refuses_a_cluster_it_has_no_config_for() {
    let out = std::process::Command::new("bash")
        .arg(script("up.sh"))
        .args(["--dry-run", "--clusters", "east asia"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no kind config for cluster asia") && err.contains("kind-configs/asia.yaml"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    let out = std::process::Command::new("bash")
        .arg(script("up.sh"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option --bogus"));
}
