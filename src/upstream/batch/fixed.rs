//! Fixed batching: a batch closes when full or when its oldest item has waited `max_wait`
//! (Triton's dynamic-batcher rule), or earlier when an item's deadline is near.

use super::dispatch::{fail_all, send_native, send_parallel};
use super::*;

/// Fixed batching: Triton's dynamic-batcher rule (see the module docs).
pub(super) async fn worker(
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
