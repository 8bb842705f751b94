//! What answers cost (#31's first part): each model's `price`, the answer's cost from the
//! provider's usage, exact to the billionth of a dollar, on gRPC (`cost_usd`) and HTTP
//! (`x-cascade-cost-usd`), and counted in `cascade_spend_usd_total`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade_devtools::mock::{MockServer, Script};
use common::*;

#[tokio::test]
async fn an_answer_costs_its_usage_at_its_models_price() {
    let mock = MockServer::start(Script::default()).await.unwrap();
    let base = format!("{}/v1", mock.url());
    let http = free_port().await;
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{http}\"}}\n{}providers:\n\
         \x20 - {{name: paid, type: openai, priority: 1, base_url: \"{base}\", models: [{{name: big, price: {{input_per_million: 0.15, output_per_million: 0.6}}}}, {{name: py, cost_per_1k_input_tokens: 0.0025, cost_per_1k_output_tokens: 0.01}}]}}\n\
         \x20 - {{name: local, type: openai, priority: 2, base_url: \"{base}\", models: [free]}}\n",
        cascade(0, 3, 60.0)
    );
    let mut router = start(&yaml).await;
    let ask = |model: &str| cascade_router::proto::v1::CompleteRequest {
        model: model.into(),
        prompt: "one two three four five six seven".into(),
        ..Default::default()
    };
    let big = router
        .client
        .complete(ask("big"))
        .await
        .unwrap()
        .into_inner();
    let u = big.usage.unwrap();
    assert!(u.prompt_tokens > 0 && u.completion_tokens > 0, "{u:?}");
    // $0.15 and $0.60 a million: 150 and 600 billionths a token.
    let want = u64::from(u.prompt_tokens) * 150 + u64::from(u.completion_tokens) * 600;
    assert_eq!((big.cost_usd * 1e9).round() as u64, want);
    assert!(!big.cost_estimated);
    // The Python router's keys, USD per thousand: 2,500 and 10,000 billionths a token.
    let py = router
        .client
        .complete(ask("py"))
        .await
        .unwrap()
        .into_inner();
    let u = py.usage.unwrap();
    assert_eq!(
        (py.cost_usd * 1e9).round() as u64,
        u64::from(u.prompt_tokens) * 2500 + u64::from(u.completion_tokens) * 10_000
    );
    let free = router
        .client
        .complete(ask("free"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(free.cost_usd, 0.0, "a model without a price is free");
    // Spend is counted by provider and model.
    let spent = metric(
        &router,
        r#"cascade_spend_usd_total{tenant="",provider="paid",model="big"}"#,
    );
    assert_eq!((spent * 1e9).round() as u64, want);
    // The HTTP front says the same in a header.
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/completions"))
        .json(&serde_json::json!({"model": "big", "prompt": "one two three four five six seven"}))
        .send()
        .await
        .unwrap();
    let header: f64 = r.headers()["x-cascade-cost-usd"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        (header * 1e9).round() as u64,
        want,
        "the same prompt, the same cost"
    );
    assert_eq!(r.headers()["x-cascade-cost-estimated"], "false");
}

#[test]
fn a_price_in_the_wrong_unit_or_below_zero_fails_at_load_by_key() {
    let load = |price: &str| {
        cascade_router::config::parse(
            &format!("providers:\n  - {{name: p, type: openai, base_url: \"http://127.0.0.1:1/v1\", models: [{{name: m, {price}}}]}}\n"),
            "f.yaml",
            &|_| None,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    assert!(
        load("price: {input_per_million: -1, output_per_million: 1}").starts_with(
            "f.yaml: providers[0].models[0].price.input_per_million: -1 is out of range"
        ),
    );
    // $1,000 per thousand tokens is a million per million: a unit slip.
    assert!(load("cost_per_1k_input_tokens: 1000").starts_with(
        "f.yaml: providers[0].models[0].cost_per_1k_input_tokens: 1000 is out of range"
    ),);
    assert!(
        load("price: {input_per_million: cheap, output_per_million: 1}")
            .contains("price.input_per_million"),
    );
}
