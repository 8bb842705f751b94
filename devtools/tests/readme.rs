//! The README's mock-provider command, run as written (only its port made a free one): the
//! mock starts, and answers chat completions with the scripted fault rate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

const README: &str = include_str!("../../README.md");
const WRITTEN: &str = "127.0.0.1:8089";

/// The arguments after `--bin cascade-bench --` on the README's mock-provider line, its
/// continuation lines joined and comments dropped.
fn readme_args() -> Vec<String> {
    let at = README
        .find("mock-provider --listen")
        .expect("the README's mock command");
    let start = README[..at].rfind("-- ").expect("the cargo run separator") + 3;
    let mut text = String::new();
    for line in README[start..].lines() {
        let code = line.split(" #").next().unwrap_or("").trim_end();
        match code.strip_suffix('\\') {
            Some(more) => text.push_str(more),
            None => {
                text.push_str(code);
                break;
            }
        }
        text.push(' ');
    }
    text.split_whitespace().map(str::to_string).collect()
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_readme_mock_provider_command_works_as_written() {
    let args = readme_args();
    assert_eq!(args.first().map(String::as_str), Some("mock-provider"));
    assert!(args.iter().any(|a| a == WRITTEN), "{args:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let args: Vec<String> = args
        .into_iter()
        .map(|a| if a == WRITTEN { addr.clone() } else { a })
        .collect();
    let _mock = Killed(
        Command::new(env!("CARGO_BIN_EXE_cascade-bench"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Listening: an event, bounded.
    tokio::time::timeout(Duration::from_secs(20), async {
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the mock listens");
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for i in 0..20 {
        let r = client
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": format!("hi {i}")}]}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 500),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
}
