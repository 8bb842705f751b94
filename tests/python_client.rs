//! The Python example (`examples/python/client.py`, grpcio with stubs generated from proto/)
//! against the real service: its answers, a deadline, and the codes it acts on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, MockServer, Script};
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_gets_its_answers_and_acts_on_codes() {
    let Some(python) = python_with("grpc, grpc_tools") else {
        return;
    };
    let fast = MockServer::start(Script::default()).await.unwrap();
    let slow = MockServer::start(Script {
        base_latency: Duration::from_secs(30),
        ..Script::default()
    })
    .await
    .unwrap();
    let router = start(&format!(
        "providers:\n{}  - {{name: slow, type: openai, priority: 2, base_url: \"{}/v1\", models: [slow]}}\n",
        openai("up", 1, &fast.url()),
        slow.url()
    ))
    .await;
    let args = vec!["--addr".to_string(), router.addr.to_string()];
    let r = python_report(python, "client.py", args).await;
    assert_eq!(
        r["complete"]["text"],
        mock::reply("hello from python").as_str()
    );
    assert_eq!(r["complete"]["provider"], "up");
    let batch: Vec<&str> = r["batch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..5)
        .map(|i| mock::reply(&format!("batch item {i}")))
        .collect();
    assert_eq!(batch, want);
    assert_eq!(r["deadline"], "DEADLINE_EXCEEDED");
    assert_eq!(r["unknown_model"], "INVALID_ARGUMENT");
    assert_eq!(r["empty_prompt"], "INVALID_ARGUMENT");
    assert_eq!(fast.stats().items, 6, "one Complete and a batch of five");
}
