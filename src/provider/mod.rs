//! Upstream model APIs, one module each behind the [`Provider`] trait.
//!
//! Every network provider owns one pooled `reqwest::Client` (see [`http`]), built once at start
//! and shared by all requests, so connections are reused across calls.

pub mod anthropic;
#[cfg(test)]
pub(crate) mod fake;
pub mod http;
pub mod ollama;
pub mod openai;
pub mod simulated;
pub mod stream;
pub mod usage;
pub mod wire;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

pub use stream::EventStream;

use crate::{
    completion::{Completion, CompletionRequest, FailureKind, StreamEvent, ToolCallDelta},
    config::{Api, ProviderConfig},
};

/// A model API. Dropping a returned future cancels its upstream request.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Why this API cannot carry `request` as it is — a field it has no place for, named —
    /// or `None`. Such a request is never sent stripped: the cascade skips this provider.
    fn unsupported(&self, request: &CompletionRequest) -> Option<String>;

    /// Whether fields of OpenAI's reference that the router does not model (`store`,
    /// `reasoning_effort`, ...) go to it as they came; other providers take only the fields
    /// their `pass_through` lists.
    fn forwards_openai_fields(&self) -> bool {
        false
    }

    async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError>;

    /// Streams one answer: `Ok` once the provider accepted the request, then text as it is
    /// produced, ending with [`StreamEvent::End`] (or an error: never a silent end). The
    /// default, for APIs that cannot stream, answers in one piece.
    async fn stream(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<EventStream, ProviderError> {
        let c = self.complete(model, request).await?;
        Ok(in_one_piece(c))
    }

    /// One active health probe: a GET of the API's cheap endpoint (or the configured path).
    /// The default, for providers with no network, always passes.
    async fn probe(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Whether [`Provider::complete_batch`] sends many prompts in one request.
    fn batches_prompts(&self) -> bool {
        false
    }

    /// Answers several prompt requests (same model and parameters) in one upstream request:
    /// one result per request, in order. `Err` is a failure of the whole request. Only
    /// called when [`Provider::batches_prompts`] is true.
    async fn complete_batch(
        &self,
        model: &str,
        requests: &[Arc<CompletionRequest>],
    ) -> Result<Vec<Result<Completion, ProviderError>>, ProviderError> {
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            out.push(self.complete(model, r).await);
        }
        Ok(out)
    }
}

/// What APIs other than OpenAI's cannot carry in any request, named: a message's `name`,
/// strict tools, an image's `detail` other than auto, and tool-call arguments that are not a
/// JSON object (they take arguments as objects). `api` names the API in the reason.
pub(crate) fn beyond_openai(r: &CompletionRequest, api: &str) -> Option<String> {
    use crate::completion::{Detail, Input};
    if r.params.tools.iter().any(|t| t.strict == Some(true)) {
        return Some(format!("tools[].function.strict: {api} has no such field"));
    }
    let Input::Chat(messages) = &r.input else {
        return None;
    };
    for (i, m) in messages.iter().enumerate() {
        if m.name.is_some() {
            return Some(format!("messages[{i}].name: {api} has no such field"));
        }
        if m.content
            .images()
            .any(|img| matches!(img.detail, Some(Detail::Low | Detail::High)))
        {
            return Some(format!(
                "messages[{i}].content: image_url.detail: {api} has no such field"
            ));
        }
        if let Some(c) = m.tool_calls.iter().find(|c| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&c.arguments)
                .is_err()
        }) {
            return Some(format!(
                "messages[{i}].tool_calls: {api} takes a call's arguments as a JSON object; call {:?} has other text",
                c.id
            ));
        }
    }
    None
}

/// A whole completion as a stream: its text, then its end.
pub fn in_one_piece(c: Completion) -> EventStream {
    let mut events = Vec::with_capacity(2 + c.tool_calls.len());
    if !c.text.is_empty() {
        events.push(Ok(StreamEvent::Text(c.text)));
    }
    for (i, call) in c.tool_calls.into_iter().enumerate() {
        events.push(Ok(StreamEvent::ToolCall(ToolCallDelta {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            id: Some(call.id),
            name: Some(call.name),
            arguments: call.arguments,
        })));
    }
    events.push(Ok(StreamEvent::End {
        finish_reason: c.finish_reason,
        usage: c.usage,
    }));
    Box::pin(futures_util::stream::iter(events))
}

/// Why one upstream try failed, classified so the cascade knows what to do next.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: FailureKind,
    pub http_status: Option<u16>,
    /// Safe to show a client: never carries headers or keys.
    pub message: String,
    /// How long the provider asked to be left alone (429 / 503 `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> ProviderError {
        ProviderError {
            kind,
            http_status: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Transient faults worth another try on the same provider, after a backoff.
    /// Refused connections are not: the server is down, the next provider is the better bet.
    pub fn retry_same_provider(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Timeout
                | FailureKind::Io
                | FailureKind::ServerError
                | FailureKind::Malformed
        )
    }

    /// Whether the failure speaks against the provider's health (counts toward its breaker).
    /// Rate limits and rejected requests do not: the provider is up and answering.
    pub fn counts_against_provider(&self) -> bool {
        !matches!(self.kind, FailureKind::RateLimited | FailureKind::Rejected)
    }
}

/// Builds the provider a validated config entry describes.
pub fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>, reqwest::Error> {
    Ok(match &config.api {
        Api::OpenAi { base, stream_unary } => {
            Arc::new(openai::OpenAi::new(config, base, *stream_unary)?)
        }
        Api::Ollama { base } => Arc::new(ollama::Ollama::new(config, base)?),
        Api::Anthropic { base } => Arc::new(anthropic::Anthropic::new(config, base)?),
        Api::Simulated { latency } => Arc::new(simulated::Simulated::new(*latency)),
    })
}
