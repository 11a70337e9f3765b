//! What a chat asks the server over TCP: whether a notice that the room closed is true (on a
//! checker thread per question, so that nothing waits for the answer), and once, whether the
//! server hears our datagrams at all.

use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use std::{io, thread};

use log::{debug, warn};
use ucrp::datagram::REGISTER;

use super::input_thread::TerminalGuard;
use super::session::Session;
use super::{finish_closed, lock, output_gone, Event, Options};
use crate::error::ClientError;
use crate::handshake::Token;
use crate::render::Flow;
use crate::screen::Screen;
use crate::{closure, reach};

/// Asks the server, on a thread of its own, whether it hears our datagrams, and warns once if
/// it does not ([`reach`]). Nothing waits for it: the chat goes on either way.
pub(super) fn spawn_reach_check(session: &Session, options: &Options, screen: Arc<Mutex<Screen>>) {
    let session = match session.duplicate() {
        Ok(session) => session,
        Err(e) => {
            debug!("no check that the server hears us: cannot clone the UDP socket: {e}");
            return;
        }
    };
    let (tcp, username) = (options.tcp, options.username.clone());
    let started = thread::Builder::new()
        .name("ocm-reach".into())
        .spawn(move || {
            let ask = || reach::ask(tcp, &session.room_name, &session.token, &username);
            thread::sleep(reach::FIRST_LOOK);
            match ask() {
                reach::Heard::No => {}
                reach::Heard::Yes => return debug!("the server hears this client"),
                reach::Heard::Unknown => return debug!("cannot tell if the server hears us"),
            }
            debug!("the server has no UDP address for us yet: registering again");
            if let Err(e) = session.send_control(REGISTER) {
                debug!("registering again failed: {e}");
            }
            thread::sleep(reach::SECOND_LOOK);
            match ask() {
                reach::Heard::No => lock(&screen).err(&reach::warning(session.server)),
                heard => debug!("the server hears us on the second look: {heard:?}"),
            }
        });
    if let Err(e) = started {
        debug!("no check that the server hears us: cannot start its thread: {e}");
    }
}

/// How a closure notice was settled.
pub(super) enum Settled {
    /// We stay in the room, for now if a check is on its way.
    Stay,
    /// The closure is believed: the session ends.
    Closed,
    /// Printing failed.
    Failed(io::Error),
}

/// Asks the server whether a closure notice is true, each time on a thread of its own that
/// reports the [`closure::Verdict`] as an [`Event::Verdict`]. The main loop waits for it like
/// for any event, so a server that takes its time (up to the connect and reply timeouts)
/// holds up neither keepalives, nor typed lines, nor a way out.
pub(super) struct Checker {
    /// The daemon's TCP address.
    pub(super) tcp: SocketAddr,
    pub(super) room_name: String,
    pub(super) token: Token,
    pub(super) events: SyncSender<Event>,
}

impl Checker {
    /// Starts one check.
    fn start(&self) -> io::Result<()> {
        let (tcp, room_name, token) = (self.tcp, self.room_name.clone(), self.token.clone());
        let events = self.events.clone();
        thread::Builder::new()
            .name("ocm-check".into())
            .spawn(move || {
                // Whatever happens to the check, the main loop hears a verdict: without one
                // the screen would hold the chat for good.
                let mut answer = Answer {
                    events,
                    verdict: closure::Verdict::Unknown,
                };
                answer.verdict = closure::check(tcp, &room_name, &token);
                debug!("closure check: {:?}", answer.verdict);
            })
            .map(drop)
    }
}

/// Sends its verdict to the main loop when dropped: when the check returns, and also if it
/// panicked, with [`closure::Verdict::Unknown`] (believe the notice).
pub(super) struct Answer {
    pub(super) events: SyncSender<Event>,
    pub(super) verdict: closure::Verdict,
}

impl Drop for Answer {
    fn drop(&mut self) {
        // The main loop has gone when this fails: the process is ending.
        let _ = self.events.send(Event::Verdict(self.verdict));
    }
}

/// Follows `action` ([`closure::Policy`]) as far as it goes now: starts a check when told to
/// (its verdict comes back as an event), reopens the screen when staying (which may meet
/// another closure among the datagrams held meanwhile, a notice in its turn).
pub(super) fn settle(
    mut action: closure::Action,
    closures: &mut closure::Policy,
    checker: &Checker,
    screen: &Mutex<Screen>,
) -> Settled {
    loop {
        action = match action {
            closure::Action::Check => match checker.start() {
                // The screen holds what comes until the verdict.
                Ok(()) => return Settled::Stay,
                Err(e) => {
                    warn!("cannot start a thread to check the room's closure: {e}");
                    closures.verdict(Instant::now(), closure::Verdict::Unknown)
                }
            },
            closure::Action::Wait => return Settled::Stay,
            closure::Action::Stay { forged } => {
                match lock(screen).reopen(forged.then_some(FORGED_CLOSURE)) {
                    Ok(Flow::Continue) => return Settled::Stay,
                    // Closed again (by a datagram held meanwhile): a notice of its own.
                    // Waiting for a planned check, the screen stays held until then, and the
                    // main loop goes on (signals, keepalives, that check).
                    Ok(Flow::RoomClosed) => match closures.notice(Instant::now()) {
                        closure::Action::Stay { .. } => return Settled::Stay,
                        next => next,
                    },
                    Err(e) => return Settled::Failed(e),
                }
            }
            closure::Action::Close => return Settled::Closed,
        };
    }
}

/// What `run` returns after a settled notice, if the session ends.
pub(super) fn end_on(
    settled: Settled,
    session: &Session,
    screen: &Mutex<Screen>,
    terminal: &mut Option<TerminalGuard>,
) -> Option<Result<(), ClientError>> {
    match settled {
        Settled::Stay => None,
        Settled::Closed => {
            finish_closed(screen, terminal.take());
            Some(Ok(()))
        }
        Settled::Failed(source) if output_gone(&source) => {
            debug!("standard output closed: leaving");
            session.leave();
            Some(Ok(()))
        }
        Settled::Failed(source) => {
            session.leave();
            Some(Err(ClientError::Io {
                context: "writing to standard output",
                source,
            }))
        }
    }
}

/// The remark shown when a closure turns out to be forged.
const FORGED_CLOSURE: &str =
    "* ignored a notice that the room closed: the server says we are still in it (forged?)";
