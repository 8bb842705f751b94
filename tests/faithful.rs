//! What agents send, carried faithfully: tool round trips (unary and streamed) through each
//! provider API, images, JSON output and every sampling field, each checked in the body the
//! mock provider received; capability routing by the cascade file's `capabilities`,
//! `context_window` and `fallback_chains.<capability>`; and every refusal named, with nothing
//! sent upstream. Real gRPC client, real router, real mock HTTP servers on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, MockServer, Script};
use cascade_router::proto::v1::{self, FailureKind};
use common::*;
use serde_json::{Value, json};
use tonic::Code;

fn user(text: &str) -> v1::ChatMessage {
    v1::ChatMessage {
        role: "user".into(),
        content: text.into(),
        ..Default::default()
    }
}

fn weather_tool() -> v1::Tool {
    v1::Tool {
        name: "get_weather".into(),
        description: "The weather in a city".into(),
        parameters_json:
            r#"{"type":"object","properties":{"text":{"type":"string"}},"required":["text"]}"#
                .into(),
        strict: None,
    }
}

fn png(bytes: &[u8]) -> v1::ContentPart {
    v1::ContentPart {
        part: Some(v1::content_part::Part::Image(v1::Image {
            source: Some(v1::image::Source::Data(bytes.to_vec().into())),
            mime_type: "image/png".into(),
            detail: String::new(),
        })),
    }
}

fn text_part(t: &str) -> v1::ContentPart {
    v1::ContentPart {
        part: Some(v1::content_part::Part::Text(t.into())),
    }
}

async fn mock() -> MockServer {
    MockServer::start(Script {
        chunk_interval: Duration::from_millis(1),
        ..Script::default()
    })
    .await
    .unwrap()
}

/// Three providers, one per API, each serving its own model.
fn three_apis(oa: &str, ol: &str, an: &str) -> String {
    format!(
        "{}providers:\n\
         - {{name: oa, type: openai, priority: 1, base_url: \"{oa}/v1\", models: [oa-model]}}\n\
         - {{name: ol, type: ollama, priority: 2, url: \"{ol}\", models: [ol-model]}}\n\
         - {{name: an, type: anthropic, priority: 3, url: \"{an}\", api_key: k, models: [an-model]}}\n",
        cascade(0, 100, 60.0)
    )
}

/// A streamed answer put together: its text, its tool calls (id, name, arguments) and end.
async fn stream_all(
    client: &mut v1::router_client::RouterClient<tonic::transport::Channel>,
    req: v1::CompleteRequest,
) -> (String, Vec<(String, String, String)>, v1::StreamEnd) {
    let mut s = client.complete_stream(req).await.unwrap().into_inner();
    let (mut text, mut calls) = (String::new(), Vec::<(String, String, String)>::new());
    loop {
        let m = within(s.message()).await.unwrap().expect("an end message");
        text.push_str(&m.text);
        for d in m.tool_calls {
            let i = d.index as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            let c = &mut calls[i];
            if !d.id.is_empty() {
                c.0 = d.id;
            }
            if !d.name.is_empty() {
                c.1 = d.name;
            }
            c.2.push_str(&d.arguments);
        }
        if let Some(end) = m.end {
            return (text, calls, end);
        }
    }
}

/// The tools a body offered, as (name, parameters) in the API's own shape.
fn offered(api: &str, body: &Value) -> Vec<(String, Value)> {
    body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| match api {
            "an" => (
                t["name"].as_str().unwrap().to_string(),
                t["input_schema"].clone(),
            ),
            _ => {
                assert_eq!(t["type"], "function");
                (
                    t["function"]["name"].as_str().unwrap().to_string(),
                    t["function"]["parameters"].clone(),
                )
            }
        })
        .collect()
}

#[tokio::test]
async fn a_tool_round_trip_through_every_provider_api_unary_and_streamed() {
    let (oa, ol, an) = (mock().await, mock().await, mock().await);
    let mut router = start(&three_apis(&oa.url(), &ol.url(), &an.url())).await;
    let schema: Value = serde_json::from_str(&weather_tool().parameters_json).unwrap();
    for (api, model, server) in [
        ("oa", "oa-model", &oa),
        ("ol", "ol-model", &ol),
        ("an", "an-model", &an),
    ] {
        for streamed in [false, true] {
            let ask = v1::CompleteRequest {
                model: model.into(),
                messages: vec![user("weather in Paris?")],
                tools: vec![weather_tool()],
                ..Default::default()
            };
            // 1. The model calls the tool.
            let (text, calls, finish) = if streamed {
                let (text, calls, end) = stream_all(&mut router.client, ask.clone()).await;
                (text, calls, end.finish_reason)
            } else {
                let r = router.client.ask(ask.clone()).await;
                let calls = r
                    .tool_calls
                    .iter()
                    .map(|c| (c.id.clone(), c.name.clone(), c.arguments.clone()))
                    .collect();
                (r.text, calls, r.finish_reason)
            };
            let ctx = format!("{api} streamed={streamed}");
            assert_eq!(text, "", "{ctx}");
            assert_eq!(calls.len(), 1, "{ctx}");
            let (id, name, arguments) = calls[0].clone();
            assert_eq!(name, "get_weather", "{ctx}");
            assert!(!id.is_empty(), "{ctx}");
            let args: Value = serde_json::from_str(&arguments).unwrap();
            assert_eq!(args, json!({"text": "weather in Paris?"}), "{ctx}");
            if api != "ol" {
                // Ollama says "stop" for a tool call: the router's own mapping is tool_calls.
                assert!(
                    finish == "tool_calls" || finish == "tool_use",
                    "{ctx}: {finish}"
                );
            }
            let body = server.last_body().unwrap();
            assert_eq!(
                offered(api, &body),
                [("get_weather".to_string(), schema.clone())],
                "{ctx}"
            );
            if api != "an" {
                assert_eq!(
                    body["tools"][0]["function"]["description"],
                    "The weather in a city"
                );
            } else {
                assert_eq!(body["tools"][0]["description"], "The weather in a city");
            }

            // 2. The tool's result goes back; the model answers in text.
            let mut history = ask.clone();
            history.messages.push(v1::ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![v1::ToolCall {
                    id: id.clone(),
                    name: name.clone(),
                    arguments: arguments.clone(),
                }],
                ..Default::default()
            });
            history.messages.push(v1::ChatMessage {
                role: "tool".into(),
                content: "sunny, 21 C".into(),
                tool_call_id: id.clone(),
                ..Default::default()
            });
            let text = if streamed {
                stream_all(&mut router.client, history).await.0
            } else {
                router.client.ask(history).await.text
            };
            assert_eq!(text, mock::reply("sunny, 21 C"), "{ctx}");
            // The upstream body carries the whole turn in the API's own shape.
            let body = server.last_body().unwrap();
            let m = body["messages"].as_array().unwrap();
            match api {
                "oa" => {
                    assert_eq!(m.len(), 3, "{ctx}");
                    assert_eq!(m[1]["role"], "assistant");
                    assert_eq!(m[1]["content"], Value::Null);
                    assert_eq!(
                        m[1]["tool_calls"],
                        json!([{"id": id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}])
                    );
                    assert_eq!(
                        m[2],
                        json!({"role": "tool", "content": "sunny, 21 C", "tool_call_id": id})
                    );
                }
                "ol" => {
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
                        m[1],
                        json!({"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": "get_weather", "input": args}]})
                    );
                    assert_eq!(
                        m[2],
                        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "sunny, 21 C"}]})
                    );
                }
            }
            // OpenAI-compatible providers take unary calls as streams too (`stream_unary`).
            assert_eq!(
                body["stream"].as_bool().unwrap_or(false),
                streamed || api == "oa",
                "{ctx}"
            );
        }
    }
}

#[tokio::test]
async fn every_sampling_field_reaches_the_provider_in_its_own_shape() {
    let (oa, ol, an) = (mock().await, mock().await, mock().await);
    let mut router = start(&three_apis(&oa.url(), &ol.url(), &an.url())).await;
    let full = |model: &str| v1::CompleteRequest {
        model: model.into(),
        messages: vec![user("hi")],
        max_tokens: Some(7),
        temperature: Some(0.5),
        top_p: Some(0.25),
        stop: vec!["END".into()],
        seed: Some(42),
        frequency_penalty: Some(0.5),
        presence_penalty: Some(-0.5),
        logit_bias: [(50256, -100.0)].into(),
        logprobs: true,
        top_logprobs: Some(2),
        response_format: Some(v1::ResponseFormat {
            r#type: "json_schema".into(),
            name: "reply".into(),
            schema_json: r#"{"type":"object","properties":{"reply":{"type":"string"}}}"#.into(),
            strict: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = router.client.ask(full("oa-model")).await;
    // The provider's log probabilities come back as it gave them.
    assert_eq!(
        serde_json::from_str::<Value>(&r.logprobs_json).unwrap(),
        *cascade_devtools::conversation::LOGPROBS
    );
    let b = oa.last_body().unwrap();
    for (k, v) in [
        ("max_tokens", json!(7)),
        ("temperature", json!(0.5)),
        ("top_p", json!(0.25)),
        ("stop", json!(["END"])),
        ("seed", json!(42)),
        ("frequency_penalty", json!(0.5)),
        ("presence_penalty", json!(-0.5)),
        ("logit_bias", json!({"50256": -100.0})),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(2)),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "reply", "schema": {"type": "object", "properties": {"reply": {"type": "string"}}}, "strict": true}}),
        ),
    ] {
        assert_eq!(b[k], v, "openai: {k}");
    }

    // Ollama has no logit_bias or logprobs: the same request is not sent there.
    let e = router.client.complete(full("ol-model")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("logit_bias"), "{}", e.message());
    let mut ollama = full("ol-model");
    ollama.logit_bias.clear();
    ollama.logprobs = false;
    ollama.top_logprobs = None;
    ollama.extra = [("top_k".to_string(), "5".to_string())].into();
    let e = router.client.complete(ollama.clone()).await.unwrap_err();
    assert!(
        e.message().contains("top_k"),
        "pass_through not listed: {}",
        e.message()
    );
    ollama.extra.clear();
    let r = router.client.ask(ollama).await;
    assert_eq!(r.text, json!({"reply": mock::reply("hi")}).to_string());
    let b = ol.last_body().unwrap();
    assert_eq!(
        b["options"],
        json!({"num_predict": 7, "temperature": 0.5, "top_p": 0.25, "stop": ["END"], "seed": 42, "frequency_penalty": 0.5, "presence_penalty": -0.5})
    );
    assert_eq!(
        b["format"],
        json!({"type": "object", "properties": {"reply": {"type": "string"}}})
    );

    // Anthropic: temperature, top_p, stop_sequences, max_tokens; no seed, no JSON mode.
    let e = router.client.complete(full("an-model")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let r = router
        .client
        .ask(v1::CompleteRequest {
            model: "an-model".into(),
            messages: vec![user("hi")],
            max_tokens: Some(7),
            temperature: Some(0.5),
            top_p: Some(0.25),
            stop: vec!["END".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(r.text, mock::reply("hi"));
    let b = an.last_body().unwrap();
    assert_eq!(
        (
            b["max_tokens"].clone(),
            b["temperature"].clone(),
            b["top_p"].clone(),
            b["stop_sequences"].clone()
        ),
        (json!(7), json!(0.5), json!(0.25), json!(["END"]))
    );
}

#[tokio::test]
async fn fields_outside_the_reference_go_only_where_passed_through() {
    let (plain, vllm) = (mock().await, mock().await);
    let yaml = format!(
        "{}providers:\n\
         - {{name: plain, type: openai, priority: 1, base_url: \"{}/v1\", models: [m]}}\n\
         - {{name: vllm, type: openai, priority: 2, base_url: \"{}/v1\", models: [m], pass_through: [top_k, min_p]}}\n",
        cascade(0, 100, 60.0),
        plain.url(),
        vllm.url()
    );
    let mut router = start(&yaml).await;
    let mut req = prompt("extras");
    req.extra = [
        ("top_k".to_string(), "20".to_string()),
        ("min_p".to_string(), "0.05".to_string()),
    ]
    .into();
    let r = router.client.ask(req).await;
    assert_eq!(r.provider, "vllm");
    assert_eq!(r.attempts.len(), 1);
    assert_eq!(r.attempts[0].kind, FailureKind::Unsupported as i32);
    assert!(
        r.attempts[0].error.contains("min_p"),
        "{}",
        r.attempts[0].error
    );
    assert_eq!(
        plain.stats().requests,
        0,
        "nothing sent to the provider that cannot take it"
    );
    let b = vllm.last_body().unwrap();
    assert_eq!(
        (b["top_k"].clone(), b["min_p"].clone()),
        (json!(20), json!(0.05))
    );
    // A field of OpenAI's reference the router does not model goes to an OpenAI-shaped
    // provider as it came, with no pass_through.
    let mut store = prompt("kept");
    store.extra = [("store".to_string(), "true".to_string())].into();
    assert_eq!(router.client.ask(store).await.provider, "plain");
    assert_eq!(plain.last_body().unwrap()["store"], json!(true));
    // Not JSON, or a field the router models itself: refused at the edge.
    let mut bad = prompt("x");
    bad.extra = [("top_k".to_string(), "twenty".to_string())].into();
    let e = router.client.complete(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("extra.top_k"), "{}", e.message());
    let mut bad = prompt("x");
    bad.extra = [("temperature".to_string(), "1".to_string())].into();
    assert_eq!(
        router.client.complete(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn an_image_for_a_text_only_model_goes_to_a_vision_model_through_its_chain() {
    let (text_only, ol, an, oa) = (mock().await, mock().await, mock().await, mock().await);
    let yaml = format!(
        "{}providers:\n\
         - {{name: local, type: openai, priority: 1, base_url: \"{}/v1\", models: [{{name: small, capabilities: [text, tools]}}]}}\n\
         - {{name: llava, type: ollama, priority: 2, url: \"{}\", models: [{{name: llava, capabilities: [text, vision]}}]}}\n\
         - {{name: claude, type: anthropic, priority: 3, url: \"{}\", api_key: k, models: [{{name: claude, capabilities: [text, vision, tools]}}]}}\n\
         - {{name: gpt, type: openai, priority: 4, base_url: \"{}/v1\", models: [{{name: gpt, capabilities: [text, vision, tools, json]}}]}}\n\
         fallback_chains:\n  vision: [llava, claude, gpt]\n",
        cascade(0, 100, 60.0),
        text_only.url(),
        ol.url(),
        an.url(),
        oa.url()
    );
    let mut router = start(&yaml).await;
    let image = b"\x89PNG\r\n\x1a\n fake pixels";
    let look = v1::CompleteRequest {
        model: "small".into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            parts: vec![text_part("what is this?"), png(image)],
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = router.client.ask(look.clone()).await;
    assert_eq!((r.provider.as_str(), r.model.as_str()), ("llava", "llava"));
    assert_eq!(r.attempts[0].kind, FailureKind::Unsupported as i32);
    assert!(
        r.attempts[0].error.contains("vision"),
        "{}",
        r.attempts[0].error
    );
    assert_eq!(text_only.stats().requests, 0);
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(image)
    };
    let b = ol.last_body().unwrap();
    assert_eq!(
        b["messages"][0],
        json!({"role": "user", "content": "what is this?", "images": [b64]})
    );

    // The chain's next members, each in its own shape: Anthropic's base64 block...
    let mut chain = look.clone();
    chain.model = "claude".into();
    router.client.ask(chain.clone()).await;
    let b = an.last_body().unwrap();
    assert_eq!(
        b["messages"][0]["content"],
        json!([{"type": "text", "text": "what is this?"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}])
    );
    // ...and OpenAI's data URL, with the detail asked for.
    chain.model = "gpt".into();
    if let Some(v1::content_part::Part::Image(img)) = &mut chain.messages[0].parts[1].part {
        img.detail = "low".into();
    }
    router.client.ask(chain).await;
    let b = oa.last_body().unwrap();
    assert_eq!(
        b["messages"][0]["content"][1],
        json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}"), "detail": "low"}})
    );

    // An image URL goes by reference to APIs that take URLs, never to Ollama.
    let mut by_url = look.clone();
    by_url.messages[0].parts[1] = v1::ContentPart {
        part: Some(v1::content_part::Part::Image(v1::Image {
            source: Some(v1::image::Source::Url(
                "https://example.invalid/cat.png".into(),
            )),
            ..Default::default()
        })),
    };
    let before = ol.stats().requests;
    let r = router.client.ask(by_url).await;
    assert_eq!(r.provider, "claude");
    assert!(
        r.attempts
            .iter()
            .any(|a| a.provider == "llava" && a.error.contains("URL")),
        "{:?}",
        r.attempts
    );
    assert_eq!(ol.stats().requests, before);
    assert_eq!(
        an.last_body().unwrap()["messages"][0]["content"][1],
        json!({"type": "image", "source": {"type": "url", "url": "https://example.invalid/cat.png"}})
    );
}

#[tokio::test]
async fn a_request_too_long_for_a_window_goes_to_a_bigger_model() {
    let (small, big) = (mock().await, mock().await);
    let yaml = format!(
        "{}providers:\n\
         - {{name: small, type: openai, priority: 1, base_url: \"{}/v1\", models: [{{name: m, context_window: 100}}]}}\n\
         - {{name: big, type: openai, priority: 2, base_url: \"{}/v1\", models: [{{name: m, context_window: 100000}}]}}\n",
        cascade(0, 100, 60.0),
        small.url(),
        big.url()
    );
    let mut router = start(&yaml).await;
    // 400 bytes of prompt is ~100 tokens, plus the answer's 50.
    let mut long = prompt(&"word ".repeat(80));
    long.max_tokens = Some(50);
    let r = router.client.ask(long).await;
    assert_eq!(r.provider, "big");
    assert!(
        r.attempts[0].error.contains("context_window is 100"),
        "{}",
        r.attempts[0].error
    );
    assert_eq!(small.stats().requests, 0);
    assert_eq!(router.client.ask(prompt("short")).await.provider, "small");
    // Too long for every window: FAILED_PRECONDITION naming the size, nothing sent.
    let e = router
        .client
        .complete(prompt(&"x".repeat(500_000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("context_window is 100000"),
        "{}",
        e.message()
    );
    assert_eq!(big.stats().requests, 1);
}

#[tokio::test]
async fn a_cascade_file_in_the_seed_shape_routes_image_tools_and_text() {
    let (ollama, vllm, openai) = (mock().await, mock().await, mock().await);
    // The Python router's file: capability lists, three chains by capability name.
    let yaml = format!(
        r#"{cascade}providers:
  - name: ollama-local
    type: ollama
    priority: 1
    url: "{ollama}"
    models:
      - {{name: "llama3.2:3b", default: true, context_window: 128000, capabilities: [text, json, streaming]}}
  - name: vllm-gpu
    type: openai
    priority: 2
    base_url: "{vllm}/v1"
    models:
      - {{name: "qwen2.5-coder:7b", context_window: 32768, capabilities: [text, tools]}}
  - name: openai
    type: openai
    priority: 3
    base_url: "{openai}/v1"
    models:
      - {{name: gpt-4o-mini, context_window: 128000, capabilities: [text, tools, json, streaming, vision]}}
fallback_chains:
  text: ["llama3.2:3b", "qwen2.5-coder:7b", gpt-4o-mini]
  tools: ["qwen2.5-coder:7b", gpt-4o-mini]
  vision: [gpt-4o-mini]
agent_model_assignments:
  triage: text
"#,
        cascade = cascade(0, 100, 60.0),
        ollama = ollama.url(),
        vllm = vllm.url(),
        openai = openai.url()
    );
    let mut router = start(&yaml).await;
    let ask = |messages: Vec<v1::ChatMessage>, tools: Vec<v1::Tool>| v1::CompleteRequest {
        agent: "triage".into(),
        messages,
        tools,
        ..Default::default()
    };
    let text = router
        .client
        .ask(ask(vec![user("summarise")], vec![]))
        .await;
    assert_eq!(text.model, "llama3.2:3b");
    let tools = router
        .client
        .ask(ask(vec![user("call it")], vec![weather_tool()]))
        .await;
    assert_eq!(tools.model, "qwen2.5-coder:7b");
    assert_eq!(tools.tool_calls[0].name, "get_weather");
    let image = router
        .client
        .ask(ask(
            vec![v1::ChatMessage {
                role: "user".into(),
                parts: vec![text_part("see"), png(b"png bytes")],
                ..Default::default()
            }],
            vec![],
        ))
        .await;
    assert_eq!(image.model, "gpt-4o-mini");
    assert_eq!(
        (
            ollama.stats().requests,
            vllm.stats().requests,
            openai.stats().requests
        ),
        (1, 1, 1)
    );
    // A capability nobody has: FAILED_PRECONDITION naming it and each model's lack.
    let mut json_tools = ask(vec![user("x")], vec![weather_tool()]);
    json_tools.model = "llama3.2:3b".into();
    json_tools.response_format = Some(v1::ResponseFormat {
        r#type: "json_object".into(),
        ..Default::default()
    });
    json_tools.messages[0].parts = vec![text_part("x"), png(b"png")];
    json_tools.messages[0].content.clear();
    let r = router.client.ask(json_tools).await;
    assert_eq!(
        r.model, "gpt-4o-mini",
        "the chains are walked for each capability the route lacks"
    );
}

#[tokio::test]
async fn json_output_from_anthropic_is_a_forced_tool_whose_input_is_the_answer() {
    let an = mock().await;
    let yaml = format!(
        "{}providers:\n\
         - {{name: an, type: anthropic, url: \"{}\", api_key: k, models: [an-model]}}\n",
        cascade(0, 100, 60.0),
        an.url()
    );
    let mut router = start(&yaml).await;
    let schema = json!({"type": "object", "properties": {"text": {"type": "string"}}});
    let ask = v1::CompleteRequest {
        model: "an-model".into(),
        messages: vec![user("hi")],
        response_format: Some(v1::ResponseFormat {
            r#type: "json_schema".into(),
            name: "reply".into(),
            description: "The reply".into(),
            schema_json: schema.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = router.client.ask(ask.clone()).await;
    assert_eq!(
        serde_json::from_str::<Value>(&r.text).unwrap(),
        json!({"text": "hi"})
    );
    assert!(r.tool_calls.is_empty());
    assert_eq!(r.finish_reason, "end_turn");
    let b = an.last_body().unwrap();
    assert_eq!(
        b["tools"],
        json!([{"name": "reply", "description": "The reply", "input_schema": schema}])
    );
    assert_eq!(b["tool_choice"], json!({"type": "tool", "name": "reply"}));
    let (text, calls, end) = stream_all(&mut router.client, ask).await;
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"text": "hi"})
    );
    assert!(calls.is_empty());
    assert_eq!(end.finish_reason, "end_turn");
}

#[tokio::test]
async fn a_capability_nobody_on_the_route_has_fails_naming_it() {
    let (a, b) = (mock().await, mock().await);
    let yaml = format!(
        "{}providers:\n\
         - {{name: a, type: openai, priority: 1, base_url: \"{}/v1\", models: [{{name: m, capabilities: [text]}}]}}\n\
         - {{name: b, type: ollama, priority: 2, url: \"{}\", models: [{{name: m, capabilities: [text, tools]}}]}}\n",
        cascade(0, 100, 60.0),
        a.url(),
        b.url()
    );
    let mut router = start(&yaml).await;
    let look = v1::CompleteRequest {
        model: "m".into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            parts: vec![text_part("see"), png(b"png")],
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = router.client.complete(look).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let m = e.message();
    assert!(m.contains("needs vision"), "{m}");
    assert!(
        m.contains("a/m: the model lacks vision") && m.contains("b/m: the model lacks vision"),
        "{m}"
    );
    // Tools: the second model has them.
    let mut tools = v1::CompleteRequest {
        model: "m".into(),
        messages: vec![user("call")],
        tools: vec![weather_tool()],
        ..Default::default()
    };
    assert_eq!(router.client.ask(tools.clone()).await.provider, "b");
    // Streaming: neither lists it.
    tools.tools.clear();
    let e = router.client.complete_stream(tools).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("streaming"), "{}", e.message());
    assert_eq!((a.stats().requests, b.stats().requests), (0, 1));
}

#[tokio::test]
async fn refusals_name_the_field_and_send_nothing() {
    let (oa, ol, an) = (mock().await, mock().await, mock().await);
    let yaml = format!(
        "limits: {{max_image_bytes: 1000, max_images: 2}}\n{}",
        three_apis(&oa.url(), &ol.url(), &an.url())
    );
    let mut router = start(&yaml).await;
    let chat = |model: &str| v1::CompleteRequest {
        model: model.into(),
        messages: vec![user("hi")],
        ..Default::default()
    };
    // (request, code, what the message names)
    let mut cases: Vec<(v1::CompleteRequest, Code, &str)> = Vec::new();
    let mut r = chat("an-model");
    r.seed = Some(1);
    cases.push((r, Code::FailedPrecondition, "seed"));
    let mut r = chat("an-model");
    r.frequency_penalty = Some(1.0);
    cases.push((r, Code::FailedPrecondition, "frequency_penalty"));
    let mut r = chat("an-model");
    r.presence_penalty = Some(1.0);
    cases.push((r, Code::FailedPrecondition, "presence_penalty"));
    let mut r = chat("an-model");
    r.logit_bias = [(1, 1.0)].into();
    cases.push((r, Code::FailedPrecondition, "logit_bias"));
    let mut r = chat("an-model");
    r.logprobs = true;
    cases.push((r, Code::FailedPrecondition, "logprobs"));
    let mut r = chat("an-model");
    r.temperature = Some(1.5);
    cases.push((r, Code::FailedPrecondition, "temperature"));
    let mut r = chat("an-model");
    r.response_format = Some(v1::ResponseFormat {
        r#type: "json_object".into(),
        ..Default::default()
    });
    r.tools = vec![weather_tool()];
    cases.push((r, Code::FailedPrecondition, "response_format"));
    let mut r = chat("an-model");
    r.messages[0].name = "alice".into();
    cases.push((r, Code::FailedPrecondition, "messages[0].name"));
    let mut r = chat("ol-model");
    r.logprobs = true;
    cases.push((r, Code::FailedPrecondition, "logprobs"));
    let mut r = chat("ol-model");
    r.tools = vec![weather_tool()];
    r.tool_choice = Some(v1::ToolChoice {
        choice: Some(v1::tool_choice::Choice::Mode("required".into())),
    });
    cases.push((r, Code::FailedPrecondition, "tool_choice"));
    let mut r = chat("ol-model");
    r.tools = vec![weather_tool()];
    r.parallel_tool_calls = Some(false);
    cases.push((r, Code::FailedPrecondition, "parallel_tool_calls"));
    let mut r = chat("ol-model");
    r.messages[0].parts = vec![v1::ContentPart {
        part: Some(v1::content_part::Part::Image(v1::Image {
            source: Some(v1::image::Source::Url(
                "https://example.invalid/x.png".into(),
            )),
            ..Default::default()
        })),
    }];
    r.messages[0].content.clear();
    cases.push((r, Code::FailedPrecondition, "not URLs"));
    let mut r = prompt("x");
    r.model = "ol-model".into();
    r.echo = true;
    cases.push((r, Code::FailedPrecondition, "echo"));
    let mut r = prompt("x");
    r.model = "an-model".into();
    r.suffix = Some("end".into());
    cases.push((r, Code::FailedPrecondition, "echo, suffix and best_of"));
    for model in ["ol-model", "an-model"] {
        let mut r = chat(model);
        r.tools = vec![v1::Tool {
            strict: Some(true),
            ..weather_tool()
        }];
        cases.push((r, Code::FailedPrecondition, "strict"));
        let mut r = chat(model);
        r.messages[0].parts = vec![v1::ContentPart {
            part: Some(v1::content_part::Part::Image(v1::Image {
                source: Some(v1::image::Source::Data(b"png".to_vec().into())),
                mime_type: "image/png".into(),
                detail: "high".into(),
            })),
        }];
        r.messages[0].content.clear();
        cases.push((r, Code::FailedPrecondition, "detail"));
    }
    let mut r = chat("ol-model");
    r.messages[0].name = "alice".into();
    cases.push((r, Code::FailedPrecondition, "messages[0].name"));
    // A field of OpenAI's reference the router does not model goes to OpenAI-shaped
    // providers only (and to others through their pass_through).
    for model in ["ol-model", "an-model"] {
        let mut r = chat(model);
        r.extra = [("store".to_string(), "false".to_string())].into();
        cases.push((r, Code::FailedPrecondition, "store"));
    }
    let mut r = prompt("x");
    r.model = "ol-model".into();
    r.best_of = Some(2);
    cases.push((r, Code::FailedPrecondition, "best_of"));
    // Bad input, refused at the edge.
    let mut r = chat("oa-model");
    r.tools = vec![v1::Tool {
        parameters_json: "[1, 2]".into(),
        ..weather_tool()
    }];
    cases.push((r, Code::InvalidArgument, "tools[0].function.parameters"));
    let mut r = chat("oa-model");
    r.tools = vec![v1::Tool {
        parameters_json: "{not json".into(),
        ..weather_tool()
    }];
    cases.push((r, Code::InvalidArgument, "tools[0].parameters_json"));
    let mut r = chat("oa-model");
    r.tool_choice = Some(v1::ToolChoice {
        choice: Some(v1::tool_choice::Choice::Mode("sometimes".into())),
    });
    cases.push((r, Code::InvalidArgument, "tool_choice"));
    let mut r = chat("oa-model");
    r.tools = vec![weather_tool()];
    r.tool_choice = Some(v1::ToolChoice {
        choice: Some(v1::tool_choice::Choice::Function("nope".into())),
    });
    cases.push((r, Code::InvalidArgument, "tool_choice"));
    let mut r = chat("oa-model");
    r.messages.push(v1::ChatMessage {
        role: "tool".into(),
        content: "42".into(),
        tool_call_id: "c9".into(),
        ..Default::default()
    });
    cases.push((r, Code::InvalidArgument, "messages[1].tool_call_id"));
    let mut r = chat("oa-model");
    r.messages[0].parts = vec![v1::ContentPart {
        part: Some(v1::content_part::Part::Image(v1::Image {
            source: Some(v1::image::Source::Url(
                "data:image/png;base64,@@notbase64".into(),
            )),
            ..Default::default()
        })),
    }];
    r.messages[0].content.clear();
    cases.push((r, Code::InvalidArgument, "messages[0].parts[0]"));
    let mut r = chat("oa-model");
    r.messages[0].parts = vec![png(&[0u8; 1001])];
    r.messages[0].content.clear();
    cases.push((r, Code::InvalidArgument, "limits.max_image_bytes"));
    let mut r = chat("oa-model");
    r.messages[0].parts = vec![png(b"a"), png(b"b"), png(b"c")];
    r.messages[0].content.clear();
    cases.push((r, Code::InvalidArgument, "limits.max_images"));
    let mut r = prompt("x");
    r.model = "oa-model".into();
    r.tools = vec![weather_tool()];
    cases.push((r, Code::InvalidArgument, "tools"));

    for (req, code, names) in cases {
        let what = names.to_string();
        let e = router.client.complete(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(e.message().contains(names), "{what}: {}", e.message());
    }
    assert_eq!(
        (
            oa.stats().requests,
            ol.stats().requests,
            an.stats().requests
        ),
        (0, 0, 0),
        "nothing was sent upstream"
    );
}
