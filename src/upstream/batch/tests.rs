use super::{adaptive::*, *};
use crate::{completion::GenParams, config};

fn batcher(batching: &str) -> (Arc<Link>, Batcher) {
    batcher_with(batching, "")
}

/// `extra`: more of the provider's settings, each followed by a comma.
fn batcher_with(batching: &str, extra: &str) -> (Arc<Link>, Batcher) {
    let yaml = format!(
        "providers:\n  - {{name: sim, type: simulated, models: [m], {extra} batching: {batching}}}\n"
    );
    let c = config::parse(&yaml, "t", &|_| None).unwrap();
    let p = &c.providers[0];
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let provider = crate::provider::build(p).unwrap();
    let link = Arc::new(Link::new(p, c.cascade.breaker, &metrics, provider, None));
    let b = Batcher::new(p, &link).unwrap();
    (link, b)
}

fn req(prompt: &str) -> Arc<CompletionRequest> {
    CompletionRequest::test_prompt(prompt)
}

fn later(ms: u64) -> Window {
    Window::whole(Instant::now() + Duration::from_millis(ms))
}

#[test]
fn the_arrival_gap_follows_the_service_time_within_bounds() {
    let ms = Duration::from_millis;
    assert_eq!(arrival_gap(ms(20), ms(5)), Duration::from_micros(2500));
    assert_eq!(arrival_gap(ms(50), ms(5)), ms(5), "no longer than max_wait");
    assert_eq!(
        arrival_gap(ms(4), ms(5)),
        ARRIVAL_GAP,
        "no shorter than 1 ms"
    );
    assert_eq!(arrival_gap(ms(50), ms(0)), ARRIVAL_GAP);
}

#[tokio::test(start_paused = true)]
async fn lone_item_waits_exactly_the_window() {
    let (_, b) = batcher("{mode: fixed, max_batch_size: 8, max_wait_ms: 5}");
    let s = b.settings("m").unwrap();
    let r = b
        .submit(&"m".into(), &req("x"), s, later(60_000))
        .await
        .unwrap();
    assert_eq!((r.batch_size, r.queue_wait), (1, Duration::from_millis(5)));
    assert_eq!(r.completion.text, "[m] you said: x");
}

#[tokio::test(start_paused = true)]
async fn full_batch_goes_at_once() {
    let (up, b) = batcher("{mode: fixed, max_batch_size: 4, max_wait_ms: 1000}");
    let s = b.settings("m").unwrap();
    let model: Arc<str> = "m".into();
    let reqs: Vec<_> = (0..4).map(|i| req(&format!("p{i}"))).collect();
    let out =
        futures_util::future::join_all(reqs.iter().map(|r| b.submit(&model, r, s, later(60_000))))
            .await;
    for (i, r) in out.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!((r.batch_size, r.queue_wait), (4, Duration::ZERO));
        assert_eq!(
            r.completion.text,
            format!("[m] you said: p{i}"),
            "answers map back to their callers"
        );
    }
    assert_eq!(up.stats.counts().requests, 1);
}

#[tokio::test(start_paused = true)]
async fn near_deadline_flushes_early() {
    let (_, b) = batcher("{mode: fixed, max_batch_size: 8, max_wait_ms: 1000}");
    let s = b.settings("m").unwrap();
    let r = b
        .submit(&"m".into(), &req("x"), s, later(100))
        .await
        .unwrap();
    // A quarter of the 100 ms budget is kept for the upstream call.
    assert_eq!(r.queue_wait, Duration::from_millis(75));
}

#[tokio::test(start_paused = true)]
async fn cancelled_item_is_dropped_before_send() {
    let (up, b) = batcher("{mode: fixed, max_batch_size: 8, max_wait_ms: 10}");
    let s = b.settings("m").unwrap();
    let model: Arc<str> = "m".into();
    let ra = req("a");
    let mut a = Box::pin(b.submit(&model, &ra, s, later(60_000)));
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut a)
            .await
            .is_err(),
        "a is queued"
    );
    assert_eq!(up.stats.counts().queued, 1);
    drop(a);
    let r = b.submit(&model, &req("b"), s, later(60_000)).await.unwrap();
    assert_eq!(r.batch_size, 1);
    assert_eq!(up.stats.counts().items, 1, "only b went upstream");
}

#[tokio::test(start_paused = true)]
async fn full_queue_refuses_at_once() {
    let (_, b) = batcher("{mode: fixed, max_batch_size: 8, max_wait_ms: 1000, max_queue: 2}");
    let s = b.settings("m").unwrap();
    let model: Arc<str> = "m".into();
    let (r1, r2) = (req("1"), req("2"));
    let mut one = Box::pin(b.submit(&model, &r1, s, later(60_000)));
    let mut two = Box::pin(b.submit(&model, &r2, s, later(60_000)));
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut one)
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut two)
            .await
            .is_err()
    );
    let err = b
        .submit(&model, &req("3"), s, later(60_000))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::Overloaded);
    assert_eq!(
        one.await.unwrap().batch_size,
        2,
        "the queued two still go, together"
    );
    assert!(two.await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn adaptive_sends_a_lone_item_at_once() {
    let (_, b) = batcher("{max_batch_size: 8, max_wait_ms: 5}");
    let s = b.settings("m").unwrap();
    assert_eq!(s.mode, BatchMode::Adaptive, "the default");
    let started = Instant::now();
    let r = b
        .submit(&"m".into(), &req("x"), s, later(60_000))
        .await
        .unwrap();
    assert_eq!((r.batch_size, r.queue_wait), (1, Duration::ZERO));
    assert_eq!(started.elapsed(), Duration::ZERO, "no window paid");
}

#[tokio::test(start_paused = true)]
async fn adaptive_gathers_what_arrives_while_the_provider_is_busy() {
    let (up, b) = batcher_with("{}", "max_concurrency: 1, simulated: {latency_ms: 10},");
    let s = b.settings("m").unwrap();
    let model: Arc<str> = "m".into();
    let first = req("first");
    let mut a = Box::pin(b.submit(&model, &first, s, later(60_000)));
    assert!(
        tokio::time::timeout(Duration::from_millis(4), &mut a)
            .await
            .is_err(),
        "in flight for 10 ms"
    );
    assert_eq!(up.stats.counts().requests, 1, "sent alone, at once");
    let reqs: Vec<_> = (0..3).map(|i| req(&format!("p{i}"))).collect();
    let (a, rest) = tokio::join!(
        a,
        futures_util::future::join_all(reqs.iter().map(|r| b.submit(&model, r, s, later(60_000))))
    );
    assert_eq!(a.unwrap().batch_size, 1);
    for (i, r) in rest.into_iter().enumerate() {
        let r = r.unwrap();
        // Sent together when the slot freed (6 ms) and arrivals paused: the first
        // caller, just answered, was counted as coming back, and waited for an eighth
        // of the quickest answer (10 ms / 8, on tokio's millisecond timer 2 ms).
        assert_eq!(
            (r.batch_size, r.queue_wait),
            (3, Duration::from_millis(8)),
            "together, once the slot freed and arrivals paused"
        );
        assert_eq!(r.completion.text, format!("[m] you said: p{i}"));
    }
    assert_eq!(up.stats.counts().requests, 2);
}

#[tokio::test(start_paused = true)]
async fn demand_is_the_recent_peak_and_forgotten_after_two_windows() {
    let mut d = Demand::new();
    let fastest = Duration::from_millis(10);
    assert_eq!(d.see(64, fastest), 64);
    tokio::time::advance(Duration::from_millis(5)).await;
    assert_eq!(
        d.see(48, fastest),
        64,
        "a batch's callers on their way back"
    );
    tokio::time::advance(Duration::from_millis(20)).await;
    assert_eq!(d.see(1, fastest), 64, "the window before still counts");
    tokio::time::advance(Duration::from_millis(20)).await;
    assert_eq!(
        d.see(1, fastest),
        1,
        "two windows on, only what is seen now"
    );
    // Counted at 0 and 15 ms of a window, next at 45 ms: the window from 20 to 40 ms
    // passed unseen, and the count at 15 ms still stands.
    let mut d = Demand::new();
    assert_eq!(d.see(64, fastest), 64);
    tokio::time::advance(Duration::from_millis(15)).await;
    d.see(60, fastest);
    tokio::time::advance(Duration::from_millis(30)).await;
    assert_eq!(d.see(57, fastest), 64, "last counted 30 ms ago");
}

#[tokio::test(start_paused = true)]
async fn adaptive_spreads_the_waiting_items_over_the_limit() {
    // Four slots (the starting limit), 40 callers at once: four batches of ten.
    let (up, b) = batcher_with("{}", "simulated: {latency_ms: 10},");
    let s = b.settings("m").unwrap();
    let model: Arc<str> = "m".into();
    let reqs: Vec<_> = (0..40).map(|i| req(&format!("p{i}"))).collect();
    let out =
        futures_util::future::join_all(reqs.iter().map(|r| b.submit(&model, r, s, later(60_000))))
            .await;
    let mut sizes: Vec<u32> = out.iter().map(|r| r.as_ref().unwrap().batch_size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    assert_eq!(sizes, [10], "{sizes:?}");
    assert_eq!(up.stats.counts().requests, 4);
}

/// Two requests that differ in any one generation parameter never share an upstream request:
/// each field changed alone gives another batch key. The list is written without `..`, so a
/// field added to `GenParams` does not compile here until it is given a variant.
#[test]
fn requests_differing_in_any_one_parameter_never_share_a_batch_key() {
    use crate::completion::{ResponseFormat, Tool, ToolChoice};
    let m: Arc<str> = "m".into();
    let base = BatchKey::of(&m, &req("x"));
    let GenParams {
        max_tokens: _,
        temperature: _,
        stop: _,
        seed: _,
        top_p: _,
        frequency_penalty: _,
        presence_penalty: _,
        logit_bias: _,
        logprobs: _,
        top_logprobs: _,
        echo: _,
        suffix: _,
        best_of: _,
        tools: _,
        tool_choice: _,
        parallel_tool_calls: _,
        response_format: _,
        extra: _,
    } = GenParams::default();
    let tool = Tool {
        name: "f".into(),
        description: None,
        parameters: None,
        strict: None,
    };
    type Change = fn(&mut GenParams);
    let variants: Vec<(&str, Change)> = vec![
        ("max_tokens", |p| p.max_tokens = Some(7)),
        ("temperature", |p| p.temperature = Some(0.5)),
        ("stop", |p| p.stop = vec!["\n".into()]),
        ("seed", |p| p.seed = Some(3)),
        ("top_p", |p| p.top_p = Some(0.9)),
        ("frequency_penalty", |p| p.frequency_penalty = Some(0.1)),
        ("presence_penalty", |p| p.presence_penalty = Some(0.1)),
        ("logit_bias", |p| {
            p.logit_bias.insert(42, 1.0);
        }),
        ("logprobs", |p| p.logprobs = true),
        ("top_logprobs", |p| p.top_logprobs = Some(2)),
        ("echo", |p| p.echo = true),
        ("suffix", |p| p.suffix = Some("end".into())),
        ("best_of", |p| p.best_of = Some(2)),
        ("tool_choice", |p| {
            p.tool_choice = Some(ToolChoice::Required)
        }),
        ("parallel_tool_calls", |p| {
            p.parallel_tool_calls = Some(false)
        }),
        ("response_format", |p| {
            p.response_format = Some(ResponseFormat::JsonObject);
        }),
        ("extra", |p| {
            p.extra.insert("top_k".into(), serde_json::json!(5));
        }),
    ];
    let mut with_tool = (*req("x")).clone();
    with_tool.params.tools = vec![tool];
    assert_ne!(base, BatchKey::of(&m, &Arc::new(with_tool)), "tools");
    for (field, change) in variants {
        let mut r = (*req("x")).clone();
        change(&mut r.params);
        assert_ne!(base, BatchKey::of(&m, &Arc::new(r)), "{field}");
    }
    assert_eq!(
        base,
        BatchKey::of(&m, &req("another prompt")),
        "the prompt is not in it"
    );
}
