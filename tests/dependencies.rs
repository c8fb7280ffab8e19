//! Every dependency a workspace crate declares is used by it: an unused
//! one is build time and, in the binaries, code on every pod. The same
//! check as `cargo machete` (a name search), without installing it: the
//! crate's name as Rust spells it must appear in the sources of the part
//! that declares it (normal: `src/`; dev: `src/`, `tests/`, `benches/`;
//! build: `build.rs`). `[package.metadata.cargo-machete] ignored` lists
//! the exceptions, each with its reason in the Cargo.toml.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut String) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            out.push('\n');
        }
    }
}

fn uses(text: &str, ident: &str) -> bool {
    text.match_indices(ident).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + ident.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !word(before) && !word(after)
    })
}

#[test]
fn no_workspace_crate_declares_a_dependency_it_does_not_use() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut unused = Vec::new();
    for pkg in meta["packages"].as_array().unwrap() {
        let manifest = PathBuf::from(pkg["manifest_path"].as_str().unwrap());
        let root = manifest.parent().unwrap();
        let ignored: Vec<&str> = pkg["metadata"]["cargo-machete"]["ignored"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let (mut normal, mut dev, mut build) = (String::new(), String::new(), String::new());
        sources(&root.join("src"), &mut normal);
        dev.push_str(&normal);
        for d in ["tests", "benches", "examples"] {
            sources(&root.join(d), &mut dev);
        }
        build.push_str(&std::fs::read_to_string(root.join("build.rs")).unwrap_or_default());
        for dep in pkg["dependencies"].as_array().unwrap() {
            let name = dep["rename"].as_str().or(dep["name"].as_str()).unwrap();
            if ignored.contains(&name) {
                continue;
            }
            let ident = name.replace('-', "_");
            let text = match dep["kind"].as_str() {
                None => &normal,
                Some("dev") => &dev,
                Some("build") => &build,
                Some(other) => panic!("unknown dependency kind {other}"),
            };
            if !uses(text, &ident) {
                unused.push(format!(
                    "{} ({}): {name} [{}]",
                    pkg["name"].as_str().unwrap(),
                    manifest.display(),
                    dep["kind"].as_str().unwrap_or("normal")
                ));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "dependencies declared but not used (remove them, or list them under [package.metadata.cargo-machete] ignored with the reason):\n  {}",
        unused.join("\n  ")
    );
}
