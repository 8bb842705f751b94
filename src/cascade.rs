//! The ordered fallback loop: each target in turn, with retries and backoff on transient
//! faults, until one answers or the caller's deadline passes. Each try is the upstream's
//! ([`Upstream::attempt`]: breaker, budget, batch queue); failures are collected per provider
//! and end as one aggregate error.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    completion::{Answer, Attempt, CompletionRequest, FailureKind},
    config::CascadePolicy,
    error::RouterError,
    provider::ProviderError,
    upstream::{Delivered, Miss, Upstream},
};

/// One place a request can go: a provider and the model to ask it for.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub model: Arc<str>,
}

impl PartialEq for Target {
    /// The same provider (by identity) and the same model.
    fn eq(&self, other: &Target) -> bool {
        Arc::ptr_eq(&self.upstream, &other.upstream) && self.model == other.model
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.upstream.name(), self.model)
    }
}

pub struct Cascade {
    policy: CascadePolicy,
}

/// How one provider's turn ended.
enum Turn {
    Answered(Delivered),
    Failed(Attempt),
    /// The caller's deadline passed; `Some` when a try was cut short by it.
    OutOfTime(Option<Attempt>),
}

impl Cascade {
    pub fn new(policy: CascadePolicy) -> Cascade {
        Cascade { policy }
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
            match self.turn(target, request, deadline).await {
                Turn::Answered(d) => {
                    return Ok(Answer {
                        completion: d.completion,
                        provider: target.upstream.name().clone(),
                        model: target.model.clone(),
                        attempts,
                        queue_wait: d.queue_wait,
                        upstream: d.upstream,
                        batch_size: d.batch_size,
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
            return Err(RouterError::Overloaded { attempts });
        }
        Err(RouterError::Unavailable {
            reason: "every provider failed",
            attempts,
        })
    }

    /// One provider's turn: up to `1 + max_retries` tries.
    async fn turn(
        &self,
        target: &Target,
        request: &Arc<CompletionRequest>,
        deadline: Instant,
    ) -> Turn {
        let up = &target.upstream;
        let began = Instant::now();
        let attempt = |e: ProviderError, tries| Attempt {
            provider: up.name().clone(),
            model: target.model.clone(),
            kind: e.kind,
            http_status: e.http_status,
            error: e.message,
            tries,
            elapsed: began.elapsed(),
        };
        let mut tries = 0u32;
        loop {
            let err = match up.attempt(&target.model, request, deadline).await {
                Ok(d) => return Turn::Answered(d),
                Err(Miss::Skipped(e)) => return Turn::Failed(attempt(e, tries)),
                Err(Miss::OutOfTime(e)) => {
                    return Turn::OutOfTime(e.map(|e| attempt(e, tries + 1)));
                }
                Err(Miss::Failed(e)) => e,
            };
            tries += 1;
            if err.retry_same_provider() && tries <= self.policy.max_retries_per_provider {
                let delay = backoff(self.policy.retry_delay, tries);
                if up.fits(Instant::now() + delay, deadline) {
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
