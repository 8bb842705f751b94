//! Nothing lost under the faults production brings: a provider that hangs, a provider at
//! capacity, callers with different deadlines sharing one call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use cascade_router::proto::v1::{self, CircuitState, FailureKind};
use common::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_first_provider_leaves_time_for_the_next() {
    let hangs = MockServer::start(Script::failing(Fault::Hang))
        .await
        .unwrap();
    let second = MockServer::start(Script::default()).await.unwrap();
    let third = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!(
        "{}providers:\n{}{}{}",
        cascade(2, 5, 600.0),
        openai("hangs", 1, &hangs.url()),
        openai("second", 2, &second.url()),
        openai("third", 3, &third.url()),
    ))
    .await;
    let calls = spawn_calls(&router.client, 200, "q", Duration::from_secs(5));
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await.unwrap().unwrap().into_inner();
        assert_eq!(
            (r.provider.as_str(), r.text),
            ("second", mock::reply(&format!("q{i}")))
        );
        let first = &r.attempts[0];
        assert_eq!(
            (first.provider.as_str(), first.kind()),
            ("hangs", FailureKind::Timeout),
            "cut short by its share of the deadline, not retried"
        );
    }
    let mut c = router.client.clone();
    // Never answered, and no try had its whole 30 s timeout: nothing yet says the provider is
    // at fault rather than the callers' 5 s deadlines (#26). Its share of each deadline still
    // bounds what it costs a caller.
    assert_eq!(
        circuit_of(&providers(&mut c).await, "hangs"),
        CircuitState::Closed
    );
    assert_eq!(third.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_hangs_past_its_timeout_opens_its_breaker() {
    let hangs = MockServer::start(Script::failing(Fault::Hang))
        .await
        .unwrap();
    let second = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!(
        "{}providers:\n  - {{name: hangs, type: openai, priority: 1, base_url: \"{}/v1\", models: [m], timeout_seconds: 0.5}}\n{}",
        cascade(0, 5, 600.0),
        hangs.url(),
        openai("second", 2, &second.url()),
    ))
    .await;
    // Each try gets 2.5 s of a 5 s deadline, more than the provider's 0.5 s timeout: its
    // silence is its own fault.
    let calls = spawn_calls(&router.client, 20, "q", Duration::from_secs(5));
    for call in calls {
        let r = call.await.unwrap().unwrap().into_inner();
        assert_eq!(r.provider, "second");
    }
    let mut c = router.client.clone();
    assert_eq!(
        circuit_of(&providers(&mut c).await, "hangs"),
        CircuitState::Open
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_provider_at_capacity_sheds_without_opening_its_breaker() {
    let slow = MockServer::start(Script {
        base_latency: Duration::from_millis(500),
        max_concurrency: 2,
        ..Script::default()
    })
    .await
    .unwrap();
    let router = start(&format!(
        "{}providers:\n  - {{name: slow, type: openai, base_url: \"{}/v1\", models: [m], max_concurrency: 2, max_waiting: 8}}\n",
        cascade(0, 3, 600.0),
        slow.url()
    ))
    .await;
    let calls = spawn_calls(&router.client, 600, "s", Duration::from_secs(5));
    let (mut served, mut shed) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => served += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                shed += 1;
            }
        }
    }
    assert!(served >= 2, "it served what it could: {served}");
    assert_eq!(served + shed, 600);
    let mut c = router.client.clone();
    let p = providers(&mut c).await;
    assert_eq!(circuit_of(&p, "slow"), CircuitState::Closed);
    assert_eq!(
        p[0].failures, 0,
        "its own slowness was never judged a failure"
    );
    assert_eq!(c.ask(prompt("right after")).await.provider, "slow");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_deadline_does_not_fail_a_longer_one_sharing_the_call() {
    let up = MockServer::start(Script {
        base_latency: Duration::from_secs(1),
        ..Script::default()
    })
    .await
    .unwrap();
    let router = start(&format!(
        "cache: {{scope: shared}}\nproviders:\n{}",
        openai("up", 1, &up.url())
    ))
    .await;
    let same = || v1::CompleteRequest {
        temperature: Some(0.0),
        ..prompt("the same question")
    };
    let mut a = router.client.clone();
    let short = tokio::spawn(async move {
        a.complete(with_timeout(same(), Duration::from_millis(300)))
            .await
    });
    up.wait_for(|s| s.requests >= 1).await;
    let mut b = router.client.clone();
    let long = b
        .complete(with_timeout(same(), Duration::from_secs(10)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(long.text, mock::reply("the same question"));
    let err = short.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
}

/// A fault soak: 64 callers, thousands of calls, three providers of which two fail a fifth of
/// their requests in every way a provider fails. Every call gets exactly one answer, the right
/// one, and retries stay within the retry budget.
#[tokio::test(flavor = "multi_thread")]
async fn fault_soak_answers_every_call_within_the_retry_budget() {
    let faults: Fault = "500,429:1,reset,hang,malformed,slow:50".parse().unwrap();
    let flaky = || Script {
        fault: Some(faults.clone()),
        fault_rate: 0.2,
        ..Script::default()
    };
    let a = MockServer::start(flaky()).await.unwrap();
    let b = MockServer::start(flaky()).await.unwrap();
    let c = MockServer::start(Script::default()).await.unwrap();
    let entry = |name: &str, priority: i32, url: &str| {
        format!(
            "  - {{name: {name}, type: openai, priority: {priority}, base_url: \"{url}/v1\", models: [m], timeout_seconds: 0.5}}\n"
        )
    };
    let router = start(&format!(
        "{}providers:\n{}{}{}",
        cascade(2, 5, 1.0),
        entry("a", 1, &a.url()),
        entry("b", 2, &b.url()),
        entry("c", 3, &c.url()),
    ))
    .await;
    const CALLS: usize = 3000;
    const CALLERS: usize = 64;
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..CALLERS)
        .map(|w| {
            let mut client = router.client.clone();
            tokio::spawn(async move {
                let mut providers_sent_to = 0u64;
                for n in (w..CALLS).step_by(CALLERS) {
                    let text = format!("soak {n}");
                    let r = client
                        .complete(with_timeout(prompt(&text), Duration::from_secs(20)))
                        .await
                        .unwrap_or_else(|e| panic!("call {n} failed: {e:?}"))
                        .into_inner();
                    assert_eq!(r.text, mock::reply(&text), "call {n} got another's answer");
                    providers_sent_to +=
                        1 + r.attempts.iter().filter(|a| a.tries > 0).count() as u64;
                }
                providers_sent_to
            })
        })
        .collect();
    let mut first_tries = 0;
    for w in workers {
        first_tries += w.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent = a.stats().requests + b.stats().requests + c.stats().requests;
    let retries = sent - first_tries;
    // 20% of the calls, plus 10 a second over the run and the budget's 10 s window.
    let allowed = 0.2 * CALLS as f64 + 10.0 * (elapsed + 10.0);
    assert!(
        (retries as f64) <= allowed,
        "{retries} retries over {CALLS} calls in {elapsed:.1} s; the budget allows {allowed:.0}"
    );
    assert!(a.stats().requests > 0 && c.stats().requests > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_quota_sends_the_burst_on_and_the_rest_elsewhere() {
    let a = MockServer::start(Script::default()).await.unwrap();
    let b = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!(
        "providers:\n  - {{name: a, type: openai, priority: 1, base_url: \"{}/v1\", models: [m], rate_limit: {{requests_per_minute: 60, burst: 10}}}}\n{}",
        a.url(),
        openai("b", 2, &b.url())
    ))
    .await;
    let started = std::time::Instant::now();
    let calls = spawn_calls(&router.client, 100, "r", Duration::from_secs(2));
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await.unwrap().unwrap().into_inner();
        assert_eq!(r.text, mock::reply(&format!("r{i}")));
    }
    // One request a second refills the bucket after its burst of ten.
    let refilled = started.elapsed().as_secs() + 1;
    let to_a = a.stats().requests;
    assert!(
        (10..=10 + refilled).contains(&to_a),
        "{to_a} requests reached a (burst 10, {refilled} refilled)"
    );
    // A request that got a cell late in its share may still be cut short at a and answered
    // by b, so b sees at least the rest.
    assert!(b.stats().requests >= 100 - to_a);
}

#[tokio::test]
async fn a_client_over_its_quota_gets_resource_exhausted_with_a_retry_hint() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!(
        "server: {{quotas: {{requests_per_minute: 1, burst: 3}}}}\nproviders:\n{}",
        openai("up", 1, &up.url())
    ))
    .await;
    let mut c = router.client.clone();
    let as_agent = |agent: &str| v1::CompleteRequest {
        agent: agent.into(),
        ..prompt("q")
    };
    for _ in 0..3 {
        c.ask(as_agent("greedy")).await;
    }
    let err = c.complete(as_agent("greedy")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    // One call a minute refills the bucket: the hint is the rest of that minute.
    let hint: u64 = err
        .metadata()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a retry-after trailer in seconds");
    assert!((1..=60).contains(&hint), "retry-after: {hint}");
    assert_eq!(c.ask(as_agent("modest")).await.text, mock::reply("q"));
    assert_eq!(
        up.stats().requests,
        4,
        "the refused call never went upstream"
    );
}
