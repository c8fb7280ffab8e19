//! SPIFFE IDs, parsed once at the boundary.
//!
//! Rules from the SPIFFE ID specification (spiffe/spiffe
//! `standards/SPIFFE-ID.md`): scheme `spiffe`, a trust domain of lowercase
//! letters, digits, `.`, `-` and `_`; no port, user info, query or
//! fragment; path segments of letters, digits, `.`, `-` and `_`, never
//! empty, `.` or `..`; no trailing slash; at most 2048 bytes. Anything else
//! (a NUL byte included) is refused, so a certificate can never smuggle a
//! second meaning past a string comparison.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted, in bytes (SPIFFE-ID spec §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes (SPIFFE-ID spec §2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error(
        "trust domain {0:?} is invalid: use 1-{MAX_TRUST_DOMAIN_LEN} lowercase letters, digits, '.', '-' or '_'"
    )]
    TrustDomain(String),
    #[error(
        "SPIFFE ID path {0:?} is invalid: segments must be non-empty, not '.' or '..', made of letters, digits, '.', '-' or '_', with no trailing slash"
    )]
    Path(String),
    #[error(
        "cluster name {0:?} is invalid: use a DNS label (1-63 lowercase letters, digits or '-')"
    )]
    ClusterName(String),
}

/// A SPIFFE trust domain, e.g. `east.isthmus.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no `spiffe://`).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_TRUST_DOMAIN_LEN
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(SpiffeIdError::TrustDomain(name.to_owned()))
        }
    }

    /// The name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`: the ID of the trust domain itself (carried by CA
    /// certificates).
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s.strip_prefix("spiffe://").unwrap_or(s))
    }
}

/// Validates a cluster name: a DNS label, as Kubernetes and kind use.
pub fn validate_cluster_name(name: &str) -> Result<(), SpiffeIdError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::ClusterName(name.to_owned()))
    }
}

/// A well-formed SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or starting with `/`.
    path: String,
}

/// What a SPIFFE ID names in Isthmus's layout of paths.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role<'a> {
    /// `/ns/<namespace>/sa/<service-account>`: a workload (Istio's form).
    Workload {
        namespace: &'a str,
        service_account: &'a str,
    },
    /// `/cluster/<name>/gateway`: a cluster's east-west gateway.
    Gateway { cluster: &'a str },
    /// `/cluster/<name>/controller`: a cluster's federation controller.
    Controller { cluster: &'a str },
    /// `/cluster/<name>`: a cluster's intermediate CA (never a leaf).
    ClusterCa { cluster: &'a str },
    /// Empty path: the trust domain itself (root CA).
    TrustDomain,
    /// Any other path.
    Other,
}

impl SpiffeId {
    /// Builds an ID from a trust domain and path segments, checking each.
    pub fn from_segments(td: &TrustDomain, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut path = String::new();
        for s in segments {
            path.push('/');
            path.push_str(s);
        }
        validate_path(&path)?;
        Ok(Self {
            trust_domain: td.clone(),
            path,
        })
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(td: &TrustDomain, ns: &str, sa: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["ns", ns, "sa", sa])
    }

    /// `spiffe://<td>/cluster/<cluster>/gateway`.
    pub fn gateway(td: &TrustDomain, cluster: &str) -> Result<Self, SpiffeIdError> {
        validate_cluster_name(cluster)?;
        Self::from_segments(td, &["cluster", cluster, "gateway"])
    }

    /// `spiffe://<td>/cluster/<cluster>/controller`.
    pub fn controller(td: &TrustDomain, cluster: &str) -> Result<Self, SpiffeIdError> {
        validate_cluster_name(cluster)?;
        Self::from_segments(td, &["cluster", cluster, "controller"])
    }

    /// `spiffe://<td>/cluster/<cluster>`: carried by the cluster's CA.
    pub fn cluster_ca(td: &TrustDomain, cluster: &str) -> Result<Self, SpiffeIdError> {
        validate_cluster_name(cluster)?;
        Self::from_segments(td, &["cluster", cluster])
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// What this ID names.
    pub fn role(&self) -> Role<'_> {
        let segs: Vec<&str> = self.path.split('/').skip(1).collect();
        match segs.as_slice() {
            [] => Role::TrustDomain,
            ["ns", namespace, "sa", service_account] => Role::Workload {
                namespace,
                service_account,
            },
            ["cluster", cluster, "gateway"] => Role::Gateway { cluster },
            ["cluster", cluster, "controller"] => Role::Controller { cluster },
            ["cluster", cluster] => Role::ClusterCa { cluster },
            _ => Role::Other,
        }
    }

    /// The cluster this identity is bound to (gateways, controllers and
    /// cluster CAs), if any.
    pub fn bound_cluster(&self) -> Option<&str> {
        match self.role() {
            Role::Gateway { cluster }
            | Role::Controller { cluster }
            | Role::ClusterCa { cluster } => Some(cluster),
            _ => None,
        }
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let bad = || SpiffeIdError::Path(path.to_owned());
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    for seg in rest.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(bad());
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(bad());
        }
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // Port, user info, query and fragment all fail the character checks.
        let trust_domain = TrustDomain::new(td)?;
        validate_path(path)?;
        Ok(Self {
            trust_domain,
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_and_cluster_ids() {
        let id: SpiffeId = "spiffe://east.local/ns/sample/sa/helloworld"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain().as_str(), "east.local");
        assert_eq!(
            id.role(),
            Role::Workload {
                namespace: "sample",
                service_account: "helloworld"
            }
        );
        let gw: SpiffeId = "spiffe://east.local/cluster/east/gateway".parse().unwrap();
        assert_eq!(gw.bound_cluster(), Some("east"));
        assert_eq!(gw.to_string(), "spiffe://east.local/cluster/east/gateway");
        let td: SpiffeId = "spiffe://east.local".parse().unwrap();
        assert_eq!(td.role(), Role::TrustDomain);
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "http://east.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://East.local/ns/a",
            "spiffe://east.local:8443/ns/a",
            "spiffe://user@east.local/ns/a",
            "spiffe://east.local/ns/a/",
            "spiffe://east.local//a",
            "spiffe://east.local/ns/../sa",
            "spiffe://east.local/ns/./sa",
            "spiffe://east.local/ns/a?x=1",
            "spiffe://east.local/ns/a#frag",
            "spiffe://east.local/ns/a\0/sa/b",
            "spiffe://east.local/ns/a b",
            "spiffe://east.local/ns/é",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} was accepted");
        }
        let long = format!("spiffe://a/{}", "x".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong));
    }

    #[test]
    fn cluster_names_are_dns_labels() {
        assert!(validate_cluster_name("us-east-1").is_ok());
        for bad in ["", "East", "-a", "a-", "a.b", &"x".repeat(64)] {
            assert!(validate_cluster_name(bad).is_err(), "{bad:?}");
        }
        let td = TrustDomain::new("t").unwrap();
        assert!(SpiffeId::gateway(&td, "a/b").is_err());
    }
}
