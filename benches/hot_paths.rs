//! criterion benches for the pure hot paths: routing lookup and request validation.
//! `cargo bench --bench hot_paths`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use cascade_router::{CompletionRequest, Routes, config, proto::v1};
use criterion::{Criterion, criterion_group, criterion_main};

const YAML: &str = include_str!("../tests/fixtures/providers.yaml");

fn routing(c: &mut Criterion) {
    let env = |k: &str| match k {
        "OLLAMA_URL" => Some("http://127.0.0.1:11434".to_string()),
        "VLLM_URL" => Some("http://127.0.0.1:8000".to_string()),
        "VLLM_API_KEY" => Some("k".to_string()),
        _ => None,
    };
    let cfg = config::parse(YAML, "bench", &env).unwrap();
    let routes = Routes::from_config(&cfg).unwrap();
    c.bench_function("routes/model", |b| {
        b.iter(|| {
            routes
                .resolve(black_box("qwen2.5-coder:7b"), "")
                .map(|t| t.len())
        })
    });
    c.bench_function("routes/agent_chain", |b| {
        b.iter(|| {
            routes
                .resolve(black_box(""), black_box("triage"))
                .map(|t| t.len())
        })
    });
    c.bench_function("routes/default", |b| {
        b.iter(|| routes.resolve(black_box(""), "").map(|t| t.len()))
    });
}

fn validation(c: &mut Criterion) {
    let req = v1::CompleteRequest {
        model: "m".into(),
        prompt: "Summarise the following incident report in two sentences. ".repeat(8),
        max_tokens: Some(128),
        temperature: Some(0.0),
        stop: vec!["\n\n".into()],
        agent: "triage".into(),
        request_id: "r-1".into(),
        ..Default::default()
    };
    c.bench_function("proto/validate_request", |b| {
        b.iter(|| CompletionRequest::try_from(black_box(req.clone())).map(|r| r.params.max_tokens))
    });
}

criterion_group!(benches, routing, validation);
criterion_main!(benches);
