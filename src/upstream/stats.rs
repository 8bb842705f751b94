//! Counters about one provider, for ListProviders and Prometheus: relaxed atomics, read as a
//! snapshot that may be a little stale.

use std::{
    collections::VecDeque,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use crate::{completion::FailureKind, metrics::ProviderMetrics, provider::ProviderError};

/// Answer-time buckets: the first ends at [`FIRST_BUCKET_US`], each next one a quarter longer
/// (the last, at about 65 s, takes everything longer).
const LATENCY_BUCKETS: usize = 64;
const FIRST_BUCKET_US: f64 = 50.0;
const GROWTH: f64 = 1.25;
/// Failures kept for the status page, the newest last.
const RECENT: usize = 20;
/// The most of a failure's message kept for the status page.
const RECENT_MESSAGE: usize = 200;

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
    /// Answers per time bucket, for p50 / p99 over any stretch (two readings' difference).
    /// Hand-written: 64 relaxed counters are all that takes, where histogram crates want a
    /// lock or a recorder per thread.
    latency: [AtomicU64; LATENCY_BUCKETS],
    /// Failures per [`FailureKind`], in [`FailureKind::ALL`]'s order.
    by_kind: [AtomicU64; FailureKind::ALL.len()],
    /// The latest failures, for the status page: kind, status and message, never a body.
    recent: Mutex<VecDeque<Noted>>,
}

/// One failure as the status page shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Noted {
    pub at: SystemTime,
    pub kind: FailureKind,
    pub http_status: Option<u16>,
    /// The provider error's message (which never carries a header, a key or a prompt),
    /// cut to 200 characters.
    pub error: String,
}

/// A reading of a provider's answer-time buckets.
#[derive(Clone, Debug, PartialEq)]
pub struct Latencies([u64; LATENCY_BUCKETS]);

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies([0; LATENCY_BUCKETS])
    }
}

impl Latencies {
    /// The `q` quantile (0..=1) of the answers counted since `earlier` (a reading taken
    /// before this one), as its bucket's upper end; `None` with no answers between.
    pub fn quantile_since(&self, earlier: &Latencies, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .0
            .iter()
            .zip(&earlier.0)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        let bucket = counts
            .iter()
            .position(|&c| {
                seen += c;
                seen >= rank
            })
            .unwrap_or(LATENCY_BUCKETS - 1);
        Some(Duration::from_micros(bucket_end_us(bucket) as u64))
    }

    /// Adds another endpoint's reading.
    pub fn add(&mut self, other: &Latencies) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// Answers counted in all.
    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }
}

fn bucket_end_us(bucket: usize) -> f64 {
    FIRST_BUCKET_US * GROWTH.powi(bucket as i32)
}

fn bucket_of(us: u64) -> usize {
    if (us as f64) <= FIRST_BUCKET_US {
        return 0;
    }
    let b = ((us as f64 / FIRST_BUCKET_US).ln() / GROWTH.ln()).ceil() as usize;
    b.min(LATENCY_BUCKETS - 1)
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

impl Counts {
    /// Adds another endpoint's counts (the mean latency weighted by successes).
    pub fn add(&mut self, other: &Counts) {
        let answered = self.successes + other.successes;
        if answered > 0 {
            let total = self.mean_latency.as_secs_f64() * self.successes as f64
                + other.mean_latency.as_secs_f64() * other.successes as f64;
            self.mean_latency = Duration::from_secs_f64(total / answered as f64);
        }
        self.requests += other.requests;
        self.successes = answered;
        self.failures += other.failures;
        self.items += other.items;
        self.queued += other.queued;
    }
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
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            by_kind: std::array::from_fn(|_| AtomicU64::new(0)),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
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
        self.latency[bucket_of(us)].fetch_add(1, Relaxed);
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

    /// A failed request, counted by kind (here and in Prometheus).
    pub(super) fn failure(&self, kind: FailureKind) {
        self.failures.fetch_add(1, Relaxed);
        self.by_kind[kind.index()].fetch_add(1, Relaxed);
        self.series.failed(kind.metric_name());
    }

    /// Keeps `e` among the latest failures shown on the status page.
    pub(super) fn note(&self, e: &ProviderError) {
        let mut error = e.message.clone();
        if let Some((cut, _)) = error.char_indices().nth(RECENT_MESSAGE) {
            error.truncate(cut);
        }
        let noted = Noted {
            at: SystemTime::now(),
            kind: e.kind,
            http_status: e.http_status,
            error,
        };
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(noted);
    }

    /// The latest failures, oldest first.
    pub(super) fn recent(&self) -> Vec<Noted> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.iter().cloned().collect()
    }

    /// Failures so far per kind, in [`FailureKind::ALL`]'s order.
    pub(super) fn failures_by_kind(&self) -> [u64; FailureKind::ALL.len()] {
        std::array::from_fn(|i| self.by_kind[i].load(Relaxed))
    }

    pub(super) fn latencies(&self) -> Latencies {
        Latencies(std::array::from_fn(|i| self.latency[i].load(Relaxed)))
    }

    pub(super) fn queued(&self, n: usize) {
        self.queued.fetch_add(n as u64, Relaxed);
    }

    /// Items waiting in this provider's batch queues now.
    pub(super) fn in_queue(&self) -> u64 {
        self.queued.load(Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_read_the_answers_between_two_readings() {
        let stats = Stats::new(crate::metrics::Metrics::new().provider("p"));
        for _ in 0..90 {
            stats.success(Duration::from_millis(10));
        }
        let before = stats.latencies();
        for ms in [100; 99].into_iter().chain([2000]) {
            stats.success(Duration::from_millis(ms));
        }
        let now = stats.latencies();
        let p50 = now.quantile_since(&before, 0.5).unwrap_or_default();
        let p99 = now.quantile_since(&before, 0.99).unwrap_or_default();
        let p100 = now.quantile_since(&before, 1.0).unwrap_or_default();
        // Bucket ends are at most a quarter above the answer's time.
        assert!((100..=125).contains(&p50.as_millis()), "{p50:?}");
        assert!((100..=125).contains(&p99.as_millis()), "{p99:?}");
        assert!((2000..=2500).contains(&p100.as_millis()), "{p100:?}");
        assert_eq!(now.quantile_since(&now, 0.5), None);
        assert_eq!(now.count(), 190);
    }
}
