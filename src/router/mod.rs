//! Resolves what a request asks for — a model, a fallback chain, an agent's assignment or the
//! default — to an ordered list of [`Target`]s, then hands it to the [`Cascade`].
//!
//! Routes are computed once from the config, so a lookup is one hash-map probe.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tokio::time::{Instant, timeout_at};

mod relay;
mod routes;

pub use routes::Routes;

use crate::{
    cache::{Cache, CacheKey, deterministic},
    cascade::{Cascade, Plan},
    coalescer::Coalescer,
    completion::{Answer, CacheMode, CompletionRequest, Streamed},
    config::{BreakerConfig, CacheConfig, Config, FleetConfig, ProviderConfig},
    control::{Action, Order, Overrides},
    error::{RouterError, Sent},
    fleet::Fleet,
    metrics::Metrics,
    provider,
    spend::{Clock, Spend},
    upstream::{Circuit, Probe, Snapshot, Upstream},
};
use relay::{Charge, Relay};

/// How many times a caller starts a shared flight again after another caller's deadline
/// ended one (see [`Router::complete`]).
const REFLIGHTS: usize = 4;

/// Why the router could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("building an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("redis_url: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The request path behind the gRPC edge: routes → cache → coalescer → cascade. Its state
/// is swapped whole on reload ([`Router::reload`]): calls in flight finish on the state they
/// started with.
pub struct Router {
    state: ArcSwap<State>,
    metrics: Arc<Metrics>,
    /// Operators' orders by provider name, put in force again on every reload.
    overrides: Overrides,
    /// The ledger and budgets, kept across reloads.
    spend: Arc<Spend>,
}

/// The completion cache's figures, for the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CacheFigures {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// What a reload kept and what it built anew.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Providers whose settings did not change: pools, breakers and counters carried over.
    pub kept: Vec<String>,
    /// Providers added or changed: built anew.
    pub built: Vec<String>,
    pub cache_kept: bool,
}

impl Router {
    pub fn new(config: &Config) -> Result<Router, BuildError> {
        Router::with_clock(config, Clock::system())
    }

    /// A router whose budgets count days by `clock` (tests roll the day over on it).
    pub fn with_clock(config: &Config, clock: Clock) -> Result<Router, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let overrides = Overrides::default();
        let spend = Spend::new(&config.spend, metrics.spend().clone(), clock);
        let (state, _) = State::build(config, &metrics, None, &overrides, &spend)?;
        Ok(Router {
            state: ArcSwap::from_pointee(state),
            metrics,
            overrides,
            spend,
        })
    }

    /// The ledger and budgets.
    pub fn spend(&self) -> &Arc<Spend> {
        &self.spend
    }

    /// Answers one request before `deadline`, or says why not.
    pub fn complete<'a>(
        &self,
        request: &'a Arc<CompletionRequest>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Answer, RouterError>> + 'a {
        let state = self.state.load_full();
        async move { state.complete(request, deadline).await }
    }

    /// Streams one answer: `Ok` once a provider sent its first event (falling back until
    /// then), the rest before `deadline`. Streams bypass batching and coalescing; a cached
    /// answer streams as one chunk, and a deterministic stream that completes is cached.
    pub async fn stream(
        &self,
        request: &Arc<CompletionRequest>,
        deadline: Instant,
    ) -> Result<Streamed, RouterError> {
        self.state.load_full().stream(request, deadline).await
    }

    /// The model or chain a request for `model` by `agent` resolves to ("" for the default
    /// cascade).
    pub fn route_name(&self, model: &str, agent: &str) -> Result<String, RouterError> {
        let state = self.state.load();
        state
            .routes
            .resolve_named(model, agent)
            .map(|(name, _)| name.to_string())
    }

    /// The fleet this router shares limits with, when the cascade file names a Redis.
    pub(crate) fn fleet(&self) -> Option<Arc<Fleet>> {
        self.state.load().fleet.as_ref().map(|(_, f)| f.clone())
    }

    /// Every model and chain name a request may ask for, sorted.
    pub fn route_names(&self) -> Vec<String> {
        self.state.load().routes.names()
    }

    /// Swaps in a new validated config. New calls use it at once; calls in flight finish on
    /// the old one. Providers whose settings did not change keep their pools, breakers and
    /// counters, and the cache is kept when its settings did not change.
    pub fn reload(&self, config: &Config) -> Result<Reloaded, BuildError> {
        let old = self.state.load_full();
        let (state, reloaded) = State::build(
            config,
            &self.metrics,
            Some(&old),
            &self.overrides,
            &self.spend,
        )?;
        self.state.store(Arc::new(state));
        Ok(reloaded)
    }

    /// The Prometheus text exposition of this router's metrics, with the cache settled first.
    pub fn render_metrics(&self) -> String {
        let state = self.state.load();
        if let Some((_, cache)) = &state.cache {
            cache.settle();
        }
        for (_, up) in &state.upstreams {
            let s = up.snapshot();
            let value = match s.circuit {
                Circuit::Closed => 0,
                Circuit::HalfOpen => 1,
                Circuit::Open => 2,
            };
            self.metrics
                .provider_state(&s.name, value, s.concurrency_limit);
        }
        self.metrics.render()
    }

    /// The registry's handles, for the edge's own series (calls, in flight, shed).
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Every model and chain name with a provider that could take a request now (enabled,
    /// healthy, circuit not open), sorted: what `/v1/models` lists.
    pub fn servable_names(&self) -> Vec<String> {
        self.state.load().routes.servable_names()
    }

    /// Carries out an operator's `action` on the provider `name`, and says its state after.
    /// Orders (disable, drain) hold until `enable`, across reloads.
    pub fn control(&self, name: &str, action: Action) -> Result<Snapshot, RouterError> {
        let state = self.state.load();
        let Some((_, up)) = state.upstreams.iter().find(|(p, _)| p.name == name) else {
            let known: Vec<&str> = state
                .upstreams
                .iter()
                .map(|(p, _)| p.name.as_str())
                .collect();
            return Err(RouterError::UnknownProvider {
                name: name.into(),
                known: known.join(", "),
            });
        };
        let order = match action {
            Action::Enable => Some(Order::Serve),
            Action::Disable => Some(Order::Disable),
            Action::Drain => Some(Order::Drain),
            Action::ResetCircuit => None,
        };
        match order {
            Some(order) => {
                self.overrides.set(name, order);
                up.set_order(order);
            }
            None => up.reset_circuit(),
        }
        tracing::info!(provider = name, ?action, "operator action");
        Ok(up.snapshot())
    }

    /// Probes every provider that has health checks now, at once; `None` for those without.
    pub async fn check_health(&self) -> Vec<(Arc<str>, Option<Probe>)> {
        let state = self.state.load_full();
        let probes = state
            .upstreams
            .iter()
            .map(|(_, up)| async move { (up.name().clone(), up.check_health().await) });
        futures_util::future::join_all(probes).await
    }

    /// The effective configuration, every secret redacted.
    pub fn config_view(&self) -> serde_json::Value {
        self.state.load().view.clone()
    }

    /// The cache's figures, `None` with the cache off.
    pub fn cache_figures(&self) -> Option<CacheFigures> {
        let state = self.state.load();
        let (_, cache) = state.cache.as_ref()?;
        cache.settle();
        let (hits, misses) = self.metrics.cache().hits_and_misses();
        Some(CacheFigures {
            hits,
            misses,
            entries: cache.entries(),
            bytes: cache.bytes(),
        })
    }

    /// Providers in priority order, with their live state.
    pub fn providers(&self) -> Vec<Snapshot> {
        self.state
            .load()
            .upstreams
            .iter()
            .map(|(_, u)| u.snapshot())
            .collect()
    }
}

/// What the cache said about a request.
enum Looked<'a> {
    Hit(Answer),
    Miss {
        plan: Plan,
        /// Where the answer goes, when the request is cached.
        cached: Option<(&'a Arc<Cache>, CacheKey)>,
    },
}

/// One config's worth of the request path.
struct State {
    routes: Routes,
    cache: Option<(CacheConfig, Arc<Cache>)>,
    /// The routers this one shares limits and circuits with, when a Redis is named.
    fleet: Option<(FleetConfig, Arc<Fleet>)>,
    coalescer: Coalescer,
    cascade: Arc<Cascade>,
    breaker: BreakerConfig,
    /// Providers in priority order, with the settings each was built from.
    upstreams: Vec<(ProviderConfig, Arc<Upstream>)>,
    metrics: Arc<Metrics>,
    /// The effective configuration, secrets redacted (`GET /api/config`).
    view: serde_json::Value,
}

impl State {
    /// The state for `config`, reusing from `old` what did not change.
    fn build(
        config: &Config,
        metrics: &Arc<Metrics>,
        old: Option<&State>,
        overrides: &Overrides,
        spend: &Arc<Spend>,
    ) -> Result<(State, Reloaded), BuildError> {
        let mut reloaded = Reloaded::default();
        let kept_fleet = old
            .and_then(|o| o.fleet.as_ref())
            .filter(|(c, _)| Some(c) == config.fleet.as_ref());
        let fleet = match (&config.fleet, kept_fleet) {
            (None, _) => None,
            (Some(_), Some(kept)) => Some(kept.clone()),
            (Some(c), None) => Some((c.clone(), Fleet::new(c, metrics.fleet().clone())?)),
        };
        spend.configure(&config.spend, fleet.as_ref().map(|(_, f)| f.store()));
        let mut upstreams = Vec::with_capacity(config.providers.len());
        for p in &config.providers {
            let same = old
                .filter(|o| o.breaker == config.cascade.breaker)
                .filter(|o| o.fleet.as_ref().map(|(c, _)| c) == config.fleet.as_ref())
                .and_then(|o| o.upstreams.iter().find(|(q, _)| q == p));
            let up = match same {
                Some((_, up)) => {
                    reloaded.kept.push(p.name.clone());
                    up.clone()
                }
                None => {
                    reloaded.built.push(p.name.clone());
                    let fleet = fleet.as_ref().map(|(_, f)| &**f);
                    Arc::new(Upstream::new(p, config.cascade.breaker, metrics, fleet)?)
                }
            };
            up.set_order(overrides.get(&p.name));
            upstreams.push((p.clone(), up));
        }
        let cache = match &config.cache {
            None => None,
            Some(c) => match old.and_then(|o| o.cache.as_ref()).filter(|(q, _)| q == c) {
                Some(kept) => {
                    reloaded.cache_kept = true;
                    Some(kept.clone())
                }
                None => Some((c.clone(), Arc::new(Cache::new(c, metrics.cache().clone())?))),
            },
        };
        let targets: Vec<Arc<Upstream>> = upstreams.iter().map(|(_, u)| u.clone()).collect();
        let state = State {
            routes: Routes::new(config, &targets),
            cache,
            fleet,
            coalescer: Coalescer::default(),
            cascade: Arc::new(Cascade::new(config.cascade.clone(), spend.clone())),
            breaker: config.cascade.breaker,
            upstreams,
            metrics: metrics.clone(),
            view: config.view(),
        };
        Ok((state, reloaded))
    }

    /// The request's targets and its place in the cache: a hit, or where to write the
    /// answer (`None`: not cached).
    async fn look_up(
        &self,
        request: &CompletionRequest,
        streaming: bool,
    ) -> Result<Looked<'_>, RouterError> {
        let (route, targets) = self.routes.resolve_named(&request.model, &request.agent)?;
        let mode = request.cache;
        // Only deterministic requests are cached or coalesced: others must each get their own sample.
        let cached = self
            .cache
            .as_ref()
            .map(|(_, c)| c)
            .filter(|_| mode != CacheMode::Bypass && deterministic(&request.params))
            .map(|c| (c, c.key(route, request)));
        if let Some((cache, key)) = &cached
            && mode != CacheMode::Refresh
            && let Some(hit) = cache.get(key).await
        {
            return Ok(Looked::Hit(hit));
        }
        if mode == CacheMode::Only {
            return Err(RouterError::NotCached(match cached {
                Some(_) => "not in the cache (cache: ONLY)".into(),
                None => "cache: ONLY needs the cache enabled and a deterministic request (temperature 0 or a seed)".into(),
            }));
        }
        if targets.is_empty() {
            return Err(RouterError::Unavailable {
                reason: "no enabled provider serves this model",
                attempts: Vec::new(),
            });
        }
        let plan = self.routes.plan(targets, request, streaming)?;
        Ok(Looked::Miss { plan, cached })
    }

    async fn stream(
        &self,
        request: &Arc<CompletionRequest>,
        deadline: Instant,
    ) -> Result<Streamed, RouterError> {
        let (plan, cached) = match self.look_up(request, true).await? {
            Looked::Hit(hit) => {
                let events = provider::in_one_piece(hit.completion)
                    .map(|e| e.map_err(|_| RouterError::Internal("a cached answer failed".into())));
                return Ok(Streamed {
                    provider: hit.provider,
                    model: hit.model,
                    attempts: Vec::new(),
                    first_after: Duration::ZERO,
                    cached: true,
                    events: events.boxed(),
                });
            }
            Looked::Miss { plan, cached } => (plan, cached),
        };
        let (opened, target, attempts, hold) =
            self.cascade.stream(&plan, request, deadline).await?;
        let relay = Relay {
            first: Some(opened.first),
            rest: opened.rest,
            deadline,
            provider: target.upstream.name().clone(),
            model: target.model.clone(),
            began: Instant::now(),
            sent: Sent::default(),
            cache: cached.map(|(c, k)| (c.clone(), k, String::new())),
            charge: hold.map(|hold| Charge {
                hold,
                request: request.clone(),
            }),
        };
        Ok(Streamed {
            provider: relay.provider.clone(),
            model: relay.model.clone(),
            attempts,
            first_after: opened.first_after,
            cached: false,
            events: futures_util::stream::unfold(Some(relay), |relay| async move {
                let mut relay = relay?;
                let (event, more) = relay.next().await;
                Some((event, more.then_some(relay)))
            })
            .boxed(),
        })
    }

    async fn complete(
        &self,
        request: &Arc<CompletionRequest>,
        deadline: Instant,
    ) -> Result<Answer, RouterError> {
        let (plan, cached) = match self.look_up(request, false).await? {
            Looked::Hit(hit) => return Ok(hit),
            Looked::Miss { plan, cached } => (plan, cached),
        };
        let Some((cache, key)) = cached else {
            return self.cascade.run(&plan, request, deadline).await;
        };
        let plan = Arc::new(plan);
        let work = || {
            let (cascade, plan, request, cache) = (
                self.cascade.clone(),
                plan.clone(),
                request.clone(),
                cache.clone(),
            );
            async move {
                // Charged once per upstream answer (in the cascade), however many callers
                // share it.
                let answer = cascade.run(&plan, &request, deadline).await?;
                cache.put(key, &answer).await;
                Ok(answer)
            }
        };
        let joined = || {
            tracing::debug!("joined an identical request in flight");
            self.metrics.cache().coalesced();
        };
        // A shared flight runs on the deadline of the caller who started it. If that ran out
        // while this caller still has time, the flight failed for someone else's deadline:
        // fly again, on this caller's deadline (joined by any other caller still waiting).
        for _ in 0..REFLIGHTS {
            match timeout_at(deadline, self.coalescer.run(key, &work, &joined)).await {
                Ok(Err(RouterError::DeadlineExceeded { .. })) if Instant::now() < deadline => {
                    tracing::debug!("the shared call ran out of its first caller's time; again");
                }
                Ok(outcome) => return outcome,
                Err(_) => break,
            }
        }
        Err(RouterError::DeadlineExceeded {
            attempts: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests;
