//! The completion cache and coalescing through the real gRPC service and the real mock
//! upstream; the shared Redis level against a real redis-server on a loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, MockServer, Script};
use cascade_router::proto::v1::{self, CacheMode};
use common::{redis_server::RedisServer, *};
use tonic::Code;

fn cached_router_yaml(mock: &MockServer, cache: &str) -> String {
    format!(
        "cache: {cache}\nproviders:\n{}",
        openai("up", 1, &mock.url())
    )
}

fn det(p: &str, agent: &str) -> v1::CompleteRequest {
    let mut r = prompt(p);
    r.temperature = Some(0.0);
    r.agent = agent.into();
    r
}

#[tokio::test]
async fn deterministic_requests_are_cached_with_modes() {
    let up = MockServer::start(Script::default()).await.unwrap();
    // (Expiry after `ttl_seconds` is the cache's unit test, on a paused clock.)
    let mut router = start(&cached_router_yaml(&up, "{ttl_seconds: 3600}")).await;
    let c = &mut router.client;

    let first = c.ask(det("q", "a")).await;
    let again = c.ask(det("q", "a")).await;
    assert!(!first.cached && again.cached);
    assert_eq!(again.text, mock::reply("q"));
    assert_eq!((again.provider.as_str(), again.model.as_str()), ("up", "m"));
    assert_eq!(up.stats().requests, 1, "the hit never reached the upstream");

    // Sampling requests are not cached; a seed makes them deterministic.
    let mut warm = prompt("q");
    warm.temperature = Some(0.7);
    assert!(!c.ask(warm.clone()).await.cached);
    assert!(!c.ask(warm.clone()).await.cached);
    warm.seed = Some(7);
    c.complete(warm.clone()).await.unwrap();
    assert!(c.ask(warm).await.cached);
    assert_eq!(up.stats().requests, 4);

    let with_mode = |mode: CacheMode| {
        let mut r = det("q", "a");
        r.cache = mode as i32;
        r
    };
    let bypass = c.ask(with_mode(CacheMode::Bypass)).await;
    assert!(!bypass.cached);
    assert_eq!(up.stats().requests, 5, "BYPASS reads nothing");
    let only = c.ask(with_mode(CacheMode::Only)).await;
    assert!(only.cached);
    let refresh = c.ask(with_mode(CacheMode::Refresh)).await;
    assert!(!refresh.cached);
    assert_eq!(up.stats().requests, 6, "REFRESH goes upstream");
    let err = c
        .complete({
            let mut r = with_mode(CacheMode::Only);
            r.prompt = "never asked".into();
            r
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(up.stats().requests, 6, "ONLY never calls a provider");
    let mut bypass_new = with_mode(CacheMode::Bypass);
    bypass_new.prompt = "bypassed".into();
    c.complete(bypass_new.clone()).await.unwrap();
    bypass_new.cache = CacheMode::Only as i32;
    assert_eq!(
        c.complete(bypass_new).await.unwrap_err().code(),
        Code::NotFound,
        "BYPASS writes nothing"
    );
}

#[tokio::test]
async fn tenants_do_not_share_entries_unless_scope_is_shared() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let mut tenant = start(&cached_router_yaml(&up, "{}")).await;
    tenant
        .client
        .complete(det("secret plan", "tenant-a"))
        .await
        .unwrap();
    let b = tenant.client.ask(det("secret plan", "tenant-b")).await;
    assert!(!b.cached, "tenant B must not get tenant A's answer");
    assert_eq!(up.stats().requests, 2);

    let shared_up = MockServer::start(Script::default()).await.unwrap();
    let mut shared = start(&cached_router_yaml(&shared_up, "{scope: shared}")).await;
    shared
        .client
        .complete(det("common", "tenant-a"))
        .await
        .unwrap();
    let b = shared.client.ask(det("common", "tenant-b")).await;
    assert!(b.cached);
    assert_eq!(shared_up.stats().requests, 1);
}

#[tokio::test]
async fn identical_concurrent_requests_share_one_upstream_call_even_if_the_first_leaves() {
    let up = MockServer::start(Script {
        base_latency: Duration::from_millis(400),
        ..Script::default()
    })
    .await
    .unwrap();
    let router = start(&cached_router_yaml(&up, "{}")).await;

    let mut first_client = router.client.clone();
    let first = tokio::spawn(async move { first_client.complete(det("same", "a")).await });
    within(up.wait_for(|s| s.requests == 1)).await;
    let followers: Vec<_> = (0..99)
        .map(|_| {
            let mut c = router.client.clone();
            tokio::spawn(async move { c.complete(det("same", "a")).await })
        })
        .collect();
    within(async {
        while metric(&router, "cascade_cache_coalesced_total") < 99.0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    first.abort();

    for f in followers {
        let r = f.await.unwrap().unwrap().into_inner();
        assert_eq!(r.text, mock::reply("same"));
    }
    let s = up.stats();
    assert_eq!(
        (s.requests, s.completed, s.cancelled),
        (1, 1, 0),
        "one upstream call, finished for the 99"
    );
}

#[tokio::test]
async fn cache_stays_within_max_bytes() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = start(&cached_router_yaml(&up, "{max_bytes: 65536}")).await;
    let mut c = router.client.clone();
    let mut peak = 0.0f64;
    for i in 0..200 {
        let big = format!("{i} {}", "x".repeat(2000));
        c.complete(det(&big, "a")).await.unwrap();
        peak = peak.max(metric(&router, "cascade_cache_bytes"));
    }
    assert!(peak > 32768.0, "the cache filled up: {peak}");
    assert!(peak <= 65536.0, "cache held {peak} bytes, over max_bytes");
    assert!(metric(&router, "cascade_cache_evictions_total") > 0.0);
}

#[tokio::test]
async fn metrics_are_served_over_http() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let port = free_port().await;
    let yaml = format!(
        "server: {{metrics_listen: \"127.0.0.1:{port}\"}}\n{}",
        cached_router_yaml(&up, "{}")
    );
    let mut router = start(&yaml).await;
    router.client.complete(det("m", "a")).await.unwrap();
    router.client.complete(det("m", "a")).await.unwrap();
    let body = scrape(port).await;
    assert!(body.contains("cascade_cache_hits_total 1"), "{body}");
    assert!(
        body.contains("cascade_upstream_requests_total{provider=\"up\"} 1"),
        "{body}"
    );
}

// === Redis ===

#[tokio::test]
async fn replicas_share_completions_through_redis_and_survive_its_outage() {
    let port: u16 = refused_url()
        .await
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let Some(mut redis) = RedisServer::start(port).await else {
        return;
    };
    let up = MockServer::start(Script::default()).await.unwrap();
    let cache = format!(
        "{{backend: redis, redis_url: \"redis://127.0.0.1:{}\", redis_timeout_ms: 200}}",
        redis.port
    );
    let mut one = start(&cached_router_yaml(&up, &cache)).await;
    let mut two = start(&cached_router_yaml(&up, &cache)).await;

    assert!(!one.client.ask(det("shared question", "a")).await.cached);
    redis.wait_keys(1).await;
    let r = two.client.ask(det("shared question", "a")).await;
    assert!(r.cached, "the second replica reads what the first stored");
    assert_eq!(r.text, mock::reply("shared question"));
    assert_eq!(up.stats().requests, 1);

    redis.stop();
    let errors_before = metric(&two, "cascade_cache_redis_errors_total");
    for i in 0..5 {
        let p = format!("during outage {i}");
        assert_eq!(one.client.ask(det(&p, "a")).await.text, mock::reply(&p));
        assert_eq!(two.client.ask(det(&p, "a")).await.text, mock::reply(&p));
    }
    assert!(metric(&two, "cascade_cache_redis_errors_total") > errors_before);

    let _redis = RedisServer::start(port)
        .await
        .expect("redis-server, started before");
    // Sharing resumes once the background probe finds Redis back.
    within(async {
        while metric(&two, "cascade_cache_redis_up") < 1.0
            || metric(&one, "cascade_cache_redis_up") < 1.0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut resumed = false;
    for i in 0..100 {
        let p = format!("after restart {i}");
        one.client.complete(det(&p, "a")).await.unwrap();
        if two.client.ask(det(&p, "a")).await.cached {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "sharing did not resume after Redis came back");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_redis_is_skipped_after_a_few_failures_and_found_back() {
    let port: u16 = refused_url()
        .await
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let Some(redis) = RedisServer::start(port).await else {
        return;
    };
    let up = MockServer::start(Script::default()).await.unwrap();
    let cache = format!(
        "{{backend: redis, redis_url: \"redis://127.0.0.1:{port}\", redis_timeout_ms: 100}}"
    );
    let mut one = start(&cached_router_yaml(&up, &cache)).await;
    let mut two = start(&cached_router_yaml(&up, &cache)).await;
    assert!(!one.client.ask(det("before", "a")).await.cached);
    redis.wait_keys(1).await;
    assert!(two.client.ask(det("before", "a")).await.cached);

    // Redis hangs (SIGSTOP): connections stay open, nothing answers.
    redis.signal("STOP");
    for i in 0..60 {
        let p = format!("while stalled {i}");
        let r = two.client.ask(det(&p, "a")).await;
        assert_eq!(r.text, mock::reply(&p), "every call answered");
    }
    assert_eq!(metric(&two, "cascade_cache_redis_up"), 0.0);
    assert_eq!(metric(&two, "cascade_cache_redis_trips_total"), 1.0);
    let errors = metric(&two, "cascade_cache_redis_errors_total");
    assert!(
        errors <= 8.0,
        "after a few failures Redis is skipped, not waited on: {errors} errors"
    );
    assert!(metric(&two, "cascade_cache_redis_skipped_total") >= 50.0);

    // It goes on: the probe finds it, and the replicas share again.
    redis.signal("CONT");
    within(async {
        while metric(&two, "cascade_cache_redis_up") < 1.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let keys_before = {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("DBSIZE")
            .query_async::<usize>(&mut c)
            .await
            .unwrap()
    };
    assert!(!two.client.ask(det("after", "a")).await.cached);
    redis.wait_keys(keys_before + 1).await;
    assert!(
        one.client.ask(det("after", "a")).await.cached,
        "shared again"
    );
}
