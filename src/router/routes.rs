//! Name → targets, computed once from the cascade file: a lookup is one hash-map probe.

use std::{collections::HashMap as StdHashMap, sync::Arc};

/// Looked up on every call: foldhash (seeded per process) rather than std's SipHash.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

use super::BuildError;
use crate::{
    capability::Capability,
    cascade::{self, Plan, Target},
    completion::CompletionRequest,
    config::Config,
    error::RouterError,
    metrics::Metrics,
    upstream::Upstream,
};

/// Name → targets, precomputed from the cascade file.
#[derive(Debug)]
pub struct Routes {
    by_name: HashMap<String, Arc<[Target]>>,
    /// Every usable provider's default model, in priority order.
    default: Arc<[Target]>,
    /// Agent id → model or chain name.
    assignments: HashMap<String, String>,
    /// `fallback_chains.<capability>`: walked for a request whose route lacks it.
    by_capability: HashMap<Capability, Arc<[Target]>>,
}

impl Routes {
    /// Routes over `upstreams`, the usable providers in priority order.
    pub fn new(config: &Config, upstreams: &[Arc<Upstream>]) -> Routes {
        let for_model = |model: &str| -> Vec<Target> {
            upstreams
                .iter()
                .filter(|u| u.serves(model))
                .map(|u| Target {
                    upstream: u.clone(),
                    model: model.into(),
                })
                .collect()
        };
        let mut by_name: HashMap<String, Arc<[Target]>> = config
            .models
            .iter()
            .map(|m| (m.clone(), for_model(m).into()))
            .collect();
        // Chains win over a model of the same name (the config warns about it).
        for (chain, models) in &config.chains {
            let mut targets: Vec<Target> = Vec::new();
            for t in models.iter().flat_map(|m| for_model(m)) {
                if !targets.contains(&t) {
                    targets.push(t);
                }
            }
            by_name.insert(chain.clone(), targets.into());
        }
        let default = upstreams
            .iter()
            .map(|u| Target {
                upstream: u.clone(),
                model: u.default_model().into(),
            })
            .collect();
        let by_capability = Capability::ALL
            .into_iter()
            .filter_map(|c| Some((c, by_name.get(c.as_str())?.clone())))
            .collect();
        Routes {
            by_name,
            by_capability,
            default,
            assignments: config
                .assignments
                .iter()
                .map(|(a, m)| (a.clone(), m.clone()))
                .collect(),
        }
    }

    /// Routes over providers of their own (for benches and tools that only route).
    pub fn from_config(config: &Config) -> Result<Routes, BuildError> {
        let upstreams = build_upstreams(config, &Arc::new(Metrics::new()))?;
        Ok(Routes::new(config, &upstreams))
    }

    /// The targets for a request's `model` and `agent`.
    pub fn resolve<'a>(
        &'a self,
        model: &str,
        agent: &str,
    ) -> Result<&'a Arc<[Target]>, RouterError> {
        self.resolve_named(model, agent).map(|(_, t)| t)
    }

    /// The targets that can take `request` on `route`, with the chains of capabilities the
    /// route lacks after it (see `cascade::plan`).
    pub fn plan(
        &self,
        route: &Arc<[Target]>,
        request: &CompletionRequest,
        streaming: bool,
    ) -> Result<Plan, RouterError> {
        cascade::plan(
            route,
            &|c| self.by_capability.get(&c).cloned(),
            request,
            streaming,
        )
    }

    /// Every model and chain name a request may ask for, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// The names with a target that could take a request now, sorted.
    pub fn servable_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_name
            .iter()
            .filter(|(_, targets)| targets.iter().any(|t| t.upstream.serving()))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort_unstable();
        names
    }

    /// Like [`Routes::resolve`], with the resolved model or chain name ("" for the default).
    pub fn resolve_named<'a>(
        &'a self,
        model: &str,
        agent: &str,
    ) -> Result<(&'a str, &'a Arc<[Target]>), RouterError> {
        let name = match (model, self.assignments.get(agent)) {
            ("", Some(assigned)) => assigned.as_str(),
            ("", None) => return Ok(("", &self.default)),
            (named, _) => named,
        };
        self.by_name
            .get_key_value(name)
            .map(|(name, t)| (name.as_str(), t))
            .ok_or_else(|| {
                let mut known: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
                known.sort_unstable();
                let more = known.len().saturating_sub(20);
                known.truncate(20);
                let mut list = known.join(", ");
                if more > 0 {
                    list.push_str(&format!(" and {more} more"));
                }
                RouterError::UnknownModel {
                    model: name.into(),
                    known: list,
                }
            })
    }
}

/// One upstream per usable provider, in priority order.
fn build_upstreams(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Vec<Arc<Upstream>>, reqwest::Error> {
    config
        .providers
        .iter()
        .map(|p| Upstream::new(p, config.cascade.breaker, metrics, None).map(Arc::new))
        .collect()
}
