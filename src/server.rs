//! The gRPC edge: `cascade.v1.Router` plus health and reflection, the caller's deadline,
//! and proto ↔ domain conversion. Everything behind it works on domain values.

use std::{future::Future, sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::BoxStream};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tonic::{Request, Response, Status, codegen::http, service::interceptor::InterceptedService};

use crate::{
    auth::{Authenticate, Client},
    completion::{CompletionRequest, StreamEvent},
    config::ServerConfig,
    edge::{Edge, StreamCall},
    error::RouterError,
    inflight::InFlight,
    listener::{Guarded, Listener, Track},
    proto::{
        self, micros,
        v1::{self, router_server::RouterServer},
    },
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
    edge: Arc<Edge>,
}

impl RouterService {
    /// A wire request validated and admitted.
    fn admit(
        &self,
        msg: v1::CompleteRequest,
        client: Option<&Client>,
    ) -> Result<Arc<CompletionRequest>, RouterError> {
        self.edge.admit(CompletionRequest::try_from(msg)?, client)
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
            .unwrap_or(self.edge.config.request_timeout);
        arrival + timeout
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

/// A streamed call's events as `CompleteStreamResponse`s: text messages, then one with `end`;
/// an error ends it with its status.
fn messages(call: StreamCall) -> BoxStream<'static, Result<v1::CompleteStreamResponse, Status>> {
    let s = &call.streamed;
    let end = v1::StreamEnd {
        provider: s.provider.to_string(),
        model: s.model.to_string(),
        attempts: s.attempts.iter().map(v1::Attempt::from).collect(),
        request_id: call.request.request_id.clone(),
        cached: s.cached,
        first_token_us: micros(s.first_after),
        ..Default::default()
    };
    futures_util::stream::unfold(Some((call, end)), |state| async move {
        let (mut call, mut end) = state?;
        match call.next().await? {
            Ok(StreamEvent::Text(text)) => {
                end.chunks = end.chunks.saturating_add(1);
                let message = v1::CompleteStreamResponse {
                    text,
                    ..Default::default()
                };
                Some((Ok(message), Some((call, end))))
            }
            Ok(StreamEvent::ToolCall(delta)) => {
                end.chunks = end.chunks.saturating_add(1);
                let message = v1::CompleteStreamResponse {
                    tool_calls: vec![delta.into()],
                    ..Default::default()
                };
                Some((Ok(message), Some((call, end))))
            }
            Ok(StreamEvent::End {
                finish_reason,
                usage,
            }) => {
                end.finish_reason = finish_reason;
                end.usage = usage.map(v1::Usage::from);
                let message = v1::CompleteStreamResponse {
                    end: Some(end),
                    ..Default::default()
                };
                Some((Ok(message), None))
            }
            Err(e) => Some((Err(Status::from(e)), None)),
        }
    })
    .boxed()
}

#[tonic::async_trait]
impl v1::router_server::Router for RouterService {
    async fn complete(
        &self,
        req: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        self.edge
            .call("Complete", async {
                let deadline = self.deadline(&req);
                let client = req.extensions().get::<Client>().cloned();
                let request = self.admit(req.into_inner(), client.as_ref())?;
                let answer = self.edge.complete(&request, deadline).await?;
                Ok(Response::new(v1::CompleteResponse::from_answer(
                    answer,
                    request.request_id.clone(),
                )))
            })
            .await
            .map_err(Status::from)
    }

    async fn complete_batch(
        &self,
        req: Request<v1::CompleteBatchRequest>,
    ) -> Result<Response<v1::CompleteBatchResponse>, Status> {
        self.edge
            .call("CompleteBatch", self.batch(req))
            .await
            .map_err(Status::from)
    }

    type CompleteStreamStream = BoxStream<'static, Result<v1::CompleteStreamResponse, Status>>;

    async fn complete_stream(
        &self,
        req: Request<v1::CompleteRequest>,
    ) -> Result<Response<Self::CompleteStreamStream>, Status> {
        let deadline = self.deadline(&req);
        let client = req.extensions().get::<Client>().cloned();
        let call = async {
            let request = CompletionRequest::try_from(req.into_inner())?;
            self.edge
                .stream("CompleteStream", request, client.as_ref(), deadline)
                .await
        }
        .await?;
        let s = &call.streamed;
        let headers = [
            ("x-cascade-provider", s.provider.to_string()),
            ("x-cascade-model", s.model.to_string()),
            ("x-cascade-attempts", s.attempts.len().to_string()),
            ("x-cascade-cached", s.cached.to_string()),
        ];
        let mut response = Response::new(messages(call));
        for (name, value) in headers {
            if let Ok(v) = value.parse() {
                response.metadata_mut().insert(name, v);
            }
        }
        Ok(response)
    }

    async fn list_providers(
        &self,
        _req: Request<v1::ListProvidersRequest>,
    ) -> Result<Response<v1::ListProvidersResponse>, Status> {
        let providers = self
            .edge
            .router
            .providers()
            .into_iter()
            .map(v1::ProviderStatus::from)
            .collect();
        Ok(Response::new(v1::ListProvidersResponse { providers }))
    }
}

impl RouterService {
    async fn batch(
        &self,
        req: Request<v1::CompleteBatchRequest>,
    ) -> Result<Response<v1::CompleteBatchResponse>, RouterError> {
        let deadline = self.deadline(&req);
        let client = req.extensions().get::<Client>().cloned();
        let items = req.into_inner().requests;
        let most = self.edge.config.max_batch_items;
        if items.len() > most {
            return Err(RouterError::InvalidArgument(format!(
                "{} requests in one batch; at most {most} (server.max_batch_items)",
                items.len(),
            )));
        }
        let mut results: Vec<Option<v1::BatchResult>> = vec![None; items.len()];
        // Dropping the set (the caller went away) aborts every item's upstream work.
        let mut tasks = JoinSet::new();
        for (i, item) in items.into_iter().enumerate() {
            let edge = self.edge.clone();
            let admitted = self.admit(item, client.as_ref());
            tasks.spawn(async move {
                let result = match admitted {
                    Err(e) => v1::batch_result::Result::Error(e.into()),
                    Ok(r) => match edge.complete(&r, deadline).await {
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
    #[error("server.http_listen {0}: {1}")]
    Http(std::net::SocketAddr, std::io::Error),
    #[error("server.tls: {0}")]
    Tls(std::io::Error),
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
                    scraped.metrics().in_flight(running.count());
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
    let auth = Authenticate::new(config.auth.as_ref(), router.metrics().unauthenticated());
    let grace = config.shutdown_grace;
    let refused = router.metrics().connections_refused();
    let edge = Arc::new(Edge::new(router, config.clone(), inflight.clone()));
    let service = RouterService { edge: edge.clone() };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Dropped (and so stopped) when serving ends; stops accepting when the drain begins.
    let _http = match config.http_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Http(addr, e))?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "OpenAI-compatible HTTP front listening");
            let app = crate::openai_front::app(edge.clone(), auth.clone());
            let listener = Listener::new(
                listener,
                config.limits.max_connections,
                config.limits.max_connections_per_peer,
            );
            let task = tokio::spawn(crate::openai_front::serve(
                app,
                listener,
                config.limits.clone(),
                edge.router.metrics().connections_refused(),
                stopped.clone(),
            ));
            Some(AbortOnDrop(task))
        }
    };
    // TLS handshakes are the listener's (with a timeout: tonic's own have none).
    let acceptor = match &config.tls {
        None => None,
        Some(tls) => Some(
            crate::listener::tls::acceptor(&tls.cert_pem, &tls.key_pem).map_err(ServeError::Tls)?,
        ),
    };
    let routes = tonic::transport::Server::builder()
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
        // Outermost: counts each call on its connection (the idle rule), around its body.
        .layer(Track)
        .layer(stamp)
        // Every service but health needs a client key when authentication is on.
        .add_service(InterceptedService::new(
            RouterServer::new(service).max_decoding_message_size(config.limits.max_message_bytes),
            auth.clone(),
        ))
        .add_service(health)
        .add_service(InterceptedService::new(reflection_v1, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth));
    let listener = Listener::new(
        listener,
        config.limits.max_connections,
        config.limits.max_connections_per_peer,
    );
    let stop_serving = async move {
        let mut stopped = stopped;
        let _ = stopped.wait_for(|s| *s).await;
    };
    let serving: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match acceptor {
        None => Box::pin(routes.serve_with_incoming_shutdown(
            incoming(listener, &config.limits, refused),
            stop_serving,
        )),
        Some(acceptor) => {
            let idle = config.limits.idle_timeout;
            Box::pin(routes.serve_with_incoming_shutdown(
                crate::listener::tls::incoming(
                    listener,
                    acceptor,
                    config.limits.handshake_timeout,
                    refused,
                    move |stream, guard| Guarded::new(stream, guard).idle_after(idle),
                ),
                stop_serving,
            ))
        }
    };
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

/// The gRPC front's connections, within the caps (see [`Listener::accept`]); one that sends
/// nothing (not even the HTTP/2 preface) within the handshake timeout is dropped, and one
/// idle for the idle timeout closed.
fn incoming(
    listener: Listener,
    limits: &crate::config::Limits,
    refused: prometheus_client::metrics::counter::Counter,
) -> impl futures_util::Stream<Item = Result<Guarded, std::io::Error>> {
    let (first_byte, idle) = (limits.handshake_timeout, limits.idle_timeout);
    futures_util::stream::unfold(listener, move |mut listener| {
        let refused = refused.clone();
        async move {
            let (stream, _, guard) = listener.accept(&refused).await;
            let conn = Guarded::new(stream, guard)
                .first_byte_within(first_byte)
                .idle_after(idle);
            Some((Ok(conn), listener))
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
