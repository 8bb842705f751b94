//! The shared second level, kept a guest rather than a dependency:
//!
//! - every operation is bounded by `cache.redis_timeout_ms`, and any failure is a miss;
//! - after [`TRIP_AFTER`] failures running, Redis is skipped — reads miss at once, writes are
//!   dropped — and a background task probes it (`PING`) every [`PROBE_EVERY`] until it answers,
//!   so no caller pays for finding out; the trip and the recovery are logged once each and
//!   shown in `cascade_cache_redis_up`;
//! - writes leave the request path: they run in tasks of their own, at most [`MAX_WRITES`] at
//!   once (a write beyond that is dropped and counted).
//!
//! A breaker of its own rather than the providers' (`upstream::breaker`): that one counts
//! requests a caller waits on and is probed by a caller; this one is probed by nobody's call.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    sync::{OnceCell, Semaphore},
    time::timeout,
};

use super::{CacheKey, Entry};
use crate::{config::RedisConfig, metrics::CacheMetrics};

/// Failures running after which Redis is skipped.
pub const TRIP_AFTER: u32 = 3;
/// How often a skipped Redis is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Writes to Redis in flight at most.
pub const MAX_WRITES: usize = 256;

pub struct Redis {
    client: redis::Client,
    config: RedisConfig,
    /// Connected on first use (tried again on the next use while that fails); once up, the
    /// manager reconnects on its own. Reads after that take no lock: the manager is `Clone`.
    conn: OnceCell<redis::aio::ConnectionManager>,
    health: Arc<Health>,
    writes: Arc<Semaphore>,
}

/// Whether Redis is being skipped, and the failures that led there.
struct Health {
    failures: AtomicU32,
    skipped: AtomicBool,
    metrics: CacheMetrics,
}

impl Redis {
    pub fn new(config: &RedisConfig, metrics: CacheMetrics) -> Result<Redis, redis::RedisError> {
        metrics.redis_up(true);
        Ok(Redis {
            client: redis::Client::open(config.url.as_str())?,
            config: config.clone(),
            conn: OnceCell::new(),
            health: Arc::new(Health {
                failures: AtomicU32::new(0),
                skipped: AtomicBool::new(false),
                metrics,
            }),
            writes: Arc::new(Semaphore::new(MAX_WRITES)),
        })
    }

    async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        let connect = || async {
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.config.timeout))
                .set_response_timeout(Some(self.config.timeout))
                .set_number_of_retries(1);
            match timeout(
                self.config.timeout,
                self.client.get_connection_manager_with_config(cfg),
            )
            .await
            {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(_)) | Err(_) => Err(()),
            }
        };
        self.conn.get_or_try_init(connect).await.ok().cloned()
    }

    /// The entry under `key`, or `None`: absent, Redis failing, or Redis being skipped.
    pub async fn get(self: &Arc<Self>, key: &CacheKey) -> Option<Entry> {
        if self.health.skipped.load(Relaxed) {
            self.health.metrics.redis_skipped();
            return None;
        }
        let Some(mut conn) = self.connection().await else {
            self.failed("connect");
            return None;
        };
        let got: Result<Result<Option<Vec<u8>>, _>, _> = timeout(
            self.config.timeout,
            redis::cmd("GET")
                .arg(key.redis_key())
                .query_async(&mut conn),
        )
        .await;
        match got {
            Ok(Ok(found)) => {
                self.health.failures.store(0, Relaxed);
                found.and_then(|bytes| serde_json::from_slice(&bytes).ok())
            }
            Ok(Err(_)) => {
                self.failed("GET");
                None
            }
            Err(_) => {
                self.failed("GET timed out");
                None
            }
        }
    }

    /// Stores `entry` under `key` for `ttl`, in a task of its own: the caller does not wait.
    pub fn put(self: &Arc<Self>, key: &CacheKey, entry: &Entry, ttl: Duration) {
        if self.health.skipped.load(Relaxed) {
            self.health.metrics.redis_skipped();
            return;
        }
        let Ok(value) = serde_json::to_vec(entry) else {
            return;
        };
        if value.len() > self.config.max_value_bytes {
            return;
        }
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            self.health.metrics.redis_skipped();
            return;
        };
        let (redis, key) = (self.clone(), key.redis_key());
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        tokio::spawn(async move {
            let _permit = permit;
            let Some(mut conn) = redis.connection().await else {
                redis.failed("connect");
                return;
            };
            let set: Result<Result<(), _>, _> = timeout(
                redis.config.timeout,
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut conn),
            )
            .await;
            match set {
                Ok(Ok(())) => redis.health.failures.store(0, Relaxed),
                _ => redis.failed("SET"),
            }
        });
    }

    /// Counts a failure; the [`TRIP_AFTER`]th running starts skipping Redis and probing it.
    fn failed(self: &Arc<Self>, what: &str) {
        let h = &self.health;
        h.metrics.redis_failed();
        tracing::debug!(what, "redis failed; treating it as a miss");
        if h.failures.fetch_add(1, Relaxed) + 1 < TRIP_AFTER || h.skipped.swap(true, Relaxed) {
            return;
        }
        h.metrics.redis_up(false);
        tracing::warn!(
            url = %self.config.url_without_password(),
            "redis failed {TRIP_AFTER} times running; the cache serves from memory alone until it answers again"
        );
        tokio::spawn(probe(Arc::downgrade(self)));
    }
}

/// PINGs every [`PROBE_EVERY`] until Redis answers, then stops skipping it; ends early when
/// the cache it serves is gone (a reload replaced it).
async fn probe(redis: std::sync::Weak<Redis>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(redis) = redis.upgrade() else {
            return;
        };
        let Some(mut conn) = redis.connection().await else {
            continue;
        };
        let pong: Result<Result<String, _>, _> = timeout(
            redis.config.timeout,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await;
        if matches!(pong, Ok(Ok(_))) {
            let h = &redis.health;
            h.failures.store(0, Relaxed);
            h.skipped.store(false, Relaxed);
            h.metrics.redis_up(true);
            tracing::info!(
                url = %redis.config.url_without_password(),
                "redis answers again; the cache is shared again"
            );
            return;
        }
    }
}
