//! The official `openai` Python package (PyPI) against the OpenAI-compatible front, through
//! `examples/python/openai_sdk.py`: chat and text completions, streamed and not, an unknown
//! model (the SDK's `NotFoundError`), and a fallback seen in `x-cascade-attempts`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_works_against_the_http_front() {
    let Some(python) = python_with("openai") else {
        return;
    };
    let up = MockServer::start(Script {
        chunk_interval: Duration::from_millis(1),
        ..Script::default()
    })
    .await
    .unwrap();
    let failing = MockServer::start(Script::failing(Fault::Status(500)))
        .await
        .unwrap();
    let port = refused_url().await.rsplit(':').next().unwrap().to_string();
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\"}}\n{}providers:\n\
         - {{name: fails, type: openai, priority: 1, base_url: \"{}/v1\", models: [flaky]}}\n\
         - {{name: up, type: openai, priority: 2, base_url: \"{}/v1\", models: [m, flaky]}}\n",
        cascade(0, 100, 60.0),
        failing.url(),
        up.url(),
    );
    let _router = start(&yaml).await;
    let base = format!("http://127.0.0.1:{port}/v1");
    let args = [
        "--base-url",
        &base,
        "--model",
        "m",
        "--fallback-model",
        "flaky",
    ];
    let r = python_report(python, "openai_sdk.py", args.map(String::from).to_vec()).await;

    assert_eq!(r["chat"], mock::reply("hello from the sdk"));
    assert!(r["chat_usage"].as_u64().unwrap() > 0);
    assert_eq!(r["text"], mock::reply("complete this"));
    assert_eq!(
        r["texts"],
        serde_json::json!([mock::reply("first prompt"), mock::reply("second prompt")])
    );
    let chunks: Vec<&str> = r["chat_stream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(chunks.concat(), mock::reply("stream to me"));
    assert_eq!(
        chunks.len(),
        mock::reply("stream to me").split_inclusive(' ').count(),
        "one SSE chunk per upstream chunk"
    );
    assert!(r["chat_stream_usage"].as_u64().unwrap() > 0);
    let text_chunks: Vec<&str> = r["text_stream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(text_chunks.concat(), mock::reply("stream this text"));
    assert_eq!(
        r["not_found"],
        serde_json::json!({"status": 404, "code": "model_not_found"})
    );
    assert_eq!(r["fallback"]["attempts"], "1");
    assert_eq!(r["fallback"]["provider"], "up");
    assert_eq!(r["fallback"]["attempted"], "fails/flaky server_error");
    assert_eq!(r["fallback"]["text"], mock::reply("hello from the sdk"));
    assert_eq!(r["models"], serde_json::json!(["flaky", "m"]));
    assert_eq!(failing.stats().requests, 1);
}
