//! `kind: Proxy` configuration.

use std::net::SocketAddr;

use isthmus_core::config::{
    AdminSection, ClusterSection, FieldError, FromConfig, Reader, check_kind,
};

/// Default outbound listener (HTTP forward proxy, h2c, transparent).
pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
/// Default inbound listener (mTLS, plaintext when PERMISSIVE).
pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15006";

/// The workload a sidecar stands beside.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadSection {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The local application's address.
    pub app: SocketAddr,
}

/// The sidecar's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProxyConfig {
    pub cluster: ClusterSection,
    pub workload: WorkloadSection,
    /// The local controller (host:port, 15010).
    pub controller: String,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
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
        let workload = Some(WorkloadSection {
            name: name?,
            namespace: namespace?,
            service_account: service_account?,
            app: app?,
        });
        w.finish();
        let controller = r.required("controller");
        let listen = r.object("listen");
        let outbound_addr = listen.or("outbound", DEFAULT_OUTBOUND_ADDR.parse().expect("default"));
        let inbound_addr = listen.or("inbound", DEFAULT_INBOUND_ADDR.parse().expect("default"));
        listen.finish();
        let admin = r.section::<AdminSection>("admin");
        Some(Self {
            cluster: cluster?,
            workload: workload?,
            controller: controller?,
            outbound_addr,
            inbound_addr,
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
    }
}
