//! The ordered fallback loop: each target in turn, with retries and backoff on transient
//! faults, until one answers or the caller's deadline passes. Each try is the upstream's
//! ([`Upstream::attempt`]: breaker, budget, batch queue); failures are collected per provider
//! and end as one aggregate error. Which targets it walks for a request is its [`Plan`].
//! Its loops are `fn`s over `async move` blocks, for the reason `crate::upstream` gives.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;
use tower::retry::budget::{Budget as _, TpsBudget};

use crate::{
    capability::{Capability, Needs},
    completion::{Answer, Attempt, CompletionRequest, FailureKind},
    config::CascadePolicy,
    cost,
    error::RouterError,
    provider::ProviderError,
    spend::{Hold, Payer, Refusal, Spend},
    upstream::{Miss, Opened, Upstream, Window},
};

/// One place a request can go: a provider and the model to ask it for.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub model: Arc<str>,
}

impl PartialEq for Target {
    /// The same provider (by identity) and the same model.
    fn eq(&self, other: &Target) -> bool {
        Arc::ptr_eq(&self.upstream, &other.upstream) && self.model == other.model
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.upstream.name(), self.model)
    }
}

pub struct Cascade {
    policy: CascadePolicy,
    /// Retries on the same provider at most `retry_budget.ratio` of recent requests plus
    /// `min_per_second`, as Envoy and Linkerd bound them, so an outage does not multiply the
    /// load. Moving on to the next provider never draws on it.
    retries: TpsBudget,
    /// Budgets: a paid target's worst case is reserved before its turn.
    spend: Arc<Spend>,
}

/// What walking the targets gave: the answer, who gave it, the attempts before, and the
/// reservation to settle (for a priced model).
type Walked<'t, T> = (T, &'t Target, Vec<Attempt>, Option<Hold>);

/// Which transient faults are tried again on the same provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Timeouts too (a whole answer that did not come in time).
    Timeouts,
    /// Not timeouts (a stream's first token: the next provider is the better bet).
    NotTimeouts,
}

/// How one provider's turn ended.
enum Turn<T> {
    Answered(T),
    Failed(Attempt),
    /// The caller's deadline passed; `Some` when a try was cut short by it.
    OutOfTime(Option<Attempt>),
}

/// The targets a request may go to, and those skipped for it (with why).
pub struct Plan {
    pub targets: Arc<[Target]>,
    pub skipped: Vec<Attempt>,
}

/// Filters `route` (then each `chains` entry for a capability the route lacks) down to the
/// targets that can take `request` (by [`Needs`]: capabilities, context window, what each
/// provider's API can carry); fails when none can, naming what is missing.
pub fn plan(
    route: &Arc<[Target]>,
    chains: &dyn Fn(Capability) -> Option<Arc<[Target]>>,
    request: &CompletionRequest,
    streaming: bool,
) -> Result<Plan, RouterError> {
    let needs = Needs::of(request, streaming);
    let refusal = |t: &Target| t.upstream.refuses(&t.model, request, &needs);
    // The common case, checked without allocating: every target can take it.
    if route.iter().all(|t| refusal(t).is_none()) {
        return Ok(Plan {
            targets: route.clone(),
            skipped: Vec::new(),
        });
    }
    let mut candidates: Vec<Target> = route.to_vec();
    for c in needs.capabilities.iter() {
        let lacking = |t: &Target| {
            t.upstream
                .model_info(&t.model)
                .capabilities
                .is_some_and(|have| !have.has(c))
        };
        if route.iter().any(lacking)
            && let Some(chain) = chains(c)
        {
            for t in chain.iter() {
                if !candidates.contains(t) {
                    candidates.push(t.clone());
                }
            }
        }
    }
    let mut targets = Vec::with_capacity(candidates.len());
    let mut skipped = Vec::new();
    for t in candidates {
        match refusal(&t) {
            None => targets.push(t),
            Some(why) => skipped.push(Attempt {
                provider: t.upstream.name().clone(),
                model: t.model.clone(),
                kind: FailureKind::Unsupported,
                http_status: None,
                error: why,
                tries: 0,
                elapsed: Duration::ZERO,
            }),
        }
    }
    if targets.is_empty() {
        return Err(RouterError::Unsupported {
            needs: describe(&needs),
            attempts: skipped,
        });
    }
    Ok(Plan {
        targets: targets.into(),
        skipped,
    })
}

/// The needs in words, for the error when nothing on the route meets them.
fn describe(needs: &Needs) -> String {
    let mut parts: Vec<&str> = needs.capabilities.iter().map(Capability::as_str).collect();
    let tokens = format!("about {} tokens of window", needs.tokens);
    parts.push(&tokens);
    parts.join(", ")
}

impl Cascade {
    pub fn new(policy: CascadePolicy, spend: Arc<Spend>) -> Cascade {
        let b = policy.retry_budget;
        Cascade {
            retries: TpsBudget::new(b.ttl, b.min_per_second, b.ratio),
            policy,
            spend,
        }
    }

    /// The reservation for a try of `target`: none for a free model; for a priced one, its
    /// worst case against every budget that applies, or why not.
    async fn hold(
        &self,
        target: &Target,
        request: &CompletionRequest,
    ) -> Result<Option<Hold>, Refusal> {
        let Some(price) = target.upstream.model_info(&target.model).price else {
            return Ok(None);
        };
        let payer = payer(target, request);
        // Boxed: a reservation (a Redis call with a fleet) is a large state that every call's
        // future would otherwise carry, priced or not.
        Box::pin(self.spend.reserve(payer, price, request))
            .await
            .map(Some)
    }

    /// Walks `targets` in order until one answers or the deadline passes.
    #[expect(
        clippy::manual_async_fn,
        reason = "arguments held once (see crate::upstream)"
    )]
    pub fn run(
        &self,
        plan: &Plan,
        request: &Arc<CompletionRequest>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Answer, RouterError>> {
        async move {
            let (d, target, attempts, hold) = self
                .walk(
                    plan,
                    request,
                    deadline,
                    Retry::Timeouts,
                    |t: &Target, window| t.upstream.attempt(&t.model, request, window),
                )
                .await?;
            // A priced model's answer is charged at the price its reservation was made at.
            let cost = cost::of(hold.as_ref().map(Hold::price), request, &d.completion);
            if let Some(hold) = hold {
                hold.settle(payer(target, request), cost);
            }
            Ok(Answer {
                cost,
                completion: d.completion,
                provider: target.upstream.name().clone(),
                model: target.model.clone(),
                attempts,
                queue_wait: d.queue_wait,
                upstream: d.upstream,
                batch_size: d.batch_size,
                cached: false,
            })
        }
    }

    /// Walks `targets` in order until one starts streaming — its first event arrived — or
    /// the deadline passes. After that first event there is no falling back; the stream's
    /// end settles the reservation.
    pub async fn stream<'t>(
        &self,
        plan: &'t Plan,
        request: &CompletionRequest,
        deadline: Instant,
    ) -> Result<Walked<'t, Opened>, RouterError> {
        // A first token that does not come in time moves on: the next provider is the better
        // bet than waiting the same first-token timeout again.
        self.walk(
            plan,
            request,
            deadline,
            Retry::NotTimeouts,
            |t: &Target, window| t.upstream.stream(&t.model, request, window),
        )
        .await
    }

    /// The fallback loop: `try_once` on each of the plan's targets in turn (see
    /// [`Cascade::turn`]), with the attempts that failed before the one that answered (the
    /// plan's skipped targets first).
    #[expect(
        clippy::manual_async_fn,
        reason = "arguments held once (see crate::upstream)"
    )]
    fn walk<'t, T, Fut>(
        &self,
        plan: &'t Plan,
        request: &CompletionRequest,
        deadline: Instant,
        retry: Retry,
        try_once: impl Fn(&'t Target, Window) -> Fut,
    ) -> impl Future<Output = Result<Walked<'t, T>, RouterError>>
    where
        Fut: Future<Output = Result<T, Miss>>,
    {
        async move {
            self.retries.deposit();
            let targets = &plan.targets;
            let mut attempts = plan.skipped.clone();
            let mut resets_in = None;
            for (i, target) in targets.iter().enumerate() {
                let last = i + 1 == targets.len();
                let hold = match self.hold(target, request).await {
                    Ok(hold) => hold,
                    Err(refusal) => {
                        resets_in = resets_in.max(refusal.resets_in());
                        attempts.push(Attempt {
                            provider: target.upstream.name().clone(),
                            model: target.model.clone(),
                            kind: FailureKind::Budget,
                            http_status: None,
                            error: refusal.to_string(),
                            tries: 0,
                            elapsed: Duration::ZERO,
                        });
                        continue;
                    }
                };
                match self.turn(target, last, deadline, retry, &try_once).await {
                    Turn::Answered(t) => return Ok((t, target, attempts, hold)),
                    Turn::Failed(attempt) => attempts.push(attempt),
                    Turn::OutOfTime(attempt) => {
                        attempts.extend(attempt);
                        return Err(RouterError::DeadlineExceeded { attempts });
                    }
                }
            }
            let tried = || {
                attempts
                    .iter()
                    .filter(|a| a.kind != FailureKind::Unsupported)
                    .peekable()
            };
            let all = |kinds: &[FailureKind]| {
                let mut t = tried();
                t.peek().is_some() && t.all(|a| kinds.contains(&a.kind))
            };
            // Budgets reset at midnight UTC: the caller is told when.
            if all(&[FailureKind::Budget]) {
                return Err(RouterError::OverBudget {
                    attempts,
                    resets_in,
                });
            }
            // Full queues and rate limits (the router's or the provider's 429): room comes back
            // by itself, so the caller is told to retry later, not that the providers are down.
            if all(&[FailureKind::Overloaded, FailureKind::RateLimited]) {
                return Err(RouterError::Overloaded { attempts });
            }
            // Too little of the caller's time for any provider to answer: the caller's deadline,
            // not the providers, is what failed.
            if all(&[FailureKind::NoTimeLeft]) {
                return Err(RouterError::DeadlineExceeded { attempts });
            }
            Err(RouterError::Unavailable {
                reason: "every provider failed",
                attempts,
            })
        }
    }

    /// One provider's turn: up to `1 + max_retries` tries. While other providers remain
    /// (`last` is false) a try gets at most half of the time left, so a provider that hangs
    /// cannot take the whole deadline; a try cut short by its share counts as that provider's
    /// timeout and moves on rather than retrying a provider that just hung.
    #[expect(
        clippy::manual_async_fn,
        reason = "arguments held once (see crate::upstream)"
    )]
    fn turn<'t, T, Fut>(
        &self,
        target: &'t Target,
        last: bool,
        deadline: Instant,
        retry: Retry,
        try_once: &impl Fn(&'t Target, Window) -> Fut,
    ) -> impl Future<Output = Turn<T>>
    where
        Fut: Future<Output = Result<T, Miss>>,
    {
        async move {
            let up = &target.upstream;
            let began = Instant::now();
            let attempt = |e: ProviderError, tries| Attempt {
                provider: up.name().clone(),
                model: target.model.clone(),
                kind: e.kind,
                http_status: e.http_status,
                error: e.message,
                tries,
                elapsed: began.elapsed(),
            };
            let mut tries = 0u32;
            loop {
                let window = Window::share(Instant::now(), deadline, last);
                let err = match try_once(target, window).await {
                    Ok(d) => return Turn::Answered(d),
                    Err(Miss::Skipped(e)) => return Turn::Failed(attempt(e, tries)),
                    Err(Miss::OutOfTime(e)) => {
                        return Turn::OutOfTime(e.map(|e| attempt(e, tries + 1)));
                    }
                    Err(Miss::Failed(e)) => e,
                };
                tries += 1;
                // A try cut short by its share (not the last provider's) moves on: the provider
                // just used half of what was left.
                let move_on = err.kind == FailureKind::Timeout
                    && ((!last && Instant::now() >= window.until) || retry == Retry::NotTimeouts);
                if err.retry_same_provider()
                    && !move_on
                    && tries <= self.policy.max_retries_per_provider
                    && self.retries.withdraw()
                {
                    let delay = backoff(self.policy.retry_delay, tries);
                    if up.fits(Instant::now() + delay, deadline) {
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
                return Turn::Failed(attempt(err, tries));
            }
        }
    }
}

fn payer<'a>(target: &'a Target, request: &'a CompletionRequest) -> Payer<'a> {
    Payer {
        tenant: &request.tenant,
        provider: target.upstream.name(),
        model: &target.model,
    }
}

/// Exponential backoff with equal jitter: `base · 2^(n-1)` capped at 32 × base, of which the
/// second half is random so that callers failing together do not retry together.
fn backoff(base: Duration, tries: u32) -> Duration {
    let full = base.saturating_mul(1 << tries.saturating_sub(1).min(5));
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests;
