//! The breaker is consulted once per network request on every path: an open circuit sends
//! nothing, and a half-open one lets exactly one probe *request* through — one for a whole
//! native batch, one of the concurrent requests of a parallel batch.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use async_trait::async_trait;

use super::*;
use crate::config;
use crate::provider::Provider;

/// A provider whose outcome the test sets, counting the requests that reach it. Each takes
/// 10 ms (of the paused clock), so concurrent requests overlap.
struct Scripted {
    native: bool,
    failing: AtomicBool,
    /// Never answers.
    hanging: AtomicBool,
    requests: AtomicUsize,
}

impl Scripted {
    async fn serve(&self) -> Result<(), ProviderError> {
        self.requests.fetch_add(1, SeqCst);
        if self.hanging.load(SeqCst) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        if self.failing.load(SeqCst) {
            Err(ProviderError::new(FailureKind::ServerError, "scripted 500"))
        } else {
            Ok(())
        }
    }
}

fn done() -> Completion {
    Completion::text("ok".into(), "stop".into(), None)
}

#[async_trait]
impl Provider for Scripted {
    fn unsupported(&self, _: &CompletionRequest) -> Option<String> {
        None
    }

    fn batches_prompts(&self) -> bool {
        self.native
    }

    /// A health probe: fails while requests fail, never answers while they hang; not counted
    /// among the requests.
    async fn probe(&self) -> Result<(), ProviderError> {
        if self.hanging.load(SeqCst) {
            std::future::pending::<()>().await;
        }
        match self.failing.load(SeqCst) {
            true => Err(ProviderError::new(FailureKind::Connect, "scripted refusal")),
            false => Ok(()),
        }
    }

    async fn complete(
        &self,
        _model: &str,
        _request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        self.serve().await.map(|()| done())
    }

    async fn complete_batch(
        &self,
        _model: &str,
        requests: &[Arc<CompletionRequest>],
    ) -> Result<Vec<Result<Completion, ProviderError>>, ProviderError> {
        self.serve()
            .await
            .map(|()| requests.iter().map(|_| Ok(done())).collect())
    }
}

/// How the upstream sends: directly, in native batches, or batches as parallel requests.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Unbatched,
    Native,
    Parallel,
}

fn upstream(path: Path) -> (Upstream, Arc<Scripted>) {
    let batching = match path {
        Path::Unbatched => "",
        // A window, so both tries ride in one batch.
        Path::Native | Path::Parallel => {
            ", batching: {mode: fixed, max_batch_size: 8, max_wait_ms: 5}"
        }
    };
    scripted_upstream(path == Path::Native, batching)
}

/// A provider with the adaptive concurrency limit (its model batches adaptively), whose
/// timeout and first-token timeout are 1 s.
fn adaptive() -> (Upstream, Arc<Scripted>) {
    let (up, s) = scripted_upstream(
        false,
        ", timeout_seconds: 1, first_token_timeout_seconds: 1, batching: {}",
    );
    s.failing.store(false, SeqCst);
    (up, s)
}

fn scripted_upstream(native: bool, extra: &str) -> (Upstream, Arc<Scripted>) {
    let yaml = format!(
        "cascade: {{circuit_breaker: {{failure_threshold: 2, recovery_timeout: 10, half_open_max_calls: 1}}}}\n\
         providers:\n  - {{name: p, type: simulated, models: [m]{extra}}}\n"
    );
    let c = config::parse(&yaml, "t", &|_| None).unwrap();
    let scripted = Arc::new(Scripted {
        native,
        failing: AtomicBool::new(true),
        hanging: AtomicBool::new(false),
        requests: AtomicUsize::new(0),
    });
    let metrics = Arc::new(Metrics::new());
    let up = Upstream::with_provider(
        &c.providers[0],
        c.cascade.breaker,
        &metrics,
        scripted.clone(),
    );
    (up, scripted)
}

fn req() -> Arc<CompletionRequest> {
    CompletionRequest::test_prompt("x")
}

/// Opens the breaker with two failed requests, checks that the open breaker sends
/// nothing, waits out the recovery timeout and sends two tries at once; returns their
/// outcomes.
async fn open_then_probe(
    up: &Upstream,
    s: &Scripted,
) -> (Result<Delivered, Miss>, Result<Delivered, Miss>) {
    let m: Arc<str> = "m".into();
    let far = Instant::now() + Duration::from_secs(3600);
    for _ in 0..2 {
        match up.attempt(&m, &req(), Window::whole(far)).await {
            Err(Miss::Failed(e)) => assert_eq!(e.kind, FailureKind::ServerError),
            other => panic!("expected the scripted 500, got {other:?}"),
        }
    }
    assert_eq!(
        s.requests.load(SeqCst),
        2,
        "each failed try was one request"
    );
    match up.attempt(&m, &req(), Window::whole(far)).await {
        Err(Miss::Skipped(e)) => assert_eq!(e.kind, FailureKind::CircuitOpen),
        other => panic!("expected the open circuit to skip, got {other:?}"),
    }
    assert_eq!(s.requests.load(SeqCst), 2, "an open circuit sends nothing");
    assert_eq!(up.snapshot().circuit, Circuit::Open);

    tokio::time::advance(Duration::from_secs(10)).await;
    s.failing.store(false, SeqCst);
    let (ra, rb) = (req(), req());
    let (a, b) = tokio::join!(
        up.attempt(&m, &ra, Window::whole(far)),
        up.attempt(&m, &rb, Window::whole(far))
    );
    assert_eq!(s.requests.load(SeqCst), 3, "half-open: one probe request");
    (a, b)
}

async fn closes_after_the_probe(up: &Upstream, s: &Scripted) {
    assert_eq!(up.snapshot().circuit, Circuit::Closed);
    let far = Instant::now() + Duration::from_secs(3600);
    assert!(
        up.attempt(&"m".into(), &req(), Window::whole(far))
            .await
            .is_ok()
    );
    assert_eq!(s.requests.load(SeqCst), 4);
}

fn refused_kind(r: &Result<Delivered, Miss>) -> Option<FailureKind> {
    match r {
        Err(Miss::Skipped(e) | Miss::Failed(e)) => Some(e.kind),
        Ok(_) | Err(Miss::OutOfTime(_)) => None,
    }
}

#[tokio::test(start_paused = true)]
async fn unbatched_request_is_admitted_once() {
    let (up, s) = upstream(Path::Unbatched);
    let (a, b) = open_then_probe(&up, &s).await;
    let mut outcomes = [&a, &b];
    outcomes.sort_by_key(|r| r.is_err());
    assert!(outcomes[0].is_ok(), "the probe answered: {a:?} {b:?}");
    assert!(
        matches!(outcomes[1], Err(Miss::Skipped(e)) if e.kind == FailureKind::CircuitOpen),
        "the second try was refused before sending: {a:?} {b:?}"
    );
    closes_after_the_probe(&up, &s).await;
}

#[tokio::test(start_paused = true)]
async fn native_batch_is_admitted_once_for_all_its_prompts() {
    let (up, s) = upstream(Path::Native);
    let (a, b) = open_then_probe(&up, &s).await;
    for r in [a, b] {
        let d = r.expect("both prompts rode in the one probe request");
        assert_eq!(d.batch_size, 2);
    }
    closes_after_the_probe(&up, &s).await;
}

#[tokio::test(start_paused = true)]
async fn parallel_batch_admits_each_request() {
    let (up, s) = upstream(Path::Parallel);
    let (a, b) = open_then_probe(&up, &s).await;
    let kinds = [refused_kind(&a), refused_kind(&b)];
    assert!(
        kinds.contains(&None) && kinds.contains(&Some(FailureKind::CircuitOpen)),
        "one request was the probe, the other was refused: {a:?} {b:?}"
    );
    closes_after_the_probe(&up, &s).await;
}

/// A successful stream teaches the concurrency limit as a unary answer does: sixteen
/// callers streaming at once through four slots, answers that never slow down — the
/// limit grows (before, only a failed stream reached it).
#[tokio::test(start_paused = true)]
async fn a_successful_stream_teaches_the_concurrency_limit() {
    use futures_util::StreamExt as _;
    let (up, _) = adaptive();
    let before = up.replicas[0].link.limit.current();
    let far = Instant::now() + Duration::from_secs(3600);
    for _ in 0..10 {
        let streams = (0..16).map(|_| async {
            let opened = up
                .stream("m", &req(), Window::whole(far))
                .await
                .map_err(|_| "no stream")
                .unwrap();
            opened.rest.collect::<Vec<_>>().await.len()
        });
        let ends = futures_util::future::join_all(streams).await;
        assert!(ends.iter().all(|&n| n == 1), "each stream's end came");
    }
    assert!(
        up.replicas[0].link.limit.current() > before,
        "the limit grew from {before} to {}",
        up.replicas[0].link.limit.current()
    );
}

/// A first-token timeout is judged as a unary timeout is: the provider's failure, and an
/// overloaded verdict for its concurrency limit (before, the stream's said nothing).
#[tokio::test(start_paused = true)]
async fn a_first_token_timeout_is_judged_as_a_unary_timeout() {
    let far = Instant::now() + Duration::from_secs(3600);
    let (streamed, s) = adaptive();
    s.hanging.store(true, SeqCst);
    let before = streamed.replicas[0].link.limit.current();
    let e = match streamed.stream("m", &req(), Window::whole(far)).await {
        Err(Miss::Failed(e)) => e,
        Err(_) => panic!("not the provider's failure"),
        Ok(_) => panic!("a hanging provider streamed"),
    };
    assert_eq!(e.kind, FailureKind::Timeout);

    let (unary, s) = adaptive();
    s.hanging.store(true, SeqCst);
    match unary.attempt(&"m".into(), &req(), Window::whole(far)).await {
        Err(Miss::Failed(e)) => assert_eq!(e.kind, FailureKind::Timeout),
        Err(_) => panic!("not the provider's failure"),
        Ok(_) => panic!("a hanging provider answered"),
    }
    let (after_stream, after_unary) = (
        streamed.replicas[0].link.limit.current(),
        unary.replicas[0].link.limit.current(),
    );
    assert!(after_stream < before, "{before} -> {after_stream}");
    assert_eq!(after_stream, after_unary);
    assert_eq!(
        streamed.replicas[0].link.stats.counts().failures,
        unary.replicas[0].link.stats.counts().failures
    );
}

/// Probes at 0, 1, 2 s fail: out of rotation after the third (`unhealthy_after: 3`), and no
/// attempt reaches it; probes at 3 and 4 s pass: back after the second (`healthy_after: 2`).
#[tokio::test(start_paused = true)]
async fn probes_take_a_dead_provider_out_after_its_failures_in_a_row_and_bring_it_back() {
    let (up, s) = scripted_upstream(
        false,
        ", health_check: {interval_seconds: 1, timeout_ms: 100, unhealthy_after: 3, healthy_after: 2}",
    );
    let start = Instant::now();
    let since = |t: Instant| t.duration_since(start).as_millis();
    tokio::time::sleep_until(start + Duration::from_millis(1950)).await;
    assert!(up.serving(), "two failed probes are not yet three");
    tokio::time::sleep_until(start + Duration::from_millis(2050)).await;
    assert!(
        !up.serving(),
        "out after the third, at {} ms",
        since(Instant::now())
    );
    let m: Arc<str> = "m".into();
    let far = Instant::now() + Duration::from_secs(60);
    match up.attempt(&m, &req(), Window::whole(far)).await {
        Err(Miss::Skipped(e)) => assert_eq!(e.kind, FailureKind::Unhealthy),
        other => panic!("expected a skip, got {other:?}"),
    }
    assert_eq!(s.requests.load(SeqCst), 0, "no request sent to it");
    s.failing.store(false, SeqCst);
    tokio::time::sleep_until(start + Duration::from_millis(3500)).await;
    assert!(!up.serving(), "one passing probe is not yet two");
    tokio::time::sleep_until(start + Duration::from_millis(4050)).await;
    assert!(up.serving(), "back after the second passing probe");
    let checked = up
        .snapshot()
        .health
        .map(|h| (h.healthy, h.record.passed_in_a_row));
    assert_eq!(checked, Some((true, 2)));
}
