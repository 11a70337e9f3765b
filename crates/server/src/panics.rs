//! What a panic does in `ocmd`: on any of its threads, it ends the process. A thread of its
//! own that died (the journal's writer, the compactor, the password hasher) would leave a
//! daemon that still relays chat but never again acknowledges a create or join, with
//! `/readyz` none the wiser. Ended, it is restarted by systemd (`Restart=on-failure`), and its
//! next start reads what the disk holds, where every acknowledged change is.

use std::io::Write;

/// The exit status after a panic: the one a panic on Rust's main thread gives.
pub const PANIC_STATUS: i32 = 101;

/// Makes a panic on any thread end the process with [`PANIC_STATUS`], after the usual message
/// (the thread's name, the place, and a backtrace when `RUST_BACKTRACE` asks for one) and a
/// line that says why the daemon stops.
pub fn end_the_process_on_any_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let thread = std::thread::current();
        // Best effort: standard error may be gone.
        let _ = writeln!(
            std::io::stderr(),
            "ocmd: stopping (status {PANIC_STATUS}) after a panic on thread {}: a daemon missing \
             one of its threads could not be trusted to go on; the next start reads the state \
             from disk",
            thread.name().unwrap_or("(unnamed)")
        );
        std::process::exit(PANIC_STATUS);
    }));
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;

    /// Set in the child that [`a_panic_on_another_thread_ends_the_process`] starts.
    const CHILD: &str = "OCM_PANICS_TEST_CHILD";

    /// A panic on a thread other than the main one ends the whole process, with status 101
    /// and the thread's name; without the hook, the process lives on with the thread gone.
    /// The test runs itself again as a child, which installs the hook and panics on a thread
    /// named as the journal's writer is.
    #[test]
    fn a_panic_on_another_thread_ends_the_process() {
        if std::env::var_os(CHILD).is_some() {
            end_the_process_on_any_panic();
            let _ = std::thread::Builder::new()
                .name("writer".into())
                .spawn(|| panic!("injected for the test"));
            // Only the hook ends this process: without it, it waits here until killed.
            loop {
                std::thread::park();
            }
        }
        // Standard error to a file: a pipe read only after the exit could fill and hold the
        // child (a long backtrace).
        let stderr_file = tempfile::NamedTempFile::new().expect("a file for standard error");
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                "panics::tests::a_panic_on_another_thread_ends_the_process",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .stdout(Stdio::null())
            .stderr(stderr_file.reopen().expect("the file for standard error"))
            .spawn()
            .expect("the test binary runs");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("the child's status") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the panic did not end the process within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = std::fs::read_to_string(stderr_file.path()).unwrap_or_default();
        assert_eq!(status.code(), Some(PANIC_STATUS), "{stderr}");
        assert!(stderr.contains("injected for the test"), "{stderr}");
        assert!(
            stderr.contains("ocmd: stopping (status 101) after a panic on thread writer"),
            "{stderr}"
        );
    }
}
