//! End-to-end scenarios on the multi-cluster harness: every component a
//! real process of the built binary, on loopback ranges 127.0.N.0/24.

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use isthmus_e2e::{Client, Harness, demo_clusters};

/// Each scenario runs ~15 processes; on 2 cores they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NET: AtomicU8 = AtomicU8::new(40);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_isthmus"))
}

async fn three_clusters(dir: &Path) -> Harness {
    let base = NET.fetch_add(3, Ordering::Relaxed);
    let mut h = Harness::new(bin(), dir, demo_clusters(base)).unwrap();
    h.start_all(Duration::from_secs(30)).await.unwrap();
    h
}

const URL: &str = "http://helloworld.sample.svc.cluster.local:5000/hello";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_cluster_call_keeps_the_callers_identity() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let h = three_clusters(dir.path()).await;
    // eu runs one instance; from eu's client, local first.
    let mut c = Client::new(h.cluster("eu").client().outbound());
    let a = c.get(URL).await;
    assert_eq!(a.cluster(), Some("eu"), "{a:?}");
    // east has no v2: a clusterset name with subset routing is covered
    // elsewhere; here the clusterset host from east reaches every cluster.
    let mut c = Client::new(h.cluster("east").client().outbound());
    let a = c.get(URL).await;
    assert_eq!(a.cluster(), Some("east"), "{a:?}");
    assert!(
        a.body
            .contains("caller spiffe://east.local/ns/sample/sa/sleep"),
        "{a:?}"
    );
}
