//! The cascade-router team's tools, kept out of the product: they are what tests, benchmarks
//! and demos run the router against and with.
//!
//! - [`mock`]: a real HTTP model server (OpenAI and Ollama shapes) with scripted latency,
//!   concurrency and faults; its latency kept on time by [`timer`].
//! - [`load`]: the load harness (ghz's knobs, open or closed loop, HDR percentiles), and
//!   [`load::bare`], a constant-answering tonic server: the gRPC ceiling baseline.
//! - [`proto`]: the product's `cascade.v1` contract, generated from the same proto file.

#![forbid(unsafe_code)]

pub mod conversation;
pub mod load;
pub mod mock;
pub mod timer;

/// `cascade.v1`, generated from `../proto` (client and server).
pub mod proto {
    pub mod v1 {
        tonic::include_proto!("cascade.v1");
    }
}
