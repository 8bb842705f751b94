//! Upstream failures said in the log at a bounded rate: the first of each kind at once, then
//! at most one line per [`EVERY`] carrying the count of those left unsaid. A provider failing
//! every request (a revoked key, a server down) would otherwise write a WARN per request.
//!
//! Hand-written: tracing has no rate limit of its own, and one timestamp and one counter per
//! failure kind is all this takes.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::completion::FailureKind;

/// At most one line per provider and failure kind this often.
pub(super) const EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct Warnings {
    /// Per kind: when it was last said, and how many since were not.
    said: Mutex<HashMap<FailureKind, (Instant, u64)>>,
}

impl Warnings {
    /// Whether a failure of `kind` is to be said now, and if so how many of that kind went
    /// unsaid since the last line.
    pub(super) fn admit(&self, kind: FailureKind) -> Option<u64> {
        let now = Instant::now();
        let mut said = self.said.lock().unwrap_or_else(PoisonError::into_inner);
        match said.get_mut(&kind) {
            None => {
                said.insert(kind, (now, 0));
                Some(0)
            }
            Some((at, unsaid)) if now >= *at + EVERY => {
                let n = *unsaid;
                *at = now;
                *unsaid = 0;
                Some(n)
            }
            Some((_, unsaid)) => {
                *unsaid += 1;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn first_at_once_then_one_line_per_period_with_the_count() {
        let w = Warnings::default();
        assert_eq!(w.admit(FailureKind::Unauthorized), Some(0));
        for _ in 0..5 {
            assert_eq!(w.admit(FailureKind::Unauthorized), None);
        }
        assert_eq!(
            w.admit(FailureKind::Connect),
            Some(0),
            "kinds are counted apart"
        );
        tokio::time::advance(EVERY - Duration::from_millis(1)).await;
        assert_eq!(w.admit(FailureKind::Unauthorized), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(w.admit(FailureKind::Unauthorized), Some(6));
        assert_eq!(w.admit(FailureKind::Unauthorized), None);
    }
}
