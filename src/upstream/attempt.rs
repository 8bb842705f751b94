//! An attempt's rules, in one place: how long a try may take — its share of the caller's
//! deadline ([`Window::share`]), the latest it may be sent or its batch close
//! ([`Window::latest_send`], [`Window::close_by`]), the provider's timeout within it
//! ([`Budget`]) — and how its outcome is judged ([`judge`]): what the provider is blamed for
//! (its breaker) and what its concurrency limit learns. Unary, batched and streamed requests
//! all go by these.
//!
//! The rule: a provider is blamed only for what it did. A try that ran out of time is its
//! fault only if it had the provider's own timeout, or the time the provider usually takes
//! now; one cut short before then by the caller's deadline (or its share of it) is the
//! caller's loss. The router's own queues (a slot, a batch) are before the send and never
//! count. 429 and 503 say the provider is overloaded.

use std::time::Duration;

use tokio::time::Instant;

use super::limit::Verdict;
use crate::{completion::FailureKind, provider::ProviderError};

/// When one try must end: its share of the caller's time (`until`), within the caller's
/// `deadline`. A try that runs out of its share has been too slow, which counts against the
/// provider; one that runs out of the caller's deadline says nothing about the provider.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub until: Instant,
    pub deadline: Instant,
}

impl Window {
    /// All of the caller's time.
    pub fn whole(deadline: Instant) -> Window {
        Window {
            until: deadline,
            deadline,
        }
    }

    /// The window of a try starting at `now`: all that is left for the last provider, at
    /// most half of it while another provider remains (so one that hangs cannot take it all).
    pub fn share(now: Instant, deadline: Instant, last: bool) -> Window {
        let until = if last {
            deadline
        } else {
            now + deadline.saturating_duration_since(now) / 2
        };
        Window { until, deadline }
    }

    /// The latest a request can be sent and still be answered within the window, judging by
    /// the provider's `fastest` answer so far.
    pub(super) fn latest_send(&self, fastest: Duration) -> Instant {
        self.until.checked_sub(fastest).unwrap_or(self.until)
    }

    /// The latest a batch holding an item `enqueued` with this window may close and still be
    /// answered in it: the end less the provider's `fastest` answer, and never less than a
    /// quarter of the item's time (up to 50 ms) while that is still unknown — more cautious
    /// than [`Window::latest_send`]: a fixed batch still waits for a slot after it closes,
    /// and one item's close-by time holds back the whole batch.
    pub(super) fn close_by(&self, enqueued: Instant, fastest: Duration) -> Instant {
        let budget = self.until.saturating_duration_since(enqueued);
        let reserve = fastest.max((budget / 4).min(Duration::from_millis(50)));
        self.until.checked_sub(reserve).unwrap_or(enqueued)
    }
}

/// When a request sent now gives up — the provider's `timeout` (for a stream: its first-token
/// timeout) or the try's window, whichever ends first — and which of the two that is.
#[derive(Clone, Copy, Debug)]
pub(super) struct Budget {
    pub(super) end: Instant,
    /// The end is the caller's own deadline.
    deadline_bound: bool,
    /// The end is the provider's own timeout (not the caller's share of its deadline).
    timeout_bound: bool,
}

impl Budget {
    pub(super) fn new(from: Instant, timeout: Duration, window: Window) -> Budget {
        let provider_end = from + timeout;
        Budget {
            end: provider_end.min(window.until),
            deadline_bound: window.until == window.deadline && window.deadline <= provider_end,
            timeout_bound: provider_end <= window.until,
        }
    }

    /// Whether a request sent at `sent` that ran out of this budget failed by the provider's
    /// doing: it had the provider's timeout, or at least the time the provider `usual`ly
    /// takes now (before anything is known, only the timeout counts).
    pub(super) fn blames(&self, sent: Instant, usual: Option<Duration>) -> bool {
        !self.deadline_bound
            && (self.timeout_bound
                || usual.is_some_and(|u| self.end.saturating_duration_since(sent) >= u))
    }
}

/// How one upstream request ended.
pub(super) enum Outcome<'a> {
    /// Answered in `took` (for a stream: its end), for `items` prompts.
    Answered { took: Duration, items: usize },
    /// The provider said no.
    Failed(&'a ProviderError),
    /// No answer within the budget; `blamed` per [`Budget::blames`].
    OutOfTime { blamed: bool },
}

/// What the outcome tells the concurrency limit, and whether it counts against the
/// provider's breaker. The one judgement of an attempt.
pub(super) fn judge(outcome: &Outcome<'_>) -> (Verdict, bool) {
    match *outcome {
        Outcome::Answered { took, items } => (Verdict::Took(took, items), false),
        Outcome::Failed(e) => {
            let overloaded = e.kind == FailureKind::RateLimited || e.http_status == Some(503);
            let verdict = if overloaded {
                Verdict::Overloaded
            } else {
                Verdict::Nothing
            };
            (verdict, e.counts_against_provider())
        }
        Outcome::OutOfTime { blamed: true } => (Verdict::Overloaded, true),
        Outcome::OutOfTime { blamed: false } => (Verdict::Nothing, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_the_providers_only_with_its_timeout_or_usual_time() {
        let now = Instant::now();
        let s = Duration::from_secs;
        // The provider's 10 s timeout ends first: blamed.
        let b = Budget::new(now, s(10), Window::whole(now + s(30)));
        assert!(b.blames(now, None));
        // The caller's deadline ends first: never blamed.
        let b = Budget::new(now, s(10), Window::whole(now + s(2)));
        assert!(!b.blames(now, Some(Duration::from_millis(100))));
        // The caller's share (2 s of 30) ends first: blamed only past the usual 1 s.
        let share = Window {
            until: now + s(2),
            deadline: now + s(30),
        };
        let b = Budget::new(now, s(10), share);
        assert!(
            !b.blames(now, None),
            "nothing known: only the timeout counts"
        );
        assert!(b.blames(now, Some(s(1))));
        assert!(!b.blames(now, Some(s(3))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tries_window_and_its_latest_send_and_close() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let deadline = now + ms(1000);
        let half = Window::share(now, deadline, false);
        assert_eq!((half.until, half.deadline), (now + ms(500), deadline));
        assert_eq!(Window::share(now, deadline, true).until, deadline);
        assert_eq!(half.latest_send(ms(100)), now + ms(400));
        assert!(half.latest_send(ms(900)) < now, "already too late to send");
        // A batch closes by the fastest answer before the end, or a quarter of the item's
        // time (at most 50 ms) while nothing is known.
        assert_eq!(half.close_by(now, ms(100)), now + ms(400));
        assert_eq!(half.close_by(now, Duration::ZERO), now + ms(450));
        let short = Window::whole(now + ms(40));
        assert_eq!(short.close_by(now, Duration::ZERO), now + ms(30));
    }

    #[test]
    fn one_judgement_for_every_outcome() {
        let e = |kind, status| ProviderError {
            http_status: status,
            ..ProviderError::new(kind, "x")
        };
        let took = Duration::from_millis(5);
        assert_eq!(
            judge(&Outcome::Answered { took, items: 3 }),
            (Verdict::Took(took, 3), false)
        );
        let limited = e(FailureKind::RateLimited, Some(429));
        assert_eq!(judge(&Outcome::Failed(&limited)).0, Verdict::Overloaded);
        let unavailable = e(FailureKind::ServerError, Some(503));
        assert_eq!(
            judge(&Outcome::Failed(&unavailable)),
            (Verdict::Overloaded, true)
        );
        let refused = e(FailureKind::Rejected, Some(400));
        assert_eq!(judge(&Outcome::Failed(&refused)), (Verdict::Nothing, false));
        assert_eq!(
            judge(&Outcome::OutOfTime { blamed: true }),
            (Verdict::Overloaded, true)
        );
        assert_eq!(
            judge(&Outcome::OutOfTime { blamed: false }),
            (Verdict::Nothing, false)
        );
    }
}
