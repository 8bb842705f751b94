//! Validated domain values. The router core sees these, never prost types.

use std::{fmt, sync::Arc, time::Duration};

use crate::error::RouterError;

/// Bounds on what one request may carry, whichever edge it came in by (the configured
/// `limits` bound them further).
pub const MAX_STOP_SEQUENCES: usize = 16;
pub const MAX_MESSAGES: usize = 4096;
pub const MAX_TOKENS: u32 = 1 << 20;

fn invalid(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// The role of `messages[i]`, or an error naming it.
    pub fn parse_at(i: usize, s: &str) -> Result<Role, RouterError> {
        Role::parse(s).ok_or_else(|| {
            invalid(format!(
                "messages[{i}].role: {s:?} is not system, user, assistant or tool"
            ))
        })
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// Generation parameters; `None` leaves the provider's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenParams {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
}

impl GenParams {
    /// Every parameter in its range, named when not.
    pub fn check(&self) -> Result<(), RouterError> {
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(invalid(format!("temperature: {t} is outside 0.0 ..= 2.0")));
        }
        if let Some(m) = self.max_tokens
            && !(1..=MAX_TOKENS).contains(&m)
        {
            return Err(invalid(format!(
                "max_tokens: {m} is outside 1 ..= {MAX_TOKENS}"
            )));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(format!(
                "stop: more than {MAX_STOP_SEQUENCES} sequences"
            )));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop: sequences must not be empty"));
        }
        Ok(())
    }
}

/// What a provider answered.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    pub text: String,
    pub finish_reason: String,
    pub usage: Option<Usage>,
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
    End {
        finish_reason: String,
        usage: Option<Usage>,
    },
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
