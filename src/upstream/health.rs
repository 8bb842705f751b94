//! Active health checks, Envoy's semantics: a GET of the provider's cheap endpoint every
//! `interval` (OpenAI-shaped `/models`, Ollama `/api/tags`, Anthropic `/v1/models`, or the
//! configured `path`, e.g. llama-server's `/health`), apart from callers' requests: no slot,
//! no rate limit, no quota. `unhealthy_after` failures in a row take the provider out of
//! rotation — attempts skip it (kind UNHEALTHY) before any caller pays a timeout — and
//! `healthy_after` successes in a row bring it back. A provider starts healthy.
//!
//! With checks on, the breaker's half-open probe is a health probe: an open circuit stays open
//! past its recovery time until a probe succeeds (see [`super::breaker::Breaker::reset`]).

use std::{
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use tokio::time::{Instant, MissedTickBehavior};

use super::link::Link;
use crate::{completion::FailureKind, config::HealthCheckConfig, provider::ProviderError};

/// A provider's health as its probes found it.
#[derive(Debug)]
pub(super) struct Health {
    config: HealthCheckConfig,
    healthy: AtomicBool,
    record: Mutex<Record>,
}

/// The probes' run so far, as the status page shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    /// Successes (or failures) in a row up to the last probe.
    pub passed_in_a_row: u32,
    pub failed_in_a_row: u32,
    pub last: Option<Probe>,
}

/// One probe's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub at: SystemTime,
    pub took: Duration,
    /// Why it failed (kind and message; never a body), `None` when it passed.
    pub failure: Option<(FailureKind, String)>,
}

/// What ListProviders and the status page say of a provider's health checks.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub healthy: bool,
    pub record: Record,
    pub interval: Duration,
}

impl Health {
    pub(super) fn new(config: HealthCheckConfig) -> Health {
        Health {
            config,
            healthy: AtomicBool::new(true),
            record: Mutex::new(Record::default()),
        }
    }

    pub(super) fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub(super) fn checked(&self) -> Checked {
        Checked {
            healthy: self.healthy(),
            record: self
                .record
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            interval: self.config.interval,
        }
    }

    /// Probes `link`'s provider once, within the probe's timeout, and records the outcome:
    /// it may take the provider out or bring it back, and a pass closes an open circuit.
    pub(super) async fn probe(&self, link: &Link) -> Probe {
        let start = Instant::now();
        let outcome = tokio::time::timeout(self.config.timeout, link.probe())
            .await
            .unwrap_or_else(|_| {
                Err(ProviderError::new(
                    FailureKind::Timeout,
                    format!(
                        "no answer to the health probe within {} ms",
                        self.config.timeout.as_millis()
                    ),
                ))
            });
        let probe = Probe {
            at: SystemTime::now(),
            took: start.elapsed(),
            failure: outcome.err().map(|e| (e.kind, e.message)),
        };
        let passed = probe.failure.is_none();
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        if passed {
            record.passed_in_a_row += 1;
            record.failed_in_a_row = 0;
            link.breaker.probe_passed();
        } else {
            record.failed_in_a_row += 1;
            record.passed_in_a_row = 0;
        }
        record.last = Some(probe.clone());
        let was = self.healthy();
        let now = if was {
            record.failed_in_a_row < self.config.unhealthy_after
        } else {
            record.passed_in_a_row >= self.config.healthy_after
        };
        if now != was {
            self.healthy.store(now, Relaxed);
            match &probe.failure {
                Some((kind, message)) => {
                    tracing::warn!(provider = %link.name, kind = %kind, error = %message, failed_in_a_row = record.failed_in_a_row, "health checks failing: provider out of rotation")
                }
                None => {
                    tracing::info!(provider = %link.name, passed_in_a_row = record.passed_in_a_row, "health checks passing: provider back in rotation")
                }
            }
        }
        probe
    }
}

/// Probes every `interval` (the first at once) while the link lives.
pub(super) fn watch(link: &Arc<Link>, health: &Arc<Health>) -> Option<Watch> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (link, health): (Weak<Link>, _) = (Arc::downgrade(link), health.clone());
    let task = runtime.spawn(async move {
        let mut every = tokio::time::interval(health.config.interval);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(link) = link.upgrade() else { return };
            health.probe(&link).await;
        }
    });
    Some(Watch(task))
}

/// The probing task, stopped when its upstream is dropped (a reload that replaced it).
#[derive(Debug)]
pub(super) struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}
