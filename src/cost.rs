//! What an answer cost: its tokens at its model's `price` (`models[].price`), exact to the
//! billionth of a dollar — from the provider's usage, or, where it gave none, an estimate
//! (about 4 bytes a token, in and out) marked as such. A model without a price is free.

use crate::{
    completion::{Completion, CompletionRequest, Cost, Usage},
    config::Price,
};

/// The cost of `completion`, answered for `request` by a model priced `price`.
pub fn of(price: Option<Price>, request: &CompletionRequest, completion: &Completion) -> Cost {
    match price {
        Some(price) => priced(price, request, completion.usage, completion.text.len()),
        None => Cost::default(),
    }
}

/// The cost at `price` of an answer to `request` with `usage` (when the provider gave it;
/// else estimated from `out_bytes` of answer).
pub fn priced(
    price: Price,
    request: &CompletionRequest,
    usage: Option<Usage>,
    out_bytes: usize,
) -> Cost {
    match usage {
        // A batch's share of its usage is an estimate for the one answer (the shares add up).
        Some(u) => Cost {
            nanos: price.nanos(u64::from(u.prompt_tokens), u64::from(u.completion_tokens)),
            estimated: u.apportioned,
        },
        None => {
            let tokens = |bytes: usize| u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX);
            Cost {
                nanos: price.nanos(tokens(request.input.text_len()), tokens(out_bytes)),
                estimated: true,
            }
        }
    }
}

/// Tokens a request's images may count for at most (a large image at high detail is
/// about 1,100 at OpenAI and 1,600 at Anthropic).
const IMAGE_TOKENS: u64 = 2_000;
/// Tokens each message's framing may add (role, separators).
const MESSAGE_TOKENS: u64 = 16;

/// The most `request` can cost at `price` — what a paid attempt reserves against its
/// budgets: a token per byte of its text (no tokenizer makes more), its images and
/// messages at their most, its tools' definitions, and `max_tokens` out (or
/// `default_output` when it sets none).
pub fn worst(price: Price, request: &CompletionRequest, default_output: u32) -> u64 {
    let input = &request.input;
    let tools: usize = request
        .params
        .tools
        .iter()
        .map(|t| {
            t.name.len()
                + t.description.as_ref().map_or(0, String::len)
                + t.parameters.as_ref().map_or(0, |p| p.to_string().len())
        })
        .sum();
    let messages = match input {
        crate::completion::Input::Prompt(_) => 1,
        crate::completion::Input::Chat(m) => m.len() as u64,
    };
    let tokens_in = ((input.text_len() + tools) as u64)
        .saturating_add(IMAGE_TOKENS.saturating_mul(input.images().count() as u64))
        .saturating_add(MESSAGE_TOKENS.saturating_mul(messages));
    let out = request.params.max_tokens.unwrap_or(default_output);
    price.nanos(tokens_in, u64::from(out))
}
