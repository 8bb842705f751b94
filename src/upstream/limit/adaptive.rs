//! The learned limit: TCP Vegas' rule on the size-normalised slowdown.
//!
//! Every answer's time is divided by the time the provider takes for a request of that size
//! when it is not queueing ([`Baseline`]), so a batch of 32 taking longer than a batch of 1 is
//! not read as congestion. Over a round of answers (at least [`ROUND`], and at least the
//! limit), the slowdown `r` (each answer's time over the time expected for its size, over its
//! usual level `noise`) and the mean requests in flight `busy` give, by Little's
//! law, `busy × (1 − 1/r)` requests waiting at the provider. Then:
//!
//! - more than [`BETA`] waiting: the provider serves fewer than were sent, so the limit falls to
//!   what it showed it serves, `busy / r` (a probe that crowded it is taken back) — unless the
//!   queue is harmless: a request's fixed cost (the part of its time that does not grow with
//!   its prompts, from the fastest times of the largest sizes) is at most [`HARMLESS`] of its
//!   time, so merging the waiting requests into fewer would save the provider next to nothing
//!   (llama-server's slots take prompts, not requests). Then the limit stays, and climbs no
//!   further: taking a probe back there only left one cohort of callers waiting in the router
//!   for the other's request to end (the simulator's llama-server p99, 2.5 s against 1.75 s);
//! - the first crowded round ends slow start, and the limit starts again from one request: the
//!   sizes slow start sent may all have queued (every request waiting alike looks like no wait
//!   at all), so it stays at one — where nothing queues — until it has seen the usual slowdown
//!   (one answer of a trusted size; [`ROUND`] when answers vary by more than `1/ROUND`), then
//!   doubles a round back to half the limit that crowded it (TCP's slow-start threshold);
//! - otherwise, with every slot taken at some moment of the round, or more prompts in flight
//!   than slots (more slots would split them into more requests): in slow start the limit
//!   doubles; after it, one more slot is tried (a probe), at once after a probe was kept, and
//!   after twice as many calm rounds as last time after one was taken back (at most
//!   [`PROBE_AFTER_MAX`]), so a provider at its true limit pays for few probes;
//! - a 429 or 503 (or the provider's own timeout) halves it ([`BACKOFF`]), at most once per
//!   round trip.
//!
//! The limit aims at no queue at all — Vegas with α = 0 — because batches are sized over it:
//! a request waiting at the provider holds prompts that could have ridden in a request being
//! served. `noise` is the slowdown of rounds without queueing (answers vary; the fastest is
//! the floor): set by rounds with at most one request in flight at any moment, where no queue
//! can form; learned only from sizes seen [`ROUND`] times or more (a size new to the router
//! has a fastest time near its usual one, and would teach a slowdown too low, against which
//! every other size reads as queued); calm rounds lower it quickly and raise it a quarter as
//! fast (the fastest of each size falls as more answers are seen, but queueing must not be
//! learned as the usual). An answer of a size larger than any seen has nothing to be judged
//! by and is left out of its round. A round counts only answers to requests sent after those
//! in flight when the limit last moved have ended (a request sent just after a fall still
//! queues behind them), and `busy` is the mean in flight while any were: a round that spans
//! a pause in the load is not read as a light one.
//!
//! Answers that vary widely (±50% at random) make a round's mean vary by chance, so `r` is
//! taken less [`SURE`] standard errors of it, from `spread`: how much answers vary in rounds
//! without queueing (learned as `noise` is). Known weakness (issue #28's note): with such
//! answers one request waiting cannot be told from chance, so the limit settles one above the
//! provider's slots (0.89–0.92 of the best fixed setting at 64 callers in the simulator).
//!
//! Tuning constants (eleven in all): [`ROUND`], [`BETA`], [`PROBE_AFTER_MAX`], [`BACKOFF`],
//! [`DRIFT`], [`NOISE_GAIN`], [`SURE`], [`HARMLESS`], [`BUCKETS`]; `INITIAL` in the parent
//! module; `ARRIVAL_GAP` in the adaptive batch worker. Judged on `upstream::simulator` —
//! fresh routers and the wall-clock protocol's long-lived ones — before any wall-clock run.

use super::*;

#[cfg(test)]
mod tests;

/// Answers a round takes at least (and at least the limit's worth), so one slow answer among
/// few does not move the limit.
pub(super) const ROUND: usize = 8;
/// Requests waiting at the provider, on a round's mean, above which it is crowded.
pub(super) const BETA: f64 = 0.5;
/// The most calm rounds between probes.
pub(super) const PROBE_AFTER_MAX: u32 = 32;
/// The limit falls to this fraction on a 429 or 503.
pub(super) const BACKOFF: f64 = 0.5;
/// An answer within one queued request of the fastest time of its size moves that time this
/// fraction of the way up to it, so a provider that became a little slower for good is
/// relearned (one much slower lowers the limit to one request, where `noise` learns it).
pub(super) const DRIFT: f64 = 1.0 / 256.0;
/// How far a calm round moves the usual slowdown (`noise`) down toward its own (up: a quarter
/// of that).
pub(super) const NOISE_GAIN: f64 = 1.0 / 8.0;

/// Standard errors of a round's mean slowdown that are read as chance, not queueing.
pub(super) const SURE: f64 = 2.0;

/// A queue at the provider is harmless when a request's fixed cost (the part of its time that
/// does not grow with its prompts) is at most this share of a request's time: merging the
/// waiting requests' prompts into fewer would save the provider at most that. A third, as the
/// estimate comes from fastest times, which jitter skews: the simulated llama-server's true
/// 2 ms of 0.86 s reads as 0.12–0.24 s while few answers are in (a quarter took a probe back
/// there once, and the cohorts it split raised the p99 1.38×).
pub(super) const HARMLESS: f64 = 1.0 / 3.0;

pub(super) const BUCKETS: usize = 64;

#[derive(Debug)]
pub(super) struct Vegas {
    limit: usize,
    ceiling: usize,
    /// Slow start: the limit doubles each round while below this (the ceiling until a round
    /// is first crowded, then half the limit that crowded it; 0 once it is over).
    slow_until: usize,
    baseline: Baseline,
    /// The slowdown of rounds without queueing: the answers' own spread over the fastest.
    noise: f64,
    /// How much answers vary in rounds without queueing: their standard deviation over their
    /// mean.
    spread: f64,
    round: Round,
    flow: Flow,
    /// When the limit last moved, the requests sent before that still in flight, and when the
    /// last of them ended: a round counts only answers to requests sent after that, so it judges
    /// the limit it is about (a request sent just after a fall still queues behind those sent
    /// before it).
    moved_at: Option<Instant>,
    before_move: usize,
    settled_at: Option<Instant>,
    /// Answers to requests sent before this do not halve the limit again.
    fell_at: Option<Instant>,
    /// Calm rounds with every slot taken since the last probe, and how many the next needs.
    calm: u32,
    probe_after: u32,
    probing: bool,
}

#[derive(Debug, Default)]
struct Round {
    answers: usize,
    /// Each answer's time over the time expected for its size, summed, and its squares summed
    /// (for the spread of the round's mean).
    slowdown: f64,
    squares: f64,
    /// Answers that came with more prompts in flight than slots.
    shared: usize,
    /// Prompts the answers carried.
    items: usize,
    /// The slowdowns of answers whose size's fastest time is trusted (seen [`ROUND`] times),
    /// summed, and how many: what `noise` learns from.
    trusted: f64,
    trusted_answers: usize,
    /// When it began (its first answer), and [`Flow::area`] then.
    since: Option<(Instant, Area)>,
}

impl Round {
    /// The answers' standard deviation over their mean.
    fn spread(&self) -> f64 {
        let n = self.answers as f64;
        let mean = self.slowdown / n;
        if self.answers > 1 {
            ((self.squares - n * mean * mean).max(0.0) / (n - 1.0)).sqrt() / mean
        } else {
            0.0
        }
    }

    /// Whether its answers show the usual slowdown: one of a trusted size when they vary by
    /// less than `1 / ROUND`, else `ROUND` of them.
    fn knows_the_usual(&self) -> bool {
        let enough = if self.spread() <= 1.0 / ROUND as f64 {
            1
        } else {
            ROUND
        };
        self.trusted_answers >= enough
    }
}

/// Requests in flight over time, integrated, for their mean over a round's busy time.
#[derive(Debug, Default)]
struct Flow {
    in_flight: usize,
    /// The most in flight since the last round ended.
    peak: usize,
    /// Requests in flight × seconds, and seconds with any in flight, up to `at`.
    area: Area,
    at: Option<Instant>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Area {
    requests: f64,
    busy: f64,
}

impl Flow {
    fn area(&self, now: Instant) -> Area {
        let since = self.at.map_or(0.0, |at| (now - at).as_secs_f64());
        Area {
            requests: self.area.requests + self.in_flight as f64 * since,
            busy: self.area.busy + if self.in_flight > 0 { since } else { 0.0 },
        }
    }
}

impl Vegas {
    pub(super) fn new(start: usize, ceiling: usize) -> Vegas {
        Vegas {
            limit: start,
            ceiling,
            slow_until: ceiling,
            baseline: Baseline::default(),
            noise: 1.0,
            spread: 0.0,
            round: Round::default(),
            flow: Flow::default(),
            moved_at: None,
            before_move: 0,
            settled_at: None,
            fell_at: None,
            calm: 0,
            probe_after: 1,
            probing: false,
        }
    }

    pub(super) fn permits(&self) -> usize {
        self.limit
    }

    /// Puts the limit at `permits`, out of slow start.
    #[cfg(test)]
    pub(super) fn settle(&mut self, permits: usize) {
        (self.limit, self.slow_until) = (permits, 0);
    }

    /// `in_flight` requests from now on; `ended`, the send time of one that just ended.
    pub(super) fn flowed(&mut self, in_flight: usize, ended: Option<Instant>) {
        let now = Instant::now();
        self.flow.area = self.flow.area(now);
        (self.flow.in_flight, self.flow.at) = (in_flight, Some(now));
        self.flow.peak = self.flow.peak.max(in_flight);
        if ended.is_some_and(|sent| self.moved_at.is_some_and(|at| sent < at))
            && self.before_move > 0
        {
            self.before_move -= 1;
            if self.before_move == 0 {
                // The round judges the limit from here: the peak too.
                self.settled_at = Some(now);
                self.flow.peak = in_flight;
            }
        }
    }

    /// `shared`: more prompts are in flight than the limit has slots.
    pub(super) fn learn(&mut self, sent: Instant, verdict: Verdict, shared: bool) {
        match verdict {
            Verdict::Nothing => {}
            Verdict::Overloaded => {
                if self.fell_at.is_none_or(|at| sent > at) {
                    self.fell_at = Some(Instant::now());
                    self.slow_until = 0;
                    self.set(self.limit as f64 * BACKOFF);
                }
            }
            Verdict::Took(took, items) => self.took(sent, took, items, shared),
        }
    }

    fn set(&mut self, limit: f64) {
        let limit = (limit as usize).clamp(1, self.ceiling);
        if limit != self.limit {
            let now = Instant::now();
            self.limit = limit;
            self.moved_at = Some(now);
            self.before_move = self.flow.in_flight;
            self.settled_at = (self.before_move == 0).then_some(now);
            self.round = Round::default();
            self.flow.peak = self.flow.in_flight;
        }
    }

    fn took(&mut self, sent: Instant, took: Duration, items: usize, shared: bool) {
        // An answer within one queued request of the expected time moves it; a slower one
        // does not (it queued), so queueing is never learned as the usual.
        let Some(expected) = self.baseline.expected(items) else {
            // The largest size yet: nothing to judge it by.
            self.baseline.learn(items, took, false);
            return;
        };
        let x = took.as_secs_f64() / expected;
        self.baseline
            .learn(items, took, x <= 1.0 + 1.0 / self.limit as f64);
        if self.moved_at.is_some() && self.settled_at.is_none_or(|at| sent < at) {
            return;
        }
        let now = Instant::now();
        let round = &mut self.round;
        let (since, area) = *round.since.get_or_insert((now, self.flow.area(now)));
        round.answers += 1;
        round.slowdown += x;
        round.squares += x * x;
        round.shared += usize::from(shared);
        round.items += items;
        if self.baseline.trusted(items) {
            round.trusted += x;
            round.trusted_answers += 1;
        }
        // Slow start moves per round trip, as TCP's does; its climb back after the restart
        // per round, so that one request at a time learns the usual slowdown.
        let slow_start = self.limit < self.slow_until;
        let answers = if self.slow_until == self.ceiling {
            1
        } else {
            ROUND
        };
        // The climb back starts once one request at a time has shown the usual slowdown.
        let learning = slow_start && self.slow_until < self.ceiling && self.limit == 1;
        if round.answers < answers.max(self.limit)
            || now == since
            || (learning && !round.knows_the_usual())
        {
            return;
        }
        let round = std::mem::take(&mut self.round);
        let peak = std::mem::replace(&mut self.flow.peak, self.flow.in_flight);
        let n = round.answers as f64;
        let raw = round.slowdown / n;
        // The answers' own spread (their standard deviation over their mean) this round.
        let spread = round.spread();
        // The slowdown over the usual, less what chance gives a round's mean of answers that
        // vary as they usually do ([`SURE`] standard errors): a provider whose answers vary
        // widely is judged crowded only when chance cannot explain it.
        let r = (raw / self.noise - SURE * self.spread / n.sqrt()).max(1.0);
        // Mean requests in flight while any were: a round that spans a pause in the load (no
        // callers for a while) is not read as a light one.
        let end = self.flow.area(now);
        let busy = (end.requests - area.requests) / (end.busy - area.busy).max(f64::MIN_POSITIVE);
        let waiting = busy * (1.0 - 1.0 / r);
        tracing::debug!(
            limit = self.limit,
            busy,
            peak,
            slowdown = raw,
            noise = self.noise,
            waiting,
            slow_start,
            probing = self.probing,
            calm = self.calm,
            probe_after = self.probe_after,
            "concurrency round"
        );
        // The usual slowdown is learned only from sizes whose fastest time has been seen often
        // enough to be near its floor: a size new to the router (the loads before were
        // smaller) has a fastest time close to its usual one, and its answers would teach a
        // slowdown too low, against which every other size then reads as queued.
        let usual =
            (round.trusted_answers > 0).then(|| round.trusted / round.trusted_answers as f64);
        if peak <= 1
            && let Some(usual) = usual
        {
            // No queue is possible with one request in flight: its slowdown is all noise.
            self.noise = usual;
            if round.answers > 1 {
                self.spread = spread;
            }
        }
        if waiting > BETA {
            self.calm = 0;
            let first = self.slow_until == self.ceiling;
            self.slow_until = if first { self.limit / 2 } else { 0 };
            if first {
                // The first crowded round: the sizes slow start learned may all have queued
                // (every request waiting the same looks like no wait at all), so the limit
                // starts again from one request — where nothing queues — and doubles back to
                // half the limit that crowded it (TCP's slow-start threshold), learning each
                // size's time unqueued on the way.
                self.set(1.0);
            } else if self.harmless(round.items.div_ceil(round.answers)) {
                // Prompts wait at the provider as they would here, at no cost to it (a server
                // whose slots take prompts, not requests, e.g. llama-server's): the limit
                // stays, and climbs no further.
                if std::mem::take(&mut self.probing) {
                    self.probe_after = (self.probe_after * 2).min(PROBE_AFTER_MAX);
                }
            } else if std::mem::take(&mut self.probing) {
                // The probe's one more request crowded it: take that back (if more than the
                // probe crowds it, the next round shows that).
                self.probe_after = (self.probe_after * 2).min(PROBE_AFTER_MAX);
                self.set(self.limit as f64 - 1.0);
            } else {
                // The provider serves fewer than it did (or the load came back after a pause
                // all at once): fall to what it serves, and probe again from the next calm
                // round, as that is no longer a limit known to be the provider's.
                self.probe_after = 1;
                self.set((busy / r).min(self.limit as f64 - 1.0));
            }
            return;
        }
        // Calm rounds lower the noise quickly and raise it slowly: the fastest time of each size
        // falls as answers are seen (the luckiest so far), so the usual slowdown over it
        // rises, while queueing must not be learned as the usual.
        let toward = |usual: f64, now: f64| {
            usual
                + (now - usual)
                    * if now > usual {
                        NOISE_GAIN / 4.0
                    } else {
                        NOISE_GAIN
                    }
        };
        if let Some(usual) = usual {
            self.noise = toward(self.noise, usual);
        }
        if round.answers > 1 {
            self.spread = toward(self.spread, spread);
        }
        if std::mem::take(&mut self.probing) {
            self.probe_after = 1;
        }
        // More slots would have been used: every one was taken at some moment of the round,
        // or more prompts were in flight than slots (batches are sized over the limit, so
        // with more slots they would have gone as more, smaller requests).
        if peak < self.limit && round.shared * 2 < round.answers {
            return;
        }
        if slow_start {
            self.set((self.limit * 2).min(self.slow_until) as f64);
            return;
        }
        self.calm += 1;
        if self.calm >= self.probe_after {
            self.calm = 0;
            self.probing = true;
            self.set(self.limit as f64 + 1.0);
        }
    }
}

impl Vegas {
    /// Whether requests of `items` prompts waiting at the provider cost it next to nothing.
    fn harmless(&self, items: usize) -> bool {
        let (Some(fixed), Some(took)) = (self.baseline.fixed_cost(), self.baseline.expected(items))
        else {
            return false;
        };
        fixed <= HARMLESS * took
    }
}

/// The fastest answer per size bucket (its prompts and its time): one bucket per size up to
/// 16, then buckets an eighth apart.
#[derive(Debug)]
pub(super) struct Baseline {
    usual: [Option<(usize, f64)>; BUCKETS],
    /// Answers seen per bucket.
    seen: [u32; BUCKETS],
}

impl Default for Baseline {
    fn default() -> Baseline {
        Baseline {
            usual: [None; BUCKETS],
            seen: [0; BUCKETS],
        }
    }
}

/// The bucket for a request of `items` prompts.
pub(super) fn bucket(items: usize) -> usize {
    if items <= 16 {
        return items.saturating_sub(1);
    }
    let steps = ((items as f64 / 16.0).ln() / 1.125f64.ln()) as usize;
    (16 + steps).min(BUCKETS - 1)
}

impl Baseline {
    /// Learns an answer's time: a faster one at once, a slower one a little if `drift`.
    pub(super) fn learn(&mut self, items: usize, took: Duration, drift: bool) {
        let seen = &mut self.seen[bucket(items)];
        *seen = seen.saturating_add(1);
        let took = took.as_secs_f64();
        match &mut self.usual[bucket(items)] {
            Some((_, t)) if took > *t => {
                if drift {
                    *t += (took - *t) * DRIFT;
                }
            }
            usual => *usual = Some((items, took)),
        }
    }

    /// Whether the fastest time of `items`' size has been seen [`ROUND`] times or more.
    pub(super) fn trusted(&self, items: usize) -> bool {
        self.seen[bucket(items)] as usize >= ROUND
    }

    /// The part of a request's time that does not grow with its prompts: where the line
    /// through the largest size seen and the largest at most half of it meets zero prompts
    /// (large sizes: a server that serves a few prompts side by side takes as long for one
    /// as for a few). `None` before two such sizes are seen.
    pub(super) fn fixed_cost(&self) -> Option<f64> {
        let known = || self.usual.iter().flatten().copied();
        let (n, t) = known().max_by_key(|&(n, _)| n)?;
        let (m, u) = known()
            .filter(|&(m, _)| 2 * m <= n)
            .max_by_key(|&(m, _)| m)?;
        let per_prompt = (t - u) / (n - m) as f64;
        Some((u - per_prompt * m as f64).max(0.0))
    }

    /// How long an answer for `items` prompts takes when the provider is not queueing: no
    /// longer than any batch at least as big (a batch does not get cheaper by growing), and
    /// linear between two sizes — so a size first seen while queueing is judged by the
    /// others. `None` before any answer of this size or bigger, or on both sides of it.
    pub(super) fn expected(&self, items: usize) -> Option<f64> {
        let known = || self.usual.iter().flatten().copied();
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
}
