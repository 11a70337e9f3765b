//! The client's threads, each born with the job-control signals blocked.
//!
//! In the line editor one thread takes SIGTSTP (the input thread, so that the editor's own
//! Ctrl+Z stops the process before its `kill` returns) and one takes SIGCONT (the resume
//! thread, so that a continue is answered before anything else is read): see
//! `chat::suspend`. A thread inherits the signal mask of the one that starts it, and blocking
//! the two in the main thread as the chat starts does not reach threads started before (the
//! resolver's, the stderr writer's at the handshake's first log line), nor those a thread
//! that takes one of them starts later. Any of those took the editor's Ctrl+Z as often as not,
//! and `kill` returned to the editor, which took its raw mode again, before the process
//! stopped. So every thread starts here, with both blocked from its first instruction; the
//! input and resume threads then unblock their own.

use std::io;
use std::thread::{self, JoinHandle};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Starts `run` on a new thread named `name`, with SIGTSTP and SIGCONT blocked in it
/// whatever the calling thread's mask (see the module docs); the caller's mask is put back.
pub fn spawn<F, T>(name: &str, run: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = thread::Builder::new().name(name.to_owned());
    let mut job_control = SigSet::empty();
    job_control.add(Signal::SIGTSTP);
    job_control.add(Signal::SIGCONT);
    // A signal that comes to this thread meanwhile waits, pending, until the mask is put back.
    // (pthread_sigmask fails only for arguments that are not valid, and these are. Nothing
    // is logged here: the thread started may be the stderr writer, which a log line starts.)
    let before = job_control.thread_swap_mask(SigmaskHow::SIG_BLOCK).ok();
    let spawned = builder.spawn(run);
    if let Some(before) = before {
        let _ = before.thread_set_mask();
    }
    spawned
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `signal` is blocked in the calling thread.
    fn blocked_here(signal: Signal) -> bool {
        SigSet::thread_get_mask()
            .expect("the thread's mask")
            .contains(signal)
    }

    /// A thread started from one that takes both signals has both blocked, and the starting
    /// thread still takes them; one started from a thread that blocks them, too.
    #[test]
    fn threads_start_with_job_control_blocked_and_leave_the_callers_mask_alone() {
        let caller = thread::spawn(|| {
            let mut open = SigSet::empty();
            open.add(Signal::SIGTSTP);
            open.add(Signal::SIGCONT);
            open.thread_unblock().expect("unblock");
            let child = spawn("child", || {
                (blocked_here(Signal::SIGTSTP), blocked_here(Signal::SIGCONT))
            })
            .expect("spawn")
            .join()
            .expect("join");
            let after = (blocked_here(Signal::SIGTSTP), blocked_here(Signal::SIGCONT));
            (child, after)
        });
        let (child, after) = caller.join().expect("join");
        assert_eq!(child, (true, true), "the new thread's mask");
        assert_eq!(after, (false, false), "the caller's mask, put back");
    }
}
