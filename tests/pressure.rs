//! Under pressure (#26), the smaller promises: what the router echoes back is bounded, a
//! caller's too-short deadline is DEADLINE_EXCEEDED (HTTP 504), the `Bearer` scheme is read in
//! any case. Real router, real clients, real mock providers on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{collections::HashMap, time::Duration};

use cascade_devtools::mock::{MockServer, Script};
use cascade_router::proto::v1;
use common::*;
use serde_json::json;
use tonic::Code;

#[tokio::test]
async fn a_huge_bad_value_is_named_not_echoed() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let mut router = start(&format!("providers:\n{}", openai("up", 1, &up.url()))).await;
    let huge = "r".repeat(100_000);
    let bad_role = v1::CompleteRequest {
        model: "m".into(),
        messages: vec![v1::ChatMessage {
            role: huge.clone(),
            content: "x".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let bad_model = v1::CompleteRequest {
        model: huge,
        prompt: "x".into(),
        ..Default::default()
    };
    for (req, names) in [(bad_role, "messages[0].role"), (bad_model, "unknown model")] {
        let e = router.client.complete(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", &e.message()[..200]);
        assert!(e.message().contains(names), "{}", e.message());
        assert!(e.message().contains("(100000 bytes)"), "{}", e.message());
        assert!(e.message().len() < 4200, "{} bytes", e.message().len());
    }
    assert_eq!(up.stats().requests, 0);
}

#[tokio::test]
async fn too_short_a_deadline_is_504_not_503_and_bearer_is_any_case() {
    let up = MockServer::start(Script {
        base_latency: Duration::from_millis(200),
        ..Script::default()
    })
    .await
    .unwrap();
    let port = free_port().await;
    let key = "sk-router-pressure-0123456789";
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\", auth: {{keys: [{{name: a, key: \"${{KEY}}\"}}]}}}}\nproviders:\n{}",
        openai("up", 1, &up.url())
    );
    let router = start_with_env(&yaml, HashMap::from([("KEY".to_string(), key.to_string())])).await;
    http_listening(&format!("127.0.0.1:{port}")).await;
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let post = |timeout: Option<&'static str>, scheme: &'static str| {
        let mut r = reqwest::Client::new()
            .post(&url)
            .header("authorization", format!("{scheme} {key}"))
            .json(&body);
        if let Some(ms) = timeout {
            r = r.header("x-cascade-timeout-ms", ms);
        }
        r.send()
    };
    // The first answer teaches the router the provider's usual time (200 ms).
    assert_eq!(post(None, "bearer").await.unwrap().status().as_u16(), 200);
    assert_eq!(post(None, "BEARER").await.unwrap().status().as_u16(), 200);
    let short = post(Some("1"), "Bearer").await.unwrap();
    assert_eq!(short.status().as_u16(), 504);
    // Over gRPC: DEADLINE_EXCEEDED, the lower-case scheme taken too.
    let mut c = router.client.clone();
    let mut req = tonic::Request::new(prompt("hi"));
    // The deadline as sent, without the client's own timer, and far from tonic's server-side
    // one (either, on a busy machine, can fire first and report CANCELLED): the router sees
    // 50 ms is too short for a 200 ms provider and says so at once.
    req.metadata_mut()
        .insert("grpc-timeout", "50m".parse().unwrap());
    req.metadata_mut()
        .insert("authorization", format!("bearer {key}").parse().unwrap());
    let e = c.complete(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
}

/// A healthy provider slower than a caller's share of its deadline, and a fast backup.
async fn slow_and_backup(
    latency: Duration,
    primary_extra: &str,
) -> (RunningRouter, MockServer, MockServer) {
    let slow = MockServer::start(Script {
        base_latency: latency,
        chunk_interval: Duration::from_millis(1),
        ..Script::default()
    })
    .await
    .unwrap();
    let backup = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!(
        "{}providers:\n\
         - {{name: slow, type: openai, priority: 1, base_url: \"{}/v1\", models: [m]{primary_extra}}}\n\
         - {{name: backup, type: openai, priority: 2, base_url: \"{}/v1\", models: [m]}}\n",
        cascade(0, 3, 60.0),
        slow.url(),
        backup.url()
    );
    (start(&yaml).await, slow, backup)
}

fn with_deadline(req: v1::CompleteRequest, ms: u64) -> tonic::Request<v1::CompleteRequest> {
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_millis(ms));
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_with_short_deadlines_do_not_open_a_healthy_providers_breaker() {
    // The provider answers in 300 ms; callers give 400 ms, so each try at it gets half (the
    // backup remains): ~190 ms, less than it needs. That is the callers' loss, not its failure.
    let (router, slow, backup) = slow_and_backup(Duration::from_millis(300), "").await;
    let mut c = router.client.clone();
    for i in 0..10 {
        let r = c
            .complete(with_deadline(prompt(&format!("hurry {i}")), 400))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.provider, "backup", "{r:?}");
    }
    let status = providers(&mut c).await;
    assert_eq!(
        circuit_of(&status, "slow"),
        v1::CircuitState::Closed,
        "three failures would have opened it: none was the provider's"
    );
    // A caller with time gets the healthy provider, first in the cascade.
    let r = c
        .complete(with_deadline(prompt("no hurry"), 5000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.provider, "slow");
    assert_eq!(slow.stats().requests, 11);
    assert_eq!(backup.stats().requests, 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn time_in_the_batch_queue_is_not_the_providers_timeout() {
    // One slot, 200 ms a batch of 2, a 500 ms provider timeout: 8 callers at once make four
    // batches in a row, the last sent ~600 ms after it was queued. The timeout starts at the send.
    let up = MockServer::start(Script {
        base_latency: Duration::from_millis(200),
        max_concurrency: 1,
        ..Script::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        "{}providers:\n\
         - {{name: up, type: openai, base_url: \"{}/v1\", models: [m], timeout_seconds: 0.5, max_concurrency: 1, batching: {{mode: fixed, max_batch_size: 2, max_wait_ms: 1}}}}\n",
        cascade(0, 3, 60.0),
        up.url()
    );
    let router = start(&yaml).await;
    let calls = (0..8).map(|i| {
        let mut c = router.client.clone();
        async move {
            c.complete(with_deadline(prompt(&format!("queued {i}")), 10_000))
                .await
        }
    });
    for r in futures_util::future::join_all(calls).await {
        let r = r.unwrap().into_inner();
        assert_eq!(r.provider, "up");
    }
    let mut c = router.client.clone();
    assert_eq!(
        circuit_of(&providers(&mut c).await, "up"),
        v1::CircuitState::Closed
    );
    assert_eq!(up.stats().items, 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_first_token_timeout_moves_on_instead_of_retrying() {
    let (router, slow, backup) = slow_and_backup(
        Duration::from_millis(2000),
        ", first_token_timeout_seconds: 0.2",
    )
    .await;
    // Retries on the same provider would try the silent one again: the cascade file allows 2.
    drop(router);
    let yaml = format!(
        "{}providers:\n\
         - {{name: slow, type: openai, priority: 1, base_url: \"{}/v1\", models: [m], first_token_timeout_seconds: 0.2}}\n\
         - {{name: backup, type: openai, priority: 2, base_url: \"{}/v1\", models: [m]}}\n",
        cascade(2, 100, 60.0),
        slow.url(),
        backup.url()
    );
    let router = start(&yaml).await;
    let mut c = router.client.clone();
    let mut s = c
        .complete_stream(with_deadline(prompt("stream it"), 10_000))
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(m) = s.message().await.unwrap() {
        text.push_str(&m.text);
        if let Some(end) = m.end {
            assert_eq!(end.provider, "backup");
            assert_eq!(end.attempts.len(), 1);
            assert_eq!(
                end.attempts[0].tries, 1,
                "not tried again: {:?}",
                end.attempts
            );
        }
    }
    assert!(!text.is_empty());
    assert_eq!(slow.stats().requests, 1);
}

/// A router with the HTTP front on a free port and these `limits`, in front of one mock, once
/// the front listens: (router, its HTTP address, the mock).
async fn http_front(limits: &str) -> (RunningRouter, String, MockServer) {
    let up = MockServer::start(Script::default()).await.unwrap();
    let port = free_port().await;
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\"}}\nlimits: {limits}\nproviders:\n{}",
        openai("up", 1, &up.url())
    );
    let router = start(&yaml).await;
    let addr = format!("127.0.0.1:{port}");
    http_listening(&addr).await;
    (router, addr, up)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_can_hold_the_http_front() {
    use tokio::io::AsyncWriteExt;
    let (router, addr, _up) = http_front(
        "{header_read_timeout_seconds: 0.5, body_read_timeout_seconds: 0.5, max_connections_per_peer: 4}",
    )
    .await;

    // A slowloris: half a request head, then nothing. Cut at the header timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    closed_by_server(&mut slow).await;
    // A slow body: the head, 10 of its 100 bytes, then nothing. 408 at the body timeout, and
    // the connection closed.
    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\": ",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut slow_body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    // An idle keep-alive connection: one request, then silence. Closed after the timeout.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    closed_by_server(&mut idle).await;

    // One peer (127.0.0.2) holds its 4 connections; a fifth from it is closed at once, while
    // a client at another address is served.
    let mut held = Vec::new();
    for _ in 0..4 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        held.push(s.connect(addr.parse().unwrap()).await.unwrap());
    }
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut fifth = s.connect(addr.parse().unwrap()).await.unwrap();
    closed_by_server(&mut fifth).await;
    let ok = reqwest::get(format!("http://{addr}/v1/models"))
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert!(metric(&router, "cascade_connections_refused_total") >= 1.0);
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grpc_front_caps_connections_per_peer() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!(
        "limits: {{max_connections_per_peer: 3}}\nproviders:\n{}",
        openai("up", 1, &up.url())
    ))
    .await;
    // The test's own client holds one connection from 127.0.0.1; 127.0.0.2 holds three more.
    let mut held = Vec::new();
    for _ in 0..3 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        held.push(s.connect(router.addr).await.unwrap());
    }
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut fourth = s.connect(router.addr).await.unwrap();
    closed_by_server(&mut fourth).await;
    let mut c = router.client.clone();
    assert_eq!(c.ask(prompt("still served")).await.provider, "up");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_router, addr, up) = http_front("{}").await;
    // 100 MB announced: refused with 413 before any of it is read.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    within(async {
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(up.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_429_does_not_sideline_a_provider_for_everyone() {
    // Every 5th request is told 429 with a 30 s Retry-After (one caller's quota); the rest
    // are served. The provider stays in use; a 429 sends only its own request on.
    let limited = MockServer::start(Script {
        fault: Some(cascade_devtools::mock::Fault::RateLimited {
            retry_after: "30".into(),
        }),
        fault_every: 5,
        ..Script::default()
    })
    .await
    .unwrap();
    let backup = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!(
        "{}providers:\n{}{}",
        cascade(0, 3, 60.0),
        openai("limited", 1, &limited.url()),
        openai("backup", 2, &backup.url()),
    ))
    .await;
    let mut c = router.client.clone();
    let mut by_limited = 0;
    for i in 0..50 {
        if c.ask(prompt(&format!("q{i}"))).await.provider == "limited" {
            by_limited += 1;
        }
    }
    assert_eq!(by_limited, 40, "all but the 429s (every 5th request)");
    assert_eq!(backup.stats().requests, 10);

    // A provider that keeps saying 429 is set aside for its Retry-After.
    limited.set_script(Script::failing(
        cascade_devtools::mock::Fault::RateLimited {
            retry_after: "30".into(),
        },
    ));
    for i in 0..10 {
        assert_eq!(c.ask(prompt(&format!("r{i}"))).await.provider, "backup");
    }
    // The 50th request was a 429 with no success since: the next 429 is the second running.
    assert_eq!(
        limited.stats().requests,
        51,
        "two 429s running, then none sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_client_that_says_nothing_is_dropped() {
    let up = MockServer::start(Script::default()).await.unwrap();
    let router = start(&format!(
        "limits: {{handshake_timeout_seconds: 0.3}}\nproviders:\n{}",
        openai("up", 1, &up.url())
    ))
    .await;
    // Connected, and not even the HTTP/2 preface: closed at the timeout.
    let mut silent = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    closed_by_server(&mut silent).await;
    let mut c = router.client.clone();
    assert_eq!(c.ask(prompt("still served")).await.provider, "up");
}

/// What the server sends until it closes the connection (bounded by `within`).
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    within(async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&all).into_owned()
}

/// The HTTP/2 client preface and an empty SETTINGS frame: a gRPC connection, then silence.
const H2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// The real binary closes 1,000 idle connections on each front after `idle_timeout_seconds`
/// (HTTP/2 on gRPC, HTTP/1 keep-alive on the HTTP front, whose header timeout is far longer),
/// while a call running longer than the idle timeout is not cut.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_on_both_fronts_but_not_a_running_call() {
    use tokio::{io::AsyncWriteExt, net::TcpStream};
    // The test holds 2,000 sockets.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let up = MockServer::start(Script {
        base_latency: Duration::from_millis(2500),
        ..Script::default()
    })
    .await
    .unwrap();
    let port = free_port().await;
    let config = temp_file(
        "idle",
        &format!(
            "server: {{http_listen: \"127.0.0.1:{port}\"}}\n\
             limits: {{idle_timeout_seconds: 1, max_connections_per_peer: 5000}}\n\
             providers:\n{}",
            openai("up", 1, &up.url())
        ),
    );
    let served = Served::start(&[], &config, "info");
    let http = format!("127.0.0.1:{port}");
    http_listening(&http).await;

    let mut client = served.client().await;
    let running = tokio::spawn(async move { client.complete(prompt("longer than idle")).await });

    let mut idle = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(&served.addr).await.unwrap();
        s.write_all(H2_HELLO).await.unwrap();
        idle.push(s);
    }
    for _ in 0..1000 {
        let mut s = TcpStream::connect(&http).await.unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        idle.push(s);
    }
    futures_util::future::join_all(idle.iter_mut().map(closed_by_server)).await;

    let answer = within(running).await.unwrap().unwrap().into_inner();
    assert_eq!(answer.provider, "up", "the running call was answered");
    served.finish();
}
