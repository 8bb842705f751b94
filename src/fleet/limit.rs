//! A limit the routers of a fleet share: a GCRA bucket in Redis, decided by one Lua script on
//! Redis's own clock (so the routers' clocks never disagree), with a small local lease in
//! front so that a busy router needs no round trip for most requests.
//!
//! - **The decision.** The script keeps the bucket's theoretical arrival time (TAT). With
//!   room now, it grants up to the lease asked for; without, it books the cells at the time
//!   room comes — the caller waits that long and sends — unless that is past the caller's
//!   latest send, and then it says when room comes. Booking rather than retrying keeps the
//!   fleet's waiters in one FIFO with one round trip each, whatever their number.
//! - **The lease.** A router asks for what the limit allows in [`LEASE_OF`] (at most half its
//!   share of the burst, at least one cell) and spends the rest locally within
//!   [`LEASE_LAPSE`]; cells left then lapse unused. Leased cells are counted in Redis when
//!   leased, so the fleet never sends more than the bucket allows over a run; the lease only
//!   shifts when they go: the provider may see each router's lease (at 20 requests/s, one
//!   cell — every request decides in Redis; at 6,000 a minute, ten) early within a window.
//! - **Redis away** (the [`Store`] skips it): the caller decides on this router's share of
//!   the limit, 1/`fleet.routers` of its rate and burst, counted in
//!   `cascade_fleet_local_decisions_total`.

use std::{
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::{metrics::FleetMetrics, store::Store};

/// A lease is what the limit allows in this long.
pub const LEASE_OF: Duration = Duration::from_millis(100);
/// Leased cells not spent within this long lapse.
pub const LEASE_LAPSE: Duration = Duration::from_millis(250);

/// ARGV: cell interval (µs), burst (cells), cells needed, cells wanted (a lease), the most
/// the caller may wait (µs; negative: charge the cells whatever the room). Returns
/// `{granted, wait_us}`: granted 0 means no room within the wait, and `wait_us` is when.
static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local need, want, max_wait = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local room = math.floor((now + burst * interval - tat) / interval)
local granted, wait = need, 0
if room >= need then
  granted = math.min(want, room)
elseif max_wait >= 0 then
  wait = tat + need * interval - burst * interval - now
  if wait > max_wait then return {0, wait} end
end
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
return {granted, wait}
",
    )
});

/// What the fleet's bucket said.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The cells are taken: send after this wait (zero when there was room).
    Go(Duration),
    /// No room by the caller's latest send: room comes in this long.
    Full(Duration),
}

/// One limit of the fleet, kept in Redis under `key`.
pub struct Shared {
    store: Arc<Store>,
    key: String,
    interval_us: u64,
    burst: u32,
    lease: u32,
    /// Leased cells not yet spent, and when they lapse. A std mutex: never held across await.
    held: Mutex<(u32, Instant)>,
    metrics: FleetMetrics,
}

impl Shared {
    /// `per_minute` cells a minute with `burst` back to back, shared by `routers` routers.
    pub fn new(
        store: Arc<Store>,
        key: String,
        per_minute: u32,
        burst: u32,
        routers: u32,
        metrics: FleetMetrics,
    ) -> Shared {
        let per_minute = per_minute.max(1);
        let in_lease = u64::from(per_minute) * LEASE_OF.as_millis() as u64 / 60_000;
        let share = burst / routers.max(1) / 2;
        Shared {
            store,
            key,
            interval_us: 60_000_000 / u64::from(per_minute),
            burst,
            lease: u32::try_from(in_lease)
                .unwrap_or(u32::MAX)
                .min(share)
                .max(1),
            held: Mutex::new((0, Instant::now())),
            metrics,
        }
    }

    /// Takes `cells`, booking them no later than `until`; `None` when Redis did not answer
    /// (the caller decides on its local share).
    pub async fn take(&self, cells: u32, until: Instant) -> Option<Verdict> {
        let now = Instant::now();
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if held.1 > now && held.0 >= cells {
                held.0 -= cells;
                return Some(Verdict::Go(Duration::ZERO));
            }
        }
        let max_wait = micros(until.saturating_duration_since(now));
        let Some((granted, wait)) = self.run(cells, self.lease.max(cells), max_wait).await else {
            self.metrics.decided_locally();
            return None;
        };
        let wait = Duration::from_micros(wait);
        if granted == 0 {
            return Some(Verdict::Full(wait));
        }
        if granted > cells {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            *held = (granted - cells, Instant::now() + LEASE_LAPSE);
        }
        Some(Verdict::Go(wait))
    }

    /// Charges `cells` whatever the room (tokens an answer used beyond its estimate), in a
    /// task of its own.
    pub fn charge(self: &Arc<Self>, cells: u32) {
        let me = self.clone();
        tokio::spawn(async move { me.run(cells, cells, -1).await });
    }

    async fn run(&self, need: u32, want: u32, max_wait: i64) -> Option<(u32, u64)> {
        let key = self.key.as_str();
        let (interval, burst) = (self.interval_us, self.burst);
        self.store
            .run("rate limit", |mut c| async move {
                SCRIPT
                    .key(key)
                    .arg(interval)
                    .arg(burst)
                    .arg(need)
                    .arg(want)
                    .arg(max_wait)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
