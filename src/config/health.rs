//! `providers[].health_check` — active probes of a provider, with Envoy's semantics.

use std::time::Duration;

use super::{Check, ConfigError, raw::RawHealthCheck};

/// How a provider is probed: a GET every `interval` (the API's cheap endpoint, or `path`),
/// failed after `timeout`; `unhealthy_after` failures in a row take it out of rotation and
/// `healthy_after` successes in a row bring it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    pub path: Option<String>,
}

impl Check<'_> {
    pub(super) fn health_check(
        &self,
        at: &str,
        raw: &RawHealthCheck,
    ) -> Result<HealthCheckConfig, ConfigError> {
        let interval = self.seconds(
            &format!("{at}.interval_seconds"),
            raw.interval_seconds,
            false,
        )?;
        let timeout = self.seconds(&format!("{at}.timeout_ms"), raw.timeout_ms / 1000.0, false)?;
        if timeout > interval {
            return Err(self.err(
                format!("{at}.timeout_ms"),
                format!("{} ms is longer than the interval", raw.timeout_ms),
                "make the probe's timeout at most its interval",
            ));
        }
        for (key, n) in [
            ("unhealthy_after", raw.unhealthy_after),
            ("healthy_after", raw.healthy_after),
        ] {
            if n == 0 {
                return Err(self.err(
                    format!("{at}.{key}"),
                    "must be at least 1",
                    "give how many probes in a row decide (Envoy's default: 3 and 2)",
                ));
            }
        }
        if let Some(path) = &raw.path
            && !path.starts_with('/')
        {
            return Err(self.err(
                format!("{at}.path"),
                format!("{path:?} does not start with /"),
                "give a path on the provider's server, e.g. /health",
            ));
        }
        Ok(HealthCheckConfig {
            interval,
            timeout,
            unhealthy_after: raw.unhealthy_after,
            healthy_after: raw.healthy_after,
            path: raw.path.clone(),
        })
    }
}
