//! PeerAuthentication: the mTLS mode of a workload, namespace or mesh,
//! and of single workload ports (`portLevelMtls`).
//!
//! **Fails closed.** A PeerAuthentication that cannot be applied as
//! written is kept as STRICT for what it selects
//! ([`PeerAuthentication::from_object`]), never dropped: dropping it
//! would let plaintext in where the user asked for mTLS.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{PolicyError, SelectorSpec, err, read_spec};

/// The mTLS mode (`mtls.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum MtlsMode {
    /// Only mTLS.
    Strict,
    /// mTLS and plaintext (Istio's default).
    #[default]
    Permissive,
    /// Only plaintext.
    Disable,
}

/// A PeerAuthentication's meaning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `selector.matchLabels`; `None` applies to the whole namespace (or
    /// the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` (UNSET): inherit from the parent scope.
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls`: the mode of single workload ports (UNSET ones are
    /// left out and inherit `mode`).
    pub port_level: BTreeMap<u16, MtlsMode>,
    /// Why this object cannot be applied as written; it is then STRICT
    /// for what it selects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unenforceable: Option<String>,
    #[serde(skip)]
    pub spec_json: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PaSpec {
    selector: Option<SelectorSpec>,
    mtls: Option<MtlsSpec>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, MtlsSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MtlsSpec {
    mode: Option<String>,
}

fn parse_mode(at: &str, m: Option<MtlsSpec>) -> Result<Option<MtlsMode>, String> {
    Ok(match m.and_then(|m| m.mode).as_deref() {
        None | Some("UNSET") => None,
        Some("STRICT") => Some(MtlsMode::Strict),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some("DISABLE") => Some(MtlsMode::Disable),
        Some(other) => {
            return Err(format!(
                "{at} {other:?} is not a mode; use STRICT, PERMISSIVE, DISABLE or UNSET"
            ));
        }
    })
}

impl PeerAuthentication {
    pub fn from_spec(
        namespace: &str,
        name: &str,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let e = |d: String| err("PeerAuthentication", namespace, name, d);
        let s: PaSpec = read_spec(spec).map_err(e)?;
        let mode = parse_mode("mtls.mode", s.mtls).map_err(e)?;
        let selector = s.selector.map(|s| s.match_labels);
        if !s.port_level_mtls.is_empty() && selector.as_ref().is_none_or(|s| s.is_empty()) {
            return Err(e(
                "portLevelMtls needs a selector with matchLabels (a port means something only for a workload)".into(),
            ));
        }
        let mut port_level = BTreeMap::new();
        for (port, m) in s.port_level_mtls {
            let at = format!("portLevelMtls[{port}]");
            let n = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| e(format!("{at}: {port:?} is not a port number (1-65535)")))?;
            if let Some(m) = parse_mode(&format!("{at}.mode"), Some(m)).map_err(e)? {
                port_level.insert(n, m);
            }
        }
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            selector,
            mode,
            port_level,
            unenforceable: None,
            spec_json: spec.to_string(),
        })
    }

    /// The object the data path applies, never dropped: when `spec`
    /// cannot be applied as written, STRICT for what it selects (the whole
    /// namespace if the selector cannot be read either), and the error.
    pub fn from_object(
        namespace: &str,
        name: &str,
        spec: &serde_json::Value,
    ) -> (Self, Option<PolicyError>) {
        match Self::from_spec(namespace, name, spec) {
            Ok(p) => (p, None),
            Err(e) => {
                let p = Self::strictest(SelectorSpec::read_alone(spec), &e, spec.to_string());
                (p, Some(e))
            }
        }
    }

    /// The object kept for one that cannot be applied for reason `e`
    /// (which names it): STRICT for the workloads `selector` picks
    /// (`None`: the whole namespace, or the mesh in the root namespace).
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
            mode: Some(MtlsMode::Strict),
            port_level: BTreeMap::new(),
            unenforceable: Some(e.to_string()),
            spec_json,
        }
    }

    /// The mode this object sets for `port` of a workload it selects.
    pub fn mode_for(&self, port: u16) -> Option<MtlsMode> {
        self.port_level.get(&port).copied().or(self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn port_level_modes_override_the_workload_mode() {
        let pa = PeerAuthentication::from_spec(
            "sample",
            "web",
            &json!({"selector": {"matchLabels": {"app": "web"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, "9090": {"mode": "UNSET"}}}),
        )
        .unwrap();
        assert_eq!(pa.mode_for(8080), Some(MtlsMode::Permissive));
        assert_eq!(pa.mode_for(9090), Some(MtlsMode::Strict));
        assert_eq!(pa.mode_for(5000), Some(MtlsMode::Strict));
    }

    #[test]
    fn a_peer_authentication_that_cannot_be_applied_is_strict() {
        for (spec, want) in [
            (
                json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}, "mtls": {"mode": "PERMISSIVE"}}),
                "portLevelMtls needs a selector",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "OFF"}}),
                "mtls.mode \"OFF\" is not a mode",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"http": {"mode": "DISABLE"}}}),
                "not a port number",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE", "extra": 1}}),
                "unknown field",
            ),
        ] {
            let (p, e) = PeerAuthentication::from_object("sample", "broken", &spec);
            let e = e.expect("reported").to_string();
            assert!(e.contains(want), "{e} should contain {want}");
            assert_eq!(p.mode_for(8080), Some(MtlsMode::Strict), "{spec}");
            assert!(p.unenforceable.is_some());
        }
    }
}
