//! A provider's stream on its way to the caller: what was sent is counted (for the error that
//! says where a stream broke), the caller's deadline ends it, and a deterministic stream that
//! completes is put in the cache.

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::BoxStream};
use tokio::time::{Instant, timeout_at};

use crate::{
    cache::{Cache, CacheKey},
    completion::{Answer, Attempt, Completion, CompletionRequest, FailureKind, StreamEvent, Usage},
    cost,
    error::{RouterError, Sent},
    provider::ProviderError,
    spend::{Hold, Payer},
};

/// What a stream of a priced model is charged to: settled at its end from the usage it
/// reported, or — ended early, broken or dropped by the caller — estimated from what was
/// sent.
pub(crate) struct Charge {
    pub(crate) hold: Hold,
    pub(crate) request: Arc<CompletionRequest>,
}

/// Passes a provider's stream on to the caller, counting what was sent, ending it at the
/// caller's deadline, and caching it when it completes (for a deterministic request).
pub(crate) struct Relay {
    pub(crate) first: Option<StreamEvent>,
    pub(crate) rest: BoxStream<'static, Result<StreamEvent, ProviderError>>,
    pub(crate) deadline: Instant,
    pub(crate) provider: Arc<str>,
    pub(crate) model: Arc<str>,
    pub(crate) began: Instant,
    pub(crate) sent: Sent,
    /// Where the answer goes, and its text so far.
    pub(crate) cache: Option<(Arc<Cache>, CacheKey, String)>,
    pub(crate) charge: Option<Charge>,
}

impl Relay {
    /// Settles the stream's reservation (once): at `usage` when the provider reported it.
    fn settle(&mut self, usage: Option<Usage>) {
        if let Some(c) = self.charge.take() {
            let cost = cost::priced(c.hold.price(), &c.request, usage, self.sent.bytes);
            let payer = Payer {
                tenant: &c.request.tenant,
                provider: &self.provider,
                model: &self.model,
            };
            c.hold.settle(payer, cost);
        }
    }
}

impl Drop for Relay {
    /// A stream the caller left, or that ended early, is charged for what was sent.
    fn drop(&mut self) {
        self.settle(None);
    }
}

/// Longest streamed answer kept for the cache; a longer one is not cached.
const MAX_CACHED_STREAM: usize = 1 << 20;

impl Relay {
    /// The next event, and whether more may follow.
    pub(crate) async fn next(&mut self) -> (Result<StreamEvent, RouterError>, bool) {
        let next = match self.first.take() {
            Some(first) => Some(Ok(first)),
            None => match timeout_at(self.deadline, self.rest.next()).await {
                Ok(next) => next,
                Err(_) => return (Err(RouterError::StreamOutOfTime { sent: self.sent }), false),
            },
        };
        let broke = |relay: &Relay, e: ProviderError| RouterError::StreamBroken {
            sent: relay.sent,
            attempt: Box::new(Attempt {
                provider: relay.provider.clone(),
                model: relay.model.clone(),
                kind: e.kind,
                http_status: e.http_status,
                error: e.message,
                tries: 1,
                elapsed: relay.began.elapsed(),
            }),
        };
        match next {
            Some(Ok(StreamEvent::Text(text))) => {
                self.sent.chunks += 1;
                self.sent.bytes += text.len();
                if let Some((_, _, kept)) = &mut self.cache {
                    if kept.len() + text.len() <= MAX_CACHED_STREAM {
                        kept.push_str(&text);
                    } else {
                        self.cache = None;
                    }
                }
                (Ok(StreamEvent::Text(text)), true)
            }
            Some(Ok(StreamEvent::ToolCall(call))) => {
                self.sent.chunks += 1;
                self.sent.bytes += call.arguments.len();
                // A streamed tool call is not put together again for the cache.
                self.cache = None;
                (Ok(StreamEvent::ToolCall(call)), true)
            }
            Some(Ok(StreamEvent::End {
                finish_reason,
                usage,
            })) => {
                self.settle(usage);
                if let Some((cache, key, text)) = self.cache.take() {
                    let answer = Answer {
                        completion: Completion::text(text, finish_reason.clone(), usage),
                        provider: self.provider.clone(),
                        model: self.model.clone(),
                        attempts: Vec::new(),
                        queue_wait: Duration::ZERO,
                        upstream: self.began.elapsed(),
                        batch_size: 1,
                        cached: false,
                        cost: crate::completion::Cost::default(),
                    };
                    cache.put(key, &answer).await;
                }
                (
                    Ok(StreamEvent::End {
                        finish_reason,
                        usage,
                    }),
                    false,
                )
            }
            Some(Err(e)) => (Err(broke(self, e)), false),
            None => {
                let e = ProviderError::new(FailureKind::Io, "the stream ended without its end");
                (Err(broke(self, e)), false)
            }
        }
    }
}
