//! Accepting client connections so that no client can hold the router: connections are capped
//! in total and per peer address (`limits.max_connections`, `max_connections_per_peer`) — a
//! connection beyond either is closed at once, before it costs more than its socket — and an
//! accept error (out of file descriptors, say) backs off instead of spinning. Both fronts
//! accept through [`Listener::accept`]; each connection carries a [`Guard`] that gives its
//! place back when the connection closes.
//!
//! Hand-written: tower's concurrency limits bound requests, not connections, and nothing in
//! tonic or hyper-util caps connections per peer.

mod idle;
pub mod tls;

pub use idle::{Connection, Track};

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use std::future::Future as _;

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};

/// Who holds how many connections, shared by the connections' guards (behind a std mutex: a
/// few instructions per accept and close, never held across an await).
#[derive(Default)]
struct Counts {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

pub struct Listener {
    inner: TcpListener,
    counts: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_peer: usize,
    /// Accepting fails now (said once in the log while it lasts).
    failing: bool,
}

/// A connection's place, given back when it is dropped.
pub struct Guard {
    counts: Arc<Mutex<Counts>>,
    peer: IpAddr,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.by_peer.remove(&self.peer);
            }
        }
    }
}

impl Listener {
    pub fn new(inner: TcpListener, max_total: usize, max_per_peer: usize) -> Listener {
        Listener {
            inner,
            counts: Arc::default(),
            max_total,
            max_per_peer,
            failing: false,
        }
    }

    /// The next connection within the caps, with `TCP_NODELAY`. One beyond a cap is closed
    /// (dropped) and the next awaited; it is counted in `refused`.
    pub async fn accept(
        &mut self,
        refused: &prometheus_client::metrics::counter::Counter,
    ) -> (TcpStream, SocketAddr, Guard) {
        let mut pause = Duration::from_millis(5);
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(accepted) => {
                    if self.failing {
                        tracing::info!("accepting connections again");
                        self.failing = false;
                    }
                    pause = Duration::from_millis(5);
                    accepted
                }
                Err(e) => {
                    if !self.failing {
                        tracing::warn!(error = %e, "cannot accept connections; retrying with backoff");
                        self.failing = true;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let ip = peer.ip();
            {
                let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
                let of_peer = c.by_peer.get(&ip).copied().unwrap_or(0);
                if c.total >= self.max_total || of_peer >= self.max_per_peer {
                    drop(c);
                    refused.inc();
                    tracing::debug!(%peer, "connection over the limits; closed");
                    continue;
                }
                c.total += 1;
                *c.by_peer.entry(ip).or_insert(0) += 1;
            }
            let _ = stream.set_nodelay(true);
            let guard = Guard {
                counts: self.counts.clone(),
                peer: ip,
            };
            return (stream, peer, guard);
        }
    }
}

/// A connection that holds its [`Guard`] for as long as it is open, is closed once no call
/// has run on it for `idle_after` (see [`idle`]; calls are counted by the [`Track`] layer,
/// which finds them by the [`Connection`] in their extensions), and optionally must send its
/// first byte by a deadline (a client that connects and says nothing is dropped).
pub struct Guarded {
    stream: TcpStream,
    _guard: Guard,
    first_byte_by: Option<Pin<Box<tokio::time::Sleep>>>,
    idle: idle::Idle,
}

impl Guarded {
    pub fn new(stream: TcpStream, guard: Guard, idle_after: Duration) -> Guarded {
        let peer = stream.peer_addr().ok();
        Guarded {
            stream,
            _guard: guard,
            first_byte_by: None,
            idle: idle::Idle::new(idle_after, peer),
        }
    }

    /// The connection is closed (its reads fail) if its first byte has not come `within`.
    pub fn first_byte_within(mut self, within: Duration) -> Guarded {
        self.first_byte_by = Some(Box::pin(tokio::time::sleep(within)));
        self
    }

    /// What requests on this connection carry for [`Track`].
    pub fn connection(&self) -> Connection {
        self.idle.connection()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > filled => self.idle.read(),
            // Idle for the timeout: end of stream, which closes the connection.
            Poll::Pending if self.idle.expired(cx) => return Poll::Ready(Ok(())),
            _ => {}
        }
        if let Some(by) = self.first_byte_by.as_mut() {
            if read.is_ready() {
                self.first_byte_by = None;
            } else if by.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no first byte in time",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = Connection;

    fn connect_info(&self) -> Connection {
        self.connection()
    }
}
