//! The operator's hands, through the real service: control actions over the HTTP API and
//! gRPC (disable, enable, drain, reset_circuit), active health checks against mock providers
//! that die, hang and come back, who may look and act, and the configuration without secrets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{collections::HashMap, time::Duration};

use cascade_devtools::mock::{Fault, MockServer, Script};
use cascade_router::proto::v1;
use common::*;
use serde_json::{Value, json};

/// Two OpenAI-shaped providers serving `m`, `a` first; the HTTP front on a free port.
async fn two(extra: &str, a: &MockServer, b: &MockServer) -> (RunningRouter, String) {
    let port = free_port().await;
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\"}}\n{}providers:\n\
         - {{name: a, type: openai, priority: 1, base_url: \"{}/v1\", models: [m]{extra}}}\n\
         - {{name: b, type: openai, priority: 2, base_url: \"{}/v1\", models: [m]}}\n",
        cascade(0, 1, 60.0),
        a.url(),
        b.url(),
    );
    let router = start(&yaml).await;
    let base = format!("127.0.0.1:{port}");
    http_listening(&base).await;
    (router, format!("http://{base}"))
}

fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn control(base: &str, provider: &str, action: &str, key: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/api/providers/{provider}/control"))
        .json(&json!({ "action": action }));
    if let Some(key) = key {
        r = r.bearer_auth(key);
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn status(base: &str) -> Value {
    reqwest::get(format!("{base}/api/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn provider_state(base: &str, name: &str) -> String {
    let s = status(base).await;
    let p = s["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap();
    p["state"].as_str().unwrap().to_string()
}

/// Waits (polling the status API, bounded) until `name`'s state is `state`.
async fn state_becomes(base: &str, name: &str, state: &str) {
    within(async {
        while provider_state(base, name).await != state {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn answered_by(router: &mut RunningRouter, text: &str) -> v1::CompleteResponse {
    router
        .client
        .complete(prompt(text))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn disable_enable_drain_and_reset_circuit_take_effect_for_the_next_request() {
    let (a, b) = (
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
    );
    let (mut router, base) = two("", &a, &b).await;
    assert_eq!(answered_by(&mut router, "one").await.provider, "a");

    // disable: no request reaches a; calls fall back to b, a skipped with no network try.
    let (code, body) = control(&base, "a", "disable", None).await;
    assert_eq!((code, body["order"].as_str()), (200, Some("disable")));
    let sent_to_a = a.stats().requests;
    let r = answered_by(&mut router, "two").await;
    assert_eq!(r.provider, "b");
    assert_eq!(r.attempts[0].provider, "a");
    assert_eq!(r.attempts[0].kind(), v1::FailureKind::Disabled);
    assert_eq!(r.attempts[0].tries, 0);
    assert_eq!(
        a.stats().requests,
        sent_to_a,
        "nothing sent to a disabled provider"
    );
    assert_eq!(provider_state(&base, "a").await, "disabled");

    // enable: used again.
    control(&base, "a", "enable", None).await;
    assert_eq!(answered_by(&mut router, "three").await.provider, "a");

    // drain: the call in flight at a finishes there; new ones skip it.
    a.set_script(Script {
        base_latency: Duration::from_millis(800),
        ..Script::default()
    });
    let mut client = router.client.clone();
    let held = tokio::spawn(async move { client.complete(prompt("held")).await });
    let before = a.stats().requests;
    a.wait_for(|s| s.requests > before).await;
    control(&base, "a", "drain", None).await;
    assert_eq!(provider_state(&base, "a").await, "draining");
    assert_eq!(answered_by(&mut router, "four").await.provider, "b");
    let held = held.await.unwrap().unwrap().into_inner();
    assert_eq!(held.provider, "a", "the drained provider finished its call");
    state_becomes(&base, "a", "disabled").await;

    // reset_circuit: a failure opens a's breaker (threshold 1); the reset closes it.
    control(&base, "a", "enable", None).await;
    a.set_script(Script::failing(Fault::Status(500)));
    assert_eq!(answered_by(&mut router, "five").await.provider, "b");
    assert_eq!(provider_state(&base, "a").await, "circuit_open");
    let (code, body) = control(&base, "a", "reset_circuit", None).await;
    assert_eq!((code, body["circuit"].as_str()), (200, Some("closed")));
    a.set_script(Script::default());
    assert_eq!(answered_by(&mut router, "six").await.provider, "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_survive_a_reload_and_models_list_only_what_can_be_served() {
    let (a, b) = (
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
    );
    let port = free_port().await;
    let yaml = |extra: &str| {
        format!(
            "server: {{http_listen: \"127.0.0.1:{port}\"}}\nproviders:\n\
             - {{name: a, type: openai, priority: 1, base_url: \"{}/v1\", models: [m, only-a]{extra}}}\n\
             - {{name: b, type: openai, priority: 2, base_url: \"{}/v1\", models: [m]}}\n",
            a.url(),
            b.url(),
        )
    };
    let mut router = start(&yaml("")).await;
    let base = format!("http://127.0.0.1:{port}");
    http_listening(&format!("127.0.0.1:{port}")).await;
    let models = || async {
        let v: Value = reqwest::get(format!("{base}/v1/models"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut ids: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(models().await, ["m", "only-a"]);
    control(&base, "a", "disable", None).await;
    assert_eq!(
        models().await,
        ["m"],
        "only-a has no provider to serve it now"
    );
    // A reload that rebuilds a (its settings changed) keeps the operator's order.
    let reloaded =
        cascade_router::config::parse(&yaml(", timeout_seconds: 7"), "t.yaml", &|_| None).unwrap();
    let r = router.router.reload(&reloaded).unwrap();
    assert_eq!(r.built, ["a"]);
    assert_eq!(answered_by(&mut router, "x").await.provider, "b");
    assert_eq!(provider_state(&base, "a").await, "disabled");
    control(&base, "a", "enable", None).await;
    assert_eq!(answered_by(&mut router, "y").await.provider, "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_actions_and_unknown_providers_are_named() {
    let (a, b) = (
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
    );
    let (mut router, base) = two("", &a, &b).await;
    let (code, body) = control(&base, "nope", "disable", None).await;
    assert_eq!(code, 404);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"nope\"") && message.contains("a, b"),
        "{message}"
    );
    let (code, body) = control(&base, "a", "pause", None).await;
    assert_eq!(code, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("valid: enable, disable, drain, reset_circuit")
    );
    // The same over gRPC.
    let client = router.client.clone();
    let grpc = |provider: &str, action: &str| {
        let asked = v1::ControlProviderRequest {
            provider: provider.into(),
            action: action.into(),
        };
        let mut client = client.clone();
        async move { client.control_provider(asked).await }
    };
    let e = grpc("nope", "disable").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = grpc("a", "pause").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let s = grpc("a", "disable").await.unwrap().into_inner();
    assert_eq!(s.order, "disable");
    assert_eq!(answered_by(&mut router, "z").await.provider, "b");
    assert_eq!(a.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_the_api_needs_a_key_and_control_an_admin_key() {
    let a = MockServer::start(Script::default()).await.unwrap();
    let port = free_port().await;
    let yaml = format!(
        "server:\n  http_listen: \"127.0.0.1:{port}\"\n  auth:\n    keys:\n\
         \x20     - {{name: ops, key: \"${{OPS_KEY}}\", admin: true}}\n\
         \x20     - {{name: agent, key: \"${{AGENT_KEY}}\"}}\n\
         providers:\n{}",
        openai("a", 1, &a.url())
    );
    let _router = start_with_env(
        &yaml,
        env(&[
            ("OPS_KEY", "ops-key-0123456789"),
            ("AGENT_KEY", "agent-key-0123456789"),
        ]),
    )
    .await;
    let base = format!("http://127.0.0.1:{port}");
    http_listening(&format!("127.0.0.1:{port}")).await;
    let get = |key: Option<&'static str>| {
        let base = base.clone();
        async move {
            let mut r = reqwest::Client::new().get(format!("{base}/api/status"));
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            r.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(get(None).await, 401);
    assert_eq!(get(Some("wrong")).await, 401);
    assert_eq!(get(Some("agent-key-0123456789")).await, 200);
    assert_eq!(control(&base, "a", "disable", None).await.0, 401);
    let (code, body) = control(&base, "a", "disable", Some("agent-key-0123456789")).await;
    assert_eq!(code, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("admin: true")
    );
    assert_eq!(
        control(&base, "a", "disable", Some("ops-key-0123456789"))
            .await
            .0,
        200
    );
    // The page itself is only code: it loads without a key and asks for one.
    let page = reqwest::get(format!("{base}/status")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("/status/page.js"));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_checks_take_a_killed_provider_out_and_bring_it_back() {
    let a = MockServer::start(Script::default()).await.unwrap();
    let b = MockServer::start(Script::default()).await.unwrap();
    let addr = a.addr();
    let (mut router, base) = two(
        ", health_check: {interval_seconds: 0.1, timeout_ms: 100, unhealthy_after: 2, healthy_after: 2}",
        &a,
        &b,
    )
    .await;
    a.wait_for(|s| s.probes >= 1).await;
    assert_eq!(answered_by(&mut router, "before").await.provider, "a");
    drop(a);
    state_becomes(&base, "a", "unhealthy").await;
    let s = status(&base).await;
    let h = &s["providers"][0]["health"];
    assert_eq!(h["healthy"], false);
    assert!(h["failed_in_a_row"].as_u64().unwrap() >= 2, "{h}");
    assert!(
        h["last_error"].as_str().unwrap().starts_with("connect"),
        "{h}"
    );
    // No caller's request goes to it: skipped with no network try.
    for i in 0..5 {
        let r = answered_by(&mut router, &format!("while down {i}")).await;
        assert_eq!(r.provider, "b");
        assert_eq!(r.attempts[0].kind(), v1::FailureKind::Unhealthy);
        assert_eq!(r.attempts[0].tries, 0);
    }
    // Back on the same address: probes bring it back.
    let a = MockServer::bind(addr, Script::default()).await.unwrap();
    state_becomes(&base, "a", "healthy").await;
    assert_eq!(a.stats().requests, 0, "probes are not callers' requests");
    assert_eq!(answered_by(&mut router, "after").await.provider, "a");
    // Probe now, over the API and gRPC.
    let now: Value = reqwest::Client::new()
        .post(format!("{base}/api/health-check"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        now["providers"][0],
        json!({"provider": "a", "checked": true, "passed": true, "took_ms": now["providers"][0]["took_ms"], "error": null})
    );
    assert_eq!(now["providers"][1]["checked"], false);
    let probes = router
        .client
        .check_health(v1::CheckHealthRequest {})
        .await
        .unwrap()
        .into_inner()
        .probes;
    assert!(probes[0].checked && probes[0].passed && !probes[1].checked);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_provider_costs_no_caller_a_timeout_once_probes_marked_it() {
    let a = MockServer::start(Script::failing(Fault::Hang))
        .await
        .unwrap();
    let b = MockServer::start(Script::default()).await.unwrap();
    let port = free_port().await;
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\"}}\n{}providers:\n\
         - {{name: a, type: openai, priority: 1, base_url: \"{}/v1\", models: [m], timeout_seconds: 5, health_check: {{interval_seconds: 0.1, timeout_ms: 50, unhealthy_after: 1}}}}\n\
         - {{name: b, type: openai, priority: 2, base_url: \"{}/v1\", models: [m]}}\n",
        cascade(0, 3, 60.0),
        a.url(),
        b.url(),
    );
    let mut router = start(&yaml).await;
    let base = format!("http://127.0.0.1:{port}");
    http_listening(&format!("127.0.0.1:{port}")).await;
    state_becomes(&base, "a", "unhealthy").await;
    for i in 0..3 {
        let r = answered_by(&mut router, &format!("hang {i}")).await;
        assert_eq!(r.provider, "b");
        assert_eq!(r.attempts[0].kind(), v1::FailureKind::Unhealthy);
    }
    assert_eq!(
        a.stats().requests,
        0,
        "no caller's request went to the hung provider"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_health_checks_a_probe_not_a_caller_closes_an_open_circuit() {
    let (a, b) = (
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
    );
    let port = free_port().await;
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\"}}\n{}providers:\n\
         - {{name: a, type: openai, priority: 1, base_url: \"{}/v1\", models: [m], health_check: {{interval_seconds: 0.1, timeout_ms: 100, unhealthy_after: 1000000}}}}\n\
         - {{name: b, type: openai, priority: 2, base_url: \"{}/v1\", models: [m]}}\n",
        cascade(0, 1, 0.3),
        a.url(),
        b.url(),
    );
    let mut router = start(&yaml).await;
    let base = format!("http://127.0.0.1:{port}");
    http_listening(&format!("127.0.0.1:{port}")).await;
    // One failed request opens a's circuit (threshold 1, recovery 0.3 s). Its probes fail too
    // for now, so nothing can close it; `unhealthy_after` is out of reach, so health never
    // takes `a` out and only the circuit keeps callers off it.
    a.set_script(Script::failing(Fault::Status(500)));
    assert_eq!(answered_by(&mut router, "fails at a").await.provider, "b");
    let sent = a.stats().requests;
    // Probes are at least 0.1 s apart and time out after 0.1 s, so the sixth probe from now
    // is sent at least 0.4 s after the circuit opened: past its recovery time.
    let probes = a.stats().probes;
    within(async {
        while a.stats().probes < probes + 6 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Past its recovery time the circuit stays open for callers — they go to b and none is
    // let through to a as the half-open trial — until a probe closes it.
    for _ in 0..3 {
        assert_eq!(answered_by(&mut router, "meanwhile").await.provider, "b");
    }
    assert_eq!(status(&base).await["providers"][0]["circuit"], "open");
    assert_eq!(
        a.stats().requests,
        sent,
        "no caller was the half-open trial"
    );
    a.set_script(Script::default());
    within(async {
        while status(&base).await["providers"][0]["circuit"] != "closed" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        a.stats().requests,
        sent,
        "the probe, not a caller, closed it"
    );
    assert_eq!(answered_by(&mut router, "back").await.provider, "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_config_api_shows_every_setting_and_no_secret() {
    let a = MockServer::start(Script::default()).await.unwrap();
    let port = free_port().await;
    let yaml = format!(
        "server:\n  http_listen: \"127.0.0.1:{port}\"\n  auth:\n    keys:\n\
         \x20     - {{name: ops, key: \"${{OPS_KEY}}\", admin: true}}\n\
         providers:\n\
         \x20 - {{name: a, type: openai, priority: 1, base_url: \"{}/v1\", api_key: \"${{PROVIDER_KEY}}\", models: [m], health_check: {{interval_seconds: 30}}}}\n",
        a.url()
    );
    let (ops, provider_key) = ("ops-secret-key-31337", "sk-provider-secret-4242");
    let _router = start_with_env(
        &yaml,
        env(&[("OPS_KEY", ops), ("PROVIDER_KEY", provider_key)]),
    )
    .await;
    let base = format!("http://127.0.0.1:{port}");
    http_listening(&format!("127.0.0.1:{port}")).await;
    let text = reqwest::Client::new()
        .get(format!("{base}/api/config"))
        .bearer_auth(ops)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains(ops) && !text.contains(provider_key),
        "{text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["providers"][0]["api_key"], "<redacted>");
    assert_eq!(v["providers"][0]["health_check"]["interval_seconds"], 30.0);
    assert_eq!(v["server"]["auth"]["keys"][0]["key"], "<redacted>");
    assert_eq!(v["server"]["auth"]["keys"][0]["admin"], true);
}

#[test]
fn an_http_front_open_to_the_network_without_keys_refuses_to_start() {
    let e = cascade_router::config::parse(
        "server: {http_listen: \"0.0.0.0:8088\"}\nproviders:\n  - {name: s, type: simulated, models: [m]}\n",
        "f.yaml",
        &|_| None,
    )
    .err()
    .map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(
            |e| e.starts_with("f.yaml: server.http_listen: 0.0.0.0:8088 is not a loopback")
        ),
        "{e:?}"
    );
}
