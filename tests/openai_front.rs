//! The OpenAI-compatible HTTP front through a real HTTP client on loopback, in front of real
//! mock providers: statuses and error bodies, keys, quotas, streams that break or are left.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{collections::HashMap, time::Duration};

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use common::*;
use serde_json::{Value, json};

/// A router with the HTTP front on a free port, more `server` settings, more top-level
/// sections `top`; `(router, base URL with /v1)`.
async fn front(
    server: &str,
    top: &str,
    providers: &str,
    env: HashMap<String, String>,
) -> (RunningRouter, String) {
    let port = free_port().await;
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\"{server}}}\n{top}{}providers:\n{providers}",
        cascade(0, 100, 60.0)
    );
    let router = start_with_env(&yaml, env).await;
    (router, format!("http://127.0.0.1:{port}/v1"))
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

async fn post(url: &str, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = reqwest::Client::new().post(url).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

/// The status, the error's `type` and `code`, and its message.
async fn error_of(r: reqwest::Response) -> (u16, String, Value, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    let e = &body["error"];
    (
        status,
        e["type"].as_str().unwrap().to_string(),
        e["code"].clone(),
        e["message"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn errors_come_in_openais_shape_with_the_matching_status() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let failing = MockServer::start(Script::failing(Fault::Status(500)))
        .await
        .unwrap();
    let hanging = MockServer::start(Script::failing(Fault::Hang))
        .await
        .unwrap();
    let providers = format!(
        "{}  - {{name: down, type: openai, base_url: \"{}/v1\", models: [broken]}}\n  - {{name: hangs, type: openai, base_url: \"{}/v1\", models: [slow]}}\n",
        openai("up", 1, &up.url()),
        failing.url(),
        hanging.url()
    );
    let (_router, base) = front("", "", &providers, HashMap::new()).await;
    let url = format!("{base}/chat/completions");

    let not_json = reqwest::Client::new()
        .post(&url)
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, kind, _, message) = error_of(not_json).await;
    assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
    assert!(message.contains("not a valid request body"), "{message}");

    let (status, _, _, message) = error_of(
        post(
            &url,
            &json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}),
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    assert!(message.contains("n: 3"), "{message}");

    let (status, kind, code, message) = error_of(post(&url, &chat("nope", "x"), &[]).await).await;
    assert_eq!(
        (status, kind.as_str(), code),
        (404, "invalid_request_error", json!("model_not_found"))
    );
    assert!(message.contains("\"nope\""), "{message}");

    let (status, kind, code, message) = error_of(post(&url, &chat("broken", "x"), &[]).await).await;
    assert_eq!(
        (status, kind.as_str(), code),
        (503, "server_error", json!("providers_unavailable"))
    );
    assert!(
        message.contains("down/broken: server error (HTTP 500"),
        "{message}"
    );

    let (status, kind, _, _) =
        error_of(post(&url, &chat("slow", "x"), &[("x-cascade-timeout-ms", "300")]).await).await;
    assert_eq!((status, kind.as_str()), (504, "timeout"));

    let (status, kind, code, message) =
        error_of(reqwest::get(format!("{base}/embeddings")).await.unwrap()).await;
    assert_eq!(
        (status, kind.as_str(), code),
        (404, "invalid_request_error", json!("unknown_endpoint"))
    );
    assert!(message.contains("POST /v1/chat/completions"), "{message}");

    let ok = post(&url, &chat("m", "fine"), &[]).await;
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        mock::reply("fine")
    );
    assert_eq!(up.stats().requests, 1);
}

#[tokio::test]
async fn keys_bound_who_may_call_and_which_models() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let providers = format!(
        "  - {{name: up, type: openai, base_url: \"{}/v1\", models: [m, other]}}\n",
        up.url()
    );
    let env = HashMap::from([(
        "KEY".to_string(),
        "sk-router-test-key-0123456789".to_string(),
    )]);
    let (_router, base) = front(
        ", auth: {keys: [{name: agent-a, key: \"${KEY}\", models: [m]}]}",
        "",
        &providers,
        env,
    )
    .await;
    let url = format!("{base}/chat/completions");
    let key = ("authorization", "Bearer sk-router-test-key-0123456789");

    let (status, kind, ..) = error_of(post(&url, &chat("m", "x"), &[]).await).await;
    assert_eq!((status, kind.as_str()), (401, "authentication_error"));
    let (status, ..) = error_of(
        post(
            &url,
            &chat("m", "x"),
            &[("authorization", "Bearer sk-wrong")],
        )
        .await,
    )
    .await;
    assert_eq!(status, 401);
    let (status, kind, ..) = error_of(post(&url, &chat("other", "x"), &[key]).await).await;
    assert_eq!((status, kind.as_str()), (403, "permission_error"));
    assert_eq!(post(&url, &chat("m", "x"), &[key]).await.status(), 200);

    let models: Value = reqwest::Client::new()
        .get(format!("{base}/models"))
        .header(key.0, key.1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models["data"],
        json!([{"id": "m", "object": "model", "created": 0, "owned_by": "cascade-router"}])
    );
    assert_eq!(
        up.stats().requests,
        1,
        "only the allowed call reached the provider"
    );
}

#[tokio::test]
async fn a_used_quota_is_429_with_retry_after() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let (_router, base) = front(
        ", quotas: {requests_per_minute: 1, burst: 1}",
        "",
        &openai("up", 1, &up.url()),
        HashMap::new(),
    )
    .await;
    let url = format!("{base}/completions");
    let body = json!({"model": "m", "prompt": "x", "user": "one-agent"});
    assert_eq!(post(&url, &body, &[]).await.status(), 200);
    let r = post(&url, &body, &[]).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let (status, kind, code, _) = error_of(r).await;
    assert_eq!(
        (status, kind.as_str(), code),
        (429, "rate_limit_error", json!("quota_exceeded"))
    );
}

#[tokio::test]
async fn headers_say_where_the_answer_came_from() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let (_router, base) = front(
        "",
        "cache: {}\n",
        &openai("up", 1, &up.url()),
        HashMap::new(),
    )
    .await;
    let url = format!("{base}/completions");
    let body = json!({"model": "m", "prompt": ["a", "b", "c"], "temperature": 0});
    let r = post(&url, &body, &[("x-request-id", "my-id")]).await;
    let h = r.headers().clone();
    assert_eq!(h["x-cascade-provider"], "up, up, up");
    assert_eq!(h["x-cascade-attempts"], "0");
    assert_eq!(h["x-request-id"], "my-id");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], "cmpl-my-id");
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [mock::reply("a"), mock::reply("b"), mock::reply("c")]
    );
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["prompt_tokens"].as_u64().unwrap()
            + v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(h["x-cascade-cached"], "false, false, false");

    let again = post(&url, &body, &[]).await;
    assert_eq!(again.headers()["x-cascade-cached"], "true, true, true");
    assert_eq!(
        up.stats().items,
        3,
        "the second request came from the cache"
    );
}

#[tokio::test]
async fn a_stream_that_breaks_ends_with_an_error_event_and_no_done() {
    let breaking = MockServer::start(Script::failing(Fault::BreakMidStream))
        .await
        .unwrap();
    let (_router, base) = front(
        "",
        "",
        &openai("breaks", 1, &breaking.url()),
        HashMap::new(),
    )
    .await;
    let mut body = chat("m", "this will break");
    body["stream"] = json!(true);
    let r = post(&format!("{base}/chat/completions"), &body, &[]).await;
    assert_eq!(r.status(), 200, "the stream had begun");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let contents: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(contents, ["mock ", "reply "]);
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "stream_broken", "{text}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("after 2 chunks"),
        "{last}"
    );
    assert!(!text.contains("[DONE]"), "no [DONE] after a break: {text}");
}

#[tokio::test]
async fn a_client_leaving_a_stream_closes_the_upstream_request() {
    let slow = MockServer::start(Script {
        chunk_interval: Duration::from_secs(3600),
        ..Script::default()
    })
    .await
    .unwrap();
    let (_router, base) = front("", "", &openai("slow", 1, &slow.url()), HashMap::new()).await;
    let mut body = chat("m", "long answer");
    body["stream"] = json!(true);
    let mut r = post(&format!("{base}/chat/completions"), &body, &[]).await;
    let first = within(r.chunk()).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"content\":\"mock \""));
    assert_eq!((slow.stats().completed, slow.stats().cancelled), (0, 0));
    drop(r);
    within(slow.wait_for(|s| s.cancelled == 1)).await;
}

#[tokio::test]
async fn tools_and_refused_fields_over_http_in_openais_shape() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let (router, base) = front("", "", &openai("up", 1, &up.url()), HashMap::new()).await;
    let url = format!("{base}/chat/completions");
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    let mut ask = chat("m", "find it");
    ask["tools"] = tools.clone();
    let r: Value = post(&url, &ask, &[]).await.json().await.unwrap();
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "lookup");
    assert_eq!(
        call["function"]["arguments"],
        json!({"text": "find it"}).to_string()
    );

    // Streamed: OpenAI's delta.tool_calls pieces, put together by index.
    ask["stream"] = json!(true);
    let sse = post(&url, &ask, &[]).await.text().await.unwrap();
    let (mut name, mut args, mut finish) = (String::new(), String::new(), String::new());
    for data in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let c = &chunk["choices"][0];
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
        for piece in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(piece["index"], 0);
            name.push_str(piece["function"]["name"].as_str().unwrap_or_default());
            args.push_str(piece["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    assert_eq!((name.as_str(), finish.as_str()), ("lookup", "tool_calls"));
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"text": "find it"})
    );

    // Log probabilities come back in the choice, as the provider gave them.
    let mut with_logprobs = chat("m", "x");
    with_logprobs["logprobs"] = json!(true);
    let r: Value = post(&url, &with_logprobs, &[]).await.json().await.unwrap();
    assert_eq!(
        r["choices"][0]["logprobs"],
        *cascade_devtools::conversation::LOGPROBS
    );
    assert_eq!(up.last_body().unwrap()["logprobs"], json!(true));

    // Refused by name, counted like any other call, nothing sent upstream.
    let before = up.stats().requests;
    let mut audio = chat("m", "x");
    audio["audio"] = json!({"voice": "alloy", "format": "mp3"});
    let r = post(&url, &audio, &[]).await;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "audio");
    for (field, value) in [
        ("modalities", json!(["text", "audio"])),
        ("web_search_options", json!({})),
        ("n", json!(2)),
        (
            "tools",
            json!([{"type": "custom", "custom": {"name": "x"}}]),
        ),
    ] {
        let mut body = chat("m", "x");
        body[field] = value;
        let (status, _, _, message) = error_of(post(&url, &body, &[]).await).await;
        assert_eq!(status, 400, "{field}: {message}");
        assert!(message.starts_with(field), "{field}: {message}");
    }
    let mut top_k = chat("m", "x");
    top_k["top_k"] = json!(5);
    let (status, _, code, message) = error_of(post(&url, &top_k, &[]).await).await;
    assert_eq!((status, code), (400, json!("unsupported")));
    assert!(
        message.contains("top_k") && message.contains("pass_through"),
        "{message}"
    );
    assert_eq!(up.stats().requests, before);
    let counted = |code: &str| {
        metric(
            &router,
            &format!(r#"cascade_requests_total{{method="ChatCompletions",code="{code}"}}"#),
        )
    };
    let not_json = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status().as_u16(), 400);
    assert_eq!(counted("InvalidArgument"), 6.0, "every refusal is counted");
    assert_eq!(counted("FailedPrecondition"), 1.0);
}
