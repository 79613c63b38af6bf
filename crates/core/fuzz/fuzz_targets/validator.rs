//! Fuzzes the core: see `harness.rs` (the test command replays the committed corpus through it).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::validator(data));
