//! Isthmus's shared crate: plumbing every binary uses (drain, signals,
//! readiness, admin/metrics/readiness servers, telemetry, config, backoff)
//! and the identity layer (SPIFFE IDs, CA hierarchy, trust bundles,
//! verifiers, rotation). No business logic of the controller, gateway or
//! sidecar lives here.

pub mod admin;
pub mod backoff;
pub mod boot;
pub mod caclient;
pub mod config;
pub mod drain;
pub mod identity;
pub mod meshconfig;
pub mod metrics;
pub mod model;
pub mod readiness;
pub mod signal;
pub mod telemetry;
pub mod tls;
pub mod wire;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
