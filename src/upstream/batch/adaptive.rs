//! Adaptive batching: what is queued goes when a slot frees under the learned limit, in
//! batches sized to spread the callers' prompts evenly over the limit.

use super::dispatch::{fail_all, send_native, send_on};
use super::*;

/// Adaptive batching waits for callers coming back to fill a batch no longer than this
/// without one arriving — at least; see [`arrival_gap`].
pub(super) const ARRIVAL_GAP: Duration = Duration::from_millis(1);

/// How long a pause in arrivals ends the wait for company: an eighth of the provider's
/// quickest answer, at least [`ARRIVAL_GAP`], at most `max_wait`. Callers answered together
/// come back spread over their own round trips (a few ms on a loaded machine); against a
/// long service time, waiting for the stragglers costs little and saves a fragment that would
/// hold a slot for a whole service time.
pub(super) fn arrival_gap(fastest: Duration, max_wait: Duration) -> Duration {
    (fastest / 8)
        .max(ARRIVAL_GAP)
        .min(max_wait.max(ARRIVAL_GAP))
}

/// Prompts the callers keep here (waiting or in flight), as its recent peak. The count seen
/// when a slot frees is short by the batch just answered — its callers are between their
/// answer and their next prompt — so batches sized to it would come out a fragment short.
/// A running max over two windows, each two of the provider's quickest answers long (in the
/// manner of BBR's bandwidth filter), so a fall in demand is followed within about four.
pub(super) struct Demand {
    since: Instant,
    current: usize,
    previous: usize,
    /// The last count: the peak so far carries into the next window if it is this recent.
    last: Instant,
}

impl Demand {
    pub(super) fn new() -> Demand {
        Demand {
            since: Instant::now(),
            current: 0,
            previous: 0,
            last: Instant::now(),
        }
    }

    /// Counts `seen` prompts here now; returns the recent peak (at least `seen`).
    pub(super) fn see(&mut self, seen: usize, fastest: Duration) -> usize {
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

/// Adaptive batching: items gather while every slot is taken and leave when one frees, in
/// batches of the callers' prompts over the limit (at most `max_batch_size`); a lone caller
/// never waits for company.
pub(super) async fn adaptive_worker(
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
            let limit = link.limit.current().max(1);
            let fastest = link.stats.fastest();
            // The callers' prompts (waiting here or in flight, at their recent peak), spread
            // evenly over the requests the provider is sent at once.
            let mut prompts_now =
                |pending: usize| demand.see(pending + link.limit.items_in_flight(), fastest);
            let target = |prompts: usize| prompts.div_ceil(limit).clamp(1, settings.max_batch_size);
            let mut prompts = prompts_now(pending.len());
            // Under load, the callers of the batch whose slot just freed send again a moment
            // later: wait for them rather than send a fragment — until a pause in arrivals,
            // at most max_wait, never past an item's close-by time. A lone caller's target
            // is 1: no wait.
            if pending.len() < target(prompts) {
                let end = pending
                    .iter()
                    .map(|i| close_by(i, fastest))
                    .min()
                    .unwrap_or(now)
                    .min(now + settings.max_wait);
                let gap = arrival_gap(fastest, settings.max_wait);
                while pending.len() < target(prompts) {
                    tokio::select! {
                        biased;
                        item = rx.recv() => match item {
                            Some(item) => pending.push_back(item),
                            None => break,
                        },
                        () = sleep_until(end.min(Instant::now() + gap)) => break,
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
        if pending.is_empty() {
            slot.sent_together();
        }
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
