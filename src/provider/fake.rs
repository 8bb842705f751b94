//! An in-process provider for tests on a paused clock: each request takes `latency` (of
//! tokio's clock) and then ends as its script says now; requests reaching it, and those
//! dropped before they ended (their caller went away), are counted.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use async_trait::async_trait;

use super::{Provider, ProviderError};
use crate::completion::{Completion, CompletionRequest, FailureKind};

/// How the fake's requests end.
#[derive(Clone, Debug)]
pub(crate) enum Script {
    /// `[name] answered`.
    Answer,
    Fail(ProviderError),
    /// Never ends.
    Hang,
}

impl Script {
    /// An HTTP status as the provider's error (a 429 or 503 with its `Retry-After`).
    pub(crate) fn status(status: u16, retry_after: Option<Duration>) -> Script {
        let kind = match status {
            429 => FailureKind::RateLimited,
            400..=499 => FailureKind::Rejected,
            _ => FailureKind::ServerError,
        };
        Script::Fail(ProviderError {
            http_status: Some(status),
            retry_after,
            ..ProviderError::new(kind, format!("HTTP {status}"))
        })
    }
}

pub(crate) struct Fake {
    name: &'static str,
    latency: Duration,
    script: Mutex<Script>,
    requests: AtomicUsize,
    dropped: AtomicUsize,
}

impl Fake {
    pub(crate) fn new(name: &'static str, latency: Duration, script: Script) -> Fake {
        Fake {
            name,
            latency,
            script: Mutex::new(script),
            requests: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
        }
    }

    pub(crate) fn set(&self, script: Script) {
        *self.script.lock().unwrap_or_else(PoisonError::into_inner) = script;
    }

    /// Requests that reached it.
    pub(crate) fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }

    /// Requests dropped before they ended.
    pub(crate) fn dropped(&self) -> usize {
        self.dropped.load(SeqCst)
    }
}

/// Counts its request as dropped unless it is disarmed first.
struct Armed<'a>(Option<&'a AtomicUsize>);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_add(1, SeqCst);
        }
    }
}

#[async_trait]
impl Provider for Fake {
    fn unsupported(&self, _: &CompletionRequest) -> Option<String> {
        None
    }

    async fn complete(
        &self,
        _model: &str,
        _request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        self.requests.fetch_add(1, SeqCst);
        let mut armed = Armed(Some(&self.dropped));
        tokio::time::sleep(self.latency).await;
        let script = self
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let outcome = match script {
            Script::Answer => Ok(Completion::text(
                format!("[{}] answered", self.name),
                "stop".into(),
                None,
            )),
            Script::Fail(e) => Err(e),
            Script::Hang => std::future::pending().await,
        };
        armed.0 = None;
        outcome
    }
}
