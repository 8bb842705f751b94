//! The agent side through the real binary: `cascade-router complete` and `cascade-router
//! batch` against a running router in front of the mock provider.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use cascade_devtools::mock::{self, MockServer, Script};
use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cascade-router");

/// The router in front of one mock that refuses (400) any prompt containing "REJECT".
async fn router(script: Script) -> (RunningRouter, MockServer) {
    let up = MockServer::start(Script {
        reject_marker: Some("REJECT".into()),
        ..script
    })
    .await
    .unwrap();
    let yaml = format!(
        "{}providers:\n{}",
        cascade(0, 1000, 60.0),
        openai("up", 1, &up.url())
    );
    (start(&yaml).await, up)
}

fn addr(r: &RunningRouter) -> String {
    format!("http://{}", r.addr)
}

/// Runs the binary to the end, off the async runtime.
async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// 500 input lines: JSON objects with string ids, plain-text lines, prompts the provider
/// refuses, and malformed lines. Returns the file and, per line, what its answer must be:
/// `Ok(text)` or `Err(())` for an error line, with the id it must carry.
/// Per input line: the id its answer must carry, and its text (`None`: an error line).
type Expected = Vec<(Value, Result<String, ()>)>;

fn input(dir: &Path) -> (PathBuf, Expected) {
    let mut text = String::new();
    let mut want = Vec::new();
    for i in 1..=500 {
        match i % 10 {
            3 => {
                text.push_str(&format!("plain prompt {i}\n"));
                want.push((
                    Value::from(i),
                    Ok(mock::reply(&format!("plain prompt {i}"))),
                ));
            }
            7 => {
                text.push_str(&format!(
                    "{{\"id\": \"t-{i}\", \"prompt\": \"REJECT {i}\"}}\n"
                ));
                want.push((Value::from(format!("t-{i}")), Err(())));
            }
            9 if i % 20 == 9 => {
                text.push_str(&format!("{{\"id\": \"t-{i}\", \"prompt\": oops}}\n"));
                want.push((Value::from(i), Err(())));
            }
            _ => {
                text.push_str(&format!(
                    "{{\"id\": \"t-{i}\", \"prompt\": \"item {i}\", \"model\": \"m\"}}\n"
                ));
                want.push((
                    Value::from(format!("t-{i}")),
                    Ok(mock::reply(&format!("item {i}"))),
                ));
            }
        }
    }
    let path = dir.join("in.jsonl");
    std::fs::write(&path, text).unwrap();
    (path, want)
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn check(lines: &[Value], want: &Expected) {
    assert_eq!(lines.len(), want.len(), "one answer per input line");
    for (line, (id, answer)) in lines.iter().zip(want) {
        assert_eq!(&line["id"], id, "in input order: {line}");
        match answer {
            Ok(text) => assert_eq!(line["text"], text.as_str(), "{line}"),
            Err(()) => {
                let code = line["error"]["code"].as_str().unwrap_or_default();
                assert!(
                    ["INVALID_ARGUMENT", "UNAVAILABLE"].contains(&code),
                    "an error in place: {line}"
                );
            }
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cascade-client-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_answers_every_line_in_order_with_errors_in_place() {
    let (router, up) = router(Script::default()).await;
    let dir = temp_dir("batch");
    let (input, want) = input(&dir);
    let out = dir.join("out.jsonl");
    let done = run(strings(&[
        "batch",
        "--addr",
        &addr(&router),
        "--model",
        "m",
        "--output",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ]))
    .await;
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(1), "some lines failed: {stderr}");
    check(&read_lines(&out), &want);
    let failed = want.iter().filter(|(_, a)| a.is_err()).count();
    assert!(
        stderr.contains("500 of 500 lines") && stderr.contains(&format!("{failed} failed")),
        "the summary: {stderr}"
    );
    let malformed = want
        .iter()
        .filter(|(id, a)| a.is_err() && id.is_u64())
        .count();
    assert_eq!(
        up.stats().items as usize,
        500 - malformed,
        "every well-formed line went upstream once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_after_a_kill_sends_only_what_was_not_answered() {
    // Slow enough that the run is still going when it is killed: 50 calls of 10 prompts,
    // one at a time, 20 ms each.
    let (first, _first_up) = router(Script {
        base_latency: std::time::Duration::from_millis(20),
        ..Script::default()
    })
    .await;
    // The resumed run goes through a router and mock of its own, so that what the killed
    // run's last call still sent upstream (it was in flight at the kill) is not counted.
    let (second, up) = router(Script::default()).await;
    let dir = temp_dir("resume");
    let (input, want) = input(&dir);
    let out = dir.join("out.jsonl");
    let args = strings(&[
        "batch",
        "--addr",
        &addr(&first),
        "--model",
        "m",
        "--concurrency",
        "1",
        "--chunk",
        "10",
        "--output",
        out.to_str().unwrap(),
        "--resume",
        input.to_str().unwrap(),
    ]);
    let mut child = Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once about half the answers are written (waiting on the file, not the clock).
    let written = |p: &Path| {
        std::fs::read(p)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0)
    };
    let watched = out.clone();
    tokio::task::spawn_blocking(move || {
        while written(&watched) < 250 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    })
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = written(&out);
    assert!(kept < 500, "killed before the end ({kept} lines)");

    let first_addr = addr(&first);
    let args = args
        .into_iter()
        .map(|a| if a == first_addr { addr(&second) } else { a })
        .collect();
    let done = run(args).await;
    assert_eq!(
        done.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    // The kept lines stay first, in input order; the resumed ones follow in input order, with
    // the kept lines whose answer was a transient error (the provider's 400s come back as
    // UNAVAILABLE) asked again among them: one line per id in all.
    let lines = read_lines(&out);
    let by_id: std::collections::HashMap<String, &Value> =
        lines.iter().map(|l| (l["id"].to_string(), l)).collect();
    assert_eq!(by_id.len(), lines.len(), "one line per id");
    let in_order: Vec<Value> = want
        .iter()
        .map(|(id, _)| (*by_id.get(&id.to_string()).unwrap()).clone())
        .collect();
    check(&in_order, &want);
    let transient = |(id, a): &&(Value, Result<String, ()>)| a.is_err() && !id.is_u64();
    let asked_again = want[..kept].iter().filter(transient).count();
    let resent = want[kept..]
        .iter()
        .filter(|(id, a)| !(a.is_err() && id.is_u64()))
        .count();
    assert_eq!(
        up.stats().items as usize,
        resent + asked_again,
        "only the {} unanswered lines and the {asked_again} transient failures went upstream again",
        500 - kept,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_prints_the_text_or_the_whole_response() {
    let (router, _up) = router(Script::default()).await;
    let plain = run(strings(&[
        "complete",
        "--addr",
        &addr(&router),
        "--model",
        "m",
        "hello there",
    ]))
    .await;
    assert!(plain.status.success());
    assert_eq!(
        String::from_utf8(plain.stdout).unwrap(),
        format!("{}\n", mock::reply("hello there"))
    );
    let json = run(strings(&[
        "complete",
        "--addr",
        &addr(&router),
        "--model",
        "m",
        "--json",
        "hello there",
    ]))
    .await;
    assert!(json.status.success());
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["text"], mock::reply("hello there").as_str());
    assert_eq!(
        (v["provider"].as_str(), v["model"].as_str()),
        (Some("up"), Some("m"))
    );

    let refused = run(strings(&[
        "complete",
        "--addr",
        &addr(&router),
        "--model",
        "m",
        "REJECT me",
    ]))
    .await;
    assert_ne!(refused.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_with_the_router_down_exits_3_with_one_line() {
    let down = refused_url().await;
    let out = run(strings(&["complete", "--addr", &down, "hello"])).await;
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach the router"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_sends_images_tools_and_a_response_format() {
    let (router, up) = router(Script::default()).await;
    let dir = temp_dir("complete-tools");
    let image = dir.join("cat.png");
    std::fs::write(&image, b"\x89PNG fake").unwrap();
    let tools = dir.join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "lookup", "description": "Find it", "parameters": {"type": "object"}}}]"#,
    )
    .unwrap();
    let out = run(strings(&[
        "complete",
        "--addr",
        &addr(&router),
        "--model",
        "m",
        "--image",
        image.to_str().unwrap(),
        "--tools",
        tools.to_str().unwrap(),
        "--response-format",
        "json",
        "what is this",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The model called the tool: one JSON line per call.
    let call: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(call["name"], "lookup");
    assert_eq!(call["arguments"], r#"{"text":"what is this"}"#);
    let body = up.last_body().unwrap();
    let content = &body["messages"][0]["content"];
    assert_eq!(
        content[0],
        serde_json::json!({"type": "text", "text": "what is this"})
    );
    assert_eq!(
        content[1]["image_url"]["url"],
        "data:image/png;base64,iVBORyBmYWtl"
    );
    assert_eq!(body["tools"][0]["function"]["description"], "Find it");
    assert_eq!(
        body["response_format"],
        serde_json::json!({"type": "json_object"})
    );

    // A schema file: json_schema named after the file; a file of another type: usage (2).
    let schema = dir.join("place.json");
    std::fs::write(&schema, r#"{"type": "object"}"#).unwrap();
    let out = run(strings(&[
        "complete",
        "--addr",
        &addr(&router),
        "--model",
        "m",
        "--response-format",
        schema.to_str().unwrap(),
        "where",
    ]))
    .await;
    assert!(out.status.success());
    assert_eq!(
        up.last_body().unwrap()["response_format"]["json_schema"]["name"],
        "place"
    );
    let bad = run(strings(&[
        "complete",
        "--addr",
        &addr(&router),
        "--image",
        tools.to_str().unwrap(),
        "x",
    ]))
    .await;
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_lines_carry_tools_and_refusals_keep_their_ids() {
    let (router, up) = router(Script::default()).await;
    let dir = temp_dir("batch-tools");
    let input = dir.join("in.jsonl");
    std::fs::write(
        &input,
        [
            r#"{"id": "call", "model": "m", "messages": [{"role": "user", "content": "find"}], "tools": [{"type": "function", "function": {"name": "lookup"}}]}"#,
            r#"{"id": "json", "model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}"#,
            r#"{"id": "bad-choice", "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}"#,
            r#"{"id": "bad-key", "model": "m", "prompt": "x", "toolz": []}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.join("out.jsonl");
    let done = run(strings(&[
        "batch",
        "--addr",
        &addr(&router),
        "--output",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(done.status.code(), Some(1), "two lines failed");
    let lines = read_lines(&out);
    assert_eq!(lines[0]["id"], "call");
    assert_eq!(lines[0]["tool_calls"][0]["function"]["name"], "lookup");
    assert_eq!(
        lines[1]["text"],
        serde_json::json!({"reply": mock::reply("hi")}).to_string()
    );
    assert_eq!(
        (lines[2]["id"].as_str(), lines[2]["error"]["code"].as_str()),
        (Some("bad-choice"), Some("INVALID_ARGUMENT"))
    );
    assert!(
        lines[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tool_choice")
    );
    assert_eq!(
        lines[3]["id"], "bad-key",
        "a line this reader refuses keeps its id"
    );
    assert!(
        lines[3]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("toolz")
    );
    assert_eq!(up.stats().requests, 2);

    // Two lines with one id: refused before anything is sent, naming both lines.
    let dup = dir.join("dup.jsonl");
    std::fs::write(
        &dup,
        "{\"id\": 7, \"prompt\": \"a\"}\nplain\n{\"id\": 7, \"prompt\": \"b\"}\n",
    )
    .unwrap();
    let refused = run(strings(&[
        "batch",
        "--addr",
        &addr(&router),
        dup.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8(refused.stderr).unwrap();
    assert!(stderr.contains("lines 1 and 3"), "{stderr}");
    assert_eq!(up.stats().requests, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_asks_again_what_failed_for_a_transient_reason() {
    let (router, up) = router(Script::failing(mock::Fault::Status(503))).await;
    let dir = temp_dir("batch-transient");
    let input = dir.join("in.jsonl");
    // Line 5 is refused by the router itself (INVALID_ARGUMENT): not transient.
    let text: String = (0..6)
        .map(|i| match i {
            5 => format!("{{\"id\": {i}, \"prompt\": \"item {i}\", \"temperature\": 3}}\n"),
            _ => format!("{{\"id\": {i}, \"prompt\": \"item {i}\"}}\n"),
        })
        .collect();
    std::fs::write(&input, text).unwrap();
    let out = dir.join("out.jsonl");
    let args = |resume: bool| {
        let mut a = strings(&[
            "batch",
            "--addr",
            &addr(&router),
            "--model",
            "m",
            "--output",
            out.to_str().unwrap(),
        ]);
        if resume {
            a.push("--resume".into());
        }
        a.push(input.to_str().unwrap().into());
        a
    };
    let first = run(args(false)).await;
    assert_eq!(first.status.code(), Some(1));
    let codes: Vec<Value> = read_lines(&out)
        .iter()
        .map(|l| l["error"]["code"].clone())
        .collect();
    assert_eq!(codes[..5], vec![Value::from("UNAVAILABLE"); 5][..]);
    assert_eq!(codes[5], "INVALID_ARGUMENT");
    // The provider is back: the transient failures are asked again, once each.
    up.set_script(Script::default());
    let before = up.stats().requests;
    let again = run(args(true)).await;
    assert_eq!(
        again.status.code(),
        Some(0),
        "everything asked again was answered (the refused line was not asked)"
    );
    assert_eq!(
        up.stats().requests,
        before + 5,
        "the five transient failures, once each"
    );
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 6, "one line per id: {lines:?}");
    assert_eq!(lines[0]["id"], 5, "the permanent failure is kept");
    assert_eq!(lines[0]["error"]["code"], "INVALID_ARGUMENT");
    for l in &lines[1..] {
        assert_eq!(
            l["text"],
            mock::reply(&format!("item {}", l["id"])).as_str(),
            "{l}"
        );
    }
    // A third run has nothing left to ask.
    let before = up.stats().requests;
    run(args(true)).await;
    assert_eq!(up.stats().requests, before);
    assert_eq!(read_lines(&out).len(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_that_runs_out_of_its_own_time_exits_4() {
    // A server that never answers: the client's own timer ends the call.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(cascade_devtools::load::bare::serve(listener, true));
    let out = run(strings(&[
        "complete",
        "--addr",
        &format!("http://{addr}"),
        "--timeout",
        "0.2",
        "hello",
    ]))
    .await;
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("DEADLINE_EXCEEDED"), "{stderr}");
}
