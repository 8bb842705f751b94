//! Micro-batching: prompts for the same provider, model and generation parameters that arrive
//! close together go upstream as one request, and each answer goes back to its caller.
//!
//! A [`Batcher`] per provider keeps one queue per [`BatchKey`]: a handle (bounded channel plus
//! a count of queued items) and a worker task, in the shape of tower's `Buffer`. Two policies:
//!
//! - **adaptive** (the default): items gather while every slot under the learned
//!   concurrency limit (`limit`) is taken, and leave when one frees, in batches of
//!   ceil(callers' prompts / limit) — the prompts waiting and in flight at their recent peak
//!   ([`Demand`]), so the load spreads evenly over the requests the provider is sent at once
//!   (waiting up to `max_wait` for callers of a batch just answered to send again). A lone
//!   caller pays no window.
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
//!
//! Here: the queues and their handle ([`Batcher`], one [`BatchKey`] per queue); in
//! `adaptive` and `fixed` the two workers; in `dispatch` how a batch goes upstream.

mod adaptive;
mod dispatch;
mod fixed;
#[cfg(test)]
mod tests;

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
    completion::{CompletionRequest, FailureKind, Fingerprint, Input},
    config::{BatchMode, BatchingConfig, ProviderConfig},
    provider::ProviderError,
};

use adaptive::adaptive_worker;
use fixed::worker;

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
        let mut params = Fingerprint::default();
        r.params.hash_into(&mut |b: &[u8]| params.field(b));
        BatchKey {
            model: model.clone(),
            chat: matches!(r.input, Input::Chat(_)),
            params: params.finish(),
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

/// The latest a batch holding this item may close (see [`Window::close_by`]).
fn close_by(item: &Item, fastest: Duration) -> Instant {
    item.window.close_by(item.enqueued, fastest)
}
