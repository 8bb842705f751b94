//! `cache:` — the completion cache and its optional Redis level.

use std::time::Duration;

use super::{
    Check, ConfigError,
    raw::{RawBackend, RawCache},
};

/// The completion cache.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub max_bytes: u64,
    pub scope: CacheScope,
    /// Redis behind the in-memory cache, shared by every replica.
    pub redis: Option<RedisConfig>,
    /// Completions larger than this are not written to Redis.
    pub max_redis_value_bytes: usize,
}

/// Who may reuse a cached completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Entries are keyed by the caller (`agent`): one tenant never sees another's answers.
    #[default]
    Tenant,
    /// Every caller shares entries.
    Shared,
}

#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    pub timeout: Duration,
}

// The URL may carry a password: Debug shows it without.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url_without_password())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisConfig {
    /// The URL as logs may show it: without a password.
    pub fn url_without_password(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            }
            Err(_) => "(unparsable URL)".into(),
        }
    }
}

impl Check<'_> {
    /// `None` when the section turns the cache off.
    pub(super) fn cache(&self, c: RawCache) -> Result<Option<CacheConfig>, ConfigError> {
        if !c.enabled {
            return Ok(None);
        }
        let ttl = self.seconds("cache.ttl_seconds", c.ttl_seconds, false)?;
        if c.max_bytes < 1024 {
            return Err(self.err(
                "cache.max_bytes",
                format!("{} is too small", c.max_bytes),
                "give the cache at least 1024 bytes, e.g. 67108864 (64 MiB)",
            ));
        }
        let redis = match c.backend {
            RawBackend::Memory => None,
            RawBackend::Redis => {
                let url = self.redis_url("cache.redis_url", c.redis_url)?;
                let timeout =
                    self.seconds("cache.redis_timeout_ms", c.redis_timeout_ms / 1000.0, false)?;
                Some(RedisConfig { url, timeout })
            }
        };
        Ok(Some(CacheConfig {
            ttl,
            max_bytes: c.max_bytes,
            scope: c.scope,
            redis,
            max_redis_value_bytes: c.max_value_bytes,
        }))
    }
}
