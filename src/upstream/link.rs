//! The link to one provider — its client, circuit breaker, concurrency slots and counters —
//! and the lifecycle every upstream request goes through, batched or not: hold a slot, ask
//! the breaker, send within a budget, judge the outcome by [`super::attempt`]'s rule, record
//! it ([`Link::send`]; [`Link::open_stream`] for streams, judged the same way).

use std::{
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::{StreamExt, stream::BoxStream};
use tokio::time::{Instant, timeout_at};

use super::{
    attempt::{Budget, Outcome, Window, judge},
    breaker::{Breaker, Pass, Refusal},
    limit::Limit,
    stats::Stats,
    warnings::{EVERY, Warnings},
};

pub(super) use super::limit::Slot;
use crate::{
    completion::{Completion, CompletionRequest, FailureKind, StreamEvent},
    config::{BreakerConfig, ProviderConfig},
    metrics::{Metrics, ProviderMetrics},
    provider::{EventStream, Provider, ProviderError},
    rate::{ProviderLimit, estimate_tokens},
};

pub(super) struct Link {
    pub(super) name: Arc<str>,
    provider: Arc<dyn Provider>,
    pub(super) breaker: Breaker,
    /// Caps upstream requests in flight, and so the connections the pool opens.
    pub(super) limit: Arc<Limit>,
    /// Requests waiting for a slot, at most `max_waiting`: past that a request moves on.
    waiting: AtomicUsize,
    max_waiting: usize,
    pub(super) stats: Stats,
    /// The provider's quota, when it has one: shared by its endpoints (and a fleet's routers).
    rate: Option<Arc<ProviderLimit>>,
    /// Set when the provider refused a prompt array that it served singly: until then its
    /// batches go as single requests. A std mutex: a few instructions, never held across await.
    arrays_off_until: Mutex<Option<Instant>>,
    timeout: Duration,
    first_token_timeout: Duration,
    /// This provider's Prometheus series.
    series: ProviderMetrics,
    warnings: Warnings,
}

impl crate::fleet::Shareable for Link {
    fn open_here(&self) -> Option<Duration> {
        self.breaker.open_here()
    }

    fn opened_elsewhere(&self, left: Duration) -> bool {
        self.breaker.opened_elsewhere(left)
    }
}

/// How long a provider that refused a prompt array is sent single requests before arrays are
/// tried again.
const ARRAYS_RETRY: Duration = Duration::from_secs(600);

impl Link {
    pub(super) fn new(
        config: &ProviderConfig,
        breaker: BreakerConfig,
        metrics: &Arc<Metrics>,
        provider: Arc<dyn Provider>,
        rate: Option<Arc<ProviderLimit>>,
    ) -> Link {
        let series = metrics.provider(&config.name);
        Link {
            name: config.name.as_str().into(),
            provider,
            breaker: Breaker::new(breaker, config.health_check.is_some()),
            limit: if config.adaptive() {
                Limit::adaptive(config.max_concurrency)
            } else {
                Limit::fixed(config.max_concurrency)
            },
            waiting: AtomicUsize::new(0),
            max_waiting: config.max_waiting,
            stats: Stats::new(series.clone()),
            rate,
            arrays_off_until: Mutex::new(None),
            timeout: config.timeout,
            first_token_timeout: config.first_token_timeout,
            series,
            warnings: Warnings::default(),
        }
    }

    /// Whether a batch of prompts goes as one request now: the provider takes prompt arrays
    /// and has not refused one lately.
    pub(super) fn takes_arrays(&self) -> bool {
        self.provider.batches_prompts()
            && self
                .arrays_off_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none_or(|until| Instant::now() >= until)
    }

    /// One health probe of the provider (see [`super::health`]): nothing else is charged.
    pub(super) async fn probe(&self) -> Result<(), ProviderError> {
        self.provider.probe().await
    }

    /// Why the provider's API cannot carry `request` as it is, if it cannot.
    pub(super) fn unsupported(&self, request: &CompletionRequest) -> Option<String> {
        self.provider.unsupported(request)
    }

    pub(super) fn forwards_openai_fields(&self) -> bool {
        self.provider.forwards_openai_fields()
    }

    /// The provider refused a prompt array that it then served as single requests: send it
    /// none for [`ARRAYS_RETRY`]. Said once in the log each time it happens.
    pub(super) fn arrays_refused(&self, e: &ProviderError) {
        let mut off = self
            .arrays_off_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if off.is_none_or(|until| Instant::now() >= until) {
            tracing::warn!(
                provider = %self.name,
                error = %e,
                retry_in_s = ARRAYS_RETRY.as_secs(),
                "provider refused a prompt array but answered the prompts singly; batches go as single requests for a while"
            );
        }
        *off = Some(Instant::now() + ARRAYS_RETRY);
    }

    /// Waits for a concurrency slot as long as it takes.
    pub(super) async fn slot(&self) -> Result<Slot, ProviderError> {
        self.limit
            .acquire()
            .await
            .ok_or_else(|| ProviderError::new(FailureKind::Overloaded, "provider is shutting down"))
    }

    /// Waits for a concurrency slot until `end`, in a bounded queue. The router's own wait is
    /// not the provider's fault: running out of room or time here is [`FailureKind::Overloaded`]
    /// (the request moves on), never judged against the provider.
    pub(super) async fn slot_by(&self, end: Instant) -> Result<Slot, ProviderError> {
        if let Some(slot) = self.limit.try_acquire() {
            return Ok(slot);
        }
        if self.waiting.fetch_add(1, Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Relaxed);
            return Err(ProviderError::new(
                FailureKind::Overloaded,
                format!(
                    "{} requests already wait for one of its {} slots",
                    self.max_waiting,
                    self.limit.current()
                ),
            ));
        }
        let waited = timeout_at(end, self.slot()).await;
        self.waiting.fetch_sub(1, Relaxed);
        waited.map_err(|_| {
            ProviderError::new(
                FailureKind::Overloaded,
                format!("no free slot of {} in time", self.limit.current()),
            )
        })?
    }

    /// The time a request sent at `from` may take: this provider's timeout or the try's
    /// `window`, whichever ends first.
    pub(super) fn budget(&self, from: Instant, window: Window) -> Budget {
        Budget::new(from, self.timeout, window)
    }

    /// The one way a request reaches the provider. The breaker admits it (a refusal sends
    /// nothing), `call` runs within `budget` while `slot` is held, and the outcome is judged
    /// once — against the breaker and the counters — and returned with the time it took.
    /// Dropping the future (every caller went away) withdraws the request and judges nothing.
    #[expect(
        clippy::manual_async_fn,
        reason = "arguments held once (see crate::upstream)"
    )]
    pub(super) fn send<T>(
        &self,
        mut slot: Slot,
        items: usize,
        budget: Budget,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> impl Future<Output = Result<(T, Duration), ProviderError>> {
        async move {
            slot.carry(items);
            let pass = self.breaker.admit().map_err(refused)?;
            let sent = Instant::now();
            self.stats.sent(items);
            tracing::debug!(provider = %self.name, items, "upstream request sent");
            let outcome = timeout_at(budget.end, call).await;
            let took = sent.elapsed();
            let blamed = budget.blames(sent, self.stats.usual());
            let (verdict, _) = judge(&match &outcome {
                Ok(Ok(_)) => Outcome::Answered { took, items },
                Ok(Err(e)) => Outcome::Failed(e),
                Err(_) => Outcome::OutOfTime { blamed },
            });
            self.limit.observe(&slot, verdict);
            drop(slot);
            self.series.ended(took);
            match outcome {
                Ok(Ok(v)) => {
                    pass.success();
                    self.stats.success(took);
                    tracing::debug!(provider = %self.name, took_us = took.as_micros() as u64, "upstream answered");
                    Ok((v, took))
                }
                Ok(Err(e)) => {
                    self.failed(pass, &e);
                    Err(e)
                }
                Err(_) => {
                    let e = timed_out(took);
                    if blamed {
                        self.failed(pass, &e);
                    } else {
                        self.out_of_the_callers_time(pass);
                    }
                    Err(e)
                }
            }
        }
    }

    /// A try the caller's time (not the provider) cut short: counted, never blamed.
    fn out_of_the_callers_time(&self, pass: Pass<'_>) {
        self.stats.failure(FailureKind::Timeout);
        pass.neutral();
        tracing::debug!(provider = %self.name, "the caller's time ran out before the provider's usual answer time");
    }

    /// One unbatched request: a slot (waiting no later than a send could still be answered
    /// within `window`), then [`Link::send`], its timeout counted from the send.
    pub(super) async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
        window: Window,
    ) -> Result<(Completion, Duration), ProviderError> {
        if let Some(rate) = &self.rate {
            self.rate_take(rate, &[request], self.rate_by(window))
                .await?;
        }
        let slot = self.slot_by(self.latest_send(window)).await?;
        self.send_one(slot, model, request, window).await
    }

    /// The latest a request can be sent and still be answered within `window`.
    fn latest_send(&self, window: Window) -> Instant {
        window.latest_send(self.stats.fastest())
    }

    /// The latest a request may wait for the provider's quota: with a reserve before its
    /// latest send ([`Window::close_by`]), since a fleet's bucket books a cell for the time
    /// the request is told to go, and one sent at the last moment is answered too late.
    fn rate_by(&self, window: Window) -> Instant {
        window.close_by(Instant::now(), self.stats.fastest())
    }

    /// One unbatched request on a slot already held: its quota, then [`Link::send`].
    pub(super) async fn complete_on(
        &self,
        slot: Slot,
        model: &str,
        request: &CompletionRequest,
        window: Window,
    ) -> Result<(Completion, Duration), ProviderError> {
        if let Some(rate) = &self.rate {
            self.rate_take(rate, &[request], self.rate_by(window))
                .await?;
        }
        self.send_one(slot, model, request, window).await
    }

    /// Sends at once (its budget runs from the call): the send's future is made here, so
    /// the slot and the arguments are held once, inside it.
    fn send_one<'a>(
        &'a self,
        slot: Slot,
        model: &'a str,
        request: &'a CompletionRequest,
        window: Window,
    ) -> impl Future<Output = Result<(Completion, Duration), ProviderError>> + 'a {
        let budget = self.budget(Instant::now(), window);
        let sending = self.send(slot, 1, budget, self.provider.complete(model, request));
        async move {
            let answered = sending.await?;
            self.believe(&answered.0);
            if let (Some(rate), Some(usage)) = (&self.rate, &answered.0.usage) {
                rate.used(
                    estimate_tokens(request),
                    usage.prompt_tokens.saturating_add(usage.completion_tokens),
                );
            }
            Ok(answered)
        }
    }

    /// Many prompts in one upstream request ([`Provider::complete_batch`]): one result per
    /// request, in order. The provider's quota is waited for first, no later than the
    /// earliest caller's window allows ([`Link::rate_by`] of `first`; `close_by` grows with
    /// the window's end, so the earliest window gives the earliest bound) — past that the whole
    /// batch moves on — and the request's budget runs from the send: the router's own wait is
    /// never the provider's time.
    pub(super) async fn complete_batch(
        &self,
        slot: Slot,
        model: &str,
        requests: &[Arc<CompletionRequest>],
        window: Window,
        first: Window,
    ) -> Result<(Vec<Result<Completion, ProviderError>>, Duration), ProviderError> {
        if let Some(rate) = &self.rate {
            let each: Vec<&CompletionRequest> = requests.iter().map(|r| r.as_ref()).collect();
            self.rate_take(rate, &each, self.rate_by(first)).await?;
        }
        let budget = self.budget(Instant::now(), window);
        let answered = self
            .send(
                slot,
                requests.len(),
                budget,
                self.provider.complete_batch(model, requests),
            )
            .await?;
        if let Some(Ok(first)) = answered.0.first() {
            self.believe(first);
        }
        Ok(answered)
    }

    /// Counts an answer whose usage the provider reported out of range (it was clamped).
    fn believe(&self, answer: &Completion) {
        if answer.usage.is_some_and(|u| u.clamped) {
            self.series.usage_clamped();
        }
    }

    /// One streamed request (never batched): its quota, a slot, the breaker, then the
    /// provider's stream. Returns once the first event arrived — within
    /// `first_token_timeout` and the try's `window` — since until then a failure is the
    /// provider's and the cascade may move on; the breaker is judged there. The rest of the
    /// stream keeps the slot until it ends, may be silent at most `first_token_timeout`
    /// between events, and is counted when it ends: a break after the first text counts
    /// against the provider. Dropping it (the caller went away) closes the upstream request
    /// and judges nothing.
    pub(super) async fn open_stream(
        self: &Arc<Self>,
        model: &str,
        request: &CompletionRequest,
        window: Window,
    ) -> Result<Opened, ProviderError> {
        if let Some(rate) = &self.rate {
            self.rate_take(rate, &[request], self.rate_by(window))
                .await?;
        }
        let mut slot = self.slot_by(self.latest_send(window)).await?;
        slot.carry(1);
        let pass = self.breaker.admit().map_err(refused)?;
        let sent = Instant::now();
        self.stats.sent(1);
        // The first event is the stream's answer: its budget and verdict are a unary try's,
        // with the first-token timeout as the provider's timeout.
        let budget = Budget::new(sent, self.first_token_timeout, window);
        let first = timeout_at(budget.end, async {
            let mut events = self.provider.stream(model, request).await?;
            match events.next().await {
                Some(Ok(first)) => Ok((first, events)),
                Some(Err(e)) => Err(e),
                None => Err(ProviderError::new(
                    FailureKind::Io,
                    "the stream ended before its first event",
                )),
            }
        })
        .await;
        let e = match first {
            Ok(Ok((first, events))) => {
                pass.success();
                return Ok(Opened {
                    first,
                    rest: Box::pin(
                        Streaming {
                            link: self.clone(),
                            events,
                            slot,
                            sent,
                            idle: self.first_token_timeout,
                            estimated: estimate_tokens(request),
                        }
                        .run(),
                    ),
                    first_after: sent.elapsed(),
                });
            }
            Ok(Err(e)) => e,
            Err(_) => {
                let blamed = budget.blames(sent, None);
                let (verdict, _) = judge(&Outcome::OutOfTime { blamed });
                self.limit.observe(&slot, verdict);
                self.series.ended(sent.elapsed());
                if !blamed {
                    self.out_of_the_callers_time(pass);
                    return Err(timed_out(sent.elapsed()));
                }
                let e = ProviderError::new(
                    FailureKind::Timeout,
                    format!("no first token within {} ms", sent.elapsed().as_millis()),
                );
                self.failed(pass, &e);
                return Err(e);
            }
        };
        let (verdict, _) = judge(&Outcome::Failed(&e));
        self.limit.observe(&slot, verdict);
        self.series.ended(sent.elapsed());
        self.failed(pass, &e);
        Err(e)
    }

    /// Waits for the provider's quota ([`ProviderLimit::take`]), timed and counted.
    async fn rate_take(
        &self,
        rate: &ProviderLimit,
        requests: &[&CompletionRequest],
        until: Instant,
    ) -> Result<(), ProviderError> {
        let start = Instant::now();
        // Boxed: a fleet's decision (a Redis call) is a large state that every request's
        // future would otherwise carry, limited or not.
        let taken = Box::pin(rate.take(requests, until)).await;
        self.series.rate_waited(start.elapsed(), taken.is_err());
        taken
    }

    pub(super) fn observe_batch(&self, size: usize, waits: impl Iterator<Item = Duration>) {
        self.series.batch(size, waits);
    }

    fn failed(&self, pass: Pass<'_>, e: &ProviderError) {
        self.stats.failure(e.kind);
        if e.counts_against_provider() {
            pass.failure();
        } else {
            pass.neutral();
        }
        if let Some(wait) = e.retry_after {
            self.breaker.asked_to_wait(Instant::now() + wait);
        }
        if let (Some(rate), Some(429)) = (&self.rate, e.http_status) {
            rate.tightened();
        }
        self.say(e);
    }

    /// Logs a failure: at debug each time; at warn, bounded by [`Warnings`], when it is the
    /// provider's doing (the caller's own bad request or deadline is not).
    fn say(&self, e: &ProviderError) {
        self.stats.note(e);
        tracing::debug!(provider = %self.name, kind = %e.kind, status = e.http_status, error = %e.message, "upstream request failed");
        let worth_a_warning = matches!(
            e.kind,
            FailureKind::Connect
                | FailureKind::Timeout
                | FailureKind::Io
                | FailureKind::ServerError
                | FailureKind::RateLimited
                | FailureKind::Unauthorized
                | FailureKind::Malformed
        );
        if !worth_a_warning {
            return;
        }
        let Some(unsaid) = self.warnings.admit(e.kind) else {
            return;
        };
        let every_s = EVERY.as_secs();
        if e.kind == FailureKind::Unauthorized {
            tracing::warn!(provider = %self.name, status = e.http_status, more_since_last = unsaid, "provider refused our credentials; check its api_key (said at most every {every_s} s)");
        } else {
            tracing::warn!(provider = %self.name, kind = %e.kind, error = %e.message, more_since_last = unsaid, "upstream requests failing (said at most every {every_s} s)");
        }
    }
}

/// A stream whose first event has arrived.
pub(crate) struct Opened {
    pub(crate) first: StreamEvent,
    /// The events after it.
    pub(crate) rest: BoxStream<'static, Result<StreamEvent, ProviderError>>,
    /// From sending the request to its first event.
    pub(crate) first_after: Duration,
}

/// The rest of an opened stream, holding its slot.
struct Streaming {
    link: Arc<Link>,
    events: EventStream,
    slot: Slot,
    sent: Instant,
    /// Longest silence between events.
    idle: Duration,
    /// The tokens its quota was charged at the start (the usage at the end settles it).
    estimated: u32,
}

impl Streaming {
    /// The events until the end or the first error, which is counted against the provider;
    /// the end is counted as a success with the whole stream's time, and judged as a unary
    /// answer of that time is (the concurrency limit learns from it).
    fn run(self) -> impl futures_util::Stream<Item = Result<StreamEvent, ProviderError>> + Send {
        futures_util::stream::unfold(Some(self), |st| async move {
            let mut st = st?;
            let next = match tokio::time::timeout(st.idle, st.events.next()).await {
                Ok(Some(next)) => next,
                Ok(None) => Err(ProviderError::new(
                    FailureKind::Io,
                    "the stream ended without its end",
                )),
                Err(_) => Err(ProviderError::new(
                    FailureKind::Timeout,
                    format!("silent for {} ms mid-stream", st.idle.as_millis()),
                )),
            };
            let link = &st.link;
            let took = st.sent.elapsed();
            match &next {
                Ok(StreamEvent::Text(_) | StreamEvent::ToolCall(_)) => {
                    return Some((next, Some(st)));
                }
                Ok(StreamEvent::End { usage, .. }) => {
                    if let (Some(rate), Some(u)) = (&link.rate, usage) {
                        rate.used(
                            st.estimated,
                            u.prompt_tokens.saturating_add(u.completion_tokens),
                        );
                    }
                    if usage.is_some_and(|u| u.clamped) {
                        link.series.usage_clamped();
                    }
                    let (verdict, _) = judge(&Outcome::Answered { took, items: 1 });
                    link.limit.observe(&st.slot, verdict);
                    link.stats.success(took);
                    link.series.ended(took);
                }
                Err(e) => {
                    // Silence mid-stream is the provider's own timeout.
                    let (verdict, blamed) = judge(&if e.kind == FailureKind::Timeout {
                        Outcome::OutOfTime { blamed: true }
                    } else {
                        Outcome::Failed(e)
                    });
                    link.limit.observe(&st.slot, verdict);
                    link.series.ended(took);
                    link.stats.failure(e.kind);
                    if blamed {
                        link.breaker.failed_later();
                    }
                    link.say(e);
                }
            }
            Some((next, None))
        })
    }
}

pub(super) fn timed_out(after: Duration) -> ProviderError {
    ProviderError::new(
        FailureKind::Timeout,
        format!("no answer within {} ms", after.as_millis()),
    )
}

/// A breaker refusal as the error an attempt records.
pub(super) fn refused(r: Refusal) -> ProviderError {
    match r {
        Refusal::CircuitOpen => ProviderError::new(FailureKind::CircuitOpen, ""),
        Refusal::CoolingDown(left) => ProviderError::new(
            FailureKind::CoolingDown,
            format!("Retry-After has {} ms left", left.as_millis()),
        ),
    }
}
