//! Token usage as providers report it: believed only within bounds ([`Tokens`]), and a
//! batch's total shared over its answers ([`apportion`]) so their costs add up to it exactly.

use serde::Deserialize;

use super::ProviderError;
use crate::completion::{Completion, Usage};

/// The most tokens one answer is believed to have used: above any model's window today.
const MAX_TOKENS: u32 = 10_000_000;

/// A token count as a provider reports it: any JSON number, believed only when it is a whole
/// number within 0..=[`MAX_TOKENS`] — otherwise clamped there, and marked.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(from = "serde_json::Number")]
pub struct Tokens {
    n: u32,
    clamped: bool,
}

impl From<serde_json::Number> for Tokens {
    fn from(n: serde_json::Number) -> Tokens {
        if let Some(v) = n.as_u64().filter(|v| *v <= u64::from(MAX_TOKENS)) {
            return Tokens {
                n: u32::try_from(v).unwrap_or(MAX_TOKENS),
                clamped: false,
            };
        }
        let v = n.as_f64().filter(|v| !v.is_nan()).unwrap_or(0.0);
        Tokens {
            n: v.clamp(0.0, f64::from(MAX_TOKENS)) as u32,
            clamped: true,
        }
    }
}

/// Usage from a provider's two counts.
pub fn reported(prompt: Tokens, completion: Tokens) -> Usage {
    Usage {
        prompt_tokens: prompt.n,
        completion_tokens: completion.n,
        apportioned: false,
        clamped: prompt.clamped || completion.clamped,
    }
}

/// Shares a batch's `total` over its answers — prompt tokens by each prompt's bytes
/// (`prompt_bytes`), completion tokens by each answer's bytes, the remainders to the largest
/// fractions (Hamilton's method) — so that the answers' usage adds up to the batch's exactly.
/// A failed answer gets no share. Each share is marked apportioned.
pub fn apportion(
    total: Usage,
    prompt_bytes: &[usize],
    answers: &mut [Result<Completion, ProviderError>],
) {
    let ok = |i: usize| answers.get(i).is_some_and(Result::is_ok);
    let prompts: Vec<u64> = (0..answers.len())
        .map(|i| {
            if ok(i) {
                prompt_bytes.get(i).copied().unwrap_or(0) as u64
            } else {
                0
            }
        })
        .collect();
    let outs: Vec<u64> = answers
        .iter()
        .map(|a| a.as_ref().map_or(0, |c| c.text.len().max(1) as u64))
        .collect();
    let p = shares(total.prompt_tokens, &prompts);
    let c = shares(total.completion_tokens, &outs);
    for (i, answer) in answers.iter_mut().enumerate() {
        if let Ok(completion) = answer {
            completion.usage = Some(Usage {
                prompt_tokens: p[i],
                completion_tokens: c[i],
                apportioned: true,
                clamped: total.clamped,
            });
        }
    }
}

/// `total` split in proportion to `weights` (equally when they are all zero), in whole
/// parts that add up to it.
fn shares(total: u32, weights: &[u64]) -> Vec<u32> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let sum: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    let weight = |i: usize| if sum == 0 { 1 } else { u128::from(weights[i]) };
    let whole = if sum == 0 { n as u128 } else { sum };
    let total = u128::from(total);
    let mut parts: Vec<(u128, u128, usize)> = (0..n)
        .map(|i| {
            let exact = total * weight(i);
            (exact / whole, exact % whole, i)
        })
        .collect();
    let given: u128 = parts.iter().map(|p| p.0).sum();
    let mut left = total - given;
    parts.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    for p in parts.iter_mut() {
        if left == 0 {
            break;
        }
        if sum == 0 || weights[p.2] > 0 {
            p.0 += 1;
            left -= 1;
        }
    }
    let mut out = vec![0u32; n];
    for (part, _, i) in parts {
        out[i] = u32::try_from(part).unwrap_or(u32::MAX);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_follow_the_weights() {
        assert_eq!(shares(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(shares(10, &[0, 3, 1]), vec![0, 8, 2]);
        assert_eq!(shares(7, &[0, 0]), vec![4, 3]);
        assert_eq!(shares(0, &[5, 5]), vec![0, 0]);
        let s = shares(1_000_003, &[17, 1, 999, 4]);
        assert_eq!(s.iter().map(|v| u64::from(*v)).sum::<u64>(), 1_000_003);
    }

    #[test]
    fn counts_out_of_range_are_clamped_and_marked() {
        let t = |json: &str| serde_json::from_str::<Tokens>(json).unwrap();
        assert_eq!((t("12").n, t("12").clamped), (12, false));
        assert_eq!((t("-5").n, t("-5").clamped), (0, true));
        assert_eq!((t("1e12").n, t("1e12").clamped), (MAX_TOKENS, true));
        assert_eq!((t("3.5").n, t("3.5").clamped), (3, true));
    }
}
