//! The OpenAI-compatible HTTP front (`server.http_listen`): `POST /v1/chat/completions`,
//! `POST /v1/completions` (streamed as server-sent events when `stream` is true),
//! `GET /v1/models`. A standard OpenAI client pointed at it gets the router's cache,
//! coalescing, batching and fallback: requests go through the same [`Edge`] as gRPC calls.
//! The router's own facts ride in `x-cascade-*` response headers, so the bodies stay exactly
//! OpenAI's shape; errors are OpenAI's error body with the matching HTTP status.
//!
//! Request headers the router reads: `authorization: Bearer <key>` (when `server.auth` is
//! on), `x-cascade-agent` (else the body's `user`), `x-cascade-timeout-ms` (else
//! `server.request_timeout_seconds`), `x-cascade-cache` (`default`, `bypass`, `refresh`,
//! `only`) and `x-request-id`.

pub(crate) mod request;
mod wire;

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router as App,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::time::Instant;

use self::{
    request::{Body as Fields, Extras},
    wire::{Kind, WireUsage, error_body},
};
use crate::{
    auth::{Authenticate, Client},
    completion::{Answer, Attempt, CacheMode, CompletionRequest, Cost, StreamEvent, Usage},
    error::RouterError,
    front::edge::{Edge, StreamCall},
};

/// What the handlers share.
pub(crate) struct Front {
    edge: Arc<Edge>,
    auth: Authenticate,
}

/// The front's routes over `edge`, checking keys with `auth`, and the status page and its
/// API (see [`crate::front::status`]) over `board`.
pub(crate) fn app(edge: Arc<Edge>, auth: Authenticate, board: Arc<crate::status::Board>) -> App {
    let status = crate::front::status::routes(edge.clone(), auth.clone(), board);
    App::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(text))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .with_state(Arc::new(Front { edge, auth }))
        .merge(status)
        .fallback(not_found)
}

/// Serves `app` on `listener` until `stopped` turns true, then lets the open connections
/// finish (their calls are drained by the edge). With `tls`, each connection's handshake
/// runs in its own task and is cut at `limits.handshake_timeout`. HTTP/1 heads must arrive
/// within `limits.header_read_timeout` of the connection being ready for one — a slow sender
/// is cut; HTTP/2 connections are pinged and closed when silent; a connection on which no call
/// has run for `limits.idle_timeout` is closed.
pub(crate) async fn serve(
    app: App,
    mut listener: crate::listener::Listener,
    limits: crate::config::Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    refused: prometheus_client::metrics::counter::Counter,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::{conn::auto, graceful::GracefulShutdown},
        service::TowerToHyperService,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer, guard) = tokio::select! {
            accepted = listener.accept(&refused) => accepted,
            _ = stopped.wait_for(|s| *s) => break,
        };
        let io = crate::listener::Guarded::new(stream, guard, limits.idle_timeout);
        let on = io.connection();
        let app = tower::Layer::layer(
            &crate::listener::Track,
            tower::ServiceExt::map_request(
                app.clone(),
                move |mut r: axum::http::Request<hyper::body::Incoming>| {
                    r.extensions_mut().insert(on.clone());
                    r
                },
            ),
        );
        let service = TowerToHyperService::new(app);
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        match &tls {
            None => {
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .into_owned();
                tokio::spawn(watcher.watch(conn));
            }
            Some(acceptor) => {
                let (acceptor, handshake) = (acceptor.clone(), limits.handshake_timeout);
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                                .into_owned();
                            let _ = watcher.watch(conn).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake not finished in time; dropped")
                        }
                    }
                });
            }
        }
    }
    graceful.shutdown().await;
}

/// An error as OpenAI answers one: its status, its JSON body, and `Retry-After` when the
/// caller should wait. The operator API (`front::status`) answers its errors the same way.
pub(crate) struct Failure(RouterError);

impl From<RouterError> for Failure {
    fn from(e: RouterError) -> Failure {
        Failure(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, json_body(&error_body(&self.0))).into_response();
        if let Some(secs) = self.0.retry_after_secs() {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

fn json_body(v: &Value) -> ([(HeaderName, HeaderValue); 1], String) {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        v.to_string(),
    )
}

async fn not_found() -> Failure {
    Failure(RouterError::NoSuchEndpoint)
}

impl Front {
    /// The caller's client, or why it may not call.
    fn client(&self, headers: &HeaderMap) -> Result<Option<Client>, RouterError> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.auth.client(authorization)
    }

    /// The caller's deadline: `x-cascade-timeout-ms`, else the configured default.
    fn deadline(&self, headers: &HeaderMap) -> Instant {
        let timeout = headers
            .get("x-cascade-timeout-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&ms| ms > 0)
            .map_or(self.edge.config.request_timeout, Duration::from_millis);
        Instant::now() + timeout
    }

    /// What every completion request brings: its client (checked), deadline, the router's
    /// own headers, and the body read as `T`.
    async fn prepare<T: serde::de::DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<(Option<Client>, Instant, Extras, T), RouterError> {
        let client = self.client(headers)?;
        let deadline = self.deadline(headers);
        let extras = extras(headers)?;
        // A body announced over the limit is refused before any of it is read.
        let limit = self.edge.config.limits.max_message_bytes;
        if let Some(len) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > limit as u64
        {
            return Err(RouterError::TooLarge(format!(
                "the body is {len} bytes, over {limit} (limits.max_message_bytes)"
            )));
        }
        Ok((client, deadline, extras, self.read(body).await?))
    }

    /// The body, bounded by `limits.max_message_bytes`, read as `T`.
    async fn read<T: serde::de::DeserializeOwned>(&self, body: Body) -> Result<T, RouterError> {
        let limits = &self.edge.config.limits;
        let limit = limits.max_message_bytes;
        // A slow sender is cut: the body must follow its head within the body timeout.
        let within = limits.body_read_timeout;
        let read = tokio::time::timeout(within, axum::body::to_bytes(body, limit))
            .await
            .map_err(|_| {
                RouterError::BodyTimeout(u64::try_from(within.as_millis()).unwrap_or(u64::MAX))
            })?;
        let bytes = read.map_err(|e| {
            let e = e.into_inner();
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                RouterError::TooLarge(format!(
                    "the body is over {limit} bytes (limits.max_message_bytes)"
                ))
            } else {
                RouterError::InvalidArgument(format!("the body could not be read: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| RouterError::InvalidArgument(format!("not a valid request body: {e}")))
    }
}

/// The router's own request headers.
fn extras(headers: &HeaderMap) -> Result<Extras, RouterError> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let cache = match text("x-cascade-cache").map(str::trim) {
        None | Some("" | "default") => CacheMode::Default,
        Some("bypass") => CacheMode::Bypass,
        Some("refresh") => CacheMode::Refresh,
        Some("only") => CacheMode::Only,
        Some(other) => {
            return Err(RouterError::InvalidArgument(format!(
                "x-cascade-cache: {other:?} is not default, bypass, refresh or only"
            )));
        }
    };
    let request_id = text("x-request-id")
        .filter(|id| !id.is_empty() && id.len() <= 128)
        .map_or_else(|| format!("{:016x}", fastrand::u64(..)), str::to_string);
    Ok(Extras {
        agent: text("x-cascade-agent").map(str::to_string),
        cache,
        request_id,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sets each header whose value is a valid header value (a provider's name might not be).
fn set_headers(h: &mut HeaderMap, pairs: impl IntoIterator<Item = (&'static str, String)>) {
    for (name, value) in pairs {
        if value.is_empty() {
            continue;
        }
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}

/// `provider/model kind` for each attempt, `, `-separated.
fn attempted(attempts: &[Attempt]) -> String {
    attempts
        .iter()
        .map(|a| format!("{}/{} {}", a.provider, a.model, a.kind.metric_name()))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn chat(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    let (client, deadline, extras, fields) = front
        .prepare::<Fields>(&headers, body)
        .await
        .inspect_err(|e| front.edge.refused(Kind::Chat.method(false), e))?;
    let (stream, usage) = (fields.stream(), fields.include_usage());
    let request = request::chat(fields, &extras)
        .inspect_err(|e| front.edge.refused(Kind::Chat.method(stream), e))?;
    if stream {
        return front
            .stream(Kind::Chat, request, client.as_ref(), deadline, usage)
            .await;
    }
    let edge = &front.edge;
    let answers = edge
        .call(Kind::Chat.method(false), async {
            let r = edge.admit(request, client.as_ref()).await?;
            Ok(vec![edge.complete(&r, deadline).await?])
        })
        .await?;
    Ok(whole(Kind::Chat, &answers, &extras.request_id))
}

async fn text(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    let (client, deadline, extras, fields) = front
        .prepare::<Fields>(&headers, body)
        .await
        .inspect_err(|e| front.edge.refused(Kind::Text.method(false), e))?;
    let (stream, usage) = (fields.stream(), fields.include_usage());
    let mut requests = request::text(fields, &extras)
        .inspect_err(|e| front.edge.refused(Kind::Text.method(stream), e))?;
    if stream && let Some(request) = requests.pop() {
        return front
            .stream(Kind::Text, request, client.as_ref(), deadline, usage)
            .await;
    }
    let edge = &front.edge;
    let answers = edge
        .call(Kind::Text.method(false), async {
            let mut admitted = Vec::with_capacity(requests.len());
            for r in requests {
                admitted.push(edge.admit(r, client.as_ref()).await?);
            }
            // Together, so the prompts of one request ride in the same upstream batches.
            let answered =
                futures_util::future::join_all(admitted.iter().map(|r| edge.complete(r, deadline)))
                    .await;
            answered.into_iter().collect::<Result<Vec<_>, _>>()
        })
        .await?;
    Ok(whole(Kind::Text, &answers, &extras.request_id))
}

/// A whole (not streamed) response: one choice per answer, usage summed, the router's
/// facts in headers (per answer, `, `-separated, when there are several).
fn whole(kind: Kind, answers: &[Answer], request_id: &str) -> Response {
    let choices: Vec<Value> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| kind.choice(i, &a.completion))
        .collect();
    let usage = answers
        .iter()
        .filter_map(|a| a.completion.usage)
        .reduce(|x, y| Usage {
            prompt_tokens: x.prompt_tokens.saturating_add(y.prompt_tokens),
            completion_tokens: x.completion_tokens.saturating_add(y.completion_tokens),
            apportioned: x.apportioned || y.apportioned,
            clamped: x.clamped || y.clamped,
        });
    let model = answers
        .first()
        .map(|a| a.model.to_string())
        .unwrap_or_default();
    let body = json!({
        "id": kind.id(request_id),
        "object": kind.object(),
        "created": unix_now(),
        "model": model,
        "choices": choices,
        "usage": usage.map(WireUsage::from),
    });
    let mut r = json_body(&body).into_response();
    // The whole response's cost: every prompt's answer, estimated if any was.
    let cost = answers.iter().fold(Cost::default(), |sum, a| Cost {
        nanos: sum.nanos.saturating_add(a.cost.nanos),
        estimated: sum.estimated || a.cost.estimated,
    });
    let each = |f: &dyn Fn(&Answer) -> String| answers.iter().map(f).collect::<Vec<_>>().join(", ");
    let attempts: Vec<Attempt> = answers
        .iter()
        .flat_map(|a| a.attempts.iter().cloned())
        .collect();
    set_headers(
        r.headers_mut(),
        [
            ("x-cascade-provider", each(&|a| a.provider.to_string())),
            ("x-cascade-model", each(&|a| a.model.to_string())),
            ("x-cascade-attempts", attempts.len().to_string()),
            ("x-cascade-attempted", attempted(&attempts)),
            ("x-cascade-cached", each(&|a| a.cached.to_string())),
            ("x-cascade-batch-size", each(&|a| a.batch_size.to_string())),
            ("x-cascade-cost-usd", format!("{:.9}", cost.usd())),
            ("x-cascade-cost-estimated", cost.estimated.to_string()),
            ("x-request-id", request_id.to_string()),
        ],
    );
    r
}

impl Front {
    /// A streamed response: server-sent events in OpenAI's chunk shape, ending with
    /// `data: [DONE]`; a failure after the first chunk is an `error` event (which OpenAI's
    /// clients raise) and no `[DONE]`. Headers go once a provider has sent its first event.
    async fn stream(
        &self,
        kind: Kind,
        request: CompletionRequest,
        client: Option<&Client>,
        deadline: Instant,
        include_usage: bool,
    ) -> Result<Response, Failure> {
        let method = kind.method(true);
        let call = self.edge.stream(method, request, client, deadline).await?;
        let s = &call.streamed;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        set_headers(
            &mut headers,
            [
                ("x-cascade-provider", s.provider.to_string()),
                ("x-cascade-model", s.model.to_string()),
                ("x-cascade-attempts", s.attempts.len().to_string()),
                ("x-cascade-attempted", attempted(&s.attempts)),
                ("x-cascade-cached", s.cached.to_string()),
                ("x-request-id", call.request.request_id.clone()),
            ],
        );
        let events = Events {
            kind,
            id: kind.id(&call.request.request_id),
            created: unix_now(),
            model: s.model.to_string(),
            include_usage,
            call,
        };
        Ok((headers, Body::from_stream(events.run())).into_response())
    }
}

/// A streamed call's events on their way out as SSE frames.
struct Events {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    call: StreamCall,
}

impl Events {
    fn frame(v: &Value) -> String {
        format!("data: {v}\n\n")
    }

    fn chunk(&self, choices: Vec<Value>, usage: Option<WireUsage>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.kind.chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let (Some(u), Some(o)) = (usage, v.as_object_mut()) {
            o.insert("usage".into(), json!(u));
        }
        v
    }

    fn run(self) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send {
        futures_util::stream::unfold(Some(self), |st| async move {
            let mut st = st?;
            let frames = match st.call.next().await? {
                Ok(StreamEvent::Text(t)) => {
                    let chunk = st.chunk(vec![st.kind.delta(Some(&t), None)], None);
                    return Some((Ok(Bytes::from(Events::frame(&chunk))), Some(st)));
                }
                Ok(StreamEvent::ToolCall(d)) => {
                    let chunk = st.chunk(vec![st.kind.tool_delta(&d)], None);
                    return Some((Ok(Bytes::from(Events::frame(&chunk))), Some(st)));
                }
                Ok(StreamEvent::End {
                    finish_reason,
                    usage,
                }) => {
                    let last = vec![st.kind.delta(None, Some(&finish_reason))];
                    let mut out = Events::frame(&st.chunk(last, None));
                    if st.include_usage {
                        let usage = usage.map(WireUsage::from);
                        out.push_str(&Events::frame(&st.chunk(Vec::new(), usage)));
                    }
                    out.push_str("data: [DONE]\n\n");
                    out
                }
                Err(e) => Events::frame(&error_body(&e)),
            };
            Some((Ok(Bytes::from(frames)), None))
        })
    }
}

async fn models(State(front): State<Arc<Front>>, headers: HeaderMap) -> Result<Response, Failure> {
    let client = front.client(&headers)?;
    let data: Vec<Value> = visible(&front, client.as_ref())
        .iter()
        .map(|name| model_entry(name))
        .collect();
    Ok(json_body(&json!({"object": "list", "data": data})).into_response())
}

async fn model(
    State(front): State<Arc<Front>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let client = front.client(&headers)?;
    let names = visible(&front, client.as_ref());
    match names.iter().find(|n| **n == id) {
        Some(name) => Ok(json_body(&model_entry(name)).into_response()),
        None => Err(Failure(RouterError::UnknownModel {
            model: id,
            known: names.join(", "),
        })),
    }
}

/// The models and chains `client` may ask for, with a provider that could serve them now.
fn visible(front: &Front, client: Option<&Client>) -> Vec<String> {
    let mut names = front.edge.router.servable_names();
    if let Some(allowed) = client.and_then(|c| c.models.as_ref()) {
        names.retain(|n| allowed.contains(n));
    }
    names
}

fn model_entry(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "cascade-router"})
}
