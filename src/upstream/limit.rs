//! How many requests a provider is sent at once.
//!
//! Fixed: `max_concurrency`. Adaptive (with adaptive batching): learned from the provider's
//! answers in the manner of TCP Vegas and Netflix's concurrency-limits — grow while answers
//! come back about as fast as the provider has answered requests of that size before, shrink
//! when they slow down (it is queueing them) or when it answers 429 or 503 — with
//! `max_concurrency` as the ceiling.
//!
//! Hand-written: the crates that adapt a limit (tower-acc, tower-resilience-adaptive) compare
//! every answer with one baseline latency, but a batch of 32 prompts takes longer than a
//! batch of 1 without any queueing. Here an answer is judged against the fastest answers
//! seen per batch size (one bucket per size up to 16, then buckets an eighth apart), so only
//! queueing reads as congestion.
//!
//! The slots are a tokio semaphore (FIFO-fair and cancel-safe) whose permits follow the
//! limit: a rise adds permits; a fall forgets free ones, or takes busy ones back as they are
//! released.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, futures::Notified},
    time::Instant,
};

/// The limit an adaptive provider starts at (or its ceiling, if lower).
const INITIAL: usize = 4;
/// Requests estimated to be queued at the provider (Vegas' α and β): under `ALPHA` with
/// every slot busy, one more slot; over `BETA` (or an eighth of the limit, if more), down to
/// the parallelism the latencies imply. Tight, because a request waiting at a provider with
/// few slots costs a whole service time.
const ALPHA: f64 = 0.5;
const BETA: f64 = 1.0;
/// An answer more than this many times slower than expected for its size (plus [`SLACK`])
/// lowers the limit at once, without waiting for the round to end.
const SPIKE: f64 = 2.0;
/// Absolute slack, so sub-millisecond jitter is not read as queueing.
const SLACK: Duration = Duration::from_micros(500);
/// The limit falls to this fraction on a spike, and to [`BACKOFF_OVERLOAD`] on a 429 or
/// 503: at most once per round trip (answers to requests sent before the last fall do not
/// count again).
const BACKOFF_SPIKE: f64 = 0.9;
const BACKOFF_OVERLOAD: f64 = 0.5;
/// An answer slower than the fastest of its size but within one queued request of it moves
/// that fastest this fraction of the way up, so a provider that became slower for good
/// (other tenants, a smaller GPU) is relearned.
const BASELINE_DRIFT: f64 = 1.0 / 256.0;
const BUCKETS: usize = 64;
/// Requests waiting at the provider, beyond the answers' usual spread, that show the
/// parallelism lower than the requests sent: lower than Vegas' [`ALPHA`], since a size first
/// seen while queueing has a baseline that hides part of it, and two rounds running must show it.
const CROWDED: f64 = 0.3;
/// Calm rounds before batches are sized to more requests than the parallelism shown, and the
/// most that wait grows to while probes keep being taken back.
const PROBE_AFTER: u32 = 8;
const PROBE_AFTER_MAX: u32 = 128;
/// A round says the parallelism is too high only with at least this share of it in flight
/// (the rest may be between answer and resend).
const SIZED: f64 = 0.75;
/// Calm rounds after a fall before the figure from before it is tried again.
const RESTORE_AFTER: u32 = 2;

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
    /// carries none).
    carrying: AtomicUsize,
    /// Permits taken back from busy requests: forgotten when released instead of returned.
    owed: AtomicUsize,
    /// [`Limit::parallelism`], kept where taking a slot reads it without the policy's lock.
    parallel: AtomicUsize,
    /// Signalled as each slot is released.
    released: Notify,
    /// `None` for a fixed limit.
    adaptive: Option<Mutex<Gradient>>,
    ceiling: usize,
}

/// One concurrency slot, held while a request is in flight.
pub(super) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<Limit>,
    /// When it was taken, to ignore answers to requests sent before the limit last fell.
    taken: Instant,
    /// Prompts it carries (counted in [`Limit::items_in_flight`]).
    items: usize,
    /// Requests in flight beyond the parallelism as it was sent (its own included): requests
    /// the provider queues for want of a free slot, whatever its parallelism.
    beyond: usize,
}

impl Slot {
    /// Says how many prompts the request on this slot carries.
    pub(super) fn carry(&mut self, items: usize) {
        let limit = &self.limit;
        match (self.items, items) {
            (0, 1..) => {
                let sent = limit.carrying.fetch_add(1, Relaxed) + 1;
                self.beyond = sent.saturating_sub(limit.parallel.load(Relaxed));
            }
            (1.., 0) => {
                limit.carrying.fetch_sub(1, Relaxed);
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
        self.limit.released.notify_waiters();
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
            parallel: AtomicUsize::new(max),
            released: Notify::new(),
            adaptive: None,
            ceiling: max,
        })
    }

    pub(super) fn adaptive(ceiling: usize) -> Arc<Limit> {
        let start = INITIAL.min(ceiling).max(1);
        Arc::new(Limit {
            slots: Arc::new(Semaphore::new(start)),
            items: AtomicUsize::new(0),
            carrying: AtomicUsize::new(0),
            owed: AtomicUsize::new(0),
            parallel: AtomicUsize::new(start),
            released: Notify::new(),
            adaptive: Some(Mutex::new(Gradient::new(start, ceiling))),
            ceiling,
        })
    }

    /// Requests allowed in flight now.
    pub(super) fn current(&self) -> usize {
        match &self.adaptive {
            None => self.ceiling,
            Some(g) => g.lock().unwrap_or_else(PoisonError::into_inner).permits,
        }
    }

    fn slot(self: &Arc<Limit>, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            permit: Some(permit),
            limit: self.clone(),
            taken: Instant::now(),
            items: 0,
            beyond: 0,
        }
    }

    pub(super) fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// Requests the provider serves at once: the limit when fixed; when learned, what the
    /// provider showed (at most the limit).
    pub(super) fn parallelism(&self) -> usize {
        self.parallel.load(Relaxed)
    }

    /// Puts an adaptive limit past slow start at `permits` slots, `parallel` of them what the
    /// provider serves at once.
    #[cfg(test)]
    pub(super) fn settle(&self, permits: usize, parallel: usize) {
        let mut g = self
            .adaptive
            .as_ref()
            .expect("an adaptive limit")
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if permits > g.permits {
            self.slots.add_permits(permits - g.permits);
        } else {
            self.slots.forget_permits(g.permits - permits);
        }
        (g.permits, g.estimate, g.slow_start) = (permits, permits as f64, false);
        g.parallelism.value = parallel as f64;
        self.parallel.store(parallel, Relaxed);
    }

    /// Resolves at the next release of a slot after this call (whether polled yet or not).
    pub(super) fn released(&self) -> Notified<'_> {
        self.released.notified()
    }

    /// Requests in flight now (slots carrying prompts).
    pub(super) fn requests_in_flight(&self) -> usize {
        self.carrying.load(Relaxed)
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
        let saturated = self.slots.available_permits() == 0;
        let busy = self.carrying.load(Relaxed);
        let load = Load {
            busy,
            saturated,
            beyond: slot.beyond,
        };
        let (before, after) = {
            let mut g = g.lock().unwrap_or_else(PoisonError::into_inner);
            let before = g.permits;
            g.learn(slot.taken, load, verdict);
            let shown = (g.parallelism.value.round() as usize).clamp(1, g.permits);
            self.parallel.store(shown, Relaxed);
            (before, g.permits)
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

/// The adaptive policy, TCP Vegas' rule over rounds of `permits` answers to requests sent
/// since the limit last moved: each answer's time against the time expected for its size
/// gives the mean slowdown `r` of the round, and with `busy` requests in flight,
/// `busy × (1 − 1/r)` of them were waiting at the provider (Little's law). Few waiting and
/// every slot busy: one more slot (doubling, in slow start); too many: one less (slow start
/// ends on two such rounds running, down to `busy / r`, the parallelism the provider showed).
#[derive(Debug)]
struct Gradient {
    estimate: f64,
    permits: usize,
    parallelism: Parallelism,
    ceiling: usize,
    slow_start: bool,
    /// The last round of slow start was crowded.
    stalled: bool,
    /// Answers to requests sent before this do not lower the limit again.
    fell_at: Option<Instant>,
    /// When the limit last moved: a round counts only answers to requests sent since, so it
    /// judges the limit it is about (Vegas' alternate measuring and adjusting).
    moved_at: Option<Instant>,
    /// The fastest answer seen per size bucket: its prompts and its time.
    fastest: [Option<(usize, Duration)>; BUCKETS],
    round: Round,
}

/// Requests the provider serves at once, which batches are sized to (so the limit's headroom —
/// requests waiting at the provider to hide the round trip between answers — does not thin
/// them). Two crowded rounds running (more waiting at the provider than the answers' usual
/// spread explains) lower it to the requests sent over the slowdown, `(value + beyond) / r`,
/// and below the requests that crowded it; one alone may be a stall, a round with fewer in
/// flight than the figure's batches make says nothing of it, and after a fall the old figure
/// is tried again soon. A calm one only says it is no lower than what was sent,
/// and batches sized to a low figure never crowd the provider to show a higher one, so now
/// and then batches are sized to more requests (BBR's probing): kept if the provider stays
/// calm with more requests in flight, taken back if it crowds or if no more were sent (the
/// prompts split into as many requests as before) — and then tried less often, so a
/// provider at its true parallelism pays for few probes.
#[derive(Debug)]
struct Parallelism {
    value: f64,
    /// The slowdown of calm rounds, smoothed toward the calmer ones: the answers' usual
    /// spread above the fastest (timers, a shared machine), which is not queueing.
    noise: f64,
    /// Calm rounds since the last crowded one or probe.
    calm: u32,
    /// Calm rounds before the next probe: [`PROBE_AFTER`], doubled by each probe taken back
    /// (up to [`PROBE_AFTER_MAX`]), and back to [`PROBE_AFTER`] when crowding lowers the value.
    every: u32,
    /// Requests the next probe adds: doubled by each probe kept (a probe adds at most a
    /// quarter).
    step: f64,
    /// The value before the probe being judged.
    probing: Option<f64>,
    /// Requests in flight in the last calm round not judging a probe: a probe is judged only
    /// if it had more.
    busy: f64,
    /// What a crowded round showed, while it stands alone: one such round may be a stall
    /// (a shared machine, a collector); a second running acts.
    suspect: Option<f64>,
    /// The figure before the last fall, tried again ([`RESTORE_AFTER`]) as one probe until a
    /// probe is judged: two rounds can still be a longer stall or a burst of callers, and
    /// climbing back a quarter at a time takes most of a second.
    restore: Option<f64>,
}

impl Parallelism {
    fn new(start: usize) -> Parallelism {
        Parallelism {
            value: start as f64,
            noise: 1.0,
            calm: 0,
            every: PROBE_AFTER,
            step: 1.0,
            probing: None,
            busy: 0.0,
            suspect: None,
            restore: None,
        }
    }

    /// Lowers the value to `to`, remembering the old one to try again.
    fn lower(&mut self, to: f64) {
        if to < self.value {
            self.restore = Some(self.restore.unwrap_or(0.0).max(self.value));
            self.value = to;
        }
    }

    /// Learns from a round of answers with `busy` requests in flight on average, requests sent
    /// `beyond` the figure (on average) and mean slowdown `r`. True when the value moved for
    /// a probe (the next round judges it).
    fn round(&mut self, busy: f64, beyond: f64, r: f64) -> bool {
        let crowded = busy * (1.0 - self.noise / r) > CROWDED.max(busy / 16.0);
        if crowded && busy + beyond < self.value * SIZED {
            // Fewer in flight than batches sized to the figure make (fewer callers): slower
            // answers then are the machine's or the provider's own, not requests beyond what it
            // serves at once — the limit answers for those. Says nothing of the figure.
            return false;
        }
        if crowded {
            self.calm = 0;
            self.step = 1.0;
            // Batches were sized to `value` requests, and that many were in flight (more
            // than were in flight at each answer: some are between answer and resend), with
            // those sent beyond it (lone items on the limit's headroom, callers arriving in
            // a burst): the provider served `(value + beyond) / r` at once.
            let shown = ((self.value + beyond) * self.noise / r).min(self.value);
            if let Some(before) = self.probing.take() {
                self.every = (self.every * 2).min(PROBE_AFTER_MAX);
                self.value = before;
                self.restore = None;
            } else if let Some(first) = self.suspect.replace(shown) {
                // Crowded twice running: the provider serves fewer than sent. The milder of
                // the two figures, so a stall in one round does not take it lower; probes
                // come soon again, since the figure may now be below the truth.
                let fell = first.max(shown);
                if fell < self.value {
                    // Crowded with `value` requests sized: it serves fewer than that many.
                    self.lower(fell.min(self.value.round() - 1.0));
                }
                self.suspect = None;
                self.every = PROBE_AFTER;
            }
            return false;
        }
        self.suspect = None;
        // Quick to fall, slow to rise: rounds a little crowded (a request of headroom
        // waiting, a probe not quite caught) must not teach that crowding is the usual.
        self.noise += (r - self.noise) / if r < self.noise { 4.0 } else { 32.0 };
        if let Some(before) = self.probing.take() {
            if busy > self.busy + 0.5 && busy > before - 0.5 {
                self.step *= 2.0;
                self.every = PROBE_AFTER;
                self.restore = None;
            } else {
                // Batches sized to the probe came out as many as before (the callers'
                // prompts split no differently, or too few callers): it showed nothing and
                // cost nothing, so the next comes as soon.
                self.value = before;
            }
        }
        self.busy = busy;
        self.calm += 1;
        let restore = self.restore.filter(|_| self.calm >= RESTORE_AFTER);
        if self.calm < self.every && restore.is_none() {
            return false;
        }
        self.calm = 0;
        self.probing = Some(self.value);
        // At most a quarter more (BBR probes by a quarter), so a probe stays a small bet.
        self.value = restore
            .unwrap_or_else(|| self.value.round() + self.step.min((self.value / 4.0).ceil()));
        true
    }
}

/// What the limit held as an answer came.
#[derive(Clone, Copy, Debug)]
struct Load {
    /// Requests in flight (the answer's own included; a slot held while a batch gathers
    /// is not one).
    busy: usize,
    /// Whether every slot was held.
    saturated: bool,
    /// The answer's request was sent with this many requests in flight beyond the
    /// parallelism.
    beyond: usize,
}

/// The answers of the current round.
#[derive(Debug, Default)]
struct Round {
    answers: usize,
    slowdown: f64,
    saturated: usize,
    /// Requests in flight at each answer, summed.
    busy: usize,
    /// [`Load::beyond`], summed.
    beyond: usize,
}

/// The bucket for a request of `items` prompts.
fn bucket(items: usize) -> usize {
    if items <= 16 {
        return items.saturating_sub(1);
    }
    // Eighth-wide buckets above 16: log base 1.125 of items / 16.
    let steps = ((items as f64 / 16.0).ln() / 1.125f64.ln()) as usize;
    (16 + steps).min(BUCKETS - 1)
}

impl Gradient {
    fn new(start: usize, ceiling: usize) -> Gradient {
        Gradient {
            estimate: start as f64,
            permits: start,
            parallelism: Parallelism::new(start),
            ceiling,
            slow_start: true,
            stalled: false,
            fell_at: None,
            moved_at: None,
            fastest: [None; BUCKETS],
            round: Round::default(),
        }
    }

    /// How long an answer for `items` prompts takes when the provider is not queueing, from
    /// the fastest answers seen: no longer than any batch at least as big (a batch does not
    /// get cheaper by growing), and linear between two sizes. Taking the least of these means
    /// a size first seen while the provider was already queueing is still judged by the
    /// others. `None` before any answer of this size or bigger, or on both sides of it.
    fn expected(&self, items: usize) -> Option<f64> {
        let known = || {
            self.fastest
                .iter()
                .flatten()
                .map(|&(n, t)| (n, t.as_secs_f64()))
        };
        let mut best = f64::INFINITY;
        for (n, t) in known() {
            if n >= items {
                best = best.min(t);
            } else {
                for (m, u) in known().filter(|&(m, _)| m > items) {
                    let at = (items - n) as f64 / (m - n) as f64;
                    best = best.min(t + (u - t) * at);
                }
            }
        }
        best.is_finite().then_some(best)
    }

    fn learn(&mut self, sent: Instant, load: Load, verdict: Verdict) {
        match verdict {
            Verdict::Nothing => {}
            Verdict::Overloaded => self.fall(sent, BACKOFF_OVERLOAD),
            Verdict::Took(took, items) => self.took(sent, load, took, items),
        }
        self.estimate = self.estimate.clamp(1.0, self.ceiling as f64);
        let permits = (self.estimate.floor() as usize).clamp(1, self.ceiling);
        if permits != self.permits {
            self.permits = permits;
            self.moved_at = Some(Instant::now());
            self.round = Round::default();
        }
        // A limit lowered (a spike, a 429) takes the parallelism with it, to be tried again
        // once the limit has grown back.
        self.parallelism
            .lower(self.parallelism.value.min(self.permits as f64));
        self.parallelism.value = self.parallelism.value.max(1.0);
    }

    fn took(&mut self, sent: Instant, load: Load, took: Duration, items: usize) {
        let slack = SLACK.as_secs_f64();
        let slowdown = self
            .expected(items)
            .map_or(1.0, |e| (took.as_secs_f64() / (e + slack)).max(1.0));
        let fastest = &mut self.fastest[bucket(items)];
        match fastest {
            Some((_, t)) if took >= *t => {
                if slowdown <= 1.0 + 1.0 / self.permits as f64 {
                    *t += (took - *t).mul_f64(BASELINE_DRIFT);
                }
            }
            _ => *fastest = Some((items, took)),
        }
        if slowdown > SPIKE {
            self.fall(sent, BACKOFF_SPIKE);
        }
        if self.moved_at.is_some_and(|at| sent < at) {
            return;
        }
        let round = &mut self.round;
        round.answers += 1;
        round.slowdown += slowdown;
        round.saturated += usize::from(load.saturated);
        round.busy += load.busy;
        round.beyond += load.beyond;
        if round.answers < self.permits {
            return;
        }
        let round = std::mem::take(&mut self.round);
        let permits = self.permits as f64;
        let r = round.slowdown / round.answers as f64;
        let busy = round.busy as f64 / round.answers as f64;
        let beyond = round.beyond as f64 / round.answers as f64;
        let waiting = busy * (1.0 - 1.0 / r);
        let crowded = waiting > BETA.max(permits / 8.0);
        if self.slow_start && crowded && !self.stalled {
            // In slow start one crowded round may be a stall (a burst of callers arriving, a
            // shared machine), and ending it early costs many rounds of growing by one: the
            // next round decides.
            self.stalled = true;
            tracing::debug!(permits, busy, slowdown = r, "slow start: a crowded round");
            return;
        }
        self.stalled = false;
        if self.slow_start {
            self.parallelism.value = permits / r;
        } else if self.parallelism.round(busy, beyond, r) {
            // A probe past the limit takes the limit with it, keeping a request of headroom:
            // batches sized to the limit itself would hold every slot and leave none spare.
            self.estimate = self.estimate.max(self.parallelism.value + 1.0);
            self.moved_at = Some(Instant::now());
        }
        if crowded {
            if self.slow_start {
                self.estimate = (busy / r).min(self.estimate - 1.0);
                // The end of slow start: a first figure, not a fall from a known one.
                let p = &mut self.parallelism;
                p.value = p.value.min(self.estimate.floor()).max(1.0);
            } else {
                self.estimate -= 1.0;
            }
            self.slow_start = false;
        } else if waiting < ALPHA && round.saturated * 2 >= round.answers {
            self.estimate += if self.slow_start { permits } else { 1.0 };
        }
        tracing::debug!(
            permits,
            busy,
            beyond,
            slowdown = r,
            noise = self.parallelism.noise,
            waiting,
            parallelism = self.parallelism.value,
            estimate = self.estimate,
            saturated = round.saturated,
            "concurrency round"
        );
    }

    fn fall(&mut self, sent: Instant, factor: f64) {
        if self.fell_at.is_some_and(|at| sent <= at) {
            return;
        }
        self.slow_start = false;
        self.estimate *= factor;
        self.fell_at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Takes `n` slots at once (all that `limit` gives, when fewer).
    fn take(limit: &Arc<Limit>, n: usize) -> Vec<Slot> {
        (0..n).filter_map(|_| limit.try_acquire()).collect()
    }

    /// `answers` answers of `took` for `items` prompts each, with `demand` callers: each
    /// answered slot is released and the free capacity taken up again, as waiting callers do.
    fn serve(limit: &Arc<Limit>, demand: usize, answers: usize, took: Duration, items: usize) {
        let sent = |n| {
            take(limit, n).into_iter().map(|mut s| {
                s.carry(items);
                s
            })
        };
        let mut held: VecDeque<Slot> = sent(demand).collect();
        for _ in 0..answers {
            let Some(s) = held.pop_front() else { break };
            limit.observe(&s, Verdict::Took(took, items));
            drop(s);
            held.extend(sent(demand - held.len()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_while_saturated_and_latency_stays_flat() {
        let limit = Limit::adaptive(64);
        assert_eq!(limit.current(), INITIAL);
        serve(&limit, 1000, 4, 20 * MS, 1);
        assert_eq!(limit.current(), 8, "slow start: one more per good answer");
        serve(&limit, 1000, 200, 20 * MS, 1);
        assert_eq!(limit.current(), 64, "up to the ceiling, no further");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsaturated_limit_does_not_grow() {
        let limit = Limit::adaptive(64);
        serve(&limit, 3, 100, 20 * MS, 1);
        assert_eq!(
            limit.current(),
            INITIAL,
            "three callers never fill four slots"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn falls_to_the_parallelism_the_latencies_show() {
        let limit = Limit::adaptive(64);
        serve(&limit, 1000, 12, 20 * MS, 1);
        assert_eq!(limit.current(), 16, "slow start: 4, 8, 16");
        // A round of 16 answers, each 40 ms where 20 was enough: about half of them waited
        // at the provider, which serves about 8 at a time — or it stalled once.
        serve(&limit, 1000, 16, 40 * MS, 1);
        assert_eq!(limit.current(), 16, "one crowded round may be a stall");
        serve(&limit, 1000, 16, 40 * MS, 1);
        assert_eq!(limit.current(), 8, "twice: 16 / (40 / 21)");
        assert_eq!(take(&limit, 64).len(), 8, "the semaphore follows");
    }

    #[tokio::test(start_paused = true)]
    async fn parallelism_is_what_the_provider_showed_not_the_headroom() {
        let limit = Limit::adaptive(64);
        serve(&limit, 1000, 12, 20 * MS, 1);
        assert_eq!(
            (limit.current(), limit.parallelism()),
            (16, 8),
            "slow start: the last full round had 8 served at once"
        );
        serve(&limit, 1000, 32, 40 * MS, 1);
        assert_eq!((limit.current(), limit.parallelism()), (8, 8));
        // Answers an eighth slower than expected: under one of eight waiting at the
        // provider — headroom the limit keeps — so the limit holds while the parallelism
        // the batches are sized to falls below it.
        serve(&limit, 10, 24, 23 * MS, 1);
        assert_eq!(limit.current(), 8);
        assert!(limit.parallelism() < 8, "{}", limit.parallelism());
    }

    #[tokio::test(start_paused = true)]
    async fn a_spike_lowers_it_at_once_but_once_per_round_trip() {
        let limit = Limit::adaptive(64);
        serve(&limit, 1000, 12, 20 * MS, 1);
        let slots = take(&limit, 64);
        assert_eq!(slots.len(), 16);
        tokio::time::advance(MS).await;
        for s in &slots[..8] {
            limit.observe(s, Verdict::Took(100 * MS, 1));
        }
        assert_eq!(
            limit.current(),
            14,
            "16 × 0.9, once for the eight sent together"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn halves_on_overload_and_takes_back_busy_slots_as_they_return() {
        let limit = Limit::adaptive(64);
        serve(&limit, 1000, 4, 20 * MS, 1);
        let busy = take(&limit, 64);
        assert_eq!(busy.len(), 8);
        tokio::time::advance(MS).await;
        limit.observe(&busy[0], Verdict::Overloaded);
        assert_eq!(limit.current(), 4);
        drop(busy);
        assert_eq!(
            take(&limit, 64).len(),
            4,
            "four of the eight were forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_fall_it_moves_by_one_per_round_judged_on_requests_sent_since() {
        let limit = Limit::adaptive(64);
        serve(&limit, 1000, 4, 20 * MS, 1);
        let early = take(&limit, 64);
        assert_eq!(early.len(), 8);
        tokio::time::advance(MS).await;
        limit.observe(&early[0], Verdict::Took(60 * MS, 1));
        assert_eq!(limit.current(), 7, "a spike: 8 × 0.9");
        // The other answers to requests sent before the fall, slow as they are, were sent
        // under the old limit: they say nothing of this one.
        for s in &early[1..] {
            limit.observe(s, Verdict::Took(35 * MS, 1));
        }
        assert_eq!(limit.current(), 7);
        drop(early);
        serve(&limit, 1000, 7, 20 * MS, 1);
        assert_eq!(
            limit.current(),
            8,
            "a clean round with every slot busy: one more"
        );
        serve(&limit, 1000, 8, 30 * MS, 1);
        assert_eq!(
            limit.current(),
            7,
            "a crowded round past slow start: one less, not down to 8 / (30 / 20.5)"
        );
    }

    #[test]
    fn two_crowded_rounds_show_the_parallelism_a_calm_one_only_bounds_it() {
        let mut p = Parallelism::new(12);
        assert!(!p.round(5.0, 0.0, 1.0));
        assert_eq!(
            p.value, 12.0,
            "five served unqueued says nothing against twelve"
        );
        p.round(10.0, 0.0, 1.25);
        assert_eq!(p.value, 12.0, "one crowded round may be a stall");
        p.round(10.0, 0.0, 1.3);
        assert_eq!(
            p.value,
            12.0 / 1.25,
            "twice: batches sized to twelve requests, a quarter (then 30%) slower"
        );
    }

    #[test]
    fn requests_sent_beyond_the_figure_explain_the_crowding_they_cause() {
        let mut p = Parallelism::new(8);
        // A burst of callers: lone items took the limit's headroom, three requests on
        // average beyond the eight, and the answers came 3/8 slower — the provider still
        // served eight at once.
        p.round(9.0, 3.0, 11.0 / 8.0);
        p.round(9.0, 3.0, 11.0 / 8.0);
        assert_eq!(p.value, 8.0);
        // One beyond and a quarter slower: 9 / 1.25 = 7.2 served at once, and batches sized
        // to eight requests crowded it: seven.
        p.round(9.0, 1.0, 1.25);
        p.round(9.0, 1.0, 1.25);
        assert_eq!(p.value, 7.0);
        // Seven sized and a third slower: 7 / 1.33 = 5.25 served at once.
        p.round(7.0, 0.0, 4.0 / 3.0);
        p.round(7.0, 0.0, 4.0 / 3.0);
        assert_eq!(p.value, 5.25);
    }

    #[test]
    fn after_a_fall_the_old_figure_is_tried_again_soon_and_kept_if_calm() {
        let mut p = Parallelism::new(16);
        p.round(16.0, 0.0, 2.0);
        p.round(16.0, 0.0, 2.0);
        assert_eq!(p.value, 8.0, "a stall of two rounds");
        assert!(!p.round(8.0, 0.0, 1.0));
        assert!(p.round(8.0, 0.0, 1.0), "two calm rounds: the probe");
        assert_eq!(p.value, 16.0, "straight back to the figure before the fall");
        assert!(!p.round(15.0, 0.0, 1.0));
        assert_eq!(p.value, 16.0, "more in flight and calm: kept");
        // A fall the provider means: the figure tried again crowds it, and stays down.
        p.round(16.0, 0.0, 1.6);
        p.round(16.0, 0.0, 1.6);
        assert_eq!(p.value, 10.0);
        p.round(10.0, 0.0, 1.0);
        assert!(p.round(10.0, 0.0, 1.0));
        assert_eq!(p.value, 16.0);
        assert!(!p.round(16.0, 0.0, 1.6));
        assert_eq!(p.value, 10.0, "taken back");
        assert!(
            (0..PROBE_AFTER - 1).all(|_| !p.round(10.0, 0.0, 1.0)),
            "and not tried again"
        );
    }

    #[test]
    fn slower_answers_with_few_in_flight_say_nothing_of_the_figure() {
        let mut p = Parallelism::new(16);
        for _ in 0..4 {
            p.round(6.0, 0.0, 1.2);
        }
        assert_eq!(
            p.value, 16.0,
            "six in flight where batches are sized to sixteen, 20% slower: not its slots"
        );
        p.round(14.0, 0.0, 1.2);
        p.round(14.0, 0.0, 1.2);
        assert_eq!(p.value, 16.0 / 1.2, "fourteen in flight, twice");
    }

    #[test]
    fn a_stall_between_calm_rounds_is_not_crowding() {
        let mut p = Parallelism::new(8);
        for _ in 0..3 {
            p.round(8.0, 0.0, 2.0);
            assert_eq!(p.value, 8.0, "twice as slow, once");
            p.round(8.0, 0.0, 1.0);
        }
        assert_eq!(p.value, 8.0);
    }

    #[test]
    fn the_answers_usual_spread_is_not_crowding() {
        let mut p = Parallelism::new(16);
        // Sixteen in flight, answers 5% above the fastest every round (timers, a busy
        // machine): under one waiting in sixteen, learned (slowly) as the spread. (Probes
        // in between, sized to no more requests, are taken back.)
        for _ in 0..39 {
            p.round(16.0, 0.0, 1.05);
        }
        assert_eq!(p.value, 16.0);
        assert!(p.noise > 1.03, "{}", p.noise);
        // Then a quarter slower than that, twice: crowded, judged against the spread.
        let spread = p.noise;
        p.round(16.0, 0.0, 1.05 * 1.25);
        p.round(16.0, 0.0, 1.05 * 1.25);
        let shown = 16.0 * spread / (1.05 * 1.25);
        assert!((p.value - shown).abs() < 1e-9, "{} vs {shown}", p.value);
        assert!(shown > 12.5 && shown < 12.8, "about 16 / 1.25: {shown}");
    }

    #[test]
    fn probes_are_kept_while_calm_taken_back_when_crowded_and_then_tried_less_often() {
        let mut p = Parallelism::new(8);
        // Calm rounds (as many in flight as the figure) until one moves it for a probe.
        let calm_until_probe = |p: &mut Parallelism| {
            (1..=1000)
                .find(|_| p.round(p.value.round(), 0.0, 1.0))
                .expect("a probe")
        };
        assert_eq!(calm_until_probe(&mut p), PROBE_AFTER);
        assert_eq!(p.value, 9.0, "one more request");
        assert_eq!(
            calm_until_probe(&mut p),
            PROBE_AFTER,
            "kept; the next tries two"
        );
        assert_eq!(p.value, 11.0);
        // Eleven in flight and answers 11/9 slower: the provider serves nine.
        assert!(!p.round(11.0, 0.0, 11.0 / 9.0));
        assert_eq!(p.value, 9.0, "taken back");
        assert_eq!(
            calm_until_probe(&mut p),
            2 * PROBE_AFTER,
            "then tried half as often"
        );
        assert_eq!(p.value, 10.0, "one more again");
        // Ten in flight is crowded; then two rounds show seven: a figure that fell may be
        // below the truth, so the one before is tried again soon, then probes come as often
        // as at first.
        p.round(10.0, 0.0, 10.0 / 9.0);
        p.round(9.0, 0.0, 9.0 / 7.0);
        p.round(9.0, 0.0, 9.0 / 7.0);
        assert!((p.value - 7.0).abs() < 1e-9, "{}", p.value);
        assert_eq!(calm_until_probe(&mut p), RESTORE_AFTER);
        assert_eq!(p.value, 9.0);
        p.round(9.0, 0.0, 9.0 / 7.0);
        assert!((p.value - 7.0).abs() < 1e-9, "{}", p.value);
        assert_eq!(calm_until_probe(&mut p), 2 * PROBE_AFTER);
    }

    #[tokio::test(start_paused = true)]
    async fn bigger_batches_taking_longer_is_not_congestion() {
        let limit = Limit::adaptive(64);
        // 20 ms + 1 ms per prompt, no queueing: sizes 1, 8, 32 each against its own baseline.
        for round in 0..30 {
            let items = [1, 8, 32][round % 3];
            serve(&limit, 1000, 8, (20 + items as u32) * MS, items);
        }
        assert_eq!(limit.current(), 64, "never fell");
    }

    #[tokio::test(start_paused = true)]
    async fn a_size_first_seen_while_queueing_is_judged_by_the_others() {
        let limit = Limit::adaptive(64);
        // Clean answers: 8 prompts in 28 ms, 16 in 36 ms.
        serve(&limit, 1000, 2, 28 * MS, 8);
        serve(&limit, 1000, 2, 36 * MS, 16);
        assert_eq!(limit.current(), 8);
        // Then a round of batches of 4, never seen before, at 48 ms: queued behind others (a
        // batch of 8 takes 28 ms), although 48 ms is all this size has ever taken.
        serve(&limit, 1000, 16, 48 * MS, 4);
        assert_eq!(limit.current(), 4, "8 / (48 / 29), two rounds running");
    }

    #[test]
    fn expected_latency_is_bounded_by_bigger_sizes_and_linear_between() {
        let mut g = Gradient::new(4, 64);
        assert_eq!(g.expected(4), None);
        g.fastest[bucket(1)] = Some((1, 21 * MS));
        g.fastest[bucket(8)] = Some((8, 28 * MS));
        g.fastest[bucket(4)] = Some((4, 48 * MS));
        let ms = |n| (g.expected(n).unwrap() * 1e3 * 1e3).round() / 1e3;
        assert_eq!(ms(4), 24.0, "between 1 and 8, not its own 48");
        assert_eq!(ms(1), 21.0);
        assert_eq!(ms(8), 28.0);
        assert_eq!(g.expected(9), None, "nothing this big or bigger");
    }

    #[test]
    fn buckets_are_exact_to_16_then_an_eighth_apart() {
        assert_eq!((bucket(1), bucket(16), bucket(17)), (0, 15, 16));
        assert_eq!(bucket(19), 17);
        assert!(bucket(4096) < BUCKETS);
        assert!((17..=4096).all(|n| bucket(n) >= bucket(n - 1)), "monotone");
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_never_moves() {
        let limit = Limit::fixed(3);
        let slots = take(&limit, 10);
        assert_eq!(slots.len(), 3);
        limit.observe(&slots[0], Verdict::Overloaded);
        assert_eq!(limit.current(), 3);
    }
}
