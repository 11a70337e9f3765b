//! The real `ocm` waiting for a busy real `ocmd`.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A create that a busy server answers after more than the queries' 10 s (durable writes,
/// the password-hashing queue: here the daemon is stopped for 12 s) still succeeds: `ocm`
/// waits up to 30 s for a create or join.
#[test]
fn ocm_waits_for_a_busy_server_beyond_ten_seconds() {
    let d = Daemon::start();
    d.signal(libc::SIGSTOP);
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    // The kernel accepts the connection and queues the request; nobody answers it for 12 s,
    // and `ocm` must still be waiting then, without complaint.
    let stopped = Instant::now();
    while stopped.elapsed() < Duration::from_secs(12) {
        let stderr = alice.stderr.lock().unwrap().clone();
        assert!(stderr.is_empty(), "ocm gave up:\n{stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.signal(libc::SIGCONT);
    alice.wait_stderr("* created lobby as alice");
    alice.type_line("/quit");
    assert!(alice.wait().success());
}
