//! What the status page and `GET /api/status` show: every provider's state, rates, latency
//! quantiles, load against its limit, batch size, recent failures and a few minutes of
//! history; the cache's hit ratio and size. A [`Board`] samples the router's counters every
//! [`SAMPLE`] and keeps [`KEPT`] samples, so rates and quantiles are over the last minute and
//! the charts over the last five, whenever the page is opened.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    completion::FailureKind,
    control::Order,
    router::{CacheFigures, Router},
    spend::BudgetFigure,
    upstream::{Circuit, Latencies, Snapshot},
};

/// How often the counters are sampled.
pub const SAMPLE: Duration = Duration::from_secs(2);
/// Samples kept: five minutes' worth.
const KEPT: usize = 150;
/// Samples between the two readings that rates and quantiles compare: a minute.
const WINDOW: usize = 30;
/// Failures listed on the page, newest first.
const LISTED_FAILURES: usize = 20;
/// An error rate over this in the window makes a provider "degraded".
const DEGRADED_ERROR_RATE: f64 = 0.05;

/// One provider's counters at one moment.
#[derive(Clone, Debug)]
struct Reading {
    name: Arc<str>,
    requests: u64,
    items: u64,
    failures: u64,
    by_kind: [u64; FailureKind::ALL.len()],
    latencies: Latencies,
}

impl Reading {
    fn of(s: &Snapshot) -> Reading {
        Reading {
            name: s.name.clone(),
            requests: s.counts.requests,
            items: s.counts.items,
            failures: s.counts.failures,
            by_kind: s.failures_by_kind,
            latencies: s.latencies.clone(),
        }
    }
}

#[derive(Clone, Debug)]
struct Sample {
    at: SystemTime,
    providers: Vec<Reading>,
    cache: Option<CacheFigures>,
}

/// The samples behind the page's rates and charts.
#[derive(Debug, Default)]
pub struct Board {
    samples: Mutex<VecDeque<Sample>>,
}

impl Board {
    /// Takes one sample of `router`'s counters.
    pub fn sample(&self, router: &Router) {
        let sample = Sample {
            at: SystemTime::now(),
            providers: router.providers().iter().map(Reading::of).collect(),
            cache: router.cache_figures(),
        };
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Samples every [`SAMPLE`] while the returned task runs.
    pub fn run(self: &Arc<Board>, router: Arc<Router>) -> tokio::task::JoinHandle<()> {
        let board = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                board.sample(&router);
            }
        })
    }

    /// The page's view of `router` now.
    pub fn view(&self, router: &Router, in_flight: usize, max_in_flight: usize) -> View {
        let now = SystemTime::now();
        let snapshots = router.providers();
        let cache_now = router.cache_figures();
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let base = samples.iter().rev().nth(WINDOW - 1).or(samples.front());
        let mut failures: Vec<ListedFailure> = Vec::new();
        let today = router.spend().providers_today();
        let providers = snapshots
            .iter()
            .map(|s| {
                let then = base.and_then(|b| b.providers.iter().find(|r| r.name == s.name));
                let secs = base.map_or(0.0, |b| seconds_between(b.at, now));
                let history = history(&samples, &s.name);
                failures.extend(s.recent_failures.iter().map(|f| ListedFailure {
                    at_ms: unix_ms(f.at),
                    provider: s.name.to_string(),
                    kind: f.kind.metric_name(),
                    http_status: f.http_status,
                    error: f.error.clone(),
                }));
                let mut view = provider_view(s, then, secs, history);
                view.spent_usd_today =
                    today.get(&*s.name).map_or(0, |(spent, _)| *spent) as f64 / 1e9;
                view
            })
            .collect();
        failures.sort_by_key(|f| std::cmp::Reverse(f.at_ms));
        failures.truncate(LISTED_FAILURES);
        let cache = cache_now.map(|c| {
            let then = base.and_then(|b| b.cache).unwrap_or_default();
            let (hits, misses) = (
                c.hits - then.hits.min(c.hits),
                c.misses - then.misses.min(c.misses),
            );
            CacheView {
                hits: c.hits,
                misses: c.misses,
                hit_ratio: ratio(hits, hits + misses),
                entries: c.entries,
                bytes: c.bytes,
            }
        });
        View {
            now_ms: unix_ms(now),
            version: env!("CARGO_PKG_VERSION"),
            window_s: (WINDOW as u64) * SAMPLE.as_secs(),
            in_flight,
            max_in_flight,
            cache,
            providers,
            recent_failures: failures,
            budgets: router.spend().budget_figures(),
        }
    }
}

/// `GET /api/status`.
#[derive(Debug, Serialize)]
pub struct View {
    pub now_ms: u64,
    pub version: &'static str,
    /// Seconds the rates, error counts and quantiles are taken over (less just after start).
    pub window_s: u64,
    pub in_flight: usize,
    pub max_in_flight: usize,
    pub cache: Option<CacheView>,
    pub providers: Vec<ProviderView>,
    /// The latest failures of every provider, newest first.
    pub recent_failures: Vec<ListedFailure>,
    /// Each daily budget today: its limit, used and left.
    pub budgets: Vec<BudgetFigure>,
}

#[derive(Debug, Serialize)]
pub struct CacheView {
    pub hits: u64,
    pub misses: u64,
    /// Over the window; `None` without lookups in it.
    pub hit_ratio: Option<f64>,
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ProviderView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub priority: i32,
    pub models: Vec<String>,
    /// Endpoints (replicas of its server) it spreads requests over.
    pub endpoints: usize,
    /// healthy, degraded, unhealthy, circuit_open, half_open, cooling_down, draining,
    /// disabled: the first that holds, from the last.
    pub state: &'static str,
    /// The operator's order: serve, disable or drain.
    pub order: &'static str,
    pub circuit: &'static str,
    pub cooling_down_ms: u64,
    pub health: Option<HealthView>,
    pub requests_per_s: f64,
    pub prompts_per_s: f64,
    /// Failed upstream requests over those sent, in the window.
    pub error_rate: Option<f64>,
    /// Failures in the window by kind (kinds with none left out).
    pub errors_by_kind: Vec<(&'static str, u64)>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub in_flight: usize,
    pub concurrency_limit: usize,
    pub adaptive: bool,
    pub mean_batch_size: Option<f64>,
    pub queued: u64,
    pub requests: u64,
    pub failures: u64,
    /// Five minutes, a point per sample: requests/s, failures/s and p50 in each.
    pub history: Vec<Point>,
    /// What its answers cost today (UTC), as this router counted them.
    pub spent_usd_today: f64,
}

#[derive(Debug, Serialize)]
pub struct HealthView {
    pub healthy: bool,
    pub interval_s: f64,
    pub passed_in_a_row: u32,
    pub failed_in_a_row: u32,
    pub last_at_ms: Option<u64>,
    pub last_took_ms: Option<f64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Point {
    pub at_ms: u64,
    pub requests_per_s: f64,
    pub failures_per_s: f64,
    pub p50_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ListedFailure {
    pub at_ms: u64,
    pub provider: String,
    pub kind: &'static str,
    pub http_status: Option<u16>,
    pub error: String,
}

fn provider_view(
    s: &Snapshot,
    then: Option<&Reading>,
    secs: f64,
    history: Vec<Point>,
) -> ProviderView {
    let zero = Reading {
        name: s.name.clone(),
        requests: 0,
        items: 0,
        failures: 0,
        by_kind: [0; FailureKind::ALL.len()],
        latencies: Latencies::default(),
    };
    let then = then.unwrap_or(&zero);
    let sent = s.counts.requests.saturating_sub(then.requests);
    let failed = s.counts.failures.saturating_sub(then.failures);
    let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let errors_by_kind = FailureKind::ALL
        .iter()
        .zip(s.failures_by_kind.iter().zip(then.by_kind))
        .map(|(k, (now, was))| (k.metric_name(), now.saturating_sub(was)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let error_rate = ratio(failed, sent.max(failed));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    ProviderView {
        name: s.name.to_string(),
        kind: s.kind.as_str(),
        priority: s.priority,
        models: s.models.clone(),
        endpoints: s.endpoints,
        state: state(s, error_rate),
        order: s.order.as_str(),
        circuit: s.circuit.as_str(),
        cooling_down_ms: s.cooling_down.as_millis() as u64,
        health: s.health.as_ref().map(|h| HealthView {
            healthy: h.healthy,
            interval_s: h.interval.as_secs_f64(),
            passed_in_a_row: h.record.passed_in_a_row,
            failed_in_a_row: h.record.failed_in_a_row,
            last_at_ms: h.record.last.as_ref().map(|p| unix_ms(p.at)),
            last_took_ms: h.record.last.as_ref().map(|p| ms(p.took)),
            last_error: h
                .record
                .last
                .as_ref()
                .and_then(|p| p.failure.as_ref())
                .map(|(kind, message)| format!("{kind}: {message}")),
        }),
        requests_per_s: per_s(sent),
        prompts_per_s: per_s(s.counts.items.saturating_sub(then.items)),
        error_rate,
        errors_by_kind,
        p50_ms: s.latencies.quantile_since(&then.latencies, 0.5).map(ms),
        p99_ms: s.latencies.quantile_since(&then.latencies, 0.99).map(ms),
        in_flight: s.in_flight,
        concurrency_limit: s.concurrency_limit,
        adaptive: s.adaptive,
        mean_batch_size: (s.counts.requests > 0)
            .then(|| s.counts.items as f64 / s.counts.requests as f64),
        spent_usd_today: 0.0,
        queued: s.counts.queued,
        requests: s.counts.requests,
        failures: s.counts.failures,
        history,
    }
}

/// The state the page shows: an operator's order first, then what keeps new requests away,
/// then how the provider is doing.
fn state(s: &Snapshot, error_rate: Option<f64>) -> &'static str {
    match s.order {
        Order::Disable => return "disabled",
        Order::Drain if s.in_flight > 0 => return "draining",
        Order::Drain => return "disabled",
        Order::Serve => {}
    }
    if s.health.as_ref().is_some_and(|h| !h.healthy) {
        return "unhealthy";
    }
    match s.circuit {
        Circuit::Open => return "circuit_open",
        Circuit::HalfOpen => return "half_open",
        Circuit::Closed => {}
    }
    if !s.cooling_down.is_zero() {
        return "cooling_down";
    }
    let probe_failed = s
        .health
        .as_ref()
        .is_some_and(|h| h.record.failed_in_a_row > 0);
    if probe_failed || error_rate.is_some_and(|r| r > DEGRADED_ERROR_RATE) {
        return "degraded";
    }
    "healthy"
}

/// One point per pair of neighbouring samples, for the provider `name`.
fn history<'a>(samples: &'a VecDeque<Sample>, name: &str) -> Vec<Point> {
    let reading = |s: &'a Sample| s.providers.iter().find(|r| &*r.name == name);
    samples
        .iter()
        .zip(samples.iter().skip(1))
        .filter_map(|(a, b)| {
            let (ra, rb) = (reading(a)?, reading(b)?);
            let secs = seconds_between(a.at, b.at);
            if secs <= 0.0 {
                return None;
            }
            Some(Point {
                at_ms: unix_ms(b.at),
                requests_per_s: rb.requests.saturating_sub(ra.requests) as f64 / secs,
                failures_per_s: rb.failures.saturating_sub(ra.failures) as f64 / secs,
                p50_ms: rb
                    .latencies
                    .quantile_since(&ra.latencies, 0.5)
                    .map(|d| d.as_secs_f64() * 1e3),
            })
        })
        .collect()
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn seconds_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).unwrap_or_default().as_secs_f64()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}
