//! Open circuits shared across the fleet. Every [`SHARE_EVERY`] one pipeline to Redis
//! publishes each circuit this router opened (a key that expires when its open time ends)
//! and reads back every circuit's key; a circuit closed here whose key another router set
//! opens for the key's time left. So a provider one router sees dead is skipped by the
//! others within [`SHARE_EVERY`] twice over, at one round trip per interval whatever the
//! traffic. Polling rather than pub/sub: a subscriber that misses a message while Redis is
//! away would miss the circuit; a key is found on the next read.

use std::{
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use crate::{metrics::FleetMetrics, store::Store};

/// How often circuits are published and read.
pub const SHARE_EVERY: Duration = Duration::from_millis(500);

/// A circuit breaker as the fleet sees it.
pub trait Shareable: Send + Sync {
    /// Time left open, when this router opened it itself (not on another's report).
    fn open_here(&self) -> Option<Duration>;
    /// Another router opened it for `left`: open it here too, if it is closed. Says
    /// whether it opened.
    fn opened_elsewhere(&self, left: Duration) -> bool;
}

/// The circuits to share, by key; entries whose breaker is gone are dropped.
#[derive(Default)]
pub struct Board {
    circuits: Mutex<Vec<(String, Weak<dyn Shareable>)>>,
}

impl Board {
    pub fn add(&self, key: String, circuit: Weak<dyn Shareable>) {
        self.lock().push((key, circuit));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Weak<dyn Shareable>)>> {
        self.circuits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn live(&self) -> Vec<(String, Arc<dyn Shareable>)> {
        let mut circuits = self.lock();
        circuits.retain(|(_, c)| c.strong_count() > 0);
        circuits
            .iter()
            .filter_map(|(k, c)| Some((k.clone(), c.upgrade()?)))
            .collect()
    }
}

/// Publishes and reads the board's circuits every [`SHARE_EVERY`] while it lives.
pub async fn share(store: Arc<Store>, board: Weak<Board>, metrics: FleetMetrics) {
    let mut tick = tokio::time::interval(SHARE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(board) = board.upgrade() else {
            return;
        };
        let circuits = board.live();
        drop(board);
        if circuits.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for (key, circuit) in &circuits {
            if let Some(left) = circuit.open_here() {
                let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
                pipe.cmd("SET").arg(key).arg(1).arg("PX").arg(ms).ignore();
            }
        }
        for (key, _) in &circuits {
            pipe.cmd("PTTL").arg(key);
        }
        let Some(left) = store
            .run("circuits", |mut c| async move {
                pipe.query_async::<Vec<i64>>(&mut c).await
            })
            .await
        else {
            continue;
        };
        for ((_, circuit), ms) in circuits.iter().zip(left) {
            if let Ok(ms @ 1..) = u64::try_from(ms)
                && circuit.opened_elsewhere(Duration::from_millis(ms))
            {
                metrics.circuit_reported();
            }
        }
    }
}
