//! The README's curl and client examples, run as written against `cascade-router serve
//! --config cascade.yaml` (the real binary; only the ports are made free ones).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;

const README: &str = include_str!("../README.md");
const CASCADE_YAML: &str = include_str!("../cascade.yaml");
const WRITTEN_PORT: &str = "127.0.0.1:8088";

/// The fenced block after `marker`.
fn block_after(marker: &str) -> String {
    let after = &README[README.find(marker).expect("the README's marker")..];
    let start = after.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
    let end = after[start..].find("```").expect("the block's end");
    after[start..start + end].to_string()
}

/// Runs `command`; its stdout, once it has succeeded (else its output in the failure).
fn succeeds(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `serve --config cascade.yaml` on free ports, without the hosted providers' keys (so only
/// loopback and the simulated provider are reached).
fn serve_cascade_yaml() -> Served {
    let config = temp_file(
        "cascade.yaml",
        &CASCADE_YAML.replace(WRITTEN_PORT, "127.0.0.1:0"),
    );
    Served::start_with_env(
        &[],
        &config,
        "info",
        &[
            ("OPENAI_API_KEY", ""),
            ("ANTHROPIC_API_KEY", ""),
            ("XAI_API_KEY", ""),
        ],
    )
}

#[test]
fn the_readme_curl_examples_work_as_written() {
    let block = block_after("<!-- readme-curl:");
    assert!(
        block.contains(WRITTEN_PORT),
        "the examples use {WRITTEN_PORT}"
    );
    assert!(
        CASCADE_YAML.contains(&format!("http_listen: \"{WRITTEN_PORT}\"")),
        "cascade.yaml serves the HTTP front where the README says"
    );
    let mut served = serve_cascade_yaml();
    let line = served.wait_for_line("OpenAI-compatible HTTP front listening");
    let at = line.find("127.0.0.1:").unwrap();
    let addr: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();

    let mut bash = Command::new("bash");
    bash.args([
        "-euo",
        "pipefail",
        "-c",
        &block.replace(WRITTEN_PORT, &addr),
    ]);
    let stdout = succeeds(&mut bash);
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

/// The client block (`complete`, `batch`), run in a directory holding the files it names
/// (`cat.png`, `tools.json`, `prompts.jsonl`), with the binary on `PATH` and
/// `CASCADE_ROUTER_ADDR` naming the router's free port.
#[test]
fn the_readme_client_examples_work_as_written() {
    let block = block_after("<!-- readme-client:");
    let served = serve_cascade_yaml();
    let dir = std::env::temp_dir().join(format!("cascade-readme-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A 1×1 PNG.
    let png = [
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d, 0x49, 0x48, 0x44, 0x52, 0,
        0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0, 0x1f, 0x15, 0xc4, 0x89, 0, 0, 0, 0x0d, 0x49, 0x44,
        0x41, 0x54, 0x78, 0xda, 0x63, 0x64, 0xf8, 0xcf, 0x50, 0x0f, 0, 0x03, 0x86, 0x01, 0x80,
        0x5a, 0x34, 0x7d, 0x6b, 0, 0, 0, 0, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    std::fs::write(dir.join("cat.png"), png).unwrap();
    std::fs::write(
        dir.join("tools.json"),
        r#"[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("prompts.jsonl"),
        "{\"id\": \"a\", \"prompt\": \"first\"}\n{\"id\": \"b\", \"prompt\": \"second\"}\n",
    )
    .unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_cascade-router"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bash = Command::new("bash");
    bash.args(["-euo", "pipefail", "-c", &block])
        .current_dir(&dir)
        .env("PATH", path)
        .env("CASCADE_ROUTER_ADDR", format!("http://{}", served.addr));
    let stdout = succeeds(&mut bash);
    for want in [
        "[simulated] you said: Summarise: the build is red since 10:02",
        r#""provider":"simulated""#,
        r#""name":"lookup""#,
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    let answers = std::fs::read_to_string(dir.join("answers.jsonl")).unwrap();
    assert_eq!(answers.lines().count(), 2, "{answers}");
    assert!(
        answers.contains("[simulated] you said: second"),
        "{answers}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    served.finish();
}

/// The README's diagram of the request's path is the one `src/lib.rs` opens with.
#[test]
fn the_readme_diagram_is_the_module_maps() {
    let lib = include_str!("../src/lib.rs");
    let lib: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let diagram = |text: &str| {
        let start = text.find("```text\n").expect("a text diagram") + "```text\n".len();
        let end = text[start..].find("```").expect("its end");
        text[start..start + end].to_string()
    };
    assert_eq!(diagram(README), diagram(&lib));
    for module in [
        "front/grpc",
        "front/openai",
        "front/edge",
        "router",
        "cache",
        "coalescer",
        "cascade",
        "upstream",
        "provider",
    ] {
        assert!(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src")
                .join(module)
                .with_extension("rs")
                .exists()
                || std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("src")
                    .join(module)
                    .is_dir(),
            "the diagram names src/{module}, which is not there"
        );
    }
}
