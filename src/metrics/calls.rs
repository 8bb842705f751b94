//! The calls counter and duration histogram of each method, resolved once per method and
//! gRPC code: `Family::get_or_create` hashes the labels with SipHash and takes the family's
//! lock on every call — about 0.6k instructions of a cache hit's 71k
//! (`benches/callgrind_diff.py`). Hand-written because prometheus-client has no pre-resolved
//! handle; the handles are clones of the families' own metrics, so `/metrics` is unchanged.

use std::sync::{OnceLock, PoisonError, RwLock};

use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};

use super::{CallLabel, MethodLabel, code_name};

/// gRPC's codes, 0 to 16.
const CODES: usize = 17;

/// One method's handles: a counter per code, made on its first call with that code.
struct Method {
    name: &'static str,
    codes: [OnceLock<Counter>; CODES],
    seconds: Histogram,
}

pub(super) struct Calls {
    /// The registered families (`cascade_requests_total`, the duration histogram).
    counts: Family<CallLabel, Counter>,
    seconds: Family<MethodLabel, Histogram, fn() -> Histogram>,
    /// The methods seen so far: a handful, so a read lock and a scan.
    methods: RwLock<Vec<Method>>,
}

impl Calls {
    pub(super) fn new(
        counts: Family<CallLabel, Counter>,
        seconds: Family<MethodLabel, Histogram, fn() -> Histogram>,
    ) -> Calls {
        Calls {
            counts,
            seconds,
            methods: RwLock::default(),
        }
    }

    /// Counts a call of `method` that ended with `code` after `took` seconds.
    pub(super) fn ended(&self, method: &'static str, code: tonic::Code, took: f64) {
        let record = |m: &Method| {
            let counter = m.codes[code as usize].get_or_init(|| {
                let label = CallLabel {
                    method,
                    code: code_name(code),
                };
                self.counts.get_or_create(&label).clone()
            });
            counter.inc();
            m.seconds.observe(took);
        };
        let methods = self.methods.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = methods.iter().find(|m| m.name == method) {
            return record(m);
        }
        drop(methods);
        let mut methods = self.methods.write().unwrap_or_else(PoisonError::into_inner);
        let at = match methods.iter().position(|m| m.name == method) {
            Some(at) => at,
            None => {
                methods.push(Method {
                    name: method,
                    codes: Default::default(),
                    seconds: self.seconds.get_or_create(&MethodLabel { method }).clone(),
                });
                methods.len() - 1
            }
        };
        record(&methods[at]);
    }
}
