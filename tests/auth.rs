//! Client keys through the real service: who gets in, what they may ask for, and whose cache
//! entries they see.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use cascade_devtools::mock::{self, MockServer, Script};
use cascade_router::proto::v1;
use common::*;
use tonic::{Code, Request};

const TRIAGE_KEY: &str = "sk-router-triage-0123456789-abcdefghij";
const OPS_KEY: &str = "sk-router-ops-9876543210-zyxwvu";

fn with_key<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

fn deterministic(text: &str, agent: &str) -> v1::CompleteRequest {
    v1::CompleteRequest {
        temperature: Some(0.0),
        agent: agent.into(),
        ..prompt(text)
    }
}

async fn router_with_keys(up: &MockServer) -> RunningRouter {
    let yaml = format!(
        "server:\n  auth:\n    keys:\n      - {{name: triage, key: \"${{TRIAGE_KEY}}\", models: [m]}}\n      - {{name: ops, sha256: \"{}\"}}\ncache: {{}}\nproviders:\n  - {{name: up, type: openai, base_url: \"{}/v1\", models: [m, other]}}\n",
        sha256_hex(OPS_KEY),
        up.url()
    );
    start_with_env(
        &yaml,
        HashMap::from([("TRIAGE_KEY".to_string(), TRIAGE_KEY.to_string())]),
    )
    .await
}

fn sha256_hex(key: &str) -> String {
    cascade_router::config::KeyHash::of(key)
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn only_whole_known_keys_get_in_and_only_to_their_models() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = router_with_keys(&up).await;
    let mut c = router.client.clone();

    let no_key = c.complete(prompt("hi")).await.unwrap_err();
    assert_eq!(no_key.code(), Code::Unauthenticated, "{}", no_key.message());
    let wrong = c
        .complete(with_key(prompt("hi"), "sk-nope"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let prefix = format!("{}-but-not-the-rest", &TRIAGE_KEY[..20]);
    let prefixed = c
        .complete(with_key(prompt("hi"), &prefix))
        .await
        .unwrap_err();
    assert_eq!(
        prefixed.code(),
        Code::Unauthenticated,
        "a shared prefix is no key"
    );

    let other_model = v1::CompleteRequest {
        model: "other".into(),
        ..prompt("hi")
    };
    let denied = c
        .complete(with_key(other_model.clone(), TRIAGE_KEY))
        .await
        .unwrap_err();
    assert_eq!(
        denied.code(),
        Code::PermissionDenied,
        "{}",
        denied.message()
    );
    assert!(
        denied.message().contains("\"other\""),
        "{}",
        denied.message()
    );
    assert_eq!(
        c.complete(with_key(other_model, OPS_KEY))
            .await
            .unwrap()
            .into_inner()
            .text,
        mock::reply("hi"),
        "a key without a model list may ask for any"
    );
    let ok = c
        .complete(with_key(prompt("hello"), TRIAGE_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.text, mock::reply("hello"));

    let list = c
        .list_providers(v1::ListProvidersRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        list.code(),
        Code::Unauthenticated,
        "ListProviders needs a key"
    );
    assert!(
        c.list_providers(with_key(v1::ListProvidersRequest {}, OPS_KEY))
            .await
            .is_ok()
    );
    assert_eq!(up.stats().requests, 2, "refused calls never went upstream");
}

#[tokio::test]
async fn two_keys_never_share_cache_entries_whatever_agent_they_claim() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = router_with_keys(&up).await;
    let mut c = router.client.clone();

    c.complete(with_key(
        deterministic("secret question", "shared-agent"),
        TRIAGE_KEY,
    ))
    .await
    .unwrap();
    let only = v1::CompleteRequest {
        cache: v1::CacheMode::Only as i32,
        ..deterministic("secret question", "shared-agent")
    };
    let probe = c
        .complete(with_key(only.clone(), OPS_KEY))
        .await
        .unwrap_err();
    assert_eq!(
        probe.code(),
        Code::NotFound,
        "ops cannot read triage's entry by claiming its agent"
    );
    let own = c
        .complete(with_key(only, TRIAGE_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(own.cached, "triage reads its own entry");
}

#[tokio::test]
async fn health_needs_no_key_and_reflection_does() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = router_with_keys(&up).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let served = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cascade.v1.Router".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.status, 1, "SERVING");

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let refused = reflection
        .server_reflection_info(tokio_stream::iter(vec![list()]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut answers = reflection
        .server_reflection_info(with_key(tokio_stream::iter(vec![list()]), OPS_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().is_some());
}

#[test]
fn an_unauthenticated_router_stays_on_loopback_unless_told() {
    let yaml = "server: {listen: \"0.0.0.0:50051\"}\nproviders:\n  - {name: s, type: simulated, models: [m]}\n";
    let err = cascade_router::config::parse(yaml, "f.yaml", &|_| None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with("f.yaml: server.listen: 0.0.0.0:50051 is not a loopback"),
        "{err}"
    );
    assert!(err.contains("allow_unauthenticated"), "{err}");
    let allowed = yaml.replacen("}\n", ", allow_unauthenticated: true}\n", 1);
    assert!(cascade_router::config::parse(&allowed, "f.yaml", &|_| None).is_ok());
}

const PROVIDER_KEY: &str = "sk-provider-secret-5555-abcdef";
const PROMPT: &str = "my private question about invoice 7781";

/// Providers whose 401 and 400 bodies echo the Authorization header and the prompt, a healthy
/// one behind them; the binary logging at trace in `format`. Returns every log line and what
/// the client saw.
async fn echoes(format: &str) -> (Vec<String>, String) {
    use cascade_devtools::mock::Fault;
    let echo = |code| Script {
        fault: Some(Fault::Echo(code)),
        ..Script::default()
    };
    let a = MockServer::start(echo(401)).await.unwrap();
    let b = MockServer::start(echo(400)).await.unwrap();
    let c = MockServer::start(Script::default()).await.unwrap();
    let entry = |name: &str, priority: i32, url: &str| {
        format!(
            "  - {{name: {name}, type: openai, priority: {priority}, base_url: \"{url}/v1\", api_key: \"${{PROVIDER_KEY}}\", models: [m]}}\n"
        )
    };
    let yaml = format!(
        "server:\n  auth:\n    keys:\n      - {{name: client, key: \"${{CLIENT_KEY}}\"}}\nproviders:\n{}{}{}",
        entry("a", 1, &a.url()),
        entry("b", 2, &b.url()),
        entry("c", 3, &c.url()),
    );
    let path = temp_file("echo", &yaml);
    let served = Served::start_with_env(
        &["--log-format", format],
        &path,
        "trace",
        &[("PROVIDER_KEY", PROVIDER_KEY), ("CLIENT_KEY", TRIAGE_KEY)],
    );
    let mut client = served.client().await;
    let r = client
        .complete(with_key(prompt(PROMPT), TRIAGE_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.provider, "c");
    assert!(
        a.stats().requests == 1 && b.stats().requests == 1,
        "both echoing providers were asked"
    );
    // The answer itself echoes the prompt (that is the mock's reply); what the router says
    // about the failed attempts must not.
    let seen = format!("{:?}", r.attempts);
    (served.finish(), seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_key_or_prompt_leaves_through_errors_or_logs_at_any_level() {
    for format in ["text", "json"] {
        let (lines, client_saw) = echoes(format).await;
        assert!(
            lines.len() > 20,
            "trace logging was on: {} lines",
            lines.len()
        );
        for secret in [PROVIDER_KEY, TRIAGE_KEY, PROMPT, "invoice 7781"] {
            assert!(
                !client_saw.contains(secret),
                "the client saw {secret:?}: {client_saw}"
            );
            if let Some(line) = lines.iter().find(|l| l.contains(secret)) {
                panic!("{format} log holds {secret:?}: {line}");
            }
        }
    }
}
