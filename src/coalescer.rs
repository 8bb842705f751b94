//! Request coalescing (singleflight): identical deterministic requests in flight at the same
//! time share one upstream call.
//!
//! The call runs in its own task, so the first caller leaving does not cancel it for the
//! others; it is aborted only when every caller interested in it has gone (a cancelled call
//! stops its upstream work). Callers wait on a `watch` channel for the one result.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use dashmap::{DashMap, mapref::entry::Entry};
use tokio::{sync::watch, task::AbortHandle};

use crate::{cache::CacheKey, completion::Answer, error::RouterError};

type Outcome = Option<Result<Answer, RouterError>>;

#[derive(Clone)]
struct Flight {
    rx: watch::Receiver<Outcome>,
    interest: Arc<Interest>,
}

struct Interest {
    callers: AtomicUsize,
    abort: std::sync::OnceLock<AbortHandle>,
}

/// One caller's stake in a flight; the last one to leave an unfinished flight aborts it.
struct Stake<'a> {
    coalescer: &'a Coalescer,
    key: CacheKey,
    interest: Arc<Interest>,
}

impl Drop for Stake<'_> {
    fn drop(&mut self) {
        if self.interest.callers.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(abort) = self.interest.abort.get() {
                abort.abort();
            }
            self.coalescer
                .flights
                .remove_if(&self.key, |_, f| Arc::ptr_eq(&f.interest, &self.interest));
        }
    }
}

#[derive(Default)]
pub struct Coalescer {
    /// Keyed by a blake3 hash already: foldhash (seeded per process) hashes it in a few
    /// instructions where std's SipHash took hundreds.
    flights: Arc<DashMap<CacheKey, Flight, foldhash::fast::RandomState>>,
}

impl Coalescer {
    /// Runs `work` for `key`, or joins the identical call already in flight. `on_join` is
    /// called when this caller joins another's call.
    pub async fn run<F, Fut>(
        &self,
        key: CacheKey,
        work: F,
        on_join: impl Fn(),
    ) -> Result<Answer, RouterError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Answer, RouterError>> + Send + 'static,
    {
        // A flight aborted by its last caller just as we joined it ends with no result: run
        // our own then (at most once more).
        for _ in 0..2 {
            let flight = match self.flights.entry(key) {
                Entry::Occupied(e) => {
                    let f = e.get().clone();
                    f.interest.callers.fetch_add(1, Ordering::AcqRel);
                    on_join();
                    f
                }
                Entry::Vacant(e) => {
                    let (tx, rx) = watch::channel(None);
                    let interest = Arc::new(Interest {
                        callers: AtomicUsize::new(1),
                        abort: std::sync::OnceLock::new(),
                    });
                    let flights = self.flights.clone();
                    let mine = interest.clone();
                    let fut = work();
                    // The flight runs in the first caller's span: its log lines are that
                    // request's, and the others' say they joined it.
                    let span = tracing::Span::current();
                    let flight = async move {
                        let outcome = fut.await;
                        flights.remove_if(&key, |_, f| Arc::ptr_eq(&f.interest, &mine));
                        let _ = tx.send(Some(outcome));
                    };
                    let task = tokio::spawn(tracing::Instrument::instrument(flight, span));
                    let _ = interest.abort.set(task.abort_handle());
                    let f = Flight { rx, interest };
                    e.insert(f.clone());
                    f
                }
            };
            let stake = Stake {
                coalescer: self,
                key,
                interest: flight.interest.clone(),
            };
            let mut rx = flight.rx;
            let done = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.clone());
            drop(stake);
            if let Some(outcome) = done {
                return outcome;
            }
        }
        Err(RouterError::Unavailable {
            reason: "the shared upstream call was cancelled",
            attempts: Vec::new(),
        })
    }
}
