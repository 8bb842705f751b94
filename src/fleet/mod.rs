//! A fleet: several routers that share provider limits and open circuits through one Redis
//! (`fleet:` in the cascade file, or the cache's Redis), so that three routers let through
//! a provider's limit once, not three times, and a provider one router sees dead is skipped
//! by the others within a second.
//!
//! - limits: [`limit`], a GCRA bucket in Redis ([`Fleet::limit`], [`Fleet::quota`]) that
//!   [`crate::rate`] asks, each router falling back to 1/`routers` of a limit while Redis is
//!   away;
//! - circuits: [`circuits`] publishes the circuits this router opened, and opens here those
//!   another router published.
//!
//! Redis is a guest ([`Store`]): when it is away every router carries on alone, says so in
//! `cascade_fleet_redis_up` and the log, and shares again when it is back.

mod circuits;
mod limit;

use std::{
    num::NonZeroU32,
    sync::{Arc, Weak},
};

pub use circuits::Shareable;
pub use limit::{Shared, Verdict};

use crate::{config::FleetConfig, metrics::FleetMetrics, store::Store};

pub struct Fleet {
    store: Arc<Store>,
    routers: u32,
    metrics: FleetMetrics,
    circuits: Arc<circuits::Board>,
}

impl Fleet {
    /// The fleet of `config`; its circuits are shared by a task that lives as long as it.
    pub fn new(
        config: &FleetConfig,
        metrics: FleetMetrics,
    ) -> Result<Arc<Fleet>, redis::RedisError> {
        let store = Store::new(
            &config.redis,
            metrics.redis().clone(),
            "limits are decided on this router's share and circuits are not shared",
        )?;
        let circuits = Arc::new(circuits::Board::default());
        tokio::spawn(circuits::share(
            store.clone(),
            Arc::downgrade(&circuits),
            metrics.clone(),
        ));
        Ok(Arc::new(Fleet {
            store,
            routers: config.routers.get(),
            metrics,
            circuits,
        }))
    }

    /// The fleet's Redis (budgets and the spend ledger are kept there too).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Routers in the fleet, as the cascade file says.
    pub fn routers(&self) -> u32 {
        self.routers
    }

    /// This router's share of a limit's `v` (rate or burst) while Redis is away: 1/`routers`
    /// of it, at least 1.
    pub fn share(&self, v: NonZeroU32) -> NonZeroU32 {
        NonZeroU32::new(v.get() / self.routers).unwrap_or(NonZeroU32::MIN)
    }

    /// A limit of `per_minute` with `burst`, shared under `key`.
    pub fn limit(&self, key: String, per_minute: u32, burst: u32) -> Shared {
        Shared::new(
            self.store.clone(),
            key,
            per_minute,
            burst,
            self.routers,
            self.metrics.clone(),
        )
    }

    /// Shares the circuit of `provider`'s endpoint at `url` while `circuit` lives.
    pub fn share_circuit(&self, provider: &str, url: &str, circuit: Weak<dyn Shareable>) {
        let id = blake3::hash(url.as_bytes()).to_hex();
        self.circuits
            .add(format!("cascade:circuit:{provider}:{}", &id[..16]), circuit);
    }
}
