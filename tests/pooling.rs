//! Connection reuse: sequential calls ride a handful of pooled upstream connections.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade_devtools::mock::{self, MockServer, Script};
use common::*;

#[tokio::test]
async fn thousand_sequential_calls_open_a_handful_of_connections() {
    let mock = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!("providers:\n{}", openai("one", 1, &mock.url()));
    let mut router = start(&yaml).await;

    for i in 0..1000 {
        let p = format!("prompt {i}");
        let r = router.client.ask(prompt(&p)).await;
        assert_eq!(r.text, mock::reply(&p));
    }
    let s = mock.stats();
    assert_eq!(s.requests, 1000);
    assert!(
        s.connections <= 4,
        "{} upstream connections for 1000 calls",
        s.connections
    );
}

async fn tls_router(pool_idle: usize) -> (MockServer, RunningRouter, std::path::PathBuf) {
    let (mock, pem) = MockServer::bind_tls("127.0.0.1:0".parse().unwrap(), Script::default())
        .await
        .unwrap();
    let ca = std::env::temp_dir().join(format!(
        "cascade-ca-{}-{}.pem",
        std::process::id(),
        mock.addr().port()
    ));
    std::fs::write(&ca, pem).unwrap();
    let yaml = format!(
        "providers:\n  - name: tls\n    type: openai\n    base_url: \"https://localhost:{}/v1\"\n    models: [m]\n    http: {{ca_file: \"{}\", pool_max_idle_per_host: {pool_idle}}}\n",
        mock.addr().port(),
        ca.display()
    );
    let router = start(&yaml).await;
    (mock, router, ca)
}

#[tokio::test]
async fn tls_upstream_is_pooled_and_pooling_can_be_turned_off() {
    let (pooled, mut router, ca) = tls_router(64).await;
    for i in 0..50 {
        let r = router.client.ask(prompt(&format!("tls {i}"))).await;
        assert_eq!(r.text, mock::reply(&format!("tls {i}")));
    }
    assert_eq!(
        pooled.stats().connections,
        1,
        "one TLS connection reused for every call"
    );
    let _ = std::fs::remove_file(ca);

    let (unpooled, mut router, ca) = tls_router(0).await;
    for i in 0..10 {
        router
            .client
            .complete(prompt(&format!("tls {i}")))
            .await
            .unwrap();
    }
    assert_eq!(
        unpooled.stats().connections,
        10,
        "a new connection per call with the pool off"
    );
    let _ = std::fs::remove_file(ca);
}
