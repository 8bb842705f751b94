//! Serving: the composition root. Builds the edge both fronts share, serves the gRPC front
//! (`cascade.v1.Router`, health, reflection) and the OpenAI-compatible HTTP front through the
//! listeners, and drains on shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::{codegen::http, service::interceptor::InterceptedService};

use crate::{
    auth::Authenticate,
    config::ServerConfig,
    front::{edge::Edge, grpc::RouterService, unary::Complete},
    inflight::InFlight,
    listener::{Guarded, Listener, Track},
    proto::{self, v1::router_server::RouterServer},
    router::Router,
};

/// Errors that stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics listener on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
    #[error("server.http_listen {0}: {1}")]
    Http(std::net::SocketAddr, std::io::Error),
    #[error("server.tls: {0}")]
    Tls(std::io::Error),
}

/// How long, after the calls in flight are answered, connections get to deliver those answers
/// and close before the process moves on; an idle client that keeps its connection open does
/// not hold the exit longer than this.
const FLUSH: Duration = Duration::from_millis(500);

/// Serves `cascade.v1.Router`, `grpc.health.v1.Health` and reflection (v1 and v1alpha) on
/// `listener` until `shutdown` completes, then drains: health turns NOT_SERVING, the listener
/// stops accepting, connections get GOAWAY, and calls in flight have
/// `server.shutdown_grace` to finish; those still running then get UNAVAILABLE.
pub async fn serve(
    router: Arc<Router>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RouterServer<RouterService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let inflight = Arc::new(InFlight::new(config.limits.max_in_flight));
    // Dropped (and so stopped) when serving ends.
    let _metrics = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Metrics(addr, e))?;
            let (scraped, running) = (router.clone(), inflight.clone());
            let task = tokio::spawn(crate::metrics::serve(
                Arc::new(move || {
                    scraped.metrics().in_flight(running.count());
                    scraped.render_metrics()
                }),
                listener,
            ));
            Some(AbortOnDrop(task))
        }
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let stamp = tower::ServiceBuilder::new()
        .map_response(crate::error::recode_codec_refusal::<tonic::body::Body>)
        .map_request(|mut r: http::Request<tonic::body::Body>| {
            crate::front::grpc::stamp_arrival(&mut r);
            r
        });
    let auth = Authenticate::new(config.auth.as_ref(), router.metrics().unauthenticated());
    let grace = config.shutdown_grace;
    let refused = router.metrics().connections_refused();
    let spend = router.spend().clone();
    let edge = Arc::new(Edge::new(router, config.clone(), inflight.clone()));
    let service = Arc::new(RouterService::new(edge.clone()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // TLS handshakes are the listeners' (with a timeout: tonic's own have none).
    let acceptor = |alpn: &[&[u8]]| {
        config
            .tls
            .as_ref()
            .map(|tls| crate::listener::tls::acceptor(&tls.cert_pem, &tls.key_pem, alpn))
            .transpose()
            .map_err(ServeError::Tls)
    };
    // Dropped (and so stopped) when serving ends; stops accepting when the drain begins.
    let _http = match config.http_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Http(addr, e))?;
            let tls = acceptor(&[b"h2", b"http/1.1"])?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), tls = tls.is_some(), "OpenAI-compatible HTTP front listening (and the status page, /status)");
            let board = Arc::new(crate::status::Board::default());
            let sampling = board.run(edge.router.clone());
            let app = crate::front::openai::app(edge.clone(), auth.clone(), board);
            let listener = Listener::new(
                listener,
                config.limits.max_connections,
                config.limits.max_connections_per_peer,
            );
            let task = tokio::spawn(crate::front::openai::serve(
                app,
                listener,
                config.limits.clone(),
                tls,
                edge.router.metrics().connections_refused(),
                stopped.clone(),
            ));
            Some((AbortOnDrop(task), AbortOnDrop(sampling)))
        }
    };
    let acceptor = acceptor(&[b"h2"])?;
    let routes = tonic::transport::Server::builder()
        // Fixed, generous flow-control windows rather than the adaptive one: h2 closes a
        // connection (GOAWAY ENHANCE_YOUR_CALM) once the small DATA frames it buffers exceed
        // half its connection window, and with the 64 KiB starting window that is ~140
        // unary calls arriving at once on one connection. 16 MiB allows tens of thousands.
        .initial_connection_window_size(Some(16 << 20))
        .initial_stream_window_size(Some(1 << 20))
        // No HTTP/2 keepalive pings from the server (grpc-go's default sends none for two
        // hours): a dead peer's connection is closed by the idle rule once its calls end, and
        // each call by its deadline. hyper's pinger read the clock on every frame — 1.1k of a
        // cache hit's 71k instructions (`benches/scenarios.py callgrind`). Clients' own pings
        // are answered.
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_concurrent_streams(config.limits.max_concurrent_streams)
        .max_connection_age(config.limits.max_connection_age)
        .max_connection_age_grace(config.request_timeout)
        // Outermost: counts each call on its connection (the idle rule), around its body.
        .layer(Track)
        .layer(stamp)
        // Every service but health needs a client key when authentication is on.
        .add_service(InterceptedService::new(
            Complete::new(
                RouterServer::from_arc(service.clone())
                    .max_decoding_message_size(config.limits.max_message_bytes),
                service,
                config.limits.max_message_bytes,
            ),
            auth.clone(),
        ))
        .add_service(health)
        .add_service(InterceptedService::new(reflection_v1, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth));
    let listener = Listener::new(
        listener,
        config.limits.max_connections,
        config.limits.max_connections_per_peer,
    );
    let stop_serving = async move {
        let mut stopped = stopped;
        let _ = stopped.wait_for(|s| *s).await;
    };
    let serving: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match acceptor {
        None => Box::pin(routes.serve_with_incoming_shutdown(
            incoming(listener, &config.limits, refused),
            stop_serving,
        )),
        Some(acceptor) => {
            let idle = config.limits.idle_timeout;
            Box::pin(routes.serve_with_incoming_shutdown(
                crate::listener::tls::incoming(
                    listener,
                    acceptor,
                    config.limits.handshake_timeout,
                    refused,
                    move |stream, guard| Guarded::new(stream, guard, idle),
                ),
                stop_serving,
            ))
        }
    };
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => return Ok(served?),
        () = shutdown => {}
    }

    tracing::info!(
        in_flight = inflight.count(),
        grace_s = grace.as_secs_f64(),
        "draining: refusing new calls, finishing those in flight"
    );
    health_reporter
        .set_not_serving::<RouterServer<RouterService>>()
        .await;
    inflight.drain();
    let _ = stop.send(true);
    let drained = drain(&mut serving, &inflight, grace).await;
    // What this router spent since its last write to the fleet's Redis, and its leases.
    spend.write_back().await;
    tracing::info!("drained");
    drained
}

/// Waits for the calls in flight (at most `grace`, then answers the rest UNAVAILABLE) and
/// for the connections to deliver their answers.
async fn drain(
    serving: &mut (impl Future<Output = Result<(), tonic::transport::Error>> + Unpin),
    inflight: &InFlight,
    grace: Duration,
) -> Result<(), ServeError> {
    tokio::select! {
        served = &mut *serving => return Ok(served?),
        () = inflight.idle() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(
                in_flight = inflight.count(),
                "shutdown grace is over: answering the calls still running with UNAVAILABLE"
            );
            inflight.abandon();
            let _ = tokio::time::timeout(FLUSH, inflight.idle()).await;
        }
    }
    // Every call is answered: let the connections deliver the answers and close.
    let _ = tokio::time::timeout(FLUSH, &mut *serving).await;
    Ok(())
}

/// The gRPC front's connections, within the caps (see [`Listener::accept`]); one that sends
/// nothing (not even the HTTP/2 preface) within the handshake timeout is dropped, and one
/// idle for the idle timeout closed.
fn incoming(
    listener: Listener,
    limits: &crate::config::Limits,
    refused: prometheus_client::metrics::counter::Counter,
) -> impl futures_util::Stream<Item = Result<Guarded, std::io::Error>> {
    let (first_byte, idle) = (limits.handshake_timeout, limits.idle_timeout);
    futures_util::stream::unfold(listener, move |mut listener| {
        let refused = refused.clone();
        async move {
            let (stream, _, guard) = listener.accept(&refused).await;
            let conn = Guarded::new(stream, guard, idle).first_byte_within(first_byte);
            Some((Ok(conn), listener))
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
