//! Configuration files: YAML, validated in one pass that reports every bad
//! field with its path and the fix, not just the first.
//!
//! A file is parsed into a tree once; a [`Reader`] then walks it, records
//! each problem with its dotted path and carries on, and reports fields it
//! does not know (typos) too. Cross-field rules run afterwards on the typed
//! result, adding to the same list. Nothing is half-applied: a caller gets
//! a complete config or the complete list of problems.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;

use crate::identity::{SpiffeId, TrustDomain, spiffe::validate_cluster_name};

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Dotted path from the document root, e.g. `peers[1].address`.
    pub path: String,
    pub message: String,
    /// What to write instead.
    pub fix: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (fix: {})", self.path, self.message, self.fix)
    }
}

/// Every problem found in one file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The I/O error is in the message and not a `source`, so a report
    // of the chain (`{:#}`) does not say it twice.
    #[error(
        "cannot read config file {path}: {error} (check the path and that this user may read it)"
    )]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not valid YAML: {detail}")]
    Syntax { path: PathBuf, detail: String },
    #[error("{}", render_invalid(.path, .errors))]
    Invalid {
        path: PathBuf,
        errors: Vec<FieldError>,
    },
}

fn render_invalid(path: &Path, errors: &[FieldError]) -> String {
    let mut s = format!(
        "{}: {} problem{} found:",
        path.display(),
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        s.push_str("\n  - ");
        s.push_str(&e.to_string());
    }
    s
}

/// A type that can be read from a config tree.
pub trait FromConfig: Sized {
    /// Reads every field, recording problems in `r`. Returns `None` only
    /// when a required part is missing; problems are in the reader.
    /// Nested sections are read with [`Reader::section`]; the caller of
    /// `read` reports unknown keys.
    fn read(r: &Reader<'_>) -> Option<Self>;

    /// Rules across fields, run on a fully read value. Paths are relative
    /// to this section.
    fn validate(&self, _errors: &mut Vec<FieldError>) {}
}

/// Parses YAML text (the file's contents) into `T`, or every problem.
pub fn parse<T: FromConfig>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let tree: Value = if text.trim().is_empty() {
        Value::Object(Default::default())
    } else {
        serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            detail: e.to_string(),
        })?
    };
    let errors = Rc::new(RefCell::new(Vec::new()));
    let reader = Reader::root(&tree, errors.clone());
    let value = T::read(&reader);
    reader.finish();
    let mut errors = Rc::try_unwrap(errors)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| rc.borrow().clone());
    if let Some(v) = &value {
        v.validate(&mut errors);
    }
    match value {
        Some(v) if errors.is_empty() => Ok(v),
        _ => Err(ConfigError::Invalid {
            path: path.to_owned(),
            errors,
        }),
    }
}

/// Every field path `T` reads from documents shaped like `seeds` (YAML;
/// a seed chooses branches, e.g. `source: {kube: {}}`, and gives lists one
/// item so their fields are read): `cluster.name`, `peers[].address`.
/// What the configuration reference must document.
pub fn field_paths<T: FromConfig>(seeds: &[&str]) -> BTreeSet<String> {
    let asked = Rc::new(RefCell::new(BTreeSet::new()));
    for seed in seeds {
        let tree: Value = serde_saphyr::from_str(seed).unwrap_or_default();
        let mut reader = Reader::root(&tree, Rc::new(RefCell::new(Vec::new())));
        reader.asked = Some(asked.clone());
        let _ = T::read(&reader);
    }
    asked
        .borrow()
        .iter()
        .map(|p| {
            let mut s = String::new();
            let mut skip = false;
            for ch in p.chars() {
                match ch {
                    '[' => {
                        s.push_str("[]");
                        skip = true;
                    }
                    ']' => skip = false,
                    _ if skip => {}
                    c => s.push(c),
                }
            }
            s
        })
        .collect()
}

/// Reads and parses a config file.
pub fn load<T: FromConfig>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse(path, &text)
}

/// Checks the document's `kind:` field.
pub fn check_kind(r: &Reader<'_>, expected: &str) {
    if let Some(kind) = r.required::<String>("kind")
        && kind != expected
    {
        r.error(
            "kind",
            format!("{kind:?} where {expected:?} was expected"),
            format!(
                "write `kind: {expected}`, or use this file with the `{}` command",
                kind.to_lowercase()
            ),
        );
    }
}

/// The `kind:` of a YAML document, if it has one (to choose its schema).
pub fn peek_kind(text: &str) -> Option<String> {
    let tree: Value = serde_saphyr::from_str(text).ok()?;
    tree.get("kind")?.as_str().map(str::to_owned)
}

/// Walks one object of the config tree.
#[derive(Debug)]
pub struct Reader<'a> {
    path: String,
    value: Option<&'a serde_json::Map<String, Value>>,
    errors: Rc<RefCell<Vec<FieldError>>>,
    seen: RefCell<BTreeSet<String>>,
    /// Every field path asked for ([`field_paths`]), shared by the tree.
    asked: Option<Rc<RefCell<BTreeSet<String>>>>,
}

impl<'a> Reader<'a> {
    fn root(value: &'a Value, errors: Rc<RefCell<Vec<FieldError>>>) -> Self {
        let r = Self {
            path: String::new(),
            value: value.as_object(),
            errors,
            seen: RefCell::default(),
            asked: None,
        };
        if r.value.is_none() {
            r.push(
                "(root)".into(),
                "the document is not a mapping",
                "write `key: value` pairs at the top level",
            );
        }
        r
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn push(&self, path: String, message: impl Into<String>, fix: impl Into<String>) {
        self.errors.borrow_mut().push(FieldError {
            path,
            message: message.into(),
            fix: fix.into(),
        });
    }

    /// Records a problem with `key` of this object.
    pub fn error(&self, key: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(self.child_path(key), message, fix);
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.seen.borrow_mut().insert(key.to_owned());
        if let Some(a) = &self.asked {
            a.borrow_mut().insert(self.child_path(key));
        }
        self.value.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    fn convert<T: FromField>(&self, key: &str, v: &Value) -> Option<T> {
        match T::from_field(v) {
            Ok(x) => Some(x),
            Err(FieldProblem { message, fix }) => {
                self.error(key, message, fix);
                None
            }
        }
    }

    /// A field that must be present.
    pub fn required<T: FromField>(&self, key: &str) -> Option<T> {
        match self.get(key) {
            Some(v) => self.convert(key, v),
            None => {
                self.error(key, "missing", format!("add `{key}:` ({})", T::EXPECTED));
                None
            }
        }
    }

    /// A field that may be absent (`None`); present but invalid is an error.
    pub fn optional<T: FromField>(&self, key: &str) -> Option<T> {
        self.get(key).and_then(|v| self.convert(key, v))
    }

    /// A field with a default.
    pub fn or<T: FromField>(&self, key: &str, default: T) -> T {
        self.optional(key).unwrap_or(default)
    }

    /// A nested object; absent gives an empty reader (its `required`
    /// fields then report as missing under this path).
    pub fn object(&self, key: &str) -> Reader<'a> {
        let v = self.get(key);
        let value = match v {
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                self.error(
                    key,
                    "expected a mapping",
                    format!("write `{key}:` followed by indented fields"),
                );
                None
            }
            None => None,
        };
        Reader {
            path: self.child_path(key),
            value,
            errors: self.errors.clone(),
            seen: RefCell::default(),
            asked: self.asked.clone(),
        }
    }

    /// A nested section: reads it, reports its unknown keys, and runs its
    /// own cross-field rules (paths prefixed with this section's), so they
    /// report even when other parts of the file are broken.
    pub fn section<T: FromConfig>(&self, key: &str) -> Option<T> {
        let sub = self.object(key);
        let value = T::read(&sub);
        sub.finish();
        if let Some(v) = &value {
            let mut errors = Vec::new();
            v.validate(&mut errors);
            for e in errors {
                self.push(format!("{}.{}", sub.path, e.path), e.message, e.fix);
            }
        }
        value
    }

    /// Whether `key` is present.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A list of objects; absent is empty.
    pub fn list(&self, key: &str) -> Vec<Reader<'a>> {
        match self.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let path = format!("{}[{i}]", self.child_path(key));
                    let value = item.as_object();
                    if value.is_none() {
                        self.push(
                            path.clone(),
                            "expected a mapping",
                            "write `- key: value` items",
                        );
                    }
                    Reader {
                        path,
                        value,
                        errors: self.errors.clone(),
                        seen: RefCell::default(),
                        asked: self.asked.clone(),
                    }
                })
                .collect(),
            Some(_) => {
                self.error(
                    key,
                    "expected a list",
                    format!("write `{key}:` followed by `- ` items"),
                );
                Vec::new()
            }
        }
    }

    /// Reports keys of this object that nothing read (usually typos), with
    /// the closest known key as the fix. Call after reading every field.
    pub fn finish(&self) {
        let Some(map) = self.value else { return };
        let seen = self.seen.borrow();
        for key in map.keys().filter(|k| !seen.contains(*k)) {
            let fix = match closest(key, seen.iter()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!(
                    "remove it; known fields: {}",
                    seen.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            self.error(key, "unknown field", fix);
        }
    }
}

fn closest<'s>(key: &str, candidates: impl Iterator<Item = &'s String>) -> Option<&'s String> {
    candidates
        .map(|c| (edit_distance(key, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Why a value does not fit a field.
#[derive(Debug)]
pub struct FieldProblem {
    pub message: String,
    pub fix: String,
}

impl FieldProblem {
    pub fn new(message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            fix: fix.into(),
        }
    }
}

/// A scalar type a field can hold.
pub trait FromField: Sized {
    /// What a valid value looks like, for messages.
    const EXPECTED: &'static str;
    fn from_field(v: &Value) -> Result<Self, FieldProblem>;
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn mismatch<T: FromField>(v: &Value) -> FieldProblem {
    FieldProblem::new(
        format!("{} is not {}", describe(v), T::EXPECTED),
        format!("use {}", T::EXPECTED),
    )
}

fn string_of<T: FromField>(v: &Value) -> Result<&str, FieldProblem> {
    v.as_str().ok_or_else(|| mismatch::<T>(v))
}

impl FromField for String {
    const EXPECTED: &'static str = "a string";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        string_of::<Self>(v).map(str::to_owned)
    }
}

impl FromField for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        v.as_bool().ok_or_else(|| mismatch::<Self>(v))
    }
}

impl FromField for u32 {
    const EXPECTED: &'static str = "a whole number";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| mismatch::<Self>(v))
    }
}

impl FromField for u64 {
    const EXPECTED: &'static str = "a whole number";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        v.as_u64().ok_or_else(|| mismatch::<Self>(v))
    }
}

/// A list of strings.
impl FromField for Vec<String> {
    const EXPECTED: &'static str = "a list of strings";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect())
            .ok_or_else(|| mismatch::<Self>(v))
    }
}

impl FromField for SocketAddr {
    const EXPECTED: &'static str = "an address like 127.0.0.1:15012 or [::1]:15012";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        let s = string_of::<Self>(v)?;
        s.parse().map_err(|_| mismatch::<Self>(v))
    }
}

/// A map of strings (labels).
impl FromField for std::collections::BTreeMap<String, String> {
    const EXPECTED: &'static str = "a mapping of strings, like `app: web`";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        v.as_object()
            .and_then(|m| {
                m.iter()
                    .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .ok_or_else(|| mismatch::<Self>(v))
    }
}

/// A duration written as `500ms`, `10s`, `5m`, `24h` or `1h30m`.
impl FromField for Duration {
    const EXPECTED: &'static str = "a duration like 500ms, 10s, 5m or 24h";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        let s = string_of::<Self>(v)?;
        parse_duration(s).ok_or_else(|| mismatch::<Self>(v))
    }
}

/// Parses `500ms`, `10s`, `5m`, `24h`, `1h30m` (Go's and Istio's form).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let (num, tail) = rest.split_at(digits);
        let n: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => return None,
        };
        total += Duration::try_from_secs_f64(secs).ok()?;
        rest = tail;
    }
    Some(total)
}

impl FromField for TrustDomain {
    const EXPECTED: &'static str = "a trust domain like east.isthmus.local";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        let s = string_of::<Self>(v)?;
        TrustDomain::from_str(s).map_err(|e| {
            FieldProblem::new(
                e.to_string(),
                "use lowercase letters, digits, '.', '-' and '_' only",
            )
        })
    }
}

impl FromField for SpiffeId {
    const EXPECTED: &'static str = "a SPIFFE ID like spiffe://east.isthmus.local/ns/default/sa/app";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        let s = string_of::<Self>(v)?;
        SpiffeId::from_str(s)
            .map_err(|e| FieldProblem::new(e.to_string(), format!("use {}", Self::EXPECTED)))
    }
}

impl FromField for PathBuf {
    const EXPECTED: &'static str = "a file or directory path";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        let s = string_of::<Self>(v)?;
        if s.is_empty() {
            return Err(FieldProblem::new("empty path", "give a path"));
        }
        Ok(PathBuf::from(s))
    }
}

/// A cluster name: a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ClusterName(pub String);

impl FromField for ClusterName {
    const EXPECTED: &'static str = "a cluster name (DNS label, e.g. east)";
    fn from_field(v: &Value) -> Result<Self, FieldProblem> {
        let s = string_of::<Self>(v)?;
        validate_cluster_name(s)
            .map(|()| ClusterName(s.to_owned()))
            .map_err(|e| {
                FieldProblem::new(e.to_string(), "use 1-63 lowercase letters, digits or '-'")
            })
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub use crate::model::Locality;

impl FromConfig for Locality {
    fn read(r: &Reader<'_>) -> Option<Self> {
        let l = Locality {
            region: r.or("region", String::new()),
            zone: r.or("zone", String::new()),
            subzone: r.or("subzone", String::new()),
        };
        Some(l)
    }
}

/// The `cluster:` section every component's config has.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterSection {
    pub name: ClusterName,
    pub trust_domain: TrustDomain,
    pub locality: Locality,
}

impl FromConfig for ClusterSection {
    fn read(r: &Reader<'_>) -> Option<Self> {
        let name = r.required("name");
        let trust_domain = r.required("trustDomain");
        let locality = r.section::<Locality>("locality");
        Some(Self {
            name: name?,
            trust_domain: trust_domain?,
            locality: locality?,
        })
    }
}

/// Admin, metrics and readiness listeners (`admin:` section).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdminSection {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// Default admin listener: loopback only.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";

impl FromConfig for AdminSection {
    fn read(r: &Reader<'_>) -> Option<Self> {
        let s = Self {
            admin: r.or("admin", DEFAULT_ADMIN_ADDR.parse().expect("valid default")),
            metrics: r.or(
                "metrics",
                DEFAULT_METRICS_ADDR.parse().expect("valid default"),
            ),
            readiness: r.or(
                "readiness",
                DEFAULT_READINESS_ADDR.parse().expect("valid default"),
            ),
        };
        Some(s)
    }

    fn validate(&self, errors: &mut Vec<FieldError>) {
        if !self.admin.ip().is_loopback() {
            errors.push(FieldError {
                path: "admin".into(),
                message: format!("{} is not a loopback address; the admin API can stop the process and dump its state", self.admin),
                fix: "bind it to 127.0.0.1 (and use kubectl port-forward to reach it)".into(),
            });
        }
        let mut seen = BTreeSet::new();
        for (name, addr) in [
            ("admin", self.admin),
            ("metrics", self.metrics),
            ("readiness", self.readiness),
        ] {
            if addr.port() != 0 && !seen.insert(addr.port()) {
                errors.push(FieldError {
                    path: name.to_owned(),
                    message: format!("port {} is used twice", addr.port()),
                    fix: "give each listener its own port".into(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_file_is_named_with_its_reason_once() {
        let e = load::<ClusterSection>(Path::new("/nonexistent/isthmus.yaml")).unwrap_err();
        let full = format!("{:#}", anyhow::Error::from(e));
        assert!(
            full.starts_with("cannot read config file /nonexistent/isthmus.yaml: "),
            "{full}"
        );
        assert_eq!(full.matches("No such file").count(), 1, "{full}");
        assert!(full.contains("check the path"), "{full}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        for bad in ["", "10", "5 minutes", "s", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn typo_suggests_the_known_field() {
        assert_eq!(
            closest(
                "trustDomian",
                ["trustDomain".to_string(), "name".into()].iter()
            )
            .map(String::as_str),
            Some("trustDomain")
        );
        assert_eq!(closest("zzzzzz", ["name".to_string()].iter()), None);
    }
}
