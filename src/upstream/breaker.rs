//! Per-provider admission: a circuit breaker and the `Retry-After` cool-down.
//!
//! Hand-written because the breaker crates on crates.io count failure *rates* over windows;
//! the cascade file's contract is the Python router's: `failure_threshold` *consecutive*
//! failures open the circuit, `recovery_timeout` later it lets `half_open_max_calls` probes
//! through, a probe's success closes it and a probe's failure opens it again.
//!
//! A std `Mutex` per provider: the critical sections are a few instructions and never await.

use std::{
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::config::BreakerConfig;

/// The circuit's state as reported by ListProviders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    /// `reported`: opened on another router's report ([`crate::fleet`]), not by failures here.
    Open {
        until: Instant,
        reported: bool,
    },
    HalfOpen {
        probes_in_flight: u32,
    },
}

#[derive(Debug)]
struct Inner {
    state: State,
    cool_until: Option<Instant>,
    /// A 429 / 503 with `Retry-After` came since the last success (see [`Breaker::asked_to_wait`]).
    asked: bool,
}

/// Why a provider was skipped without a network attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    CircuitOpen,
    CoolingDown(Duration),
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// Active health checks probe the provider: an open circuit stays open past its recovery
    /// time until a health probe succeeds ([`Breaker::reset`]), so no caller is the probe.
    probed: bool,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(config: BreakerConfig, probed: bool) -> Breaker {
        Breaker {
            config,
            probed,
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                cool_until: None,
                asked: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code path panics while holding the lock; recover the state if one ever did.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks to send one request. The returned [`Pass`] must be resolved with its outcome;
    /// dropping it unresolved (a cancelled call) frees a probe slot without judging the provider.
    pub fn admit(&self) -> Result<Pass<'_>, Refusal> {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(until) = inner.cool_until {
            if now < until {
                return Err(Refusal::CoolingDown(until - now));
            }
            inner.cool_until = None;
        }
        let probe = match &mut inner.state {
            State::Closed { .. } => false,
            State::Open { until, .. } if now < *until || self.probed => {
                return Err(Refusal::CircuitOpen);
            }
            State::Open { .. } => {
                inner.state = State::HalfOpen {
                    probes_in_flight: 1,
                };
                true
            }
            State::HalfOpen { probes_in_flight } => {
                if *probes_in_flight >= self.config.half_open_max_calls {
                    return Err(Refusal::CircuitOpen);
                }
                *probes_in_flight += 1;
                true
            }
        };
        Ok(Pass {
            breaker: self,
            probe,
            resolved: false,
        })
    }

    /// Whether [`Breaker::admit`] would let a request through now, without taking a probe
    /// slot: the batcher's callers ask this, the batch itself is admitted when it is sent.
    pub fn check(&self) -> Result<(), Refusal> {
        let now = Instant::now();
        let inner = self.lock();
        if let Some(until) = inner.cool_until
            && now < until
        {
            return Err(Refusal::CoolingDown(until - now));
        }
        match inner.state {
            State::Open { until, .. } if now < until || self.probed => Err(Refusal::CircuitOpen),
            State::HalfOpen { probes_in_flight }
                if probes_in_flight >= self.config.half_open_max_calls =>
            {
                Err(Refusal::CircuitOpen)
            }
            State::Closed { .. } | State::Open { .. } | State::HalfOpen { .. } => Ok(()),
        }
    }

    /// Keeps the provider aside until `until` (a 429's `Retry-After`).
    pub fn cool_down(&self, until: Instant) {
        let mut inner = self.lock();
        if inner.cool_until.is_none_or(|u| u < until) {
            inner.cool_until = Some(until);
        }
    }

    /// The provider asked to be left alone until `until` (a 429 or 503 with `Retry-After`).
    /// The first such answer since its last success moves only its own request on: one
    /// caller's quota (per key, per model) should not sideline the provider for everyone. A
    /// second before a success means it keeps saying so: then it is kept aside until `until`.
    pub fn asked_to_wait(&self, until: Instant) {
        let again = std::mem::replace(&mut self.lock().asked, true);
        if again {
            self.cool_down(until);
        }
    }

    /// A health probe succeeded: a circuit open for its recovery time closes — the probe
    /// is the half-open try, in place of a caller's request. (A cool-down asked for by the
    /// provider still runs: its quota is not its health.)
    pub fn probe_passed(&self) {
        let mut inner = self.lock();
        if matches!(inner.state, State::Open { until, .. } if Instant::now() >= until) {
            inner.state = State::Closed { failures: 0 };
        }
    }

    /// Closes the circuit and ends any cool-down: an operator's `reset_circuit`.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.state = State::Closed { failures: 0 };
        inner.cool_until = None;
        inner.asked = false;
    }

    pub fn circuit(&self) -> Circuit {
        match self.lock().state {
            State::Closed { .. } => Circuit::Closed,
            State::Open { until, .. } if Instant::now() < until || self.probed => Circuit::Open,
            State::Open { .. } | State::HalfOpen { .. } => Circuit::HalfOpen,
        }
    }

    /// Time left of a cool-down, zero when none.
    pub fn cooling_down_for(&self) -> Duration {
        self.lock()
            .cool_until
            .map(|u| u.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// A request already judged a success failed afterwards (a stream that broke after its
    /// first text): one more failure toward opening the circuit.
    pub fn failed_later(&self) {
        self.record(false, Some(false));
    }

    fn record(&self, probe: bool, outcome: Option<bool>) {
        let mut inner = self.lock();
        let open = State::Open {
            until: Instant::now() + self.config.recovery_timeout,
            reported: false,
        };
        inner.state = match (&inner.state, outcome) {
            // A probe that never finished: free its slot, judge nothing.
            (State::HalfOpen { probes_in_flight }, None) if probe => State::HalfOpen {
                probes_in_flight: probes_in_flight.saturating_sub(1),
            },
            (_, None) => return,
            (_, Some(true)) => {
                inner.asked = false;
                State::Closed { failures: 0 }
            }
            (State::Closed { failures }, Some(false)) => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    open
                } else {
                    State::Closed { failures }
                }
            }
            (State::HalfOpen { .. }, Some(false)) => open,
            // A request admitted before the circuit opened: it is open already.
            (State::Open { until, reported }, Some(false)) => State::Open {
                until: *until,
                reported: *reported,
            },
        };
    }
}

/// How the fleet ([`crate::fleet`]) shares a circuit.
impl Breaker {
    /// Time left open when this router opened it itself (not on another's report); while
    /// open here, at least a share interval twice over: a circuit kept open past its
    /// recovery time (health-checked, see [`Breaker::probe_passed`]) stays open elsewhere.
    pub fn open_here(&self) -> Option<Duration> {
        match self.lock().state {
            State::Open {
                until,
                reported: false,
            } => {
                let left = until.saturating_duration_since(Instant::now());
                (!left.is_zero() || self.probed).then(|| left.max(Duration::from_secs(1)))
            }
            _ => None,
        }
    }

    /// Another router opened it for `left`: opens it here too if it is closed; says whether
    /// it did.
    pub fn opened_elsewhere(&self, left: Duration) -> bool {
        let mut inner = self.lock();
        if !matches!(inner.state, State::Closed { .. }) {
            return false;
        }
        inner.state = State::Open {
            until: Instant::now() + left,
            reported: true,
        };
        true
    }
}

/// Permission to send one request; resolve it with [`Pass::success`] or [`Pass::failure`].
#[must_use]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    probe: bool,
    resolved: bool,
}

impl Pass<'_> {
    pub fn success(mut self) {
        self.resolved = true;
        self.breaker.record(self.probe, Some(true));
    }

    pub fn failure(mut self) {
        self.resolved = true;
        self.breaker.record(self.probe, Some(false));
    }

    /// The outcome says nothing about the provider's health (e.g. a 400 for a bad prompt).
    pub fn neutral(self) {}
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.resolved {
            self.breaker.record(self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(
            BreakerConfig {
                failure_threshold: 3,
                recovery_timeout: Duration::from_secs(10),
                half_open_max_calls: 1,
            },
            false,
        )
    }

    fn fail(b: &Breaker, n: u32) {
        for _ in 0..n {
            if let Ok(p) = b.admit() {
                p.failure();
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_failures() {
        let b = breaker();
        fail(&b, 2);
        assert!(b.admit().is_ok_and(|p| {
            p.success();
            true
        }));
        fail(&b, 2);
        assert_eq!(b.circuit(), Circuit::Closed, "a success resets the count");
        fail(&b, 1);
        assert_eq!(b.circuit(), Circuit::Open);
        assert_eq!(b.admit().err(), Some(Refusal::CircuitOpen));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_limited_probes_and_closes_on_success() {
        let b = breaker();
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(b.admit().err(), Some(Refusal::CircuitOpen));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.circuit(), Circuit::HalfOpen);
        let probe = b.admit();
        assert!(probe.is_ok());
        assert_eq!(
            b.admit().err(),
            Some(Refusal::CircuitOpen),
            "one probe at a time"
        );
        if let Ok(p) = probe {
            p.success();
        }
        assert_eq!(b.circuit(), Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_and_dropped_probe_frees_its_slot() {
        let b = breaker();
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(b.admit());
        assert_eq!(b.circuit(), Circuit::HalfOpen);
        fail(&b, 1);
        assert_eq!(b.circuit(), Circuit::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn cool_down_refuses_until_it_ends() {
        let b = breaker();
        b.cool_down(Instant::now() + Duration::from_secs(2));
        assert!(matches!(b.admit().err(), Some(Refusal::CoolingDown(_))));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.admit().is_ok());
        assert_eq!(b.cooling_down_for(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn with_health_checks_no_caller_is_the_probe() {
        let b = Breaker::new(
            BreakerConfig {
                failure_threshold: 1,
                recovery_timeout: Duration::from_secs(10),
                half_open_max_calls: 1,
            },
            true,
        );
        fail(&b, 1);
        b.probe_passed();
        assert_eq!(
            b.circuit(),
            Circuit::Open,
            "a probe within the recovery time"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(b.admit().err(), Some(Refusal::CircuitOpen), "past recovery");
        assert_eq!(b.circuit(), Circuit::Open);
        b.probe_passed();
        assert!(b.admit().is_ok());
        assert_eq!(b.circuit(), Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_closes_the_circuit_and_ends_a_cool_down() {
        let b = breaker();
        fail(&b, 3);
        b.cool_down(Instant::now() + Duration::from_secs(60));
        assert!(b.admit().is_err());
        b.reset();
        assert_eq!(b.circuit(), Circuit::Closed);
        assert!(b.admit().is_ok());
    }
}
