use super::*;

impl Vegas {
    /// Puts the limit at `permits`, out of slow start.
    pub(in crate::upstream::limit) fn settle(&mut self, permits: usize) {
        (self.limit, self.slow_until) = (permits, 0);
    }
}

const MS: Duration = Duration::from_millis(1);

/// Takes `n` slots at once (all that `limit` gives, when fewer).
fn take(limit: &Arc<Limit>, n: usize) -> Vec<Slot> {
    (0..n).filter_map(|_| limit.try_acquire()).collect()
}

/// One wave: every slot the limit gives (at most `demand`) sent together with `items`
/// prompts each, answered together after `took`.
async fn wave(limit: &Arc<Limit>, demand: usize, took: Duration, items: usize) {
    let mut slots = take(limit, demand);
    for s in &mut slots {
        s.carry(items);
    }
    tokio::time::advance(took).await;
    for s in slots {
        limit.observe(&s, Verdict::Took(took, items));
    }
}

#[tokio::test(start_paused = true)]
async fn slow_start_doubles_while_every_slot_is_taken_up_to_the_ceiling() {
    let limit = Limit::adaptive(64);
    assert_eq!(limit.current(), INITIAL);
    let mut seen = vec![limit.current()];
    for _ in 0..8 {
        wave(&limit, 1000, 20 * MS, 1).await;
        seen.push(limit.current());
    }
    seen.dedup();
    assert_eq!(seen, [4, 8, 16, 32, 64]);
}

#[tokio::test(start_paused = true)]
async fn a_limit_its_callers_do_not_fill_does_not_grow() {
    let limit = Limit::adaptive(64);
    for _ in 0..20 {
        wave(&limit, 2, 20 * MS, 1).await;
    }
    assert_eq!(limit.current(), INITIAL);
}

#[tokio::test(start_paused = true)]
async fn falls_to_what_the_provider_showed_it_serves() {
    let limit = Limit::adaptive(64);
    limit.settle(16);
    // Sixteen at once answered in 20 ms: the usual time (calm rounds with every slot taken:
    // one more slot is tried).
    for _ in 0..2 {
        wave(&limit, 16, 20 * MS, 1).await;
    }
    assert_eq!(limit.current(), 17);
    // Then the provider serves eight at once, 20 ms each: n in flight take 20 × n / 8 ms.
    let served = |n: u32| if n <= 8 { 20 * MS } else { 20 * MS * n / 8 };
    let mut seen = vec![];
    for _ in 0..8 {
        let n = limit.current();
        wave(&limit, n, served(n as u32), 1).await;
        seen.push(limit.current());
    }
    assert_eq!(
        seen[..4],
        [17, 16, 16, 8],
        "the probe taken back, then the fall"
    );
    assert!(
        seen[4..].iter().all(|&l| l == 8 || l == 9),
        "probes of one: {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_provider_slower_for_good_is_relearned_at_one_request_then_climbed_back() {
    let limit = Limit::adaptive(64);
    limit.settle(8);
    // Eight slots, 20 ms an answer; then every answer takes twice as long, for good.
    let served = |n: usize, each: Duration| each * (n.max(8) as u32) / 8;
    for _ in 0..4 {
        let n = limit.current();
        wave(&limit, 8, served(n, 20 * MS), 1).await;
    }
    let mut seen = vec![];
    for _ in 0..100 {
        let n = limit.current();
        wave(&limit, 8, served(n, 40 * MS), 1).await;
        seen.push(limit.current());
    }
    assert!(seen.contains(&1), "fell to one request: {seen:?}");
    assert!(seen[50..].iter().all(|&l| l >= 8), "climbed back: {seen:?}");
}

/// After the first crowded round the limit starts again from one request and doubles back to
/// half the limit that crowded. A router that has served a lone caller knows the usual
/// slowdown already, so the climb waits neither for `ROUND` answers of the crowd's batch size
/// (never seen) at one request nor for `ROUND` answers a step: a round trip a step (it took
/// the 16-slot model a quarter of its first run at 64 callers).
#[tokio::test(start_paused = true)]
async fn after_the_first_crowd_the_limit_climbs_back_a_step_a_round_trip() {
    let limit = Limit::adaptive(64);
    // Sixteen slots, 20 ms an answer whatever its size; the crowd's 32 prompts split over
    // the requests in flight.
    let served = |n: usize| 20 * MS * (n.max(16) as u32) / 16;
    for _ in 0..3 * ROUND {
        wave(&limit, 1, served(1), 1).await;
    }
    let mut seen = vec![];
    for _ in 0..16 {
        let n = limit.current();
        wave(&limit, n, served(n), 32usize.div_ceil(n)).await;
        seen.push(limit.current());
    }
    let restart = seen.iter().position(|&l| l == 1).expect("the restart");
    assert!(
        seen[restart..].iter().take(8).any(|&l| l >= 8),
        "back to half the crowded limit within eight round trips: {seen:?}"
    );
}

/// A fall is at most a half (TCP's multiplicative decrease): a round that a machine's stall
/// made slow (16 read as serving 4) costs a halving, not a fall to what the stall showed. A
/// 30 ms stall on the 16-slot model at 8 callers (answers of 7 ms) read 9 as serving 1, and
/// the next load, 64 callers, sat at one request for seconds (a round there is `ROUND`
/// answers of 133 ms): a run at 0.15 of its others, simulated.
#[tokio::test(start_paused = true)]
async fn a_fall_is_at_most_a_half() {
    let limit = Limit::adaptive(64);
    limit.settle(16);
    // Sixteen slots, 20 ms an answer.
    let served = |n: usize| 20 * MS * (n.max(16) as u32) / 16;
    for _ in 0..4 {
        let n = limit.current();
        wave(&limit, 1000, served(n), 1).await;
    }
    assert_eq!(limit.current(), 16, "a probe past 16 taken back");
    // One round four times slower than it should be.
    wave(&limit, 1000, 4 * served(16), 1).await;
    let mut seen = vec![];
    for _ in 0..8 {
        let n = limit.current();
        wave(&limit, 1000, served(n), 1).await;
        seen.push(limit.current());
    }
    let fell = seen.iter().position(|&l| l < 16).expect("the fall");
    assert_eq!(seen[fell], 8, "half, not the 4 it served: {seen:?}");
    assert!(seen[fell..].iter().all(|&l| l >= 8), "{seen:?}");
    assert!(seen[7] > 8, "climbs back by probes: {seen:?}");
}

/// Eight callers over a limit of 9 (16 slots): a round that reads one request waiting falls
/// by it, to 8, where the callers still go alone; a fall to what the round served (`busy /
/// r`, 6) sent them as pairs (the wall clock's 16-slot mock at 8 callers cycled 9 → 6 → 8 →
/// 9 on a busy machine's slow rounds).
#[tokio::test(start_paused = true)]
async fn a_limit_its_callers_do_not_fill_falls_by_the_requests_that_waited() {
    let limit = Limit::adaptive(64);
    limit.settle(9);
    for _ in 0..ROUND {
        wave(&limit, 8, 20 * MS, 1).await;
    }
    assert_eq!(limit.current(), 9, "calm with a slot free");
    // A round a tenth slower: 8 × (1 − 1/1.1) ≈ 0.7 requests waiting, and served 8 / 1.1.
    for _ in 0..2 {
        wave(&limit, 8, 22 * MS, 1).await;
    }
    assert_eq!(limit.current(), 8);
}

#[tokio::test(start_paused = true)]
async fn bigger_batches_taking_longer_is_not_congestion() {
    let limit = Limit::adaptive(64);
    limit.settle(8);
    // 20 ms + 1 ms per prompt, no queueing: each size against its own usual time.
    for round in 0..30 {
        let items = [1, 8, 32][round % 3];
        wave(&limit, 8, (20 + items as u32) * MS, items).await;
    }
    assert!(limit.current() >= 8, "never fell: {}", limit.current());
}

/// Answers, one prompt each, taking `times`: sent together on as many slots, answered together
/// after the longest.
async fn answers(limit: &Arc<Limit>, times: &[u32]) {
    let mut slots = take(limit, times.len());
    for s in &mut slots {
        s.carry(1);
    }
    tokio::time::advance(times.iter().max().map_or(MS, |&t| t * MS)).await;
    for (s, &t) in slots.iter().zip(times) {
        limit.observe(s, Verdict::Took(t * MS, 1));
    }
}

#[tokio::test(start_paused = true)]
async fn answers_slower_than_usual_by_chance_are_not_a_queue() {
    let limit = Limit::adaptive(64);
    limit.settle(1);
    // One at a time, no queue possible: answers vary from 10 to 30 ms as usual.
    for t in [10, 20, 30, 10, 20, 30, 10, 20, 30] {
        answers(&limit, &[t]).await;
    }
    limit.settle(8);
    // Eight at once, a third slower than usual on the round's mean — within what chance gives
    // eight answers that vary so (without the spread, 8 × (1 − 1/1.33) = 2 would be waiting).
    for _ in 0..3 {
        answers(&limit, &[20, 30, 20, 30, 20, 30, 20, 30]).await;
        assert!(limit.current() >= 8, "fell to {}", limit.current());
    }
    // Three times slower than usual: no chance of that, the provider is queueing (a round
    // ends with the first answer of the next wave, the first takes back a probe).
    for _ in 0..5 {
        let n = limit.current();
        answers(&limit, &vec![60; n]).await;
    }
    assert!(limit.current() < 8, "did not fall: {}", limit.current());
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_crowds_is_taken_back_and_the_next_comes_later() {
    let limit = Limit::adaptive(64);
    limit.settle(4);
    // A provider serving four at once: 20 ms with four in flight, 25 ms with five (the
    // fifth waits a whole service time, the others not at all: 5 × 20 + 20 over 5).
    let served = |n: usize| if n <= 4 { 20 * MS } else { 24 * MS };
    let mut limits = Vec::new();
    for _ in 0..60 {
        let n = limit.current();
        wave(&limit, n, served(n), 1).await;
        limits.push(limit.current());
    }
    let probes = limits.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(limits.iter().all(|&l| l <= 5), "{limits:?}");
    assert!(
        (2..=6).contains(&probes),
        "probes back off: {probes} in {limits:?}"
    );
    assert_eq!(limits.last(), Some(&4));
}

/// Eight callers' prompts sent together each round trip, spread over the limit as the
/// batcher spreads them (requests of `ceil(8 / limit)`, the last with nothing left waiting),
/// to a provider serving `slots` requests at once, 20 ms each. Returns the limit after each.
async fn eight_callers(limit: &Arc<Limit>, slots: usize, round_trips: usize) -> Vec<usize> {
    let mut limits = Vec::new();
    for _ in 0..round_trips {
        let size = 8usize.div_ceil(limit.current());
        let mut sent = take(limit, 8usize.div_ceil(size));
        for s in &mut sent {
            s.carry(size);
        }
        if let Some(last) = sent.last_mut() {
            last.sent_together();
        }
        let start = Instant::now();
        for (i, slot) in sent.into_iter().enumerate() {
            // Requests beyond the slots wait a whole service time.
            let took = 20 * MS * (1 + i / slots) as u32;
            tokio::time::advance((start + took).saturating_duration_since(Instant::now())).await;
            limit.observe(&slot, Verdict::Took(took, size));
        }
        limits.push(limit.current());
    }
    limits
}

#[tokio::test(start_paused = true)]
async fn a_probe_goes_straight_to_the_limit_that_splits_the_callers_pairs() {
    // Eight callers over 7 slots go as four pairs, three slots free: 8 is the next limit that
    // changes what is sent, and where the provider has the slots it is kept.
    let limit = Limit::adaptive(64);
    limit.settle(7);
    let limits = eight_callers(&limit, 16, 40).await;
    assert!(limits.iter().all(|&l| l >= 7), "{limits:?}");
    assert!(limits.last() >= Some(&8), "{limits:?}");
    // On 4 slots the pairs are right: the probe from 4 goes to 8 (5 to 7 would send the same
    // pairs), crowds, and goes back to 4 — not to 7, where the callers would go apart.
    let limit = Limit::adaptive(64);
    limit.settle(4);
    let limits = eight_callers(&limit, 4, 80).await;
    assert!(limits.contains(&8), "{limits:?}");
    assert!(limits.iter().all(|&l| l == 4 || l == 8), "{limits:?}");
    let probes = limits.windows(2).filter(|w| w == &[4, 8]).count();
    assert!((2..=6).contains(&probes), "probes back off: {limits:?}");
    assert_eq!(limits.last(), Some(&4));
}

/// A provider whose `slots` each take the next request in arrival order, `fixed` ms a request
/// and `per_prompt` ms a prompt, kept busy by `prompts` spread over every slot the limit gives.
struct Fifo {
    slots: usize,
    fixed: u32,
    per_prompt: u32,
    prompts: usize,
}

/// Drives `limit` against `server` for `answers` answers, the first `singles` requests
/// carrying one prompt each and taking `slow` times their time. Returns the limit after each.
async fn serve(
    limit: &Arc<Limit>,
    server: Fifo,
    (singles, slow): (usize, f64),
    answers: usize,
) -> Vec<usize> {
    let mut free_at = vec![Instant::now(); server.slots];
    let mut in_flight: Vec<(Slot, Instant, usize)> = Vec::new();
    let (mut sent, mut limits) = (0, Vec::new());
    while limits.len() < answers {
        while let Some(mut slot) = limit.try_acquire() {
            let (items, factor) = if sent < singles {
                (1, slow)
            } else {
                (server.prompts.div_ceil(limit.current()), 1.0)
            };
            sent += 1;
            slot.carry(items);
            let cost = (server.fixed + server.per_prompt * items as u32) * MS.mul_f64(factor);
            let first = free_at.iter_mut().min().expect("a slot");
            *first = (*first).max(Instant::now()) + cost;
            in_flight.push((slot, *first, items));
        }
        in_flight.sort_by_key(|&(_, done, _)| std::cmp::Reverse(done));
        let (slot, done, items) = in_flight.pop().expect("a request in flight");
        tokio::time::advance(done - Instant::now()).await;
        limit.observe(&slot, Verdict::Took(done - slot.sent, items));
        drop(slot);
        limits.push(limit.current());
    }
    limits
}

/// One slot, kept busy by 32 prompts.
fn one_slot(fixed: u32, per_prompt: u32) -> Fifo {
    Fifo {
        slots: 1,
        fixed,
        per_prompt,
        prompts: 32,
    }
}

#[tokio::test(start_paused = true)]
async fn a_queue_the_provider_serves_at_no_extra_cost_is_kept() {
    // llama-server's shape: a request costs its prompts' time and next to nothing of its own,
    // so a second request waiting behind the first costs the provider nothing merging them
    // would save. The probe to two is kept (no cohort of callers left waiting for the other's
    // request when it is taken back), and the limit climbs no further.
    let limit = Limit::adaptive(64);
    limit.settle(1);
    let limits = serve(&limit, one_slot(1, 50), (0, 1.0), 120).await;
    assert!(limits.contains(&2), "probed: {limits:?}");
    assert!(limits[60..].iter().all(|&l| l == 2), "{limits:?}");
    // The same server with a costly request (50 ms of its own against 2 ms a prompt): the
    // waiting request's prompts would have ridden in the next, so each probe is taken back.
    let limit = Limit::adaptive(64);
    limit.settle(1);
    let limits = serve(&limit, one_slot(50, 2), (0, 1.0), 120).await;
    let taken_back = limits.windows(2).filter(|w| w == &[2, 1]).count();
    assert!(taken_back >= 2, "{limits:?}");
    assert!(limits.iter().all(|&l| l <= 2), "{limits:?}");
}

/// The 16-slot mock: 5 ms a request and 2 ms a prompt, 256 callers' prompts.
const MOCK_16: Fifo = Fifo {
    slots: 16,
    fixed: 5,
    per_prompt: 2,
    prompts: 256,
};

/// The wall clock's 16-slot mock at 256 callers: each run begins, after an idle gap, with
/// the callers' first prompts arriving one by one, so the first requests carry one each, on a
/// machine slowed by the load generator opening 256 streams (their answers 1.3–1.8 times
/// their usual time). The queue the limit keeps is harmless at the size it gives the callers'
/// prompts (5 ms of 35 a request), so the burst does not move it; judged by the burst's own
/// sizes (5 ms of 7) it fell to 9–13 and climbed back a request a round (spread 1.17×).
#[tokio::test(start_paused = true)]
async fn a_burst_of_single_prompts_does_not_move_a_harmless_queue() {
    let limit = Limit::adaptive(64);
    // A lone caller first: a single prompt's time is known.
    for _ in 0..3 * ROUND {
        wave(&limit, 1, 7 * MS, 1).await;
    }
    limit.settle(16);
    let steady = serve(&limit, MOCK_16, (0, 1.0), 400).await;
    let kept = limit.current();
    assert!(
        kept > 16 && steady[300..].iter().all(|&l| l == kept),
        "{steady:?}"
    );
    tokio::time::advance(Duration::from_secs(8)).await;
    let burst = serve(&limit, MOCK_16, (kept, 1.6), 200).await;
    assert!(burst.iter().all(|&l| l >= kept), "kept {kept}: {burst:?}");
}

#[tokio::test(start_paused = true)]
async fn halves_on_overload_once_per_round_trip_taking_back_busy_slots() {
    let limit = Limit::adaptive(64);
    limit.settle(8);
    let busy = take(&limit, 64);
    assert_eq!(busy.len(), 8);
    tokio::time::advance(MS).await;
    limit.observe(&busy[0], Verdict::Overloaded);
    limit.observe(&busy[1], Verdict::Overloaded);
    assert_eq!(
        limit.current(),
        4,
        "sent before the fall: not counted again"
    );
    drop(busy);
    assert_eq!(take(&limit, 64).len(), 4, "four of the eight forgotten");
}

#[tokio::test(start_paused = true)]
async fn fixed_never_moves() {
    let limit = Limit::fixed(3);
    let slots = take(&limit, 10);
    assert_eq!(slots.len(), 3);
    limit.observe(&slots[0], Verdict::Overloaded);
    assert_eq!(limit.current(), 3);
}

/// Requests sent and ended on many threads at once while their answers move the limit: the
/// policy's count of requests in flight ends at zero, and so does a move's wait for the
/// requests sent before it, so rounds go on. Counted from readings of the slots' atomic count
/// (two threads' readings can arrive in either order), a move could wait for a request that
/// was never in flight, and the limit froze for good.
#[test]
fn requests_on_many_threads_leave_no_move_waiting() {
    const THREADS: usize = 8;
    let (limit, wave) = (Limit::adaptive(64), std::sync::Barrier::new(THREADS));
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let (limit, wave) = (&limit, &wave);
            s.spawn(move || {
                for _ in 0..5_000 {
                    // Each wave: the threads send at once, then answer and end while the next
                    // wave's first requests are sent.
                    let slot = limit.try_acquire().map(|mut slot| {
                        slot.carry(1);
                        slot
                    });
                    wave.wait();
                    if let Some(slot) = slot {
                        // A provider slower the more it holds: the limit moves up and down.
                        let took = MS * limit.in_flight() as u32;
                        limit.observe(&slot, Verdict::Took(took, 1));
                    }
                }
            });
        }
    });
    let vegas = limit
        .adaptive
        .as_ref()
        .expect("adaptive")
        .lock()
        .expect("a lock");
    assert!(
        vegas.moved.times > 10,
        "the limit moved {} times",
        vegas.moved.times
    );
    assert_eq!((vegas.flow.in_flight(), vegas.moved.before), (0, 0));
}
