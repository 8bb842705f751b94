//! Client connections over TLS: handshakes done here, apart from the accept loop and cut at a
//! timeout (tonic's own TLS has none), so a client that never finishes one holds nothing.

use std::{io, sync::Arc, time::Duration};

use super::{Guarded, Listener};

/// Connections over TLS: each handshake runs in a task of its own, cut at `timeout` (a client
/// that never finishes one is dropped and holds nothing), and the finished ones come out in
/// the order they finish. Ends when the stream is dropped.
pub fn incoming(
    mut listener: Listener,
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    refused: prometheus_client::metrics::counter::Counter,
    make: impl Fn(tokio::net::TcpStream, super::Guard) -> Guarded + Send + 'static,
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
            let io = make(stream, guard);
            tokio::spawn(async move {
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

/// The TLS acceptor for a certificate chain and key (PEM), offering the ALPN protocols
/// `alpn` (`h2` for gRPC; `h2` and `http/1.1` for the HTTP front).
pub fn acceptor(
    cert_pem: &[u8],
    key_pem: &[u8],
    alpn: &[&[u8]],
) -> io::Result<tokio_rustls::TlsAcceptor> {
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
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
