//! `kind: Proxy` configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use isthmus_core::config::{
    AdminSection, ClusterSection, FieldError, FromConfig, Reader, check_kind,
};

/// Default outbound listener (HTTP forward proxy, h2c).
pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
/// Default inbound listener (mTLS, plaintext when PERMISSIVE).
pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15006";

/// Default life of workload certificates (the controller's CA signs at
/// most this).
pub const DEFAULT_CERTIFICATE_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The workload a sidecar stands beside.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadSection {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The local application's address.
    pub app: SocketAddr,
    /// The pod's labels (PeerAuthentication / AuthorizationPolicy
    /// selectors match them).
    pub labels: BTreeMap<String, String>,
    /// The workload's zone inside the cluster's region (locality
    /// preference); empty: the cluster's.
    pub zone: String,
}

/// The sidecar's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProxyConfig {
    pub cluster: ClusterSection,
    pub workload: WorkloadSection,
    /// The local controller (IP:port, 15010): config stream and CA.
    pub controller: String,
    /// The token for the controller's CA service: a bootstrap token
    /// (files mode), or in Kubernetes the pod's projected ServiceAccount
    /// token with audience `isthmus-ca`. Re-read at every renewal (the
    /// kubelet rotates projected tokens in place).
    pub token_file: Option<PathBuf>,
    /// This cluster's root certificate (PEM), to check the controller
    /// before sending it the token (Istio mounts it as
    /// `istio-ca-root-cert`).
    pub ca_root: Option<PathBuf>,
    /// The local east-west gateway (IP:port or name:port, tcp/15443): the
    /// remote tier. A name (the gateway's Service) is resolved at start.
    pub gateway: Option<String>,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    /// Transparent outbound listener (iptables REDIRECT target; the
    /// original destination is read with SO_ORIGINAL_DST).
    pub transparent_addr: Option<SocketAddr>,
    /// JSON access log on stdout.
    pub access_log: bool,
    /// Life of the workload certificate (renewed at about half of it).
    pub certificate_ttl: std::time::Duration,
    pub admin: AdminSection,
}

impl FromConfig for ProxyConfig {
    fn read(r: &Reader<'_>) -> Option<Self> {
        check_kind(r, "Proxy");
        let cluster = r.section::<ClusterSection>("cluster");
        let w = r.object("workload");
        // Read every field before combining, so all missing ones report.
        let (name, namespace, service_account, app) = (
            w.required("name"),
            w.required("namespace"),
            w.required("serviceAccount"),
            w.required("app"),
        );
        let labels = w.or("labels", BTreeMap::new());
        let zone = w.or("zone", String::new());
        // No early return: the fields below are read (and checked) too.
        let workload = match (name, namespace, service_account, app) {
            (Some(name), Some(namespace), Some(service_account), Some(app)) => {
                Some(WorkloadSection {
                    name,
                    namespace,
                    service_account,
                    app,
                    labels,
                    zone,
                })
            }
            _ => None,
        };
        w.finish();
        let controller = r.required("controller");
        let token_file = r.optional("tokenFile");
        let ca_root = r.optional("caRoot");
        let gateway: Option<String> = r.optional("gateway");
        if let Some(g) = &gateway
            && g.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            r.error(
                "gateway",
                format!("{g:?} is not host:port"),
                "write the local gateway's address, e.g. 10.0.0.20:15443 or isthmus-gateway.isthmus-system.svc:15443",
            );
        }
        let access_log = r.or("accessLog", true);
        let certificate_ttl = r.or("certificateTtl", DEFAULT_CERTIFICATE_TTL);
        let listen = r.object("listen");
        let outbound_addr = listen.or("outbound", DEFAULT_OUTBOUND_ADDR.parse().expect("default"));
        let inbound_addr = listen.or("inbound", DEFAULT_INBOUND_ADDR.parse().expect("default"));
        let transparent_addr = listen.optional("transparent");
        listen.finish();
        let admin = r.section::<AdminSection>("admin");
        Some(Self {
            cluster: cluster?,
            workload: workload?,
            controller: controller?,
            token_file,
            ca_root,
            gateway,
            outbound_addr,
            inbound_addr,
            transparent_addr,
            access_log,
            certificate_ttl,
            admin: admin?,
        })
    }

    fn validate(&self, errors: &mut Vec<FieldError>) {
        if self.outbound_addr == self.inbound_addr {
            errors.push(FieldError {
                path: "listen.inbound".into(),
                message: "inbound and outbound listen on the same address".into(),
                fix: "use 15001 for outbound and 15006 for inbound".into(),
            });
        }
        if self.certificate_ttl < std::time::Duration::from_secs(2)
            || self.certificate_ttl > DEFAULT_CERTIFICATE_TTL
        {
            errors.push(FieldError {
                path: "certificateTtl".into(),
                message: format!("{:?} is outside 2s..24h", self.certificate_ttl),
                fix: "use e.g. 1h (the CA signs at most 24h)".into(),
            });
        }
        if self.workload.app == self.inbound_addr {
            errors.push(FieldError {
                path: "workload.app".into(),
                message: "the app's address is the sidecar's inbound listener".into(),
                fix: "point workload.app at the application's own port".into(),
            });
        }
    }
}
