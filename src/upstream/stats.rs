//! Counters about one provider, for ListProviders and Prometheus: relaxed atomics, read as a
//! snapshot that may be a little stale.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use crate::metrics::ProviderMetrics;

pub(super) struct Stats {
    /// Upstream HTTP requests sent and the prompts they carried — more than the requests when
    /// batching — (`cascade_upstream_requests_total`, `cascade_upstream_items_total`).
    series: ProviderMetrics,
    successes: AtomicU64,
    failures: AtomicU64,
    /// Items waiting in this provider's batch queues.
    queued: AtomicU64,
    latency_us_total: AtomicU64,
    fastest_us: AtomicU64,
    /// A moving mean of recent answer times (µs; 0 before the first), weighting each new
    /// answer 1/8: the time the provider usually takes now.
    usual_us: AtomicU64,
}

/// What the counters said at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub items: u64,
    pub queued: u64,
    pub mean_latency: Duration,
}

impl Stats {
    pub(super) fn new(series: ProviderMetrics) -> Self {
        Stats {
            series,
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            latency_us_total: AtomicU64::new(0),
            fastest_us: AtomicU64::new(u64::MAX),
            usual_us: AtomicU64::new(0),
        }
    }

    pub(super) fn sent(&self, items: usize) {
        self.series.sent(items);
    }

    pub(super) fn success(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.successes.fetch_add(1, Relaxed);
        self.latency_us_total.fetch_add(us, Relaxed);
        self.fastest_us.fetch_min(us, Relaxed);
        let _ = self.usual_us.fetch_update(Relaxed, Relaxed, |old| {
            Some(match old {
                0 => us.max(1),
                old => (old * 7 + us) / 8,
            })
        });
    }

    /// The time the provider usually takes to answer now; `None` before its first answer.
    pub(super) fn usual(&self) -> Option<Duration> {
        match self.usual_us.load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub(super) fn failure(&self) {
        self.failures.fetch_add(1, Relaxed);
    }

    pub(super) fn queued(&self, n: usize) {
        self.queued.fetch_add(n as u64, Relaxed);
    }

    pub(super) fn dequeued(&self, n: usize) {
        self.queued.fetch_sub(n as u64, Relaxed);
    }

    /// The quickest answer this provider ever gave: a call with less time left than this
    /// cannot finish, so it is not started (and a batch is flushed this long before a deadline).
    pub(super) fn fastest(&self) -> Duration {
        match self.fastest_us.load(Relaxed) {
            u64::MAX => Duration::ZERO,
            us => Duration::from_micros(us),
        }
    }

    pub(super) fn counts(&self) -> Counts {
        let successes = self.successes.load(Relaxed);
        let (requests, items) = self.series.sent_so_far();
        Counts {
            requests,
            successes,
            failures: self.failures.load(Relaxed),
            items,
            queued: self.queued.load(Relaxed),
            mean_latency: match successes {
                0 => Duration::ZERO,
                n => Duration::from_micros(self.latency_us_total.load(Relaxed) / n),
            },
        }
    }
}
