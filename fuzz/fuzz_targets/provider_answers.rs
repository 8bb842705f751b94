//! Any HTTP answer (status, Retry-After, body) from any provider API: a completion, one
//! result per prompt for a batch, or a clean error — never a panic.
#![no_main]

use cascade_router::fuzzing::{anthropic_answer, ollama_answer, openai_answer};

libfuzzer_sys::fuzz_target!(|input: (u8, u8, u16, &[u8], &[u8])| {
    let (which, prompts, status, retry_after, body) = input;
    let chat = which & 1 == 1;
    match which % 3 {
        0 => {
            let prompts = usize::from(prompts % 16).max(1);
            if let Some(n) = openai_answer(chat, prompts, status, retry_after, body) {
                assert_eq!(n, if chat { 1 } else { prompts });
            }
        }
        1 => {
            ollama_answer(chat, status, retry_after, body);
        }
        _ => {
            anthropic_answer(status, retry_after, body);
        }
    }
});
