//! Stops and resumes of a chat in the line editor: which thread stops the process on Ctrl+Z,
//! in which terminal mode the shell gets the terminal back, and how the editor gets its mode
//! and its line back on the screen however the process was stopped.
//!
//! This module owns the stop: SIGTSTP taken on the input thread alone, and its handler,
//! which stops the process in the mode from before the chat and, continued in the
//! background, waits there, running, for `fg` or the end, its printer held
//! ([`InTheForeground`]); `ending` notes the end signals and makes every call on the
//! terminal from the background wait in the same way, and lets the end through; `resume`
//! takes the editor's mode and draws its line again once the process is continued in the
//! foreground.

mod ending;
mod resume;
#[cfg(test)]
mod tests;

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use log::debug;
use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::Termios;

use super::input_thread::BRACKETED_PASTE_OFF;
pub(super) use ending::watch_for_the_end;
use ending::{a_stop_asked, let_the_end_through, sleep_a_step, wait_in_the_background, Waited};
pub(super) use resume::{redraw_on_resume, EditorThread};

/// The terminal mode before the chat, the one the terminal guard puts back: the mode the
/// process stops in. Plain data, read by the SIGTSTP handler.
static MODE_BEFORE_CHAT: OnceLock<libc::termios> = OnceLock::new();

/// Held by the resume thread while it sets the editor's mode (`resume::take_editor_mode`),
/// and for good by the terminal guard once it has put back the mode from before the chat
/// ([`keep_the_mode_before_chat`]), so that the guard's comes after any the resume thread
/// makes. (The editor's own, on the editor's thread, are kept from coming after it at an
/// end by [`park_the_editor_at_the_end`].) From the background that set waits for the
/// terminal, and is not made if the end comes first. It used to be made once the end let it
/// through, a few milliseconds after the end came: after the guard, as a rule, or as the
/// process exits, which left the shell's terminal raw (dash does not give it its own mode
/// back: the server test
/// `client_terminal::killed_in_the_background_after_a_sigstop_it_leaves_dash_the_terminal_as_before`).
static MODE_SETS: Mutex<()> = Mutex::new(());

/// How long the terminal guard waits for a mode set in flight ([`MODE_SETS`]), counted while
/// the process runs: one whose wait the end ends takes a step of that wait (50 ms at most);
/// one that waits for a `fg` that will not come, no longer than this.
const MODE_SET_WAIT: Duration = Duration::from_secs(1);

/// Waits (up to [`MODE_SET_WAIT`]) for the resume thread's mode set in flight, if any, and
/// keeps any other from being made until the process exits: called by the terminal guard
/// before it puts back the mode from before the chat, at the chat's end. Returns whether the
/// guard is to put it back: not in the background of an orphaned process group without an
/// end signal, where the mode set (SIGTTOU blocked on this thread) would go through to the
/// terminal of whatever job has it, as it did not before (the kernel failed it, `EIO`).
///
/// A chat that ends in the background for a reason of its own (the room closed, the server
/// gone) first waits there for `fg`, as it does for anything else ([`wait_for_the_terminal`]):
/// the terminal is the shell's, or another job's (an editor's, say), whose mode the guard's
/// restore and the closing lines would have trampled. An end signal (a shell's `kill %1`)
/// ends it there, as it always did. Then the chat is marked as ending ([`ending::ENDING`]):
/// from then on the handlers park the editor's thread ([`park_the_editor_at_the_end`])
/// rather than let the editor set its mode after the guard's.
pub(super) fn keep_the_mode_before_chat() -> bool {
    let waited = wait_for_the_terminal();
    let told_to_end = ending::ending();
    ending::ENDING.store(true, Ordering::SeqCst);
    if waited || within_the_window(REGAINED_AT.load(Ordering::SeqCst)) {
        // A handler that saw the terminal ours again before the end was marked went back to
        // the editor, which takes its raw mode at once: let that land before the guard's.
        std::thread::sleep(ending::STEP);
    }
    match crate::locks::lock_within(&MODE_SETS, MODE_SET_WAIT, Duration::from_millis(1)) {
        Some(held) => std::mem::forget(held),
        None => debug!("a mode set of the terminal is still in flight; restoring anyway"),
    }
    told_to_end || !in_background()
}

/// The editor's external printer `P`, made to wait while the chat runs in the background of
/// its terminal (continued there by `bg` or `kill -CONT`, or started there), where the shell
/// owns the screen: the lines wait for `fg` (or the end), then are drawn above the line as
/// ever. A terminal with `tostop` off lets a job write from the background, and the editor,
/// between two keys or after its own Ctrl+Z, writes whatever it is handed; the room's lines
/// were drawn over the shell's. (Meanwhile the feed holds at most [`crate::feed::MAX_QUEUED_BYTES`],
/// then the receiver waits, and the rest waits in the socket.) Not on a terminal that is not
/// ours, nor in an orphaned process group, where no `fg` can come: see [`in_background`] and
/// [`orphaned`].
pub(in crate::chat) struct InTheForeground<P>(pub(in crate::chat) P);

impl<P: rustyline::ExternalPrinter> rustyline::ExternalPrinter for InTheForeground<P> {
    fn print(&mut self, msg: String) -> rustyline::Result<()> {
        while in_background() && !orphaned() {
            std::thread::sleep(ending::STEP);
        }
        self.0.print(msg)
    }
}

/// Waits while the chat runs in the background of its terminal (not orphaned, and not told to
/// end by a signal); returns whether it waited. Called on the main thread as the chat ends:
/// by `finish_closed` before it lets the editor draw the lines held meanwhile, and by the
/// terminal guard ([`keep_the_mode_before_chat`]).
pub(super) fn wait_for_the_terminal() -> bool {
    let mut waited = false;
    while in_background() && !orphaned() && !ending::ending() {
        if !waited {
            debug!("the chat is over; waiting for the terminal, another group's, before using it");
        }
        std::thread::sleep(ending::STEP);
        waited = true;
    }
    waited
}

/// The thread the editor reads on, while it runs ([`EditorThread`]).
static EDITOR_THREAD: Mutex<Option<libc::pthread_t>> = Mutex::new(None);

/// How the last stop came, as the SIGTSTP handler saw it ([`Stop`]); forgotten on the
/// SIGCONT that finds the terminal ours. A stop asked from elsewhere while a handler waits
/// in the background ([`stop_as_asked`]) leaves it as it was: it is still how the terminal
/// was left, and so whether the handler turned the editor's bracketed paste off since the
/// editor last turned it on (not [`Stop::Unseen`]), which [`leaving_the_prompt_line`] reads.
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
/// arriving redrew the line without it). So SIGTSTP is blocked in the main thread before the
/// chat's helper threads start (they inherit it; and every thread of the client starts with
/// it blocked whoever starts it: `threads::spawn`) and unblocked on the input thread alone,
/// where the editor's `kill` then stops the process before it returns, as in a program of
/// one thread. Called by the main thread when the editor is used.
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
    // And, as in every thread the client starts from here on (`threads::spawn`), SIGTTIN and
    // SIGTTOU, which only the input thread takes: the terminal guard's restore of the mode,
    // at an end signal, goes through from the background.
    crate::threads::keep_terminal_signals_to_their_threads();
    set.add(Signal::SIGTTIN);
    set.add(Signal::SIGTTOU);
    if let Err(e) = set.thread_block() {
        debug!("cannot block the job-control signals: {e}");
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
    // tcflush, write, sigaction, raise, pthread_sigmask, sigpending, sigismember, tcgetpgrp,
    // getpgrp, getpid, getppid, getsid, poll, pause, clock_gettime, kill; errno saved and
    // put back) and reads a static set before it is installed.
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
/// [`LAST_STOP`] for [`redraw_on_resume`]. In an orphaned process group ([`orphaned`]:
/// `ssh -t host ocm`, `setsid -c ocm`, a shell gone) the kernel drops the stop, so the
/// handler leaves the terminal alone: its mode, the keys typed ahead and bracketed paste. A
/// chat told to end ([`ending::ending`]) is not stopped either: it is on its way out, and
/// this thread waits here for that ([`park_the_editor_at_the_end`]).
extern "C" fn on_sigtstp(_: libc::c_int) {
    let errno = Errno::last_raw();
    if ending::above_an_end_signals_handler() {
        // An end signal came with this stop: its handler, below this one, runs once this one
        // returns, and no stop is made (see `ending::above_an_end_signals_handler`).
        Errno::set_raw(errno);
        return;
    }
    park_the_editor_at_the_end();
    if orphaned() {
        Errno::set_raw(errno);
        return;
    }
    // A `kill -TSTP` to a chat running in the background (after `bg`) finds the terminal the
    // shell's: its mode is not the chat's to change (from here the change would wait for
    // `fg`, and the stop come only after it), and no mode is put back once continued; the
    // stop is one no handler saw, and a `fg` has the resume thread take the editor's mode and
    // draw the line.
    let ours = !in_background();
    let mut found = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills `found` when it returns 0; tcsetattr reads a whole termios.
    let found = ours
        .then(|| unsafe {
            (libc::tcgetattr(libc::STDIN_FILENO, found.as_mut_ptr()) == 0)
                .then(|| found.assume_init())
        })
        .flatten();
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
    let seen = if !ours {
        Stop::Unseen
    } else if in_editor {
        Stop::InEditor
    } else {
        Stop::Elsewhere
    };
    LAST_STOP.store(seen as u8, Ordering::SeqCst);
    if let Some(before) = MODE_BEFORE_CHAT.get().filter(|_| ours) {
        // TCSAFLUSH: the shell reads the terminal as soon as the process stops, and would
        // run what `ocm` had not read (keys typed after the editor's Ctrl+Z, the rest of a
        // paste) as commands. The terminal's own Ctrl+Z discards that input too (ISIG
        // without NOFLSH), so a stop drops the same whichever way it comes.
        set_mode(libc::STDIN_FILENO, libc::TCSAFLUSH, before);
        discard_unread_input();
    }
    stop();
    // Continued in the background (`bg`; or the SIGCONT a shell's `kill %1` sends after its
    // SIGTERM, so that the job can act on it): setting the mode from there would wait
    // (SIGTTOU) for `fg` in a handler of its own. The chat waits here, running, until `fg` (then
    // sets the mode and has the line drawn again) or the end (then goes on to its
    // `__LEAVE__` and exit, with the terminal, still the shell's, left in the mode it stopped
    // in); its printer waits too ([`InTheForeground`]). It used to stop again after 200 ms,
    // which a `kill %1` coming just then could leave stopped for good (see
    // `ending::on_terminal_from_the_background`). (On a terminal that is not ours there is no
    // foreground group to wait for: see `in_background`; and in an orphaned process group no
    // `fg` can come: see `orphaned`.)
    let mut regained = false;
    if in_background() && !orphaned() {
        let wait =
            || wait_in_the_background(|| !in_background(), a_stop_asked, orphaned, sleep_a_step);
        match waiting_in_the_background(wait) {
            // The signal watcher and the main loop end the chat and the process (within
            // the watcher's grace). This thread waits for that here: returned to, the
            // editor would draw its line over the shell's screen.
            Waited::Ended => loop {
                // SAFETY: pause is async-signal-safe.
                unsafe { libc::pause() };
            },
            Waited::Foreground => regained = true,
            Waited::LetThrough | Waited::StopAsked => {}
        }
    }
    if let Some(found) = found {
        set_mode(libc::STDIN_FILENO, libc::TCSADRAIN, &found);
    }
    if regained {
        foreground_regained();
    }
    Errno::set_raw(errno);
}

/// What the terminal guard writes to leave the editor's prompt line at the end of a chat that
/// was reading one, once the mode from before the chat is back. In the foreground: bracketed
/// paste off (the editor turns it on for each line it reads) and a new line, so that what
/// follows (the closing notice, the shell's prompt) starts on a line of its own. In the
/// background (an end signal there: a chat that ends there for a reason of its own waits for
/// `fg` first) the screen and the line are the shell's, its prompt drawn already: no new
/// line under it, and bracketed paste off only after a stop that no handler saw (a SIGSTOP,
/// which leaves the editor's on; or a `kill -TSTP` in the background, after which it may be);
/// after a stop the handler saw, it turned it off itself, and turned off again it would be
/// bash's own, for the prompt bash shows.
pub(super) fn leaving_the_prompt_line() -> &'static [u8] {
    farewell_to_the_prompt_line(in_background(), Stop::last())
}

/// [`leaving_the_prompt_line`], given whether the chat is in the background and how the
/// last stop came.
fn farewell_to_the_prompt_line(in_background: bool, last_stop: Stop) -> &'static [u8] {
    /// [`BRACKETED_PASTE_OFF`], then a new line.
    const AND_A_NEW_LINE: &[u8] = b"\x1b[?2004l\n";
    if !in_background {
        AND_A_NEW_LINE
    } else if last_stop == Stop::Unseen {
        BRACKETED_PASTE_OFF
    } else {
        b""
    }
}

/// Set while a handler on the editor's thread waits in the background
/// ([`wait_in_the_background`]): a SIGCONT then (a `bg`, or dash's `fg` before the wait has
/// seen it) is left to the handler, which tells the resume thread once the terminal is ours
/// ([`foreground_regained`]).
static WAITING_IN_THE_BACKGROUND: AtomicBool = AtomicBool::new(false);

/// The monotonic clock's nanoseconds when a wait in the background last ended with the
/// terminal ours again ([`foreground_regained`]); 0 before.
static REGAINED_AT: AtomicU64 = AtomicU64::new(0);

/// [`REGAINED_AT`] as the resume thread last took it up ([`regain_to_answer`]): for
/// [`REGAINED_WINDOW`] after it, a SIGCONT that finds no stop noted is that `fg`'s
/// ([`answered_a_regain_lately`]).
static REGAIN_ANSWERED: AtomicU64 = AtomicU64::new(0);

/// When the resume thread last settled a stop in the foreground (drew the line again, or
/// left it to the editor): a regain noted before that was answered already, by the shell's
/// SIGCONT for the same `fg` ([`settled_since`]).
static SETTLED_AT: AtomicU64 = AtomicU64::new(0);

/// How long a regain waits to be answered ([`regain_to_answer`]), and how long after an
/// answered one a SIGCONT that finds no stop noted is taken for the same `fg`'s
/// ([`answered_a_regain_lately`]).
const REGAINED_WINDOW: Duration = Duration::from_millis(500);

/// Runs `wait` (a wait in the background, in a handler on the editor's thread) with
/// [`WAITING_IN_THE_BACKGROUND`] set, and again after each stop asked meanwhile, which it
/// makes ([`stop_as_asked`]: the handler holds SIGTSTP back, so a `kill -TSTP` waits for
/// it; the terminal, not ours, is left as it is, and a SIGCONT for the stop is left to the
/// wait, as any while it runs); once it ends with the terminal ours again, notes the regain
/// for the resume thread before the flag is cleared ([`foreground_regained`]). Never
/// returns [`Waited::StopAsked`]. Async-signal-safe, given a `wait` that is.
fn waiting_in_the_background(wait: impl Fn() -> Waited) -> Waited {
    WAITING_IN_THE_BACKGROUND.store(true, Ordering::SeqCst);
    let waited = loop {
        match wait() {
            Waited::StopAsked => stop_as_asked(),
            waited => break waited,
        }
    };
    if waited == Waited::Foreground {
        REGAINED_AT.store(monotonic_nanos().max(1), Ordering::SeqCst);
    }
    WAITING_IN_THE_BACKGROUND.store(false, Ordering::SeqCst);
    waited
}

/// Tells the resume thread, as a SIGCONT to the process does, that a wait in the background
/// ended with the terminal ours again ([`waiting_in_the_background`] noted when): a shell's
/// `fg` continues (SIGCONT) a job it saw stop, but bash gives a job that runs the terminal
/// with no signal at all, and the line is to be drawn again either way. A shell's SIGCONT
/// (dash sends one) that comes while the handler still waits is left to it; one that comes
/// after the regain was noted answers it, and this one then finds it answered and no stop
/// noted ([`answered_a_regain_lately`]); one that comes after this one was answered, the
/// same. Async-signal-safe (getpid, kill).
fn foreground_regained() {
    // SAFETY: a signal to this very process, which only the resume thread takes.
    unsafe { libc::kill(libc::getpid(), libc::SIGCONT) };
}

/// Whether a handler on the editor's thread waits in the background now.
fn waiting_in_the_background_now() -> bool {
    WAITING_IN_THE_BACKGROUND.load(Ordering::SeqCst)
}

/// The regain ([`waiting_in_the_background`]) waiting for the resume thread, if one was
/// noted less than [`REGAINED_WINDOW`] ago and not taken up yet (it is, now): when.
fn regain_to_answer() -> Option<u64> {
    let at = REGAINED_AT.load(Ordering::SeqCst);
    (within_the_window(at) && REGAIN_ANSWERED.swap(at, Ordering::SeqCst) != at).then_some(at)
}

/// Notes that the resume thread settled a stop in the foreground now.
fn settled_now() {
    SETTLED_AT.store(monotonic_nanos().max(1), Ordering::SeqCst);
}

/// Whether the resume thread settled a stop at or after the monotonic instant `at`.
fn settled_since(at: u64) -> bool {
    SETTLED_AT.load(Ordering::SeqCst) >= at
}

/// Whether the regain the resume thread last answered was noted less than
/// [`REGAINED_WINDOW`] ago.
fn answered_a_regain_lately() -> bool {
    within_the_window(REGAIN_ANSWERED.load(Ordering::SeqCst))
}

/// Waits in the background ([`wait_in_the_background`]) until the terminal is no longer
/// another group's, the end comes, or the process group is orphaned: the resume thread's
/// wait, which makes no stop (a SIGTSTP pending there is the editor's thread's to take).
/// Async-signal-safe.
fn wait_for_the_foreground() -> Waited {
    wait_in_the_background(|| !in_background(), || false, orphaned, sleep_a_step)
}

/// Whether the monotonic instant `at` (0: never) is less than [`REGAINED_WINDOW`] ago.
fn within_the_window(at: u64) -> bool {
    let window = u64::try_from(REGAINED_WINDOW.as_nanos()).unwrap_or(u64::MAX);
    at != 0 && monotonic_nanos().saturating_sub(at) < window
}

/// The monotonic clock, in nanoseconds. Async-signal-safe.
fn monotonic_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec; CLOCK_MONOTONIC is always there.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Sets the mode of the terminal `fd` (standard input), again if a signal handler that does
/// not restart calls interrupts it: the editor's, for SIGWINCH, which
/// `resume::wake_the_editor` sends to this very thread when the process is continued, while
/// the mode set from the background waits for `fg` (see [`redraw_on_resume`]). From a
/// signal handler: async-signal-safe.
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
/// runs, so raised it waits until unblocked, and then, the default action put in place
/// meanwhile ([`stop_as_asked`]), stops the process; continued, the signal is blocked again
/// and the handler put back. An end that came since the stop was decided ([`ending::ending`],
/// looked at once more between the raise and the unblock) discards it instead: the SIGCONT
/// that would undo it (see `ending::start_the_continuer`) may be the one a stop made now
/// would discard.
fn stop() {
    let _ = signal::raise(Signal::SIGTSTP);
    stop_as_asked();
}

/// The stop a SIGTSTP pending on the editor's thread asks for, made with SIGTSTP's default
/// action as [`stop`] makes its own, from a handler that holds the signal back (SIGTSTP's,
/// or SIGTTIN's and SIGTTOU's in the background: `kill -TSTP` while it waits there). Nothing
/// is raised: a SIGCONT since the stop was seen pending discarded it, and none is made.
/// Async-signal-safe.
fn stop_as_asked() {
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: the default action, then the SIGTSTP handler again; both async-signal-safe.
    // Ignoring a signal discards it where it is pending.
    unsafe {
        let _ = signal::sigaction(Signal::SIGTSTP, &default);
        if ending::ending() {
            let _ = signal::sigaction(Signal::SIGTSTP, &ignore);
        } else {
            let _ = tstp().thread_unblock();
            let _ = tstp().thread_block();
        }
        let _ = signal::sigaction(Signal::SIGTSTP, &sigtstp_action());
    }
}

thread_local! {
    /// Set on the editor's thread while it is known as such ([`EditorThread`]), for the
    /// signal handlers that run on it: see [`park_the_editor_at_the_end`]. (A constant
    /// initialiser and no destructor: a plain thread-local read, safe in a handler.)
    static ON_THE_EDITORS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is the editor's ([`ON_THE_EDITORS_THREAD`]). Async-signal-safe.
fn on_the_editors_thread() -> bool {
    ON_THE_EDITORS_THREAD.with(std::cell::Cell::get)
}

/// Once the chat is told to end, keeps the editor's thread, in one of its signal handlers,
/// from going back to the editor: returned to, the editor would set the terminal's mode
/// again (its raw mode after its own Ctrl+Z, the mode it found when a read let through by the
/// end fails), which could land after the terminal guard had put back the mode from before
/// the chat, and leave the shell's terminal without echo. The signal watcher and the main
/// loop end the chat and the process (within the watcher's grace). Does nothing on any other
/// thread, or before the end. Async-signal-safe.
fn park_the_editor_at_the_end() {
    if !on_the_editors_thread() || !ending::ending() {
        return;
    }
    let_the_end_through();
    loop {
        // SAFETY: pause is async-signal-safe.
        unsafe { libc::pause() };
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

/// Whether another process group has the terminal: the chat runs in the background of a
/// shell's job control. Not so on a terminal that is not our controlling one (`tcgetpgrp`
/// fails: `ocm` started with `setsid`, or given another terminal by a shell on its own,
/// `ocm </dev/pts/B >/dev/pts/B`): there is no foreground group there to wait for. (The stop
/// itself is real there, unless the process group is orphaned, as with `setsid`: see
/// [`orphaned`].) Without that distinction the SIGTSTP handler waited for ever for a
/// foreground that never comes, and the editor read nothing more. Async-signal-safe.
fn in_background() -> bool {
    // SAFETY: plain system calls on standard input, which stays open.
    let group = unsafe { libc::tcgetpgrp(libc::STDIN_FILENO) };
    group >= 0 && group != unsafe { libc::getpgrp() }
}

/// Set when the editor's read of the terminal failed (`EIO`) in the background: the kernel
/// fails such a read in an orphaned process group (SIGTTIN is not ignored then, nor blocked
/// on the input thread), whatever [`orphaned`]'s look at the parents says (a wrapper script
/// in a group of its own, its own parent gone, leaves the chat's group orphaned though the
/// chat's parent is in the session): the terminal guard would otherwise wait for a `fg` that
/// can never come ([`wait_for_the_terminal`]).
static READ_FAILED_IN_THE_BACKGROUND: AtomicBool = AtomicBool::new(false);

/// Notes that the editor's read failed with `EIO`: in the background, before any end, the
/// kernel's word that the process group is orphaned ([`READ_FAILED_IN_THE_BACKGROUND`]).
pub(super) fn a_read_failed_with_eio() {
    if in_background() && !ending::ending() {
        READ_FAILED_IN_THE_BACKGROUND.store(true, Ordering::SeqCst);
    }
}

/// Whether our process group is orphaned, as near as `ocm` can tell from itself: it leads
/// its own session (started with `setsid`, or by `ssh`, `docker exec -t` and the like), or
/// its parent is in another session (the process that started the chat is gone and init or
/// a subreaper took the chat in: a shell killed, or a subshell that ran `ocm`). In an
/// orphaned process group the kernel drops the stop of SIGTSTP, SIGTTIN and SIGTTOU, and
/// fails a read or a mode set of the terminal from the background with `EIO`; no shell can
/// continue a job there, so a SIGSTOP lasts until a `kill -CONT` by hand. A chat there
/// waits for no foreground and stops nothing: its next call on the terminal fails, which
/// ends its input.
///
/// A group is orphaned when none of its members has a parent in another group of the same
/// session. A chat whose parent is in the session but in the chat's own group (a wrapper
/// script, run without job control) is taken for not orphaned, as it is while the
/// wrapper's own parent lives; that case waits as before. The opposite mistake takes a job
/// of several processes whose middle one died (`sleep 600 | (ocm ... </dev/tty; :)`, the
/// subshell killed: the `sleep`'s parent still holds the group): a call on the terminal from
/// the background, let through for it, then comes back with the kernel's SIGTTIN or
/// SIGTTOU, which proves the group is not orphaned, and waits as any other (see
/// `ending::on_terminal_from_the_background`). A parent outside our pid namespace
/// (`getppid` gives 0) tells nothing. From signal handlers: `getpid`, `getppid` and `getsid`
/// are plain system calls that touch only `errno`, which the handlers keep (`getsid` is not
/// on POSIX's list of async-signal-safe functions; glibc and musl make it the bare call).
fn orphaned() -> bool {
    if READ_FAILED_IN_THE_BACKGROUND.load(Ordering::SeqCst) {
        return true;
    }
    // SAFETY: plain system calls; a parent gone meanwhile gives -1, another session too.
    unsafe {
        let own = libc::getsid(0);
        let parent = libc::getppid();
        own == libc::getpid() || (parent != 0 && libc::getsid(parent) != own)
    }
}
