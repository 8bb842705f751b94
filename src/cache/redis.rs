//! The cache's shared second level in the [`crate::store`]: a failure is a miss, and writes
//! leave the request path — they run in tasks of their own, at most [`MAX_WRITES`] at once
//! (a write beyond that is dropped and counted).

use std::{sync::Arc, time::Duration};

use tokio::sync::Semaphore;

use super::{CacheKey, Entry};
use crate::{config::RedisConfig, metrics::RedisMetrics, store::Store};

/// Writes to Redis in flight at most.
pub const MAX_WRITES: usize = 256;

pub struct Redis {
    store: Arc<Store>,
    max_value_bytes: usize,
    writes: Arc<Semaphore>,
}

impl Redis {
    pub fn new(
        config: &RedisConfig,
        max_value_bytes: usize,
        metrics: RedisMetrics,
    ) -> Result<Redis, redis::RedisError> {
        Ok(Redis {
            store: Store::new(config, metrics, "the cache serves from memory alone")?,
            max_value_bytes,
            writes: Arc::new(Semaphore::new(MAX_WRITES)),
        })
    }

    /// The entry under `key`, or `None`: absent, Redis failing, or Redis being skipped.
    pub async fn get(&self, key: &CacheKey) -> Option<Entry> {
        let key = key.redis_key();
        let found: Option<Vec<u8>> = self
            .store
            .run("GET", |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await
            .flatten();
        found.and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }

    /// Stores `entry` under `key` for `ttl`, in a task of its own: the caller does not wait.
    pub fn put(&self, key: &CacheKey, entry: &Entry, ttl: Duration) {
        if !self.store.up() {
            self.store.metrics().skipped();
            return;
        }
        let Ok(value) = serde_json::to_vec(entry) else {
            return;
        };
        if value.len() > self.max_value_bytes {
            return;
        }
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            self.store.metrics().skipped();
            return;
        };
        let (store, key) = (self.store.clone(), key.redis_key());
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        tokio::spawn(async move {
            let _permit = permit;
            let _: Option<()> = store
                .run("SET", |mut c| async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(ms)
                        .query_async(&mut c)
                        .await
                })
                .await;
        });
    }
}
