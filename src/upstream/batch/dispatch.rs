//! How a batch goes upstream: one request carrying every prompt (providers that take prompt
//! arrays), or concurrent single requests over the pooled connections; each answer back to
//! its caller.

use super::*;

/// One item as its own request, on a slot the worker holds for it.
pub(super) async fn send_on(link: Arc<Link>, model: Arc<str>, mut item: Item, slot: Slot) {
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

/// One upstream request carrying every prompt of the batch.
pub(super) async fn send_native(
    link: Arc<Link>,
    model: Arc<str>,
    mut batch: Vec<Item>,
    slot: Slot,
) {
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
    // The earliest caller's window bounds the wait for the provider's quota.
    let first = batch.iter().map(|i| i.window).min_by_key(|w| w.until);
    let all_gone = async {
        for item in &mut batch {
            if let Some(tx) = item.tx.as_mut() {
                tx.closed().await;
            }
        }
    };
    let outcome = tokio::select! {
        r = link.complete_batch(slot, &model, &requests, window, first.unwrap_or(window)) => r,
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
pub(super) async fn send_parallel(link: &Link, model: &str, batch: &mut [Item]) -> usize {
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

pub(super) fn fail_all(batch: &mut [Item], e: &ProviderError) {
    for item in batch {
        item.answer(Err(e.clone()));
    }
}
