//! Under pressure (#26), the smaller promises: what the router echoes back is bounded, a
//! caller's too-short deadline is DEADLINE_EXCEEDED (HTTP 504), the `Bearer` scheme is read in
//! any case. Real router, real clients, real mock providers on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{collections::HashMap, time::Duration};

use cascade_devtools::mock::{MockServer, Script};
use cascade_router::proto::v1;
use common::*;
use serde_json::json;
use tonic::Code;

#[tokio::test]
async fn a_huge_bad_value_is_named_not_echoed() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let mut router = start(&format!("providers:\n{}", openai("up", 1, &up.url()))).await;
    let huge = "r".repeat(100_000);
    let bad_role = v1::CompleteRequest {
        model: "m".into(),
        messages: vec![v1::ChatMessage {
            role: huge.clone(),
            content: "x".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let bad_model = v1::CompleteRequest {
        model: huge,
        prompt: "x".into(),
        ..Default::default()
    };
    for (req, names) in [(bad_role, "messages[0].role"), (bad_model, "unknown model")] {
        let e = router.client.complete(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", &e.message()[..200]);
        assert!(e.message().contains(names), "{}", e.message());
        assert!(e.message().contains("(100000 bytes)"), "{}", e.message());
        assert!(e.message().len() < 4200, "{} bytes", e.message().len());
    }
    assert_eq!(up.stats().requests, 0);
}

#[tokio::test]
async fn too_short_a_deadline_is_504_not_503_and_bearer_is_any_case() {
    let up = MockServer::start(Script {
        base_latency: Duration::from_millis(20),
        ..Script::default()
    })
    .await
    .unwrap();
    let port = refused_url().await.rsplit(':').next().unwrap().to_string();
    let key = "sk-router-pressure-0123456789";
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\", auth: {{keys: [{{name: a, key: \"${{KEY}}\"}}]}}}}\nproviders:\n{}",
        openai("up", 1, &up.url())
    );
    let router = start_with_env(&yaml, HashMap::from([("KEY".to_string(), key.to_string())])).await;
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let post = |timeout: Option<&'static str>, scheme: &'static str| {
        let mut r = reqwest::Client::new()
            .post(&url)
            .header("authorization", format!("{scheme} {key}"))
            .json(&body);
        if let Some(ms) = timeout {
            r = r.header("x-cascade-timeout-ms", ms);
        }
        r.send()
    };
    // The first answer teaches the router the provider's fastest time (20 ms).
    assert_eq!(post(None, "bearer").await.unwrap().status().as_u16(), 200);
    assert_eq!(post(None, "BEARER").await.unwrap().status().as_u16(), 200);
    let short = post(Some("1"), "Bearer").await.unwrap();
    assert_eq!(short.status().as_u16(), 504);
    // Over gRPC: DEADLINE_EXCEEDED, the lower-case scheme taken too.
    let mut c = router.client.clone();
    let mut req = tonic::Request::new(prompt("hi"));
    req.set_timeout(Duration::from_millis(3));
    req.metadata_mut()
        .insert("authorization", format!("bearer {key}").parse().unwrap());
    let e = c.complete(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
}
