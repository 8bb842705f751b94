//! Requests in flight over time, integrated: the mean in flight over a stretch of time (the
//! `busy` of Little's law in the adaptive limit), counted only while any were, so a stretch
//! that spans a pause in the load is not read as a light one; and the most in flight.

use tokio::time::Instant;

#[derive(Debug, Default)]
pub(super) struct Flow {
    in_flight: usize,
    /// The most in flight since [`Flow::take_peak`].
    peak: usize,
    /// Requests in flight × seconds, and seconds with any in flight, up to `at`.
    area: Area,
    at: Option<Instant>,
}

/// A mark on the integral, to take the mean in flight since it ([`Flow::busy_since`]).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Area {
    requests: f64,
    busy: f64,
}

impl Flow {
    /// `in_flight` requests from `now` on.
    pub(super) fn update(&mut self, in_flight: usize, now: Instant) {
        self.area = self.mark(now);
        (self.in_flight, self.at) = (in_flight, Some(now));
        self.peak = self.peak.max(in_flight);
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Since when none have been in flight, if none are.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        self.at.filter(|_| self.in_flight == 0)
    }

    /// The most in flight since the last call; the count starts again from those in flight.
    pub(super) fn take_peak(&mut self) -> usize {
        std::mem::replace(&mut self.peak, self.in_flight)
    }

    /// The integral up to `now`: a mark to take the mean since.
    pub(super) fn mark(&self, now: Instant) -> Area {
        let since = self.at.map_or(0.0, |at| (now - at).as_secs_f64());
        Area {
            requests: self.area.requests + self.in_flight as f64 * since,
            busy: self.area.busy + if self.in_flight > 0 { since } else { 0.0 },
        }
    }

    /// The mean in flight from `mark` to `now`, over the time any were.
    pub(super) fn busy_since(&self, mark: Area, now: Instant) -> f64 {
        let end = self.mark(now);
        (end.requests - mark.requests) / (end.busy - mark.busy).max(f64::MIN_POSITIVE)
    }
}
