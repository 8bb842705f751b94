//! What answers cost, and what they may: the spend ledger and the daily budgets.
//!
//! - **Budgets** (`cost_tracking.budget_daily_usd` for the router, `budget.daily_usd` on a
//!   provider and on a client key) hold for a UTC day. Before a paid attempt the cascade
//!   [`Spend::reserve`]s its worst case ([`crate::cost::worst`]) against every budget that
//!   applies, all or none; the answer settles it to the real cost ([`Hold::settle`]), and a
//!   try that got no answer gives it back (the [`Hold`] dropped). So concurrent calls
//!   overshoot a budget by at most what providers charged beyond the reservations.
//! - **The ledger** counts each answer of a priced model by UTC day, tenant, provider and
//!   model ([`ledger`]).
//! - **Shared** when the fleet has a Redis ([`shared`]): reservations are decided there, one
//!   script over every budget's key, so every replica spends from one total, and a restarted
//!   router keeps the day's figures. Settlements and ledger lines are summed and written every
//!   100 ms (a replica's figures in Redis lag by that; meanwhile the others see its
//!   reservations, never less than what it spent). While Redis is away
//!   `cost_tracking.on_store_error` says what to do: `enforce_local` decides on the fleet's
//!   last total plus what this router spent since (added to Redis when it is back), `refuse`
//!   skips paid models.

mod clock;
mod lease;
mod ledger;
mod shared;
mod tally;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::{ArcSwap, ArcSwapOption};

pub use clock::{Clock, date, parse_date};
pub use ledger::Row;

use crate::{
    completion::{CompletionRequest, Cost},
    config::{Config, OnStoreError, Price, SpendConfig},
    metrics::{RedisMetrics, SpendMetrics},
    store::Store,
};
use lease::Take;
use tally::Tallies;

/// A day's spend and today's budgets (`GET /api/spend`, `cascade-router spend`).
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub date: String,
    pub source: Source,
    pub total_usd: f64,
    pub rows: Vec<Row>,
    pub budgets: Vec<BudgetFigure>,
}

/// Whose figures a report gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Source {
    /// The fleet's, read from Redis.
    #[serde(rename = "redis")]
    Redis,
    /// This router's own (no Redis, or it did not answer).
    #[serde(rename = "this router")]
    ThisRouter,
}

/// One budget today.
#[derive(Debug, serde::Serialize)]
pub struct BudgetFigure {
    pub budget: String,
    pub daily_usd: f64,
    pub used_usd: f64,
    pub remaining_usd: f64,
}

impl BudgetFigure {
    /// `scope`'s budget of `limit` nanodollars with `used` of it spent or reserved.
    fn of(scope: &Scope, limit: u64, used: u64) -> BudgetFigure {
        let usd = |n: u64| n as f64 / 1e9;
        BudgetFigure {
            budget: scope.key(),
            daily_usd: usd(limit),
            used_usd: usd(used),
            remaining_usd: usd(limit.saturating_sub(used)),
        }
    }
}

/// Whose spend a budget limits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Router,
    Provider(Arc<str>),
    Client(Arc<str>),
}

impl Scope {
    /// Its name in Redis keys and metric labels: `router`, `provider:NAME`, `client:NAME`.
    pub fn key(&self) -> String {
        match self {
            Scope::Router => "router".into(),
            Scope::Provider(p) => format!("provider:{p}"),
            Scope::Client(c) => format!("client:{c}"),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Router => {
                f.write_str("the router's daily budget (cost_tracking.budget_daily_usd)")
            }
            Scope::Provider(p) => write!(f, "provider {p}'s daily budget"),
            Scope::Client(c) => write!(f, "client {c}'s daily budget"),
        }
    }
}

/// Why a paid attempt was not made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{scope} of ${} has ${} left today, this call may cost up to ${}; it resets at 00:00 UTC, in {}",
        usd(*.limit), usd(.limit.saturating_sub(*.used)), usd(*.asked), hours(*.resets_in)
    )]
    Exhausted {
        scope: Scope,
        limit: u64,
        used: u64,
        asked: u64,
        resets_in: Duration,
    },
    #[error("the budget store (Redis) is unreachable and cost_tracking.on_store_error is refuse")]
    StoreAway,
}

impl Refusal {
    /// How long until the budget resets (`None`: when the store is back).
    pub fn resets_in(&self) -> Option<Duration> {
        match self {
            Refusal::Exhausted { resets_in, .. } => Some(*resets_in),
            Refusal::StoreAway => None,
        }
    }
}

fn usd(nanos: u64) -> String {
    format!("{:.6}", nanos as f64 / 1e9)
}

fn hours(d: Duration) -> String {
    let m = d.as_secs().div_ceil(60);
    format!("{} h {} min", m / 60, m % 60)
}

/// Who a paid attempt is for.
#[derive(Clone, Copy, Debug)]
pub struct Payer<'a> {
    pub tenant: &'a str,
    pub provider: &'a Arc<str>,
    pub model: &'a Arc<str>,
}

/// The report of `day` (today by default) from the Redis `config` names — the fleet's
/// ledger, for `cascade-router spend` with no router running; `None` without a Redis.
pub async fn report_from_redis(config: &Config, day: Option<u32>) -> Option<Report> {
    let fleet = config.fleet.as_ref()?;
    let store = Store::new(
        &fleet.redis,
        RedisMetrics::default(),
        "the ledger cannot be read",
    )
    .ok()?;
    let spend = Spend::new(&config.spend, SpendMetrics::default(), Clock::system());
    spend.configure(&config.spend, Some(store));
    // One read: a report not from Redis would be this process's empty ledger.
    let report = spend.report(day).await;
    (report.source == Source::Redis).then_some(report)
}

/// The ledger and budgets of one router, kept across reloads (a reload changes the limits,
/// never the day's figures).
pub struct Spend {
    config: ArcSwap<SpendConfig>,
    clock: Clock,
    tallies: Mutex<Tallies>,
    ledger: ledger::Ledger,
    store: ArcSwapOption<Store>,
    /// Ledger lines Redis did not take yet (at most [`shared::MAX_UNSENT`]).
    unsent: Mutex<HashMap<ledger::Who, (u64, u64)>>,
    leases: Mutex<lease::Leases>,
    /// Changes Redis has not taken yet, kept while it was away (set until a flush lands).
    behind: AtomicBool,
    metrics: SpendMetrics,
}

impl Spend {
    pub fn new(config: &SpendConfig, metrics: SpendMetrics, clock: Clock) -> Arc<Spend> {
        let spend = Arc::new(Spend {
            config: ArcSwap::from_pointee(config.clone()),
            clock,
            tallies: Mutex::new(Tallies::default()),
            ledger: ledger::Ledger::default(),
            store: ArcSwapOption::empty(),
            unsent: Mutex::default(),
            leases: Mutex::default(),
            behind: AtomicBool::new(false),
            metrics,
        });
        // Outside a runtime (a config check), there is nothing to flush.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(shared::flush(Arc::downgrade(&spend)));
        }
        spend
    }

    /// Takes a reloaded config's budgets, and the store of its fleet (`None`: this router's
    /// figures alone).
    pub fn configure(&self, config: &SpendConfig, store: Option<Arc<Store>>) {
        self.config.store(Arc::new(config.clone()));
        self.store.store(store);
    }

    /// Reserves the most `request` can cost at `price` ([`crate::cost::worst`]) for a paid
    /// attempt against every budget that applies: all of them, or none and why. With no
    /// budget that applies, reserves nothing (the hold still counts the answer in the ledger).
    pub async fn reserve(
        self: &Arc<Self>,
        payer: Payer<'_>,
        price: Price,
        request: &CompletionRequest,
    ) -> Result<Hold, Refusal> {
        let config = self.config.load();
        let worst = crate::cost::worst(price, request, config.reserve_output_tokens);
        let day = self.clock.day();
        let limits = budgets(&config, payer);
        let scopes: Vec<Scope> = limits.iter().map(|(s, _)| s.clone()).collect();
        // A lease too small to serve a call like this one would only hold budget back.
        let lease = lease::size(limits.iter().map(|(_, l)| *l));
        let lease = if lease >= worst { lease } else { 0 };
        // Made once the reservation is: dropped, a hold gives back what it reserved. (A call
        // dropped while Redis decides may leave its reservation there: an overcount.)
        let hold = || Hold {
            spend: self.clone(),
            day,
            scopes: scopes.clone(),
            price,
            reserved: worst,
            lease,
            settled: false,
        };
        if limits.is_empty() {
            return Ok(hold());
        }
        let store = self.store.load_full();
        let asking = match (&store, lease) {
            (None, _) | (_, 0) => false,
            (Some(_), _) => match self.leased().take(&scopes, day, worst) {
                Take::Taken => return Ok(hold()),
                Take::Lease => true,
                Take::Need => false,
            },
        };
        let want = if asking {
            worst.saturating_add(lease)
        } else {
            worst
        };
        // However this call ends (dropped while Redis decides, too), another may ask next.
        let _asking = Asking {
            spend: self,
            scopes: &scopes,
            on: asking,
        };
        let decided = match store {
            Some(store) => match shared::reserve(&store, day, &limits, worst, want).await {
                Some(Ok((granted, totals))) => {
                    self.lock().seen(day, &totals, &[]);
                    self.keep(day, &scopes, granted.saturating_sub(worst), lease);
                    Ok(())
                }
                Some(Err((scope, limit, used))) => Err((scope, limit, used)),
                None => match config.on_store_error {
                    OnStoreError::Refuse => {
                        self.metrics.refused(&Scope::Router.key());
                        return Err(Refusal::StoreAway);
                    }
                    OnStoreError::EnforceLocal => {
                        self.metrics.decided_locally();
                        self.behind.store(true, Ordering::Relaxed);
                        self.lock().reserve(day, &limits, worst, true)
                    }
                },
            },
            None => self.lock().reserve(day, &limits, worst, false),
        };
        match decided {
            Ok(()) => Ok(hold()),
            Err((scope, limit, used)) => {
                self.metrics.refused(&scope.key());
                Err(Refusal::Exhausted {
                    scope,
                    limit,
                    used,
                    asked: worst,
                    resets_in: self.clock.until_tomorrow(),
                })
            }
        }
    }

    /// `day`'s ledger (today's by default) and today's budgets: the fleet's from Redis when
    /// there is one and it answers, else this router's own.
    pub async fn report(&self, day: Option<u32>) -> Report {
        let day = day.unwrap_or_else(|| self.clock.day());
        let config = self.config.load();
        let budgets = all_budgets(&config);
        let scopes: Vec<Scope> = budgets.iter().map(|(s, _)| s.clone()).collect();
        let shared = match self.store.load_full() {
            Some(store) => shared::read(&store, day, &scopes).await,
            None => None,
        };
        let (source, mut rows, used) = match shared {
            Some((rows, used)) => (Source::Redis, rows, used),
            None => {
                let tallies = self.lock();
                let used = scopes.iter().map(|s| tallies.used(day, s)).collect();
                drop(tallies);
                (Source::ThisRouter, self.ledger(Some(day)), used)
            }
        };
        rows.sort_by(|a, b| b.nanos.cmp(&a.nanos).then_with(|| a.tenant.cmp(&b.tenant)));
        Report {
            date: date(day),
            source,
            total_usd: rows.iter().map(|r| r.nanos).sum::<u64>() as f64 / 1e9,
            rows,
            budgets: budgets
                .iter()
                .zip(used)
                .map(|((scope, limit), used)| BudgetFigure::of(scope, *limit, used))
                .collect(),
        }
    }

    /// Each budget today, as this router knows it.
    pub fn budget_figures(&self) -> Vec<BudgetFigure> {
        self.budgets()
            .iter()
            .map(|(scope, limit, used)| BudgetFigure::of(scope, *limit, *used))
            .collect()
    }

    /// What each provider's answers cost today as this router counted them, and what its own
    /// budget has left (when it has one), in nanodollars — one pass over the ledger for all.
    pub fn providers_today(&self) -> HashMap<String, (u64, Option<u64>)> {
        let day = self.clock.day();
        let mut out: HashMap<String, (u64, Option<u64>)> = self
            .ledger
            .by_provider(day)
            .into_iter()
            .map(|(p, spent)| (p, (spent, None)))
            .collect();
        let config = self.config.load();
        let tallies = self.lock();
        for (provider, limit) in &config.provider_daily {
            let used = tallies.used(day, &Scope::Provider(provider.as_str().into()));
            out.entry(provider.clone()).or_default().1 = Some(limit.saturating_sub(used));
        }
        out
    }

    /// Today's ledger (or `day`'s, as days since 1970), as this router has it.
    pub fn ledger(&self, day: Option<u32>) -> Vec<Row> {
        self.ledger.rows(day.unwrap_or_else(|| self.clock.day()))
    }

    /// Each budget's limit and what is spent or reserved against it today, as this router
    /// knows it (for the status page and `ListProviders`).
    pub fn budgets(&self) -> Vec<(Scope, u64, u64)> {
        let config = self.config.load();
        let day = self.clock.day();
        let tallies = self.lock();
        all_budgets(&config)
            .into_iter()
            .map(|(scope, limit)| {
                let used = tallies.used(day, &scope);
                (scope, limit, used)
            })
            .collect()
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tallies> {
        self.tallies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn leased(&self) -> std::sync::MutexGuard<'_, lease::Leases> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `amount` of `day`'s budgets on `scopes` in their lease (of at most `cap`); what
    /// does not fit goes back to Redis with the next flush.
    fn keep(&self, day: u32, scopes: &[Scope], amount: u64, cap: u64) {
        if amount == 0 {
            return;
        }
        let back = self.leased().give(scopes, day, amount, cap);
        if back > 0 {
            self.lock()
                .pend(day, scopes, -i64::try_from(back).unwrap_or(i64::MAX));
        }
    }

    /// Writes to the fleet's Redis at once what this router spent since its last write, and
    /// gives back its leases: a router that stops loses nothing of the day's figures.
    pub async fn write_back(&self) {
        shared::flush_once(self, true).await;
    }

    /// Gives leases idle past their lapse (`all`: every lease) back to Redis (with the flush
    /// that follows).
    fn return_leases(&self, all: bool) {
        let lapsed = self.leased().lapsed(self.clock.day(), all);
        let mut tallies = self.lock();
        for (day, scopes, left) in lapsed {
            tallies.pend(day, &scopes, -i64::try_from(left).unwrap_or(i64::MAX));
        }
    }

    /// Keeps ledger lines for the next flush, summed by day and who.
    fn unsent(&self, rows: Vec<ledger::Key>) {
        let mut unsent = self.unsent.lock().unwrap_or_else(PoisonError::into_inner);
        for row in rows {
            let who = row.who();
            if unsent.len() >= shared::MAX_UNSENT && !unsent.contains_key(&who) {
                continue;
            }
            let line = unsent.entry(who).or_default();
            line.0 = line.0.saturating_add(row.nanos);
            line.1 = line.1.saturating_add(row.calls);
        }
    }

    fn take_unsent(&self) -> Vec<ledger::Key> {
        let taken =
            std::mem::take(&mut *self.unsent.lock().unwrap_or_else(PoisonError::into_inner));
        taken
            .into_iter()
            .map(
                |((day, tenant, provider, model), (nanos, calls))| ledger::Key {
                    day,
                    tenant,
                    provider,
                    model,
                    nanos,
                    calls,
                },
            )
            .collect()
    }

    /// Moves `hold`'s budgets to what its call cost (`None`: no answer, nothing), counts the
    /// cost in the ledger, and gives the alert when a budget reaches its threshold.
    fn settle(self: &Arc<Self>, hold: &Hold, cost: Option<(Payer<'_>, Cost)>) {
        let actual = cost.map_or(0, |(_, c)| c.nanos);
        let delta = i64::try_from(actual).unwrap_or(i64::MAX)
            - i64::try_from(hold.reserved).unwrap_or(i64::MAX);
        if let Some((payer, cost)) = cost {
            let tenant = self.labelled(payer.tenant);
            self.metrics
                .spent(tenant, payer.provider, payer.model, cost);
            self.ledger.add(hold.day, payer, cost);
        }
        let config = self.config.load();
        let store = self.store.load_full();
        let mut tallies = self.lock();
        // With a store, what the call did not use goes to the lease, and what it used beyond
        // its reservation waits for the next flush to be written there.
        if store.is_none() {
            tallies.apply(hold.day, &hold.scopes, delta);
        } else if delta > 0 {
            tallies.pend(hold.day, &hold.scopes, delta);
        }
        for scope in &hold.scopes {
            let Some(limit) = limit_of(&config, scope) else {
                continue;
            };
            let used = tallies.used(hold.day, scope);
            self.metrics
                .remaining(&scope.key(), limit.saturating_sub(used));
            if used.saturating_mul(100) >= limit.saturating_mul(config.alert_percent)
                && tallies.alert_once(hold.day, scope)
            {
                self.metrics.alerted(&scope.key());
                tracing::warn!(
                    budget = %scope.key(),
                    spent_usd = used as f64 / 1e9,
                    budget_usd = limit as f64 / 1e9,
                    "{scope} is {}% spent",
                    used.saturating_mul(100) / limit.max(1)
                );
            }
        }
        drop(tallies);
        if store.is_some() && delta < 0 {
            self.keep(hold.day, &hold.scopes, delta.unsigned_abs(), hold.lease);
        }
        if let (Some(_), Some((payer, cost))) = (store, cost) {
            self.unsent(vec![ledger::Key::of(hold.day, payer, cost)]);
        }
    }

    /// The tenant label for metrics: a client key's name, or none.
    fn labelled<'a>(&self, tenant: &'a str) -> &'a str {
        if self.config.load().clients.contains(tenant) {
            tenant
        } else {
            ""
        }
    }
}

/// The budgets that apply to `payer`, with their limits.
fn budgets(config: &SpendConfig, payer: Payer<'_>) -> Vec<(Scope, u64)> {
    let mut out = Vec::new();
    if let Some(l) = config.router_daily {
        out.push((Scope::Router, l));
    }
    if let Some(l) = config.provider_daily.get(&**payer.provider) {
        out.push((Scope::Provider(payer.provider.clone()), *l));
    }
    if let Some(l) = config.client_daily.get(payer.tenant) {
        out.push((Scope::Client(payer.tenant.into()), *l));
    }
    out
}

fn all_budgets(config: &SpendConfig) -> Vec<(Scope, u64)> {
    let mut out: Vec<(Scope, u64)> = config
        .router_daily
        .map(|l| (Scope::Router, l))
        .into_iter()
        .collect();
    out.extend(
        config
            .provider_daily
            .iter()
            .map(|(p, l)| (Scope::Provider(p.as_str().into()), *l)),
    );
    out.extend(
        config
            .client_daily
            .iter()
            .map(|(c, l)| (Scope::Client(c.as_str().into()), *l)),
    );
    out
}

fn limit_of(config: &SpendConfig, scope: &Scope) -> Option<u64> {
    match scope {
        Scope::Router => config.router_daily,
        Scope::Provider(p) => config.provider_daily.get(&**p).copied(),
        Scope::Client(c) => config.client_daily.get(&**c).copied(),
    }
}

/// The call asking Redis for a lease: when it ends, however, another call may ask.
struct Asking<'a> {
    spend: &'a Spend,
    scopes: &'a [Scope],
    on: bool,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if self.on {
            self.spend.leased().answered(self.scopes);
        }
    }
}

/// A reservation for one paid attempt. Settle it with the answer's cost; dropped unsettled
/// (no answer), it gives the reservation back.
pub struct Hold {
    spend: Arc<Spend>,
    /// The price of the model reserved for: its answer is charged at it.
    price: Price,
    day: u32,
    scopes: Vec<Scope>,
    reserved: u64,
    /// The most the lease on these budgets may hold.
    lease: u64,
    settled: bool,
}

impl Hold {
    /// The model's price the reservation was made at.
    pub fn price(&self) -> Price {
        self.price
    }

    /// The answer came, costing `cost`: the budgets move to it, and the ledger counts it.
    pub fn settle(mut self, payer: Payer<'_>, cost: Cost) {
        self.settled = true;
        self.spend.settle(&self, Some((payer, cost)));
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.settled && !self.scopes.is_empty() {
            self.spend.settle(self, None);
        }
    }
}

#[cfg(test)]
mod tests;
