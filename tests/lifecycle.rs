//! The real binary through deploys: SIGTERM drains the calls in flight and exits 0, a second
//! signal exits at once, SIGHUP swaps the cascade file in without losing a call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use cascade_router::proto::v1::CircuitState;
use common::*;
use tonic::Code;

fn slow(ms: u64) -> Script {
    Script {
        base_latency: Duration::from_millis(ms),
        ..Script::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_every_call_in_flight_then_exits_zero() {
    let up = MockServer::start(slow(2000)).await.unwrap();
    let path = temp_file(
        "drain",
        &format!(
            "server: {{shutdown_grace_seconds: 30}}\nproviders:\n{}",
            openai("up", 1, &up.url())
        ),
    );
    let mut served = Served::start(&[], &path, "info");
    // An idle client: connected, then silent through the shutdown.
    let mut idle = served.client().await;
    providers(&mut idle).await;

    let busy = served.client().await;
    let calls = spawn_calls(&busy, 200, "p", Duration::from_secs(60));
    up.wait_for(|s| s.requests >= 200).await;

    served.signal("TERM");
    served.wait_for_line("draining");
    let after = idle.complete(prompt("too late")).await;
    assert!(after.is_err(), "a call after the signal is refused");

    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await.unwrap().unwrap().into_inner();
        assert_eq!(r.text, mock::reply(&format!("p{i}")));
    }
    let status = served
        .wait_exit(Duration::from_secs(20))
        .expect("exits well within the grace, idle client or not");
    assert!(status.success(), "{status:?}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once() {
    let up = MockServer::start(Script::failing(Fault::Hang))
        .await
        .unwrap();
    let path = temp_file(
        "twice",
        &format!(
            "server: {{shutdown_grace_seconds: 600}}\nproviders:\n{}",
            openai("up", 1, &up.url())
        ),
    );
    let mut served = Served::start(&[], &path, "info");
    let mut c = served.client().await;
    let stuck = tokio::spawn(async move { c.complete(prompt("hangs")).await });
    up.wait_for(|s| s.requests >= 1).await;

    served.signal("TERM");
    served.wait_for_line("draining");
    served.signal("TERM");
    let status = served
        .wait_exit(Duration::from_secs(20))
        .expect("the second signal ends the process, not the 600 s grace");
    assert!(!status.success(), "{status:?}");
    assert!(stuck.await.unwrap().is_err());
}

fn reload_yaml(dead: &str, second: &str) -> String {
    format!(
        "cascade:\n  max_retries_per_provider: 0\n  circuit_breaker: {{failure_threshold: 1, recovery_timeout: 600, half_open_max_calls: 1}}\nproviders:\n{}{second}",
        openai("dead", 1, dead)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_routing_without_failing_calls_in_flight() {
    let one = MockServer::start(slow(1000)).await.unwrap();
    let two = MockServer::start(Script::default()).await.unwrap();
    let dead = refused_url().await;
    let path = temp_file("reload", &reload_yaml(&dead, &openai("one", 2, &one.url())));
    let mut served = Served::start(&[], &path, "info");
    let mut c = served.client().await;

    // The first call opens the dead provider's breaker (threshold 1) and is served by `one`.
    let r = c.ask(prompt("first")).await;
    assert_eq!(r.provider, "one");
    assert_eq!(
        circuit_of(&providers(&mut c).await, "dead"),
        CircuitState::Open
    );

    let in_flight: Vec<_> = (0..20)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.ask(prompt(&format!("in flight {i}"))).await })
        })
        .collect();
    one.wait_for(|s| s.requests >= 21).await;

    std::fs::write(&path, reload_yaml(&dead, &openai("two", 2, &two.url()))).unwrap();
    served.signal("HUP");
    served.wait_for_line("reloaded");
    let r = c.ask(prompt("after")).await;
    assert_eq!(r.provider, "two", "new calls take the new routes");
    for call in in_flight {
        assert_eq!(
            call.await.unwrap().provider,
            "one",
            "calls in flight finish on the old config"
        );
    }
    assert_eq!(
        circuit_of(&providers(&mut c).await, "dead"),
        CircuitState::Open,
        "an unchanged provider keeps its breaker"
    );

    std::fs::write(
        &path,
        "providers:\n  - {name: x, type: nope, models: [m]}\n",
    )
    .unwrap();
    served.signal("HUP");
    let line = served.wait_for_line("reload rejected");
    assert!(line.contains("providers[0].type"), "{line}");
    assert_eq!(c.ask(prompt("still")).await.provider, "two");
    let names: Vec<String> = providers(&mut c)
        .await
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["dead", "two"]);
    assert!(
        served.wait_exit(Duration::ZERO).is_none(),
        "SIGHUP never ends the process"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_over_the_in_flight_limit_are_shed_at_once() {
    let up = MockServer::start(Script::failing(Fault::Hang))
        .await
        .unwrap();
    let router = start(&format!(
        "limits: {{max_in_flight: 3}}\nproviders:\n{}",
        openai("up", 1, &up.url())
    ))
    .await;
    let held: Vec<_> = (0..3)
        .map(|i| {
            let mut c = router.client.clone();
            tokio::spawn(async move { c.complete(prompt(&format!("hold {i}"))).await })
        })
        .collect();
    up.wait_for(|s| s.requests >= 3).await;
    let err = router
        .client
        .clone()
        .complete(prompt("one too many"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("limits.max_in_flight"),
        "{}",
        err.message()
    );
    for h in held {
        h.abort();
    }
}

/// A message on the Complete method that is not a CompleteRequest: field 1 (the model, a
/// string) sent as a 64-bit number, which protobuf cannot decode.
async fn not_a_request(router: &RunningRouter) -> tonic::Status {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Wrong {
        #[prost(fixed64, tag = "1")]
        model: u64,
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary::<_, cascade_router::proto::v1::CompleteResponse, _>(
        tonic::Request::new(Wrong { model: 7 }),
        tonic::codegen::http::uri::PathAndQuery::from_static("/cascade.v1.Router/Complete"),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .unwrap_err()
}

#[tokio::test]
async fn each_input_limit_is_named_when_breached_and_nothing_else_fails() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!(
        "limits: {{max_prompt_bytes: 100, max_messages: 2, max_tokens: 50, max_message_bytes: 2048}}\nproviders:\n{}",
        openai("up", 1, &up.url())
    ))
    .await;
    let mut c = router.client.clone();
    let chat = |n: usize| cascade_router::proto::v1::CompleteRequest {
        prompt: String::new(),
        messages: (0..n)
            .map(|_| cascade_router::proto::v1::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            })
            .collect(),
        ..prompt("")
    };
    let big_tokens = cascade_router::proto::v1::CompleteRequest {
        max_tokens: Some(51),
        ..prompt("hi")
    };
    for (req, limit) in [
        (prompt(&"x".repeat(101)), "limits.max_prompt_bytes"),
        (chat(3), "limits.max_messages"),
        (big_tokens, "limits.max_tokens"),
    ] {
        let err = c.complete(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(limit), "{}", err.message());
    }
    let huge = c.complete(prompt(&"x".repeat(4096))).await.unwrap_err();
    assert_eq!(huge.code(), Code::ResourceExhausted, "{}", huge.message());
    for named in ["the limit is: 2048", "limits.max_message_bytes"] {
        assert!(huge.message().contains(named), "{}", huge.message());
    }
    let garbage = not_a_request(&router).await;
    assert_eq!(
        garbage.code(),
        Code::InvalidArgument,
        "{}",
        garbage.message()
    );
    assert_eq!(
        c.ask(prompt("still fine")).await.text,
        mock::reply("still fine")
    );
    assert_eq!(c.ask(chat(2)).await.text, mock::reply("hi"));
    assert_eq!(up.stats().requests, 2, "no refused call went upstream");
}

/// `Complete` is framed by the router itself (for memory, `front::unary`): what tonic's own
/// handler answered is still answered — a compressed request refused naming what is accepted —
/// and a unary call that is not exactly one message is refused by name, before anything goes
/// upstream.
#[tokio::test]
async fn complete_refuses_what_is_not_one_plain_message() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!("providers:\n{}", openai("up", 1, &up.url()))).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let path =
        || tonic::codegen::http::uri::PathAndQuery::from_static("/cascade.v1.Router/Complete");
    let mut grpc = tonic::client::Grpc::new(channel);
    type Response = cascade_router::proto::v1::CompleteResponse;

    let mut gzip = tonic::Request::new(prompt("compressed"));
    gzip.metadata_mut()
        .insert("grpc-encoding", "gzip".parse().unwrap());
    grpc.ready().await.unwrap();
    let refused = grpc
        .unary::<_, Response, _>(gzip, path(), tonic_prost::ProstCodec::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{}", refused.message());
    assert!(refused.message().contains("gzip"), "{}", refused.message());
    assert_eq!(
        refused.metadata().get("grpc-accept-encoding").unwrap(),
        "identity"
    );

    for n in [0, 2] {
        let messages = futures_util::stream::iter(vec![prompt("one"); n]);
        grpc.ready().await.unwrap();
        let err = grpc
            .client_streaming::<_, _, Response, _>(
                tonic::Request::new(messages),
                path(),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains("send exactly one"),
            "{}",
            err.message()
        );
    }

    let mut c = router.client.clone();
    assert_eq!(c.ask(prompt("plain")).await.text, mock::reply("plain"));
    assert_eq!(up.stats().requests, 1, "no refused call went upstream");
}
