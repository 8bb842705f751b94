//! Budgets and the ledger in Redis, shared by every replica: a day's budget is one counter
//! of nanodollars spent and reserved, `cascade:budget:{date}:{scope}`, living two days.
//!
//! A reservation is one script over every budget that applies, so it is all or none across
//! them and across replicas; it is the one round trip on a call's path. Settlements and ledger
//! lines are kept, summed, and [`flush`]ed as one pipeline every [`FLUSH_EVERY`] (until then
//! other replicas see the reservation, never less than the cost); what Redis does not take
//! (away) is kept for the next flush, as are reservations decided locally meanwhile. An
//! operation that timed out after Redis did it is counted twice — an overcount, never an
//! overshoot.

use std::{
    collections::BTreeMap,
    sync::{Arc, LazyLock, Weak, atomic::Ordering},
    time::Duration,
};

use super::{Scope, Spend, clock::date, ledger};
use crate::store::Store;

/// How often settlements and ledger lines are written (together, one pipeline), and those
/// Redis did not take offered again: how far a replica's figures in Redis may lag.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A budget counter's life: its day and the next (a late settlement still finds it).
const BUDGET_TTL_MS: u64 = 2 * 86_400_000;
/// Ledger lines (day, tenant, provider, model) kept for Redis to take, at most; past that new
/// ones are dropped (counted in the router's own ledger and metrics still).
pub(super) const MAX_UNSENT: usize = 10_000;

/// KEYS: the budgets' counters. ARGV: what the call needs, what it would take (a lease
/// besides), the counters' TTL (ms), then each budget's limit. Reserves `want` where every
/// budget has room for it, else `need`; returns `{granted, total…}`, or `{-i, used}` for the
/// first budget without room for `need`.
static RESERVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local need, grant = tonumber(ARGV[1]), tonumber(ARGV[2])
for i, k in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', k) or '0')
  local limit = tonumber(ARGV[i + 3])
  if used + need > limit then return {-i, used} end
  if used + grant > limit then grant = need end
end
local out = {grant}
for i, k in ipairs(KEYS) do
  out[i + 1] = redis.call('INCRBY', k, grant)
  redis.call('PEXPIRE', k, ARGV[3])
end
return out
",
    )
});

fn key(day: u32, scope: &Scope) -> String {
    format!("cascade:budget:{}:{}", date(day), scope.key())
}

/// A reservation Redis made: what it granted (`need`, or `want` with a lease), and each
/// budget's total after it.
pub(super) type Granted = (u64, Vec<(Scope, i64)>);

/// What Redis said of a reservation of `need` (or `want`): `None` when it did not answer;
/// else what it granted, or the budget without room (scope, limit, used).
pub(super) async fn reserve(
    store: &Arc<Store>,
    day: u32,
    limits: &[(Scope, u64)],
    need: u64,
    want: u64,
) -> Option<Result<Granted, (Scope, u64, u64)>> {
    let mut invocation = RESERVE.prepare_invoke();
    for (scope, _) in limits {
        invocation.key(key(day, scope));
    }
    invocation.arg(need).arg(want).arg(BUDGET_TTL_MS);
    for (_, limit) in limits {
        invocation.arg(*limit);
    }
    let reply: Vec<i64> = store
        .run("budget", |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await?;
    let (head, rest) = reply.split_first()?;
    if *head < 0 {
        let (scope, limit) = limits.get(usize::try_from(-*head).ok()? - 1)?;
        let used = u64::try_from(rest.first().copied().unwrap_or(0)).unwrap_or(0);
        return Some(Err((scope.clone(), *limit, used)));
    }
    let totals = limits
        .iter()
        .zip(rest)
        .map(|((s, _), t)| (s.clone(), *t))
        .collect();
    Some(Ok((u64::try_from(*head).unwrap_or(0), totals)))
}

/// One pipeline: each budget moved by `delta`, then the ledger lines.
fn pipeline(day: u32, scopes: &[(Scope, i64)], rows: &[ledger::Key]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for (scope, delta) in scopes {
        let k = key(day, scope);
        pipe.cmd("INCRBY").arg(&k).arg(*delta);
        pipe.cmd("PEXPIRE").arg(&k).arg(BUDGET_TTL_MS).ignore();
    }
    for row in rows {
        let (hash, calls, field) = row.redis();
        let keep = ledger::KEEP_DAYS * 86_400;
        pipe.cmd("HINCRBY")
            .arg(&hash)
            .arg(&field)
            .arg(row.nanos)
            .ignore();
        pipe.cmd("HINCRBY")
            .arg(&calls)
            .arg(&field)
            .arg(row.calls)
            .ignore();
        pipe.cmd("EXPIRE").arg(&hash).arg(keep).ignore();
        pipe.cmd("EXPIRE").arg(&calls).arg(keep).ignore();
    }
    pipe
}

/// Runs a [`pipeline`]: the budgets' totals after it, `None` when Redis did not take it.
async fn write(store: &Arc<Store>, pipe: redis::Pipeline) -> Option<Vec<i64>> {
    store
        .run("spend", |mut c| async move {
            pipe.query_async::<Vec<i64>>(&mut c).await
        })
        .await
}

/// Writes what this router settled and counted since the last time (and what Redis did not
/// take before), every [`FLUSH_EVERY`] while `spend` lives.
pub(super) async fn flush(spend: Weak<Spend>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(spend) = spend.upgrade() else { return };
        flush_once(&spend, false).await;
    }
}

/// One flush: settlements, ledger lines and lapsed leases (every lease, with `all`) in one
/// pipeline; what Redis does not take is kept for the next.
pub(super) async fn flush_once(spend: &Spend, all: bool) {
    let Some(store) = spend.store.load_full() else {
        return;
    };
    spend.return_leases(all);
    let (day, pending) = spend.lock().pending();
    let rows = spend.take_unsent();
    if pending.is_empty() && rows.is_empty() {
        return;
    }
    let pipe = pipeline(day, &pending, &rows);
    match write(&store, pipe).await {
        Some(totals) => {
            let flushed: Vec<i64> = pending.iter().map(|(_, d)| *d).collect();
            let seen: Vec<(Scope, i64)> = pending.into_iter().map(|(s, _)| s).zip(totals).collect();
            spend.lock().seen(day, &seen, &flushed);
            if spend.behind.swap(false, Ordering::Relaxed) {
                spend.metrics.reconciled();
            }
        }
        None => {
            spend.behind.store(true, Ordering::Relaxed);
            spend.unsent(rows);
        }
    }
}

/// A day's two ledger hashes and its budgets' counters.
type Read = (Vec<(String, u64)>, BTreeMap<String, u64>, Vec<Option<i64>>);

/// A day's ledger and the use of `budgets` that day, as Redis has them; `None` when Redis
/// did not answer.
pub(super) async fn read(
    store: &Arc<Store>,
    day: u32,
    budgets: &[Scope],
) -> Option<(Vec<ledger::Row>, Vec<u64>)> {
    let hash = format!("cascade:spend:{}", date(day));
    let mut pipe = redis::pipe();
    pipe.cmd("HGETALL").arg(&hash);
    pipe.cmd("HGETALL").arg(format!("{hash}:calls"));
    for scope in budgets {
        pipe.cmd("GET").arg(key(day, scope));
    }
    let (nanos, calls, used): Read = store
        .run("spend", |mut c| async move {
            let mut all: Vec<redis::Value> = pipe.query_async(&mut c).await?;
            let used = all.split_off(2.min(all.len()));
            let mut it = all.into_iter();
            let field = |v: Option<redis::Value>| -> redis::RedisResult<redis::Value> {
                Ok(v.unwrap_or(redis::Value::Nil))
            };
            let nanos = redis::from_redis_value(field(it.next())?)?;
            let calls = redis::from_redis_value(field(it.next())?)?;
            let used = used
                .into_iter()
                .map(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
                .collect::<redis::RedisResult<_>>()?;
            Ok((nanos, calls, used))
        })
        .await?;
    let used = used
        .into_iter()
        .map(|u| u64::try_from(u.unwrap_or(0)).unwrap_or(0))
        .collect();
    Some((ledger::rows_of(nanos, &calls), used))
}
