//! The gRPC front: the `cascade.v1.Router` handlers, the caller's deadline, and proto ↔
//! domain conversion. Everything behind it works on domain values. (Serving it, with health,
//! reflection and the drain, is `crate::server`'s.)

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt, future::BoxFuture, stream::BoxStream};
use tokio::{task::JoinSet, time::Instant};
use tonic::{Request, Response, Status, codegen::http};

use super::edge::{Edge, StreamCall};
use crate::{
    auth::Client,
    completion::{CompletionRequest, StreamEvent},
    error::RouterError,
    proto::{micros, v1},
};

/// We give up a little before the client's deadline — 5% of it, between 1 and 25 ms — so
/// that our DEADLINE_EXCEEDED, with its list of attempts, reaches the client before the
/// client's own timer fires (tonic clients report that as a bare CANCELLED) and before tonic's
/// server-side timer does the same.
fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(1), Duration::from_millis(25))
}

/// The caller's deadline header, named once: looking a header up by a `&str` parses the name
/// each time (~150 instructions of a cache hit).
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// When the request arrived, stamped by [`stamp_arrival`] in front of every handler.
#[derive(Clone, Copy, Debug)]
struct Arrival(Instant);

/// Stamps a request's arrival (deadlines count from it); done by a layer in front of every
/// handler (`crate::server`).
pub(crate) fn stamp_arrival<B>(r: &mut http::Request<B>) {
    r.extensions_mut().insert(Arrival(Instant::now()));
}

pub struct RouterService {
    edge: Arc<Edge>,
}

impl RouterService {
    pub(crate) fn new(edge: Arc<Edge>) -> RouterService {
        RouterService { edge }
    }

    /// A wire request validated and admitted.
    async fn admit(
        &self,
        msg: v1::CompleteRequest,
        client: Option<&Client>,
    ) -> Result<Arc<CompletionRequest>, RouterError> {
        self.edge
            .admit(CompletionRequest::try_from(msg)?, client)
            .await
    }

    /// The caller's deadline from `grpc-timeout`, or the configured default.
    fn deadline<T>(&self, req: &Request<T>) -> Instant {
        self.deadline_of(req.metadata().as_ref(), req.extensions())
    }

    fn deadline_of(&self, headers: &http::HeaderMap, extensions: &http::Extensions) -> Instant {
        let arrival = extensions
            .get::<Arrival>()
            .map_or_else(Instant::now, |a| a.0);
        let timeout = headers
            .get(&GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|t| t.saturating_sub(deadline_margin(t)))
            .unwrap_or(self.edge.config.request_timeout);
        arrival + timeout
    }

    /// What a unary call keeps of its request's headers and extensions.
    pub(crate) fn caller(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Caller {
        Caller {
            deadline: self.deadline_of(headers, extensions),
            client: extensions.get::<Client>().cloned(),
        }
    }

    /// One completion: validated and admitted now, answered by the future. Not an `async fn`:
    /// the wire request (500 bytes) is gone before the future is made, which holds only what
    /// the answer needs (an `async fn` keeps its arguments for the whole call: 1.2 KiB more
    /// per call in flight when this was the handler). The work is pinned inside the future,
    /// so the call is one allocation; it owns its edge, so a caller can drop what made it.
    pub(crate) fn answer(
        &self,
        message: v1::CompleteRequest,
        caller: Caller,
    ) -> impl Future<Output = Result<v1::CompleteResponse, Status>> + Send + use<> {
        let Caller { deadline, client } = caller;
        // The refusal boxed: most calls are admitted, and the future keeps this for its life.
        let accepted = CompletionRequest::try_from(message)
            .and_then(|r| self.edge.accept(r, client.as_ref()))
            .map_err(Box::new);
        let edge = self.edge.clone();
        async move {
            let work = std::pin::pin!(async {
                let request = accepted.map_err(|e| *e)?;
                edge.charge(&request.tenant).await?;
                let answer = edge.complete(&request, deadline).await?;
                Ok(v1::CompleteResponse::from_answer(
                    answer,
                    request.request_id.clone(),
                ))
            });
            edge.run("Complete", work).await.map_err(Status::from)
        }
    }
}

#[cfg(test)]
impl RouterService {
    /// The service over one simulated provider, for unit tests.
    pub(crate) fn for_tests() -> RouterService {
        let yaml = "providers:\n  - {name: a, type: simulated, models: [m]}\n";
        let Ok(c) = crate::config::parse(yaml, "t", &|_| None) else {
            unreachable!("a valid cascade file")
        };
        let Ok(router) = crate::router::Router::new(&c) else {
            unreachable!("a router for it")
        };
        let inflight = Arc::new(crate::inflight::InFlight::new(10));
        RouterService::new(Arc::new(Edge::new(
            Arc::new(router),
            c.server.clone(),
            inflight,
        )))
    }
}

/// A unary call's deadline and client, read from its request before its future is made.
pub(crate) struct Caller {
    deadline: Instant,
    client: Option<Client>,
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A streamed call's events as `CompleteStreamResponse`s: text messages, then one with `end`;
/// an error ends it with its status.
fn messages(call: StreamCall) -> BoxStream<'static, Result<v1::CompleteStreamResponse, Status>> {
    let s = &call.streamed;
    let end = v1::StreamEnd {
        provider: s.provider.to_string(),
        model: s.model.to_string(),
        attempts: s.attempts.iter().map(v1::Attempt::from).collect(),
        request_id: call.request.request_id.clone(),
        cached: s.cached,
        first_token_us: micros(s.first_after),
        ..Default::default()
    };
    futures_util::stream::unfold(Some((call, end)), |state| async move {
        let (mut call, mut end) = state?;
        match call.next().await? {
            Ok(StreamEvent::Text(text)) => {
                end.chunks = end.chunks.saturating_add(1);
                let message = v1::CompleteStreamResponse {
                    text,
                    ..Default::default()
                };
                Some((Ok(message), Some((call, end))))
            }
            Ok(StreamEvent::ToolCall(delta)) => {
                end.chunks = end.chunks.saturating_add(1);
                let message = v1::CompleteStreamResponse {
                    tool_calls: vec![delta.into()],
                    ..Default::default()
                };
                Some((Ok(message), Some((call, end))))
            }
            Ok(StreamEvent::End {
                finish_reason,
                usage,
            }) => {
                end.finish_reason = finish_reason;
                end.usage = usage.map(v1::Usage::from);
                let message = v1::CompleteStreamResponse {
                    end: Some(end),
                    ..Default::default()
                };
                Some((Ok(message), None))
            }
            Err(e) => Some((Err(Status::from(e)), None)),
        }
    })
    .boxed()
}

#[tonic::async_trait]
impl v1::router_server::Router for RouterService {
    /// See [`RouterService::answer`]; served by `super::unary` in front of this (for memory),
    /// this is for a `RouterServer` used on its own.
    fn complete<'s, 'f>(
        &'s self,
        req: Request<v1::CompleteRequest>,
    ) -> BoxFuture<'f, Result<Response<v1::CompleteResponse>, Status>>
    where
        's: 'f,
        Self: 'f,
    {
        let caller = self.caller(req.metadata().as_ref(), req.extensions());
        let answer = self.answer(req.into_inner(), caller);
        Box::pin(answer.map(|r| r.map(Response::new)))
    }

    async fn complete_batch(
        &self,
        req: Request<v1::CompleteBatchRequest>,
    ) -> Result<Response<v1::CompleteBatchResponse>, Status> {
        self.edge
            .call("CompleteBatch", self.batch(req))
            .await
            .map_err(Status::from)
    }

    type CompleteStreamStream = BoxStream<'static, Result<v1::CompleteStreamResponse, Status>>;

    async fn complete_stream(
        &self,
        req: Request<v1::CompleteRequest>,
    ) -> Result<Response<Self::CompleteStreamStream>, Status> {
        let deadline = self.deadline(&req);
        let client = req.extensions().get::<Client>().cloned();
        let call = async {
            let request = CompletionRequest::try_from(req.into_inner())?;
            self.edge
                .stream("CompleteStream", request, client.as_ref(), deadline)
                .await
        }
        .await?;
        let s = &call.streamed;
        let headers = [
            ("x-cascade-provider", s.provider.to_string()),
            ("x-cascade-model", s.model.to_string()),
            ("x-cascade-attempts", s.attempts.len().to_string()),
            ("x-cascade-cached", s.cached.to_string()),
        ];
        let mut response = Response::new(messages(call));
        for (name, value) in headers {
            if let Ok(v) = value.parse() {
                response.metadata_mut().insert(name, v);
            }
        }
        Ok(response)
    }

    async fn list_providers(
        &self,
        _req: Request<v1::ListProvidersRequest>,
    ) -> Result<Response<v1::ListProvidersResponse>, Status> {
        let router = &self.edge.router;
        let today = router.spend().providers_today();
        let providers = router
            .providers()
            .into_iter()
            .map(|s| {
                let (spent, left) = today.get(&*s.name).copied().unwrap_or_default();
                v1::ProviderStatus {
                    spent_usd_today: spent as f64 / 1e9,
                    budget_left_usd: left.map(|l| l as f64 / 1e9),
                    ..v1::ProviderStatus::from(s)
                }
            })
            .collect();
        Ok(Response::new(v1::ListProvidersResponse { providers }))
    }

    async fn control_provider(
        &self,
        req: Request<v1::ControlProviderRequest>,
    ) -> Result<Response<v1::ProviderStatus>, Status> {
        operator(&req)?;
        let asked = req.into_inner();
        let action = crate::control::Action::parse(&asked.action)?;
        let s = self.edge.router.control(&asked.provider, action)?;
        Ok(Response::new(v1::ProviderStatus::from(s)))
    }

    async fn check_health(
        &self,
        req: Request<v1::CheckHealthRequest>,
    ) -> Result<Response<v1::CheckHealthResponse>, Status> {
        operator(&req)?;
        let probes = self
            .edge
            .router
            .check_health()
            .await
            .into_iter()
            .map(|(name, probe)| {
                let mut p = v1::HealthProbe {
                    provider: name.to_string(),
                    ..Default::default()
                };
                if let Some(probe) = probe {
                    p.checked = true;
                    p.passed = probe.failure.is_none();
                    p.took_us = u64::try_from(probe.took.as_micros()).unwrap_or(u64::MAX);
                    p.error = probe
                        .failure
                        .map(|(kind, message)| format!("{kind}: {message}"))
                        .unwrap_or_default();
                }
                p
            })
            .collect();
        Ok(Response::new(v1::CheckHealthResponse { probes }))
    }
}

/// Whether `req` may use an operator's action: a key marked admin when authentication is
/// on (the interceptor put its client in the extensions), else a loopback peer.
fn operator<T>(req: &Request<T>) -> Result<(), RouterError> {
    match req.extensions().get::<Client>() {
        Some(c) if c.admin => Ok(()),
        Some(c) => Err(RouterError::NotOperator(format!(
            "client {:?} may not control providers: its key is not marked admin: true (server.auth.keys[].admin)",
            c.name
        ))),
        None if crate::listener::Connection::in_extensions(req.extensions())
            .and_then(|c| c.peer())
            .is_some_and(|a| a.ip().is_loopback()) =>
        {
            Ok(())
        }
        None => Err(RouterError::NotOperator(
            "operator actions answer loopback peers only while server.auth is off".into(),
        )),
    }
}

impl RouterService {
    async fn batch(
        &self,
        req: Request<v1::CompleteBatchRequest>,
    ) -> Result<Response<v1::CompleteBatchResponse>, RouterError> {
        let deadline = self.deadline(&req);
        let client = req.extensions().get::<Client>().cloned();
        let items = req.into_inner().requests;
        let most = self.edge.config.max_batch_items;
        if items.len() > most {
            return Err(RouterError::InvalidArgument(format!(
                "{} requests in one batch; at most {most} (server.max_batch_items)",
                items.len(),
            )));
        }
        let mut results: Vec<Option<v1::BatchResult>> = vec![None; items.len()];
        // Dropping the set (the caller went away) aborts every item's upstream work.
        let mut tasks = JoinSet::new();
        for (i, item) in items.into_iter().enumerate() {
            let edge = self.edge.clone();
            let admitted = self.admit(item, client.as_ref()).await;
            tasks.spawn(async move {
                let result = match admitted {
                    Err(e) => v1::batch_result::Result::Error(e.into()),
                    Ok(r) => match edge.complete(&r, deadline).await {
                        Ok(a) => v1::batch_result::Result::Response(
                            v1::CompleteResponse::from_answer(a, r.request_id.clone()),
                        ),
                        Err(e) => v1::batch_result::Result::Error(e.into()),
                    },
                };
                (i, result)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (i, result) = joined
                .map_err(|e| RouterError::Internal(format!("a batch item's task failed: {e}")))?;
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(v1::BatchResult {
                    result: Some(result),
                });
            }
        }
        Ok(Response::new(v1::CompleteBatchResponse {
            results: results.into_iter().map(Option::unwrap_or_default).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("5x"), None);
    }

    /// What one unary call holds while it waits is mostly its futures: measured here so a
    /// change that adds to them fails (#32's memory goal; the whole call's box is checked in
    /// `front::unary`). When written (release build): `answer` 1,944 bytes, the edge's part
    /// 1,592, the router's path 1,496.
    #[tokio::test]
    async fn a_unary_call_holds_small_futures() {
        let service = RouterService::for_tests();
        let (edge, router) = (&service.edge, &service.edge.router);
        let request = CompletionRequest::test_prompt("x");
        let caller = service.caller(&http::HeaderMap::new(), &http::Extensions::new());
        let sizes = (
            std::mem::size_of_val(&service.answer(v1::CompleteRequest::default(), caller)),
            std::mem::size_of_val(&edge.complete(&request, Instant::now())),
            std::mem::size_of_val(&router.complete(&request, Instant::now())),
        );
        let (call, at_edge, path) = sizes;
        assert!(call <= 2048, "a unary call's future is {call} bytes");
        assert!(at_edge <= 1792, "the edge's future is {at_edge} bytes");
        assert!(path <= 1664, "the router's path is {path} bytes");
    }
}
