//! `cascade.v1.Router/Complete` — the method nearly every call uses — served in front of
//! tonic's generated handler, with the rest of the service left to it.
//!
//! Hand-written for memory: a unary call in flight holds its handler's future for as long as
//! the providers take, and tonic's generated one is sized by its decoding step (2.2 KB) and
//! boxes the service's future again beside the request it was given (0.6 KB) — more than half
//! of what a call held (heaptrack, BENCHMARKS.md "memory"). Here the request is decoded by
//! tonic's own `Streaming` (the same limit, compression flag checks and errors) in a step
//! that ends before the call's work begins, and the answer is framed as tonic frames it: one
//! message, then `grpc-status: 0` in the trailers; an error is tonic's trailers-only status.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{
    FutureExt,
    future::{self, BoxFuture, Either},
};
use http_body::Frame;
use prost::Message;
use tonic::{
    Status,
    body::Body,
    codec::{BufferSettings, Streaming},
    codegen::{Service, http},
    server::NamedService,
};

use super::grpc::RouterService;
use crate::proto::v1;

const PATH: &str = "/cascade.v1.Router/Complete";

/// The request's first read buffer, grown to the message's length when its header says (tonic's
/// default, 8 KiB, was held by every call reading at once in a burst; a plain request is
/// some 100 bytes).
const READ_BUFFER: usize = 512;

/// The router's gRPC service with `Complete` answered here and every other method by
/// `inner` (the generated `RouterServer`).
#[derive(Clone)]
pub(crate) struct Complete<S> {
    inner: S,
    service: Arc<RouterService>,
    /// The largest request message decoded (`limits.max_message_bytes`).
    max_message: usize,
}

impl<S> Complete<S> {
    pub(crate) fn new(inner: S, service: Arc<RouterService>, max_message: usize) -> Complete<S> {
        Complete {
            inner,
            service,
            max_message,
        }
    }
}

impl<S: NamedService> NamedService for Complete<S> {
    const NAME: &'static str = S::NAME;
}

type Answer = Result<http::Response<Body>, Infallible>;

impl<S> Service<http::Request<Body>> for Complete<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    /// The other methods' futures as they are; `Complete`'s in its one box.
    type Future = Either<S::Future, BoxFuture<'static, Answer>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != PATH {
            return Either::Left(self.inner.call(req));
        }
        // Taken apart here, not in the future: what the call keeps of its request is its
        // deadline, its client and its body.
        let (parts, body) = req.into_parts();
        if let Err(status) = identity(&parts.headers) {
            return Either::Right(Box::pin(future::ready(Ok(status.into_http()))));
        }
        let caller = self.service.caller(&parts.headers, &parts.extensions);
        drop(parts);
        // Read, then answered: `then` holds one of the two at a time, where an `async` block
        // would keep what the reading needed (the body, the caller) beside the answer.
        let service = self.service.clone();
        Either::Right(Box::pin(
            read(body, self.max_message)
                .then(move |message| match message {
                    Err(status) => Either::Left(future::ready(status.into_http())),
                    Ok(message) => {
                        Either::Right(service.answer(message, caller).map(|answer| match answer {
                            Ok(response) => framed(&response),
                            Err(status) => status.into_http(),
                        }))
                    }
                })
                .map(Ok),
        ))
    }
}

/// Refuses a compressed request as tonic does when no compression is enabled.
fn identity(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(()),
        Some(other) => {
            let mut status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(other)
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("identity"),
            );
            Err(status)
        }
    }
}

/// The one request message, by tonic's decoder (its limit, its compression flag checks, its
/// errors). No message, or more than one, is the caller's mistake (INVALID_ARGUMENT; tonic
/// answers none with INTERNAL and drops a second unread).
async fn read(body: Body, max_message: usize) -> Result<v1::CompleteRequest, Status> {
    let decoder = tonic_prost::ProstCodec::<v1::CompleteResponse, v1::CompleteRequest>::raw_decoder(
        BufferSettings::new(READ_BUFFER, 32 << 10),
    );
    let mut stream = Streaming::new_request(decoder, body, None, Some(max_message));
    let unary = |n: &str| {
        Status::invalid_argument(format!(
            "{n} request messages on Complete, a unary method: send exactly one"
        ))
    };
    let message = stream.message().await?.ok_or_else(|| unary("no"))?;
    if stream.message().await?.is_some() {
        return Err(unary("more than one"));
    }
    Ok(message)
}

/// A unary answer as gRPC frames it: the message (uncompressed, length-prefixed), then the
/// trailers with `grpc-status: 0`.
fn framed(response: &v1::CompleteResponse) -> http::Response<Body> {
    let len = response.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Cannot fail: the buffer has room for the whole message.
    let _ = response.encode(&mut buf);
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames: [Result<Frame<Bytes>, Infallible>; 2] =
        [Ok(Frame::data(buf.freeze())), Ok(Frame::trailers(trailers))];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let mut http = http::Response::new(Body::new(body));
    http.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    http
}
#[cfg(test)]
mod tests {
    use super::*;

    /// The one allocation a `Complete` call holds while it waits, within jemalloc's 2 KiB size
    /// class (the next is 2.5 KiB): 1,952 bytes when written (release build), against 2,448
    /// before its futures were made to hold their arguments once.
    #[tokio::test]
    async fn a_complete_call_is_one_box_of_at_most_2_kib() {
        let service = Arc::new(RouterService::for_tests());
        let others = tower::service_fn(|_: http::Request<Body>| async {
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        });
        let mut complete = Complete::new(others, service, 1 << 20);
        let request = http::Request::builder()
            .uri(PATH)
            .body(Body::empty())
            .unwrap();
        let Either::Right(call) = complete.call(request) else {
            unreachable!("Complete is answered here")
        };
        let size = std::mem::size_of_val(&*call);
        assert!(size <= 2048, "a Complete call's future is {size} bytes");
    }
}
