//! Micro-batching: prompts for the same provider, model and generation parameters that arrive
//! close together go upstream as one request, and each answer goes back to its caller.
//!
//! A [`Batcher`] per provider keeps one queue per [`BatchKey`]: a handle (bounded channel plus
//! a count of queued items) and a worker task, in the shape of tower's `Buffer`. Two policies:
//!
//! - **adaptive** (the default): an item goes at once while the provider has room under its
//!   learned concurrency limit (`limit`); what arrives while it is busy gathers and leaves
//!   when a slot frees, in batches of ceil(callers' prompts / parallelism) — the prompts
//!   waiting and in flight at their recent peak ([`Demand`]) — so the load spreads evenly over
//!   the requests the provider serves in parallel (waiting up to `max_wait` for callers of a
//!   batch just answered to send again; a fragment with that many requests already in flight
//!   waits for one to come back). A lone caller pays no window.
//! - **fixed**: the worker closes a batch when `max_batch_size` items are queued or the oldest
//!   has waited `max_wait` — Triton's dynamic batcher rule — and earlier when an item's
//!   deadline is near (its deadline minus the provider's fastest answer). It then waits for a
//!   concurrency slot, tops the batch up with whatever arrived meanwhile, drops items whose
//!   callers went away, and sends.
//!
//! Either way: Providers that take many prompts in one request (OpenAI-style `/completions`) get
//! one request, answers matched by `choices[].index`; others get the batch as concurrent
//! requests over the pooled connections. A batch-level failure fails every item (each then
//! moves on in its own cascade); a per-item failure fails only that item.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use dashmap::DashMap;
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, sleep_until, timeout_at},
};
use tracing::Instrument;

use super::{
    Delivered,
    attempt::Window,
    link::{Link, Slot},
};
use crate::{
    completion::{CompletionRequest, FailureKind, Input},
    config::{BatchMode, BatchingConfig, ProviderConfig},
    provider::ProviderError,
};

/// Adaptive batching waits for callers coming back to fill a batch no longer than this
/// without one arriving — at least; see [`arrival_gap`].
const ARRIVAL_GAP: Duration = Duration::from_millis(1);

/// How long a pause in arrivals ends the wait for company: an eighth of the provider's
/// quickest answer, at least [`ARRIVAL_GAP`], at most `max_wait`. Callers answered together
/// come back spread over their own round trips (a few ms on a loaded machine); against a
/// long service time, waiting for the stragglers costs little and saves a fragment that would
/// hold a slot for a whole service time.
fn arrival_gap(fastest: Duration, max_wait: Duration) -> Duration {
    (fastest / 8)
        .max(ARRIVAL_GAP)
        .min(max_wait.max(ARRIVAL_GAP))
}

/// Prompts the callers keep here (waiting or in flight), as its recent peak. The count seen
/// when a slot frees is short by the batch just answered — its callers are between their
/// answer and their next prompt — so batches sized to it would come out a fragment short.
/// A running max over two windows, each two of the provider's quickest answers long (in the
/// manner of BBR's bandwidth filter), so a fall in demand is followed within about four.
struct Demand {
    since: Instant,
    current: usize,
    previous: usize,
    /// The last count: the peak so far carries into the next window if it is this recent.
    last: Instant,
}

impl Demand {
    fn new() -> Demand {
        Demand {
            since: Instant::now(),
            current: 0,
            previous: 0,
            last: Instant::now(),
        }
    }

    /// Counts `seen` prompts here now; returns the recent peak (at least `seen`).
    fn see(&mut self, seen: usize, fastest: Duration) -> usize {
        let window = (fastest * 2).max(ARRIVAL_GAP);
        let now = Instant::now();
        if now - self.since >= window {
            // Counts come only as prompts arrive or leave, so a window may pass unseen: what
            // was counted within the last two windows still stands; older, it is forgotten.
            self.previous = if now - self.last < window * 2 {
                self.current
            } else {
                0
            };
            self.current = 0;
            self.since = now;
        }
        self.last = now;
        self.current = self.current.max(seen);
        self.current.max(self.previous)
    }
}

/// A worker with nothing queued for this long exits; the next item starts a new one.
const IDLE_EXIT: Duration = Duration::from_secs(30);

/// Requests that may share an upstream request: same model, same input kind, and the same
/// parameters — every field of them, hashed by [`crate::completion::GenParams::hash_into`] as the cache key is,
/// so a field added later cannot be merged across requests that differ in it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BatchKey {
    model: Arc<str>,
    chat: bool,
    params: [u8; 32],
}

impl BatchKey {
    fn of(model: &Arc<str>, r: &CompletionRequest) -> BatchKey {
        let mut h = blake3::Hasher::new();
        r.params.hash_into(&mut |b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        });
        BatchKey {
            model: model.clone(),
            chat: matches!(r.input, Input::Chat(_)),
            params: *h.finalize().as_bytes(),
        }
    }
}

type Reply = Result<Delivered, ProviderError>;

/// One caller's request in a queue, with its span (as tower's `buffer::Message` carries one),
/// so what happens to it in the worker is logged as part of its request.
struct Item {
    request: Arc<CompletionRequest>,
    /// When this caller's try ends.
    window: Window,
    enqueued: Instant,
    span: tracing::Span,
    /// `None` once answered.
    tx: Option<oneshot::Sender<Reply>>,
}

impl Item {
    fn gone(&self) -> bool {
        self.tx.as_ref().is_none_or(oneshot::Sender::is_closed)
    }

    fn answer(&mut self, reply: Reply) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(reply);
        }
    }
}

#[derive(Clone)]
struct Queue {
    tx: mpsc::Sender<Item>,
    queued: Arc<AtomicUsize>,
}

/// The batch queues of one provider.
pub(super) struct Batcher {
    link: Arc<Link>,
    default: Option<BatchingConfig>,
    per_model: std::collections::BTreeMap<String, BatchingConfig>,
    queues: DashMap<BatchKey, Queue>,
}

impl Batcher {
    /// `None` when neither the provider nor any of its models batches.
    pub(super) fn new(c: &ProviderConfig, link: &Arc<Link>) -> Option<Batcher> {
        (c.batching.is_some() || !c.model_batching.is_empty()).then(|| Batcher {
            link: link.clone(),
            default: c.batching,
            per_model: c.model_batching.clone(),
            queues: DashMap::new(),
        })
    }

    /// The batching settings for `model`, if it batches.
    pub(super) fn settings(&self, model: &str) -> Option<BatchingConfig> {
        self.per_model.get(model).copied().or(self.default)
    }

    /// Queues one request and waits for its answer. A full queue fails at once with
    /// [`FailureKind::Overloaded`]. Dropping the future withdraws the item.
    pub(super) async fn submit(
        &self,
        model: &Arc<str>,
        request: &Arc<CompletionRequest>,
        settings: BatchingConfig,
        window: Window,
    ) -> Reply {
        let key = BatchKey::of(model, request);
        let (tx, rx) = oneshot::channel();
        let mut item = Item {
            request: request.clone(),
            window,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
            tx: Some(tx),
        };
        // A worker that exited while idle leaves a closed channel: replace it and try again.
        for _ in 0..2 {
            let queue = self.queue(&key, settings);
            if queue.queued.fetch_add(1, Relaxed) >= settings.max_queue {
                queue.queued.fetch_sub(1, Relaxed);
                return Err(ProviderError::new(
                    FailureKind::Overloaded,
                    format!("batch queue full ({} items)", settings.max_queue),
                ));
            }
            self.link.stats.queued(1);
            match queue.tx.try_send(item) {
                Ok(()) => {
                    return rx.await.unwrap_or_else(|_| {
                        Err(ProviderError::new(
                            FailureKind::Overloaded,
                            "batch worker stopped",
                        ))
                    });
                }
                Err(e) => {
                    queue.queued.fetch_sub(1, Relaxed);
                    self.link.stats.dequeued(1);
                    item = match e {
                        mpsc::error::TrySendError::Closed(i)
                        | mpsc::error::TrySendError::Full(i) => i,
                    };
                    self.queues
                        .remove_if(&key, |_, q| q.tx.same_channel(&queue.tx));
                }
            }
        }
        Err(ProviderError::new(
            FailureKind::Overloaded,
            "batch queue unavailable",
        ))
    }

    fn queue(&self, key: &BatchKey, settings: BatchingConfig) -> Queue {
        if let Some(q) = self.queues.get(key)
            && !q.tx.is_closed()
        {
            return q.clone();
        }
        self.queues
            .entry(key.clone())
            .and_modify(|q| {
                if q.tx.is_closed() {
                    *q = spawn_worker(&self.link, key, settings);
                }
            })
            .or_insert_with(|| spawn_worker(&self.link, key, settings))
            .clone()
    }
}

fn spawn_worker(link: &Arc<Link>, key: &BatchKey, settings: BatchingConfig) -> Queue {
    // The channel holds at most what `queued` admits, plus slack for the race in `submit`.
    let (tx, rx) = mpsc::channel(settings.max_queue + 1);
    let queued = Arc::new(AtomicUsize::new(0));
    // Chat requests have no array form; prompt requests go as arrays when the provider takes
    // them (decided again for each batch: a provider can stop taking them).
    let native = !key.chat;
    let (link, model, counted) = (link.clone(), key.model.clone(), queued.clone());
    match settings.mode {
        BatchMode::Fixed => tokio::spawn(worker(link, model, native, settings, rx, counted)),
        BatchMode::Adaptive => {
            tokio::spawn(adaptive_worker(link, model, native, settings, rx, counted))
        }
    };
    Queue { tx, queued }
}

/// The next item, or `None` once the queue has been idle for [`IDLE_EXIT`] (new items are
/// then refused; any that slipped in before the close are still served) or is closed.
async fn next_or_idle(rx: &mut mpsc::Receiver<Item>) -> Option<Item> {
    match timeout_at(Instant::now() + IDLE_EXIT, rx.recv()).await {
        Ok(item) => item,
        Err(_) => {
            rx.close();
            rx.try_recv().ok()
        }
    }
}

/// Adaptive batching: an item goes at once while the provider has room under its learned
/// concurrency limit; items arriving while it is busy gather and leave together when room
/// frees, in batches sized to spread the waiting prompts evenly over the limit (at most
/// `max_batch_size`). No item waits for company while the provider has room.
async fn adaptive_worker(
    link: Arc<Link>,
    model: Arc<str>,
    native: bool,
    settings: BatchingConfig,
    mut rx: mpsc::Receiver<Item>,
    queued: Arc<AtomicUsize>,
) {
    let mut pending: VecDeque<Item> = VecDeque::new();
    let mut demand = Demand::new();
    loop {
        if pending.is_empty() {
            match next_or_idle(&mut rx).await {
                Some(item) => pending.push_back(item),
                None => return,
            }
        }
        // Room at the provider, waited for in arrival order while more items gather.
        let slot = {
            let room = link.slot();
            tokio::pin!(room);
            loop {
                tokio::select! {
                    biased;
                    slot = &mut room => break slot,
                    Some(item) = rx.recv() => {
                        pending.push_back(item);
                        let seen = pending.len() + link.limit.items_in_flight();
                        demand.see(seen, link.stats.fastest());
                    }
                }
            }
        };
        while let Ok(item) = rx.try_recv() {
            pending.push_back(item);
        }
        let mut slot = match slot {
            Ok(slot) => slot,
            Err(e) => {
                let n = pending.len();
                queued.fetch_sub(n, Relaxed);
                link.stats.dequeued(n);
                return fail_all(pending.make_contiguous(), &e);
            }
        };
        // Callers that went away, or whose try ended while the provider was busy, leave.
        let now = Instant::now();
        let before = pending.len();
        pending.retain_mut(|i| {
            if i.window.until <= now {
                i.answer(Err(ProviderError::new(
                    FailureKind::Overloaded,
                    "no free slot before its time ran out",
                )));
            }
            !i.gone()
        });
        let left = before - pending.len();
        queued.fetch_sub(left, Relaxed);
        link.stats.dequeued(left);
        if pending.is_empty() {
            continue;
        }
        let arrays = native && link.takes_arrays();
        let size = if arrays {
            let parallel = link.limit.parallelism().max(1);
            let fastest = link.stats.fastest();
            // The callers' prompts (waiting here or in flight, at their recent peak), spread
            // evenly over the requests the provider serves at once.
            let mut prompts_now =
                |pending: usize| demand.see(pending + link.limit.items_in_flight(), fastest);
            let target =
                |prompts: usize| prompts.div_ceil(parallel).clamp(1, settings.max_batch_size);
            let mut prompts = prompts_now(pending.len());
            // Under load, the callers of a batch that just came back send again a moment
            // after its slot frees: wait for them (at most max_wait, never past an item's
            // close-by time) rather than send a fragment. They come back together, so a pause
            // in arrivals ends the wait. But when as many requests are in flight as the
            // callers' prompts make at this size (at most the parallelism), this slot is
            // headroom and the provider is busy: a fragment sent there would wait a whole
            // service time at the provider, or take a slot a whole batch needs, so it waits
            // here until a request comes back (its callers then join it) — as items wait
            // when no slot is free. A lone caller's target is 1: no wait.
            if pending.len() < target(prompts) {
                let close = pending
                    .iter()
                    .map(|i| close_by(i, fastest))
                    .min()
                    .unwrap_or(now);
                let headroom = |prompts: usize| {
                    let requests = prompts.div_ceil(target(prompts));
                    link.limit.requests_in_flight() >= requests.min(parallel)
                };
                let gap = arrival_gap(fastest, settings.max_wait);
                let mut window = None;
                while pending.len() < target(prompts) {
                    // Taken before the check, so a release between the two is not missed.
                    let returned = link.limit.released();
                    let pause = if headroom(prompts) {
                        window = None;
                        close
                    } else {
                        let end = *window
                            .get_or_insert_with(|| close.min(Instant::now() + settings.max_wait));
                        end.min(Instant::now() + gap)
                    };
                    tokio::select! {
                        biased;
                        item = rx.recv() => match item {
                            Some(item) => pending.push_back(item),
                            None => break,
                        },
                        () = returned, if window.is_none() => {}
                        () = sleep_until(pause) => break,
                    }
                    prompts = prompts_now(pending.len());
                }
            }
            target(prompts).min(pending.len())
        } else {
            1
        };
        // Counted in flight from now, so the next batch's size sees this one.
        slot.carry(size);
        let mut batch: Vec<Item> = pending.drain(..size).collect();
        queued.fetch_sub(size, Relaxed);
        link.stats.dequeued(size);
        link.observe_batch(
            size,
            batch
                .iter()
                .map(|i| now.saturating_duration_since(i.enqueued)),
        );
        for item in &batch {
            item.span.in_scope(|| {
                tracing::debug!(provider = %link.name, batch_size = size, "batch closed");
            });
        }
        let (link, model) = (link.clone(), model.clone());
        if arrays {
            tokio::spawn(send_native(link, model, batch, slot));
        } else if let Some(item) = batch.pop() {
            tokio::spawn(send_on(link, model, item, slot));
        }
    }
}

/// One item as its own request, on a slot the worker holds for it.
async fn send_on(link: Arc<Link>, model: Arc<str>, mut item: Item, slot: Slot) {
    let Some(tx) = item.tx.as_mut() else { return };
    let sent = Instant::now();
    let call = link.complete_on(slot, &model, &item.request, item.window);
    let result = tokio::select! {
        r = call.instrument(item.span.clone()) => r,
        () = tx.closed() => return,
    };
    let queue_wait = sent.saturating_duration_since(item.enqueued);
    item.answer(result.map(|(completion, took)| Delivered {
        completion,
        batch_size: 1,
        queue_wait,
        upstream: took,
    }));
}

/// Fixed batching: Triton's dynamic-batcher rule (see the module docs).
async fn worker(
    link: Arc<Link>,
    model: Arc<str>,
    native: bool,
    settings: BatchingConfig,
    mut rx: mpsc::Receiver<Item>,
    queued: Arc<AtomicUsize>,
) {
    let max = settings.max_batch_size;
    loop {
        let Some(first) = next_or_idle(&mut rx).await else {
            return;
        };
        let fastest = link.stats.fastest();
        let mut flush_at = first.enqueued + settings.max_wait;
        let mut batch = Vec::with_capacity(max);
        let take = |batch: &mut Vec<Item>, item: Item, flush_at: &mut Instant| {
            *flush_at = (*flush_at).min(close_by(&item, fastest));
            batch.push(item);
        };
        take(&mut batch, first, &mut flush_at);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(item) => {
                    take(&mut batch, item, &mut flush_at);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if Instant::now() >= flush_at {
                break;
            }
            tokio::select! {
                biased;
                item = rx.recv() => match item {
                    Some(item) => take(&mut batch, item, &mut flush_at),
                    None => break,
                },
                () = sleep_until(flush_at) => break,
            }
        }
        // Native batches take one concurrency slot; while waiting for it, more items queue and
        // join this batch, so batches grow with load.
        let slot = if native && link.takes_arrays() {
            match link.slot().await {
                Ok(s) => Some(s),
                Err(e) => return fail_all(&mut batch, &e),
            }
        } else {
            None
        };
        while batch.len() < max {
            let Ok(item) = rx.try_recv() else { break };
            batch.push(item);
        }
        queued.fetch_sub(batch.len(), Relaxed);
        link.stats.dequeued(batch.len());
        // The wait for a slot is the router's, not the provider's: a try whose time ran out
        // meanwhile moves on without being sent (and without a verdict on the provider).
        let now = Instant::now();
        for item in batch.iter_mut().filter(|i| i.window.until <= now) {
            item.answer(Err(ProviderError::new(
                FailureKind::Overloaded,
                "no free slot before its time ran out",
            )));
        }
        // Drops those, and the items whose callers went away.
        batch.retain(|i| !i.gone());
        if batch.is_empty() {
            continue;
        }
        let waits = batch
            .iter()
            .map(|i| now.saturating_duration_since(i.enqueued));
        link.observe_batch(batch.len(), waits);
        for item in &batch {
            item.span.in_scope(|| {
                tracing::debug!(provider = %link.name, batch_size = batch.len(), "batch closed");
            });
        }
        let (link, model) = (link.clone(), model.clone());
        match slot {
            Some(slot) => tokio::spawn(send_native(link, model, batch, slot)),
            None => tokio::spawn(async move {
                let mut batch = batch;
                send_parallel(&link, &model, &mut batch).await;
            }),
        };
    }
}

/// The latest a batch holding this item may close and still be answered before the item's
/// try ends: that end less the provider's fastest answer so far, and never less than a
/// quarter of the item's time (up to 50 ms) while that is still unknown — more cautious than
/// an unbatched request's `Link::latest_send`: a fixed batch still waits for a slot after it
/// closes, and one item's close-by time holds back the whole batch.
fn close_by(item: &Item, fastest: Duration) -> Instant {
    let until = item.window.until;
    let budget = until.saturating_duration_since(item.enqueued);
    let reserve = fastest.max((budget / 4).min(Duration::from_millis(50)));
    until.checked_sub(reserve).unwrap_or(item.enqueued)
}

/// One upstream request carrying every prompt of the batch.
async fn send_native(link: Arc<Link>, model: Arc<str>, mut batch: Vec<Item>, slot: Slot) {
    let requests: Vec<Arc<CompletionRequest>> = batch.iter().map(|i| i.request.clone()).collect();
    let sent = Instant::now();
    // The request serves until the provider's timeout or the last caller's try ends.
    let window = Window {
        until: batch.iter().map(|i| i.window.until).max().unwrap_or(sent),
        deadline: batch
            .iter()
            .map(|i| i.window.deadline)
            .max()
            .unwrap_or(sent),
    };
    let budget = link.budget(sent, window);
    let all_gone = async {
        for item in &mut batch {
            if let Some(tx) = item.tx.as_mut() {
                tx.closed().await;
            }
        }
    };
    let outcome = tokio::select! {
        r = link.complete_batch(slot, &model, &requests, budget) => r,
        // Every caller went away: drop the upstream request, judge nothing.
        () = all_gone => return,
    };
    match outcome {
        Ok((results, took)) => {
            let size = u32::try_from(batch.len()).unwrap_or(u32::MAX);
            for (item, result) in batch.iter_mut().zip(results) {
                item.span.in_scope(|| {
                    tracing::debug!(provider = %link.name, batch_size = size, ok = result.is_ok(), "batch answered");
                });
                let queue_wait = sent.saturating_duration_since(item.enqueued);
                item.answer(result.map(|completion| Delivered {
                    completion,
                    batch_size: size,
                    queue_wait,
                    upstream: took,
                }));
            }
        }
        // One bad prompt makes the whole request a 400/413/422: find it by sending the
        // prompts one by one, so the good ones are still answered here.
        Err(e) if batch.len() > 1 && e.kind == FailureKind::Rejected => {
            send_parallel(&link, &model, &mut batch).await;
        }
        // Some servers answer a prompt array with a 500 (they take one prompt at a time). One
        // prompt sent alone tells that from an outage at the cost of one request: if it is
        // answered, the provider is sent no arrays for a while and the rest go singly too;
        // if not, every item moves on, as from any failed batch.
        Err(e) if batch.len() > 1 && e.kind == FailureKind::ServerError => {
            let (probe, rest) = batch.split_at_mut(1);
            if send_parallel(&link, &model, probe).await == 1 {
                link.arrays_refused(&e);
                send_parallel(&link, &model, rest).await;
            } else {
                fail_all(rest, &e);
            }
        }
        Err(e) => fail_all(&mut batch, &e),
    }
}

/// The batch as concurrent single requests, each with its own concurrency slot, each
/// dropped as soon as its caller goes away. Returns how many were answered with a completion.
async fn send_parallel(link: &Link, model: &str, batch: &mut [Item]) -> usize {
    let sent = Instant::now();
    let size = u32::try_from(batch.len()).unwrap_or(u32::MAX);
    let calls = batch.iter_mut().map(|item| {
        let span = item.span.clone();
        async move {
            let Some(tx) = item.tx.as_mut() else {
                return false;
            };
            let call = link.complete(model, &item.request, item.window);
            let result = tokio::select! {
                r = call => r,
                () = tx.closed() => return false,
            };
            let answered = result.is_ok();
            let queue_wait = sent.saturating_duration_since(item.enqueued);
            item.answer(result.map(|(completion, took)| Delivered {
                completion,
                batch_size: size,
                queue_wait,
                upstream: took,
            }));
            answered
        }
        .instrument(span)
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .filter(|answered| *answered)
        .count()
}

fn fail_all(batch: &mut [Item], e: &ProviderError) {
    for item in batch {
        item.answer(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{completion::GenParams, config};

    fn batcher(batching: &str) -> (Arc<Link>, Batcher) {
        batcher_with(batching, "")
    }

    /// `extra`: more of the provider's settings, each followed by a comma.
    fn batcher_with(batching: &str, extra: &str) -> (Arc<Link>, Batcher) {
        let yaml = format!(
            "providers:\n  - {{name: sim, type: simulated, models: [m], {extra} batching: {batching}}}\n"
        );
        let c = config::parse(&yaml, "t", &|_| None).unwrap();
        let p = &c.providers[0];
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let provider = crate::provider::build(p).unwrap();
        let link = Arc::new(Link::new(p, c.cascade.breaker, &metrics, provider));
        let b = Batcher::new(p, &link).unwrap();
        (link, b)
    }

    fn req(prompt: &str) -> Arc<CompletionRequest> {
        Arc::new(CompletionRequest {
            model: "m".into(),
            input: Input::Prompt(prompt.into()),
            params: GenParams::default(),
            agent: String::new(),
            tenant: String::new(),
            request_id: String::new(),
            cache: crate::completion::CacheMode::Default,
        })
    }

    fn later(ms: u64) -> Window {
        Window::whole(Instant::now() + Duration::from_millis(ms))
    }

    #[test]
    fn the_arrival_gap_follows_the_service_time_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(arrival_gap(ms(20), ms(5)), Duration::from_micros(2500));
        assert_eq!(arrival_gap(ms(50), ms(5)), ms(5), "no longer than max_wait");
        assert_eq!(
            arrival_gap(ms(4), ms(5)),
            ARRIVAL_GAP,
            "no shorter than 1 ms"
        );
        assert_eq!(arrival_gap(ms(50), ms(0)), ARRIVAL_GAP);
    }

    #[tokio::test(start_paused = true)]
    async fn lone_item_waits_exactly_the_window() {
        let (_, b) = batcher("{mode: fixed, max_batch_size: 8, max_wait_ms: 5}");
        let s = b.settings("m").unwrap();
        let r = b
            .submit(&"m".into(), &req("x"), s, later(60_000))
            .await
            .unwrap();
        assert_eq!((r.batch_size, r.queue_wait), (1, Duration::from_millis(5)));
        assert_eq!(r.completion.text, "[m] you said: x");
    }

    #[tokio::test(start_paused = true)]
    async fn full_batch_goes_at_once() {
        let (up, b) = batcher("{mode: fixed, max_batch_size: 4, max_wait_ms: 1000}");
        let s = b.settings("m").unwrap();
        let model: Arc<str> = "m".into();
        let reqs: Vec<_> = (0..4).map(|i| req(&format!("p{i}"))).collect();
        let out = futures_util::future::join_all(
            reqs.iter().map(|r| b.submit(&model, r, s, later(60_000))),
        )
        .await;
        for (i, r) in out.into_iter().enumerate() {
            let r = r.unwrap();
            assert_eq!((r.batch_size, r.queue_wait), (4, Duration::ZERO));
            assert_eq!(
                r.completion.text,
                format!("[m] you said: p{i}"),
                "answers map back to their callers"
            );
        }
        assert_eq!(up.stats.counts().requests, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn near_deadline_flushes_early() {
        let (_, b) = batcher("{mode: fixed, max_batch_size: 8, max_wait_ms: 1000}");
        let s = b.settings("m").unwrap();
        let r = b
            .submit(&"m".into(), &req("x"), s, later(100))
            .await
            .unwrap();
        // A quarter of the 100 ms budget is kept for the upstream call.
        assert_eq!(r.queue_wait, Duration::from_millis(75));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_item_is_dropped_before_send() {
        let (up, b) = batcher("{mode: fixed, max_batch_size: 8, max_wait_ms: 10}");
        let s = b.settings("m").unwrap();
        let model: Arc<str> = "m".into();
        let ra = req("a");
        let mut a = Box::pin(b.submit(&model, &ra, s, later(60_000)));
        assert!(
            tokio::time::timeout(Duration::from_millis(1), &mut a)
                .await
                .is_err(),
            "a is queued"
        );
        assert_eq!(up.stats.counts().queued, 1);
        drop(a);
        let r = b.submit(&model, &req("b"), s, later(60_000)).await.unwrap();
        assert_eq!(r.batch_size, 1);
        assert_eq!(up.stats.counts().items, 1, "only b went upstream");
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_refuses_at_once() {
        let (_, b) = batcher("{mode: fixed, max_batch_size: 8, max_wait_ms: 1000, max_queue: 2}");
        let s = b.settings("m").unwrap();
        let model: Arc<str> = "m".into();
        let (r1, r2) = (req("1"), req("2"));
        let mut one = Box::pin(b.submit(&model, &r1, s, later(60_000)));
        let mut two = Box::pin(b.submit(&model, &r2, s, later(60_000)));
        assert!(
            tokio::time::timeout(Duration::from_millis(1), &mut one)
                .await
                .is_err()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(1), &mut two)
                .await
                .is_err()
        );
        let err = b
            .submit(&model, &req("3"), s, later(60_000))
            .await
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::Overloaded);
        assert_eq!(
            one.await.unwrap().batch_size,
            2,
            "the queued two still go, together"
        );
        assert!(two.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_sends_a_lone_item_at_once() {
        let (_, b) = batcher("{max_batch_size: 8, max_wait_ms: 5}");
        let s = b.settings("m").unwrap();
        assert_eq!(s.mode, BatchMode::Adaptive, "the default");
        let started = Instant::now();
        let r = b
            .submit(&"m".into(), &req("x"), s, later(60_000))
            .await
            .unwrap();
        assert_eq!((r.batch_size, r.queue_wait), (1, Duration::ZERO));
        assert_eq!(started.elapsed(), Duration::ZERO, "no window paid");
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_gathers_what_arrives_while_the_provider_is_busy() {
        let (up, b) = batcher_with("{}", "max_concurrency: 1, simulated: {latency_ms: 10},");
        let s = b.settings("m").unwrap();
        let model: Arc<str> = "m".into();
        let first = req("first");
        let mut a = Box::pin(b.submit(&model, &first, s, later(60_000)));
        assert!(
            tokio::time::timeout(Duration::from_millis(4), &mut a)
                .await
                .is_err(),
            "in flight for 10 ms"
        );
        assert_eq!(up.stats.counts().requests, 1, "sent alone, at once");
        let reqs: Vec<_> = (0..3).map(|i| req(&format!("p{i}"))).collect();
        let (a, rest) = tokio::join!(
            a,
            futures_util::future::join_all(reqs.iter().map(|r| b.submit(
                &model,
                r,
                s,
                later(60_000)
            )))
        );
        assert_eq!(a.unwrap().batch_size, 1);
        for (i, r) in rest.into_iter().enumerate() {
            let r = r.unwrap();
            // Sent together when the slot freed (6 ms) and arrivals paused: the first
            // caller, just answered, was counted as coming back, and waited for an eighth
            // of the quickest answer (10 ms / 8, on tokio's millisecond timer 2 ms).
            assert_eq!(
                (r.batch_size, r.queue_wait),
                (3, Duration::from_millis(8)),
                "together, once the slot freed and arrivals paused"
            );
            assert_eq!(r.completion.text, format!("[m] you said: p{i}"));
        }
        assert_eq!(up.stats.counts().requests, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_holds_a_fragment_for_a_request_to_come_back_while_the_provider_is_busy() {
        // Three slots, two of them what the provider serves at once: the third is headroom.
        let (up, b) = batcher_with("{max_wait_ms: 5}", "simulated: {latency_ms: 10},");
        up.limit.settle(3, 2);
        let s = b.settings("m").unwrap();
        let model: Arc<str> = "m".into();
        // One answer first, so the provider's quickest answer (10 ms) is known.
        b.submit(&model, &req("warm"), s, later(60_000))
            .await
            .unwrap();
        let four: Vec<_> = (0..4).map(|i| req(&format!("p{i}"))).collect();
        let first = futures_util::future::join_all(
            four.iter().map(|r| b.submit(&model, r, s, later(60_000))),
        );
        // A fifth caller 1 ms later, while both requests of two are in flight.
        let late = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            b.submit(&model, &req("late"), s, later(60_000)).await
        };
        // Two of the first four send again as soon as they are answered (10 ms).
        let back = async {
            let answered = first.await;
            let again: Vec<_> = ["a", "b"].map(req).into();
            let again = futures_util::future::join_all(
                again.iter().map(|r| b.submit(&model, r, s, later(60_000))),
            )
            .await;
            (answered, again)
        };
        let (late, (answered, again)) = tokio::join!(late, back);
        assert!(answered.iter().all(|r| r.as_ref().unwrap().batch_size == 2));
        let late = late.unwrap();
        assert_eq!(
            (late.batch_size, late.queue_wait),
            (3, Duration::from_millis(9)),
            "held past max_wait on the headroom slot until a request came back, then sent \
             with the callers it had answered"
        );
        assert!(again.iter().all(|r| r.as_ref().unwrap().batch_size == 3));
        assert_eq!(up.stats.counts().requests, 4, "no request for a fragment");
    }

    #[tokio::test(start_paused = true)]
    async fn demand_is_the_recent_peak_and_forgotten_after_two_windows() {
        let mut d = Demand::new();
        let fastest = Duration::from_millis(10);
        assert_eq!(d.see(64, fastest), 64);
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(
            d.see(48, fastest),
            64,
            "a batch's callers on their way back"
        );
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(d.see(1, fastest), 64, "the window before still counts");
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(
            d.see(1, fastest),
            1,
            "two windows on, only what is seen now"
        );
        // Counted at 0 and 15 ms of a window, next at 45 ms: the window from 20 to 40 ms
        // passed unseen, and the count at 15 ms still stands.
        let mut d = Demand::new();
        assert_eq!(d.see(64, fastest), 64);
        tokio::time::advance(Duration::from_millis(15)).await;
        d.see(60, fastest);
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(d.see(57, fastest), 64, "last counted 30 ms ago");
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_spreads_the_waiting_items_over_the_limit() {
        // Four slots (the starting limit), 40 callers at once: four batches of ten.
        let (up, b) = batcher_with("{}", "simulated: {latency_ms: 10},");
        let s = b.settings("m").unwrap();
        let model: Arc<str> = "m".into();
        let reqs: Vec<_> = (0..40).map(|i| req(&format!("p{i}"))).collect();
        let out = futures_util::future::join_all(
            reqs.iter().map(|r| b.submit(&model, r, s, later(60_000))),
        )
        .await;
        let mut sizes: Vec<u32> = out.iter().map(|r| r.as_ref().unwrap().batch_size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        assert_eq!(sizes, [10], "{sizes:?}");
        assert_eq!(up.stats.counts().requests, 4);
    }
}
