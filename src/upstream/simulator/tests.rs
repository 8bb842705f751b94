use super::*;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

/// The three cost models of the wall-clock protocol (`benches/scenarios.py adaptive`).
const MOCK_8: Model = Model {
    name: "20 ms + 1 ms/prompt, 8 slots",
    base: ms(20),
    per_prompt: ms(1),
    slots: 8,
    jitter: 0.0,
    prompt_slots: false,
    stalls: None,
};
const MOCK_4: Model = Model {
    name: "50 ms + 0.5 ms/prompt, 4 slots",
    base: ms(50),
    per_prompt: us(500),
    slots: 4,
    jitter: 0.0,
    prompt_slots: false,
    stalls: None,
};
const MOCK_16: Model = Model {
    name: "5 ms + 2 ms/prompt, 16 slots",
    base: ms(5),
    per_prompt: ms(2),
    slots: 16,
    jitter: 0.0,
    prompt_slots: false,
    stalls: None,
};
/// A GPU serving one request at a time, a batch costing little more than one prompt.
const GPU: Model = Model {
    name: "GPU-like: 40 ms + 0.05 ms/prompt, 1 slot",
    base: ms(40),
    per_prompt: us(50),
    slots: 1,
    jitter: 0.0,
    prompt_slots: false,
    stalls: None,
};
const JITTERY: Model = Model {
    name: "jittered ±50%: 20 ms + 1 ms/prompt, 8 slots",
    jitter: 0.5,
    ..MOCK_8
};
/// Few slots, a request costing far more than a prompt in it.
const FEW_SLOTS: Model = Model {
    name: "few slots: 30 ms + 0.2 ms/prompt, 2 slots",
    base: ms(30),
    per_prompt: us(200),
    slots: 2,
    jitter: 0.0,
    prompt_slots: false,
    stalls: None,
};

const CALLERS: [usize; 4] = [1, 8, 64, 256];
/// The fixed settings of the wall-clock protocol's sweep.
const SWEEP: [(usize, u64); 9] = [
    (8, 0),
    (8, 1),
    (8, 5),
    (32, 0),
    (32, 1),
    (32, 5),
    (128, 0),
    (128, 1),
    (128, 5),
];
/// Each comparison runs with these seeds (callers' round trips; the provider's jitter).
const SEEDS: [u64; 3] = [7, 1, 2];

/// Where adaptive falls more than 10% short of the best fixed setting, and the least it
/// reaches there over [`SEEDS`] (checked, so a change that loses more fails). On a provider
/// whose answers vary ±50% at random, eight answers' mean varies by ±10% by chance, so one
/// request waiting at 8 slots (a slowdown of 1/9) cannot be told from chance: the limit sits at
/// 9, one above the slots, and one request in nine waits (0.90–0.94 at 64 callers). The
/// limit's `SURE` rule (a round is crowded only beyond what chance gives answers that vary as
/// usual) won it back from 0.39–0.64; rounds long enough to see one waiting request were
/// tried and lost more (slow to climb back after a fall, 0.20–0.69).
///
/// At 256 callers the same model reached 0.87–0.91 through the protocol until a round that
/// spans a pause in the load was started afresh when the load returns (0.94–1.00 since; fresh
/// routers 0.93), so it is held at 0.9 like the rest.
const KNOWN_SHORT: [(&str, usize, f64); 1] = [(JITTERY.name, 64, 0.85)];

/// Adaptive against the best of the fixed sweep at every caller count, and a lone caller
/// against batching off, with every seed. Prints the table (`cargo test simulator --
/// --nocapture`).
fn holds(model: Model) {
    println!("\n{}", model.name);
    println!(
        "callers | seed | off: prompts/s (p50 ms) | adaptive (p50 ms, prompts/request) | best fixed | ratio"
    );
    let mut short = Vec::new();
    for callers in CALLERS {
        let load = Load::Closed(callers);
        for seed in SEEDS {
            let off = run(model, Policy::Off, load, seed);
            let adaptive = run(model, Policy::Adaptive, load, seed);
            let (best, fixed) = SWEEP
                .iter()
                .map(|&(size, wait)| {
                    let p = Policy::Fixed(size, wait);
                    (p, run(model, p, load, seed))
                })
                .max_by(|a, b| a.1.throughput.total_cmp(&b.1.throughput))
                .expect("a sweep");
            let ratio = adaptive.throughput / fixed.throughput;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{callers} | {seed} | {:.0} ({:.0}) | {:.0} ({:.0}, {:.1}) | {best}: {:.0} ({:.0}, {:.1}) | {ratio:.2}",
                off.throughput,
                ms(off.p50),
                adaptive.throughput,
                ms(adaptive.p50),
                1.0 / adaptive.requests_per_prompt,
                fixed.throughput,
                ms(fixed.p50),
                1.0 / fixed.requests_per_prompt,
            );
            if callers == 1 {
                let extra = adaptive.p50.saturating_sub(off.p50);
                assert!(
                    extra <= Duration::from_millis(1),
                    "{}: a lone caller's p50 is {extra:?} above batching off",
                    model.name
                );
            }
            let floor = KNOWN_SHORT
                .iter()
                .find(|k| k.0 == model.name && k.1 == callers)
                .map_or(0.9, |k| k.2);
            if ratio < floor {
                short.push(format!(
                    "{callers} callers, seed {seed}: {ratio:.2} (at least {floor})"
                ));
            }
        }
    }
    assert!(
        short.is_empty(),
        "{}: adaptive / best fixed {short:?}",
        model.name
    );
}

#[test]
fn holds_on_the_8_slot_mock() {
    holds(MOCK_8);
}

#[test]
fn holds_on_the_4_slot_mock() {
    holds(MOCK_4);
}

#[test]
fn holds_on_the_16_slot_mock() {
    holds(MOCK_16);
}

#[test]
fn holds_on_a_gpu_serving_one_batch_at_a_time() {
    holds(GPU);
}

#[test]
fn holds_on_a_provider_whose_answers_vary() {
    holds(JITTERY);
}

#[test]
fn holds_on_few_slots_with_a_costly_request() {
    holds(FEW_SLOTS);
}

#[test]
fn a_run_from_a_cold_start_gives_the_same_figures_every_time() {
    for model in [GPU, JITTERY] {
        let once = run(model, Policy::Adaptive, Load::Closed(64), SEEDS[0]);
        assert!(once.throughput > 0.0);
        assert_eq!(
            once,
            run(model, Policy::Adaptive, Load::Closed(64), SEEDS[0])
        );
    }
}

#[test]
fn open_loop_callers_below_capacity_are_all_answered_about_as_fast_as_alone() {
    // 400 prompts/s against the 8-slot mock (capacity about 2,200 batched): the policy must
    // keep up, and batching must not make a prompt wait much past one service time.
    let r = run(
        MOCK_8,
        Policy::Adaptive,
        Load::Open(Duration::from_micros(2500)),
        SEEDS[0],
    );
    assert!((r.throughput - 400.0).abs() < 10.0, "{r:?}");
    assert!(r.p99 < ms(60), "{r:?}");
}

/// llama-server's shape (`-np 4`, on a CPU): slots hold prompts, not requests; a short prompt
/// with 8 new tokens holds one for about 200 ms (± 30%); a request's own handling is 2 ms.
const LLAMA: Model = Model {
    name: "llama-server-like: 4 prompt slots, 200 ms ± 30% a prompt",
    base: ms(2),
    per_prompt: ms(200),
    slots: 4,
    jitter: 0.3,
    prompt_slots: true,
    stalls: None,
};

/// The wall-clock protocol's `real` row (32 callers against llama-server) on the simulator,
/// over two minutes (a batch takes seconds here): adaptive against the fixed sweep on
/// throughput and p99. Before the limit's `HARMLESS` rule this reproduced the wall clock's
/// finding — adaptive's p99 above the best fixed setting's (wall clock: 1,955 vs 1,815 ms;
/// here 2,483–2,535 vs 1,738–1,767 ms, throughput 0.96×): a second request's prompts queue
/// behind the first's at the server, which Vegas read as a queue and took back, each time
/// leaving the cohort answered first waiting in the router for the other's request to end
/// (0.8 + 1.7 s). Requests here cost next to nothing of their own, so the queue is harmless:
/// the limit stays at two, both cohorts keep the server fed, and adaptive matches the best
/// fixed setting (p99 within 3%, throughput within 2%).
#[test]
fn on_a_server_that_queues_prompts_adaptive_matches_the_best_fixed_throughput_and_p99() {
    println!("\n{}", LLAMA.name);
    println!("seed | policy | prompts/s | p50 ms | p99 ms | prompts/request");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for seed in SEEDS {
        let sweep: Vec<(Policy, Report)> = [
            Policy::Adaptive,
            Policy::Fixed(8, 5),
            Policy::Fixed(16, 10),
            Policy::Fixed(32, 10),
        ]
        .into_iter()
        .map(|p| {
            (
                p,
                run_for(LLAMA, p, Load::Closed(32), seed, Duration::from_secs(120)),
            )
        })
        .collect();
        for (p, r) in &sweep {
            println!(
                "{seed} | {p} | {:.1} | {:.0} | {:.0} | {:.1}",
                r.throughput,
                ms(r.p50),
                ms(r.p99),
                1.0 / r.requests_per_prompt
            );
        }
        let adaptive = sweep[0].1;
        let best = sweep[1..]
            .iter()
            .map(|(_, r)| *r)
            .max_by(|a, b| a.throughput.total_cmp(&b.throughput))
            .expect("a sweep");
        assert!(
            adaptive.throughput >= 0.95 * best.throughput,
            "seed {seed}: {adaptive:?} against {best:?}"
        );
        let p99 = adaptive.p99.as_secs_f64() / best.p99.as_secs_f64();
        assert!(
            p99 <= 1.05,
            "seed {seed}: adaptive's p99 {p99:.2}× the best fixed's"
        );
    }
}

/// The wall-clock protocol serves 1, 8, 64 and 256 callers in turn on one long-lived router,
/// which carries what it learned from one load into the next. Here 256 callers on a router
/// that served 1, 8 and 64 first (11 s each, as the protocol's runs do), against a fresh
/// router. It found that on the jittered model a router that had served 64 callers reached
/// 0.75 of a fresh one at 256 (seed 7: 4,544 prompts/s fresh, 3,429 after): batches four times
/// bigger were sizes new to it, whose fastest times were near their usual ones, so the usual
/// slowdown it learned from them fell and every other size read as queued. The limit now
/// learns it only from sizes seen `ROUND` times or more: 1.02–1.08 of a fresh router.
#[test]
fn a_router_that_served_smaller_loads_first_is_about_as_fast_as_a_fresh_one() {
    let s = Duration::from_secs(11);
    let history = [
        (Load::Closed(1), s),
        (Load::Closed(8), s),
        (Load::Closed(64), s),
    ];
    let mut short = Vec::new();
    for model in [MOCK_4, MOCK_8, JITTERY] {
        for seed in SEEDS {
            let fresh = run(model, Policy::Adaptive, Load::Closed(256), seed);
            let after = run_after(
                model,
                Policy::Adaptive,
                &history,
                Load::Closed(256),
                seed,
                MEASURE,
            );
            let ratio = after.throughput / fresh.throughput;
            println!(
                "{} seed {seed}: fresh {:.0}, after 1, 8, 64 callers {:.0} prompts/s ({ratio:.2})",
                model.name, fresh.throughput, after.throughput
            );
            if ratio < 0.9 {
                short.push(format!("{} seed {seed}: {ratio:.2}", model.name));
            }
        }
    }
    assert!(short.is_empty(), "{short:?}");
}

/// The wall-clock protocol's runs on the simulator ([`protocol`]): one long-lived router per
/// policy serving 1, 8, 64 and 256 callers in turn, five 2 s runs each after a warm-up, idle
/// between runs while the other routers run. Adaptive's median run is within 10% of the best
/// fixed setting's (the jittered model: [`KNOWN_SHORT`]), and none of its runs is below 0.8 of
/// it, nor below 0.9 of its own median (issue #28's third condition, on the simulator: runs
/// vary little): what a router learned at one load, or before a pause, does not hold it back
/// at the next. This found four faults the fresh runs above cannot see (the 4-slot mock at 64
/// callers was 0.76, as on the wall clock, 0.77): a round that spanned a pause read its
/// answers against the pause's empty flight and taught a queue as the usual slowdown; a
/// size larger than any seen counted as exactly usual; and after the first crowded round
/// the limit climbed back one slot a round (the 16-slot mock's first run at 64 callers 0.60
/// of the others); then, climbing back from one request, a round of `ROUND` answers at each
/// step (that first run 0.74 of the others).
fn holds_through_the_protocol(model: Model) {
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\n{} (the wall-clock protocol's runs)", model.name);
    println!("seed | callers | adaptive's runs, prompts/s | best fixed: median | median ratio");
    let mut short = Vec::new();
    for seed in SEEDS {
        let adaptive = protocol(model, Policy::Adaptive, &CALLERS, seed);
        let fixed: Vec<(Policy, Vec<Vec<f64>>)> = SWEEP
            .iter()
            .map(|&(size, wait)| {
                let p = Policy::Fixed(size, wait);
                (p, protocol(model, p, &CALLERS, seed))
            })
            .collect();
        for (i, callers) in CALLERS.into_iter().enumerate() {
            let (best, runs) = fixed
                .iter()
                .max_by(|a, b| med(&a.1[i]).total_cmp(&med(&b.1[i])))
                .expect("a sweep");
            let (mine, theirs) = (&adaptive[i], med(&runs[i]));
            let ratio = med(mine) / theirs;
            let worst = mine.iter().copied().fold(f64::INFINITY, f64::min) / theirs;
            println!(
                "{seed} | {callers} | {} | {best}: {theirs:.0} | {ratio:.2} (worst run {worst:.2})",
                mine.iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let floor = KNOWN_SHORT
                .iter()
                .find(|k| k.0 == model.name && k.1 == callers)
                .map_or(0.9, |k| k.2);
            if ratio < floor || worst < 0.8 || worst < 0.9 * ratio {
                short.push(format!(
                    "{callers} callers, seed {seed}: {ratio:.2}, worst run {worst:.2}"
                ));
            }
        }
    }
    assert!(short.is_empty(), "{}: {short:?}", model.name);
}

#[test]
fn holds_through_the_protocol_on_the_8_slot_mock() {
    holds_through_the_protocol(MOCK_8);
}

#[test]
fn holds_through_the_protocol_on_the_4_slot_mock() {
    holds_through_the_protocol(MOCK_4);
}

#[test]
fn holds_through_the_protocol_on_the_16_slot_mock() {
    holds_through_the_protocol(MOCK_16);
}

#[test]
fn holds_through_the_protocol_on_a_gpu() {
    holds_through_the_protocol(GPU);
}

#[test]
fn holds_through_the_protocol_on_a_provider_whose_answers_vary() {
    holds_through_the_protocol(JITTERY);
}

#[test]
fn holds_through_the_protocol_on_few_slots_with_a_costly_request() {
    holds_through_the_protocol(FEW_SLOTS);
}

/// The 16-slot mock on a busy machine: now and then (after one answer in 500) everything
/// stalls for 10 ms, as on the wall clock, where two shared cores carry the load generator,
/// the router and the mock. A stall reads as a queue and lowers the limit below the callers
/// for a moment; eight callers over seven slots then go as pairs — four requests in flight,
/// three slots free, and a pair's second prompt with its caller between answer and next send
/// — so the prompts in flight never outnumber the slots (the wall-clock log of session 17:
/// 330 ms at 7; session 18's: ~10% of the rounds at 6–7). That held 0.77–0.79 of batching
/// off until a request sent with several prompts, nothing left waiting and slots free
/// counted as "more slots would be used", with the probe going straight to the limit that
/// splits the pairs (8) and taken back to where it started (session 19: 0.98–1.00; the
/// 4-slot model at 8 callers, whose pairs are right, pays for the probes that show it: 1.05
/// → 1.01 of the best fixed setting).
const BUSY_16: Model = Model {
    name: "5 ms + 2 ms/prompt, 16 slots, a 10 ms stall after one answer in 500",
    stalls: Some((0.002, ms(10))),
    ..MOCK_16
};

#[test]
fn eight_callers_keep_a_slot_each_on_a_machine_that_stalls() {
    println!(
        "\n{}\nseed | off: prompts/s | adaptive, fresh | adaptive's protocol runs (after 1 caller)",
        BUSY_16.name
    );
    let mut short = Vec::new();
    for seed in SEEDS {
        let off = run(BUSY_16, Policy::Off, Load::Closed(8), seed).throughput;
        let fresh = run(BUSY_16, Policy::Adaptive, Load::Closed(8), seed).throughput;
        let runs = protocol(BUSY_16, Policy::Adaptive, &[1, 8], seed).remove(1);
        println!(
            "{seed} | {off:.0} | {fresh:.0} ({:.2}) | {runs:.0?}",
            fresh / off
        );
        let worst = runs.iter().copied().fold(fresh, f64::min);
        if worst < 0.9 * off {
            short.push(format!("seed {seed}: {:.2} of batching off", worst / off));
        }
    }
    assert!(short.is_empty(), "{short:?}");
}

/// The same at 8 callers on a machine that stalls briefly and often (2 ms after one answer in
/// 10, 3 ms in 20, 5 ms in 50), as the wall clock's two busy cores do: a round that a stall
/// made slow reads as a queue, and the limit (9, a slot free) fell to what the round served,
/// 6, sending the callers as pairs until probes split them again (the wall clock's 9 → 6 → 8
/// → 9; runs 0.84–0.95 of batching off, 0.91 on the mean here). Where the callers did not fill
/// the limit, a fall is by the requests that waited: 9 to 8, where they still go alone.
#[test]
fn eight_callers_keep_a_slot_each_on_a_machine_that_stalls_briefly_and_often() {
    println!("\n5 ms + 2 ms/prompt, 16 slots, 8 callers, brief stalls");
    println!("stalls | seed | adaptive / off: fresh, then protocol runs (after 1 caller)");
    let mut ratios = Vec::new();
    for (chance, stall) in [(0.1, 2), (0.05, 3), (0.02, 5)] {
        let model = Model {
            stalls: Some((chance, ms(stall))),
            ..MOCK_16
        };
        for seed in SEEDS {
            let off = run(model, Policy::Off, Load::Closed(8), seed).throughput;
            let fresh = run(model, Policy::Adaptive, Load::Closed(8), seed).throughput / off;
            let runs = protocol(model, Policy::Adaptive, &[1, 8], seed).remove(1);
            let runs: Vec<f64> = runs.iter().map(|r| r / off).collect();
            println!(
                "{stall} ms, 1 in {:.0} | {seed} | {fresh:.2}, {runs:.2?}",
                1.0 / chance
            );
            ratios.push(fresh);
            ratios.extend(runs);
        }
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    println!("mean {mean:.3}, worst {worst:.2}");
    assert!(
        mean >= 0.93 && worst >= 0.85,
        "mean {mean:.3}, worst {worst:.2} of batching off"
    );
}

/// The same brief stalls at 64 and 256 callers, through the protocol at six seeds: every run
/// within 0.9 of its caller count's median. There the limit keeps a queue the provider serves at
/// next to no cost (`HARMLESS`), and a stall's round reads as crowded; such rounds had reset the
/// count of calm rounds a probe waits for, so the limit could stay low for a run (the wall
/// clock's 16-slot mock at 64 callers held 13 through one: 3,597 among 3,940–4,023 prompts/s).
/// A harmless crowded round leaves the count alone: the worst run over its median 0.83 →
/// 0.92 (their mean 0.971 → 0.985).
#[test]
fn brief_stalls_do_not_hold_a_harmless_limit_down() {
    runs_hold_their_median(&[(0.1, 2), (0.05, 3), (0.02, 5)], 6, 0.9);
}

/// The 16-slot model stalling (`stalls`: chance after each answer, ms), through the protocol at
/// `seeds` seeds: every run at 64 and 256 callers at least `floor` of its median.
fn runs_hold_their_median(stalls: &[(f64, u64)], seeds: u64, floor: f64) {
    println!("\n5 ms + 2 ms/prompt, 16 slots, stalling (the wall-clock protocol's runs)");
    println!("stalls | seed | callers | adaptive's runs, prompts/s | worst / median");
    let mut short = Vec::new();
    for &(chance, stall) in stalls {
        let model = Model {
            stalls: Some((chance, ms(stall))),
            ..MOCK_16
        };
        for seed in (0..seeds).map(|s| s * 7919 + 3) {
            let runs = protocol(model, Policy::Adaptive, &CALLERS, seed);
            for (callers, runs) in CALLERS.into_iter().zip(runs).skip(2) {
                let mut sorted = runs.clone();
                sorted.sort_by(f64::total_cmp);
                let ratio = sorted[0] / sorted[sorted.len() / 2];
                println!(
                    "{stall} ms, 1 in {:.0} | {seed} | {callers} | {runs:.0?} | {ratio:.2}",
                    1.0 / chance
                );
                if ratio < floor {
                    short.push(format!(
                        "{stall} ms stalls, seed {seed}, {callers} callers: {ratio:.2}"
                    ));
                }
            }
        }
    }
    assert!(short.is_empty(), "{short:?}");
}

/// A long-lived router on a machine that stalls now and then (50 ms after one answer in 500;
/// 30 ms after one in 100), through the protocol, over twelve seeds: every run at 64 and 256
/// callers within 0.8 of its caller count's median. A stall reads as a queue. Falling to what
/// the round served (16 to 4 when a 50 ms stall lands in a 20 ms round) and climbing back one
/// request a calm round, the first run at 256 callers after such a fall was 0.22 of the others
/// (the wall clock's 16-slot mock, session 21: 3,676 among 6,151–6,265); with a climb that
/// doubles back to half the limit it fell from, 0.88 at seeds 7, 1 and 2 — but 0.15 and 0.68
/// at two of twelve: a 30 ms stall among 7 ms answers at 8 callers read 9 as serving 1, and the
/// next load's rounds at one request (`ROUND` answers of 64 prompts, 133 ms each) held it
/// there for seconds. A fall is now at most a half: 0.86 (0.84 with a harmless queue's slow
/// rounds leaving the probe's calm count alone).
#[test]
fn a_machine_that_stalls_does_not_sink_a_run() {
    runs_hold_their_median(&[(0.002, 50), (0.01, 30)], 12, 0.8);
}
