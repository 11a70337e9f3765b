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
