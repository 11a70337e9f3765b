//! The end of a chat continued in the background: each end signal noted at once as it comes,
//! and a call on the terminal from the background (SIGTTIN, SIGTTOU) that waits a moment for
//! one before it stops the process again, one stop at a time, so that a shell's `kill %1`
//! on a stopped chat ends it with its `__LEAVE__` rather than stopping it once more.

use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
use std::time::Duration;

use log::debug;
use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::{in_foreground, orphaned};

/// Set by the end signals' own handler ([`watch_for_the_end`]), at once, for
/// [`super::on_sigtstp`] and [`super::resume::on_resume`] to read: the watching thread may
/// run only later.
pub(super) static ENDING: AtomicBool = AtomicBool::new(false);

/// The signals that end the chat (the signal watcher's, in `chat::mod`).
const END_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Notes each end signal in [`ENDING`] as it comes, beside the chat's own watcher, and
/// makes a call on the terminal from the background wait for one before it stops the
/// process ([`stop_from_the_background_only_when_no_end_is_coming`]). Called by the main
/// thread before the editor starts.
pub(in crate::chat) fn watch_for_the_end() {
    stop_from_the_background_only_when_no_end_is_coming();
    make_the_continuer();
    for signal in END_SIGNALS {
        // SAFETY: the action stores to an atomic and calls timer_settime, tcgetpgrp,
        // getpgrp and sigaction: async-signal-safe.
        let registered = unsafe { signal_hook::low_level::register(signal, on_end_signal) };
        if let Err(e) = registered {
            debug!("cannot watch signal {signal} for the end of the chat: {e}");
        }
    }
}

/// Makes a thread that touches the terminal from the background (SIGTTIN for a read,
/// SIGTTOU for a mode set) stop the process only once no end is coming
/// ([`on_terminal_from_the_background`]), rather than at once as the default actions do.
///
/// A shell's `kill %1` on a stopped chat sends SIGTERM, then SIGCONT, and every thread comes
/// back from the stop at once. Those stopped inside a call on the terminal (the editor's
/// read begun in the background, the resume thread's setting of the editor's mode) restart
/// it, still in the background, while the end signal's handler may not have run yet, on
/// whichever thread took it: with the default actions the restarted call stopped the whole
/// chat again, before its `__LEAVE__`, until `fg`: every thread stopped, one in `read` of
/// the terminal, or the resume thread in `tcsetattr`, and the handler half-way on a third
/// (the server test
/// `client_terminal::stopped_again_in_the_background_after_a_sigstop_and_killed_it_draws_nothing_and_exits`).
fn stop_from_the_background_only_when_no_end_is_coming() {
    // Held back while the handler runs, which makes no call on the terminal itself: a
    // second job-control signal taken on the same thread would run the handler again
    // inside it, and could find the stop the outer one is making still unfinished
    // ([`STOPS`] odd) and wait for it for ever.
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
        // SAFETY: the handler does only what is async-signal-safe (sigpending,
        // sigismember, poll, clock_gettime, tcgetpgrp, getpgrp, sigaction, raise; errno
        // saved and put back).
        if let Err(e) = unsafe { signal::sigaction(signal, &action) } {
            debug!("cannot wait for the end before a stop from the background: {e}");
        }
    }
}

/// A call on the terminal from the background (the kernel sends SIGTTIN or SIGTTOU, and
/// restarts the call after this handler): waits for an end signal ([`ending_within`]) and
/// lets the end through if one comes, so that the call restarted goes through or fails;
/// otherwise stops the process, as the default action would, unless it was brought to the
/// foreground meanwhile or its process group was orphaned ([`orphaned`]: the call restarted
/// then fails, and no shell could continue the stop). Continued, the call is made again, and
/// from the background comes back here.
///
/// Several threads may wait here at once (the editor's read, the resume thread's mode),
/// and one stop is enough for all: the first to decide takes [`STOPS`] and stops the
/// process. Another that had decided too, and was stopped with it before its own stop,
/// would make that stop on the SIGCONT of `kill %1`, before the SIGTERM's handler ran (seen
/// under four busy loops: two threads in `tgkill`, the handler half-way on a third). It
/// finds [`STOPS`] taken or moved on since its wait began, and waits again instead.
extern "C" fn on_terminal_from_the_background(_: libc::c_int) {
    let errno = Errno::last_raw();
    // A call let through for an orphaned group, with no stop since, came back here: the
    // kernel, which fails such a call in an orphaned group and sends this signal only
    // otherwise, says the group is not orphaned (see `orphaned`). Stop as for any other.
    let refuted = LET_THROUGH_ORPHANED.load(Ordering::SeqCst) == STOPS.load(Ordering::SeqCst);
    let let_through = || {
        if in_foreground() {
            return true;
        }
        if refuted || !orphaned() {
            return false;
        }
        LET_THROUGH_ORPHANED.store(STOPS.load(Ordering::SeqCst), Ordering::SeqCst);
        true
    };
    wait_for_the_end_or_stop(in_foreground, let_through, || {
        // An end that came since the stop was decided: none (the SIGCONT that would undo
        // it, `start_the_continuer`'s, may be the one this stop would discard).
        if ending() {
            return;
        }
        // SIGSTOP, which no handler or mask holds back, rather than the signal itself,
        // whose action is this handler.
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(libc::SIGSTOP) };
    });
    // The editor's read, let through by the end, would fail and the editor set a mode.
    super::park_the_editor_at_the_end();
    Errno::set_raw(errno);
}

/// What [`on_terminal_from_the_background`] does, given whether the process is in the
/// foreground (`brought_back`, asked at every step of the wait, which it ends at once: a
/// `fg` lets the call through then, not a wait later), whether the call may go on without a
/// stop (`let_through`, asked before one: in the foreground, or in an orphaned process
/// group) and how to stop it (returning once continued). Async-signal-safe.
pub(super) fn wait_for_the_end_or_stop(
    brought_back: impl Fn() -> bool,
    let_through: impl Fn() -> bool,
    stop: impl Fn(),
) {
    loop {
        let seen = STOPS.load(Ordering::SeqCst);
        let back = std::cell::Cell::new(false);
        let step = || {
            back.set(brought_back());
            back.get() || pause_a_step()
        };
        if ending_within_steps_of(END_SIGNAL_WAIT, step) {
            let_the_end_through();
            return;
        }
        if back.get() || let_through() {
            return;
        }
        let free = seen.is_multiple_of(2);
        if free
            && STOPS
                .compare_exchange(
                    seen,
                    seen.wrapping_add(1),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
        {
            stop();
            STOPS.store(seen.wrapping_add(2), Ordering::SeqCst);
            return;
        }
    }
}

/// The stops [`on_terminal_from_the_background`] made, twice over: odd while one is being
/// made (from the decision until the process is continued).
pub(super) static STOPS: AtomicU32 = AtomicU32::new(0);

/// [`STOPS`] when [`on_terminal_from_the_background`] last let a call through because the
/// process group looked orphaned (`u32::MAX` until then, a value [`STOPS`] does not hold
/// for two thousand million stops).
static LET_THROUGH_ORPHANED: AtomicU32 = AtomicU32::new(u32::MAX);

/// An end signal's first action, before the signal watcher's thread hears of it: notes it,
/// has any stop from then on undone ([`start_the_continuer`]), and in the background (a
/// shell's `kill %1` on a stopped chat, with the SIGCONT after it) lets the end through
/// ([`let_the_end_through`]) before any thread, ending the chat, sets the terminal's mode
/// from there and so stops the process again before its `__LEAVE__`.
fn on_end_signal() {
    ENDING.store(true, Ordering::SeqCst);
    start_the_continuer();
    if !in_foreground() {
        let_the_end_through();
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
/// Every decision to stop is made on a look at [`ending`], and the stop itself comes a few
/// instructions later (`on_sigtstp`'s `stop`, [`wait_for_the_end_or_stop`]'s SIGSTOP): an
/// end signal handled in between, on another thread, still finds the process stopped with
/// it; and a SIGTERM still pending when the stop's SIGTSTP is unblocked is handled first,
/// and the stop made all the same. None of the chat's threads can continue a process they
/// all stopped with; only the kernel can, and this timer asks it to. A SIGCONT to a process
/// that runs wakes the resume thread, and discards any stop signal pending. A best effort:
/// the timer is armed again only when its signal is taken, and a stop made while one waits
/// to be taken discards it, so the stops look at the end once more just before they are
/// made (`stop` in `suspend`, [`on_terminal_from_the_background`]). Async-signal-safe
/// (`timer_settime`).
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

/// How long a chat continued in the background waits for an end signal before it stops
/// again ([`ending_within`]).
pub(super) const END_SIGNAL_WAIT: Duration = Duration::from_millis(200);

/// Whether the chat is told to end ([`ending`]) within `wait`, asked every few
/// milliseconds. A shell's `kill %1` sends SIGTERM before SIGCONT, but the thread that takes
/// the SIGTERM may run its handler only after this one has looked (on a busy machine, a
/// few milliseconds later): stopped again at once, the chat would have sent its
/// `__LEAVE__` (from the other threads) and then stayed stopped until `fg`. A `bg` costs
/// the wait before it stops again, while the editor's thread waits here and draws nothing.
///
/// The wait counts only time the process ran, near enough: a step that takes more than
/// [`LATE_STEP`] (the process was stopped meanwhile, by another thread that waited here
/// first, or this thread got no core for that long) starts it again, up to [`FRESH_WAITS`]
/// times. A wait begun before a stop would otherwise find its time spent on the SIGCONT of
/// `kill %1`, and stop the process again at once, before the thread that took the SIGTERM
/// had run its handler (seen under four busy loops). Async-signal-safe (poll, clock_gettime).
pub(super) fn ending_within(wait: Duration) -> bool {
    ending_within_steps_of(wait, pause_a_step)
}

/// Sleeps one step of [`ending_within`], 5 ms (fewer if a signal comes); never ends the
/// wait. `poll` with no descriptor: a sleep that is async-signal-safe.
fn pause_a_step() -> bool {
    // SAFETY: poll with no descriptors reads none.
    unsafe { libc::poll(std::ptr::null_mut(), 0, 5) };
    false
}

/// [`ending_within`], with `step` for its sleep between two looks, which ends the wait
/// early, with the answer as it stands, when it returns true.
pub(super) fn ending_within_steps_of(wait: Duration, step: impl Fn() -> bool) -> bool {
    let mut waited = Duration::ZERO;
    let mut fresh = 0;
    while waited < wait {
        if ending() {
            return true;
        }
        let before = monotonic();
        if step() {
            break;
        }
        let slept = monotonic().saturating_sub(before);
        if slept > LATE_STEP && fresh < FRESH_WAITS {
            fresh += 1;
            waited = Duration::ZERO;
        } else {
            waited += slept;
        }
    }
    ending()
}

/// A step of [`ending_within`]'s 5 ms that takes longer than this came back from a stop
/// (or from starvation), and starts the wait again. A stop shorter than this is counted as
/// waited.
pub(super) const LATE_STEP: Duration = Duration::from_millis(100);

/// How many times [`ending_within`] starts its wait again: a machine so loaded that every
/// step comes back late still gets its stop.
pub(super) const FRESH_WAITS: u32 = 4;

/// The monotonic clock, which goes on while the process is stopped. Async-signal-safe.
fn monotonic() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec; CLOCK_MONOTONIC is always there.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// Lets the end go through from the background: the editor takes its raw mode again when
/// its Ctrl+Z returns, and the terminal guard puts back the mode before the chat at the
/// end, each a `tcsetattr` that, from the background, would stop the process (SIGTTOU)
/// before its `__LEAVE__`; and the editor's read of the terminal, begun or restarted there,
/// would stop it (SIGTTIN). With SIGTTOU ignored the modes go through, the last of them
/// leaving the shell's terminal in the mode from before the chat; with SIGTTIN ignored the
/// read fails (`EIO`), which the input thread takes for the end of input. Async-signal-safe.
pub(super) fn let_the_end_through() {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGTTOU, Signal::SIGTTIN] {
        // SAFETY: sigaction is async-signal-safe; the handler replaced,
        // `on_terminal_from_the_background`, is one no end needs any more.
        let _ = unsafe { signal::sigaction(signal, &ignore) };
    }
}
