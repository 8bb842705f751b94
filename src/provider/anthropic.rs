//! Anthropic's Messages API: `{url}/v1/messages`. A prompt becomes one user message; system
//! messages go to the `system` field, as the API requires; tools go with `input_schema`, tool
//! calls as `tool_use` blocks and results as `tool_result` blocks; images as base64 or URL
//! image blocks; a JSON response format as a tool the model must call (see [`json_tool`]). It
//! has no seed, penalties, logit bias or log probabilities: a request that asks for one is not
//! sent here (see [`unsupported`]).

use std::{borrow::Cow, collections::BTreeMap};

use async_trait::async_trait;
use reqwest::{
    Client, Url,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    EventStream, Provider, ProviderError, http,
    stream::{self, Decode, Framing, Read},
    usage::{self, Tokens},
};
use crate::{
    completion::{
        Base64, ChatMessage, Completion, CompletionRequest, Content, FailureKind, GenParams,
        ImageSource, Input, Part, ResponseFormat, Role, ToolCall, ToolCallDelta, ToolChoice, Usage,
    },
    config::ProviderConfig,
};

/// The API requires `max_tokens`; this is used when the request sets none.
const DEFAULT_MAX_TOKENS: u32 = 1024;
const API_VERSION: &str = "2023-06-01";

pub struct Anthropic {
    client: Client,
    messages: Url,
    probe: Url,
}

impl Anthropic {
    pub fn new(config: &ProviderConfig, base: &Url) -> Result<Anthropic, reqwest::Error> {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(API_VERSION),
        );
        if let Some(key) = &config.api_key
            && let Ok(mut v) = HeaderValue::from_str(key.expose())
        {
            v.set_sensitive(true);
            headers.insert(HeaderName::from_static("x-api-key"), v);
        }
        Ok(Anthropic {
            client: http::client(config, headers)?,
            messages: http::join(base, "/v1/messages"),
            probe: http::probe_url(config, base, "/v1/models"),
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    /// Pass-through fields (`top_k`, `metadata`, ...), top-level as the API takes them.
    #[serde(flatten)]
    extra: &'a BTreeMap<String, Value>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Vec<Block<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: Cow<'a, str>,
    },
    Image {
        source: ImageSourceOut<'a>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: Cow<'a, str>,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSourceOut<'a> {
    Base64 {
        media_type: &'a str,
        data: Base64<'a>,
    },
    Url {
        url: &'a str,
    },
}

#[derive(Serialize)]
struct ToolOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Cow<'a, Value>,
}

#[derive(Deserialize)]
struct Response {
    content: Vec<BlockIn>,
    stop_reason: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct BlockIn {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    input: Option<Value>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Tokens,
    #[serde(default)]
    output_tokens: Tokens,
}

/// Why the Messages API cannot carry `r`, naming the field.
fn unsupported(r: &CompletionRequest) -> Option<String> {
    let p = &r.params;
    let no = |field: &str| {
        Some(format!(
            "{field}: Anthropic's Messages API has no such field"
        ))
    };
    if p.seed.is_some() {
        return no("seed");
    }
    if p.frequency_penalty.is_some() {
        return no("frequency_penalty");
    }
    if p.presence_penalty.is_some() {
        return no("presence_penalty");
    }
    if !p.logit_bias.is_empty() {
        return no("logit_bias");
    }
    if p.logprobs {
        return no("logprobs");
    }
    if p.echo || p.suffix.is_some() || p.best_of.is_some() {
        return no("echo, suffix and best_of");
    }
    if let Some(t) = p.temperature
        && t > 1.0
    {
        return Some(format!(
            "temperature: {t}; Anthropic's range is 0.0 ..= 1.0"
        ));
    }
    if p.response_format.as_ref().is_some_and(|f| f.is_json()) && !p.tools.is_empty() {
        return Some(
            "response_format: with tools of its own, a JSON answer cannot go to Anthropic (its JSON mode is a forced tool)".into(),
        );
    }
    super::beyond_openai(r, "Anthropic's Messages API")
}

/// The content blocks of one message.
fn blocks(m: &ChatMessage) -> Vec<Block<'_>> {
    if m.role == Role::Tool {
        return vec![Block::ToolResult {
            tool_use_id: m.tool_call_id.as_deref().unwrap_or_default(),
            content: m.content.text(),
        }];
    }
    let mut out = Vec::new();
    match &m.content {
        Content::Text(t) if t.is_empty() && !m.tool_calls.is_empty() => {}
        Content::Text(t) => out.push(Block::Text { text: t.into() }),
        Content::Parts(parts) => {
            for p in parts {
                out.push(match p {
                    Part::Text(t) => Block::Text { text: t.into() },
                    Part::Image(img) => Block::Image {
                        source: match &img.source {
                            ImageSource::Inline { mime, data } => ImageSourceOut::Base64 {
                                media_type: mime,
                                data: Base64(data),
                            },
                            ImageSource::Url(url) => ImageSourceOut::Url { url },
                        },
                    },
                });
            }
        }
    }
    for c in &m.tool_calls {
        out.push(Block::ToolUse {
            id: &c.id,
            name: &c.name,
            input: serde_json::from_str(&c.arguments).unwrap_or(Value::Null),
        });
    }
    out
}

/// The request body for `request`: a prompt as one user message, system messages joined into
/// `system`, tool results as `tool_result` blocks of a user turn (consecutive results in one
/// turn, as the API requires), tool calls as `tool_use` blocks.
fn body<'a>(model: &'a str, request: &'a CompletionRequest, stream: bool) -> Body<'a> {
    let mut system = Vec::new();
    let mut messages: Vec<Message<'a>> = Vec::new();
    match &request.input {
        Input::Prompt(p) => messages.push(Message {
            role: "user",
            content: vec![Block::Text {
                text: p.as_str().into(),
            }],
        }),
        Input::Chat(chat) => {
            for m in chat {
                let role = match m.role {
                    Role::System => {
                        system.push(m.content.text());
                        continue;
                    }
                    Role::User | Role::Tool => "user",
                    Role::Assistant => "assistant",
                };
                let content = blocks(m);
                match messages.last_mut() {
                    // Tool results that follow one another form one user turn.
                    Some(last)
                        if m.role == Role::Tool
                            && last.role == "user"
                            && matches!(last.content.last(), Some(Block::ToolResult { .. })) =>
                    {
                        last.content.extend(content);
                    }
                    _ => messages.push(Message { role, content }),
                }
            }
        }
    }
    let p = &request.params;
    let empty_schema = || Cow::Owned(serde_json::json!({"type": "object", "properties": {}}));
    if let Some((name, description, schema)) = json_tool(request) {
        // JSON mode: one tool whose input is the answer, which the model must call.
        return Body {
            tools: vec![ToolOut {
                name,
                description,
                input_schema: schema.map_or_else(empty_schema, Cow::Borrowed),
            }],
            tool_choice: Some(serde_json::json!({"type": "tool", "name": name})),
            ..Body::plain(model, p, messages, system, stream)
        };
    }
    let mut tool_choice = p.tool_choice.as_ref().map(|c| match c {
        ToolChoice::Auto => serde_json::json!({"type": "auto"}),
        ToolChoice::None => serde_json::json!({"type": "none"}),
        ToolChoice::Required => serde_json::json!({"type": "any"}),
        ToolChoice::Function(name) => serde_json::json!({"type": "tool", "name": name}),
    });
    if p.parallel_tool_calls == Some(false) && !p.tools.is_empty() {
        let choice = tool_choice.get_or_insert_with(|| serde_json::json!({"type": "auto"}));
        if let Some(o) = choice.as_object_mut() {
            o.insert("disable_parallel_tool_use".into(), true.into());
        }
    }
    Body {
        tools: p
            .tools
            .iter()
            .map(|t| ToolOut {
                name: &t.name,
                description: t.description.as_deref(),
                input_schema: t
                    .parameters
                    .as_deref()
                    .map_or_else(empty_schema, Cow::Borrowed),
            })
            .collect(),
        tool_choice,
        ..Body::plain(model, p, messages, system, stream)
    }
}

impl<'a> Body<'a> {
    /// A body without tools.
    fn plain(
        model: &'a str,
        p: &'a GenParams,
        messages: Vec<Message<'a>>,
        system: Vec<Cow<'a, str>>,
        stream: bool,
    ) -> Body<'a> {
        Body {
            model,
            max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            messages,
            system: (!system.is_empty()).then(|| system.join("\n\n")),
            temperature: p.temperature,
            top_p: p.top_p,
            stop_sequences: &p.stop,
            tools: Vec::new(),
            tool_choice: None,
            stream,
            extra: &p.extra,
        }
    }
}

/// The Messages API has no JSON mode; a JSON response format becomes a tool the model must
/// call, whose input is the answer (as LiteLLM maps it): its name, description and schema
/// (`None`: any object). `None` when the request asks no JSON.
fn json_tool(r: &CompletionRequest) -> Option<(&str, Option<&str>, Option<&Value>)> {
    match r.params.response_format.as_ref()? {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(("json_output", None, None)),
        ResponseFormat::JsonSchema {
            name,
            description,
            schema,
            ..
        } => Some((name, description.as_deref(), schema.as_deref())),
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn unsupported(&self, request: &CompletionRequest) -> Option<String> {
        unsupported(request)
    }

    async fn probe(&self) -> Result<(), ProviderError> {
        http::probe(&self.client, &self.probe).await
    }

    async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        let r: Response =
            http::post_json(&self.client, &self.messages, &body(model, request, false)).await?;
        r.into_completion(json_tool(request).is_some())
    }

    async fn stream(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<EventStream, ProviderError> {
        let resp = http::post_for_stream(&self.client, &self.messages, &body(model, request, true))
            .await?;
        Ok(stream::events(
            stream::body(resp),
            Framing::Sse,
            Events {
                json_mode: json_tool(request).is_some(),
                ..Events::default()
            },
        ))
    }
}

/// One streamed event; its `type` says which fields it has.
#[derive(Deserialize)]
struct StreamEventBody {
    #[serde(rename = "type")]
    kind: String,
    /// `message_start`
    message: Option<StartedMessage>,
    /// `content_block_delta` (text) and `message_delta` (stop reason)
    delta: Option<Delta>,
    /// `message_delta`
    usage: Option<DeltaUsage>,
    /// `error`
    error: Option<StreamError>,
    /// `content_block_start` / `content_block_delta`: which block
    #[serde(default)]
    index: u32,
    /// `content_block_start`
    content_block: Option<BlockIn>,
}

#[derive(Deserialize)]
struct StartedMessage {
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Delta {
    text: Option<String>,
    /// `input_json_delta`: a piece of a tool call's input
    partial_json: Option<String>,
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaUsage {
    #[serde(default)]
    output_tokens: u32,
}

#[derive(Deserialize)]
struct StreamError {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Reads Messages API events until `message_stop`.
#[derive(Default)]
pub(crate) struct Events {
    stop_reason: Option<String>,
    usage: Option<Usage>,
    /// The content block index of each tool call so far, in order.
    calls: Vec<u32>,
    /// JSON mode (see [`json_tool`]): the forced call's input is the answer's text.
    pub(crate) json_mode: bool,
}

impl Decode for Events {
    fn read(&mut self, payload: &[u8]) -> Result<Read, ProviderError> {
        let event: StreamEventBody =
            serde_json::from_slice(payload).map_err(|e| stream::malformed(&e))?;
        match event.kind.as_str() {
            "message_start" => {
                if let Some(u) = event.message.and_then(|m| m.usage) {
                    self.usage = Some(usage::reported(u.input_tokens, u.output_tokens));
                }
                Ok(Read::default())
            }
            "content_block_start" => match event.content_block {
                Some(b) if b.kind == "tool_use" && self.json_mode => {
                    self.calls.push(event.index);
                    Ok(Read::default())
                }
                Some(b) if b.kind == "tool_use" => {
                    let index = u32::try_from(self.calls.len()).unwrap_or(u32::MAX);
                    self.calls.push(event.index);
                    Ok(Read {
                        tool_calls: vec![ToolCallDelta {
                            index,
                            id: Some(b.id),
                            name: Some(b.name),
                            arguments: String::new(),
                        }],
                        ..Read::default()
                    })
                }
                _ => Ok(Read::default()),
            },
            "content_block_delta" => {
                let Some(d) = event.delta else {
                    return Ok(Read::default());
                };
                match (
                    d.partial_json,
                    self.calls.iter().position(|&b| b == event.index),
                ) {
                    (Some(json), Some(_)) if self.json_mode => Ok(Read::text(json)),
                    (Some(json), Some(call)) => Ok(Read {
                        tool_calls: vec![ToolCallDelta {
                            index: u32::try_from(call).unwrap_or(u32::MAX),
                            arguments: json,
                            ..ToolCallDelta::default()
                        }],
                        ..Read::default()
                    }),
                    _ => Ok(Read::text(d.text.unwrap_or_default())),
                }
            }
            "message_delta" => {
                if let Some(reason) = event.delta.and_then(|d| d.stop_reason) {
                    self.stop_reason = Some(reason);
                }
                if let Some(u) = event.usage {
                    self.usage
                        .get_or_insert_with(Usage::default)
                        .completion_tokens = u.output_tokens;
                }
                Ok(Read::default())
            }
            "message_stop" => Ok(Read::end()),
            "error" => Err(stream::stream_error(
                event.error.and_then(|e| e.kind).as_deref(),
            )),
            // ping, content_block_start/stop, and types added later
            _ => Ok(Read::default()),
        }
    }

    fn finish(self) -> (String, Option<Usage>) {
        let reason = match self.stop_reason {
            Some(r) if self.json_mode && r == "tool_use" => "end_turn".into(),
            r => r.unwrap_or_default(),
        };
        (reason, self.usage)
    }
}

impl Response {
    /// The text blocks joined; an answer with no content at all is malformed. In JSON mode
    /// the forced call's input is the text.
    fn into_completion(self, json_mode: bool) -> Result<Completion, ProviderError> {
        if self.content.is_empty() {
            return Err(ProviderError::new(
                FailureKind::Malformed,
                "response has no content",
            ));
        }
        if json_mode {
            let input = self
                .content
                .into_iter()
                .find(|b| b.kind == "tool_use")
                .and_then(|b| b.input)
                .ok_or_else(|| {
                    ProviderError::new(FailureKind::Malformed, "JSON mode: no tool_use input")
                })?;
            let stop = match self.stop_reason.as_deref() {
                Some("tool_use") | None => "end_turn".to_string(),
                Some(other) => other.to_string(),
            };
            return Ok(Completion::text(
                input.to_string(),
                stop,
                self.usage
                    .map(|u| usage::reported(u.input_tokens, u.output_tokens)),
            ));
        }
        let text: String = self
            .content
            .iter()
            .filter(|b| b.kind == "text")
            .map(|b| b.text.as_str())
            .collect();
        let tool_calls = self
            .content
            .into_iter()
            .filter(|b| b.kind == "tool_use")
            .map(|b| ToolCall {
                id: b.id,
                name: b.name,
                arguments: b
                    .input
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "{}".into()),
            })
            .collect();
        Ok(Completion {
            text,
            finish_reason: self.stop_reason.unwrap_or_default(),
            usage: self
                .usage
                .map(|u| usage::reported(u.input_tokens, u.output_tokens)),
            tool_calls,
            logprobs: None,
        })
    }
}

/// An answer (status, `Retry-After`, body) read as [`Provider::complete`] reads it.
#[cfg(any(test, feature = "fuzzing"))]
pub fn read_answer(
    status: u16,
    retry_after: &[u8],
    body: &[u8],
) -> Result<Completion, ProviderError> {
    http::read_answer::<Response>(status, retry_after, body)?.into_completion(false)
}
