//! AuthorizationPolicy: ALLOW / DENY / AUDIT on the caller and the
//! request, with Istio's evaluation order (DENY, then ALLOW) and Istio's
//! field semantics.
//!
//! **Fails closed.** A policy that cannot be enforced as written (an
//! unknown or unsupported field, a CUSTOM action, a bad value) is kept,
//! not dropped: [`AuthorizationPolicy::from_object`] turns it into a policy
//! that denies every request to the workloads it selects, with the reason
//! it carries in [`AuthorizationPolicy::unenforceable`]. Dropping it would
//! turn a DENY into nothing and a workload's only ALLOW into allow-all.
//! When its selector cannot be read either, it selects the whole
//! namespace (the whole mesh in the root namespace).
//!
//! `istio.io/dry-run: "true"` is honoured: the policy is evaluated and its
//! verdict reported ([`Verdict::dry_run`]), never enforced.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::{PolicyError, SelectorSpec, err, read_spec};

/// The annotation that makes a policy report, not enforce (Istio's).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// What a policy does when a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum AuthzAction {
    Allow,
    Deny,
    /// Marks matching requests for audit (logged and counted); never
    /// changes the verdict.
    Audit,
}

/// A value pattern of AuthorizationPolicy: exact, `prefix*`, `*suffix` or
/// `*` (which needs a value to be present).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Glob(pub String);

impl Glob {
    pub fn matches(&self, v: &str) -> bool {
        self.matches_by(v, |a, b| a == b)
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        self.matches_by(v, <[u8]>::eq_ignore_ascii_case)
    }

    /// Exact, prefix, suffix or any, comparing bytes with `eq`.
    fn matches_by(&self, v: &str, eq: impl Fn(&[u8], &[u8]) -> bool) -> bool {
        let (p, v) = (self.0.as_bytes(), v.as_bytes());
        if p == b"*" {
            return true;
        }
        if let Some(prefix) = p.strip_suffix(b"*") {
            return v.len() >= prefix.len() && eq(&v[..prefix.len()], prefix);
        }
        if let Some(suffix) = p.strip_prefix(b"*") {
            return v.len() >= suffix.len() && eq(&v[v.len() - suffix.len()..], suffix);
        }
        eq(v, p)
    }
}

/// An IP address or CIDR block (`ipBlocks`, `source.ip`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8)");
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One field of a source, operation or condition: when `values` is set one
/// of them must match; none of `not` may match. A missing fact (no
/// principal on plaintext) matches no positive value and no negative one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Field<T> {
    pub values: Option<Vec<T>>,
    pub not: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self {
            values: None,
            not: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn check<V: Copy>(&self, v: Option<V>, m: impl Fn(&T, V) -> bool) -> bool {
        let pos = match &self.values {
            None => true,
            Some(l) => v.is_some_and(|v| l.iter().any(|t| m(t, v))),
        };
        pos && !v.is_some_and(|v| self.not.iter().any(|t| m(t, v)))
    }

    fn is_set(&self) -> bool {
        self.values.is_some() || !self.not.is_empty()
    }
}

/// One `from[].source`: every field set must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Source {
    pub principals: Field<Glob>,
    pub namespaces: Field<Glob>,
    /// `<namespace>/<serviceaccount>`, exact.
    pub service_accounts: Field<(String, String)>,
    pub ip_blocks: Field<IpBlock>,
    pub remote_ip_blocks: Field<IpBlock>,
}

/// One `to[].operation`: every field set must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Operation {
    /// Matched case-insensitively, with and without the port.
    pub hosts: Field<Glob>,
    pub ports: Field<u16>,
    pub methods: Field<Glob>,
    pub paths: Field<Glob>,
}

/// One `when[]` entry: what it reads, with values typed by it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Condition {
    /// `request.headers[<name>]`, the name lower-cased.
    RequestHeader(String, Field<Glob>),
    SourceIp(Field<IpBlock>),
    RemoteIp(Field<IpBlock>),
    SourceNamespace(Field<Glob>),
    SourcePrincipal(Field<Glob>),
    DestinationIp(Field<IpBlock>),
    DestinationPort(Field<u16>),
}

/// A rule: matches when one of `from`, one of `to` and every `when`
/// match (an empty list matches everything).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// What an AuthorizationPolicy is evaluated against.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Istio's principal form (`<td>/ns/<ns>/sa/<sa>`), `None` for
    /// plaintext.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    /// The caller's (namespace, service account), `None` for plaintext.
    pub service_account: Option<(&'a str, &'a str)>,
    /// The caller's address on this connection.
    pub source_ip: Option<IpAddr>,
    /// The address the caller connected to.
    pub destination_ip: Option<IpAddr>,
    /// The workload port the request is for.
    pub destination_port: u16,
    /// The request's authority (Host).
    pub host: &'a str,
    pub method: &'a str,
    /// The normalized path, without the query.
    pub path: &'a str,
    pub headers: Option<&'a http::HeaderMap>,
}

impl Source {
    fn matches(&self, r: &RequestFacts<'_>) -> bool {
        let glob = |g: &Glob, v: &str| g.matches(v);
        let ip = |b: &IpBlock, v: IpAddr| b.contains(v);
        self.principals.check(r.principal, glob)
            && self.namespaces.check(r.namespace, glob)
            && self
                .service_accounts
                .check(r.service_account, |s: &(String, String), v: (&str, &str)| {
                    s.0 == v.0 && s.1 == v.1
                })
            && self.ip_blocks.check(r.source_ip, ip)
            // No trusted proxies in front of a sidecar: the remote address
            // is the connection's.
            && self.remote_ip_blocks.check(r.source_ip, ip)
    }
}

impl Operation {
    fn matches(&self, r: &RequestFacts<'_>) -> bool {
        let host_only = r.host.rsplit_once(':').map_or(r.host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                r.host
            }
        });
        self.hosts.check(Some(r.host), |g: &Glob, v: &str| {
            g.matches_ignore_case(v) || g.matches_ignore_case(host_only)
        }) && self
            .ports
            .check(Some(r.destination_port), |p: &u16, v: u16| *p == v)
            && self
                .methods
                .check(Some(r.method), |g: &Glob, v: &str| g.matches(v))
            && self
                .paths
                .check(Some(r.path), |g: &Glob, v: &str| g.matches(v))
    }
}

impl Condition {
    fn matches(&self, r: &RequestFacts<'_>) -> bool {
        let glob = |g: &Glob, v: &str| g.matches(v);
        let ip = |b: &IpBlock, v: IpAddr| b.contains(v);
        match self {
            Condition::RequestHeader(name, f) => {
                // Several values of one header are joined as Envoy does.
                let joined = r.headers.and_then(|h| {
                    let vals: Vec<&str> = h
                        .get_all(name.as_str())
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    (!vals.is_empty()).then(|| vals.join(","))
                });
                f.check(joined.as_deref(), glob)
            }
            Condition::SourceNamespace(f) => f.check(r.namespace, glob),
            Condition::SourcePrincipal(f) => f.check(r.principal, glob),
            // No trusted proxies in front of a sidecar: the remote address
            // is the connection's.
            Condition::SourceIp(f) | Condition::RemoteIp(f) => f.check(r.source_ip, ip),
            Condition::DestinationIp(f) => f.check(r.destination_ip, ip),
            Condition::DestinationPort(f) => {
                f.check(Some(r.destination_port), |p: &u16, v: u16| *p == v)
            }
        }
    }
}

impl Rule {
    pub fn matches(&self, r: &RequestFacts<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r)))
            && self.when.iter().all(|c| c.matches(r))
    }
}

/// An AuthorizationPolicy's meaning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub action: AuthzAction,
    /// ALLOW with no rules allows nothing; DENY with no rules denies
    /// nothing (Istio).
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and reported, not enforced.
    pub dry_run: bool,
    /// Why this policy cannot be enforced as written. Such a policy denies
    /// every request to the workloads it selects until it is fixed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unenforceable: Option<String>,
    #[serde(skip)]
    pub spec_json: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApSpec {
    selector: Option<SelectorSpec>,
    action: Option<String>,
    provider: Option<serde_json::Value>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Vec<FromSpec>,
    #[serde(default)]
    to: Vec<ToSpec>,
    #[serde(default)]
    when: Vec<ConditionSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSpec {
    source: Option<SourceSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    operation: Option<OperationSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceSpec {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    request_principals: Option<Vec<String>>,
    not_request_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
    service_accounts: Option<Vec<String>>,
    not_service_accounts: Option<Vec<String>>,
    ip_blocks: Option<Vec<String>>,
    not_ip_blocks: Option<Vec<String>>,
    remote_ip_blocks: Option<Vec<String>>,
    not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OperationSpec {
    hosts: Option<Vec<String>>,
    not_hosts: Option<Vec<String>>,
    ports: Option<Vec<String>>,
    not_ports: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConditionSpec {
    key: String,
    values: Option<Vec<String>>,
    not_values: Option<Vec<String>>,
}

/// Builds one field from its positive and negative lists, checking each
/// value with `one` (`at` names the positive field, e.g.
/// `rules[0].from[1].source.principals`).
fn field<T>(
    at: &str,
    not_at: &str,
    values: Option<Vec<String>>,
    not: Option<Vec<String>>,
    one: impl Fn(&str) -> Result<T, String>,
) -> Result<Field<T>, String> {
    let conv = |list: Vec<String>, at: &str| -> Result<Vec<T>, String> {
        if list.is_empty() {
            return Err(format!(
                "{at} is an empty list; remove it or give at least one value"
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, v)| one(v).map_err(|e| format!("{at}[{i}]: {e}")))
            .collect()
    };
    Ok(Field {
        values: values.map(|l| conv(l, at)).transpose()?,
        not: not
            .map(|l| conv(l, not_at))
            .transpose()?
            .unwrap_or_default(),
    })
}

/// Istio's string match: `*` only at the start or the end, never empty.
fn glob(v: &str) -> Result<Glob, String> {
    if v.is_empty() {
        return Err("is empty".into());
    }
    let inner = v.strip_prefix('*').unwrap_or(v);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if inner.contains('*') && v != "*" {
        return Err(format!(
            "{v:?}: a wildcard may only be the first or last character (exact, prefix*, *suffix or *)"
        ));
    }
    Ok(Glob(v.to_owned()))
}

fn path_glob(v: &str) -> Result<Glob, String> {
    if v.contains('{') {
        return Err(format!(
            "{v:?}: path templates ({{*}}, {{**}}) are not supported by Isthmus; use prefix* or *suffix"
        ));
    }
    glob(v)
}

fn port(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{v:?} is not a port number (1-65535)"))
}

fn service_account(v: &str) -> Result<(String, String), String> {
    match v.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        _ => Err(format!(
            "{v:?} is not <namespace>/<serviceaccount> (exact match only)"
        )),
    }
}

fn parse_condition(at: &str, c: ConditionSpec) -> Result<Condition, String> {
    if c.values.is_none() && c.not_values.is_none() {
        return Err(format!("{at}: give values or notValues for {:?}", c.key));
    }
    let (v_at, n_at) = (format!("{at}.values"), format!("{at}.notValues"));
    let strings = |c: ConditionSpec| field(&v_at, &n_at, c.values, c.not_values, glob);
    let ips = |c: ConditionSpec| field(&v_at, &n_at, c.values, c.not_values, IpBlock::parse);
    let key = c.key.clone();
    Ok(match key.as_str() {
        "source.ip" => Condition::SourceIp(ips(c)?),
        "remote.ip" => Condition::RemoteIp(ips(c)?),
        "destination.ip" => Condition::DestinationIp(ips(c)?),
        "source.namespace" => Condition::SourceNamespace(strings(c)?),
        "source.principal" => Condition::SourcePrincipal(strings(c)?),
        "destination.port" => {
            Condition::DestinationPort(field(&v_at, &n_at, c.values, c.not_values, port)?)
        }
        k if k.starts_with("request.headers[") && k.ends_with(']') => {
            let name = &k["request.headers[".len()..k.len() - 1];
            if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("{at}.key {k:?}: {name:?} is not a header name"));
            }
            Condition::RequestHeader(name.to_ascii_lowercase(), strings(c)?)
        }
        k if k.starts_with("request.auth.") => {
            return Err(format!(
                "{at}.key {k:?}: request authentication (JWT) is not supported by Isthmus, so this condition cannot be checked"
            ));
        }
        k if k.starts_with("experimental.") || k == "connection.sni" => {
            return Err(format!(
                "{at}.key {k:?} is not supported by Isthmus; supported: request.headers[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port"
            ));
        }
        k => {
            return Err(format!(
                "{at}.key {k:?} is not a condition key; use request.headers[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.ip or destination.port"
            ));
        }
    })
}

impl AuthorizationPolicy {
    /// Parses `spec` strictly: every problem is an error naming the field.
    /// The data path uses [`AuthorizationPolicy::from_object`], which never
    /// drops a policy.
    pub fn from_spec(
        namespace: &str,
        name: &str,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let e = |d: String| err("AuthorizationPolicy", namespace, name, d);
        let s: ApSpec = read_spec(spec).map_err(|x| {
            e(format!(
                "{x} (Isthmus reads selector, action, rules[].from[].source, rules[].to[].operation and rules[].when)"
            ))
        })?;
        let action = match (s.action.as_deref(), &s.provider) {
            (None | Some("ALLOW"), None) => AuthzAction::Allow,
            (Some("DENY"), None) => AuthzAction::Deny,
            (Some("AUDIT"), None) => AuthzAction::Audit,
            (Some("CUSTOM"), _) => {
                return Err(e(
                    "action CUSTOM needs an external authorizer, which Isthmus does not have; use ALLOW or DENY rules".into(),
                ));
            }
            (_, Some(_)) => {
                return Err(e(
                    "provider is only for action CUSTOM; remove it or the action".into(),
                ));
            }
            (Some(other), None) => {
                return Err(e(format!(
                    "action {other:?} is not an action; use ALLOW, DENY, AUDIT or CUSTOM"
                )));
            }
        };
        let mut rules = Vec::new();
        for (i, r) in s.rules.into_iter().enumerate() {
            let mut rule = Rule::default();
            for (j, f) in r.from.into_iter().enumerate() {
                let at = format!("rules[{i}].from[{j}].source");
                let src = f
                    .source
                    .ok_or_else(|| e(format!("{at} is missing; each from entry needs a source")))?;
                rule.from.push(source(&at, src).map_err(e)?);
            }
            for (j, t) in r.to.into_iter().enumerate() {
                let at = format!("rules[{i}].to[{j}].operation");
                let op = t.operation.ok_or_else(|| {
                    e(format!("{at} is missing; each to entry needs an operation"))
                })?;
                rule.to.push(operation(&at, op).map_err(e)?);
            }
            for (j, c) in r.when.into_iter().enumerate() {
                rule.when
                    .push(parse_condition(&format!("rules[{i}].when[{j}]"), c).map_err(e)?);
            }
            rules.push(rule);
        }
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            selector: s.selector.map(|s| s.match_labels),
            action,
            rules,
            dry_run: false,
            unenforceable: None,
            spec_json: spec.to_string(),
        })
    }

    /// The policy the data path enforces for an object, never dropped:
    /// when `spec` cannot be enforced as written, a policy that denies
    /// every request to the workloads it selects, and the error. The
    /// selector is read on its own, so a broken rule still denies only
    /// where the policy applies; a selector that cannot be read selects
    /// the whole namespace.
    pub fn from_object(
        namespace: &str,
        name: &str,
        annotations: &BTreeMap<String, String>,
        spec: &serde_json::Value,
    ) -> (Self, Option<PolicyError>) {
        let dry_run = annotations
            .get(DRY_RUN_ANNOTATION)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        match Self::from_spec(namespace, name, spec) {
            Ok(mut p) => {
                p.dry_run = dry_run;
                (p, None)
            }
            Err(e) => {
                let mut p = Self::strictest(SelectorSpec::read_alone(spec), &e, spec.to_string());
                p.dry_run = dry_run;
                (p, Some(e))
            }
        }
    }

    /// The policy kept for an object that cannot be enforced for reason
    /// `e` (which names it): it denies every request to the workloads
    /// `selector` picks (`None`: the whole namespace).
    pub fn strictest(
        selector: Option<BTreeMap<String, String>>,
        e: &PolicyError,
        spec_json: String,
    ) -> Self {
        let PolicyError::Spec {
            namespace, name, ..
        } = e;
        Self {
            namespace: namespace.clone(),
            name: name.clone(),
            selector,
            action: AuthzAction::Deny,
            rules: Vec::new(),
            dry_run: false,
            unenforceable: Some(e.to_string()),
            spec_json,
        }
    }

    /// Whether this policy applies to a workload in `namespace` with
    /// `labels` (`root` is the mesh-wide namespace, `istio-system`).
    pub fn applies_to(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        root: &str,
    ) -> bool {
        (self.namespace == namespace || self.namespace == root)
            && self
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// Whether any rule matches (a policy that cannot be enforced matches
    /// every request).
    pub fn matches(&self, r: &RequestFacts<'_>) -> bool {
        self.unenforceable.is_some() || self.rules.iter().any(|rule| rule.matches(r))
    }

    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn source(at: &str, s: SourceSpec) -> Result<Source, String> {
    if s.request_principals.is_some() || s.not_request_principals.is_some() {
        return Err(format!(
            "{at}.requestPrincipals: request authentication (JWT) is not supported by Isthmus, so this rule cannot be checked"
        ));
    }
    let f = |n: &str| format!("{at}.{n}");
    let out = Source {
        principals: field(
            &f("principals"),
            &f("notPrincipals"),
            s.principals,
            s.not_principals,
            glob,
        )?,
        namespaces: field(
            &f("namespaces"),
            &f("notNamespaces"),
            s.namespaces,
            s.not_namespaces,
            glob,
        )?,
        service_accounts: field(
            &f("serviceAccounts"),
            &f("notServiceAccounts"),
            s.service_accounts,
            s.not_service_accounts,
            service_account,
        )?,
        ip_blocks: field(
            &f("ipBlocks"),
            &f("notIpBlocks"),
            s.ip_blocks,
            s.not_ip_blocks,
            IpBlock::parse,
        )?,
        remote_ip_blocks: field(
            &f("remoteIpBlocks"),
            &f("notRemoteIpBlocks"),
            s.remote_ip_blocks,
            s.not_remote_ip_blocks,
            IpBlock::parse,
        )?,
    };
    if out.service_accounts.is_set() && (out.principals.is_set() || out.namespaces.is_set()) {
        return Err(format!(
            "{at}: serviceAccounts cannot be combined with principals or namespaces; use one of them"
        ));
    }
    if !(out.principals.is_set()
        || out.namespaces.is_set()
        || out.service_accounts.is_set()
        || out.ip_blocks.is_set()
        || out.remote_ip_blocks.is_set())
    {
        return Err(format!(
            "{at} is empty; give at least one field (an empty source would match every caller)"
        ));
    }
    Ok(out)
}

fn operation(at: &str, o: OperationSpec) -> Result<Operation, String> {
    let f = |n: &str| format!("{at}.{n}");
    let out = Operation {
        hosts: field(&f("hosts"), &f("notHosts"), o.hosts, o.not_hosts, glob)?,
        ports: field(&f("ports"), &f("notPorts"), o.ports, o.not_ports, port)?,
        methods: field(
            &f("methods"),
            &f("notMethods"),
            o.methods,
            o.not_methods,
            glob,
        )?,
        paths: field(&f("paths"), &f("notPaths"), o.paths, o.not_paths, path_glob)?,
    };
    if !(out.hosts.is_set() || out.ports.is_set() || out.methods.is_set() || out.paths.is_set()) {
        return Err(format!(
            "{at} is empty; give at least one field (an empty operation would match every request)"
        ));
    }
    Ok(out)
}

/// The outcome of the policies that apply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `Err(reason)`: denied, naming the deciding policy.
    pub result: Result<(), String>,
    /// What the dry-run policies that apply would have decided
    /// (`Err(reason)`: they would deny); `None` when none applies.
    pub dry_run: Option<Result<(), String>>,
    /// The AUDIT policy that matched, if any.
    pub audit: Option<String>,
}

/// Istio's verdict over the policies that apply to a workload: a matching
/// DENY denies; when ALLOW policies exist, one must match. A policy that
/// cannot be enforced denies every request. Dry-run policies are
/// evaluated on their own and reported in [`Verdict::dry_run`].
pub fn authorize<'p>(
    applicable: impl IntoIterator<Item = &'p AuthorizationPolicy>,
    facts: &RequestFacts<'_>,
) -> Verdict {
    let (mut enforced, mut shadow) = (Vec::new(), Vec::new());
    let mut audit = None;
    for p in applicable {
        if p.dry_run {
            shadow.push(p);
        } else if p.action == AuthzAction::Audit {
            // (A policy that cannot be enforced is never AUDIT: it denies.)
            if audit.is_none() && p.matches(facts) {
                audit = Some(p.id());
            }
        } else {
            enforced.push(p);
        }
    }
    Verdict {
        result: decide(&enforced, facts),
        dry_run: (!shadow.is_empty()).then(|| decide(&shadow, facts)),
        audit,
    }
}

fn decide(policies: &[&AuthorizationPolicy], facts: &RequestFacts<'_>) -> Result<(), String> {
    if let Some(p) = policies.iter().find(|p| p.unenforceable.is_some()) {
        return Err(format!(
            "policy {} cannot be enforced as written, so it denies every request until fixed",
            p.id()
        ));
    }
    if let Some(p) = policies
        .iter()
        .find(|p| p.action == AuthzAction::Deny && p.matches(facts))
    {
        return Err(format!("denied by DENY policy {}", p.id()));
    }
    let allows: Vec<_> = policies
        .iter()
        .filter(|p| p.action == AuthzAction::Allow)
        .collect();
    if allows.is_empty() || allows.iter().any(|p| p.matches(facts)) {
        return Ok(());
    }
    let names: Vec<String> = allows.iter().map(|p| p.id()).collect();
    Err(format!("no ALLOW policy matched ({})", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts<'a>(principal: Option<&'a str>, method: &'a str, path: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            principal,
            namespace: principal.and_then(|p| p.split('/').nth(2)),
            service_account: None,
            source_ip: Some("10.1.2.3".parse().unwrap()),
            destination_ip: Some("10.9.9.9".parse().unwrap()),
            destination_port: 5000,
            host: "helloworld.sample.svc.cluster.local:5000",
            method,
            path,
            headers: None,
        }
    }

    #[test]
    fn authorization_rules_follow_istio_semantics() {
        let ap = AuthorizationPolicy::from_spec(
            "sample",
            "deny-admin",
            &json!({"action": "DENY", "rules": [{
                "from": [{"source": {"notPrincipals": ["east.local/ns/ops/sa/*"]}}],
                "to": [{"operation": {"paths": ["/admin*"], "methods": ["GET", "POST"]}}]
            }]}),
        )
        .unwrap();
        assert!(ap.matches(&facts(
            Some("east.local/ns/sample/sa/web"),
            "GET",
            "/admin/x"
        )));
        assert!(!ap.matches(&facts(Some("east.local/ns/ops/sa/root"), "GET", "/admin/x")));
        assert!(!ap.matches(&facts(
            Some("east.local/ns/sample/sa/web"),
            "GET",
            "/public"
        )));
        // Plaintext has no principal: notPrincipals matches it.
        assert!(ap.matches(&facts(None, "GET", "/admin")));
    }

    #[test]
    fn ports_hosts_ip_blocks_service_accounts_and_conditions_match_as_in_istio() {
        let ap = AuthorizationPolicy::from_spec(
            "sample",
            "mixed",
            &json!({"action": "DENY", "rules": [{
                "from": [{"source": {"ipBlocks": ["10.1.0.0/16"], "notIpBlocks": ["10.1.9.0/24"]}}],
                "to": [{"operation": {"ports": ["5000"], "hosts": ["HelloWorld.sample.svc.cluster.local"]}}],
                "when": [{"key": "request.headers[X-Env]", "values": ["prod*"]},
                         {"key": "destination.port", "notValues": ["9000"]}]
            }]}),
        )
        .unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert("x-env", "production".parse().unwrap());
        let mut f = facts(Some("td/ns/a/sa/b"), "GET", "/");
        f.headers = Some(&headers);
        assert!(ap.matches(&f));
        f.source_ip = Some("10.1.9.1".parse().unwrap());
        assert!(!ap.matches(&f), "notIpBlocks excludes");
        f.source_ip = Some("::ffff:10.1.2.3".parse().unwrap());
        assert!(ap.matches(&f), "v4-mapped v6 is the v4 address");
        f.destination_port = 5001;
        assert!(!ap.matches(&f), "ports");
        f.destination_port = 5000;
        f.headers = None;
        assert!(!ap.matches(&f), "a missing header matches no value");

        let sa = AuthorizationPolicy::from_spec(
            "sample",
            "sa",
            &json!({"rules": [{"from": [{"source": {"serviceAccounts": ["sample/sleep"]}}]}]}),
        )
        .unwrap();
        let mut f = facts(Some("td/ns/sample/sa/sleep"), "GET", "/");
        f.service_account = Some(("sample", "sleep"));
        assert!(sa.matches(&f));
        f.service_account = Some(("sample", "other"));
        assert!(!sa.matches(&f));
    }

    #[test]
    fn a_policy_that_cannot_be_enforced_is_kept_and_denies_where_it_applies() {
        let none = BTreeMap::new();
        for (spec, want) in [
            (
                json!({"action": "DENY", "selector": {"matchLabels": {"app": "web"}},
                       "rules": [{"to": [{"operation": {"paths": ["/a"]}}], "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}),
                "JWT",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
                "requestPrincipals",
            ),
            (
                json!({"action": "CUSTOM", "provider": {"name": "ext"}, "selector": {"matchLabels": {"app": "web"}}}),
                "CUSTOM",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"to": [{"operation": {"paths": ["/a/{*}"]}}]}]}),
                "path templates",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"frm": []}]}),
                "unknown field `frm`",
            ),
        ] {
            let (p, e) = AuthorizationPolicy::from_object("sample", "broken", &none, &spec);
            let e = e.expect("reported").to_string();
            assert!(e.contains(want), "{e} should contain {want}");
            assert!(p.unenforceable.is_some());
            let web = BTreeMap::from([("app".to_string(), "web".to_string())]);
            assert!(p.applies_to("sample", &web, "istio-system"));
            assert!(
                !p.applies_to("sample", &BTreeMap::new(), "istio-system"),
                "the selector still limits where it denies"
            );
            let v = authorize([&p], &facts(Some("td/ns/sample/sa/x"), "GET", "/"));
            assert!(v.result.unwrap_err().contains("cannot be enforced"));
        }
        // A selector that cannot be read: the whole namespace.
        let (p, _) = AuthorizationPolicy::from_object(
            "sample",
            "bad-selector",
            &none,
            &json!({"selector": {"matchLabels": "app"}, "action": "DENY"}),
        );
        assert!(p.applies_to("sample", &BTreeMap::new(), "istio-system"));
        assert!(p.unenforceable.is_some());
    }

    #[test]
    fn invalid_values_are_refused_as_istio_refuses_them() {
        for (spec, want) in [
            (
                json!({"rules": [{"from": [{"source": {}}]}]}),
                "rules[0].from[0].source is empty",
            ),
            (
                json!({"rules": [{"to": [{"operation": {}}]}]}),
                "rules[0].to[0].operation is empty",
            ),
            (
                json!({"rules": [{"from": [{"source": {"principals": []}}]}]}),
                "principals is an empty list",
            ),
            (
                json!({"rules": [{"from": [{"source": {"principals": ["a*b"]}}]}]}),
                "wildcard",
            ),
            (
                json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
                "ipBlocks[0]",
            ),
            (
                json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
                "ports[0]",
            ),
            (
                json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
                "give values or notValues",
            ),
            (
                json!({"rules": [{"when": [{"key": "request.colour", "values": ["x"]}]}]}),
                "not a condition key",
            ),
            (
                json!({"action": "DENY", "provider": {"name": "x"}}),
                "provider is only for action CUSTOM",
            ),
            (json!({"action": "LOG"}), "not an action"),
            (
                json!({"rules": [{"from": [{"source": {"serviceAccounts": ["ns/sa"], "namespaces": ["ns"]}}]}]}),
                "cannot be combined",
            ),
        ] {
            let e = AuthorizationPolicy::from_spec("ns", "bad", &spec)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("AuthorizationPolicy ns/bad: "), "{e}");
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    #[test]
    fn dry_run_policies_are_reported_not_enforced_and_audit_never_decides() {
        let dry = BTreeMap::from([(DRY_RUN_ANNOTATION.to_string(), "true".to_string())]);
        let (deny, e) = AuthorizationPolicy::from_object(
            "sample",
            "deny-all-dry",
            &dry,
            &json!({"action": "DENY", "rules": [{}]}),
        );
        assert!(e.is_none() && deny.dry_run);
        let (audit, _) = AuthorizationPolicy::from_object(
            "sample",
            "audit-admin",
            &BTreeMap::new(),
            &json!({"action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
        );
        let v = authorize([&deny, &audit], &facts(None, "GET", "/admin/x"));
        assert_eq!(v.result, Ok(()));
        assert!(v.dry_run.unwrap().unwrap_err().contains("deny-all-dry"));
        assert_eq!(v.audit.as_deref(), Some("sample/audit-admin"));
        // A broken dry-run policy is reported, still not enforced.
        let (broken, _) = AuthorizationPolicy::from_object(
            "sample",
            "broken-dry",
            &dry,
            &json!({"rules": [{"when": [{"key": "request.auth.principal", "values": ["x"]}]}]}),
        );
        let v = authorize([&broken], &facts(None, "GET", "/"));
        assert_eq!(v.result, Ok(()));
        assert!(v.dry_run.unwrap().is_err());
    }
}
