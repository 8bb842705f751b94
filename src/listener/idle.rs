//! Closing connections that carry no call (`limits.idle_timeout_seconds`), on both fronts.
//!
//! A connection is idle when no call has run on it for the timeout: HTTP/2 keepalive pings do
//! not count (they only prove the peer is alive), so a client cannot hold a connection by
//! answering pings. The [`Track`] layer in front of every request counts the calls running on
//! the request's [`Connection`] until its response body is done; the connection's reads
//! ([`Idle::expired`]) end in EOF once it has been quiet long enough, which closes it.
//!
//! Hand-written: hyper and tonic have keepalive pings and a maximum connection age but no
//! "no calls for N seconds" rule (grpc-go's `MaxConnectionIdle`).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};
use tonic::codegen::http;

/// Bytes read within this of the check keep the connection open even when no call is
/// counted yet: a request read but not yet handed to the service is not an idle connection.
const READ_GRACE: Duration = Duration::from_secs(1);

/// The calls running on one connection, and when the last one ended.
struct Activity {
    /// The connection's peer, for the operator API's loopback rule.
    peer: Option<std::net::SocketAddr>,
    running: AtomicUsize,
    epoch: Instant,
    /// Nanoseconds from `epoch` to when the last call ended (or the connection opened).
    quiet_since: AtomicU64,
}

impl Activity {
    fn since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// When the connection went quiet, or `None` while a call runs.
    fn quiet_since(&self) -> Option<Instant> {
        if self.running.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ns = self.quiet_since.load(Ordering::Acquire);
        Some(self.epoch + Duration::from_nanos(ns))
    }
}

/// The connection a request came on, put in the request's extensions (by tonic as the
/// connection's connect info; by the HTTP front itself) for [`Track`] to find.
#[derive(Clone)]
pub struct Connection(Arc<Activity>);

impl Connection {
    fn of<B>(req: &http::Request<B>) -> Option<&Connection> {
        Connection::in_extensions(req.extensions())
    }

    /// The connection a request's extensions name (plain, or as tonic's TLS connect info).
    pub fn in_extensions(ext: &http::Extensions) -> Option<&Connection> {
        use tonic::transport::server::TlsConnectInfo;
        ext.get::<Connection>()
            .or_else(|| ext.get::<TlsConnectInfo<Connection>>().map(|t| t.get_ref()))
    }

    /// The connection's peer.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.0.peer
    }

    fn begin(&self) -> Busy {
        self.0.running.fetch_add(1, Ordering::AcqRel);
        Busy(self.0.clone())
    }
}

/// One call running on a connection; it ends when this is dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.since_epoch(Instant::now());
        self.0.quiet_since.store(now, Ordering::Release);
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's idle rule, kept by its reads.
pub(super) struct Idle {
    activity: Arc<Activity>,
    after: Duration,
    check: Pin<Box<Sleep>>,
    /// The waker `check` wakes, once polled since it was last set: polling it again for the
    /// same task only registers the same waker (a tenth of a cache hit's timer cost).
    armed: Option<std::task::Waker>,
    last_read: Instant,
}

impl Idle {
    pub(super) fn new(after: Duration, peer: Option<std::net::SocketAddr>) -> Idle {
        let now = Instant::now();
        Idle {
            activity: Arc::new(Activity {
                peer,
                running: AtomicUsize::new(0),
                epoch: now,
                quiet_since: AtomicU64::new(0),
            }),
            after,
            check: Box::pin(tokio::time::sleep_until(now + after)),
            armed: None,
            last_read: now,
        }
    }

    pub(super) fn connection(&self) -> Connection {
        Connection(self.activity.clone())
    }

    /// Bytes came in.
    pub(super) fn read(&mut self) {
        self.last_read = Instant::now();
    }

    /// Whether the connection has been idle for the timeout, checked when its read would wait;
    /// otherwise the next check is scheduled (and its wake-up registered with `cx`).
    pub(super) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let armed = self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if armed && !self.check.is_elapsed() {
            return false;
        }
        while self.check.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let due = match self.activity.quiet_since() {
                None => now + self.after,
                Some(quiet) => (quiet + self.after).max(self.last_read + READ_GRACE),
            };
            if due <= now {
                return true;
            }
            self.check.as_mut().reset(due);
        }
        if !armed {
            self.armed = Some(cx.waker().clone());
        }
        false
    }
}

/// The layer in front of every request that counts it as running on its connection until its
/// response body is done (or dropped).
#[derive(Clone, Copy, Debug, Default)]
pub struct Track;

impl<S> tower::Layer<S> for Track {
    type Service = TrackService<S>;

    fn layer(&self, inner: S) -> TrackService<S> {
        TrackService(inner)
    }
}

#[derive(Clone, Debug)]
pub struct TrackService<S>(S);

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TrackService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = TrackFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let busy = Connection::of(&req).map(Connection::begin);
        TrackFuture {
            inner: self.0.call(req),
            busy,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TrackFuture<F> {
        #[pin]
        inner: F,
        busy: Option<Busy>,
    }
}

impl<F, B, E> Future for TrackFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let busy = this.busy.take();
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, _busy: busy })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its call's place on the connection until it is dropped.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        _busy: Option<Busy>,
    }
}

impl<B: http_body::Body> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_on(conn: &Connection) -> http::Request<()> {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(conn.clone());
        req
    }

    /// Polls `expired` once with a no-op waker.
    fn expired(idle: &mut Idle) -> bool {
        idle.expired(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_after_its_last_call_and_recent_reads() {
        let mut idle = Idle::new(Duration::from_secs(10), None);
        let conn = idle.connection();
        assert!(!expired(&mut idle), "just opened");

        // A call runs for 30 s: never idle meanwhile.
        let busy = Connection::of(&request_on(&conn)).map(Connection::begin);
        assert!(busy.is_some());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!expired(&mut idle), "a call is running");
        drop(busy);

        // Quiet since now: idle 10 s later, not before.
        tokio::time::advance(Duration::from_millis(9_500)).await;
        assert!(!expired(&mut idle));
        idle.read(); // a ping's answer, say
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(!expired(&mut idle), "bytes just read hold it for the grace");
        tokio::time::advance(READ_GRACE).await;
        assert!(
            expired(&mut idle),
            "quiet for the timeout; reads alone do not keep it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_body_holds_the_call_until_it_is_dropped() {
        use tower::{Layer as _, Service as _};
        let mut idle = Idle::new(Duration::from_secs(1), None);
        let conn = idle.connection();
        let mut svc = Track.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("body")))
        }));
        let response = svc.call(request_on(&conn)).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!expired(&mut idle), "the answer's body is still being sent");
        drop(response);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(expired(&mut idle));
        // A request that names no connection passes untouched.
        let untracked = svc.call(http::Request::new(())).await;
        assert!(untracked.is_ok());
    }
}
