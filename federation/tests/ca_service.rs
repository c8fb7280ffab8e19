//! The CA service on the controller's local port, through the same
//! `RotatingCert` path a sidecar or gateway uses.

use std::time::Duration;

use isthmus_core::caclient::RemoteSigner;
use isthmus_core::identity::verify::{Expect, Usage};
use isthmus_core::identity::{RotatingCert, SpiffeId, TrustStore};
use isthmus_federation::catalog::ExportPolicy;
use isthmus_federation::testing::TestCluster;
use rustls_pki_types::UnixTime;

const APP_TOKEN: &str = "app-token-0123456789abcdef";
const GW_TOKEN: &str = "gw-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_get_certificates_only_for_the_identity_their_token_proves() {
    let root = tempfile::tempdir().unwrap();
    let east = TestCluster::new(root.path(), "east", "us-east1");
    let west = TestCluster::new(root.path(), "west", "us-west1");
    let tokens = root.path().join("ca-tokens");
    std::fs::write(
        &tokens,
        format!("# bootstrap tokens\n{APP_TOKEN} sample/app\n{GW_TOKEN} gateway\n"),
    )
    .unwrap();
    let mut cfg = east.config(
        &[(&west, ExportPolicy::default())],
        Duration::from_secs(1),
        Duration::from_secs(300),
    );
    cfg.ca_tokens = Some(tokens);
    let e = east.start(cfg, &[west.bundle()]).await;
    let provider = isthmus_core::tls::provider();
    let signer = |token: &str| RemoteSigner {
        addr: e.local_addr,
        token: token.into(),
        tls: east.local_tls(None),
    };
    let app = SpiffeId::workload(&east.domain.td, "sample", "app").unwrap();

    // The right token: a certificate that verifies against east's root.
    let cert = RotatingCert::issue(
        app.clone(),
        &signer(APP_TOKEN),
        Duration::from_secs(3600),
        provider.clone(),
    )
    .await
    .unwrap();
    let ck = cert.certified_key();
    let store = TrustStore::with_bundles([east.bundle()]).unwrap();
    let id = store
        .verify_peer(
            &ck.cert[0],
            &ck.cert[1..],
            UnixTime::now(),
            Usage::Client,
            &provider.signature_verification_algorithms,
            &Expect::AnyTrusted,
        )
        .unwrap();
    assert_eq!(id, app);

    // A sidecar that does not find its own cluster's controller at the
    // address (here it expects west's) sends no token at all.
    let wrong = RemoteSigner {
        addr: e.local_addr,
        token: APP_TOKEN.into(),
        tls: west.local_tls(None),
    };
    let err = RotatingCert::issue(
        app.clone(),
        &wrong,
        Duration::from_secs(3600),
        provider.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("cannot reach the CA service")
            || err.to_string().contains("Unavailable"),
        "{err}"
    );

    // The gateway's token gives the cluster-bound gateway identity.
    let gw = SpiffeId::gateway(&east.domain.td, "east").unwrap();
    RotatingCert::issue(
        gw,
        &signer(GW_TOKEN),
        Duration::from_secs(3600),
        provider.clone(),
    )
    .await
    .unwrap();

    // App's token cannot get an admin certificate...
    let admin = SpiffeId::workload(&east.domain.td, "sample", "admin").unwrap();
    let err = RotatingCert::issue(
        admin.clone(),
        &signer(APP_TOKEN),
        Duration::from_secs(3600),
        provider.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("PermissionDenied")
            && err.to_string().contains("authorised only as"),
        "{err}"
    );
    // ...and an unknown token gets nothing.
    let err = RotatingCert::issue(
        admin,
        &signer("not-a-token-at-all-xxxx"),
        Duration::from_secs(3600),
        provider,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("Unauthenticated"), "{err}");
}
