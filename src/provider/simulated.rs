//! The built-in provider: no network, deterministic text derived from the prompt, optional
//! latency. It lets the service answer on a machine with no model server.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{EventStream, Provider, ProviderError};
use crate::completion::{
    Completion, CompletionRequest, Input, ResponseFormat, Role, StreamEvent, ToolCall, ToolChoice,
    Usage,
};

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
        Input::Prompt(p) => p.as_str().into(),
        Input::Chat(m) => m.last().map(|m| m.content.text()).unwrap_or_default(),
    };
    let limit = max_tokens.map_or(64, |m| m as usize);
    let words: Vec<&str> = said.split_whitespace().take(limit).collect();
    let images = input.images().count();
    let seen = match images {
        0 => String::new(),
        n => format!(" (and {n} image{})", if n == 1 { "" } else { "s" }),
    };
    format!("[{model}] you said: {}{seen}", words.join(" "))
}

/// The simulated model's tool use: offered tools and asked by the user, it calls the chosen
/// tool (the first, unless one is named) with the user's words as `{"text": ...}`; after a
/// tool result it answers in text.
fn tool_call(request: &CompletionRequest) -> Option<ToolCall> {
    let p = &request.params;
    let Input::Chat(messages) = &request.input else {
        return None;
    };
    let last = messages.last()?;
    if p.tools.is_empty() || p.tool_choice == Some(ToolChoice::None) || last.role != Role::User {
        return None;
    }
    let name = match &p.tool_choice {
        Some(ToolChoice::Function(name)) => name.clone(),
        _ => p.tools[0].name.clone(),
    };
    Some(ToolCall {
        id: format!("call_{}", messages.len()),
        name,
        arguments: serde_json::json!({"text": last.content.text()}).to_string(),
    })
}

#[async_trait]
impl Provider for Simulated {
    /// It follows the sampling fields as a temperature-0 model would (its answer is fixed),
    /// calls tools, sees images (it counts them) and writes JSON objects; it cannot give log
    /// probabilities or follow a JSON schema.
    fn unsupported(&self, request: &CompletionRequest) -> Option<String> {
        let p = &request.params;
        if p.logprobs {
            return Some("logprobs: the simulated model has none".into());
        }
        if let Some(ResponseFormat::JsonSchema { .. }) = p.response_format {
            return Some("response_format: the simulated model cannot follow a JSON schema".into());
        }
        None
    }

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
        if !c.tool_calls.is_empty() {
            return Ok(super::in_one_piece(c));
        }
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
    if let Some(call) = tool_call(request) {
        return Completion {
            finish_reason: "tool_calls".into(),
            tool_calls: vec![call],
            ..Completion::default()
        };
    }
    let mut text = reply(model, &request.input, request.params.max_tokens);
    if request.params.response_format == Some(ResponseFormat::JsonObject) {
        text = serde_json::json!({ "reply": text }).to_string();
    }
    let prompt_tokens = match &request.input {
        Input::Prompt(p) => p.split_whitespace().count(),
        Input::Chat(m) => m
            .iter()
            .map(|m| m.content.text().split_whitespace().count())
            .sum(),
    };
    Completion {
        usage: Some(Usage {
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX),
            ..Usage::default()
        }),
        text,
        finish_reason: "stop".into(),
        ..Completion::default()
    }
}
