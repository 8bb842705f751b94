//! One endpoint of a provider — a replica of its server — with its own client (and so its
//! own connection pool), breaker, concurrency limit, batch queues and health checks, and one
//! try at it ([`Replica::attempt`], [`Replica::stream`]). A provider with one URL has one.

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, timeout_at};

use super::{
    Delivered, Miss, Window,
    batch::Batcher,
    breaker::Circuit,
    health::{self, Health},
    link::{Link, Opened, refused},
};
use crate::{
    completion::{CompletionRequest, FailureKind},
    config::{BatchingConfig, BreakerConfig, ProviderConfig},
    metrics::Metrics,
    provider::{Provider, ProviderError},
    rate::ProviderLimit,
};

pub(super) struct Replica {
    pub(super) link: Arc<Link>,
    batcher: Option<Batcher>,
    pub(super) health: Option<Arc<Health>>,
    /// Probes `health` while this replica lives.
    _watch: Option<health::Watch>,
}

impl Replica {
    pub(super) fn new(
        config: &ProviderConfig,
        breaker: BreakerConfig,
        metrics: &Arc<Metrics>,
        provider: Arc<dyn Provider>,
        rate: Option<Arc<ProviderLimit>>,
    ) -> Replica {
        let link = Arc::new(Link::new(config, breaker, metrics, provider, rate));
        let health = config
            .health_check
            .clone()
            .map(|c| Arc::new(Health::new(c)));
        Replica {
            batcher: Batcher::new(config, &link),
            _watch: health.as_ref().and_then(|h| health::watch(&link, h)),
            health,
            link,
        }
    }

    /// Whether its health checks (if any) pass.
    pub(super) fn healthy(&self) -> bool {
        self.health.as_ref().is_none_or(|h| h.healthy())
    }

    /// Whether a request may go to it now: healthy, and its breaker would let one through.
    pub(super) fn open(&self) -> bool {
        self.healthy() && self.link.breaker.check().is_ok()
    }

    /// Whether its circuit is open (for `/v1/models`).
    pub(super) fn circuit_open(&self) -> bool {
        self.link.breaker.circuit() == Circuit::Open
    }

    /// Requests in flight and queued here.
    pub(super) fn busy(&self) -> usize {
        self.link.limit.in_flight()
            + usize::try_from(self.link.stats.in_queue()).unwrap_or(usize::MAX)
    }

    /// Requests in flight and queued here over its concurrency limit: how loaded it is.
    pub(super) fn load(&self) -> f64 {
        self.busy() as f64 / self.link.limit.current().max(1) as f64
    }

    /// One try at `model` for `request`, ending by `window.until`.
    #[expect(
        clippy::manual_async_fn,
        reason = "arguments held once (see crate::upstream)"
    )]
    pub(super) fn attempt<'a>(
        &'a self,
        model: &'a Arc<str>,
        request: &'a Arc<CompletionRequest>,
        window: Window,
    ) -> impl Future<Output = Result<Delivered, Miss>> + 'a {
        async move {
            let now = Instant::now();
            let queue = self.ready(model, window, now)?;
            let batched = queue.is_some();
            let result =
                match queue {
                    // Time in the batch queue is the router's own: the provider's timeout starts
                    // when the batch is sent (the batcher's send holds it to that), so the queued
                    // item is bounded here by its share alone; an item still queued when that
                    // ends moves on.
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
                    None => self.link.complete(model, request, window).await.map(
                        |(completion, took)| Delivered {
                            completion,
                            batch_size: 1,
                            queue_wait: Duration::ZERO,
                            upstream: took,
                        },
                    ),
                };
            match result {
                Ok(delivered) => Ok(delivered),
                // The caller's deadline ended the try (in flight, or still in the batch
                // queue).
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
                // Nothing was sent: refused by the breaker before sending (unbatched), or no
                // room in the router's own queue for this provider.
                Err(e)
                    if e.kind == FailureKind::Overloaded || (!batched && e.kind.is_refusal()) =>
                {
                    Err(Miss::Skipped(e))
                }
                Err(e) => Err(Miss::Failed(e)),
            }
        }
    }

    /// Whether a try may start now, and the batch queue it goes to (`None`: sent alone).
    /// Not in the try's future, so what it checks is not held there.
    fn ready(
        &self,
        model: &Arc<str>,
        window: Window,
        now: Instant,
    ) -> Result<Option<(&Batcher, BatchingConfig)>, Miss> {
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
        Ok(queue)
    }

    /// One try at streaming `model`'s answer to `request`: `Ok` once its first event
    /// arrived by `window.until` (see [`Link::open_stream`]). Streams are never batched.
    pub(super) async fn stream(
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
}
