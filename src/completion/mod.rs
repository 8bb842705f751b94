//! Validated domain values. The router core sees these, never prost types.

use std::{fmt, sync::Arc, time::Duration};

use crate::error::RouterError;

mod fingerprint;
mod message;
mod params;

pub use fingerprint::{Fingerprint, count_field};
pub use message::{
    Base64, ChatMessage, Content, Detail, Image, ImageSource, ImageUrl, Part, Role, ToolCall,
    check_conversation,
};
pub use params::{GenParams, ResponseFormat, Tool, ToolChoice, is_modelled_field, is_openai_field};

pub use crate::failure::{Attempt, FailureKind};

/// The most messages one request may carry, whichever edge it came in by (the configured
/// `limits` bound it further).
pub const MAX_MESSAGES: usize = 4096;

/// One completion request after validation at the server edge.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    /// A model, a fallback-chain name, or empty for the agent's assignment / the default.
    pub model: String,
    pub input: Input,
    pub params: GenParams,
    /// The caller's id, for per-agent model assignment.
    pub agent: String,
    /// Whose request it is, for the cache's scope and the quotas: the client key's name when
    /// authentication is on, else `agent` (which the caller chooses freely).
    pub tenant: String,
    pub request_id: String,
    pub cache: CacheMode,
}

#[cfg(test)]
impl CompletionRequest {
    /// A bare prompt for model `m`, for unit tests.
    pub(crate) fn test_prompt(text: &str) -> std::sync::Arc<CompletionRequest> {
        std::sync::Arc::new(CompletionRequest {
            model: "m".into(),
            input: Input::Prompt(text.into()),
            params: GenParams::default(),
            agent: String::new(),
            tenant: String::new(),
            request_id: String::new(),
            cache: CacheMode::Default,
        })
    }
}

impl CompletionRequest {
    /// What both edges check alike: every parameter in range, a conversation's shape, and
    /// fields that go with one kind of input only.
    pub fn check(&self) -> Result<(), RouterError> {
        let invalid = |m: &str| Err(RouterError::InvalidArgument(m.into()));
        self.params.check()?;
        let p = &self.params;
        match &self.input {
            Input::Chat(m) => {
                check_conversation(m)?;
                if p.echo {
                    return invalid("echo: only with a prompt (/v1/completions), not messages");
                }
                if p.suffix.is_some() {
                    return invalid("suffix: only with a prompt (/v1/completions), not messages");
                }
                if p.best_of.is_some() {
                    return invalid("best_of: only with a prompt (/v1/completions), not messages");
                }
            }
            Input::Prompt(_) => {
                if !p.tools.is_empty() || p.tool_choice.is_some() || p.parallel_tool_calls.is_some()
                {
                    return invalid("tools: tools go with messages, not a prompt");
                }
                if p.response_format.is_some() {
                    return invalid("response_format: goes with messages, not a prompt");
                }
            }
        }
        Ok(())
    }
}

/// How the completion cache treats a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Read and write when the request is deterministic.
    #[default]
    Default,
    /// Neither read nor write.
    Bypass,
    /// Skip the read, write the fresh answer.
    Refresh,
    /// Answer from the cache or NOT_FOUND.
    Only,
}

/// What the model is asked to continue: text or a conversation.
#[derive(Clone, PartialEq)]
pub enum Input {
    Prompt(String),
    Chat(Vec<ChatMessage>),
}

// Prompts are not logged by default, so Debug shows only their size.
impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Prompt(p) => write!(f, "Prompt({} bytes)", p.len()),
            Input::Chat(m) => write!(f, "Chat({} messages)", m.len()),
        }
    }
}

impl Input {
    /// Bytes of text the input carries (images left out).
    pub fn text_len(&self) -> usize {
        match self {
            Input::Prompt(p) => p.len(),
            Input::Chat(m) => m
                .iter()
                .map(|m| {
                    m.content.text_len()
                        + m.tool_calls
                            .iter()
                            .map(|c| c.name.len() + c.arguments.len())
                            .sum::<usize>()
                })
                .sum(),
        }
    }

    /// The images the input carries, in order.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        let messages = match self {
            Input::Prompt(_) => &[][..],
            Input::Chat(m) => m.as_slice(),
        };
        messages.iter().flat_map(|m| m.content.images())
    }

    /// Whether the conversation holds tool calls or tool results.
    pub fn has_tool_turns(&self) -> bool {
        match self {
            Input::Prompt(_) => false,
            Input::Chat(m) => m
                .iter()
                .any(|m| m.role == Role::Tool || !m.tool_calls.is_empty()),
        }
    }
}

/// What a provider answered.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    pub text: String,
    pub finish_reason: String,
    pub usage: Option<Usage>,
    /// Tools the model called (then `finish_reason` is `tool_calls`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Log probabilities as the provider gave them (OpenAI's shape), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<serde_json::Value>,
}

impl Completion {
    /// A text answer.
    pub fn text(text: String, finish_reason: String, usage: Option<Usage>) -> Completion {
        Completion {
            text,
            finish_reason,
            usage,
            ..Completion::default()
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// A share of a batch's usage, split by the bytes of each prompt and answer: its cost is
    /// an estimate (the batch's answers add up to the batch's usage exactly).
    #[serde(default, skip_serializing_if = "is_false")]
    pub apportioned: bool,
    /// The provider's figures were out of range (negative, fractional or absurd) and were
    /// clamped, not believed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub clamped: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A completion being streamed, with where it comes from.
pub struct Streamed {
    pub provider: Arc<str>,
    pub model: Arc<str>,
    /// Providers tried or skipped before the one streaming.
    pub attempts: Vec<Attempt>,
    /// From sending the upstream request to its first event (zero from the cache).
    pub first_after: Duration,
    pub cached: bool,
    /// Text as it comes, then [`StreamEvent::End`]; or an error that ends it early.
    pub events: futures_util::stream::BoxStream<'static, Result<StreamEvent, RouterError>>,
}

/// What a streamed completion yields: text as the model produces it, then how it ended.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    Text(String),
    /// A piece of a tool call: the first piece of each call has its id and name, the
    /// arguments come as text in pieces, all with the call's `index`.
    ToolCall(ToolCallDelta),
    End {
        finish_reason: String,
        usage: Option<Usage>,
    },
}

/// A piece of a streamed tool call (OpenAI's `delta.tool_calls[]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// A completion with where it came from and what it took.
#[derive(Clone, Debug)]
pub struct Answer {
    pub completion: Completion,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    /// Providers tried or skipped before the one that answered.
    pub attempts: Vec<Attempt>,
    pub queue_wait: Duration,
    pub upstream: Duration,
    /// Prompts in the upstream request that carried this one (1 when not batched).
    pub batch_size: u32,
    /// Answered from the completion cache.
    pub cached: bool,
    /// What the upstream answer cost (nothing from the cache, or from a free model).
    pub cost: Cost,
}

/// An answer's cost in billionths of a dollar (worked out by [`crate::cost`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub nanos: u64,
    /// The provider reported no usage: the tokens were estimated.
    pub estimated: bool,
}

impl Cost {
    /// In dollars, for the wire.
    pub fn usd(&self) -> f64 {
        self.nanos as f64 / 1e9
    }
}
