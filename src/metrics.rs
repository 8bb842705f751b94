//! Prometheus metrics: one registry per router (not a process-global one, so several routers
//! in one process — tests, embedders — keep their own), rendered in the text format on
//! `server.metrics_listen` at `/metrics`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: String,
}

impl ProviderLabel {
    pub fn of(name: &str) -> ProviderLabel {
        ProviderLabel {
            provider: name.to_string(),
        }
    }
}

type HistogramFamily = Family<ProviderLabel, Histogram, fn() -> Histogram>;

/// A call at the edge: its method and the gRPC code it ended with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub method: &'static str,
    pub code: String,
}

/// A failed upstream request: the provider and how it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub provider: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

/// Completion-cache counters.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub coalesced: Counter,
    pub evictions: Counter,
    pub bytes: Gauge,
    pub redis_errors: Counter,
    /// Redis operations not tried: Redis was being skipped, or too many writes were pending.
    pub redis_skipped: Counter,
    /// Times Redis started being skipped.
    pub redis_trips: Counter,
    /// 1 while Redis is used, 0 while it is skipped.
    pub redis_up: Gauge,
}

pub struct Metrics {
    registry: Registry,
    pub cache: CacheMetrics,
    /// Upstream HTTP requests and the prompts they carried, per provider.
    pub upstream_requests: Family<ProviderLabel, Counter>,
    pub upstream_items: Family<ProviderLabel, Counter>,
    pub batch_size: HistogramFamily,
    pub queue_wait_seconds: HistogramFamily,
    /// Calls answered, by method and gRPC code (`cascade_requests_total`).
    pub calls: Family<CallLabel, Counter>,
    /// Time from a call's arrival to its answer, by method.
    pub call_seconds: Family<MethodLabel, Histogram, fn() -> Histogram>,
    /// Upstream requests that failed, by provider and failure kind.
    pub upstream_failures: Family<FailureLabel, Counter>,
    /// Each provider's circuit: 0 closed, 1 half-open, 2 open (set when scraped).
    pub circuit: Family<ProviderLabel, Gauge>,
    /// Each provider's concurrency limit now (set when scraped).
    pub concurrency_limit: Family<ProviderLabel, Gauge>,
    /// Calls running now (set when scraped) and calls shed by `limits.max_in_flight`.
    pub in_flight: Gauge,
    pub shed: Counter,
    /// Client connections closed at once for being over `limits.max_connections[_per_peer]`.
    pub connections_refused: Counter,
    /// Calls refused for a missing or unknown client key (before any handler runs).
    pub unauthenticated: Counter,
    /// Each upstream request's time from send to outcome, per provider.
    pub upstream_seconds: HistogramFamily,
    /// Time a request waited for the provider's `rate_limit` before it could be sent.
    pub rate_wait_seconds: HistogramFamily,
    /// Requests the provider's `rate_limit` held back past their time (they moved on).
    pub rate_limited: Family<ProviderLabel, Counter>,
    /// The router's own share of an answered, uncached call: its duration less the time
    /// in a batch queue and at the provider.
    pub overhead_seconds: Histogram,
}

fn batch_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

fn wait_buckets() -> Histogram {
    // 50 µs .. ~1.6 s, then +Inf
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cascade");
        let cache = CacheMetrics::default();
        let c = registry.sub_registry_with_prefix("cache");
        c.register(
            "hits",
            "Completions answered from the cache",
            cache.hits.clone(),
        );
        c.register(
            "misses",
            "Cacheable requests not in the cache",
            cache.misses.clone(),
        );
        c.register(
            "coalesced",
            "Requests that shared an identical in-flight call",
            cache.coalesced.clone(),
        );
        c.register(
            "evictions",
            "Entries evicted to stay within max_bytes",
            cache.evictions.clone(),
        );
        c.register(
            "bytes",
            "Bytes held by the in-memory cache",
            cache.bytes.clone(),
        );
        c.register(
            "redis_errors",
            "Redis operations that failed or timed out",
            cache.redis_errors.clone(),
        );
        c.register(
            "redis_skipped",
            "Redis operations not tried: Redis was being skipped, or too many writes were pending",
            cache.redis_skipped.clone(),
        );
        c.register(
            "redis_trips",
            "Times Redis failed often enough to be skipped until a probe finds it back",
            cache.redis_trips.clone(),
        );
        c.register(
            "redis_up",
            "1 while Redis is used, 0 while it is skipped",
            cache.redis_up.clone(),
        );
        let upstream_requests = Family::default();
        let upstream_items = Family::default();
        let batch_size: HistogramFamily = Family::new_with_constructor(batch_buckets);
        let queue_wait_seconds: HistogramFamily = Family::new_with_constructor(wait_buckets);
        let u = registry.sub_registry_with_prefix("upstream");
        u.register(
            "requests",
            "Upstream HTTP requests sent",
            upstream_requests.clone(),
        );
        u.register(
            "items",
            "Prompts carried by upstream requests",
            upstream_items.clone(),
        );
        let b = registry.sub_registry_with_prefix("batch");
        b.register("size", "Prompts per upstream request", batch_size.clone());
        b.register(
            "queue_wait_seconds",
            "Time a prompt waited in its batch queue",
            queue_wait_seconds.clone(),
        );
        let calls = Family::default();
        let call_seconds: Family<MethodLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(wait_buckets);
        let upstream_failures = Family::default();
        let circuit = Family::default();
        let concurrency_limit = Family::default();
        let in_flight = Gauge::default();
        let shed = Counter::default();
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections closed at once: over limits.max_connections or max_connections_per_peer",
            connections_refused.clone(),
        );
        let unauthenticated = Counter::default();
        let upstream_seconds: HistogramFamily = Family::new_with_constructor(wait_buckets);
        let rate_wait_seconds: HistogramFamily = Family::new_with_constructor(wait_buckets);
        let rate_limited = Family::default();
        let overhead_seconds = wait_buckets();
        registry.register(
            "unauthenticated",
            "Calls refused for a missing or unknown client key",
            unauthenticated.clone(),
        );
        registry.register(
            "router_overhead_seconds",
            "An answered uncached call's time less its batch-queue wait and upstream time",
            overhead_seconds.clone(),
        );
        registry.register(
            "requests",
            "Calls answered, by method and gRPC code",
            calls.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a call's arrival to its answer",
            call_seconds.clone(),
        );
        registry.register("in_flight", "Calls running now", in_flight.clone());
        registry.register(
            "shed",
            "Calls refused at once by limits.max_in_flight",
            shed.clone(),
        );
        let u = registry.sub_registry_with_prefix("upstream");
        u.register(
            "failures",
            "Upstream requests that failed, by kind",
            upstream_failures.clone(),
        );
        u.register(
            "circuit_state",
            "Circuit per provider: 0 closed, 1 half-open, 2 open",
            circuit.clone(),
        );
        u.register(
            "concurrency_limit",
            "Requests a provider is sent at once at most now (learned with adaptive batching)",
            concurrency_limit.clone(),
        );
        u.register(
            "request_duration_seconds",
            "Upstream HTTP requests' time from send to outcome",
            upstream_seconds.clone(),
        );
        u.register(
            "rate_limit_wait_seconds",
            "Time a request waited for its provider's rate_limit",
            rate_wait_seconds.clone(),
        );
        u.register(
            "rate_limited",
            "Requests the provider's rate_limit held back past their time",
            rate_limited.clone(),
        );
        Metrics {
            registry,
            cache,
            upstream_requests,
            upstream_items,
            batch_size,
            queue_wait_seconds,
            calls,
            call_seconds,
            upstream_failures,
            circuit,
            concurrency_limit,
            in_flight,
            shed,
            connections_refused,
            unauthenticated,
            upstream_seconds,
            rate_wait_seconds,
            rate_limited,
            overhead_seconds,
        }
    }

    pub fn observe_batch(
        &self,
        provider: &ProviderLabel,
        size: usize,
        waits: impl Iterator<Item = Duration>,
    ) {
        self.batch_size.get_or_create(provider).observe(size as f64);
        let h = self.queue_wait_seconds.get_or_create(provider);
        for w in waits {
            h.observe(w.as_secs_f64());
        }
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener`, each scrape rendered by `render`, until the task is
/// dropped.
pub async fn serve(render: Arc<dyn Fn() -> String + Send + Sync>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        (StatusCode::OK, render())
                    } else {
                        (StatusCode::NOT_FOUND, "see /metrics\n".to_string())
                    };
                    let mut r = Response::new(Full::new(bytes::Bytes::from(body)));
                    *r.status_mut() = status;
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
