//! Micro-batching through the real gRPC service against real mock HTTP servers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use cascade_router::proto::v1::{FailureKind, router_client::RouterClient};
use common::*;
use tonic::{Code, transport::Channel};

/// An OpenAI-shaped provider serving model `m`, batching with `batching` (YAML) if given.
fn batching_provider(name: &str, priority: i32, base: &str, batching: &str) -> String {
    let b = if batching.is_empty() {
        String::new()
    } else {
        format!(", batching: {batching}")
    };
    format!(
        "  - {{name: {name}, type: openai, priority: {priority}, base_url: \"{base}/v1\", models: [m]{b}}}\n"
    )
}

/// The router in front of one mock upstream, provider "gpu" batching as `batching` says.
async fn one_provider(script: Script, batching: &str) -> (RunningRouter, MockServer) {
    let upstream = MockServer::start(script).await.unwrap();
    let yaml = format!(
        "providers:\n{}",
        batching_provider("gpu", 1, &upstream.url(), batching)
    );
    (start(&yaml).await, upstream)
}

fn gpu_like() -> Script {
    Script {
        base_latency: Duration::from_millis(10),
        ..Script::default()
    }
}

/// 64 clients, each sending 50 distinct prompts one after another; checks every answer.
async fn sixty_four_clients(client: &RouterClient<Channel>) -> Vec<u32> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..64 {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut sizes = Vec::new();
            for i in 0..50 {
                let p = format!("client {c} prompt {i}");
                let r = client.ask(prompt(&p)).await;
                assert_eq!(
                    r.text,
                    mock::reply(&p),
                    "an answer went to the wrong caller"
                );
                sizes.push(r.batch_size);
            }
            sizes
        });
    }
    let mut sizes = Vec::new();
    while let Some(s) = tasks.join_next().await {
        sizes.extend(s.unwrap());
    }
    sizes
}

#[tokio::test]
async fn sixty_four_callers_share_upstream_requests_and_get_their_own_answers() {
    let (router, upstream) = one_provider(
        gpu_like(),
        "{mode: fixed, max_batch_size: 32, max_wait_ms: 5}",
    )
    .await;

    let sizes = sixty_four_clients(&router.client).await;

    let s = upstream.stats();
    assert_eq!(s.items, 3200);
    assert!(
        s.requests <= 320,
        "{} upstream requests for 3200 prompts",
        s.requests
    );
    assert!(sizes.iter().all(|&b| (1..=32).contains(&b)));
}

#[tokio::test]
async fn adaptive_batches_form_when_the_upstream_is_busy() {
    // 8 requests in service at once, 10 ms each: the learned limit stays near 8, so 64
    // callers' prompts leave in batches of about 64 / 8.
    let (router, upstream) = one_provider(
        Script {
            max_concurrency: 8,
            ..gpu_like()
        },
        "{}",
    )
    .await;

    let sizes = sixty_four_clients(&router.client).await;

    let s = upstream.stats();
    assert_eq!(s.items, 3200);
    assert!(
        s.requests <= 800,
        "{} upstream requests for 3200 prompts",
        s.requests
    );
    assert!(sizes.iter().any(|&b| b > 1));
    let mut c = router.client.clone();
    let status = &providers(&mut c).await[0];
    assert!(status.adaptive);
    assert!(
        (1..=256).contains(&status.concurrency_limit),
        "{}",
        status.concurrency_limit
    );
    let mean = status.items as f64 / status.requests as f64;
    assert!((status.mean_batch_size - mean).abs() < 1e-9);
}

#[tokio::test]
async fn adaptive_sends_a_lone_caller_at_once() {
    let (mut router, _upstream) = one_provider(Script::default(), "{max_wait_ms: 5000}").await;

    let r = router.client.ask(prompt("alone")).await;

    assert_eq!(r.batch_size, 1);
    // The window is an upper bound only: with room at the provider nothing waits for it.
    assert!(
        r.queue_wait_us < 5_000_000,
        "queue_wait_us = {}",
        r.queue_wait_us
    );
}

#[tokio::test]
async fn a_provider_answering_429_is_sent_fewer_requests_at_once() {
    let (router, upstream) = one_provider(
        Script::failing(Fault::RateLimited {
            retry_after: "0".into(),
        }),
        "{}",
    )
    .await;
    let mut c = router.client.clone();
    assert_eq!(providers(&mut c).await[0].concurrency_limit, 4, "the start");
    for i in 0..3 {
        let e = c.complete(prompt(&format!("p{i}"))).await.unwrap_err();
        // Rate limited everywhere: the caller is told to retry later.
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    }
    assert!(upstream.stats().requests >= 3);
    // Halved by each 429 to a request sent after the last cut: 4 → 2 → 1.
    assert_eq!(providers(&mut c).await[0].concurrency_limit, 1);
}

#[tokio::test]
async fn without_batching_each_prompt_is_its_own_request() {
    let (router, upstream) = one_provider(gpu_like(), "").await;

    let sizes = sixty_four_clients(&router.client).await;

    assert_eq!(upstream.stats().requests, 3200);
    assert!(sizes.iter().all(|&b| b == 1));
}

#[tokio::test]
async fn lone_caller_waits_about_the_window() {
    let (mut router, _upstream) = one_provider(
        Script::default(),
        "{mode: fixed, max_batch_size: 32, max_wait_ms: 50}",
    )
    .await;

    let r = router.client.ask(prompt("alone")).await;

    assert_eq!(r.batch_size, 1);
    // Nobody else is sending: the item waits the whole window, and not much more.
    assert!(
        r.queue_wait_us >= 50_000,
        "queue_wait_us = {}",
        r.queue_wait_us
    );
    assert!(
        r.queue_wait_us < 500_000,
        "queue_wait_us = {}",
        r.queue_wait_us
    );
}

#[tokio::test]
async fn short_deadline_is_flushed_early_instead_of_expiring() {
    let (mut router, _upstream) = one_provider(
        Script::default(),
        "{mode: fixed, max_batch_size: 32, max_wait_ms: 5000}",
    )
    .await;

    let r = router
        .client
        .ask(with_timeout(prompt("hurry"), Duration::from_millis(400)))
        .await;

    assert_eq!(r.text, mock::reply("hurry"));
    assert!(
        r.queue_wait_us < 400_000,
        "queue_wait_us = {}",
        r.queue_wait_us
    );
}

#[tokio::test]
async fn cancelled_item_is_removed_before_its_batch_is_sent() {
    let (mut router, upstream) = one_provider(
        Script::default(),
        "{mode: fixed, max_batch_size: 32, max_wait_ms: 400}",
    )
    .await;

    let mut client = router.client.clone();
    let leaver = tokio::spawn(async move { client.complete(prompt("I will leave")).await });
    within(wait_queued(&mut router.client, "gpu", 1)).await;
    leaver.abort();

    let r = router.client.ask(prompt("I stay")).await;
    assert_eq!(r.text, mock::reply("I stay"));
    assert_eq!(r.batch_size, 1);
    assert_eq!(
        upstream.stats().items,
        1,
        "the cancelled prompt never went upstream"
    );
}

/// Sends `prompts` concurrently and returns the responses in order.
async fn concurrently(
    client: &RouterClient<Channel>,
    prompts: &[String],
) -> Vec<cascade_router::proto::v1::CompleteResponse> {
    let calls = prompts.iter().map(|p| {
        let mut c = client.clone();
        let p = p.clone();
        async move { c.ask(prompt(&p)).await }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test]
async fn missing_choices_fail_over_alone() {
    let batched = MockServer::start(Script {
        omit_marker: Some("SKIP".into()),
        ..Script::default()
    })
    .await
    .unwrap();
    let backup = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!(
        "{}providers:\n{}{}",
        cascade(0, 100, 60.0),
        batching_provider(
            "batched",
            1,
            &batched.url(),
            "{mode: fixed, max_batch_size: 8, max_wait_ms: 200}"
        ),
        batching_provider("backup", 2, &backup.url(), "")
    );
    let router = start(&yaml).await;

    let prompts: Vec<String> = (0..8)
        .map(|i| {
            if i % 4 == 1 {
                format!("SKIP {i}")
            } else {
                format!("keep {i}")
            }
        })
        .collect();
    let answers = concurrently(&router.client, &prompts).await;

    for (p, r) in prompts.iter().zip(&answers) {
        assert_eq!(r.text, mock::reply(p));
        if p.starts_with("SKIP") {
            assert_eq!(r.provider, "backup");
            assert_eq!(r.attempts[0].kind(), FailureKind::Malformed);
        } else {
            assert_eq!((r.provider.as_str(), r.batch_size), ("batched", 8));
        }
    }
    assert_eq!((batched.stats().requests, backup.stats().requests), (1, 2));
}

#[tokio::test]
async fn failed_batch_moves_every_item_on() {
    let failing = MockServer::start(Script::failing(Fault::Status(500)))
        .await
        .unwrap();
    let backup = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!(
        "{}providers:\n{}{}",
        cascade(0, 100, 60.0),
        batching_provider(
            "failing",
            1,
            &failing.url(),
            "{mode: fixed, max_batch_size: 8, max_wait_ms: 200}"
        ),
        batching_provider(
            "backup",
            2,
            &backup.url(),
            "{mode: fixed, max_batch_size: 8, max_wait_ms: 200}"
        )
    );
    let router = start(&yaml).await;

    let prompts: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    let answers = concurrently(&router.client, &prompts).await;

    for (p, r) in prompts.iter().zip(&answers) {
        assert_eq!(
            (r.provider.as_str(), r.text.as_str()),
            ("backup", mock::reply(p).as_str())
        );
        assert_eq!(r.attempts[0].kind(), FailureKind::ServerError);
        assert_eq!(r.batch_size, 8, "batched again at the next provider");
    }
    // The batch, then one prompt alone to tell an outage from a server that takes no arrays.
    assert_eq!((failing.stats().requests, backup.stats().requests), (2, 1));
}

#[tokio::test]
async fn a_server_that_refuses_prompt_arrays_is_sent_single_prompts_from_then_on() {
    let (router, up) = one_provider(
        Script {
            refuse_arrays: true,
            ..Script::default()
        },
        "{mode: fixed, max_batch_size: 8, max_wait_ms: 200}",
    )
    .await;
    let mut c = router.client.clone();
    assert!(providers(&mut c).await[0].native_batching);

    let prompts: Vec<String> = (0..8).map(|i| format!("first {i}")).collect();
    for (p, r) in prompts
        .iter()
        .zip(concurrently(&router.client, &prompts).await)
    {
        assert_eq!(r.text, mock::reply(p), "answered from single requests");
        assert!(r.attempts.is_empty());
    }
    let after_first = up.stats();
    assert_eq!(
        (after_first.requests, after_first.items),
        (1 + 8, 8 + 8),
        "one refused array of 8, then 8 single prompts"
    );
    assert!(!providers(&mut c).await[0].native_batching, "remembered");

    let prompts: Vec<String> = (0..8).map(|i| format!("second {i}")).collect();
    for (p, r) in prompts
        .iter()
        .zip(concurrently(&router.client, &prompts).await)
    {
        assert_eq!(r.text, mock::reply(p));
    }
    let s = up.stats();
    assert_eq!(
        (
            s.requests - after_first.requests,
            s.items - after_first.items
        ),
        (8, 8),
        "no array tried again: eight single requests"
    );
}

#[tokio::test]
async fn full_queue_answers_resource_exhausted() {
    let (mut router, _upstream) = one_provider(
        Script::default(),
        "{mode: fixed, max_batch_size: 32, max_wait_ms: 300, max_queue: 2}",
    )
    .await;

    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let mut c = router.client.clone();
            tokio::spawn(async move { c.complete(prompt(&format!("queued {i}"))).await })
        })
        .collect();
    within(wait_queued(&mut router.client, "gpu", 2)).await;

    let err = router
        .client
        .complete(prompt("one too many"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("queue full"), "{}", err.message());
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().into_inner().batch_size, 2);
    }
}

#[tokio::test]
async fn an_agents_complete_batch_rides_one_upstream_request() {
    let (mut router, upstream) = one_provider(
        Script::default(),
        "{mode: fixed, max_batch_size: 32, max_wait_ms: 50}",
    )
    .await;

    let prompts: Vec<String> = (0..10).map(|i| format!("item {i}")).collect();
    let results = complete_batch(&mut router.client, &prompts).await;

    for (p, r) in prompts.iter().zip(results) {
        let Some(cascade_router::proto::v1::batch_result::Result::Response(r)) = r.result else {
            panic!("{p} failed")
        };
        assert_eq!((r.text, r.batch_size), (mock::reply(p), 10));
    }
    assert_eq!((upstream.stats().requests, upstream.stats().items), (1, 10));
}
