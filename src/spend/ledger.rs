//! The spend ledger: nanodollars and answers by UTC day, tenant, provider and model, for
//! priced models. This router's own in memory (bounded); the fleet's in Redis, in two hashes a
//! day — `cascade:spend:{date}` (nanodollars) and `cascade:spend:{date}:calls` — with fields
//! `tenant\tprovider\tmodel`, kept [`KEEP_DAYS`] days.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
};

use super::{Payer, clock::date};
use crate::completion::Cost;

/// Rows kept in memory at most: past that, the oldest day goes, then new tenants of today are
/// counted as [`OTHER`] (an unauthenticated caller names its own tenant).
const MAX_ROWS: usize = 100_000;
const OTHER: &str = "(other)";
/// Days a day's hashes live in Redis.
pub(super) const KEEP_DAYS: u64 = 90;

/// One line of the ledger.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    pub tenant: String,
    pub provider: String,
    pub model: String,
    /// Nanodollars.
    pub nanos: u64,
    /// The same in dollars, for reading.
    pub usd: f64,
    /// Answers counted.
    pub calls: u64,
}

/// A ledger line's place: day and who.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    pub day: u32,
    pub tenant: String,
    pub provider: String,
    pub model: String,
    pub nanos: u64,
    pub calls: u64,
}

impl Key {
    pub(super) fn of(day: u32, payer: Payer<'_>, cost: Cost) -> Key {
        Key {
            day,
            // A tab would split the Redis field's parts wrongly; a caller names its own tenant.
            tenant: payer.tenant.replace('\t', " "),
            provider: payer.provider.to_string(),
            model: payer.model.to_string(),
            nanos: cost.nanos,
            calls: 1,
        }
    }

    /// Where it goes: day and who.
    pub(super) fn who(&self) -> Who {
        (
            self.day,
            self.tenant.clone(),
            self.provider.clone(),
            self.model.clone(),
        )
    }

    /// Its two Redis hashes and its field in them.
    pub(super) fn redis(&self) -> (String, String, String) {
        let hash = format!("cascade:spend:{}", date(self.day));
        let calls = format!("{hash}:calls");
        let field = format!("{}\t{}\t{}", self.tenant, self.provider, self.model);
        (hash, calls, field)
    }
}

/// Reads a day's Redis hashes back into rows.
pub(super) fn rows_of(nanos: Vec<(String, u64)>, calls: &BTreeMap<String, u64>) -> Vec<Row> {
    nanos
        .into_iter()
        .map(|(field, nanos)| {
            let mut parts = field.splitn(3, '\t');
            let mut next = || parts.next().unwrap_or_default().to_string();
            let (tenant, provider, model) = (next(), next(), next());
            Row {
                calls: calls.get(&field).copied().unwrap_or(0),
                tenant,
                provider,
                model,
                nanos,
                usd: nanos as f64 / 1e9,
            }
        })
        .collect()
}

pub(super) type Who = (u32, String, String, String);

#[derive(Default)]
pub(super) struct Ledger {
    rows: Mutex<BTreeMap<Who, (u64, u64)>>,
}

impl Ledger {
    pub(super) fn add(&self, day: u32, payer: Payer<'_>, cost: Cost) {
        let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut who = (
            day,
            payer.tenant.to_string(),
            payer.provider.to_string(),
            payer.model.to_string(),
        );
        if rows.len() >= MAX_ROWS && !rows.contains_key(&who) {
            let oldest = rows.keys().next().map(|k| k.0);
            if let Some(oldest) = oldest.filter(|d| *d < day) {
                rows.retain(|k, _| k.0 != oldest);
            } else {
                who.1 = OTHER.to_string();
            }
        }
        let row = rows.entry(who).or_default();
        row.0 = row.0.saturating_add(cost.nanos);
        row.1 += 1;
    }

    /// `day`'s nanodollars by provider.
    pub(super) fn by_provider(&self, day: u32) -> HashMap<String, u64> {
        let rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: HashMap<String, u64> = HashMap::new();
        for (k, v) in rows
            .range((day, String::new(), String::new(), String::new())..)
            .take_while(|(k, _)| k.0 == day)
        {
            *out.entry(k.2.clone()).or_default() += v.0;
        }
        out
    }

    pub(super) fn rows(&self, day: u32) -> Vec<Row> {
        let rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        rows.range((day, String::new(), String::new(), String::new())..)
            .take_while(|(k, _)| k.0 == day)
            .map(|(k, v)| Row {
                tenant: k.1.clone(),
                provider: k.2.clone(),
                model: k.3.clone(),
                nanos: v.0,
                usd: v.0 as f64 / 1e9,
                calls: v.1,
            })
            .collect()
    }
}
