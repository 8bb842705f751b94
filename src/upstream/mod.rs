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
//! - [`health`]: active health checks, which take a dead provider out before callers pay;
//! - [`limit`]: how many requests the provider is sent at once, fixed or learned;
//! - [`stats`]: the counters behind ListProviders and Prometheus;
//! - [`warnings`]: upstream failures said in the log at a bounded rate.

mod attempt;
mod batch;
mod breaker;
mod health;
mod limit;
mod link;
#[cfg(test)]
mod simulator;
mod stats;
mod warnings;

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, timeout_at};

pub use attempt::Window;
pub use breaker::Circuit;
pub use health::{Checked, Probe};
pub(crate) use link::Opened;
pub use stats::{Counts, Latencies, Noted};

use batch::Batcher;
use link::{Link, refused};

use crate::{
    capability::{ModelInfo, Needs},
    completion::{Completion, CompletionRequest, FailureKind},
    config::{BreakerConfig, ProviderConfig, ProviderKind},
    control::{Order, OrderCell},
    metrics::Metrics,
    provider::{self, Provider, ProviderError},
};

/// A provider with its breaker, slots, counters and batch queues.
pub struct Upstream {
    link: Arc<Link>,
    batcher: Option<Batcher>,
    /// The operator's order for it (see [`crate::control`]).
    order: OrderCell,
    health: Option<Arc<health::Health>>,
    /// Probes `health` while this upstream lives.
    _watch: Option<health::Watch>,
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
    pub order: Order,
    /// Requests in flight to it now.
    pub in_flight: usize,
    /// Its active health checks, when it has them.
    pub health: Option<Checked>,
    /// Failures so far per kind, in [`FailureKind::ALL`]'s order.
    pub failures_by_kind: [u64; FailureKind::ALL.len()],
    pub latencies: Latencies,
    /// The latest failures, oldest first.
    pub recent_failures: Vec<Noted>,
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

    pub(crate) fn with_provider(
        config: &ProviderConfig,
        breaker: BreakerConfig,
        metrics: &Arc<Metrics>,
        provider: Arc<dyn Provider>,
    ) -> Upstream {
        let link = Arc::new(Link::new(config, breaker, metrics, provider));
        let health = config
            .health_check
            .clone()
            .map(|c| Arc::new(health::Health::new(c)));
        Upstream {
            batcher: Batcher::new(config, &link),
            order: OrderCell::default(),
            _watch: health.as_ref().and_then(|h| health::watch(&link, h)),
            health,
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

    /// Puts the operator's `order` in force for new requests.
    pub fn set_order(&self, order: Order) {
        self.order.set(order);
    }

    /// Closes its circuit and ends any cool-down (an operator's `reset_circuit`).
    pub fn reset_circuit(&self) {
        self.link.breaker.reset();
    }

    /// Probes it now (an operator's health check); `None` without health checks configured.
    pub async fn check_health(&self) -> Option<Probe> {
        let health = self.health.as_ref()?;
        Some(health.probe(&self.link).await)
    }

    /// Whether a new request may go to it now: no operator holds it back and its health
    /// checks (if any) pass; else why not, as a skip with no network attempt.
    fn admits(&self) -> Result<(), Miss> {
        let order = self.order.get();
        if !order.admits() {
            return Err(Miss::Skipped(ProviderError::new(
                FailureKind::Disabled,
                format!("an operator ordered {}", order.as_str()),
            )));
        }
        if self.health.as_ref().is_some_and(|h| !h.healthy()) {
            return Err(Miss::Skipped(ProviderError::new(
                FailureKind::Unhealthy,
                "its health checks are failing",
            )));
        }
        Ok(())
    }

    /// Whether it could take a new request now (for `/v1/models`): admitted, and its circuit
    /// not open.
    pub fn serving(&self) -> bool {
        self.admits().is_ok() && self.link.breaker.circuit() != Circuit::Open
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
        self.admits()?;
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
        self.admits()?;
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
            order: self.order.get(),
            in_flight: self.link.limit.in_flight(),
            health: self.health.as_ref().map(|h| h.checked()),
            failures_by_kind: self.link.stats.failures_by_kind(),
            latencies: self.link.stats.latencies(),
            recent_failures: self.link.stats.recent(),
        }
    }
}

#[cfg(test)]
mod tests;
