//! How a provider's requests spread over its endpoints (`providers[].balance`).
//!
//! - `least_outstanding`: of two endpoints picked at random, the one with less in flight and
//!   queued against its concurrency limit (power of two choices).
//! - `round_robin`: each endpoint in turn.
//! - `prefix_affinity`: requests whose first [`PREFIX`] bytes match go to the same endpoint,
//!   so its prefix (KV) cache is reused. A new prefix is placed by a consistent hash (a ring
//!   of [`VNODES`] points per endpoint), bounded twice:
//!   - in prefixes: an endpoint already holding more than (1 + [`EPSILON`]) × the mean passes
//!     a new one on along the ring, so no endpoint gets the lion's share of the groups;
//!   - in load (Mirrokni et al.'s consistent hashing with bounded loads, on work in flight
//!     and queued): while a prefix's endpoint has more than (1 + [`LOAD_EPSILON`]) × the
//!     mean, its requests go to the next endpoint along the ring from the prefix that is
//!     under it — a slow or crowded replica sheds work to the same neighbour each time, whose
//!     cache then holds the prefix too.
//!
//!   A placed prefix stays where it is while that endpoint is open. At most [`PREFIXES`]
//!   placements are kept (the least recently used goes first).
//!
//! Hand-written: the balancing crates (tower's p2c) balance services, not an endpoint list
//! with our own load figure, and none bounds a consistent hash's load.

use std::{
    collections::HashMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use super::replica::Replica;
use crate::{
    completion::{CompletionRequest, Input},
    config::Balance,
};

/// Bytes of a request's input that make its prefix: 1 KiB, about 256 tokens — a system prompt
/// and the start of a context, many KV-cache blocks (16 tokens each in vLLM); longer would
/// split groups whose shared part is shorter.
pub(super) const PREFIX: usize = 1024;
/// How far above the mean number of prefixes an endpoint may hold before a new prefix passes
/// on: 0.25, the bound of Mirrokni et al.'s consistent hashing with bounded loads at which
/// few keys move and no endpoint holds more than 1.25× its share.
pub(super) const EPSILON: f64 = 0.25;
/// How far above the mean work in flight a prefix's endpoint may be before its requests pass
/// on: 1.0, twice the mean. At the few requests in flight a replica has at a time, 0.25
/// would move work at every momentary excess of one request and scatter the groups (a test of
/// 8 groups on 4 replicas saw a group split 19 / 6); a replica that is truly slower or
/// crowded passes twice its share soon (the 160 ms one of the 8-replica bench holds ~5×).
pub(super) const LOAD_EPSILON: f64 = 1.0;
/// Ring points per endpoint: enough that the endpoints' arcs are within a few percent.
const VNODES: u64 = 64;
/// Prefix placements kept at most.
const PREFIXES: usize = 4096;

pub(super) struct Balancer {
    policy: Balance,
    turn: AtomicUsize,
    /// For `prefix_affinity`: the ring (point, endpoint), sorted, and the placements.
    ring: Vec<(u64, usize)>,
    placed: Mutex<Placed>,
}

#[derive(Default)]
struct Placed {
    /// Prefix hash → (endpoint, when last used).
    by_prefix: HashMap<u64, (usize, u64)>,
    /// Prefixes placed on each endpoint.
    held: Vec<usize>,
    clock: u64,
}

impl Balancer {
    pub(super) fn new(policy: Balance, endpoints: usize) -> Balancer {
        let mut ring = Vec::new();
        if policy == Balance::PrefixAffinity {
            for e in 0..endpoints {
                for v in 0..VNODES {
                    let point = blake3::hash(format!("endpoint {e} point {v}").as_bytes());
                    ring.push((first_u64(point.as_bytes()), e));
                }
            }
            ring.sort_unstable();
        }
        Balancer {
            policy,
            turn: AtomicUsize::new(0),
            ring,
            placed: Mutex::new(Placed {
                held: vec![0; endpoints],
                ..Placed::default()
            }),
        }
    }

    /// The endpoint for `request` among `open` (indexes into `replicas`, at least one).
    pub(super) fn pick(
        &self,
        replicas: &[Replica],
        open: &[usize],
        request: &CompletionRequest,
    ) -> usize {
        let lighter = |a: usize, b: usize| {
            if replicas[b].load() < replicas[a].load() {
                b
            } else {
                a
            }
        };
        let least = || open.iter().copied().reduce(lighter).unwrap_or(open[0]);
        match (open.len(), self.policy) {
            (1, _) => open[0],
            (_, Balance::RoundRobin) => open[self.turn.fetch_add(1, Relaxed) % open.len()],
            (2, Balance::LeastOutstanding) => lighter(open[0], open[1]),
            (n, Balance::LeastOutstanding) => {
                // Power of two choices: two distinct endpoints at random, the lighter one.
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                lighter(open[a], open[b])
            }
            (_, Balance::PrefixAffinity) => {
                let key = prefix_hash(request);
                let home = self.place(key, open);
                let total: usize = open.iter().map(|&e| replicas[e].busy()).sum();
                let bound = ((1.0 + LOAD_EPSILON) * (total + 1) as f64 / open.len() as f64).ceil();
                let under = |e: usize| (replicas[e].busy() + 1) as f64 <= bound;
                if under(home) {
                    return home;
                }
                self.along_ring(key)
                    .find(|&e| open.contains(&e) && under(e))
                    .unwrap_or_else(least)
            }
        }
    }

    /// Where the prefix `key` goes: where it was placed, while that endpoint is open; else a
    /// new place along the ring, on the first open endpoint under its bound.
    fn place(&self, key: u64, open: &[usize]) -> usize {
        let mut placed = self.placed.lock().unwrap_or_else(PoisonError::into_inner);
        let p = &mut *placed;
        p.clock += 1;
        let now = p.clock;
        if let Some((e, used)) = p.by_prefix.get_mut(&key)
            && open.contains(e)
        {
            *used = now;
            return *e;
        }
        if let Some((old, _)) = p.by_prefix.remove(&key) {
            p.held[old] = p.held[old].saturating_sub(1);
        }
        if p.by_prefix.len() >= PREFIXES
            && let Some((&lru, &(e, _))) = p.by_prefix.iter().min_by_key(|(_, (_, used))| *used)
        {
            p.by_prefix.remove(&lru);
            p.held[e] = p.held[e].saturating_sub(1);
        }
        let total: usize = open.iter().map(|&e| p.held[e]).sum();
        let bound = ((1.0 + EPSILON) * (total + 1) as f64 / open.len() as f64).max(1.0) as usize;
        let on_ring = self
            .along_ring(key)
            .find(|e| open.contains(e) && p.held[*e] < bound);
        let e = on_ring
            .or_else(|| open.iter().copied().min_by_key(|&e| p.held[e]))
            .unwrap_or(open[0]);
        p.held[e] += 1;
        p.by_prefix.insert(key, (e, now));
        e
    }
}

impl Balancer {
    /// The endpoints along the ring from `key`'s point on, each ring point in turn.
    fn along_ring(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.ring.partition_point(|&(point, _)| point < key);
        (0..self.ring.len()).map(move |i| self.ring[(start + i) % self.ring.len()].1)
    }
}

/// The hash of a request's first [`PREFIX`] bytes of input (a chat's roles and texts in
/// order).
fn prefix_hash(request: &CompletionRequest) -> u64 {
    let mut h = blake3::Hasher::new();
    let mut left = PREFIX;
    let mut feed = |bytes: &[u8]| {
        let take = bytes.len().min(left);
        h.update(&bytes[..take]);
        left -= take;
    };
    match &request.input {
        Input::Prompt(p) => feed(p.as_bytes()),
        Input::Chat(messages) => {
            for m in messages {
                feed(m.role.as_str().as_bytes());
                feed(b"\n");
                feed(m.content.text().as_bytes());
                feed(b"\n");
            }
        }
    }
    first_u64(h.finalize().as_bytes())
}

fn first_u64(bytes: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_stay_put_and_spread_within_the_bound() {
        let b = Balancer::new(Balance::PrefixAffinity, 4);
        let open = [0, 1, 2, 3];
        let places: Vec<usize> = (0..8u64)
            .map(|g| b.place(first_u64(blake3::hash(&g.to_le_bytes()).as_bytes()), &open))
            .collect();
        let mut held = [0; 4];
        for &e in &places {
            held[e] += 1;
        }
        assert!(
            held.iter().all(|&n| n <= 2),
            "8 prefixes on 4 endpoints: {held:?}"
        );
        for (g, &e) in places.iter().enumerate() {
            let key = first_u64(blake3::hash(&(g as u64).to_le_bytes()).as_bytes());
            assert_eq!(
                b.place(key, &open),
                e,
                "prefix {g} stays where it was placed"
            );
        }
        // An endpoint that closes gives its prefixes up: they move, and only they do.
        let without = [0, 1, 3];
        for (g, &e) in places.iter().enumerate() {
            let key = first_u64(blake3::hash(&(g as u64).to_le_bytes()).as_bytes());
            let now = b.place(key, &without);
            if e == 2 {
                assert_ne!(now, 2);
            } else {
                assert_eq!(now, e, "prefix {g} did not move");
            }
        }
    }
}
