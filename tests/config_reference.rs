//! `docs/configuration.md` documents every field the components read:
//! the fields are found by reading the config kinds themselves
//! (`isthmus_core::config::field_paths`), so a new field without its
//! documentation fails here.

use std::collections::BTreeSet;

use isthmus_core::config::field_paths;

fn kinds() -> Vec<(&'static str, BTreeSet<String>)> {
    vec![
        (
            "Controller",
            field_paths::<isthmus_federation::config::ControllerConfig>(&[
                "source: {kube: {leaderElection: {}}}\npeers: [{exportTo: {}}]",
                "source: {files: /x}",
            ]),
        ),
        (
            "Gateway",
            field_paths::<isthmus_gateway::config::GatewayConfig>(&["{}"]),
        ),
        (
            "Proxy",
            field_paths::<isthmus_proxy::config::ProxyConfig>(&["{}"]),
        ),
    ]
}

/// The reference's section for `kind` (from `## Kind` to the next `## `).
fn section<'a>(doc: &'a str, kind: &str) -> &'a str {
    let start = doc
        .find(&format!("\n## {kind}\n"))
        .unwrap_or_else(|| panic!("docs/configuration.md has no `## {kind}` section"));
    let rest = &doc[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    &rest[..end]
}

#[test]
fn every_field_the_code_reads_is_documented() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .unwrap();
    let mut missing = Vec::new();
    for (kind, fields) in kinds() {
        assert!(fields.len() > 10, "{kind}: only {fields:?} found");
        let s = section(&doc, kind);
        for f in fields {
            if !s.contains(&format!("`{f}`")) {
                missing.push(format!("{kind}: `{f}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:#?}"
    );
}
