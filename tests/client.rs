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
    check(&read_lines(&out), &want);
    let kept_lines: Vec<&(Value, Result<String, ()>)> = want[..kept].iter().collect();
    let resent = want[kept..]
        .iter()
        .filter(|(id, a)| !(a.is_err() && id.is_u64()))
        .count();
    assert_eq!(
        up.stats().items as usize,
        resent,
        "only the {} unanswered lines went upstream again ({} were done)",
        500 - kept,
        kept_lines.len()
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
