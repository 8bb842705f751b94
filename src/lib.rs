//! cascade-router: a gRPC service that AI agents call for model completions. It routes each
//! prompt through an ordered cascade of providers over pooled HTTP connections, batches
//! prompts that arrive together, caches deterministic answers, and falls back, in order, when
//! a provider fails.
//!
//! # Layout
//!
//! The modules follow a request's path (the same map as the README's):
//!
//! ```text
//! agent ─gRPC─▶ front/grpc ───┐
//!               (proto)        ├▶ front/edge ─▶ router ─▶ cache ─▶ coalescer ─▶ cascade ─▶ upstream ─────────▶ provider ─HTTP─▶ model
//! agent ─HTTP─▶ front/openai ─┘  admit,         routes    hit?     same request  plan,      attempt rules,       one module per API,
//!               (wire JSON)      in flight                         in flight?    ordered    breaker, slots,      pooled client,
//!                                                                                targets,   batch queues         SSE/NDJSON streams
//!                                                                                retries
//! ```
//!
//! - `front`: the two fronts — `grpc` (the `cascade.v1.Router` handlers, the caller's
//!   deadline; [`proto`] converts wire types to validated domain values and `auth` checks
//!   client keys; `unary` frames `Complete`, the hot method, in one small box a call) and `openai` (the OpenAI-compatible HTTP API) — over `edge`, what both
//!   share: a place in flight, admission (limits, the client's models, quotas), a span per
//!   request, answering or streaming, each call counted. [`server`] is the composition root
//!   that serves them (with health, reflection and the drain).
//! - `completion`: those domain values: the request (messages with parts, images and tool
//!   turns; sampling fields, tools and response format in `GenParams`), the completion, the
//!   attempts.
//! - `router` ([`Router`]; `routes` resolves a model, chain or agent to ordered targets):
//!   runs the request through the stages below; `relay` passes a stream on to its caller and
//!   caches it when it completes.
//! - `cache`: the completion cache (moka in memory, Redis shared by replicas — a guest that is
//!   skipped while it fails), keyed by a hash.
//! - `coalescer`: identical deterministic requests in flight share one upstream call.
//! - `cascade`: the plan (the targets that can take the request — `capability`: what it
//!   needs; capabilities, context window, the fields each provider's API carries — walking
//!   `fallback_chains.<capability>` when the route lacks one), then the ordered fallback loop
//!   with retries and backoff inside the deadline.
//! - `upstream`: one provider's health and load — its endpoints (`replica`) and how requests
//!   spread over them (`balance`), an attempt's rules (`attempt`), each endpoint's breaker,
//!   health checks, concurrency limit (fixed or learned), counters and batch queues — and the
//!   one way a request is sent to it.
//! - `rate`: provider quotas (requests and tokens per minute) and per-client quotas.
//! - `provider`: one module per upstream API behind one trait, each with a pooled client.
//! - [`config`]: the cascade file: raw serde structs → validation by concern → runtime values.
//! - `inflight`: the bound on calls in flight and the drain at shutdown; `listener`: how both
//!   fronts accept — connection caps, TLS handshakes with a timeout, idle connections closed.
//! - `error`: the router's error type and its one table of gRPC codes, HTTP statuses and
//!   OpenAI error types; `failure`: why a try got no answer (kinds, attempts), a leaf.
//! - `metrics`: the Prometheus registry served at `server.metrics_listen`.
//! - `control`: what operators do to providers at run time (enable, disable, drain, reset a
//!   circuit), kept across reloads; `status`: what the status page and `/api/status` show
//!   (`front/status` serves them).
//! - `fuzzing` (tests, feature `fuzzing`): the untrusted-input entry points that the property
//!   tests and the fuzz targets in `fuzz/` drive.
//!
//! - [`client`]: the agent side — `cascade-router complete` and `cascade-router batch`.
//!
//! The team's tools (mock provider, load harness) live in the `devtools` crate, not here.

pub mod client;
pub mod config;
pub mod proto;
pub mod server;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;

mod auth;
mod cache;
mod capability;
mod cascade;
mod coalescer;
mod completion;
mod control;
mod cost;
mod error;
mod failure;
mod fleet;
mod front;
mod inflight;
mod listener;
mod metrics;
mod provider;
mod rate;
mod router;
mod spend;
mod status;
mod store;
mod upstream;

pub use completion::CompletionRequest;
pub use error::RouterError;
pub use router::{BuildError, Router, Routes};
