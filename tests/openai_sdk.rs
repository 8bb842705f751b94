//! The official `openai` Python package (PyPI) against the OpenAI-compatible front, through
//! `examples/python/openai_sdk.py`: chat and text completions, streamed and not, an unknown
//! model (the SDK's `NotFoundError`), and a fallback seen in `x-cascade-attempts`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use common::*;
use serde_json::json;

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
    let (ol, an) = (
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
    );
    let port = free_port().await;
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\"}}\n{}providers:\n\
         - {{name: fails, type: openai, priority: 1, base_url: \"{}/v1\", models: [flaky]}}\n\
         - {{name: up, type: openai, priority: 2, base_url: \"{}/v1\", models: [m, flaky, {{name: small, capabilities: [text, tools]}}]}}\n\
         - {{name: ol, type: ollama, priority: 3, url: \"{}\", models: [{{name: ol-model, capabilities: [text, tools, streaming, vision]}}]}}\n\
         - {{name: an, type: anthropic, priority: 4, url: \"{}\", api_key: k, models: [an-model]}}\n\
         fallback_chains:\n  vision: [ol-model]\n",
        cascade(0, 100, 60.0),
        failing.url(),
        up.url(),
        ol.url(),
        an.url(),
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
        "--tool-models",
        "m,ol-model,an-model",
        "--vision-model",
        "small",
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
    assert_eq!(
        r["models"],
        serde_json::json!(["an-model", "flaky", "m", "ol-model", "small", "vision"])
    );
    assert_eq!(
        r["json"],
        json!({"reply": mock::reply("hello from the sdk")})
    );
    assert_eq!(r["extra"]["status"], 400);
    assert_eq!(r["extra"]["code"], "unsupported");
    assert!(r["extra"]["message"].as_str().unwrap().contains("top_k"));
    // The image went to the vision model, in Ollama's own shape.
    assert_eq!(r["vision"]["provider"], "ol");
    assert_eq!(r["vision"]["attempted"], "up/small unsupported");
    assert_eq!(r["vision"]["text"], mock::reply("what is this?"));
    let sent = ol.last_body().unwrap();
    assert_eq!(sent["messages"][0]["images"], json!([r["vision"]["image"]]));
    // A tool round trip through each provider API, whole and streamed, with the SDK.
    for (model, server) in [("m", &up), ("ol-model", &ol), ("an-model", &an)] {
        for how in ["unary", "streamed"] {
            let t = &r["tools"][model][how];
            assert_eq!(t["name"], "get_weather", "{model} {how}");
            assert_eq!(t["arguments"], json!({"text": "weather in Paris?"}));
            assert_eq!(t["finish_reason"], "tool_calls", "{model} {how}");
            assert_eq!(t["final"], mock::reply("sunny, 21 C"), "{model} {how}");
        }
        // The answers' bodies, in the API's own shape; the SDK's own message object (with
        // its `refusal: null` and the like) went back as a clean assistant turn.
        let id = r["tools"][model]["unary"]["id"].as_str().unwrap();
        let args = json!({"text": "weather in Paris?"});
        // The unary round's, which comes first (to the OpenAI-shaped provider a unary call
        // goes as a stream too: `stream_unary`).
        let body = server
            .bodies()
            .into_iter()
            .find(|b| {
                b["messages"].as_array().is_some_and(|m| m.len() == 3)
                    && (b["stream"].as_bool() != Some(true) || model == "m")
            })
            .unwrap();
        let m = &body["messages"];
        match model {
            "m" => {
                assert_eq!(
                    m[1],
                    json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "get_weather", "arguments": args.to_string()}}]})
                );
                assert_eq!(
                    m[2],
                    json!({"role": "tool", "content": "sunny, 21 C", "tool_call_id": id})
                );
                assert_eq!(
                    body["tools"][0]["function"]["parameters"]["required"],
                    json!(["text"])
                );
            }
            "ol-model" => {
                assert_eq!(
                    m[1]["tool_calls"],
                    json!([{"function": {"name": "get_weather", "arguments": args}}])
                );
                assert_eq!(
                    m[2],
                    json!({"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"})
                );
            }
            _ => {
                assert_eq!(
                    m[1]["content"],
                    json!([{"type": "tool_use", "id": id, "name": "get_weather", "input": args}])
                );
                assert_eq!(
                    m[2]["content"],
                    json!([{"type": "tool_result", "tool_use_id": id, "content": "sunny, 21 C"}])
                );
                assert_eq!(
                    body["tools"][0]["input_schema"]["required"],
                    json!(["text"])
                );
            }
        }
    }
    assert_eq!(failing.stats().requests, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_works_over_tls_to_the_http_front() {
    let Some(python) = python_with("openai") else {
        return;
    };
    let up = MockServer::start(Script::default()).await.unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert_path = temp_file("http-tls-cert", &cert.pem());
    let key_path = temp_file("http-tls-key", &signing_key.serialize_pem());
    let port = free_port().await;
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\", tls: {{cert: \"{}\", key: \"{}\"}}}}\nproviders:\n{}",
        cert_path.display(),
        key_path.display(),
        openai("up", 1, &up.url()),
    );
    let _router = start(&yaml).await;
    // Plaintext to the TLS front gets no answer from it.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/v1/models")).await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plaintext was served"
    );
    let base = format!("https://127.0.0.1:{port}/v1");
    let args = ["--base-url", &base, "--model", "m", "--ca"]
        .map(String::from)
        .into_iter()
        .chain([cert_path.display().to_string()])
        .collect();
    let r = python_report(python, "openai_sdk.py", args).await;
    assert_eq!(r["chat"], mock::reply("hello from the sdk"));
    assert_eq!(r["text"], mock::reply("complete this"));
}
