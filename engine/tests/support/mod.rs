//! What the engine's integration tests share: their sizes under Miri.

#![allow(dead_code)] // each test file uses its part

use proptest::test_runner::Config;

pub use interheap_sync::iterations;

/// A property test's configuration: `cases` cases, or `under_miri` under
/// Miri, with no regression file there (Miri isolates the test from the file
/// system; the regressions recorded in the file run without Miri).
pub fn proptest_config(cases: u32, under_miri: u32) -> Config {
    if cfg!(miri) {
        Config { cases: under_miri, failure_persistence: None, ..Config::default() }
    } else {
        Config::with_cases(cases)
    }
}
