//! The two fronts callers reach — gRPC (`grpc`, its hot method in `unary`) and the OpenAI-compatible HTTP API
//! (`openai`) — over `edge`, what both do with a request once it is decoded; and the
//! operator's status page and API (`status`) on the HTTP front's listener.

pub(crate) mod edge;
pub(crate) mod grpc;
pub(crate) mod openai;
pub(crate) mod status;
pub(crate) mod unary;
