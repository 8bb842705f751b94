//! OpenAI's JSON shapes, and their conversion to and from domain values: requests in,
//! completions, stream chunks and errors out. Fields the router has no use for (`top_p`,
//! `logit_bias`, ...) are accepted and ignored, as other OpenAI-compatible servers do, so
//! standard clients work unchanged; fields that would change the answer's shape and that the
//! router cannot honour (`n` > 1, tools) are refused by name.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    completion::{CacheMode, ChatMessage, CompletionRequest, GenParams, Input, Role, Usage},
    error::RouterError,
};

fn invalid(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

/// `POST /v1/chat/completions`
#[derive(Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: String,
    pub messages: Vec<WireMessage>,
    #[serde(flatten)]
    pub common: Common,
    pub tools: Option<Value>,
}

/// `POST /v1/completions`
#[derive(Deserialize)]
pub struct TextRequest {
    #[serde(default)]
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub common: Common,
}

/// What both endpoints take besides the input.
#[derive(Deserialize)]
pub struct Common {
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens` in chat.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    /// The end user, taken as the agent when no `x-cascade-agent` header is sent.
    pub user: Option<String>,
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Content,
}

/// A message's content: a string, or parts of which the text parts are read.
#[derive(Default, Deserialize)]
#[serde(untagged)]
pub enum Content {
    #[default]
    None,
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: String,
}

/// What the front's headers add to a request.
#[derive(Default)]
pub struct Extras {
    pub agent: Option<String>,
    pub cache: CacheMode,
    pub request_id: String,
}

/// The most prompts one `/v1/completions` request may carry.
pub const MAX_PROMPTS: usize = 1024;

impl Common {
    fn params(&self) -> Result<GenParams, RouterError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(invalid(format!(
                "n: {n}; the router answers one choice per prompt (n: 1)"
            )));
        }
        let params = GenParams {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            seed: self.seed,
        };
        params.check()?;
        Ok(params)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    fn request(
        &self,
        model: &str,
        input: Input,
        extras: &Extras,
    ) -> Result<CompletionRequest, RouterError> {
        let agent = extras
            .agent
            .clone()
            .or_else(|| self.user.clone())
            .unwrap_or_default();
        Ok(CompletionRequest {
            model: model.to_string(),
            input,
            params: self.params()?,
            tenant: agent.clone(),
            agent,
            request_id: extras.request_id.clone(),
            cache: extras.cache,
        })
    }
}

impl ChatRequest {
    pub fn into_request(self, extras: &Extras) -> Result<CompletionRequest, RouterError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(invalid("tools: tool calls are not supported by the router"));
        }
        if self.messages.is_empty() {
            return Err(invalid("messages: at least one message is needed"));
        }
        if self.messages.len() > crate::completion::MAX_MESSAGES {
            return Err(invalid(format!(
                "messages: more than {}",
                crate::completion::MAX_MESSAGES
            )));
        }
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    // OpenAI's newer name for system instructions.
                    "developer" => Role::System,
                    other => Role::parse_at(i, other)?,
                };
                let content = match m.content {
                    Content::None => String::new(),
                    Content::Text(t) => t,
                    Content::Parts(parts) => {
                        if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                            return Err(invalid(format!(
                                "messages[{i}].content: {:?} parts are not supported; text only",
                                p.kind
                            )));
                        }
                        parts.into_iter().map(|p| p.text).collect()
                    }
                };
                Ok(ChatMessage { role, content })
            })
            .collect::<Result<Vec<_>, RouterError>>()?;
        self.common
            .request(&self.model, Input::Chat(messages), extras)
    }
}

impl TextRequest {
    /// One request per prompt, in order.
    pub fn into_requests(self, extras: &Extras) -> Result<Vec<CompletionRequest>, RouterError> {
        let prompts = match self.prompt {
            Prompt::One(p) => vec![p],
            Prompt::Many(v) => v,
        };
        if prompts.is_empty() {
            return Err(invalid("prompt: at least one prompt is needed"));
        }
        if prompts.len() > MAX_PROMPTS {
            return Err(invalid(format!(
                "prompt: {} prompts; at most {MAX_PROMPTS} in one request",
                prompts.len()
            )));
        }
        if self.common.stream && prompts.len() > 1 {
            return Err(invalid(
                "stream: one prompt per streamed request (send the others separately)",
            ));
        }
        if prompts.iter().any(String::is_empty) {
            return Err(invalid("prompt: prompts must not be empty"));
        }
        let many = prompts.len() > 1;
        prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut r = self.common.request(&self.model, Input::Prompt(p), extras)?;
                if many {
                    r.request_id = format!("{}-{i}", extras.request_id);
                }
                Ok(r)
            })
            .collect()
    }
}

/// OpenAI's finish reasons from a provider's own ("end_turn", "max_tokens", ...).
pub fn finish_reason(provider_said: &str) -> &'static str {
    match provider_said {
        "length" | "max_tokens" => "length",
        "content_filter" => "content_filter",
        "tool_calls" | "tool_use" => "tool_calls",
        _ => "stop",
    }
}

#[derive(Serialize)]
pub struct WireUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> WireUsage {
        WireUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        }
    }
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

impl Kind {
    pub fn object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion",
            Kind::Text => "text_completion",
        }
    }

    pub fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        }
    }

    pub fn id(self, request_id: &str) -> String {
        match self {
            Kind::Chat => format!("chatcmpl-{request_id}"),
            Kind::Text => format!("cmpl-{request_id}"),
        }
    }

    /// One choice of a whole answer.
    pub fn choice(self, index: usize, text: &str, finish: &str) -> Value {
        match self {
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(finish),
                "logprobs": null,
            }),
            Kind::Text => json!({
                "index": index,
                "text": text,
                "finish_reason": finish_reason(finish),
                "logprobs": null,
            }),
        }
    }

    /// One choice of a stream chunk: `text` so far, or the end with its finish reason.
    pub fn delta(self, text: Option<&str>, finish: Option<&str>) -> Value {
        let finish = finish.map(finish_reason);
        match self {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"role": "assistant", "content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            Kind::Text => json!({
                "index": 0,
                "text": text.unwrap_or_default(),
                "finish_reason": finish,
                "logprobs": null,
            }),
        }
    }
}

/// OpenAI's error body for `e`: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(e: &RouterError) -> Value {
    let status = e.http_status();
    let kind = match status {
        400 | 404 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        504 => "timeout",
        _ => "server_error",
    };
    let code = match e {
        RouterError::UnknownModel { .. } => Some("model_not_found"),
        RouterError::NotCached(_) => Some("not_cached"),
        RouterError::QuotaExceeded { .. } => Some("quota_exceeded"),
        RouterError::StreamBroken { .. } => Some("stream_broken"),
        RouterError::Unavailable { .. } => Some("providers_unavailable"),
        _ => None,
    };
    json!({"error": {"message": e.to_string(), "type": kind, "param": null, "code": code}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extras() -> Extras {
        Extras {
            request_id: "r".into(),
            ..Extras::default()
        }
    }

    #[test]
    fn chat_reads_strings_parts_and_developer_messages() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}
            ], "max_completion_tokens": 5, "stop": "x", "top_p": 0.9, "user": "u1"}"#,
        )
        .unwrap();
        let req = r.into_request(&extras()).unwrap();
        let Input::Chat(m) = &req.input else {
            panic!("chat")
        };
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m[1].content, "hi there");
        assert_eq!(req.params.max_tokens, Some(5));
        assert_eq!(req.params.stop, ["x"]);
        assert_eq!(req.agent, "u1");
    }

    #[test]
    fn what_the_router_cannot_honour_is_refused_by_name() {
        let bad = [
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}"#,
                "n: 2",
            ),
            (r#"{"model": "m", "messages": []}"#, "messages"),
            (
                r#"{"model": "m", "messages": [{"role": "robot", "content": "x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "image_url",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}"#,
                "temperature",
            ),
        ];
        for (body, names) in bad {
            let r: ChatRequest = serde_json::from_str(body).unwrap();
            let e = r.into_request(&extras()).err().unwrap().to_string();
            assert!(e.contains(names), "{body}: {e}");
        }
    }

    #[test]
    fn prompts_as_a_string_or_an_array() {
        let one: TextRequest = serde_json::from_str(r#"{"model": "m", "prompt": "a"}"#).unwrap();
        assert_eq!(one.into_requests(&extras()).unwrap().len(), 1);
        let many: TextRequest =
            serde_json::from_str(r#"{"model": "m", "prompt": ["a", "b", "c"]}"#).unwrap();
        let reqs = many.into_requests(&extras()).unwrap();
        let ids: Vec<&str> = reqs.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["r-0", "r-1", "r-2"]);
        let streamed: TextRequest =
            serde_json::from_str(r#"{"model": "m", "prompt": ["a", "b"], "stream": true}"#)
                .unwrap();
        assert!(streamed.into_requests(&extras()).is_err());
    }
}
