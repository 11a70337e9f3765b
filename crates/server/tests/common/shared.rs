//! Test helpers shared by the integration tests and the crate's unit tests (`src/lib.rs`
//! includes this file): reporting checks that cannot run on this machine (no IPv6, no raw
//! sockets, a tool not installed), so that a skip is never mistaken for a pass; filling a
//! Unix datagram socket's queue, as other services fill systemd's notification socket; and
//! waits that a stop and continue of the test process does not fail.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

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

/// Fills the queue of the Unix datagram socket bound at `path` with `OTHER=1` datagrams, the
/// way other services' messages fill systemd's: until a sender that has sent nothing yet (so
/// whose own send buffer is empty) is refused.
pub fn fill_datagram_queue(path: &Path) {
    loop {
        let other = UnixDatagram::unbound().expect("socket");
        other.set_nonblocking(true).expect("nonblocking");
        let mut sent = 0;
        while other.send_to(b"OTHER=1", path).is_ok() {
            sent += 1;
        }
        if sent == 0 {
            return;
        }
    }
}

/// Runs a call that waits with a timeout (`read`, `recv_from` or `accept` on a socket with
/// one, `epoll_wait` under `mio::Poll::poll`) again when it was interrupted. After the test
/// process is stopped and continued (Ctrl+Z and `fg` on a test run, a debugger, a host that
/// freezes processes), Linux ends such a call with EINTR even where no signal handler is
/// installed (signal(7), "Interruption of system calls and library functions by stop
/// signals"); std tries again only inside `read_exact` and the like. Each try waits the whole
/// timeout again.
pub fn uninterrupted<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            done => return done,
        }
    }
}

/// The result of one step of a wait that a loop with a deadline of its own repeats (a
/// `mio::Poll::poll` with a timeout between two looks at a condition), an interruption
/// taken for a wake-up: the loop looks again, and its deadline holds. ([`uninterrupted`]
/// there waited the whole timeout again at each stop, and under a stop every 30 ms, as
/// `scripts/test-under-stops` makes, a step of 50 ms never ended.)
pub fn woken_or_interrupted(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
        result => result,
    }
}

/// [`uninterrupted`] for a wait whose end is the point (nothing more comes within `wait`):
/// `call` is given what is left of `wait` to wait at most, and made again, with what is
/// left then, when it was interrupted; past `wait` the result is a `TimedOut` error. Each
/// try waiting the whole timeout again, a wait that stops (a stop every 30 ms, as
/// `scripts/test-under-stops` makes) cut shorter than it never ended.
pub fn uninterrupted_within<T>(
    wait: std::time::Duration,
    mut call: impl FnMut(std::time::Duration) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        match call(left) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            done => return done,
        }
    }
}
