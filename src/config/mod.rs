//! The cascade file: [`raw`] serde structs → validation, one module per concern → the runtime
//! [`Config`].
//!
//! Every error names the file, the key and the fix on one line, so a bad file fails at start
//! with a message the user can act on. Everything merely odd (sections this router does not
//! use, a provider whose key variable is unset) becomes a warning in [`Config::warnings`].
//!
//! - [`raw`]: the file as written, with defaults; the known keys are the types' fields.
//! - `cascade`, `providers`, `chains`, `server` (with `auth`), `cache`: validation of each section.
//! - `env`: `${VAR}` and `${VAR:-default}` expansion.

mod auth;
mod cache;
mod capabilities;
mod cascade;
mod chains;
mod endpoints;
mod env;
mod fleet;
mod health;
mod price;
mod providers;
mod rate;
mod raw;
mod server;
mod spend;
mod view;

use std::{collections::BTreeMap, collections::BTreeSet, path::Path, time::Duration};

use yaml_serde::Value;

pub use auth::{AuthConfig, ClientKey, KeyHash, open_to_network};
pub use cache::{CacheConfig, CacheScope, RedisConfig};
pub use capabilities::{Capabilities, Capability, ModelInfo};
pub use cascade::{BreakerConfig, CascadePolicy, RetryBudget};
pub use endpoints::Balance;
pub use fleet::FleetConfig;
pub use health::HealthCheckConfig;
pub use price::Price;
pub use providers::{
    Api, ApiKey, BatchMode, BatchingConfig, HttpConfig, ProviderConfig, ProviderKind,
};
pub use rate::RateLimitConfig;
pub use server::{Limits, QuotaConfig, ServerConfig, TlsFiles};
pub use spend::{OnStoreError, SpendConfig};

use raw::RawFile;

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
    /// `None` when no Redis is named: limits are this router's alone.
    pub fleet: Option<FleetConfig>,
    /// Budgets (`cost_tracking`, `budget:` on providers and client keys).
    pub spend: SpendConfig,
    /// Things worth telling the operator once at start.
    pub warnings: Vec<String>,
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

/// Top-level sections of the Python cascade router's file that this router reads no further.
const KNOWN_IGNORED: &[&str] = &[
    "custom_models",
    "multimodal",
    "metrics",
    "logging",
    "routing",
    "monitoring",
    "version",
];

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

/// The most a file the cascade file names (a PEM certificate, key or CA bundle) may hold.
const MAX_NAMED_FILE: u64 = 1 << 20;

/// Reads a file the cascade file names: a regular file of at most [`MAX_NAMED_FILE`] bytes,
/// so a path such as `/dev/zero` or a FIFO fails at load instead of hanging it (found by the
/// `cascade_file` fuzz target).
fn read_named_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    // Looked at before opening: opening a FIFO blocks until a writer appears.
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > MAX_NAMED_FILE {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} bytes, over the {MAX_NAMED_FILE}-byte limit", meta.len()),
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_NAMED_FILE)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
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
    let mut check = Check {
        origin,
        env,
        warnings: Vec::new(),
        unset: Vec::new(),
    };
    let doc: Value = yaml_serde::from_str(text).map_err(|e| {
        let key = e
            .location()
            .map(|l| format!("line {} column {}", l.line(), l.column()))
            .unwrap_or_else(|| "(document)".into());
        check.err(
            key,
            first_line(&e.to_string()),
            "correct the YAML at that position",
        )
    })?;
    let raw = check.sections(doc)?;
    check.validate(raw)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// The file being validated: where errors point, how `${VAR}` resolves, what to warn about.
struct Check<'a> {
    origin: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    warnings: Vec<String>,
    /// Variables whose absence disabled a provider, named if none is left.
    unset: Vec<String>,
}

impl Check<'_> {
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

    fn warn(&mut self, message: impl std::fmt::Display) {
        self.warnings.push(format!("{}: {message}", self.origin));
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

    /// Deserialises the file's sections. A top-level key that is not ours is set aside with
    /// a warning — the Python router's sections by name — unless it is a near miss of one of
    /// ours (`sever:`), which would silently change behaviour and so is an error. Anywhere
    /// else an unknown key is an error.
    fn sections(&mut self, doc: Value) -> Result<RawFile, ConfigError> {
        let mut map = match doc {
            Value::Null => yaml_serde::Mapping::new(),
            Value::Mapping(m) => m,
            _ => {
                return Err(self.err(
                    "(document)",
                    "not a mapping of sections",
                    "write the file as `providers:`, `fallback_chains:`, ... sections",
                ));
            }
        };
        let (mut ignored, mut unknown) = (Vec::new(), Vec::new());
        let raw = loop {
            match serde_path_to_error::deserialize::<_, RawFile>(Value::Mapping(map.clone())) {
                Ok(raw) => break raw,
                Err(e) => {
                    let path = e.path().to_string();
                    let message = e.inner().to_string();
                    match unknown_key(&message) {
                        Some((key, known)) if key == path => {
                            if KNOWN_IGNORED.contains(&key) {
                                ignored.push(key.to_string());
                            } else if let Some(near) = nearest(key, &known) {
                                return Err(self.err(
                                    key,
                                    "unknown key",
                                    format!("did you mean `{near}`?"),
                                ));
                            } else {
                                unknown.push(key.to_string());
                            }
                            // A key serde names differently from the map's own (a tagged or
                            // non-string key) would be found again and again: refuse it.
                            if map.remove(key).is_none() {
                                return Err(self.serde_error(&path, &message));
                            }
                        }
                        _ => return Err(self.serde_error(&path, &message)),
                    }
                }
            }
        };
        ignored.sort();
        unknown.sort();
        if !unknown.is_empty() {
            self.warn(format!(
                "top level: ignoring keys this router does not use: {}",
                unknown.join(", ")
            ));
        }
        if !ignored.is_empty() {
            self.warn(format!(
                "sections not used by this router: {}",
                ignored.join(", ")
            ));
        }
        Ok(raw)
    }

    /// One line from a serde error at `path`: an unknown key with "did you mean", a value
    /// outside an enum with the values it may take, a wrong type with the type wanted.
    fn serde_error(&self, path: &str, message: &str) -> ConfigError {
        let key = if path == "." { "(document)" } else { path };
        if let Some((unknown, known)) = unknown_key(message) {
            let fix = match nearest(unknown, &known) {
                Some(near) => format!("did you mean `{near}`?"),
                None if known.is_empty() => "remove it".to_string(),
                None => format!("remove it; the keys here are {}", known.join(", ")),
            };
            return self.err(key, "unknown key", fix);
        }
        if let Some((problem, fix)) = message.split_once(" (fix: ") {
            return self.err(key, problem, fix.trim_end_matches(')'));
        }
        match message.split_once(", expected ") {
            Some((problem, wanted)) => self.err(key, problem, format!("use {wanted}")),
            None => self.err(key, message, "correct the value at this key"),
        }
    }

    fn validate(mut self, raw: RawFile) -> Result<Config, ConfigError> {
        let spend = self.spend(&raw)?;
        let cascade = self.cascade(raw.cascade)?;
        let server = self.server(raw.server, raw.limits)?;
        let cache = match raw.cache {
            None => None,
            Some(c) => self.cache(c)?,
        };
        let all_models: BTreeSet<String> = raw
            .providers
            .iter()
            .flat_map(|p| p.models.iter().map(|m| m.name().to_string()))
            .collect();
        let fleet = self.fleet(raw.fleet, cache.as_ref().and_then(|c| c.redis.as_ref()))?;
        let providers = self.providers(raw.providers, &cascade)?;
        self.chains(&raw.fallback_chains, &all_models)?;
        self.assignments(
            &raw.agent_model_assignments,
            &all_models,
            &raw.fallback_chains,
        )?;
        self.key_models(server.auth.as_ref(), &all_models, &raw.fallback_chains)?;
        Ok(Config {
            server,
            cascade,
            providers,
            chains: raw.fallback_chains,
            assignments: raw.agent_model_assignments,
            models: all_models,
            cache,
            fleet,
            spend,
            warnings: self.warnings,
        })
    }
}

/// Serde's "unknown field `x`, expected one of `a`, `b`" (the list comes from the type's
/// fields): the unknown key and the keys it could have been.
fn unknown_key(message: &str) -> Option<(&str, Vec<&str>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, rest) = rest.split_once('`')?;
    let known = rest.split('`').skip(1).step_by(2).collect();
    Some((key, known))
}

/// The known key `key` is most likely a typo of, if any is close: a few letters off, or the
/// key without its unit (`timeout` for `timeout_seconds`).
fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let limit = (key.len() / 4).max(2);
    known
        .iter()
        .map(|k| (strsim::levenshtein(k, key), *k))
        .filter(|(d, k)| *d <= limit || (key.len() >= 4 && k.starts_with(key)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn error(yaml: &str) -> String {
        parse(yaml, "f.yaml", &no_env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_zero_limit_is_refused_by_name() {
        for key in [
            "max_prompt_bytes",
            "max_messages",
            "max_tokens",
            "max_message_bytes",
        ] {
            let e = error(&format!(
                "limits: {{{key}: 0}}\nproviders:\n  - {{name: s, type: simulated, models: [m]}}\n"
            ));
            assert!(
                e.starts_with(&format!("f.yaml: limits.{key}: must be at least")),
                "{e}"
            );
        }
    }

    #[test]
    fn default_yaml_is_valid() {
        let c = parse(DEFAULT_YAML, "default", &no_env).map_err(|e| e.to_string());
        assert_eq!(c.map(|c| c.providers[0].kind), Ok(ProviderKind::Simulated));
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
        let e = error(
            "sever: {listen: 127.0.0.1:1}\nproviders:\n - {name: a, type: simulated, models: [m]}\n",
        );
        assert!(e.starts_with("f.yaml: sever: unknown key"), "{e}");
        assert!(e.contains("did you mean `server`"), "{e}");
    }

    #[test]
    fn unknown_keys_in_our_sections_are_errors_with_the_nearest_key() {
        let e = error("providers:\n - {name: a, type: simulated, models: [m], batchng: {}}\n");
        assert!(
            e.starts_with("f.yaml: providers[0].batchng: unknown key"),
            "{e}"
        );
        assert!(e.contains("did you mean `batching`?"), "{e}");
        let e = error(
            "providers:\n - {name: a, type: simulated, models: [{name: m, defualt: true}]}\n",
        );
        assert!(
            e.starts_with("f.yaml: providers[0].models[0].defualt: unknown key"),
            "{e}"
        );
        assert!(e.contains("did you mean `default`?"), "{e}");
        let e = error(
            "cache: {scope: tenant, ttl: 5}\nproviders:\n - {name: a, type: simulated, models: [m]}\n",
        );
        assert!(e.starts_with("f.yaml: cache.ttl: unknown key"), "{e}");
        assert!(e.contains("the keys here are enabled, backend"), "{e}");
    }

    #[test]
    fn enums_and_types_name_what_is_wanted() {
        let e = error(
            "cache: {scope: everyone}\nproviders:\n - {name: a, type: simulated, models: [m]}\n",
        );
        assert!(
            e.starts_with("f.yaml: cache.scope: unknown variant `everyone`"),
            "{e}"
        );
        assert!(e.contains("(fix: use `tenant` or `shared`)"), "{e}");
        let e = error(
            "providers:\n - {name: a, type: Simulated, models: [m], max_concurrency: lots}\n",
        );
        assert!(
            e.starts_with("f.yaml: providers[0].max_concurrency: invalid type"),
            "{e}"
        );
        let c = parse(
            "providers:\n - {name: a, type: OpenAI, base_url: \"http://127.0.0.1:1/v1\", models: [m]}\n",
            "t",
            &no_env,
        )
        .map_err(|e| e.to_string());
        assert_eq!(
            c.map(|c| c.providers[0].kind),
            Ok(ProviderKind::OpenAi),
            "type ignores case"
        );
    }

    #[test]
    fn keys_with_a_trailing_newline_are_refused_and_unset_ones_named() {
        let env = |n: &str| (n == "KEY").then(|| "sk-secret-key\n".to_string());
        let y = "providers:\n - {name: a, type: openai, api_key: \"${KEY}\", models: [m]}\n";
        let e = parse(y, "f.yaml", &env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("f.yaml: providers[0].api_key: ${KEY} has spaces or a newline"),
            "{e}"
        );
        assert!(
            !e.contains("sk-secret"),
            "the key itself is never shown: {e}"
        );
        let y = "providers:\n - {name: a, type: openai, api_key: \"${NOPE}\", models: [m]}\n";
        let e = error(y);
        assert!(
            e.contains("no usable provider") && e.contains("unset: ${NOPE}"),
            "{e}"
        );
    }

    #[test]
    fn serde_unknown_field_message_is_read() {
        assert_eq!(
            unknown_key("unknown field `ttl`, expected one of `enabled`, `backend`"),
            Some(("ttl", vec!["enabled", "backend"]))
        );
        assert_eq!(
            unknown_key("unknown field `x`, expected `latency_ms`"),
            Some(("x", vec!["latency_ms"]))
        );
        assert_eq!(
            unknown_key("unknown field `x`, there are no fields"),
            Some(("x", vec![]))
        );
        assert_eq!(unknown_key("invalid type: string"), None);
    }
}

#[cfg(test)]
mod properties {
    //! Whatever a cascade file holds, loading it never panics, and a refusal is one line.
    use proptest::prelude::*;

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Provider entries made of keys we know, keys we do not, and values of every type.
    fn entry() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("name"),
            Just("type"),
            Just("models"),
            Just("batching"),
            Just("url"),
            Just("base_url"),
            Just("api_key"),
            Just("priority"),
            Just("timeout_seconds"),
            Just("max_concurrency"),
            Just("rate_limit"),
            Just("http"),
            Just("batchng"),
            Just("enabled"),
            Just("max_waiting"),
            Just("description"),
        ];
        let value = prop_oneof![
            Just("simulated".to_string()),
            Just("openai".to_string()),
            Just("[m]".to_string()),
            Just("{max_batch_size: 0}".to_string()),
            Just("-1".to_string()),
            Just("1e300".to_string()),
            Just("\"http://127.0.0.1:1/v1\"".to_string()),
            Just("{}".to_string()),
            Just("null".to_string()),
            Just("[{name: m, default: true, batching: {max_wait_ms: 99999}}]".to_string()),
            Just("{requests_per_minute: 0}".to_string()),
            Just("\"${UNSET}\"".to_string()),
            "[a-z]{0,8}".prop_map(String::from),
        ];
        proptest::collection::vec((key, value), 0..8).prop_map(|kv| {
            let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("  - {{{}}}\n", fields.join(", "))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_text_loads_or_fails_in_one_line(text in "\\PC{0,200}") {
            if let Err(e) = parse(&text, "f.yaml", &no_env) {
                prop_assert!(!e.to_string().contains('\n'), "{}", e);
            }
        }

        #[test]
        fn any_provider_entries_load_or_fail_in_one_line(entries in proptest::collection::vec(entry(), 0..4)) {
            let text = format!("providers:\n{}", entries.concat());
            if let Err(e) = parse(&text, "f.yaml", &no_env) {
                prop_assert!(!e.to_string().contains('\n'), "{}", e);
                prop_assert!(e.to_string().starts_with("f.yaml: "), "{}", e);
            }
        }
    }
}
