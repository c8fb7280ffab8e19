//! The per-cluster federation controller (`isthmus controller`).
//!
//! Built so far: the configuration schema, the objects it reads, and the
//! `files` source behind the watch-style source interface. Export,
//! peering, the federation protocol, import and the config stream come
//! next (see docs/architecture.md).

pub mod app;
pub mod casvc;
pub mod catalog;
pub mod config;
pub mod configstream;
pub mod controller;
pub mod import;
pub mod link;
pub mod objects;
pub mod peer;
pub mod source;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;

/// Directory (under a cluster's manifest directory) where the files sink
/// writes imported ServiceEntries; the files source never reads it.
pub const IMPORTS_DIR: &str = "isthmus-imports";
