//! The load harness behind `cascade-bench load`: ghz's knobs (concurrency, total requests or
//! duration, target rate, connections, request data from a template or a JSONL file) against
//! the router over gRPC, or straight at an OpenAI-shaped HTTP upstream, so that "direct" and
//! "through the router" are measured by the same client.
//!
//! With a target rate the load is open-loop: request `i` is due at `start + i / rate` and is
//! sent then whatever happened to earlier requests; when `concurrency` calls are already in
//! flight the wait for a slot counts in its latency, so a slow server cannot hide queueing by
//! slowing the sender (coordinated omission). How late the sender itself ran is reported as
//! `max_send_lag_us`. Latencies go into HDR histograms.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};
use tonic::transport::Channel;

use crate::proto::v1::{self, router_client::RouterClient};

/// Where the load goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// `cascade.v1.Router/Complete` at this address (`host:port`).
    Grpc(String),
    /// `POST {base}/completions` (OpenAI shape), `base` including `/v1`.
    Http(String),
    /// `POST {base}/chat/completions`, the prompt as one user message.
    HttpChat(String),
}

/// One request's fields; `{{n}}` in `prompt` becomes the request's index.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub prompt: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub seed: Option<i64>,
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Tools offered with each request, in OpenAI's shape (`[{"type": "function",
    /// "function": {"name", "description", "parameters"}}]`); gRPC only. With tools or an
    /// image the prompt goes as one user message.
    #[serde(default)]
    pub tools: Vec<serde_json::Value>,
    /// An image of this many bytes sent with each request (as PNG); gRPC only.
    #[serde(default)]
    pub image_bytes: usize,
    /// Each prompt opens with one of this many shared prefixes (call `n` with a prefix drawn
    /// from a hash of `n`, so no balancer's turn lines up with it), as an agent's prompts
    /// share a system prompt; 0: none.
    #[serde(default)]
    pub prefix_groups: u64,
    /// The shared prefixes' length in bytes (default 1024).
    #[serde(default)]
    pub prefix_bytes: usize,
}

impl Template {
    fn prompt_for(&self, n: u64) -> String {
        let prompt = self.prompt.replace("{{n}}", &n.to_string());
        if self.prefix_groups == 0 {
            return prompt;
        }
        let len = if self.prefix_bytes == 0 {
            1024
        } else {
            self.prefix_bytes
        };
        // splitmix64's finaliser: consecutive calls get unrelated groups.
        let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let group = (z ^ (z >> 31)) % self.prefix_groups;
        let head = format!("You are agent {group} of the fleet. ");
        let mut text: String = head.chars().cycle().take(len.max(head.len())).collect();
        text.push_str(&prompt);
        text
    }

    /// The request for call `n` over gRPC.
    fn grpc(&self, prompt: String) -> v1::CompleteRequest {
        let mut r = v1::CompleteRequest {
            model: self.model.clone(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            seed: self.seed,
            agent: self.agent.clone(),
            stop: self.stop.clone(),
            ..Default::default()
        };
        if self.tools.is_empty() && self.image_bytes == 0 {
            r.prompt = prompt;
            return r;
        }
        let mut parts = vec![v1::ContentPart {
            part: Some(v1::content_part::Part::Text(prompt)),
        }];
        if self.image_bytes > 0 {
            // PNG's signature, then filler: the router does not decode images.
            let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
            data.resize(self.image_bytes.max(8), 0x5a);
            parts.push(v1::ContentPart {
                part: Some(v1::content_part::Part::Image(v1::Image {
                    source: Some(v1::image::Source::Data(data)),
                    mime_type: "image/png".into(),
                    detail: String::new(),
                })),
            });
        }
        r.messages = vec![v1::ChatMessage {
            role: "user".into(),
            parts,
            ..Default::default()
        }];
        r.tools = self
            .tools
            .iter()
            .map(|t| {
                let f = t.get("function").unwrap_or(t);
                let text = |k: &str| f[k].as_str().unwrap_or_default().to_string();
                v1::Tool {
                    name: text("name"),
                    description: text("description"),
                    parameters_json: f
                        .get("parameters")
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    strict: None,
                }
            })
            .collect();
        r
    }
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub target: Target,
    /// Requests in flight at most (closed loop: the number of workers).
    pub concurrency: usize,
    /// gRPC channels (HTTP/2 connections) or HTTP clients to spread requests over.
    pub connections: usize,
    /// Requests to send; with `duration`, whichever ends first.
    pub requests: Option<u64>,
    pub duration: Option<Duration>,
    /// Requests per second, open loop; `None` sends as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// Requests sent first and not recorded (connections, caches and pools warm up).
    pub warmup: u64,
    pub templates: Vec<Template>,
    /// Deadline sent with each request.
    pub timeout: Duration,
    /// Above 1, each call is a CompleteBatch of this many prompts (gRPC only); a call
    /// succeeds when every item does.
    pub batch: usize,
}

/// Percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        (!h.is_empty()).then(|| Percentiles {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub requests: u64,
    pub ok: u64,
    /// Error counts by gRPC code or HTTP status.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub throughput_rps: f64,
    /// Client-observed latency (from the due time when a rate is set), of every call.
    pub latency_us: Option<Percentiles>,
    /// The same, of the successful calls only (what a shed call costs is not in it).
    pub ok_latency_us: Option<Percentiles>,
    /// The router's `upstream_us` of successful answers (gRPC only).
    pub upstream_us: Option<Percentiles>,
    /// Open loop: the most a send started after it was due (the generator's own lag).
    pub max_send_lag_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("connecting to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    #[error("building the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Spec(String),
}

/// 1 µs .. 10 min at 3 significant digits.
#[allow(clippy::expect_used)] // Constant, valid bounds: this cannot fail.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

struct Recorder {
    latency: Mutex<Histogram<u64>>,
    ok_latency: Mutex<Histogram<u64>>,
    upstream: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    ok: AtomicU64,
    sent: AtomicU64,
    lag_us: AtomicU64,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            latency: Mutex::new(histogram()),
            ok_latency: Mutex::new(histogram()),
            upstream: Mutex::new(histogram()),
            errors: Mutex::default(),
            ok: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            lag_us: AtomicU64::new(0),
        }
    }

    fn record(&self, took: Duration, outcome: Result<Option<u64>, String>) {
        self.sent.fetch_add(1, Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(us);
        match outcome {
            Ok(upstream) => {
                self.ok.fetch_add(1, Relaxed);
                let _ = self
                    .ok_latency
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(us);
                if let Some(u) = upstream {
                    let _ = self
                        .upstream
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .record(u.max(1));
                }
            }
            Err(code) => {
                *self
                    .errors
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(code)
                    .or_default() += 1;
            }
        }
    }
}

/// A connected client, one per `connections`.
#[derive(Clone)]
enum Client {
    Grpc(RouterClient<Channel>),
    /// The client, the URL, and whether it is the chat endpoint.
    Http(reqwest::Client, Arc<str>, bool),
}

#[derive(Serialize)]
struct HttpBody<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<[HttpMessage<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Serialize)]
struct HttpMessage<'a> {
    role: &'static str,
    content: &'a str,
}

impl Client {
    async fn connect(target: &Target) -> Result<Client, LoadError> {
        Ok(match target {
            Target::Grpc(addr) => {
                let uri = format!("http://{addr}");
                let channel = Channel::from_shared(uri.clone())
                    .map_err(|e| LoadError::Spec(format!("bad address {addr}: {e}")))?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|e| LoadError::Connect(uri, e))?;
                Client::Grpc(RouterClient::new(channel))
            }
            Target::Http(base) | Target::HttpChat(base) => {
                let chat = matches!(target, Target::HttpChat(_));
                let path = if chat {
                    "chat/completions"
                } else {
                    "completions"
                };
                Client::Http(
                    reqwest::Client::builder().tcp_nodelay(true).build()?,
                    format!("{}/{path}", base.trim_end_matches('/')).into(),
                    chat,
                )
            }
        })
    }

    /// Sends call `n` (of `batch` prompts when above 1); `Ok` carries the router's
    /// `upstream_us` when there is one.
    async fn send(
        &mut self,
        t: &Template,
        n: u64,
        timeout: Duration,
        batch: usize,
    ) -> Result<Option<u64>, String> {
        let grpc = |prompt: String| t.grpc(prompt);
        match self {
            Client::Grpc(c) if batch > 1 => {
                let first = n * batch as u64;
                let requests = (first..first + batch as u64)
                    .map(|i| grpc(t.prompt_for(i)))
                    .collect();
                let mut req = tonic::Request::new(v1::CompleteBatchRequest { requests });
                req.set_timeout(timeout);
                let results = c
                    .complete_batch(req)
                    .await
                    .map_err(|s| format!("{:?}", s.code()))?
                    .into_inner()
                    .results;
                let mut slowest = 0;
                for r in results {
                    match r.result {
                        Some(v1::batch_result::Result::Response(r)) => {
                            slowest = slowest.max(r.upstream_us)
                        }
                        Some(v1::batch_result::Result::Error(e)) => {
                            return Err(format!("item {:?}", tonic::Code::from_i32(e.code)));
                        }
                        None => return Err("empty item".into()),
                    }
                }
                Ok(Some(slowest))
            }
            Client::Grpc(c) => {
                let mut req = tonic::Request::new(grpc(t.prompt_for(n)));
                req.set_timeout(timeout);
                match c.complete(req).await {
                    Ok(r) => Ok(Some(r.into_inner().upstream_us)),
                    Err(s) => Err(format!("{:?}", s.code())),
                }
            }
            Client::Http(c, url, chat) => {
                let prompt = t.prompt_for(n);
                let body = HttpBody {
                    model: &t.model,
                    prompt: (!*chat).then_some(prompt.as_str()),
                    messages: chat.then_some([HttpMessage {
                        role: "user",
                        content: &prompt,
                    }]),
                    max_tokens: t.max_tokens,
                    temperature: t.temperature,
                };
                let resp = c
                    .post(url.as_ref())
                    .timeout(timeout)
                    .json(&body)
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => Ok(None),
                        Err(_) => Err("body".into()),
                    },
                    Ok(r) => Err(format!("http {}", r.status().as_u16())),
                    Err(e) if e.is_timeout() => Err("timeout".into()),
                    Err(_) => Err("transport".into()),
                }
            }
        }
    }
}

/// Runs the load described by `spec` and reports what it saw.
pub async fn run(spec: Spec) -> Result<Report, LoadError> {
    if spec.templates.is_empty() {
        return Err(LoadError::Spec("no request template".into()));
    }
    if spec.concurrency == 0 || spec.connections == 0 {
        return Err(LoadError::Spec(
            "concurrency and connections must be at least 1".into(),
        ));
    }
    if spec.batch > 1 && matches!(spec.target, Target::Http(_) | Target::HttpChat(_)) {
        return Err(LoadError::Spec(
            "batch calls go to the router (gRPC) only".into(),
        ));
    }
    if spec.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(LoadError::Spec("rate must be a positive number".into()));
    }
    let mut clients = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        clients.push(Client::connect(&spec.target).await?);
    }
    let templates: Arc<[Template]> = spec.templates.clone().into();
    if spec.warmup > 0 {
        let warm = Spec {
            requests: Some(spec.warmup),
            duration: None,
            rate: None,
            ..spec.clone()
        };
        drive(
            &warm,
            &clients,
            &templates,
            Arc::new(Recorder::new()),
            warmup_base(spec.batch),
        )
        .await;
    }
    let recorder = Arc::new(Recorder::new());
    let started = Instant::now();
    drive(&spec, &clients, &templates, recorder.clone(), 0).await;
    let elapsed = started.elapsed();

    let sent = recorder.sent.load(Relaxed);
    let latency = recorder
        .latency
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let upstream = recorder
        .upstream
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let ok_latency = recorder
        .ok_latency
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(Report {
        target: match &spec.target {
            Target::Grpc(a) => format!("grpc://{a}"),
            Target::Http(b) => b.clone(),
            Target::HttpChat(b) => format!("{b}/chat/completions"),
        },
        requests: sent,
        ok: recorder.ok.load(Relaxed),
        errors: recorder
            .errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        elapsed_s: elapsed.as_secs_f64(),
        throughput_rps: sent as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_us: Percentiles::of(&latency),
        ok_latency_us: Percentiles::of(&ok_latency),
        upstream_us: Percentiles::of(&upstream),
        max_send_lag_us: recorder.lag_us.load(Relaxed),
    })
}

/// Sends requests numbered from `first` until the count or the duration runs out.
async fn drive(
    spec: &Spec,
    clients: &[Client],
    templates: &Arc<[Template]>,
    rec: Arc<Recorder>,
    first: u64,
) {
    // Neither a count nor a duration: ghz's default of 200 requests.
    let total = spec.requests.unwrap_or(if spec.duration.is_some() {
        u64::MAX
    } else {
        200
    });
    let start = Instant::now();
    let stop_at = spec.duration.map(|d| start + d);
    // `Copy`, so every worker gets its own.
    let due = move |i: u64| stop_at.is_none_or(|s| Instant::now() < s) && i < total;
    let batch = spec.batch;
    let mut tasks = JoinSet::new();
    match spec.rate {
        None => {
            let next = Arc::new(AtomicU64::new(0));
            for w in 0..spec.concurrency {
                let mut client = clients[w % clients.len()].clone();
                let (next, rec, templates) = (next.clone(), rec.clone(), templates.clone());
                let timeout = spec.timeout;
                tasks.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        if !due(i) {
                            break;
                        }
                        let t = &templates[(i % templates.len() as u64) as usize];
                        let began = Instant::now();
                        let outcome = client.send(t, first + i, timeout, batch).await;
                        rec.record(began.elapsed(), outcome);
                    }
                });
            }
        }
        Some(rate) => {
            let in_flight = Arc::new(Semaphore::new(spec.concurrency));
            let mut i = 0u64;
            while due(i) {
                let due_at = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due_at).await;
                // The clock starts when the send is due — but tokio's timer wakes on whole
                // milliseconds, and that slack is the generator's, not the server's, so it
                // starts at the wake-up. Waiting for an in-flight slot is the server's doing
                // (it has not answered earlier calls), so that wait is charged.
                let began = Instant::now();
                let lag = u64::try_from((began - due_at).as_micros()).unwrap_or(u64::MAX);
                rec.lag_us.fetch_max(lag, Relaxed);
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let mut client = clients[(i % clients.len() as u64) as usize].clone();
                let (rec, templates) = (rec.clone(), templates.clone());
                let timeout = spec.timeout;
                tasks.spawn(async move {
                    let t = &templates[(i % templates.len() as u64) as usize];
                    let outcome = client.send(t, first + i, timeout, batch).await;
                    rec.record(began.elapsed(), outcome);
                    drop(permit);
                });
                i += 1;
                // Reap finished tasks so the set does not grow with the run.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// The report as aligned text.
pub fn render(r: &Report) -> String {
    let pct = |p: &Option<Percentiles>| match p {
        None => "-".to_string(),
        Some(p) => format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.0}",
            p.p50, p.p90, p.p99, p.p999, p.max, p.mean
        ),
    };
    let errors = if r.errors.is_empty() {
        "none".to_string()
    } else {
        r.errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "target       {}\nrequests     {} (ok {})\nerrors       {}\nelapsed      {:.3} s\nthroughput   {:.0} req/s\nlatency µs   {}\nupstream µs  {}\nsend lag µs  {} (max)\n",
        r.target,
        r.requests,
        r.ok,
        errors,
        r.elapsed_s,
        r.throughput_rps,
        pct(&r.latency_us),
        pct(&r.upstream_us),
        r.max_send_lag_us
    )
}

/// Parses `--data` (one JSON object) or a JSONL file's text (one per line).
pub fn templates(text: &str) -> Result<Vec<Template>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("request data line {}: {e}", i + 1))
        })
        .collect()
}

/// The first call number of the warm-up: far above the timed calls' prompt numbers, and low
/// enough that call × batch (its first prompt number) cannot overflow, so the warm-up never
/// sends a timed call's prompts (which, with a cache on, would make the timed call a hit).
fn warmup_base(batch: usize) -> u64 {
    u64::MAX / 2 / (batch.max(1) as u64)
}

/// A bare `cascade.v1.Router` that answers every Complete with a constant: the ceiling of
/// what tonic on this machine can serve, to compare the router's hot path against. Silent, it
/// never answers (for a client's own deadline).
pub mod bare {
    use tonic::{Request, Response, Status};

    use crate::proto::v1::{self, router_server::Router};

    /// Answers Complete with a constant; or never (`silent`); or, with `forward`, as the
    /// thinnest router could: the prompt sent on to an OpenAI-shaped `…/completions` over a
    /// pooled client and its text returned — the floor of what tonic and reqwest cost.
    pub struct Constant {
        pub silent: bool,
        pub forward: Option<(reqwest::Client, String)>,
    }

    #[tonic::async_trait]
    impl Router for Constant {
        async fn complete(
            &self,
            r: Request<v1::CompleteRequest>,
        ) -> Result<Response<v1::CompleteResponse>, Status> {
            if self.silent {
                std::future::pending::<()>().await;
            }
            let text = match &self.forward {
                None => "constant".into(),
                Some((client, url)) => {
                    let r = r.into_inner();
                    let body = serde_json::json!({"model": r.model, "prompt": r.prompt});
                    let answer: serde_json::Value = client
                        .post(url)
                        .json(&body)
                        .send()
                        .await
                        .and_then(reqwest::Response::error_for_status)
                        .map_err(|e| Status::unavailable(e.to_string()))?
                        .json()
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                    answer["choices"][0]["text"]
                        .as_str()
                        .unwrap_or_default()
                        .into()
                }
            };
            Ok(Response::new(v1::CompleteResponse {
                text,
                provider: "bare".into(),
                ..Default::default()
            }))
        }

        async fn complete_batch(
            &self,
            _r: Request<v1::CompleteBatchRequest>,
        ) -> Result<Response<v1::CompleteBatchResponse>, Status> {
            Err(Status::unimplemented(
                "the bare server answers Complete only",
            ))
        }

        type CompleteStreamStream = tokio_stream::Empty<Result<v1::CompleteStreamResponse, Status>>;

        async fn complete_stream(
            &self,
            _r: Request<v1::CompleteRequest>,
        ) -> Result<Response<Self::CompleteStreamStream>, Status> {
            Err(Status::unimplemented(
                "the bare server answers Complete only",
            ))
        }

        async fn list_providers(
            &self,
            _r: Request<v1::ListProvidersRequest>,
        ) -> Result<Response<v1::ListProvidersResponse>, Status> {
            Ok(Response::new(v1::ListProvidersResponse::default()))
        }

        async fn control_provider(
            &self,
            _r: Request<v1::ControlProviderRequest>,
        ) -> Result<Response<v1::ProviderStatus>, Status> {
            Err(Status::unimplemented(
                "the bare server answers Complete only",
            ))
        }

        async fn check_health(
            &self,
            _r: Request<v1::CheckHealthRequest>,
        ) -> Result<Response<v1::CheckHealthResponse>, Status> {
            Err(Status::unimplemented(
                "the bare server answers Complete only",
            ))
        }
    }

    pub async fn serve(
        listener: tokio::net::TcpListener,
        silent: bool,
    ) -> Result<(), tonic::transport::Error> {
        serve_with(
            listener,
            Constant {
                silent,
                forward: None,
            },
        )
        .await
    }

    /// The bare server as a proxy to `base` (an OpenAI-shaped URL ending in `/v1`).
    pub async fn serve_forwarding(
        listener: tokio::net::TcpListener,
        base: &str,
    ) -> Result<(), tonic::transport::Error> {
        // reqwest sets TCP_NODELAY by default, as the router's client does.
        let client = reqwest::Client::new();
        let url = format!("{}/completions", base.trim_end_matches('/'));
        serve_with(
            listener,
            Constant {
                silent: false,
                forward: Some((client, url)),
            },
        )
        .await
    }

    async fn serve_with(
        listener: tokio::net::TcpListener,
        server: Constant,
    ) -> Result<(), tonic::transport::Error> {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(v1::router_server::RouterServer::new(server))
            .serve_with_incoming(incoming)
            .await
    }
}
