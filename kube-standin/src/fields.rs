//! Field ownership for server-side apply: which fields (leaf paths) an
//! object's managers own, the merge of an applied configuration, and the
//! `fieldsV1` encoding `managedFields` shows.
//!
//! Simplification (in the behaviour table): lists are atomic — a list is
//! one field owned whole, as for a CRD list without
//! `x-kubernetes-list-type: map` — and maps are granular.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// A field path: object keys from the root.
pub type Path = Vec<String>;

/// Which part of an object a write touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The object; `.status` is left out when it is a subresource.
    Main { status_subresource: bool },
    /// The `/status` subresource: `.status` only.
    Status,
}

impl Scope {
    fn includes(self, top: &str) -> bool {
        match (self, top) {
            (_, "apiVersion" | "kind") => false,
            (Scope::Status, t) => t == "status",
            (
                Scope::Main {
                    status_subresource: true,
                },
                "status",
            ) => false,
            (Scope::Main { .. }, _) => true,
        }
    }
}

/// The leaf fields `v` sets, within `scope`. Of `metadata`, only labels
/// and annotations are fields a manager owns.
pub fn leaves(v: &Value, scope: Scope) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    let Some(top) = v.as_object() else {
        return out;
    };
    for (k, child) in top {
        if !scope.includes(k) {
            continue;
        }
        if k == "metadata" {
            if matches!(scope, Scope::Status) {
                continue;
            }
            for m in ["labels", "annotations"] {
                if let Some(map) = child.get(m).and_then(Value::as_object) {
                    for key in map.keys() {
                        out.insert(vec!["metadata".into(), m.into(), key.clone()]);
                    }
                }
            }
            continue;
        }
        walk(child, &mut vec![k.clone()], &mut out);
    }
    out
}

fn walk(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
    match v.as_object() {
        Some(map) if !map.is_empty() => {
            for (k, child) in map {
                path.push(k.clone());
                walk(child, path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path`, if any.
pub fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// Removes the field at `path` (its parents stay).
pub fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(map) = cur.as_object_mut() {
        map.remove(last);
    }
}

/// Merges an applied configuration into `dst` within `scope`: maps key
/// by key, everything else (scalars, lists) replaced whole.
pub fn merge(dst: &mut Value, src: &Value, scope: Scope) {
    let (Some(dst_map), Some(src_map)) = (dst.as_object_mut(), src.as_object()) else {
        return;
    };
    for (k, v) in src_map {
        if !scope.includes(k) {
            continue;
        }
        if k == "metadata" {
            if matches!(scope, Scope::Status) {
                continue;
            }
            for m in ["labels", "annotations"] {
                if let Some(src_m) = v.get(m).and_then(Value::as_object) {
                    let meta = dst_map
                        .entry("metadata")
                        .or_insert_with(|| Value::Object(Map::new()));
                    let slot = meta
                        .as_object_mut()
                        .map(|mm| mm.entry(m).or_insert_with(|| Value::Object(Map::new())));
                    if let Some(Value::Object(dm)) = slot {
                        for (lk, lv) in src_m {
                            dm.insert(lk.clone(), lv.clone());
                        }
                    }
                }
            }
            continue;
        }
        merge_value(dst_map.entry(k.clone()).or_insert(Value::Null), v);
    }
}

fn merge_value(dst: &mut Value, src: &Value) {
    match (dst.as_object_mut(), src.as_object()) {
        (Some(d), Some(s)) if !s.is_empty() => {
            for (k, v) in s {
                merge_value(d.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ => *dst = src.clone(),
    }
}

/// The leaves whose value differs between `old` and `new` (set, changed
/// or removed), within `scope`.
pub fn changed(old: &Value, new: &Value, scope: Scope) -> BTreeSet<Path> {
    let (a, b) = (leaves(old, scope), leaves(new, scope));
    a.union(&b)
        .filter(|p| get(old, p) != get(new, p))
        .cloned()
        .collect()
}

/// `fieldsV1` as Kubernetes writes it: `{"f:spec": {"f:hosts": {}}}`.
pub fn to_fields_v1(set: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in set {
        let mut cur = &mut root;
        for k in p {
            let entry = cur
                .entry(format!("f:{k}"))
                .or_insert_with(|| Value::Object(Map::new()));
            cur = match entry {
                Value::Object(m) => m,
                _ => unreachable!("fieldsV1 entries are objects"),
            };
        }
    }
    Value::Object(root)
}

/// The paths a `fieldsV1` names (the inverse of [`to_fields_v1`]).
#[cfg(test)]
pub fn from_fields_v1(v: &Value) -> BTreeSet<Path> {
    fn go(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        let Some(map) = v.as_object() else { return };
        let children: Vec<_> = map
            .iter()
            .filter_map(|(k, c)| Some((k.strip_prefix("f:")?, c)))
            .collect();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, c) in children {
            path.push(k.to_owned());
            go(c, path, out);
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn leaves_of_an_applied_object_exclude_identity_and_a_status_subresource() {
        let v = json!({
            "apiVersion": "v1", "kind": "X",
            "metadata": {"name": "a", "labels": {"app": "web"}},
            "spec": {"hosts": ["h"], "ports": {"a": 1}, "empty": {}},
            "status": {"ok": true}
        });
        let got = leaves(
            &v,
            Scope::Main {
                status_subresource: true,
            },
        );
        let want: BTreeSet<Path> = [
            vec!["metadata", "labels", "app"],
            vec!["spec", "empty"],
            vec!["spec", "hosts"],
            vec!["spec", "ports", "a"],
        ]
        .into_iter()
        .map(|p| p.into_iter().map(String::from).collect())
        .collect();
        assert_eq!(got, want);
        assert_eq!(
            leaves(&v, Scope::Status),
            [vec!["status".to_owned(), "ok".to_owned()]].into()
        );
        assert_eq!(from_fields_v1(&to_fields_v1(&got)), got);
    }

    #[test]
    fn merge_is_granular_for_maps_and_whole_for_lists() {
        let mut live =
            json!({"metadata": {"name": "a"}, "spec": {"a": 1, "list": [1, 2], "m": {"x": 1}}});
        merge(
            &mut live,
            &json!({"metadata": {"name": "ignored", "labels": {"l": "v"}}, "spec": {"list": [3], "m": {"y": 2}}}),
            Scope::Main {
                status_subresource: true,
            },
        );
        assert_eq!(
            live,
            json!({"metadata": {"name": "a", "labels": {"l": "v"}}, "spec": {"a": 1, "list": [3], "m": {"x": 1, "y": 2}}})
        );
    }
}
