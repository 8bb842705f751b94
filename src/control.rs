//! What operators do to providers while the router runs: enable, disable, drain, reset a
//! circuit. A disabled or draining provider is skipped by new requests (attempt kind
//! DISABLED, no network attempt); requests already sent to it finish. Drain differs from
//! disable only in what the status page says: draining until its last request in flight has
//! ended, then disabled. An order is kept by provider name across SIGHUP reloads until
//! `enable` clears it.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU8, Ordering::Relaxed},
    },
};

use crate::error::RouterError;

/// An operator's action on one provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Enable,
    Disable,
    Drain,
    ResetCircuit,
}

impl Action {
    pub const NAMES: &'static str = "enable, disable, drain, reset_circuit";

    /// The action a request names, or INVALID_ARGUMENT naming the valid ones.
    pub fn parse(name: &str) -> Result<Action, RouterError> {
        Ok(match name {
            "enable" => Action::Enable,
            "disable" => Action::Disable,
            "drain" => Action::Drain,
            "reset_circuit" => Action::ResetCircuit,
            other => {
                return Err(RouterError::InvalidArgument(format!(
                    "action: unknown action {}; valid: {}",
                    crate::error::Shown(other),
                    Action::NAMES
                )));
            }
        })
    }
}

/// An operator's standing order for a provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    Serve,
    Disable,
    Drain,
}

impl Order {
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Serve => "serve",
            Order::Disable => "disable",
            Order::Drain => "drain",
        }
    }

    /// Whether new requests may go to a provider under this order.
    pub fn admits(self) -> bool {
        self == Order::Serve
    }
}

/// One provider's order, read on every attempt without a lock.
#[derive(Debug, Default)]
pub struct OrderCell(AtomicU8);

impl OrderCell {
    pub fn get(&self) -> Order {
        match self.0.load(Relaxed) {
            1 => Order::Disable,
            2 => Order::Drain,
            _ => Order::Serve,
        }
    }

    pub fn set(&self, order: Order) {
        let v = match order {
            Order::Serve => 0,
            Order::Disable => 1,
            Order::Drain => 2,
        };
        self.0.store(v, Relaxed);
    }
}

/// The orders in force, by provider name, kept across reloads.
#[derive(Debug, Default)]
pub struct Overrides(Mutex<BTreeMap<String, Order>>);

impl Overrides {
    /// Records `order` for `provider` (`Serve` clears it).
    pub fn set(&self, provider: &str, order: Order) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match order {
            Order::Serve => all.remove(provider),
            other => all.insert(provider.to_string(), other),
        };
    }

    pub fn get(&self, provider: &str) -> Order {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(provider).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_an_unknown_one_names_the_valid_ones() {
        assert_eq!(Action::parse("drain").ok(), Some(Action::Drain));
        let e = Action::parse("pause").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("action: unknown action \"pause\"; valid: enable, disable, drain, reset_circuit")
        );
    }

    #[test]
    fn orders_are_kept_by_name_until_cleared() {
        let o = Overrides::default();
        o.set("a", Order::Drain);
        assert_eq!(o.get("a"), Order::Drain);
        o.set("a", Order::Serve);
        assert_eq!(o.get("a"), Order::Serve);
        let cell = OrderCell::default();
        for order in [Order::Disable, Order::Drain, Order::Serve] {
            cell.set(order);
            assert_eq!(cell.get(), order);
        }
    }
}
