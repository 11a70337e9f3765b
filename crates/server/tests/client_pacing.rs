//! The real `ocm` pacing its own chat under the real `ocmd`'s default chat allowance.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

/// 300 lines piped into `ocm` (three times the daemon's default burst of 100) all reach
/// another member, in order: `ocm` paces its chat instead of having the daemon drop it.
#[test]
fn three_hundred_piped_lines_all_arrive() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    let bob = Ocm::start(&d, &["join", "lobby", "--name", "bob"]);
    bob.wait_stderr("* joined lobby as bob");
    assert_eq!(alice.line(), "* bob joined");
    bob.wait_live();
    let mut stdin = alice.take_stdin();
    let text: String = (1..=300).map(|i| format!("line {i}\n")).collect();
    stdin.write_all(text.as_bytes()).expect("pipe the lines");
    drop(stdin);
    // About 300 / 45 per second after the first 90: some 5 s; a loaded machine gets more.
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 1..=300 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = bob.line_within(left).unwrap_or_else(|| {
            panic!(
                "bob got lines 1 to {} only; his stderr:\n{}",
                i - 1,
                bob.stderr.lock().unwrap()
            )
        });
        assert_eq!(line, format!("alice: line {i}"));
    }
    assert!(alice.wait().success());
    assert!(
        !bob.stderr.lock().unwrap().contains("lost"),
        "{}",
        bob.stderr.lock().unwrap()
    );
}
