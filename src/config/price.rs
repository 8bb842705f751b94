//! `models[].price` — what a model costs, in USD per million tokens in and out (the Python
//! router's `cost_per_1k_input_tokens` / `cost_per_1k_output_tokens` read as the same).

use super::{Check, ConfigError, raw::RawModelEntry};

/// A model's price, exact: billionths of a dollar per token (USD per million tokens × 1000),
/// so that a cost is a whole number of them and sums without rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    pub input_nanos_per_token: u64,
    pub output_nanos_per_token: u64,
}

/// The most a million tokens may cost: well above any model sold today ($600 at most), so
/// a price in the wrong unit (per token, per thousand) is caught at load.
const MAX_PER_MILLION: f64 = 10_000.0;

impl Price {
    /// Billionths of a dollar for `input` and `output` tokens.
    pub fn nanos(&self, input: u64, output: u64) -> u64 {
        input
            .saturating_mul(self.input_nanos_per_token)
            .saturating_add(output.saturating_mul(self.output_nanos_per_token))
    }

    /// USD per million tokens in and out, for display.
    pub fn per_million(&self) -> (f64, f64) {
        (
            self.input_nanos_per_token as f64 / 1000.0,
            self.output_nanos_per_token as f64 / 1000.0,
        )
    }
}

impl Check<'_> {
    /// The price of model entry `e` at `at`, `None` when it gives none (a free model).
    pub(super) fn price(&self, at: &str, e: &RawModelEntry) -> Result<Option<Price>, ConfigError> {
        // (key, value as written, its unit in USD per million tokens)
        let ours = e.price.as_ref().map(|p| {
            (
                ("price.input_per_million", Some(p.input_per_million), 1.0),
                ("price.output_per_million", Some(p.output_per_million), 1.0),
            )
        });
        let python = match (e.cost_per_1k_input_tokens, e.cost_per_1k_output_tokens) {
            (None, None) => None,
            (i, o) => Some((
                ("cost_per_1k_input_tokens", i, 1000.0),
                ("cost_per_1k_output_tokens", o, 1000.0),
            )),
        };
        let (input, output) = match (ours, python) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    format!("{at}.price"),
                    "set beside cost_per_1k_input_tokens / cost_per_1k_output_tokens",
                    "give the price once: price: {input_per_million, output_per_million}",
                ));
            }
            (Some(p), None) | (None, Some(p)) => p,
            (None, None) => return Ok(None),
        };
        let nanos = |(key, v, unit): (&str, Option<f64>, f64)| match v.map(|v| (v, v * unit)) {
            None => Ok(0),
            Some((_, m)) if m.is_finite() && (0.0..=MAX_PER_MILLION).contains(&m) => {
                Ok((m * 1000.0).round() as u64)
            }
            Some((v, _)) => Err(self.err(
                format!("{at}.{key}"),
                format!("{v} is out of range"),
                format!(
                    "give at most ${MAX_PER_MILLION} per million tokens, and not below 0 \
                     (price: {{input_per_million: 0.15, …}}, or cost_per_1k_*: 0.00015); a price \
                     per token is a different unit"
                ),
            )),
        };
        Ok(Some(Price {
            input_nanos_per_token: nanos(input)?,
            output_nanos_per_token: nanos(output)?,
        }))
    }
}
