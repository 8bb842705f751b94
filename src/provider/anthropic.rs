//! Anthropic's Messages API: `{url}/v1/messages`. A prompt becomes one user message; system
//! messages go to the `system` field, as the API requires.

use async_trait::async_trait;
use reqwest::{
    Client, Url,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use serde::{Deserialize, Serialize};

use super::{
    EventStream, Provider, ProviderError, http,
    stream::{self, Decode, Framing, Read},
};
use crate::{
    completion::{Completion, CompletionRequest, FailureKind, Input, Role, Usage},
    config::ProviderConfig,
};

/// The API requires `max_tokens`; this is used when the request sets none.
const DEFAULT_MAX_TOKENS: u32 = 1024;
const API_VERSION: &str = "2023-06-01";

pub struct Anthropic {
    client: Client,
    messages: Url,
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
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Deserialize)]
struct Response {
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u32,
    #[serde(default)]
    output_tokens: u32,
}

/// The request body for `request`: a prompt as one user message, system messages joined
/// into `system`.
fn body<'a>(model: &'a str, request: &'a CompletionRequest, stream: bool) -> Body<'a> {
    let mut system = Vec::new();
    let mut messages = Vec::new();
    match &request.input {
        Input::Prompt(p) => messages.push(Message {
            role: "user",
            content: p,
        }),
        Input::Chat(chat) => {
            for m in chat {
                match m.role {
                    Role::System => system.push(m.content.as_str()),
                    Role::User | Role::Tool => messages.push(Message {
                        role: "user",
                        content: &m.content,
                    }),
                    Role::Assistant => messages.push(Message {
                        role: "assistant",
                        content: &m.content,
                    }),
                }
            }
        }
    }
    let p = &request.params;
    Body {
        model,
        max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        messages,
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        temperature: p.temperature.map(|t| t.min(1.0)),
        stop_sequences: &p.stop,
        stream,
    }
}

#[async_trait]
impl Provider for Anthropic {
    async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        let r: Response =
            http::post_json(&self.client, &self.messages, &body(model, request, false)).await?;
        r.into_completion()
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
            Events::default(),
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
}

#[derive(Deserialize)]
struct StartedMessage {
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Delta {
    text: Option<String>,
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
}

impl Decode for Events {
    fn read(&mut self, payload: &[u8]) -> Result<Read, ProviderError> {
        let event: StreamEventBody =
            serde_json::from_slice(payload).map_err(|e| stream::malformed(&e))?;
        match event.kind.as_str() {
            "message_start" => {
                if let Some(u) = event.message.and_then(|m| m.usage) {
                    self.usage = Some(Usage {
                        prompt_tokens: u.input_tokens,
                        completion_tokens: u.output_tokens,
                    });
                }
                Ok(Read::default())
            }
            "content_block_delta" => Ok(Read::text(
                event.delta.and_then(|d| d.text).unwrap_or_default(),
            )),
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
        (self.stop_reason.unwrap_or_default(), self.usage)
    }
}

impl Response {
    /// The text blocks joined; an answer with no content at all is malformed.
    fn into_completion(self) -> Result<Completion, ProviderError> {
        if self.content.is_empty() {
            return Err(ProviderError::new(
                FailureKind::Malformed,
                "response has no content",
            ));
        }
        let text: String = self
            .content
            .iter()
            .filter(|b| b.kind == "text")
            .map(|b| b.text.as_str())
            .collect();
        Ok(Completion {
            text,
            finish_reason: self.stop_reason.unwrap_or_default(),
            usage: self.usage.map(|u| Usage {
                prompt_tokens: u.input_tokens,
                completion_tokens: u.output_tokens,
            }),
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
    http::read_answer::<Response>(status, retry_after, body)?.into_completion()
}
