//! One provider and the state kept about it: its circuit breaker, its cap on requests in
//! flight (which also bounds its connections), and its counters. Shared by the cascade and
//! the provider's batcher.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    sync::Semaphore,
    time::{Instant, timeout_at},
};

use prometheus_client::metrics::counter::Counter;

use crate::{
    breaker::{Breaker, Pass, Refusal},
    completion::{Completion, CompletionRequest, FailureKind},
    config::{BreakerConfig, ProviderConfig},
    metrics::{Metrics, ProviderLabel},
    provider::{self, Provider, ProviderError},
};

pub struct Upstream {
    pub config: ProviderConfig,
    pub name: Arc<str>,
    pub provider: Arc<dyn Provider>,
    pub breaker: Breaker,
    /// Caps upstream requests in flight, and so the connections the pool opens.
    pub permits: Arc<Semaphore>,
    pub stats: Stats,
    pub label: ProviderLabel,
    pub metrics: Arc<Metrics>,
}

/// Counters for ListProviders and Prometheus; relaxed atomics, read as a snapshot that may be
/// a little stale.
#[derive(Debug)]
pub struct Stats {
    /// Upstream HTTP requests sent (also `cascade_upstream_requests_total`).
    pub requests: Counter,
    pub successes: AtomicU64,
    pub failures: AtomicU64,
    /// Prompts carried by those requests, more than `requests` when batching (also
    /// `cascade_upstream_items_total`).
    pub items: Counter,
    /// Items waiting in this provider's batch queues.
    pub queued: AtomicU64,
    latency_us_total: AtomicU64,
    fastest_us: AtomicU64,
}

impl Stats {
    fn new(metrics: &Metrics, label: &ProviderLabel) -> Self {
        Stats {
            requests: metrics.upstream_requests.get_or_create(label).clone(),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            items: metrics.upstream_items.get_or_create(label).clone(),
            queued: AtomicU64::new(0),
            latency_us_total: AtomicU64::new(0),
            fastest_us: AtomicU64::new(u64::MAX),
        }
    }
}

impl Stats {
    pub fn sent(&self, items: usize) {
        self.requests.inc();
        self.items.inc_by(items as u64);
    }

    pub fn success(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.successes.fetch_add(1, Relaxed);
        self.latency_us_total.fetch_add(us, Relaxed);
        self.fastest_us.fetch_min(us, Relaxed);
    }

    pub fn failure(&self) {
        self.failures.fetch_add(1, Relaxed);
    }

    pub fn mean_latency(&self) -> Duration {
        match self.successes.load(Relaxed) {
            0 => Duration::ZERO,
            n => Duration::from_micros(self.latency_us_total.load(Relaxed) / n),
        }
    }

    /// The quickest answer this provider ever gave: a call with less time left than this
    /// cannot finish, so it is not started (and a batch is flushed this long before a deadline).
    pub fn fastest(&self) -> Duration {
        match self.fastest_us.load(Relaxed) {
            u64::MAX => Duration::ZERO,
            us => Duration::from_micros(us),
        }
    }
}

impl Upstream {
    pub fn new(
        config: &ProviderConfig,
        breaker: BreakerConfig,
        metrics: &Arc<Metrics>,
    ) -> Result<Upstream, reqwest::Error> {
        let label = ProviderLabel::of(&config.name);
        Ok(Upstream {
            name: config.name.as_str().into(),
            provider: provider::build(config)?,
            breaker: Breaker::new(breaker),
            permits: Arc::new(Semaphore::new(config.max_concurrency)),
            stats: Stats::new(metrics, &label),
            label,
            metrics: metrics.clone(),
            config: config.clone(),
        })
    }

    /// Records an upstream outcome against the breaker and the counters.
    pub fn judge(&self, pass: Pass<'_>, outcome: Result<Duration, &ProviderError>) {
        match outcome {
            Ok(took) => {
                pass.success();
                self.stats.success(took);
            }
            Err(e) => {
                self.stats.failure();
                if e.counts_against_provider() {
                    pass.failure();
                } else {
                    pass.neutral();
                }
                if let Some(wait) = e.retry_after {
                    self.breaker.cool_down(Instant::now() + wait);
                }
                if e.kind == FailureKind::Unauthorized {
                    tracing::warn!(provider = %self.name, status = e.http_status, "provider refused our credentials; check its api_key");
                } else {
                    tracing::debug!(provider = %self.name, kind = %e.kind, status = e.http_status, error = %e.message, "upstream request failed");
                }
            }
        }
    }

    /// The time a call starting at `from` may take: this provider's timeout or the caller's
    /// `deadline`, whichever comes first.
    pub fn budget(&self, from: Instant, deadline: Instant) -> Budget {
        let provider_end = from + self.config.timeout;
        Budget {
            end: provider_end.min(deadline),
            deadline_bound: deadline <= provider_end,
        }
    }

    /// Judges a request that ran out of its budget. It counts against the provider unless
    /// the caller's deadline, not the provider's timeout, was what ran out.
    pub fn judge_timeout(&self, pass: Pass<'_>, took: Duration, budget: Budget) -> ProviderError {
        let e = timed_out(took);
        if budget.deadline_bound {
            self.stats.failure();
            pass.neutral();
        } else {
            self.judge(pass, Err(&e));
        }
        e
    }

    /// One unbatched upstream request within `budget`. Returns the completion and how long
    /// the request took.
    pub async fn call(
        &self,
        model: &str,
        request: &CompletionRequest,
        budget: Budget,
    ) -> Result<(Completion, Duration), ProviderError> {
        let pass = self.breaker.admit().map_err(refused)?;
        let _permit = timeout_at(budget.end, self.permits.acquire())
            .await
            .map_err(|_| {
                ProviderError::new(FailureKind::Timeout, "no free concurrency slot in time")
            })?
            .map_err(|_| {
                ProviderError::new(FailureKind::Overloaded, "provider is shutting down")
            })?;
        let sent = Instant::now();
        self.stats.sent(1);
        match timeout_at(budget.end, self.provider.complete(model, request)).await {
            Ok(Ok(c)) => {
                let took = sent.elapsed();
                self.judge(pass, Ok(took));
                Ok((c, took))
            }
            Ok(Err(e)) => {
                self.judge(pass, Err(&e));
                Err(e)
            }
            Err(_) => Err(self.judge_timeout(pass, sent.elapsed(), budget)),
        }
    }
}

/// When a call gives up, and whether that is the caller's deadline rather than the
/// provider's timeout.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub end: Instant,
    pub deadline_bound: bool,
}

pub fn timed_out(after: Duration) -> ProviderError {
    ProviderError::new(
        FailureKind::Timeout,
        format!("no answer within {} ms", after.as_millis()),
    )
}

/// A breaker refusal as the error an attempt records.
pub fn refused(r: Refusal) -> ProviderError {
    match r {
        Refusal::CircuitOpen => ProviderError::new(FailureKind::CircuitOpen, ""),
        Refusal::CoolingDown(left) => ProviderError::new(
            FailureKind::CoolingDown,
            format!("Retry-After has {} ms left", left.as_millis()),
        ),
    }
}
