//! Why a try got no answer: the failure kinds and the attempt record a caller is told about.
//! A leaf: the error type and the request model both use it, and it uses neither.

use std::{fmt, sync::Arc, time::Duration};

/// Why a provider did not answer (mirrors `cascade.v1.FailureKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    Connect,
    Timeout,
    Io,
    ServerError,
    RateLimited,
    Unauthorized,
    Rejected,
    Malformed,
    CircuitOpen,
    CoolingDown,
    NoTimeLeft,
    Overloaded,
    /// Skipped: the model lacks a capability the request needs, the request is too long for
    /// its window, or the provider's API cannot carry one of its fields.
    Unsupported,
    /// Skipped: an operator disabled the provider or is draining it.
    Disabled,
    /// Skipped: its active health checks failed.
    Unhealthy,
    /// Skipped: a daily budget cannot cover what the call may cost.
    Budget,
}

impl FailureKind {
    pub const ALL: [FailureKind; 16] = [
        FailureKind::Connect,
        FailureKind::Timeout,
        FailureKind::Io,
        FailureKind::ServerError,
        FailureKind::RateLimited,
        FailureKind::Unauthorized,
        FailureKind::Rejected,
        FailureKind::Malformed,
        FailureKind::CircuitOpen,
        FailureKind::CoolingDown,
        FailureKind::NoTimeLeft,
        FailureKind::Overloaded,
        FailureKind::Unsupported,
        FailureKind::Disabled,
        FailureKind::Unhealthy,
        FailureKind::Budget,
    ];

    /// Its place in [`FailureKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The label value in metrics: snake case, stable.
    pub fn metric_name(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Io => "io",
            FailureKind::ServerError => "server_error",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::Rejected => "rejected",
            FailureKind::Malformed => "malformed",
            FailureKind::CircuitOpen => "circuit_open",
            FailureKind::CoolingDown => "cooling_down",
            FailureKind::NoTimeLeft => "no_time_left",
            FailureKind::Overloaded => "overloaded",
            FailureKind::Unsupported => "unsupported",
            FailureKind::Disabled => "disabled",
            FailureKind::Unhealthy => "unhealthy",
            FailureKind::Budget => "budget",
        }
    }

    /// A provider skipped by its breaker, its `Retry-After` cool-down, an operator or its
    /// health checks, with no request sent.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            FailureKind::CircuitOpen
                | FailureKind::CoolingDown
                | FailureKind::Disabled
                | FailureKind::Unhealthy
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Io => "io",
            FailureKind::ServerError => "server error",
            FailureKind::RateLimited => "rate limited",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::Rejected => "rejected",
            FailureKind::Malformed => "malformed response",
            FailureKind::CircuitOpen => "circuit open",
            FailureKind::CoolingDown => "cooling down",
            FailureKind::NoTimeLeft => "no time left",
            FailureKind::Overloaded => "overloaded",
            FailureKind::Unsupported => "unsupported",
            FailureKind::Disabled => "disabled",
            FailureKind::Unhealthy => "unhealthy",
            FailureKind::Budget => "over budget",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One provider a request went to (or skipped) without getting its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub kind: FailureKind,
    pub http_status: Option<u16>,
    pub error: String,
    /// Network tries on this provider; 0 when it was skipped.
    pub tries: u32,
    pub elapsed: Duration,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}: {}", self.provider, self.model, self.kind)?;
        if !self.error.is_empty() {
            write!(f, " ({})", self.error)?;
        }
        Ok(())
    }
}
