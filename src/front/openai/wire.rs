//! OpenAI's JSON shapes out: completions (text, tool calls, log probabilities), stream
//! chunks and errors. Requests come in through [`super::request`].

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    completion::{Completion, ToolCall, ToolCallDelta, Usage},
    error::RouterError,
};

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
    /// The call's name in `cascade_requests_total`.
    pub fn method(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Chat, false) => "ChatCompletions",
            (Kind::Chat, true) => "ChatCompletionsStream",
            (Kind::Text, false) => "Completions",
            (Kind::Text, true) => "CompletionsStream",
        }
    }

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
    pub fn choice(self, index: usize, c: &Completion) -> Value {
        let finish = match c.tool_calls.is_empty() {
            true => finish_reason(&c.finish_reason),
            false => "tool_calls",
        };
        match self {
            Kind::Chat => {
                let content = if c.text.is_empty() && !c.tool_calls.is_empty() {
                    Value::Null
                } else {
                    c.text.as_str().into()
                };
                let mut message = json!({"role": "assistant", "content": content, "refusal": null});
                if !c.tool_calls.is_empty()
                    && let Some(m) = message.as_object_mut()
                {
                    m.insert("tool_calls".into(), c.tool_calls.iter().map(call).collect());
                }
                json!({
                    "index": index,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": c.logprobs,
                })
            }
            Kind::Text => json!({
                "index": index,
                "text": c.text,
                "finish_reason": finish,
                "logprobs": c.logprobs,
            }),
        }
    }

    /// One choice of a stream chunk carrying pieces of tool calls.
    pub fn tool_delta(self, d: &ToolCallDelta) -> Value {
        let mut function = serde_json::Map::new();
        if let Some(name) = &d.name {
            function.insert("name".into(), name.as_str().into());
        }
        function.insert("arguments".into(), d.arguments.as_str().into());
        let mut piece = json!({"index": d.index, "function": function});
        if let (Some(id), Some(o)) = (&d.id, piece.as_object_mut()) {
            o.insert("id".into(), id.as_str().into());
            o.insert("type".into(), "function".into());
        }
        json!({"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": null, "logprobs": null})
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

/// A tool call as OpenAI answers it.
fn call(c: &ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

/// OpenAI's error body for `e`: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(e: &RouterError) -> Value {
    let told = e.told();
    // A refused field's name, as OpenAI says it: the message's first word, when it is one.
    let param = match e {
        RouterError::InvalidArgument(m) => m
            .split_once(':')
            .map(|(p, _)| p)
            .filter(|p| !p.is_empty() && !p.contains(' ')),
        _ => None,
    };
    json!({"error": {"message": e.client_message(), "type": told.kind, "param": param, "code": told.code}})
}
