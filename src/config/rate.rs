//! `providers[].rate_limit` — a provider's own quota (requests and tokens per minute).

use std::num::NonZeroU32;

use super::{Check, ConfigError, raw::RawRateLimit};

/// A provider's quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub requests_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
    /// Requests that may go back to back.
    pub burst: NonZeroU32,
}

impl Check<'_> {
    pub(super) fn rate_limit(
        &self,
        at: &str,
        r: &RawRateLimit,
    ) -> Result<RateLimitConfig, ConfigError> {
        let positive = |key: &str, v: Option<u32>| match v {
            None => Ok(None),
            Some(n) => NonZeroU32::new(n).map(Some).ok_or_else(|| {
                self.err(
                    format!("{at}.{key}"),
                    "must be at least 1",
                    "leave it out for no limit, or give a count per minute",
                )
            }),
        };
        let rpm = positive("requests_per_minute", r.requests_per_minute)?;
        let tpm = positive("tokens_per_minute", r.tokens_per_minute)?;
        if rpm.is_none() && tpm.is_none() {
            return Err(self.err(
                at,
                "sets no limit",
                "give requests_per_minute, tokens_per_minute or both",
            ));
        }
        let burst = match positive("burst", r.burst)? {
            Some(b) => b,
            None => ten_seconds_of(rpm),
        };
        Ok(RateLimitConfig {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            burst,
        })
    }
}

/// A burst of ten seconds' worth of a per-minute rate (at least 1).
pub(super) fn ten_seconds_of(per_minute: Option<NonZeroU32>) -> NonZeroU32 {
    per_minute
        .and_then(|n| NonZeroU32::new(n.get() / 6))
        .unwrap_or(NonZeroU32::MIN)
}
