//! Stops, ends and resumes, against the process's own signals and pseudo-terminals.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::ending::*;
use super::resume::*;
use super::*;
use std::io::Write;
use std::os::fd::AsRawFd;

/// A SIGWINCH handler that does not restart the reads it interrupts, as the editor's.
extern "C" fn interrupt(_: libc::c_int) {}

/// Tests that set the editor's thread, SIGTTOU's action or [`LAST_STOP`] take turns.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    crate::locks::lock(&SERIAL)
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
                let read = unsafe { libc::read(reader.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
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
/// it), then no more until the next; and none while the editor reads no line. (Counted as
/// sent, not as reads they interrupted: a thread kept from its core between two reads
/// would miss a wake that came then, and two pending at once are one signal;
/// [`the_rewaker_ends_a_read_the_first_wake_missed`] shows a wake ends a read.)
#[test]
fn the_rewaker_wakes_three_times_a_request_and_never_when_no_line_is_read() {
    let _serial = serial();
    let editor = EditorInARead::start();
    let base = WAKES_SENT.load(Ordering::SeqCst);
    let wakes = || WAKES_SENT.load(Ordering::SeqCst) - base;
    let reading = Arc::new(AtomicBool::new(true));
    let again = spawn_rewaker(Arc::clone(&reading)).expect("the rewaker");
    again.send(()).expect("the rewaker listens");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while wakes() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 3 wakes came",
            wakes()
        );
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(600));
    let after_one_request = wakes();
    reading.store(false, Ordering::SeqCst);
    again.send(()).expect("the rewaker listens");
    thread::sleep(Duration::from_millis(600));
    let not_reading = wakes() - after_one_request;
    drop(again);
    editor.end();
    assert_eq!(
        after_one_request, 3,
        "more than three wakes for one request"
    );
    assert_eq!(not_reading, 0, "a wake while no line is read");
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

/// Puts back the regain bookkeeping of `foreground_regained` as a fresh chat has it.
fn no_regain_and_nothing_settled() {
    for at in [&REGAINED_AT, &REGAIN_ANSWERED, &SETTLED_AT] {
        at.store(0, Ordering::SeqCst);
    }
    WAITING_IN_THE_BACKGROUND.store(false, Ordering::SeqCst);
    LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
}

/// A wait in the background that ended with the terminal ours again (a regain, noted for the
/// resume thread with a SIGCONT of the process's own: bash's `fg` sends none to a job that
/// runs) settles the stop the handler waited after and draws the line, once: dash's SIGCONT
/// for the same `fg`, coming while the handler still waits, is left to it; coming after the
/// regain was noted, it answers the regain, and the process's own then draws nothing.
#[test]
fn a_regain_draws_the_line_once_whenever_the_shells_sigcont_comes() {
    let _serial = serial();
    let (feed, readline) = crate::feed::tests::one_slot_feed();
    let (again, _asked) = mpsc::channel();
    let reading = AtomicBool::new(true);
    for shells_while_waiting in [true, false] {
        no_regain_and_nothing_settled();
        LAST_STOP.store(Stop::InEditor as u8, Ordering::SeqCst);
        if shells_while_waiting {
            WAITING_IN_THE_BACKGROUND.store(true, Ordering::SeqCst);
            assert!(!resume_given(&feed, &reading, &again, || false), "settled");
            WAITING_IN_THE_BACKGROUND.store(false, Ordering::SeqCst);
        }
        REGAINED_AT.store(monotonic_nanos(), Ordering::SeqCst);
        assert!(
            resume_given(&feed, &reading, &again, || false),
            "not settled"
        );
        assert_eq!(Stop::last(), Stop::Unseen, "the stop not forgotten");
        assert!(
            resume_given(&feed, &reading, &again, || false),
            "not settled"
        );
        assert_eq!(
            readline.recv_timeout(Duration::from_secs(10)).as_deref(),
            Ok(crate::feed::REDRAW)
        );
        assert!(
            readline.recv_timeout(Duration::from_millis(200)).is_err(),
            "drawn twice, the shell's SIGCONT while the handler waited: {shells_while_waiting}"
        );
    }
    no_regain_and_nothing_settled();
    assert!(feed.close().is_empty());
}

/// While a handler waits in the background, a SIGCONT (a `bg`, or a shell's `fg` before the
/// wait has seen it) is left to it: nothing drawn or settled. A regain older than
/// [`REGAINED_WINDOW`] is not answered: a stop the handler saw, continued in the
/// background, is kept for the `fg` to come.
#[test]
fn a_sigcont_during_a_wait_in_the_background_and_a_stale_regain_settle_nothing() {
    let _serial = serial();
    let (feed, readline) = crate::feed::tests::one_slot_feed();
    let (again, _asked) = mpsc::channel();
    let reading = AtomicBool::new(true);
    no_regain_and_nothing_settled();
    LAST_STOP.store(Stop::InEditor as u8, Ordering::SeqCst);
    WAITING_IN_THE_BACKGROUND.store(true, Ordering::SeqCst);
    REGAINED_AT.store(monotonic_nanos(), Ordering::SeqCst);
    assert!(!resume_given(&feed, &reading, &again, || false), "settled");
    assert_eq!(Stop::last(), Stop::InEditor);
    WAITING_IN_THE_BACKGROUND.store(false, Ordering::SeqCst);
    let window = u64::try_from(REGAINED_WINDOW.as_nanos()).expect("a window in u64");
    REGAINED_AT.store(
        monotonic_nanos().saturating_sub(window + 1),
        Ordering::SeqCst,
    );
    assert!(!resume_given(&feed, &reading, &again, || true), "settled");
    assert_eq!(Stop::last(), Stop::InEditor);
    assert!(readline.recv_timeout(Duration::from_millis(200)).is_err());
    no_regain_and_nothing_settled();
    assert!(feed.close().is_empty());
}

/// Continued in the background after a stop the handler saw (`bg`), nothing is drawn
/// and nothing settled: the stop is kept for the `fg` to come.
#[test]
fn continued_in_the_background_after_a_seen_stop_nothing_is_drawn_or_settled() {
    let _serial = serial();
    let (feed, readline) = crate::feed::tests::one_slot_feed();
    let (again, asked) = mpsc::channel();
    for stop in [Stop::InEditor, Stop::Elsewhere] {
        for reading in [false, true] {
            LAST_STOP.store(stop as u8, Ordering::SeqCst);
            let settled = resume_given(&feed, &AtomicBool::new(reading), &again, || true);
            assert!(!settled, "{stop:?}, reading {reading}: settled");
            assert_eq!(Stop::last(), stop, "reading {reading}: the stop forgotten");
        }
    }
    LAST_STOP.store(Stop::Unseen as u8, Ordering::SeqCst);
    assert!(readline.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(asked.try_recv().is_err());
    assert!(feed.close().is_empty());
}

/// Continued where no other process group has the terminal (the foreground, or a terminal
/// that is not the controlling one, which has no foreground group) after a stop the
/// handler saw, the stop is settled and forgotten: after the editor's own Ctrl+Z
/// (`Elsewhere`) nothing is drawn, for the editor draws its line itself; after a SIGTSTP
/// from elsewhere while it reads (`InEditor`) the line is drawn again.
#[test]
fn continued_with_no_other_group_at_the_terminal_a_seen_stop_is_settled() {
    let _serial = serial();
    let (feed, readline) = crate::feed::tests::one_slot_feed();
    let (again, asked) = mpsc::channel();
    let reading = AtomicBool::new(true);
    LAST_STOP.store(Stop::Elsewhere as u8, Ordering::SeqCst);
    assert!(
        resume_given(&feed, &reading, &again, || false),
        "not settled"
    );
    assert_eq!(Stop::last(), Stop::Unseen, "the stop kept");
    assert!(readline.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(asked.try_recv().is_err(), "the rewaker told");
    LAST_STOP.store(Stop::InEditor as u8, Ordering::SeqCst);
    assert!(
        resume_given(&feed, &reading, &again, || false),
        "not settled"
    );
    assert_eq!(Stop::last(), Stop::Unseen, "the stop kept");
    assert_eq!(
        readline.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok(crate::feed::REDRAW)
    );
    assert_eq!(asked.try_recv(), Ok(()), "the rewaker not told");
    assert!(feed.close().is_empty());
}

/// Continued to end (an end signal pending), nothing is drawn and the stop is settled.
#[test]
fn continued_to_end_nothing_is_drawn() {
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
    // Nothing let through here: the editor's thread, waiting in a handler, parks there.
    assert!(after
        .iter()
        .all(|a| matches!(a.handler(), SigHandler::SigDfl)));
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

/// Runs [`wait_in_the_background`] with the process in the foreground as `foreground` says
/// on each look (given its number, from 1), a stop asked as [`a_stop_asked`] says, never let
/// through, with `step` run at each of its sleeps (given the step's number, from 1) in place
/// of the sleep; returns how it ended, the looks at the foreground and the sleeps asked for.
/// Fails past 10,000 sleeps (a wait that would never end).
fn wait_given(
    foreground: impl Fn(u32) -> bool,
    step: impl Fn(u32),
) -> (Waited, u32, Vec<Duration>) {
    let looks = std::cell::Cell::new(0);
    let sleeps = std::cell::RefCell::new(Vec::new());
    let waited = wait_in_the_background(
        || {
            looks.set(looks.get() + 1);
            foreground(looks.get())
        },
        a_stop_asked,
        || false,
        |sleep| {
            sleeps.borrow_mut().push(sleep);
            let taken = sleeps.borrow().len();
            assert!(taken <= 10_000, "the wait never ended");
            step(u32::try_from(taken).unwrap_or(u32::MAX));
        },
    );
    (waited, looks.get(), sleeps.into_inner())
}

/// With nothing coming, the wait goes on, running (it never stops the process: the stop a
/// `kill %1` coming just then left stopped for good), looking every [`QUICK_STEP`] for
/// [`QUICK_WAIT`], then every [`STEP`]; brought to the foreground, it ends there, at the look
/// after.
#[test]
fn the_wait_looks_often_at_first_then_less_and_ends_in_the_foreground() {
    let _serial = serial();
    let (waited, looks, sleeps) = wait_given(|look| look == 100, |_| {});
    assert_eq!((waited, looks, sleeps.len()), (Waited::Foreground, 100, 99));
    let quick = usize::try_from(QUICK_WAIT.as_millis() / QUICK_STEP.as_millis()).unwrap();
    assert!(
        sleeps[..quick].iter().all(|&s| s == QUICK_STEP),
        "{sleeps:?}"
    );
    assert!(sleeps[quick..].iter().all(|&s| s == STEP), "{sleeps:?}");
}

/// An end signal pending for the thread that waits (here a SIGHUP it blocks, sent to itself
/// at the third sleep) ends the wait at the next look, the foreground not looked at again.
/// The wait leaves SIGTTOU and SIGTTIN as they were: its caller decides (the editor's thread
/// parks, where a read let through would fail and the editor set its mode).
#[test]
fn an_end_signal_pending_ends_the_wait() {
    let _serial = serial();
    let mut ended = None;
    let after = with_default_background_actions(|| {
        ended = Some(wait_with_a_signal_at_the_third_sleep(
            Signal::SIGHUP,
            ending,
        ));
    });
    assert_eq!(ended, Some((Waited::Ended, 3, 3)));
    assert!(after
        .iter()
        .all(|a| matches!(a.handler(), SigHandler::SigDfl)));
}

/// An end already handled on another thread ([`ENDING`], which is how the chat's threads
/// hear of one: `sigpending` tells only of signals they block) ends the wait at once, even
/// in the foreground, SIGTTOU and SIGTTIN left as they were.
#[test]
fn an_end_handled_on_another_thread_ends_the_wait_at_once() {
    let _serial = serial();
    let mut ended = None;
    let after = with_default_background_actions(|| {
        ENDING.store(true, Ordering::SeqCst);
        ended = Some(wait_given(|_| true, |_| {}));
        ENDING.store(false, Ordering::SeqCst);
    });
    assert_eq!(ended, Some((Waited::Ended, 0, Vec::new())));
    assert!(after
        .iter()
        .all(|a| matches!(a.handler(), SigHandler::SigDfl)));
}

/// A SIGTSTP pending for the thread that waits (here one it blocks, sent to itself at the
/// third sleep, as a `kill -TSTP` waits while a handler holds it back) ends the wait at the
/// next look, after the foreground's, for the caller to make the stop; once taken, none is
/// asked.
#[test]
fn a_stop_pending_ends_the_wait_for_its_caller_to_make() {
    let _serial = serial();
    let ended = wait_with_a_signal_at_the_third_sleep(Signal::SIGTSTP, a_stop_asked);
    assert_eq!(ended, (Waited::StopAsked, 4, 3));
}

/// Runs [`wait_given`], never in the foreground, on a thread of its own that blocks `signal`
/// and sends it to itself at the third sleep; checks that `pending` says none is there
/// before the wait and once the signal is taken (so that it goes nowhere else); returns how
/// the wait ended, its looks at the foreground and its sleeps.
fn wait_with_a_signal_at_the_third_sleep(
    signal: Signal,
    pending: fn() -> bool,
) -> (Waited, u32, usize) {
    thread::spawn(move || {
        let mut blocked = SigSet::empty();
        blocked.add(signal);
        blocked.thread_block().expect("the signal blocked");
        assert!(!pending(), "nothing is pending yet");
        let (waited, looks, sleeps) = wait_given(
            |_| false,
            |sleep| {
                if sleep == 3 {
                    // SAFETY: a signal to this very thread, which blocks it.
                    unsafe { libc::pthread_kill(libc::pthread_self(), signal as libc::c_int) };
                }
            },
        );
        assert_eq!(blocked.wait(), Ok(signal));
        assert!(!pending());
        (waited, looks, sleeps.len())
    })
    .join()
    .expect("the waiting thread")
}

/// At the end of a chat that was reading a line, the terminal guard leaves the prompt line
/// with bracketed paste off and a new line in the foreground; in the background, where the
/// shell's prompt stands, with no new line, and with paste off only after a stop no handler
/// saw (which left the editor's on).
#[test]
fn the_prompt_line_is_left_with_a_new_line_only_in_the_foreground() {
    for stop in [Stop::Unseen, Stop::InEditor, Stop::Elsewhere] {
        assert_eq!(farewell_to_the_prompt_line(false, stop), b"\x1b[?2004l\n");
    }
    assert_eq!(
        farewell_to_the_prompt_line(true, Stop::Unseen),
        BRACKETED_PASTE_OFF
    );
    assert_eq!(farewell_to_the_prompt_line(true, Stop::InEditor), b"");
    assert_eq!(farewell_to_the_prompt_line(true, Stop::Elsewhere), b"");
}

/// Let through (an orphaned process group, where no `fg` can come), the wait ends at once,
/// after a look at the foreground and with the end not let through.
#[test]
fn let_through_the_wait_ends_without_the_foreground() {
    let _serial = serial();
    let looks = std::cell::Cell::new(0);
    let after = with_default_background_actions(|| {
        let waited = wait_in_the_background(
            || {
                looks.set(looks.get() + 1);
                false
            },
            || false,
            || true,
            |_| panic!("no sleep"),
        );
        assert_eq!(waited, Waited::LetThrough);
    });
    assert_eq!(looks.get(), 1);
    assert!(after
        .iter()
        .all(|a| matches!(a.handler(), SigHandler::SigDfl)));
}

/// A thread with an end signal blocked (as inside that signal's handler, which a handler
/// stacked above it runs before) is above an end signal's handler; with none, it is not.
#[test]
fn an_end_signal_blocked_in_the_thread_is_a_handler_below() {
    thread::spawn(|| {
        assert!(!above_an_end_signals_handler());
        let mut term = SigSet::empty();
        term.add(Signal::SIGTERM);
        term.thread_block().expect("SIGTERM blocked");
        assert!(above_an_end_signals_handler());
        term.thread_unblock().expect("SIGTERM unblocked");
        assert!(!above_an_end_signals_handler());
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

/// Set for the test process [`a_stop_made_after_an_end_signal_is_undone`] starts.
const STOPPED_AFTER_THE_END: &str = "OCM_TEST_STOPPED_AFTER_THE_END";

/// A chat's process stopped once an end signal has come (a stop decided just before it, made
/// just after) goes on all the same, with no SIGCONT from anyone: the end signal's handler
/// has the kernel continue it ([`CONTINUE_EVERY`]). Run in a process of its own
/// ([`stopped_after_an_end_signal`]), which installs the chat's handlers and stops itself.
#[test]
fn a_stop_made_after_an_end_signal_is_undone() {
    let test = "chat::suspend::tests::stopped_after_an_end_signal";
    let mut child = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            test,
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(STOPPED_AFTER_THE_END, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the test process");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("its status") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id()));
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process stopped after its end signal never went on: {stat:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let output = child.wait_with_output().expect("its output");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(status.success(), "{status}: {said}");
    // It ran the test, rather than finding no test of that name.
    assert!(said.contains("1 passed"), "{said}");
}

/// Not a test on its own: the process [`a_stop_made_after_an_end_signal_is_undone`] starts,
/// which installs the chat's end-signal handlers, takes an end signal, then stops itself,
/// and passes once continued. Ignored, so that it is not counted as a test that passed.
#[test]
#[ignore = "run by a_stop_made_after_an_end_signal_is_undone, in a process of its own"]
fn stopped_after_an_end_signal() {
    assert!(
        std::env::var_os(STOPPED_AFTER_THE_END).is_some(),
        "run by a_stop_made_after_an_end_signal_is_undone only: it installs signal handlers \
         in the process and stops it"
    );
    watch_for_the_end();
    // SAFETY: raise is always safe; the chat's handler takes SIGTERM.
    unsafe { libc::raise(libc::SIGTERM) };
    assert!(ENDING.load(Ordering::SeqCst));
    // SAFETY: as above; no handler or mask holds SIGSTOP back.
    unsafe { libc::raise(libc::SIGSTOP) };
}
