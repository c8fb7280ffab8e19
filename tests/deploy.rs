//! The manifests under `deploy/`, checked offline as an API server would
//! (no cluster runs on these machines): every kustomization renders with
//! stock `kubectl kustomize`; every object parses as its k8s-openapi type
//! with no field lost in the round trip (a field the API server would
//! prune); every custom resource validates against its CRD's schema; the
//! Isthmus configurations in the ConfigMaps pass `isthmus config check`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

const OVERLAYS: [&str; 3] = ["east", "west", "eu"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize DIR`, one value per object.
fn render(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root().join(dir))
        .output()
        .expect("kubectl is installed");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{dir}: {e}\n{d}")))
        .collect()
}

fn name(v: &Value) -> String {
    format!(
        "{} {}/{}",
        v["kind"].as_str().unwrap_or("?"),
        v["metadata"]["namespace"].as_str().unwrap_or(""),
        v["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Paths present in `orig` and missing or different in `back`.
fn lost(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        // Quantities and ports may come back as numbers or strings.
        (a, b) if a == b || a.to_string().trim_matches('"') == b.to_string().trim_matches('"') => {}
        _ => out.push(format!("{path} ({orig} became {back})")),
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Vec<String> {
    let typed: T = match serde_json::from_value(v.clone()) {
        Ok(t) => t,
        Err(e) => return vec![format!("does not parse: {e}")],
    };
    let back = serde_json::to_value(typed).unwrap();
    let mut out = Vec::new();
    lost(v, &back, "", &mut out);
    out
}

/// The typed round trip for the built-in kinds; `None` for custom ones.
fn check_builtin(v: &Value) -> Option<Vec<String>> {
    let av = v["apiVersion"].as_str().unwrap_or_default();
    let kind = v["kind"].as_str().unwrap_or_default();
    Some(match (av, kind) {
        ("v1", "Namespace") => round_trip::<Namespace>(v),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(v),
        ("v1", "Service") => round_trip::<Service>(v),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(v),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(v),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(v)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(v),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(v),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(v)
        }
        _ => return None,
    })
}

/// Checks `v` against a structural OpenAPI v3 schema as the API server
/// does for custom resources: types, required fields, enums, and unknown
/// fields (pruned unless `x-kubernetes-preserve-unknown-fields`).
fn validate(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(e) = schema["enum"].as_array()
        && !e.contains(v)
    {
        out.push(format!("{path}: {v} is not one of {e:?}"));
    }
    let ty = schema["type"].as_str().unwrap_or_default();
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        out.push(format!("{path}: {v} is not of type {ty}"));
        return;
    }
    if let Some(obj) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap_or_default()) {
                out.push(format!(
                    "{path}.{}: required",
                    r.as_str().unwrap_or_default()
                ));
            }
        }
        let props = schema["properties"].as_object();
        let open = schema["x-kubernetes-preserve-unknown-fields"] == true;
        for (k, w) in obj {
            // metadata is ObjectMeta, the API server's own.
            if path.is_empty() && k == "metadata" {
                continue;
            }
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, w, &format!("{path}.{k}"), out),
                None if open => {}
                None => out.push(format!(
                    "{path}.{k}: unknown field (the API server prunes it)"
                )),
            }
        }
    }
    if let Some(items) = v.as_array() {
        for (i, w) in items.iter().enumerate() {
            validate(&schema["items"], w, &format!("{path}[{i}]"), out);
        }
    }
}

/// Every CRD's schema by (apiVersion, kind).
fn crd_schemas() -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for crd in render("deploy/crds") {
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap();
        for v in spec["versions"].as_array().unwrap() {
            out.insert(
                (
                    format!("{group}/{}", v["name"].as_str().unwrap()),
                    spec["names"]["kind"].as_str().unwrap().to_owned(),
                ),
                v["schema"]["openAPIV3Schema"].clone(),
            );
        }
    }
    out
}

/// Checks every object of a rendering; the errors, by object.
fn check_all(objects: &[Value], schemas: &BTreeMap<(String, String), Value>) -> Vec<String> {
    let mut errors = Vec::new();
    for o in objects {
        let problems = match check_builtin(o) {
            Some(p) => p,
            None => {
                let key = (
                    o["apiVersion"].as_str().unwrap_or_default().to_owned(),
                    o["kind"].as_str().unwrap_or_default().to_owned(),
                );
                match schemas.get(&key) {
                    Some(s) => {
                        let mut p = Vec::new();
                        validate(s, o, "", &mut p);
                        p
                    }
                    None => vec![format!("no type and no CRD for {key:?}")],
                }
            }
        };
        errors.extend(problems.into_iter().map(|p| format!("{}: {p}", name(o))));
    }
    errors
}

#[test]
fn every_overlay_renders_and_every_object_keeps_every_field() {
    let schemas = crd_schemas();
    assert_eq!(schemas.len(), 12, "{:?}", schemas.keys());
    let mut errors = check_all(&render("deploy/crds"), &schemas);
    for c in OVERLAYS {
        let objects = render(&format!("deploy/overlays/{c}"));
        let kinds: Vec<String> = objects.iter().map(name).collect();
        for want in [
            "Namespace /isthmus-system",
            "Deployment isthmus-system/isthmus-controller",
            "Deployment isthmus-system/isthmus-gateway",
            "Service isthmus-system/isthmus-federation",
            "Service isthmus-system/isthmus-gateway-peers",
            "PodDisruptionBudget isthmus-system/isthmus-controller",
            "ClusterRole /isthmus-controller",
        ] {
            assert!(
                kinds.iter().any(|k| k == want),
                "{c}: no {want} in {kinds:?}"
            );
        }
        errors.extend(check_all(&objects, &schemas));
    }
    let sample = render("deploy/sample");
    assert!(sample.iter().any(|o| o["kind"] == "ServiceExport"));
    errors.extend(check_all(&sample, &schemas));
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn the_checks_catch_what_the_api_server_would_refuse_or_prune() {
    let schemas = crd_schemas();
    // A misspelt field of a built-in kind is lost in the round trip.
    let svc: Value = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x"}, "spec": {"ports": [{"port": 80, "targetport": 8080}]}});
    let e = check_all(&[svc], &schemas);
    assert!(
        e.iter().any(|e| e.contains(".spec.ports[0].targetport")),
        "{e:?}"
    );
    // A custom resource against its schema: bad enum, unknown field,
    // missing required field.
    let si: Value = serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceImport", "metadata": {"name": "x"},
        "spec": {"type": "Bogus", "portz": []}});
    let e = check_all(&[si], &schemas);
    for want in [
        "is not one of",
        ".spec.portz: unknown field",
        ".spec.ports: required",
    ] {
        assert!(e.iter().any(|e| e.contains(want)), "{want}: {e:?}");
    }
}

/// Least privilege: the controller writes only ServiceEntries and
/// ServiceImports cluster-wide, Secrets, ConfigMaps and Leases only in
/// its namespace, and never reads Secrets cluster-wide.
#[test]
fn rbac_grants_the_controller_only_what_it_uses() {
    let objects = render("deploy/overlays/east");
    let rules = |kind: &str| -> Vec<(String, String, String)> {
        let o = objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == "isthmus-controller")
            .unwrap_or_else(|| panic!("no {kind}"));
        let mut out = Vec::new();
        for r in o["rules"].as_array().unwrap() {
            for g in r["apiGroups"].as_array().unwrap() {
                for res in r["resources"].as_array().unwrap() {
                    for v in r["verbs"].as_array().unwrap() {
                        out.push((
                            g.as_str().unwrap().to_owned(),
                            res.as_str().unwrap().to_owned(),
                            v.as_str().unwrap().to_owned(),
                        ));
                    }
                }
            }
        }
        out
    };
    let cluster = rules("ClusterRole");
    let writes: std::collections::BTreeSet<&str> = cluster
        .iter()
        .filter(|(_, _, v)| ["create", "update", "patch", "delete"].contains(&v.as_str()))
        .map(|(_, r, _)| r.as_str())
        .collect();
    assert_eq!(
        writes.into_iter().collect::<Vec<_>>(),
        [
            "serviceentries",
            "serviceexports/status",
            "serviceimports",
            "serviceimports/status",
            "tokenreviews"
        ]
    );
    assert!(!cluster.iter().any(|(_, r, _)| r == "secrets" || r == "*"));
    assert!(!cluster.iter().any(|(_, _, v)| v == "*"));
    let ns = rules("Role");
    assert!(
        ns.iter()
            .any(|(g, r, v)| g == "coordination.k8s.io" && r == "leases" && v == "update")
    );
    assert!(ns.iter().any(|(_, r, v)| r == "secrets" && v == "create"));
}

/// Writes `text` to `path` and asserts `isthmus config check` passes it.
fn config_check(path: &Path, text: &str, what: &str) {
    std::fs::write(path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(["config", "check"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The configurations in each overlay's ConfigMap, with the node address
/// filled in as `kind-configs/up.sh` does, pass `isthmus config check`,
/// and name the overlay's cluster.
#[test]
fn each_overlays_isthmus_configuration_passes_config_check() {
    let dir = tempfile::tempdir().unwrap();
    for c in OVERLAYS {
        let objects = render(&format!("deploy/overlays/{c}"));
        let cm = objects
            .iter()
            .find(|o| {
                o["kind"] == "ConfigMap"
                    && o["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("isthmus-config-"))
            })
            .unwrap_or_else(|| panic!("{c}: no isthmus-config ConfigMap"));
        for file in ["controller.yaml", "gateway.yaml"] {
            let text = cm["data"][file]
                .as_str()
                .unwrap_or_else(|| panic!("{c}: no {file}"))
                .replace("ISTHMUS_NODE_IP", "172.18.0.2");
            assert!(text.contains(&format!("name: {c}")), "{c}/{file}: {text}");
            config_check(
                &dir.path().join(format!("{c}-{file}")),
                &text,
                &format!("{c}/{file}"),
            );
        }
    }
    // And the sample's sidecar configurations.
    for cm in render("deploy/sample")
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
    {
        let text = cm["data"]["proxy.yaml"]
            .as_str()
            .unwrap()
            .replace("CLUSTER", "east")
            .replace("REGION", "us-east1");
        config_check(&dir.path().join("proxy.yaml"), &text, &name(cm));
    }
}

/// Every Isthmus container in `deploy/` runs a command the image has: the
/// Dockerfile builds that binary, and the subcommand exists in it.
#[test]
fn every_container_runs_a_command_the_image_has() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut seen = 0;
    let mut objects = render("deploy/overlays/east");
    objects.extend(render("deploy/sample"));
    for o in &objects {
        let containers = o["spec"]["template"]["spec"]["containers"].as_array();
        for c in containers.into_iter().flatten() {
            if c["image"] != "isthmus:dev" {
                continue;
            }
            let bin = c["command"][0].as_str().unwrap_or("isthmus");
            assert!(
                dockerfile.contains(&format!("--bin {bin}")),
                "{}: the Dockerfile does not build {bin}",
                name(o)
            );
            let exe = match bin {
                "isthmus" => env!("CARGO_BIN_EXE_isthmus"),
                "isthmus-proxy" => env!("CARGO_BIN_EXE_isthmus-proxy"),
                other => panic!("{}: unknown binary {other}", name(o)),
            };
            let mut args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            // The subcommand (if any) and --help: it parses.
            args.retain(|a| !a.starts_with("--") && !a.contains('/') && !a.contains(':'));
            args.truncate(usize::from(bin == "isthmus"));
            let out = Command::new(exe)
                .args(&args)
                .arg("--help")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: `{bin} {} --help` fails: {}",
                name(o),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            seen += 1;
        }
    }
    assert_eq!(
        seen, 5,
        "controller, gateway, helloworld's app and sidecar, sleep's sidecar"
    );
}
