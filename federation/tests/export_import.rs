//! Export (objects → catalogue, per-peer policy) and import (catalogues →
//! ServiceEntries in files), without the network.

use std::collections::BTreeMap;
use std::sync::Arc;

use isthmus_core::model::{Locality, ServiceKey};
use isthmus_federation::catalog::{Catalog, ExportPolicy};
use isthmus_federation::import::{PeerCatalog, merge};
use isthmus_federation::sink::FilesSink;
use isthmus_federation::sink::service_entry::service_entry;
use isthmus_federation::source::Objects;
use isthmus_federation::source::files::parse_file;

fn objects(yaml: &str) -> Objects {
    parse_file(std::path::Path::new("test.yaml"), yaml)
        .unwrap()
        .into_iter()
        .map(|o| (o.key.clone(), Arc::new(o)))
        .collect()
}

fn cluster_yaml(svc: &str, port: u16, created: &str, ready: &[bool], exported: bool) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: sample}}\nspec: {{ports: [{{name: http, port: {port}}}]}}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{topology.kubernetes.io/region: us-west1, topology.kubernetes.io/zone: us-west1-a}}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: sample, labels: {{kubernetes.io/service-name: {svc}}}}}\nendpoints:\n"
    );
    for (i, r) in ready.iter().enumerate() {
        y.push_str(&format!("  - {{addresses: [\"10.0.0.{i}\"], conditions: {{ready: {r}}}, nodeName: n1, targetRef: {{kind: Pod, name: {svc}-{i}}}}}\n"));
    }
    for i in 0..ready.len() {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {svc}-{i}, namespace: sample, labels: {{version: v1}}}}\n"
        ));
    }
    if exported {
        y.push_str(&format!(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {svc}, namespace: sample, creationTimestamp: \"{created}\"}}\n"
        ));
    }
    y
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("sample", name)
}

#[test]
fn exported_services_carry_counts_per_locality_never_addresses() {
    let cat = Catalog::build(
        &objects(&cluster_yaml(
            "helloworld",
            5000,
            "2026-01-01T00:00:00Z",
            &[true, true, false],
            true,
        )),
        &Locality::default(),
    );
    let e = &cat.exports[&key("helloworld")];
    assert_eq!(e.groups.len(), 1);
    let g = &e.groups[0];
    assert_eq!((g.healthy, g.total), (2, 3));
    assert_eq!(g.locality, Locality::new("us-west1", "us-west1-a"));
    let json = serde_json::to_string(&**e).unwrap();
    assert!(
        !json.contains("10.0.0."),
        "addresses leaked into the catalogue: {json}"
    );

    // No ServiceExport, no export (the Service itself stays local).
    let cat = Catalog::build(
        &objects(&cluster_yaml("helloworld", 5000, "", &[true], false)),
        &Locality::default(),
    );
    assert!(cat.exports.is_empty());
    assert_eq!(cat.services.len(), 1);
}

#[test]
fn per_peer_export_policy_is_respected() {
    let cat = Catalog::build(
        &objects(&cluster_yaml("helloworld", 5000, "", &[true], true)),
        &Locality::default(),
    );
    let everything = ExportPolicy::default();
    let other_ns = ExportPolicy {
        namespaces: ["prod".to_owned()].into(),
        ..Default::default()
    };
    let just_it = ExportPolicy {
        services: [key("helloworld")].into(),
        ..Default::default()
    };
    assert_eq!(cat.for_peer(&everything).len(), 1);
    assert_eq!(cat.for_peer(&other_ns).len(), 0);
    assert_eq!(cat.for_peer(&just_it).len(), 1);
    // The gateway's ingress check follows the same policy.
    let local = cat.with_export_targets([("east", &everything), ("eu", &other_ns)]);
    assert_eq!(
        local[&key("helloworld")].exported_to,
        ["east".to_owned()].into()
    );
}

fn peer(name: &str, region: &str, yaml: &str) -> PeerCatalog {
    let cat = Catalog::build(&objects(yaml), &Locality::default());
    PeerCatalog {
        cluster: name.into(),
        locality: Locality::new(region, ""),
        stale: false,
        exports: std::sync::Arc::new(cat.exports),
    }
}

#[test]
fn imports_merge_clusters_and_the_oldest_export_wins_a_conflict() {
    let west = peer(
        "west",
        "us-west1",
        &cluster_yaml(
            "helloworld",
            5000,
            "2026-01-01T00:00:00Z",
            &[true, true],
            true,
        ),
    );
    let eu = peer(
        "eu",
        "europe-west1",
        &cluster_yaml("helloworld", 5000, "2026-02-01T00:00:00Z", &[true], true),
    );
    // asia exports the same name later, with a different port: excluded.
    let asia = peer(
        "asia",
        "asia-east1",
        &cluster_yaml("helloworld", 8080, "2026-03-01T00:00:00Z", &[true], true),
    );
    let none = BTreeMap::new();
    let imports = merge(("east", &none), &[west, eu, asia]);
    let svc = &imports.services[&key("helloworld")];
    let names: Vec<_> = svc.clusters.iter().map(|c| c.cluster.as_str()).collect();
    assert_eq!(names, ["west", "eu"]);
    assert_eq!(svc.ports[0].port, 5000);
    assert_eq!(imports.conflicts.len(), 1);
    let c = &imports.conflicts[0];
    assert_eq!((c.winner.as_str(), c.excluded.as_str()), ("west", "asia"));

    // The conflicting cluster is older: it wins, and the others are out.
    let west = peer(
        "west",
        "us-west1",
        &cluster_yaml("helloworld", 5000, "2026-01-01T00:00:00Z", &[true], true),
    );
    let asia = peer(
        "asia",
        "asia-east1",
        &cluster_yaml("helloworld", 8080, "2025-12-01T00:00:00Z", &[true], true),
    );
    let imports = merge(("east", &none), &[west, asia]);
    assert_eq!(
        imports.services[&key("helloworld")].clusters[0].cluster,
        "asia"
    );
    assert_eq!(imports.conflicts[0].excluded, "west");
}

#[test]
fn service_entries_are_written_once_and_garbage_collected() {
    let west = peer(
        "west",
        "us-west1",
        &cluster_yaml(
            "helloworld",
            5000,
            "2026-01-01T00:00:00Z",
            &[true, true, false],
            true,
        ),
    );
    let none = BTreeMap::new();
    let imports = merge(("east", &none), &[west]);
    let gw = "127.0.1.1:15443".parse().unwrap();
    let se = service_entry(&imports.services[&key("helloworld")], gw);
    assert_eq!(se["apiVersion"], "networking.istio.io/v1");
    assert_eq!(
        se["spec"]["hosts"][0],
        "helloworld.sample.svc.clusterset.local"
    );
    let ep = &se["spec"]["endpoints"][0];
    assert_eq!(ep["address"], "127.0.1.1");
    assert_eq!(ep["weight"], 2);
    assert_eq!(ep["locality"], "us-west1");
    assert_eq!(ep["labels"]["topology.istio.io/cluster"], "west");
    assert_eq!(ep["ports"]["http"], 15443);

    let dir = tempfile::tempdir().unwrap();
    let sink = FilesSink::new(dir.path(), gw);
    let r = sink.apply(std::slice::from_ref(&se)).unwrap();
    assert_eq!(r.written, ["sample.helloworld-clusterset.yaml"]);
    let path = sink.dir().join("sample.helloworld-clusterset.yaml");
    let written = std::fs::read_to_string(&path).unwrap();
    // It parses back as the same object.
    let back: serde_json::Value = serde_saphyr::from_str(&written).unwrap();
    assert_eq!(back, se);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();

    // Same desired state: nothing rewritten.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r = sink.apply(std::slice::from_ref(&se)).unwrap();
    assert_eq!((r.written.len(), r.unchanged), (0, 1));
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);

    // A file someone else put there is never touched; ours is collected.
    std::fs::write(sink.dir().join("mine.yaml"), "kind: ConfigMap\n").unwrap();
    let r = sink.apply(&[]).unwrap();
    assert_eq!(r.deleted, ["sample.helloworld-clusterset.yaml"]);
    assert!(sink.dir().join("mine.yaml").exists());

    // Incremental passes: an unchanged upsert writes nothing, a changed
    // one rewrites its file, a removal deletes only what the sink wrote.
    let r = sink.update(std::slice::from_ref(&se), &[]).unwrap();
    assert_eq!(r.written, ["sample.helloworld-clusterset.yaml"]);
    let r = sink.update(std::slice::from_ref(&se), &[]).unwrap();
    assert_eq!((r.written.len(), r.unchanged), (0, 1));
    let mut heavier = se.clone();
    heavier["spec"]["endpoints"][0]["weight"] = serde_json::json!(5);
    let r = sink.update(std::slice::from_ref(&heavier), &[]).unwrap();
    assert_eq!(r.written, ["sample.helloworld-clusterset.yaml"]);
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("weight: 5")
    );
    let r = sink
        .update(
            &[],
            &[
                ("sample".into(), "helloworld-clusterset".into()),
                ("default".into(), "mine".into()),
            ],
        )
        .unwrap();
    assert_eq!(r.deleted, ["sample.helloworld-clusterset.yaml"]);
    assert!(!path.exists());
    assert!(sink.dir().join("mine.yaml").exists());
}
