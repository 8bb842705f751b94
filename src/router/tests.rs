use super::*;
use crate::config;

const YAML: &str = r#"
providers:
  - {name: b, type: simulated, priority: 2, models: [small, big]}
  - {name: a, type: simulated, priority: 1, models: [{name: big, default: true}]}
  - {name: off, type: simulated, enabled: false, models: [ghost]}
fallback_chains:
  cheap_first: [small, big]
agent_model_assignments:
  triage: cheap_first
"#;

fn routes() -> Routes {
    let c = config::parse(YAML, "t", &|_| None).unwrap();
    Routes::from_config(&c).unwrap()
}

fn names(r: &Routes, model: &str, agent: &str) -> Vec<(String, String)> {
    r.resolve(model, agent)
        .unwrap()
        .iter()
        .map(|t| (t.upstream.name().to_string(), t.model.to_string()))
        .collect()
}

fn pairs(want: &[(&str, &str)]) -> Vec<(String, String)> {
    want.iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect()
}

#[test]
fn model_goes_to_every_provider_listing_it_by_priority() {
    // Provider a has priority 1, b priority 2.
    assert_eq!(
        names(&routes(), "big", ""),
        pairs(&[("a", "big"), ("b", "big")])
    );
}

#[test]
fn chain_walks_models_in_order_without_repeats() {
    let want = pairs(&[("b", "small"), ("a", "big"), ("b", "big")]);
    assert_eq!(names(&routes(), "cheap_first", ""), want);
    assert_eq!(names(&routes(), "", "triage"), want, "agent assignment");
}

#[test]
fn default_is_each_providers_default_model() {
    assert_eq!(
        names(&routes(), "", "someone"),
        pairs(&[("a", "big"), ("b", "small")])
    );
}

#[test]
fn disabled_only_model_resolves_empty_and_unknown_is_an_error() {
    assert!(names(&routes(), "ghost", "").is_empty());
    let err = routes().resolve("nope", "").unwrap_err();
    assert!(err.to_string().contains("cheap_first"), "{err}");
}
