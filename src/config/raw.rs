//! The cascade file as written: serde structs with defaults, before validation.
//!
//! The sections agents' Python cascade router already uses (`cascade`, `providers`,
//! `fallback_chains`, `agent_model_assignments`) accept unknown keys, which are collected and
//! named in a warning. Sections this router adds (`server`, `providers[].http`,
//! `providers[].simulated`) deny unknown keys.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

/// Keys left over after deserialising a section, kept to warn about (or suggest fixes for).
pub type Extra = BTreeMap<String, Value>;

#[derive(Debug, Default, Deserialize)]
pub struct RawFile {
    #[serde(default)]
    pub cascade: RawCascade,
    #[serde(default)]
    pub providers: Vec<RawProvider>,
    #[serde(default)]
    pub fallback_chains: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub agent_model_assignments: BTreeMap<String, String>,
    #[serde(default)]
    pub server: RawServer,
    pub cache: Option<RawCache>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The completion cache (this router's own section).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub enabled: Option<bool>,
    /// `memory` or `redis` (Redis behind the in-memory cache).
    pub backend: Option<String>,
    pub ttl_seconds: Option<f64>,
    pub max_bytes: Option<u64>,
    /// `tenant` (default) or `shared`.
    pub scope: Option<String>,
    pub redis_url: Option<String>,
    pub redis_timeout_ms: Option<f64>,
    /// Completions larger than this are not written to Redis.
    pub max_value_bytes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawCascade {
    pub timeout_seconds: f64,
    pub max_retries_per_provider: u32,
    pub retry_delay_seconds: f64,
    pub circuit_breaker: RawBreaker,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Default for RawCascade {
    fn default() -> Self {
        RawCascade {
            timeout_seconds: 30.0,
            max_retries_per_provider: 2,
            retry_delay_seconds: 1.0,
            circuit_breaker: RawBreaker::default(),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawBreaker {
    pub failure_threshold: u32,
    /// Seconds an open circuit waits before letting probes through.
    pub recovery_timeout: f64,
    pub half_open_max_calls: u32,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Default for RawBreaker {
    fn default() -> Self {
        RawBreaker {
            failure_threshold: 5,
            recovery_timeout: 60.0,
            half_open_max_calls: 1,
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct RawProvider {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_priority")]
    pub priority: i32,
    pub url: Option<String>,
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Per-attempt timeout for this provider; defaults to `cascade.timeout_seconds`.
    pub timeout_seconds: Option<f64>,
    /// Requests in flight to this provider at most (bounds its connection count too).
    pub max_concurrency: Option<usize>,
    pub http: Option<RawHttp>,
    pub simulated: Option<RawSimulated>,
    /// Micro-batching for this provider; absent means no batching.
    pub batching: Option<RawBatching>,
    #[serde(flatten)]
    pub extra: Extra,
}

fn yes() -> bool {
    true
}

fn default_priority() -> i32 {
    100
}

/// A model entry: a bare name or the Python router's mapping.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawModel {
    Name(String),
    Entry {
        name: String,
        #[serde(default)]
        default: bool,
        /// Overrides the provider's `batching` for this model.
        batching: Option<RawBatching>,
        #[serde(flatten)]
        extra: Extra,
    },
}

/// Connection pool settings for one provider's HTTP client.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub pool_idle_timeout_seconds: Option<f64>,
    pub pool_max_idle_per_host: Option<usize>,
    pub connect_timeout_seconds: Option<f64>,
    /// Speak HTTP/2 over plain TCP (h2c); TLS upstreams negotiate HTTP/2 on their own.
    pub http2_prior_knowledge: Option<bool>,
    /// PEM file of extra CA certificates to trust (a private CA, a self-signed test server).
    pub ca_file: Option<String>,
}

/// When prompts are sent together: Triton's dynamic-batcher rule.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatching {
    pub max_batch_size: Option<usize>,
    pub max_wait_ms: Option<f64>,
    pub max_queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSimulated {
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    /// Deadline for a request whose client sent none.
    pub request_timeout_seconds: Option<f64>,
    /// Items one CompleteBatch call may carry.
    pub max_batch_items: Option<usize>,
    /// Where to serve Prometheus metrics (`GET /metrics`); absent means not served.
    pub metrics_listen: Option<String>,
}
