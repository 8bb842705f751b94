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
}
