//! The router's error type and its single mapping to `tonic::Status`.

use std::fmt::Write as _;

use tonic::{Code, Status};

use crate::failure::Attempt;

/// Why a request got no completion. Each variant says what a client can do about it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RouterError {
    /// The request itself is wrong; retrying it unchanged will not help.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is bigger than the router takes (`limits.max_message_bytes`).
    #[error("{0}")]
    TooLarge(String),
    /// The request names a model or chain the cascade file does not define.
    #[error("unknown model or chain {}; known: {known}", Shown(.model))]
    UnknownModel { model: String, known: String },
    /// Every provider on the route failed or was skipped.
    #[error("{}", with_attempts(.reason, .attempts))]
    Unavailable {
        reason: &'static str,
        attempts: Vec<Attempt>,
    },
    /// No model on the route can take the request: each lacks a capability it needs, is too
    /// small for it, or sits behind an API that cannot carry one of its fields. Nothing was
    /// sent; a request changed to fit, or another model, will do.
    #[error("no model on this route can take this request (it needs {needs}): {}", skipped(.attempts))]
    Unsupported {
        needs: String,
        attempts: Vec<Attempt>,
    },
    /// The client's deadline passed before any provider answered.
    #[error("{}", with_attempts("deadline exceeded", .attempts))]
    DeadlineExceeded { attempts: Vec<Attempt> },
    /// Every provider's queue was full or its rate limit reached; retry later, with backoff.
    #[error("{}", with_attempts("every provider is full or at its rate limit", .attempts))]
    Overloaded { attempts: Vec<Attempt> },
    /// Every provider that could answer is a paid one whose daily budget cannot cover the
    /// call (free ones, if any, failed); the budgets reset at 00:00 UTC, in `resets_in`.
    #[error("{}", with_attempts("over budget: no paid provider's budget covers this call", .attempts))]
    OverBudget {
        attempts: Vec<Attempt>,
        resets_in: Option<std::time::Duration>,
    },
    /// The client has used its quota (`server.quotas`); it may call again after `retry_after`.
    #[error("quota of {per_minute} calls a minute used; retry in {} ms", .retry_after.as_millis().max(1))]
    QuotaExceeded {
        per_minute: u32,
        retry_after: std::time::Duration,
    },
    /// Authentication is on and the call brought no known key.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The caller's key may not ask for this model or chain.
    #[error("client {client:?} may not use {model:?} (server.auth.keys[].models)")]
    PermissionDenied { client: String, model: String },
    /// The router is draining for shutdown; another replica (or this one restarted) will serve.
    #[error("the router is shutting down; retry on another replica")]
    ShuttingDown,
    /// `limits.max_in_flight` calls are already running; retry later, with backoff.
    #[error("{max} calls already in flight (limits.max_in_flight); retry with backoff")]
    AtCapacity { max: usize },
    /// Work the router started for the request failed unexpectedly (a bug, not the request).
    #[error("internal error: {0}")]
    Internal(String),
    /// `cache: ONLY` and the completion is not cached.
    #[error("{0}")]
    NotCached(String),
    /// The request's body did not arrive in time (`limits.body_read_timeout_seconds`).
    #[error("the request body did not arrive within {0} ms (limits.body_read_timeout_seconds)")]
    BodyTimeout(u64),
    /// An HTTP path the OpenAI-compatible front does not serve.
    #[error(
        "no such endpoint: the router serves POST /v1/chat/completions, POST /v1/completions, GET /v1/models, the status page at /status and its API under /api"
    )]
    NoSuchEndpoint,
    /// An operator action names a provider the running config does not have.
    #[error("unknown provider {}; known: {known}", Shown(.name))]
    UnknownProvider { name: String, known: String },
    /// An operator action by a key not marked `admin: true`, or the operator API asked for
    /// from beyond loopback with authentication off.
    #[error("{0}")]
    NotOperator(String),
    /// A stream broke after its first text: what was sent stands, the rest will not come.
    #[error("the stream from {}/{} broke after {sent}: {} ({})", .attempt.provider, .attempt.model, .attempt.kind, .attempt.error)]
    StreamBroken { sent: Sent, attempt: Box<Attempt> },
    /// The caller's deadline passed mid-stream.
    #[error("deadline exceeded mid-stream after {sent}")]
    StreamOutOfTime { sent: Sent },
}

/// How an error is told to a client: its gRPC code, and on the HTTP front its status and
/// OpenAI's error `type` and `code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Told {
    pub grpc: Code,
    pub http: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
}

/// How much of a streamed answer reached the caller before it ended early.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub chunks: usize,
    pub bytes: usize,
}

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} chunks ({} bytes of text) were sent",
            self.chunks, self.bytes
        )
    }
}

/// `reason`, then how many requests were sent to how many providers, then each attempt:
/// "every provider failed after 3 tries at 2 providers: a/m: timeout (…) ×2; b/m: …".
fn with_attempts(reason: &str, attempts: &[Attempt]) -> String {
    let mut out = String::from(reason);
    if attempts.is_empty() {
        return out;
    }
    let tries: u32 = attempts.iter().map(|a| a.tries).sum();
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let _ = write!(
        out,
        " after {} at {}: ",
        plural(u64::from(tries), "try", "tries"),
        plural(attempts.len() as u64, "provider", "providers"),
    );
    for (i, a) in attempts.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{a}");
        if a.tries > 1 {
            let _ = write!(out, " ×{}", a.tries);
        }
    }
    out
}

/// Each skipped target and why: "a/m: the model lacks vision; b/m: ...".
fn skipped(attempts: &[Attempt]) -> String {
    let mut out = String::new();
    for (i, a) in attempts.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{}/{}: {}", a.provider, a.model, a.error);
    }
    out
}

/// A value a caller sent, as an error message quotes it: in full when short, else its first
/// 64 characters and its length, so a 2 MB bad value is not sent back (it would not even fit
/// a gRPC status: clients cap metadata at 16 KiB).
pub struct Shown<'a>(pub &'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 64;
        match self.0.char_indices().nth(SHOWN) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

/// The most of an error's message a client is sent (the field it names comes first).
const MAX_MESSAGE: usize = 4096;

impl RouterError {
    /// The message a client is sent: the error's text, cut at [`MAX_MESSAGE`] bytes.
    pub fn client_message(&self) -> String {
        let mut m = self.to_string();
        if m.len() > MAX_MESSAGE {
            let total = m.len();
            let mut cut = MAX_MESSAGE;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
            m.push_str(&format!("… ({total} bytes in all)"));
        }
        m
    }

    /// How this error is told to a client on either front: the one table of the mapping
    /// (gRPC code; HTTP status, OpenAI error type and code, as OpenAI's clients act on them —
    /// an unknown model is 404 there, as OpenAI answers it).
    pub fn told(&self) -> Told {
        use RouterError as E;
        use Told as T;
        const INVALID: &str = "invalid_request_error";
        const SERVER: &str = "server_error";
        const RATE: &str = "rate_limit_error";
        let told = |grpc, http, kind, code| T {
            grpc,
            http,
            kind,
            code,
        };
        match self {
            E::InvalidArgument(_) => told(Code::InvalidArgument, 400, INVALID, None),
            E::TooLarge(_) => told(Code::ResourceExhausted, 413, INVALID, None),
            E::UnknownModel { .. } => {
                told(Code::InvalidArgument, 404, INVALID, Some("model_not_found"))
            }
            E::Unsupported { .. } => {
                told(Code::FailedPrecondition, 400, INVALID, Some("unsupported"))
            }
            E::NotCached(_) => told(Code::NotFound, 404, INVALID, Some("not_cached")),
            E::NoSuchEndpoint => told(Code::Unimplemented, 404, INVALID, Some("unknown_endpoint")),
            E::UnknownProvider { .. } => {
                told(Code::NotFound, 404, INVALID, Some("provider_not_found"))
            }
            E::NotOperator(_) => told(Code::PermissionDenied, 403, "permission_error", None),
            E::BodyTimeout(_) => told(Code::DeadlineExceeded, 408, INVALID, Some("body_timeout")),
            E::Unauthenticated(_) => told(Code::Unauthenticated, 401, "authentication_error", None),
            E::PermissionDenied { .. } => {
                told(Code::PermissionDenied, 403, "permission_error", None)
            }
            E::QuotaExceeded { .. } => {
                told(Code::ResourceExhausted, 429, RATE, Some("quota_exceeded"))
            }
            E::Overloaded { .. } | E::AtCapacity { .. } => {
                told(Code::ResourceExhausted, 429, RATE, None)
            }
            E::OverBudget { .. } => {
                told(Code::ResourceExhausted, 429, RATE, Some("budget_exceeded"))
            }
            E::Unavailable { .. } => told(
                Code::Unavailable,
                503,
                SERVER,
                Some("providers_unavailable"),
            ),
            E::StreamBroken { .. } => told(Code::Unavailable, 503, SERVER, Some("stream_broken")),
            E::ShuttingDown => told(Code::Unavailable, 503, SERVER, None),
            E::DeadlineExceeded { .. } | E::StreamOutOfTime { .. } => {
                told(Code::DeadlineExceeded, 504, "timeout", None)
            }
            E::Internal(_) => told(Code::Internal, 500, SERVER, None),
        }
    }

    /// The gRPC code for this error (see [`RouterError::told`]).
    pub fn code(&self) -> Code {
        self.told().grpc
    }

    /// The HTTP status for this error on the OpenAI-compatible front (see
    /// [`RouterError::told`]).
    pub fn http_status(&self) -> u16 {
        self.told().http
    }

    /// When to try again, in whole seconds as HTTP's `Retry-After` (and the gRPC
    /// `retry-after` trailer): a quota's own wait; a second when the router is full.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            RouterError::QuotaExceeded { retry_after, .. } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Some(secs.max(1))
            }
            RouterError::Overloaded { .. } | RouterError::AtCapacity { .. } => Some(1),
            RouterError::OverBudget { resets_in, .. } => resets_in.map(|d| d.as_secs().max(1)),
            RouterError::InvalidArgument(_)
            | RouterError::TooLarge(_)
            | RouterError::UnknownModel { .. }
            | RouterError::Unsupported { .. }
            | RouterError::Unavailable { .. }
            | RouterError::DeadlineExceeded { .. }
            | RouterError::Unauthenticated(_)
            | RouterError::PermissionDenied { .. }
            | RouterError::ShuttingDown
            | RouterError::Internal(_)
            | RouterError::NotCached(_)
            | RouterError::NoSuchEndpoint
            | RouterError::UnknownProvider { .. }
            | RouterError::NotOperator(_)
            | RouterError::BodyTimeout(_)
            | RouterError::StreamBroken { .. }
            | RouterError::StreamOutOfTime { .. } => None,
        }
    }

    /// Attempts made before the error, for clients that want them structured.
    pub fn attempts(&self) -> &[Attempt] {
        match self {
            RouterError::Unavailable { attempts, .. }
            | RouterError::Unsupported { attempts, .. }
            | RouterError::DeadlineExceeded { attempts }
            | RouterError::Overloaded { attempts }
            | RouterError::OverBudget { attempts, .. } => attempts,
            RouterError::InvalidArgument(_)
            | RouterError::TooLarge(_)
            | RouterError::UnknownModel { .. }
            | RouterError::NotCached(_)
            | RouterError::NoSuchEndpoint
            | RouterError::UnknownProvider { .. }
            | RouterError::NotOperator(_)
            | RouterError::BodyTimeout(_)
            | RouterError::ShuttingDown
            | RouterError::Unauthenticated(_)
            | RouterError::PermissionDenied { .. }
            | RouterError::AtCapacity { .. }
            | RouterError::QuotaExceeded { .. }
            | RouterError::StreamOutOfTime { .. }
            | RouterError::Internal(_) => &[],
            RouterError::StreamBroken { attempt, .. } => std::slice::from_ref(attempt.as_ref()),
        }
    }
}

/// tonic refuses a message over the decode limit (OUT_OF_RANGE) or one that is not valid
/// protobuf (INTERNAL) before any handler runs. Both are the caller's doing, so the response
/// is re-coded RESOURCE_EXHAUSTED, naming the limit, and INVALID_ARGUMENT — the codes a
/// client acts on. Any other response passes untouched: only trailers-only answers carry
/// `grpc-status` in their headers, so the common case is one header lookup.
pub(crate) fn recode_codec_refusal<B>(
    mut r: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let Some(status) = Status::from_header_map(r.headers()) else {
        return r;
    };
    let recoded = match status.code() {
        Code::OutOfRange if status.message().contains("message length too large") => {
            Status::resource_exhausted(format!("{} (limits.max_message_bytes)", status.message()))
        }
        Code::Internal
            if status
                .message()
                .starts_with("failed to decode Protobuf message") =>
        {
            Status::invalid_argument(format!("not a valid request: {}", status.message()))
        }
        _ => return r,
    };
    let _ = recoded.add_header(r.headers_mut());
    r
}

impl From<RouterError> for Status {
    fn from(err: RouterError) -> Status {
        let mut status = Status::new(err.code(), err.client_message());
        // A retry hint a client can act on without parsing the message.
        if let Some(secs) = err.retry_after_secs()
            && let Ok(v) = secs.to_string().parse()
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::completion::FailureKind;

    fn attempt(provider: &str, tries: u32) -> Attempt {
        Attempt {
            provider: provider.into(),
            model: "m".into(),
            kind: FailureKind::ServerError,
            http_status: Some(500),
            error: "HTTP 500".into(),
            tries,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn message_counts_every_try() {
        let one = RouterError::Unavailable {
            reason: "every provider failed",
            attempts: vec![attempt("a", 3)],
        };
        assert_eq!(
            one.to_string(),
            "every provider failed after 3 tries at 1 provider: a/m: server error (HTTP 500) ×3"
        );
        let two = RouterError::DeadlineExceeded {
            attempts: vec![attempt("a", 1), attempt("b", 0)],
        };
        assert!(
            two.to_string()
                .starts_with("deadline exceeded after 1 try at 2 providers: a/m"),
            "{two}"
        );
        let status = Status::from(two.clone());
        assert_eq!(
            (status.code(), status.message()),
            (Code::DeadlineExceeded, two.to_string().as_str())
        );
    }
}
