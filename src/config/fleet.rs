//! `fleet:` — routers that share provider limits, client quotas and open circuits through
//! one Redis (see [`crate::fleet`]).

use std::{num::NonZeroU32, time::Duration};

use super::{Check, ConfigError, RedisConfig, raw::RawFleet};

/// How the routers of a fleet share state.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    /// Routers that share the limits: each keeps 1/N of a limit while Redis is away.
    pub routers: NonZeroU32,
    /// Where the shared state lives.
    pub redis: RedisConfig,
}

impl Check<'_> {
    /// The fleet's Redis is `fleet.redis_url`, else the cache's; `None` when neither names
    /// one (every limit is this router's alone).
    pub(super) fn fleet(
        &mut self,
        f: Option<RawFleet>,
        cache_redis: Option<&RedisConfig>,
    ) -> Result<Option<FleetConfig>, ConfigError> {
        let named = f.is_some();
        let f = f.unwrap_or_default();
        let routers = NonZeroU32::new(f.routers).ok_or_else(|| {
            self.err(
                "fleet.routers",
                "must be at least 1",
                "give how many routers share the limits, e.g. 3",
            )
        })?;
        let redis = match f.redis_url {
            Some(url) => RedisConfig {
                url: self.redis_url("fleet.redis_url", url)?,
                timeout: self.seconds(
                    "fleet.redis_timeout_ms",
                    f.redis_timeout_ms / 1000.0,
                    false,
                )?,
            },
            None => match cache_redis {
                Some(r) => r.clone(),
                None if named => {
                    return Err(self.err(
                        "fleet",
                        "names no Redis to share limits through",
                        "give fleet.redis_url, or use cache.backend: redis",
                    ));
                }
                None => return Ok(None),
            },
        };
        if !named {
            self.warn(
                "limits are shared through the cache's Redis; with no `fleet.routers`, each \
                 router keeps the whole of a limit while Redis is away",
            );
        }
        Ok(Some(FleetConfig {
            routers,
            redis: RedisConfig {
                timeout: redis.timeout.min(Duration::from_secs(1)),
                ..redis
            },
        }))
    }

    /// A `redis://` URL the client can open, or an error at `key`.
    pub(super) fn redis_url(&self, key: &str, url: String) -> Result<String, ConfigError> {
        // The same parse `serve` does, so `check` refuses what `serve` would.
        if !(url.starts_with("redis://") || url.starts_with("rediss://"))
            || redis::Client::open(url.as_str()).is_err()
        {
            return Err(self.err(
                key,
                format!("{url:?} is not a redis:// URL"),
                "use redis://HOST:PORT[/DB]",
            ));
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError, parse};

    const PROVIDER: &str = "providers:\n  - {name: s, type: simulated, models: [m]}\n";

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        parse(&format!("{yaml}\n{PROVIDER}"), "f.yaml", &|_| None)
    }

    #[test]
    fn a_fleet_names_its_redis_or_takes_the_caches() {
        let own = load("fleet: {routers: 3, redis_url: \"redis://127.0.0.1:7000\"}").unwrap();
        let f = own.fleet.unwrap();
        assert_eq!(
            (f.routers.get(), f.redis.url.as_str()),
            (3, "redis://127.0.0.1:7000")
        );
        let cached =
            load("cache: {backend: redis, redis_url: \"redis://127.0.0.1:7001\"}").unwrap();
        assert_eq!(cached.fleet.unwrap().redis.url, "redis://127.0.0.1:7001");
        assert!(
            cached.warnings.iter().any(|w| w.contains("fleet.routers")),
            "{:?}",
            cached.warnings
        );
        assert!(
            load("").unwrap().fleet.is_none(),
            "no Redis: limits are local"
        );
    }

    #[test]
    fn a_fleet_without_a_redis_or_routers_is_refused_by_key() {
        let e = |yaml: &str| load(yaml).unwrap_err().to_string();
        assert!(e("fleet: {routers: 2}").starts_with("f.yaml: fleet: names no Redis"));
        assert!(
            e("fleet: {routers: 0, redis_url: \"redis://h:1\"}")
                .starts_with("f.yaml: fleet.routers: must be at least 1")
        );
        assert!(
            e("fleet: {redis_url: \"http://h:1\"}")
                .starts_with("f.yaml: fleet.redis_url: \"http://h:1\" is not a redis:// URL")
        );
    }
}
