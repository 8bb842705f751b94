//! What an answer cost: its tokens at its model's `price` (`models[].price`), exact to the
//! billionth of a dollar — from the provider's usage, or, where it gave none, an estimate
//! (about 4 bytes a token, in and out) marked as such. A model without a price is free.

use crate::{
    completion::{Completion, CompletionRequest, Cost},
    config::Price,
};

/// The cost of `completion`, answered for `request` by a model priced `price`.
pub fn of(price: Option<Price>, request: &CompletionRequest, completion: &Completion) -> Cost {
    let Some(price) = price else {
        return Cost::default();
    };
    match completion.usage {
        Some(u) => Cost {
            nanos: price.nanos(u64::from(u.prompt_tokens), u64::from(u.completion_tokens)),
            estimated: false,
        },
        None => {
            let tokens = |bytes: usize| u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX);
            Cost {
                nanos: price.nanos(
                    tokens(request.input.text_len()),
                    tokens(completion.text.len()),
                ),
                estimated: true,
            }
        }
    }
}
