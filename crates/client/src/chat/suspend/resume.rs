//! Coming back from a stop: the resume thread, which takes each SIGCONT, sets the editor's
//! mode again once the terminal is ours and has the editor draw its prompt and line anew,
//! waking its read (and waking it again, in case the first wake came too early).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use log::debug;
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios::{tcsetattr, SetArg, Termios};
use signal_hook::consts::SIGCONT;
use signal_hook::iterator::Signals;

use super::ending::{ending, Waited};
use super::{
    answered_a_regain_lately, editor_mode, in_background, regain_to_answer, settled_now,
    settled_since, wait_for_the_foreground, waiting_in_the_background_now, Stop, EDITOR_THREAD,
    LAST_STOP, MODE_BEFORE_CHAT, MODE_SETS, ON_THE_EDITORS_THREAD,
};
use crate::feed::Feed;
use crate::locks;

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
/// job stop, has the terminal), the process ran on unseen, and bash's `fg` continues
/// (SIGCONT) only a job that is stopped, so it got the terminal back with no signal, no
/// prompt and the shell's mode. Setting the editor's mode from the background now waits
/// for the terminal ([`take_editor_mode`]) until `fg`, after which the mode is set and the
/// line drawn. (After a SIGTSTP, the handler waits in the same way, and tells this thread of
/// the `fg` as a SIGCONT would: `foreground_regained`.)
///
/// Called on the thread the editor reads on, before it takes SIGTSTP (the watching thread
/// must not); the editor's thread is known as such until the guard returned is dropped.
pub(in crate::chat) fn redraw_on_resume(
    feed: Feed,
    reading: Arc<AtomicBool>,
) -> io::Result<EditorThread> {
    let mut signals = Signals::new([SIGCONT])?;
    let again = spawn_rewaker(Arc::clone(&reading))?;
    crate::threads::spawn("resume", move || {
        // Blocked in every other thread (see `suspend_on_input_thread`), and in this one
        // until here (`threads::spawn`).
        let mut cont = SigSet::empty();
        cont.add(Signal::SIGCONT);
        if let Err(e) = cont.thread_unblock() {
            debug!("cannot unblock SIGCONT: {e}");
        }
        while signals.forever().next().is_some() {
            if on_resume(&feed, &reading, &again) {
                // A SIGCONT that came meanwhile was for the stop just settled, not a
                // second one: the `fg` that ended the wait for the terminal before the
                // mode was set, a regain's, or, on a busy machine, the `fg` after the
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
pub(in crate::chat) struct EditorThread;

impl EditorThread {
    pub(super) fn here() -> EditorThread {
        // SAFETY: no precondition.
        *editor_thread() = Some(unsafe { libc::pthread_self() });
        ON_THE_EDITORS_THREAD.with(|on| on.set(true));
        EditorThread
    }
}

impl Drop for EditorThread {
    fn drop(&mut self) {
        *editor_thread() = None;
        ON_THE_EDITORS_THREAD.with(|on| on.set(false));
    }
}

/// The editor's thread, locked.
pub(super) fn editor_thread() -> std::sync::MutexGuard<'static, Option<libc::pthread_t>> {
    locks::lock(&EDITOR_THREAD)
}

/// Makes the editor's thread go back to waiting for a key or a line to print, where it
/// takes the redraw asked for. It may be inside a read of the terminal instead, where the
/// external printer waits for the next key: a read begun in the background (keys typed to
/// the shell wake the editor there too) waits there (SIGTTIN) for `fg`, and then for a key
/// the shell has already read. A SIGWINCH to that thread
/// ends its read (the editor's handler for it does not restart reads) and makes the editor
/// read the terminal's size again, as after its own Ctrl+Z: the terminal may have been
/// resized while the shell had it, and told only the shell.
fn wake_the_editor() {
    let thread = editor_thread();
    if let Some(thread) = *thread {
        // SAFETY: the thread is alive: it forgets itself (under this lock) before it ends.
        unsafe { libc::pthread_kill(thread, libc::SIGWINCH) };
        #[cfg(test)]
        WAKES_SENT.fetch_add(1, Ordering::SeqCst);
    }
}

/// The wakes [`wake_the_editor`] sent, for tests: counted where they are sent, as the
/// signals themselves are not (two pending at once are one, and a test elsewhere in the
/// process may have put its own handler in).
#[cfg(test)]
pub(super) static WAKES_SENT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// What [`redraw_on_resume`] does on each SIGCONT; whether it settled a stop with the
/// terminal ours (a stop the handler saw, or one it asked a redraw for).
pub(super) fn on_resume(feed: &Feed, reading: &AtomicBool, again: &mpsc::Sender<()>) -> bool {
    resume_given(feed, reading, again, in_background)
}

/// [`on_resume`], given whether another process group has the terminal (`in_background`).
pub(super) fn resume_given(
    feed: &Feed,
    reading: &AtomicBool,
    again: &mpsc::Sender<()>,
    in_background: impl Fn() -> bool,
) -> bool {
    if ending() {
        // Continued to end (a shell's `kill %1`): nothing to draw, and no mode to take.
        return true;
    }
    if waiting_in_the_background_now() {
        // A `bg`, or a shell's `fg` the handler waiting in the background has not seen yet:
        // it tells this thread once the terminal is ours (`foreground_regained`).
        return false;
    }
    let regained = regain_to_answer();
    let stop = Stop::last();
    if let Some(at) = regained {
        if settled_since(at) {
            // The shell's SIGCONT for the same `fg` came first and settled the stop.
            return true;
        }
    } else if stop == Stop::Unseen && answered_a_regain_lately() {
        // The shell's SIGCONT for the `fg` whose regain was answered just now.
        return true;
    }
    if regained.is_some() {
        // The handler's wait ended with the terminal ours: settle the stop it waited after
        // as a SIGCONT in the foreground would (after the editor's own Ctrl+Z it draws its
        // line itself; after `kill -TSTP` the handler gave the editor's mode back), or,
        // after none noted (a read begun in the background), take the editor's mode, which
        // a shell may have changed, and draw the line.
        LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
        settled_now();
        if stop == Stop::Elsewhere || !reading.load(Ordering::SeqCst) {
            return true;
        }
        if stop == Stop::Unseen {
            take_editor_mode();
        }
        draw_again(feed, again);
        return true;
    }
    if stop != Stop::Unseen {
        if in_background() {
            // Continued in the background (`bg`): the handler waits there, running, until
            // `fg`, then tells this thread as a SIGCONT would (`foreground_regained`).
            // (On a terminal that is not ours no group has the terminal, and a SIGCONT
            // always ends the stop: asked whether we are in the foreground, which there we
            // never are, it ended none, and no later stop was drawn again for.)
            return false;
        }
        LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
        settled_now();
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
            // Told to end while waiting in the background to set the mode: the terminal is
            // still the shell's, and the line must not be drawn over its screen.
            return true;
        }
        if waiting_in_the_background_now() {
            // The editor's read waits in the background too: it tells this thread once it
            // sees the terminal ours, and that word draws the line (drawn here too, it was
            // drawn twice).
            return false;
        }
    }
    settled_now();
    draw_again(feed, again);
    true
}

/// Has the editor draw its prompt and line again ([`Feed::redraw`]) and wakes it to do so,
/// now and on the rewaker's schedule.
fn draw_again(feed: &Feed, again: &mpsc::Sender<()>) {
    feed.redraw();
    wake_the_editor();
    // The rewaker has gone only if its thread did (a panic): then this wake is the one.
    let _ = again.send(());
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
/// returned; one during a schedule starts it again). The rewaker takes neither SIGTSTP nor
/// SIGCONT (`threads::spawn`).
///
/// Once wake is not always enough. The editor's thread, waiting in a read of the terminal
/// begun in the background (SIGTTIN), and the resume thread both go on at the same `fg`.
/// The wake's SIGWINCH can come just after the kernel, bringing the editor's thread back
/// from the handler, has decided to restart that read and before the read runs again:
/// its handler then runs, notes the signal for a `select` that is not running, and the read
/// starts again, waiting for a key, with the redraw asked for left until one comes (one run
/// in 120–240 of `after_a_sigstop_and_fg_the_editor_takes_its_mode_and_draws_its_line_again`
/// under six-fold load). A SIGWINCH that finds the editor waiting where it should makes it
/// read the terminal's size, and draw nothing if that did not change; one that finds it in
/// the restarted read ends the read, and the editor takes the redraw. (One that finds it
/// still in `ending::on_terminal_from_the_background` cuts that wait's step short, and the
/// wait, looking again, finds the terminal ours and ends: a later one finds it in the read.)
/// No wake is sent while
/// keys wait unread: the editor is not stuck then, it reads them, and a signal in the middle
/// of an escape sequence would cut it in two.
pub(super) fn spawn_rewaker(reading: Arc<AtomicBool>) -> io::Result<mpsc::Sender<()>> {
    let (again, asked) = mpsc::channel::<()>();
    crate::threads::spawn("rewake", move || {
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
pub(super) fn keys_waiting(fd: libc::c_int) -> bool {
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given.
    let asked = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) };
    asked == 0 && unread > 0
}

/// Sets the editor's raw mode, whatever the mode found (a shell may have given the
/// terminal its own). From the background it first waits ([`wait_for_the_foreground`]) until
/// the terminal is no longer another group's, within a step of that wait (50 ms at most) of
/// a shell's `fg`, however long that takes; told to end meanwhile, or orphaned there, it sets
/// nothing. It waits here rather than in the kernel's SIGTTOU, which this thread blocks (see
/// `threads::keep_terminal_signals_to_their_threads`): the kernel sends that signal to the
/// whole process, and a signal for this thread's call, taken by the input thread (or the
/// input thread's, by this one) left each waiting on the other's behalf, and once let the
/// input thread go back to the editor from the background with the resume thread waiting.
fn take_editor_mode() {
    let Some(before) = MODE_BEFORE_CHAT.get() else {
        return;
    };
    // TCSADRAIN, as the editor does: what was typed meanwhile is the editor's to read.
    let mode = Termios::from(editor_mode(before));
    // Held across the wait and the call: see `MODE_SETS`.
    let _setting = locks::lock(&MODE_SETS);
    if wait_for_the_foreground() != Waited::Foreground {
        // Told to end (nothing to draw), or orphaned in the background, where the mode set,
        // SIGTTOU blocked, would go through to the terminal of another group.
        return;
    }
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
