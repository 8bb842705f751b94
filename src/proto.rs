//! The generated `cascade.v1` types, and their conversion to and from domain values.
//! Validation happens here, at the edge: the router core never sees a prost type.

use std::time::Duration;

use crate::{
    completion::{
        Answer, Attempt, CacheMode, ChatMessage, CompletionRequest, FailureKind, GenParams, Input,
        MAX_MESSAGES, Role, Usage,
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
                    .map(|(i, m)| {
                        let role = Role::parse_at(i, &m.role)?;
                        Ok(ChatMessage {
                            role,
                            content: m.content,
                        })
                    })
                    .collect::<Result<_, RouterError>>()?;
                Input::Chat(messages)
            }
            (true, true) => return Err(invalid("set one of prompt or messages; both are empty")),
            (false, false) => return Err(invalid("set one of prompt or messages, not both")),
        };
        let request_id = if r.request_id.is_empty() {
            format!("{:016x}", fastrand::u64(..))
        } else {
            r.request_id
        };
        let params = GenParams {
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            stop: r.stop,
            seed: r.seed,
        };
        params.check()?;
        Ok(CompletionRequest {
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
        })
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
        }
    }
}

impl From<RouterError> for v1::ItemError {
    fn from(e: RouterError) -> v1::ItemError {
        v1::ItemError {
            code: e.code() as i32,
            attempts: e.attempts().iter().map(v1::Attempt::from).collect(),
            message: e.to_string(),
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
