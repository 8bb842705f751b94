//! `providers:` — each upstream: its API, endpoint, key, models, limits, pool and batching.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    time::Duration,
};

use super::{Balance, Capabilities, Capability, HealthCheckConfig, ModelInfo, RateLimitConfig};

use super::{
    CascadePolicy, Check, ConfigError,
    raw::{RawBatching, RawKind, RawModel, RawProvider, SUPPORTED_TYPES},
};

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

/// The API a provider speaks, with what reaching it takes: a network API its base URL
/// (without a trailing slash), the simulated one its latency. A network provider cannot lack
/// its URL, so none can fall back to the simulated one by mistake.
#[derive(Clone, Debug, PartialEq)]
pub enum Api {
    /// OpenAI's shape: `openai`, `grok`, and any OpenAI-compatible server.
    OpenAi {
        base: url::Url,
        /// A unary call goes upstream as a stream, read to its end: a caller who gives up
        /// then stops the generation (llama-server does not watch a unary request's
        /// connection; it does a stream's). A batched array request stays unary.
        stream_unary: bool,
    },
    Ollama {
        base: url::Url,
    },
    Anthropic {
        base: url::Url,
    },
    /// Built in, no network: deterministic text after `latency`.
    Simulated {
        latency: Duration,
    },
}

/// An API key. Its Debug never shows the secret.
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

#[derive(Clone, Debug, PartialEq)]
pub struct ProviderConfig {
    pub name: String,
    /// What the file calls its API (reported by ListProviders).
    pub kind: ProviderKind,
    pub priority: i32,
    /// How the router reaches it.
    pub api: Api,
    pub api_key: Option<ApiKey>,
    /// Model names, the default first.
    pub models: Vec<String>,
    pub timeout: Duration,
    /// A streamed request's wait for its first event; then, between events.
    pub first_token_timeout: Duration,
    pub max_concurrency: usize,
    pub max_waiting: usize,
    pub http: HttpConfig,
    /// Batching for every model of this provider, unless overridden per model.
    pub batching: Option<BatchingConfig>,
    pub model_batching: BTreeMap<String, BatchingConfig>,
    pub rate_limit: Option<RateLimitConfig>,
    /// What the file says of each model that lists capabilities or a window.
    pub model_info: BTreeMap<String, ModelInfo>,
    /// Request fields outside OpenAI's reference forwarded to this provider.
    pub pass_through: Vec<String>,
    pub health_check: Option<HealthCheckConfig>,
    /// Every replica's base URL, `api`'s first (none for the simulated API).
    pub endpoints: Vec<url::Url>,
    pub balance: Balance,
}

/// `batching.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchMode {
    /// Send at once while the provider has room under a concurrency limit learned from its
    /// latency; what arrives while it is busy goes together when room frees, in batches sized
    /// to spread the waiting prompts over the limit.
    #[default]
    Adaptive,
    /// Send when `max_batch_size` prompts wait or the oldest has waited `max_wait_ms`
    /// (Triton's dynamic-batcher rule), under the fixed `max_concurrency`.
    Fixed,
}

impl ProviderConfig {
    /// Whether the provider's concurrency limit is learned (some model batches adaptively).
    pub fn adaptive(&self) -> bool {
        self.batching
            .iter()
            .chain(self.model_batching.values())
            .any(|b| b.mode == BatchMode::Adaptive)
    }

    pub fn default_model(&self) -> &str {
        self.models.first().map(String::as_str).unwrap_or_default()
    }
}

/// How a provider's prompts are grouped into upstream requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchingConfig {
    pub mode: BatchMode,
    pub max_batch_size: usize,
    /// Fixed mode's window. Adaptive mode waits for no company while the provider has room:
    /// items only gather while it is busy.
    pub max_wait: Duration,
    /// Items waiting per queue at most; past it, RESOURCE_EXHAUSTED.
    pub max_queue: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpConfig {
    /// Kept below common servers' keep-alive so the pool does not reuse a closing connection.
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub connect_timeout: Duration,
    pub http2_prior_knowledge: bool,
    /// Extra CA certificates to trust, PEM.
    pub ca_pem: Option<Vec<u8>>,
}

impl Check<'_> {
    /// The usable providers, in priority order (stable for equal priorities).
    pub(super) fn providers(
        &mut self,
        raw: Vec<RawProvider>,
        cascade: &CascadePolicy,
    ) -> Result<Vec<ProviderConfig>, ConfigError> {
        let mut names = HashSet::new();
        let mut providers = Vec::new();
        for (i, p) in raw.into_iter().enumerate() {
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
            if let Some(pc) = self.provider(&at, p, cascade)? {
                providers.push(pc);
            }
        }
        providers.sort_by_key(|p| p.priority);
        if providers.is_empty() {
            let unset = if self.unset.is_empty() {
                String::new()
            } else {
                let vars: Vec<String> = self.unset.iter().map(|v| format!("${{{v}}}")).collect();
                format!("; unset: {}", vars.join(", "))
            };
            return Err(self.err(
                "providers",
                format!(
                    "no usable provider (all missing, disabled, skipped or without keys{unset})"
                ),
                "enable at least one provider of a supported type with its key variable set",
            ));
        }
        Ok(providers)
    }

    /// Validates one provider; `Ok(None)` when it is disabled or skipped (with a warning).
    fn provider(
        &mut self,
        at: &str,
        p: RawProvider,
        cascade: &CascadePolicy,
    ) -> Result<Option<ProviderConfig>, ConfigError> {
        let kind = match p.kind {
            None => {
                return Err(self.err(
                    format!("{at}.type"),
                    "missing",
                    format!("set `type:` to one of {SUPPORTED_TYPES}"),
                ));
            }
            Some(RawKind::OpenAi) => ProviderKind::OpenAi,
            Some(RawKind::Grok) => ProviderKind::Grok,
            Some(RawKind::Ollama) => ProviderKind::Ollama,
            Some(RawKind::Anthropic) => ProviderKind::Anthropic,
            Some(RawKind::Simulated) => ProviderKind::Simulated,
            Some(RawKind::Airllm) => {
                self.warn(format!(
                    "{at}.type: \"airllm\" ({}) is not served by this router; provider skipped",
                    p.name
                ));
                return Ok(None);
            }
        };
        let models = self.models(at, &p.models)?;
        // Each endpoint with its key: `endpoints` (replicas of one server), else `url` /
        // `base_url`, else the API's public URL.
        let texts: Vec<(String, String)> = match (&p.base_url, &p.url) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    format!("{at}.url"),
                    "both `url` and `base_url` are set",
                    "keep one of them",
                ));
            }
            (Some(_), None) | (None, Some(_)) if !p.endpoints.is_empty() => {
                return Err(self.err(
                    format!("{at}.endpoints"),
                    "set beside `url` / `base_url`",
                    "list every replica under `endpoints`, or give one `url`",
                ));
            }
            (Some(u), None) => vec![(format!("{at}.base_url"), u.clone())],
            (None, Some(u)) => vec![(format!("{at}.url"), u.clone())],
            (None, None) if p.endpoints.is_empty() => kind
                .default_endpoint()
                .map(|u| vec![(format!("{at}.url"), u.to_string())])
                .unwrap_or_default(),
            (None, None) => p
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("{at}.endpoints[{i}]"), u.clone()))
                .collect(),
        };
        // Validate URLs of disabled providers too: a typo should not wait for the day it is enabled.
        let mut endpoints = Vec::with_capacity(texts.len());
        for (key, text) in texts {
            match self.expand(&text) {
                Err(var) => {
                    if p.enabled {
                        self.warn(format!(
                            "{key}: ${{{var}}} is unset; provider {:?} disabled",
                            p.name
                        ));
                        self.unset.push(var);
                    }
                    return Ok(None);
                }
                Ok(expanded) => {
                    let mut u = self.url(&key, &expanded)?;
                    // Anthropic's SDKs take the host alone (the router adds `/v1/messages`); a
                    // URL given with `/v1`, as OpenAI-shaped ones are, means the same server.
                    if kind == ProviderKind::Anthropic
                        && let Some(host_only) = u.path().strip_suffix("/v1").map(str::to_string)
                    {
                        u.set_path(&host_only);
                    }
                    endpoints.push(u);
                }
            }
        }
        let endpoint = endpoints.first().cloned();
        let timeout = match p.timeout_seconds {
            None => cascade.attempt_timeout,
            Some(v) => self.seconds(&format!("{at}.timeout_seconds"), v, false)?,
        };
        let first_token_timeout = match p.first_token_timeout_seconds {
            None => timeout,
            Some(v) => self.seconds(&format!("{at}.first_token_timeout_seconds"), v, false)?,
        };
        if p.max_concurrency == 0 {
            return Err(self.err(
                format!("{at}.max_concurrency"),
                "must be at least 1",
                "set the most requests in flight to this provider, e.g. 64",
            ));
        }
        let h = &p.http;
        let http = HttpConfig {
            pool_idle_timeout: self.seconds(
                &format!("{at}.http.pool_idle_timeout_seconds"),
                h.pool_idle_timeout_seconds,
                false,
            )?,
            pool_max_idle_per_host: h.pool_max_idle_per_host.unwrap_or(p.max_concurrency),
            connect_timeout: self.seconds(
                &format!("{at}.http.connect_timeout_seconds"),
                h.connect_timeout_seconds,
                false,
            )?,
            http2_prior_knowledge: h.http2_prior_knowledge,
            ca_pem: match &h.ca_file {
                None => None,
                Some(path) => Some(self.ca_file(&format!("{at}.http.ca_file"), path)?),
            },
        };
        let simulated_latency = self.seconds(
            &format!("{at}.simulated.latency_ms"),
            p.simulated.latency_ms / 1000.0,
            true,
        )?;
        let batching = match &p.batching {
            None => None,
            Some(b) => Some(self.batching(&format!("{at}.batching"), b)?),
        };
        let mut model_batching = BTreeMap::new();
        for (j, m) in p.models.iter().enumerate() {
            if let RawModel::Entry(e) = m
                && let Some(b) = &e.batching
            {
                model_batching.insert(
                    e.name.clone(),
                    self.batching(&format!("{at}.models[{j}].batching"), b)?,
                );
            }
        }
        let rate_limit = match &p.rate_limit {
            None => None,
            Some(r) => Some(self.rate_limit(&format!("{at}.rate_limit"), r)?),
        };
        let model_info = self.model_info(at, &p.models)?;
        let health_check = p
            .health_check
            .as_ref()
            .map(|h| self.health_check(&format!("{at}.health_check"), h))
            .transpose()?;
        for (j, f) in p.pass_through.iter().enumerate() {
            if f.is_empty() || crate::completion::is_modelled_field(f) {
                return Err(self.err(
                    format!("{at}.pass_through[{j}]"),
                    format!("{f:?} is a field the router reads itself"),
                    "list only fields the router does not model (e.g. top_k, min_p, keep_alive)",
                ));
            }
        }
        if !p.enabled {
            return Ok(None);
        }
        let api_key = match &p.api_key {
            None => None,
            Some(text) => match self.expand(text) {
                Ok(k) if k.is_empty() => None,
                // A key read from a file with `$(cat ...)` often ends in a newline, which
                // would make the header invalid and silently send no key at all.
                Ok(k) if k.trim() != k => {
                    let source = if text.contains("${") {
                        text.as_str()
                    } else {
                        "the key"
                    };
                    return Err(self.err(
                        format!("{at}.api_key"),
                        format!("{source} has spaces or a newline around it"),
                        "set it to the key alone, with no trailing newline",
                    ));
                }
                Ok(k) => Some(ApiKey::new(k)),
                Err(var) => {
                    self.warn(format!(
                        "{at}.api_key: ${{{var}}} is unset; provider {:?} disabled",
                        p.name
                    ));
                    self.unset.push(var);
                    return Ok(None);
                }
            },
        };
        if models.is_empty() {
            self.warn(format!(
                "{at}.models: provider {:?} lists no models; disabled",
                p.name
            ));
            return Ok(None);
        }
        if p.stream_unary.is_some() && !matches!(kind, ProviderKind::OpenAi | ProviderKind::Grok) {
            return Err(self.err(
                format!("{at}.stream_unary"),
                "only OpenAI-compatible providers take it (Ollama stops a unary generation when its caller goes)",
                "remove it",
            ));
        }
        let api = match (kind, endpoint) {
            (ProviderKind::Simulated, _) => Api::Simulated {
                latency: simulated_latency,
            },
            (ProviderKind::OpenAi | ProviderKind::Grok, Some(base)) => Api::OpenAi {
                base,
                stream_unary: p.stream_unary.unwrap_or(true),
            },
            (ProviderKind::Ollama, Some(base)) => Api::Ollama { base },
            (ProviderKind::Anthropic, Some(base)) => Api::Anthropic { base },
            (_, None) => {
                return Err(self.err(
                    format!("{at}.url"),
                    "missing",
                    "give the server's URL (`url:` or `base_url:`)",
                ));
            }
        };
        Ok(Some(ProviderConfig {
            name: p.name,
            kind,
            priority: p.priority,
            api,
            api_key,
            models,
            timeout,
            first_token_timeout,
            max_concurrency: p.max_concurrency,
            max_waiting: p.max_waiting,
            http,
            batching,
            model_batching,
            rate_limit,
            model_info,
            pass_through: p.pass_through,
            health_check,
            endpoints: match kind {
                ProviderKind::Simulated => Vec::new(),
                _ => endpoints,
            },
            balance: p.balance,
        }))
    }

    /// Each model's `capabilities`, `context_window` and `price`, for those that give any.
    fn model_info(
        &mut self,
        at: &str,
        raw: &[RawModel],
    ) -> Result<BTreeMap<String, ModelInfo>, ConfigError> {
        let mut out = BTreeMap::new();
        for (j, m) in raw.iter().enumerate() {
            let RawModel::Entry(e) = m else { continue };
            let capabilities = match &e.capabilities {
                None => None,
                Some(list) => {
                    let mut caps = Capabilities::default();
                    for name in list {
                        match Capability::parse(name) {
                            Some(c) => caps = caps.with(c),
                            None => self.warn(format!(
                                "{at}.models[{j}].capabilities: {name:?} is not used by this router (it routes by text, tools, json, streaming, vision)"
                            )),
                        }
                    }
                    Some(caps)
                }
            };
            let context_window = match e.context_window {
                None => None,
                Some(w) => Some(u32::try_from(w).ok().filter(|w| *w > 0).ok_or_else(|| {
                    self.err(
                        format!("{at}.models[{j}].context_window"),
                        format!("{w} is out of range"),
                        "give the model's window in tokens, 1 to 4294967295",
                    )
                })?),
            };
            let price = self.price(&format!("{at}.models[{j}]"), e)?;
            if capabilities.is_some() || context_window.is_some() || price.is_some() {
                out.insert(
                    e.name.clone(),
                    ModelInfo {
                        capabilities,
                        context_window,
                        price,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Model names, the default first (the first entry when none is marked).
    fn models(&self, at: &str, raw: &[RawModel]) -> Result<Vec<String>, ConfigError> {
        let mut models: Vec<String> = Vec::new();
        let mut has_default = false;
        for m in raw {
            let name = m.name();
            if name.trim().is_empty() {
                return Err(self.err(
                    format!("{at}.models"),
                    "a model has an empty name",
                    "give every model a name",
                ));
            }
            if matches!(m, RawModel::Entry(e) if e.default) && !has_default {
                has_default = true;
                models.insert(0, name.to_string());
            } else {
                models.push(name.to_string());
            }
        }
        Ok(models)
    }

    fn batching(&self, at: &str, b: &RawBatching) -> Result<BatchingConfig, ConfigError> {
        let max_batch_size = b.max_batch_size.unwrap_or(match b.mode {
            BatchMode::Fixed => 32,
            BatchMode::Adaptive => 256,
        });
        if !(1..=4096).contains(&max_batch_size) {
            return Err(self.err(
                format!("{at}.max_batch_size"),
                format!("{max_batch_size} is out of range"),
                "use 1 to 4096 prompts per upstream request",
            ));
        }
        if !(1..=1_000_000).contains(&b.max_queue) {
            return Err(self.err(
                format!("{at}.max_queue"),
                format!("{} is out of range", b.max_queue),
                "use 1 to 1000000 waiting items",
            ));
        }
        let max_wait = self.seconds(&format!("{at}.max_wait_ms"), b.max_wait_ms / 1000.0, true)?;
        if max_wait > Duration::from_secs(10) {
            return Err(self.err(
                format!("{at}.max_wait_ms"),
                format!("{} ms is over 10 s", b.max_wait_ms),
                "use a window of a few milliseconds, e.g. 5",
            ));
        }
        Ok(BatchingConfig {
            mode: b.mode,
            max_batch_size,
            max_wait,
            max_queue: b.max_queue,
        })
    }

    /// The PEM file's bytes, once it is known to hold at least one certificate.
    fn ca_file(&self, key: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
        let pem = super::read_named_file(path).map_err(|e| {
            self.err(
                key,
                format!("cannot read {path:?}: {e}"),
                "name a readable PEM file of CA certificates",
            )
        })?;
        match reqwest::Certificate::from_pem_bundle(&pem) {
            Ok(certs) if !certs.is_empty() => Ok(pem),
            _ => Err(self.err(
                key,
                format!("{path:?} holds no PEM certificate"),
                "name a PEM file with one or more -----BEGIN CERTIFICATE----- blocks",
            )),
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_debug_is_redacted() {
        let k = ApiKey::new("sk-secret".into());
        assert!(!format!("{k:?}").contains("sk-secret"));
    }

    #[test]
    fn an_anthropic_url_may_end_in_v1_as_openai_ones_do() {
        for url in [
            "https://api.anthropic.com",
            "https://api.anthropic.com/",
            "https://api.anthropic.com/v1",
            "https://api.anthropic.com/v1/",
        ] {
            let yaml = format!(
                "providers:\n  - {{name: a, type: anthropic, api_key: k, base_url: \"{url}\", models: [m]}}\n"
            );
            let c = crate::config::parse(&yaml, "t", &|_| None).unwrap();
            let Api::Anthropic { base } = c.providers[0].api.clone() else {
                panic!("not the Anthropic API: {:?}", c.providers[0].api);
            };
            assert_eq!(
                crate::provider::http::join(&base, "/v1/messages").as_str(),
                "https://api.anthropic.com/v1/messages",
                "{url}"
            );
        }
    }
}
