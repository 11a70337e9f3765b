//! Stops and resumes of a chat in the line editor: which thread stops the process on Ctrl+Z,
//! in which terminal mode the shell gets the terminal back, and how the editor gets its mode
//! and its line back on the screen however the process was stopped.

use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::Duration;

use log::debug;
use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::{tcsetattr, SetArg, Termios};
use signal_hook::consts::SIGCONT;
use signal_hook::iterator::Signals;

use super::input_thread::BRACKETED_PASTE_OFF;
use crate::feed::Feed;

/// The terminal mode before the chat, the one the terminal guard puts back: the mode the
/// process stops in. Plain data, read by the SIGTSTP handler.
static MODE_BEFORE_CHAT: OnceLock<libc::termios> = OnceLock::new();

/// The thread the editor reads on, while it runs ([`EditorThread`]).
static EDITOR_THREAD: Mutex<Option<libc::pthread_t>> = Mutex::new(None);

/// How the last stop came, as the SIGTSTP handler saw it ([`Stop`]); forgotten on the
/// SIGCONT that finds the terminal ours.
static LAST_STOP: AtomicU8 = AtomicU8::new(Stop::Unseen as u8);

/// How the process was stopped, for what to do once it is continued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stop {
    /// No SIGTSTP went through the handler: a SIGSTOP, which no handler sees (or a SIGCONT
    /// without a stop). The shell may have given the terminal its own mode meanwhile (bash
    /// does), and the editor, which does not know, draws nothing.
    Unseen,
    /// A SIGTSTP that found the editor's raw mode: one from elsewhere (`kill -TSTP`) while
    /// the editor reads. The handler puts that mode back; the editor, which does not know,
    /// draws nothing.
    InEditor,
    /// A SIGTSTP in any other mode: the editor's own Ctrl+Z, after which the editor takes
    /// its mode again and draws its line itself, or the terminal's between two lines, where
    /// there is no line to draw.
    Elsewhere,
}

impl Stop {
    fn last() -> Stop {
        match LAST_STOP.load(Ordering::SeqCst) {
            x if x == Stop::InEditor as u8 => Stop::InEditor,
            x if x == Stop::Elsewhere as u8 => Stop::Elsewhere,
            _ => Stop::Unseen,
        }
    }
}

/// Ctrl+Z, to the line editor, means: give the terminal its mode back, stop the process
/// with `kill(0, SIGTSTP)`, and once continued (`fg`), take raw mode again and redraw. In a
/// process of several threads any thread may take that SIGTSTP, and `kill` returns at once
/// to the editor, which took raw mode again before the process stopped; the shell then gave
/// the terminal back to `ocm` in its own, cooked mode, which the editor did not know: after
/// `fg` the terminal echoed what was typed, and the editor saw it only at Enter (a message
/// arriving redrew the line without it). So SIGTSTP is blocked in the main thread before any
/// helper thread starts (they inherit it) and unblocked on the input thread alone, where
/// the editor's `kill` then stops the process before it returns, as in a program of one
/// thread. Called by the main thread when the editor is used.
///
/// SIGCONT is blocked with it, and unblocked on the resume thread alone
/// ([`redraw_on_resume`]), so that its handler runs on that thread, as it comes back from a
/// stop and before it reads anything: taken by another thread, which may run only later, a
/// SIGCONT already answered could be reported after the resume thread had looked for more,
/// and be taken for a second stop, one no handler saw, with the line drawn again over the
/// editor's own redraw. (A blocked SIGCONT still continues the process.)
pub(super) fn suspend_on_input_thread() {
    let mut set = tstp();
    set.add(Signal::SIGCONT);
    if let Err(e) = set.thread_block() {
        debug!("cannot block SIGTSTP and SIGCONT: {e}");
    }
}

/// Lets the calling thread (the input thread) take SIGTSTP; see [`suspend_on_input_thread`].
pub(super) fn take_suspend_here() {
    if let Err(e) = tstp().thread_unblock() {
        debug!("cannot unblock SIGTSTP: {e}");
    }
}

fn tstp() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTSTP);
    set
}

/// Keeps `mode`, the terminal's mode before the chat, as the one to stop in
/// ([`stop_in_the_mode_before_the_chat`]).
pub(super) fn remember_mode_before_chat(mode: &Termios) {
    let _ = MODE_BEFORE_CHAT.set(libc::termios::from(mode.clone()));
}

/// Makes SIGTSTP stop the process in the terminal's mode before the chat, and put back the
/// mode it found once continued. The editor stops the process in the mode it found when it
/// took raw mode, and between two lines (where Ctrl+Z is the terminal's own SIGTSTP) the
/// terminal stays in that mode: the quiet one `ocm` sets there, without echo and without
/// line editing. bash and zsh put back the mode they had when a job stops; dash, busybox sh
/// and others do not, and were left with a terminal that echoed nothing and edited no line
/// until `fg` or `stty sane`. A SIGTSTP sent from elsewhere (`kill -TSTP`) while the editor
/// reads stops in that mode too, with bracketed paste turned off as at the chat's end, and
/// gets raw mode back; the line is drawn again by [`redraw_on_resume`].
/// Called on the input thread, the one that takes SIGTSTP.
pub(super) fn stop_in_the_mode_before_the_chat() {
    if MODE_BEFORE_CHAT.get().is_none() {
        return;
    }
    // SAFETY: the handler does only what is async-signal-safe (tcgetattr, tcsetattr,
    // sigaction, raise, pthread_sigmask; errno saved and put back) and reads a static set
    // before it is installed.
    if let Err(e) = unsafe { signal::sigaction(Signal::SIGTSTP, &sigtstp_action()) } {
        debug!("cannot stop in the terminal's mode before the chat: {e}");
    }
}

/// The handler of [`stop_in_the_mode_before_the_chat`], restarting the reads it interrupts.
fn sigtstp_action() -> SigAction {
    SigAction::new(
        SigHandler::Handler(on_sigtstp),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    )
}

/// Puts the terminal in its mode before the chat, its unread input discarded, stops the
/// process as SIGTSTP's default action would, and once continued puts back the mode found:
/// the quiet one between two lines, the one the editor's Ctrl+Z left, from which it takes
/// raw mode again, or the editor's raw mode itself (a SIGTSTP from elsewhere), noted in
/// [`LAST_STOP`] for [`redraw_on_resume`].
extern "C" fn on_sigtstp(_: libc::c_int) {
    let errno = Errno::last_raw();
    let mut found = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills `found` when it returns 0; tcsetattr reads a whole termios.
    let found = unsafe {
        (libc::tcgetattr(libc::STDIN_FILENO, found.as_mut_ptr()) == 0).then(|| found.assume_init())
    };
    let in_editor = found.as_ref().is_some_and(in_editor_mode);
    if in_editor {
        // The editor turned the terminal's bracketed paste on for the line it reads, and
        // turns it off only when it returns one or stops itself: the shell would get each
        // paste wrapped in `ESC [200~` ... `ESC [201~` (see the terminal guard).
        // SAFETY: write is async-signal-safe; the buffer is a static.
        unsafe {
            libc::write(
                libc::STDOUT_FILENO,
                BRACKETED_PASTE_OFF.as_ptr().cast(),
                BRACKETED_PASTE_OFF.len(),
            )
        };
    }
    let seen = if in_editor {
        Stop::InEditor
    } else {
        Stop::Elsewhere
    };
    LAST_STOP.store(seen as u8, Ordering::SeqCst);
    if let Some(before) = MODE_BEFORE_CHAT.get() {
        // TCSAFLUSH: the shell reads the terminal as soon as the process stops, and would
        // run what `ocm` had not read (keys typed after the editor's Ctrl+Z, the rest of a
        // paste) as commands. The terminal's own Ctrl+Z discards that input too (ISIG
        // without NOFLSH), so a stop drops the same whichever way it comes.
        set_mode(libc::STDIN_FILENO, libc::TCSAFLUSH, before);
        discard_unread_input();
    }
    stop();
    // Continued in the background (`bg`; or the SIGCONT a shell's `kill %1` sends after its
    // SIGTERM, so that the job can act on it): setting the mode from there would stop the
    // process (SIGTTOU) until `fg`. For `bg` that is right, and stopping again says so
    // plainly; but a chat told to end must be let go on to its `__LEAVE__` and exit, with the
    // terminal, still the shell's, left in the mode it stopped in.
    while !in_foreground() {
        if ending_within(END_SIGNAL_WAIT) {
            // The signal watcher and the main loop end the chat and the process (within
            // the watcher's grace). This thread waits for that here: returned to, the
            // editor would draw its line over the shell's screen.
            let_the_end_through();
            loop {
                // SAFETY: pause is async-signal-safe.
                unsafe { libc::pause() };
            }
        }
        stop();
    }
    if let Some(found) = found {
        set_mode(libc::STDIN_FILENO, libc::TCSADRAIN, &found);
    }
    Errno::set_raw(errno);
}

/// Set by the end signals' own handler ([`watch_for_the_end`]), at once, for
/// [`on_sigtstp`] and [`on_resume`] to read: the watching thread may run only later.
static ENDING: AtomicBool = AtomicBool::new(false);

/// The signals that end the chat (the signal watcher's, in `chat::mod`).
const END_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Notes each end signal in [`ENDING`] as it comes, beside the chat's own watcher, and
/// makes a call on the terminal from the background wait for one before it stops the
/// process ([`stop_from_the_background_only_when_no_end_is_coming`]). Called by the main
/// thread before the editor starts.
pub(super) fn watch_for_the_end() {
    stop_from_the_background_only_when_no_end_is_coming();
    for signal in END_SIGNALS {
        // SAFETY: the action stores to an atomic and calls tcgetpgrp, getpgrp and
        // sigaction: async-signal-safe.
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
/// chat again, before its `__LEAVE__`, until `fg` (3 runs in 11 of
/// `client_terminal::stopped_again_in_the_background_after_a_sigstop_and_killed_it_draws_nothing_and_exits`
/// under four busy loops; every thread stopped, one in `read` of the terminal, or the
/// resume thread in `tcsetattr`, and the handler half-way on a third).
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
/// foreground meanwhile. Continued, the call is made again, and from the background comes
/// back here.
///
/// Several threads may wait here at once (the editor's read, the resume thread's mode),
/// and one stop is enough for all: the first to decide takes [`STOPS`] and stops the
/// process. Another that had decided too, and was stopped with it before its own stop,
/// would make that stop on the SIGCONT of `kill %1`, before the SIGTERM's handler ran (seen
/// under four busy loops: two threads in `tgkill`, the handler half-way on a third). It
/// finds [`STOPS`] taken or moved on since its wait began, and waits again instead.
extern "C" fn on_terminal_from_the_background(_: libc::c_int) {
    let errno = Errno::last_raw();
    wait_for_the_end_or_stop(in_foreground, in_foreground, || {
        // SIGSTOP, which no handler or mask holds back, rather than the signal itself,
        // whose action is this handler.
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(libc::SIGSTOP) };
    });
    Errno::set_raw(errno);
}

/// What [`on_terminal_from_the_background`] does, given whether the process is in the
/// foreground (`brought_back`, asked at every step of the wait, which it ends at once: a
/// `fg` lets the call through then, not a wait later; `in_foreground`, asked before a stop)
/// and how to stop it (returning once continued). Async-signal-safe.
fn wait_for_the_end_or_stop(
    brought_back: impl Fn() -> bool,
    in_foreground: impl Fn() -> bool,
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
        if back.get() || in_foreground() {
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
static STOPS: AtomicU32 = AtomicU32::new(0);

/// An end signal's first action, before the signal watcher's thread hears of it: notes it,
/// and in the background (a shell's `kill %1` on a stopped chat, with the SIGCONT after it)
/// lets the end through ([`let_the_end_through`]) before any thread, ending the chat, sets
/// the terminal's mode from there and so stops the process again before its `__LEAVE__`.
fn on_end_signal() {
    ENDING.store(true, Ordering::SeqCst);
    if !in_foreground() {
        let_the_end_through();
    }
}

/// Whether the chat has been told to end: an end signal handled ([`ENDING`], set by the
/// signal's handler on whichever thread took it: this one too, between two steps of a
/// wait, when the signal cuts a step's sleep short), or one pending and blocked in the
/// calling thread (`sigpending` tells only of those: an end signal the resume thread's
/// SIGCONT came with is pending there until a thread takes it, and no chat thread blocks
/// the end signals but inside their own handler). Async-signal-safe.
fn ending() -> bool {
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
const END_SIGNAL_WAIT: Duration = Duration::from_millis(200);

/// Whether the chat is told to end ([`ending`]) within `wait`, asked every few
/// milliseconds. A shell's `kill %1` sends SIGTERM before SIGCONT, but the thread that takes
/// the SIGTERM may run its handler only after this one has looked (on a busy machine, a
/// few milliseconds later): stopped again at once, the chat would have sent its
/// `__LEAVE__` (from the other threads) and then stayed stopped until `fg`. A `bg` costs
/// the wait before it stops again, while the editor's thread waits here and draws nothing.
///
/// The wait counts only time the process ran, near enough: a step that takes more than
/// [`LATE_STEP`] (the process was stopped meanwhile, by another thread that waited here
/// first, or this thread got no core for that long) starts it again, up to [`FRESH_WAITS`] times. A wait begun before a stop
/// would otherwise find its time spent on the SIGCONT of `kill %1`, and stop the process
/// again at once, before the thread that took the SIGTERM had run its handler (seen under
/// four busy loops). Async-signal-safe (poll, clock_gettime).
fn ending_within(wait: Duration) -> bool {
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
fn ending_within_steps_of(wait: Duration, step: impl Fn() -> bool) -> bool {
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
const LATE_STEP: Duration = Duration::from_millis(100);

/// How many times [`ending_within`] starts its wait again: a machine so loaded that every
/// step comes back late still gets its stop.
const FRESH_WAITS: u32 = 4;

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
fn let_the_end_through() {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGTTOU, Signal::SIGTTIN] {
        // SAFETY: sigaction is async-signal-safe; the handler replaced,
        // `on_terminal_from_the_background`, is one no end needs any more.
        let _ = unsafe { signal::sigaction(signal, &ignore) };
    }
}

/// Sets the mode of the terminal `fd` (standard input), again if a signal handler that does not restart calls
/// interrupts it: the editor's, for SIGWINCH, which [`wake_the_editor`] sends to this very
/// thread when the process is continued, while the mode set from the background waits for
/// `fg` (see [`redraw_on_resume`]). From a signal handler: async-signal-safe.
fn set_mode(fd: libc::c_int, when: libc::c_int, mode: &libc::termios) {
    // SAFETY: tcsetattr reads a whole termios.
    while unsafe { libc::tcsetattr(fd, when, mode) } != 0 && Errno::last() == Errno::EINTR {}
}

/// Discards all the terminal holds unread. `tcsetattr`'s TCSAFLUSH empties only the line
/// discipline's queue: what the other side of a pseudo-terminal wrote last (the end of a
/// paste) can still wait in the kernel's buffer before it, and reaches the queue after the
/// flush, for the shell to read. `tcflush(TCIFLUSH)` empties both. Async-signal-safe.
pub(super) fn discard_unread_input() {
    // SAFETY: tcflush takes a descriptor and a constant. It fails only where standard input
    // is no terminal (any more), whose unread input no shell would take as typed.
    let _ = unsafe { libc::tcflush(libc::STDIN_FILENO, libc::TCIFLUSH) };
}

/// SIGTSTP's default action, from its handler: the signal is blocked while the handler
/// runs, so raised with the default action it waits until unblocked, and stops the process
/// there; continued, the signal is blocked again and the handler put back.
fn stop() {
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: the default action, then this handler again; both async-signal-safe.
    unsafe {
        let _ = signal::sigaction(Signal::SIGTSTP, &default);
        let _ = signal::raise(Signal::SIGTSTP);
        let _ = tstp().thread_unblock();
        let _ = tstp().thread_block();
        let _ = signal::sigaction(Signal::SIGTSTP, &sigtstp_action());
    }
}

/// Whether `mode` is the editor's raw mode: neither line editing nor signals from the
/// terminal (the quiet mode between two lines keeps signals, the shell's mode has both).
fn in_editor_mode(mode: &libc::termios) -> bool {
    mode.c_lflag & (libc::ICANON | libc::ISIG) == 0
}

/// The raw mode the editor reads a line in, made of the mode before the chat as rustyline
/// (19, `tty/unix.rs`, `enable_raw_mode`) makes it of the mode it finds (the quiet one
/// between two lines, itself the mode before the chat without echo and line editing): no
/// break, CR to NL, parity check, bit stripping or flow control on input; 8 bits; no echo,
/// line editing, extended input or signals; reads return each byte as it comes.
fn editor_mode(before: &libc::termios) -> libc::termios {
    let mut raw = *before;
    raw.c_iflag &= !(libc::BRKINT | libc::ICRNL | libc::INPCK | libc::ISTRIP | libc::IXON);
    raw.c_cflag |= libc::CS8;
    raw.c_lflag &= !(libc::ECHO | libc::ICANON | libc::IEXTEN | libc::ISIG);
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    raw
}

/// Makes the editor draw its prompt and line again whenever the process is continued
/// (SIGCONT: `fg`, `kill -CONT`) while the editor reads a line, once the terminal is ours
/// (our process group in its foreground), unless the editor stopped the process itself (its
/// Ctrl+Z), after which it draws them itself. A stop it did not see (`kill -TSTP`, `kill
/// -STOP`) left the screen to the shell, and the line being typed off it until the next
/// message. After a SIGSTOP, which no handler sees, the terminal may also be in the shell's
/// own mode (bash puts its mode back when a job stops, and does not give the job's back on
/// `fg`), which echoed what was typed and handed it to the editor only at Enter: the
/// editor's raw mode is set again first ([`take_editor_mode`]). The drawing is asked of the
/// editor through its external printer ([`Feed::redraw`]), so its own thread does it,
/// between two keys, once it waits for the next one ([`wake_the_editor`]).
///
/// Continued in the background after a SIGSTOP (`kill -CONT` while the shell, which saw the
/// job stop, has the terminal), the process ran on unseen, and a shell's `fg` continues
/// (SIGCONT) only a job that is stopped, so it got the terminal back with no signal, no
/// prompt and the shell's mode. Setting the editor's mode from the background now stops it
/// again (SIGTTOU, then [`on_terminal_from_the_background`]'s SIGSTOP once no end has come)
/// until `fg`, which continues it in the foreground, where the mode is set and the line
/// drawn. (After a SIGTSTP, the handler's setting the mode back stops it in the
/// same way.)
///
/// Called on the thread the editor reads on, before it takes SIGTSTP (the watching thread
/// must not); the editor's thread is known as such until the guard returned is dropped.
pub(super) fn redraw_on_resume(feed: Feed, reading: Arc<AtomicBool>) -> io::Result<EditorThread> {
    let mut signals = Signals::new([SIGCONT])?;
    let again = spawn_rewaker(Arc::clone(&reading))?;
    thread::Builder::new()
        .name("resume".into())
        .spawn(move || {
            // Blocked in every other thread (see `suspend_on_input_thread`).
            let mut cont = SigSet::empty();
            cont.add(Signal::SIGCONT);
            if let Err(e) = cont.thread_unblock() {
                debug!("cannot unblock SIGCONT: {e}");
            }
            while signals.forever().next().is_some() {
                if on_resume(&feed, &reading, &again) {
                    // A SIGCONT that came meanwhile was for the stop just settled, not a
                    // second one: the `fg` that continued the stop which setting the mode
                    // from the background met, or, on a busy machine, the `fg` after the
                    // `bg` being answered, which would otherwise be taken for a stop no
                    // handler saw, and the line drawn again over the editor's own redraw.
                    // Its handler ran on this thread as it came back from the stop (no
                    // other thread takes SIGCONT), so it is pending here by now.
                    signals.pending().for_each(drop);
                }
            }
        })?;
    Ok(EditorThread::here())
}

/// The calling thread known as the editor's, for [`wake_the_editor`], until dropped (before
/// the thread ends: a signal to a thread that has ended is undefined).
pub(super) struct EditorThread;

impl EditorThread {
    fn here() -> EditorThread {
        // SAFETY: no precondition.
        *editor_thread() = Some(unsafe { libc::pthread_self() });
        EditorThread
    }
}

impl Drop for EditorThread {
    fn drop(&mut self) {
        *editor_thread() = None;
    }
}

/// The editor's thread, locked: a poisoned lock holds a plain value, used as is.
fn editor_thread() -> std::sync::MutexGuard<'static, Option<libc::pthread_t>> {
    EDITOR_THREAD.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes the editor's thread go back to waiting for a key or a line to print, where it
/// takes the redraw asked for. It may be inside a read of the terminal instead, where the
/// external printer waits for the next key: a read begun in the background (keys typed to
/// the shell wake the editor there too) stops the process with SIGTTIN, and once continued
/// in the foreground waits for a key the shell has already read. A SIGWINCH to that thread
/// ends its read (the editor's handler for it does not restart reads) and makes the editor
/// read the terminal's size again, as after its own Ctrl+Z: the terminal may have been
/// resized while the shell had it, and told only the shell.
fn wake_the_editor() {
    let thread = editor_thread();
    if let Some(thread) = *thread {
        // SAFETY: the thread is alive: it forgets itself (under this lock) before it ends.
        unsafe { libc::pthread_kill(thread, libc::SIGWINCH) };
    }
}

/// What [`redraw_on_resume`] does on each SIGCONT; whether it settled a stop with the
/// terminal ours (a stop the handler saw, or one it asked a redraw for).
fn on_resume(feed: &Feed, reading: &AtomicBool, again: &mpsc::Sender<()>) -> bool {
    if ending() {
        // Continued to end (a shell's `kill %1`): nothing to draw, and no mode to take from
        // the background, which would stop the process before its `__LEAVE__`.
        let_the_end_through();
        return true;
    }
    let stop = Stop::last();
    if stop != Stop::Unseen {
        if !in_foreground() {
            // Continued in the background (`bg`): the handler, setting the mode it found
            // again, stops the process (SIGTTOU) until `fg`, whose SIGCONT ends this stop.
            return false;
        }
        LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
        if stop == Stop::Elsewhere {
            return true;
        }
    }
    if !reading.load(Ordering::SeqCst) {
        return stop != Stop::Unseen;
    }
    if stop == Stop::Unseen {
        take_editor_mode();
        if ending() {
            // Told to end while setting the mode stopped the process in the background
            // (SIGTTOU; a shell's `kill %1` then continues it): the terminal is still the
            // shell's, and the line must not be drawn over its screen.
            let_the_end_through();
            return true;
        }
    }
    feed.redraw();
    wake_the_editor();
    // The rewaker has gone only if its thread did (a panic): then this wake is the one.
    let _ = again.send(());
    true
}

/// When the editor's thread is woken again after [`wake_the_editor`]: soon, then later for a
/// thread that waits long for a core, as on a loaded machine.
const WAKE_AGAIN_AFTER: [Duration; 3] = [
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
];

/// Starts the thread that wakes the editor's thread again, on the schedule of
/// [`WAKE_AGAIN_AFTER`], after each wake asked for a redraw (a message on the sender
/// returned; one during a schedule starts it again). Called on the input thread, where
/// SIGTSTP and SIGCONT are blocked: the rewaker, which inherits its mask, takes neither.
///
/// Once wake is not always enough. The editor's thread, stopped in a read of the terminal
/// begun in the background (SIGTTIN), and the resume thread are continued by the same
/// SIGCONT. The wake's SIGWINCH can come just after the kernel, bringing the editor's thread
/// back from its stop, has decided to restart that read and before the read runs again:
/// its handler then runs, notes the signal for a `select` that is not running, and the read
/// starts again, waiting for a key, with the redraw asked for left until one comes (one run
/// in 120–240 of `after_a_sigstop_and_fg_the_editor_takes_its_mode_and_draws_its_line_again`
/// under six-fold load). A SIGWINCH that finds the editor waiting where it should makes it
/// read the terminal's size, and draw nothing if that did not change; one that finds it in
/// the restarted read ends the read, and the editor takes the redraw. (One that finds it
/// still in [`on_terminal_from_the_background`], which it leaves within a step of 5 ms of
/// `fg`, only cuts that step short: a later one finds it in the read.) No wake is sent while
/// keys wait unread: the editor is not stuck then, it reads them, and a signal in the middle
/// of an escape sequence would cut it in two.
fn spawn_rewaker(reading: Arc<AtomicBool>) -> io::Result<mpsc::Sender<()>> {
    let (again, asked) = mpsc::channel::<()>();
    thread::Builder::new()
        .name("rewake".into())
        .spawn(move || {
            // The first request, then one schedule per request, started again by the next.
            'requests: while asked.recv().is_ok() {
                let mut step = 0;
                while let Some(&wait) = WAKE_AGAIN_AFTER.get(step) {
                    match asked.recv_timeout(wait) {
                        Ok(()) => {
                            step = 0;
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break 'requests,
                    }
                    step += 1;
                    if ending() || !reading.load(Ordering::SeqCst) {
                        continue 'requests;
                    }
                    if !keys_waiting(libc::STDIN_FILENO) {
                        wake_the_editor();
                    }
                }
            }
        })?;
    Ok(again)
}

/// Whether the terminal `fd` (standard input) holds input not yet read (`FIONREAD`); no
/// when it cannot say.
fn keys_waiting(fd: libc::c_int) -> bool {
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given.
    let asked = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) };
    asked == 0 && unread > 0
}

/// Whether our process group has the terminal.
fn in_foreground() -> bool {
    // SAFETY: plain system calls on standard input, which stays open.
    unsafe { libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp() }
}

/// Sets the editor's raw mode, whatever the mode found (a shell may have given the
/// terminal its own). From the background the process is stopped (SIGTTOU, then
/// [`on_terminal_from_the_background`]) until it is continued in the foreground, where the
/// call goes through: it returns with the terminal ours, however long that takes. A shell's
/// `fg` that comes while the handler waits for an end lets the call through within a step of
/// the wait (5 ms); one
/// that came in the instant between the handler's last look at the terminal and its stop
/// would see the job stop again, and a second `fg` continue it.
fn take_editor_mode() {
    let Some(before) = MODE_BEFORE_CHAT.get() else {
        return;
    };
    // TCSADRAIN, as the editor does: what was typed meanwhile is the editor's to read.
    let mode = Termios::from(editor_mode(before));
    // Again if interrupted: the editor's SIGWINCH handler does not restart calls.
    let set = loop {
        match tcsetattr(io::stdin(), SetArg::TCSADRAIN, &mode) {
            Err(Errno::EINTR) => continue,
            set => break set,
        }
    };
    if let Err(e) = set {
        debug!("cannot take the editor's mode again: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// A SIGWINCH handler that does not restart the reads it interrupts, as the editor's.
    extern "C" fn interrupt(_: libc::c_int) {}

    /// Tests that set the editor's thread, SIGTTOU's action or [`LAST_STOP`] take turns.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A thread known as the editor's, waiting in a read that only a signal ends (a pipe's,
    /// which nothing is written to, as the restarted read of the terminal), and telling each
    /// interruption.
    struct EditorInARead {
        thread: thread::JoinHandle<()>,
        interrupted: mpsc::Receiver<()>,
        writer: io::PipeWriter,
    }

    impl EditorInARead {
        /// Starts it, and returns once it waits in its read, where the kernel says so
        /// (where it does not, the wakes come on a schedule and find it there later).
        fn start() -> EditorInARead {
            let action = SigAction::new(
                SigHandler::Handler(interrupt),
                SaFlags::empty(),
                SigSet::empty(),
            );
            // SAFETY: the handler does nothing.
            unsafe { signal::sigaction(Signal::SIGWINCH, &action) }.expect("a SIGWINCH handler");
            let (reader, writer) = io::pipe().expect("a pipe");
            let (started, thread_id) = mpsc::channel();
            let (told, interrupted) = mpsc::channel();
            let thread = thread::spawn(move || {
                let _known = EditorThread::here();
                // SAFETY: no precondition.
                started
                    .send(unsafe { libc::gettid() })
                    .expect("the test waits");
                let mut byte = [0u8; 1];
                loop {
                    // SAFETY: reads at most one byte into `byte`.
                    let read =
                        unsafe { libc::read(reader.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
                    if read < 0 && Errno::last() == Errno::EINTR {
                        let _ = told.send(());
                        continue;
                    }
                    // The byte that ends the test (or the pipe closed).
                    return;
                }
            });
            let tid = thread_id
                .recv_timeout(Duration::from_secs(10))
                .expect("the editor's thread started");
            let syscall = format!("/proc/self/task/{tid}/syscall");
            let in_read = format!("{} ", libc::SYS_read);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !std::fs::read_to_string(&syscall).map_or(true, |s| s.starts_with(&in_read)) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the editor's thread never waited in its read"
                );
                thread::sleep(Duration::from_millis(1));
            }
            EditorInARead {
                thread,
                interrupted,
                writer,
            }
        }

        /// Ends its read, and the thread.
        fn end(mut self) {
            self.writer
                .write_all(b"x")
                .expect("the byte that ends the read");
            self.thread.join().expect("the editor's thread");
        }
    }

    /// The editor's thread, stuck in a read that the first wake missed, is woken out of it
    /// by the rewaker once a redraw has been asked for, without another wake from the
    /// resume thread.
    #[test]
    fn the_rewaker_ends_a_read_the_first_wake_missed() {
        let _serial = serial();
        let editor = EditorInARead::start();
        let again = spawn_rewaker(Arc::new(AtomicBool::new(true))).expect("the rewaker");
        again.send(()).expect("the rewaker listens");
        let woken = editor.interrupted.recv_timeout(Duration::from_secs(10));
        editor.end();
        assert!(woken.is_ok(), "the read was never interrupted");
        // Ended, the thread is no longer known: no wake goes to it.
        assert!(
            editor_thread().is_none(),
            "an ended editor's thread still known"
        );
    }

    /// One request makes the rewaker wake the editor three times (10, 60 and 310 ms after
    /// it), then no more until the next; and none while the editor reads no line.
    #[test]
    fn the_rewaker_wakes_three_times_a_request_and_never_when_no_line_is_read() {
        let _serial = serial();
        let editor = EditorInARead::start();
        let reading = Arc::new(AtomicBool::new(true));
        let again = spawn_rewaker(Arc::clone(&reading)).expect("the rewaker");
        again.send(()).expect("the rewaker listens");
        for wake in 1..=3 {
            let woken = editor.interrupted.recv_timeout(Duration::from_secs(10));
            assert!(woken.is_ok(), "wake {wake} never came");
        }
        let fourth = editor.interrupted.recv_timeout(Duration::from_millis(600));
        reading.store(false, Ordering::SeqCst);
        again.send(()).expect("the rewaker listens");
        let not_reading = editor.interrupted.recv_timeout(Duration::from_millis(600));
        drop(again);
        editor.end();
        assert!(fourth.is_err(), "a fourth wake for one request");
        assert!(not_reading.is_err(), "a wake while no line is read");
    }

    /// Continued after a stop no handler saw, while the editor reads a line, the line is
    /// drawn again (through the feed) and the editor woken, with the rewaker told; while it
    /// reads none, nothing is drawn or settled.
    #[test]
    fn resumed_after_an_unseen_stop_the_line_being_read_is_drawn_again() {
        let _serial = serial();
        let (feed, readline) = crate::feed::tests::one_slot_feed();
        let (again, asked) = mpsc::channel();
        let reading = AtomicBool::new(false);
        LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
        assert!(!on_resume(&feed, &reading, &again), "settled with no line");
        assert!(readline.recv_timeout(Duration::from_millis(200)).is_err());
        assert!(asked.try_recv().is_err(), "the rewaker told with no line");
        reading.store(true, Ordering::SeqCst);
        assert!(on_resume(&feed, &reading, &again), "not settled");
        assert_eq!(
            readline.recv_timeout(Duration::from_secs(10)).as_deref(),
            Ok(crate::feed::REDRAW)
        );
        assert_eq!(asked.try_recv(), Ok(()), "the rewaker not told");
        assert!(feed.close().is_empty());
    }

    /// Continued in the background after a stop the handler saw (`bg`), nothing is drawn
    /// and nothing settled: the stop is kept for the `fg` to come. (Only where the test's
    /// standard input is not a terminal it has: the foreground is the integration tests'.)
    #[test]
    fn continued_in_the_background_after_a_seen_stop_nothing_is_drawn_or_settled() {
        if in_foreground() {
            return;
        }
        let _serial = serial();
        let (feed, readline) = crate::feed::tests::one_slot_feed();
        let (again, asked) = mpsc::channel();
        for stop in [Stop::InEditor, Stop::Elsewhere] {
            for reading in [false, true] {
                LAST_STOP.store(stop as u8, Ordering::SeqCst);
                let settled = on_resume(&feed, &AtomicBool::new(reading), &again);
                assert!(!settled, "{stop:?}, reading {reading}: settled");
                assert_eq!(Stop::last(), stop, "reading {reading}: the stop forgotten");
            }
        }
        LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
        assert!(readline.recv_timeout(Duration::from_millis(200)).is_err());
        assert!(asked.try_recv().is_err());
        assert!(feed.close().is_empty());
    }

    /// Continued to end (an end signal pending), nothing is drawn, the stop is settled,
    /// and SIGTTOU and SIGTTIN are ignored, so that the end is not stopped from the
    /// background.
    #[test]
    fn continued_to_end_nothing_is_drawn_and_the_end_is_let_through() {
        let _serial = serial();
        let (feed, readline) = crate::feed::tests::one_slot_feed();
        let mut outcome = None;
        let after = with_default_background_actions(|| {
            let feed = feed.clone();
            outcome = Some(
                thread::spawn(move || {
                    let mut hup = SigSet::empty();
                    hup.add(Signal::SIGHUP);
                    hup.thread_block().expect("SIGHUP blocked");
                    // SAFETY: a signal to this very thread, which blocks it.
                    unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
                    let (again, asked) = mpsc::channel();
                    LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
                    let settled = on_resume(&feed, &AtomicBool::new(true), &again);
                    assert_eq!(hup.wait(), Ok(Signal::SIGHUP));
                    (settled, asked.try_recv().is_ok())
                })
                .join()
                .expect("the resuming thread"),
            );
        });
        let (settled, asked) = outcome.expect("run");
        assert!(settled, "not settled");
        assert!(!asked, "the rewaker told");
        assert!(after
            .iter()
            .all(|a| matches!(a.handler(), SigHandler::SigIgn)));
        assert!(readline.recv_timeout(Duration::from_millis(200)).is_err());
        assert!(feed.close().is_empty());
    }

    /// A terminal mode with the local flags `lflag` and nothing else.
    fn mode_with(lflag: libc::tcflag_t) -> libc::termios {
        // SAFETY: termios is plain data, for which all zeroes is a value.
        let mut mode: libc::termios = unsafe { std::mem::zeroed() };
        mode.c_lflag = lflag;
        mode
    }

    /// The editor's raw mode is the one without both line editing and signals: the shell's
    /// mode has both, the quiet mode between two lines keeps signals, and a mode with line
    /// editing alone is not the editor's either.
    #[test]
    fn the_editor_mode_is_the_one_without_line_editing_and_signals() {
        let others = libc::ECHOE | libc::ECHOK | libc::ECHOCTL;
        assert!(in_editor_mode(&mode_with(0)));
        assert!(in_editor_mode(&mode_with(others | libc::ECHO)));
        for lflag in [
            libc::ICANON | libc::ISIG | libc::ECHO | libc::IEXTEN,
            libc::ISIG,
            libc::ICANON,
            libc::ISIG | others,
        ] {
            assert!(!in_editor_mode(&mode_with(lflag)), "{lflag:o}");
        }
    }

    /// The editor's mode is made of the mode before the chat as rustyline makes its raw
    /// mode: the input, control and local flags named are cleared (or CS8 set), every other
    /// flag and character kept, and reads take each byte as it comes.
    #[test]
    fn the_editor_mode_clears_what_rustyline_clears_and_keeps_the_rest() {
        let mut before = mode_with(
            libc::ECHO | libc::ICANON | libc::IEXTEN | libc::ISIG | libc::ECHOE | libc::ECHOCTL,
        );
        before.c_iflag = libc::BRKINT
            | libc::ICRNL
            | libc::INPCK
            | libc::ISTRIP
            | libc::IXON
            | libc::IUTF8
            | libc::IMAXBEL;
        before.c_oflag = libc::OPOST | libc::ONLCR;
        before.c_cflag = libc::CS7 | libc::CREAD | libc::HUPCL;
        before.c_cc[libc::VMIN] = 0;
        before.c_cc[libc::VTIME] = 5;
        before.c_cc[libc::VINTR] = 3;
        let raw = editor_mode(&before);
        assert_eq!(raw.c_iflag, libc::IUTF8 | libc::IMAXBEL, "input flags");
        assert_eq!(raw.c_oflag, libc::OPOST | libc::ONLCR, "output flags");
        assert_eq!(
            raw.c_cflag,
            libc::CS8 | libc::CREAD | libc::HUPCL,
            "control flags"
        );
        assert_eq!(raw.c_lflag, libc::ECHOE | libc::ECHOCTL, "local flags");
        assert_eq!(
            (
                raw.c_cc[libc::VMIN],
                raw.c_cc[libc::VTIME],
                raw.c_cc[libc::VINTR]
            ),
            (1, 0, 3)
        );
        assert!(in_editor_mode(&raw));
    }

    /// How the last stop came is read back as the handler noted it, and anything else as
    /// a stop no handler saw.
    #[test]
    fn the_last_stop_is_read_back_as_noted() {
        let _serial = serial();
        for stop in [Stop::InEditor, Stop::Elsewhere, Stop::Unseen] {
            LAST_STOP.store(stop as u8, Ordering::SeqCst);
            assert_eq!(Stop::last(), stop);
        }
        LAST_STOP.store(200, Ordering::SeqCst);
        assert_eq!(Stop::last(), Stop::Unseen);
        LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
    }

    /// An end signal pending for the thread that asks (here a SIGHUP it blocks, sent to
    /// itself) is the chat told to end, at once; with none, the wait is waited out, and not
    /// much longer.
    #[test]
    fn an_end_signal_pending_is_seen_and_without_one_the_wait_is_waited_out() {
        let _serial = serial();
        thread::spawn(|| {
            let mut hup = SigSet::empty();
            hup.add(Signal::SIGHUP);
            hup.thread_block().expect("SIGHUP blocked");
            assert!(!ending(), "nothing is pending yet");
            let started = std::time::Instant::now();
            assert!(!ending_within(END_SIGNAL_WAIT));
            let waited = started.elapsed();
            assert!(
                waited >= END_SIGNAL_WAIT && waited < Duration::from_millis(2500),
                "waited {waited:?}"
            );
            // SAFETY: a signal to this very thread, which blocks it.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
            assert!(ending(), "the SIGHUP pending is seen");
            assert!(ending_within(END_SIGNAL_WAIT));
            // Taken, so that it goes nowhere else.
            assert_eq!(hup.wait(), Ok(Signal::SIGHUP));
            assert!(!ending());
        })
        .join()
        .expect("the asking thread");
    }

    /// Letting the end through ignores SIGTTOU and SIGTTIN, so that neither the mode set
    /// nor the read of the terminal from the background stops the process before its
    /// `__LEAVE__`.
    #[test]
    fn letting_the_end_through_ignores_sigttou_and_sigttin() {
        let _serial = serial();
        let after = with_default_background_actions(let_the_end_through);
        assert!(after
            .iter()
            .all(|a| matches!(a.handler(), SigHandler::SigIgn)));
    }

    /// Runs `f` with the default actions of SIGTTOU and SIGTTIN, then puts back the actions
    /// found, and returns the ones `f` left.
    fn with_default_background_actions(f: impl FnOnce()) -> [SigAction; 2] {
        let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        let signals = [Signal::SIGTTOU, Signal::SIGTTIN];
        // SAFETY: the default actions, put back below.
        let before = signals.map(|s| unsafe { signal::sigaction(s, &default) }.expect("action"));
        f();
        // SAFETY: the actions found are put back.
        [0, 1].map(|i| unsafe { signal::sigaction(signals[i], &before[i]) }.expect("action"))
    }

    /// A wait of [`ending_within`] whose step comes back late (from a stop) starts again,
    /// so that it is waited in full once the process runs; and a step always late starts it
    /// again only [`FRESH_WAITS`] times, then counts.
    #[test]
    fn a_late_step_starts_the_wait_again_a_few_times_at_most() {
        let _serial = serial();
        thread::spawn(|| {
            let steps = std::cell::Cell::new(0);
            let started = std::time::Instant::now();
            let ended = ending_within_steps_of(END_SIGNAL_WAIT, || {
                steps.set(steps.get() + 1);
                let nap = if steps.get() == 1 { 150 } else { 5 };
                thread::sleep(Duration::from_millis(nap));
                false
            });
            assert!(!ended);
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_millis(150) + END_SIGNAL_WAIT,
                "waited {waited:?} in {} steps",
                steps.get()
            );
            let steps = std::cell::Cell::new(0);
            let ended = ending_within_steps_of(END_SIGNAL_WAIT, || {
                steps.set(steps.get() + 1);
                thread::sleep(LATE_STEP + Duration::from_millis(20));
                false
            });
            assert!(!ended);
            // Each late step counts once the fresh waits are spent: 120 ms, then 240 ms (or
            // one step of 200 ms or more, on a loaded machine).
            assert!(
                (FRESH_WAITS + 1..=FRESH_WAITS + 2).contains(&steps.get()),
                "{} steps",
                steps.get()
            );
        })
        .join()
        .expect("the waiting thread");
    }

    /// A thread that makes the stop for a call from the background, counting its calls.
    struct Stopper {
        foreground_asked: std::cell::Cell<u32>,
        stops: std::cell::Cell<u32>,
    }

    impl Stopper {
        /// Runs [`wait_for_the_end_or_stop`] from `stops_before` in [`STOPS`], with the
        /// process in the foreground or not as `foreground` says on each question (given
        /// its number, from 1), on a thread of its own, and checks that each stop is made
        /// with [`STOPS`] odd; returns the counts, and [`STOPS`] after.
        fn run(
            stops_before: u32,
            foreground: impl Fn(u32) -> bool + Send + 'static,
        ) -> (u32, u32, u32) {
            STOPS.store(stops_before, Ordering::SeqCst);
            let (asked, stops) = thread::spawn(move || {
                let stopper = Stopper {
                    foreground_asked: std::cell::Cell::new(0),
                    stops: std::cell::Cell::new(0),
                };
                wait_for_the_end_or_stop(
                    || false,
                    || {
                        let n = stopper.foreground_asked.get() + 1;
                        stopper.foreground_asked.set(n);
                        foreground(n)
                    },
                    || {
                        let stops = STOPS.load(Ordering::SeqCst);
                        assert!(
                            !stops.is_multiple_of(2),
                            "a stop being made is told ({stops})"
                        );
                        stopper.stops.set(stopper.stops.get() + 1);
                    },
                );
                (stopper.foreground_asked.get(), stopper.stops.get())
            })
            .join()
            .expect("the stopping thread");
            let after = STOPS.swap(0, Ordering::SeqCst);
            (asked, stops, after)
        }
    }

    /// With no end coming and the process still in the background after the wait, one
    /// stop is made, and counted as made and over.
    #[test]
    fn with_no_end_coming_one_stop_is_made() {
        let _serial = serial();
        assert_eq!(Stopper::run(0, |_| false), (1, 1, 2));
    }

    /// Brought to the foreground during the wait, the call is let through: no stop.
    #[test]
    fn brought_to_the_foreground_meanwhile_no_stop_is_made() {
        let _serial = serial();
        assert_eq!(Stopper::run(6, |_| true), (1, 0, 6));
    }

    /// With an end signal pending, the end is let through at once: no stop, and SIGTTOU
    /// and SIGTTIN ignored.
    #[test]
    fn with_an_end_coming_the_end_is_let_through_and_no_stop_made() {
        let _serial = serial();
        let mut counts = None;
        let after = with_default_background_actions(|| {
            STOPS.store(0, Ordering::SeqCst);
            counts = Some(
                thread::spawn(|| {
                    let mut hup = SigSet::empty();
                    hup.add(Signal::SIGHUP);
                    hup.thread_block().expect("SIGHUP blocked");
                    // SAFETY: a signal to this very thread, which blocks it.
                    unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
                    let stops = std::cell::Cell::new(0);
                    wait_for_the_end_or_stop(|| false, || false, || stops.set(stops.get() + 1));
                    assert_eq!(hup.wait(), Ok(Signal::SIGHUP));
                    (stops.get(), STOPS.load(Ordering::SeqCst))
                })
                .join()
                .expect("the waiting thread"),
            );
        });
        assert_eq!(counts, Some((0, 0)));
        assert!(after
            .iter()
            .all(|a| matches!(a.handler(), SigHandler::SigIgn)));
    }

    /// While another thread is making a stop (from its decision until the process is
    /// continued), none is made here: this thread waits again, and makes its own only once
    /// that stop is over.
    #[test]
    fn while_another_thread_makes_a_stop_none_is_made_here() {
        let _serial = serial();
        let counts = Stopper::run(1, |asked| {
            if asked == 2 {
                // The other thread's stop is over: the process was continued.
                STOPS.store(2, Ordering::SeqCst);
            }
            false
        });
        assert_eq!(counts, (3, 1, 4));
    }

    /// A stop made by another thread between this one's wait and its own stop (which
    /// stopped this thread too, and the SIGCONT continued both) makes it wait again rather
    /// than stop the process once more, before an end signal that SIGCONT came with is
    /// handled.
    #[test]
    fn a_stop_made_by_another_thread_during_the_wait_makes_it_wait_again() {
        let _serial = serial();
        let counts = Stopper::run(0, |asked| {
            if asked == 1 {
                STOPS.store(2, Ordering::SeqCst);
            }
            false
        });
        assert_eq!(counts, (2, 1, 4));
    }

    /// An end already handled on another thread ([`ENDING`], which is how the chat's
    /// threads hear of one: `sigpending` tells only of signals they block) is let through
    /// at once: no stop, and SIGTTOU and SIGTTIN ignored.
    #[test]
    fn an_end_handled_on_another_thread_is_let_through_and_no_stop_made() {
        let _serial = serial();
        STOPS.store(0, Ordering::SeqCst);
        let stops = std::cell::Cell::new(0);
        let after = with_default_background_actions(|| {
            ENDING.store(true, Ordering::SeqCst);
            wait_for_the_end_or_stop(|| false, || false, || stops.set(stops.get() + 1));
            ENDING.store(false, Ordering::SeqCst);
        });
        assert_eq!((stops.get(), STOPS.load(Ordering::SeqCst)), (0, 0));
        assert!(after
            .iter()
            .all(|a| matches!(a.handler(), SigHandler::SigIgn)));
    }

    /// Brought to the foreground during the wait (`fg`), the wait ends there: the call is
    /// let through at once, without the question before a stop, and with no stop.
    #[test]
    fn brought_to_the_foreground_during_the_wait_it_ends_there() {
        let _serial = serial();
        STOPS.store(0, Ordering::SeqCst);
        let (looks, decisions, stops) = (
            std::cell::Cell::new(0),
            std::cell::Cell::new(0),
            std::cell::Cell::new(0),
        );
        wait_for_the_end_or_stop(
            || {
                looks.set(looks.get() + 1);
                looks.get() == 3
            },
            || {
                decisions.set(decisions.get() + 1);
                false
            },
            || stops.set(stops.get() + 1),
        );
        assert_eq!((looks.get(), decisions.get(), stops.get()), (3, 0, 0));
    }

    /// A new pseudo-terminal: its controlling side and the terminal.
    fn pseudo_terminal() -> (std::fs::File, std::fs::File) {
        use std::os::fd::FromRawFd;
        let (mut controller, mut terminal) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the integers passed; the name, the
        // mode and the size are optional (null).
        let rc = unsafe {
            libc::openpty(
                &mut controller,
                &mut terminal,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and nothing else owns them.
        unsafe {
            (
                std::fs::File::from_raw_fd(controller),
                std::fs::File::from_raw_fd(terminal),
            )
        }
    }

    /// The mode of the terminal `fd`.
    fn mode_of(fd: libc::c_int) -> libc::termios {
        let mut mode = MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills `mode` when it returns 0.
        assert_eq!(unsafe { libc::tcgetattr(fd, mode.as_mut_ptr()) }, 0);
        // SAFETY: filled above.
        unsafe { mode.assume_init() }
    }

    /// Setting a mode sets it once, even where `errno` says EINTR from before (only a
    /// call that fails is tried again); a descriptor that is no terminal is given up on at
    /// once.
    #[test]
    fn a_mode_is_set_once_and_a_descriptor_that_is_no_terminal_given_up_on() {
        let (_controller, terminal) = pseudo_terminal();
        let fd = terminal.as_raw_fd();
        let raw = editor_mode(&mode_of(fd));
        assert!(!in_editor_mode(&mode_of(fd)), "a new terminal in raw mode");
        let (done, set) = mpsc::channel();
        thread::spawn(move || {
            Errno::set_raw(libc::EINTR);
            set_mode(fd, libc::TCSADRAIN, &raw);
            let (reader, _writer) = io::pipe().expect("a pipe");
            set_mode(reader.as_raw_fd(), libc::TCSADRAIN, &raw);
            let _ = done.send(());
        });
        assert!(
            set.recv_timeout(Duration::from_secs(10)).is_ok(),
            "setting the mode never returned"
        );
        assert!(in_editor_mode(&mode_of(fd)), "the mode was not set");
    }

    /// Keys are waiting when the terminal holds a byte unread, and not when it holds none
    /// or cannot say (a descriptor that is not open).
    #[test]
    fn keys_are_waiting_when_the_terminal_holds_a_byte_unread() {
        let (mut controller, terminal) = pseudo_terminal();
        let fd = terminal.as_raw_fd();
        let raw = editor_mode(&mode_of(fd));
        set_mode(fd, libc::TCSANOW, &raw);
        assert!(!keys_waiting(fd), "keys in a new terminal");
        controller.write_all(b"k").expect("a key typed");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !keys_waiting(fd) {
            assert!(
                std::time::Instant::now() < deadline,
                "the key typed never waited"
            );
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!keys_waiting(libc::c_int::MAX));
    }
}
