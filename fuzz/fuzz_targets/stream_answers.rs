//! Any streamed body from any provider API, cut into chunks anywhere: text, then exactly one
//! end (the API's end or an error) and nothing after — never a panic, never a silent stop.
#![no_main]

use cascade_router::fuzzing::stream_answer;

libfuzzer_sys::fuzz_target!(|input: (u8, Vec<Vec<u8>>)| {
    let (api, chunks) = input;
    assert!(stream_answer(api, chunks));
});
