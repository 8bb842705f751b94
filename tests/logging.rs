//! A request's debug log lines carry its request_id from the gRPC edge to the provider call —
//! unbatched and through a batch queue — in both log formats, and prompts are not logged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade_devtools::mock::{Fault, MockServer, Script};
use cascade_router::proto::v1::{self, router_client::RouterClient};
use common::{Served, temp_file};

const PROMPT: &str = "a private prompt that must stay out of the logs";

async fn ask(client: &mut RouterClient<tonic::transport::Channel>, model: &str, id: &str) {
    let r = client
        .complete(v1::CompleteRequest {
            model: model.into(),
            prompt: PROMPT.into(),
            request_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.request_id, id);
}

/// The messages of the lines that carry `id`.
fn messages_of<'a>(lines: &'a [String], id: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.contains(id)).collect()
}

async fn request_ids_reach_the_provider_call(format: &str) -> Vec<String> {
    let mock = MockServer::start(Script::default()).await.unwrap();
    let config = format!(
        "providers:\n  - name: up\n    type: openai\n    base_url: \"{}/v1\"\n    models:\n      - m\n      - {{name: b, batching: {{max_batch_size: 4, max_wait_ms: 1}}}}\n",
        mock.url()
    );
    let path = temp_file("logging", &config);
    let served = Served::start(&["--log-format", format], &path, "cascade_router=debug");
    let mut client = served.client().await;
    ask(&mut client, "m", "trace-unbatched-1").await;
    ask(&mut client, "b", "trace-batched-2").await;
    let lines = served.finish();

    for (id, provider_line) in [
        ("trace-unbatched-1", "upstream request sent"),
        ("trace-batched-2", "batch answered"),
    ] {
        let mine = messages_of(&lines, id);
        for needle in ["request received", provider_line, "answered"] {
            assert!(
                mine.iter().any(|l| l.contains(needle)),
                "no {needle:?} line with {id} in {format} logs:\n{}",
                lines.join("\n")
            );
        }
    }
    assert!(
        !lines.iter().any(|l| l.contains(PROMPT)),
        "a prompt was logged"
    );
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_carry_the_request_id_to_the_provider_call() {
    let lines = request_ids_reach_the_provider_call("text").await;
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "no colours when stderr is not a terminal"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_the_request_id_to_the_provider_call() {
    let lines = request_ids_reach_the_provider_call("json").await;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    let sent = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "upstream request sent")
        .expect("an upstream request line");
    assert_eq!(sent["span"]["request_id"], "trace-unbatched-1", "{sent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_and_completions_are_logged_only_when_asked() {
    let mock = MockServer::start(Script::default()).await.unwrap();
    let config = format!(
        "server: {{log_prompts: true}}\nproviders:\n  - {{name: up, type: openai, base_url: \"{}/v1\", models: [m]}}\n",
        mock.url()
    );
    let path = temp_file("log-prompts", &config);
    let served = Served::start(&[], &path, "info");
    let mut client = served.client().await;
    ask(&mut client, "m", "asked-to-log-1").await;
    let lines = served.finish();
    let with = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(with(PROMPT), "the prompt, at info:\n{}", lines.join("\n"));
    assert!(
        with(&cascade_devtools::mock::reply(PROMPT)),
        "the completion:\n{}",
        lines.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_refusing_our_key_is_warned_about_once_not_per_request() {
    let mock = MockServer::start(Script::failing(Fault::Status(401)))
        .await
        .unwrap();
    // The breaker stays closed throughout, so every call reaches the provider.
    let config = format!(
        "cascade: {{max_retries_per_provider: 0, circuit_breaker: {{failure_threshold: 1000}}}}\nproviders:\n  - {{name: up, type: openai, base_url: \"{}/v1\", models: [m]}}\n",
        mock.url()
    );
    let path = temp_file("log-repeats", &config);
    let served = Served::start(&[], &path, "info");
    let mut client = served.client().await;
    let calls = 30;
    for _ in 0..calls {
        let e = client
            .complete(v1::CompleteRequest {
                model: "m".into(),
                prompt: PROMPT.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
    let lines = served.finish();
    assert_eq!(
        mock.stats().requests,
        calls,
        "each call reached the provider"
    );
    let warned = lines
        .iter()
        .filter(|l| l.contains("refused our credentials"))
        .count();
    // One line per 10 s at most: the first at once, another only if the calls took longer.
    assert!(
        (1..5).contains(&warned),
        "{warned} warnings for {calls} refusals:\n{}",
        lines.join("\n")
    );
}
