//! The generated `cascade.v1` types, and their conversion to and from domain values.
//! Validation happens here, at the edge: the router core never sees a prost type.

use std::{sync::Arc, time::Duration};

use crate::{
    completion::{
        Answer, Attempt, CacheMode, ChatMessage, CompletionRequest, Content, Detail, FailureKind,
        GenParams, Image, Input, MAX_MESSAGES, Part, ResponseFormat, Role, Tool, ToolCall,
        ToolCallDelta, ToolChoice, Usage, is_modelled_field,
    },
    error::RouterError,
    upstream::{Circuit, Snapshot},
};

#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs
)]
pub mod v1 {
    tonic::include_proto!("cascade.v1");
}

/// The encoded descriptors of `cascade.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cascade_v1_descriptor");

fn invalid(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

/// 16 random hex digits, written by hand: `format!` cost ~500 instructions a call, a twentieth
/// of what a cache hit adds to a bare gRPC server.
fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u64(..);
    let digits: [u8; 16] = std::array::from_fn(|i| HEX[((n >> (60 - 4 * i)) & 0xf) as usize]);
    // Hex digits are ASCII: valid UTF-8, borrowed as is, then copied once.
    String::from_utf8_lossy(&digits).into_owned()
}

impl TryFrom<v1::CompleteRequest> for CompletionRequest {
    type Error = RouterError;

    fn try_from(r: v1::CompleteRequest) -> Result<Self, RouterError> {
        let input = match (r.prompt.is_empty(), r.messages.is_empty()) {
            (false, true) => Input::Prompt(r.prompt),
            (true, false) => {
                if r.messages.len() > MAX_MESSAGES {
                    return Err(invalid(format!("messages: more than {MAX_MESSAGES}")));
                }
                let messages = r
                    .messages
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| message(i, m))
                    .collect::<Result<_, RouterError>>()?;
                Input::Chat(messages)
            }
            (true, true) => return Err(invalid("set one of prompt or messages; both are empty")),
            (false, false) => return Err(invalid("set one of prompt or messages, not both")),
        };
        let request_id = if r.request_id.is_empty() {
            new_request_id()
        } else {
            r.request_id
        };
        let params = GenParams {
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            stop: r.stop,
            seed: r.seed,
            top_p: r.top_p,
            frequency_penalty: r.frequency_penalty,
            presence_penalty: r.presence_penalty,
            logit_bias: r.logit_bias.into_iter().collect(),
            logprobs: r.logprobs,
            top_logprobs: r.top_logprobs,
            echo: r.echo,
            suffix: r.suffix,
            best_of: r.best_of,
            tools: r
                .tools
                .into_iter()
                .enumerate()
                .map(|(i, t)| tool(i, t))
                .collect::<Result<_, _>>()?,
            tool_choice: r.tool_choice.map(tool_choice).transpose()?,
            parallel_tool_calls: r.parallel_tool_calls,
            response_format: r.response_format.map(response_format).transpose()?,
            extra: r
                .extra
                .into_iter()
                .map(|(k, v)| {
                    if is_modelled_field(&k) {
                        return Err(invalid(format!(
                            "extra.{k}: the request has a field of its own for it"
                        )));
                    }
                    let value = serde_json::from_str(&v)
                        .map_err(|e| invalid(format!("extra.{k}: not JSON text ({e})")))?;
                    Ok((k, value))
                })
                .collect::<Result<_, RouterError>>()?,
        };
        let request = CompletionRequest {
            model: r.model,
            input,
            params,
            tenant: r.agent.clone(),
            agent: r.agent,
            request_id,
            cache: match v1::CacheMode::try_from(r.cache) {
                Ok(v1::CacheMode::Default) => CacheMode::Default,
                Ok(v1::CacheMode::Bypass) => CacheMode::Bypass,
                Ok(v1::CacheMode::Refresh) => CacheMode::Refresh,
                Ok(v1::CacheMode::Only) => CacheMode::Only,
                Err(_) => return Err(invalid(format!("cache: {} is not a CacheMode", r.cache))),
            },
        };
        request.check()?;
        Ok(request)
    }
}

/// `messages[i]` as a domain message.
fn message(i: usize, m: v1::ChatMessage) -> Result<ChatMessage, RouterError> {
    let role = Role::parse_at(i, &m.role)?;
    let content = match (m.content.is_empty(), m.parts.is_empty()) {
        (_, true) => Content::Text(m.content),
        (true, false) => Content::Parts(
            m.parts
                .into_iter()
                .enumerate()
                .map(|(j, p)| {
                    let at = format!("messages[{i}].parts[{j}]");
                    match p.part {
                        Some(v1::content_part::Part::Text(t)) => Ok(Part::Text(t)),
                        Some(v1::content_part::Part::Image(img)) => {
                            image(&at, img).map(Part::Image)
                        }
                        None => Err(invalid(format!("{at}: set text or image"))),
                    }
                })
                .collect::<Result<_, RouterError>>()?,
        ),
        (false, false) => {
            return Err(invalid(format!(
                "messages[{i}]: set content or parts, not both"
            )));
        }
    };
    let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok(ChatMessage {
        role,
        content,
        name: none_if_empty(m.name),
        tool_calls: m
            .tool_calls
            .into_iter()
            .map(|c| ToolCall {
                id: c.id,
                name: c.name,
                arguments: c.arguments,
            })
            .collect(),
        tool_call_id: none_if_empty(m.tool_call_id),
    })
}

fn image(at: &str, img: v1::Image) -> Result<Image, RouterError> {
    let detail = match img.detail.as_str() {
        "" => None,
        d => Some(Detail::parse(d).ok_or_else(|| {
            invalid(format!("{at}.image.detail: {d:?} is not auto, low or high"))
        })?),
    };
    let mut image = match img.source {
        Some(v1::image::Source::Data(data)) => Image::inline(&img.mime_type, data, at)?,
        Some(v1::image::Source::Url(url)) => Image::from_url(&url, None, at)?,
        None => return Err(invalid(format!("{at}.image: set data or url"))),
    };
    image.detail = detail;
    Ok(image)
}

fn tool(i: usize, t: v1::Tool) -> Result<Tool, RouterError> {
    let parameters = match t.parameters_json.as_str() {
        "" => None,
        json => Some(Arc::new(serde_json::from_str(json).map_err(|e| {
            invalid(format!("tools[{i}].parameters_json: not JSON ({e})"))
        })?)),
    };
    Ok(Tool {
        name: t.name,
        description: (!t.description.is_empty()).then_some(t.description),
        parameters,
        strict: t.strict,
    })
}

fn tool_choice(c: v1::ToolChoice) -> Result<ToolChoice, RouterError> {
    match c.choice {
        Some(v1::tool_choice::Choice::Mode(m)) => match m.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            other => Err(invalid(format!(
                "tool_choice.mode: {other:?} is not auto, none or required"
            ))),
        },
        Some(v1::tool_choice::Choice::Function(name)) => Ok(ToolChoice::Function(name)),
        None => Err(invalid("tool_choice: set mode or function")),
    }
}

fn response_format(f: v1::ResponseFormat) -> Result<ResponseFormat, RouterError> {
    match f.r#type.as_str() {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        "json_schema" => Ok(ResponseFormat::JsonSchema {
            name: f.name,
            description: (!f.description.is_empty()).then_some(f.description),
            schema: match f.schema_json.as_str() {
                "" => None,
                json => Some(Arc::new(serde_json::from_str(json).map_err(|e| {
                    invalid(format!("response_format.schema_json: not JSON ({e})"))
                })?)),
            },
            strict: f.strict,
        }),
        other => Err(invalid(format!(
            "response_format.type: {other:?} is not text, json_object or json_schema"
        ))),
    }
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl v1::CompleteResponse {
    pub fn from_answer(a: Answer, request_id: String) -> v1::CompleteResponse {
        v1::CompleteResponse {
            text: a.completion.text,
            provider: a.provider.to_string(),
            model: a.model.to_string(),
            finish_reason: a.completion.finish_reason,
            usage: a.completion.usage.map(v1::Usage::from),
            attempts: a.attempts.iter().map(v1::Attempt::from).collect(),
            queue_wait_us: micros(a.queue_wait),
            upstream_us: micros(a.upstream),
            request_id,
            batch_size: a.batch_size,
            cached: a.cached,
            cost_usd: a.cost.usd(),
            cost_estimated: a.cost.estimated,
            tool_calls: a
                .completion
                .tool_calls
                .into_iter()
                .map(|c| v1::ToolCall {
                    id: c.id,
                    name: c.name,
                    arguments: c.arguments,
                })
                .collect(),
            logprobs_json: a
                .completion
                .logprobs
                .map(|l| l.to_string())
                .unwrap_or_default(),
        }
    }
}

impl From<ToolCallDelta> for v1::ToolCallDelta {
    fn from(d: ToolCallDelta) -> v1::ToolCallDelta {
        v1::ToolCallDelta {
            index: d.index,
            id: d.id.unwrap_or_default(),
            name: d.name.unwrap_or_default(),
            arguments: d.arguments,
        }
    }
}

impl From<Usage> for v1::Usage {
    fn from(u: Usage) -> v1::Usage {
        v1::Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        }
    }
}

impl From<&Attempt> for v1::Attempt {
    fn from(a: &Attempt) -> v1::Attempt {
        v1::Attempt {
            provider: a.provider.to_string(),
            model: a.model.to_string(),
            kind: v1::FailureKind::from(a.kind).into(),
            http_status: a.http_status.map(u32::from).unwrap_or_default(),
            error: a.error.clone(),
            tries: a.tries,
            elapsed_us: micros(a.elapsed),
        }
    }
}

impl From<FailureKind> for v1::FailureKind {
    fn from(k: FailureKind) -> v1::FailureKind {
        match k {
            FailureKind::Connect => v1::FailureKind::Connect,
            FailureKind::Timeout => v1::FailureKind::Timeout,
            FailureKind::Io => v1::FailureKind::Io,
            FailureKind::ServerError => v1::FailureKind::ServerError,
            FailureKind::RateLimited => v1::FailureKind::RateLimited,
            FailureKind::Unauthorized => v1::FailureKind::Unauthorized,
            FailureKind::Rejected => v1::FailureKind::Rejected,
            FailureKind::Malformed => v1::FailureKind::Malformed,
            FailureKind::CircuitOpen => v1::FailureKind::CircuitOpen,
            FailureKind::CoolingDown => v1::FailureKind::CoolingDown,
            FailureKind::NoTimeLeft => v1::FailureKind::NoTimeLeft,
            FailureKind::Overloaded => v1::FailureKind::Overloaded,
            FailureKind::Unsupported => v1::FailureKind::Unsupported,
            FailureKind::Disabled => v1::FailureKind::Disabled,
            FailureKind::Unhealthy => v1::FailureKind::Unhealthy,
            FailureKind::Budget => v1::FailureKind::Budget,
        }
    }
}

impl From<Circuit> for v1::CircuitState {
    fn from(c: Circuit) -> v1::CircuitState {
        match c {
            Circuit::Closed => v1::CircuitState::Closed,
            Circuit::Open => v1::CircuitState::Open,
            Circuit::HalfOpen => v1::CircuitState::HalfOpen,
        }
    }
}

impl From<Snapshot> for v1::ProviderStatus {
    fn from(s: Snapshot) -> v1::ProviderStatus {
        let c = s.counts;
        v1::ProviderStatus {
            name: s.name.to_string(),
            r#type: s.kind.as_str().into(),
            priority: s.priority,
            circuit: v1::CircuitState::from(s.circuit).into(),
            requests: c.requests,
            successes: c.successes,
            failures: c.failures,
            mean_latency_ms: c.mean_latency.as_secs_f64() * 1e3,
            models: s.models,
            cooling_down_ms: u64::try_from(s.cooling_down.as_millis()).unwrap_or(u64::MAX),
            queued: c.queued,
            items: c.items,
            native_batching: s.native_batching,
            concurrency_limit: u32::try_from(s.concurrency_limit).unwrap_or(u32::MAX),
            mean_batch_size: match c.requests {
                0 => 0.0,
                n => c.items as f64 / n as f64,
            },
            adaptive: s.adaptive,
            order: s.order.as_str().into(),
            in_flight: u32::try_from(s.in_flight).unwrap_or(u32::MAX),
            health_checked: s.health.is_some(),
            healthy: s.health.as_ref().is_none_or(|h| h.healthy),
            // Filled by the front from the ledger.
            spent_usd_today: 0.0,
            budget_left_usd: None,
        }
    }
}

impl From<RouterError> for v1::ItemError {
    fn from(e: RouterError) -> v1::ItemError {
        v1::ItemError {
            code: e.code() as i32,
            attempts: e.attempts().iter().map(v1::Attempt::from).collect(),
            message: e.client_message(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(prompt: &str, messages: usize) -> v1::CompleteRequest {
        v1::CompleteRequest {
            prompt: prompt.into(),
            messages: (0..messages)
                .map(|_| v1::ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn exactly_one_of_prompt_and_messages() {
        assert!(CompletionRequest::try_from(req("hi", 0)).is_ok());
        assert!(CompletionRequest::try_from(req("", 2)).is_ok());
        assert!(CompletionRequest::try_from(req("", 0)).is_err());
        assert!(CompletionRequest::try_from(req("hi", 1)).is_err());
    }

    #[test]
    fn out_of_range_params_are_invalid() {
        let mut r = req("hi", 0);
        r.temperature = Some(2.5);
        assert!(matches!(
            CompletionRequest::try_from(r),
            Err(RouterError::InvalidArgument(_))
        ));
        let mut r = req("hi", 0);
        r.max_tokens = Some(0);
        assert!(CompletionRequest::try_from(r).is_err());
        let mut r = req("", 1);
        r.messages[0].role = "robot".into();
        let e = CompletionRequest::try_from(r).unwrap_err().to_string();
        assert!(e.contains("messages[0].role"), "{e}");
    }
}
