//! Stock `kubectl` against the stand-in: what users type works as
//! against a real API server.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use isthmus_kube_standin::ApiServer;

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  labels: {app: web}\nspec:\n  ports: [{name: http, port: 80}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_server_side_get_yaml_conflicts_and_delete() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, "standin").unwrap();
    let kc2 = kc.clone();
    tokio::task::spawn_blocking(move || {
        let kc = kc2.as_path();
        let out = ok(kubectl(
            kc,
            &["apply", "--server-side", "-f", "-"],
            Some(WEB),
        ));
        assert!(out.contains("service/web serverside-applied"), "{out}");

        let yaml = ok(kubectl(
            kc,
            &[
                "get",
                "service",
                "web",
                "-o",
                "yaml",
                "--show-managed-fields",
            ],
            None,
        ));
        assert!(yaml.contains("manager: kubectl"), "{yaml}");
        assert!(yaml.contains("operation: Apply"), "{yaml}");
        assert!(yaml.contains("resourceVersion:"), "{yaml}");
        assert!(yaml.contains("uid:"), "{yaml}");

        // Another manager changes the port: applying the old value again
        // is a conflict that names the field and the manager...
        ok(kubectl(
            kc,
            &[
                "patch",
                "service",
                "web",
                "--type=merge",
                "--field-manager=ops",
                "-p",
                r#"{"spec":{"ports":[{"name":"http","port":8080}]}}"#,
            ],
            None,
        ));
        let out = kubectl(kc, &["apply", "--server-side", "-f", "-"], Some(WEB));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("conflict with \"ops\"") && err.contains(".spec.ports"),
            "{err}"
        );
        // ...until forced.
        ok(kubectl(
            kc,
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(WEB),
        ));
        let port = ok(kubectl(
            kc,
            &["get", "svc", "web", "-o", "jsonpath={.spec.ports[0].port}"],
            None,
        ));
        assert_eq!(port, "80");

        // Selectors.
        assert!(
            ok(kubectl(
                kc,
                &["get", "svc", "-l", "app=web", "-o", "name"],
                None
            ))
            .contains("service/web")
        );
        assert!(
            ok(kubectl(
                kc,
                &["get", "svc", "-l", "app in (db)", "-o", "name"],
                None
            ))
            .trim()
            .is_empty()
        );

        let out = ok(kubectl(kc, &["delete", "service", "web"], None));
        assert!(out.contains("deleted"), "{out}");
        let out = kubectl(kc, &["get", "service", "web"], None);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("NotFound") && err.contains("\"web\" not found"),
            "{err}"
        );

        // A kind the cluster does not have, as kubectl says it.
        let out = kubectl(kc, &["get", "widgets"], None);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("the server doesn't have a resource type \"widgets\"")
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_watch_streams_changes() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, "standin").unwrap();
    let kc2 = kc.clone();
    tokio::task::spawn_blocking(move || {
        let kc = kc2.as_path();
        ok(kubectl(kc, &["apply", "--server-side", "-f", "-"], Some(WEB)));
        let mut watch = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kc)
            .args(["get", "services", "-w", "--output-watch-events", "-o", "custom-columns=EVENT:.type,NAME:.object.metadata.name,PORT:.object.spec.ports[0].port", "--no-headers"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
        let mut next = || lines.next().unwrap().unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(next(), "ADDED web 80");
        ok(kubectl(kc, &["patch", "service", "web", "--type=merge", "-p", r#"{"spec":{"ports":[{"name":"http","port":81}]}}"#], None));
        assert_eq!(next(), "MODIFIED web 81");
        ok(kubectl(kc, &["delete", "service", "web"], None));
        assert_eq!(next(), "DELETED web 81");
        let _ = watch.kill();
        let _ = watch.wait();
    })
    .await
    .unwrap();
}
