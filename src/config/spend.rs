//! Budgets: `cost_tracking` (the Python router's section, read as written: `enabled`,
//! `budget_daily_usd` for the whole router, `alert_threshold_percent`), and
//! `budget: {daily_usd}` on a provider and on a client key. Amounts are kept exact, in
//! billionths of a dollar, as prices are ([`super::Price`]).

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Check, ConfigError,
    raw::{RawBudget, RawCostTracking, RawFile},
};

/// What happens to paid attempts while the shared store (Redis) is away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Keep deciding on this router's figures (the fleet's last total plus what this router
    /// spent since), and add what it spent to the store when it is back.
    #[default]
    EnforceLocal,
    /// Skip paid models until the store is back (free ones still answer).
    Refuse,
}

/// Every budget, and how they are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendConfig {
    /// The whole router's spend a UTC day (`cost_tracking.budget_daily_usd`), in nanodollars.
    pub router_daily: Option<u64>,
    /// Per provider name.
    pub provider_daily: BTreeMap<String, u64>,
    /// Per client key name (its tenant).
    pub client_daily: BTreeMap<String, u64>,
    /// Every client key's name: the tenants spend is labelled with in metrics (any other
    /// tenant — an unauthenticated caller's `agent` — is not, to keep the series bounded).
    pub clients: BTreeSet<String>,
    /// A warning when a budget's spend reaches this percentage of it.
    pub alert_percent: u64,
    pub on_store_error: OnStoreError,
    /// Output tokens a paid attempt reserves when the request sets no `max_tokens`.
    pub reserve_output_tokens: u32,
}

impl SpendConfig {
    /// Whether any budget is set (with none, nothing is reserved).
    pub fn any(&self) -> bool {
        self.router_daily.is_some()
            || !self.provider_daily.is_empty()
            || !self.client_daily.is_empty()
    }
}

/// The most a daily budget may be: well above any one deployment's spend, so a budget in
/// the wrong unit (cents, micro-dollars) is caught at load.
const MAX_DAILY_USD: f64 = 1_000_000.0;

impl Check<'_> {
    /// The budgets of `raw` (read before its sections are taken apart).
    pub(super) fn spend(&mut self, raw: &RawFile) -> Result<SpendConfig, ConfigError> {
        let tracking = raw.cost_tracking.as_ref();
        let default = RawCostTracking::default();
        let t = tracking.unwrap_or(&default);
        let percent = t.alert_threshold_percent;
        if !(percent.is_finite() && percent > 0.0 && percent <= 100.0) {
            return Err(self.err(
                "cost_tracking.alert_threshold_percent",
                format!("{percent} is out of range"),
                "give a percentage of the budget, more than 0 and at most 100 (80 by default)",
            ));
        }
        if t.reserve_output_tokens == 0 {
            return Err(self.err(
                "cost_tracking.reserve_output_tokens",
                "must be at least 1",
                "give the output tokens a paid call without max_tokens may use (4096 by default)",
            ));
        }
        if t.monthly_budget_usd.is_some() {
            self.warn(
                "cost_tracking.monthly_budget_usd is not enforced: budgets here are daily \
                 (cost_tracking.budget_daily_usd)",
            );
        }
        let router_daily = match t.budget_daily_usd {
            Some(v) if t.enabled => Some(self.daily("cost_tracking.budget_daily_usd", v)?),
            Some(_) => {
                self.warn("cost_tracking.budget_daily_usd is not enforced: cost_tracking.enabled is false");
                None
            }
            None => None,
        };
        let mut provider_daily = BTreeMap::new();
        for (i, p) in raw.providers.iter().enumerate() {
            if let Some(b) = &p.budget {
                let v = self.budget(&format!("providers[{i}].budget"), b)?;
                provider_daily.insert(p.name.clone(), v);
            }
        }
        let mut client_daily = BTreeMap::new();
        let keys = raw.server.auth.as_ref().map_or(&[][..], |a| &a.keys[..]);
        let clients = keys.iter().map(|k| k.name.clone()).collect();
        for (i, k) in keys.iter().enumerate() {
            if let Some(b) = &k.budget {
                let v = self.budget(&format!("server.auth.keys[{i}].budget"), b)?;
                client_daily.insert(k.name.clone(), v);
            }
        }
        Ok(SpendConfig {
            router_daily,
            provider_daily,
            client_daily,
            clients,
            alert_percent: percent.round() as u64,
            on_store_error: t.on_store_error,
            reserve_output_tokens: t.reserve_output_tokens,
        })
    }

    fn budget(&self, at: &str, b: &RawBudget) -> Result<u64, ConfigError> {
        self.daily(&format!("{at}.daily_usd"), b.daily_usd)
    }

    /// A daily budget in USD, as nanodollars.
    fn daily(&self, key: &str, usd: f64) -> Result<u64, ConfigError> {
        if usd.is_finite() && usd > 0.0 && usd <= MAX_DAILY_USD {
            return Ok((usd * 1e9).round() as u64);
        }
        Err(self.err(
            key,
            format!("{usd} is out of range"),
            format!("give US dollars a day, more than 0 and at most {MAX_DAILY_USD} (e.g. 10.0)"),
        ))
    }
}
