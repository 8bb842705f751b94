//! The time a provider takes for a request of a given size when it is not queueing: the
//! fastest answer seen per size bucket, the one idea batching adds to a concurrency limit (a
//! batch of 32 taking longer than a batch of 1 is not congestion).

use std::time::Duration;

/// Size buckets: one per size up to 16, then an eighth apart (4,096 prompts fit).
pub(super) const BUCKETS: usize = 64;

/// The fastest answer per size bucket (its prompts and its time): one bucket per size up to
/// 16, then buckets an eighth apart.
#[derive(Debug)]
pub(super) struct Baseline {
    usual: [Option<(usize, f64)>; BUCKETS],
    /// Answers seen per bucket.
    seen: [u32; BUCKETS],
}

impl Default for Baseline {
    fn default() -> Baseline {
        Baseline {
            usual: [None; BUCKETS],
            seen: [0; BUCKETS],
        }
    }
}

/// The bucket for a request of `items` prompts.
pub(super) fn bucket(items: usize) -> usize {
    if items <= 16 {
        return items.saturating_sub(1);
    }
    let steps = ((items as f64 / 16.0).ln() / 1.125f64.ln()) as usize;
    (16 + steps).min(BUCKETS - 1)
}

impl Baseline {
    /// Learns an answer's time: the fastest of its size is the one kept.
    pub(super) fn learn(&mut self, items: usize, took: Duration) {
        let seen = &mut self.seen[bucket(items)];
        *seen = seen.saturating_add(1);
        let took = took.as_secs_f64();
        let usual = &mut self.usual[bucket(items)];
        if usual.is_none_or(|(_, t)| took <= t) {
            *usual = Some((items, took));
        }
    }

    /// How long a lone prompt's answer takes (forever before one is seen).
    pub(super) fn lone(&self) -> Duration {
        self.usual[0].map_or(Duration::MAX, |(_, t)| Duration::from_secs_f64(t))
    }

    /// How many answers of `items`' size bucket were seen.
    pub(super) fn seen(&self, items: usize) -> usize {
        self.seen[bucket(items)] as usize
    }

    /// The part of a request's time that does not grow with its prompts: where the line
    /// through the largest size seen and the largest at most half of it meets zero prompts
    /// (large sizes: a server that serves a few prompts side by side takes as long for one
    /// as for a few). `None` before two such sizes are seen.
    pub(super) fn fixed_cost(&self) -> Option<f64> {
        let known = || self.usual.iter().flatten().copied();
        let (n, t) = known().max_by_key(|&(n, _)| n)?;
        let (m, u) = known()
            .filter(|&(m, _)| 2 * m <= n)
            .max_by_key(|&(m, _)| m)?;
        let per_prompt = (t - u) / (n - m) as f64;
        Some((u - per_prompt * m as f64).max(0.0))
    }

    /// How long an answer for `items` prompts takes when the provider is not queueing: no
    /// longer than any batch at least as big (a batch does not get cheaper by growing), and
    /// linear between two sizes — so a size first seen while queueing is judged by the
    /// others. `None` before any answer of this size or bigger, or on both sides of it.
    pub(super) fn expected(&self, items: usize) -> Option<f64> {
        let known = || self.usual.iter().flatten().copied();
        let mut best = f64::INFINITY;
        for (n, t) in known() {
            if n >= items {
                best = best.min(t);
            } else {
                for (m, u) in known().filter(|&(m, _)| m > items) {
                    let at = (items - n) as f64 / (m - n) as f64;
                    best = best.min(t + (u - t) * at);
                }
            }
        }
        best.is_finite().then_some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_requests_fixed_cost_is_where_the_line_through_large_sizes_meets_zero() {
        let mut b = Baseline::default();
        b.learn(8, 28 * MS);
        assert_eq!(b.fixed_cost(), None, "one size");
        b.learn(32, 52 * MS);
        assert!((b.fixed_cost().unwrap() - 0.020).abs() < 1e-9);
        // Four prompts side by side take as long as one: small sizes do not show the fixed cost.
        let mut b = Baseline::default();
        for (n, ms) in [(1, 202), (4, 202), (16, 802), (32, 1602)] {
            b.learn(n, ms * MS);
        }
        assert!((b.fixed_cost().unwrap() - 0.002).abs() < 1e-9);
    }

    #[test]
    fn expected_time_is_bounded_by_bigger_sizes_and_linear_between() {
        let mut b = Baseline::default();
        assert_eq!(b.expected(4), None);
        b.learn(1, 21 * MS);
        b.learn(8, 28 * MS);
        b.learn(4, 48 * MS);
        let ms = |n| (b.expected(n).unwrap() * 1e6).round() / 1e3;
        assert_eq!(ms(4), 24.0, "between 1 and 8, not its own 48");
        assert_eq!(ms(1), 21.0);
        assert_eq!(ms(8), 28.0);
        assert_eq!(b.expected(9), None, "nothing this big or bigger");
    }

    #[test]
    fn buckets_are_exact_to_16_then_an_eighth_apart() {
        assert_eq!((bucket(1), bucket(16), bucket(17)), (0, 15, 16));
        assert_eq!(bucket(19), 17);
        assert!(bucket(4096) < BUCKETS);
        assert!((17..=4096).all(|n| bucket(n) >= bucket(n - 1)), "monotone");
    }
}
