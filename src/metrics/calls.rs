//! The calls counter and duration histogram of each method, resolved once per method and
//! gRPC code: `Family::get_or_create` hashes the labels with SipHash and takes the family's
//! lock on every call — about 0.6k instructions of a cache hit's 71k
//! (`benches/callgrind_diff.py`). Hand-written because prometheus-client has no pre-resolved
//! handle; the handles are clones of the family's own metrics, so `/metrics` is unchanged.

use std::sync::{OnceLock, PoisonError, RwLock};

use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};

use super::{CallLabel, MethodLabel, code_name};

type Seconds = Family<MethodLabel, Histogram, fn() -> Histogram>;

/// gRPC's codes, 0 to 16.
const CODES: usize = 17;

/// One method's handles: a counter per code, made on its first call with that code.
struct Method {
    name: &'static str,
    codes: [OnceLock<Counter>; CODES],
    seconds: Histogram,
}

/// The methods seen so far: a handful, so a read lock and a scan.
#[derive(Default)]
pub(super) struct Calls {
    methods: RwLock<Vec<Method>>,
}

impl Calls {
    /// Counts a call of `method` that ended with `code` after `took` seconds.
    pub(super) fn ended(
        &self,
        (calls, seconds): (&Family<CallLabel, Counter>, &Seconds),
        method: &'static str,
        code: tonic::Code,
        took: f64,
    ) {
        let record = |m: &Method| {
            let counter = m.codes[code as usize % CODES].get_or_init(|| {
                let label = CallLabel {
                    method,
                    code: code_name(code),
                };
                calls.get_or_create(&label).clone()
            });
            counter.inc();
            m.seconds.observe(took);
        };
        let methods = self.methods.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = methods.iter().find(|m| m.name == method) {
            record(m);
            return;
        }
        drop(methods);
        let mut methods = self.methods.write().unwrap_or_else(PoisonError::into_inner);
        if !methods.iter().any(|m| m.name == method) {
            methods.push(Method {
                name: method,
                codes: Default::default(),
                seconds: seconds.get_or_create(&MethodLabel { method }).clone(),
            });
        }
        if let Some(m) = methods.iter().find(|m| m.name == method) {
            record(m);
        }
    }
}
