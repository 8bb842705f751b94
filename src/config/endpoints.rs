//! `providers[].endpoints` and `balance` — replicas of one server, and how requests spread
//! over them.

use super::{Api, ProviderConfig};

/// `providers[].balance`: how requests spread over a provider's `endpoints`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Of two endpoints picked at random, the one with less in flight and queued for its
    /// concurrency limit (power of two choices).
    #[default]
    LeastOutstanding,
    /// Each endpoint in turn.
    RoundRobin,
    /// Requests sharing their first 1 KiB go to the same endpoint (its prefix cache), under a
    /// bound on each endpoint's share (see `upstream::balance`).
    PrefixAffinity,
}

impl ProviderConfig {
    /// This provider's settings for one of its endpoints.
    pub fn at_endpoint(&self, base: &url::Url) -> ProviderConfig {
        let mut one = self.clone();
        one.api = match &self.api {
            Api::OpenAi { stream_unary, .. } => Api::OpenAi {
                base: base.clone(),
                stream_unary: *stream_unary,
            },
            Api::Ollama { .. } => Api::Ollama { base: base.clone() },
            Api::Anthropic { .. } => Api::Anthropic { base: base.clone() },
            simulated @ Api::Simulated { .. } => simulated.clone(),
        };
        one.endpoints = vec![base.clone()];
        one
    }
}
