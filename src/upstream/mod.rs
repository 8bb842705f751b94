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
//! - [`replica`]: one endpoint of the provider (a replica of its server) with its own link,
//!   batch queues and health checks; [`balance`]: how requests spread over them;
//! - [`breaker`]: the circuit breaker and the `Retry-After` cool-down;
//! - [`health`]: active health checks, which take a dead provider out before callers pay;
//! - [`limit`]: how many requests the provider is sent at once, fixed or learned;
//! - [`stats`]: the counters behind ListProviders and Prometheus;
//! - [`warnings`]: upstream failures said in the log at a bounded rate.
//!
//! A unary call waits in these futures for as long as the provider takes, one per call in
//! flight, so the path's functions are `fn … -> impl Future` over an `async move` block, not
//! `async fn`: an `async fn` keeps each argument twice in its future (rust-lang/rust#62958),
//! and the copies along the path cost ~0.3 KiB a call in flight (`front::unary` holds a whole
//! call to one 2 KiB box).

mod attempt;
mod balance;
mod batch;
mod breaker;
mod health;
mod limit;
mod link;
mod replica;
#[cfg(test)]
mod simulator;
mod stats;
mod warnings;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;

pub use attempt::Window;
pub use breaker::Circuit;
pub use health::{Checked, Probe};
pub(crate) use link::Opened;
pub use stats::{Counts, Latencies, Noted};

use balance::Balancer;
use link::{Link, refused};
use replica::Replica;

use crate::{
    capability::{ModelInfo, Needs},
    completion::{Completion, CompletionRequest, FailureKind},
    config::{BreakerConfig, ProviderConfig, ProviderKind},
    control::{Order, OrderCell},
    fleet::Fleet,
    metrics::Metrics,
    provider::{self, ProviderError},
    rate::ProviderLimit,
};

/// A provider: its endpoints (each with its breaker, slots, counters and batch queues), how
/// requests spread over them, and the operator's order for it.
pub struct Upstream {
    name: Arc<str>,
    replicas: Vec<Replica>,
    balancer: Balancer,
    /// The operator's order for it (see [`crate::control`]).
    order: OrderCell,
    kind: ProviderKind,
    priority: i32,
    models: Vec<String>,
    model_info: std::collections::BTreeMap<String, ModelInfo>,
    pass_through: Vec<String>,
}

/// Whether a try that failed on one endpoint for the endpoint's own reasons (down, hung,
/// failing, full, its circuit open) goes to another endpoint of the same provider.
fn elsewhere(e: &ProviderError) -> bool {
    e.retry_same_provider()
        || matches!(
            e.kind,
            FailureKind::Connect
                | FailureKind::Overloaded
                | FailureKind::CircuitOpen
                | FailureKind::CoolingDown
                | FailureKind::Unhealthy
        )
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
    /// Endpoints (replicas of its server) it spreads requests over.
    pub endpoints: usize,
}

impl Upstream {
    /// The provider `config` describes, with a client of its own for each of its endpoints.
    pub fn new(
        config: &ProviderConfig,
        breaker: BreakerConfig,
        metrics: &Arc<Metrics>,
        fleet: Option<&Fleet>,
    ) -> Result<Upstream, reqwest::Error> {
        let rate = config
            .rate_limit
            .as_ref()
            .map(|r| Arc::new(ProviderLimit::new(r, &config.name, fleet)));
        let replica = |one: &ProviderConfig| -> Result<Replica, reqwest::Error> {
            let built = provider::build(one)?;
            let replica = Replica::new(one, breaker, metrics, built, rate.clone());
            if let Some(fleet) = fleet {
                let url = one.endpoints.first().map_or("", url::Url::as_str);
                fleet.share_circuit(&config.name, url, Arc::downgrade(&replica.link) as _);
            }
            Ok(replica)
        };
        let replicas = match config.endpoints.len() {
            0 | 1 => vec![replica(config)?],
            _ => config
                .endpoints
                .iter()
                .map(|base| replica(&config.at_endpoint(base)))
                .collect::<Result<_, reqwest::Error>>()?,
        };
        Ok(Upstream::of(config, replicas))
    }

    /// A provider with one endpoint served by `provider` (tests' scripted providers).
    #[cfg(test)]
    pub(crate) fn with_provider(
        config: &ProviderConfig,
        breaker: BreakerConfig,
        metrics: &Arc<Metrics>,
        provider: Arc<dyn crate::provider::Provider>,
    ) -> Upstream {
        Upstream::of(
            config,
            vec![Replica::new(config, breaker, metrics, provider, None)],
        )
    }

    fn of(config: &ProviderConfig, replicas: Vec<Replica>) -> Upstream {
        Upstream {
            name: config.name.as_str().into(),
            balancer: Balancer::new(config.balance, replicas.len()),
            replicas,
            order: OrderCell::default(),
            kind: config.kind,
            priority: config.priority,
            models: config.models.clone(),
            model_info: config.model_info.clone(),
            pass_through: config.pass_through.clone(),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The first endpoint's link: what every endpoint shares (the API and its fields).
    fn first(&self) -> &Link {
        &self.replicas[0].link
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
                || (self.first().forwards_openai_fields() && crate::completion::is_openai_field(k)))
        }) {
            return Some(format!(
                "{field}: the provider does not take it (list it under its pass_through to forward it)"
            ));
        }
        self.first().unsupported(request)
    }

    /// Puts the operator's `order` in force for new requests.
    pub fn set_order(&self, order: Order) {
        self.order.set(order);
    }

    /// Closes its endpoints' circuits and ends any cool-down (an operator's `reset_circuit`).
    pub fn reset_circuit(&self) {
        for r in &self.replicas {
            r.link.breaker.reset();
        }
    }

    /// Probes every endpoint now (an operator's health check), at once; `None` without health
    /// checks configured. One probe's outcome per provider: the slowest, and the first
    /// failure (naming its endpoint when there are several).
    pub async fn check_health(&self) -> Option<Probe> {
        let probes = self
            .replicas
            .iter()
            .map(|r| async move { Some(r.health.as_ref()?.probe(&r.link).await) });
        let probes: Vec<Option<Probe>> = futures_util::future::join_all(probes).await;
        let mut all = probes.into_iter().flatten().enumerate();
        let (_, mut worst) = all.next()?;
        for (i, p) in all {
            worst.took = worst.took.max(p.took);
            if worst.failure.is_none()
                && let Some((kind, message)) = p.failure
            {
                worst.failure = Some((kind, format!("endpoint {i}: {message}")));
            }
        }
        Some(worst)
    }

    /// Whether a new request may go to it now as far as the operator is concerned; else why
    /// not, as a skip with no network attempt.
    fn admits(&self) -> Result<(), Miss> {
        let order = self.order.get();
        if !order.admits() {
            return Err(Miss::Skipped(ProviderError::new(
                FailureKind::Disabled,
                format!("an operator ordered {}", order.as_str()),
            )));
        }
        Ok(())
    }

    /// Whether it could take a new request now (for `/v1/models`): no operator holds it
    /// back, and an endpoint is healthy with its circuit not open.
    pub fn serving(&self) -> bool {
        self.admits().is_ok()
            && self
                .replicas
                .iter()
                .any(|r| r.healthy() && !r.circuit_open())
    }

    /// The model for requests that name none (listed first).
    pub fn default_model(&self) -> &str {
        self.models.first().map(String::as_str).unwrap_or_default()
    }

    /// One try at `model` for `request`, ending by `window.until`: on one endpoint, picked
    /// by the provider's `balance`; a try that failed there for the endpoint's own reasons
    /// (it is down, timed out, answered 5xx, or had no room) goes once more to another.
    pub fn attempt<'a>(
        &'a self,
        model: &'a Arc<str>,
        request: &'a Arc<CompletionRequest>,
        window: Window,
    ) -> impl Future<Output = Result<Delivered, Miss>> + 'a {
        self.on_endpoints(request, move |r| r.attempt(model, request, window))
    }

    /// One try at streaming `model`'s answer to `request`: `Ok` once its first event
    /// arrived by `window.until` (see [`Link::open_stream`]); on another endpoint once, as
    /// [`Upstream::attempt`] does. Streams are never batched.
    pub(crate) async fn stream(
        &self,
        model: &str,
        request: &CompletionRequest,
        window: Window,
    ) -> Result<Opened, Miss> {
        self.on_endpoints(request, |r| r.stream(model, request, window))
            .await
    }

    /// `try_one` on an endpoint picked for `request`, and once more on another when it failed
    /// there for the endpoint's own reasons.
    #[expect(
        clippy::manual_async_fn,
        reason = "arguments held once (see crate::upstream)"
    )]
    fn on_endpoints<'a, T, F, Fut>(
        &'a self,
        request: &'a CompletionRequest,
        try_one: F,
    ) -> impl Future<Output = Result<T, Miss>> + 'a
    where
        F: Fn(&'a Replica) -> Fut + 'a,
        Fut: Future<Output = Result<T, Miss>>,
    {
        async move {
            self.admits()?;
            let first = self.pick(request, None)?;
            // The first try's outcome is gone (its scope ended) before the second is awaited: a
            // call waiting on the second would otherwise carry it.
            let other = {
                let tried = try_one(&self.replicas[first]).await;
                let other = match &tried {
                    Err(Miss::Failed(e) | Miss::Skipped(e)) if elsewhere(e) => {
                        self.pick(request, Some(first)).ok()
                    }
                    _ => None,
                };
                match other {
                    Some(other) => other,
                    None => return tried,
                }
            };
            try_one(&self.replicas[other]).await
        }
    }

    /// The endpoint for the next try at `request` (not `not`): of those open to a request
    /// now, by the provider's `balance`; a skip saying why when none is.
    fn pick(&self, request: &CompletionRequest, not: Option<usize>) -> Result<usize, Miss> {
        if self.replicas.len() == 1 {
            // One endpoint (the common case): no list, no breaker look here — its own path
            // asks the breaker, as it always did.
            return match not.is_none() && self.replicas[0].healthy() {
                true => Ok(0),
                false => Err(self.none_open(not)),
            };
        }
        let open: Vec<usize> = (0..self.replicas.len())
            .filter(|&i| Some(i) != not && self.replicas[i].open())
            .collect();
        if open.is_empty() {
            return Err(self.none_open(not));
        }
        Ok(self.balancer.pick(&self.replicas, &open, request))
    }

    /// Why no endpoint (but `not`) may take a request now.
    fn none_open(&self, not: Option<usize>) -> Miss {
        let others = (0..self.replicas.len()).filter(|&i| Some(i) != not);
        if others.clone().all(|i| !self.replicas[i].healthy()) {
            return Miss::Skipped(ProviderError::new(
                FailureKind::Unhealthy,
                "its health checks are failing",
            ));
        }
        // A healthy one refused by its breaker or a cool-down: say which.
        let refusal = others
            .filter(|&i| self.replicas[i].healthy())
            .find_map(|i| self.replicas[i].link.breaker.check().err())
            .map_or_else(
                || ProviderError::new(FailureKind::CircuitOpen, "no endpoint admits a request"),
                refused,
            );
        Miss::Skipped(refusal)
    }

    /// Whether a try starting at `at` could still be answered before `deadline`, judging by
    /// the quickest answer any of its endpoints ever gave.
    #[must_use]
    pub fn fits(&self, at: Instant, deadline: Instant) -> bool {
        let fastest = self.replicas.iter().map(|r| r.link.stats.fastest()).min();
        at + fastest.unwrap_or_default() < deadline
    }

    /// Its state now, its endpoints' figures summed (their circuit: the most open one's
    /// when none is closed; health: healthy while one is).
    pub fn snapshot(&self) -> Snapshot {
        let links = || self.replicas.iter().map(|r| &r.link);
        let circuits: Vec<Circuit> = links().map(|l| l.breaker.circuit()).collect();
        let circuit = if circuits.contains(&Circuit::Closed) {
            Circuit::Closed
        } else if circuits.contains(&Circuit::HalfOpen) {
            Circuit::HalfOpen
        } else {
            Circuit::Open
        };
        let mut counts = Counts::default();
        let mut failures_by_kind = [0; FailureKind::ALL.len()];
        let mut latencies = Latencies::default();
        let mut recent_failures = Vec::new();
        for l in links() {
            counts.add(&l.stats.counts());
            for (sum, n) in failures_by_kind.iter_mut().zip(l.stats.failures_by_kind()) {
                *sum += n;
            }
            latencies.add(&l.stats.latencies());
            recent_failures.extend(l.stats.recent());
        }
        recent_failures.sort_by_key(|f| f.at);
        let checked: Vec<Checked> = self
            .replicas
            .iter()
            .filter_map(|r| r.health.as_ref().map(|h| h.checked()))
            .collect();
        let health = checked
            .iter()
            .find(|c| c.healthy)
            .or(checked.first())
            .cloned();
        Snapshot {
            name: self.name.clone(),
            kind: self.kind,
            priority: self.priority,
            models: self.models.clone(),
            circuit,
            cooling_down: links()
                .map(|l| l.breaker.cooling_down_for())
                .min()
                .unwrap_or_default(),
            counts,
            native_batching: self.first().takes_arrays(),
            concurrency_limit: links().map(|l| l.limit.current()).sum(),
            adaptive: self.first().limit.is_adaptive(),
            order: self.order.get(),
            in_flight: links().map(|l| l.limit.in_flight()).sum(),
            health,
            failures_by_kind,
            latencies,
            recent_failures,
            endpoints: self.replicas.len(),
        }
    }
}

#[cfg(test)]
mod tests;
