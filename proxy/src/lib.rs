//! The sidecar proxy (`isthmus proxy`).
//!
//! This crate holds the sidecar's configuration schema today; routing,
//! mTLS and telemetry are built on it by the Sidecar proxy issue.

pub mod config;
