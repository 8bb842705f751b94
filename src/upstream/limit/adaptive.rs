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
//!   what it showed it serves, `busy / r` (a probe that crowded it is taken back to where it
//!   started) — unless the queue is harmless: a request's fixed cost (the part of its time
//!   that does not grow with its prompts, from the fastest times of the largest sizes, known
//!   only when answers vary by less than `1/ROUND`) is at most [`HARMLESS`] of the time of a
//!   request carrying the callers' prompts (the most in flight) over the limit, so merging
//!   the waiting requests into fewer would save the provider next to nothing (llama-server's
//!   slots take prompts, not requests) — not over the round's answers: a run's first
//!   requests carry a prompt each as its callers arrive (the wall clock's 16-slot mock at
//!   256 callers fell 18 → 9–13 at each run's start). Then the limit stays, and a probe
//!   waits longer: taking a probe back there only left one cohort of callers waiting in the
//!   router for the other's request to end (the simulator's llama-server p99, 2.5 s against
//!   1.75 s). Such rounds do not restart the count of calm rounds a probe waits for (a busy
//!   machine's slow rounds held the wall clock's 16-slot mock at 13 of its 16 slots for a run).
//!   A fall is at most a half (TCP's multiplicative decrease): a machine's stall read as a
//!   queue costs a halving (9 read as serving "1" at 8 callers held the next load, 64 callers,
//!   at one request for seconds). Where the callers did not fill the limit, what it served is
//!   below their own demand, and the fall is by the requests that waited, `limit − waiting`
//!   (8 callers over 9 fell to 6 on a busy machine's slow round and went as pairs);
//! - the first crowded round ends slow start, and the limit starts again from one request: the
//!   sizes slow start sent may all have queued (every request waiting alike looks like no wait
//!   at all), so it stays at one — where nothing queues — until it has seen the usual slowdown
//!   (one answer of a trusted size; [`ROUND`] when answers vary by more than `1/ROUND`; none
//!   when a round with one in flight showed it before and answers vary less), then doubles
//!   back to half the limit that crowded it as after any fall;
//! - otherwise, with every slot taken at some moment of the round, or more prompts in flight
//!   than slots, or a request's prompts sent together with slots free and none left waiting
//!   (more slots would split them into more requests): in slow start the limit doubles; after
//!   it, a probe tries the next limit that would send the callers' prompts (the most in flight
//!   at the round's answers) as smaller requests — one more slot under heavy load, 8 for 8
//!   callers going as pairs over 4 to 7 — at once after a probe was kept, and after one was
//!   taken back, after twice as many calm rounds as last time for each request it added (at
//!   most [`PROBE_AFTER_MAX`]), so a provider at its true limit pays for few probes;
//! - a 429 or 503 (or the provider's own timeout) halves it ([`BACKOFF`]), at most once per
//!   round trip.
//!
//! The limit aims at no queue at all — Vegas with α = 0 — because batches are sized over it: a
//! request waiting at the provider holds prompts that could have ridden in a request being
//! served. `noise` is the slowdown of rounds without queueing (answers vary; the fastest is the
//! floor): set by rounds with at most one request in flight at any moment, where no queue can
//! form, when answers vary by less than `1/ROUND` (else such a round moves it as far up as
//! down: one round's mean is chance); learned only from sizes seen [`ROUND`] times or more (a
//! size new to the router has a fastest time near its usual one, and would teach a slowdown too
//! low, against which every other size reads as queued); calm rounds lower it quickly and raise
//! it a quarter as fast (the fastest of each size falls as more answers are seen, but queueing
//! must not be learned as the usual). A provider that became slower for good crowds every round
//! until the limit is one request, where its new slowdown is learned. An answer of a size
//! larger than any seen has nothing to be judged by and is left out of its round. A round
//! counts only answers to requests sent after those in flight when the limit last moved have
//! ended (a request sent just after a fall still queues behind them), and `busy` is the mean in
//! flight while any were; when the load returns after a pause longer than the round so far (and
//! than a lone prompt's answer), the round starts again: a round holding the tail of the load
//! before a pause (few in flight) and the return's burst read `busy / r` far below the load
//! (the wall clock's 16-slot mock at 256 callers: 18 to 7).
//!
//! Answers that vary widely (±50% at random) make a round's mean vary by chance, so `r` is
//! taken less [`SURE`] standard errors of it, from `spread`: how much answers vary in rounds
//! without queueing (learned as `noise` is). Known weakness (issue #28's note): with such
//! answers one request waiting cannot be told from chance, so the limit settles one above the
//! provider's slots (0.89–0.94 of the best fixed setting at 64 callers in the simulator).
//!
//! A limit just under the callers (8 over 7 slots, after a busy machine's stall read as a
//! queue) sends them as pairs with slots free; "more prompts in flight than slots" does not
//! see it (a pair's second prompt is with its caller between answer and next send), hence the
//! third sign. Limits between the pairs' slots and the callers change nothing (8 callers over
//! 4 to 7 slots all go as pairs), so a probe goes straight to the one that splits them, and
//! one that crowds goes back to where it started: probing a step at a time (session 18) kept
//! 5, 6 and 7 on the wall clock's 4-slot mock, crowded at 8, and the callers, split into
//! singles, came back apart and crowded 7 — the limit cycled 8 → 7 → 5 → 3 (0.87 of the best
//! fixed setting).
//!
//! Tuning constants (ten in all): [`ROUND`], [`BETA`], [`PROBE_AFTER_MAX`], [`BACKOFF`],
//! [`NOISE_GAIN`], [`SURE`], [`HARMLESS`]; `BUCKETS` in the baseline, `INITIAL` in the parent
//! module, `ARRIVAL_GAP` in the adaptive batch worker. Judged on `upstream::simulator` —
//! fresh routers and the wall-clock protocol's long-lived ones — before any wall-clock run.

use super::{
    baseline::Baseline,
    flow::{Area, Flow},
    *,
};

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

#[derive(Debug, Default)]
pub(super) struct Vegas {
    limit: usize,
    ceiling: usize,
    /// Slow start: the limit doubles each round while below this (the ceiling until a round
    /// is first crowded, then half the limit that crowded it; 0 once it is over).
    slow_until: usize,
    baseline: Baseline,
    /// Rounds without queueing: their slowdown over the fastest times (`noise`), and how much
    /// their answers vary (standard deviation over mean).
    noise: f64,
    spread: f64,
    /// Whether `noise` was set by a round with at most one request in flight (so it is the
    /// provider's usual slowdown, not a guess).
    noise_known: bool,
    round: Round,
    flow: Flow,
    moved: Moved,
    probe: Probe,
}

/// How many times the limit has moved, the requests sent before the last move still in
/// flight, and when the last of them ended: a round counts only answers to requests sent after
/// that, so it judges the limit it is about (a request sent just after a fall still queues
/// behind those sent before it).
#[derive(Debug, Default)]
struct Moved {
    /// How many times it has moved (a slot records it when sent: whether its request was in
    /// flight at the last move, even when the two share an instant).
    times: u64,
    before: usize,
    settled_at: Option<Instant>,
}

/// Calm rounds with every slot taken since the last probe, how many the next needs,
/// whether the limit now is a probe, and the limit it was probed from.
#[derive(Debug, Default)]
struct Probe {
    calm: u32,
    after: u32,
    on: bool,
    from: usize,
}

impl Probe {
    /// The probe (if one is on) to `limit` crowded the provider: the next comes twice as late
    /// for each request it added (a probe that reached further cost more).
    fn crowded(&mut self, limit: usize) -> bool {
        let on = std::mem::take(&mut self.on);
        if on {
            let added = limit.saturating_sub(self.from).max(1) as u32;
            self.after = (self.after * 2 * added).min(PROBE_AFTER_MAX);
        }
        on
    }
}

#[derive(Debug, Default)]
struct Round {
    answers: usize,
    /// Each answer's time over the time expected for its size, summed, and its squares summed
    /// (for the spread of the round's mean).
    slowdown: f64,
    squares: f64,
    /// Answers that came with more prompts in flight than slots, or whose prompts went
    /// together with slots free.
    shared: usize,
    /// The most prompts in flight at its answers: the callers' demand.
    demand: usize,
    /// The slowdowns of answers whose size's fastest time is trusted (seen [`ROUND`] times),
    /// summed, and how many: what `noise` learns from.
    trusted: f64,
    trusted_answers: usize,
    /// When it began (its first answer), and [`Flow::mark`] then.
    since: Option<(Instant, Area)>,
}

impl Round {
    /// The answers' standard deviation over their mean.
    fn spread(&self) -> f64 {
        let (n, mean) = (self.answers as f64, self.slowdown / self.answers as f64);
        // One answer: no spread (its square less itself squared is 0 exactly).
        ((self.squares - n * mean * mean).max(0.0) / (n - 1.0).max(1.0)).sqrt() / mean
    }

    /// Whether its answers show the usual slowdown: one of a trusted size when answers vary
    /// little (`steady`), else `ROUND` of them.
    fn knows_the_usual(&self, steady: bool) -> bool {
        let n = self.trusted_answers;
        n >= ROUND || (n > 0 && steady)
    }
}

impl Vegas {
    pub(super) fn new(start: usize, ceiling: usize) -> Vegas {
        let probe = Probe {
            after: 1,
            from: start,
            ..Probe::default()
        };
        Vegas {
            limit: start,
            ceiling,
            slow_until: ceiling,
            noise: 1.0,
            probe,
            ..Vegas::default()
        }
    }

    pub(super) fn permits(&self) -> usize {
        self.limit
    }

    /// A request was sent (`None`), or one ended that was sent when the limit had moved that
    /// many times. Returns how many times it has moved.
    ///
    /// The requests in flight are counted here, under the policy's lock, not read from the
    /// slots' atomic count: two threads' readings of it can arrive in either order, and a move
    /// that took a stale one as the requests in flight before it waited for one more to end
    /// than there were — the limit froze for good (the wall clock's 16-slot mock: no round for
    /// two minutes, held at 13 of 16 slots).
    pub(super) fn flowed(&mut self, ended: Option<u64>) -> u64 {
        let now = Instant::now();
        let in_flight = match ended {
            None => self.flow.in_flight() + 1,
            Some(_) => self.flow.in_flight().saturating_sub(1),
        };
        if let (Some(at), Some((since, _))) = (self.flow.idle_since(), self.round.since)
            && in_flight > 0
            && now - at > (at - since).max(self.baseline.lone())
        {
            // The load returns after a pause longer than the round so far and than a lone
            // prompt's answer: the round starts again, to judge the return rather than the
            // tail before the pause with it.
            self.next_round();
        }
        self.flow.update(in_flight, now);
        let moved = &mut self.moved;
        if ended.is_some_and(|sent| sent < moved.times) && moved.before > 0 {
            moved.before -= 1;
            if moved.before == 0 {
                // The round judges the limit from here: the peak too.
                moved.settled_at = Some(now);
                self.flow.take_peak();
            }
        }
        moved.times
    }

    /// `sent`: when, and after how many moves of the limit; `prompts` in flight now; `split`:
    /// the answer's prompts went together with slots free (more requests would have fit).
    pub(super) fn learn(
        &mut self,
        (sent, moves): (Instant, u64),
        verdict: Verdict,
        prompts: usize,
        split: bool,
    ) {
        match verdict {
            // Not again for requests sent before the limit last moved.
            Verdict::Overloaded if moves == self.moved.times => {
                self.slow_until = 0;
                self.set(self.limit as f64 * BACKOFF);
            }
            Verdict::Took(took, items) => self.took(sent, took, items, prompts, split),
            Verdict::Overloaded | Verdict::Nothing => {}
        }
    }

    fn set(&mut self, limit: f64) {
        let limit = (limit as usize).clamp(1, self.ceiling);
        if limit != self.limit {
            let (now, before) = (Instant::now(), self.flow.in_flight());
            self.limit = limit;
            self.moved = Moved {
                times: self.moved.times + 1,
                before,
                settled_at: (before == 0).then_some(now),
            };
            self.next_round();
        }
    }

    /// Starts a new round: the one ending, and the most requests in flight during it.
    fn next_round(&mut self) -> (Round, usize) {
        (std::mem::take(&mut self.round), self.flow.take_peak())
    }

    fn took(&mut self, sent: Instant, took: Duration, items: usize, prompts: usize, split: bool) {
        let expected = self.baseline.expected(items);
        self.baseline.learn(items, took);
        // The largest size yet has nothing to be judged by.
        let Some(expected) = expected else { return };
        let x = took.as_secs_f64() / expected;
        if self.moved.times > 0 && self.moved.settled_at.is_none_or(|at| sent < at) {
            return;
        }
        let (now, steady) = (Instant::now(), self.steady());
        let round = &mut self.round;
        let (since, area) = *round.since.get_or_insert((now, self.flow.mark(now)));
        round.answers += 1;
        round.slowdown += x;
        round.squares += x * x;
        // More prompts in flight than slots (more slots would split them into more requests).
        round.shared += usize::from(split || prompts > self.limit);
        round.demand = round.demand.max(prompts);
        if self.baseline.seen(items) >= ROUND {
            round.trusted += x;
            round.trusted_answers += 1;
        }
        // Slow start and its climb back after the restart move per round trip, as TCP's do.
        // At one request the climb first waits for the usual slowdown to show — unless a
        // round with one in flight showed it before and answers vary little (the 16-slot
        // model's first run at 64 callers lost a quarter waiting for a size never seen).
        let first = self.slow_until == self.ceiling;
        let climbing = !first && self.limit < self.slow_until;
        let known = self.noise_known && steady;
        let learning = climbing && self.limit == 1 && !known;
        let answers = if first || climbing { 1 } else { ROUND };
        if round.answers < answers.max(self.limit)
            || now == since
            || (learning && !round.knows_the_usual(steady))
        {
            return;
        }
        let (round, peak) = self.next_round();
        let n = round.answers as f64;
        let raw = round.slowdown / n;
        // The slowdown over the usual, less what chance gives a round's mean of answers that
        // vary as they usually do ([`SURE`] standard errors): a provider whose answers vary
        // widely is judged crowded only when chance cannot explain it.
        let r = (raw / self.noise - SURE * self.spread / n.sqrt()).max(1.0);
        // Mean requests in flight while any were: a round that spans a pause in the load (no
        // callers for a while) is not read as a light one.
        let busy = self.flow.busy_since(area, now);
        let waiting = busy * (1.0 - 1.0 / r);
        let crowded = waiting > BETA;
        let size = round.demand.div_ceil(self.limit);
        tracing::debug!(self.limit, busy, peak, size, raw, self.noise, self.spread, waiting, ?self.probe, "round");
        // The usual slowdown is learned from rounds without queueing: set by those with at
        // most one request in flight at any moment (no queue can form) when answers vary
        // little — else one round's mean is chance, and moves it as far up as down (a round
        // of 1.30 among 1.7–2.3 on the ±50% model read every round after it as crowded) —
        // otherwise lowered quickly and raised a quarter as fast, by calm rounds (the fastest
        // time of each size falls as answers are seen, so the usual slowdown over it rises;
        // queueing must not be learned as the usual). Only from sizes whose fastest time has
        // been seen often enough to be near its floor: a size new to the router has a fastest
        // time close to its usual one, against which every other size would read as queued.
        let usual =
            (round.trusted_answers > 0).then(|| round.trusted / round.trusted_answers as f64);
        let toward = |old: &mut f64, new: f64| {
            *old += (new - *old)
                * match () {
                    () if peak <= 1 && usual.is_some() && steady => 1.0,
                    () if crowded => 0.0,
                    () if peak <= 1 => NOISE_GAIN,
                    () if new > *old => NOISE_GAIN / 4.0,
                    () => NOISE_GAIN,
                };
        };
        if let Some(usual) = usual {
            toward(&mut self.noise, usual);
            self.noise_known |= peak <= 1;
        }
        if round.answers > 1 {
            toward(&mut self.spread, round.spread());
        }
        if crowded {
            // A harmless queue's crowded rounds leave the calm rounds' count alone: a busy
            // machine's slow rounds there held the wall clock's 16-slot mock at 13 for a run.
            let harmless = !first && self.harmless(size);
            if !harmless {
                self.probe.calm = 0;
            }
            // The slow-start threshold: half the limit that crowded (TCP's). A fall is at most
            // to it; after the first crowded round, the climb back goes to it.
            self.slow_until = self.limit / 2;
            if first {
                // The first crowded round: the sizes slow start learned may all have queued
                // (every request waiting the same looks like no wait at all), so the limit
                // starts again from one request — where nothing queues — and doubles back to
                // half the limit that crowded it (TCP's slow-start threshold), learning each
                // size's time unqueued on the way.
                self.set(1.0);
            } else if harmless {
                // Prompts wait at the provider as they would here, at no cost to it (a server
                // whose slots take prompts, not requests, e.g. llama-server's): the limit
                // stays (a probe that brought it here too), and the next probe waits longer.
                self.probe.crowded(self.limit);
            } else if self.probe.crowded(self.limit) {
                // The probe crowded it: take that back (if less than the probe crowds it, the
                // next round shows that).
                self.set(self.probe.from as f64);
            } else {
                // The provider serves fewer than it did (or the load came back after a pause
                // all at once): fall to what it serves — by the requests that waited, when the
                // callers did not fill the limit (what it served is below their demand) — at
                // most by half, and probe again from the next calm round, as that is no longer
                // a limit known to be the provider's.
                self.probe.after = 1;
                let to = if peak < self.limit {
                    self.limit as f64 - waiting
                } else {
                    busy / r
                };
                self.set(to.max(self.limit as f64 / 2.0).min(self.limit as f64 - 1.0));
            }
            return;
        }
        if std::mem::take(&mut self.probe.on) {
            self.probe.after = 1;
        }
        // More slots would have been used: every one was taken at some moment of the round,
        // or more prompts were in flight than slots (batches are sized over the limit, so
        // with more slots they would have gone as more, smaller requests).
        if peak < self.limit && round.shared * 2 < round.answers {
            return;
        }
        if self.limit < self.slow_until {
            let to = (self.limit * 2).min(self.slow_until);
            // A step of the climb back is a probe: one that crowds is taken back to where it
            // started, and the next probe waits (a provider that really serves fewer pays one
            // crowded round, not a fall for each step).
            (self.probe.on, self.probe.from) = (climbing, self.limit);
            self.set(to as f64);
            return;
        }
        self.probe.calm += 1;
        if self.probe.calm >= self.probe.after {
            // The next limit that changes what is sent: with the callers' prompts spread
            // over the limit, one that makes the batches smaller (8 callers over 4 to 7
            // slots all go as pairs, so only 8 shows whether they could go alone).
            let to = match round.demand.div_ceil(self.limit) {
                0 | 1 => self.limit + 1,
                size => round.demand.div_ceil(size - 1),
            };
            (self.probe.calm, self.probe.on, self.probe.from) = (0, true, self.limit);
            self.set(to as f64);
        }
    }

    /// Whether answers vary little (by less than `1 / ROUND`): one answer, or one round with
    /// one request in flight, shows the usual slowdown.
    fn steady(&self) -> bool {
        self.spread <= 1.0 / ROUND as f64
    }

    /// Whether requests of `items` prompts waiting at the provider cost it next to nothing.
    /// Not known when answers vary by more than `1/ROUND`: the fixed cost comes from fastest
    /// times, which then sit unevenly far above the floor (±50% jitter read 5 ms of a true
    /// 20 ms, and kept a limit 13 over 8 slots).
    fn harmless(&self, items: usize) -> bool {
        let (fixed, took) = (self.baseline.fixed_cost(), self.baseline.expected(items));
        self.steady() && fixed.zip(took).is_some_and(|(f, t)| f <= HARMLESS * t)
    }
}
