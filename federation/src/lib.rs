//! The per-cluster federation controller (`isthmus controller`).
//!
//! Built so far: the configuration schema, the objects it reads, and the
//! `files` source behind the watch-style source interface. Export,
//! peering, the federation protocol, import and the config stream come
//! next (see docs/architecture.md).

pub mod catalog;
pub mod config;
pub mod import;
pub mod objects;
pub mod source;

/// Directory (under a cluster's manifest directory) where the files sink
/// writes imported ServiceEntries; the files source never reads it.
pub const IMPORTS_DIR: &str = "isthmus-imports";
