//! The ordered fallback loop: each target in turn, with retries and backoff on transient
//! faults, a time budget per attempt inside the caller's deadline, a circuit breaker and a
//! `Retry-After` cool-down per provider. Failures are collected per provider and end as one
//! aggregate error.

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

use crate::{
    breaker::{Breaker, Refusal},
    completion::{Answer, Attempt, Completion, CompletionRequest, FailureKind},
    config::{CascadePolicy, Config, ProviderConfig},
    error::RouterError,
    provider::{self, Provider, ProviderError},
};

/// One place a request can go: a provider (by index) and the model to ask it for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub upstream: usize,
    pub model: Arc<str>,
}

/// A provider with the state the cascade keeps about it.
pub struct Upstream {
    pub config: ProviderConfig,
    pub name: Arc<str>,
    provider: Arc<dyn Provider>,
    pub breaker: Breaker,
    /// Caps requests in flight, and so the connections the pool opens to this provider.
    permits: Semaphore,
    pub stats: Stats,
}

/// Counters for ListProviders; relaxed atomics, read as a snapshot that may be a little stale.
#[derive(Debug)]
pub struct Stats {
    pub requests: AtomicU64,
    pub successes: AtomicU64,
    pub failures: AtomicU64,
    latency_us_total: AtomicU64,
    fastest_us: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency_us_total: AtomicU64::new(0),
            fastest_us: AtomicU64::new(u64::MAX),
        }
    }
}

impl Stats {
    fn success(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.successes.fetch_add(1, Relaxed);
        self.latency_us_total.fetch_add(us, Relaxed);
        self.fastest_us.fetch_min(us, Relaxed);
    }

    pub fn mean_latency(&self) -> Duration {
        let n = self.successes.load(Relaxed);
        match n {
            0 => Duration::ZERO,
            n => Duration::from_micros(self.latency_us_total.load(Relaxed) / n),
        }
    }

    /// The quickest answer this provider ever gave: an attempt with less time left than this
    /// cannot finish, so it is not started.
    pub fn fastest(&self) -> Duration {
        match self.fastest_us.load(Relaxed) {
            u64::MAX => Duration::ZERO,
            us => Duration::from_micros(us),
        }
    }
}

pub struct Cascade {
    upstreams: Vec<Upstream>,
    policy: CascadePolicy,
}

/// How one provider's turn ended.
enum Turn {
    Answered {
        completion: Completion,
        queue_wait: Duration,
        upstream: Duration,
    },
    Failed(Attempt),
    /// The caller's deadline passed; `Some` when a try was cut short by it.
    OutOfTime(Option<Attempt>),
}

impl Cascade {
    pub fn new(config: &Config) -> Result<Cascade, reqwest::Error> {
        let upstreams = config
            .providers
            .iter()
            .map(|p| {
                Ok(Upstream {
                    name: p.name.as_str().into(),
                    provider: provider::build(p)?,
                    breaker: Breaker::new(config.cascade.breaker),
                    permits: Semaphore::new(p.max_concurrency),
                    stats: Stats::default(),
                    config: p.clone(),
                })
            })
            .collect::<Result<_, reqwest::Error>>()?;
        Ok(Cascade {
            upstreams,
            policy: config.cascade.clone(),
        })
    }

    /// Providers in priority order.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// Walks `targets` in order until one answers or the deadline passes.
    pub async fn run(
        &self,
        targets: &[Target],
        request: &CompletionRequest,
        deadline: Instant,
    ) -> Result<Answer, RouterError> {
        let mut attempts = Vec::new();
        for target in targets {
            let Some(up) = self.upstreams.get(target.upstream) else {
                continue;
            };
            match self.turn(up, &target.model, request, deadline).await {
                Turn::Answered {
                    completion,
                    queue_wait,
                    upstream,
                } => {
                    return Ok(Answer {
                        completion,
                        provider: up.name.clone(),
                        model: target.model.clone(),
                        attempts,
                        queue_wait,
                        upstream,
                    });
                }
                Turn::Failed(attempt) => attempts.push(attempt),
                Turn::OutOfTime(attempt) => {
                    attempts.extend(attempt);
                    return Err(RouterError::DeadlineExceeded { attempts });
                }
            }
        }
        Err(RouterError::Unavailable {
            reason: "every provider failed",
            attempts,
        })
    }

    /// One provider's turn: admission, then up to `1 + max_retries` tries.
    async fn turn(
        &self,
        up: &Upstream,
        model: &Arc<str>,
        request: &CompletionRequest,
        deadline: Instant,
    ) -> Turn {
        let began = Instant::now();
        let attempt = |kind, error: String, status, tries| Attempt {
            provider: up.name.clone(),
            model: model.clone(),
            kind,
            http_status: status,
            error,
            tries,
            elapsed: began.elapsed(),
        };
        let mut tries = 0u32;
        loop {
            let pass = match up.breaker.admit() {
                Ok(pass) => pass,
                Err(Refusal::CircuitOpen) => {
                    return Turn::Failed(attempt(
                        FailureKind::CircuitOpen,
                        String::new(),
                        None,
                        tries,
                    ));
                }
                Err(Refusal::CoolingDown(left)) => {
                    let msg = format!("Retry-After has {} ms left", left.as_millis());
                    return Turn::Failed(attempt(FailureKind::CoolingDown, msg, None, tries));
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Turn::OutOfTime(None);
            }
            if deadline - now < up.stats.fastest() {
                let msg = format!(
                    "{} ms left, it never answered in under {} ms",
                    (deadline - now).as_millis(),
                    up.stats.fastest().as_millis()
                );
                return Turn::Failed(attempt(FailureKind::NoTimeLeft, msg, None, tries));
            }
            let Ok(Ok(_permit)) = timeout_at(deadline, up.permits.acquire()).await else {
                return Turn::OutOfTime(None);
            };
            let sent = Instant::now();
            let queue_wait = sent - now;
            let budget_end = (sent + up.config.timeout).min(deadline);
            tries += 1;
            up.stats.requests.fetch_add(1, Relaxed);
            let result = timeout_at(budget_end, up.provider.complete(model, request)).await;
            let took = sent.elapsed();
            let err = match result {
                Ok(Ok(completion)) => {
                    pass.success();
                    up.stats.success(took);
                    return Turn::Answered {
                        completion,
                        queue_wait,
                        upstream: took,
                    };
                }
                Ok(Err(e)) => e,
                // Cut short by the caller's deadline: no verdict on the provider.
                Err(_) if budget_end == deadline => {
                    drop(pass);
                    let msg = format!("caller's deadline passed after {} ms", took.as_millis());
                    return Turn::OutOfTime(Some(attempt(FailureKind::Timeout, msg, None, tries)));
                }
                Err(_) => ProviderError::new(
                    FailureKind::Timeout,
                    format!("no answer within {} ms", up.config.timeout.as_millis()),
                ),
            };
            up.stats.failures.fetch_add(1, Relaxed);
            if err.counts_against_provider() {
                pass.failure();
            } else {
                pass.neutral();
            }
            log_failure(up, &err);
            if let Some(wait) = err.retry_after {
                up.breaker.cool_down(Instant::now() + wait);
            }
            if err.retry_same_provider() && tries <= self.policy.max_retries_per_provider {
                let delay = backoff(self.policy.retry_delay, tries);
                if Instant::now() + delay + up.stats.fastest() < deadline {
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            return Turn::Failed(attempt(err.kind, err.message, err.http_status, tries));
        }
    }
}

fn log_failure(up: &Upstream, err: &ProviderError) {
    match err.kind {
        FailureKind::Unauthorized => tracing::warn!(
            provider = %up.name,
            status = err.http_status,
            "provider refused our credentials; check its api_key"
        ),
        _ => {
            tracing::debug!(provider = %up.name, kind = %err.kind, status = err.http_status, error = %err.message, "upstream try failed")
        }
    }
}

/// Exponential backoff with equal jitter: `base · 2^(n-1)` capped at 32 × base, of which the
/// second half is random so that callers failing together do not retry together.
fn backoff(base: Duration, tries: u32) -> Duration {
    let full = base.saturating_mul(1 << tries.saturating_sub(1).min(5));
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_in_its_band() {
        let base = Duration::from_millis(100);
        for tries in 1..=8 {
            let full = base * (1 << (tries - 1).min(5));
            let d = backoff(base, tries);
            assert!(
                d >= full / 2 && d <= full,
                "try {tries}: {d:?} outside {full:?}"
            );
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }
}
