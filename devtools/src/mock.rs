//! A real HTTP model server for tests, benchmarks and demos (`cascade-bench mock-provider`).
//!
//! It speaks the OpenAI (`/v1/completions`, `/v1/chat/completions`), Ollama (`/api/generate`,
//! `/api/chat`) and Anthropic (`/v1/messages`) shapes, streamed (`"stream": true`: SSE, or
//! NDJSON for Ollama, one word per chunk every `chunk_interval`) or not, and follows a [`Script`]: latency as `base + per_item × prompts` with at
//! most `max_concurrency` requests in service (the rest queue, as on a GPU server), and faults
//! (status codes, 429 + `Retry-After`, a reset mid-body, a hang, malformed JSON) on a fraction
//! of requests. It counts accepted TCP connections, requests, prompt items, and requests whose
//! client went away before the answer.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::pin,
    str::FromStr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use crate::conversation::{self, Api, Turn};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{Notify, Semaphore},
    task::JoinHandle,
};
use tokio_rustls::{
    TlsAcceptor, rustls,
    rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
};

/// What the mock does with each request. Tests may change it while the server runs.
#[derive(Clone, Debug)]
pub struct Script {
    pub base_latency: Duration,
    pub per_item_latency: Duration,
    /// Requests in service at once; fixed when the server starts.
    pub max_concurrency: usize,
    pub fault: Option<Fault>,
    /// Fraction of requests (0.0 ..= 1.0) that get `fault`.
    pub fault_rate: f64,
    /// When above 0, exactly every `fault_every`th request gets `fault` (instead of
    /// `fault_rate`), for tests that need the pattern fixed.
    pub fault_every: u64,
    /// Prompts containing this text are refused with 400, as a provider refuses bad input.
    pub reject_marker: Option<String>,
    /// `/v1/completions` leaves out the choices of prompts containing this text, as a buggy
    /// or truncating batch server would.
    pub omit_marker: Option<String>,
    /// Refuse a `/v1/completions` request with more than one prompt with a bare 500, as
    /// llama-cpp-python's server does; single prompts are served.
    pub refuse_arrays: bool,
    /// Pause between the chunks of a streamed answer (after the first).
    pub chunk_interval: Duration,
    /// Prompt prefixes this server's prefix (KV) cache holds, the least recently used going
    /// first (see [`Snapshot::prefix_hits`]).
    pub prefix_cache: usize,
    /// Report this usage (prompt, completion tokens) instead of what was counted, as a
    /// provider that misreports would (negative, absurd): on unary answers and at a stream's
    /// end.
    pub usage: Option<(i64, i64)>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            base_latency: Duration::ZERO,
            per_item_latency: Duration::ZERO,
            max_concurrency: 1024,
            fault: None,
            fault_rate: 1.0,
            fault_every: 0,
            reject_marker: None,
            omit_marker: None,
            refuse_arrays: false,
            chunk_interval: Duration::ZERO,
            prefix_cache: 1024,
            usage: None,
        }
    }
}

impl Script {
    /// Every request gets `fault`.
    pub fn failing(fault: Fault) -> Script {
        Script {
            fault: Some(fault),
            ..Script::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer this HTTP status with a JSON error body.
    Status(u16),
    /// 429 with this `Retry-After` value (seconds or an HTTP date).
    RateLimited { retry_after: String },
    /// Send headers and part of the body, then abort the connection.
    ResetMidBody,
    /// A streamed answer breaks (the connection is aborted) after two chunks; an answer not
    /// streamed is reset mid-body.
    BreakMidStream,
    /// Never answer.
    Hang,
    /// 200 with a body that is not JSON.
    MalformedJson,
    /// A correct answer, this much later than usual.
    Slow(Duration),
    /// One of these, picked at random for each faulty request.
    AnyOf(Vec<Fault>),
    /// This status, with an OpenAI-shaped error whose message echoes the request's
    /// Authorization header and prompts, as careless providers do.
    Echo(u16),
}

impl Fault {
    /// The fault a request gets: `AnyOf` resolved to one of its members.
    fn pick(&self) -> &Fault {
        match self {
            Fault::AnyOf(all) if !all.is_empty() => all[fastrand::usize(..all.len())].pick(),
            other => other,
        }
    }
}

impl FromStr for Fault {
    type Err = String;

    /// `500` (any status), `429:2` (with Retry-After), `reset`, `hang`, `malformed`,
    /// `slow:MS`, or several of these separated by commas (one picked per request).
    fn from_str(s: &str) -> Result<Fault, String> {
        if s.contains(',') {
            return s
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map(Fault::AnyOf);
        }
        if let Some(ms) = s.strip_prefix("slow:") {
            return ms
                .parse::<u64>()
                .map(|ms| Fault::Slow(Duration::from_millis(ms)))
                .map_err(|_| format!("{s:?}: use slow:MILLISECONDS"));
        }
        match s {
            "reset" => Ok(Fault::ResetMidBody),
            "break" => Ok(Fault::BreakMidStream),
            "hang" => Ok(Fault::Hang),
            "malformed" => Ok(Fault::MalformedJson),
            _ => match s.split_once(':') {
                Some(("429", ra)) => Ok(Fault::RateLimited {
                    retry_after: ra.to_string(),
                }),
                _ => s
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (400..=599).contains(c))
                    .map(Fault::Status)
                    .ok_or_else(|| {
                        format!(
                            "{s:?}: use a status 400-599, 429:SECONDS, reset, break, hang, malformed or slow:MS"
                        )
                    }),
            },
        }
    }
}

/// Counters, read with [`MockServer::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub connections: u64,
    pub requests: u64,
    pub items: u64,
    pub completed: u64,
    /// Requests whose client closed the connection before the answer was ready (or, for a
    /// streamed answer, before its last chunk was sent).
    pub cancelled: u64,
    /// Health probes (GET of a model list), not counted in `requests`.
    pub probes: u64,
    /// Prompts whose first [`PREFIX_BYTES`] this server had seen before: what a replica's
    /// prefix (KV) cache would reuse.
    pub prefix_hits: u64,
}

/// How much of a prompt counts as its prefix for [`Snapshot::prefix_hits`].
pub const PREFIX_BYTES: usize = 1024;

#[derive(Default)]
struct Counters {
    probes: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
    items: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    prefix_hits: AtomicU64,
}

/// Request bodies kept for [`MockServer::bodies`], the newest last.
const RECORDED: usize = 256;

struct Shared {
    script: Mutex<Script>,
    /// The last [`RECORDED`] request bodies, as received.
    bodies: Mutex<std::collections::VecDeque<Value>>,
    gate: Arc<Semaphore>,
    counters: Counters,
    /// Hashes of the prompt prefixes held, the most recently used last (see
    /// [`Snapshot::prefix_hits`]).
    prefixes: Mutex<std::collections::VecDeque<u64>>,
    changed: Notify,
}

impl Shared {
    /// Counts the prompts whose prefix the cache holds, and puts each prefix at its front.
    fn seen_prefixes(&self, prompts: &[String], room: usize) {
        use std::hash::{Hash, Hasher};
        let mut held = self.prefixes.lock().unwrap_or_else(PoisonError::into_inner);
        for p in prompts {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            p.as_bytes()[..p.len().min(PREFIX_BYTES)].hash(&mut h);
            let key = h.finish();
            if let Some(at) = held.iter().position(|k| *k == key) {
                held.remove(at);
                self.counters.prefix_hits.fetch_add(1, Relaxed);
            }
            held.push_back(key);
            while held.len() > room {
                held.pop_front();
            }
        }
    }

    fn bump(&self, counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Relaxed);
        self.changed.notify_waiters();
    }
}

/// A running mock server; stops when dropped.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl MockServer {
    /// Starts on an ephemeral loopback port.
    pub async fn start(script: Script) -> io::Result<MockServer> {
        MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), script).await
    }

    pub async fn bind(addr: SocketAddr, script: Script) -> io::Result<MockServer> {
        MockServer::launch(addr, script, None).await
    }

    async fn launch(
        addr: SocketAddr,
        script: Script,
        tls: Option<TlsAcceptor>,
    ) -> io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            gate: Arc::new(Semaphore::new(script.max_concurrency.max(1))),
            script: Mutex::new(script),
            bodies: Mutex::new(std::collections::VecDeque::new()),
            counters: Counters::default(),
            prefixes: Mutex::new(std::collections::VecDeque::new()),
            changed: Notify::new(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone(), tls));
        Ok(MockServer { addr, shared, task })
    }

    /// Like [`MockServer::bind`], serving TLS (HTTP/1.1) with a self-signed certificate for
    /// `localhost` and `127.0.0.1`, made now; returns the certificate as PEM for clients to trust.
    pub async fn bind_tls(addr: SocketAddr, script: Script) -> io::Result<(MockServer, String)> {
        let (acceptor, pem) = self_signed().map_err(io::Error::other)?;
        Ok((MockServer::launch(addr, script, Some(acceptor)).await?, pem))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_script(&self, script: Script) {
        *self
            .shared
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = script;
    }

    /// The request bodies received (the last 256), oldest first: what the router sent.
    pub fn bodies(&self) -> Vec<Value> {
        self.shared
            .bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The last request body received.
    pub fn last_body(&self) -> Option<Value> {
        self.shared
            .bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .back()
            .cloned()
    }

    pub fn stats(&self) -> Snapshot {
        let c = &self.shared.counters;
        Snapshot {
            connections: c.connections.load(Relaxed),
            requests: c.requests.load(Relaxed),
            items: c.items.load(Relaxed),
            prefix_hits: c.prefix_hits.load(Relaxed),
            completed: c.completed.load(Relaxed),
            cancelled: c.cancelled.load(Relaxed),
            probes: c.probes.load(Relaxed),
        }
    }

    /// Waits until the counters satisfy `cond`: an event, not a clock.
    pub async fn wait_for(&self, cond: impl Fn(&Snapshot) -> bool) -> Snapshot {
        loop {
            let mut changed = pin!(self.shared.changed.notified());
            changed.as_mut().enable();
            let s = self.stats();
            if cond(&s) {
                return s;
            }
            changed.await;
        }
    }

    /// Serves until the task is aborted (for the `mock-provider` command).
    pub async fn run_forever(self) {
        let _ = (&mut { self }.task).await;
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply text for a prompt; tests check answers against it.
pub fn reply(prompt: &str) -> String {
    format!("mock reply to: {prompt}")
}

fn self_signed() -> Result<(TlsAcceptor, String), Box<dyn std::error::Error + Send + Sync>> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), cert.pem()))
}

/// Accepts and serves connections; the connections are this task's own, so dropping the
/// server (which aborts it) closes them too, as a killed server's would be.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        shared.bump(&shared.counters.connections, 1);
        let shared = shared.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let _ = match tls {
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => builder.serve_connection(TokioIo::new(stream), svc).await,
                    Err(_) => return,
                },
            };
        });
    }
}

type Body = UnsyncBoxBody<Bytes, io::Error>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    full(status, json!({"error": {"message": message}}).to_string())
}

/// Counts a request as cancelled if its future is dropped before it finishes.
struct InFlight {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = &self.shared.counters;
        let counter = if self.done {
            &c.completed
        } else {
            &c.cancelled
        };
        self.shared.bump(counter, 1);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Completions,
    Chat,
    Generate,
    OllamaChat,
    Messages,
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut flight = Some(InFlight {
        shared: shared.clone(),
        done: false,
    });
    let response = respond(&shared, req, &mut flight).await;
    // A streamed answer took the flight into its body.
    if let Some(mut flight) = flight {
        flight.done = true;
    }
    Ok(response)
}

async fn respond(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    flight: &mut Option<InFlight>,
) -> Response<Body> {
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let endpoint = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/completions") => Endpoint::Completions,
        (&Method::POST, "/v1/chat/completions") => Endpoint::Chat,
        (&Method::POST, "/api/generate") => Endpoint::Generate,
        (&Method::POST, "/api/chat") => Endpoint::OllamaChat,
        (&Method::POST, "/v1/messages") => Endpoint::Messages,
        (&Method::GET, "/health") => return full(StatusCode::OK, "{}"),
        // What health checks probe: OpenAI's and Anthropic's model lists, Ollama's tags. A
        // script whose every request is faulty fails these too (a hung server hangs them).
        (&Method::GET, path @ ("/v1/models" | "/api/tags")) => {
            shared.bump(&shared.counters.probes, 1);
            let script = shared
                .script
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(fault) = &script.fault
                && script.fault_rate >= 1.0
                && script.fault_every == 0
            {
                return match fault.pick() {
                    Fault::Slow(extra) => {
                        tokio::time::sleep(*extra).await;
                        full(StatusCode::OK, r#"{"object":"list","data":[]}"#)
                    }
                    other => faulty(other).await,
                };
            }
            let body = if path == "/api/tags" {
                r#"{"models":[]}"#
            } else {
                r#"{"object":"list","data":[{"id":"mock","object":"model"}]}"#
            };
            return full(StatusCode::OK, body);
        }
        (&Method::GET, "/stats") => {
            let c = &shared.counters;
            let stats = json!({
                "connections": c.connections.load(Relaxed),
                "requests": c.requests.load(Relaxed),
                "items": c.items.load(Relaxed),
                "prefix_hits": c.prefix_hits.load(Relaxed),
                "completed": c.completed.load(Relaxed),
                "cancelled": c.cancelled.load(Relaxed),
            });
            return full(StatusCode::OK, stats.to_string());
        }
        _ => return error(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    let Ok(body) = req.into_body().collect().await else {
        return error(StatusCode::BAD_REQUEST, "unreadable body");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    {
        let mut kept = shared.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() == RECORDED {
            kept.pop_front();
        }
        kept.push_back(body.clone());
    }
    let prompts = prompts(endpoint, &body);
    let chat = match endpoint {
        Endpoint::Chat => Some(Api::OpenAi),
        Endpoint::OllamaChat => Some(Api::Ollama),
        Endpoint::Messages => Some(Api::Anthropic),
        Endpoint::Completions | Endpoint::Generate => None,
    };
    let turn = chat.map(|api| (api, conversation::turn(api, &body)));
    let streamed = body.get("stream").and_then(Value::as_bool) == Some(true);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    shared
        .counters
        .items
        .fetch_add(prompts.len() as u64, Relaxed);
    let room = shared
        .script
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .prefix_cache;
    shared.seen_prefixes(&prompts, room);
    shared.bump(&shared.counters.requests, 1);
    if prompts.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no prompt");
    }
    let script = shared
        .script
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut broken = false;
    let nth = shared.counters.requests.load(Relaxed);
    let at_fault = match script.fault_every {
        0 => script.fault_rate >= 1.0 || fastrand::f64() < script.fault_rate,
        every => nth.is_multiple_of(every),
    };
    if let Some(fault) = &script.fault
        && at_fault
    {
        match fault.pick() {
            Fault::Slow(extra) => tokio::time::sleep(*extra).await,
            Fault::BreakMidStream if streamed => broken = true,
            Fault::Echo(code) => {
                let message = format!(
                    "Incorrect API key provided: {authorization}; prompt was {}",
                    prompts.join(" | ")
                );
                let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_REQUEST);
                return full(
                    status,
                    json!({"error": {"message": message, "type": message}}).to_string(),
                );
            }
            other => return faulty(other).await,
        }
    }
    if script.refuse_arrays && prompts.len() > 1 {
        return full(StatusCode::INTERNAL_SERVER_ERROR, "");
    }
    if let Some(marker) = &script.reject_marker
        && prompts.iter().any(|p| p.contains(marker.as_str()))
    {
        return error(StatusCode::BAD_REQUEST, "prompt rejected by script");
    }
    let Ok(permit) = shared.gate.clone().acquire_owned().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let latency = script.base_latency + script.per_item_latency * (prompts.len() as u32);
    crate::timer::sleep(latency).await;
    if streamed && let Some(flight) = flight.take() {
        let first = prompts.first().map(String::as_str).unwrap_or_default();
        let chunks = match &turn {
            Some((
                api,
                Turn::Call {
                    id,
                    name,
                    arguments,
                },
            )) => frame(
                endpoint,
                conversation::call_chunks(*api, &model, id, name, arguments),
            ),
            Some((_, Turn::Text(text))) => {
                stream_chunks(endpoint, &model, first, text, script.usage)
            }
            None => stream_chunks(endpoint, &model, first, &reply(first), script.usage),
        };
        return streaming(
            endpoint,
            chunks,
            script.chunk_interval,
            broken,
            (flight, permit),
        );
    }
    let body = match &turn {
        Some((api, turn)) => {
            let tokens = |s: &str| s.split_whitespace().count();
            let said: usize = prompts.iter().map(|p| tokens(p)).sum();
            let wrote = match turn {
                Turn::Text(t) => tokens(t),
                Turn::Call { .. } => 1,
            };
            let mut answer = conversation::answer(*api, &model, turn, (said, wrote));
            if body.get("logprobs").and_then(Value::as_bool) == Some(true)
                && let Some(choice) = answer.pointer_mut("/choices/0")
            {
                choice["logprobs"] = conversation::LOGPROBS.clone();
            }
            answer
        }
        None => {
            let mut a = answer(endpoint, &model, &prompts, script.omit_marker.as_deref());
            if let (Some((p, c)), Some(usage)) = (script.usage, a.get_mut("usage")) {
                *usage = json!({"prompt_tokens": p, "completion_tokens": c});
            }
            a
        }
    };
    full(StatusCode::OK, body.to_string())
}

/// The prompt texts a request carries (a chat counts as one: its last message).
fn prompts(endpoint: Endpoint, body: &Value) -> Vec<String> {
    let text = |v: &Value| v.as_str().map(str::to_string);
    match endpoint {
        Endpoint::Completions | Endpoint::Generate => match body.get("prompt") {
            Some(Value::Array(items)) => items.iter().filter_map(text).collect(),
            Some(v) => text(v).into_iter().collect(),
            None => Vec::new(),
        },
        Endpoint::Chat | Endpoint::OllamaChat | Endpoint::Messages => body
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
            .map(|m| conversation::text_of(m.get("content")))
            .into_iter()
            .collect(),
    }
}

fn answer(endpoint: Endpoint, model: &str, prompts: &[String], omit: Option<&str>) -> Value {
    let tokens = |s: &str| s.split_whitespace().count();
    let prompt_tokens: usize = prompts.iter().map(|p| tokens(p)).sum();
    let completion_tokens: usize = prompts.iter().map(|p| tokens(&reply(p))).sum();
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens});
    let first = prompts.first().map(String::as_str).unwrap_or_default();
    match endpoint {
        Endpoint::Completions => json!({
            "object": "text_completion",
            "model": model,
            "choices": prompts.iter().enumerate()
                .filter(|(_, p)| omit.is_none_or(|m| !p.contains(m)))
                .map(|(i, p)| json!({"index": i, "text": reply(p), "finish_reason": "stop"}))
                .collect::<Vec<_>>(),
            "usage": usage,
        }),
        Endpoint::Chat => json!({
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply(first)}, "finish_reason": "stop"}],
            "usage": usage,
        }),
        Endpoint::Generate => json!({
            "model": model, "response": reply(first), "done": true, "done_reason": "stop",
            "prompt_eval_count": prompt_tokens, "eval_count": completion_tokens,
        }),
        Endpoint::OllamaChat => json!({
            "model": model, "message": {"role": "assistant", "content": reply(first)},
            "done": true, "done_reason": "stop",
            "prompt_eval_count": prompt_tokens, "eval_count": completion_tokens,
        }),
        Endpoint::Messages => json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": reply(first)}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
        }),
    }
}

/// The payloads of a streamed answer `text` to `prompt`, one word each, in the endpoint's
/// shape, ending with its end marker.
fn stream_chunks(
    endpoint: Endpoint,
    model: &str,
    prompt: &str,
    text: &str,
    usage: Option<(i64, i64)>,
) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let counted = (prompt.split_whitespace().count() as i64, words.len() as i64);
    let (prompt_tokens, completion_tokens) = usage.unwrap_or(counted);
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens});
    let mut out: Vec<Value> = Vec::new();
    match endpoint {
        Endpoint::Completions => {
            for w in &words {
                out.push(json!({"object": "text_completion", "model": model, "choices": [{"index": 0, "text": w, "finish_reason": null}]}));
            }
            out.push(json!({"object": "text_completion", "model": model, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}));
            out.push(
                json!({"object": "text_completion", "model": model, "choices": [], "usage": usage}),
            );
        }
        Endpoint::Chat => {
            for w in &words {
                out.push(json!({"object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": w}, "finish_reason": null}]}));
            }
            out.push(json!({"object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}));
            out.push(json!({"object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}));
        }
        Endpoint::Generate | Endpoint::OllamaChat => {
            let piece = |w: &str| match endpoint {
                Endpoint::Generate => json!({"model": model, "response": w, "done": false}),
                _ => {
                    json!({"model": model, "message": {"role": "assistant", "content": w}, "done": false})
                }
            };
            out.extend(words.iter().map(|w| piece(w)));
            let mut last = piece("");
            if let Some(o) = last.as_object_mut() {
                o.insert("done".into(), json!(true));
                o.insert("done_reason".into(), json!("stop"));
                o.insert("prompt_eval_count".into(), json!(prompt_tokens));
                o.insert("eval_count".into(), json!(completion_tokens));
            }
            out.push(last);
        }
        Endpoint::Messages => {
            out.push(json!({"type": "message_start", "message": {"id": "msg_mock", "model": model, "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}}));
            out.push(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}));
            for w in &words {
                out.push(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}));
            }
            out.push(json!({"type": "content_block_stop", "index": 0}));
            out.push(json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": completion_tokens}}));
            out.push(json!({"type": "message_stop"}));
        }
    }
    frame(endpoint, out)
}

/// Payloads framed as the endpoint streams them (SSE, with `[DONE]` for OpenAI; NDJSON).
fn frame(endpoint: Endpoint, out: Vec<Value>) -> Vec<String> {
    let mut framed: Vec<String> = out
        .into_iter()
        .map(|v| match endpoint {
            Endpoint::Generate | Endpoint::OllamaChat => format!("{v}\n"),
            Endpoint::Messages => format!(
                "event: {}\ndata: {v}\n\n",
                v.get("type").and_then(Value::as_str).unwrap_or("ping")
            ),
            Endpoint::Completions | Endpoint::Chat => format!("data: {v}\n\n"),
        })
        .collect();
    if matches!(endpoint, Endpoint::Completions | Endpoint::Chat) {
        framed.push("data: [DONE]\n\n".into());
    }
    framed
}

/// A streamed answer: `chunks` one by one, `interval` apart, holding the request's
/// flight and concurrency permit until the last is sent (or the client goes away: the
/// flight then counts as cancelled). When `broken`, the connection is aborted after two
/// chunks.
fn streaming<G: Send + 'static>(
    endpoint: Endpoint,
    chunks: Vec<String>,
    interval: Duration,
    broken: bool,
    held: (InFlight, G),
) -> Response<Body> {
    let total = if broken {
        chunks.len().min(2)
    } else {
        chunks.len()
    };
    let state = (
        chunks.into_iter().take(total).enumerate(),
        Some(held),
        broken,
    );
    let body =
        futures_util::stream::unfold(state, move |(mut chunks, mut held, broken)| async move {
            let Some((i, chunk)) = chunks.next() else {
                let (mut flight, permit) = held.take()?;
                drop(permit);
                if broken {
                    // A pause first, so the chunks before the break leave in their own writes
                    // rather than being dropped with the connection.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    return Some((
                        Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "scripted break",
                        )),
                        (chunks, None, broken),
                    ));
                }
                flight.done = true;
                return None;
            };
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok(Frame::data(Bytes::from(chunk))), (chunks, held, broken)))
        });
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(body)));
    let kind = match endpoint {
        Endpoint::Generate | Endpoint::OllamaChat => "application/x-ndjson",
        _ => "text/event-stream",
    };
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    r
}

async fn faulty(fault: &Fault) -> Response<Body> {
    match fault {
        Fault::Status(code) => error(
            StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "scripted fault",
        ),
        Fault::RateLimited { retry_after } => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "scripted rate limit");
            if let Ok(v) = HeaderValue::from_str(retry_after) {
                r.headers_mut().insert(RETRY_AFTER, v);
            }
            r
        }
        Fault::MalformedJson => full(StatusCode::OK, "{\"choices\": [ this is not json"),
        // Resolved before a response is made (see `Fault::pick`).
        Fault::Slow(_) | Fault::AnyOf(_) | Fault::Echo(_) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "no fault")
        }
        Fault::Hang => std::future::pending().await,
        Fault::ResetMidBody | Fault::BreakMidStream => {
            let chunks: Vec<Result<Frame<Bytes>, io::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(
                    b"{\"choices\": [{\"index\": 0, \"te",
                ))),
                Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "scripted reset",
                )),
            ];
            let body = StreamBody::new(tokio_stream::iter(chunks));
            let mut r = Response::new(BodyExt::boxed_unsync(body));
            r.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from_static("4096"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_cli_words() {
        assert_eq!("500".parse(), Ok(Fault::Status(500)));
        assert_eq!(
            "429:2".parse(),
            Ok(Fault::RateLimited {
                retry_after: "2".into()
            })
        );
        assert_eq!("hang".parse(), Ok(Fault::Hang));
        assert_eq!(
            "500,slow:20".parse(),
            Ok(Fault::AnyOf(vec![
                Fault::Status(500),
                Fault::Slow(Duration::from_millis(20))
            ]))
        );
        assert!("200".parse::<Fault>().is_err());
    }
}
