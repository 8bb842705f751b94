//! What both fronts — the gRPC service ([`crate::server`]) and the OpenAI-compatible HTTP
//! API ([`crate::front::openai`]) — do with a request once it is decoded: hold a place in
//! flight, admit it (limits, the client's models, its quota), then answer or stream it
//! through the router, each call counted and timed by method and code.

use std::{borrow::Borrow, future::Future, sync::Arc};

use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    auth::Client,
    completion::{Answer, CompletionRequest, Input, StreamEvent, Streamed},
    config::{Limits, ServerConfig},
    error::RouterError,
    inflight::{InFlight, Ticket},
    metrics::Metrics,
    rate::TenantQuotas,
    router::Router,
};

/// The request path both fronts share, above the router.
pub(crate) struct Edge {
    pub(crate) router: Arc<Router>,
    pub(crate) config: ServerConfig,
    pub(crate) inflight: Arc<InFlight>,
    quotas: Option<TenantQuotas>,
}

impl Edge {
    pub(crate) fn new(router: Arc<Router>, config: ServerConfig, inflight: Arc<InFlight>) -> Edge {
        Edge {
            quotas: config
                .quotas
                .as_ref()
                .map(|q| TenantQuotas::new(q, router.fleet())),
            router,
            config,
            inflight,
        }
    }

    /// Runs `work` for one admitted call: shed when `limits.max_in_flight` calls are
    /// running, refused while draining, and answered UNAVAILABLE if the shutdown grace ends
    /// before it does. Counted by method and code, and timed — as CANCELLED if the caller
    /// went away first (this future dropped).
    ///
    /// `work` goes in a box of its own before the call's future is made: an async fn keeps a
    /// future argument in its state and again the copy it awaits (rust-lang/rust#62958),
    /// which for a whole handler cost ~2.5 KiB more per call in flight.
    pub(crate) fn call<'a, T: 'a>(
        &'a self,
        method: &'static str,
        work: impl Future<Output = Result<T, RouterError>> + 'a,
    ) -> impl Future<Output = Result<T, RouterError>> + 'a {
        self.run(method, Box::pin(work))
    }

    /// [`Edge::call`] for `work` pinned by the caller (in the box of a future it returns).
    pub(crate) async fn run<T>(
        &self,
        method: &'static str,
        work: impl Future<Output = Result<T, RouterError>> + Unpin,
    ) -> Result<T, RouterError> {
        let record = Record::new(&**self.router.metrics(), method);
        // The refusal is gone before the wait (a `match` on `enter()` kept the whole `Result`,
        // 64 bytes, in the future).
        let ticket = match self.inflight.enter() {
            Ok(ticket) => ticket,
            Err(e) => {
                self.shed(&e);
                record.done(e.code());
                return Err(e);
            }
        };
        let result = tokio::select! {
            biased;
            r = work => r,
            () = self.inflight.abandoned() => Err(RouterError::ShuttingDown),
        };
        drop(ticket);
        record.done(match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        });
        result
    }

    /// Counts a call the front refused before it became a request (a bad field).
    pub(crate) fn refused(&self, method: &'static str, e: &RouterError) {
        Record::new(&**self.router.metrics(), method).done(e.code());
    }

    /// Counts a call shed for want of room.
    fn shed(&self, e: &RouterError) {
        if matches!(e, RouterError::AtCapacity { .. }) {
            self.router.metrics().shed();
        }
    }

    /// A validated request with an id (the caller's `request_id`, or one made here so that
    /// every request's log lines can be found together), its tenant (the client key's name
    /// when authentication is on), allowed for that client's models, within its quota.
    pub(crate) async fn admit(
        &self,
        request: CompletionRequest,
        client: Option<&Client>,
    ) -> Result<Arc<CompletionRequest>, RouterError> {
        let request = self.accept(request, client)?;
        self.charge(&request.tenant).await?;
        Ok(request)
    }

    /// [`Edge::admit`] but for the quota: checks a request against the limits and the client's
    /// models, and gives it its id and tenant. Not async, so the request (some 400 bytes) is
    /// not carried in a future's state and moved with it (a cache hit's unary path: accept,
    /// then [`Edge::charge`]).
    pub(crate) fn accept(
        &self,
        mut request: CompletionRequest,
        client: Option<&Client>,
    ) -> Result<Arc<CompletionRequest>, RouterError> {
        within_limits(&request, &self.config.limits)?;
        if request.request_id.is_empty() {
            request.request_id = format!("req-{:016x}", fastrand::u64(..));
        }
        if let Some(client) = client {
            request.tenant = client.name.to_string();
            if let Some(allowed) = &client.models {
                let route = self.router.route_name(&request.model, &request.agent)?;
                if !allowed.contains(&route) {
                    return Err(RouterError::PermissionDenied {
                        client: client.name.to_string(),
                        model: route,
                    });
                }
            }
        }
        Ok(Arc::new(request))
    }

    /// Takes one call from `tenant`'s quota, if quotas are on. The tenant is the client key's
    /// name when `server.auth` is on, else the request's `agent`.
    pub(crate) async fn charge(&self, tenant: &str) -> Result<(), RouterError> {
        match &self.quotas {
            None => Ok(()),
            // Boxed: a fleet's decision (a Redis call) is a large state that every call's
            // future would otherwise carry, with quotas on or not.
            Some(q) => {
                Box::pin(q.check(tenant))
                    .await
                    .map_err(|retry_after| RouterError::QuotaExceeded {
                        per_minute: q.per_minute(),
                        retry_after,
                    })
            }
        }
    }

    /// Answers one admitted request (see [`handle`]).
    pub(crate) fn complete<'a>(
        &'a self,
        request: &'a Arc<CompletionRequest>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Answer, RouterError>> + 'a {
        handle(&self.router, request, deadline, self.config.log_prompts)
    }

    /// One streamed call of `method`: a place in flight, `request` admitted, its answer
    /// opened (see [`open_stream`]; UNAVAILABLE if the shutdown grace ends first). The call
    /// holds its place and is counted when its stream ends, or as CANCELLED when dropped.
    pub(crate) async fn stream(
        &self,
        method: &'static str,
        request: CompletionRequest,
        client: Option<&Client>,
        deadline: Instant,
    ) -> Result<StreamCall, RouterError> {
        let record = Record::new(self.router.metrics().clone(), method);
        let opened = async {
            let ticket = self.inflight.enter_owned().inspect_err(|e| self.shed(e))?;
            let request = self.admit(request, client).await?;
            let streamed = tokio::select! {
                biased;
                s = open_stream(&self.router, &request, deadline, self.config.log_prompts) => s?,
                () = self.inflight.abandoned() => return Err(RouterError::ShuttingDown),
            };
            Ok((ticket, request, streamed))
        }
        .await;
        match opened {
            Ok((ticket, request, streamed)) => Ok(StreamCall {
                request,
                streamed,
                inflight: self.inflight.clone(),
                _ticket: ticket,
                record: Some(record),
            }),
            Err(e) => {
                record.done(e.code());
                Err(e)
            }
        }
    }
}

/// A streamed call on its way to the caller: the admitted request, where its answer comes
/// from, and the call's place in flight.
pub(crate) struct StreamCall {
    pub(crate) request: Arc<CompletionRequest>,
    /// Read its events with [`StreamCall::next`], not directly.
    pub(crate) streamed: Streamed,
    inflight: Arc<InFlight>,
    _ticket: Ticket<Arc<InFlight>>,
    /// Taken when the stream ends.
    record: Option<Record<Arc<Metrics>>>,
}

impl StreamCall {
    /// The next event, until the end or an error (then `None`); UNAVAILABLE when the shutdown
    /// grace ends first. The call is counted when its stream ends.
    pub(crate) async fn next(&mut self) -> Option<Result<StreamEvent, RouterError>> {
        self.record.as_ref()?;
        let next = tokio::select! {
            biased;
            next = self.streamed.events.next() => next,
            () = self.inflight.abandoned() => Some(Err(RouterError::ShuttingDown)),
        };
        let code = match &next {
            Some(Ok(StreamEvent::Text(_) | StreamEvent::ToolCall(_))) => return next,
            Some(Ok(StreamEvent::End { .. })) | None => tonic::Code::Ok,
            Some(Err(e)) => e.code(),
        };
        if let Some(record) = self.record.take() {
            record.done(code);
        }
        next
    }
}

/// A call's count, made when it ends ([`Record::done`]) or, when its caller went away first,
/// as CANCELLED when dropped. A unary call borrows the metrics; a stream, which outlives
/// the handler that opened it, holds them.
struct Record<M: Borrow<Metrics>> {
    metrics: M,
    method: &'static str,
    started: Instant,
    code: Option<tonic::Code>,
}

impl<M: Borrow<Metrics>> Record<M> {
    fn new(metrics: M, method: &'static str) -> Record<M> {
        Record {
            metrics,
            method,
            started: Instant::now(),
            code: None,
        }
    }

    fn done(mut self, code: tonic::Code) {
        self.code = Some(code);
    }
}

impl<M: Borrow<Metrics>> Drop for Record<M> {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        self.metrics
            .borrow()
            .call_ended(self.method, code, self.started.elapsed());
    }
}

/// The configured bounds on what one request may carry, each breach named.
fn within_limits(r: &CompletionRequest, l: &Limits) -> Result<(), RouterError> {
    let over = |what: String| Err(RouterError::InvalidArgument(what));
    let bytes = match &r.input {
        Input::Prompt(p) => p.len(),
        Input::Chat(m) => {
            if m.len() > l.max_messages {
                return over(format!(
                    "{} messages; at most {} (limits.max_messages)",
                    m.len(),
                    l.max_messages
                ));
            }
            r.input.text_len()
        }
    };
    if bytes > l.max_prompt_bytes {
        return over(format!(
            "{bytes} bytes of prompt; at most {} (limits.max_prompt_bytes)",
            l.max_prompt_bytes
        ));
    }
    let mut images = 0;
    for img in r.input.images() {
        images += 1;
        if images > l.max_images {
            return over(format!(
                "more than {} images (limits.max_images)",
                l.max_images
            ));
        }
        if img.len() > l.max_image_bytes {
            return over(format!(
                "an image of {} bytes; at most {} (limits.max_image_bytes)",
                img.len(),
                l.max_image_bytes
            ));
        }
    }
    if let Some(t) = r.params.max_tokens
        && t > l.max_tokens
    {
        return over(format!(
            "max_tokens {t}; at most {} (limits.max_tokens)",
            l.max_tokens
        ));
    }
    Ok(())
}

/// Runs one request inside its span. The span is at debug level, so at the default level it
/// costs nothing on the hot path; batch items carry it through the batcher to the provider
/// call. An `async move` block, not an `async fn`: see `crate::upstream`.
fn handle<'a>(
    router: &'a Router,
    request: &'a Arc<CompletionRequest>,
    deadline: Instant,
    log_prompts: bool,
) -> impl Future<Output = Result<Answer, RouterError>> + 'a {
    let span = tracing::debug_span!(
        "request",
        request_id = %request.request_id,
        agent = %request.agent,
        model = %request.model,
    );
    async move {
        tracing::debug!(
            timeout_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
            "request received"
        );
        if log_prompts {
            tracing::info!(request_id = %request.request_id, prompt = %shown(&request.input), "prompt (server.log_prompts)");
        }
        let started = Instant::now();
        let outcome = router.complete(request, deadline).await;
        if let Ok(a) = &outcome
            && !a.cached
        {
            let own = started
                .elapsed()
                .saturating_sub(a.queue_wait)
                .saturating_sub(a.upstream);
            router.metrics().overhead(own);
        }
        if log_prompts && let Ok(a) = &outcome {
            tracing::info!(request_id = %request.request_id, completion = %a.completion.text, "completion (server.log_prompts)");
        }
        match &outcome {
            Ok(a) => tracing::debug!(provider = %a.provider, cached = a.cached, batch_size = a.batch_size, "answered"),
            Err(e) => tracing::debug!(code = ?e.code(), error = %e, "failed"),
        }
        outcome
    }
    .instrument(span)
}

/// Opens one streamed answer inside the request's span (see [`handle`]).
async fn open_stream(
    router: &Router,
    request: &Arc<CompletionRequest>,
    deadline: Instant,
    log_prompts: bool,
) -> Result<Streamed, RouterError> {
    let span = tracing::debug_span!(
        "stream",
        request_id = %request.request_id,
        agent = %request.agent,
        model = %request.model,
    );
    async {
        if log_prompts {
            tracing::info!(request_id = %request.request_id, prompt = %shown(&request.input), "prompt (server.log_prompts)");
        }
        let opened = router.stream(request, deadline).await;
        match &opened {
            Ok(s) => tracing::debug!(provider = %s.provider, cached = s.cached, attempts = s.attempts.len(), "streaming"),
            Err(e) => tracing::debug!(code = ?e.code(), error = %e, "failed before streaming"),
        }
        opened
    }
    .instrument(span)
    .await
}

/// A request's prompt or messages as one line of text, for `server.log_prompts`.
fn shown(input: &Input) -> String {
    match input {
        Input::Prompt(p) => p.clone(),
        Input::Chat(messages) => messages
            .iter()
            .map(|m| format!("{:?}: {}", m.role, m.content.text()))
            .collect::<Vec<_>>()
            .join(" | "),
    }
}
