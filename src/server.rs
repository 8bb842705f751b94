//! The gRPC edge: `cascade.v1.Router` plus health and reflection, the caller's deadline,
//! and proto ↔ domain conversion. Everything behind it works on domain values.

use std::{future::Future, sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::BoxStream};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tonic::{Request, Response, Status, codegen::http, service::interceptor::InterceptedService};
use tracing::Instrument;

use crate::{
    auth::{Authenticate, Client},
    completion::{CompletionRequest, Input, StreamEvent, Streamed},
    config::{Limits, ServerConfig},
    error::RouterError,
    inflight::{InFlight, Ticket},
    metrics::{CallLabel, MethodLabel, Metrics},
    proto::{
        self, micros,
        v1::{self, router_server::RouterServer},
    },
    rate::TenantQuotas,
    router::Router,
};

/// We give up a little before the client's deadline — 5% of it, between 1 and 25 ms — so
/// that our DEADLINE_EXCEEDED, with its list of attempts, reaches the client before the
/// client's own timer fires (tonic clients report that as a bare CANCELLED) and before tonic's
/// server-side timer does the same.
fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(1), Duration::from_millis(25))
}

/// When the request arrived, stamped by a layer in front of every handler.
#[derive(Clone, Copy, Debug)]
struct Arrival(Instant);

pub struct RouterService {
    router: Arc<Router>,
    config: ServerConfig,
    inflight: Arc<InFlight>,
    quotas: Option<TenantQuotas>,
}

impl RouterService {
    /// Runs `work` for one admitted call: shed when `limits.max_in_flight` calls are
    /// running, refused while draining, and answered UNAVAILABLE if the shutdown grace ends
    /// before it does. Counted by method and code, and timed.
    async fn call<T>(
        &self,
        method: &'static str,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let record = Record::new(self.router.metrics(), method);
        let result = match self.enter() {
            Err(e) => Err(e.into()),
            Ok(_ticket) => tokio::select! {
                biased;
                r = work => r,
                () = self.inflight.abandoned() => Err(RouterError::ShuttingDown.into()),
            },
        };
        record.done(match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        });
        result
    }

    /// A place in flight, or why not (counting a shed call).
    fn enter(&self) -> Result<Ticket, RouterError> {
        self.inflight.enter().inspect_err(|e| {
            if matches!(e, RouterError::AtCapacity { .. }) {
                self.router.metrics().shed.inc();
            }
        })
    }

    /// The caller's deadline from `grpc-timeout`, or the configured default.
    fn deadline<T>(&self, req: &Request<T>) -> Instant {
        let arrival = req
            .extensions()
            .get::<Arrival>()
            .map_or_else(Instant::now, |a| a.0);
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|t| t.saturating_sub(deadline_margin(t)))
            .unwrap_or(self.config.request_timeout);
        arrival + timeout
    }
}

/// One call counted by method and code, and timed, when it ends: a call whose caller went
/// away first (a stream dropped mid-way) counts as CANCELLED.
struct Record {
    metrics: Arc<Metrics>,
    method: &'static str,
    started: Instant,
    code: Option<tonic::Code>,
}

impl Record {
    fn new(metrics: &Arc<Metrics>, method: &'static str) -> Record {
        Record {
            metrics: metrics.clone(),
            method,
            started: Instant::now(),
            code: None,
        }
    }

    fn done(mut self, code: tonic::Code) {
        self.code = Some(code);
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        self.metrics
            .calls
            .get_or_create(&CallLabel {
                method: self.method,
                code: format!("{code:?}"),
            })
            .inc();
        self.metrics
            .call_seconds
            .get_or_create(&MethodLabel {
                method: self.method,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The configured bounds on what one request may carry, each breach named.
fn within_limits(r: &CompletionRequest, l: &Limits) -> Result<(), RouterError> {
    let over = |what: String| Err(RouterError::InvalidArgument(what));
    let bytes = match &r.input {
        Input::Prompt(p) => p.len(),
        Input::Chat(m) => {
            if m.len() > l.max_messages {
                return over(format!(
                    "{} messages; at most {} (limits.max_messages)",
                    m.len(),
                    l.max_messages
                ));
            }
            m.iter().map(|m| m.content.len()).sum()
        }
    };
    if bytes > l.max_prompt_bytes {
        return over(format!(
            "{bytes} bytes of prompt; at most {} (limits.max_prompt_bytes)",
            l.max_prompt_bytes
        ));
    }
    if let Some(t) = r.params.max_tokens
        && t > l.max_tokens
    {
        return over(format!(
            "max_tokens {t}; at most {} (limits.max_tokens)",
            l.max_tokens
        ));
    }
    Ok(())
}

/// Runs one request inside its span. The span is at debug level, so at the default level it
/// costs nothing on the hot path; batch items carry it through the batcher to the provider
/// call.
async fn handle(
    router: &Router,
    request: &Arc<CompletionRequest>,
    deadline: Instant,
    log_prompts: bool,
) -> Result<crate::completion::Answer, RouterError> {
    let span = tracing::debug_span!(
        "request",
        request_id = %request.request_id,
        agent = %request.agent,
        model = %request.model,
    );
    async {
        tracing::debug!(
            timeout_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
            "request received"
        );
        if log_prompts {
            tracing::info!(request_id = %request.request_id, prompt = %shown(&request.input), "prompt (server.log_prompts)");
        }
        let started = Instant::now();
        let outcome = router.complete(request, deadline).await;
        if let Ok(a) = &outcome
            && !a.cached
        {
            let own = started
                .elapsed()
                .saturating_sub(a.queue_wait)
                .saturating_sub(a.upstream);
            router.metrics().overhead_seconds.observe(own.as_secs_f64());
        }
        if log_prompts && let Ok(a) = &outcome {
            tracing::info!(request_id = %request.request_id, completion = %a.completion.text, "completion (server.log_prompts)");
        }
        match &outcome {
            Ok(a) => tracing::debug!(provider = %a.provider, cached = a.cached, batch_size = a.batch_size, "answered"),
            Err(e) => tracing::debug!(code = ?e.code(), error = %e, "failed"),
        }
        outcome
    }
    .instrument(span)
    .await
}

/// Opens one streamed answer inside the request's span (see [`handle`]).
async fn open_stream(
    router: &Router,
    request: &Arc<CompletionRequest>,
    deadline: Instant,
    log_prompts: bool,
) -> Result<Streamed, RouterError> {
    let span = tracing::debug_span!(
        "stream",
        request_id = %request.request_id,
        agent = %request.agent,
        model = %request.model,
    );
    async {
        if log_prompts {
            tracing::info!(request_id = %request.request_id, prompt = %shown(&request.input), "prompt (server.log_prompts)");
        }
        let opened = router.stream(request, deadline).await;
        match &opened {
            Ok(s) => tracing::debug!(provider = %s.provider, cached = s.cached, attempts = s.attempts.len(), "streaming"),
            Err(e) => tracing::debug!(code = ?e.code(), error = %e, "failed before streaming"),
        }
        opened
    }
    .instrument(span)
    .await
}

/// A streamed answer on its way to the caller as `CompleteStreamResponse`s: text messages,
/// then one with `end`; an error ends it with its status. Holds the call's place in flight,
/// and gives up with UNAVAILABLE when the shutdown grace ends first.
struct Relay {
    /// The last message, filled in as the stream goes.
    end: v1::StreamEnd,
    events: BoxStream<'static, Result<StreamEvent, RouterError>>,
    inflight: Arc<InFlight>,
    _ticket: Ticket,
    /// Taken when the stream ends; dropped with the relay when the caller goes first.
    record: Option<Record>,
}

impl Relay {
    fn run(self) -> BoxStream<'static, Result<v1::CompleteStreamResponse, Status>> {
        futures_util::stream::unfold(Some(self), |relay| async move {
            let mut relay = relay?;
            let inflight = relay.inflight.clone();
            let next = tokio::select! {
                biased;
                next = relay.events.next() => next,
                () = inflight.abandoned() => Some(Err(RouterError::ShuttingDown)),
            };
            let message = match next? {
                Ok(StreamEvent::Text(text)) => {
                    relay.end.chunks = relay.end.chunks.saturating_add(1);
                    return Some((
                        Ok(v1::CompleteStreamResponse { text, end: None }),
                        Some(relay),
                    ));
                }
                Ok(StreamEvent::End {
                    finish_reason,
                    usage,
                }) => {
                    let mut end = std::mem::take(&mut relay.end);
                    end.finish_reason = finish_reason;
                    end.usage = usage.map(v1::Usage::from);
                    Ok(v1::CompleteStreamResponse {
                        text: String::new(),
                        end: Some(end),
                    })
                }
                Err(e) => Err(Status::from(e)),
            };
            if let Some(record) = relay.record.take() {
                record.done(match &message {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => s.code(),
                });
            }
            Some((message, None))
        })
        .boxed()
    }
}

/// A request's prompt or messages as one line of text, for `server.log_prompts`.
fn shown(input: &Input) -> String {
    match input {
        Input::Prompt(p) => p.clone(),
        Input::Chat(messages) => messages
            .iter()
            .map(|m| format!("{:?}: {}", m.role, m.content))
            .collect::<Vec<_>>()
            .join(" | "),
    }
}

#[tonic::async_trait]
impl v1::router_server::Router for RouterService {
    async fn complete(
        &self,
        req: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        self.call("Complete", async {
            let deadline = self.deadline(&req);
            let client = req.extensions().get::<Client>().cloned();
            let request = self.admit(req.into_inner(), client.as_ref())?;
            let answer = handle(&self.router, &request, deadline, self.config.log_prompts).await?;
            Ok(Response::new(v1::CompleteResponse::from_answer(
                answer,
                request.request_id.clone(),
            )))
        })
        .await
    }

    async fn complete_batch(
        &self,
        req: Request<v1::CompleteBatchRequest>,
    ) -> Result<Response<v1::CompleteBatchResponse>, Status> {
        self.call("CompleteBatch", self.batch(req)).await
    }

    type CompleteStreamStream = BoxStream<'static, Result<v1::CompleteStreamResponse, Status>>;

    async fn complete_stream(
        &self,
        req: Request<v1::CompleteRequest>,
    ) -> Result<Response<Self::CompleteStreamStream>, Status> {
        let record = Record::new(self.router.metrics(), "CompleteStream");
        let opened = async {
            let ticket = self.enter()?;
            let deadline = self.deadline(&req);
            let client = req.extensions().get::<Client>().cloned();
            let request = self.admit(req.into_inner(), client.as_ref())?;
            let streamed = tokio::select! {
                biased;
                r = open_stream(&self.router, &request, deadline, self.config.log_prompts) => r?,
                () = self.inflight.abandoned() => return Err(RouterError::ShuttingDown),
            };
            Ok((ticket, request, streamed))
        }
        .await;
        let (ticket, request, streamed) = match opened {
            Ok(o) => o,
            Err(e) => {
                let status = Status::from(e);
                record.done(status.code());
                return Err(status);
            }
        };
        let mut response = Response::new(
            Relay {
                end: v1::StreamEnd {
                    provider: streamed.provider.to_string(),
                    model: streamed.model.to_string(),
                    attempts: streamed.attempts.iter().map(v1::Attempt::from).collect(),
                    request_id: request.request_id.clone(),
                    cached: streamed.cached,
                    first_token_us: micros(streamed.first_after),
                    ..Default::default()
                },
                events: streamed.events,
                inflight: self.inflight.clone(),
                _ticket: ticket,
                record: Some(record),
            }
            .run(),
        );
        let headers = response.metadata_mut();
        for (name, value) in [
            ("x-cascade-provider", streamed.provider.to_string()),
            ("x-cascade-model", streamed.model.to_string()),
            ("x-cascade-attempts", streamed.attempts.len().to_string()),
            ("x-cascade-cached", streamed.cached.to_string()),
        ] {
            if let Ok(v) = value.parse() {
                headers.insert(name, v);
            }
        }
        Ok(response)
    }

    async fn list_providers(
        &self,
        _req: Request<v1::ListProvidersRequest>,
    ) -> Result<Response<v1::ListProvidersResponse>, Status> {
        let providers = self
            .router
            .providers()
            .into_iter()
            .map(v1::ProviderStatus::from)
            .collect();
        Ok(Response::new(v1::ListProvidersResponse { providers }))
    }
}

impl RouterService {
    /// A validated request with an id (the caller's `request_id`, or one made here so that
    /// every request's log lines can be found together), its tenant (the client key's name
    /// when authentication is on), allowed for that client's models, within its quota.
    fn admit(
        &self,
        msg: v1::CompleteRequest,
        client: Option<&Client>,
    ) -> Result<Arc<CompletionRequest>, RouterError> {
        let mut request = CompletionRequest::try_from(msg)?;
        within_limits(&request, &self.config.limits)?;
        if request.request_id.is_empty() {
            request.request_id = format!("req-{:016x}", fastrand::u64(..));
        }
        if let Some(client) = client {
            request.tenant = client.name.to_string();
            if let Some(allowed) = &client.models {
                let route = self.router.route_name(&request.model, &request.agent)?;
                if !allowed.contains(&route) {
                    return Err(RouterError::PermissionDenied {
                        client: client.name.to_string(),
                        model: route,
                    });
                }
            }
        }
        self.charge(&request.tenant)?;
        Ok(Arc::new(request))
    }

    /// Takes one call from `tenant`'s quota, if quotas are on. The tenant is the caller's
    /// `agent` (the client key's name once authentication lands).
    fn charge(&self, tenant: &str) -> Result<(), RouterError> {
        match &self.quotas {
            None => Ok(()),
            Some(q) => q
                .check(tenant)
                .map_err(|retry_after| RouterError::QuotaExceeded {
                    per_minute: q.per_minute(),
                    retry_after,
                }),
        }
    }

    async fn batch(
        &self,
        req: Request<v1::CompleteBatchRequest>,
    ) -> Result<Response<v1::CompleteBatchResponse>, Status> {
        let deadline = self.deadline(&req);
        let client = req.extensions().get::<Client>().cloned();
        let items = req.into_inner().requests;
        if items.len() > self.config.max_batch_items {
            return Err(RouterError::InvalidArgument(format!(
                "{} requests in one batch; at most {} (server.max_batch_items)",
                items.len(),
                self.config.max_batch_items
            ))
            .into());
        }
        let mut results: Vec<Option<v1::BatchResult>> = vec![None; items.len()];
        // Dropping the set (the caller went away) aborts every item's upstream work.
        let mut tasks = JoinSet::new();
        for (i, item) in items.into_iter().enumerate() {
            let router = self.router.clone();
            let log_prompts = self.config.log_prompts;
            let admitted = self.admit(item, client.as_ref());
            tasks.spawn(async move {
                let result = match admitted {
                    Err(e) => v1::batch_result::Result::Error(e.into()),
                    Ok(r) => match handle(&router, &r, deadline, log_prompts).await {
                        Ok(a) => v1::batch_result::Result::Response(
                            v1::CompleteResponse::from_answer(a, r.request_id.clone()),
                        ),
                        Err(e) => v1::batch_result::Result::Error(e.into()),
                    },
                };
                (i, result)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (i, result) = joined
                .map_err(|e| RouterError::Internal(format!("a batch item's task failed: {e}")))?;
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(v1::BatchResult {
                    result: Some(result),
                });
            }
        }
        Ok(Response::new(v1::CompleteBatchResponse {
            results: results.into_iter().map(Option::unwrap_or_default).collect(),
        }))
    }
}

/// Errors that stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics listener on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// How long, after the calls in flight are answered, connections get to deliver those answers
/// and close before the process moves on; an idle client that keeps its connection open does
/// not hold the exit longer than this.
const FLUSH: Duration = Duration::from_millis(500);

/// Serves `cascade.v1.Router`, `grpc.health.v1.Health` and reflection (v1 and v1alpha) on
/// `listener` until `shutdown` completes, then drains: health turns NOT_SERVING, the listener
/// stops accepting, connections get GOAWAY, and calls in flight have
/// `server.shutdown_grace` to finish; those still running then get UNAVAILABLE.
pub async fn serve(
    router: Arc<Router>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RouterServer<RouterService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let inflight = Arc::new(InFlight::new(config.limits.max_in_flight));
    // Dropped (and so stopped) when serving ends.
    let _metrics = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Metrics(addr, e))?;
            let (scraped, running) = (router.clone(), inflight.clone());
            let task = tokio::spawn(crate::metrics::serve(
                Arc::new(move || {
                    let n = i64::try_from(running.count()).unwrap_or(i64::MAX);
                    scraped.metrics().in_flight.set(n);
                    scraped.render_metrics()
                }),
                listener,
            ));
            Some(AbortOnDrop(task))
        }
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let stamp = tower::ServiceBuilder::new()
        .map_response(crate::error::recode_codec_refusal::<tonic::body::Body>)
        .map_request(|mut r: http::Request<tonic::body::Body>| {
            r.extensions_mut().insert(Arrival(Instant::now()));
            r
        });
    let auth = Authenticate::new(
        config.auth.as_ref(),
        router.metrics().unauthenticated.clone(),
    );
    let grace = config.shutdown_grace;
    let service = RouterService {
        router,
        inflight: inflight.clone(),
        quotas: config.quotas.as_ref().map(TenantQuotas::new),
        config: config.clone(),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let serving = builder
        // Fixed, generous flow-control windows rather than the adaptive one: h2 closes a
        // connection (GOAWAY ENHANCE_YOUR_CALM) once the small DATA frames it buffers exceed
        // half its connection window, and with the 64 KiB starting window that is ~140
        // unary calls arriving at once on one connection. 16 MiB allows tens of thousands.
        .initial_connection_window_size(Some(16 << 20))
        .initial_stream_window_size(Some(1 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_concurrent_streams(config.limits.max_concurrent_streams)
        .max_connection_age(config.limits.max_connection_age)
        .max_connection_age_grace(config.request_timeout)
        .layer(stamp)
        // Every service but health needs a client key when authentication is on.
        .add_service(InterceptedService::new(
            RouterServer::new(service).max_decoding_message_size(config.limits.max_message_bytes),
            auth.clone(),
        ))
        .add_service(health)
        .add_service(InterceptedService::new(reflection_v1, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth))
        .serve_with_incoming_shutdown(incoming(listener), async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
        });
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => return Ok(served?),
        () = shutdown => {}
    }

    tracing::info!(
        in_flight = inflight.count(),
        grace_s = grace.as_secs_f64(),
        "draining: refusing new calls, finishing those in flight"
    );
    health_reporter
        .set_not_serving::<RouterServer<RouterService>>()
        .await;
    inflight.drain();
    let _ = stop.send(true);
    tokio::select! {
        served = &mut serving => return Ok(served?),
        () = inflight.idle() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(
                in_flight = inflight.count(),
                "shutdown grace is over: answering the calls still running with UNAVAILABLE"
            );
            inflight.abandon();
            let _ = tokio::time::timeout(FLUSH, inflight.idle()).await;
        }
    }
    // Every call is answered: let the connections deliver the answers and close.
    let _ = tokio::time::timeout(FLUSH, &mut serving).await;
    tracing::info!("drained");
    Ok(())
}

/// Accepted connections, with `TCP_NODELAY`. An accept error (out of file descriptors, say)
/// is logged once while it lasts and retried after a pause that grows to a second, instead of
/// spinning on a listener that cannot accept.
fn incoming(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let mut pause = Duration::from_millis(5);
        let mut failing = false;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if failing {
                        tracing::info!("accepting connections again");
                    }
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(stream), listener));
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot accept connections; retrying with backoff");
                        failing = true;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
