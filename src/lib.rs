//! cascade-router: a gRPC service that AI agents call for model completions. It routes each
//! prompt through an ordered cascade of providers over pooled HTTP connections and falls back,
//! in order, when one fails.
//!
//! # Layout
//!
//! The modules follow a request's path (see `../shared/DESIGN.md`):
//!
//! ```text
//! agent ─gRPC─▶ server ─▶ router ─▶ cascade ─▶ batcher ─▶ provider ─HTTP─▶ model server
//! ```
//!
//! - [`server`]: the tonic service — deadline, proto → domain at the edge, health, reflection.
//! - [`proto`]: generated `cascade.v1` types and their conversion to and from [`completion`].
//! - [`completion`]: validated domain values: the request, the completion, the attempts.
//! - [`router`]: resolves a request's model, chain or agent to an ordered list of targets.
//! - [`cascade`]: the ordered fallback loop with retries, a budget per attempt and breakers.
//! - [`batcher`]: per-provider micro-batching: a window, a size cap, deadlines, cancellation.
//! - [`upstream`]: a provider with its breaker, concurrency cap and counters.
//! - [`breaker`]: per-provider circuit breaker and `Retry-After` cool-down.
//! - [`provider`]: one module per upstream API behind one trait, each with a pooled client.
//! - [`config`]: the cascade file: raw serde structs → validation → runtime values.
//! - [`error`]: the router's error type and its one mapping to `tonic::Status`.
//! - [`load`]: the load harness (`cascade-router load`) and a bare tonic server for baselines.
//! - [`mock`]: a real HTTP model server with scripted latency and faults, for tests and demos.

pub mod cache;
pub mod cascade;
pub mod coalescer;
pub mod completion;
pub mod config;
pub mod error;
pub mod metrics;
pub mod proto;
pub mod provider;
pub mod router;
pub mod server;
pub mod upstream;
