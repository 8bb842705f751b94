//! The built-in provider: no network, deterministic text derived from the prompt, optional
//! latency. It lets the service answer on a machine with no model server.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{EventStream, Provider, ProviderError};
use crate::completion::{Completion, CompletionRequest, Input, StreamEvent, Usage};

pub struct Simulated {
    latency: Duration,
}

impl Simulated {
    pub fn new(latency: Duration) -> Simulated {
        Simulated { latency }
    }
}

/// The text the simulated provider answers for `input` (also used by tests to check answers).
pub fn reply(model: &str, input: &Input, max_tokens: Option<u32>) -> String {
    let said = match input {
        Input::Prompt(p) => p.as_str(),
        Input::Chat(m) => m.last().map(|m| m.content.as_str()).unwrap_or_default(),
    };
    let limit = max_tokens.map_or(64, |m| m as usize);
    let words: Vec<&str> = said.split_whitespace().take(limit).collect();
    format!("[{model}] you said: {}", words.join(" "))
}

#[async_trait]
impl Provider for Simulated {
    /// Simulated batches cost one latency for the whole batch, like a GPU server's.
    fn batches_prompts(&self) -> bool {
        true
    }

    async fn complete_batch(
        &self,
        model: &str,
        requests: &[Arc<CompletionRequest>],
    ) -> Result<Vec<Result<Completion, ProviderError>>, ProviderError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        Ok(requests.iter().map(|r| Ok(answer(model, r))).collect())
    }

    /// The same answer word by word, after the latency.
    async fn stream(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<EventStream, ProviderError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let c = answer(model, request);
        let mut events: Vec<Result<StreamEvent, ProviderError>> = c
            .text
            .split_inclusive(' ')
            .map(|w| Ok(StreamEvent::Text(w.to_string())))
            .collect();
        events.push(Ok(StreamEvent::End {
            finish_reason: c.finish_reason,
            usage: c.usage,
        }));
        Ok(Box::pin(futures_util::stream::iter(events)))
    }

    async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        Ok(answer(model, request))
    }
}

fn answer(model: &str, request: &CompletionRequest) -> Completion {
    let text = reply(model, &request.input, request.params.max_tokens);
    let prompt_tokens = match &request.input {
        Input::Prompt(p) => p.split_whitespace().count(),
        Input::Chat(m) => m.iter().map(|m| m.content.split_whitespace().count()).sum(),
    };
    Completion {
        usage: Some(Usage {
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX),
        }),
        text,
        finish_reason: "stop".into(),
    }
}
