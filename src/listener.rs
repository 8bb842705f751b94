//! Accepting client connections so that no client can hold the router: connections are capped
//! in total and per peer address (`limits.max_connections`, `max_connections_per_peer`) — a
//! connection beyond either is closed at once, before it costs more than its socket — and an
//! accept error (out of file descriptors, say) backs off instead of spinning. Both fronts
//! accept through [`Listener::accept`]; each connection carries a [`Guard`] that gives its
//! place back when the connection closes.
//!
//! Hand-written: tower's concurrency limits bound requests, not connections, and nothing in
//! tonic or hyper-util caps connections per peer.

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

/// A connection that holds its [`Guard`] for as long as it is open, and optionally must send
/// its first byte by a deadline (a client that connects and says nothing is dropped).
pub struct Guarded {
    stream: TcpStream,
    _guard: Guard,
    first_byte_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Guarded {
    pub fn new(stream: TcpStream, guard: Guard) -> Guarded {
        Guarded {
            stream,
            _guard: guard,
            first_byte_by: None,
        }
    }

    /// The connection is closed (its reads fail) if its first byte has not come `within`.
    pub fn first_byte_within(mut self, within: Duration) -> Guarded {
        self.first_byte_by = Some(Box::pin(tokio::time::sleep(within)));
        self
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
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

/// Connections over TLS: each handshake runs in a task of its own, cut at `timeout` (a client
/// that never finishes one is dropped and holds nothing), and the finished ones come out in
/// the order they finish. Ends when the stream is dropped.
pub fn tls(
    mut listener: Listener,
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    refused: prometheus_client::metrics::counter::Counter,
) -> impl futures_util::Stream<Item = io::Result<tokio_rustls::server::TlsStream<Guarded>>> {
    // Bounded: handshakes finished but not yet taken wait here, at most this many.
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let (stream, peer, guard) = tokio::select! {
                accepted = listener.accept(&refused) => accepted,
                () = tx.closed() => return,
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let io = Guarded::new(stream, guard);
                match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake not finished in time; dropped"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS acceptor for a certificate chain and key (PEM), speaking HTTP/2 (gRPC).
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> io::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("the certificate chain is not PEM"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| bad("the key is not PEM"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}
