//! The README's curl examples, run as written against `cascade-router serve --config
//! cascade.yaml` (the real binary; only the ports are made free ones).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;

const README: &str = include_str!("../README.md");
const CASCADE_YAML: &str = include_str!("../cascade.yaml");
const MARKER: &str = "<!-- readme-curl:";
const WRITTEN_PORT: &str = "127.0.0.1:8088";

/// The fenced block after the marker.
fn curl_block() -> String {
    let after = &README[README.find(MARKER).expect("the README's curl marker")..];
    let start = after.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
    let end = after[start..].find("```").expect("the block's end");
    after[start..start + end].to_string()
}

#[test]
fn the_readme_curl_examples_work_as_written() {
    let block = curl_block();
    assert!(
        block.contains(WRITTEN_PORT),
        "the examples use {WRITTEN_PORT}"
    );
    assert!(
        CASCADE_YAML.contains(&format!("http_listen: \"{WRITTEN_PORT}\"")),
        "cascade.yaml serves the HTTP front where the README says"
    );
    let config = temp_file(
        "cascade.yaml",
        &CASCADE_YAML.replace(WRITTEN_PORT, "127.0.0.1:0"),
    );
    let mut served = Served::start_with_env(
        &[],
        &config,
        "info",
        &[
            ("OPENAI_API_KEY", ""),
            ("ANTHROPIC_API_KEY", ""),
            ("XAI_API_KEY", ""),
        ],
    );
    let line = served.wait_for_line("OpenAI-compatible HTTP front listening");
    let at = line.find("127.0.0.1:").unwrap();
    let addr: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();

    let out = Command::new("bash")
        .args([
            "-euo",
            "pipefail",
            "-c",
            &block.replace(WRITTEN_PORT, &addr),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        r#""content":"[simulated] you said: Say hello""#,
        r#""delta":{"content":"you ","role":"assistant"}"#,
        "data: [DONE]",
        "[simulated] you said: first prompt",
        "[simulated] you said: second prompt",
        "x-cascade-provider: simulated",
        r#""id":"simulated""#,
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    served.finish();
}
