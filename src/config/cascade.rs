//! `cascade:` — how the cascade walks its providers, and each provider's circuit breaker.

use std::time::Duration;

use super::{Check, ConfigError, raw::RawCascade};

/// How the cascade walks its providers.
#[derive(Clone, Debug)]
pub struct CascadePolicy {
    pub attempt_timeout: Duration,
    pub max_retries_per_provider: u32,
    pub retry_delay: Duration,
    pub breaker: BreakerConfig,
    pub retry_budget: RetryBudget,
}

/// Retries on the same provider allowed: `ratio` of the requests of the last `ttl`, plus
/// `min_per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    pub ratio: f32,
    pub min_per_second: u32,
    pub ttl: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub recovery_timeout: Duration,
    pub half_open_max_calls: u32,
}

impl Check<'_> {
    pub(super) fn cascade(&self, c: RawCascade) -> Result<CascadePolicy, ConfigError> {
        let attempt_timeout = self.seconds("cascade.timeout_seconds", c.timeout_seconds, false)?;
        let retry_delay =
            self.seconds("cascade.retry_delay_seconds", c.retry_delay_seconds, true)?;
        if c.max_retries_per_provider > 10 {
            return Err(self.err(
                "cascade.max_retries_per_provider",
                format!("{} is more than 10", c.max_retries_per_provider),
                "use 0 to 10; the cascade moves on to the next provider after that",
            ));
        }
        let b = c.circuit_breaker;
        if b.failure_threshold == 0 {
            return Err(self.err(
                "cascade.circuit_breaker.failure_threshold",
                "must be at least 1",
                "set a count of consecutive failures, e.g. 5",
            ));
        }
        if b.half_open_max_calls == 0 {
            return Err(self.err(
                "cascade.circuit_breaker.half_open_max_calls",
                "must be at least 1",
                "set how many probes a half-open circuit lets through, e.g. 1",
            ));
        }
        let recovery_timeout = self.seconds(
            "cascade.circuit_breaker.recovery_timeout",
            b.recovery_timeout,
            false,
        )?;
        let rb = c.retry_budget;
        if !(0.0..=1000.0).contains(&rb.ratio) {
            return Err(self.err(
                "cascade.retry_budget.ratio",
                format!("{} is out of range", rb.ratio),
                "use a fraction of recent requests, e.g. 0.2 for 20%",
            ));
        }
        let ttl = self.seconds("cascade.retry_budget.ttl_seconds", rb.ttl_seconds, false)?;
        if !(1.0..=60.0).contains(&rb.ttl_seconds) {
            return Err(self.err(
                "cascade.retry_budget.ttl_seconds",
                format!("{} is out of range", rb.ttl_seconds),
                "use 1 to 60 seconds",
            ));
        }
        Ok(CascadePolicy {
            retry_budget: RetryBudget {
                ratio: rb.ratio,
                min_per_second: rb.min_per_second,
                ttl,
            },
            attempt_timeout,
            max_retries_per_provider: c.max_retries_per_provider,
            retry_delay,
            breaker: BreakerConfig {
                failure_threshold: b.failure_threshold,
                recovery_timeout,
                half_open_max_calls: b.half_open_max_calls,
            },
        })
    }
}
