//! Conversions between the model and the protocol's shared messages
//! (`isthmus.common.v1`), written once: the federation session, the
//! config stream and linking all use these.

use isthmus_proto::common::v1 as pbc;
use rustls_pki_types::CertificateDer;

use crate::identity::{TrustBundle, TrustDomain};
use crate::model::{Locality, ServiceKey, is_dns_label};

/// How often a receiver should look for a newer bundle (SPIFFE bundle
/// endpoint's `refresh_hint`), in seconds.
pub const BUNDLE_REFRESH_HINT_SECONDS: u32 = 300;

impl From<&Locality> for pbc::Locality {
    fn from(l: &Locality) -> Self {
        pbc::Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }
    }
}

impl From<pbc::Locality> for Locality {
    fn from(l: pbc::Locality) -> Self {
        Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        }
    }
}

/// A message's optional locality (unset: unknown).
pub fn locality(l: Option<pbc::Locality>) -> Locality {
    l.map(Locality::from).unwrap_or_default()
}

impl From<&ServiceKey> for pbc::ServiceKey {
    fn from(k: &ServiceKey) -> Self {
        pbc::ServiceKey {
            namespace: k.namespace.clone(),
            name: k.name.clone(),
        }
    }
}

impl TryFrom<pbc::ServiceKey> for ServiceKey {
    type Error = String;

    /// Namespace and name must each be a DNS label, as Kubernetes names
    /// them: a peer's garbage never becomes a host name.
    fn try_from(k: pbc::ServiceKey) -> Result<Self, String> {
        if !is_dns_label(&k.namespace) || !is_dns_label(&k.name) {
            return Err(format!(
                "service key {}/{} is not two DNS labels",
                k.namespace, k.name
            ));
        }
        Ok(ServiceKey::new(&k.namespace, &k.name))
    }
}

/// A message's service key, which must be there.
pub fn service_key(k: Option<pbc::ServiceKey>) -> Result<ServiceKey, String> {
    k.ok_or_else(|| "service without a key".to_owned())?
        .try_into()
}

impl From<&TrustBundle> for pbc::TrustBundle {
    fn from(b: &TrustBundle) -> Self {
        pbc::TrustBundle {
            trust_domain: b.trust_domain.to_string(),
            roots_der: b.roots.iter().map(|r| r.as_ref().to_vec()).collect(),
            sequence: b.sequence,
            refresh_hint_seconds: BUNDLE_REFRESH_HINT_SECONDS,
        }
    }
}

impl TryFrom<pbc::TrustBundle> for TrustBundle {
    type Error = String;

    fn try_from(b: pbc::TrustBundle) -> Result<Self, String> {
        let td = TrustDomain::new(&b.trust_domain).map_err(|e| e.to_string())?;
        Ok(TrustBundle::new(
            td,
            b.roots_der.into_iter().map(CertificateDer::from).collect(),
            b.sequence,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_localities_round_trip_and_bad_keys_are_refused() {
        let k = ServiceKey::new("sample", "helloworld");
        assert_eq!(ServiceKey::try_from(pbc::ServiceKey::from(&k)), Ok(k));
        for (ns, name) in [
            ("", "a"),
            ("Sample", "a"),
            ("a", "b.c"),
            ("a", &"x".repeat(64)),
        ] {
            let bad = pbc::ServiceKey {
                namespace: ns.into(),
                name: name.to_string(),
            };
            assert!(ServiceKey::try_from(bad).is_err(), "{ns}/{name}");
        }
        assert!(service_key(None).is_err());
        let l = Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: "s".into(),
        };
        assert_eq!(locality(Some(pbc::Locality::from(&l))), l);
        assert_eq!(locality(None), Locality::default());
    }
}
