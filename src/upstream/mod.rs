//! One provider as the cascade sees it. [`Upstream::attempt`] makes one try at a model —
//! through the provider's batch queue when that model batches, directly otherwise — and says
//! how it ended. Everything about a provider's health and load lives in this module, behind
//! that one method and [`Upstream::snapshot`]:
//!
//! - [`link`]: the provider's client, concurrency limit and counters, and the lifecycle every
//!   upstream request goes through (slot → breaker → send → judge → record);
//! - [`attempt`]: an attempt's rules — its window and budget of time, and the one judgement of
//!   its outcome (what the provider is blamed for, what the limit learns);
//! - [`batch`]: the batch queues (adaptive and fixed workers), which only group items and
//!   hand each batch to the link;
//! - [`breaker`]: the circuit breaker and the `Retry-After` cool-down;
//! - [`limit`]: how many requests the provider is sent at once, fixed or learned;
//! - [`stats`]: the counters behind ListProviders and Prometheus;
//! - [`warnings`]: upstream failures said in the log at a bounded rate.

mod attempt;
mod batch;
mod breaker;
mod limit;
mod link;
mod stats;
mod warnings;

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, timeout_at};

pub use attempt::Window;
pub use breaker::Circuit;
pub(crate) use link::Opened;
pub use stats::Counts;

use batch::Batcher;
use link::{Link, refused};

use crate::{
    capability::{ModelInfo, Needs},
    completion::{Completion, CompletionRequest, FailureKind},
    config::{BreakerConfig, ProviderConfig, ProviderKind},
    metrics::Metrics,
    provider::{self, Provider, ProviderError},
};

/// A provider with its breaker, slots, counters and batch queues.
pub struct Upstream {
    link: Arc<Link>,
    batcher: Option<Batcher>,
    kind: ProviderKind,
    priority: i32,
    models: Vec<String>,
    model_info: std::collections::BTreeMap<String, ModelInfo>,
    pass_through: Vec<String>,
}

/// A completion and how it travelled.
#[derive(Debug)]
pub struct Delivered {
    pub completion: Completion,
    /// Prompts in the upstream request it rode in.
    pub batch_size: u32,
    pub queue_wait: Duration,
    pub upstream: Duration,
}

/// How a try that produced no completion ended.
#[derive(Debug)]
pub enum Miss {
    /// Nothing was sent: the breaker refused, its queue was full, or less time was left than
    /// this provider has ever needed.
    Skipped(ProviderError),
    /// The try failed at the provider, or could not get into its queue.
    Failed(ProviderError),
    /// The caller's deadline passed; `Some` when it cut a try short.
    OutOfTime(Option<ProviderError>),
}

/// A provider's live state, for ListProviders.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    pub priority: i32,
    pub models: Vec<String>,
    pub circuit: Circuit,
    pub cooling_down: Duration,
    pub counts: Counts,
    /// Whether batches go to it as one multi-prompt request now.
    pub native_batching: bool,
    /// Requests it is sent at once at most now.
    pub concurrency_limit: usize,
    /// Whether that limit is learned.
    pub adaptive: bool,
}

impl Upstream {
    pub fn new(
        config: &ProviderConfig,
        breaker: BreakerConfig,
        metrics: &Arc<Metrics>,
    ) -> Result<Upstream, reqwest::Error> {
        Ok(Upstream::with_provider(
            config,
            breaker,
            metrics,
            provider::build(config)?,
        ))
    }

    fn with_provider(
        config: &ProviderConfig,
        breaker: BreakerConfig,
        metrics: &Arc<Metrics>,
        provider: Arc<dyn Provider>,
    ) -> Upstream {
        let link = Arc::new(Link::new(config, breaker, metrics, provider));
        Upstream {
            batcher: Batcher::new(config, &link),
            link,
            kind: config.kind,
            priority: config.priority,
            models: config.models.clone(),
            model_info: config.model_info.clone(),
            pass_through: config.pass_through.clone(),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.link.name
    }

    /// Whether this provider lists `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    /// What the cascade file says of `model` (nothing assumed missing when it says nothing).
    pub fn model_info(&self, model: &str) -> ModelInfo {
        self.model_info.get(model).copied().unwrap_or_default()
    }

    /// Why `model` here cannot take `request` without a network attempt: it lacks a need,
    /// or the provider's API cannot carry one of the request's fields. `None` when it can.
    pub fn refuses(
        &self,
        model: &str,
        request: &CompletionRequest,
        needs: &Needs,
    ) -> Option<String> {
        if let Some(why) = needs.unmet(&self.model_info(model)) {
            return Some(why);
        }
        if let Some(field) = request.params.extra.keys().find(|k| {
            !(self.pass_through.contains(k)
                || (self.link.forwards_openai_fields() && crate::completion::is_openai_field(k)))
        }) {
            return Some(format!(
                "{field}: the provider does not take it (list it under its pass_through to forward it)"
            ));
        }
        self.link.unsupported(request)
    }

    /// The model for requests that name none (listed first).
    pub fn default_model(&self) -> &str {
        self.models.first().map(String::as_str).unwrap_or_default()
    }

    /// One try at `model` for `request`, ending by `window.until`.
    pub async fn attempt(
        &self,
        model: &Arc<str>,
        request: &Arc<CompletionRequest>,
        window: Window,
    ) -> Result<Delivered, Miss> {
        let now = Instant::now();
        if now >= window.deadline {
            return Err(Miss::OutOfTime(None));
        }
        let queue = self
            .batcher
            .as_ref()
            .and_then(|b| b.settings(model).map(|s| (b, s)));
        if queue.is_some() {
            // A look, not an admission (the batch is admitted when it is sent): it keeps
            // items out of the queue of a provider that would refuse them.
            self.link
                .breaker
                .check()
                .map_err(|r| Miss::Skipped(refused(r)))?;
        }
        let fastest = self.link.stats.fastest();
        let left = window.until.saturating_duration_since(now);
        if left < fastest {
            return Err(Miss::Skipped(ProviderError::new(
                FailureKind::NoTimeLeft,
                format!(
                    "{} ms left for this try, it never answered in under {} ms",
                    left.as_millis(),
                    fastest.as_millis()
                ),
            )));
        }
        let result = match queue {
            // Time in the batch queue is the router's own: the provider's timeout starts when
            // the batch is sent (the batcher's send holds it to that), so the queued item is
            // bounded here by its share alone; an item still queued when that ends moves on.
            Some((batcher, settings)) => timeout_at(
                window.until,
                batcher.submit(model, request, settings, window),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ProviderError::new(
                    FailureKind::Overloaded,
                    format!(
                        "no answer within its {} ms share (queued or in flight)",
                        now.elapsed().as_millis()
                    ),
                ))
            }),
            None => self
                .link
                .complete(model, request, window)
                .await
                .map(|(completion, took)| Delivered {
                    completion,
                    batch_size: 1,
                    queue_wait: Duration::ZERO,
                    upstream: took,
                }),
        };
        match result {
            Ok(delivered) => Ok(delivered),
            // The caller's deadline ended the try (in flight, or still in the batch queue).
            Err(e)
                if matches!(e.kind, FailureKind::Timeout | FailureKind::Overloaded)
                    && Instant::now() >= window.deadline =>
            {
                Err(Miss::OutOfTime(Some(ProviderError::new(
                    FailureKind::Timeout,
                    format!(
                        "caller's deadline passed after {} ms",
                        now.elapsed().as_millis()
                    ),
                ))))
            }
            // Nothing was sent: refused by the breaker before sending (unbatched), or no room
            // in the router's own queue for this provider.
            Err(e)
                if e.kind == FailureKind::Overloaded
                    || (queue.is_none() && e.kind.is_refusal()) =>
            {
                Err(Miss::Skipped(e))
            }
            Err(e) => Err(Miss::Failed(e)),
        }
    }

    /// One try at streaming `model`'s answer to `request`: `Ok` once its first event
    /// arrived by `window.until` (see [`Link::open_stream`]). Streams are never batched.
    pub(crate) async fn stream(
        &self,
        model: &str,
        request: &CompletionRequest,
        window: Window,
    ) -> Result<Opened, Miss> {
        if Instant::now() >= window.deadline {
            return Err(Miss::OutOfTime(None));
        }
        match self.link.open_stream(model, request, window).await {
            Ok(opened) => Ok(opened),
            Err(e) if e.kind == FailureKind::Timeout && Instant::now() >= window.deadline => {
                Err(Miss::OutOfTime(Some(e)))
            }
            Err(e) if e.kind == FailureKind::Overloaded || e.kind.is_refusal() => {
                Err(Miss::Skipped(e))
            }
            Err(e) => Err(Miss::Failed(e)),
        }
    }

    /// Whether a try starting at `at` could still be answered before `deadline`, judging by
    /// the quickest answer this provider ever gave.
    #[must_use]
    pub fn fits(&self, at: Instant, deadline: Instant) -> bool {
        at + self.link.stats.fastest() < deadline
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            name: self.link.name.clone(),
            kind: self.kind,
            priority: self.priority,
            models: self.models.clone(),
            circuit: self.link.breaker.circuit(),
            cooling_down: self.link.breaker.cooling_down_for(),
            counts: self.link.stats.counts(),
            native_batching: self.link.takes_arrays(),
            concurrency_limit: self.link.limit.current(),
            adaptive: self.link.limit.is_adaptive(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The breaker is consulted once per network request on every path: an open circuit sends
    //! nothing, and a half-open one lets exactly one probe *request* through — one for a whole
    //! native batch, one of the concurrent requests of a parallel batch.

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

    use async_trait::async_trait;

    use super::*;
    use crate::{
        completion::{CacheMode, GenParams, Input},
        config,
    };

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
        Arc::new(CompletionRequest {
            model: "m".into(),
            input: Input::Prompt("x".into()),
            params: GenParams::default(),
            agent: String::new(),
            tenant: String::new(),
            request_id: String::new(),
            cache: CacheMode::Default,
        })
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
        let before = up.link.limit.current();
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
            up.link.limit.current() > before,
            "the limit grew from {before} to {}",
            up.link.limit.current()
        );
    }

    /// A first-token timeout is judged as a unary timeout is: the provider's failure, and an
    /// overloaded verdict for its concurrency limit (before, the stream's said nothing).
    #[tokio::test(start_paused = true)]
    async fn a_first_token_timeout_is_judged_as_a_unary_timeout() {
        let far = Instant::now() + Duration::from_secs(3600);
        let (streamed, s) = adaptive();
        s.hanging.store(true, SeqCst);
        let before = streamed.link.limit.current();
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
        let (after_stream, after_unary) =
            (streamed.link.limit.current(), unary.link.limit.current());
        assert!(after_stream < before, "{before} -> {after_stream}");
        assert_eq!(after_stream, after_unary);
        assert_eq!(
            streamed.link.stats.counts().failures,
            unary.link.stats.counts().failures
        );
    }
}
