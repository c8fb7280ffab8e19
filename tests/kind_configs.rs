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
