//! The ordered fallback loop: each target in turn, with retries and backoff on transient
//! faults, a time budget per attempt inside the caller's deadline, and the provider's breaker
//! and `Retry-After` cool-down. Calls go through the provider's batcher when its model
//! batches, so items failing at one provider are batched again at the next. Failures are
//! collected per provider and end as one aggregate error.

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, timeout_at};

use crate::{
    batcher::{Batched, Batcher},
    completion::{Answer, Attempt, CompletionRequest, FailureKind},
    config::{CascadePolicy, Config},
    error::RouterError,
    metrics::Metrics,
    provider::ProviderError,
    upstream::{Upstream, refused, timed_out},
};

/// One place a request can go: a provider (by index) and the model to ask it for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub upstream: usize,
    pub model: Arc<str>,
}

pub struct Cascade {
    upstreams: Vec<Arc<Upstream>>,
    /// Parallel to `upstreams`: the batch queues of providers that batch.
    batchers: Vec<Option<Batcher>>,
    policy: CascadePolicy,
}

/// How one provider's turn ended.
enum Turn {
    Answered(Batched),
    Failed(Attempt),
    /// The caller's deadline passed; `Some` when a try was cut short by it.
    OutOfTime(Option<Attempt>),
}

impl Cascade {
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Result<Cascade, reqwest::Error> {
        let upstreams = config
            .providers
            .iter()
            .map(|p| Upstream::new(p, config.cascade.breaker, metrics).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let batchers = upstreams.iter().map(Batcher::for_upstream).collect();
        Ok(Cascade {
            upstreams,
            batchers,
            policy: config.cascade.clone(),
        })
    }

    /// Providers in priority order.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Walks `targets` in order until one answers or the deadline passes.
    pub async fn run(
        &self,
        targets: &[Target],
        request: &Arc<CompletionRequest>,
        deadline: Instant,
    ) -> Result<Answer, RouterError> {
        let mut attempts = Vec::new();
        for target in targets {
            let Some(up) = self.upstreams.get(target.upstream) else {
                continue;
            };
            let batcher = self.batchers.get(target.upstream).and_then(Option::as_ref);
            match self
                .turn(up, batcher, &target.model, request, deadline)
                .await
            {
                Turn::Answered(b) => {
                    return Ok(Answer {
                        completion: b.completion,
                        provider: up.name.clone(),
                        model: target.model.clone(),
                        attempts,
                        queue_wait: b.queue_wait,
                        upstream: b.upstream,
                        batch_size: b.batch_size,
                        cached: false,
                    });
                }
                Turn::Failed(attempt) => attempts.push(attempt),
                Turn::OutOfTime(attempt) => {
                    attempts.extend(attempt);
                    return Err(RouterError::DeadlineExceeded { attempts });
                }
            }
        }
        if !attempts.is_empty() && attempts.iter().all(|a| a.kind == FailureKind::Overloaded) {
            return Err(RouterError::ResourceExhausted(format!(
                "every provider's queue is full: {}",
                attempts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        Err(RouterError::Unavailable {
            reason: "every provider failed",
            attempts,
        })
    }

    /// One provider's turn: up to `1 + max_retries` tries, each batched when the model batches.
    async fn turn(
        &self,
        up: &Upstream,
        batcher: Option<&Batcher>,
        model: &Arc<str>,
        request: &Arc<CompletionRequest>,
        deadline: Instant,
    ) -> Turn {
        let began = Instant::now();
        let attempt = |e: ProviderError, tries| Attempt {
            provider: up.name.clone(),
            model: model.clone(),
            kind: e.kind,
            http_status: e.http_status,
            error: e.message,
            tries,
            elapsed: began.elapsed(),
        };
        let batching = batcher.and_then(|b| b.settings(model).map(|s| (b, s)));
        let mut tries = 0u32;
        loop {
            if let Err(r) = up.breaker.check() {
                return Turn::Failed(attempt(refused(r), tries));
            }
            let now = Instant::now();
            if now >= deadline {
                return Turn::OutOfTime(None);
            }
            let fastest = up.stats.fastest();
            if deadline - now < fastest {
                let msg = format!(
                    "{} ms left, it never answered in under {} ms",
                    (deadline - now).as_millis(),
                    fastest.as_millis()
                );
                return Turn::Failed(attempt(
                    ProviderError::new(FailureKind::NoTimeLeft, msg),
                    tries,
                ));
            }
            let budget = up.budget(now, deadline);
            tries += 1;
            let result = match batching {
                Some((b, settings)) => {
                    match timeout_at(budget.end, b.submit(model, request, settings, deadline)).await
                    {
                        Ok(r) => r,
                        Err(_) => Err(timed_out(now.elapsed())),
                    }
                }
                None => up
                    .call(model, request, budget)
                    .await
                    .map(|(completion, took)| Batched {
                        completion,
                        batch_size: 1,
                        queue_wait: Duration::ZERO,
                        upstream: took,
                    }),
            };
            let err = match result {
                Ok(b) => return Turn::Answered(b),
                Err(e)
                    if e.kind == FailureKind::Timeout
                        && budget.deadline_bound
                        && Instant::now() >= budget.end =>
                {
                    let msg = format!(
                        "caller's deadline passed after {} ms",
                        now.elapsed().as_millis()
                    );
                    return Turn::OutOfTime(Some(attempt(
                        ProviderError::new(FailureKind::Timeout, msg),
                        tries,
                    )));
                }
                Err(e) => e,
            };
            if err.retry_same_provider() && tries <= self.policy.max_retries_per_provider {
                let delay = backoff(self.policy.retry_delay, tries);
                if Instant::now() + delay + up.stats.fastest() < deadline {
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            return Turn::Failed(attempt(err, tries));
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
