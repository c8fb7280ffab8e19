//! The east-west gateway (`isthmus gateway`).
//!
//! This crate holds the gateway's configuration schema today; the SNI
//! listener, QUIC tunnels and failover are built on it by the East-west
//! gateway issue.

pub mod config;
