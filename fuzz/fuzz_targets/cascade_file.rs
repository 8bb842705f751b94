//! Any text as a cascade file: it loads or fails with one line, never panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| {
    cascade_router::fuzzing::cascade_file(text);
});
