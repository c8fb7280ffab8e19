//! The files sink: ServiceEntries as YAML files under
//! `<cluster dir>/isthmus-imports/` (the embedded demo's and the tests'
//! cluster).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::service_entry::{MANAGED_BY, Seed, read_back, service_entry, service_entry_name};
use super::{Sink, SinkError, SinkReport};
use crate::import::Imports;

/// Writes ServiceEntries as YAML files under `<cluster dir>/isthmus-imports/`.
///
/// Files are compared with what this sink last wrote (kept in memory, so
/// a pass over 10,000 services reads nothing back) and with the file on
/// disk the first time. Writes are atomic renames without fsync: readers
/// never see half a file, and a crash only loses what the next run
/// rewrites anyway.
#[derive(Debug)]
pub struct FilesSink {
    dir: PathBuf,
    /// The local gateway, every imported endpoint's address.
    gateway: SocketAddr,
    written: std::sync::Mutex<BTreeMap<String, String>>,
}

impl FilesSink {
    pub fn new(cluster_dir: &Path, gateway: SocketAddr) -> Self {
        Self {
            dir: cluster_dir.join(crate::IMPORTS_DIR),
            gateway,
            written: Default::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the directory hold exactly `entries`: each written atomically
    /// and only if its content changed; files Isthmus wrote for services
    /// no longer imported are deleted (files without the ownership label
    /// are never touched).
    pub fn apply(&self, entries: &[serde_json::Value]) -> std::io::Result<SinkReport> {
        std::fs::create_dir_all(&self.dir)?;
        let mut report = SinkReport::default();
        let mut wanted = BTreeSet::new();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        for e in entries {
            let (file, text) = render(e)?;
            let path = self.dir.join(&file);
            wanted.insert(file.clone());
            let same = match written.get(&file) {
                Some(prev) => *prev == text,
                None => std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()),
            };
            if same {
                written.insert(file, text);
                report.unchanged += 1;
                continue;
            }
            isthmus_core::identity::write_atomic_with(&path, text.as_bytes(), false, false)?;
            written.insert(file.clone(), text);
            report.written.push(file);
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if wanted.contains(&file) || !file.ends_with(".yaml") {
                continue;
            }
            let owned = std::fs::read_to_string(entry.path())
                .map(|t| t.contains(&format!("{}: {}", MANAGED_BY.0, MANAGED_BY.1)))
                .unwrap_or(false);
            if owned {
                std::fs::remove_file(entry.path())?;
                written.remove(&file);
                report.deleted.push(file);
            }
        }
        Ok(report)
    }

    /// The incremental pass after a full [`apply`](Self::apply): writes
    /// `upserts` whose text changed and deletes the entries of `removed`
    /// (namespace, ServiceEntry name) that this sink wrote. Costs what
    /// changed, not what exists: one service moving among 10,000 renders
    /// and writes one file.
    pub fn update(
        &self,
        upserts: &[serde_json::Value],
        removed: &[(String, String)],
    ) -> std::io::Result<SinkReport> {
        std::fs::create_dir_all(&self.dir)?;
        let mut report = SinkReport::default();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        for e in upserts {
            let (file, text) = render(e)?;
            if written.get(&file) == Some(&text) {
                report.unchanged += 1;
                continue;
            }
            isthmus_core::identity::write_atomic_with(
                &self.dir.join(&file),
                text.as_bytes(),
                false,
                false,
            )?;
            written.insert(file.clone(), text);
            report.written.push(file);
        }
        for (ns, name) in removed {
            let file = file_name(ns, name);
            if !written.contains_key(&file) {
                continue;
            }
            // Forgotten only once gone: a failed delete is retried.
            match std::fs::remove_file(self.dir.join(&file)) {
                Ok(()) => report.deleted.push(file.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            written.remove(&file);
        }
        Ok(report)
    }
}

/// A ServiceEntry's file name and text.
fn render(e: &serde_json::Value) -> std::io::Result<(String, String)> {
    let ns = e["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = e["metadata"]["name"].as_str().unwrap_or("unnamed");
    let text = format!(
        "# Written by Isthmus; edits are overwritten. Delete the ServiceExport in the\n# exporting cluster to withdraw it.\n{}",
        serde_saphyr::to_string(e).map_err(std::io::Error::other)?
    );
    Ok((file_name(ns, name), text))
}

/// The file a ServiceEntry is written to.
fn file_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}.yaml")
}

fn io(dir: &Path) -> impl Fn(std::io::Error) -> SinkError + '_ {
    move |e| SinkError {
        target: dir.display().to_string(),
        hint: "check the directory is writable and the disk has space",
        source: Box::new(e),
    }
}

impl Sink for FilesSink {
    fn apply_all(&self, desired: &Imports) -> Result<SinkReport, SinkError> {
        let entries: Vec<serde_json::Value> = desired
            .services
            .values()
            .map(|s| service_entry(s, self.gateway))
            .collect();
        self.apply(&entries).map_err(io(&self.dir))
    }

    fn apply_change(&self, prev: &Imports, next: &Imports) -> Result<SinkReport, SinkError> {
        let upserts: Vec<serde_json::Value> = next
            .services
            .iter()
            .filter(|(k, s)| prev.services.get(*k) != Some(*s))
            .map(|(_, s)| service_entry(s, self.gateway))
            .collect();
        let removed: Vec<(String, String)> = prev
            .services
            .keys()
            .filter(|k| !next.services.contains_key(*k))
            .map(|k| (k.namespace.clone(), service_entry_name(k)))
            .collect();
        if upserts.is_empty() && removed.is_empty() {
            return Ok(SinkReport::default());
        }
        self.update(&upserts, &removed).map_err(io(&self.dir))
    }

    fn seed(&self) -> Seed {
        let mut out = Seed::new();
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in dir.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if !text.contains(&format!("{}: {}", MANAGED_BY.0, MANAGED_BY.1)) {
                continue;
            }
            if let Ok(se) = serde_saphyr::from_str::<serde_json::Value>(&text) {
                read_back(&se, &mut out);
            }
        }
        out
    }

    fn target(&self) -> String {
        self.dir.display().to_string()
    }
}
