//! A batching simulator: the real batcher and concurrency limit, driven on tokio's paused
//! clock against an in-process provider with a declared cost model, by synthetic callers.
//! A run takes milliseconds of real time and gives the same figures every time, so policies
//! are compared here before any wall-clock run (see `tests`).
//!
//! The provider ([`Model`]) serves at most `slots` requests at once, in arrival order; a
//! request of `n` prompts takes `base + per_prompt × n`, times a factor drawn from a seeded
//! generator when it has `jitter`; with `stalls`, the whole machine now and then stalls and
//! every answer due meanwhile waits for it. Callers are closed loop — each sends a prompt,
//! waits for its answer and sends again after a round trip of 0.2–1 ms (the gRPC hop and the
//! caller's own work, drawn per call) — or open loop at a fixed rate.

#[cfg(test)]
mod tests;

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::{
    sync::Semaphore,
    time::{Instant, sleep, sleep_until},
};

use super::{Window, batch::Batcher, link::Link};
use crate::{
    completion::{Completion, CompletionRequest},
    config,
    metrics::Metrics,
    provider::{Provider, ProviderError},
};

/// A provider's cost model.
#[derive(Clone, Copy, Debug)]
pub(super) struct Model {
    pub name: &'static str,
    /// Per request, whatever it carries.
    pub base: Duration,
    pub per_prompt: Duration,
    /// Requests served at once; the rest wait in arrival order.
    pub slots: usize,
    /// Each service time is scaled by a factor drawn uniformly from `1 ± jitter`.
    pub jitter: f64,
    /// Slots hold prompts, not requests, as llama-server's do (`-np`): a request's prompts
    /// queue one by one for the slots, each holding one for `per_prompt`, and the request is
    /// answered when its last prompt is (after `base` of its own, once).
    pub prompt_slots: bool,
    /// The machine stalls (a busy core: the load generator, the router and the provider
    /// share two on the wall clock): after each answer, with this chance, a stall of this
    /// long begins, and every answer due before it ends waits for its end.
    pub stalls: Option<(f64, Duration)>,
}

/// The provider a [`Model`] describes, counting what reaches it.
struct Simulated {
    model: Model,
    slots: Semaphore,
    rng: Mutex<fastrand::Rng>,
    /// When the machine's current stall ends.
    stalled_until: Mutex<Option<Instant>>,
    requests: AtomicUsize,
    prompts: AtomicUsize,
}

impl Simulated {
    async fn serve(&self, n: usize) {
        self.requests.fetch_add(1, Relaxed);
        self.prompts.fetch_add(n, Relaxed);
        let m = &self.model;
        if m.prompt_slots {
            sleep(m.base).await;
            // Each prompt takes a slot in arrival order (tokio's semaphore is fair).
            let prompts = (0..n).map(|_| async {
                let _slot = self.slots.acquire().await;
                sleep(m.per_prompt.mul_f64(self.factor())).await;
            });
            futures_util::future::join_all(prompts).await;
            return;
        }
        let _slot = self.slots.acquire().await;
        let cost = m.base + m.per_prompt * u32::try_from(n).unwrap_or(u32::MAX);
        sleep(cost.mul_f64(self.factor())).await;
        self.stall().await;
    }

    /// Waits out the machine's stall, if one is on; may begin one.
    async fn stall(&self) {
        let Some((chance, took)) = self.model.stalls else {
            return;
        };
        let until = {
            let now = Instant::now();
            let mut until = self
                .stalled_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let draw = self
                .rng
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .f64();
            if until.is_none_or(|u| u <= now) && draw < chance {
                *until = Some(now + took);
            }
            *until
        };
        if let Some(until) = until {
            sleep_until(until).await;
        }
    }

    /// A service time's factor: drawn uniformly from `1 ± jitter`.
    fn factor(&self) -> f64 {
        let jitter = self.model.jitter;
        if jitter == 0.0 {
            return 1.0;
        }
        let u = self
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .f64();
        1.0 + jitter * (2.0 * u - 1.0)
    }
}

fn answer() -> Completion {
    Completion::text("ok".into(), "stop".into(), None)
}

#[async_trait]
impl Provider for Simulated {
    fn unsupported(&self, _: &CompletionRequest) -> Option<String> {
        None
    }

    async fn complete(&self, _: &str, _: &CompletionRequest) -> Result<Completion, ProviderError> {
        self.serve(1).await;
        Ok(answer())
    }

    fn batches_prompts(&self) -> bool {
        true
    }

    async fn complete_batch(
        &self,
        _: &str,
        requests: &[Arc<CompletionRequest>],
    ) -> Result<Vec<Result<Completion, ProviderError>>, ProviderError> {
        self.serve(requests.len()).await;
        Ok(requests.iter().map(|_| Ok(answer())).collect())
    }
}

/// How the router sends to the provider.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Policy {
    /// No batching: each prompt its own request, under a fixed `max_concurrency`.
    Off,
    /// `mode: adaptive`, every setting at its default.
    Adaptive,
    /// `mode: fixed` with this `max_batch_size` and `max_wait_ms`.
    Fixed(usize, u64),
}

impl Policy {
    fn batching(self) -> String {
        match self {
            Policy::Off => String::new(),
            Policy::Adaptive => "batching: {mode: adaptive}".into(),
            Policy::Fixed(size, wait) => {
                format!("batching: {{mode: fixed, max_batch_size: {size}, max_wait_ms: {wait}}}")
            }
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::Off => f.write_str("off"),
            Policy::Adaptive => f.write_str("adaptive"),
            Policy::Fixed(size, wait) => write!(f, "fixed {size}/{wait}"),
        }
    }
}

/// Who sends.
#[derive(Clone, Copy, Debug)]
pub(super) enum Load {
    /// This many callers, each sending again a round trip after its answer.
    Closed(usize),
    /// A prompt every this often, whatever is in flight.
    Open(Duration),
}

/// What a run measured, over the time after its warm-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Report {
    /// Prompts answered per second.
    pub throughput: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Upstream requests per prompt answered (1 with batching off).
    pub requests_per_prompt: f64,
}

/// Simulated time a run warms up before it measures, and then measures.
pub(super) const WARM_UP: Duration = Duration::from_millis(10000);
pub(super) const MEASURE: Duration = Duration::from_millis(3000);

/// One run on a fresh paused-clock runtime: `policy` against `model` under `load`. Every
/// source of chance is seeded with `seed`, so a run gives the same report every time.
pub(super) fn run(model: Model, policy: Policy, load: Load, seed: u64) -> Report {
    run_for(model, policy, load, seed, MEASURE)
}

/// [`run`], measuring for `measure` (a slow model answers few calls in [`MEASURE`]).
pub(super) fn run_for(
    model: Model,
    policy: Policy,
    load: Load,
    seed: u64,
    measure: Duration,
) -> Report {
    run_after(model, policy, &[], load, seed, measure)
}

/// [`run_for`] on a router that first served each of `history`'s loads for its time,
/// unmeasured: what it learned then carries into the measured run, as on a long-lived router.
pub(super) fn run_after(
    model: Model,
    policy: Policy,
    history: &[(Load, Duration)],
    load: Load,
    seed: u64,
    measure: Duration,
) -> Report {
    paused().block_on(async {
        let (router, provider) = build(model, policy, seed);
        let answered: Arc<Mutex<Vec<Duration>>> = Arc::default();
        for &(load, took) in history {
            let end = Instant::now() + took;
            let mut tasks = tokio::task::JoinSet::new();
            spawn_load(&mut tasks, &router, load, seed, (end, end), &answered);
            while tasks.join_next().await.is_some() {}
        }
        let start = Instant::now();
        let (measure_from, end) = (start + WARM_UP, start + WARM_UP + measure);
        let mut tasks = tokio::task::JoinSet::new();
        spawn_load(
            &mut tasks,
            &router,
            load,
            seed,
            (measure_from, end),
            &answered,
        );
        sleep_until(measure_from).await;
        let before = (
            provider.requests.load(Relaxed),
            provider.prompts.load(Relaxed),
        );
        sleep_until(end).await;
        let requests = provider.requests.load(Relaxed) - before.0;
        let prompts = provider.prompts.load(Relaxed) - before.1;
        while tasks.join_next().await.is_some() {}
        let mut latencies =
            std::mem::take(&mut *answered.lock().unwrap_or_else(PoisonError::into_inner));
        latencies.sort_unstable();
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Report {
            throughput: latencies.len() as f64 / measure.as_secs_f64(),
            p50: at(0.5),
            p99: at(0.99),
            requests_per_prompt: requests as f64 / prompts.max(1) as f64,
        }
    })
}

/// A router with one provider, `model`, batching by `policy`.
fn build(model: Model, policy: Policy, seed: u64) -> (Arc<Sender>, Arc<Simulated>) {
    let yaml = format!(
        "providers:\n  - {{name: sim, type: simulated, models: [m], {}}}\n",
        policy.batching()
    );
    let c = config::parse(&yaml, "simulator", &|_| None).expect("a valid config");
    let p = &c.providers[0];
    let provider = Arc::new(Simulated {
        model,
        slots: Semaphore::new(model.slots),
        rng: Mutex::new(fastrand::Rng::with_seed(seed)),
        stalled_until: Mutex::new(None),
        requests: AtomicUsize::new(0),
        prompts: AtomicUsize::new(0),
    });
    let link = Arc::new(Link::new(
        p,
        c.cascade.breaker,
        &Arc::new(Metrics::new()),
        provider.clone(),
        None,
    ));
    let router = Arc::new(Sender {
        batcher: Batcher::new(p, &link),
        link,
        model: "m".into(),
    });
    (router, provider)
}

/// The wall-clock protocol's runs of one router (`benches/scenarios.py adaptive`), for
/// each of `callers` in turn: an idle [`PROTOCOL_GAP`] (the other routers' runs), a warm-up
/// of 1 s, then [`PROTOCOL_RUNS`] runs of 2 s, each after an idle gap, its callers starting
/// afresh. Gives each run's throughput (prompts answered in it per second), per caller count.
pub(super) fn protocol(
    model: Model,
    policy: Policy,
    callers: &[usize],
    seed: u64,
) -> Vec<Vec<f64>> {
    paused().block_on(async {
        let (router, _) = build(model, policy, seed);
        let answered: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let mut runs = 0;
        let mut each = |load, secs: u64| {
            runs += 1;
            let (router, answered) = (router.clone(), answered.clone());
            let seed = seed ^ (runs << 32);
            async move {
                sleep(PROTOCOL_GAP).await;
                let (start, end) = (Instant::now(), Instant::now() + Duration::from_secs(secs));
                let mut tasks = tokio::task::JoinSet::new();
                spawn_load(&mut tasks, &router, load, seed, (start, end), &answered);
                while tasks.join_next().await.is_some() {}
                let answers =
                    std::mem::take(&mut *answered.lock().unwrap_or_else(PoisonError::into_inner));
                answers.len() as f64 / secs as f64
            }
        };
        let mut out = Vec::new();
        for &c in callers {
            each(Load::Closed(c), 1).await;
            let mut rates = Vec::new();
            for _ in 0..PROTOCOL_RUNS {
                rates.push(each(Load::Closed(c), 2).await);
            }
            out.push(rates);
        }
        out
    })
}

/// A fresh runtime on tokio's paused clock: simulated time passes only while every task
/// waits, so a run takes milliseconds and gives the same figures every time.
fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

/// Between a router's runs in [`protocol`]: the other routers' runs.
pub(super) const PROTOCOL_GAP: Duration = Duration::from_secs(8);
pub(super) const PROTOCOL_RUNS: usize = 5;

/// Callers of `load` on `router` until the window's end; each answer within the window
/// `(from, end)` is recorded in `answered`.
fn spawn_load(
    tasks: &mut tokio::task::JoinSet<()>,
    router: &Arc<Sender>,
    load: Load,
    seed: u64,
    (measure_from, end): (Instant, Instant),
    answered: &Arc<Mutex<Vec<Duration>>>,
) {
    let record = move |sent: Instant, answered: &Mutex<Vec<Duration>>| {
        let now = Instant::now();
        if now >= measure_from && now < end {
            let mut a = answered.lock().unwrap_or_else(PoisonError::into_inner);
            a.push(now - sent);
        }
    };
    match load {
        Load::Closed(callers) => {
            for caller in 0..callers {
                let (router, answered) = (router.clone(), answered.clone());
                let mut rng = fastrand::Rng::with_seed(seed ^ ((caller as u64 + 1) * 0x9e37_79b9));
                let request = CompletionRequest::test_prompt(&format!("caller {caller}"));
                tasks.spawn(async move {
                    // Callers start spread over the first millisecond, as real ones do.
                    sleep(Duration::from_micros(rng.u64(0..1000))).await;
                    while Instant::now() < end {
                        let sent = Instant::now();
                        router.send(&request, end + Duration::from_secs(60)).await;
                        record(sent, &answered);
                        sleep(Duration::from_micros(rng.u64(200..1000))).await;
                    }
                });
            }
        }
        Load::Open(every) => {
            let (router, answered) = (router.clone(), answered.clone());
            tasks.spawn(async move {
                let request = CompletionRequest::test_prompt("open");
                let mut calls = tokio::task::JoinSet::new();
                let mut next = Instant::now();
                while next < end {
                    sleep_until(next).await;
                    let (router, answered, request) =
                        (router.clone(), answered.clone(), request.clone());
                    calls.spawn(async move {
                        let sent = Instant::now();
                        router.send(&request, end + Duration::from_secs(60)).await;
                        record(sent, &answered);
                    });
                    next += every;
                }
                while calls.join_next().await.is_some() {}
            });
        }
    }
}

/// The router's path below the cascade for one provider: its batch queue when it batches,
/// the link alone when not.
struct Sender {
    link: Arc<Link>,
    batcher: Option<Batcher>,
    model: Arc<str>,
}

impl Sender {
    async fn send(&self, request: &Arc<CompletionRequest>, until: Instant) {
        let window = Window::whole(until);
        let answered = match &self.batcher {
            Some(b) => {
                let settings = b.settings(&self.model).expect("the model batches");
                b.submit(&self.model, request, settings, window)
                    .await
                    .map(|_| ())
            }
            None => self
                .link
                .complete(&self.model, request, window)
                .await
                .map(|_| ()),
        };
        answered.expect("the simulated provider answers every prompt");
    }
}
