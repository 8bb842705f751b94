//! Leases, so that a fleet's budgets cost no round trip on most calls: with room to spare, a
//! router reserves in Redis a little more than the call needs — 1/[`LEASE_PART`] of the
//! smallest budget that applies — and spends the rest on later calls to the same budgets
//! locally, with what settled calls did not use — when that part is at least the call's
//! worst case (a smaller lease could serve no call, and would only hold budget back). A lease
//! left idle lapses after [`LEASE_LAPSE`] and goes back to Redis.
//!
//! Leased budget is counted in Redis when leased, so the fleet never spends past a budget; a
//! lease only keeps up to its size from the other routers for a while. Near a budget's end
//! (no room for a lease) every reservation is decided in Redis, exactly. A router that dies
//! holding a lease leaves it counted until the day ends.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

use super::Scope;

/// A lease is this part of the smallest budget it is taken on.
pub(super) const LEASE_PART: u64 = 100;
/// An idle lease goes back to Redis after this long.
pub(super) const LEASE_LAPSE: Duration = Duration::from_secs(1);

/// What a lease can hold on budgets of these `limits`.
pub(super) fn size(limits: impl Iterator<Item = u64>) -> u64 {
    limits.min().unwrap_or(0) / LEASE_PART
}

/// What a call got from its lease.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// Its reservation, from the lease.
    Taken,
    /// Nothing: it asks Redis for its reservation and a lease besides.
    Lease,
    /// Nothing: it asks Redis for its reservation alone (another call is asking for a lease).
    Need,
}

/// This router's leases, one per set of budgets.
#[derive(Default)]
pub(super) struct Leases {
    by: HashMap<Vec<Scope>, Lease>,
}

struct Lease {
    day: u32,
    left: u64,
    until: Instant,
    /// A call is asking Redis for a lease on these budgets: the others ask for their need
    /// alone (so that callers arriving together do not all take one).
    asking: bool,
}

impl Leases {
    /// Takes `amount` from the lease on `scopes` when it holds that much of `day`'s budgets:
    /// `Taken`; else whether this call is the one to ask Redis for a new lease.
    pub(super) fn take(&mut self, scopes: &[Scope], day: u32, amount: u64) -> Take {
        let now = Instant::now();
        match self.by.get_mut(scopes) {
            Some(l) if l.day == day && l.until > now && l.left >= amount => {
                l.left -= amount;
                Take::Taken
            }
            Some(l) if l.asking => Take::Need,
            Some(l) => {
                l.asking = true;
                Take::Lease
            }
            None => {
                self.by.insert(
                    scopes.to_vec(),
                    Lease {
                        day,
                        left: 0,
                        until: now,
                        asking: true,
                    },
                );
                Take::Lease
            }
        }
    }

    /// The call asking for a lease on `scopes` has its answer (the lease, if any, is then
    /// [`Leases::give`]n).
    pub(super) fn answered(&mut self, scopes: &[Scope]) {
        if let Some(l) = self.by.get_mut(scopes) {
            l.asking = false;
        }
    }

    /// Adds `amount` of `day`'s budgets on `scopes` to their lease (leased beyond a call's
    /// need, or left over by a settled call), holding at most `cap`; returns what did not fit,
    /// to give back to Redis — and a lease of another day, or lapsed, that it replaced.
    pub(super) fn give(&mut self, scopes: &[Scope], day: u32, amount: u64, cap: u64) -> u64 {
        let now = Instant::now();
        let mut back = 0;
        let lease = self.by.entry(scopes.to_vec()).or_insert(Lease {
            day,
            left: 0,
            until: now,
            asking: false,
        });
        if lease.day != day || lease.until <= now {
            // Its own day's key is the one to give it back to; a lapsed lease of today is
            // given back here rather than by the flush.
            back = if lease.day == day { lease.left } else { 0 };
            *lease = Lease {
                day,
                left: 0,
                until: now,
                asking: lease.asking,
            };
        }
        let kept = amount.min(cap.saturating_sub(lease.left));
        lease.left += kept;
        lease.until = now + LEASE_LAPSE;
        back + (amount - kept)
    }

    /// Takes out the leases idle past their lapse, or of a past day (`all`: every lease):
    /// (day, scopes, left).
    pub(super) fn lapsed(&mut self, today: u32, all: bool) -> Vec<(u32, Vec<Scope>, u64)> {
        let now = Instant::now();
        let mut out = Vec::new();
        self.by.retain(|scopes, l| {
            let keep = !all && (l.asking || (l.day == today && l.until > now));
            if !keep && l.left > 0 {
                out.push((l.day, scopes.clone(), l.left));
            }
            keep
        });
        out
    }
}
