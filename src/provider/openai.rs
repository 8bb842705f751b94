//! OpenAI-compatible servers (OpenAI, vLLM, llama.cpp server, Grok, OpenRouter):
//! `{base_url}/completions` for prompts, `{base_url}/chat/completions` for messages.

use async_trait::async_trait;
use reqwest::{
    Client, Url,
    header::{AUTHORIZATION, HeaderMap, HeaderValue},
};
use serde::{Deserialize, Serialize};

use super::{Provider, ProviderError, WireMessage, http, wire_messages};
use crate::{
    completion::{Completion, CompletionRequest, FailureKind, GenParams, Input, Usage},
    config::ProviderConfig,
};

pub struct OpenAi {
    client: Client,
    completions: Url,
    chat: Url,
}

impl OpenAi {
    pub fn new(config: &ProviderConfig, base: &Url) -> Result<OpenAi, reqwest::Error> {
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
        })
    }
}

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
}

impl<'a> From<&'a GenParams> for Sampling<'a> {
    fn from(p: &'a GenParams) -> Self {
        Sampling {
            max_tokens: p.max_tokens,
            temperature: p.temperature,
            stop: &p.stop,
            seed: p.seed,
        }
    }
}

#[derive(Serialize)]
struct CompletionsBody<'a> {
    model: &'a str,
    prompt: &'a str,
    #[serde(flatten)]
    sampling: Sampling<'a>,
}

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(flatten)]
    sampling: Sampling<'a>,
}

#[derive(Deserialize)]
struct CompletionsResponse {
    choices: Vec<TextChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct TextChoice {
    #[serde(default)]
    index: u32,
    text: String,
    finish_reason: Option<String>,
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
}

#[derive(Deserialize)]
struct ChatReply {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Usage {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        }
    }
}

fn no_choice() -> ProviderError {
    ProviderError::new(
        FailureKind::Malformed,
        "response has no choice with index 0",
    )
}

#[async_trait]
impl Provider for OpenAi {
    async fn complete(
        &self,
        model: &str,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        let sampling = Sampling::from(&request.params);
        match &request.input {
            Input::Prompt(prompt) => {
                let body = CompletionsBody {
                    model,
                    prompt,
                    sampling,
                };
                let resp: CompletionsResponse =
                    http::post_json(&self.client, &self.completions, &body).await?;
                let choice = resp
                    .choices
                    .into_iter()
                    .find(|c| c.index == 0)
                    .ok_or_else(no_choice)?;
                Ok(Completion {
                    text: choice.text,
                    finish_reason: choice.finish_reason.unwrap_or_default(),
                    usage: resp.usage.map(Usage::from),
                })
            }
            Input::Chat(messages) => {
                let body = ChatBody {
                    model,
                    messages: wire_messages(messages),
                    sampling,
                };
                let resp: ChatResponse = http::post_json(&self.client, &self.chat, &body).await?;
                let choice = resp
                    .choices
                    .into_iter()
                    .find(|c| c.index == 0)
                    .ok_or_else(no_choice)?;
                Ok(Completion {
                    text: choice.message.content.unwrap_or_default(),
                    finish_reason: choice.finish_reason.unwrap_or_default(),
                    usage: resp.usage.map(Usage::from),
                })
            }
        }
    }
}
