//! The resource types the stand-in serves, and its discovery documents
//! (the legacy `/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`
//! forms, which kube-rs and kubectl both read), plus the small OpenAPI v3
//! index kubectl consults to learn that the server validates fields.

use serde_json::{Value, json};

/// One resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Whether `.status` is a subresource: writes to the object keep its
    /// status, writes to `/status` change only the status.
    pub status: bool,
    pub short_names: &'static [&'static str],
    /// Create-only review kinds (TokenReview): nothing is stored.
    pub review: bool,
}

impl Resource {
    const fn new(
        group: &'static str,
        version: &'static str,
        kind: &'static str,
        plural: &'static str,
        namespaced: bool,
        status: bool,
    ) -> Self {
        Self {
            group,
            version,
            kind,
            plural,
            namespaced,
            status,
            short_names: &[],
            review: false,
        }
    }

    const fn short(mut self, names: &'static [&'static str]) -> Self {
        self.short_names = names;
        self
    }

    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural` or `plural.group`, as Kubernetes names a resource in
    /// messages and RBAC rules.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn verbs(&self) -> Value {
        if self.review {
            json!(["create"])
        } else {
            json!([
                "create", "delete", "get", "list", "patch", "update", "watch"
            ])
        }
    }
}

/// Every resource type the stand-in knows.
pub const ALL: &[Resource] = &[
    Resource::new("", "v1", "Namespace", "namespaces", false, true).short(&["ns"]),
    Resource::new("", "v1", "Service", "services", true, true).short(&["svc"]),
    Resource::new("", "v1", "Pod", "pods", true, true).short(&["po"]),
    Resource::new("", "v1", "Node", "nodes", false, true).short(&["no"]),
    Resource::new("", "v1", "Secret", "secrets", true, false),
    Resource::new("", "v1", "ConfigMap", "configmaps", true, false).short(&["cm"]),
    Resource::new("", "v1", "ServiceAccount", "serviceaccounts", true, false).short(&["sa"]),
    Resource::new(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
        false,
    ),
    Resource::new("coordination.k8s.io", "v1", "Lease", "leases", true, false),
    Resource {
        review: true,
        ..Resource::new(
            "authentication.k8s.io",
            "v1",
            "TokenReview",
            "tokenreviews",
            false,
            false,
        )
    },
    Resource::new(
        "multicluster.x-k8s.io",
        "v1alpha1",
        "ServiceExport",
        "serviceexports",
        true,
        true,
    )
    .short(&["svcex"]),
    Resource::new(
        "multicluster.x-k8s.io",
        "v1alpha1",
        "ServiceImport",
        "serviceimports",
        true,
        true,
    )
    .short(&["svcim"]),
    Resource::new(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
        true,
        true,
    )
    .short(&["se"]),
    Resource::new(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
        true,
        true,
    )
    .short(&["dr"]),
    Resource::new(
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
        true,
        true,
    )
    .short(&["vs"]),
    Resource::new(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
        true,
        true,
    )
    .short(&["pa"]),
    Resource::new(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        true,
        true,
    )
    .short(&["ap"]),
];

/// The kinds served, after leaving out the ones a test "did not install".
#[derive(Debug, Clone)]
pub struct Catalog {
    pub served: Vec<Resource>,
}

impl Catalog {
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Resource> {
        self.served
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .copied()
    }

    /// Group → its versions, in first-seen order.
    fn groups(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
        for r in &self.served {
            if r.group.is_empty() {
                continue;
            }
            match out.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, vs)) if !vs.contains(&r.version) => vs.push(r.version),
                Some(_) => {}
                None => out.push((r.group, vec![r.version])),
            }
        }
        out
    }

    /// `GET /api`.
    pub fn core_versions(&self) -> Value {
        json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
    }

    /// `GET /apis`.
    pub fn group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .into_iter()
            .map(|(g, vs)| {
                let versions: Vec<Value> = vs
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                    .collect();
                json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /apis/<group>`.
    pub fn group(&self, group: &str) -> Option<Value> {
        let list = self.group_list();
        let g = list["groups"]
            .as_array()?
            .iter()
            .find(|g| g["name"] == group)?
            .clone();
        let mut g = g;
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
        Some(g)
    }

    /// `GET /api/v1` or `GET /apis/<group>/<version>`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for r in self
            .served
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            resources.push(json!({
                "name": r.plural,
                "singularName": r.kind.to_ascii_lowercase(),
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": r.verbs(),
                "shortNames": r.short_names,
            }));
            if r.status {
                resources.push(json!({
                    "name": format!("{}/status", r.plural),
                    "singularName": "",
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
        }
        if resources.is_empty() {
            return None;
        }
        let gv = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        Some(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        )
    }

    /// `GET /openapi/v3`: one document per group-version.
    pub fn openapi_index(&self) -> Value {
        let mut paths = serde_json::Map::new();
        let mut gvs: Vec<(&str, &str)> = Vec::new();
        for r in &self.served {
            if !gvs.contains(&(r.group, r.version)) {
                gvs.push((r.group, r.version));
            }
        }
        for (g, v) in gvs {
            let p = if g.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{g}/{v}")
            };
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=standin")}),
            );
        }
        json!({"paths": paths})
    }

    /// `GET /openapi/v3/api/v1` (and the groups'): just enough for
    /// kubectl to see that PATCH takes `fieldValidation` (so it leaves
    /// validation to the server) and which kind each path is. Schemas are
    /// open: the stand-in does not validate fields (see the behaviour
    /// table).
    pub fn openapi_doc(&self, group: &str, version: &str) -> Option<Value> {
        let mut paths = serde_json::Map::new();
        let mut schemas = serde_json::Map::new();
        for r in self
            .served
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            let base = if group.is_empty() {
                format!("/api/{version}")
            } else {
                format!("/apis/{group}/{version}")
            };
            let item = if r.namespaced {
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
            } else {
                format!("{base}/{}/{{name}}", r.plural)
            };
            let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
            let op = |action: &str| {
                json!({
                    "x-kubernetes-action": action,
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    ],
                    "responses": {"200": {"description": "OK"}},
                })
            };
            paths.insert(
                item,
                json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
            );
            let schema_name = format!(
                "{}.{}.{}",
                if r.group.is_empty() {
                    "io.k8s.api.core"
                } else {
                    r.group
                },
                r.version,
                r.kind
            );
            schemas.insert(
                schema_name,
                json!({
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                    "x-kubernetes-group-version-kind": [gvk],
                }),
            );
        }
        if paths.is_empty() {
            return None;
        }
        Some(json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes (isthmus stand-in)", "version": "v1.33.0"},
            "paths": paths,
            "components": {"schemas": schemas},
        }))
    }
}
