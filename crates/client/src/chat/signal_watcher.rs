//! The signal watcher thread: the first of SIGINT, SIGTERM, SIGHUP and SIGQUIT is told to
//! the main loop, which leaves; should the chat not have ended within a grace, this thread
//! says `__LEAVE__` itself and ends the process.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::warn;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

use super::{Event, Session};
use crate::error::ClientError;

/// How long the main loop gets to end the chat after a termination signal before the
/// signal thread ends it itself ([`after_signal`]).
const SIGNAL_GRACE: Duration = Duration::from_secs(3);

/// Reports the first termination signal to the main loop, which leaves: in `signalled`, which
/// the main loop reads on every pass (the event queue may be full of lines being paced out),
/// and as an event on both its queues to wake it (it waits on the [`super::Ahead`] one alone
/// while it holds the chat for a closure check). Should the chat not have ended
/// [`SIGNAL_GRACE`] later, the main loop is stuck: on the screen, which the receiver holds
/// while it waits for a standard output nobody reads (a pipe whose reader stopped, a stopped
/// terminal), and which the main loop takes to settle a room's closure, forged or not (its
/// remarks go around it: `remark_unheld`; without a closure, such an output holds the receiver
/// alone, and a signal ends the chat at once). (Standard error stops no thread: it is written
/// through a queue, [`crate::stderr`].) The keepalive thread would then keep us in the room for
/// as long as that lasts, so this thread says `__LEAVE__` itself and exits with
/// [`EXIT_FAILURE`](crate::error::EXIT_FAILURE), after a warning that standard error gets
/// [`SAY_WAIT`] to take. The line editor prints through a queue, never stuck, so a terminal in
/// raw mode is always given back by the main loop.
pub(super) fn spawn_signal_watcher(
    [events, ahead]: [SyncSender<Event>; 2],
    signalled: Arc<AtomicI32>,
    session: &Session,
) -> Result<(), ClientError> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
        .map_err(ClientError::io("installing signal handlers"))?;
    let session = session.duplicate().map_err(ClientError::io(
        "duplicating the UDP socket for the signal thread",
    ))?;
    crate::threads::spawn("signals", move || {
        if let Some(signal) = signals.forever().next() {
            // The main loop waits on the room's word alone while it holds the chat for a
            // closure check: wake it there too, after the flag, never waiting.
            signalled.store(signal, Ordering::SeqCst);
            let _ = ahead.try_send(Event::Signal(signal));
            if !after_signal(signal, (&signalled, &events), &session, SIGNAL_GRACE) {
                // The chat ended on the signal: the process ends within moments (`main`
                // waits at most `stderr::EXIT_DRAIN` for its last lines). Should the main
                // thread be stuck after that all the same, it must not keep the process
                // alive, with later signals caught and ignored.
                thread::sleep(SIGNAL_GRACE);
            }
            std::process::exit(crate::error::EXIT_FAILURE.into());
        }
    })
    .map_err(ClientError::io("starting the signal thread"))?;
    Ok(())
}

/// Tells the main loop of `signal` (the flag, then an event to wake it, unless the queue is
/// full: then it is busy and reads the flag within a pass) and waits up to `grace` for the
/// session to end; if it has not, says `__LEAVE__` and returns true (the caller exits).
pub(super) fn after_signal(
    signal: i32,
    (signalled, events): (&AtomicI32, &SyncSender<Event>),
    session: &Session,
    grace: Duration,
) -> bool {
    signalled.store(signal, Ordering::SeqCst);
    if let Err(mpsc::TrySendError::Disconnected(_)) = events.try_send(Event::Signal(signal)) {
        // The main loop has returned: the process is ending.
        return false;
    }
    if session.wait_ended(grace) {
        return false;
    }
    // The __LEAVE__ before any word: it is what matters.
    let line = match session.leave_unlogged() {
        Some(Err(e)) => format!(
            "the chat did not end within {grace:?} of signal {signal}, and __LEAVE__ could not be \
             sent: {e}"
        ),
        _ => format!("the chat did not end within {grace:?} of signal {signal}: left the room"),
    };
    // Written or not within the wait, the caller exits.
    let _ = say_within(line, SAY_WAIT);
    true
}

/// How long the signal thread waits for its last word to be written before exiting anyway.
const SAY_WAIT: Duration = Duration::from_millis(200);

/// Logs `line` as a warning and waits up to `wait` for standard error to take it, and what
/// was queued before it ([`crate::stderr::drain`]); whether it did. A standard error nobody
/// reads blocks neither the log line nor the wait, and neither does a thread stopped for
/// good while it held the logger's lock (the input thread, stopped by the terminal's Ctrl+Z
/// in the middle of a log line, then killed from the shell, waits in its SIGTSTP handler
/// for the process to end): the line is said on a thread of its own, which this one waits
/// for no longer than `wait`.
pub(super) fn say_within(line: String, wait: Duration) -> bool {
    let (said, heard) = mpsc::sync_channel(1);
    let saying = crate::threads::spawn("last-word", move || {
        warn!("{line}");
        let _ = said.send(crate::stderr::drain(wait));
    });
    saying.is_ok() && heard.recv_timeout(wait).unwrap_or(false)
}
