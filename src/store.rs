//! The store the routers of a fleet share — Redis, for the cache's second level and the
//! fleet's limits and circuits — kept a guest rather than a dependency:
//!
//! - every operation is bounded by the configured timeout, and any failure is `None` to the
//!   caller, who carries on without Redis;
//! - after [`TRIP_AFTER`] failures running, Redis is skipped — operations return `None` at
//!   once — and a background task probes it (`PING`) every [`PROBE_EVERY`] until it answers,
//!   so no caller pays for finding out; the trip and the recovery are logged once each and
//!   shown in the user's `redis_up` gauge.
//!
//! A breaker of its own rather than the providers' (`upstream::breaker`): that one counts
//! requests a caller waits on and is probed by a caller; this one is probed by nobody's call.

use std::{
    future::Future,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU32, Ordering::Relaxed},
    },
    time::Duration,
};

use redis::aio::ConnectionManager;
use tokio::{sync::OnceCell, time::timeout};

use crate::{config::RedisConfig, metrics::RedisMetrics};

/// Failures running after which Redis is skipped.
pub const TRIP_AFTER: u32 = 3;
/// How often a skipped Redis is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

pub struct Store {
    client: redis::Client,
    config: RedisConfig,
    /// What the user of this store does while Redis is skipped, for the log line.
    meanwhile: &'static str,
    /// Connected on first use (tried again on the next use while that fails); once up, the
    /// manager reconnects on its own. Uses after that take no lock: the manager is `Clone`.
    conn: OnceCell<ConnectionManager>,
    failures: AtomicU32,
    skipped: AtomicBool,
    metrics: RedisMetrics,
}

impl Store {
    /// A store at `config.url`, connected on first use. `meanwhile` ends the log line said
    /// when Redis starts being skipped ("the cache serves from memory alone …").
    pub fn new(
        config: &RedisConfig,
        metrics: RedisMetrics,
        meanwhile: &'static str,
    ) -> Result<Arc<Store>, redis::RedisError> {
        metrics.up(true);
        Ok(Arc::new(Store {
            client: redis::Client::open(config.url.as_str())?,
            config: config.clone(),
            meanwhile,
            conn: OnceCell::new(),
            failures: AtomicU32::new(0),
            skipped: AtomicBool::new(false),
            metrics,
        }))
    }

    /// Whether Redis is in use (not being skipped).
    pub fn up(&self) -> bool {
        !self.skipped.load(Relaxed)
    }

    pub fn metrics(&self) -> &RedisMetrics {
        &self.metrics
    }

    /// Runs `op` on a connection within the timeout: `None` when Redis is skipped, cannot be
    /// reached, fails or is late (counted toward skipping it).
    pub async fn run<T, F, Fut>(self: &Arc<Self>, what: &'static str, op: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.up() {
            self.metrics.skipped();
            return None;
        }
        let Some(conn) = self.connection().await else {
            self.failed("connect");
            return None;
        };
        match timeout(self.config.timeout, op(conn)).await {
            Ok(Ok(v)) => {
                self.failures.store(0, Relaxed);
                Some(v)
            }
            Ok(Err(_)) => {
                self.failed(what);
                None
            }
            Err(_) => {
                self.failed(what);
                None
            }
        }
    }

    async fn connection(&self) -> Option<ConnectionManager> {
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

    /// Counts a failure; the [`TRIP_AFTER`]th running starts skipping Redis and probing it.
    fn failed(self: &Arc<Self>, what: &str) {
        self.metrics.failed();
        tracing::debug!(what, "redis failed");
        if self.failures.fetch_add(1, Relaxed) + 1 < TRIP_AFTER || self.skipped.swap(true, Relaxed)
        {
            return;
        }
        self.metrics.up(false);
        tracing::warn!(
            url = %self.config.url_without_password(),
            "redis failed {TRIP_AFTER} times running; {} until it answers again",
            self.meanwhile,
        );
        tokio::spawn(probe(Arc::downgrade(self)));
    }
}

/// PINGs every [`PROBE_EVERY`] until Redis answers, then stops skipping it; ends early when
/// the store is gone (a reload replaced its user).
async fn probe(store: Weak<Store>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let Some(mut conn) = store.connection().await else {
            continue;
        };
        let pong: Result<Result<String, _>, _> = timeout(
            store.config.timeout,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await;
        if matches!(pong, Ok(Ok(_))) {
            store.failures.store(0, Relaxed);
            store.skipped.store(false, Relaxed);
            store.metrics.up(true);
            tracing::info!(
                url = %store.config.url_without_password(),
                "redis answers again; sharing through it again"
            );
            return;
        }
    }
}
