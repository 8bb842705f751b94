//! The adaptive policy: TCP Vegas' rule over rounds of answers, and the parallelism that
//! batches are sized to (see [`Gradient`] and [`Parallelism`]).

use super::*;

#[cfg(test)]
mod tests;

/// Requests estimated to be queued at the provider (Vegas' α and β): under `ALPHA` with
/// every slot busy, one more slot; over `BETA` (or an eighth of the limit, if more), down to
/// the parallelism the latencies imply. Tight, because a request waiting at a provider with
/// few slots costs a whole service time.
pub(super) const ALPHA: f64 = 0.5;
pub(super) const BETA: f64 = 1.0;
/// An answer more than this many times slower than expected for its size (plus [`SLACK`])
/// lowers the limit at once, without waiting for the round to end.
pub(super) const SPIKE: f64 = 2.0;
/// Absolute slack, so sub-millisecond jitter is not read as queueing.
pub(super) const SLACK: Duration = Duration::from_micros(500);
/// The limit falls to this fraction on a spike, and to [`BACKOFF_OVERLOAD`] on a 429 or
/// 503: at most once per round trip (answers to requests sent before the last fall do not
/// count again).
pub(super) const BACKOFF_SPIKE: f64 = 0.9;
pub(super) const BACKOFF_OVERLOAD: f64 = 0.5;
/// An answer slower than the fastest of its size but within one queued request of it moves
/// that fastest this fraction of the way up, so a provider that became slower for good
/// (other tenants, a smaller GPU) is relearned.
pub(super) const BASELINE_DRIFT: f64 = 1.0 / 256.0;
pub(super) const BUCKETS: usize = 64;
/// Requests waiting at the provider, beyond the answers' usual spread, that show the
/// parallelism lower than the requests sent: lower than Vegas' [`ALPHA`], since a size first
/// seen while queueing has a baseline that hides part of it, and two rounds running must show it.
pub(super) const CROWDED: f64 = 0.3;
/// Calm rounds before batches are sized to more requests than the parallelism shown, and the
/// most that wait grows to while probes keep being taken back.
pub(super) const PROBE_AFTER: u32 = 8;
pub(super) const PROBE_AFTER_MAX: u32 = 128;
/// A round says the parallelism is too high only with at least this share of it in flight
/// (the rest may be between answer and resend).
pub(super) const SIZED: f64 = 0.75;
/// Calm rounds after a fall before the figure from before it is tried again.
pub(super) const RESTORE_AFTER: u32 = 2;

/// The adaptive policy, TCP Vegas' rule over rounds of `permits` answers to requests sent
/// since the limit last moved: each answer's time against the time expected for its size
/// gives the mean slowdown `r` of the round, and with `busy` requests in flight,
/// `busy × (1 − 1/r)` of them were waiting at the provider (Little's law). Few waiting and
/// every slot busy: one more slot (doubling, in slow start); too many: one less (slow start
/// ends on two such rounds running, down to `busy / r`, the parallelism the provider showed).
#[derive(Debug)]
pub(super) struct Gradient {
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
pub(super) struct Parallelism {
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

/// The answers of the current round.
#[derive(Debug, Default)]
pub(super) struct Round {
    answers: usize,
    slowdown: f64,
    saturated: usize,
    /// Requests in flight at each answer, summed.
    busy: usize,
    /// [`Load::beyond`], summed.
    beyond: usize,
}

/// The bucket for a request of `items` prompts.
pub(super) fn bucket(items: usize) -> usize {
    if items <= 16 {
        return items.saturating_sub(1);
    }
    // Eighth-wide buckets above 16: log base 1.125 of items / 16.
    let steps = ((items as f64 / 16.0).ln() / 1.125f64.ln()) as usize;
    (16 + steps).min(BUCKETS - 1)
}

impl Gradient {
    /// Slots the limit gives now.
    pub(super) fn permits(&self) -> usize {
        self.permits
    }

    /// The parallelism batches are sized to, in whole requests within the limit.
    pub(super) fn parallelism(&self) -> usize {
        (self.parallelism.value.round() as usize).clamp(1, self.permits)
    }

    /// Puts the limit at `permits` and the parallelism at `parallel`, out of slow start.
    #[cfg(test)]
    pub(super) fn settle(&mut self, permits: usize, parallel: usize) {
        (self.permits, self.estimate, self.slow_start) = (permits, permits as f64, false);
        self.parallelism.value = parallel as f64;
    }

    pub(super) fn new(start: usize, ceiling: usize) -> Gradient {
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

    pub(super) fn learn(&mut self, sent: Instant, load: Load, verdict: Verdict) {
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
