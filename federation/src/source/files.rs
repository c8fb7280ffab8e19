//! The `files` source: a directory of Kubernetes YAML (multi-document
//! files, any depth), watched for changes.
//!
//! A file that does not parse is reported with its path and line and
//! skipped; the objects it held before stay as they were, so a typo never
//! withdraws a service. Files and directories starting with `.` are
//! ignored, and so is the directory the files sink writes into
//! ([`crate::IMPORTS_DIR`]).
//!
//! Changes are noticed by polling file metadata every [`POLL_INTERVAL`]
//! (cheap: only changed files are read and parsed), and a full resync
//! (`Init`…`InitDone`) is sent every [`RESYNC_INTERVAL`].
//!
//! The embedded mode's endpoints live in 127.0.0.0/8, which a real API
//! server refuses in EndpointSlices ("may not be in the loopback range");
//! this source accepts them on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Event;
use crate::objects::{Kind, Object, ObjectKey, parse};

/// How often file metadata is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How often a full resync is sent.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// A problem with one file (or one document in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

/// Every manifest file under `dir` (`*.yaml`, `*.yml`, subdirectories
/// included; dot files and the imports directory left out), sorted.
pub fn manifest_paths(dir: &Path) -> Vec<PathBuf> {
    walk(dir).into_iter().map(|(p, _)| p).collect()
}

fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == crate::IMPORTS_DIR {
                continue;
            }
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                out.push((path, meta));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Parses every document of one file. All or nothing: any error rejects
/// the file (its previous objects stay).
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, FileError> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (start_line, doc) in split_documents(text) {
        if doc.trim().is_empty()
            || doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let value: serde_json::Value = serde_saphyr::from_str(doc).map_err(|e| {
            let (line, col) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let detail = e
                .to_string()
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim_start_matches([' ', '|', '^']).trim().to_owned())
                .unwrap_or_default();
            FileError {
                path: path.to_owned(),
                line: start_line + line.saturating_sub(1),
                message: format!("invalid YAML at column {col}: {detail}"),
            }
        })?;
        let err = |message: String| FileError {
            path: path.to_owned(),
            line: start_line,
            message,
        };
        if !value.is_object() {
            return Err(err(
                "document is not a Kubernetes object (a mapping with apiVersion and kind)".into(),
            ));
        }
        if let Some(o) = parse(&value).map_err(err)? {
            if !seen.insert(o.key.clone()) {
                return Err(err(format!("{} is defined twice in this file", o.key)));
            }
            out.push(o);
        }
    }
    Ok(out)
}

/// Splits on `---` lines; yields (first line number, text).
fn split_documents(text: &str) -> Vec<(u64, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1u64;
    let mut offset = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i as u64 + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// Watches a directory and sends [`Event`]s.
#[derive(Debug)]
pub struct FilesSource {
    dir: PathBuf,
    /// Last good objects of each file.
    files: BTreeMap<PathBuf, (Stamp, Vec<Arc<Object>>)>,
    /// Files that failed, with the stamp that failed (not re-reported
    /// until they change).
    failed: BTreeMap<PathBuf, Stamp>,
    /// Problems of the last scan, for status and tests.
    pub errors: Vec<FileError>,
}

impl FilesSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            failed: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    fn list(&self) -> Vec<(PathBuf, Stamp)> {
        walk(&self.dir)
            .into_iter()
            .map(|(path, meta)| {
                (
                    path,
                    Stamp {
                        modified: meta.modified().ok(),
                        len: meta.len(),
                    },
                )
            })
            .collect()
    }

    /// Scans the directory, reading only files whose size or mtime
    /// changed; returns the objects that changed (applied or deleted).
    pub fn scan(&mut self) -> (Vec<Arc<Object>>, Vec<ObjectKey>) {
        self.scan_with(false)
    }

    /// Like [`scan`](Self::scan), but re-reads every file: an edit that
    /// kept both size and mtime is caught at the next resync.
    pub fn rescan_all(&mut self) -> (Vec<Arc<Object>>, Vec<ObjectKey>) {
        self.scan_with(true)
    }

    fn scan_with(&mut self, force: bool) -> (Vec<Arc<Object>>, Vec<ObjectKey>) {
        let started = std::time::Instant::now();
        let listed = self.list();
        let present: BTreeSet<&PathBuf> = listed.iter().map(|(p, _)| p).collect();
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        self.failed.retain(|p, _| present.contains(p));
        self.errors.retain(|e| present.contains(&e.path));
        let mut parsed: Vec<(PathBuf, Stamp, Vec<Arc<Object>>)> = Vec::new();
        for (path, stamp) in listed {
            let unchanged = !force
                && (self.files.get(&path).is_some_and(|(s, _)| *s == stamp)
                    || self.failed.get(&path) == Some(&stamp));
            if unchanged {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "cannot read manifest (being written?)");
                    continue;
                }
            };
            self.errors.retain(|e| e.path != path);
            match parse_file(&path, &text) {
                Ok(objs) => {
                    self.failed.remove(&path);
                    parsed.push((path, stamp, objs.into_iter().map(Arc::new).collect()));
                }
                Err(e) => {
                    warn!(error = %e, "manifest skipped; the objects it held before are kept (fix the file and save it again)");
                    self.errors.push(e);
                    self.failed.insert(path, stamp);
                }
            }
        }
        // Nothing read, nothing removed: nothing changed. (This is every
        // poll of a quiet directory, so it must cost a listing only.)
        if removed.is_empty() && parsed.is_empty() {
            return (Vec::new(), Vec::new());
        }
        // Only objects in files that were removed or read again can have
        // changed; which file wins for those keys is computed before and
        // after over all files (a key may be defined in an untouched one).
        let mut touched: BTreeSet<ObjectKey> = BTreeSet::new();
        let old_of = |p: &PathBuf| self.files.get(p).into_iter().flat_map(|(_, objs)| objs);
        for o in removed.iter().flat_map(old_of) {
            touched.insert(o.key.clone());
        }
        for (path, _, objs) in &parsed {
            for o in old_of(path).chain(objs) {
                touched.insert(o.key.clone());
            }
        }
        let before = self.winners(&touched, false);
        for p in &removed {
            self.files.remove(p);
        }
        for (path, stamp, objs) in parsed {
            self.files.insert(path, (stamp, objs));
        }
        let after = self.winners(&touched, true);
        let applied: Vec<Arc<Object>> = after
            .iter()
            .filter(|(k, o)| before.get(*k) != Some(*o))
            .map(|(_, o)| o.clone())
            .collect();
        let deleted: Vec<ObjectKey> = before
            .into_keys()
            .filter(|k| !after.contains_key(k))
            .collect();
        debug!(dir = %self.dir.display(), took = ?started.elapsed(), changed = applied.len(), deleted = deleted.len(), "manifests read");
        (applied, deleted)
    }

    /// The object each of `keys` resolves to across all files (the later
    /// path wins), warning about keys defined twice when `warn_twice`.
    fn winners(
        &self,
        keys: &BTreeSet<ObjectKey>,
        warn_twice: bool,
    ) -> BTreeMap<ObjectKey, Arc<Object>> {
        let mut by_key: BTreeMap<ObjectKey, (&PathBuf, Arc<Object>)> = BTreeMap::new();
        for (path, (_, objs)) in &self.files {
            for o in objs.iter().filter(|o| keys.contains(&o.key)) {
                if let Some((other, _)) = by_key.insert(o.key.clone(), (path, o.clone()))
                    && warn_twice
                {
                    warn!(object = %o.key, first = %other.display(), second = %path.display(), "object defined in two files; the second wins");
                }
            }
        }
        by_key.into_iter().map(|(k, (_, o))| (k, o)).collect()
    }

    /// Every object currently held. When two files define the same object,
    /// the one in the later path wins (and a warning says so).
    pub fn objects(&self) -> Vec<Arc<Object>> {
        let mut by_key: BTreeMap<ObjectKey, (&PathBuf, Arc<Object>)> = BTreeMap::new();
        for (path, (_, objs)) in &self.files {
            for o in objs {
                if let Some((other, _)) = by_key.insert(o.key.clone(), (path, o.clone())) {
                    warn!(object = %o.key, first = %other.display(), second = %path.display(), "object defined in two files; the second wins");
                }
            }
        }
        by_key.into_values().map(|(_, o)| o).collect()
    }

    /// Runs until `tx` closes: a full list, then changes, with a full
    /// resync every [`RESYNC_INTERVAL`].
    pub async fn run(mut self, tx: mpsc::Sender<Event>) {
        let mut last_resync: Option<tokio::time::Instant> = None;
        loop {
            let resync = last_resync.is_none_or(|t| t.elapsed() >= RESYNC_INTERVAL);
            // Listing, reading and parsing (megabytes of YAML at 10,000
            // services) are blocking work: off the runtime's workers, which
            // carry the heartbeats of every peer session.
            let scanned = tokio::task::spawn_blocking(move || {
                let changes = if resync {
                    self.rescan_all()
                } else {
                    self.scan()
                };
                let all = if resync { self.objects() } else { Vec::new() };
                (self, changes, all)
            })
            .await;
            let (back, (applied, deleted), all) = match scanned {
                Ok(s) => s,
                // The runtime is shutting down: nothing to report.
                Err(e) if e.is_cancelled() => return,
                Err(_) => {
                    tracing::error!(
                        "the files source stopped: a scan of the manifests panicked (the last good state stays; restart the controller, and report the panic message above)"
                    );
                    return;
                }
            };
            self = back;
            if resync {
                last_resync = Some(tokio::time::Instant::now());
                // One list per kind, as a Kubernetes source's watchers
                // send them.
                let mut by_kind: BTreeMap<Kind, Vec<Arc<Object>>> = BTreeMap::new();
                for o in all {
                    by_kind.entry(o.key.kind).or_default().push(o);
                }
                for kind in Kind::ALL {
                    if tx.send(Event::Init(kind.into())).await.is_err() {
                        return;
                    }
                    for o in by_kind.remove(&kind).unwrap_or_default() {
                        if tx.send(Event::InitApply(o)).await.is_err() {
                            return;
                        }
                    }
                    if tx.send(Event::InitDone(kind.into())).await.is_err() {
                        return;
                    }
                }
            } else {
                for o in applied {
                    if tx.send(Event::Apply(o)).await.is_err() {
                        return;
                    }
                }
                for k in deleted {
                    if tx.send(Event::Delete(k)).await.is_err() {
                        return;
                    }
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_with_line_numbers() {
        let text = "a: 1\n---\nb: 2\nc: 3\n--- # comment\nd: 4\n";
        let docs = split_documents(text);
        assert_eq!(docs.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [1, 3, 6]);
        assert_eq!(docs[1].1, "b: 2\nc: 3\n");
    }
}
