//! Any bytes as a request body of the OpenAI-compatible front (chat or completions): read field
//! by field into domain requests, or refused by name — never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: (bool, &[u8])| {
    let (chat, body) = input;
    cascade_router::fuzzing::http_request(chat, body);
});
