//! The load harness against the real router and the real mock: counts add up, errors are
//! classified, open-loop mode sends at the asked rate (by count, not by timing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::{
    load::{self, Spec, Target, Template},
    mock::{MockServer, Script},
};
use common::*;

fn spec(target: Target) -> Spec {
    Spec {
        target,
        concurrency: 8,
        connections: 2,
        requests: Some(300),
        duration: None,
        rate: None,
        warmup: 10,
        templates: load::templates(r#"{"model":"m","prompt":"hello {{n}}"}"#).unwrap(),
        timeout: Duration::from_secs(10),
        batch: 1,
    }
}

#[tokio::test]
async fn closed_and_open_loop_through_the_router_and_direct() {
    let mock = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!("providers:\n{}", openai("up", 1, &mock.url()))).await;

    let r = load::run(spec(Target::Grpc(router.addr.to_string())))
        .await
        .unwrap();
    assert_eq!((r.requests, r.ok), (300, 300));
    assert!(r.errors.is_empty());
    let lat = r.latency_us.clone().unwrap();
    assert!(lat.p50 <= lat.p99 && lat.p99 <= lat.max);
    assert!(r.upstream_us.is_some());
    assert!(load::render(&r).contains("requests     300 (ok 300)"));

    let open = Spec {
        rate: Some(2000.0),
        requests: Some(200),
        ..spec(Target::Grpc(router.addr.to_string()))
    };
    assert_eq!(load::run(open).await.unwrap().ok, 200);

    let direct = load::run(spec(Target::Http(format!("{}/v1", mock.url()))))
        .await
        .unwrap();
    assert_eq!((direct.requests, direct.ok), (300, 300));
    assert_eq!(mock.stats().requests, 300 + 10 + 200 + 10 + 300 + 10);
}

#[tokio::test]
async fn errors_are_counted_by_code() {
    let router = start(&format!(
        "providers:\n{}",
        openai("down", 1, &refused_url().await)
    ))
    .await;
    let s = Spec {
        warmup: 0,
        requests: Some(20),
        ..spec(Target::Grpc(router.addr.to_string()))
    };
    let r = load::run(s).await.unwrap();
    assert_eq!((r.requests, r.ok), (20, 0));
    assert_eq!(r.errors.get("Unavailable"), Some(&20));
}

#[test]
fn templates_parse_and_reject_unknown_fields() {
    let t: Vec<Template> =
        load::templates("{\"prompt\":\"a {{n}}\"}\n\n{\"prompt\":\"b\",\"temperature\":0}\n")
            .unwrap();
    assert_eq!(t.len(), 2);
    assert!(
        load::templates("{\"promt\":\"typo\"}")
            .unwrap_err()
            .contains("line 1")
    );
}
