//! Calls in flight: the global bound (`limits.max_in_flight`, beyond which a call is shed at
//! once with RESOURCE_EXHAUSTED) and the drain at shutdown (no new calls; wait for the ones
//! running; when the grace period ends, answer those still running with UNAVAILABLE).
//!
//! Hand-written because it is three atomics and a `Notify`: tower's `ConcurrencyLimit` +
//! `LoadShed` would shed health checks and reflection too, and know nothing of draining.

use std::{
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
};

use tokio::sync::Notify;

use crate::error::RouterError;

pub struct InFlight {
    count: AtomicUsize,
    max: usize,
    draining: AtomicBool,
    abandoned: AtomicBool,
    /// Woken when the count falls to zero, and when the calls are abandoned.
    changed: Notify,
}

/// One call's place in flight, given back when dropped: borrowed for a unary call (no
/// shared reference count touched on the hot path), owned for a stream, which holds it
/// until its last message.
#[must_use]
pub struct Ticket<H: Deref<Target = InFlight>>(H);

impl<H: Deref<Target = InFlight>> Drop for Ticket<H> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, SeqCst) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

impl InFlight {
    pub fn new(max: usize) -> InFlight {
        InFlight {
            count: AtomicUsize::new(0),
            max,
            draining: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// Admits a call, or says why not: the router is draining, or `max` calls are running.
    pub fn enter(&self) -> Result<Ticket<&InFlight>, RouterError> {
        self.take_place().map(|()| Ticket(self))
    }

    /// [`InFlight::enter`] for a call that outlives its handler (a stream).
    pub fn enter_owned(self: &Arc<Self>) -> Result<Ticket<Arc<InFlight>>, RouterError> {
        self.take_place().map(|()| Ticket(self.clone()))
    }

    fn take_place(&self) -> Result<(), RouterError> {
        if self.draining.load(SeqCst) {
            return Err(RouterError::ShuttingDown);
        }
        if self.count.fetch_add(1, SeqCst) >= self.max {
            self.count.fetch_sub(1, SeqCst);
            return Err(RouterError::AtCapacity { max: self.max });
        }
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.count.load(SeqCst)
    }

    /// From now on, new calls are refused.
    pub fn drain(&self) {
        self.draining.store(true, SeqCst);
    }

    /// Resolves once no call is in flight.
    pub async fn idle(&self) {
        self.wait_until(|| self.count.load(SeqCst) == 0).await;
    }

    /// Tells every call still running to give up (the grace period is over).
    pub fn abandon(&self) {
        self.abandoned.store(true, SeqCst);
        self.changed.notify_waiters();
    }

    /// Resolves when [`InFlight::abandon`] is called: a running call then answers UNAVAILABLE.
    pub async fn abandoned(&self) {
        self.wait_until(|| self.abandoned.load(SeqCst)).await;
    }

    async fn wait_until(&self, done: impl Fn() -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between the two is not missed.
            changed.as_mut().enable();
            if done() {
                return;
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounds_calls_and_drains() {
        let f = Arc::new(InFlight::new(2));
        let a = f.enter().unwrap();
        let b = f.enter().unwrap();
        assert!(matches!(f.enter(), Err(RouterError::AtCapacity { max: 2 })));
        f.drain();
        assert!(matches!(f.enter(), Err(RouterError::ShuttingDown)));
        let idle = f.idle();
        tokio::pin!(idle);
        assert!(futures_util::poll!(idle.as_mut()).is_pending());
        drop(a);
        assert!(
            futures_util::poll!(idle.as_mut()).is_pending(),
            "one still runs"
        );
        drop(b);
        idle.await;
        assert_eq!(f.count(), 0);
    }

    #[tokio::test]
    async fn abandon_wakes_running_calls() {
        let f = Arc::new(InFlight::new(8));
        let _running = f.enter().unwrap();
        let waiting = f.abandoned();
        tokio::pin!(waiting);
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        f.abandon();
        waiting.await;
    }
}
