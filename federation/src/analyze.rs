//! `isthmus analyze` (istioctl analyze's role): the checks a controller
//! applies to its cluster's configuration, run offline over a directory
//! of manifests, and the checks that need several objects at once (a
//! route to a subset no DestinationRule defines, a policy that selects no
//! workload, an export without its Service). Each finding has a stable
//! code and a severity, names the object and says what to do.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use isthmus_core::model::istio::ROOT_NAMESPACE;
use isthmus_core::model::problem::ConfigProblem;
use isthmus_core::model::{Locality, Scope, ServiceKey};

use crate::catalog::Catalog;
use crate::objects::{Kind, Object};
use crate::source::Objects;
use crate::source::files::{manifest_paths, parse_file};

/// How much a finding matters; `isthmus analyze` fails on errors (or on
/// warnings with `--fail-on warning`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub severity: Severity,
    /// `Kind namespace/name`, or a file and line.
    pub object: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Every code `isthmus analyze` reports, with its severity and meaning.
pub const CODES: &[(&str, Severity, &str)] = &[
    (
        "ISM0000",
        Severity::Error,
        "a manifest file does not parse; its objects are not read",
    ),
    (
        "ISM0001",
        Severity::Error,
        "an object cannot be applied as written (security policy: applied in its strictest form; routing: left out)",
    ),
    (
        "ISM0002",
        Severity::Error,
        "a VirtualService routes to a subset no DestinationRule defines for that host",
    ),
    (
        "ISM0003",
        Severity::Warning,
        "a DestinationRule's host is not a Service of this cluster",
    ),
    (
        "ISM0004",
        Severity::Warning,
        "an AuthorizationPolicy or PeerAuthentication selects no workload",
    ),
    (
        "ISM0005",
        Severity::Error,
        "a ServiceExport has no Service of the same name",
    ),
    (
        "ISM0006",
        Severity::Warning,
        "a VirtualService routes to a cluster.local host that is not a Service of this cluster",
    ),
];

impl Finding {
    /// What a controller could not apply, as a finding (`ISM0001`).
    pub fn from_problem(p: &ConfigProblem) -> Self {
        finding("ISM0001", p.object(), p.describe())
    }
}

fn finding(code: &'static str, object: String, message: String) -> Finding {
    let severity = CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or(Severity::Error, |(_, s, _)| *s);
    Finding {
        code,
        severity,
        object,
        message,
    }
}

/// Reads every manifest under `dir` as the files source does; a file that
/// does not parse is a finding.
pub fn read_dir(dir: &Path) -> (Objects, Vec<Finding>) {
    let mut objects = Objects::new();
    let mut findings = Vec::new();
    for path in manifest_paths(dir) {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                findings.push(finding(
                    "ISM0000",
                    path.display().to_string(),
                    format!("cannot read the file: {e}"),
                ));
                continue;
            }
        };
        match parse_file(&path, &text) {
            Ok(list) => {
                for o in list {
                    objects.insert(o.key.clone(), Arc::new(o));
                }
            }
            Err(e) => findings.push(finding(
                "ISM0000",
                format!("{}:{}", e.path.display(), e.line),
                e.message,
            )),
        }
    }
    (objects, findings)
}

fn name(o: &Object) -> String {
    format!("{:?} {}/{}", o.key.kind, o.key.namespace, o.key.name)
}

/// Runs every check over one cluster's objects.
pub fn analyze(objects: &Objects, locality: &Locality) -> Vec<Finding> {
    let cat = Catalog::build(objects, locality);
    let mut out: Vec<Finding> = cat.problems.iter().map(Finding::from_problem).collect();

    // Routes to subsets and hosts.
    for vs in cat.virtual_services.values() {
        let object = format!("VirtualService {}/{}", vs.namespace, vs.name);
        for (i, route) in vs.http.iter().enumerate() {
            for d in &route.route {
                let Some((key, scope)) = ServiceKey::from_host(&d.host) else {
                    continue;
                };
                if let Some(subset) = &d.subset {
                    let defined = cat
                        .destination_rules
                        .get(&key)
                        .is_some_and(|dr| dr.subsets.contains_key(subset));
                    if !defined {
                        out.push(finding(
                            "ISM0002",
                            object.clone(),
                            format!(
                                "http[{i}] routes to subset {subset:?} of {}, which no DestinationRule defines; those requests get 503 (add the subset to a DestinationRule for {})",
                                d.host, d.host
                            ),
                        ));
                    }
                }
                if scope == Scope::Local && !cat.services.contains_key(&key) {
                    out.push(finding(
                        "ISM0006",
                        object.clone(),
                        format!(
                            "http[{i}] routes to {}, which is not a Service in this cluster (a service of another cluster is {}.{}.svc.clusterset.local)",
                            d.host, key.name, key.namespace
                        ),
                    ));
                }
            }
        }
    }
    for dr in cat.destination_rules.values() {
        if dr.scope == Scope::Local && !cat.services.contains_key(&dr.service) {
            out.push(finding(
                "ISM0003",
                format!("DestinationRule {}/{}", dr.namespace, dr.name),
                format!(
                    "host {}.{}.svc.cluster.local is not a Service of this cluster; the rule applies to nothing here (check the name and namespace)",
                    dr.service.name, dr.service.namespace
                ),
            ));
        }
    }

    // Selectors that select nothing.
    let workloads: Vec<(&str, &BTreeMap<String, String>)> = cat
        .services
        .values()
        .flat_map(|s| {
            s.endpoints
                .iter()
                .map(move |e| (s.key.namespace.as_str(), &e.labels))
        })
        .collect();
    let selects_none = |ns: &str, sel: &BTreeMap<String, String>| {
        !sel.is_empty()
            && !workloads.iter().any(|(wns, labels)| {
                (*wns == ns || ns == ROOT_NAMESPACE)
                    && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
    };
    let selectors = cat
        .authorization_policies
        .values()
        .map(|p| ("AuthorizationPolicy", &p.namespace, &p.name, &p.selector))
        .chain(
            cat.peer_authentications
                .values()
                .map(|p| ("PeerAuthentication", &p.namespace, &p.name, &p.selector)),
        );
    for (kind, ns, n, sel) in selectors {
        if let Some(sel) = sel
            && selects_none(ns, sel)
        {
            out.push(finding(
                "ISM0004",
                format!("{kind} {ns}/{n}"),
                format!(
                    "selector {sel:?} matches no workload in {ns}; the policy has no effect (check the labels against the pods')"
                ),
            ));
        }
    }

    // Exports without their Service.
    for o in objects
        .values()
        .filter(|o| o.key.kind == Kind::ServiceExport)
    {
        let service = crate::objects::ObjectKey {
            kind: Kind::Service,
            namespace: o.key.namespace.clone(),
            name: o.key.name.clone(),
        };
        if !objects.contains_key(&service) {
            out.push(finding(
                "ISM0005",
                name(o),
                format!(
                    "there is no Service {}/{}: nothing is exported (create the Service, or remove the export)",
                    o.key.namespace, o.key.name
                ),
            ));
        }
    }
    out.sort_by(|a, b| (a.severity, a.code, &a.object).cmp(&(b.severity, b.code, &b.object)));
    out
}
