//! `isthmus ca` writes PEM files that stock tools accept. Runs the built
//! binary and checks its output with `openssl`.

use std::path::Path;
use std::process::{Command, Output};

fn isthmus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(args)
        .output()
        .expect("run isthmus")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "isthmus failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl`, or `None` after saying loudly that the checks are skipped.
/// Under CI (`CI` set) a missing openssl is a failure: `.ci/run` installs it.
fn openssl() -> Option<&'static str> {
    if Command::new("openssl").arg("version").output().is_ok() {
        return Some("openssl");
    }
    if std::env::var_os("CI").is_some() {
        panic!("openssl is not installed but CI is set: .ci/run must install it");
    }
    eprintln!(
        "\n*** SKIPPED: openssl not found; the PEM files were not checked with openssl ***\n"
    );
    None
}

fn openssl_verify(dir: &Path, leaf_dir: &Path) -> String {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("root-cert.pem"))
        .arg("-untrusted")
        .arg(dir.join("east/ca-cert.pem"))
        .arg(leaf_dir.join("cert.pem"))
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn ca_files_verify_with_openssl() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let printed = ok(isthmus(&[
        "ca",
        "init",
        "--trust-domain",
        "east.isthmus.local",
        "--out",
        &s(root),
    ]));
    assert!(printed.contains("sha256 "), "{printed}");
    ok(isthmus(&[
        "ca",
        "cluster",
        "east",
        "--ca",
        &s(root),
        "--out",
        &s(&root.join("east")),
    ]));
    let leaf = root.join("app");
    ok(isthmus(&[
        "ca",
        "issue",
        "--spiffe-id",
        "spiffe://east.isthmus.local/ns/default/sa/app",
        "--ca",
        &s(&root.join("east")),
        "--out",
        &s(&leaf),
    ]));
    for f in ["cert.pem", "key.pem", "cert-chain.pem", "root-cert.pem"] {
        assert!(leaf.join(f).exists(), "{f} missing");
    }

    let Some(openssl) = openssl() else { return };
    let verdict = openssl_verify(root, &leaf);
    assert!(verdict.contains(": OK"), "openssl verify: {verdict}");

    // The leaf carries the SPIFFE ID and both TLS key usages, and
    // openssl parses the private key as matching.
    let text = Command::new(openssl)
        .args(["x509", "-noout", "-text", "-in"])
        .arg(leaf.join("cert.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("URI:spiffe://east.isthmus.local/ns/default/sa/app"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication")
            && text.contains("TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    let pubkey = |args: &[&str], file: &Path| {
        let out = Command::new(openssl).args(args).arg(file).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        pubkey(
            &["x509", "-noout", "-pubkey", "-in"],
            &leaf.join("cert.pem")
        ),
        pubkey(&["pkey", "-pubout", "-in"], &leaf.join("key.pem")),
    );

    // A CSR made by openssl (the key never leaves its owner): signed, and
    // no key.pem is written.
    let csr_dir = root.join("csr");
    std::fs::create_dir_all(&csr_dir).unwrap();
    let st = Command::new(openssl)
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/O=east",
            "-keyout",
        ])
        .arg(csr_dir.join("own-key.pem"))
        .arg("-out")
        .arg(csr_dir.join("req.csr"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let from_csr = root.join("from-csr");
    ok(isthmus(&[
        "ca",
        "issue",
        "--spiffe-id",
        "spiffe://east.isthmus.local/ns/default/sa/owner",
        "--ca",
        &s(&root.join("east")),
        "--out",
        &s(&from_csr),
        "--csr",
        &s(&csr_dir.join("req.csr")),
    ]));
    assert!(!from_csr.join("key.pem").exists());
    let verdict = openssl_verify(root, &from_csr);
    assert!(verdict.contains(": OK"), "openssl verify (CSR): {verdict}");
}

#[test]
fn ca_refuses_with_a_message_that_names_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_str().unwrap().to_owned();
    ok(isthmus(&[
        "ca",
        "init",
        "--trust-domain",
        "east.local",
        "--out",
        &root,
    ]));

    // Never overwrite a CA key.
    let out = isthmus(&["ca", "init", "--trust-domain", "east.local", "--out", &root]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root-key.pem already exists"), "{err}");

    // A gateway identity for another cluster is not issued.
    let east = format!("{root}/east");
    ok(isthmus(&[
        "ca", "cluster", "east", "--ca", &root, "--out", &east,
    ]));
    let out = isthmus(&[
        "ca",
        "issue",
        "--spiffe-id",
        "spiffe://east.local/cluster/west/gateway",
        "--ca",
        &east,
        "--out",
        &format!("{root}/gw"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bound to cluster \"west\"") && err.contains("CA of cluster \"east\""),
        "{err}"
    );

    // A missing CA directory says what to run.
    let out = isthmus(&[
        "ca",
        "cluster",
        "west",
        "--ca",
        "/nonexistent/ca",
        "--out",
        &format!("{root}/w"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/ca/root-cert.pem") && err.contains("isthmus ca init"),
        "{err}"
    );

    // A malformed SPIFFE ID is rejected by argument parsing.
    let out = isthmus(&[
        "ca",
        "issue",
        "--spiffe-id",
        "spiffe://east.local/ns/../x",
        "--ca",
        &east,
        "--out",
        &root,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("segments must be non-empty"));
}
