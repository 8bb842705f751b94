//! The Python example (`examples/python/client.py`, grpcio with stubs generated from proto/)
//! against the real service: its answers, a deadline, the codes it acts on, and a tool round
//! trip through each provider API (the upstream bodies checked).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, MockServer, Script};
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_gets_its_answers_and_acts_on_codes() {
    let Some(python) = python_with("grpc, grpc_tools") else {
        return;
    };
    let fast = MockServer::start(Script::default()).await.unwrap();
    let slow = MockServer::start(Script {
        base_latency: Duration::from_secs(30),
        ..Script::default()
    })
    .await
    .unwrap();
    let (ol, an) = (
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
    );
    let router = start(&format!(
        "providers:\n{}  - {{name: slow, type: openai, priority: 2, base_url: \"{}/v1\", models: [slow]}}\n\
         \x20 - {{name: ol, type: ollama, priority: 3, url: \"{}\", models: [ol-model]}}\n\
         \x20 - {{name: an, type: anthropic, priority: 4, url: \"{}\", api_key: k, models: [an-model]}}\n",
        openai("up", 1, &fast.url()),
        slow.url(),
        ol.url(),
        an.url()
    ))
    .await;
    let args = vec![
        "--addr".to_string(),
        router.addr.to_string(),
        "--tool-models".to_string(),
        "m,ol-model,an-model".to_string(),
    ];
    let r = python_report(python, "client.py", args).await;
    assert_eq!(
        r["complete"]["text"],
        mock::reply("hello from python").as_str()
    );
    assert_eq!(r["complete"]["provider"], "up");
    let batch: Vec<&str> = r["batch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..5)
        .map(|i| mock::reply(&format!("batch item {i}")))
        .collect();
    assert_eq!(batch, want);
    assert_eq!(r["deadline"], "DEADLINE_EXCEEDED");
    assert_eq!(r["unknown_model"], "INVALID_ARGUMENT");
    assert_eq!(r["empty_prompt"], "INVALID_ARGUMENT");
    for (model, server) in [("m", &fast), ("ol-model", &ol), ("an-model", &an)] {
        let t = &r["tool_round_trip"][model];
        assert_eq!(t["name"], "get_weather", "{model}");
        assert_eq!(
            t["arguments"],
            serde_json::json!({"text": "weather in Paris?"})
        );
        assert_eq!(t["final"], mock::reply("sunny, 21 C").as_str(), "{model}");
        let finish = if model == "an-model" {
            "tool_use"
        } else {
            "tool_calls"
        };
        assert_eq!(t["finish_reason"], finish);
        let s = &t["streamed"];
        assert_eq!(s["name"], "get_weather", "{model} streamed");
        assert_eq!(
            s["arguments"],
            serde_json::json!({"text": "weather in Paris?"})
        );
        assert_eq!(
            s["final"],
            mock::reply("sunny, 21 C").as_str(),
            "{model} streamed"
        );
        assert_eq!(s["finish_reason"], finish, "{model} streamed");
        // The result went back in the API's own shape.
        let body = server.last_body().unwrap();
        let last = &body["messages"].as_array().unwrap()[2];
        let result = match model {
            "an-model" => &last["content"][0]["content"],
            _ => &last["content"],
        };
        assert_eq!(result, "sunny, 21 C", "{model}: {body}");
    }
    assert_eq!(
        fast.stats().items,
        10,
        "one Complete, a batch of five, a tool round trip whole and streamed"
    );
}
