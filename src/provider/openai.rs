//! OpenAI-compatible servers (OpenAI, vLLM, llama.cpp server, Grok, OpenRouter):
//! `{base_url}/completions` for prompts, `{base_url}/chat/completions` for messages.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use reqwest::{
    Client, Url,
    header::{AUTHORIZATION, HeaderMap, HeaderValue},
};
use serde::{Deserialize, Serialize};

use super::{
    EventStream, Provider, ProviderError, http,
    stream::{self, Decode, Framing, Read},
    usage::{self, Tokens},
    wire::{self, CallIn, ToolFields},
};
use crate::{
    completion::{Completion, CompletionRequest, FailureKind, GenParams, Input, Usage},
    config::ProviderConfig,
};

pub struct OpenAi {
    client: Client,
    completions: Url,
    chat: Url,
    probe: Url,
    /// Unary calls go as streams (see `config::Api::OpenAi`).
    stream_unary: bool,
}

impl OpenAi {
    pub fn new(
        config: &ProviderConfig,
        base: &Url,
        stream_unary: bool,
    ) -> Result<OpenAi, reqwest::Error> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &config.api_key
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        {
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        Ok(OpenAi {
            client: http::client(config, headers)?,
            completions: http::join(base, "/completions"),
            chat: http::join(base, "/chat/completions"),
            probe: http::probe_url(config, base, "/models"),
            stream_unary,
        })
    }
}

/// The sampling fields both endpoints take, and the fields passed through as they came.
#[derive(Serialize)]
struct Sampling<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
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
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    logit_bias: &'a BTreeMap<u32, f32>,
    #[serde(flatten)]
    extra: &'a BTreeMap<String, serde_json::Value>,
}

impl<'a> From<&'a GenParams> for Sampling<'a> {
    fn from(p: &'a GenParams) -> Self {
        Sampling {
            max_tokens: p.max_tokens,
            temperature: p.temperature,
            stop: &p.stop,
            seed: p.seed,
            top_p: p.top_p,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            logit_bias: &p.logit_bias,
            extra: &p.extra,
        }
    }
}

/// `/v1/completions`' own fields: logprobs as a count, echo, suffix, best_of.
#[derive(Serialize)]
struct TextOnly<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    echo: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    suffix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    best_of: Option<u32>,
}

impl<'a> From<&'a GenParams> for TextOnly<'a> {
    fn from(p: &'a GenParams) -> Self {
        TextOnly {
            logprobs: p.logprobs.then(|| p.top_logprobs.unwrap_or(0)),
            echo: p.echo,
            suffix: p.suffix.as_deref(),
            best_of: p.best_of,
        }
    }
}

/// `/v1/chat/completions`' own fields: logprobs as a flag, tools and the response format.
#[derive(Serialize)]
struct ChatOnly<'a> {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    logprobs: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u32>,
    #[serde(flatten)]
    tools: ToolFields<'a>,
}

impl<'a> From<&'a GenParams> for ChatOnly<'a> {
    fn from(p: &'a GenParams) -> Self {
        ChatOnly {
            logprobs: p.logprobs,
            top_logprobs: p.top_logprobs,
            tools: ToolFields::of(p),
        }
    }
}

#[derive(Serialize)]
struct CompletionsBody<'a, P: Serialize> {
    model: &'a str,
    /// One prompt, or an array of prompts answered by `choices[].index`.
    prompt: P,
    #[serde(flatten)]
    sampling: Sampling<'a>,
    #[serde(flatten)]
    own: TextOnly<'a>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    stream: Option<Streamed>,
}

/// `stream: true`, with the usage in a last chunk before `[DONE]`.
#[derive(Serialize)]
struct Streamed {
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

const STREAMED: Streamed = Streamed {
    stream: true,
    stream_options: StreamOptions {
        include_usage: true,
    },
};

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<wire::Message<'a>>,
    #[serde(flatten)]
    sampling: Sampling<'a>,
    #[serde(flatten)]
    own: ChatOnly<'a>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    stream: Option<Streamed>,
}

#[derive(Deserialize)]
struct CompletionsResponse {
    choices: Vec<TextChoice>,
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct TextChoice {
    #[serde(default)]
    index: u32,
    text: String,
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<ChatChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ChatChoice {
    #[serde(default)]
    index: u32,
    message: ChatReply,
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChatReply {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<CallIn>>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Tokens,
    #[serde(default)]
    completion_tokens: Tokens,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Usage {
        usage::reported(u.prompt_tokens, u.completion_tokens)
    }
}

/// The choice with index 0 — the answer to a single prompt or to the messages — whatever
/// its position.
fn first_choice<C>(choices: Vec<C>, index: impl Fn(&C) -> u32) -> Result<C, ProviderError> {
    choices
        .into_iter()
        .find(|c| index(c) == 0)
        .ok_or_else(no_choice)
}

impl CompletionsResponse {
    fn first(self) -> Result<Completion, ProviderError> {
        let choice = first_choice(self.choices, |c| c.index)?;
        Ok(Completion {
            text: choice.text,
            finish_reason: choice.finish_reason.unwrap_or_default(),
            usage: self.usage.map(Usage::from),
            tool_calls: Vec::new(),
            logprobs: choice.logprobs.filter(|l| !l.is_null()),
        })
    }
}

impl ChatResponse {
    fn first(self) -> Result<Completion, ProviderError> {
        let choice = first_choice(self.choices, |c| c.index)?;
        Ok(Completion {
            text: choice.message.content.unwrap_or_default(),
            finish_reason: choice.finish_reason.unwrap_or_default(),
            usage: self.usage.map(Usage::from),
            tool_calls: wire::calls(choice.message.tool_calls.unwrap_or_default()),
            logprobs: choice.logprobs.filter(|l| !l.is_null()),
        })
    }
}

/// One chunk of a streamed answer, from either endpoint.
#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    usage: Option<WireUsage>,
    error: Option<StreamError>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    index: u32,
    /// `/completions`
    text: Option<String>,
    /// `/chat/completions`
    delta: Option<ChatReply>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct StreamError {
    code: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Reads `data:` payloads until `[DONE]`, keeping the finish reason and usage.
#[derive(Default)]
pub(crate) struct Chunks {
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

impl Decode for Chunks {
    fn read(&mut self, payload: &[u8]) -> Result<Read, ProviderError> {
        if payload == b"[DONE]" {
            return Ok(Read::end());
        }
        let chunk: StreamChunk =
            serde_json::from_slice(payload).map_err(|e| stream::malformed(&e))?;
        if let Some(e) = chunk.error {
            let code = e
                .code
                .as_ref()
                .and_then(|c| c.as_str())
                .or(e.kind.as_deref());
            return Err(stream::stream_error(code));
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u.into());
        }
        let mut read = Read::default();
        for c in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let (content, calls) = match c.delta {
                Some(d) => (d.content, d.tool_calls.unwrap_or_default()),
                None => (None, Vec::new()),
            };
            if let Some(t) = c.text.or(content) {
                read.text.push_str(&t);
            }
            read.tool_calls.extend(wire::deltas(calls, 0));
            if c.finish_reason.is_some() {
                self.finish_reason = c.finish_reason;
            }
        }
        Ok(read)
    }

    fn finish(self) -> (String, Option<Usage>) {
        (self.finish_reason.unwrap_or_default(), self.usage)
    }
}

/// An answer (status, `Retry-After`, body) read as the provider reads it: from
/// `/chat/completions` when `chat`; else from `/completions`, for one prompt when `prompts`
/// is 1 and as a batch of that many otherwise (then one result per prompt).
#[cfg(any(test, feature = "fuzzing"))]
pub fn read_answer(
    chat: bool,
    prompts: usize,
    status: u16,
    retry_after: &[u8],
    body: &[u8],
) -> Result<Vec<Result<Completion, ProviderError>>, ProviderError> {
    if chat {
        return Ok(vec![
            http::read_answer::<ChatResponse>(status, retry_after, body)?.first(),
        ]);
    }
    let resp: CompletionsResponse = http::read_answer(status, retry_after, body)?;
    Ok(if prompts == 1 {
        vec![resp.first()]
    } else {
        match_choices(prompts, resp.choices)
    })
}

fn no_choice() -> ProviderError {
    ProviderError::new(
        FailureKind::Malformed,
        "response has no choice with index 0",
    )
}

/// Matches choices back to prompts by `index`, never by position. A prompt with no choice, or
/// with two, fails alone; choices with an index out of range are ignored.
fn match_choices(n: usize, choices: Vec<TextChoice>) -> Vec<Result<Completion, ProviderError>> {
    let mut slots: Vec<Option<Result<Completion, ProviderError>>> = (0..n).map(|_| None).collect();
    for c in choices {
        let Some(slot) = slots.get_mut(c.index as usize) else {
            continue;
        };
        *slot = Some(match slot {
            None => Ok(Completion {
                text: c.text,
                finish_reason: c.finish_reason.unwrap_or_default(),
                logprobs: c.logprobs.filter(|l| !l.is_null()),
                ..Completion::default()
            }),
            Some(_) => Err(ProviderError::new(
                FailureKind::Malformed,
                format!("two choices with index {}", c.index),
            )),
        });
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            s.unwrap_or_else(|| {
                Err(ProviderError::new(
                    FailureKind::Malformed,
                    format!("no choice with index {i}"),
                ))
            })
        })
        .collect()
}

#[async_trait]
impl Provider for OpenAi {
    async fn probe(&self) -> Result<(), ProviderError> {
        http::probe(&self.client, &self.probe).await
    }

    fn batches_prompts(&self) -> bool {
        true
    }

    /// OpenAI's own API: every field of its reference goes as it came.
    fn unsupported(&self, _: &CompletionRequest) -> Option<String> {
        None
    }

    fn forwards_openai_fields(&self) -> bool {
        true
    }

    async fn complete_batch(
        &self,
        model: &str,
        requests: &[Arc<CompletionRequest>],
    ) -> Result<Vec<Result<Completion, ProviderError>>, ProviderError> {
        let Some(first) = requests.first() else {
            return Ok(Vec::new());
        };
        let prompts: Vec<&str> = requests
            .iter()
            .map(|r| match &r.input {
                Input::Prompt(p) => p.as_str(),
                Input::Chat(_) => "",
            })
            .collect();
        let body = CompletionsBody {
            model,
            prompt: &prompts,
            sampling: Sampling::from(&first.params),
            own: TextOnly::from(&first.params),
            stream: None,
        };
        let resp: CompletionsResponse =
            http::post_json(&self.client, &self.completions, &body).await?;
        let mut answers = match_choices(requests.len(), resp.choices);
        // One usage for the whole array: shared over its answers, so their costs add up.
        if let Some(total) = resp.usage {
            let bytes: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
            usage::apportion(total.into(), &bytes, &mut answers);
        }
        Ok(answers)
    }

    async fn stream(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<EventStream, ProviderError> {
        let p = &request.params;
        let sampling = Sampling::from(p);
        let resp = match &request.input {
            Input::Prompt(prompt) => {
                let body = CompletionsBody {
                    model,
                    prompt,
                    sampling,
                    own: TextOnly::from(p),
                    stream: Some(STREAMED),
                };
                http::post_for_stream(&self.client, &self.completions, &body).await?
            }
            Input::Chat(messages) => {
                let body = ChatBody {
                    model,
                    messages: wire::messages(messages),
                    sampling,
                    own: ChatOnly::from(p),
                    stream: Some(STREAMED),
                };
                http::post_for_stream(&self.client, &self.chat, &body).await?
            }
        };
        Ok(stream::events(
            stream::body(resp),
            Framing::Sse,
            Chunks::default(),
        ))
    }

    async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        let p = &request.params;
        // Streamed, so that a caller who gives up stops the generation; log probabilities
        // come whole only in a unary answer, and OpenAI refuses `best_of` with a stream.
        if self.stream_unary && !p.logprobs && p.best_of.is_none() {
            return stream::assemble(self.stream(model, request).await?).await;
        }
        let sampling = Sampling::from(p);
        match &request.input {
            Input::Prompt(prompt) => {
                let body = CompletionsBody {
                    model,
                    prompt,
                    sampling,
                    own: TextOnly::from(p),
                    stream: None,
                };
                let resp: CompletionsResponse =
                    http::post_json(&self.client, &self.completions, &body).await?;
                resp.first()
            }
            Input::Chat(messages) => {
                let body = ChatBody {
                    model,
                    messages: wire::messages(messages),
                    sampling,
                    own: ChatOnly::from(p),
                    stream: None,
                };
                let resp: ChatResponse = http::post_json(&self.client, &self.chat, &body).await?;
                resp.first()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(index: u32, text: &str) -> TextChoice {
        TextChoice {
            index,
            text: text.into(),
            finish_reason: None,
            logprobs: None,
        }
    }

    #[test]
    fn choices_match_by_index_and_faults_stay_with_their_item() {
        let got = match_choices(
            4,
            vec![
                choice(2, "c"),
                choice(0, "a"),
                choice(3, "d"),
                choice(3, "d2"),
                choice(9, "x"),
            ],
        );
        let texts: Vec<Result<String, FailureKind>> = got
            .into_iter()
            .map(|r| r.map(|c| c.text).map_err(|e| e.kind))
            .collect();
        assert_eq!(
            texts,
            [
                Ok("a".into()),
                Err(FailureKind::Malformed),
                Ok("c".into()),
                Err(FailureKind::Malformed)
            ]
        );
    }
}

#[cfg(test)]
mod properties {
    //! Whatever an upstream sends, parsing it never panics and every caller gets exactly one
    //! result.
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_body_parses_or_fails_cleanly(body in proptest::collection::vec(any::<u8>(), 0..512), n in 0usize..16) {
            if let Ok(resp) = serde_json::from_slice::<CompletionsResponse>(&body) {
                prop_assert_eq!(match_choices(n, resp.choices).len(), n);
            }
        }

        #[test]
        fn any_choices_map_to_one_result_per_prompt(
            indices in proptest::collection::vec(any::<u32>(), 0..40),
            small in proptest::collection::vec(0u32..12, 0..40),
            n in 0usize..12,
        ) {
            let choices = |ix: &[u32]| ix.iter().map(|&index| TextChoice {
                index,
                text: format!("t{index}"),
                finish_reason: None,
                logprobs: None,
            }).collect::<Vec<_>>();
            prop_assert_eq!(match_choices(n, choices(&indices)).len(), n);
            let out = match_choices(n, choices(&small));
            for (i, r) in out.iter().enumerate() {
                let times = small.iter().filter(|&&x| x as usize == i).count();
                prop_assert_eq!(r.is_ok(), times == 1, "prompt {} had {} choices", i, times);
            }
        }
    }
}
