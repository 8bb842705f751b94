//! Any bytes as a `Complete` request off the wire: decoded and validated, or refused.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    cascade_router::fuzzing::complete_request(bytes);
});
