//! The cascade file: an unchanged Python-router providers.yaml loads and routes as described,
//! and each unusable file fails at start with one line and exit code 2.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use cascade_router::{
    config,
    proto::v1::{self, FailureKind},
};
use common::*;
use tonic::Code;

const FIXTURE: &str = include_str!("fixtures/providers.yaml");
const VLLM_KEY: &str = "vllm-secret-key-123";

fn env(ollama: &str, vllm: &str) -> HashMap<String, String> {
    HashMap::from([
        ("OLLAMA_URL".to_string(), ollama.to_string()),
        ("VLLM_URL".to_string(), vllm.to_string()),
        ("VLLM_API_KEY".to_string(), VLLM_KEY.to_string()),
    ])
}

#[test]
fn a_bad_price_or_budget_fails_at_load_naming_its_key() {
    let provider = "providers:\n  - {name: p, type: simulated, models: [{name: m, price: {input_per_million: 1, output_per_million: 1}}]";
    for (yaml, key) in [
        (
            format!("cost_tracking: {{budget_daily_usd: -1}}\n{provider}}}\n"),
            "cost_tracking.budget_daily_usd",
        ),
        (
            format!("cost_tracking: {{budget_daily_usd: .nan}}\n{provider}}}\n"),
            "cost_tracking.budget_daily_usd",
        ),
        (
            format!("{provider}, budget: {{daily_usd: 5000000}}}}\n"),
            "providers[0].budget.daily_usd",
        ),
        (
            format!("cost_tracking: {{alert_threshold_percent: 120}}\n{provider}}}\n"),
            "cost_tracking.alert_threshold_percent",
        ),
        (
            "providers:\n  - {name: p, type: simulated, models: [{name: m, price: {input_per_million: 1e9, output_per_million: 1}}]}\n".to_string(),
            "providers[0].models[0].price.input_per_million",
        ),
    ] {
        let e = config::parse(&yaml, "c.yaml", &|_| None).unwrap_err().to_string();
        assert!(e.starts_with(&format!("c.yaml: {key}: ")), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    let text = config::parse("cost_tracking: {budget_daily_usd: \"ten\"}\nproviders: [{name: p, type: simulated, models: [m]}]\n", "c.yaml", &|_| None)
        .unwrap_err()
        .to_string();
    assert!(text.contains("budget_daily_usd"), "{text}");
}

#[test]
fn python_providers_yaml_loads_with_warnings_and_no_secrets() {
    let vars = env("http://127.0.0.1:1", "http://127.0.0.1:2");
    let c = config::parse(FIXTURE, "providers.yaml", &|k| vars.get(k).cloned()).unwrap();

    let names: Vec<&str> = c.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["ollama-local", "vllm-gpu"]);
    let warnings = c.warnings.join("\n");
    for needle in [
        "${OPENAI_API_KEY} is unset",
        "${XAI_API_KEY} is unset",
        "\"airllm\"",
        "sections not used by this router: custom_models, metrics, multimodal",
        "cost_tracking.monthly_budget_usd is not enforced",
    ] {
        assert!(
            warnings.contains(needle),
            "no warning with {needle:?} in:\n{warnings}"
        );
    }
    assert!(
        !warnings.contains("ANTHROPIC"),
        "a disabled provider's unset key is not worth a warning"
    );
    assert!(!warnings.contains(VLLM_KEY));
    assert!(
        !format!("{c:?}").contains(VLLM_KEY),
        "Debug output leaks the key"
    );
    assert_eq!(
        c.providers[1].api_key.as_ref().map(|k| k.expose()),
        Some(VLLM_KEY)
    );
    assert_eq!(
        c.providers[0].models[0], "llama3.2:3b",
        "the default model comes first"
    );
}

#[tokio::test]
async fn python_providers_yaml_routes_models_chains_and_agents() {
    let ollama = MockServer::start(Script::default()).await.unwrap();
    let vllm = MockServer::start(Script::default()).await.unwrap();
    let mut router = start_with_env(FIXTURE, env(&ollama.url(), &vllm.url())).await;
    let ask = |model: &str, agent: &str| v1::CompleteRequest {
        model: model.into(),
        agent: agent.into(),
        prompt: "route me".into(),
        ..Default::default()
    };
    let mut route = async |model: &str, agent: &str| {
        let r = router.client.ask(ask(model, agent)).await;
        assert_eq!(r.text, mock::reply("route me"));
        (r.provider, r.model)
    };

    let pair = |p: &str, m: &str| (p.to_string(), m.to_string());
    assert_eq!(
        route("", "").await,
        pair("ollama-local", "llama3.2:3b"),
        "default"
    );
    assert_eq!(
        route("", "triage").await,
        pair("ollama-local", "llama3.2:3b"),
        "agent → chain"
    );
    assert_eq!(
        route("", "summariser").await,
        pair("vllm-gpu", "mistral-7b"),
        "agent → model"
    );
    assert_eq!(
        route("qwen2.5-coder:7b", "").await,
        pair("ollama-local", "qwen2.5-coder:7b")
    );
    assert_eq!(
        route("mistral-7b", "triage").await,
        pair("vllm-gpu", "mistral-7b"),
        "a named model wins"
    );

    // The chain falls over to its next model when the first provider fails.
    ollama.set_script(Script::failing(Fault::Status(502)));
    let r = router.client.ask(ask("fast", "")).await;
    assert_eq!(
        (r.provider.as_str(), r.model.as_str()),
        ("vllm-gpu", "mistral-7b")
    );
    assert_eq!(r.attempts[0].kind(), FailureKind::ServerError);

    // gpt-4o-mini is served only by the provider whose key is unset.
    let err = router
        .client
        .complete(ask("gpt-4o-mini", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("no enabled provider"),
        "{}",
        err.message()
    );
}

// === the binary's start-up errors ===

static FILES: AtomicU32 = AtomicU32::new(0);

fn write_config(text: &str) -> PathBuf {
    let n = FILES.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("cascade-test-{}-{n}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cascade-router"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Runs `check` on `text`; asserts exit code 2 and one stderr line naming the file and `key`,
/// and returns that line.
fn rejects(text: &str, key: &str, problem: &str) -> String {
    let path = write_config(text);
    let out = run(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got: {stderr}");
    let want = format!("error: {}: {key}", path.display());
    assert!(
        lines[0].starts_with(&want),
        "{:?} does not start with {want:?}",
        lines[0]
    );
    assert!(
        lines[0].contains(problem) && lines[0].contains("(fix: "),
        "{}",
        lines[0]
    );
    let _ = std::fs::remove_file(path);
    lines[0].to_string()
}

const OK_PROVIDER: &str = "  - {name: sim, type: simulated, models: [m]}\n";

#[test]
fn unusable_files_fail_with_one_line_and_exit_code_2() {
    rejects(
        "providers:\n  - name: a\n   type: [\n",
        "line 3 column 4",
        "did not find expected",
    );
    rejects(
        "providers:\n  - {name: a, type: gpt5, models: [m]}\n",
        "providers[0].type",
        "unknown provider type",
    );
    rejects(
        &format!("providers:\n{OK_PROVIDER}{OK_PROVIDER}"),
        "providers[1].name",
        "duplicate",
    );
    rejects(
        &format!("providers:\n{OK_PROVIDER}fallback_chains:\n  fast: [m, nope]\n"),
        "fallback_chains.fast[1]",
        "unknown model \"nope\"",
    );
    rejects(
        "providers:\n  - {name: a, type: ollama, url: \"localhost:11434\", models: [m]}\n",
        "providers[0].url",
        "not an http(s) URL",
    );
    rejects(
        "providers:\n  - {name: a, type: simulated, enabled: false, models: [m]}\n",
        "providers",
        "no usable provider",
    );
    rejects(
        &format!("providers:\n{OK_PROVIDER}agent_model_assignments:\n  bot: ghost\n"),
        "agent_model_assignments.bot",
        "unknown model or chain",
    );
    rejects(
        &format!("server: {{listen: \"nowhere\"}}\nproviders:\n{OK_PROVIDER}"),
        "server.listen",
        "not an address",
    );
}

#[test]
fn unknown_keys_in_provider_and_model_entries_fail_check_with_a_suggestion() {
    for (text, key, suggestion) in [
        (
            "providers:\n  - {name: a, type: simulated, models: [m], batchng: {max_wait_ms: 1}}\n",
            "providers[0].batchng",
            "did you mean `batching`?",
        ),
        (
            "providers:\n  - name: a\n    type: simulated\n    models:\n      - {name: m, defualt: true}\n",
            "providers[0].models[0].defualt",
            "did you mean `default`?",
        ),
        (
            "providers:\n  - {name: a, type: simulated, models: [m], http: {pool_idle_timeout: 5}}\n",
            "providers[0].http.pool_idle_timeout",
            "did you mean `pool_idle_timeout_seconds`?",
        ),
    ] {
        let line = rejects(text, key, "unknown key");
        assert!(line.contains(suggestion), "{line}");
    }
}

#[test]
fn check_refuses_what_serve_would() {
    rejects(
        &format!(
            "cache: {{backend: redis, redis_url: \"redis://127.0.0.1:notaport\"}}\nproviders:\n{OK_PROVIDER}"
        ),
        "cache.redis_url",
        "is not a redis:// URL",
    );
    let not_pem = write_config("this is not a certificate\n");
    rejects(
        &format!(
            "providers:\n  - {{name: a, type: openai, base_url: \"https://127.0.0.1:1/v1\", models: [m], http: {{ca_file: \"{}\"}}}}\n",
            not_pem.display()
        ),
        "providers[0].http.ca_file",
        "holds no PEM certificate",
    );
    let _ = std::fs::remove_file(not_pem);
    rejects(
        "providers:\n  - {name: o, type: ollama, url: \"http://127.0.0.1:1\", models: [m], stream_unary: true}\n",
        "providers[0].stream_unary",
        "only OpenAI-compatible providers take it",
    );
}

#[test]
fn missing_file_and_serve_fail_the_same_way() {
    let out = run(&["check", "--config", "/nonexistent/cascade.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.starts_with("error: /nonexistent/cascade.yaml: (file): cannot read"),
        "{stderr}"
    );

    let path = write_config("providers:\n  - {name: a, type: nope, models: [m]}\n");
    let out = run(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    let _ = std::fs::remove_file(path);
}

#[test]
fn the_binary_offers_only_product_commands() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap_or_default()
        .split("Options:")
        .next()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // Operators' and agents' commands; the team's tools live in cascade-bench.
    assert_eq!(
        commands,
        ["serve", "check", "complete", "spend", "batch", "help"],
        "{help}"
    );
}

#[test]
fn shipped_cascade_yaml_checks_clean() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/cascade.yaml");
    let out = run(&["check", "--config", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("simulated"));
}
