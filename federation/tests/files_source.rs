//! The files source on a real directory.

use std::time::Duration;

use isthmus_core::testing::assert_eventually;
use isthmus_federation::objects::{Body, Kind};
use isthmus_federation::source::files::FilesSource;
use isthmus_federation::source::{Event, Store};

const HELLOWORLD: &str = r#"# helloworld in east
apiVersion: v1
kind: Service
metadata: { name: helloworld, namespace: sample, creationTimestamp: "2026-11-01T00:00:00Z" }
spec:
  ports: [{ name: http, port: 5000, targetPort: 5000 }]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: helloworld-abc
  namespace: sample
  labels: { kubernetes.io/service-name: helloworld }
ports: [{ name: http, port: 15006 }]
endpoints:
  - addresses: ["127.0.1.10"]
    conditions: { ready: true }
    zone: us-east1-a
    targetRef: { kind: Pod, name: helloworld-v1-0 }
---
apiVersion: v1
kind: Pod
metadata: { name: helloworld-v1-0, namespace: sample, labels: { app: helloworld, version: v1 } }
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: { name: helloworld, namespace: sample }
"#;

fn write(dir: &std::path::Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn names(src: &FilesSource) -> Vec<String> {
    src.objects().iter().map(|o| o.key.to_string()).collect()
}

#[test]
fn reads_multi_document_files_into_typed_objects() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "sample/helloworld.yaml", HELLOWORLD);
    write(
        dir.path(),
        "nodes.yml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels: {topology.kubernetes.io/region: us-east1, topology.kubernetes.io/zone: us-east1-a}\n",
    );
    write(
        dir.path(),
        "deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: ignored}\n",
    );
    let mut src = FilesSource::new(dir.path());
    let (applied, deleted) = src.scan();
    // Service, EndpointSlice, Pod, ServiceExport, Node.
    assert_eq!(applied.len(), 5);
    assert!(deleted.is_empty());
    assert!(src.errors.is_empty(), "{:?}", src.errors);
    let objs = src.objects();
    let slice = objs
        .iter()
        .find(|o| o.key.kind == Kind::EndpointSlice)
        .unwrap();
    let Body::EndpointSlice {
        service,
        ports,
        endpoints,
    } = &slice.body
    else {
        panic!()
    };
    assert_eq!(service, "helloworld");
    assert_eq!(ports["http"], 15006);
    // Loopback endpoints are accepted on purpose (embedded mode).
    assert_eq!(endpoints[0].addresses[0].to_string(), "127.0.1.10");
    assert_eq!(endpoints[0].target, "helloworld-v1-0");
    let pod = objs.iter().find(|o| o.key.kind == Kind::Pod).unwrap();
    assert_eq!(pod.labels["version"], "v1");
    let node = objs.iter().find(|o| o.key.kind == Kind::Node).unwrap();
    assert_eq!(
        node.body,
        Body::Node {
            region: "us-east1".into(),
            zone: "us-east1-a".into()
        }
    );
    let svc = objs.iter().find(|o| o.key.kind == Kind::Service).unwrap();
    assert_eq!(svc.created, "2026-11-01T00:00:00Z");
}

#[test]
fn a_broken_file_is_reported_with_its_line_and_earlier_state_stays() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "helloworld.yaml", HELLOWORLD);
    let mut src = FilesSource::new(dir.path());
    src.scan();
    let before = names(&src);
    assert_eq!(before.len(), 4);

    // A typo on line 14 (second document).
    let broken = HELLOWORLD.replace(
        "ports: [{ name: http, port: 15006 }]",
        "ports: [{ name: http, port: 15006 }",
    );
    // Different length, so the change is noticed even within one mtime tick.
    write(dir.path(), "helloworld.yaml", &broken);
    let (applied, deleted) = src.scan();
    assert!(
        applied.is_empty() && deleted.is_empty(),
        "a broken file must change nothing"
    );
    assert_eq!(names(&src), before);
    assert_eq!(src.errors.len(), 1);
    let e = &src.errors[0];
    assert!(e.path.ends_with("helloworld.yaml"));
    assert!((14..=16).contains(&e.line), "line {} for {e}", e.line);

    // A semantic error names the object and the field.
    write(
        dir.path(),
        "other.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: sample}\nspec: {ports: [{name: x, port: 70000}]}\n",
    );
    src.scan();
    let e = src
        .errors
        .iter()
        .find(|e| e.path.ends_with("other.yaml"))
        .unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:1: Service sample/other: spec.ports[0].port must be a number from 1 to 65535",
            e.path.display()
        )
    );

    // Fixing the file clears its error and applies it.
    write(dir.path(), "helloworld.yaml", HELLOWORLD);
    std::fs::remove_file(dir.path().join("other.yaml")).unwrap();
    src.scan();
    assert!(src.errors.is_empty(), "{:?}", src.errors);
}

#[test]
fn deleting_a_file_deletes_its_objects_and_the_imports_dir_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "helloworld.yaml", HELLOWORLD);
    write(
        dir.path(),
        &format!("{}/se.yaml", isthmus_federation::IMPORTS_DIR),
        "apiVersion: v1\nkind: Service\nmetadata: {name: not-mine}\nspec: {ports: [{port: 1}]}\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.scan();
    assert_eq!(names(&src).len(), 4);
    std::fs::remove_file(dir.path().join("helloworld.yaml")).unwrap();
    let (applied, deleted) = src.scan();
    assert!(applied.is_empty());
    assert_eq!(deleted.len(), 4);
}

#[test]
fn a_quiet_directory_scans_to_nothing_and_the_later_file_of_a_duplicate_wins() {
    let dir = tempfile::tempdir().unwrap();
    let export = |port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dup, namespace: sample}}\nspec: {{ports: [{{port: {port}}}]}}\n"
        )
    };
    write(dir.path(), "a.yaml", &export(1000));
    write(dir.path(), "b.yaml", &export(2000));
    write(dir.path(), "other.yaml", HELLOWORLD);
    let port = |o: &isthmus_federation::objects::Object| match &o.body {
        Body::Service { ports, .. } => ports[0].port,
        other => panic!("not a service: {other:?}"),
    };
    let mut src = FilesSource::new(dir.path());
    let (applied, _) = src.scan();
    assert_eq!(applied.len(), 5);
    let dup: Vec<_> = applied.iter().filter(|o| o.key.name == "dup").collect();
    assert_eq!(dup.len(), 1);
    assert_eq!(port(dup[0]), 2000, "the later path wins");

    // Nothing changed on disk: nothing to report.
    assert_eq!(src.scan(), (vec![], vec![]));

    // The winning file goes: the object falls back to the other
    // definition (a change, not a deletion); nothing else is reported.
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    let (applied, deleted) = src.scan();
    assert!(deleted.is_empty(), "{deleted:?}");
    assert_eq!(applied.len(), 1);
    assert_eq!(port(&applied[0]), 1000);

    // The last definition goes: now it is deleted.
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    let (applied, deleted) = src.scan();
    assert!(applied.is_empty());
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].name, "dup");
}

#[tokio::test]
async fn the_running_source_feeds_a_store_with_list_then_changes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "helloworld.yaml", HELLOWORLD);
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(FilesSource::new(dir.path()).run(tx));
    let (mut store, state) = Store::new(Kind::ALL.map(Into::into));
    // The first events are a full list, kind by kind.
    let first = rx.recv().await.unwrap();
    assert_eq!(first, Event::Init(Kind::ALL[0].into()));
    store.apply(first);
    let feeder = tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            store.apply(e);
        }
    });
    assert_eventually("first list", Duration::from_secs(5), async || {
        state.borrow().len() == 4
    })
    .await;

    // Unexport: the ServiceExport disappears from the store.
    write(
        dir.path(),
        "helloworld.yaml",
        HELLOWORLD
            .split("---\napiVersion: multicluster")
            .next()
            .unwrap(),
    );
    let s = state.clone();
    assert_eventually("unexport seen", Duration::from_secs(5), async || {
        !s.borrow().keys().any(|k| k.kind == Kind::ServiceExport)
    })
    .await;
    assert_eq!(state.borrow().len(), 3);
    task.abort();
    feeder.abort();
}
