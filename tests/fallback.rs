//! Ordered fallback, circuit breaking, Retry-After and deadlines, through the real gRPC
//! service and real mock HTTP servers on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use cascade_router::proto::v1::{self, CircuitState, FailureKind};
use common::*;
use tonic::Code;

#[tokio::test]
async fn falls_over_refused_then_500_to_the_healthy_third() {
    let refused = refused_url().await;
    let failing = MockServer::start(Script::failing(Fault::Status(500)))
        .await
        .unwrap();
    let healthy = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!(
        "{}providers:\n{}{}{}",
        cascade(1, 100, 60.0),
        openai("first", 1, &refused),
        openai("second", 2, &failing.url()),
        openai("third", 3, &healthy.url()),
    );
    let mut router = start(&yaml).await;

    let r = router.client.ask(prompt("hello there")).await;

    assert_eq!(r.text, mock::reply("hello there"));
    assert_eq!(r.provider, "third");
    assert_eq!(r.model, "m");
    let kinds: Vec<(String, FailureKind)> = r
        .attempts
        .iter()
        .map(|a| (a.provider.clone(), a.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("first".to_string(), FailureKind::Connect),
            ("second".to_string(), FailureKind::ServerError)
        ]
    );
    assert!(
        r.attempts[0].error.to_lowercase().contains("refused"),
        "{:?}",
        r.attempts[0].error
    );
    assert_eq!(r.attempts[1].http_status, 500);
    assert_eq!(r.attempts[1].tries, 2, "one retry on a 5xx");
    assert_eq!(failing.stats().requests, 2);
    assert_eq!(healthy.stats().requests, 1);
    assert!(r.upstream_us > 0);
}

#[tokio::test]
async fn failures_over_http_open_the_circuit_and_an_open_circuit_sends_nothing() {
    let flaky = MockServer::start(Script::failing(Fault::Status(503)))
        .await
        .unwrap();
    let backup = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!(
        "{}providers:\n{}{}",
        cascade(0, 3, 60.0),
        openai("flaky", 1, &flaky.url()),
        openai("backup", 2, &backup.url()),
    );
    let mut router = start(&yaml).await;

    for i in 0..3 {
        let r = router.client.ask(prompt(&format!("p{i}"))).await;
        assert_eq!(r.provider, "backup");
        assert_eq!(r.attempts[0].kind(), FailureKind::ServerError);
    }
    assert_eq!(flaky.stats().requests, 3);
    assert_eq!(
        circuit_of(&providers(&mut router.client).await, "flaky"),
        CircuitState::Open
    );

    // Open: skipped without any network attempt.
    let r = router.client.ask(prompt("p3")).await;
    assert_eq!(r.provider, "backup");
    assert_eq!(r.attempts[0].kind(), FailureKind::CircuitOpen);
    assert_eq!(r.attempts[0].tries, 0);
    assert_eq!(
        flaky.stats().requests,
        3,
        "no request reached the open provider"
    );

    // The probe after `recovery_timeout` that closes it again: `cascade::tests`, on a paused
    // clock.
}

/// A 429's `Retry-After` header, read off the wire, sets the provider aside (how long, to
/// the millisecond, and the return after it: `cascade::tests`, on a paused clock).
#[tokio::test]
async fn retry_after_from_the_wire_sets_a_provider_aside() {
    let limited = MockServer::start(Script::failing(Fault::RateLimited {
        retry_after: "60".into(),
    }))
    .await
    .unwrap();
    let other = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!(
        "{}providers:\n{}{}",
        cascade(2, 100, 60.0),
        openai("limited", 1, &limited.url()),
        openai("other", 2, &other.url()),
    );
    let mut router = start(&yaml).await;

    // The first 429 since a success moves only its own request on (one caller's quota); the
    // second running keeps the provider aside for its Retry-After.
    for p in ["a", "a again"] {
        let r = router.client.ask(prompt(p)).await;
        assert_eq!(r.provider, "other");
        assert_eq!(r.attempts[0].kind(), FailureKind::RateLimited);
        assert_eq!(r.attempts[0].http_status, 429);
        assert_eq!(
            r.attempts[0].tries, 1,
            "a 429 is not retried on the same provider"
        );
    }
    limited.set_script(Script::default());
    let r = router.client.ask(prompt("b")).await;
    assert_eq!(r.provider, "other");
    assert_eq!(r.attempts[0].kind(), FailureKind::CoolingDown);
    assert_eq!(limited.stats().requests, 2, "no request while cooling down");
    let left = providers(&mut router.client)
        .await
        .iter()
        .find(|p| p.name == "limited")
        .unwrap()
        .cooling_down_ms;
    assert!(left > 50_000 && left <= 60_000, "cooling_down_ms = {left}");
}

#[tokio::test]
async fn client_deadline_beats_a_hanging_provider_and_closes_the_upstream_request() {
    let hanging = MockServer::start(Script::failing(Fault::Hang))
        .await
        .unwrap();
    let yaml = format!(
        "{}providers:\n{}",
        cascade(0, 100, 60.0),
        openai("hangs", 1, &hanging.url())
    );
    let mut router = start(&yaml).await;

    let began = Instant::now();
    // The deadline as sent (1 s), without the client's own timer: on a loaded machine that
    // timer can fire first and report a bare CANCELLED; the router's answer is under test.
    let mut req = tonic::Request::new(prompt("x"));
    req.metadata_mut()
        .insert("grpc-timeout", "1000m".parse().unwrap());
    let err = router.client.complete(req).await.unwrap_err();
    let took = began.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("hangs/m"), "{}", err.message());
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}; provider timeout is 30 s"
    );
    let s = within(hanging.wait_for(|s| s.cancelled >= 1)).await;
    assert_eq!((s.requests, s.completed), (1, 0));
}

#[tokio::test]
async fn cancelled_call_cancels_its_upstream_request() {
    let hanging = MockServer::start(Script::failing(Fault::Hang))
        .await
        .unwrap();
    let yaml = format!(
        "{}providers:\n{}",
        cascade(0, 100, 60.0),
        openai("hangs", 1, &hanging.url())
    );
    let router = start(&yaml).await;

    let mut client = router.client.clone();
    let call = tokio::spawn(async move { client.complete(prompt("x")).await });
    within(hanging.wait_for(|s| s.requests == 1)).await;
    call.abort();
    let s = within(hanging.wait_for(|s| s.cancelled == 1)).await;
    assert_eq!(s.completed, 0);
    // The call is counted as the caller left it (counted as its handler was dropped, which
    // is also what closed the upstream request the mock just saw go).
    assert_eq!(
        metric(
            &router,
            r#"cascade_requests_total{method="Complete",code="Cancelled"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &router,
            r#"cascade_request_duration_seconds_count{method="Complete"}"#
        ),
        1.0,
        "and timed"
    );
}

#[tokio::test]
async fn batch_answers_each_item_in_order_and_fails_only_the_rejected_ones() {
    let rejecting = || Script {
        reject_marker: Some("BAD".into()),
        ..Script::default()
    };
    let a = MockServer::start(rejecting()).await.unwrap();
    let b = MockServer::start(rejecting()).await.unwrap();
    let yaml = format!(
        "{}providers:\n{}{}",
        cascade(2, 100, 60.0),
        openai("a", 1, &a.url()),
        openai("b", 2, &b.url())
    );
    let mut router = start(&yaml).await;

    let prompts: Vec<String> = (0..10)
        .map(|i| {
            if [2, 5, 9].contains(&i) {
                format!("BAD {i}")
            } else {
                format!("good {i}")
            }
        })
        .collect();
    let results = complete_batch(&mut router.client, &prompts).await;

    assert_eq!(results.len(), 10);
    for (p, r) in prompts.iter().zip(&results) {
        match r.result.as_ref().unwrap() {
            v1::batch_result::Result::Response(resp) => {
                assert!(!p.starts_with("BAD"), "{p} should have failed");
                assert_eq!(resp.text, mock::reply(p));
            }
            v1::batch_result::Result::Error(e) => {
                assert!(p.starts_with("BAD"), "{p} should have succeeded: {e:?}");
                assert_eq!(e.code, Code::Unavailable as i32);
                let kinds: Vec<_> = e
                    .attempts
                    .iter()
                    .map(|a| (a.provider.as_str(), a.kind(), a.tries))
                    .collect();
                assert_eq!(
                    kinds,
                    [
                        ("a", FailureKind::Rejected, 1),
                        ("b", FailureKind::Rejected, 1)
                    ]
                );
            }
        }
    }
    // 400s are not retried on the same provider and do not open circuits.
    assert_eq!(a.stats().requests, 10);
    assert_eq!(b.stats().requests, 3);
    assert_eq!(
        circuit_of(&providers(&mut router.client).await, "a"),
        CircuitState::Closed
    );
}

#[tokio::test]
async fn invalid_requests_get_invalid_argument() {
    let healthy = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!("providers:\n{}", openai("only", 1, &healthy.url()));
    let mut router = start(&yaml).await;

    let mut both = prompt("x");
    both.messages.push(v1::ChatMessage {
        role: "user".into(),
        content: "y".into(),
        ..Default::default()
    });
    let mut unknown = prompt("x");
    unknown.model = "no-such-model".into();
    for (req, needle) in [
        (prompt(""), "prompt"),
        (both, "not both"),
        (unknown, "no-such-model"),
    ] {
        let err = router.client.complete(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(needle), "{}", err.message());
    }
    assert_eq!(healthy.stats().requests, 0);
}

#[tokio::test]
async fn chat_and_ollama_shapes_reach_the_mock() {
    let mock = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!(
        "providers:\n{}  - {{name: local, type: ollama, priority: 2, url: \"{}\", models: [llama]}}\n",
        openai("oai", 1, &mock.url()),
        mock.url()
    );
    let mut router = start(&yaml).await;
    let chat = v1::CompleteRequest {
        model: "m".into(),
        messages: vec![
            v1::ChatMessage {
                role: "system".into(),
                content: "be brief".into(),
                ..Default::default()
            },
            v1::ChatMessage {
                role: "user".into(),
                content: "hi chat".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let r = router.client.ask(chat).await;
    assert_eq!(
        (r.provider.as_str(), r.text.as_str()),
        ("oai", mock::reply("hi chat").as_str())
    );
    let mut generate = prompt("hi ollama");
    generate.model = "llama".into();
    let r = router.client.ask(generate).await;
    assert_eq!(
        (r.provider.as_str(), r.text.as_str()),
        ("local", mock::reply("hi ollama").as_str())
    );
    assert!(r.usage.is_some_and(|u| u.prompt_tokens == 2));
}
