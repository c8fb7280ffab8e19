//! From a request's authority, method, path and headers to a destination
//! service, subset and port, with the route's timeout, retries and
//! faults: VirtualService matching over a table rebuilt on each config
//! change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use isthmus_core::model::istio::{Fault, HttpMatch, HttpRoute, Retries, qualify_host};
use isthmus_core::model::{DestinationRule, MeshState, Scope, ServiceKey, ServicePort};

/// Authorities remembered per table (bounded: they come from requests).
const PLAIN_CACHE: usize = 4096;

/// The mesh state and an index of VirtualServices by host.
#[derive(Debug, Default)]
pub struct Table {
    pub state: Arc<MeshState>,
    vs: HashMap<String, Vec<Arc<isthmus_core::model::VirtualService>>>,
    /// Mesh authorities no VirtualService routes, as resolved once for
    /// this table (and the caller namespace they were resolved in): the
    /// answer depends on nothing else, and a new config is a new table.
    plain: Mutex<HashMap<String, (String, Arc<Dest>)>>,
}

impl Table {
    pub fn new(state: Arc<MeshState>) -> Self {
        let mut vs: HashMap<String, Vec<_>> = HashMap::new();
        for v in state.virtual_services.values() {
            for h in &v.hosts {
                vs.entry(h.clone()).or_default().push(v.clone());
            }
        }
        Self {
            state,
            vs,
            plain: Mutex::default(),
        }
    }

    fn plain_cached(&self, namespace: &str, authority: &str) -> Option<Arc<Dest>> {
        let plain = self.plain.lock().unwrap_or_else(|e| e.into_inner());
        plain
            .get(authority)
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, d)| d.clone())
    }
}

/// A routed destination.
#[derive(Debug, Clone)]
pub struct Dest {
    pub key: ServiceKey,
    pub scope: Scope,
    /// Fully qualified host (`…svc.cluster.local` or `…clusterset.local`).
    pub host: String,
    pub port: ServicePort,
    pub subset: Option<String>,
    pub subset_labels: BTreeMap<String, String>,
    pub dr: Option<Arc<DestinationRule>>,
}

/// Istio's retries for a route that names none, shared by every request.
static DEFAULT_RETRIES: std::sync::LazyLock<Retries> = std::sync::LazyLock::new(Retries::default);

/// What to do with a request (retries and faults borrowed from the
/// table, which the request holds).
#[derive(Debug)]
pub enum Decision<'t> {
    Mesh {
        dest: Arc<Dest>,
        /// `namespace/name` of the VirtualService and the route's name.
        route_name: Option<String>,
        timeout: Option<Duration>,
        retries: &'t Retries,
        fault: Option<&'t Fault>,
    },
    /// Not a mesh name: forwarded as is (Istio's ALLOW_ANY passthrough).
    Passthrough,
    /// A mesh name that names nothing; the text says what to check.
    NotFound(String),
}

fn matches(m: &HttpMatch, method: &str, path: &str, headers: &HeaderMap) -> bool {
    m.uri.as_ref().is_none_or(|u| u.matches(path))
        && m.method.as_ref().is_none_or(|x| x.matches(method))
        && m.headers.iter().all(|(name, want)| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| want.matches(v))
        })
}

fn pick_weighted(route: &HttpRoute) -> Option<&isthmus_core::model::istio::RouteDestination> {
    let total: u32 = route.route.iter().map(|d| d.weight).sum();
    if total == 0 {
        return route.route.first();
    }
    let mut x = rand::random_range(0..total);
    for d in &route.route {
        if x < d.weight {
            return Some(d);
        }
        x -= d.weight;
    }
    route.route.last()
}

/// Splits `host[:port]` (IPv6 in brackets).
pub fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((h, port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((authority, None)),
    }
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

impl Table {
    /// The service a fully qualified host names and its port.
    fn service(&self, fqdn: &str, port: u16) -> Result<(ServiceKey, Scope, ServicePort), String> {
        let Some((key, scope)) = ServiceKey::from_host(fqdn) else {
            return Err(format!("{fqdn} is not a service name"));
        };
        let ports = match (self.state.local.get(&key), self.state.imported.get(&key)) {
            (Some(l), _) if scope == Scope::Local || !l.ports.is_empty() => &l.ports,
            (_, Some(i)) => &i.ports,
            (Some(l), None) => &l.ports,
            (None, None) => {
                return Err(format!(
                    "no service {}.{} in this cluster or imported from a peer (check the name and namespace, and that the owning cluster exports it with a ServiceExport)",
                    key.name, key.namespace
                ));
            }
        };
        let p = ports
            .iter()
            .find(|p| p.port == port)
            .cloned()
            .ok_or_else(|| {
                let list: Vec<String> = ports.iter().map(|p| p.port.to_string()).collect();
                format!(
                    "service {}.{} has no port {port} (its ports: {})",
                    key.name,
                    key.namespace,
                    list.join(", ")
                )
            })?;
        Ok((key, scope, p))
    }

    /// Routes a request. `authority` is the request's host[:port];
    /// `namespace` is the caller's (short names resolve there).
    pub fn route(
        &self,
        namespace: &str,
        authority: &str,
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Decision<'_>, String> {
        if let Some(dest) = self.plain_cached(namespace, authority) {
            return Ok(Decision::Mesh {
                dest,
                route_name: None,
                timeout: None,
                retries: &DEFAULT_RETRIES,
                fault: None,
            });
        }
        let (host, port) = split_authority(authority)
            .filter(|(h, _)| valid_host(h))
            .ok_or_else(|| format!("invalid host {authority:?}"))?;
        let port = port.unwrap_or(80);
        let host = host.to_ascii_lowercase();
        if host.parse::<std::net::IpAddr>().is_ok() {
            return Ok(Decision::Passthrough);
        }
        let fqdn = qualify_host(&host, namespace);
        let mesh_name =
            fqdn.ends_with(".svc.cluster.local") || fqdn.ends_with(".svc.clusterset.local");
        // A VirtualService for the host, first matching route wins.
        let mut chosen: Option<(String, &HttpRoute)> = None;
        if let Some(list) = self.vs.get(&fqdn) {
            'outer: for vs in list {
                for r in &vs.http {
                    if r.matches.is_empty()
                        || r.matches.iter().any(|m| matches(m, method, path, headers))
                    {
                        let name = if r.name.is_empty() {
                            format!("{}/{}", vs.namespace, vs.name)
                        } else {
                            format!("{}/{}:{}", vs.namespace, vs.name, r.name)
                        };
                        chosen = Some((name, r));
                        break 'outer;
                    }
                }
            }
        }
        let (route_name, dest_host, dest_port, subset, timeout, retries, fault) = match chosen {
            Some((name, r)) => {
                let d = pick_weighted(r);
                (
                    Some(name),
                    d.map_or(fqdn.clone(), |d| d.host.clone()),
                    d.and_then(|d| d.port).unwrap_or(port),
                    d.and_then(|d| d.subset.clone()),
                    r.timeout,
                    &r.retries,
                    r.fault.as_ref(),
                )
            }
            None if !mesh_name => return Ok(Decision::Passthrough),
            None => (
                None,
                fqdn.clone(),
                port,
                None,
                None,
                &*DEFAULT_RETRIES,
                None,
            ),
        };
        let (key, scope, service_port) = match self.service(&dest_host, dest_port) {
            Ok(x) => x,
            Err(e) => return Ok(Decision::NotFound(e)),
        };
        let dr = self.state.destination_rules.get(&key).cloned();
        let subset_labels = match &subset {
            None => BTreeMap::new(),
            Some(s) => match dr.as_ref().and_then(|d| d.subsets.get(s)) {
                Some(l) => l.clone(),
                None => {
                    return Ok(Decision::NotFound(format!(
                        "subset {s:?} of {dest_host} is not defined; add it to the service's DestinationRule"
                    )));
                }
            },
        };
        // Only a host no VirtualService names is the same for every
        // request to it (a VirtualService's unmatched requests must be
        // matched again: the next one may match).
        let plain = route_name.is_none() && !self.vs.contains_key(&fqdn);
        let dest = Arc::new(Dest {
            key,
            scope,
            host: dest_host,
            port: service_port,
            subset,
            subset_labels,
            dr,
        });
        if plain {
            let mut cache = self.plain.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() < PLAIN_CACHE {
                cache.insert(authority.to_owned(), (namespace.to_owned(), dest.clone()));
            }
        }
        Ok(Decision::Mesh {
            dest,
            route_name,
            timeout,
            retries,
            fault,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::model::{LocalService, VirtualService};

    fn service(name: &str) -> Arc<LocalService> {
        Arc::new(LocalService {
            key: ServiceKey::new("sample", name),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 5000,
                target_port: 5000,
                protocol: "TCP".into(),
            }],
            endpoints: vec![],
            exported_to: Default::default(),
        })
    }

    fn table() -> Table {
        let mut state = MeshState::default();
        for name in ["helloworld", "other"] {
            state
                .local
                .insert(ServiceKey::new("sample", name), service(name));
        }
        let vs = VirtualService::from_spec(
            "sample",
            "hw",
            &serde_json::json!({
                "hosts": ["helloworld"],
                "http": [{"name": "canary",
                          "match": [{"headers": {"x-canary": {"exact": "1"}}}],
                          "route": [{"destination": {"host": "helloworld"}}]}]
            }),
        )
        .unwrap();
        state
            .virtual_services
            .insert("sample/hw".into(), Arc::new(vs));
        Table::new(Arc::new(state))
    }

    fn mesh(d: Decision<'_>) -> (Arc<Dest>, Option<String>) {
        match d {
            Decision::Mesh {
                dest, route_name, ..
            } => (dest, route_name),
            other => panic!("not routed in the mesh: {other:?}"),
        }
    }

    #[test]
    fn a_virtual_service_host_is_matched_again_on_every_request() {
        let t = table();
        let plain = HeaderMap::new();
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "1".parse().unwrap());
        for _ in 0..2 {
            let (_, name) = mesh(
                t.route("sample", "helloworld:5000", "GET", "/", &plain)
                    .unwrap(),
            );
            assert_eq!(name, None, "no route of the VirtualService matches");
            let (d, name) = mesh(
                t.route("sample", "helloworld:5000", "GET", "/", &canary)
                    .unwrap(),
            );
            assert_eq!(name.as_deref(), Some("sample/hw:canary"));
            assert_eq!(d.host, "helloworld.sample.svc.cluster.local");
        }
    }

    #[test]
    fn a_host_without_virtual_service_resolves_once_per_table_and_namespace() {
        let t = table();
        let h = HeaderMap::new();
        let (a, _) = mesh(t.route("sample", "other:5000", "GET", "/", &h).unwrap());
        let (b, _) = mesh(t.route("sample", "other:5000", "GET", "/x", &h).unwrap());
        assert!(
            Arc::ptr_eq(&a, &b),
            "the second request reuses the first's answer"
        );
        assert_eq!(
            (a.host.as_str(), a.port.port),
            ("other.sample.svc.cluster.local", 5000)
        );
        // Another caller namespace resolves the short name there.
        assert!(matches!(
            t.route("prod", "other:5000", "GET", "/", &h).unwrap(),
            Decision::NotFound(_)
        ));
        // A new table (a new config) answers afresh.
        let (c, _) = mesh(
            table()
                .route("sample", "other:5000", "GET", "/", &h)
                .unwrap(),
        );
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn authorities_split() {
        assert_eq!(split_authority("a.b:80"), Some(("a.b", Some(80))));
        assert_eq!(split_authority("a"), Some(("a", None)));
        assert_eq!(split_authority("[::1]:8080"), Some(("::1", Some(8080))));
        assert_eq!(split_authority("a:x"), None);
        assert!(!valid_host("a b"));
    }
}
