//! Rate limits, as GCRA buckets: a provider's quota of requests and tokens per minute, which
//! a request waits for when its time allows and otherwise goes elsewhere, and per-client
//! quotas at the edge. A router's own buckets are governor's, on tokio's clock (so a paused
//! test clock drives them exactly); a fleet's live in Redis ([`crate::fleet`]).

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::Clock,
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed, keyed::DashMapStateStore},
};
use tokio::time::Instant;

use crate::{
    completion::{CompletionRequest, FailureKind, Input},
    config::{QuotaConfig, RateLimitConfig},
    fleet::{Fleet, Shared, Verdict},
    provider::ProviderError,
};

/// governor's clock on tokio's time: a duration since the bucket was made.
#[derive(Clone, Debug)]
struct TokioClock(Instant);

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

type Bucket = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// How long a 429 keeps a provider's request rate tightened, and how often it relaxes by half
/// after that.
const TIGHTEN_FOR: Duration = Duration::from_secs(60);

/// A provider's request and token buckets, shared by its endpoints (and, in a fleet, by
/// every router).
pub struct ProviderLimit {
    clock: TokioClock,
    requests: Option<Cells>,
    burst: u32,
    tokens: Option<(Cells, u32)>,
    /// Cells each request costs: 1, doubled by each 429 (up to the burst), halved again
    /// after each `TIGHTEN_FOR` without one — so a 429 lowers the rate without resetting the
    /// bucket.
    cost: AtomicU32,
    /// When the cost may next be halved, in µs on `clock`.
    relax_at_us: AtomicU64,
}

/// One budget: this router's alone, or the fleet's in Redis with this router's share of it
/// for when Redis is away.
enum Cells {
    Local(Bucket),
    Fleet { shared: Arc<Shared>, share: Bucket },
}

impl Cells {
    /// `per_minute` with `burst`: the fleet's when there is one, under `key`.
    fn new(
        clock: &TokioClock,
        fleet: Option<(&Fleet, String)>,
        per_minute: NonZeroU32,
        burst: NonZeroU32,
    ) -> Cells {
        let bucket = |per_minute: NonZeroU32, burst: NonZeroU32| {
            let quota = Quota::per_minute(per_minute).allow_burst(burst);
            RateLimiter::direct_with_clock(quota, clock.clone())
        };
        match fleet {
            None => Cells::Local(bucket(per_minute, burst)),
            Some((fleet, key)) => Cells::Fleet {
                shared: Arc::new(fleet.limit(key, per_minute.get(), burst.get())),
                share: bucket(fleet.share(per_minute), fleet.share(burst)),
            },
        }
    }
}

impl ProviderLimit {
    /// The limit of provider `name`: the fleet's when there is one.
    pub fn new(c: &RateLimitConfig, name: &str, fleet: Option<&Fleet>) -> ProviderLimit {
        let clock = TokioClock(Instant::now());
        let key = |what: &str| fleet.map(|f| (f, format!("cascade:rate:{name}:{what}")));
        let requests = c
            .requests_per_minute
            .map(|rpm| Cells::new(&clock, key("requests"), rpm, c.burst));
        let tokens = c
            .tokens_per_minute
            .map(|tpm| (Cells::new(&clock, key("tokens"), tpm, tpm), tpm.get()));
        ProviderLimit {
            clock,
            requests,
            burst: c.burst.get(),
            tokens,
            cost: AtomicU32::new(1),
            relax_at_us: AtomicU64::new(0),
        }
    }

    /// Takes one request (and `request`s estimated tokens) from the buckets, waiting while
    /// that still leaves the try time to finish by `until`; otherwise says when there will be
    /// room, as a [`FailureKind::RateLimited`] error that moves the request on.
    pub async fn take(
        &self,
        requests: &[&CompletionRequest],
        until: Instant,
    ) -> Result<(), ProviderError> {
        self.relax();
        let cost = self.cost.load(Relaxed).max(1);
        if let Some(cells) = &self.requests {
            self.wait(cells, cost, self.burst, until, "requests_per_minute")
                .await?;
        }
        if let Some((cells, per_minute)) = &self.tokens {
            let estimate: u32 = requests.iter().map(|r| estimate_tokens(r)).sum();
            self.wait(
                cells,
                estimate.clamp(1, *per_minute),
                *per_minute,
                until,
                "tokens_per_minute",
            )
            .await?;
        }
        Ok(())
    }

    /// Charges what the answer used beyond the estimate, when the bucket has it.
    pub fn used(&self, estimated: u32, actual: u32) {
        let (Some((cells, per_minute)), Some(extra)) = (
            &self.tokens,
            NonZeroU32::new(actual.saturating_sub(estimated)),
        ) else {
            return;
        };
        let extra = extra.min(NonZeroU32::new(*per_minute).unwrap_or(extra));
        match cells {
            Cells::Local(bucket) => {
                let _ = bucket.check_n(extra);
            }
            Cells::Fleet { shared, .. } => shared.charge(extra.get()),
        }
    }

    /// The provider said 429: each request costs twice as many cells for a while.
    pub fn tightened(&self) {
        let cost = self.cost.load(Relaxed);
        self.cost
            .store(cost.saturating_mul(2).min(self.burst.max(1)), Relaxed);
        self.relax_at_us
            .store(micros(self.clock.now() + TIGHTEN_FOR), Relaxed);
    }

    fn relax(&self) {
        let now = self.clock.now();
        let at = self.relax_at_us.load(Relaxed);
        if self.cost.load(Relaxed) > 1
            && micros(now) >= at
            && self
                .relax_at_us
                .compare_exchange(at, micros(now + TIGHTEN_FOR), Relaxed, Relaxed)
                .is_ok()
        {
            let cost = self.cost.load(Relaxed);
            self.cost.store((cost / 2).max(1), Relaxed);
        }
    }

    /// Takes `cells` of at most `holds`, waiting for room while `until` allows.
    async fn wait(
        &self,
        cells: &Cells,
        n: u32,
        holds: u32,
        until: Instant,
        what: &str,
    ) -> Result<(), ProviderError> {
        if n > holds {
            return Err(ProviderError::new(
                FailureKind::RateLimited,
                format!("asks {n} of {what}, more than the bucket holds"),
            ));
        }
        let bucket = match cells {
            Cells::Local(bucket) => bucket,
            Cells::Fleet { shared, share } => match shared.take(n, until).await {
                Some(Verdict::Go(wait)) => {
                    // Not even a zero sleep when there was room: tokio's timer would hold the
                    // request to its next millisecond tick.
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    return Ok(());
                }
                Some(Verdict::Full(wait)) => return Err(full(what, wait)),
                None => share,
            },
        };
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        loop {
            let wait = match bucket.check_n(n) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(not_until)) => not_until.wait_time_from(self.clock.now()),
                // This router's share of a fleet's bucket holds fewer cells than the bucket.
                Err(_) => return Err(full(what, Duration::ZERO)),
            };
            if Instant::now() + wait >= until {
                return Err(full(what, wait));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

fn full(what: &str, wait: Duration) -> ProviderError {
    ProviderError::new(
        FailureKind::RateLimited,
        format!(
            "{what} reached; room again in {} ms",
            wait.as_millis().max(1)
        ),
    )
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What a request will likely cost in tokens: its text at ~4 bytes a token, plus what it may
/// generate (`max_tokens`, or 256 when unset).
pub fn estimate_tokens(r: &CompletionRequest) -> u32 {
    let bytes = match &r.input {
        Input::Prompt(p) => p.len(),
        Input::Chat(m) => r.input.text_len() + 4 * m.len(),
    };
    let prompt = u32::try_from(bytes / 4).unwrap_or(u32::MAX);
    prompt.saturating_add(r.params.max_tokens.unwrap_or(256))
}

type Keyed = RateLimiter<String, DashMapStateStore<String>, TokioClock, NoOpMiddleware<Duration>>;

/// Keyed buckets beyond this many are pruned of those that are full again.
const MAX_TRACKED_TENANTS: usize = 10_000;

/// Per-client quotas: each tenant's calls per minute, with a burst — the fleet's, decided in
/// Redis, when there is one (this router's share of each while Redis is away).
pub struct TenantQuotas {
    clock: TokioClock,
    /// This router's buckets: the whole quota alone, its share in a fleet.
    buckets: Keyed,
    per_minute: u32,
    burst: u32,
    fleet: Option<Arc<Fleet>>,
    /// The fleet's bucket of each tenant seen lately (each with its lease), at most
    /// [`MAX_TRACKED_TENANTS`]: past that the map starts over (leases lapse in 250 ms anyway).
    shared: dashmap::DashMap<String, Arc<Shared>>,
}

impl TenantQuotas {
    pub fn new(c: &QuotaConfig, fleet: Option<Arc<Fleet>>) -> TenantQuotas {
        let clock = TokioClock(Instant::now());
        let part = |v: NonZeroU32| fleet.as_ref().map_or(v, |f| f.share(v));
        let quota = Quota::per_minute(part(c.requests_per_minute)).allow_burst(part(c.burst));
        TenantQuotas {
            buckets: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
            per_minute: c.requests_per_minute.get(),
            burst: c.burst.get(),
            fleet,
            shared: dashmap::DashMap::new(),
        }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// `Err(wait)` when `tenant` has used its quota: it may call again after `wait`.
    pub async fn check(&self, tenant: &str) -> Result<(), Duration> {
        if let Some(fleet) = &self.fleet {
            if self.shared.len() > MAX_TRACKED_TENANTS {
                self.shared.clear();
            }
            let bucket = match self.shared.get(tenant) {
                Some(b) => b.clone(),
                None => {
                    let key = format!("cascade:quota:{tenant}");
                    let b = Arc::new(fleet.limit(key, self.per_minute, self.burst));
                    self.shared.entry(tenant.to_string()).or_insert(b).clone()
                }
            };
            match bucket.take(1, Instant::now()).await {
                Some(Verdict::Go(_)) => return Ok(()),
                Some(Verdict::Full(wait)) => return Err(wait),
                None => {}
            }
        }
        if self.buckets.len() > MAX_TRACKED_TENANTS {
            self.buckets.retain_recent();
        }
        self.buckets
            .check_key(&tenant.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::{CacheMode, GenParams};

    fn req() -> CompletionRequest {
        CompletionRequest {
            model: "m".into(),
            input: Input::Prompt("x".repeat(400)),
            params: GenParams {
                max_tokens: Some(100),
                ..GenParams::default()
            },
            agent: String::new(),
            tenant: String::new(),
            request_id: String::new(),
            cache: CacheMode::Default,
        }
    }

    fn limit(rpm: u32, burst: u32, tpm: Option<u32>) -> ProviderLimit {
        ProviderLimit::new(
            &RateLimitConfig {
                requests_per_minute: NonZeroU32::new(rpm),
                tokens_per_minute: tpm.and_then(NonZeroU32::new),
                burst: NonZeroU32::new(burst).unwrap(),
            },
            "p",
            None,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_waits_while_the_deadline_allows() {
        let l = limit(60, 3, None);
        let r = req();
        let far = Instant::now() + Duration::from_secs(60);
        for _ in 0..3 {
            l.take(&[&r], far).await.unwrap();
        }
        let before = Instant::now();
        l.take(&[&r], far).await.unwrap();
        assert_eq!(
            before.elapsed(),
            Duration::from_secs(1),
            "one a second after the burst"
        );
        let soon = Instant::now() + Duration::from_millis(500);
        let e = l.take(&[&r], soon).await.unwrap_err();
        assert_eq!(e.kind, FailureKind::RateLimited);
        assert!(e.message.contains("room again in 1000 ms"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_the_rate_for_a_while() {
        let l = limit(60, 4, None);
        let r = req();
        let far = Instant::now() + Duration::from_secs(600);
        for _ in 0..4 {
            l.take(&[&r], far).await.unwrap();
        }
        l.tightened();
        let before = Instant::now();
        l.take(&[&r], far).await.unwrap();
        assert_eq!(
            before.elapsed(),
            Duration::from_secs(2),
            "two cells a request"
        );
        tokio::time::advance(TIGHTEN_FOR).await;
        let before = Instant::now();
        for _ in 0..4 {
            l.take(&[&r], far).await.unwrap();
        }
        assert_eq!(
            before.elapsed(),
            Duration::ZERO,
            "relaxed: the full bucket holds four one-cell requests again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_estimated_from_prompt_and_max_tokens() {
        assert_eq!(estimate_tokens(&req()), 100 + 100);
        let l = limit(6000, 100, Some(400));
        let r = req();
        let far = Instant::now() + Duration::from_secs(60);
        l.take(&[&r], far).await.unwrap();
        l.take(&[&r], far).await.unwrap();
        let before = Instant::now();
        l.take(&[&r], far).await.unwrap();
        assert_eq!(
            before.elapsed(),
            Duration::from_secs(30),
            "200 of 400 tokens a minute"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tenant_quotas_are_per_tenant() {
        let q = TenantQuotas::new(
            &QuotaConfig {
                requests_per_minute: NonZeroU32::new(60).unwrap(),
                burst: NonZeroU32::new(2).unwrap(),
            },
            None,
        );
        assert!(q.check("a").await.is_ok() && q.check("a").await.is_ok());
        assert_eq!(q.check("a").await, Err(Duration::from_secs(1)));
        assert!(
            q.check("b").await.is_ok(),
            "another tenant has its own bucket"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(q.check("a").await.is_ok());
    }
}
