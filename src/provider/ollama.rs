//! Ollama's native API: `/api/generate` for prompts, `/api/chat` for messages.

use async_trait::async_trait;
use reqwest::{Client, Url, header::HeaderMap};
use serde::{Deserialize, Serialize};

use super::{
    EventStream, Provider, ProviderError, WireMessage, http,
    stream::{self, Decode, Framing, Read},
    wire_messages,
};
use crate::{
    completion::{Completion, CompletionRequest, GenParams, Input, Usage},
    config::ProviderConfig,
};

pub struct Ollama {
    client: Client,
    generate: Url,
    chat: Url,
}

impl Ollama {
    pub fn new(config: &ProviderConfig, base: &Url) -> Result<Ollama, reqwest::Error> {
        Ok(Ollama {
            client: http::client(config, HeaderMap::new())?,
            generate: http::join(base, "/api/generate"),
            chat: http::join(base, "/api/chat"),
        })
    }
}

#[derive(Serialize)]
struct Options<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    num_predict: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
}

impl<'a> From<&'a GenParams> for Options<'a> {
    fn from(p: &'a GenParams) -> Self {
        Options {
            num_predict: p.max_tokens,
            temperature: p.temperature,
            stop: &p.stop,
            seed: p.seed,
        }
    }
}

#[derive(Serialize)]
struct GenerateBody<'a> {
    model: &'a str,
    prompt: &'a str,
    stream: bool,
    options: Options<'a>,
}

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    options: Options<'a>,
}

#[derive(Deserialize)]
struct GenerateResponse {
    response: String,
    #[serde(flatten)]
    tail: Tail,
}

#[derive(Deserialize)]
struct ChatResponse {
    message: ChatReply,
    #[serde(flatten)]
    tail: Tail,
}

#[derive(Deserialize)]
struct ChatReply {
    #[serde(default)]
    content: String,
}

/// Fields both endpoints end their answer with.
#[derive(Deserialize)]
struct Tail {
    done_reason: Option<String>,
    prompt_eval_count: Option<u32>,
    eval_count: Option<u32>,
}

impl Tail {
    fn finish(self, text: String) -> Completion {
        let usage = match (self.prompt_eval_count, self.eval_count) {
            (None, None) => None,
            (p, c) => Some(Usage {
                prompt_tokens: p.unwrap_or_default(),
                completion_tokens: c.unwrap_or_default(),
            }),
        };
        Completion {
            text,
            finish_reason: self.done_reason.unwrap_or_default(),
            usage,
        }
    }
}

impl From<GenerateResponse> for Completion {
    fn from(r: GenerateResponse) -> Completion {
        r.tail.finish(r.response)
    }
}

impl From<ChatResponse> for Completion {
    fn from(r: ChatResponse) -> Completion {
        r.tail.finish(r.message.content)
    }
}

/// One line of a streamed answer, from either endpoint.
#[derive(Deserialize)]
struct StreamLine {
    /// `/api/generate`
    response: Option<String>,
    /// `/api/chat`
    message: Option<ChatReply>,
    #[serde(default)]
    done: bool,
    #[serde(flatten)]
    tail: Tail,
    error: Option<serde_json::Value>,
}

/// Reads NDJSON lines until one says `"done": true`, keeping that line's tail.
#[derive(Default)]
pub(crate) struct Lines {
    tail: Option<Tail>,
}

impl Decode for Lines {
    fn read(&mut self, payload: &[u8]) -> Result<Read, ProviderError> {
        let line: StreamLine =
            serde_json::from_slice(payload).map_err(|e| stream::malformed(&e))?;
        if line.error.is_some() {
            // Ollama's error is free text that may quote the prompt: none of it is kept.
            return Err(stream::stream_error(None));
        }
        let text = line
            .response
            .or(line.message.map(|m| m.content))
            .unwrap_or_default();
        if line.done {
            self.tail = Some(line.tail);
        }
        Ok(Read {
            text,
            end: line.done,
        })
    }

    fn finish(self) -> (String, Option<Usage>) {
        match self.tail {
            Some(tail) => {
                let c = tail.finish(String::new());
                (c.finish_reason, c.usage)
            }
            None => (String::new(), None),
        }
    }
}

/// An answer (status, `Retry-After`, body) read as [`Provider::complete`] reads it, from
/// `/api/chat` when `chat`, else `/api/generate`.
#[cfg(any(test, feature = "fuzzing"))]
pub fn read_answer(
    chat: bool,
    status: u16,
    retry_after: &[u8],
    body: &[u8],
) -> Result<Completion, ProviderError> {
    if chat {
        http::read_answer::<ChatResponse>(status, retry_after, body).map(Completion::from)
    } else {
        http::read_answer::<GenerateResponse>(status, retry_after, body).map(Completion::from)
    }
}

#[async_trait]
impl Provider for Ollama {
    async fn stream(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<EventStream, ProviderError> {
        let options = Options::from(&request.params);
        let resp = match &request.input {
            Input::Prompt(prompt) => {
                let body = GenerateBody {
                    model,
                    prompt,
                    stream: true,
                    options,
                };
                http::post_for_stream(&self.client, &self.generate, &body).await?
            }
            Input::Chat(messages) => {
                let body = ChatBody {
                    model,
                    messages: wire_messages(messages),
                    stream: true,
                    options,
                };
                http::post_for_stream(&self.client, &self.chat, &body).await?
            }
        };
        Ok(stream::events(
            stream::body(resp),
            Framing::Ndjson,
            Lines::default(),
        ))
    }

    async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        let options = Options::from(&request.params);
        match &request.input {
            Input::Prompt(prompt) => {
                let body = GenerateBody {
                    model,
                    prompt,
                    stream: false,
                    options,
                };
                let r: GenerateResponse =
                    http::post_json(&self.client, &self.generate, &body).await?;
                Ok(r.into())
            }
            Input::Chat(messages) => {
                let body = ChatBody {
                    model,
                    messages: wire_messages(messages),
                    stream: false,
                    options,
                };
                let r: ChatResponse = http::post_json(&self.client, &self.chat, &body).await?;
                Ok(r.into())
            }
        }
    }
}
