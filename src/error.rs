//! The router's error type and its single mapping to `tonic::Status`.

use std::fmt::Write as _;

use tonic::{Code, Status};

use crate::completion::Attempt;

/// Why a request got no completion. Each variant says what a client can do about it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RouterError {
    /// The request itself is wrong; retrying it unchanged will not help.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names a model or chain the cascade file does not define.
    #[error("unknown model or chain {model:?}; known: {known}")]
    UnknownModel { model: String, known: String },
    /// Every provider on the route failed or was skipped.
    #[error("{}", unavailable_message(.reason, .attempts))]
    Unavailable {
        reason: &'static str,
        attempts: Vec<Attempt>,
    },
    /// The client's deadline passed before any provider answered.
    #[error("{}", unavailable_message("deadline exceeded", .attempts))]
    DeadlineExceeded { attempts: Vec<Attempt> },
    /// A bounded queue or limit is full; retry later, with backoff.
    #[error("{0}")]
    ResourceExhausted(String),
    /// `cache: ONLY` and the completion is not cached.
    #[error("{0}")]
    NotCached(String),
}

fn unavailable_message(reason: &str, attempts: &[Attempt]) -> String {
    let mut out = String::from(reason);
    if !attempts.is_empty() {
        let _ = write!(out, " after {} attempt(s): ", attempts.len());
        for (i, a) in attempts.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            let _ = write!(out, "{a}");
        }
    }
    out
}

impl RouterError {
    /// The gRPC code for this error; the one place errors become codes.
    pub fn code(&self) -> Code {
        match self {
            RouterError::InvalidArgument(_) | RouterError::UnknownModel { .. } => {
                Code::InvalidArgument
            }
            RouterError::Unavailable { .. } => Code::Unavailable,
            RouterError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            RouterError::ResourceExhausted(_) => Code::ResourceExhausted,
            RouterError::NotCached(_) => Code::NotFound,
        }
    }

    /// Attempts made before the error, for clients that want them structured.
    pub fn attempts(&self) -> &[Attempt] {
        match self {
            RouterError::Unavailable { attempts, .. }
            | RouterError::DeadlineExceeded { attempts } => attempts,
            RouterError::InvalidArgument(_)
            | RouterError::UnknownModel { .. }
            | RouterError::ResourceExhausted(_)
            | RouterError::NotCached(_) => &[],
        }
    }
}

impl From<RouterError> for Status {
    fn from(err: RouterError) -> Status {
        Status::new(err.code(), err.to_string())
    }
}
