//! The real kube-rs client against the stand-in: the protocol details a
//! controller depends on (watch resume, bookmarks, 410 Gone, pagination,
//! server-side apply, the status subresource, TokenReview, faults).

use std::time::Duration;

use futures::StreamExt as _;
use isthmus_kube_standin::{ApiServer, TokenInfo};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

async fn client(api: &ApiServer) -> kube::Client {
    let config = kube::Config::new(api.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn svc(name: &str, port: u16) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
           "spec": {"ports": [{"name": "http", "port": port}]}})
}

async fn next_event(
    s: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Service>>> + Unpin),
) -> WatchEvent<Service> {
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("an event within 5s")
        .expect("the stream is open")
        .expect("a decodable event")
}

#[tokio::test]
async fn list_pages_and_watch_resumes_from_a_resource_version() {
    let api = ApiServer::start().await.unwrap();
    let c = client(&api).await;
    let svcs: Api<Service> = Api::namespaced(c, "default");
    for i in 0..5 {
        api.put(svc(&format!("s{i}"), 80)).unwrap();
    }
    // Pages of two, with continue tokens: every object once.
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let rv = loop {
        let page = svcs.list(&lp).await.unwrap();
        names.extend(page.items.iter().map(|s| s.metadata.name.clone().unwrap()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break page.metadata.resource_version.unwrap(),
        }
    };
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);

    // Changes after the list, then a watch from the list's version sees
    // exactly them, in order.
    api.put(svc("s1", 81)).unwrap();
    assert!(api.remove("services", "default", "s2"));
    let mut w = svcs
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut w).await {
        WatchEvent::Modified(s) => {
            assert_eq!(s.metadata.name.as_deref(), Some("s1"));
            assert_eq!(s.spec.unwrap().ports.unwrap()[0].port, 81);
        }
        e => panic!("{e:?}"),
    }
    match next_event(&mut w).await {
        WatchEvent::Deleted(s) => assert_eq!(s.metadata.name.as_deref(), Some("s2")),
        e => panic!("{e:?}"),
    }
    // Live changes follow; a label selector filters them.
    let mut only_s3 = svcs
        .watch(
            &WatchParams::default().labels("app=s3"),
            &api.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    api.put(svc("s4", 90)).unwrap();
    api.put(svc("s3", 90)).unwrap();
    assert!(
        matches!(next_event(&mut w).await, WatchEvent::Modified(s) if s.metadata.name.as_deref() == Some("s4"))
    );
    assert!(
        matches!(next_event(&mut only_s3).await, WatchEvent::Modified(s) if s.metadata.name.as_deref() == Some("s3"))
    );
}

#[tokio::test]
async fn a_compacted_version_is_410_gone_and_bookmarks_carry_progress() {
    let api = ApiServer::builder()
        .bookmark_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let svcs: Api<Service> = Api::namespaced(client(&api).await, "default");
    api.put(svc("a", 80)).unwrap();
    let old = api.resource_version().to_string();
    api.put(svc("b", 80)).unwrap();
    api.compact();
    let mut w = svcs
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut w).await {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        e => panic!("expected 410 Gone, got {e:?}"),
    }
    // From now, with bookmarks: one arrives with the current version.
    let now = api.resource_version().to_string();
    api.put(svc("c", 80)).unwrap();
    let mut w = svcs
        .watch(
            &WatchParams {
                bookmarks: true,
                ..Default::default()
            },
            &now,
        )
        .await
        .unwrap()
        .boxed();
    assert!(matches!(next_event(&mut w).await, WatchEvent::Added(_)));
    match next_event(&mut w).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(
                b.metadata.resource_version,
                api.resource_version().to_string()
            )
        }
        e => panic!("expected a bookmark, got {e:?}"),
    }
    // A cut watch ends cleanly; the client resumes where it was.
    api.cut_watches();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn server_side_apply_owns_fields_and_status_is_a_subresource() {
    let api = ApiServer::start().await.unwrap();
    let svcs: Api<Service> = Api::namespaced(client(&api).await, "default");
    let pp = PatchParams::apply("one");
    let s = svcs
        .patch("web", &pp, &Patch::Apply(svc("web", 80)))
        .await
        .unwrap();
    assert_eq!(s.metadata.generation, Some(1));
    // The same apply again writes nothing.
    let rv = s.metadata.resource_version.clone();
    let again = svcs
        .patch("web", &pp, &Patch::Apply(svc("web", 80)))
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version, rv);
    // Another manager's different value: 409 naming the field...
    let err = svcs
        .patch(
            "web",
            &PatchParams::apply("two"),
            &Patch::Apply(svc("web", 81)),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert!(
                s.message.contains("conflict with \"one\"") && s.message.contains(".spec.ports"),
                "{}",
                s.message
            );
        }
        e => panic!("{e:?}"),
    }
    // ...forced, it takes the field; "one" dropping its label removes it.
    svcs.patch(
        "web",
        &PatchParams::apply("two").force(),
        &Patch::Apply(svc("web", 81)),
    )
    .await
    .unwrap();
    let mut without_label = svc("web", 81);
    without_label["metadata"]["labels"] = json!({});
    let s = svcs
        .patch("web", &pp, &Patch::Apply(without_label))
        .await
        .unwrap();
    assert_eq!(s.metadata.generation, Some(2));
    // "two" applied the label too, so it stays.
    assert_eq!(s.metadata.labels.unwrap()["app"], "web");

    // Status: written through /status only; the spec write keeps it.
    let st = svcs
        .patch_status(
            "web",
            &PatchParams::apply("status-writer"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service",
                                 "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}})),
        )
        .await
        .unwrap();
    assert!(st.status.is_some());
    assert_eq!(
        st.metadata.generation,
        Some(2),
        "status does not bump generation"
    );
    let s = svcs
        .patch(
            "web",
            &PatchParams::apply("two"),
            &Patch::Apply(json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"ports": [{"name": "http", "port": 81}]},
            "status": {"loadBalancer": {}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        s.status
            .clone()
            .unwrap()
            .load_balancer
            .unwrap()
            .ingress
            .unwrap()[0]
            .ip
            .as_deref(),
        Some("10.0.0.1")
    );
    // Optimistic concurrency on replace.
    let mut stale = s.clone();
    stale.metadata.resource_version = Some("1".into());
    let err = svcs
        .replace("web", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
}

#[tokio::test]
async fn token_review_and_injected_faults() {
    let api = ApiServer::start().await.unwrap();
    api.add_token(
        "sa-token",
        TokenInfo {
            username: "system:serviceaccount:sample:web".into(),
            uid: "u1".into(),
            groups: vec!["system:serviceaccounts".into()],
            audiences: vec!["isthmus-ca".into()],
        },
    );
    let c = client(&api).await;
    let reviews: Api<k8s_openapi::api::authentication::v1::TokenReview> = Api::all(c.clone());
    let review = |token: &str, aud: &str| {
        serde_json::from_value::<k8s_openapi::api::authentication::v1::TokenReview>(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {}, "spec": {"token": token, "audiences": [aud]}}))
        .unwrap()
    };
    let ok = reviews
        .create(&PostParams::default(), &review("sa-token", "isthmus-ca"))
        .await
        .unwrap();
    let status = ok.status.unwrap();
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(
        status.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:sample:web")
    );
    for (token, aud) in [("sa-token", "other"), ("forged", "isthmus-ca")] {
        let no = reviews
            .create(&PostParams::default(), &review(token, aud))
            .await
            .unwrap();
        assert_eq!(
            no.status.unwrap().authenticated,
            Some(false),
            "{token} {aud}"
        );
    }

    let svcs: Api<Service> = Api::namespaced(c, "default");
    // 429 with Retry-After: kube-rs waits and retries by itself.
    api.fail_next(1, 429);
    let before = api.requests("list", "services");
    assert!(svcs.list(&ListParams::default()).await.is_ok());
    assert_eq!(api.requests("list", "services"), before + 2);
    api.fail_next(1, 500);
    let err = svcs.list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 500));
    assert!(
        svcs.list(&ListParams::default()).await.is_ok(),
        "one failure only"
    );
    api.deny("list", "services");
    match svcs.list(&ListParams::default()).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403);
            assert!(
                s.message.contains("cannot list resource \"services\""),
                "{}",
                s.message
            );
        }
        e => panic!("{e:?}"),
    }
    // An outage: connections refused, then served again with the objects.
    api.allow_all();
    api.put(svc("kept", 80)).unwrap();
    api.stop().await;
    assert!(svcs.get("kept").await.is_err());
    api.resume().await.unwrap();
    let names: Vec<String> = svcs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.metadata.name.unwrap())
        .collect();
    assert_eq!(names, ["kept"]);
}
