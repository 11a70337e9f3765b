//! A chat continued in the background: each end signal noted at once as it comes, and a
//! call on the terminal from there (SIGTTIN, SIGTTOU) that waits, running, for the end or the
//! foreground rather than stop the process again, so that a shell's `kill %1` on a stopped
//! chat always ends it with its `__LEAVE__`.

use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::time::Duration;

use log::debug;
use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::orphaned;

/// Set by the end signals' own handler ([`watch_for_the_end`]), at once, for
/// [`super::on_sigtstp`] and [`super::resume::on_resume`] to read: the watching thread may
/// run only later.
pub(super) static ENDING: AtomicBool = AtomicBool::new(false);

/// The signals that end the chat (the signal watcher's, in `chat::mod`).
const END_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Notes each end signal in [`ENDING`] as it comes, beside the chat's own watcher, and
/// makes a call on the terminal from the background wait for the end or the foreground
/// ([`wait_for_the_end_or_the_foreground`]). Called by the main thread before the editor
/// starts.
pub(in crate::chat) fn watch_for_the_end() {
    wait_for_the_end_or_the_foreground();
    make_the_continuer();
    for signal in END_SIGNALS {
        // SAFETY: the action stores to an atomic and calls timer_settime: async-signal-safe.
        let registered = unsafe { signal_hook::low_level::register(signal, on_end_signal) };
        if let Err(e) = registered {
            debug!("cannot watch signal {signal} for the end of the chat: {e}");
        }
    }
}

/// Makes a thread that touches the terminal from the background (SIGTTIN for a read,
/// SIGTTOU for a mode set) wait for the end or the foreground
/// ([`on_terminal_from_the_background`]) rather than stop the process, as the default
/// actions do.
///
/// A shell's `kill %1` on a stopped chat sends SIGTERM, then SIGCONT, and every thread comes
/// back from the stop at once. The input thread, stopped inside a call on the terminal (the
/// editor's read begun in the background, or a mode set) restarts it, still in the
/// background, while the end signal's handler may not have run yet, on
/// whichever thread took it: with the default actions the restarted call stopped the whole
/// chat again, before its `__LEAVE__`, until `fg` (the server test
/// `client_terminal::waiting_in_the_background_after_a_sigstop_and_killed_it_draws_nothing_and_exits`).
fn wait_for_the_end_or_the_foreground() {
    // Held back while the handler runs, which makes no call on the terminal itself: a stop
    // (`kill -TSTP`) is not made inside the wait, by a handler of its own, but by the wait's
    // caller once the wait sees it pending (see `super::waiting_in_the_background`).
    let mut held = SigSet::empty();
    for signal in [Signal::SIGTTIN, Signal::SIGTTOU, Signal::SIGTSTP] {
        held.add(signal);
    }
    let action = SigAction::new(
        SigHandler::Handler(on_terminal_from_the_background),
        SaFlags::SA_RESTART,
        held,
    );
    for signal in [Signal::SIGTTIN, Signal::SIGTTOU] {
        // SAFETY: the handler does only what is async-signal-safe (pthread_sigmask,
        // sigpending, sigismember, poll, pause, clock_gettime, tcgetpgrp, getpgrp, getpid,
        // getppid, getsid, sigaction, kill, and those of `super::stop_as_asked`; errno saved
        // and put back).
        if let Err(e) = unsafe { signal::sigaction(signal, &action) } {
            debug!("cannot wait for the end or the foreground in the background: {e}");
        }
    }
}

/// A call on the terminal from the background (the kernel sends SIGTTIN or SIGTTOU, and
/// restarts the call after this handler): waits, running, until the chat is told to end (and
/// lets the end through, so that the call restarted goes through or fails), is brought to the
/// foreground (the call goes through), or its process group is orphaned ([`orphaned`]: the
/// call restarted fails, and no shell could bring it back); see [`wait_in_the_background`].
/// Only the input thread takes these signals (`threads::keep_terminal_signals_to_their_threads`;
/// a stderr writer started before may too).
///
/// It used to stop the process once no end had come within 200 ms, as the default action
/// does at once; a shell's `kill %1` (SIGTERM, then SIGCONT) that came between that
/// decision and the SIGSTOP left the chat stopped for good: the kernel took the SIGTERM first
/// (setting up its handler on the way out of `tgkill`), then the SIGSTOP, before the handler
/// ran, and the SIGCONT had come already. No stop made from the background can close that
/// window, so none is made.
extern "C" fn on_terminal_from_the_background(_: libc::c_int) {
    let errno = Errno::last_raw();
    if above_an_end_signals_handler() {
        // The end's handler runs once this one returns; the call, made again after it,
        // comes back here and finds the end.
        Errno::set_raw(errno);
        return;
    }
    // A call let through for an orphaned group came back here: the kernel, which fails such
    // a call in an orphaned group and sends this signal only otherwise, says the group is not
    // orphaned (see `orphaned`). Wait as for any other, from then on.
    let refuted = LET_THROUGH_ORPHANED.load(Ordering::SeqCst);
    let let_through = || {
        if refuted || !orphaned() {
            return false;
        }
        LET_THROUGH_ORPHANED.store(true, Ordering::SeqCst);
        true
    };
    let brought_back = || !super::in_background();
    // A stop is the editor's thread's to make, as it alone takes SIGTSTP: another thread
    // waiting here (a stderr writer started before the chat) making one too would change
    // the process's SIGTSTP action under the first.
    let stop_asked = || super::on_the_editors_thread() && a_stop_asked();
    let waited = super::waiting_in_the_background(|| {
        wait_in_the_background(brought_back, stop_asked, let_through, sleep_a_step)
    });
    match waited {
        Waited::Foreground => super::foreground_regained(),
        Waited::Ended => {
            // The editor's read, let through by the end, would fail and the editor set a
            // mode, perhaps after the terminal guard's: its thread parks here. Another
            // thread (a stderr writer started before the chat) goes on, its call let through.
            super::park_the_editor_at_the_end();
            let_the_end_through();
        }
        Waited::LetThrough | Waited::StopAsked => {}
    }
    Errno::set_raw(errno);
}

/// How a wait of [`wait_in_the_background`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waited {
    /// The chat was told to end.
    Ended,
    /// The terminal is ours again: a shell's `fg`.
    Foreground,
    /// Let go on without the foreground (an orphaned process group).
    LetThrough,
    /// A stop was asked from elsewhere (`kill -TSTP`), held back by the handler that waits:
    /// the caller makes it ([`a_stop_asked`]).
    StopAsked,
}

/// Waits, running, until the chat is told to end ([`ending`]; the caller decides what then),
/// `brought_back` says the terminal is ours again (a shell's `fg`, which sends no SIGCONT to
/// a job that runs: bash's does not), `stop_asked` says a stop waits to be made, or
/// `let_through` says to go on without the foreground; looks every
/// [`QUICK_STEP`] for the first [`QUICK_WAIT`] (the SIGTERM of a `kill %1`, handled on
/// another thread, is seen within a step of its SIGCONT), then every [`STEP`]. `pause`
/// sleeps a step ([`sleep_a_step`]); a signal may cut it short. Async-signal-safe, given arguments that are.
pub(super) fn wait_in_the_background(
    brought_back: impl Fn() -> bool,
    stop_asked: impl Fn() -> bool,
    let_through: impl Fn() -> bool,
    pause: impl Fn(Duration),
) -> Waited {
    let mut steps = 0u32;
    loop {
        if ending() {
            return Waited::Ended;
        }
        if brought_back() {
            return Waited::Foreground;
        }
        if stop_asked() {
            return Waited::StopAsked;
        }
        if let_through() {
            return Waited::LetThrough;
        }
        let quick = QUICK_STEP * steps < QUICK_WAIT;
        pause(if quick { QUICK_STEP } else { STEP });
        steps = steps.saturating_add(1);
    }
}

/// Whether a SIGTSTP is pending for the calling thread, which blocks it: a `kill -TSTP` to
/// the process while the editor's thread, the only one that takes that signal, runs a handler
/// that holds it back (the SIGTSTP handler itself, or the one for SIGTTIN and SIGTTOU). Left
/// there, it would stop the chat only once the handler returns, after `fg`: the shell would
/// show the job running, and `fg` stop it at once. Async-signal-safe.
pub(super) fn a_stop_asked() -> bool {
    let mut pending = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending fills the set it is given; sigismember reads it.
    unsafe {
        libc::sigpending(pending.as_mut_ptr()) == 0
            && libc::sigismember(pending.as_ptr(), libc::SIGTSTP) == 1
    }
}

/// Sleeps `step` (less if a signal comes): `poll` with no descriptor, a sleep that is
/// async-signal-safe.
pub(super) fn sleep_a_step(step: Duration) {
    let millis = libc::c_int::try_from(step.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll with no descriptors reads none.
    unsafe { libc::poll(std::ptr::null_mut(), 0, millis) };
}

/// How long [`wait_in_the_background`] looks every [`QUICK_STEP`].
pub(super) const QUICK_WAIT: Duration = Duration::from_millis(200);

/// The steps of [`wait_in_the_background`] at first.
pub(super) const QUICK_STEP: Duration = Duration::from_millis(5);

/// The steps of [`wait_in_the_background`] after [`QUICK_WAIT`]: a `fg` is seen within this.
pub(super) const STEP: Duration = Duration::from_millis(50);

/// Whether [`on_terminal_from_the_background`] let a call through because the process group
/// looked orphaned. A call on the terminal from the background after that (the kernel sends
/// the signal only to a group that is not orphaned, and a group once orphaned stays so) proves
/// [`orphaned`] wrong for good.
static LET_THROUGH_ORPHANED: AtomicBool = AtomicBool::new(false);

/// An end signal's first action, before the signal watcher's thread hears of it: notes it,
/// and has any stop from then on undone ([`start_the_continuer`]). The calls on the terminal
/// waiting in the background ([`on_terminal_from_the_background`]) see the end within a step
/// and are let through there, the editor's thread parked; one made from then on comes back
/// to that handler (SIGTTIN and SIGTTOU are not ignored here) and parks there too. Ignored
/// here, a read of the editor's thread, restarted after this handler, failed instead, and
/// the editor set its mode on the way out, perhaps after the terminal guard's.
fn on_end_signal() {
    ENDING.store(true, Ordering::SeqCst);
    start_the_continuer();
}

/// Whether the calling thread runs a handler stacked above an end signal's own, which has not
/// run yet: an end signal is blocked in its mask, as only inside that signal's handler it is
/// (no thread of the chat blocks one otherwise). A call on the terminal from the background
/// that an end signal interrupts has the kernel deliver both signals at once, the end
/// signal's handler set up first and SIGTTIN's above it, to run first: waiting there for the
/// end, it waited for ever on a handler that could only run after it (seen: the input thread
/// in `poll` with SIGTERM, SIGTTIN, SIGTTOU and SIGTSTP in its mask, nothing pending).
/// Async-signal-safe (pthread_sigmask, sigismember).
pub(super) fn above_an_end_signals_handler() -> bool {
    let mut mask = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: with a null set pthread_sigmask only fills `mask`; sigismember reads it.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, ptr::null(), mask.as_mut_ptr()) == 0
            && END_SIGNALS
                .iter()
                .any(|&signal| libc::sigismember(mask.as_ptr(), signal) == 1)
    }
}

/// The timer that continues the process every [`CONTINUE_EVERY`] once an end signal has come
/// ([`start_the_continuer`]), once [`CONTINUER_MADE`] says [`make_the_continuer`] made it.
/// (Null is a timer like any other: glibc gives the kernel's number, 0 for the first.)
static CONTINUER: AtomicPtr<libc::c_void> = AtomicPtr::new(ptr::null_mut());

/// Whether [`CONTINUER`] holds a timer.
static CONTINUER_MADE: AtomicBool = AtomicBool::new(false);

/// How often the process is continued once an end signal has come: a stop made after it
/// lasts no longer than this.
pub(super) const CONTINUE_EVERY: Duration = Duration::from_millis(20);

/// Makes the timer of [`start_the_continuer`], unarmed: a POSIX timer that sends the process
/// SIGCONT. Made before the chat's threads start, as `timer_create` may not be called from a
/// signal handler.
fn make_the_continuer() {
    // SAFETY: an all-zero sigevent is a valid one (no value, no thread), filled in below.
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = libc::SIGEV_SIGNAL;
    event.sigev_signo = libc::SIGCONT;
    let mut timer: libc::timer_t = ptr::null_mut();
    // SAFETY: timer_create reads the sigevent and fills `timer` when it returns 0.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } == 0 {
        CONTINUER.store(timer, Ordering::SeqCst);
        CONTINUER_MADE.store(true, Ordering::SeqCst);
    } else {
        debug!(
            "cannot make the timer that undoes a stop once the chat ends: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// From the first end signal on, continues the process every [`CONTINUE_EVERY`] until it
/// exits (SIGCONT, which the resume thread answers with nothing once the end has come), so
/// that no stop keeps a chat told to end from its `__LEAVE__` and its exit.
///
/// The one stop the chat makes itself, on Ctrl+Z, is decided on a look at [`ending`], and
/// made a few instructions later (`on_sigtstp`'s `stop`): an end signal handled in between,
/// on another thread, still finds the process stopped with it; and a SIGTERM still pending
/// when the stop's SIGTSTP is unblocked is handled first, and the stop made all the same.
/// None of the chat's threads can continue a process they all stopped with; only the kernel
/// can, and this timer asks it to. A SIGCONT to a process that runs wakes the resume thread,
/// and discards any stop signal pending. A best effort: the timer is armed again only when
/// its signal is taken, and a stop made while one waits to be taken discards it, so the stop
/// looks at the end once more just before it is made (`stop` in `suspend`).
/// Async-signal-safe (`timer_settime`).
fn start_the_continuer() {
    if !CONTINUER_MADE.load(Ordering::SeqCst) {
        return;
    }
    let timer = CONTINUER.load(Ordering::SeqCst);
    let every = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::c_long::try_from(CONTINUE_EVERY.as_nanos()).unwrap_or(20_000_000),
    };
    let schedule = libc::itimerspec {
        it_interval: every,
        it_value: every,
    };
    // SAFETY: a timer made by make_the_continuer and never deleted; timer_settime reads the
    // schedule and, with a null old value, writes nothing.
    unsafe { libc::timer_settime(timer, 0, &schedule, ptr::null_mut()) };
}

/// Whether the chat has been told to end: an end signal handled ([`ENDING`], set by the
/// signal's handler on whichever thread took it: this one too, between two steps of a
/// wait, when the signal cuts a step's sleep short), or one pending and blocked in the
/// calling thread (`sigpending` tells only of those: an end signal the resume thread's
/// SIGCONT came with is pending there until a thread takes it, and no chat thread blocks
/// the end signals but inside their own handler). Async-signal-safe.
pub(super) fn ending() -> bool {
    if ENDING.load(Ordering::SeqCst) {
        return true;
    }
    let mut pending = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending fills the set it is given; sigismember reads it.
    unsafe {
        libc::sigpending(pending.as_mut_ptr()) == 0
            && END_SIGNALS
                .iter()
                .any(|&signal| libc::sigismember(pending.as_ptr(), signal) == 1)
    }
}

/// Lets the end go through from the background, once the editor's thread is parked (or for
/// a thread that is not the editor's, which took a SIGTTIN or SIGTTOU: a stderr writer
/// started before the chat): with SIGTTOU ignored a mode set goes through, with SIGTTIN
/// ignored a read fails (`EIO`). Not at the end signal itself: the editor's read, failing
/// there, had the editor set its mode on the way out, perhaps after the terminal guard's;
/// coming back to the handler instead, its thread parks. Async-signal-safe.
pub(super) fn let_the_end_through() {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGTTOU, Signal::SIGTTIN] {
        // SAFETY: sigaction is async-signal-safe; the handler replaced,
        // `on_terminal_from_the_background`, is one no end needs any more.
        let _ = unsafe { signal::sigaction(signal, &ignore) };
    }
}
