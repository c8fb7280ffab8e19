//! Identity verification over real TLS 1.3 handshakes on loopback.
//!
//! Each refusal is checked twice: the handshake fails on the wire, and the
//! verifier names the reason an operator would need.

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::verify::{Expect, Usage, VerifyError};
use isthmus_core::identity::{SpiffeId, TrustStore};
use isthmus_core::testing::{TestDomain, leaf, resolver, tls_echo_server, tls_roundtrip};
use isthmus_core::tls;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(86400);

/// What the client's verifier says about a server presenting `chain`.
fn verdict(
    store: &TrustStore,
    chain: &[CertificateDer<'static>],
    expect: &Expect,
) -> Result<SpiffeId, VerifyError> {
    store.verify_peer(
        &chain[0],
        &chain[1..],
        UnixTime::now(),
        Usage::Server,
        &tls::provider().signature_verification_algorithms,
        expect,
    )
}

/// Serves `server_key` and connects a client that trusts `store` and
/// expects `expect`; returns the client's result.
async fn handshake(
    server_key: Arc<CertifiedKey>,
    store: Arc<TrustStore>,
    expect: Expect,
) -> Result<Vec<u8>, String> {
    let server_store = Arc::new(TrustStore::new());
    let server_cfg = tls::server_config(
        Arc::new(isthmus_core::identity::rotation::StaticCert(server_key)),
        server_store,
        None,
        &[],
    );
    let (addr, _results) = tls_echo_server(server_cfg).await;
    let client_cfg = tls::client_config(None, store, expect, &[]);
    tls_roundtrip(Arc::new(client_cfg), addr, b"ping").await
}

fn key_of(r: &Arc<isthmus_core::identity::rotation::StaticCert>) -> Arc<CertifiedKey> {
    r.0.clone()
}

#[tokio::test]
async fn valid_chain_is_accepted_and_identity_reaches_both_sides() {
    let east = TestDomain::new("east.local");
    let ca = east.cluster("east");
    let server_id = SpiffeId::workload(&east.td, "sample", "helloworld").unwrap();
    let client_id = SpiffeId::workload(&east.td, "sample", "sleep").unwrap();
    let store = TrustStore::with_bundles([east.bundle()]).unwrap();

    let server_cfg = tls::server_config(
        leaf(&ca, &server_id, DAY),
        store.clone(),
        Some(Expect::AnyTrusted),
        &[],
    );
    let (addr, mut results) = tls_echo_server(server_cfg).await;
    let client_cfg = tls::client_config(
        Some(leaf(&ca, &client_id, DAY)),
        store,
        Expect::Exactly(server_id.clone()),
        &[],
    );
    assert_eq!(
        tls_roundtrip(Arc::new(client_cfg), addr, b"hello")
            .await
            .unwrap(),
        b"hello"
    );
    // The server learned the client's verified identity.
    assert_eq!(results.recv().await.unwrap().unwrap(), Some(client_id));
}

#[tokio::test]
async fn chain_from_a_foreign_root_is_refused() {
    // The client trusts east.local's real root. An attacker with their own
    // root issues a certificate claiming the same trust domain.
    let east = TestDomain::new("east.local");
    let impostor = TestDomain::new("east.local");
    let id = SpiffeId::workload(&east.td, "sample", "helloworld").unwrap();
    let forged = leaf(&impostor.cluster("east"), &id, DAY);
    let store = TrustStore::with_bundles([east.bundle()]).unwrap();

    let chain = key_of(&forged).cert.clone();
    assert!(matches!(
        verdict(&store, &chain, &Expect::AnyTrusted),
        Err(VerifyError::Untrusted { .. })
    ));
    let err = handshake(key_of(&forged), store, Expect::AnyTrusted)
        .await
        .unwrap_err();
    assert!(
        err.contains("does not chain to a root of trust domain east.local"),
        "{err}"
    );

    // And an identity of a trust domain the store has never heard of.
    let other = TestDomain::new("other.local");
    let oid = SpiffeId::workload(&other.td, "a", "b").unwrap();
    let store = TrustStore::with_bundles([east.bundle()]).unwrap();
    let cert = leaf(&other.cluster("other"), &oid, DAY);
    let err = handshake(key_of(&cert), store, Expect::AnyTrusted)
        .await
        .unwrap_err();
    assert!(
        err.contains("no trust bundle for trust domain other.local"),
        "{err}"
    );
}

#[tokio::test]
async fn root_of_domain_a_cannot_vouch_for_domain_b() {
    // Both domains are trusted, but A's CA signs a leaf naming B.
    let a = TestDomain::new("a.local");
    let b = TestDomain::new("b.local");
    let ca_a = a.cluster("east");
    let now = OffsetDateTime::now_utc();
    let (chain, key) = ca_a
        .forge_leaf(
            &["spiffe://b.local/ns/prod/sa/payments"],
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let store = TrustStore::with_bundles([a.bundle(), b.bundle()]).unwrap();
    let err = verdict(&store, &chain, &Expect::AnyTrusted).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Untrusted { td, .. } if td.as_str() == "b.local"),
        "{err}"
    );
    let err = handshake(key_of(&resolver(chain, &key)), store, Expect::AnyTrusted)
        .await
        .unwrap_err();
    assert!(
        err.contains("does not chain to a root of trust domain b.local"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_and_not_yet_valid_leaves_are_refused() {
    let east = TestDomain::new("east.local");
    let ca = east.cluster("east");
    let store = TrustStore::with_bundles([east.bundle()]).unwrap();
    let now = OffsetDateTime::now_utc();
    let uri = ["spiffe://east.local/ns/sample/sa/helloworld"];

    let (chain, key) = ca
        .forge_leaf(
            &uri,
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
        .unwrap();
    assert!(matches!(
        verdict(&store, &chain, &Expect::AnyTrusted),
        Err(VerifyError::Expired { .. })
    ));
    let err = handshake(
        key_of(&resolver(chain, &key)),
        store.clone(),
        Expect::AnyTrusted,
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");

    let (chain, key) = ca
        .forge_leaf(
            &uri,
            now + time::Duration::hours(1),
            now + time::Duration::hours(2),
        )
        .unwrap();
    assert!(matches!(
        verdict(&store, &chain, &Expect::AnyTrusted),
        Err(VerifyError::NotYetValid { .. })
    ));
    let err = handshake(key_of(&resolver(chain, &key)), store, Expect::AnyTrusted)
        .await
        .unwrap_err();
    assert!(
        err.to_lowercase().contains("not valid yet") || err.contains("NotValidYet"),
        "{err}"
    );
}

#[tokio::test]
async fn malformed_san_sets_are_refused() {
    let east = TestDomain::new("east.local");
    let ca = east.cluster("east");
    let store = TrustStore::with_bundles([east.bundle()]).unwrap();
    let now = OffsetDateTime::now_utc();
    let (nb, na) = (
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );

    type Case<'a> = (&'a [&'a str], fn(&VerifyError) -> bool);
    let cases: [Case; 5] = [
        (
            &[
                "spiffe://east.local/ns/a/sa/b",
                "spiffe://east.local/ns/c/sa/d",
            ],
            |e| matches!(e, VerifyError::MultipleUriSans(2)),
        ),
        (&["spiffe://east.local/ns/../sa/b"], |e| {
            matches!(e, VerifyError::InvalidSpiffeId(_))
        }),
        (&["spiffe://East.Local/ns/a/sa/b"], |e| {
            matches!(e, VerifyError::InvalidSpiffeId(_))
        }),
        (&["spiffe://east.local/ns/a\0.evil/sa/b"], |e| {
            matches!(e, VerifyError::InvalidSpiffeId(_))
        }),
        (&[], |e| matches!(e, VerifyError::NoUriSan)),
    ];
    for (uris, expected) in cases {
        let (chain, key) = ca.forge_leaf(uris, nb, na).unwrap();
        let err = verdict(&store, &chain, &Expect::AnyTrusted).unwrap_err();
        assert!(expected(&err), "{uris:?}: unexpected reason {err}");
        let wire = handshake(
            key_of(&resolver(chain, &key)),
            store.clone(),
            Expect::AnyTrusted,
        )
        .await;
        assert!(wire.is_err(), "{uris:?} was accepted on the wire");
    }
}

#[tokio::test]
async fn gateway_certificate_is_accepted_only_as_the_cluster_it_names() {
    // One shared root (the special case the brief names), two clusters.
    let mesh = TestDomain::new("mesh.local");
    let east_ca = mesh.cluster("east");
    let west_ca = mesh.cluster("west");
    let store = TrustStore::with_bundles([mesh.bundle()]).unwrap();
    let west_gw = SpiffeId::gateway(&mesh.td, "west").unwrap();
    let east_gw = SpiffeId::gateway(&mesh.td, "east").unwrap();

    // West's real gateway, dialed as west: accepted.
    let real = leaf(&west_ca, &west_gw, DAY);
    assert_eq!(
        handshake(
            key_of(&real),
            store.clone(),
            Expect::Exactly(west_gw.clone())
        )
        .await
        .unwrap(),
        b"ping"
    );

    // East's gateway answering where west's was expected: refused.
    let east = leaf(&east_ca, &east_gw, DAY);
    let err = handshake(
        key_of(&east),
        store.clone(),
        Expect::Exactly(west_gw.clone()),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("but spiffe://mesh.local/cluster/west/gateway was expected"),
        "{err}"
    );

    // East's CA minting a "west gateway" certificate: the chain reaches the
    // shared root, but the issuer is not west's CA. Refused.
    let now = OffsetDateTime::now_utc();
    let (chain, key) = east_ca
        .forge_leaf(
            &[&west_gw.to_string()],
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let err = verdict(&store, &chain, &Expect::Exactly(west_gw.clone())).unwrap_err();
    assert!(
        matches!(&err, VerifyError::ClusterBinding { cluster, .. } if cluster == "west"),
        "{err}"
    );
    let err = handshake(
        key_of(&resolver(chain, &key)),
        store,
        Expect::Exactly(west_gw),
    )
    .await
    .unwrap_err();
    assert!(err.contains("not issued by that cluster's CA"), "{err}");
}

#[tokio::test]
async fn server_refuses_clients_outside_its_expectation() {
    let east = TestDomain::new("east.local");
    let ca = east.cluster("east");
    let store = TrustStore::with_bundles([east.bundle()]).unwrap();
    let server_id = SpiffeId::gateway(&east.td, "east").unwrap();
    let allowed = SpiffeId::gateway(&east.td, "east").unwrap();
    let set = Arc::new(std::sync::RwLock::new(std::collections::BTreeSet::from([
        allowed,
    ])));
    let server_cfg = tls::server_config(
        leaf(&ca, &server_id, DAY),
        store.clone(),
        Some(Expect::OneOf(set.clone())),
        &[],
    );
    let (addr, mut results) = tls_echo_server(server_cfg).await;

    let stranger = SpiffeId::workload(&east.td, "default", "stranger").unwrap();
    let client = tls::client_config(
        Some(leaf(&ca, &stranger, DAY)),
        store.clone(),
        Expect::AnyTrusted,
        &[],
    );
    let client = Arc::new(client);
    assert!(tls_roundtrip(client.clone(), addr, b"x").await.is_err());
    let server_side = results.recv().await.unwrap().unwrap_err();
    assert!(
        server_side.contains("spiffe://east.local/ns/default/sa/stranger"),
        "{server_side}"
    );

    // Allowed at run time (a peer was linked): the next handshake passes.
    set.write().unwrap().insert(stranger);
    assert_eq!(tls_roundtrip(client, addr, b"x").await.unwrap(), b"x");

    // No client certificate at all: refused.
    let anonymous = tls::client_config(None, store, Expect::AnyTrusted, &[]);
    assert!(
        tls_roundtrip(Arc::new(anonymous), addr, b"x")
            .await
            .is_err()
    );
}
