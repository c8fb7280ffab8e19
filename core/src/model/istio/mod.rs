//! Istio's policy API as the data path reads it: one file per kind,
//! each parsed from the JSON of the object's `spec` into domain types.
//! Everything is checked here, once: a regex that does not compile, a
//! percentage over 100 or a field Isthmus does not implement is an error
//! naming the object, never a surprise on the data path.

mod authorization_policy;
mod destination_rule;
mod peer_authentication;
mod virtual_service;

use std::collections::BTreeMap;

use serde::Deserialize;

pub use authorization_policy::*;
pub use destination_rule::*;
pub use peer_authentication::*;
pub use virtual_service::*;

/// Istio's root namespace: policies there without a selector apply to
/// the whole mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Why a policy object was not accepted. Names the object and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{kind} {namespace}/{name}: spec is invalid: {detail}")]
    Spec {
        kind: &'static str,
        namespace: String,
        name: String,
        detail: String,
    },
}

/// Expands a host as Istio does: a short name is in `namespace`;
/// `<svc>.<ns>` and `<svc>.<ns>.svc` get the cluster suffix.
pub fn qualify_host(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.');
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.svc.cluster.local"),
        1 => format!("{host}.svc.cluster.local"),
        2 if host.ends_with(".svc") => format!("{host}.cluster.local"),
        _ => host.to_owned(),
    }
}

pub(crate) fn err(kind: &'static str, namespace: &str, name: &str, detail: String) -> PolicyError {
    PolicyError::Spec {
        kind,
        namespace: namespace.into(),
        name: name.into(),
        detail,
    }
}

/// Reads a spec whose fields are all optional: a missing spec is an empty
/// one (for an AuthorizationPolicy, Istio's allow-nothing).
pub(crate) fn read_spec<T: serde::de::DeserializeOwned + Default>(
    spec: &serde_json::Value,
) -> Result<T, String> {
    if spec.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(spec.clone()).map_err(|e| e.to_string())
}

/// A compiled regular expression, matched against the whole value
/// (Istio's RE2 semantics).
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    pub(crate) fn new(re: &str) -> Result<Self, String> {
        regex::Regex::new(&format!("^(?:{re})$"))
            .map(Pattern)
            .map_err(|e| format!("regex {re:?} does not compile: {e}"))
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}
impl Eq for Pattern {}

impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// Istio's `StringMatch`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(re) => re.0.is_match(value),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StringMatchSpec {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

impl StringMatchSpec {
    pub(crate) fn compile(self) -> Result<StringMatch, String> {
        match (self.exact, self.prefix, self.regex) {
            (Some(e), None, None) => Ok(StringMatch::Exact(e)),
            (None, Some(p), None) => Ok(StringMatch::Prefix(p)),
            (None, None, Some(r)) => Pattern::new(&r).map(StringMatch::Regex),
            _ => Err("a match needs exactly one of exact, prefix, regex".into()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SelectorSpec {
    #[serde(default)]
    pub(crate) match_labels: BTreeMap<String, String>,
}

impl SelectorSpec {
    /// The `selector.matchLabels` of a spec that may be broken elsewhere
    /// (a security policy kept in its strictest form still applies only
    /// where it selects); `None` when absent or unreadable, which selects
    /// the whole namespace.
    pub(crate) fn read_alone(spec: &serde_json::Value) -> Option<BTreeMap<String, String>> {
        let s = spec.get("selector")?;
        serde_json::from_value::<SelectorSpec>(s.clone())
            .ok()
            .map(|s| s.match_labels)
    }
}
