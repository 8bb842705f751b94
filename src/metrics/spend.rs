//! The spend and budget series ([`crate::spend`]).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// Spend and budgets ([`crate::spend`]).
#[derive(Clone, Default)]
pub struct SpendMetrics {
    spent: Family<SpendLabel, FloatCounter>,
    remaining: Family<BudgetLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    alerts: Family<BudgetLabel, Counter>,
    refused: Family<BudgetLabel, Counter>,
    local: Counter,
    reconciled: Counter,
}

/// Who spent: a client key's name (empty for other callers), a provider's model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpendLabel {
    tenant: String,
    provider: String,
    model: String,
}

/// A budget, as `router`, `provider:NAME` or `client:NAME`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabel {
    budget: String,
}

impl SpendMetrics {
    pub fn spent(&self, tenant: &str, provider: &str, model: &str, cost: crate::completion::Cost) {
        let label = SpendLabel {
            tenant: tenant.into(),
            provider: provider.into(),
            model: model.into(),
        };
        self.spent.get_or_create(&label).inc_by(cost.usd());
    }

    fn budget(budget: &str) -> BudgetLabel {
        BudgetLabel {
            budget: budget.into(),
        }
    }

    pub fn remaining(&self, budget: &str, nanos: u64) {
        self.remaining
            .get_or_create(&Self::budget(budget))
            .set(nanos as f64 / 1e9);
    }

    pub fn alerted(&self, budget: &str) {
        self.alerts.get_or_create(&Self::budget(budget)).inc();
    }

    pub fn refused(&self, budget: &str) {
        self.refused.get_or_create(&Self::budget(budget)).inc();
    }

    #[cfg(test)]
    pub fn alerts_of(&self, budget: &str) -> u64 {
        self.alerts.get_or_create(&Self::budget(budget)).get()
    }

    /// A reservation decided on this router's figures: the store was away.
    pub fn decided_locally(&self) {
        self.local.inc();
    }

    /// Changes kept while the store was away were written to it.
    pub fn reconciled(&self) {
        self.reconciled.inc();
    }

    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "spend_usd",
            "Dollars spent on upstream answers at their models' prices, by client key, provider and model",
            self.spent.clone(),
        );
        let b = r.sub_registry_with_prefix("budget");
        b.register(
            "remaining_usd",
            "Dollars left today in each budget, as this router last saw it",
            self.remaining.clone(),
        );
        b.register(
            "alerts",
            "Budgets that reached cost_tracking.alert_threshold_percent (once a day each)",
            self.alerts.clone(),
        );
        b.register(
            "refusals",
            "Paid attempts skipped because a budget could not cover them",
            self.refused.clone(),
        );
        b.register(
            "local_decisions",
            "Reservations decided on this router's figures because Redis was away",
            self.local.clone(),
        );
        b.register(
            "reconciled",
            "Times changes kept while Redis was away were written to it",
            self.reconciled.clone(),
        );
    }
}
