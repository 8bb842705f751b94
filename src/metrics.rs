//! Prometheus metrics: one registry per router (not a process-global one, so several routers
//! in one process — tests, embedders — keep their own), rendered in the text format on
//! `server.metrics_listen` at `/metrics`.

mod calls;
mod spend;

use std::{convert::Infallible, sync::Arc, time::Duration};

pub use spend::SpendMetrics;

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
    pub code: &'static str,
}

/// A gRPC code's name, as its `Debug` writes it (without formatting a string per call).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
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
    hits: Counter,
    misses: Counter,
    coalesced: Counter,
    evictions: Counter,
    bytes: Gauge,
    redis: RedisMetrics,
}

/// One user's series of the shared store ([`crate::store`]): the cache's, or the fleet's.
#[derive(Clone, Default)]
pub struct RedisMetrics {
    errors: Counter,
    /// Operations not tried: Redis was being skipped, or too many writes were pending.
    skipped: Counter,
    /// Times Redis started being skipped.
    trips: Counter,
    /// 1 while Redis is used, 0 while it is skipped.
    up: Gauge,
}

impl RedisMetrics {
    pub fn failed(&self) {
        self.errors.inc();
    }

    pub fn skipped(&self) {
        self.skipped.inc();
    }

    /// Redis started being skipped (`false`) or is used again (`true`).
    pub fn up(&self, up: bool) {
        self.up.set(i64::from(up));
        if !up {
            self.trips.inc();
        }
    }

    /// Registers the series as `{prefix}_redis_*`.
    fn register(&self, r: &mut Registry) {
        r.register(
            "redis_errors",
            "Redis operations that failed or timed out",
            self.errors.clone(),
        );
        r.register(
            "redis_skipped",
            "Redis operations not tried: Redis was being skipped, or too many writes were pending",
            self.skipped.clone(),
        );
        r.register(
            "redis_trips",
            "Times Redis failed often enough to be skipped until a probe finds it back",
            self.trips.clone(),
        );
        r.register(
            "redis_up",
            "1 while Redis is used, 0 while it is skipped",
            self.up.clone(),
        );
    }
}

pub struct Metrics {
    registry: Registry,
    cache: CacheMetrics,
    fleet: FleetMetrics,
    /// Upstream HTTP requests and the prompts they carried, per provider.
    upstream_requests: Family<ProviderLabel, Counter>,
    upstream_items: Family<ProviderLabel, Counter>,
    batch_size: HistogramFamily,
    queue_wait_seconds: HistogramFamily,
    /// Calls answered, by method and gRPC code (`cascade_requests_total`), and the time from
    /// a call's arrival to its answer, by method.
    calls: calls::Calls,
    /// Upstream requests that failed, by provider and failure kind.
    upstream_failures: Family<FailureLabel, Counter>,
    /// Each provider's circuit: 0 closed, 1 half-open, 2 open (set when scraped).
    circuit: Family<ProviderLabel, Gauge>,
    /// Each provider's concurrency limit now (set when scraped).
    concurrency_limit: Family<ProviderLabel, Gauge>,
    /// Calls running now (set when scraped) and calls shed by `limits.max_in_flight`.
    in_flight: Gauge,
    shed: Counter,
    /// Client connections closed at once for being over `limits.max_connections[_per_peer]`.
    connections_refused: Counter,
    /// Calls refused for a missing or unknown client key (before any handler runs).
    unauthenticated: Counter,
    /// Each upstream request's time from send to outcome, per provider.
    upstream_seconds: HistogramFamily,
    /// Time a request waited for the provider's `rate_limit` before it could be sent.
    rate_wait_seconds: HistogramFamily,
    /// Requests the provider's `rate_limit` held back past their time (they moved on).
    rate_limited: Family<ProviderLabel, Counter>,
    usage_clamped: Family<ProviderLabel, Counter>,
    /// The router's own share of an answered, uncached call: its duration less the time
    /// in a batch queue and at the provider.
    overhead_seconds: Histogram,
    /// Dollars spent on upstream answers, by provider and model (`models[].price`).
    spend: SpendMetrics,
}

/// What the routers of a fleet share through Redis ([`crate::fleet`]).
#[derive(Clone, Default)]
pub struct FleetMetrics {
    redis: RedisMetrics,
    /// Limit decisions taken on the local share because Redis was away.
    local: Counter,
    /// Circuits opened here because another router saw the endpoint fail.
    circuits_reported: Counter,
}

impl FleetMetrics {
    pub fn redis(&self) -> &RedisMetrics {
        &self.redis
    }

    /// A limit decided on the local share (Redis away).
    pub fn decided_locally(&self) {
        self.local.inc();
    }

    /// A circuit opened on another router's report.
    pub fn circuit_reported(&self) {
        self.circuits_reported.inc();
    }

    fn register(&self, r: &mut Registry) {
        self.redis.register(r);
        r.register(
            "local_decisions",
            "Shared limits decided on this router's local share because Redis was away",
            self.local.clone(),
        );
        r.register(
            "circuits_reported",
            "Circuits opened here because another router of the fleet saw the endpoint fail",
            self.circuits_reported.clone(),
        );
    }
}

impl CacheMetrics {
    pub fn hit(&self) {
        self.hits.inc();
    }

    pub fn miss(&self) {
        self.misses.inc();
    }

    /// A request joined an identical one in flight.
    pub fn coalesced(&self) {
        self.coalesced.inc();
    }

    /// The eviction counter (moka's eviction listener counts into it).
    pub fn evictions(&self) -> Counter {
        self.evictions.clone()
    }

    /// Bytes held by the in-memory level now.
    pub fn held(&self, bytes: u64) {
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn redis(&self) -> &RedisMetrics {
        &self.redis
    }

    /// (hits, misses) so far.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits.get(), self.misses.get())
    }
}

/// One provider's series: what happens to its upstream requests, by event.
#[derive(Clone)]
pub struct ProviderMetrics {
    label: ProviderLabel,
    requests: Counter,
    items: Counter,
    upstream_seconds: Histogram,
    rate_wait_seconds: Histogram,
    rate_limited: Counter,
    usage_clamped: Counter,
    batch_size: Histogram,
    queue_wait_seconds: Histogram,
    failures: Family<FailureLabel, Counter>,
}

impl ProviderMetrics {
    /// An upstream request carrying `items` prompts went out.
    pub fn sent(&self, items: usize) {
        self.requests.inc();
        self.items.inc_by(items as u64);
    }

    /// Upstream requests sent and the prompts they carried, so far.
    pub fn sent_so_far(&self) -> (u64, u64) {
        (self.requests.get(), self.items.get())
    }

    /// An upstream request ended (however) after `took`.
    pub fn ended(&self, took: Duration) {
        self.upstream_seconds.observe(took.as_secs_f64());
    }

    /// An upstream request failed this way.
    pub fn failed(&self, kind: &'static str) {
        self.failures
            .get_or_create(&FailureLabel {
                provider: self.label.provider.clone(),
                kind,
            })
            .inc();
    }

    /// A request waited `waited` for the provider's `rate_limit`; `held_back` when it ran out
    /// of time there.
    pub fn rate_waited(&self, waited: Duration, held_back: bool) {
        self.rate_wait_seconds.observe(waited.as_secs_f64());
        if held_back {
            self.rate_limited.inc();
        }
    }

    /// The provider reported usage out of range; it was clamped.
    pub fn usage_clamped(&self) {
        self.usage_clamped.inc();
    }

    /// A batch of `size` prompts went out, each having waited in the queue.
    pub fn batch(&self, size: usize, waits: impl Iterator<Item = Duration>) {
        self.batch_size.observe(size as f64);
        for w in waits {
            self.queue_wait_seconds.observe(w.as_secs_f64());
        }
    }
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
        cache.redis.register(c);
        let fleet = FleetMetrics::default();
        fleet.register(registry.sub_registry_with_prefix("fleet"));
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
        let usage_clamped = Family::default();
        let overhead_seconds = wait_buckets();
        let spend = SpendMetrics::default();
        spend.register(&mut registry);
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
        u.register(
            "usage_clamped",
            "Answers whose reported token usage was out of range and was clamped",
            usage_clamped.clone(),
        );
        Metrics {
            registry,
            cache,
            fleet,
            upstream_requests,
            upstream_items,
            batch_size,
            queue_wait_seconds,
            calls: calls::Calls::new(calls, call_seconds),
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
            usage_clamped,
            overhead_seconds,
            spend,
        }
    }

    /// One provider's series, looked up once for its link.
    pub fn provider(&self, name: &str) -> ProviderMetrics {
        let label = ProviderLabel::of(name);
        ProviderMetrics {
            requests: self.upstream_requests.get_or_create(&label).clone(),
            items: self.upstream_items.get_or_create(&label).clone(),
            upstream_seconds: self.upstream_seconds.get_or_create(&label).clone(),
            rate_wait_seconds: self.rate_wait_seconds.get_or_create(&label).clone(),
            rate_limited: self.rate_limited.get_or_create(&label).clone(),
            usage_clamped: self.usage_clamped.get_or_create(&label).clone(),
            batch_size: self.batch_size.get_or_create(&label).clone(),
            queue_wait_seconds: self.queue_wait_seconds.get_or_create(&label).clone(),
            failures: self.upstream_failures.clone(),
            label,
        }
    }

    /// The completion cache's counters.
    pub fn cache(&self) -> &CacheMetrics {
        &self.cache
    }

    /// The fleet's counters.
    pub fn fleet(&self) -> &FleetMetrics {
        &self.fleet
    }

    /// A call at the edge ended with `code` after `took`.
    pub fn call_ended(&self, method: &'static str, code: tonic::Code, took: Duration) {
        self.calls.ended(method, code, took.as_secs_f64());
    }

    /// A call refused at once by `limits.max_in_flight`.
    pub fn shed(&self) {
        self.shed.inc();
    }

    pub fn spend(&self) -> &SpendMetrics {
        &self.spend
    }

    /// The router's own share of an answered, uncached call.
    pub fn overhead(&self, own: Duration) {
        self.overhead_seconds.observe(own.as_secs_f64());
    }

    /// Calls running now (set when scraped).
    pub fn in_flight(&self, n: usize) {
        self.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A provider's circuit (0 closed, 1 half-open, 2 open) and concurrency limit now (set
    /// when scraped).
    pub fn provider_state(&self, provider: &str, circuit: i64, concurrency_limit: usize) {
        let label = ProviderLabel::of(provider);
        self.circuit.get_or_create(&label).set(circuit);
        self.concurrency_limit
            .get_or_create(&label)
            .set(i64::try_from(concurrency_limit).unwrap_or(i64::MAX));
    }

    /// The counter of client connections closed for being over the caps (the listeners').
    pub fn connections_refused(&self) -> Counter {
        self.connections_refused.clone()
    }

    /// The counter of calls refused for a missing or unknown key (the authenticator's).
    pub fn unauthenticated(&self) -> Counter {
        self.unauthenticated.clone()
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
