//! Ollama's native API: `/api/generate` for prompts, `/api/chat` for messages. Sampling goes
//! in `options`; images as each message's base64 `images`; tools in OpenAI's shape, tool calls
//! with arguments as objects; a `tool` message names its function (`tool_name`), since Ollama
//! has no call ids; JSON output as `format` (`"json"` or the schema itself).

use std::collections::BTreeMap;

use async_trait::async_trait;
use reqwest::{Client, Url, header::HeaderMap};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    EventStream, Provider, ProviderError, http,
    stream::{self, Decode, Framing, Read},
    usage::{self, Tokens},
    wire::{self, CallIn, ToolOut},
};
use crate::{
    completion::{
        Base64, ChatMessage, Completion, CompletionRequest, GenParams, ImageSource, Input,
        ResponseFormat, ToolChoice, Usage,
    },
    config::ProviderConfig,
};

/// Pass-through fields that are top-level in Ollama's body; the others go in `options`.
const TOP_LEVEL: &[&str] = &["keep_alive", "think"];

pub struct Ollama {
    client: Client,
    generate: Url,
    chat: Url,
    probe: Url,
}

impl Ollama {
    pub fn new(config: &ProviderConfig, base: &Url) -> Result<Ollama, reqwest::Error> {
        Ok(Ollama {
            client: http::client(config, HeaderMap::new())?,
            generate: http::join(base, "/api/generate"),
            chat: http::join(base, "/api/chat"),
            probe: http::probe_url(config, base, "/api/tags"),
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
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    /// Pass-through fields that are options (`top_k`, `min_p`, `num_ctx`, ...).
    #[serde(flatten)]
    extra: BTreeMap<&'a str, &'a Value>,
}

/// What every body carries besides its input.
#[derive(Serialize)]
struct Common<'a> {
    model: &'a str,
    stream: bool,
    options: Options<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<Value>,
    /// Pass-through fields that are top-level (`keep_alive`, `think`).
    #[serde(flatten)]
    top: BTreeMap<&'a str, &'a Value>,
}

impl<'a> Common<'a> {
    fn new(model: &'a str, p: &'a GenParams, stream: bool) -> Common<'a> {
        let (top, extra) = p
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .partition(|(k, _)| TOP_LEVEL.contains(k));
        Common {
            model,
            stream,
            options: Options {
                num_predict: p.max_tokens,
                temperature: p.temperature,
                stop: &p.stop,
                seed: p.seed,
                top_p: p.top_p,
                frequency_penalty: p.frequency_penalty,
                presence_penalty: p.presence_penalty,
                extra,
            },
            format: match &p.response_format {
                None | Some(ResponseFormat::Text) => None,
                Some(ResponseFormat::JsonObject) => Some("json".into()),
                Some(ResponseFormat::JsonSchema { schema, .. }) => {
                    Some(schema.as_deref().cloned().unwrap_or_else(|| "json".into()))
                }
            },
            top,
        }
    }
}

#[derive(Serialize)]
struct GenerateBody<'a> {
    prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    suffix: Option<&'a str>,
    #[serde(flatten)]
    common: Common<'a>,
}

#[derive(Serialize)]
struct ChatBody<'a> {
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolOut<'a>>,
    #[serde(flatten)]
    common: Common<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<Base64<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<CallOut<'a>>,
    /// The function a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<&'a str>,
}

#[derive(Serialize)]
struct CallOut<'a> {
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
    name: &'a str,
    arguments: Value,
}

fn messages(messages: &[ChatMessage]) -> Vec<Message<'_>> {
    let name_of = |id: &str| {
        messages
            .iter()
            .flat_map(|m| &m.tool_calls)
            .find(|c| c.id == id)
            .map(|c| c.name.as_str())
    };
    messages
        .iter()
        .map(|m| Message {
            role: m.role.as_str(),
            content: m.content.text(),
            images: m
                .content
                .images()
                .filter_map(|i| match &i.source {
                    ImageSource::Inline { data, .. } => Some(Base64(data)),
                    // Refused before sending (see `unsupported`).
                    ImageSource::Url(_) => None,
                })
                .collect(),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| CallOut {
                    function: FunctionOut {
                        name: &c.name,
                        arguments: serde_json::from_str(&c.arguments).unwrap_or(Value::Null),
                    },
                })
                .collect(),
            tool_name: m.tool_call_id.as_deref().and_then(name_of),
        })
        .collect()
}

/// The request's tools; none for `tool_choice: none` (Ollama has no tool_choice: a model
/// offered no tools calls none).
fn tools(p: &GenParams) -> Vec<ToolOut<'_>> {
    if p.tool_choice == Some(ToolChoice::None) {
        return Vec::new();
    }
    wire::tools(&p.tools)
}

/// Why Ollama's API cannot carry `r`, naming the field.
fn unsupported(r: &CompletionRequest) -> Option<String> {
    let p = &r.params;
    let no = |field: &str| Some(format!("{field}: Ollama's API has no such field"));
    if !p.logit_bias.is_empty() {
        return no("logit_bias");
    }
    if p.logprobs {
        return no("logprobs");
    }
    if p.echo {
        return no("echo");
    }
    if p.best_of.is_some() {
        return no("best_of");
    }
    if p.suffix.is_some() && matches!(r.input, Input::Chat(_)) {
        return no("suffix");
    }
    match &p.tool_choice {
        Some(ToolChoice::Required) => return no("tool_choice: required"),
        Some(ToolChoice::Function(_)) => return no("tool_choice: a named function"),
        _ => {}
    }
    if p.parallel_tool_calls == Some(false) {
        return no("parallel_tool_calls: false");
    }
    if let Input::Chat(messages) = &r.input {
        for (i, m) in messages.iter().enumerate() {
            if m.content
                .images()
                .any(|img| matches!(img.source, ImageSource::Url(_)))
            {
                return Some(format!(
                    "messages[{i}].content: Ollama takes images as bytes, not URLs (send a data: URL)"
                ));
            }
        }
    }
    super::beyond_openai(r, "Ollama's API")
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
    #[serde(default)]
    tool_calls: Vec<CallIn>,
}

/// Fields both endpoints end their answer with.
#[derive(Deserialize)]
struct Tail {
    done_reason: Option<String>,
    prompt_eval_count: Option<Tokens>,
    eval_count: Option<Tokens>,
}

impl Tail {
    fn finish(self, text: String) -> Completion {
        let usage = match (self.prompt_eval_count, self.eval_count) {
            (None, None) => None,
            (p, c) => Some(usage::reported(
                p.unwrap_or_default(),
                c.unwrap_or_default(),
            )),
        };
        Completion::text(text, self.done_reason.unwrap_or_default(), usage)
    }
}

impl From<GenerateResponse> for Completion {
    fn from(r: GenerateResponse) -> Completion {
        r.tail.finish(r.response)
    }
}

impl From<ChatResponse> for Completion {
    fn from(r: ChatResponse) -> Completion {
        let calls = wire::calls(r.message.tool_calls);
        let mut c = r.tail.finish(r.message.content);
        if !calls.is_empty() {
            // Ollama says "stop" when the model called tools.
            c.finish_reason = "tool_calls".into();
            c.tool_calls = calls;
        }
        c
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
    /// Tool calls seen so far (each comes whole, in one line).
    calls: u32,
}

impl Decode for Lines {
    fn read(&mut self, payload: &[u8]) -> Result<Read, ProviderError> {
        let line: StreamLine =
            serde_json::from_slice(payload).map_err(|e| stream::malformed(&e))?;
        if line.error.is_some() {
            // Ollama's error is free text that may quote the prompt: none of it is kept.
            return Err(stream::stream_error(None));
        }
        let (text, calls) = match (line.response, line.message) {
            (Some(t), _) => (t, Vec::new()),
            (None, Some(m)) => (m.content, m.tool_calls),
            (None, None) => (String::new(), Vec::new()),
        };
        let tool_calls = wire::deltas(calls, self.calls);
        self.calls += u32::try_from(tool_calls.len()).unwrap_or(u32::MAX);
        if line.done {
            self.tail = Some(line.tail);
        }
        Ok(Read {
            text,
            tool_calls,
            end: line.done,
        })
    }

    fn finish(self) -> (String, Option<Usage>) {
        match self.tail {
            Some(tail) => {
                let c = tail.finish(String::new());
                let reason = if self.calls > 0 {
                    "tool_calls".into()
                } else {
                    c.finish_reason
                };
                (reason, c.usage)
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
    fn unsupported(&self, request: &CompletionRequest) -> Option<String> {
        unsupported(request)
    }

    async fn probe(&self) -> Result<(), ProviderError> {
        http::probe(&self.client, &self.probe).await
    }

    async fn stream(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<EventStream, ProviderError> {
        let p = &request.params;
        let resp = match &request.input {
            Input::Prompt(prompt) => {
                let body = GenerateBody {
                    prompt,
                    suffix: p.suffix.as_deref(),
                    common: Common::new(model, p, true),
                };
                http::post_for_stream(&self.client, &self.generate, &body).await?
            }
            Input::Chat(m) => {
                let body = ChatBody {
                    messages: messages(m),
                    tools: tools(p),
                    common: Common::new(model, p, true),
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
        let p = &request.params;
        match &request.input {
            Input::Prompt(prompt) => {
                let body = GenerateBody {
                    prompt,
                    suffix: p.suffix.as_deref(),
                    common: Common::new(model, p, false),
                };
                let r: GenerateResponse =
                    http::post_json(&self.client, &self.generate, &body).await?;
                Ok(r.into())
            }
            Input::Chat(m) => {
                let body = ChatBody {
                    messages: messages(m),
                    tools: tools(p),
                    common: Common::new(model, p, false),
                };
                let r: ChatResponse = http::post_json(&self.client, &self.chat, &body).await?;
                Ok(r.into())
            }
        }
    }
}
