//! Ctrl+Z in the line editor: which thread stops the process, and in which terminal mode
//! the shell gets the terminal back.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use log::debug;
use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::Termios;

/// The terminal mode before the chat, the one the terminal guard puts back: the mode the
/// process stops in. Plain data, read by the SIGTSTP handler.
static MODE_BEFORE_CHAT: OnceLock<libc::termios> = OnceLock::new();

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
pub(super) fn suspend_on_input_thread() {
    if let Err(e) = tstp().thread_block() {
        debug!("cannot block SIGTSTP: {e}");
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
/// reads stops in that mode too, and gets raw mode back, though the line is not redrawn.
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
/// the quiet one between two lines, or the one the editor's Ctrl+Z left, from which it
/// takes raw mode again.
extern "C" fn on_sigtstp(_: libc::c_int) {
    let errno = Errno::last_raw();
    let mut found = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills `found` when it returns 0; tcsetattr reads a whole termios.
    let found = unsafe {
        (libc::tcgetattr(libc::STDIN_FILENO, found.as_mut_ptr()) == 0).then(|| found.assume_init())
    };
    if let Some(before) = MODE_BEFORE_CHAT.get() {
        // TCSAFLUSH: the shell reads the terminal as soon as the process stops, and would
        // run what `ocm` had not read (keys typed after the editor's Ctrl+Z, the rest of a
        // paste) as commands. The terminal's own Ctrl+Z discards that input too (ISIG
        // without NOFLSH), so a stop drops the same whichever way it comes.
        // SAFETY: as above.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, before) };
    }
    stop();
    if let Some(found) = found {
        // SAFETY: as above.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, &found) };
    }
    Errno::set_raw(errno);
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
