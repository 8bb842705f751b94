//! Anthropic's Messages API: `{url}/v1/messages`. A prompt becomes one user message; system
//! messages go to the `system` field, as the API requires.

use async_trait::async_trait;
use reqwest::{
    Client, Url,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use serde::{Deserialize, Serialize};

use super::{Provider, ProviderError, http};
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

#[async_trait]
impl Provider for Anthropic {
    async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
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
        let body = Body {
            model,
            max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            messages,
            system: (!system.is_empty()).then(|| system.join("\n\n")),
            temperature: p.temperature.map(|t| t.min(1.0)),
            stop_sequences: &p.stop,
        };
        let r: Response = http::post_json(&self.client, &self.messages, &body).await?;
        r.into_completion()
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
