//! `fallback_chains:` and `agent_model_assignments:` — names that must resolve to models.

use std::collections::{BTreeMap, BTreeSet};

use super::{Check, ConfigError};

impl Check<'_> {
    pub(super) fn chains(
        &mut self,
        chains: &BTreeMap<String, Vec<String>>,
        models: &BTreeSet<String>,
    ) -> Result<(), ConfigError> {
        for (chain, members) in chains {
            let at = format!("fallback_chains.{chain}");
            if members.is_empty() {
                return Err(self.err(
                    at,
                    "empty chain",
                    "list at least one model, in the order to try them",
                ));
            }
            for (j, m) in members.iter().enumerate() {
                if !models.contains(m) {
                    return Err(self.err(
                        format!("{at}[{j}]"),
                        format!("unknown model {m:?}"),
                        "name a model listed under some provider's `models`",
                    ));
                }
            }
            if models.contains(chain) {
                self.warn(format!(
                    "{at}: chain has the name of a model; requests for {chain:?} walk the chain"
                ));
            }
        }
        Ok(())
    }

    pub(super) fn assignments(
        &self,
        assignments: &BTreeMap<String, String>,
        models: &BTreeSet<String>,
        chains: &BTreeMap<String, Vec<String>>,
    ) -> Result<(), ConfigError> {
        for (agent, target) in assignments {
            if !models.contains(target) && !chains.contains_key(target) {
                return Err(self.err(
                    format!("agent_model_assignments.{agent}"),
                    format!("unknown model or chain {target:?}"),
                    "name a model listed under some provider's `models` or a `fallback_chains` entry",
                ));
            }
        }
        Ok(())
    }
}
