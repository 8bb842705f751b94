//! The cascade file as written: serde structs with their defaults, before validation.
//!
//! Every section this router reads denies unknown keys, so the set of keys it knows comes
//! from these types (serde names them in its errors, and [`super::parse`] turns a near miss
//! into "did you mean"). Keys that agents' Python cascade router writes into the same
//! entries and that we do not use (`description`, `max_output_tokens`, ...) are declared here as
//! [`Ignored`], so they load without a word. Defaults live in one place each: a container's
//! `Default` impl, or `Option` where absence itself means something (no batching, no cache).

use std::collections::BTreeMap;

use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny, IntoDeserializer, MapAccess, Visitor, value::MapAccessDeserializer},
};

/// A key of the Python router's shape that this router accepts and does not use.
pub type Ignored = Option<IgnoredAny>;

/// The whole file. Unknown top-level sections are the one place unknown keys are tolerated:
/// [`super::parse`] names them in a warning (or rejects a near miss of one of these).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawFile {
    pub cascade: RawCascade,
    pub providers: Vec<RawProvider>,
    pub fallback_chains: BTreeMap<String, Vec<String>>,
    pub agent_model_assignments: BTreeMap<String, String>,
    pub server: RawServer,
    pub limits: RawLimits,
    /// Absent: no cache.
    pub cache: Option<RawCache>,
    /// Absent: limits shared only when `cache` names a Redis, as one router's.
    pub fleet: Option<RawFleet>,
    /// The Python router's section, read as written; absent: no router-wide budget.
    pub cost_tracking: Option<RawCostTracking>,
}

/// `cost_tracking` — the seed's section (`enabled`, `budget_daily_usd`,
/// `alert_threshold_percent`) and this router's two additions.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCostTracking {
    pub enabled: bool,
    /// The whole router's spend a UTC day; absent: none.
    pub budget_daily_usd: Option<f64>,
    pub alert_threshold_percent: f64,
    pub on_store_error: super::OnStoreError,
    /// Output tokens a paid attempt reserves when the request sets no `max_tokens`.
    pub reserve_output_tokens: u32,
    /// The Python router's monthly figure: read, and said not to be enforced.
    pub monthly_budget_usd: Option<f64>,
}

impl Default for RawCostTracking {
    fn default() -> Self {
        RawCostTracking {
            enabled: true,
            budget_daily_usd: None,
            alert_threshold_percent: 80.0,
            on_store_error: super::OnStoreError::default(),
            reserve_output_tokens: 4096,
            monthly_budget_usd: None,
        }
    }
}

/// `budget:` on a provider or a client key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub daily_usd: f64,
}

/// Routers that share limits, quotas and circuits through Redis (this router's own section).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawFleet {
    /// How many routers share the limits: each takes 1/N of a limit while Redis is away.
    pub routers: u32,
    /// Absent: the cache's Redis.
    pub redis_url: Option<String>,
    pub redis_timeout_ms: f64,
}

impl Default for RawFleet {
    fn default() -> Self {
        RawFleet {
            routers: 1,
            redis_url: None,
            redis_timeout_ms: 50.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCascade {
    pub timeout_seconds: f64,
    pub max_retries_per_provider: u32,
    pub retry_delay_seconds: f64,
    pub circuit_breaker: RawBreaker,
    /// (cascade-router) Bounds retries on the same provider across all requests.
    pub retry_budget: RawRetryBudget,
}

impl Default for RawCascade {
    fn default() -> Self {
        RawCascade {
            timeout_seconds: 30.0,
            max_retries_per_provider: 2,
            retry_delay_seconds: 1.0,
            circuit_breaker: RawBreaker::default(),
            retry_budget: RawRetryBudget::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRetryBudget {
    /// Retries allowed per request of the last `ttl_seconds` (0.2: 20%).
    pub ratio: f32,
    /// Retries allowed per second on top, so a quiet router can still retry.
    pub min_per_second: u32,
    pub ttl_seconds: f64,
}

impl Default for RawRetryBudget {
    fn default() -> Self {
        RawRetryBudget {
            ratio: 0.2,
            min_per_second: 10,
            ttl_seconds: 10.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBreaker {
    pub failure_threshold: u32,
    /// Seconds an open circuit waits before letting probes through.
    pub recovery_timeout: f64,
    pub half_open_max_calls: u32,
}

impl Default for RawBreaker {
    fn default() -> Self {
        RawBreaker {
            failure_threshold: 5,
            recovery_timeout: 60.0,
            half_open_max_calls: 1,
        }
    }
}

/// The upstream APIs a cascade file may name, with the spellings agents' files use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawKind {
    /// OpenAI-compatible: OpenAI, vLLM, llama.cpp server, OpenRouter, ...
    #[serde(
        alias = "vllm",
        alias = "llamacpp",
        alias = "llama.cpp",
        alias = "llama_cpp",
        alias = "openrouter"
    )]
    OpenAi,
    #[serde(alias = "xai")]
    Grok,
    Ollama,
    #[serde(alias = "claude")]
    Anthropic,
    Simulated,
    /// In-process model runners of the Python router; this router skips them with a warning.
    #[serde(alias = "transformers", alias = "huggingface")]
    Airllm,
}

pub const SUPPORTED_TYPES: &str =
    "openai (also vllm, llamacpp, openrouter), grok, ollama, anthropic, simulated";

/// `type:` is matched without regard to case (`OpenAI`, `Ollama`), as the Python router does.
fn kind<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RawKind>, D::Error> {
    let text = String::deserialize(d)?;
    let lower = text.to_ascii_lowercase();
    RawKind::deserialize(lower.as_str().into_deserializer())
        .map(Some)
        .map_err(|_: de::value::Error| {
            de::Error::custom(format!(
                "unknown provider type {text:?} (fix: use one of {SUPPORTED_TYPES})"
            ))
        })
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawProvider {
    pub name: String,
    /// Absent: rejected in validation, by name.
    #[serde(rename = "type", deserialize_with = "kind")]
    pub kind: Option<RawKind>,
    pub enabled: bool,
    pub priority: i32,
    pub url: Option<String>,
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    pub models: Vec<RawModel>,
    /// Per-attempt timeout for this provider; absent: `cascade.timeout_seconds`.
    pub timeout_seconds: Option<f64>,
    /// How long a streamed request waits for its first text before moving on; absent: its
    /// `timeout_seconds`.
    pub first_token_timeout_seconds: Option<f64>,
    /// Requests in flight to this provider at most (bounds its connection count too).
    pub max_concurrency: usize,
    /// Unbatched requests waiting for one of those slots at most; past it a request moves on.
    pub max_waiting: usize,
    pub http: RawHttp,
    pub simulated: RawSimulated,
    /// Micro-batching for this provider; absent means no batching.
    pub batching: Option<RawBatching>,
    /// This provider's quota; absent means none.
    pub rate_limit: Option<RawRateLimit>,
    /// Request fields outside OpenAI's reference (vLLM's `top_k`, ...) forwarded to it.
    pub pass_through: Vec<String>,
    /// Active probes of the provider; absent means none.
    pub health_check: Option<RawHealthCheck>,
    /// What it may spend a UTC day; absent: no limit of its own.
    pub budget: Option<RawBudget>,
    /// Replicas of one server, each a URL as `url` takes it (instead of `url`).
    pub endpoints: Vec<String>,
    pub balance: super::Balance,
    /// Whether a unary call goes upstream as a stream (OpenAI-compatible providers only);
    /// absent: yes.
    pub stream_unary: Option<bool>,
    // The Python router's keys that this router does not use.
    pub description: Ignored,
    pub tags: Ignored,
    pub notes: Ignored,
}

impl Default for RawProvider {
    fn default() -> Self {
        RawProvider {
            name: String::new(),
            kind: None,
            enabled: true,
            priority: 100,
            url: None,
            base_url: None,
            api_key: None,
            models: Vec::new(),
            timeout_seconds: None,
            first_token_timeout_seconds: None,
            max_concurrency: 256,
            max_waiting: 1024,
            http: RawHttp::default(),
            simulated: RawSimulated::default(),
            batching: None,
            rate_limit: None,
            pass_through: Vec::new(),
            health_check: None,
            budget: None,
            endpoints: Vec::new(),
            balance: super::Balance::default(),
            stream_unary: None,
            description: None,
            tags: None,
            notes: None,
        }
    }
}

/// A model: a bare name, or the Python router's entry.
#[derive(Debug)]
pub enum RawModel {
    Name(String),
    Entry(RawModelEntry),
}

impl RawModel {
    pub fn name(&self) -> &str {
        match self {
            RawModel::Name(n) => n,
            RawModel::Entry(e) => &e.name,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawModelEntry {
    pub name: String,
    pub default: bool,
    /// Overrides the provider's `batching` for this model.
    pub batching: Option<RawBatching>,
    /// Tokens the model takes in and writes, at most.
    pub context_window: Option<u64>,
    /// `text`, `tools`, `json`, `streaming`, `vision`; absent: all of them.
    pub capabilities: Option<Vec<String>>,
    /// USD per million tokens; absent: free.
    pub price: Option<RawPrice>,
    /// The Python router's price keys, USD per thousand tokens.
    pub cost_per_1k_input_tokens: Option<f64>,
    pub cost_per_1k_output_tokens: Option<f64>,
    // The Python router's keys that this router does not use.
    pub description: Ignored,
    pub max_output_tokens: Ignored,
}

/// `models[].price`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

/// Hand-written rather than `#[serde(untagged)]`: untagged enums swallow the inner error, and
/// an unknown key inside a model entry must be reported by name.
impl<'de> Deserialize<'de> for RawModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ModelVisitor;

        impl<'de> Visitor<'de> for ModelVisitor {
            type Value = RawModel;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a model name or a {name: ...} entry")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawModel, E> {
                Ok(RawModel::Name(v.to_string()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawModel, A::Error> {
                RawModelEntry::deserialize(MapAccessDeserializer::new(map)).map(RawModel::Entry)
            }
        }

        d.deserialize_any(ModelVisitor)
    }
}

/// Active health checks, Envoy's semantics: a probe every `interval_seconds`, failing after
/// `timeout_ms`; `unhealthy_after` failures in a row take the provider out, `healthy_after`
/// successes in a row bring it back.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHealthCheck {
    pub interval_seconds: f64,
    pub timeout_ms: f64,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    /// The path probed (GET); absent: the API's own cheap endpoint.
    pub path: Option<String>,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        RawHealthCheck {
            interval_seconds: 10.0,
            timeout_ms: 1000.0,
            unhealthy_after: 3,
            healthy_after: 2,
            path: None,
        }
    }
}

/// A provider's quota: requests and tokens per minute, and how many requests may go at once.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Requests that may go back to back; absent: ten seconds' worth.
    pub burst: Option<u32>,
}

/// Per-client quotas (this router's own section).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuotas {
    pub requests_per_minute: u32,
    /// Absent: ten seconds' worth.
    pub burst: Option<u32>,
}

/// Connection pool settings for one provider's HTTP client.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHttp {
    /// Kept below common servers' keep-alive so the pool does not reuse a closing connection.
    pub pool_idle_timeout_seconds: f64,
    /// Absent: as many as the provider's `max_concurrency` (an endpoint may have that many in
    /// flight; fewer would close and reopen connections at every burst).
    pub pool_max_idle_per_host: Option<usize>,
    pub connect_timeout_seconds: f64,
    /// Speak HTTP/2 over plain TCP (h2c); TLS upstreams negotiate HTTP/2 on their own.
    pub http2_prior_knowledge: bool,
    /// PEM file of extra CA certificates to trust (a private CA, a self-signed test server).
    pub ca_file: Option<String>,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            pool_idle_timeout_seconds: 30.0,
            pool_max_idle_per_host: None,
            connect_timeout_seconds: 5.0,
            http2_prior_knowledge: false,
            ca_file: None,
        }
    }
}

/// When prompts are sent together: Triton's dynamic-batcher rule.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBatching {
    pub mode: super::BatchMode,
    /// Default 32 (fixed), 256 (adaptive, where it is only a ceiling).
    pub max_batch_size: Option<usize>,
    pub max_wait_ms: f64,
    pub max_queue: usize,
}

impl Default for RawBatching {
    fn default() -> Self {
        RawBatching {
            mode: super::BatchMode::Adaptive,
            max_batch_size: None,
            max_wait_ms: 5.0,
            max_queue: 1024,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSimulated {
    pub latency_ms: f64,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServer {
    pub listen: String,
    /// Deadline for a request whose client sent none.
    pub request_timeout_seconds: f64,
    /// Items one CompleteBatch call may carry.
    pub max_batch_items: usize,
    /// Where to serve Prometheus metrics (`GET /metrics`); absent means not served.
    pub metrics_listen: Option<String>,
    /// Where to serve the OpenAI-compatible HTTP API (`/v1/chat/completions`, ...); absent
    /// means not served.
    pub http_listen: Option<String>,
    /// On SIGTERM / SIGINT, how long calls in flight may take to finish.
    pub shutdown_grace_seconds: f64,
    /// Calls per minute each client (tenant) may make; absent means no quota.
    pub quotas: Option<RawQuotas>,
    /// Client keys; absent means no authentication (and loopback only, unless allowed).
    pub auth: Option<RawAuth>,
    /// Serve without keys on a non-loopback address. Said at startup.
    pub allow_unauthenticated: bool,
    /// Serve TLS with this certificate chain and key (PEM files); absent: plaintext.
    pub tls: Option<RawTls>,
    /// Log each prompt and completion (at info). Off: they are logged at no level.
    pub log_prompts: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub keys: Vec<RawClientKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientKey {
    #[serde(default)]
    pub name: String,
    /// The key, usually `"${ENV_VAR}"`.
    pub key: Option<String>,
    /// Or the SHA-256 of the key, hex.
    pub sha256: Option<String>,
    /// Models or chains this key may ask for; absent: any.
    pub models: Option<Vec<String>>,
    /// May use the operator's control actions (disable, drain, ...).
    #[serde(default)]
    pub admin: bool,
    /// What this client may spend a UTC day; absent: no limit of its own.
    pub budget: Option<RawBudget>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:50051".into(),
            request_timeout_seconds: 60.0,
            max_batch_items: 1024,
            metrics_listen: None,
            http_listen: None,
            shutdown_grace_seconds: 30.0,
            quotas: None,
            auth: None,
            allow_unauthenticated: false,
            tls: None,
            log_prompts: false,
        }
    }
}

/// Global bounds (this router's own section).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLimits {
    /// Calls (Complete, CompleteBatch) running at once at most; beyond it, RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Concurrent streams (calls) one HTTP/2 connection may carry.
    pub max_concurrent_streams: u32,
    /// Seconds after which a client connection is asked to go away (GOAWAY; its calls in
    /// flight get `server.request_timeout_seconds` to finish), so idle or forgotten
    /// connections do not pile up and clients rebalance across replicas.
    pub max_connection_age_seconds: f64,
    /// Bytes of prompt (or of all messages' contents) one request may carry.
    pub max_prompt_bytes: usize,
    /// Chat messages one request may carry.
    pub max_messages: usize,
    /// The largest `max_tokens` a request may ask for.
    pub max_tokens: u32,
    /// The largest encoded request message accepted (gRPC decode limit).
    pub max_message_bytes: usize,
    /// Bytes of one image a request may carry (decoded).
    pub max_image_bytes: usize,
    /// Images one request may carry.
    pub max_images: usize,
    /// Client connections open at once at most, on each front; beyond, a new one is closed.
    pub max_connections: usize,
    /// Client connections one peer address may hold open on each front at most.
    pub max_connections_per_peer: usize,
    /// An HTTP/1 request's head must arrive within this, counted from when the connection is
    /// ready for it: a slow sender is cut, and an idle keep-alive connection closes.
    pub header_read_timeout_seconds: f64,
    /// A TLS client must finish its handshake, and a plaintext gRPC client send its first
    /// bytes, within this of connecting.
    pub handshake_timeout_seconds: f64,
    /// A connection on which no call has run for this long is closed (on both fronts;
    /// keepalive pings do not count as calls).
    pub idle_timeout_seconds: f64,
    /// An HTTP request's body must have arrived within this of its head (else 408).
    pub body_read_timeout_seconds: f64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_in_flight: 10_000,
            max_concurrent_streams: 1024,
            max_connection_age_seconds: 600.0,
            max_prompt_bytes: 1 << 20,
            max_messages: 256,
            max_tokens: 32_768,
            max_message_bytes: 4 << 20,
            max_image_bytes: 4 << 20,
            max_images: 16,
            max_connections: 10_000,
            max_connections_per_peer: 1_000,
            header_read_timeout_seconds: 30.0,
            handshake_timeout_seconds: 10.0,
            idle_timeout_seconds: 300.0,
            body_read_timeout_seconds: 30.0,
        }
    }
}

/// Where cached completions live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawBackend {
    #[default]
    Memory,
    /// Redis behind the in-memory cache, shared by every replica.
    Redis,
}

/// The completion cache (this router's own section).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCache {
    pub enabled: bool,
    pub backend: RawBackend,
    pub ttl_seconds: f64,
    pub max_bytes: u64,
    pub scope: super::CacheScope,
    pub redis_url: String,
    pub redis_timeout_ms: f64,
    /// Completions larger than this are not written to Redis.
    pub max_value_bytes: usize,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            enabled: true,
            backend: RawBackend::Memory,
            ttl_seconds: 3600.0,
            max_bytes: 64 << 20,
            scope: super::CacheScope::Tenant,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_timeout_ms: 100.0,
            max_value_bytes: 1 << 20,
        }
    }
}
