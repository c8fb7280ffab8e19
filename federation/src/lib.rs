//! The per-cluster federation controller (`isthmus controller`).
//!
//! This crate holds the controller's configuration schema today; sources,
//! export, peering, the federation protocol, import and the config stream
//! are built on it by the Federation issue.

pub mod config;
