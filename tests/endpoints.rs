//! A provider with several endpoints (replicas of one server), through the real service and
//! real mock servers: `least_outstanding` keeps requests off a slow replica, `round_robin`
//! takes each in turn, and a replica killed mid-run costs no caller an error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{MockServer, Script};
use common::*;

fn provider(balance: &str, mocks: &[&MockServer]) -> String {
    let urls: Vec<String> = mocks
        .iter()
        .map(|m| format!("\"{}/v1\"", m.url()))
        .collect();
    format!(
        "{}providers:\n  - {{name: replicas, type: openai, endpoints: [{}], balance: {balance}, models: [m]}}\n",
        cascade(0, 3, 60.0),
        urls.join(", ")
    )
}

fn latency(ms: u64) -> Script {
    Script {
        base_latency: Duration::from_millis(ms),
        ..Script::default()
    }
}

/// `calls` calls, `at_once` at a time; every one must be answered.
async fn run(router: &RunningRouter, calls: usize, at_once: usize) {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..calls {
        if set.len() == at_once {
            set.join_next().await.unwrap().unwrap();
        }
        let mut client = router.client.clone();
        set.spawn(async move {
            let r = client.complete(prompt(&format!("call {i}"))).await;
            assert!(r.is_ok(), "call {i}: {:?}", r.err());
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn least_outstanding_keeps_requests_off_a_slow_replica() {
    let slow = MockServer::start(latency(200)).await.unwrap();
    let (a, b) = (
        MockServer::start(latency(20)).await.unwrap(),
        MockServer::start(latency(20)).await.unwrap(),
    );
    let router = start(&provider("least_outstanding", &[&slow, &a, &b])).await;
    run(&router, 120, 12).await;
    let (s, fast) = (
        slow.stats().requests,
        a.stats().requests + b.stats().requests,
    );
    assert_eq!(s + fast, 120);
    assert!(
        fast * 10 >= (s + fast) * 7,
        "the two fast replicas took {fast} of {} (the slow one {s})",
        s + fast
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_takes_each_replica_in_turn() {
    let mocks = [
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
    ];
    let mut router = start(&provider("round_robin", &[&mocks[0], &mocks[1], &mocks[2]])).await;
    for i in 0..30 {
        router
            .client
            .complete(prompt(&format!("turn {i}")))
            .await
            .unwrap();
    }
    let counts: Vec<u64> = mocks.iter().map(|m| m.stats().requests).collect();
    assert_eq!(counts, [10, 10, 10]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_run_costs_no_caller_an_error() {
    let victim = MockServer::start(latency(5)).await.unwrap();
    let (a, b) = (
        MockServer::start(latency(5)).await.unwrap(),
        MockServer::start(latency(5)).await.unwrap(),
    );
    let router = start(&provider("least_outstanding", &[&victim, &a, &b])).await;
    let calls = tokio::spawn({
        let router_client = router.client.clone();
        async move {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..300 {
                if set.len() == 8 {
                    set.join_next().await.unwrap().unwrap();
                }
                let mut client = router_client.clone();
                set.spawn(async move {
                    let r = client.complete(prompt(&format!("call {i}"))).await;
                    assert!(r.is_ok(), "call {i}: {:?}", r.err());
                });
            }
            while let Some(done) = set.join_next().await {
                done.unwrap();
            }
        }
    });
    victim.wait_for(|s| s.requests >= 20).await;
    let served_before = victim.stats().requests;
    drop(victim);
    within(calls).await.unwrap();
    let others = a.stats().requests + b.stats().requests;
    assert!(
        others + served_before >= 300,
        "every call answered: {others} by the live replicas, {served_before} by the killed one"
    );
}

#[test]
fn endpoints_beside_a_url_are_refused_by_name() {
    let e = cascade_router::config::parse(
        "providers:\n  - {name: p, type: openai, url: \"http://127.0.0.1:1/v1\", endpoints: [\"http://127.0.0.1:2/v1\"], models: [m]}\n",
        "f.yaml",
        &|_| None,
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some(
            "f.yaml: providers[0].endpoints: set beside `url` / `base_url` (fix: list every replica under `endpoints`, or give one `url`)"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_affinity_keeps_each_group_on_one_replica_within_the_bound() {
    // 20 ms a request: long beside a loaded machine's scheduling noise, so the work in flight
    // on each replica is its two groups' callers, not an accident of who ran first (at 2 ms,
    // a replica briefly holding twice the mean shed a few of a group's requests).
    let mocks = [
        MockServer::start(latency(20)).await.unwrap(),
        MockServer::start(latency(20)).await.unwrap(),
        MockServer::start(latency(20)).await.unwrap(),
        MockServer::start(latency(20)).await.unwrap(),
    ];
    let all: Vec<&MockServer> = mocks.iter().collect();
    let router = start(&provider("prefix_affinity", &all)).await;
    // 8 groups of 25 prompts, each group sharing a 1 KiB prefix, 8 callers at once.
    let prefix = |g: usize| format!("[group {g}] ").repeat(110)[..1024].to_string();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200 {
        if set.len() == 8 {
            set.join_next().await.unwrap().unwrap();
        }
        let mut client = router.client.clone();
        let text = format!("{} question {i}", prefix(i % 8));
        set.spawn(async move {
            client.complete(prompt(&text)).await.unwrap();
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
    // Where each group's prompts went, from what each replica received.
    let mut seen = [[0usize; 4]; 8];
    for (m, mock) in mocks.iter().enumerate() {
        for body in mock.bodies() {
            let p = body["prompt"].as_str().unwrap().to_string();
            let g = (0..8).find(|&g| p.starts_with(&prefix(g))).unwrap();
            seen[g][m] += 1;
        }
    }
    for (g, on) in seen.iter().enumerate() {
        let most = on.iter().max().unwrap();
        assert!(most * 10 >= 25 * 9, "group {g} spread over {on:?}");
    }
    let per_replica: Vec<usize> = (0..4).map(|m| seen.iter().map(|g| g[m]).sum()).collect();
    assert_eq!(per_replica.iter().sum::<usize>(), 200);
    assert!(
        per_replica.iter().all(|&n| n * 4 <= 200 * 5 / 4),
        "no replica over 1.25x the mean (50): {per_replica:?}"
    );
}
