//! Checks that cannot run on this machine (no IPv6, no raw sockets, a tool not installed):
//! shared by the integration tests and the crate's unit tests (`src/lib.rs` includes this
//! file), so that a skip is never mistaken for a pass.

use std::io::Write;

/// Records that a check could not run here, and why: on stderr, and as a line of the file
/// named by `OCM_SKIPPED_CHECKS`, which `scripts/test` sets and prints at the end of the run.
/// With `OCM_TESTS_REQUIRE_ALL=1`, a skip fails the test instead.
pub fn skipped(why: &str) {
    let thread = std::thread::current();
    let line = format!("{}: {why}", thread.name().unwrap_or("?"));
    if std::env::var_os("OCM_TESTS_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("skipped under OCM_TESTS_REQUIRE_ALL=1: {line}");
    }
    eprintln!("skipped: {line}");
    let Some(path) = std::env::var_os("OCM_SKIPPED_CHECKS") else {
        return;
    };
    // One short append per line, which the kernel writes whole: tests in other processes
    // append to the same file.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = appended {
        eprintln!("cannot record the skip in {path:?}: {e}");
    }
}
