use super::*;

#[test]
fn backoff_grows_and_stays_in_its_band() {
    let base = Duration::from_millis(100);
    for tries in 1..=8 {
        let full = base * (1 << (tries - 1).min(5));
        let d = backoff(base, tries);
        assert!(
            d >= full / 2 && d <= full,
            "try {tries}: {d:?} outside {full:?}"
        );
    }
    assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
}

// Fallback, breaker, Retry-After and deadlines through in-process fake providers on a paused
// clock: the behaviour exactly, with no wall-clock wait (the HTTP mock keeps the wire format).

use crate::{
    config,
    metrics::Metrics,
    provider::fake::{Fake, Script},
    upstream::Circuit,
};

const MS: Duration = Duration::from_millis(1);

/// A cascade over `fakes` in order (priority = position), with `cascade` settings, and the
/// plan that walks them all.
fn cascade(cascade: &str, fakes: &[Arc<Fake>]) -> (Cascade, Plan) {
    let providers: String = (0..fakes.len())
        .map(|i| format!("  - {{name: p{i}, type: simulated, priority: {i}, models: [m]}}\n"))
        .collect();
    let c = config::parse(
        &format!("cascade: {cascade}\nproviders:\n{providers}"),
        "t",
        &|_| None,
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let targets: Vec<Target> = c
        .providers
        .iter()
        .zip(fakes)
        .map(|(p, fake)| Target {
            upstream: Arc::new(Upstream::with_provider(
                p,
                c.cascade.breaker,
                &metrics,
                fake.clone(),
            )),
            model: "m".into(),
        })
        .collect();
    let plan = Plan {
        targets: targets.into(),
        skipped: Vec::new(),
    };
    let spend = crate::spend::Spend::new(
        &c.spend,
        metrics.spend().clone(),
        crate::spend::Clock::system(),
    );
    (Cascade::new(c.cascade, spend), plan)
}

fn req() -> Arc<CompletionRequest> {
    CompletionRequest::test_prompt("x")
}

fn fake(name: &'static str, script: Script) -> Arc<Fake> {
    Arc::new(Fake::new(name, 10 * MS, script))
}

fn in_a_minute() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_skips_its_provider_until_a_probe_after_recovery_closes_it() {
    let flaky = fake("flaky", Script::status(503, None));
    let backup = fake("backup", Script::Answer);
    let (cascade, plan) = cascade(
        "{max_retries_per_provider: 0, circuit_breaker: {failure_threshold: 3, recovery_timeout: 0.3}}",
        &[flaky.clone(), backup.clone()],
    );
    let circuit = || plan.targets[0].upstream.snapshot().circuit;
    for _ in 0..3 {
        let a = cascade.run(&plan, &req(), in_a_minute()).await.unwrap();
        assert_eq!(&*a.provider, "p1");
        assert_eq!(a.attempts[0].kind, FailureKind::ServerError);
    }
    assert_eq!((flaky.requests(), circuit()), (3, Circuit::Open));
    // It opened at the third failure, before the backup's 10 ms answer.
    let reopens = Instant::now() - 10 * MS + 300 * MS;

    // Open: skipped with no request sent.
    let a = cascade.run(&plan, &req(), in_a_minute()).await.unwrap();
    assert_eq!(&*a.provider, "p1");
    assert_eq!(
        (a.attempts[0].kind, a.attempts[0].tries),
        (FailureKind::CircuitOpen, 0)
    );
    assert_eq!(flaky.requests(), 3);

    // Still open just before the recovery time ends; after it, one probe goes and closes it.
    flaky.set(Script::Answer);
    tokio::time::advance(reopens.saturating_duration_since(Instant::now()) - MS).await;
    let a = cascade.run(&plan, &req(), in_a_minute()).await.unwrap();
    assert_eq!(&*a.provider, "p1");
    assert_eq!(flaky.requests(), 3);
    tokio::time::advance(reopens.saturating_duration_since(Instant::now())).await;
    let a = cascade.run(&plan, &req(), in_a_minute()).await.unwrap();
    assert_eq!(&*a.provider, "p0");
    assert!(a.attempts.is_empty());
    assert_eq!((flaky.requests(), circuit()), (4, Circuit::Closed));
}

#[tokio::test(start_paused = true)]
async fn retry_after_keeps_the_router_off_a_provider_for_exactly_that_long() {
    let limited = fake("limited", Script::status(429, Some(Duration::from_secs(2))));
    let other = fake("other", Script::Answer);
    let (cascade, plan) = cascade(
        "{max_retries_per_provider: 2, circuit_breaker: {failure_threshold: 100}}",
        &[limited.clone(), other.clone()],
    );
    // The first 429 since a success moves only its own request on; the second running
    // sets the provider aside for its Retry-After. Neither is retried on the same provider.
    for _ in 0..2 {
        let a = cascade.run(&plan, &req(), in_a_minute()).await.unwrap();
        assert_eq!(&*a.provider, "p1");
        assert_eq!(
            (a.attempts[0].kind, a.attempts[0].tries),
            (FailureKind::RateLimited, 1)
        );
    }
    limited.set(Script::Answer);
    // Set aside at the second 429, before the other provider's 10 ms answer.
    let back = Instant::now() - 10 * MS + Duration::from_secs(2);
    // Cooling down until the Retry-After ends: skipped, nothing sent.
    tokio::time::advance(back.saturating_duration_since(Instant::now()) - 30 * MS).await;
    let a = cascade.run(&plan, &req(), in_a_minute()).await.unwrap();
    assert_eq!(&*a.provider, "p1");
    assert_eq!(a.attempts[0].kind, FailureKind::CoolingDown);
    assert_eq!(limited.requests(), 2);
    let left = plan.targets[0].upstream.snapshot().cooling_down;
    assert_eq!(left, 20 * MS);
    // Then used again.
    tokio::time::advance(back.saturating_duration_since(Instant::now())).await;
    let a = cascade.run(&plan, &req(), in_a_minute()).await.unwrap();
    assert_eq!(&*a.provider, "p0");
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_ends_a_hanging_try_and_drops_its_request() {
    let hanging = fake("hanging", Script::Hang);
    let (cascade, plan) = cascade(
        "{max_retries_per_provider: 0, circuit_breaker: {failure_threshold: 100}}",
        std::slice::from_ref(&hanging),
    );
    let started = Instant::now();
    let e = cascade
        .run(&plan, &req(), started + 500 * MS)
        .await
        .unwrap_err();
    assert!(matches!(e, RouterError::DeadlineExceeded { .. }), "{e:?}");
    assert_eq!(
        started.elapsed(),
        500 * MS,
        "ended at the deadline, not later"
    );
    assert_eq!((hanging.requests(), hanging.dropped()), (1, 1));
    // The caller's deadline is not the provider's failure.
    assert_eq!(plan.targets[0].upstream.snapshot().circuit, Circuit::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_first_provider_gets_half_the_time_then_the_next_answers() {
    let hanging = fake("hanging", Script::Hang);
    let backup = fake("backup", Script::Answer);
    let (cascade, plan) = cascade(
        "{max_retries_per_provider: 1, circuit_breaker: {failure_threshold: 100}}",
        &[hanging.clone(), backup.clone()],
    );
    let started = Instant::now();
    let a = cascade
        .run(&plan, &req(), started + Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(&*a.provider, "p1");
    assert_eq!(a.attempts[0].kind, FailureKind::Timeout);
    assert_eq!(
        a.attempts[0].tries, 1,
        "a try cut by its share moves on, not retried"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(1) + 10 * MS);
    assert_eq!(hanging.dropped(), 1);
}
