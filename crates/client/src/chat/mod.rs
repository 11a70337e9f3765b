//! The UDP half of a session: register, chat, keep alive, leave; and the chat's commands.
//!
//! [`Session`] owns the UDP socket and turns text into datagrams with [`ucrp::datagram`].
//! [`run`] is the chat loop. Four helper threads feed it [`Event`]s and the main thread alone
//! decides what to send, keepalives apart (below). The events come on two queues: the input
//! thread's lines, sent at the chat's pace, and the room's word ([`Ahead`]), read first:
//! - the *receiver* reads datagrams, ignores any whose source is not the server, hands them
//!   to the shared [`Screen`] (which renders and prints them) and reports the room's closing,
//!   and each datagram of ours that the server's closed UDP port refused ([`icmp`]);
//! - the *output watcher*, when standard output is a pipe or a socket, reports that its
//!   reader went away, which a quiet room would otherwise not show until its next line
//!   ([`output`]);
//! - the *input thread* reads typed lines, either line by line from standard input or, when
//!   standard input and output are a terminal, through a `rustyline` editor whose external
//!   printer keeps incoming messages above the line being typed. It answers the local
//!   commands (`/help`, `/who`, `/history`), each query on a short-lived TCP connection, so
//!   neither the receiver nor the keepalive waits on one; with the line editor the queries
//!   go to an *asking* thread instead (each on a short-lived thread of its own, so that
//!   a slow answer can be announced), and the editor keeps the terminal while the server
//!   answers (`commands`); chat text and `/quit` go to the main thread.
//!   On `ocm join` the recent history is fetched first (with the line editor, by the asking
//!   thread while the editor already reads) and releases the screen, which held the live
//!   messages meanwhile. With the line editor, a *resume* thread has the editor take its
//!   mode and draw its line again after a stop it did not see, and a *rewake* thread wakes
//!   the editor again over the next quarter second, for a wake that came as it went back
//!   into a read (`suspend`);
//! - the *signal watcher* reports SIGINT, SIGTERM, SIGHUP and SIGQUIT, so that Ctrl+C,
//!   `kill`, a closed terminal and Ctrl+\\ all leave the room properly instead of waiting for
//!   the server's timeout (an `--original` member has none: it would stay until the room
//!   closed).
//!
//! Two more kinds of thread are short-lived: before a notice that the room closed is believed,
//! a *checker* asks the server over TCP ([`closure`]) and reports its verdict as an event.
//! Meanwhile the main loop sends no chat line, from the moment the receiver reads the notice
//! ([`Ahead::notices`]): the lines wait for the verdict, and go if the room is still open,
//! but for [`HOLD_LIMIT`] at most, so a server slow to answer holds up neither the chat nor
//! `/quit` for long. And once, shortly after registering, a *reach check* asks the server
//! whether it hears our datagrams at all ([`reach`](crate::reach)), and warns if it does not.
//!
//! The *keepalive* thread resends `__REGISTER__` every keepalive period, which also re-teaches
//! a restarted daemon our address, and tells the main loop when one cannot be sent (the network
//! gone), once per run of failures. It is a thread of its own so that nothing the main loop may
//! wait on (the screen's lock, held by a receiver blocked on a stopped terminal or an unread
//! pipe; a paced burst of chat) can make the server expire us. Every way out sends `__LEAVE__`
//! except an end the server confirmed (a closure it confirmed, or `room_not_found` /
//! `not_member` answered to `/who`, `/history` or an idle check), where the room does not hold
//! us any more; either way the session is marked ended first, and no `__REGISTER__` follows
//! ([`Session::leave`]).
//!
//! The server does not answer keepalives, so a room that vanished falls silent: after
//! [`Options::idle_check`] without a datagram from the server, the main loop asks it over TCP
//! whether we are still a member (`checks::Liveness`), on a thread like the closure checks.
//! A datagram refused by the server's UDP port (the daemon down or restarting) is told at
//! once, once per outage (`checks::Outage`), and makes that check at once.
//!
//! Remarks and log lines go to standard error through a queue written by a thread of its own
//! ([`crate::stderr`]), so that none of these threads waits for a standard error nobody reads.
//!
//! Every thread the client starts is named for its job alone, without a prefix (`receiver`,
//! `keepalive`, `input`, `asking`, `check`, `idle-check`, ...): they show under the `ocm`
//! process already, the kernel keeps only 15 bytes of a name, and tests find them by these
//! names.
//!
//! The work is split by thread: this module is the main loop (`run`) and what it does itself
//! (sending, the end of the session); `session` is the UDP endpoint and the keepalive
//! thread; `icmp` the ICMP errors its socket hears of; `receiver` the receiver thread;
//! `output` the output watcher; `signal_watcher` the signal watcher; `input_thread` the input
//! thread and the line editor; `suspend` its stops and resumes; `commands` the local
//! commands it answers; `checks` what is asked of the server over TCP during a chat.

mod checks;
mod commands;
mod icmp;
mod input_thread;
mod output;
mod receiver;
mod session;
mod signal_watcher;
mod suspend;

pub use session::Session;
use session::{spawn_keepalive, Unsent};

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::closure;
use crate::error::ClientError;
use crate::handshake::Verb;
use crate::locks::lock;
use crate::pacing::{self, Pacer};
use crate::query::HistoryPager;
use crate::render::printable_name;
use crate::screen::{to_stderr, OwnSends, PlainPrinter, Screen};
use checks::{
    end_on, port_closed, settle, spawn_reach_check, Checker, Liveness, Membership, Outage,
};
use commands::{too_long, Asker, Commands};
use input_thread::{spawn_input, TerminalGuard};
use output::spawn_output_watcher;
use receiver::spawn_receiver;
use signal_watcher::spawn_signal_watcher;
#[cfg(test)]
use signal_watcher::{after_signal, say_within};
use suspend::{suspend_on_input_thread, wait_for_the_terminal, watch_for_the_end};

/// Events the main loop may have waiting on each of its two queues. Bounded, so that piped
/// input waits for the sends instead of queueing without end, and `/quit` or the end of
/// input is acted on after at most this many sends (about 1.4 s at the chat's pace,
/// [`pacing`]), not after the whole pipe. A signal and the room's word ([`Ahead`]) do not
/// wait for them.
const EVENT_QUEUE: usize = 64;

/// How long chat lines wait, at most, while a closure notice is being confirmed
/// ([`Chat::holding`]): the check is one TCP round trip, but a server that takes the
/// connection and never answers would otherwise hold the chat, and `/quit` or the end of
/// input behind it, for the check's 20 s of timeouts. Past this the lines go as before.
const HOLD_LIMIT: Duration = Duration::from_secs(2);

/// What the helper threads tell the main loop.
#[derive(Debug)]
enum Event {
    /// Chat text to send to the room.
    Send(String),
    /// `/quit`, or Ctrl+C in the line editor.
    Quit,
    /// Standard input reached its end (Ctrl+D in the line editor).
    Eof,
    /// A termination signal arrived.
    Signal(i32),
    /// A datagram said that the room closed or that we timed out (printed, or kept until
    /// the closure is believed).
    RoomClosed,
    /// The server's answer to a closure check ([`Checker`]).
    Verdict(closure::Verdict),
    /// The server's answer to an idle check ([`Liveness`]).
    Membership(Option<Result<(), ClientError>>),
    /// The server's UDP port refused a datagram of ours ([`icmp`]): nothing listens there.
    Refused,
    /// A keepalive could not be sent at all (the network gone: no route to the server); told
    /// once per run of failures (`session::Failures`).
    Unsendable(io::Error),
    /// The server answered `/who`, `/history` or the join's history with `room_not_found` or
    /// `not_member`: the session ends with this line.
    Gone(String),
    /// A helper thread hit an error it cannot go on after.
    Failed(ClientError),
    /// Nothing in itself: an event was sent [`Ahead`], and the main loop, if it was waiting
    /// for the queue of lines, reads it now.
    Wake,
}

/// Sends the main loop the events that must not wait behind the lines queued to be sent:
/// the room's word (a closure notice, the answers to the closure and idle checks, the
/// server saying we are no longer in the room) and the failures that end the chat (standard
/// output gone, the socket failing). Used by every helper thread but the input thread,
/// whose lines, `/quit` and end of input keep their order, and the keepalive and signal
/// threads, which never wait for the main queue (`signal_watcher::after_signal`).
///
/// The input thread keeps the main queue full while a pipe of lines is paced out
/// ([`EVENT_QUEUE`] lines, about 1.4 s at the chat's pace). A closure notice sent there
/// waited for all of them, and the closure check's answer for as many more: `ocm` exited
/// some 2.9 s after the host left, having sent about 130 lines into the closed room. These
/// events go to a queue of their own, which the main loop reads before the main queue on
/// every pass, and an [`Event::Wake`] on the main queue wakes it if it waits there. A full
/// main queue takes no wake and needs none: the main loop is busy with it, and reads this
/// queue on its next pass, at most one line's pace (about 22 ms) later.
#[derive(Clone)]
struct Ahead {
    ahead: SyncSender<Event>,
    /// The main queue, to wake the main loop on; `None` when the two are one (in tests).
    wake: Option<SyncSender<Event>>,
    /// How many [`Event::RoomClosed`] were sent, counted before each is queued: the main
    /// loop sends no chat line while it has handled fewer ([`Chat::holding`]), so none
    /// leaves between the receiver reading a closure notice and the main loop acting on it.
    notices: Arc<AtomicU64>,
}

impl Ahead {
    /// Sends `event` ahead of the queued lines; an error when the main loop has gone.
    fn send(&self, event: Event) -> Result<(), mpsc::SendError<Event>> {
        if matches!(event, Event::RoomClosed) {
            self.notices.fetch_add(1, Ordering::SeqCst);
        }
        self.ahead.send(event)?;
        if let Some(wake) = &self.wake {
            // Full: the main loop is busy and reads `ahead` within a pass. Disconnected: it
            // has gone.
            let _ = wake.try_send(Event::Wake);
        }
        Ok(())
    }
}

/// One channel for everything, in order, without wakes: for tests that read the events.
impl From<SyncSender<Event>> for Ahead {
    fn from(events: SyncSender<Event>) -> Ahead {
        Ahead {
            ahead: events,
            wake: None,
            notices: Arc::default(),
        }
    }
}

/// How a chat ended without an error (the exit status tells them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The user left: `/quit`, the end of input, a signal, or the reader of our output gone.
    Left,
    /// The room ended the chat: it was closed, or the server no longer holds us.
    RoomEnded,
}

/// How a chat runs, beyond the session itself.
#[derive(Debug, Clone)]
pub struct Options {
    /// Whether the room was created or joined (for the greeting line).
    pub verb: Verb,
    /// The member's name (for the greeting line).
    pub username: String,
    /// Time between keepalives.
    pub keepalive: Duration,
    /// The daemon's TCP address, for `/who` and `/history`.
    pub tcp: SocketAddr,
    /// Fetch and show the recent history before the live messages.
    pub join_history: bool,
    /// Read input through the line editor (standard input and output are a terminal).
    pub line_editor: bool,
    /// Before believing a datagram saying that the room closed or that we timed out, ask the
    /// server over TCP ([`closure`]). Off with `--original`: the original server has no such
    /// request.
    pub check_closures: bool,
    /// Shortly after registering, ask the server over TCP whether it has our UDP address,
    /// and warn if it never does ([`reach`](crate::reach)). Off with `--original`.
    pub check_reach: bool,
    /// After this long without a datagram from the server, ask it over TCP whether we are
    /// still a member ([`Liveness`]). `None` with `--original`: the original server cannot
    /// answer.
    pub idle_check: Option<Duration>,
    /// The server is the original one (`--original`): datagrams are read as its frames only,
    /// and `/who` and `/history`, which it cannot answer, are not sent.
    pub original: bool,
}

/// Runs the chat until the user leaves or the host closes the room. Prints
/// `* joined ROOM as NAME (type /quit to leave, /help for commands)` to standard error once
/// registered.
pub fn run(session: Session, options: Options) -> Result<Ending, ClientError> {
    Chat::start(session, options)?.serve()
}

/// A chat under way: the session, the channel the helper threads feed, and what the main
/// loop keeps between events.
struct Chat {
    session: Session,
    inbox: Receiver<Event>,
    /// What was sent [`Ahead`] of the lines in `inbox`, read first.
    ahead: Receiver<Event>,
    /// The signal watcher's last signal (0: none), read before each event.
    signalled: Arc<AtomicI32>,
    screen: Arc<Mutex<Screen>>,
    own: OwnSends,
    closures: closure::Policy,
    /// When the receiver last handed a datagram from the server to the screen.
    last_heard: Arc<Mutex<Instant>>,
    liveness: Option<Liveness>,
    outage: Outage,
    /// Restores the terminal mode however we leave, even while the editor holds it raw.
    terminal: Option<TerminalGuard>,
    checker: Checker,
    pacer: Pacer,
    /// The closure notices the receiver has sent ([`Ahead::notices`]).
    notices: Arc<AtomicU64>,
    /// The closure notices handled so far.
    notices_handled: u64,
    /// A chat line held while a closure notice is being confirmed ([`Chat::holding`]):
    /// sent if the room turns out open, dropped if it closed.
    held: Option<String>,
    /// When the chat was first held for the closure notice being confirmed.
    hold_started: Option<Instant>,
}

/// The screen the chat prints through, set up for the options, and the record of our own
/// sends it reads before it renders ([`OwnSends`]).
fn open_screen(session: &Session, options: &Options) -> (Arc<Mutex<Screen>>, OwnSends) {
    let mut screen = Screen::new(
        &session.room_name,
        Box::new(PlainPrinter),
        options.join_history,
    );
    if options.original {
        screen.original_frames_only();
    }
    if options.check_closures {
        // Nothing says the room closed before the server confirms it.
        screen.defer_closing_lines();
    }
    let own = screen.own_sends();
    (Arc::new(Mutex::new(screen)), own)
}

/// Sends the first `__REGISTER__` and greets the user. Should the send fail, the session is
/// ended like every other way out: the keepalive thread stops, and the daemon hears a
/// `__LEAVE__` if the socket still sends one.
fn register_and_greet(
    session: &Session,
    options: &Options,
    screen: &Mutex<Screen>,
) -> Result<(), ClientError> {
    if let Err(e) = session.register() {
        session.leave();
        return Err(ClientError::io("sending __REGISTER__")(e));
    }
    info!(
        "registered with {} in {:?}",
        session.server, session.room_name
    );
    lock(screen).err(&format!(
        "* {} {} as {} (type /quit to leave, /help for commands)",
        options.verb.past(),
        printable_name(&session.room_name),
        printable_name(&options.username)
    ));
    Ok(())
}

/// Starts the input thread with the local commands it answers; with the line editor, first
/// saves the terminal's mode, and returns the guard that restores it.
fn start_input(
    session: &Session,
    options: &Options,
    screen: &Arc<Mutex<Screen>>,
    events: SyncSender<Event>,
    ahead_events: &Ahead,
) -> Option<TerminalGuard> {
    let terminal = options.line_editor.then(TerminalGuard::save);
    let asker = Asker {
        tcp: options.tcp,
        room_name: session.room_name.clone(),
        token: session.token.clone(),
        pager: HistoryPager::default(),
        screen: Arc::clone(screen),
        events: ahead_events.clone(),
        editor: false,
    };
    let commands = Commands::new(asker, events, session.max_message_len(), options.original);
    let reading = terminal.as_ref().map(|guard| Arc::clone(&guard.reading));
    spawn_input(commands, options.join_history, reading);
    terminal
}

/// What the main loop does after an event.
enum Next {
    /// Wait for the next event.
    GoOn,
    /// Leave the room (`__LEAVE__`): the user's way out.
    Leave,
    /// The chat is over, already ended as it had to be.
    End(Result<Ending, ClientError>),
}

impl Chat {
    /// Starts the helper threads, registers and greets: everything before the first event.
    /// The order matters: signals are watched before anything can be interrupted, and the
    /// keepalive thread runs before the first `__REGISTER__`, so that nothing after it can
    /// fail without a `__LEAVE__`.
    fn start(session: Session, options: Options) -> Result<Chat, ClientError> {
        let (events, inbox) = mpsc::sync_channel(EVENT_QUEUE);
        let (ahead_events, ahead) = mpsc::sync_channel(EVENT_QUEUE);
        let ahead_events = Ahead {
            ahead: ahead_events,
            wake: Some(events.clone()),
            notices: Arc::default(),
        };
        if options.line_editor {
            // The main thread's own mask: every other thread starts with both blocked
            // (`threads::spawn`).
            suspend_on_input_thread();
            watch_for_the_end();
        }
        // Signals first: from here on Ctrl+C must not kill us before we can say __LEAVE__.
        let signalled = Arc::new(AtomicI32::new(0));
        spawn_signal_watcher(
            [events.clone(), ahead_events.ahead.clone()],
            Arc::clone(&signalled),
            &session,
        )?;
        let (screen, own) = open_screen(&session, &options);
        let closures = closure::Policy::new(options.check_closures);
        let last_heard = Arc::new(Mutex::new(Instant::now()));
        let liveness = options
            .idle_check
            .map(|period| Liveness::new(period, Arc::clone(&last_heard)));
        spawn_receiver(
            &session,
            Arc::clone(&screen),
            ahead_events.clone(),
            Arc::clone(&last_heard),
        )?;

        // Its first register comes a period later.
        spawn_keepalive(&session, options.keepalive, events.clone())?;
        register_and_greet(&session, &options, &screen)?;
        if options.check_reach {
            spawn_reach_check(&session, &options, Arc::clone(&screen));
        }
        spawn_output_watcher(ahead_events.clone());
        let terminal = start_input(&session, &options, &screen, events, &ahead_events);
        let notices = Arc::clone(&ahead_events.notices);
        let checker = Checker {
            tcp: options.tcp,
            room_name: session.room_name.clone(),
            token: session.token.clone(),
            events: ahead_events,
        };
        Ok(Chat {
            session,
            inbox,
            ahead,
            signalled,
            screen,
            own,
            closures,
            last_heard,
            liveness,
            outage: Outage::default(),
            terminal,
            checker,
            pacer: Pacer::new(pacing::CHAT_PER_SEC, pacing::CHAT_BURST, Instant::now()),
            notices,
            notices_handled: 0,
            held: None,
            hold_started: None,
        })
    }

    /// The main loop: the timers, then the next event, until the chat ends.
    fn serve(mut self) -> Result<Ending, ClientError> {
        loop {
            // A signal first: it may be behind a full queue of lines to send.
            let signal = self.signalled.load(Ordering::SeqCst);
            if signal != 0 {
                debug!("signal {signal}");
                self.say_unsent();
                break;
            }
            // Timers next, on every pass: a steady stream of events must not hold them back.
            if let Some(end) = self.run_timers() {
                return end;
            }
            // The room's word next: it overtakes the queued lines ([`Ahead`]).
            let event = match self.ahead.try_recv() {
                Ok(event) => event,
                // A line held for a closure the server did not confirm goes first.
                Err(_) if self.send_released_line() => continue,
                Err(_) => match self.next_event() {
                    Some(event) => event,
                    None => continue,
                },
            };
            match self.handle(event) {
                Next::GoOn => {}
                Next::Leave => break,
                Next::End(end) => return end,
            }
        }
        leave(&self.session, &mut self.terminal);
        Ok(Ending::Left)
    }

    /// A closure check whose time has come, and the idle check; `Some` when the chat ended.
    fn run_timers(&mut self) -> Option<Result<Ending, ClientError>> {
        if let Some(action) = self.closures.due(Instant::now()) {
            if let Some(end) = self.settle_closure(action) {
                return Some(end);
            }
        }
        if let Some(liveness) = &mut self.liveness {
            liveness.poll(Instant::now(), &self.checker);
        }
        None
    }

    /// Starts the hold on chat lines when a closure notice was received and is not yet
    /// handled, or the server is being asked whether it is true
    /// ([`closure::Policy::confirming`]); ends it when neither is so. Called right before
    /// each [`Chat::holding`], so that it sees the latest notice.
    fn update_hold(&mut self, now: Instant) {
        let confirming = self.notices.load(Ordering::SeqCst) > self.notices_handled
            || self.closures.confirming();
        if confirming {
            self.hold_started.get_or_insert(now);
        } else {
            self.hold_started = None;
        }
    }

    /// Whether chat lines are held ([`Chat::update_hold`]): for at most [`HOLD_LIMIT`]. A
    /// line sent then would go into a room that may be closed; it waits for the verdict (one
    /// TCP round trip), and goes if the room is still open.
    fn holding(&self, now: Instant) -> bool {
        self.hold_started
            .is_some_and(|since| now.saturating_duration_since(since) < HOLD_LIMIT)
    }

    /// Sends the line held for a closure the server did not confirm, once its hold is over;
    /// whether there was one to send.
    fn send_released_line(&mut self) -> bool {
        if self.held.is_none() {
            return false;
        }
        let now = Instant::now();
        self.update_hold(now);
        if self.holding(now) {
            return false;
        }
        if let Some(text) = self.held.take() {
            send_text(&self.session, &self.own, &self.screen, &text);
        }
        true
    }

    /// The next event, waiting no later than the next timer; `None` when a timer is due, or
    /// when a held line is to go (its hold ended). While lines are held ([`Chat::holding`])
    /// only the room's word is read: the queue of lines, and `/quit` and the end of input in
    /// their place behind them, wait for the verdict or the end of the [`HOLD_LIMIT`]. (A
    /// signal is also sent ahead, and its flag is read on every pass.)
    fn next_event(&mut self) -> Option<Event> {
        let now = Instant::now();
        self.update_hold(now);
        let holding = self.holding(now);
        if self.held.is_some() && !holding {
            // The hold ran out since `serve` looked: the held line goes first, and the
            // hold's end is no longer among the timers.
            return None;
        }
        let wake = [
            self.closures.recheck_at(),
            self.liveness.as_ref().and_then(Liveness::due_at),
            self.hold_started
                .filter(|_| holding)
                .map(|since| since + HOLD_LIMIT),
        ]
        .into_iter()
        .flatten()
        .min();
        let queue = if holding { &self.ahead } else { &self.inbox };
        let received = match wake {
            Some(at) => queue.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => queue.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            // Every helper is gone; nothing more can happen. (Not while the checker and the
            // signal watcher hold their senders: kept as the safe way out.)
            Err(RecvTimeoutError::Disconnected) => Some(Event::Eof),
        }
    }

    /// Says how many lines typed (or piped) and shown as entered still wait to go when a
    /// signal ends the chat, which does not wait for them (a paste of hundreds of lines goes
    /// at the chat's pace): they are not sent, and without a word a user who saw them
    /// entered would take them for sent.
    fn say_unsent(&mut self) {
        let waiting = self
            .inbox
            .try_iter()
            .filter(|e| matches!(e, Event::Send(_)));
        let unsent = waiting.count() + usize::from(self.held.is_some());
        if unsent > 0 {
            let lines = if unsent == 1 { "line" } else { "lines" };
            let line = format!("* {unsent} {lines} not sent: the chat ended before their turn");
            remark(&self.screen, self.terminal.is_some(), &line);
        }
    }

    /// Acts on one event from a helper thread.
    fn handle(&mut self, event: Event) -> Next {
        match event {
            Event::Send(text) => self.handle_send(text),
            Event::Quit => {
                debug!("quit");
                Next::Leave
            }
            Event::Eof => {
                debug!("end of input");
                Next::Leave
            }
            Event::Signal(signal) => {
                debug!("signal {signal}");
                self.say_unsent();
                Next::Leave
            }
            Event::RoomClosed => {
                self.notices_handled += 1;
                let action = self.closures.notice(Instant::now());
                self.settle_closure(action).map_or(Next::GoOn, Next::End)
            }
            Event::Verdict(verdict) => {
                let action = self.closures.verdict(Instant::now(), verdict);
                self.settle_closure(action).map_or(Next::GoOn, Next::End)
            }
            Event::Membership(answer) => self.handle_membership(answer),
            Event::Refused => self.handle_refused(),
            Event::Unsendable(error) => {
                let line = unsendable(self.session.server, &error);
                remark(&self.screen, self.terminal.is_some(), &line);
                Next::GoOn
            }
            // The main loop reads what was sent ahead on its next pass.
            Event::Wake => Next::GoOn,
            // The server's word: no __LEAVE__ to a room that does not hold us.
            Event::Gone(line) => self.end_gone(&line),
            // The reader of our output is gone (`ocm join ... | head`), found by a write or by
            // the output watcher: the chat ends as at the end of input, with a __LEAVE__, not
            // as a failure.
            Event::Failed(ClientError::Io { source, .. }) if output_gone(&source) => {
                debug!("standard output closed: leaving");
                Next::Leave
            }
            Event::Failed(error) => {
                leave(&self.session, &mut self.terminal);
                Next::End(Err(error))
            }
        }
    }

    /// A typed line: sent at the chat's pace, or held while a closure notice is confirmed.
    fn handle_send(&mut self, text: String) -> Next {
        pace(&mut self.pacer);
        // Checked after the pace's wait, as late as can be: a notice may have come meanwhile.
        let now = Instant::now();
        self.update_hold(now);
        if self.holding(now) {
            debug!("a closure notice is being confirmed: holding the chat");
            self.held = Some(text);
        } else {
            send_text(&self.session, &self.own, &self.screen, &text);
        }
        Next::GoOn
    }

    /// Follows a closure notice's or verdict's `action` ([`settle`]); `Some` when the chat
    /// ended on it ([`end_on`]).
    fn settle_closure(&mut self, action: closure::Action) -> Option<Result<Ending, ClientError>> {
        let settled = settle(action, &mut self.closures, &self.checker, &self.screen);
        end_on(settled, &self.session, &self.screen, &mut self.terminal)
    }

    /// The server's answer to an idle check ([`Liveness`]).
    fn handle_membership(&mut self, answer: Option<Result<(), ClientError>>) -> Next {
        let Some(liveness) = &mut self.liveness else {
            return Next::GoOn;
        };
        let editor = self.terminal.is_some();
        match liveness.answer(answer, &self.session.room_name, &self.screen, editor) {
            Membership::Gone(line) => self.end_gone(&line),
            Membership::GoOn => Next::GoOn,
        }
    }

    /// The server's UDP port refused a datagram of ours: told once per outage, with an idle
    /// check at once. If the server stays away, that check says it cannot be reached; if it
    /// came back without the room, it ends the session. The session itself goes on: the
    /// keepalives register us again once the server is back.
    fn handle_refused(&mut self) -> Next {
        let datagram = *lock(&self.last_heard);
        let heard = self
            .liveness
            .as_ref()
            .and_then(Liveness::back_at)
            .map_or(datagram, |back| back.max(datagram));
        if self.outage.refused(Instant::now(), heard) {
            let line = port_closed(self.session.server);
            remark(&self.screen, self.terminal.is_some(), &line);
            if let Some(liveness) = &mut self.liveness {
                liveness.check_now();
            }
        }
        Next::GoOn
    }

    /// The server says the room no longer holds us: the session ends with `line`, and
    /// without a `__LEAVE__`.
    fn end_gone(&mut self, line: &str) -> Next {
        self.session.end_without_leave();
        finish_gone(&self.screen, self.terminal.take(), line);
        Next::End(Ok(Ending::RoomEnded))
    }
}

/// What is said when keepalives to `server` cannot be sent: the chat goes on, and so do the
/// keepalives, which register us again once they get through.
fn unsendable(server: SocketAddr, error: &io::Error) -> String {
    format!(
        "* cannot send to the server at {server}: {error} (the keepalives go on; what you \
         send until they get through is lost)"
    )
}

/// Says `__LEAVE__`, gives the terminal back, and only then logs a `__LEAVE__` that could not
/// be sent: written while the line editor still held the terminal, the warning would follow
/// the line being typed, as if typed there.
fn leave(session: &Session, terminal: &mut Option<TerminalGuard>) {
    let sent = session.leave_unlogged();
    drop(terminal.take());
    session.log_leave(sent);
}

/// Whether a write failed because the reader of standard output went away (`EPIPE`: Rust
/// ignores `SIGPIPE`, so the write reports it): no one is left to show anything to.
pub fn output_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}

/// How long the line editor gets to take the lines queued for it when the room closes
/// ([`Feed::drain`](crate::feed::Feed::drain)); what it has not taken by then is printed
/// after the terminal is given back.
const FEED_DRAIN: Duration = Duration::from_secs(1);

/// How long the line editor gets to draw the last line it was handed. rustyline's external
/// printer has no flush; `readline` draws each line as soon as it takes it, well within
/// this.
const EDITOR_DRAIN: Duration = Duration::from_millis(100);

/// The room closed: with the line editor, let it take and draw what is queued for it, give
/// the terminal back, then print what it did not take and the closing lines the screen
/// kept, in that order (kept when the editor prints, or while closures are checked). In the
/// background (after `bg`) all that waits for `fg`: the terminal is the shell's, or another
/// job's, and the lines held meanwhile are the editor's to draw first.
fn finish_closed(screen: &Mutex<Screen>, terminal: Option<TerminalGuard>) {
    if terminal.is_some() {
        wait_for_the_terminal();
        // Outside the screen's lock: the input thread may need it before the editor reads.
        let feed = lock(screen).feed();
        if let Some(feed) = feed {
            feed.drain(FEED_DRAIN);
        }
        thread::sleep(EDITOR_DRAIN);
    }
    let closing = lock(screen).take_closing();
    // Restores the terminal mode and leaves the prompt line.
    drop(terminal);
    let mut screen = lock(screen);
    for line in &closing {
        if let Err(e) = screen.out(line) {
            debug!("cannot print the closing line: {e}");
        }
    }
}

/// The server says we are no longer in the room: the session ends as at a confirmed closure,
/// then says why.
fn finish_gone(screen: &Mutex<Screen>, terminal: Option<TerminalGuard>, line: &str) {
    finish_closed(screen, terminal);
    lock(screen).err(line);
}

/// Waits until the pace of our chat ([`pacing`]) lets one more message go: at most one
/// message's share of a second (about 22 ms), so signals and `/quit` wait no longer than
/// that per message queued before them; the lines wait in order, and the input thread,
/// blocked on the full event queue, reads no faster than they go.
fn pace(pacer: &mut Pacer) {
    while let Err(wait) = pacer.take(Instant::now()) {
        thread::sleep(wait);
    }
}

/// Sends one chat message; local feedback goes to standard error.
fn send_text(session: &Session, own: &OwnSends, screen: &Mutex<Screen>, text: &str) {
    send_own(own, screen, || session.send_chat(text));
}

/// Sends one of our chat messages with `send` ([`Session::send_chat`]), noted as ours
/// ([`OwnSends`]) before it leaves: the receiver takes the notes before it renders, so it
/// cannot show a reply to our message (which the daemon numbers after it) before our
/// message's number is known to be ours, and report that number as lost. The screen's lock
/// is never waited for: the receiver may hold it, blocked on a stalled standard output, and
/// the main loop must still hear signals and `/quit`; a failed send's complaint is a
/// [`remark_unheld`].
fn send_own(
    own: &OwnSends,
    screen: &Mutex<Screen>,
    send: impl FnOnce() -> io::Result<Result<(), Unsent>>,
) {
    own.note(Instant::now());
    let complaint = match send() {
        Ok(Ok(())) => return,
        Ok(Err(Unsent::MessageTooLong { max, .. })) => too_long(max),
        Ok(Err(Unsent::Encode(e))) => format!("* message not sent: {e}"),
        Err(e) => format!("* message not sent: {e}"),
    };
    own.take_back();
    remark_unheld(screen, &complaint);
}

/// Shows a remark (`* ...`): waiting for the screen when the line `editor` prints, else
/// not ([`remark_unheld`]).
pub(super) fn remark(screen: &Mutex<Screen>, editor: bool, line: &str) {
    if editor {
        lock(screen).err(line);
    } else {
        remark_unheld(screen, line);
    }
}

/// Shows a remark (`* ...`) without waiting for the screen's lock: through the screen when
/// it is free, else straight to standard error. With plain lines the receiver holds the
/// screen while it writes to standard output, so a standard output nobody reads (a full
/// pipe, a stopped reader) holds it for as long as that lasts; a remark that waited for it
/// stopped its thread: the main loop (its signals and `/quit`), or the input thread, which
/// then read nothing more, not even the end of its input, while the keepalives kept us in
/// the room. Straight to standard error is where the screen puts a remark with plain lines
/// anyway. (The line editor's printing goes through a queue and never holds the screen for
/// long; the input thread waits for it there, so that a remark is drawn above the line being
/// typed, not through it.)
pub(super) fn remark_unheld(screen: &Mutex<Screen>, line: &str) {
    match screen.try_lock() {
        Ok(mut screen) => screen.err(line),
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().err(line),
        Err(TryLockError::WouldBlock) => to_stderr(line),
    }
}

#[cfg(test)]
mod tests;
