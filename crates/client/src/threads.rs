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
//!
//! In the line editor SIGTTIN and SIGTTOU are blocked too, once the chat says so
//! ([`keep_terminal_signals_to_their_threads`]). The kernel sends them to the whole process
//! group when a thread reads the terminal, or sets its mode, from the background, and any
//! thread that does not block them takes them: their handler waits there for `fg` or the end
//! (`chat::suspend`), and the receiver, the printer or the keepalives, taking them, waited
//! with it; and one thread's call, its signal taken by another, left each waiting on the
//! other's behalf. So the input thread alone, which reads the terminal and sets its mode for
//! the editor, takes them ([`take_terminal_signals_here`]); a thread that blocks them writes
//! from the background even under `stty tostop`, and a mode it sets there goes through, so
//! the others that set one (the resume thread, the terminal guard) first wait for the
//! terminal themselves. Without the line editor they keep their default actions in every thread, and
//! `stty tostop` stops a chat that writes from the background, as it stops any program.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// The job-control signals every thread starts with blocked, the last two only once
/// [`TERMINAL_SIGNALS_KEPT`] (see the module docs).
const JOB_CONTROL: [Signal; 4] = [
    Signal::SIGTSTP,
    Signal::SIGCONT,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// Whether the threads started from now on block SIGTTIN and SIGTTOU as well
/// ([`keep_terminal_signals_to_their_threads`]).
static TERMINAL_SIGNALS_KEPT: AtomicBool = AtomicBool::new(false);

/// Makes every thread started from now on block SIGTTIN and SIGTTOU too, for the line
/// editor, whose input thread alone takes them (see the module docs). Threads
/// started before keep them open: the resolver's, gone by then, and the stderr writer's, started
/// by the first log line (`RUST_LOG`), which may then take one and wait in its handler.
pub fn keep_terminal_signals_to_their_threads() {
    TERMINAL_SIGNALS_KEPT.store(true, Ordering::SeqCst);
}

/// Lets the calling thread take SIGTTIN and SIGTTOU, as a thread that reads the terminal or
/// sets its mode must: blocked, a read from the background fails (`EIO`) and a mode set goes
/// through, where it should wait for `fg` (or stop, without the line editor).
pub fn take_terminal_signals_here() {
    let mut terminal = SigSet::empty();
    terminal.add(Signal::SIGTTIN);
    terminal.add(Signal::SIGTTOU);
    // Fails only for arguments that are not valid, and these are.
    let _ = terminal.thread_unblock();
}

/// Starts `run` on a new thread named `name`, with the job-control signals blocked in it
/// whatever the calling thread's mask (see the module docs); the caller's mask is put back.
pub fn spawn<F, T>(name: &str, run: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = thread::Builder::new().name(name.to_owned());
    let kept = if TERMINAL_SIGNALS_KEPT.load(Ordering::SeqCst) {
        4
    } else {
        2
    };
    let mut job_control = SigSet::empty();
    for signal in &JOB_CONTROL[..kept] {
        job_control.add(*signal);
    }
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

    /// A thread started from one that takes the job-control signals has SIGTSTP and SIGCONT
    /// blocked, and SIGTTIN and SIGTTOU as well once the line editor keeps them to their
    /// threads; the starting thread still takes them all. (A process of its own per test,
    /// under nextest: the switch is for the whole process.)
    #[test]
    fn threads_start_with_job_control_blocked_and_leave_the_callers_mask_alone() {
        let caller = thread::spawn(|| {
            let mut open = SigSet::empty();
            for signal in JOB_CONTROL {
                open.add(signal);
            }
            open.thread_unblock().expect("unblock");
            let started = || {
                spawn("child", || JOB_CONTROL.map(blocked_here))
                    .expect("spawn")
                    .join()
                    .expect("join")
            };
            let before = started();
            keep_terminal_signals_to_their_threads();
            let kept = started();
            (before, kept, JOB_CONTROL.map(blocked_here))
        });
        let (before, kept, after) = caller.join().expect("join");
        assert_eq!(before, [true, true, false, false], "the new thread's mask");
        assert_eq!(
            kept, [true; 4],
            "the new thread's mask, terminal signals kept"
        );
        assert_eq!(after, [false; 4], "the caller's mask, put back");
    }
}
