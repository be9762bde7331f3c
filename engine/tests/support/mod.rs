//! What the engine's integration tests share: their sizes under Miri.

#![allow(dead_code)] // each test file uses its part

use proptest::test_runner::Config;

/// How many rounds, threads or blocks a test uses: `n`, or `under_miri` when
/// it runs under Miri, which interprets every step (a few thousand times
/// slower) and checks each for undefined behaviour.
pub const fn iterations(n: usize, under_miri: usize) -> usize {
    if cfg!(miri) {
        under_miri
    } else {
        n
    }
}

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
