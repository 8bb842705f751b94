//! The heap a unary call holds while it is in flight, counted by a counting allocator — not
//! timed, not RSS — so a change that adds a kilobyte per call in flight fails here, in the
//! change that causes it (#32's memory goal: 10,000 calls within 64 MiB).
//!
//! The router runs in this process with its gRPC client, so the count is both sides of the
//! loopback hop: the router's part is what `python3 benches/scenarios.py memory` measures as
//! RSS. Calls are held by the simulated provider (no HTTP upstream); that each reached it is
//! waited for as an event (the router's `cascade_upstream_requests_total`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{alloc::System, time::Duration};

use cascade_router::proto::v1::router_client::RouterClient;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tonic::transport::Channel;

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes of heap live now.
fn live() -> isize {
    let s = ALLOCATOR.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize + s.bytes_reallocated
}

/// Bytes of heap one unary call may hold in flight, router and client together (debug build).
/// Measured when set: 12,245–12,311 (16,714–16,932 before `Complete` was framed by the router
/// in one box, `front::unary`); the router's own part is about 5 KiB (RSS in BENCHMARKS.md's
/// memory scenario). A change that adds a kilobyte per call fails.
const BUDGET: isize = 13_200;

/// Connections (HTTP/2; the router allows 1,024 streams on each), and the calls each carries
/// before the first count and then between the two. The first wave pays the one-time costs —
/// h2's slabs of streams and of frames read but not yet taken, grown to the largest burst they
/// have held (they never shrink), the metrics' series, the runtime's queues — all at once; the
/// second goes in small steps, each sent before the next, so it grows none of them and the
/// difference is the calls' own.
const CONNECTIONS: usize = 2;
const FIRST: usize = 600;
const MORE: usize = 400;
const STEP: usize = 25;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_holds_no_more_heap_than_its_budget() {
    let router = common::start(
        "providers:\n  - {name: sim, type: simulated, models: [m], max_concurrency: 20000, \
         simulated: {latency_ms: 3600000}}\ncache: {enabled: false}\n",
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let channel = Channel::from_shared(format!("http://{}", router.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(RouterClient::new(channel));
    }
    let mut calls = tokio::task::JoinSet::new();
    let mut hold = |wave: usize| {
        for client in &clients {
            for i in 0..wave {
                let mut client = client.clone();
                calls.spawn(async move {
                    let _ = client.complete(common::prompt(&format!("hold {i}"))).await;
                });
            }
        }
    };
    hold(FIRST);
    let mut held = CONNECTIONS * FIRST;
    sent(&router, held).await;
    let before = live();
    for _ in 0..MORE / STEP {
        hold(STEP);
        held += CONNECTIONS * STEP;
        sent(&router, held).await;
    }
    let per_call = (live() - before) / (CONNECTIONS * MORE) as isize;
    println!("heap per call in flight: {per_call} bytes");
    assert!(
        per_call <= BUDGET,
        "a unary call in flight holds {per_call} bytes of heap, over its budget of {BUDGET}"
    );
    calls.abort_all();
}

/// Waits until the router has sent `n` calls to the provider.
async fn sent(router: &common::RunningRouter, n: usize) {
    common::within(async {
        while common::metric(router, r#"cascade_upstream_requests_total{provider="sim"}"#)
            < n as f64
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}
