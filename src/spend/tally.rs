//! Each budget's figure for today, as this router knows it: the total (the store's, as it
//! last answered, or this router's own when there is no store), and what this router
//! changed that the store has not taken yet.

use std::collections::HashMap;

use super::Scope;

#[derive(Default)]
pub(super) struct Tallies {
    day: u32,
    by: HashMap<Scope, Tally>,
}

#[derive(Default)]
struct Tally {
    /// Spent and reserved, in nanodollars: the store's total when it last answered, or this
    /// router's alone without a store.
    known: i64,
    /// This router's reservations and settlements the store has not taken yet.
    pending: i64,
    /// The alert for today was given.
    alerted: bool,
}

impl Tally {
    fn used(&self) -> u64 {
        u64::try_from(self.known.saturating_add(self.pending)).unwrap_or(0)
    }
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Tallies {
    /// Today's tallies: a new day starts them from nothing. `None` for a day already past (a
    /// hold of yesterday's settling: its budget has reset).
    fn on(&mut self, day: u32) -> Option<&mut HashMap<Scope, Tally>> {
        if day > self.day {
            self.day = day;
            self.by.clear();
        }
        (day == self.day).then_some(&mut self.by)
    }

    pub(super) fn used(&self, day: u32, scope: &Scope) -> u64 {
        if day != self.day {
            return 0;
        }
        self.by.get(scope).map_or(0, Tally::used)
    }

    /// Reserves `worst` against every budget in `limits`, or none and the first that has no
    /// room (with its limit and use). `pending`: the store is away and will be told later.
    pub(super) fn reserve(
        &mut self,
        day: u32,
        limits: &[(Scope, u64)],
        worst: u64,
        pending: bool,
    ) -> Result<(), (Scope, u64, u64)> {
        let Some(by) = self.on(day) else {
            return Ok(());
        };
        for (scope, limit) in limits {
            let used = by.get(scope).map_or(0, Tally::used);
            if used.saturating_add(worst) > *limit {
                return Err((scope.clone(), *limit, used));
            }
        }
        for (scope, _) in limits {
            let t = by.entry(scope.clone()).or_default();
            if pending {
                t.pending = t.pending.saturating_add(signed(worst));
            } else {
                t.known = t.known.saturating_add(signed(worst));
            }
        }
        Ok(())
    }

    /// A settlement moved `scopes` by `delta`, in this router alone (no store).
    pub(super) fn apply(&mut self, day: u32, scopes: &[Scope], delta: i64) {
        let Some(by) = self.on(day) else { return };
        for scope in scopes {
            let t = by.entry(scope.clone()).or_default();
            t.known = t.known.saturating_add(delta);
        }
    }

    /// A change the store did not take: kept until it does.
    pub(super) fn pend(&mut self, day: u32, scopes: &[Scope], delta: i64) {
        let Some(by) = self.on(day) else { return };
        for scope in scopes {
            let t = by.entry(scope.clone()).or_default();
            t.pending = t.pending.saturating_add(delta);
        }
    }

    /// The store's totals, as it just answered; `flushed` of each scope's pending is now in
    /// them.
    pub(super) fn seen(&mut self, day: u32, totals: &[(Scope, i64)], flushed: &[i64]) {
        let Some(by) = self.on(day) else { return };
        for (i, (scope, total)) in totals.iter().enumerate() {
            let t = by.entry(scope.clone()).or_default();
            t.known = *total;
            t.pending = t
                .pending
                .saturating_sub(flushed.get(i).copied().unwrap_or(0));
        }
    }

    /// Scopes of today with changes the store has not taken.
    pub(super) fn pending(&self) -> (u32, Vec<(Scope, i64)>) {
        let out = self
            .by
            .iter()
            .filter(|(_, t)| t.pending != 0)
            .map(|(s, t)| (s.clone(), t.pending))
            .collect();
        (self.day, out)
    }

    /// Whether the alert for `scope` today is still to give (true once).
    pub(super) fn alert_once(&mut self, day: u32, scope: &Scope) -> bool {
        let Some(by) = self.on(day) else { return false };
        let t = by.entry(scope.clone()).or_default();
        !std::mem::replace(&mut t.alerted, true)
    }
}
