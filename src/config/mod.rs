//! The cascade file: raw serde structs ([`raw`]) → [`load`] validates → runtime [`Config`].
//!
//! Every error names the file, the key and the fix on one line, so a bad file fails at start
//! with a message the user can act on. Everything merely odd (sections this router does not
//! use, a provider whose key variable is unset) becomes a warning in [`Config::warnings`].

pub mod raw;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use raw::{Extra, RawFile, RawModel, RawProvider};

/// A validated cascade file.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub cascade: CascadePolicy,
    /// Usable providers, in priority order (stable for equal priorities).
    pub providers: Vec<ProviderConfig>,
    /// Chain name → models, in order.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Agent id → model or chain name.
    pub assignments: BTreeMap<String, String>,
    /// Every model the file names, including those of disabled providers.
    pub models: BTreeSet<String>,
    /// `None` when caching is off.
    pub cache: Option<CacheConfig>,
    /// Things worth telling the operator once at start.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub request_timeout: Duration,
    pub max_batch_items: usize,
    pub metrics_listen: Option<SocketAddr>,
}

/// The completion cache.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub max_bytes: u64,
    pub scope: CacheScope,
    /// Redis behind the in-memory cache, shared by every replica.
    pub redis: Option<RedisConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheScope {
    /// Entries are keyed by the caller (`agent`): one tenant never sees another's answers.
    Tenant,
    /// Every caller shares entries.
    Shared,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    pub timeout: Duration,
    pub max_value_bytes: usize,
}

/// How the cascade walks its providers.
#[derive(Clone, Debug)]
pub struct CascadePolicy {
    pub attempt_timeout: Duration,
    pub max_retries_per_provider: u32,
    pub retry_delay: Duration,
    pub breaker: BreakerConfig,
}

#[derive(Clone, Copy, Debug)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub recovery_timeout: Duration,
    pub half_open_max_calls: u32,
}

/// The upstream APIs this router speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI-compatible: OpenAI, vLLM, llama.cpp server, OpenRouter, ...
    OpenAi,
    /// xAI's Grok: the OpenAI shape at its own base URL.
    Grok,
    Ollama,
    Anthropic,
    /// Built in, no network: deterministic text derived from the prompt.
    Simulated,
}

impl ProviderKind {
    /// Parses a `type:` value; `Err(true)` means a type we know of but cannot serve.
    fn parse(s: &str) -> Result<ProviderKind, bool> {
        match s.to_ascii_lowercase().as_str() {
            "openai" | "vllm" | "llamacpp" | "llama.cpp" | "llama_cpp" | "openrouter" => {
                Ok(ProviderKind::OpenAi)
            }
            "grok" | "xai" => Ok(ProviderKind::Grok),
            "ollama" => Ok(ProviderKind::Ollama),
            "anthropic" | "claude" => Ok(ProviderKind::Anthropic),
            "simulated" => Ok(ProviderKind::Simulated),
            "airllm" | "transformers" | "huggingface" => Err(true),
            _ => Err(false),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Grok => "grok",
            ProviderKind::Ollama => "ollama",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Simulated => "simulated",
        }
    }

    /// The endpoint used when the file gives no `url` / `base_url`.
    fn default_endpoint(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("https://api.openai.com/v1"),
            ProviderKind::Grok => Some("https://api.x.ai/v1"),
            ProviderKind::Ollama => Some("http://localhost:11434"),
            ProviderKind::Anthropic => Some("https://api.anthropic.com"),
            ProviderKind::Simulated => None,
        }
    }
}

const SUPPORTED_TYPES: &str =
    "openai (also vllm, llamacpp, openrouter), grok, ollama, anthropic, simulated";

/// An API key. Its Debug and Display never show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> ApiKey {
        ApiKey(key)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub priority: i32,
    /// Base URL without a trailing slash; `None` only for the simulated provider.
    pub endpoint: Option<url::Url>,
    pub api_key: Option<ApiKey>,
    /// Model names, the default first.
    pub models: Vec<String>,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub http: HttpConfig,
    pub simulated_latency: Duration,
    /// Batching for every model of this provider, unless overridden per model.
    pub batching: Option<BatchingConfig>,
    pub model_batching: BTreeMap<String, BatchingConfig>,
}

/// Send queued prompts when `max_batch_size` are waiting or the oldest has waited `max_wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    pub max_wait: Duration,
    /// Items waiting per queue at most; past it, RESOURCE_EXHAUSTED.
    pub max_queue: usize,
}

impl ProviderConfig {
    pub fn default_model(&self) -> &str {
        self.models.first().map(String::as_str).unwrap_or_default()
    }
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Kept below common servers' keep-alive so the pool does not reuse a closing connection.
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub connect_timeout: Duration,
    pub http2_prior_knowledge: bool,
    /// Extra CA certificates to trust, PEM.
    pub ca_pem: Option<Vec<u8>>,
}

/// A cascade file that cannot be used, as one line: file, key, problem and fix.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {problem} (fix: {fix})")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

/// The embedded default: one simulated provider, so the service answers with no model server.
pub const DEFAULT_YAML: &str = r#"
providers:
  - name: simulated
    type: simulated
    priority: 1
    models: [simulated]
"#;

/// Reads and validates a cascade file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        key: "(file)".into(),
        problem: format!("cannot read: {e}"),
        fix: "pass --config with the path of a readable cascade file".into(),
    })?;
    parse(&text, &file, &|name| std::env::var(name).ok())
}

/// Validates cascade-file text; `origin` names it in errors, `env` resolves `${VAR}`.
///
/// ```
/// use cascade_router::config;
///
/// let yaml = r#"
/// providers:
///   - {name: local, type: ollama, url: "http://127.0.0.1:11434", models: [llama3.2]}
///   - {name: hosted, type: openai, api_key: "${OPENAI_API_KEY}", models: [gpt-4o-mini]}
/// "#;
/// let c = config::parse(yaml, "cascade.yaml", &|_| None).unwrap();
/// // The hosted provider's key variable is unset: it is disabled, with a warning.
/// assert_eq!(c.providers.len(), 1);
/// assert!(c.warnings[0].contains("${OPENAI_API_KEY} is unset"));
///
/// let err = config::parse("providers: [{name: x, type: gpt5}]", "cascade.yaml", &|_| None).unwrap_err();
/// assert!(err.to_string().starts_with("cascade.yaml: providers[0].type: unknown provider type"));
/// ```
pub fn parse(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let raw: RawFile = serde_yaml::from_str(text).map_err(|e| {
        let key = e
            .location()
            .map(|l| format!("line {} column {}", l.line(), l.column()))
            .unwrap_or_else(|| "(document)".into());
        ConfigError {
            file: origin.into(),
            key,
            problem: first_line(&e.to_string()),
            fix: "correct the YAML at that position".into(),
        }
    })?;
    Validator {
        origin,
        env,
        warnings: Vec::new(),
    }
    .validate(raw)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Top-level sections of the Python cascade router's file that this router reads no further.
const KNOWN_IGNORED: &[&str] = &[
    "custom_models",
    "multimodal",
    "cost_tracking",
    "metrics",
    "logging",
    "routing",
    "monitoring",
    "version",
];

struct Validator<'a> {
    origin: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    warnings: Vec<String>,
}

impl Validator<'_> {
    fn err(
        &self,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.origin.into(),
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Unknown keys are warnings, unless one is a near-miss of a key we read: that is a typo
    /// that would otherwise silently change behaviour, so it is an error.
    fn check_extra(&mut self, at: &str, extra: &Extra, known: &[&str]) -> Result<(), ConfigError> {
        for key in extra.keys() {
            if let Some(near) = known
                .iter()
                .find(|k| strsim::levenshtein(k, key) <= 2 && **k != key)
            {
                return Err(self.err(
                    format!("{at}{key}"),
                    "unknown key",
                    format!("did you mean `{near}`?"),
                ));
            }
        }
        if !extra.is_empty() {
            let names: Vec<&str> = extra.keys().map(String::as_str).collect();
            let place = if at.is_empty() {
                "top level"
            } else {
                at.trim_end_matches('.')
            };
            self.warnings.push(format!(
                "{}: {place}: ignoring keys this router does not use: {}",
                self.origin,
                names.join(", ")
            ));
        }
        Ok(())
    }

    fn validate(mut self, raw: RawFile) -> Result<Config, ConfigError> {
        let top_known = [
            "cascade",
            "providers",
            "fallback_chains",
            "agent_model_assignments",
            "server",
            "cache",
        ];
        let (ignored, unknown): (Extra, Extra) = raw
            .extra
            .into_iter()
            .partition(|(k, _)| KNOWN_IGNORED.contains(&k.as_str()));
        self.check_extra("", &unknown, &top_known)?;
        if !ignored.is_empty() {
            let names: Vec<&str> = ignored.keys().map(String::as_str).collect();
            self.warnings.push(format!(
                "{}: sections not used by this router: {}",
                self.origin,
                names.join(", ")
            ));
        }

        let cascade = self.cascade(raw.cascade)?;
        let server = self.server(raw.server)?;
        let cache = match raw.cache {
            None => None,
            Some(c) => self.cache(c)?,
        };

        let mut names = HashSet::new();
        let mut all_models = BTreeSet::new();
        let mut providers = Vec::new();
        for (i, p) in raw.providers.into_iter().enumerate() {
            let at = format!("providers[{i}]");
            if p.name.trim().is_empty() {
                return Err(self.err(
                    format!("{at}.name"),
                    "missing or empty",
                    "give every provider a unique name",
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(self.err(
                    format!("{at}.name"),
                    format!("duplicate provider name {:?}", p.name),
                    "give every provider a unique name",
                ));
            }
            for m in &p.models {
                all_models.insert(model_name(m).to_string());
            }
            if let Some(pc) = self.provider(&at, p, &cascade)? {
                providers.push(pc);
            }
        }
        // Stable: equal priorities keep file order.
        providers.sort_by_key(|p| p.priority);

        for (chain, models) in &raw.fallback_chains {
            let at = format!("fallback_chains.{chain}");
            if models.is_empty() {
                return Err(self.err(
                    at,
                    "empty chain",
                    "list at least one model, in the order to try them",
                ));
            }
            for (j, m) in models.iter().enumerate() {
                if !all_models.contains(m) {
                    return Err(self.err(
                        format!("{at}[{j}]"),
                        format!("unknown model {m:?}"),
                        "name a model listed under some provider's `models`",
                    ));
                }
            }
            if all_models.contains(chain) {
                self.warnings.push(format!(
                    "{}: {at}: chain has the name of a model; requests for {chain:?} walk the chain",
                    self.origin
                ));
            }
        }
        for (agent, target) in &raw.agent_model_assignments {
            if !all_models.contains(target) && !raw.fallback_chains.contains_key(target) {
                return Err(self.err(
                    format!("agent_model_assignments.{agent}"),
                    format!("unknown model or chain {target:?}"),
                    "name a model listed under some provider's `models` or a `fallback_chains` entry",
                ));
            }
        }
        if providers.is_empty() {
            return Err(self.err(
                "providers",
                "no usable provider (all missing, disabled, skipped or without keys)",
                "enable at least one provider of a supported type with its key variable set",
            ));
        }
        Ok(Config {
            server,
            cascade,
            providers,
            chains: raw.fallback_chains,
            assignments: raw.agent_model_assignments,
            models: all_models,
            cache,
            warnings: self.warnings,
        })
    }

    fn cascade(&mut self, c: raw::RawCascade) -> Result<CascadePolicy, ConfigError> {
        self.check_extra(
            "cascade.",
            &c.extra,
            &[
                "timeout_seconds",
                "max_retries_per_provider",
                "retry_delay_seconds",
                "circuit_breaker",
            ],
        )?;
        self.check_extra(
            "cascade.circuit_breaker.",
            &c.circuit_breaker.extra,
            &[
                "failure_threshold",
                "recovery_timeout",
                "half_open_max_calls",
            ],
        )?;
        let attempt_timeout = self.seconds("cascade.timeout_seconds", c.timeout_seconds, false)?;
        let retry_delay =
            self.seconds("cascade.retry_delay_seconds", c.retry_delay_seconds, true)?;
        if c.max_retries_per_provider > 10 {
            return Err(self.err(
                "cascade.max_retries_per_provider",
                format!("{} is more than 10", c.max_retries_per_provider),
                "use 0 to 10; the cascade moves on to the next provider after that",
            ));
        }
        let b = c.circuit_breaker;
        if b.failure_threshold == 0 {
            return Err(self.err(
                "cascade.circuit_breaker.failure_threshold",
                "must be at least 1",
                "set a count of consecutive failures, e.g. 5",
            ));
        }
        if b.half_open_max_calls == 0 {
            return Err(self.err(
                "cascade.circuit_breaker.half_open_max_calls",
                "must be at least 1",
                "set how many probes a half-open circuit lets through, e.g. 1",
            ));
        }
        let recovery_timeout = self.seconds(
            "cascade.circuit_breaker.recovery_timeout",
            b.recovery_timeout,
            false,
        )?;
        Ok(CascadePolicy {
            attempt_timeout,
            max_retries_per_provider: c.max_retries_per_provider,
            retry_delay,
            breaker: BreakerConfig {
                failure_threshold: b.failure_threshold,
                recovery_timeout,
                half_open_max_calls: b.half_open_max_calls,
            },
        })
    }

    fn server(&mut self, s: raw::RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = match s.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 50051)),
            Some(text) => text.parse().map_err(|_| {
                self.err(
                    "server.listen",
                    format!("{text:?} is not an address"),
                    "use IP:PORT, e.g. 127.0.0.1:50051",
                )
            })?,
        };
        let request_timeout = match s.request_timeout_seconds {
            None => Duration::from_secs(60),
            Some(v) => self.seconds("server.request_timeout_seconds", v, false)?,
        };
        let max_batch_items = s.max_batch_items.unwrap_or(1024);
        if max_batch_items == 0 {
            return Err(self.err(
                "server.max_batch_items",
                "must be at least 1",
                "set the most items one CompleteBatch may carry, e.g. 1024",
            ));
        }
        let metrics_listen = match s.metrics_listen {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| {
                self.err(
                    "server.metrics_listen",
                    format!("{text:?} is not an address"),
                    "use IP:PORT, e.g. 127.0.0.1:9464",
                )
            })?),
        };
        Ok(ServerConfig {
            listen,
            request_timeout,
            max_batch_items,
            metrics_listen,
        })
    }

    fn cache(&mut self, c: raw::RawCache) -> Result<Option<CacheConfig>, ConfigError> {
        if c.enabled == Some(false) {
            return Ok(None);
        }
        let ttl = self.seconds("cache.ttl_seconds", c.ttl_seconds.unwrap_or(3600.0), false)?;
        let max_bytes = c.max_bytes.unwrap_or(64 << 20);
        if max_bytes < 1024 {
            return Err(self.err(
                "cache.max_bytes",
                format!("{max_bytes} is too small"),
                "give the cache at least 1024 bytes, e.g. 67108864 (64 MiB)",
            ));
        }
        let scope = match c.scope.as_deref() {
            None | Some("tenant") => CacheScope::Tenant,
            Some("shared") => CacheScope::Shared,
            Some(other) => {
                return Err(self.err(
                    "cache.scope",
                    format!("unknown scope {other:?}"),
                    "use tenant (each agent its own entries) or shared",
                ));
            }
        };
        let redis = match c.backend.as_deref() {
            None | Some("memory") => None,
            Some("redis") => {
                let url = c
                    .redis_url
                    .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(self.err(
                        "cache.redis_url",
                        format!("{url:?} is not a redis:// URL"),
                        "use redis://HOST:PORT[/DB]",
                    ));
                }
                let timeout = self.seconds(
                    "cache.redis_timeout_ms",
                    c.redis_timeout_ms.unwrap_or(100.0) / 1000.0,
                    false,
                )?;
                Some(RedisConfig {
                    url,
                    timeout,
                    max_value_bytes: c.max_value_bytes.unwrap_or(1 << 20),
                })
            }
            Some(other) => {
                return Err(self.err(
                    "cache.backend",
                    format!("unknown backend {other:?}"),
                    "use memory or redis",
                ));
            }
        };
        Ok(Some(CacheConfig {
            ttl,
            max_bytes,
            scope,
            redis,
        }))
    }

    fn seconds(&self, key: &str, v: f64, zero_ok: bool) -> Result<Duration, ConfigError> {
        let ok = v.is_finite() && v <= 86_400.0 && (v > 0.0 || (zero_ok && v == 0.0));
        if !ok {
            let want = if zero_ok { "0 or more" } else { "more than 0" };
            return Err(self.err(
                key,
                format!("{v} is out of range"),
                format!("use a number of seconds, {want}, at most 86400"),
            ));
        }
        Ok(Duration::from_secs_f64(v))
    }

    /// Validates one provider; `Ok(None)` when it is disabled or skipped (with a warning).
    fn provider(
        &mut self,
        at: &str,
        p: RawProvider,
        cascade: &CascadePolicy,
    ) -> Result<Option<ProviderConfig>, ConfigError> {
        self.check_extra(
            &format!("{at}."),
            &p.extra,
            &[
                "name",
                "type",
                "enabled",
                "priority",
                "url",
                "base_url",
                "api_key",
                "models",
                "timeout_seconds",
                "max_concurrency",
                "http",
                "simulated",
            ],
        )?;
        let kind = match ProviderKind::parse(&p.kind) {
            Ok(k) => k,
            Err(true) => {
                self.warnings.push(format!(
                    "{}: {at}.type: {:?} ({}) is not served by this router; provider skipped",
                    self.origin, p.kind, p.name
                ));
                return Ok(None);
            }
            Err(false) => {
                return Err(self.err(
                    format!("{at}.type"),
                    format!("unknown provider type {:?}", p.kind),
                    format!("use one of {SUPPORTED_TYPES}"),
                ));
            }
        };
        let endpoint_text = match (&p.base_url, &p.url) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    format!("{at}.url"),
                    "both `url` and `base_url` are set",
                    "keep one of them",
                ));
            }
            (Some(u), None) | (None, Some(u)) => Some(u.clone()),
            (None, None) => kind.default_endpoint().map(str::to_string),
        };
        let key_name = if p.base_url.is_some() {
            "base_url"
        } else {
            "url"
        };
        // The default model goes first; the first entry is the default when none is marked.
        let mut models: Vec<String> = Vec::new();
        let mut has_default = false;
        for m in &p.models {
            let name = model_name(m);
            if name.trim().is_empty() {
                return Err(self.err(
                    format!("{at}.models"),
                    "a model has an empty name",
                    "give every model a name",
                ));
            }
            if matches!(m, RawModel::Entry { default: true, .. }) && !has_default {
                has_default = true;
                models.insert(0, name.to_string());
            } else {
                models.push(name.to_string());
            }
        }
        // Validate URLs of disabled providers too: a typo should not wait for the day it is enabled.
        let endpoint = match endpoint_text {
            None => None,
            Some(text) => match self.expand(&text) {
                Err(var) => {
                    if p.enabled {
                        self.warnings.push(format!(
                            "{}: {at}.{key_name}: ${{{var}}} is unset; provider {:?} disabled",
                            self.origin, p.name
                        ));
                    }
                    return Ok(None);
                }
                Ok(expanded) => Some(self.url(&format!("{at}.{key_name}"), &expanded)?),
            },
        };
        let timeout = match p.timeout_seconds {
            None => cascade.attempt_timeout,
            Some(v) => self.seconds(&format!("{at}.timeout_seconds"), v, false)?,
        };
        let max_concurrency = p.max_concurrency.unwrap_or(256);
        if max_concurrency == 0 {
            return Err(self.err(
                format!("{at}.max_concurrency"),
                "must be at least 1",
                "set the most requests in flight to this provider, e.g. 64",
            ));
        }
        let h = p.http.unwrap_or_default();
        let http = HttpConfig {
            pool_idle_timeout: match h.pool_idle_timeout_seconds {
                None => Duration::from_secs(30),
                Some(v) => {
                    self.seconds(&format!("{at}.http.pool_idle_timeout_seconds"), v, false)?
                }
            },
            pool_max_idle_per_host: h.pool_max_idle_per_host.unwrap_or(64),
            connect_timeout: match h.connect_timeout_seconds {
                None => Duration::from_secs(5),
                Some(v) => self.seconds(&format!("{at}.http.connect_timeout_seconds"), v, false)?,
            },
            http2_prior_knowledge: h.http2_prior_knowledge.unwrap_or(false),
            ca_pem: match &h.ca_file {
                None => None,
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    self.err(
                        format!("{at}.http.ca_file"),
                        format!("cannot read {path:?}: {e}"),
                        "name a readable PEM file of CA certificates",
                    )
                })?),
            },
        };
        let simulated_latency = match p.simulated.and_then(|s| s.latency_ms) {
            None => Duration::ZERO,
            Some(ms) => self.seconds(&format!("{at}.simulated.latency_ms"), ms / 1000.0, true)?,
        };
        let batching = match &p.batching {
            None => None,
            Some(b) => Some(self.batching(&format!("{at}.batching"), b)?),
        };
        let mut model_batching = BTreeMap::new();
        for (j, m) in p.models.iter().enumerate() {
            if let RawModel::Entry {
                name,
                batching: Some(b),
                ..
            } = m
            {
                model_batching.insert(
                    name.clone(),
                    self.batching(&format!("{at}.models[{j}].batching"), b)?,
                );
            }
        }
        if !p.enabled {
            return Ok(None);
        }
        let api_key = match &p.api_key {
            None => None,
            Some(text) => match self.expand(text) {
                Ok(k) if k.is_empty() => None,
                Ok(k) => Some(ApiKey::new(k)),
                Err(var) => {
                    self.warnings.push(format!(
                        "{}: {at}.api_key: ${{{var}}} is unset; provider {:?} disabled",
                        self.origin, p.name
                    ));
                    return Ok(None);
                }
            },
        };
        if models.is_empty() {
            self.warnings.push(format!(
                "{}: {at}.models: provider {:?} lists no models; disabled",
                self.origin, p.name
            ));
            return Ok(None);
        }
        Ok(Some(ProviderConfig {
            name: p.name,
            kind,
            priority: p.priority,
            endpoint,
            api_key,
            models,
            timeout,
            max_concurrency,
            http,
            simulated_latency,
            batching,
            model_batching,
        }))
    }

    fn batching(&self, at: &str, b: &raw::RawBatching) -> Result<BatchingConfig, ConfigError> {
        let max_batch_size = b.max_batch_size.unwrap_or(32);
        if !(1..=4096).contains(&max_batch_size) {
            return Err(self.err(
                format!("{at}.max_batch_size"),
                format!("{max_batch_size} is out of range"),
                "use 1 to 4096 prompts per upstream request",
            ));
        }
        let max_queue = b.max_queue.unwrap_or(1024);
        if !(1..=1_000_000).contains(&max_queue) {
            return Err(self.err(
                format!("{at}.max_queue"),
                format!("{max_queue} is out of range"),
                "use 1 to 1000000 waiting items",
            ));
        }
        let ms = b.max_wait_ms.unwrap_or(5.0);
        let max_wait = self.seconds(&format!("{at}.max_wait_ms"), ms / 1000.0, true)?;
        if max_wait > Duration::from_secs(10) {
            return Err(self.err(
                format!("{at}.max_wait_ms"),
                format!("{ms} ms is over 10 s"),
                "use a window of a few milliseconds, e.g. 5",
            ));
        }
        Ok(BatchingConfig {
            max_batch_size,
            max_wait,
            max_queue,
        })
    }

    fn url(&self, key: &str, text: &str) -> Result<url::Url, ConfigError> {
        let fix = "use an http:// or https:// URL, e.g. http://127.0.0.1:11434";
        let mut u = url::Url::parse(text)
            .map_err(|e| self.err(key, format!("{text:?} is not a URL ({e})"), fix))?;
        if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
            return Err(self.err(key, format!("{text:?} is not an http(s) URL"), fix));
        }
        let trimmed = u.path().trim_end_matches('/').to_string();
        u.set_path(&trimmed);
        Ok(u)
    }

    /// Expands `${VAR}` and `${VAR:-default}`; `Err(VAR)` names the first unset variable.
    fn expand(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                return Ok(out);
            };
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            match ((self.env)(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(name.to_string()),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

fn model_name(m: &RawModel) -> &str {
    match m {
        RawModel::Name(n) | RawModel::Entry { name: n, .. } => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn default_yaml_is_valid() {
        let c = parse(DEFAULT_YAML, "default", &no_env).map_err(|e| e.to_string());
        assert_eq!(c.map(|c| c.providers[0].kind), Ok(ProviderKind::Simulated));
    }

    #[test]
    fn expands_variables_with_defaults() {
        let env = |n: &str| (n == "HOST").then(|| "10.1.1.1".to_string());
        let v = Validator {
            origin: "t",
            env: &env,
            warnings: vec![],
        };
        assert_eq!(
            v.expand("http://${HOST}:1/x").as_deref(),
            Ok("http://10.1.1.1:1/x")
        );
        assert_eq!(v.expand("${PORT:-80}").as_deref(), Ok("80"));
        assert_eq!(v.expand("${NOPE}"), Err("NOPE".to_string()));
    }

    #[test]
    fn api_key_debug_is_redacted() {
        let k = ApiKey::new("sk-secret".into());
        assert!(!format!("{k:?}").contains("sk-secret"));
    }

    #[test]
    fn default_model_comes_first() {
        let y = "providers:\n - {name: a, type: simulated, models: [{name: x}, {name: y, default: true}]}\n";
        let c = parse(y, "t", &no_env).map_err(|e| e.to_string());
        assert_eq!(
            c.map(|c| c.providers[0].models.clone()),
            Ok(vec!["y".to_string(), "x".to_string()])
        );
    }

    #[test]
    fn near_miss_of_our_key_is_an_error() {
        let y = "sever: {listen: 127.0.0.1:1}\nproviders:\n - {name: a, type: simulated, models: [m]}\n";
        let e = parse(y, "f.yaml", &no_env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("f.yaml: sever: unknown key"), "{e}");
        assert!(e.contains("did you mean `server`"), "{e}");
    }
}
