//! The effective configuration as `GET /api/config` shows it: every setting after defaults,
//! secrets never — an API key, a client key's hash, a TLS key and a Redis password are shown
//! only as set or not. Each struct is taken apart without `..`, so a field added later does
//! not compile here until it is given its place (or its redaction).

use serde_json::{Value, json};

use super::{
    Api, AuthConfig, BatchingConfig, BreakerConfig, CacheConfig, CascadePolicy, ClientKey, Config,
    FleetConfig, HealthCheckConfig, HttpConfig, Limits, ModelInfo, OnStoreError, ProviderConfig,
    QuotaConfig, RateLimitConfig, RedisConfig, RetryBudget, ServerConfig, SpendConfig,
};

const REDACTED: &str = "<redacted>";

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

impl Config {
    /// The effective configuration, secrets redacted.
    pub fn view(&self) -> Value {
        let Config {
            server,
            cascade,
            providers,
            chains,
            assignments,
            models,
            cache,
            fleet,
            spend,
            warnings,
        } = self;
        json!({
            "server": server_view(server),
            "cascade": cascade_view(cascade),
            "providers": providers.iter().map(provider_view).collect::<Vec<_>>(),
            "fallback_chains": chains,
            "agent_model_assignments": assignments,
            "models": models,
            "cache": cache.as_ref().map(cache_view),
            "fleet": fleet.as_ref().map(|FleetConfig { routers, redis }| json!({
                "routers": routers,
                "redis": redis_view(redis),
            })),
            "cost_tracking": spend_view(spend),
            "warnings": warnings,
        })
    }
}

fn spend_view(s: &SpendConfig) -> Value {
    let SpendConfig {
        router_daily,
        provider_daily,
        client_daily,
        clients: _, // the client keys' names, shown under server.auth
        alert_percent,
        on_store_error,
        reserve_output_tokens,
    } = s;
    let usd = |n: &u64| *n as f64 / 1e9;
    json!({
        "budget_daily_usd": router_daily.as_ref().map(usd),
        "provider_budgets_daily_usd": provider_daily.iter().map(|(k, v)| (k.clone(), json!(usd(v)))).collect::<serde_json::Map<_, _>>(),
        "client_budgets_daily_usd": client_daily.iter().map(|(k, v)| (k.clone(), json!(usd(v)))).collect::<serde_json::Map<_, _>>(),
        "alert_threshold_percent": alert_percent,
        "on_store_error": match on_store_error {
            OnStoreError::EnforceLocal => "enforce_local",
            OnStoreError::Refuse => "refuse",
        },
        "reserve_output_tokens": reserve_output_tokens,
    })
}

fn server_view(s: &ServerConfig) -> Value {
    let ServerConfig {
        listen,
        request_timeout,
        max_batch_items,
        metrics_listen,
        http_listen,
        shutdown_grace,
        limits,
        quotas,
        auth,
        allow_unauthenticated,
        tls,
        log_prompts,
    } = s;
    json!({
        "listen": listen.to_string(),
        "request_timeout_seconds": secs(*request_timeout),
        "max_batch_items": max_batch_items,
        "metrics_listen": metrics_listen.map(|a| a.to_string()),
        "http_listen": http_listen.map(|a| a.to_string()),
        "shutdown_grace_seconds": secs(*shutdown_grace),
        "limits": limits_view(limits),
        "quotas": quotas.map(|QuotaConfig { requests_per_minute, burst }| json!({
            "requests_per_minute": requests_per_minute.get(), "burst": burst.get(),
        })),
        "auth": auth.as_ref().map(auth_view),
        "allow_unauthenticated": allow_unauthenticated,
        "tls": tls.as_ref().map(|_| json!({"cert": "set", "key": REDACTED})),
        "log_prompts": log_prompts,
    })
}

fn limits_view(l: &Limits) -> Value {
    let Limits {
        max_in_flight,
        max_concurrent_streams,
        max_connection_age,
        max_prompt_bytes,
        max_messages,
        max_tokens,
        max_message_bytes,
        max_image_bytes,
        max_images,
        max_connections,
        max_connections_per_peer,
        header_read_timeout,
        handshake_timeout,
        idle_timeout,
        body_read_timeout,
    } = l;
    json!({
        "max_in_flight": max_in_flight,
        "max_concurrent_streams": max_concurrent_streams,
        "max_connection_age_seconds": secs(*max_connection_age),
        "max_prompt_bytes": max_prompt_bytes,
        "max_messages": max_messages,
        "max_tokens": max_tokens,
        "max_message_bytes": max_message_bytes,
        "max_image_bytes": max_image_bytes,
        "max_images": max_images,
        "max_connections": max_connections,
        "max_connections_per_peer": max_connections_per_peer,
        "header_read_timeout_seconds": secs(*header_read_timeout),
        "handshake_timeout_seconds": secs(*handshake_timeout),
        "idle_timeout_seconds": secs(*idle_timeout),
        "body_read_timeout_seconds": secs(*body_read_timeout),
    })
}

fn auth_view(a: &AuthConfig) -> Value {
    let AuthConfig { keys } = a;
    let keys: Vec<Value> = keys
        .iter()
        .map(
            |ClientKey {
                 name,
                 hash: _,
                 models,
                 admin,
             }| {
                json!({"name": name, "key": REDACTED, "models": models, "admin": admin})
            },
        )
        .collect();
    json!({ "keys": keys })
}

fn cascade_view(c: &CascadePolicy) -> Value {
    let CascadePolicy {
        attempt_timeout,
        max_retries_per_provider,
        retry_delay,
        breaker,
        retry_budget,
    } = c;
    let BreakerConfig {
        failure_threshold,
        recovery_timeout,
        half_open_max_calls,
    } = breaker;
    let RetryBudget {
        ratio,
        min_per_second,
        ttl,
    } = retry_budget;
    json!({
        "timeout_seconds": secs(*attempt_timeout),
        "max_retries_per_provider": max_retries_per_provider,
        "retry_delay_seconds": secs(*retry_delay),
        "circuit_breaker": {
            "failure_threshold": failure_threshold,
            "recovery_timeout_seconds": secs(*recovery_timeout),
            "half_open_max_calls": half_open_max_calls,
        },
        "retry_budget": {"ratio": ratio, "min_per_second": min_per_second, "ttl_seconds": secs(*ttl)},
    })
}

fn provider_view(p: &ProviderConfig) -> Value {
    let ProviderConfig {
        name,
        kind,
        priority,
        api,
        api_key,
        models,
        timeout,
        first_token_timeout,
        max_concurrency,
        max_waiting,
        http,
        batching,
        model_batching,
        rate_limit,
        model_info,
        pass_through,
        health_check,
        endpoints,
        balance,
    } = p;
    let stream_unary = match api {
        Api::OpenAi { stream_unary, .. } => Some(*stream_unary),
        _ => None,
    };
    let (url, latency) = match api {
        Api::OpenAi { base, .. } | Api::Ollama { base } | Api::Anthropic { base } => {
            let mut shown = base.clone();
            if shown.password().is_some() {
                let _ = shown.set_password(Some(REDACTED));
            }
            (Some(shown.to_string()), None)
        }
        Api::Simulated { latency } => (None, Some(secs(*latency))),
    };
    let HttpConfig {
        pool_idle_timeout,
        pool_max_idle_per_host,
        connect_timeout,
        http2_prior_knowledge,
        ca_pem,
    } = http;
    let info: serde_json::Map<String, Value> = model_info
        .iter()
        .map(
            |(
                m,
                ModelInfo {
                    capabilities,
                    context_window,
                    price,
                },
            )| {
                let caps: Option<Vec<&str>> =
                    capabilities.map(|c| c.iter().map(super::Capability::as_str).collect());
                let price = price.map(|p| {
                    let (input, output) = p.per_million();
                    json!({"input_per_million": input, "output_per_million": output})
                });
                (
                    m.clone(),
                    json!({"capabilities": caps, "context_window": context_window, "price": price}),
                )
            },
        )
        .collect();
    json!({
        "name": name,
        "type": kind.as_str(),
        "priority": priority,
        "url": url,
        "simulated_latency_seconds": latency,
        "stream_unary": stream_unary,
        "api_key": api_key.as_ref().map(|_| REDACTED),
        "models": models,
        "timeout_seconds": secs(*timeout),
        "first_token_timeout_seconds": secs(*first_token_timeout),
        "max_concurrency": max_concurrency,
        "max_waiting": max_waiting,
        "http": {
            "pool_idle_timeout_seconds": secs(*pool_idle_timeout),
            "pool_max_idle_per_host": pool_max_idle_per_host,
            "connect_timeout_seconds": secs(*connect_timeout),
            "http2_prior_knowledge": http2_prior_knowledge,
            "ca": ca_pem.as_ref().map(|_| "set"),
        },
        "batching": batching.as_ref().map(batching_view),
        "model_batching": model_batching.iter().map(|(m, b)| (m.clone(), batching_view(b))).collect::<serde_json::Map<_, _>>(),
        "rate_limit": rate_limit.as_ref().map(|RateLimitConfig { requests_per_minute, tokens_per_minute, burst }| json!({
            "requests_per_minute": requests_per_minute.map(|n| n.get()),
            "tokens_per_minute": tokens_per_minute.map(|n| n.get()),
            "burst": burst.get(),
        })),
        "model_info": info,
        "pass_through": pass_through,
        "endpoints": endpoints.iter().map(|u| {
            let mut shown = u.clone();
            if shown.password().is_some() {
                let _ = shown.set_password(Some(REDACTED));
            }
            shown.to_string()
        }).collect::<Vec<_>>(),
        "balance": format!("{balance:?}"),
        "health_check": health_check.as_ref().map(|HealthCheckConfig { interval, timeout, unhealthy_after, healthy_after, path }| json!({
            "interval_seconds": secs(*interval),
            "timeout_ms": timeout.as_secs_f64() * 1e3,
            "unhealthy_after": unhealthy_after,
            "healthy_after": healthy_after,
            "path": path,
        })),
    })
}

fn batching_view(b: &BatchingConfig) -> Value {
    let BatchingConfig {
        mode,
        max_batch_size,
        max_wait,
        max_queue,
    } = b;
    json!({
        "mode": format!("{mode:?}").to_lowercase(),
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait.as_secs_f64() * 1e3,
        "max_queue": max_queue,
    })
}

fn cache_view(c: &CacheConfig) -> Value {
    let CacheConfig {
        ttl,
        max_bytes,
        scope,
        redis,
        max_redis_value_bytes,
    } = c;
    json!({
        "ttl_seconds": secs(*ttl),
        "max_bytes": max_bytes,
        "scope": format!("{scope:?}").to_lowercase(),
        "redis": redis.as_ref().map(|r| {
            let mut v = redis_view(r);
            v["max_value_bytes"] = json!(max_redis_value_bytes);
            v
        }),
    })
}

fn redis_view(r: &RedisConfig) -> Value {
    let RedisConfig { url: _, timeout } = r;
    json!({
        "url": r.url_without_password(),
        "timeout_seconds": secs(*timeout),
    })
}
