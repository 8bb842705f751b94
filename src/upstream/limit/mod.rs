//! How many requests a provider is sent at once.
//!
//! Fixed: `max_concurrency`. Adaptive (with adaptive batching): learned from the provider's
//! answers by TCP Vegas' rule on the size-normalised slowdown (`adaptive`), judged against
//! the provider's unqueued time per request size (`baseline`) and the mean requests in flight
//! (`flow`), with `max_concurrency` as the ceiling.
//!
//! Hand-written: the crates that adapt a limit (tower-acc, tower-resilience-adaptive) compare
//! every answer with one baseline latency, but a batch of 32 prompts takes longer than a
//! batch of 1 without any queueing; here an answer is judged against the fastest answers
//! seen for its size, so only queueing reads as congestion.
//!
//! The slots are a tokio semaphore (FIFO-fair and cancel-safe) whose permits follow the
//! limit: a rise adds permits; a fall forgets free ones, or takes busy ones back as they are
//! released.

mod adaptive;
mod baseline;
mod flow;

use adaptive::Vegas;
use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// The limit an adaptive provider starts at (or its ceiling, if lower).
const INITIAL: usize = 4;

/// What an answer says about the provider's load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Verdict {
    /// Answered (or failed on its own account) in this time, for this many prompts.
    Took(Duration, usize),
    /// 429, 503, or the provider's own timeout: it is overloaded.
    Overloaded,
    /// Says nothing about load (a refused prompt, a caller gone).
    Nothing,
}

pub(super) struct Limit {
    slots: Arc<Semaphore>,
    /// Prompts carried by the requests holding slots now.
    items: AtomicUsize,
    /// Slots carrying prompts now: requests in flight (a slot held while a batch gathers
    /// carries none), read without a lock. The adaptive policy keeps its own count under its
    /// lock, where a move must see exactly the requests sent before it ([`Vegas::flowed`]).
    carrying: AtomicUsize,
    /// Permits taken back from busy requests: forgotten when released instead of returned.
    owed: AtomicUsize,
    /// The limit now, read without the policy's lock.
    permits: AtomicUsize,
    /// `None` for a fixed limit.
    adaptive: Option<Mutex<Vegas>>,
}

/// One concurrency slot, held while a request is in flight.
pub(super) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<Limit>,
    /// When its request was sent (taken, until then), to tell answers to requests sent before
    /// those in flight at the limit's last move had all ended.
    sent: Instant,
    /// How many times the limit had moved when it was sent: whether it was in flight at the
    /// last move, even when the two share an instant (the paused clock's answers often do).
    moves: u64,
    /// Prompts it carries (counted in [`Limit::items_in_flight`]).
    items: usize,
    /// Sent with several prompts, nothing left waiting, slots free: more slots would have
    /// split them (see [`Slot::sent_together`]).
    split: bool,
}

impl Slot {
    /// Nothing is left waiting after its request: notes whether its prompts went together
    /// with slots free — the callers' prompts going as pairs (say 8 over 7 slots) where as
    /// many requests would fit, unless the provider has fewer slots, which a probe shows.
    pub(super) fn sent_together(&mut self) {
        self.split = self.items > 1 && self.limit.in_flight() < self.limit.current();
    }

    /// Says how many prompts the request on this slot carries.
    pub(super) fn carry(&mut self, items: usize) {
        let limit = &self.limit;
        match (self.items, items) {
            (0, 1..) => {
                self.sent = Instant::now();
                limit.carrying.fetch_add(1, Relaxed);
                self.moves = limit.flowed(None);
            }
            (1.., 0) => {
                limit.carrying.fetch_sub(1, Relaxed);
                limit.flowed(Some(self.moves));
            }
            _ => {}
        }
        let counted = &self.limit.items;
        if items > self.items {
            counted.fetch_add(items - self.items, Relaxed);
        } else {
            counted.fetch_sub(self.items - items, Relaxed);
        }
        self.items = items;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.carry(0);
        if let Some(p) = self.permit.take() {
            let owed = &self.limit.owed;
            if owed
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                p.forget();
            }
        }
    }
}

impl Limit {
    pub(super) fn fixed(max: usize) -> Arc<Limit> {
        Arc::new(Limit {
            slots: Arc::new(Semaphore::new(max)),
            items: AtomicUsize::new(0),
            carrying: AtomicUsize::new(0),
            owed: AtomicUsize::new(0),
            permits: AtomicUsize::new(max),
            adaptive: None,
        })
    }

    pub(super) fn adaptive(ceiling: usize) -> Arc<Limit> {
        let start = INITIAL.min(ceiling).max(1);
        Arc::new(Limit {
            slots: Arc::new(Semaphore::new(start)),
            items: AtomicUsize::new(0),
            carrying: AtomicUsize::new(0),
            owed: AtomicUsize::new(0),
            permits: AtomicUsize::new(start),
            adaptive: Some(Mutex::new(Vegas::new(start, ceiling))),
        })
    }

    /// Requests allowed in flight now.
    pub(super) fn current(&self) -> usize {
        self.permits.load(Relaxed)
    }

    fn slot(self: &Arc<Limit>, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            permit: Some(permit),
            limit: self.clone(),
            sent: Instant::now(),
            moves: 0,
            items: 0,
            split: false,
        }
    }

    /// Requests in flight now.
    pub(super) fn in_flight(&self) -> usize {
        self.carrying.load(Relaxed)
    }

    pub(super) fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// Puts an adaptive limit past slow start at `permits` slots.
    #[cfg(test)]
    pub(super) fn settle(&self, permits: usize) {
        let mut g = self
            .adaptive
            .as_ref()
            .expect("an adaptive limit")
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if permits > g.permits() {
            self.slots.add_permits(permits - g.permits());
        } else {
            self.slots.forget_permits(g.permits() - permits);
        }
        g.settle(permits);
        self.permits.store(permits, Relaxed);
    }

    /// Tells the adaptive policy a request was sent (`None`) or ended (how many times the limit
    /// had moved when it was sent). Returns how many times it has moved.
    fn flowed(&self, ended: Option<u64>) -> u64 {
        self.adaptive.as_ref().map_or(0, |g| {
            g.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .flowed(ended)
        })
    }

    /// Prompts carried by requests in flight now.
    pub(super) fn items_in_flight(&self) -> usize {
        self.items.load(Relaxed)
    }

    /// A free slot now, if there is one.
    pub(super) fn try_acquire(self: &Arc<Limit>) -> Option<Slot> {
        let p = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.slot(p))
    }

    /// Waits for a slot, in arrival order. `None` once the semaphore is closed.
    pub(super) async fn acquire(self: &Arc<Limit>) -> Option<Slot> {
        let p = self.slots.clone().acquire_owned().await.ok()?;
        Some(self.slot(p))
    }

    /// Learns from one answer to a request sent on `slot` (still held). A good answer says
    /// the limit is too low only when every slot is taken: waiting requests take a freed
    /// permit at once, so none is free while demand exceeds the limit.
    pub(super) fn observe(&self, slot: &Slot, verdict: Verdict) {
        let Some(g) = &self.adaptive else { return };
        let (before, after) = {
            let mut g = g.lock().unwrap_or_else(PoisonError::into_inner);
            let before = g.permits();
            g.learn(
                (slot.sent, slot.moves),
                verdict,
                self.items.load(Relaxed),
                slot.split,
            );
            self.permits.store(g.permits(), Relaxed);
            (before, g.permits())
        };
        if after > before {
            // Settle what is owed first, then add.
            let mut add = after - before;
            while add > 0
                && self
                    .owed
                    .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                add -= 1;
            }
            self.slots.add_permits(add);
        } else if before > after {
            let drop = before - after;
            let forgotten = self.slots.forget_permits(drop);
            self.owed.fetch_add(drop - forgotten, Relaxed);
        }
    }
}
