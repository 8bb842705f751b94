//! Validated domain values. The router core sees these, never prost types.

use std::{fmt, sync::Arc, time::Duration};

use crate::error::RouterError;

mod message;
mod params;

pub use message::{
    Base64, ChatMessage, Content, Detail, Image, ImageSource, ImageUrl, Part, Role, ToolCall,
    check_conversation,
};
pub use params::{GenParams, ResponseFormat, Tool, ToolChoice, is_modelled_field, is_openai_field};

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
}

/// Why a provider did not answer (mirrors `cascade.v1.FailureKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    Connect,
    Timeout,
    Io,
    ServerError,
    RateLimited,
    Unauthorized,
    Rejected,
    Malformed,
    CircuitOpen,
    CoolingDown,
    NoTimeLeft,
    Overloaded,
    /// Skipped: the model lacks a capability the request needs, the request is too long for
    /// its window, or the provider's API cannot carry one of its fields.
    Unsupported,
}

impl FailureKind {
    /// The label value in metrics: snake case, stable.
    pub fn metric_name(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Io => "io",
            FailureKind::ServerError => "server_error",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::Rejected => "rejected",
            FailureKind::Malformed => "malformed",
            FailureKind::CircuitOpen => "circuit_open",
            FailureKind::CoolingDown => "cooling_down",
            FailureKind::NoTimeLeft => "no_time_left",
            FailureKind::Overloaded => "overloaded",
            FailureKind::Unsupported => "unsupported",
        }
    }

    /// A provider skipped by its breaker or `Retry-After` cool-down, with no request sent.
    pub fn is_refusal(self) -> bool {
        matches!(self, FailureKind::CircuitOpen | FailureKind::CoolingDown)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Io => "io",
            FailureKind::ServerError => "server error",
            FailureKind::RateLimited => "rate limited",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::Rejected => "rejected",
            FailureKind::Malformed => "malformed response",
            FailureKind::CircuitOpen => "circuit open",
            FailureKind::CoolingDown => "cooling down",
            FailureKind::NoTimeLeft => "no time left",
            FailureKind::Overloaded => "overloaded",
            FailureKind::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One provider a request went to (or skipped) without getting its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub kind: FailureKind,
    pub http_status: Option<u16>,
    pub error: String,
    /// Network tries on this provider; 0 when it was skipped.
    pub tries: u32,
    pub elapsed: Duration,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}: {}", self.provider, self.model, self.kind)?;
        if !self.error.is_empty() {
            write!(f, " ({})", self.error)?;
        }
        Ok(())
    }
}
