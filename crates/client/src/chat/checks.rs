//! What a chat asks the server over TCP, each question on a thread of its own so that nothing
//! waits for the answer, and what the main loop makes of the answers:
//! - the closure check: whether a notice that the room closed is true ([`Checker`]), and
//!   what follows from the notice and the verdict ([`settle`], [`end_on`]);
//! - the idle check: after a silence, whether we are still a member ([`Liveness`]), and the
//!   line that ends a session the server no longer counts us in ([`gone_line`]);
//! - the outage remark: once per outage, that the server's UDP port refused a datagram
//!   ([`Outage`], [`port_closed`]);
//! - the reach check: once, shortly after registering, whether the server hears our
//!   datagrams at all ([`spawn_reach_check`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use std::{io, thread};

use log::{debug, warn};
use tcrp::ErrorCode;

use super::input_thread::TerminalGuard;
use super::session::Session;
use super::{finish_closed, leave, lock, output_gone, remark, Ahead, Ending, Event, Options};
use crate::error::ClientError;
use crate::handshake::Token;
use crate::render::{printable_name, Flow};
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
    let started = crate::threads::spawn("reach", move || {
        let ask = || reach::ask(tcp, &session.room_name, &session.token, &username);
        thread::sleep(reach::FIRST_LOOK);
        match ask() {
            reach::Heard::No => {}
            reach::Heard::Yes => return debug!("the server hears this client"),
            reach::Heard::Unknown => return debug!("cannot tell if the server hears us"),
        }
        debug!("the server has no UDP address for us yet: registering again");
        match session.register() {
            Ok(true) => {}
            // The chat ended meanwhile: nothing to warn about.
            Ok(false) => return,
            Err(e) => debug!("registering again failed: {e}"),
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
    /// The closure is believed: the session ends, with a `__LEAVE__` unless the server
    /// `confirmed` it.
    Closed {
        /// The server said the room is gone or we are no longer in it.
        confirmed: bool,
    },
    /// Printing failed.
    Failed(io::Error),
}

/// Asks the server whether a closure notice is true, each time on a thread of its own that
/// reports the [`closure::Verdict`] as an [`Event::Verdict`], sent [`Ahead`] of queued lines.
/// The main loop waits for it like for any event, so a server that takes its time (up to the
/// connect and reply timeouts) holds up neither typed lines nor a way out.
pub(super) struct Checker {
    /// The daemon's TCP address.
    pub(super) tcp: SocketAddr,
    pub(super) room_name: String,
    pub(super) token: Token,
    pub(super) events: Ahead,
}

impl Checker {
    /// Starts one closure check; its verdict comes back as an [`Event::Verdict`].
    fn start(&self) -> io::Result<()> {
        // A check that fails without a verdict believes the notice.
        let unknown = Event::Verdict(closure::Verdict::Unknown);
        self.spawn("check", unknown, |tcp, room_name, token| {
            let verdict = closure::check(tcp, room_name, token);
            debug!("closure check: {verdict:?}");
            Event::Verdict(verdict)
        })
    }

    /// Starts one idle check ([`Liveness`]): whether we are still a member. Its answer comes
    /// back as an [`Event::Membership`].
    fn start_membership(&self) -> io::Result<()> {
        self.spawn(
            "idle-check",
            Event::Membership(None),
            |tcp, room_name, token| {
                let answer = closure::ask(tcp, room_name, token);
                debug!("idle check: {answer:?}");
                Event::Membership(Some(answer))
            },
        )
    }

    /// Runs `job` with the daemon's TCP address, our room name and token on a thread named
    /// `name`, and sends its event [`Ahead`]; `fallback` instead if the job panics. Whatever
    /// happens to the check, the main loop hears an answer: without one it would wait for
    /// good (a closure check holds the chat, an idle check is never made again).
    fn spawn(
        &self,
        name: &str,
        fallback: Event,
        job: impl FnOnce(SocketAddr, &str, &Token) -> Event + Send + 'static,
    ) -> io::Result<()> {
        let (tcp, room_name, token) = (self.tcp, self.room_name.clone(), self.token.clone());
        let events = self.events.clone();
        crate::threads::spawn(name, move || {
            let mut answer = AnswerOnDrop {
                events,
                answer: fallback,
            };
            answer.answer = job(tcp, &room_name, &token);
        })
        .map(drop)
    }
}

/// The idle check: after [`Options::idle_check`] without a datagram from the server (which
/// does not answer keepalives, so a room that vanished, or expired us while we were
/// stopped, falls silent), ask the server over TCP whether we are still a member
/// ([`closure::ask`]). A confirmed end ends the session; an unreachable server is reported
/// once, until it answers again. A check is also made at once when the server's UDP port
/// turns out to be closed ([`Liveness::check_now`]).
pub(super) struct Liveness {
    /// Silence after which to ask.
    period: Duration,
    /// When the receiver last handed a datagram from the server to the screen.
    last_heard: Arc<Mutex<Instant>>,
    /// When the last idle check answered (or the session started).
    last_answer: Instant,
    /// When a check last found the server again after "cannot reach the server" was said:
    /// the server is back. (Not every answer: a server answering over TCP while its UDP port
    /// refuses us, a wrong `--udp-port`, has not come back from anything.)
    back_at: Option<Instant>,
    /// A check is due now, whatever the silence.
    now: bool,
    /// A check is in flight.
    checking: bool,
    /// "cannot reach the server" was said since the server last answered.
    told_unreachable: bool,
    /// The server cannot answer the check (`unsupported_operation`): no more are made.
    off: bool,
}

/// What the main loop does after an idle check's answer.
pub(super) enum Membership {
    /// Still a member, or nothing to tell: go on.
    GoOn,
    /// The server says we are no longer in the room: the session ends with this line.
    Gone(String),
}

impl Liveness {
    /// Checks after `period` of silence, as the receiver notes it in `last_heard`.
    pub(super) fn new(period: Duration, last_heard: Arc<Mutex<Instant>>) -> Liveness {
        Liveness {
            period,
            last_heard,
            last_answer: Instant::now(),
            back_at: None,
            now: false,
            checking: false,
            told_unreachable: false,
            off: false,
        }
    }

    /// When the next check is due, unless one is in flight.
    pub(super) fn due_at(&self) -> Option<Instant> {
        if self.checking || self.off {
            return None;
        }
        if self.now {
            return Some(self.last_answer);
        }
        let heard = *lock(&self.last_heard);
        Some(heard.max(self.last_answer) + self.period)
    }

    /// Makes a check due now (unless one is in flight: its answer will do), for the
    /// existing answers to apply: "cannot reach the server" once, or the end of the session
    /// if the server came back without the room.
    pub(super) fn check_now(&mut self) {
        self.now = !self.checking;
    }

    /// When a check last found the server back after it could not be reached.
    pub(super) fn back_at(&self) -> Option<Instant> {
        self.back_at
    }

    /// Starts a check if one is due.
    pub(super) fn poll(&mut self, now: Instant, checker: &Checker) {
        if self.due_at().is_some_and(|at| now >= at) {
            self.now = false;
            match checker.start_membership() {
                Ok(()) => self.checking = true,
                Err(e) => {
                    warn!("cannot start a thread to check our membership: {e}");
                    self.last_answer = now;
                }
            }
        }
    }

    /// The answer to a check.
    /// `None`: the check failed without an answer (its thread panicked).
    pub(super) fn answer(
        &mut self,
        answer: Option<Result<(), ClientError>>,
        room_name: &str,
        screen: &Mutex<Screen>,
        editor: bool,
    ) -> Membership {
        self.checking = false;
        self.last_answer = Instant::now();
        let Some(answer) = answer else {
            return Membership::GoOn;
        };
        match answer {
            Ok(()) => {
                if std::mem::replace(&mut self.told_unreachable, false) {
                    self.back_at = Some(self.last_answer);
                    // Said, as its going was: the user knows when typing is worth it again.
                    remark(screen, editor, "* the server answers again");
                }
                Membership::GoOn
            }
            Err(e) if closure::is_gone(&e) => Membership::Gone(gone_line(room_name, &e)),
            Err(ClientError::QueryRefused {
                code: Some(ErrorCode::RateLimited),
                ..
            }) => Membership::GoOn,
            // A server without the history request (not ocmd, or an older one): it answered,
            // and will answer the same every time.
            Err(ClientError::QueryRefused {
                code: Some(ErrorCode::UnsupportedOperation),
                ..
            }) => {
                self.off = true;
                remark(
                    screen,
                    editor,
                    "* the server cannot say whether you are still in the room \
                     (unsupported_operation); idle checks are off",
                );
                Membership::GoOn
            }
            Err(e) => {
                if !std::mem::replace(&mut self.told_unreachable, true) {
                    let what = match e {
                        ClientError::QueryRefused { .. } => "the server refused the idle check",
                        _ => "cannot reach the server",
                    };
                    remark(screen, editor, &format!("* {what}: {e}"));
                }
                Membership::GoOn
            }
        }
    }
}

/// Whether the user was told that the server's UDP port refused our datagrams (a port
/// unreachable, [`icmp`](super::icmp)): once per outage, that is until the server is heard
/// from again (a datagram, or an idle check answered after one could not reach it).
#[derive(Debug, Default)]
pub(super) struct Outage {
    /// When the user was last told.
    told_at: Option<Instant>,
}

impl Outage {
    /// Our datagram was refused at `now`; the server was last heard from at `heard`. Whether
    /// to tell the user (then make an idle check now).
    pub(super) fn refused(&mut self, now: Instant, heard: Instant) -> bool {
        if self.told_at.is_some_and(|told| heard <= told) {
            return false;
        }
        self.told_at = Some(now);
        true
    }
}

/// The remark on a refused datagram ([`Outage`]): `server` is the server's UDP address.
pub(super) fn port_closed(server: SocketAddr) -> String {
    format!(
        "* the server's UDP port {server} is closed (is the server down or restarting? is \
         --udp-port right?): what you send until it is back is lost"
    )
}

/// The line that ends a session the server no longer counts us in.
pub(super) fn gone_line(room_name: &str, error: &ClientError) -> String {
    let why = match error {
        ClientError::QueryRefused {
            code: Some(ErrorCode::NotMember),
            ..
        } => "the server no longer counts you as a member (not_member)",
        _ => "the server no longer has the room (room_not_found)",
    };
    format!(
        "* you are no longer in room {}: {why}",
        printable_name(room_name)
    )
}

/// Sends `answer` to the main loop when dropped: when a check's thread returns, and also if
/// the check panicked, with the fallback the answer was first set to.
pub(super) struct AnswerOnDrop {
    pub(super) events: Ahead,
    /// The check's answer once it has one; until then, what the main loop hears.
    pub(super) answer: Event,
}

impl Drop for AnswerOnDrop {
    fn drop(&mut self) {
        let answer = std::mem::replace(&mut self.answer, Event::Wake);
        // The main loop has gone when this fails: the process is ending.
        let _ = self.events.send(answer);
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
                    // main loop goes on (signals, typed lines, that check).
                    Ok(Flow::RoomClosed) => match closures.notice(Instant::now()) {
                        closure::Action::Stay { .. } => return Settled::Stay,
                        next => next,
                    },
                    Err(e) => return Settled::Failed(e),
                }
            }
            closure::Action::Close { confirmed } => return Settled::Closed { confirmed },
        };
    }
}

/// What `run` returns after a settled notice, if the session ends.
pub(super) fn end_on(
    settled: Settled,
    session: &Session,
    screen: &Mutex<Screen>,
    terminal: &mut Option<TerminalGuard>,
) -> Option<Result<Ending, ClientError>> {
    match settled {
        Settled::Stay => None,
        Settled::Closed { confirmed } => {
            // Unconfirmed, the room may still hold us: say we go, rather than leave the
            // others waiting for our timeout. What the send did is logged once the
            // terminal is given back (see `leave`).
            let sent = if confirmed {
                session.end_without_leave();
                None
            } else {
                session.leave_unlogged()
            };
            finish_closed(screen, terminal.take());
            session.log_leave(sent);
            Some(Ok(Ending::RoomEnded))
        }
        Settled::Failed(source) if output_gone(&source) => {
            debug!("standard output closed: leaving");
            leave(session, terminal);
            Some(Ok(Ending::Left))
        }
        Settled::Failed(source) => {
            leave(session, terminal);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::screen::tests::Recorder;

    fn refused(code: ErrorCode) -> Option<Result<(), ClientError>> {
        Some(Err(ClientError::QueryRefused {
            what: "read the history of room \"lobby\"".into(),
            code: Some(code),
            message: None,
        }))
    }

    fn unreachable() -> Option<Result<(), ClientError>> {
        Some(Err(ClientError::Connect {
            addr: "127.0.0.1:9090".into(),
            source: io::ErrorKind::ConnectionRefused.into(),
            first: false,
        }))
    }

    #[test]
    fn idle_check_answers_end_the_session_only_when_the_server_says_we_are_gone() {
        let rec = Recorder::default();
        let screen = Mutex::new(Screen::new("lobby", Box::new(rec.clone()), false));
        let mut live = Liveness::new(
            Duration::from_secs(60),
            Arc::new(Mutex::new(Instant::now())),
        );
        let ask = |live: &mut Liveness, answer| {
            live.checking = true;
            let m = live.answer(answer, "lobby", &screen, false);
            assert!(!live.checking, "a new check may start");
            m
        };
        for gone in [ErrorCode::RoomNotFound, ErrorCode::NotMember] {
            assert!(matches!(
                ask(&mut live, refused(gone)),
                Membership::Gone(line) if line.contains("no longer in room lobby")
            ));
        }
        // Busy, panicked, unreachable (said once until the server answers), refused.
        for answer in [
            refused(ErrorCode::RateLimited),
            None,
            unreachable(),
            unreachable(),
            Some(Ok(())),
            refused(ErrorCode::MalformedRequest),
        ] {
            assert!(matches!(ask(&mut live, answer), Membership::GoOn));
        }
        let said = rec.lines();
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(said[0].starts_with("err: * cannot reach the server: cannot connect"));
        assert_eq!(said[1], "err: * the server answers again");
        assert!(said[2].starts_with("err: * the server refused the idle check"));
        assert!(live.due_at().is_some());
        // A server without the request: said once, and no more checks.
        assert!(matches!(
            ask(&mut live, refused(ErrorCode::UnsupportedOperation)),
            Membership::GoOn
        ));
        assert!(rec.lines()[3].contains("idle checks are off"));
        assert_eq!(live.due_at(), None);
    }

    /// A refused datagram is told once per outage: again only after the server was heard
    /// from (a datagram, or a check answered) since the last time it was told.
    #[test]
    fn a_closed_port_is_told_once_per_outage() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut outage = Outage::default();
        assert!(outage.refused(at(10), t0), "the first refusal");
        assert!(!outage.refused(at(20), t0), "the same outage");
        assert!(!outage.refused(at(30), at(10)), "heard before it was told");
        assert!(outage.refused(at(40), at(35)), "heard since: a new outage");
        assert!(!outage.refused(at(50), at(35)));
        let remark = port_closed("127.0.0.1:9091".parse().unwrap());
        assert!(remark.starts_with("* the server's UDP port 127.0.0.1:9091 is closed"));
    }

    /// A check made due at once starts on the next poll, whatever the silence, and only
    /// once; a server found again after it could not be reached is back.
    #[test]
    fn a_check_due_now_starts_at_once() {
        let heard = Arc::new(Mutex::new(Instant::now()));
        let mut live = Liveness::new(Duration::from_secs(3600), Arc::clone(&heard));
        let now = Instant::now();
        assert!(live
            .due_at()
            .is_some_and(|at| at > now + Duration::from_secs(60)));
        live.check_now();
        assert!(live.due_at().is_some_and(|at| at <= Instant::now()));
        // In flight: no other is due, and asking for one now waits for its answer.
        live.checking = true;
        live.now = false;
        live.check_now();
        assert_eq!(live.due_at(), None);
        let rec = Recorder::default();
        let screen = Mutex::new(Screen::new("lobby", Box::new(rec.clone()), false));
        let answer = |live: &mut Liveness, answer| {
            live.checking = true;
            assert!(matches!(
                live.answer(answer, "lobby", &screen, false),
                Membership::GoOn
            ));
        };
        answer(&mut live, Some(Ok(())));
        assert_eq!(live.back_at(), None, "it had not been away");
        answer(&mut live, unreachable());
        assert_eq!(live.back_at(), None);
        answer(&mut live, Some(Ok(())));
        assert!(live.back_at().is_some(), "back");
        assert!(live
            .due_at()
            .is_some_and(|at| at > now + Duration::from_secs(60)));
        // Its going and its coming back, each said once.
        answer(&mut live, Some(Ok(())));
        let lines = rec.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("err: * cannot reach the server"),
            "{lines:?}"
        );
        assert_eq!(lines[1], "err: * the server answers again");
    }
}
