//! The Prometheus series add up after traffic: calls by method and code, cache hits and
//! misses, upstream failures by kind, circuit state, call durations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade_devtools::mock::{MockServer, Script};
use cascade_router::proto::v1;
use common::*;
use tonic::Code;

#[tokio::test]
async fn series_add_up_after_traffic() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let dead = refused_url().await;
    let router = start(&format!(
        "{}cache: {{}}\nproviders:\n{}{}",
        cascade(0, 1, 600.0),
        openai("dead", 1, &dead),
        openai("up", 2, &up.url())
    ))
    .await;
    let mut c = router.client.clone();
    let det = || v1::CompleteRequest {
        temperature: Some(0.0),
        ..prompt("same")
    };
    c.ask(det()).await;
    assert!(c.ask(det()).await.cached);
    c.ask(prompt("plain")).await;
    let bad = c.complete(prompt("")).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let m = |name: &str| metric(&router, name);
    assert_eq!(
        m(r#"cascade_requests_total{method="Complete",code="Ok"}"#),
        3.0
    );
    assert_eq!(
        m(r#"cascade_requests_total{method="Complete",code="InvalidArgument"}"#),
        1.0
    );
    assert_eq!(
        m(r#"cascade_request_duration_seconds_count{method="Complete"}"#),
        4.0,
        "every call timed"
    );
    assert_eq!(
        m("cascade_cache_hits_total") + m("cascade_cache_misses_total"),
        2.0,
        "hits + misses = cacheable requests"
    );
    assert_eq!(
        m(r#"cascade_upstream_failures_total{provider="dead",kind="connect"}"#),
        1.0,
        "the first call found dead down; its open circuit kept the rest away"
    );
    assert_eq!(m(r#"cascade_upstream_circuit_state{provider="dead"}"#), 2.0);
    assert_eq!(m(r#"cascade_upstream_circuit_state{provider="up"}"#), 0.0);
    assert_eq!(
        m(r#"cascade_upstream_requests_total{provider="up"}"#),
        up.stats().requests as f64
    );
    assert_eq!(
        m(r#"cascade_upstream_request_duration_seconds_count{provider="up"}"#),
        up.stats().requests as f64,
        "every upstream request timed"
    );
    assert_eq!(
        m(r#"cascade_upstream_request_duration_seconds_count{provider="dead"}"#),
        1.0
    );
    assert_eq!(
        m("cascade_router_overhead_seconds_count"),
        2.0,
        "the router's share measured for each answered uncached call"
    );
}

#[tokio::test]
async fn refused_keys_and_rate_limit_waits_are_counted() {
    let a = MockServer::start(Script::default()).await.unwrap();
    let b = MockServer::start(Script::default()).await.unwrap();
    let key = "sk-router-metrics-0123456789";
    let router = start_with_env(
        &format!(
            "server: {{auth: {{keys: [{{name: m, key: \"${{KEY}}\"}}]}}}}\nproviders:\n  - {{name: a, type: openai, priority: 1, base_url: \"{}/v1\", models: [m], rate_limit: {{requests_per_minute: 1, burst: 2}}}}\n{}",
            a.url(),
            openai("b", 2, &b.url())
        ),
        std::collections::HashMap::from([("KEY".to_string(), key.to_string())]),
    )
    .await;
    let mut c = router.client.clone();
    for _ in 0..3 {
        let e = c.complete(prompt("no key")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let calls = 6;
    for i in 0..calls {
        let mut r = tonic::Request::new(prompt(&format!("p{i}")));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        c.complete(r).await.unwrap();
    }
    let m = |name: &str| metric(&router, name);
    assert_eq!(m("cascade_unauthenticated_total"), 3.0);
    assert_eq!(
        m(r#"cascade_requests_total{method="Complete",code="Ok"}"#),
        calls as f64
    );
    assert_eq!(
        m(r#"cascade_upstream_rate_limit_wait_seconds_count{provider="a"}"#),
        calls as f64,
        "every request to a waited (perhaps 0 s) for its quota"
    );
    let held = m(r#"cascade_upstream_rate_limited_total{provider="a"}"#);
    assert!(held >= 1.0, "a burst of 2 cannot take 6 calls in a minute");
    assert_eq!(
        held + a.stats().requests as f64,
        calls as f64,
        "each call either reached a or was held back by its quota"
    );
    assert_eq!(b.stats().requests as f64, held, "those held back went to b");
}
