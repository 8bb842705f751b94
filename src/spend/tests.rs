use std::collections::BTreeMap;

use super::*;

const DAY: u64 = 86_400;

/// $1 a million tokens in and out: 1,000 nanodollars a token.
const PRICE: Price = Price {
    input_nanos_per_token: 1_000,
    output_nanos_per_token: 1_000,
};

fn config(router: Option<u64>, provider: Option<u64>) -> SpendConfig {
    SpendConfig {
        router_daily: router,
        provider_daily: provider
            .map(|l| BTreeMap::from([("paid".to_string(), l)]))
            .unwrap_or_default(),
        alert_percent: 80,
        reserve_output_tokens: 100,
        ..SpendConfig::default()
    }
}

fn spend(c: &SpendConfig, metrics: &SpendMetrics) -> Arc<Spend> {
    // 23:00 UTC on 2025-12-05.
    let clock = Clock::at(Duration::from_secs(20_427 * DAY + 23 * 3600));
    Spend::new(c, metrics.clone(), clock)
}

struct Names {
    provider: Arc<str>,
    model: Arc<str>,
}

impl Names {
    fn new() -> Names {
        Names {
            provider: "paid".into(),
            model: "big".into(),
        }
    }

    fn payer(&self) -> Payer<'_> {
        Payer {
            tenant: "t",
            provider: &self.provider,
            model: &self.model,
        }
    }
}

/// A 10-byte prompt with `max_tokens: 10`: worst case 10 + 16 tokens in, 10 out — 36,000
/// nanodollars reserved.
fn request() -> Arc<CompletionRequest> {
    let mut r = (*CompletionRequest::test_prompt("0123456789")).clone();
    r.params.max_tokens = Some(10);
    Arc::new(r)
}

const WORST: u64 = 36_000;

fn cost(nanos: u64) -> Cost {
    Cost {
        nanos,
        estimated: false,
    }
}

#[tokio::test(start_paused = true)]
async fn a_reservation_is_the_worst_case_and_settles_to_the_cost() {
    let metrics = SpendMetrics::default();
    let s = spend(&config(Some(100_000), None), &metrics);
    let n = Names::new();
    let hold = s.reserve(n.payer(), PRICE, &request()).await.unwrap();
    assert_eq!(s.budgets(), vec![(Scope::Router, 100_000, WORST)]);
    hold.settle(n.payer(), cost(5_000));
    assert_eq!(s.budgets(), vec![(Scope::Router, 100_000, 5_000)]);
    // Dropped without an answer, a hold gives its reservation back.
    drop(s.reserve(n.payer(), PRICE, &request()).await.unwrap());
    assert_eq!(s.budgets(), vec![(Scope::Router, 100_000, 5_000)]);
    let rows = s.ledger(None);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].nanos, rows[0].calls), (5_000, 1));
}

#[tokio::test(start_paused = true)]
async fn a_budget_that_cannot_cover_the_worst_case_refuses_and_says_when_it_resets() {
    let metrics = SpendMetrics::default();
    // Room for two reservations of the router's, and the provider's for one.
    let s = spend(&config(Some(2 * WORST), Some(WORST + 1)), &metrics);
    let n = Names::new();
    let first = s.reserve(n.payer(), PRICE, &request()).await.unwrap();
    let Err(refusal) = s.reserve(n.payer(), PRICE, &request()).await else {
        panic!("the provider's budget is reserved in full");
    };
    assert_eq!(refusal.resets_in(), Some(Duration::from_secs(3600)));
    let text = refusal.to_string();
    assert!(text.starts_with("provider paid's daily budget"), "{text}");
    assert!(text.contains("resets at 00:00 UTC, in 1 h 0 min"), "{text}");
    // All or none: the router's budget was not charged for the refused one.
    assert_eq!(s.budgets()[0], (Scope::Router, 2 * WORST, WORST));
    drop(first);
}

#[tokio::test(start_paused = true)]
async fn the_day_rolls_over_at_midnight_utc_and_the_budgets_start_again() {
    let metrics = SpendMetrics::default();
    let s = spend(&config(Some(WORST), None), &metrics);
    let n = Names::new();
    s.reserve(n.payer(), PRICE, &request())
        .await
        .unwrap()
        .settle(n.payer(), cost(WORST));
    assert!(s.reserve(n.payer(), PRICE, &request()).await.is_err());
    let yesterday = s.clock().day();
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(s.clock().day(), yesterday + 1);
    let hold = s.reserve(n.payer(), PRICE, &request()).await.unwrap();
    hold.settle(n.payer(), cost(7));
    assert_eq!(s.ledger(Some(yesterday))[0].nanos, WORST);
    assert_eq!(s.ledger(None)[0].nanos, 7);
}

#[tokio::test(start_paused = true)]
async fn concurrent_reservations_never_take_more_than_the_budget() {
    let metrics = SpendMetrics::default();
    let limit = 10 * WORST + WORST / 2;
    let s = spend(&config(Some(limit), None), &metrics);
    let n = Names::new();
    let r = request();
    let tries = (0..64).map(|_| s.reserve(n.payer(), PRICE, &r));
    let (held, refused): (Vec<_>, Vec<_>) = futures_util::future::join_all(tries)
        .await
        .into_iter()
        .partition(Result::is_ok);
    let held: Vec<Hold> = held.into_iter().map(Result::unwrap).collect();
    let refused = refused.len();
    assert_eq!((held.len(), refused), (10, 54));
    // Each answer cost its worst case: spend ends at the reserved amount, within the limit.
    for h in held {
        h.settle(n.payer(), cost(WORST));
    }
    assert_eq!(s.budgets()[0].2, 10 * WORST);
}

#[tokio::test(start_paused = true)]
async fn the_alert_is_given_once_a_day_at_its_threshold() {
    let metrics = SpendMetrics::default();
    let s = spend(&config(Some(10 * WORST), None), &metrics);
    let n = Names::new();
    let mut alerts = Vec::new();
    for _ in 0..10 {
        s.reserve(n.payer(), PRICE, &request())
            .await
            .unwrap()
            .settle(n.payer(), cost(WORST));
        alerts.push(metrics.alerts_of("router"));
    }
    // 80% is reached by the eighth answer, and said once.
    assert_eq!(alerts, vec![0, 0, 0, 0, 0, 0, 0, 1, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn without_a_budget_nothing_is_reserved_and_the_ledger_still_counts() {
    let metrics = SpendMetrics::default();
    let s = spend(&config(None, None), &metrics);
    let n = Names::new();
    s.reserve(n.payer(), PRICE, &request())
        .await
        .unwrap()
        .settle(n.payer(), cost(42));
    assert!(s.budgets().is_empty());
    assert_eq!(s.ledger(None)[0].nanos, 42);
}

/// A store no Redis answers at: a port that refuses (bound, then released).
fn away() -> Arc<Store> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let config = crate::config::RedisConfig {
        url: format!("redis://127.0.0.1:{port}"),
        timeout: Duration::from_millis(200),
    };
    Store::new(&config, crate::metrics::RedisMetrics::default(), "test").unwrap()
}

#[tokio::test]
async fn with_the_store_away_refuse_skips_paid_models_and_enforce_local_decides_here() {
    let metrics = SpendMetrics::default();
    let mut c = config(Some(2 * WORST), None);
    c.on_store_error = OnStoreError::Refuse;
    let s = spend(&c, &metrics);
    s.configure(&c, Some(away()));
    let n = Names::new();
    let refused = s.reserve(n.payer(), PRICE, &request()).await.err();
    assert_eq!(refused, Some(Refusal::StoreAway));

    c.on_store_error = OnStoreError::EnforceLocal;
    s.configure(&c, Some(away()));
    let first = s.reserve(n.payer(), PRICE, &request()).await.unwrap();
    let second = s.reserve(n.payer(), PRICE, &request()).await.unwrap();
    // The local figures still hold the budget.
    assert!(matches!(
        s.reserve(n.payer(), PRICE, &request()).await,
        Err(Refusal::Exhausted { .. })
    ));
    drop((first, second));
}
