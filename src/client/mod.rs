//! The agent side: `cascade-router complete` and `cascade-router batch`, gRPC clients of a
//! running router, for scripts and shell loops; and `cascade-router spend`, the ledger.
//!
//! Exit codes, so a script can act on the outcome without parsing text ([`exit_code`]):
//! 0 answered; 2 usage or an invalid request; 3 unavailable (the router cannot be reached,
//! or no provider answered); 4 deadline exceeded; 5 resource exhausted (a quota, a full
//! queue); 6 unauthenticated or not allowed; 1 anything else.

pub mod batch;
pub mod openai_json;
pub mod spend;

use std::{fmt, path::PathBuf, time::Duration};

use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::proto::v1::{self, router_client::RouterClient};

/// Where the router is and how to reach it.
#[derive(Clone)]
pub struct Target {
    /// `http://host:port` or `https://host:port`.
    pub addr: String,
    /// The client key, sent as `authorization: Bearer <key>`.
    pub key: Option<String>,
    /// Each call's deadline (sent as `grpc-timeout`).
    pub timeout: Duration,
    /// Extra CA certificate (PEM) to trust for an `https://` router.
    pub ca_file: Option<PathBuf>,
}

// The key never appears in Debug output.
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// A failure before any call could be made, or of the whole call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the router at {addr}: {cause}")]
    Unreachable { addr: String, cause: String },
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(Status),
    #[error("{0}")]
    Io(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) => 2,
            ClientError::Unreachable { .. } => 3,
            ClientError::Status(s) => exit_code(s.code()),
            ClientError::Io(_) => 1,
        }
    }
}

/// The process exit code for a call that ended with `code` (see the module docs).
pub fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::InvalidArgument | Code::NotFound | Code::OutOfRange | Code::FailedPrecondition => 2,
        Code::Unavailable => 3,
        Code::DeadlineExceeded => 4,
        Code::ResourceExhausted => 5,
        Code::Unauthenticated | Code::PermissionDenied => 6,
        _ => 1,
    }
}

/// The gRPC name of a code, as in the spec (`UNAVAILABLE`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A connected client and the target it was made for.
#[derive(Clone)]
pub struct Client {
    inner: RouterClient<Channel>,
    target: Target,
}

impl Client {
    /// Connects to the router (one HTTP/2 connection, multiplexed by every call).
    pub async fn connect(target: Target) -> Result<Client, ClientError> {
        let mut endpoint = Endpoint::from_shared(target.addr.clone())
            .map_err(|e| {
                ClientError::Usage(format!(
                    "--addr {:?} is not a URL ({e}); e.g. http://127.0.0.1:50051",
                    target.addr
                ))
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if target.addr.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(path) = &target.ca_file {
                let pem = std::fs::read(path).map_err(|e| {
                    ClientError::Usage(format!("--ca-file {}: {e}", path.display()))
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ClientError::Usage(format!("TLS: {e}")))?;
        } else if !target.addr.starts_with("http://") {
            return Err(ClientError::Usage(format!(
                "--addr {:?} must start with http:// or https://",
                target.addr
            )));
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Unreachable {
                addr: target.addr.clone(),
                cause: root_cause(&e),
            })?;
        Ok(Client {
            inner: RouterClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            target,
        })
    }

    /// `msg` with the deadline and the client key.
    fn request<T>(&self, msg: T) -> Result<Request<T>, ClientError> {
        let mut r = Request::new(msg);
        r.set_timeout(self.target.timeout);
        if let Some(key) = &self.target.key {
            let mut v: MetadataValue<_> = format!("Bearer {}", key.trim())
                .parse()
                .map_err(|_| ClientError::Usage("the client key is not valid metadata".into()))?;
            v.set_sensitive(true);
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }

    pub async fn complete(
        &mut self,
        msg: v1::CompleteRequest,
    ) -> Result<v1::CompleteResponse, ClientError> {
        let req = self.request(msg)?;
        self.inner
            .complete(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| ClientError::Status(self.timed_out(s)))
    }

    /// tonic says CANCELLED when the client's own timer ends a call; it is the deadline.
    fn timed_out(&self, s: Status) -> Status {
        if s.code() == Code::Cancelled && s.message() == tonic::TimeoutExpired(()).to_string() {
            return Status::deadline_exceeded(format!(
                "no answer within {} s (--timeout)",
                self.target.timeout.as_secs_f64()
            ));
        }
        s
    }

    pub async fn complete_batch(
        &mut self,
        requests: Vec<v1::CompleteRequest>,
    ) -> Result<Vec<v1::BatchResult>, Status> {
        let req = self
            .request(v1::CompleteBatchRequest { requests })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.inner
            .complete_batch(req)
            .await
            .map(|r| r.into_inner().results)
            .map_err(|s| self.timed_out(s))
    }
}

/// What `complete` asks: a prompt, and optionally images, tools and an output format (any of
/// which sends the prompt as a user message).
pub struct Ask {
    pub model: String,
    pub agent: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    /// Image files (PNG, JPEG, GIF, WebP), sent as bytes after the prompt.
    pub images: Vec<PathBuf>,
    /// A JSON file: a list of tools in OpenAI's shape.
    pub tools: Option<PathBuf>,
    /// `json` for a JSON object, or a JSON schema file.
    pub response_format: Option<String>,
    pub prompt: String,
}

impl Ask {
    pub fn into_request(self) -> Result<v1::CompleteRequest, ClientError> {
        let usage = ClientError::Usage;
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| usage(format!("{flag} {}: {e}", path.display())))
        };
        let json = |flag: &str, path: &PathBuf| -> Result<serde_json::Value, ClientError> {
            serde_json::from_slice(&read(flag, path)?)
                .map_err(|e| usage(format!("{flag} {}: not JSON ({e})", path.display())))
        };
        let mut r = v1::CompleteRequest {
            model: self.model,
            agent: self.agent,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            ..Default::default()
        };
        if let Some(path) = &self.tools {
            let v = json("--tools", path)?;
            let list = v.get("tools").unwrap_or(&v);
            r.tools = openai_json::tools(list, "--tools").map_err(usage)?;
        }
        r.response_format = match self.response_format.as_deref() {
            None => None,
            Some("json") => Some(v1::ResponseFormat {
                r#type: "json_object".into(),
                ..Default::default()
            }),
            Some(file) => {
                let path = PathBuf::from(file);
                let schema = json("--response-format", &path)?;
                let name: String = path
                    .file_stem()
                    .map(|s| s.to_string_lossy())
                    .unwrap_or_default()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .take(64)
                    .collect();
                Some(v1::ResponseFormat {
                    r#type: "json_schema".into(),
                    name,
                    schema_json: schema.to_string(),
                    ..Default::default()
                })
            }
        };
        if self.images.is_empty() && r.tools.is_empty() && r.response_format.is_none() {
            r.prompt = self.prompt;
            return Ok(r);
        }
        let mut parts = vec![v1::ContentPart {
            part: Some(v1::content_part::Part::Text(self.prompt)),
        }];
        for path in &self.images {
            let mime = openai_json::image_type(path).ok_or_else(|| {
                usage(format!(
                    "--image {}: name a .png, .jpg, .gif or .webp file",
                    path.display()
                ))
            })?;
            parts.push(v1::ContentPart {
                part: Some(v1::content_part::Part::Image(v1::Image {
                    source: Some(v1::image::Source::Data(read("--image", path)?.into())),
                    mime_type: mime.into(),
                    detail: String::new(),
                })),
            });
        }
        r.messages = vec![v1::ChatMessage {
            role: "user".into(),
            parts,
            ..Default::default()
        }];
        Ok(r)
    }
}

/// The innermost cause of a connection error ("Connection refused"), which says the most.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A response as one JSON object, the shape `complete --json` prints and `batch` writes.
pub fn response_json(r: &v1::CompleteResponse) -> serde_json::Value {
    let attempts: Vec<serde_json::Value> = r
        .attempts
        .iter()
        .map(|a| {
            serde_json::json!({
                "provider": a.provider,
                "model": a.model,
                "kind": a.kind().as_str_name(),
                "http_status": a.http_status,
                "error": a.error,
                "tries": a.tries,
            })
        })
        .collect();
    serde_json::json!({
        "text": r.text,
        "provider": r.provider,
        "model": r.model,
        "finish_reason": r.finish_reason,
        "usage": r.usage.as_ref().map(|u| serde_json::json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
        })),
        "cached": r.cached,
        "batch_size": r.batch_size,
        "queue_wait_us": r.queue_wait_us,
        "upstream_us": r.upstream_us,
        "request_id": r.request_id,
        "attempts": attempts,
        "tool_calls": r.tool_calls.iter().map(|c| serde_json::json!({
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        })).collect::<Vec<_>>(),
    })
}
