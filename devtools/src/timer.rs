//! Sleeps that end on time, for the mock provider's scripted latency.
//!
//! tokio's timer wheel has 1 ms slots and rounds every deadline up to the next, so
//! `tokio::time::sleep(21 ms)` ends 0.5–1.3 ms late: a mock scripted at 20 ms + 1 ms per prompt
//! answered ~1.2 ms late on every request, a cost no real server charges and one that every
//! figure measured against it carried. One thread keeps the deadlines in a heap and wakes each
//! on a condition variable's timed wait (a futex timeout, accurate to tens of µs on Linux).
//! Hand-written: no tokio timer offers sub-millisecond resolution, and a blocking-pool sleep
//! per request would hold a thread per call in flight.

use std::{
    cmp::Ordering,
    collections::BinaryHeap,
    sync::{Condvar, Mutex, OnceLock, PoisonError},
    thread,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

/// Sleeps for `d`, ending within tens of µs of it.
pub async fn sleep(d: Duration) {
    if d.is_zero() {
        return;
    }
    let Some(timer) = timer() else {
        return tokio::time::sleep(d).await;
    };
    let (wake, woken) = oneshot::channel();
    timer.add(Instant::now() + d, wake);
    // The timer thread sends to every sender it holds; it never drops one unsent.
    let _ = woken.await;
}

struct Due {
    at: Instant,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Due {
    fn eq(&self, o: &Due) -> bool {
        self.at == o.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Due) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    /// Reversed: the heap's top is the earliest deadline.
    fn cmp(&self, o: &Due) -> Ordering {
        o.at.cmp(&self.at)
    }
}

#[derive(Default)]
struct Timer {
    due: Mutex<BinaryHeap<Due>>,
    changed: Condvar,
}

/// The timer thread, started on first use; `None` if it could not be (tokio's sleep then).
fn timer() -> Option<&'static Timer> {
    static TIMER: OnceLock<Option<&'static Timer>> = OnceLock::new();
    *TIMER.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::default());
        thread::Builder::new()
            .name("mock-timer".into())
            .spawn(move || t.run())
            .ok()
            .map(|_| t)
    })
}

impl Timer {
    fn add(&self, at: Instant, wake: oneshot::Sender<()>) {
        let mut due = self.due.lock().unwrap_or_else(PoisonError::into_inner);
        let earliest = due.peek().is_none_or(|d| at < d.at);
        due.push(Due { at, wake });
        if earliest {
            self.changed.notify_one();
        }
    }

    fn run(&self) {
        let mut due = self.due.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            while due.peek().is_some_and(|d| d.at <= now) {
                if let Some(d) = due.pop() {
                    // A sleeper that went away (its call was cancelled) is nothing to wake.
                    let _ = d.wake.send(());
                }
            }
            due = match due.peek().map(|d| d.at - now) {
                None => self
                    .changed
                    .wait(due)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(left) => {
                    self.changed
                        .wait_timeout(due, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_in_deadline_order_and_never_early() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut waits: Vec<_> = [30, 10, 20]
            .into_iter()
            .map(|n| {
                let (wake, woken) = oneshot::channel();
                timer().unwrap().add(start + ms(n), wake);
                (n, woken)
            })
            .collect();
        let (_, last) = waits.remove(0);
        last.await.unwrap();
        assert!(start.elapsed() >= ms(30), "woke early");
        for (n, mut w) in waits {
            assert!(
                w.try_recv().is_ok(),
                "the {n} ms sleeper was not woken before the 30 ms one"
            );
        }
        let before = Instant::now();
        sleep(ms(5)).await;
        assert!(before.elapsed() >= ms(5));
    }
}
