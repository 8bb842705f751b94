use std::collections::VecDeque;

use super::*;

const MS: Duration = Duration::from_millis(1);

/// Takes `n` slots at once (all that `limit` gives, when fewer).
fn take(limit: &Arc<Limit>, n: usize) -> Vec<Slot> {
    (0..n).filter_map(|_| limit.try_acquire()).collect()
}

/// `answers` answers of `took` for `items` prompts each, with `demand` callers: each
/// answered slot is released and the free capacity taken up again, as waiting callers do.
fn serve(limit: &Arc<Limit>, demand: usize, answers: usize, took: Duration, items: usize) {
    let sent = |n| {
        take(limit, n).into_iter().map(|mut s| {
            s.carry(items);
            s
        })
    };
    let mut held: VecDeque<Slot> = sent(demand).collect();
    for _ in 0..answers {
        let Some(s) = held.pop_front() else { break };
        limit.observe(&s, Verdict::Took(took, items));
        drop(s);
        held.extend(sent(demand - held.len()));
    }
}

#[tokio::test(start_paused = true)]
async fn grows_while_saturated_and_latency_stays_flat() {
    let limit = Limit::adaptive(64);
    assert_eq!(limit.current(), INITIAL);
    serve(&limit, 1000, 4, 20 * MS, 1);
    assert_eq!(limit.current(), 8, "slow start: one more per good answer");
    serve(&limit, 1000, 200, 20 * MS, 1);
    assert_eq!(limit.current(), 64, "up to the ceiling, no further");
}

#[tokio::test(start_paused = true)]
async fn an_unsaturated_limit_does_not_grow() {
    let limit = Limit::adaptive(64);
    serve(&limit, 3, 100, 20 * MS, 1);
    assert_eq!(
        limit.current(),
        INITIAL,
        "three callers never fill four slots"
    );
}

#[tokio::test(start_paused = true)]
async fn falls_to_the_parallelism_the_latencies_show() {
    let limit = Limit::adaptive(64);
    serve(&limit, 1000, 12, 20 * MS, 1);
    assert_eq!(limit.current(), 16, "slow start: 4, 8, 16");
    // A round of 16 answers, each 40 ms where 20 was enough: about half of them waited
    // at the provider, which serves about 8 at a time — or it stalled once.
    serve(&limit, 1000, 16, 40 * MS, 1);
    assert_eq!(limit.current(), 16, "one crowded round may be a stall");
    serve(&limit, 1000, 16, 40 * MS, 1);
    assert_eq!(limit.current(), 8, "twice: 16 / (40 / 21)");
    assert_eq!(take(&limit, 64).len(), 8, "the semaphore follows");
}

#[tokio::test(start_paused = true)]
async fn parallelism_is_what_the_provider_showed_not_the_headroom() {
    let limit = Limit::adaptive(64);
    serve(&limit, 1000, 12, 20 * MS, 1);
    assert_eq!(
        (limit.current(), limit.parallelism()),
        (16, 8),
        "slow start: the last full round had 8 served at once"
    );
    serve(&limit, 1000, 32, 40 * MS, 1);
    assert_eq!((limit.current(), limit.parallelism()), (8, 8));
    // Answers an eighth slower than expected: under one of eight waiting at the
    // provider — headroom the limit keeps — so the limit holds while the parallelism
    // the batches are sized to falls below it.
    serve(&limit, 10, 24, 23 * MS, 1);
    assert_eq!(limit.current(), 8);
    assert!(limit.parallelism() < 8, "{}", limit.parallelism());
}

#[tokio::test(start_paused = true)]
async fn a_spike_lowers_it_at_once_but_once_per_round_trip() {
    let limit = Limit::adaptive(64);
    serve(&limit, 1000, 12, 20 * MS, 1);
    let slots = take(&limit, 64);
    assert_eq!(slots.len(), 16);
    tokio::time::advance(MS).await;
    for s in &slots[..8] {
        limit.observe(s, Verdict::Took(100 * MS, 1));
    }
    assert_eq!(
        limit.current(),
        14,
        "16 × 0.9, once for the eight sent together"
    );
}

#[tokio::test(start_paused = true)]
async fn halves_on_overload_and_takes_back_busy_slots_as_they_return() {
    let limit = Limit::adaptive(64);
    serve(&limit, 1000, 4, 20 * MS, 1);
    let busy = take(&limit, 64);
    assert_eq!(busy.len(), 8);
    tokio::time::advance(MS).await;
    limit.observe(&busy[0], Verdict::Overloaded);
    assert_eq!(limit.current(), 4);
    drop(busy);
    assert_eq!(
        take(&limit, 64).len(),
        4,
        "four of the eight were forgotten"
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_fall_it_moves_by_one_per_round_judged_on_requests_sent_since() {
    let limit = Limit::adaptive(64);
    serve(&limit, 1000, 4, 20 * MS, 1);
    let early = take(&limit, 64);
    assert_eq!(early.len(), 8);
    tokio::time::advance(MS).await;
    limit.observe(&early[0], Verdict::Took(60 * MS, 1));
    assert_eq!(limit.current(), 7, "a spike: 8 × 0.9");
    // The other answers to requests sent before the fall, slow as they are, were sent
    // under the old limit: they say nothing of this one.
    for s in &early[1..] {
        limit.observe(s, Verdict::Took(35 * MS, 1));
    }
    assert_eq!(limit.current(), 7);
    drop(early);
    serve(&limit, 1000, 7, 20 * MS, 1);
    assert_eq!(
        limit.current(),
        8,
        "a clean round with every slot busy: one more"
    );
    serve(&limit, 1000, 8, 30 * MS, 1);
    assert_eq!(
        limit.current(),
        7,
        "a crowded round past slow start: one less, not down to 8 / (30 / 20.5)"
    );
}

#[test]
fn two_crowded_rounds_show_the_parallelism_a_calm_one_only_bounds_it() {
    let mut p = Parallelism::new(12);
    assert!(!p.round(5.0, 0.0, 1.0));
    assert_eq!(
        p.value, 12.0,
        "five served unqueued says nothing against twelve"
    );
    p.round(10.0, 0.0, 1.25);
    assert_eq!(p.value, 12.0, "one crowded round may be a stall");
    p.round(10.0, 0.0, 1.3);
    assert_eq!(
        p.value,
        12.0 / 1.25,
        "twice: batches sized to twelve requests, a quarter (then 30%) slower"
    );
}

#[test]
fn requests_sent_beyond_the_figure_explain_the_crowding_they_cause() {
    let mut p = Parallelism::new(8);
    // A burst of callers: lone items took the limit's headroom, three requests on
    // average beyond the eight, and the answers came 3/8 slower — the provider still
    // served eight at once.
    p.round(9.0, 3.0, 11.0 / 8.0);
    p.round(9.0, 3.0, 11.0 / 8.0);
    assert_eq!(p.value, 8.0);
    // One beyond and a quarter slower: 9 / 1.25 = 7.2 served at once, and batches sized
    // to eight requests crowded it: seven.
    p.round(9.0, 1.0, 1.25);
    p.round(9.0, 1.0, 1.25);
    assert_eq!(p.value, 7.0);
    // Seven sized and a third slower: 7 / 1.33 = 5.25 served at once.
    p.round(7.0, 0.0, 4.0 / 3.0);
    p.round(7.0, 0.0, 4.0 / 3.0);
    assert_eq!(p.value, 5.25);
}

#[test]
fn after_a_fall_the_old_figure_is_tried_again_soon_and_kept_if_calm() {
    let mut p = Parallelism::new(16);
    p.round(16.0, 0.0, 2.0);
    p.round(16.0, 0.0, 2.0);
    assert_eq!(p.value, 8.0, "a stall of two rounds");
    assert!(!p.round(8.0, 0.0, 1.0));
    assert!(p.round(8.0, 0.0, 1.0), "two calm rounds: the probe");
    assert_eq!(p.value, 16.0, "straight back to the figure before the fall");
    assert!(!p.round(15.0, 0.0, 1.0));
    assert_eq!(p.value, 16.0, "more in flight and calm: kept");
    // A fall the provider means: the figure tried again crowds it, and stays down.
    p.round(16.0, 0.0, 1.6);
    p.round(16.0, 0.0, 1.6);
    assert_eq!(p.value, 10.0);
    p.round(10.0, 0.0, 1.0);
    assert!(p.round(10.0, 0.0, 1.0));
    assert_eq!(p.value, 16.0);
    assert!(!p.round(16.0, 0.0, 1.6));
    assert_eq!(p.value, 10.0, "taken back");
    assert!(
        (0..PROBE_AFTER - 1).all(|_| !p.round(10.0, 0.0, 1.0)),
        "and not tried again"
    );
}

#[test]
fn slower_answers_with_few_in_flight_say_nothing_of_the_figure() {
    let mut p = Parallelism::new(16);
    for _ in 0..4 {
        p.round(6.0, 0.0, 1.2);
    }
    assert_eq!(
        p.value, 16.0,
        "six in flight where batches are sized to sixteen, 20% slower: not its slots"
    );
    p.round(14.0, 0.0, 1.2);
    p.round(14.0, 0.0, 1.2);
    assert_eq!(p.value, 16.0 / 1.2, "fourteen in flight, twice");
}

#[test]
fn a_stall_between_calm_rounds_is_not_crowding() {
    let mut p = Parallelism::new(8);
    for _ in 0..3 {
        p.round(8.0, 0.0, 2.0);
        assert_eq!(p.value, 8.0, "twice as slow, once");
        p.round(8.0, 0.0, 1.0);
    }
    assert_eq!(p.value, 8.0);
}

#[test]
fn the_answers_usual_spread_is_not_crowding() {
    let mut p = Parallelism::new(16);
    // Sixteen in flight, answers 5% above the fastest every round (timers, a busy
    // machine): under one waiting in sixteen, learned (slowly) as the spread. (Probes
    // in between, sized to no more requests, are taken back.)
    for _ in 0..39 {
        p.round(16.0, 0.0, 1.05);
    }
    assert_eq!(p.value, 16.0);
    assert!(p.noise > 1.03, "{}", p.noise);
    // Then a quarter slower than that, twice: crowded, judged against the spread.
    let spread = p.noise;
    p.round(16.0, 0.0, 1.05 * 1.25);
    p.round(16.0, 0.0, 1.05 * 1.25);
    let shown = 16.0 * spread / (1.05 * 1.25);
    assert!((p.value - shown).abs() < 1e-9, "{} vs {shown}", p.value);
    assert!(shown > 12.5 && shown < 12.8, "about 16 / 1.25: {shown}");
}

#[test]
fn probes_are_kept_while_calm_taken_back_when_crowded_and_then_tried_less_often() {
    let mut p = Parallelism::new(8);
    // Calm rounds (as many in flight as the figure) until one moves it for a probe.
    let calm_until_probe = |p: &mut Parallelism| {
        (1..=1000)
            .find(|_| p.round(p.value.round(), 0.0, 1.0))
            .expect("a probe")
    };
    assert_eq!(calm_until_probe(&mut p), PROBE_AFTER);
    assert_eq!(p.value, 9.0, "one more request");
    assert_eq!(
        calm_until_probe(&mut p),
        PROBE_AFTER,
        "kept; the next tries two"
    );
    assert_eq!(p.value, 11.0);
    // Eleven in flight and answers 11/9 slower: the provider serves nine.
    assert!(!p.round(11.0, 0.0, 11.0 / 9.0));
    assert_eq!(p.value, 9.0, "taken back");
    assert_eq!(
        calm_until_probe(&mut p),
        2 * PROBE_AFTER,
        "then tried half as often"
    );
    assert_eq!(p.value, 10.0, "one more again");
    // Ten in flight is crowded; then two rounds show seven: a figure that fell may be
    // below the truth, so the one before is tried again soon, then probes come as often
    // as at first.
    p.round(10.0, 0.0, 10.0 / 9.0);
    p.round(9.0, 0.0, 9.0 / 7.0);
    p.round(9.0, 0.0, 9.0 / 7.0);
    assert!((p.value - 7.0).abs() < 1e-9, "{}", p.value);
    assert_eq!(calm_until_probe(&mut p), RESTORE_AFTER);
    assert_eq!(p.value, 9.0);
    p.round(9.0, 0.0, 9.0 / 7.0);
    assert!((p.value - 7.0).abs() < 1e-9, "{}", p.value);
    assert_eq!(calm_until_probe(&mut p), 2 * PROBE_AFTER);
}

#[tokio::test(start_paused = true)]
async fn bigger_batches_taking_longer_is_not_congestion() {
    let limit = Limit::adaptive(64);
    // 20 ms + 1 ms per prompt, no queueing: sizes 1, 8, 32 each against its own baseline.
    for round in 0..30 {
        let items = [1, 8, 32][round % 3];
        serve(&limit, 1000, 8, (20 + items as u32) * MS, items);
    }
    assert_eq!(limit.current(), 64, "never fell");
}

#[tokio::test(start_paused = true)]
async fn a_size_first_seen_while_queueing_is_judged_by_the_others() {
    let limit = Limit::adaptive(64);
    // Clean answers: 8 prompts in 28 ms, 16 in 36 ms.
    serve(&limit, 1000, 2, 28 * MS, 8);
    serve(&limit, 1000, 2, 36 * MS, 16);
    assert_eq!(limit.current(), 8);
    // Then a round of batches of 4, never seen before, at 48 ms: queued behind others (a
    // batch of 8 takes 28 ms), although 48 ms is all this size has ever taken.
    serve(&limit, 1000, 16, 48 * MS, 4);
    assert_eq!(limit.current(), 4, "8 / (48 / 29), two rounds running");
}

#[test]
fn expected_latency_is_bounded_by_bigger_sizes_and_linear_between() {
    let mut g = Gradient::new(4, 64);
    assert_eq!(g.expected(4), None);
    g.fastest[bucket(1)] = Some((1, 21 * MS));
    g.fastest[bucket(8)] = Some((8, 28 * MS));
    g.fastest[bucket(4)] = Some((4, 48 * MS));
    let ms = |n| (g.expected(n).unwrap() * 1e3 * 1e3).round() / 1e3;
    assert_eq!(ms(4), 24.0, "between 1 and 8, not its own 48");
    assert_eq!(ms(1), 21.0);
    assert_eq!(ms(8), 28.0);
    assert_eq!(g.expected(9), None, "nothing this big or bigger");
}

#[test]
fn buckets_are_exact_to_16_then_an_eighth_apart() {
    assert_eq!((bucket(1), bucket(16), bucket(17)), (0, 15, 16));
    assert_eq!(bucket(19), 17);
    assert!(bucket(4096) < BUCKETS);
    assert!((17..=4096).all(|n| bucket(n) >= bucket(n - 1)), "monotone");
}

#[tokio::test(start_paused = true)]
async fn fixed_never_moves() {
    let limit = Limit::fixed(3);
    let slots = take(&limit, 10);
    assert_eq!(slots.len(), 3);
    limit.observe(&slots[0], Verdict::Overloaded);
    assert_eq!(limit.current(), 3);
}
