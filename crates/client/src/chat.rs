//! The UDP half of a session: register, chat, keep alive, leave; and the chat's commands.
//!
//! [`Session`] owns the UDP socket and turns text into datagrams with [`ucrp::datagram`].
//! [`run`] is the chat loop. Three helper threads feed one channel of [`Event`]s and the main
//! thread alone decides what to send:
//! - the *receiver* reads datagrams, ignores any whose source is not the server, hands them
//!   to the shared [`Screen`] (which renders and prints them) and reports the room's closing;
//! - the *input thread* reads typed lines, either line by line from standard input or, when
//!   standard input and output are a terminal, through a `rustyline` editor whose external
//!   printer keeps incoming messages above the line being typed. It answers the local
//!   commands itself (`/help`, `/who`, `/history`), each query on a short-lived TCP
//!   connection, so neither the receiver nor the keepalive waits on one; chat text and
//!   `/quit` go to the main thread. On `ocm join` it first fetches the recent history and
//!   releases the screen, which held the live messages meanwhile;
//! - the *signal watcher* reports SIGINT, SIGTERM, SIGHUP and SIGQUIT, so that Ctrl+C,
//!   `kill`, a closed terminal and Ctrl+\\ all leave the room properly instead of waiting for
//!   the server's timeout (an `--original` member has none: it would stay until the room
//!   closed).
//!
//! Two more kinds of thread are short-lived: before a notice that the room closed is believed,
//! a *checker* asks the server over TCP ([`closure`]) and reports its verdict as an event, so
//! a server slow to answer holds up neither the chat nor `/quit`; and once, shortly after
//! registering, a *reach check* asks the server whether it hears our datagrams at all
//! ([`reach`]), and warns if it does not.
//!
//! The keepalive needs no thread: the main loop waits on the channel no longer than the next
//! keepalive is due, then resends `__REGISTER__`, which also re-teaches a restarted daemon
//! our address. Every way out sends `__LEAVE__` except the room's closing, where the room is
//! already gone.

use std::io::{self, BufRead, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use tcrp::payload::HistoryPage;
use tcrp::ErrorCode;
use ucrp::datagram::{self, LEAVE, REGISTER};

use crate::closure;
use crate::error::ClientError;
use crate::feed::{Feed, MAX_QUEUED_BYTES};
use crate::handshake::{self, Token, Verb};
use crate::input::{self, Input};
use crate::listing;
use crate::query::{self, HistoryPager, PageRequest, DEFAULT_HISTORY_LIMIT};
use crate::reach;
use crate::render::{printable, printable_name, Flow};
use crate::screen::{to_stderr, EditorPrinter, OwnSends, PlainPrinter, Screen};

/// Receive buffer size, in bytes: room for the largest UDP datagram, so batch frames up to the
/// `max_datagram` announced at join (65507 bytes on loopback) are read whole.
const RECV_BUFFER_LEN: usize = 64 * 1024;

/// The line editor's prompt.
const PROMPT: &str = "> ";

/// Events the main loop may have waiting. Bounded, so that piped input waits for the sends
/// instead of queueing without end, and a signal or `/quit` is acted on after at most this
/// many sends, not after the whole pipe.
const EVENT_QUEUE: usize = 64;

/// What the helper threads tell the main loop.
#[derive(Debug)]
enum Event {
    /// Chat text to send to the room.
    Send(String),
    /// `/quit`, Ctrl+C or Ctrl+D in the line editor.
    Quit,
    /// Standard input reached its end.
    Eof,
    /// A termination signal arrived.
    Signal(i32),
    /// A datagram said that the room closed or that we timed out (printed, or kept until
    /// the closure is believed).
    RoomClosed,
    /// The server's answer to a closure check ([`Checker`]).
    Verdict(closure::Verdict),
    /// A helper thread hit an error it cannot go on after.
    Failed(ClientError),
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
    /// and warn if it never does ([`reach`]). Off with `--original`.
    pub check_reach: bool,
    /// The server is the original one (`--original`): datagrams are read as its frames only,
    /// and `/who` and `/history`, which it cannot answer, are not sent.
    pub original: bool,
}

/// A member's UDP endpoint: the socket, the server's chat address and the credentials every
/// datagram carries.
#[derive(Debug)]
pub struct Session {
    socket: UdpSocket,
    server: SocketAddr,
    room_name: String,
    token: Token,
    /// Our username's length: the relayed datagram carries it before the text.
    username_len: usize,
}

impl Session {
    /// Binds a UDP socket on an ephemeral port of the server address's family.
    pub fn open(
        server: SocketAddr,
        room_name: &str,
        username: &str,
        token: Token,
    ) -> Result<Session, ClientError> {
        let local = match server {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = UdpSocket::bind(local).map_err(ClientError::io("binding the UDP socket"))?;
        Ok(Session {
            socket,
            server,
            room_name: room_name.to_owned(),
            token,
            username_len: username.len(),
        })
    }

    /// Longest chat message, in bytes, that fits one datagram with our room name and token,
    /// and that the daemon relays: relayed, a size byte and our name come before the text, and
    /// the whole must fit the 4096 bytes an original client reads (longer chat is dropped).
    pub fn max_message_len(&self) -> usize {
        let ours = ucrp::MAX_DATAGRAM_LEN.saturating_sub(
            datagram::FIXED_LEN + self.room_name.len() + self.token.as_bytes().len(),
        );
        let relayed = ucrp::MAX_DATAGRAM_LEN.saturating_sub(1 + self.username_len);
        ours.min(relayed)
    }

    /// Sends chat `text`, unless it is longer than [`Session::max_message_len`] (the daemon
    /// would drop it): then `Ok(Err(TooLarge))` and nothing is sent.
    fn send_chat(&self, text: &str) -> io::Result<Result<(), ucrp::Error>> {
        let max = self.max_message_len();
        if text.len() > max {
            return Ok(Err(ucrp::Error::TooLarge {
                len: text.len(),
                max,
            }));
        }
        self.send(text)
    }

    /// Sends one datagram carrying `message` (chat text or a control word). A message that
    /// does not fit is `Ok(Err(..))` from ucrp; a socket error is `Err`.
    fn send(&self, message: &str) -> io::Result<Result<(), ucrp::Error>> {
        let mut bytes = Vec::new();
        if let Err(e) = datagram::encode(
            self.room_name.as_bytes(),
            self.token.as_bytes(),
            message,
            &mut bytes,
        ) {
            return Ok(Err(e));
        }
        self.socket.send_to(&bytes, self.server)?;
        Ok(Ok(()))
    }

    /// The same session on a duplicate of the socket, for another thread to send from.
    fn duplicate(&self) -> io::Result<Session> {
        Ok(Session {
            socket: self.socket.try_clone()?,
            server: self.server,
            room_name: self.room_name.clone(),
            token: self.token.clone(),
            username_len: self.username_len,
        })
    }

    /// Sends a control word. Room name and token were checked to fit, so only the socket can
    /// fail.
    fn send_control(&self, word: &str) -> io::Result<()> {
        match self.send(word)? {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        }
    }

    /// Best-effort `__LEAVE__`: the process is exiting either way.
    fn leave(&self) {
        match self.send_control(LEAVE) {
            Ok(()) => debug!("sent {LEAVE} to {}", self.server),
            Err(e) => warn!("could not send {LEAVE} to {}: {e}", self.server),
        }
    }
}

/// Locks the screen. A panic elsewhere while printing leaves nothing half-done that matters,
/// so a poisoned lock is used as is.
fn lock(screen: &Mutex<Screen>) -> MutexGuard<'_, Screen> {
    screen.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the chat until the user leaves or the host closes the room. Prints
/// `* joined ROOM as NAME (type /quit to leave, /help for commands)` to standard error once
/// registered.
pub fn run(session: Session, options: Options) -> Result<(), ClientError> {
    let (events, inbox) = mpsc::sync_channel(EVENT_QUEUE);
    // Signals first: from here on Ctrl+C must not kill us before we can say __LEAVE__.
    spawn_signal_watcher(events.clone())?;
    let screen = Arc::new(Mutex::new(Screen::new(
        &session.room_name,
        Box::new(PlainPrinter),
        options.join_history,
    )));
    if options.original {
        lock(&screen).original_frames_only();
    }
    let own = lock(&screen).own_sends();
    let mut closures = closure::Policy::new(options.check_closures);
    if options.check_closures {
        // Nothing says the room closed before the server confirms it.
        lock(&screen).defer_closing_lines();
    }
    spawn_receiver(&session, Arc::clone(&screen), events.clone())?;

    session
        .send_control(REGISTER)
        .map_err(ClientError::io("sending __REGISTER__"))?;
    info!(
        "registered with {} in {:?}",
        session.server, session.room_name
    );
    lock(&screen).err(&format!(
        "* {} {} as {} (type /quit to leave, /help for commands)",
        options.verb.past(),
        printable_name(&session.room_name),
        printable_name(&options.username)
    ));
    if options.check_reach {
        spawn_reach_check(&session, &options, Arc::clone(&screen));
    }
    // Restores the terminal mode however we leave, even while the editor holds it raw.
    let mut terminal = options.line_editor.then(TerminalGuard::save);
    let commands = Commands {
        tcp: options.tcp,
        room_name: session.room_name.clone(),
        token: session.token.clone(),
        pager: HistoryPager::default(),
        screen: Arc::clone(&screen),
        events: events.clone(),
        max_message_len: session.max_message_len(),
        original: options.original,
    };
    let reading = terminal.as_ref().map(|guard| Arc::clone(&guard.reading));
    spawn_input(commands, options.join_history, reading);
    let checker = Checker {
        tcp: options.tcp,
        room_name: session.room_name.clone(),
        token: session.token.clone(),
        events,
    };

    let mut next_keepalive = Instant::now() + options.keepalive;
    loop {
        // Timers first, on every pass: a steady stream of events must not hold them back.
        if let Some(action) = closures.due(Instant::now()) {
            let settled = settle(action, &mut closures, &checker, &screen);
            if let Some(end) = end_on(settled, &session, &screen, &mut terminal) {
                return end;
            }
        }
        if Instant::now() >= next_keepalive {
            if let Err(e) = session.send_control(REGISTER) {
                warn!("keepalive to {} failed: {e}", session.server);
            }
            next_keepalive = Instant::now() + options.keepalive;
        }
        let wake = closures
            .recheck_at()
            .map_or(next_keepalive, |at| at.min(next_keepalive));
        let event = match inbox.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => continue,
            // Every helper is gone; nothing more can happen. (Not while the checker and the
            // signal watcher hold their senders: kept as the safe way out.)
            Err(RecvTimeoutError::Disconnected) => Event::Eof,
        };
        match event {
            Event::Send(text) => send_text(&session, &own, &screen, &text),
            Event::Quit => {
                debug!("quit");
                break;
            }
            Event::Eof => {
                debug!("end of input");
                break;
            }
            Event::Signal(signal) => {
                debug!("signal {signal}");
                break;
            }
            Event::RoomClosed | Event::Verdict(_) => {
                let action = match event {
                    Event::Verdict(verdict) => closures.verdict(Instant::now(), verdict),
                    _ => closures.notice(Instant::now()),
                };
                let settled = settle(action, &mut closures, &checker, &screen);
                if let Some(end) = end_on(settled, &session, &screen, &mut terminal) {
                    return end;
                }
            }
            // The reader of our output is gone (`ocm join ... | head`): the chat ends as at
            // the end of input, with a __LEAVE__, not as a failure.
            Event::Failed(ClientError::Io { source, .. }) if output_gone(&source) => {
                debug!("standard output closed: leaving");
                break;
            }
            Event::Failed(error) => {
                session.leave();
                return Err(error);
            }
        }
    }
    session.leave();
    Ok(())
}

/// Whether a write failed because the reader of standard output went away (`EPIPE`: Rust
/// ignores `SIGPIPE`, so the write reports it): no one is left to show anything to.
pub fn output_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}

/// How long the line editor gets to take the lines queued for it when the room closes
/// ([`Feed::drain`]); what it has not taken by then is printed after the terminal is given
/// back.
const FEED_DRAIN: Duration = Duration::from_secs(1);

/// How long the line editor gets to draw the last line it was handed. rustyline's external
/// printer has no flush; `readline` draws each line as soon as it takes it, well within
/// this.
const EDITOR_DRAIN: Duration = Duration::from_millis(100);

/// The room closed: with the line editor, let it take and draw what is queued for it, give
/// the terminal back, then print what it did not take and the closing lines the screen
/// kept, in that order (kept when the editor prints, or while closures are checked).
fn finish_closed(screen: &Mutex<Screen>, terminal: Option<TerminalGuard>) {
    if terminal.is_some() {
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

/// Sends one chat message; local feedback goes to standard error.
fn send_text(session: &Session, own: &OwnSends, screen: &Mutex<Screen>, text: &str) {
    send_own(own, screen, session.max_message_len(), || {
        session.send_chat(text)
    });
}

/// Sends one of our chat messages with `send` ([`Session::send_chat`]), noted as ours
/// ([`OwnSends`]) before it leaves: the receiver takes the notes before it renders, so it
/// cannot show a reply to our message (which the daemon numbers after it) before our
/// message's number is known to be ours, and report that number as lost. The screen's lock
/// is never waited for: the receiver may hold it, blocked on a stalled standard output, and
/// keepalives must still go out. A failed send's complaint goes through the screen when it
/// is free, and straight to standard error when it is not (in plain mode, the only one in
/// which the receiver writes while holding it; the line editor's printing goes through a
/// queue).
fn send_own(
    own: &OwnSends,
    screen: &Mutex<Screen>,
    max_message_len: usize,
    send: impl FnOnce() -> io::Result<Result<(), ucrp::Error>>,
) {
    own.note(Instant::now());
    let complaint = match send() {
        Ok(Ok(())) => return,
        Ok(Err(ucrp::Error::TooLarge { .. })) => too_long(max_message_len),
        Ok(Err(e)) => format!("* message not sent: {e}"),
        Err(e) => format!("* message not sent: {e}"),
    };
    own.take_back();
    match screen.try_lock() {
        Ok(mut screen) => screen.err(&complaint),
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().err(&complaint),
        Err(TryLockError::WouldBlock) => to_stderr(&complaint),
    }
}

/// What the input thread needs to act on typed lines: local commands are answered here,
/// chat text and `/quit` are passed to the main loop.
struct Commands {
    /// The daemon's TCP address.
    tcp: SocketAddr,
    room_name: String,
    token: Token,
    pager: HistoryPager,
    screen: Arc<Mutex<Screen>>,
    events: SyncSender<Event>,
    /// The longest chat message that can be sent ([`Session::max_message_len`]).
    max_message_len: usize,
    /// The server is the original one: `/who` and `/history` are not asked.
    original: bool,
}

impl Commands {
    /// Acts on one typed line; returns `false` when input should stop (after `/quit`, or
    /// when the main loop is gone).
    fn handle_line(&mut self, line: &str) -> bool {
        match input::classify(line) {
            Input::Send(text) => return self.events.send(Event::Send(text.to_owned())).is_ok(),
            Input::Quit => {
                let _ = self.events.send(Event::Quit);
                return false;
            }
            Input::Help if self.original => self.err(input::HELP_ORIGINAL),
            Input::Help => self.err(input::HELP),
            Input::Who | Input::History { .. } if self.original => self.err(input::NOT_ORIGINAL),
            Input::Who => self.who(),
            Input::History { count } => self.history(count),
            Input::Usage(text) => self.err(text),
            Input::Unknown(command) => {
                self.err(&format!(
                    "* unknown command {} (try /help)",
                    printable(command)
                ));
            }
            Input::Reserved => self.err("* reserved word not sent"),
            Input::Empty => {}
        }
        true
    }

    fn err(&self, line: &str) {
        lock(&self.screen).err(line);
    }

    /// `/who`: the room's host and members, as remarks.
    fn who(&mut self) {
        let answer = handshake::connect_addr(self.tcp).and_then(|mut stream| {
            query::presence(&mut stream, &self.room_name, Some(&self.token), None)
        });
        match answer {
            Ok(presence) => {
                let mut screen = lock(&self.screen);
                for line in listing::presence_lines(&presence) {
                    screen.err(&format!("* {line}"));
                }
            }
            Err(e) => self.err(&format!("* {e}")),
        }
    }

    /// `/history N`: the next page back, oldest first, then `* no more history` at the end.
    fn history(&mut self, count: u32) {
        let before = match self.pager.next() {
            PageRequest::Fetch { before } => before,
            PageRequest::Exhausted => return self.err("* no more history"),
        };
        let page = match self.fetch_history(before, count) {
            Ok(page) => page,
            Err(e) => return self.err(&format!("* {e}")),
        };
        let more = self.pager.observe(&page);
        let mut screen = lock(&self.screen);
        for message in &page.messages {
            if let Err(e) = screen.out(&listing::history_line(message)) {
                warn!("cannot print the history: {e}");
                return;
            }
        }
        if !more {
            screen.err("* no more history");
        }
    }

    fn fetch_history(&self, before: Option<u64>, limit: u32) -> Result<HistoryPage, ClientError> {
        let mut stream = handshake::connect_addr(self.tcp)?;
        query::history(&mut stream, &self.room_name, &self.token, before, limit)
    }

    /// On join: fetches the latest messages and releases the screen with them; `/history`
    /// then pages back from the oldest of them. A server without the extension (the original
    /// one) is passed over in silence.
    fn show_recent_history(&mut self) {
        let page = match self.fetch_history(None, DEFAULT_HISTORY_LIMIT) {
            Ok(page) => {
                // An empty room's page says nothing of what `/history` will find later.
                if !page.messages.is_empty() {
                    self.pager.observe(&page);
                }
                Some(page)
            }
            Err(ClientError::QueryRefused {
                code: Some(ErrorCode::UnsupportedOperation),
                ..
            }) => {
                debug!("the server keeps no history");
                None
            }
            Err(e) => {
                self.err(&format!("* history unavailable: {e}"));
                None
            }
        };
        let released = lock(&self.screen).release(page.as_ref());
        let event = match released {
            Ok(Flow::Continue) => return,
            Ok(Flow::RoomClosed) => Event::RoomClosed,
            Err(source) => Event::Failed(ClientError::Io {
                context: "writing to standard output",
                source,
            }),
        };
        let _ = self.events.send(event);
    }
}

/// The terminal mode as it was before the line editor ran, put back on drop.
struct TerminalGuard {
    saved: Option<nix::sys::termios::Termios>,
    /// Set while the editor waits for a line (the cursor is on the prompt line).
    reading: Arc<AtomicBool>,
}

impl TerminalGuard {
    fn save() -> TerminalGuard {
        let saved = nix::sys::termios::tcgetattr(io::stdin())
            .inspect_err(|e| debug!("cannot read the terminal mode: {e}"))
            .ok();
        TerminalGuard {
            saved,
            reading: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            use nix::sys::termios::{tcsetattr, SetArg};
            if let Err(e) = tcsetattr(io::stdin(), SetArg::TCSADRAIN, saved) {
                debug!("cannot restore the terminal mode: {e}");
            }
            if self.reading.load(Ordering::SeqCst) {
                // Leave the prompt line, so the shell's prompt starts on a line of its own.
                to_stderr("");
            }
        }
    }
}

fn spawn_signal_watcher(events: SyncSender<Event>) -> Result<(), ClientError> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
        .map_err(ClientError::io("installing signal handlers"))?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let _ = events.send(Event::Signal(signal));
            }
        })
        .map_err(ClientError::io("starting the signal thread"))?;
    Ok(())
}

/// Starts the receiver thread. After a datagram that closes the room it goes on receiving
/// (the screen holds what comes until the closure is settled); it stops on an error.
fn spawn_receiver(
    session: &Session,
    screen: Arc<Mutex<Screen>>,
    events: SyncSender<Event>,
) -> Result<(), ClientError> {
    let socket = session
        .socket
        .try_clone()
        .map_err(ClientError::io("cloning the UDP socket"))?;
    let server = session.server;
    thread::Builder::new()
        .name("receiver".into())
        .spawn(move || loop {
            let event = receive(&socket, server, &screen);
            let go_on = matches!(event, Event::RoomClosed);
            if events.send(event).is_err() || !go_on {
                return;
            }
        })
        .map_err(ClientError::io("starting the receiver thread"))?;
    Ok(())
}

/// Asks the server, on a thread of its own, whether it hears our datagrams, and warns once if
/// it does not ([`reach`]). Nothing waits for it: the chat goes on either way.
fn spawn_reach_check(session: &Session, options: &Options, screen: Arc<Mutex<Screen>>) {
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
enum Settled {
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
struct Checker {
    /// The daemon's TCP address.
    tcp: SocketAddr,
    room_name: String,
    token: Token,
    events: SyncSender<Event>,
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
struct Answer {
    events: SyncSender<Event>,
    verdict: closure::Verdict,
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
fn settle(
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
fn end_on(
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

/// The remark shown once when datagrams come from the server's port at another address. A
/// server bound to a wildcard address on a host with several addresses may answer from the
/// one its route picks rather than the one we send to (`ocmd` answers from the address our
/// `__REGISTER__` came to, but the original server does not); we ignore such datagrams
/// (anyone could send them), so without this remark the chat would just look silent.
fn answered_from_elsewhere(server: SocketAddr, from: SocketAddr) -> String {
    format!(
        "* ignoring datagrams from {from}, the server's port at another address than {server}: \
         a server bound to a wildcard address may answer from another of its addresses"
    )
}

/// Receives and hands each datagram to the screen until the room closes or an error ends
/// it; returns the event that ended it.
fn receive(socket: &UdpSocket, server: SocketAddr, screen: &Mutex<Screen>) -> Event {
    let mut buf = vec![0u8; RECV_BUFFER_LEN];
    let mut told_of_elsewhere = false;
    loop {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            // ICMP errors from earlier sends surface here on some systems; the server may
            // come back, and the keepalive will find it.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                debug!("receive: {e}");
                continue;
            }
            Err(source) => {
                return Event::Failed(ClientError::Io {
                    context: "receiving from the server",
                    source,
                })
            }
        };
        if from.ip() != server.ip() || from.port() != server.port() {
            debug!("ignoring {len} bytes from {from}, not the server {server}");
            if from.port() == server.port() && !std::mem::replace(&mut told_of_elsewhere, true) {
                lock(screen).err(&answered_from_elsewhere(server, from));
            }
            continue;
        }
        // `len <= buf.len()`: recv_from never reports more than the buffer holds.
        let (handled, feed) = {
            let mut screen = lock(screen);
            (screen.handle_datagram(&buf[..len]), screen.feed())
        };
        // Outside the lock, which the input thread needs before the editor reads again.
        if let Some(feed) = feed {
            feed.wait_below(MAX_QUEUED_BYTES);
        }
        match handled {
            Ok(Flow::Continue) => {}
            Ok(Flow::RoomClosed) => return Event::RoomClosed,
            Err(source) => {
                return Event::Failed(ClientError::Io {
                    context: "writing to standard output",
                    source,
                })
            }
        }
    }
}

/// Starts the input thread. `reading` is set when the line editor is to be used (and is
/// the flag the terminal guard reads).
fn spawn_input(mut commands: Commands, join_history: bool, reading: Option<Arc<AtomicBool>>) {
    let spawned = thread::Builder::new().name("input".into()).spawn(move || {
        let mut editor = reading.and_then(|reading| match start_editor(&commands.screen) {
            Ok(editor) => Some((editor, reading)),
            Err(e) => {
                warn!("line editing unavailable, reading plain lines: {e}");
                None
            }
        });
        if join_history {
            commands.show_recent_history();
        }
        let end = match &mut editor {
            Some((editor, reading)) => read_edited(&mut commands, editor, reading),
            None => read_lines(&mut commands, &mut io::stdin().lock()),
        };
        if let Some(event) = end {
            let _ = commands.events.send(event);
        }
    });
    if let Err(e) = spawned {
        // Without input we can still receive; leaving is then up to a signal.
        warn!("could not start the input thread: {e}");
    }
}

/// A line editor with in-memory history, whose external printer becomes the screen's.
fn start_editor(screen: &Mutex<Screen>) -> Result<DefaultEditor, ReadlineError> {
    let mut editor = DefaultEditor::new()?;
    let feed = Feed::start(editor.create_external_printer()?)?;
    lock(screen).set_editor_printer(Box::new(EditorPrinter::new(feed)));
    Ok(editor)
}

/// The complaint about a message over `max` bytes.
fn too_long(max: usize) -> String {
    format!("* message too long (max {max} bytes)")
}

/// Acts on each line of `input`; returns the event that ends the input, or `None` when
/// `/quit` already told the main loop. A line too long to be sent is skipped with a
/// complaint, without ever being held whole.
fn read_lines(commands: &mut Commands, input: &mut impl BufRead) -> Option<Event> {
    // The longest line that may be sent: a message escaped with one more '/', then "\r\n".
    let limit = commands.max_message_len + 3;
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match input
            .by_ref()
            .take(limit as u64)
            .read_until(b'\n', &mut raw)
        {
            Ok(0) => return Some(Event::Eof),
            Ok(n) if n == limit && raw.last() != Some(&b'\n') => {
                if let Err(source) = input.skip_until(b'\n') {
                    return Some(Event::Failed(ClientError::Io {
                        context: "reading standard input",
                        source,
                    }));
                }
                commands.err(&too_long(commands.max_message_len));
            }
            Ok(_) => {
                let line = String::from_utf8_lossy(&raw);
                if !commands.handle_line(&line) {
                    return None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Some(Event::Failed(ClientError::Io {
                    context: "reading standard input",
                    source,
                }))
            }
        }
    }
}

/// The line editor's loop: Enter acts on the line, Ctrl+C and Ctrl+D leave.
fn read_edited(
    commands: &mut Commands,
    editor: &mut DefaultEditor,
    reading: &AtomicBool,
) -> Option<Event> {
    loop {
        reading.store(true, Ordering::SeqCst);
        let line = editor.readline(PROMPT);
        reading.store(false, Ordering::SeqCst);
        match line {
            Ok(line) => {
                if !line.trim().is_empty() {
                    if let Err(e) = editor.add_history_entry(line.as_str()) {
                        debug!("line not kept in the history: {e}");
                    }
                }
                if !commands.handle_line(&line) {
                    return None;
                }
            }
            Err(ReadlineError::Interrupted) => return Some(Event::Quit),
            Err(ReadlineError::Eof) => return Some(Event::Eof),
            Err(e) => {
                return Some(Event::Failed(ClientError::Io {
                    context: "reading the terminal",
                    source: io::Error::other(e.to_string()),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::screen::tests::Recorder;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use tcrp::{payload, Frame, Operation, State};

    /// A session aimed at a local socket that plays the server.
    fn pair(room: &str, token: &str) -> (Session, UdpSocket) {
        pair_named(room, "me", token)
    }

    /// The same, with our username.
    fn pair_named(room: &str, username: &str, token: &str) -> (Session, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let session = Session::open(
            server.local_addr().unwrap(),
            room,
            username,
            Token::new(token.into()).unwrap(),
        )
        .unwrap();
        (session, server)
    }

    fn recv(server: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 8192];
        let (n, _) = server.recv_from(&mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn screen(hold: bool) -> (Arc<Mutex<Screen>>, Recorder) {
        let rec = Recorder::default();
        let screen = Screen::new("lobby", Box::new(rec.clone()), hold);
        (Arc::new(Mutex::new(screen)), rec)
    }

    /// Commands for room "lobby" with token "00ff", the daemon's TCP port at `tcp`.
    fn commands(tcp: SocketAddr, screen: &Arc<Mutex<Screen>>) -> (Commands, mpsc::Receiver<Event>) {
        let (events, inbox) = mpsc::sync_channel(1024);
        let commands = Commands {
            tcp,
            room_name: "lobby".into(),
            token: Token::new("00ff".into()).unwrap(),
            pager: HistoryPager::default(),
            screen: Arc::clone(screen),
            events,
            max_message_len: 100,
            original: false,
        };
        (commands, inbox)
    }

    /// A TCP address where nothing listens, for as long as it lives. Its port is the local
    /// end of a connection it holds open: a connect to it is refused, and no test running
    /// beside this one can be given it for a listener (a port merely bound and released
    /// could be).
    struct DeadTcp {
        addr: SocketAddr,
        _held: (TcpListener, std::net::TcpStream, std::net::TcpStream),
    }

    impl DeadTcp {
        fn new() -> DeadTcp {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            DeadTcp {
                addr: client.local_addr().unwrap(),
                _held: (listener, client, server),
            }
        }
    }

    /// What a fake daemon was asked: operation, room name, payload.
    type Asked = Arc<Mutex<Vec<(Operation, String, String)>>>;

    /// A fake daemon on a local TCP port answering one connection per scripted reply
    /// (COMPLIANCE, plus COMPLETE when `Ok`), recording each request.
    fn fake_daemon(
        replies: Vec<Result<&'static str, (tcrp::ErrorCode, &'static str)>>,
    ) -> (SocketAddr, Asked) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Asked::default();
        let log = Arc::clone(&asked);
        thread::spawn(move || {
            for reply in replies {
                let Ok((mut stream, _)) = listener.accept() else {
                    return;
                };
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 512];
                let op = loop {
                    if let Some((f, _)) = tcrp::decode(&buf, 1 << 16).unwrap() {
                        log.lock().unwrap().push((
                            f.operation,
                            String::from_utf8_lossy(f.room_name).into_owned(),
                            String::from_utf8_lossy(f.payload).into_owned(),
                        ));
                        break f.operation;
                    }
                    let n = stream.read(&mut chunk).unwrap();
                    assert!(n > 0, "request cut short");
                    buf.extend_from_slice(&chunk[..n]);
                };
                let frame = |state, body: &[u8]| {
                    let mut out = Vec::new();
                    Frame {
                        operation: op,
                        state,
                        room_name: b"lobby",
                        payload: body,
                    }
                    .encode(&mut out)
                    .unwrap();
                    out
                };
                let mut out = Vec::new();
                match reply {
                    Ok(complete) => {
                        out.extend(frame(State::Compliance, br#"{"success": true}"#));
                        out.extend(frame(State::Complete, complete.as_bytes()));
                    }
                    Err((code, message)) => {
                        let mut failure = Vec::new();
                        payload::encode_failure(code, message, &mut failure);
                        out.extend(frame(State::Compliance, &failure));
                    }
                }
                stream.write_all(&out).unwrap();
            }
        });
        (addr, asked)
    }

    fn sequenced(seq: u64, text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        ucrp::delivery::encode_sequenced(seq, "bob", text.as_bytes(), &mut out).unwrap();
        out
    }

    #[test]
    fn chat_and_quit_go_to_the_main_loop_and_the_rest_is_answered_here() {
        let (screen, rec) = screen(false);
        let dead = DeadTcp::new();
        let (mut commands, inbox) = commands(dead.addr, &screen);
        let mut input =
            io::Cursor::new("/help\n__LEAVE__\nhello\n\n/shrug\n/history 0\n/quit\nnever sent\n");
        assert!(read_lines(&mut commands, &mut input).is_none());
        let events: Vec<Event> = inbox.try_iter().collect();
        assert!(
            matches!(&events[..], [Event::Send(text), Event::Quit] if text == "hello"),
            "{events:?}"
        );
        assert_eq!(
            rec.lines(),
            [
                format!("err: {}", input::HELP),
                "err: * reserved word not sent".into(),
                "err: * unknown command /shrug (try /help)".into(),
                format!("err: {}", input::HISTORY_USAGE),
            ]
        );
    }

    /// The chat texts the input handed to the main loop; any other event fails the test.
    fn sent_texts(inbox: &mpsc::Receiver<Event>) -> Vec<String> {
        inbox
            .try_iter()
            .map(|e| match e {
                Event::Send(text) => text,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// Lines are read at most a little over the longest message (100 bytes here): up to that
    /// they are sent, past it skipped whole with one complaint, never held in memory.
    #[test]
    fn lines_too_long_to_send_are_skipped_at_any_boundary() {
        let (screen, rec) = screen(false);
        let dead = DeadTcp::new();
        let (mut commands, inbox) = commands(dead.addr, &screen);
        let longest = "x".repeat(100);
        let input = format!(
            "{longest}\r\n//{longest}\n{}\nok\n{}",
            "y".repeat(5_000),
            "z".repeat(104)
        );
        let end = read_lines(&mut commands, &mut io::Cursor::new(input));
        assert!(matches!(end, Some(Event::Eof)), "{end:?}");
        let sent = sent_texts(&inbox);
        // "//" escapes: the second line is a 101-byte message, which the send refuses later.
        assert_eq!(sent, [longest.clone(), format!("/{longest}"), "ok".into()]);
        assert_eq!(
            rec.lines(),
            [
                "err: * message too long (max 100 bytes)",
                "err: * message too long (max 100 bytes)"
            ]
        );
    }

    #[test]
    fn end_of_input_ends_the_chat() {
        let (screen, _) = screen(false);
        let dead = DeadTcp::new();
        let (mut commands, inbox) = commands(dead.addr, &screen);
        let end = read_lines(&mut commands, &mut io::Cursor::new("a\r\nb"));
        assert!(matches!(end, Some(Event::Eof)), "{end:?}");
        let sent = sent_texts(&inbox);
        assert_eq!(sent, ["a", "b"]);
    }

    #[test]
    fn lines_become_datagrams() {
        let (session, server) = pair("lobby", "00ff");
        let (screen, rec) = screen(false);
        let own = lock(&screen).own_sends();

        send_text(&session, &own, &screen, "hello");
        let bytes = recv(&server);
        let d = ucrp::parse(&bytes).unwrap();
        assert_eq!(d.room_name, b"lobby");
        assert_eq!(d.token, b"00ff");
        assert_eq!(d.message, ucrp::Message::Chat("hello"));
        assert!(rec.lines().is_empty());
    }

    #[test]
    fn a_reply_to_our_message_never_shows_our_messages_number_as_lost() {
        let (session, server) = pair("lobby", "00ff");
        let (screen, rec) = screen(false);
        assert_eq!(
            lock(&screen)
                .handle_datagram(&sequenced(1, "before"))
                .unwrap(),
            Flow::Continue
        );
        // The daemon numbers "mine" 2 and relays it; a reply, 3, can be back before the main
        // thread's send returns. "mine" is noted as ours before it leaves, and the receiver
        // takes the notes before it renders: the reply is not shown with "* 1 message lost".
        let own = lock(&screen).own_sends();
        let mut noted_before_send = None;
        send_own(&own, &screen, session.max_message_len(), || {
            noted_before_send = Some(own.pending());
            session.send_chat("mine")
        });
        assert_eq!(noted_before_send, Some(1), "not noted before it left");
        assert_eq!(
            ucrp::parse(&recv(&server)).unwrap().message,
            ucrp::Message::Chat("mine")
        );
        assert_eq!(
            lock(&screen)
                .handle_datagram(&sequenced(3, "reply"))
                .unwrap(),
            Flow::Continue
        );
        assert_eq!(rec.lines(), ["out: bob: before", "out: bob: reply"]);
    }

    /// The receiver holds the screen while it prints; a stalled standard output (a paused
    /// terminal, a full pipe) keeps it there. Our messages still leave, and a failed one is
    /// not counted as ours.
    #[test]
    fn a_screen_held_by_a_stalled_output_does_not_hold_our_sends() {
        let (session, server) = pair("lobby", "00ff");
        let (screen, rec) = screen(false);
        let own = lock(&screen).own_sends();
        let (done_tx, done) = mpsc::channel();
        let held = lock(&screen);
        thread::scope(|s| {
            s.spawn(|| {
                send_own(&own, &screen, session.max_message_len(), || {
                    session.send_chat("while stalled")
                });
                done_tx.send(()).unwrap();
            });
            assert!(
                done.recv_timeout(Duration::from_secs(10)).is_ok(),
                "the send waited for the screen"
            );
            drop(held);
        });
        assert_eq!(
            ucrp::parse(&recv(&server)).unwrap().message,
            ucrp::Message::Chat("while stalled")
        );
        assert_eq!(own.pending(), 1);
        send_own(&own, &screen, session.max_message_len(), || {
            Err(io::Error::other("refused"))
        });
        assert_eq!(own.pending(), 1, "a failed send is taken back");
        assert_eq!(rec.lines(), ["err: * message not sent: refused"]);
        // Failing while the screen is held, the complaint does not wait for it either.
        let held = lock(&screen);
        let (done_tx, done) = mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                send_own(&own, &screen, session.max_message_len(), || {
                    Err(io::Error::other("refused again"))
                });
                done_tx.send(()).unwrap();
            });
            assert!(
                done.recv_timeout(Duration::from_secs(10)).is_ok(),
                "the complaint waited for the screen"
            );
            drop(held);
        });
        assert_eq!(rec.lines().len(), 1, "it went straight to standard error");
    }

    #[test]
    fn too_long_messages_are_not_sent() {
        let (session, server) = pair("lobby", "00ff");
        let max = session.max_message_len();
        assert_eq!(max, ucrp::MAX_DATAGRAM_LEN - 2 - 5 - 4);
        assert_eq!(
            session.send(&"x".repeat(max + 1)).unwrap(),
            Err(ucrp::Error::TooLarge {
                len: ucrp::MAX_DATAGRAM_LEN + 1,
                max: ucrp::MAX_DATAGRAM_LEN
            })
        );
        let (screen, rec) = screen(false);
        let own = lock(&screen).own_sends();
        send_text(&session, &own, &screen, &"y".repeat(max + 1));
        assert_eq!(
            rec.lines(),
            [format!("err: * message too long (max {max} bytes)")]
        );
        session.send(&"z".repeat(max)).unwrap().unwrap();
        // The first datagram to arrive is the one that fits.
        assert_eq!(recv(&server).len(), ucrp::MAX_DATAGRAM_LEN);
    }

    #[test]
    fn messages_the_daemon_could_not_relay_whole_are_not_sent() {
        // Relayed, 1 + 100 + text must fit 4096 bytes: 3995 bytes of text at most, less than
        // our own datagram would carry.
        let name = "é".repeat(50); // 100 bytes, 50 characters (names have at most 64)
        let (session, server) = pair_named("lobby", &name, "00ff");
        assert_eq!(session.max_message_len(), 3995);
        let (screen, rec) = screen(false);
        let own = lock(&screen).own_sends();
        send_text(&session, &own, &screen, &"y".repeat(3996));
        assert_eq!(rec.lines(), ["err: * message too long (max 3995 bytes)"]);
        send_text(&session, &own, &screen, &"z".repeat(3995));
        let bytes = recv(&server);
        assert_eq!(
            ucrp::parse(&bytes).unwrap().message,
            ucrp::Message::Chat(&"z".repeat(3995)),
            "the longer one was not sent"
        );
    }

    #[test]
    fn leave_sends_the_control_word() {
        let (session, server) = pair("r", "ab");
        session.leave();
        let bytes = recv(&server);
        assert_eq!(ucrp::parse(&bytes).unwrap().message, ucrp::Message::Leave);
    }

    #[test]
    fn receiver_ignores_strangers_and_stops_at_room_closed() {
        let (session, server) = pair("lobby", "ab");
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        let me = session.socket.local_addr().unwrap();
        let me = SocketAddr::from((Ipv4Addr::LOCALHOST, me.port()));
        let chat = |sender: &str, message: &str| {
            let mut out = Vec::new();
            ucrp::delivery::encode_chat(sender, message.as_bytes(), &mut out).unwrap();
            out
        };
        stranger.send_to(&chat("mallory", "spoofed"), me).unwrap();
        stranger.send_to(ucrp::ROOM_CLOSED, me).unwrap();
        server.send_to(&chat("bob", "hi"), me).unwrap();
        server.send_to(&[0x00, 0x09], me).unwrap();
        server.send_to(ucrp::ROOM_CLOSED, me).unwrap();
        server.send_to(&chat("bob", "after the end"), me).unwrap();
        let (screen, rec) = screen(false);
        let event = receive(&session.socket, server.local_addr().unwrap(), &screen);
        assert!(matches!(event, Event::RoomClosed), "{event:?}");
        assert_eq!(
            rec.lines(),
            ["out: bob: hi", "out: * room lobby was closed by its host"]
        );
    }

    /// Datagrams from the server's port at another of the host's addresses (a daemon bound
    /// to a wildcard address answering from the address its route picks) are ignored, and
    /// said so once, so that the chat does not just look silent.
    #[test]
    fn the_servers_port_at_another_address_is_ignored_and_told_once() {
        let (session, server) = pair("lobby", "ab");
        let server_addr = server.local_addr().unwrap();
        let elsewhere = UdpSocket::bind(("127.0.0.2", server_addr.port())).unwrap();
        let me = session.socket.local_addr().unwrap();
        let me = SocketAddr::from((Ipv4Addr::LOCALHOST, me.port()));
        let mut hi = Vec::new();
        ucrp::delivery::encode_chat("bob", b"hi", &mut hi).unwrap();
        elsewhere.send_to(&hi, me).unwrap();
        elsewhere.send_to(&hi, me).unwrap();
        server.send_to(&hi, me).unwrap();
        server.send_to(ucrp::ROOM_CLOSED, me).unwrap();
        let (screen, rec) = screen(false);
        let event = receive(&session.socket, server_addr, &screen);
        assert!(matches!(event, Event::RoomClosed), "{event:?}");
        let told = format!(
            "err: {}",
            answered_from_elsewhere(server_addr, elsewhere.local_addr().unwrap())
        );
        assert_eq!(
            rec.lines(),
            [
                told.as_str(),
                "out: bob: hi",
                "out: * room lobby was closed by its host"
            ]
        );
    }

    /// A closure is believed when the server says the room is gone or we are out of it, asked
    /// again when it is busy, and called forged only when it still takes our token.
    #[test]
    fn the_server_is_asked_about_a_closure_with_our_token() {
        use crate::closure::{check, Verdict};
        let (tcp, asked) = fake_daemon(vec![
            Ok(r#"{"messages": [], "more": false}"#),
            Err((tcrp::ErrorCode::RoomNotFound, "no room")),
            Err((tcrp::ErrorCode::NotMember, "not a member")),
            Err((tcrp::ErrorCode::RateLimited, "slow down")),
            Err((tcrp::ErrorCode::MalformedRequest, "what?")),
        ]);
        let token = Token::new("00ff".into()).unwrap();
        for expected in [
            Verdict::Forged,
            Verdict::Confirmed,
            Verdict::Confirmed,
            Verdict::Busy,
            Verdict::Unknown,
        ] {
            assert_eq!(check(tcp, "lobby", &token), expected);
        }
        let dead = DeadTcp::new();
        assert_eq!(check(dead.addr, "lobby", &token), Verdict::Unknown);
        let asked = asked.lock().unwrap();
        assert_eq!(asked.len(), 5);
        assert!(asked
            .iter()
            .all(|(op, room, payload)| *op == Operation::History
                && room == "lobby"
                && payload.contains("00ff")));
    }

    /// The closure checks as `run` drives them: a [`Checker`] on `tcp` whose verdicts come
    /// back on the returned channel.
    fn checker(tcp: SocketAddr) -> (Checker, mpsc::Receiver<Event>) {
        let (events, inbox) = mpsc::sync_channel(EVENT_QUEUE);
        let checker = Checker {
            tcp,
            room_name: "lobby".into(),
            token: Token::new("00ff".into()).unwrap(),
            events,
        };
        (checker, inbox)
    }

    /// The verdict of the check in flight.
    fn next_verdict(inbox: &mpsc::Receiver<Event>) -> closure::Verdict {
        match inbox.recv_timeout(Duration::from_secs(5)) {
            Ok(Event::Verdict(verdict)) => verdict,
            other => panic!("{other:?}"),
        }
    }

    /// A notice of the room's closing reaches the screen, which is open: the receiver would
    /// report [`Event::RoomClosed`], which the main loop settles.
    fn closed_notice(
        screen: &Mutex<Screen>,
        closures: &mut closure::Policy,
        checker: &Checker,
    ) -> Settled {
        let flow = lock(screen).handle_datagram(ucrp::ROOM_CLOSED).unwrap();
        assert_eq!(flow, Flow::RoomClosed);
        settle(closures.notice(Instant::now()), closures, checker, screen)
    }

    /// A check whose thread panics still sends its verdict (Unknown) as it unwinds, so the
    /// main loop, which waits for one, is not held for good.
    #[test]
    fn a_check_that_panics_still_answers_so_the_chat_is_not_held_for_good() {
        let (events, inbox) = mpsc::sync_channel(1);
        let check = thread::spawn(move || {
            let _answer = Answer {
                events,
                verdict: closure::Verdict::Unknown,
            };
            panic!("the check failed");
        });
        assert!(check.join().is_err(), "the thread panicked");
        assert!(matches!(
            inbox.try_recv(),
            Ok(Event::Verdict(closure::Verdict::Unknown))
        ));
    }

    /// The real closure comes while a planned recheck (after forged notices) is in flight,
    /// and that check finds us still a member: the closure is checked again and believed, and
    /// its line is shown when the session ends, not dropped with the forged notice's.
    #[test]
    fn a_closure_noticed_during_a_check_that_finds_the_last_forged_is_shown_when_confirmed() {
        let still_in = Ok(r#"{"messages": [], "more": false}"#);
        let (tcp, asked) = fake_daemon(vec![
            still_in,
            still_in,
            Err((tcrp::ErrorCode::RoomNotFound, "no room")),
        ]);
        let (screen, rec) = screen(false);
        lock(&screen).defer_closing_lines();
        let (checker, inbox) = checker(tcp);
        let mut closures = closure::Policy::new(true);
        // A forged notice, checked at once and found forged.
        let settled = closed_notice(&screen, &mut closures, &checker);
        assert!(matches!(settled, Settled::Stay));
        let action = closures.verdict(Instant::now(), next_verdict(&inbox));
        let settled = settle(action, &mut closures, &checker, &screen);
        assert!(matches!(settled, Settled::Stay));
        // Another within the cool-down: a recheck is planned.
        let settled = closed_notice(&screen, &mut closures, &checker);
        assert!(matches!(settled, Settled::Stay));
        let due = closures.recheck_at().expect("a recheck planned");
        // The recheck starts; the server answers it before the room really closes.
        let action = closures.due(due).expect("the recheck");
        assert!(matches!(
            settle(action, &mut closures, &checker, &screen),
            Settled::Stay
        ));
        // The real closure comes while that check is in flight.
        let settled = closed_notice(&screen, &mut closures, &checker);
        assert!(matches!(settled, Settled::Stay));
        // The check says we are still in: it does not answer for the real closure.
        let action = closures.verdict(Instant::now(), next_verdict(&inbox));
        let settled = settle(action, &mut closures, &checker, &screen);
        assert!(matches!(settled, Settled::Stay));
        let due = closures.recheck_at().expect("a check for the real closure");
        let action = closures.due(due).expect("the recheck");
        assert!(matches!(
            settle(action, &mut closures, &checker, &screen),
            Settled::Stay
        ));
        let action = closures.verdict(Instant::now(), next_verdict(&inbox));
        let settled = settle(action, &mut closures, &checker, &screen);
        assert!(matches!(settled, Settled::Closed));
        assert_eq!(asked.lock().unwrap().len(), 3);
        assert!(
            !rec.lines().iter().any(|line| line.contains("closed by")),
            "the closure was shown before it was confirmed: {:?}",
            rec.lines()
        );
        assert_eq!(
            lock(&screen).take_closing(),
            ["* room lobby was closed by its host"],
            "what was shown: {:?}",
            rec.lines()
        );
    }

    #[test]
    fn who_asks_with_the_members_token() {
        let (tcp, asked) = fake_daemon(vec![
            Ok(
                r#"{"room": "lobby", "host": "alice", "members": [{"name": "alice", "registered": true}, {"name": "bob", "registered": false}]}"#,
            ),
            Err((tcrp::ErrorCode::RoomNotFound, "no room \"lobby\"")),
        ]);
        let (screen, rec) = screen(false);
        let (mut commands, _inbox) = commands(tcp, &screen);
        assert!(commands.handle_line("/who\n"));
        assert!(commands.handle_line("/who\n"));
        assert_eq!(
            rec.lines(),
            [
                "err: * host: alice",
                "err: * alice (registered)",
                "err: * bob (not registered)",
                "err: * cannot see who is in room \"lobby\": no room \"lobby\"",
            ]
        );
        assert_eq!(
            asked.lock().unwrap()[0],
            (
                Operation::Presence,
                "lobby".into(),
                r#"{"token": "00ff"}"#.into()
            )
        );
    }

    #[test]
    fn history_pages_back_until_there_is_no_more() {
        let (tcp, asked) = fake_daemon(vec![
            Ok(
                r#"{"messages": [{"seq": 9, "sender": "bob", "text": "nine", "at": 1700000000.0}, {"seq": 10, "sender": "bob", "text": "ten", "at": 1700000060.0}], "more": true}"#,
            ),
            Ok(
                r#"{"messages": [{"seq": 8, "sender": "amy", "text": "eight", "at": 1699999940.0}], "more": false}"#,
            ),
        ]);
        let (screen, rec) = screen(false);
        let (mut commands, _inbox) = commands(tcp, &screen);
        assert!(commands.handle_line("/history 2\n"));
        assert!(commands.handle_line("/history\n"));
        // Nothing older exists: no third request.
        assert!(commands.handle_line("/history\n"));
        assert_eq!(
            rec.lines(),
            [
                "out: [22:13] bob: nine",
                "out: [22:14] bob: ten",
                "out: [22:12] amy: eight",
                "err: * no more history",
                "err: * no more history",
            ]
        );
        let asked = asked.lock().unwrap();
        let payloads: Vec<&str> = asked.iter().map(|(_, _, p)| p.as_str()).collect();
        assert_eq!(
            payloads,
            [
                r#"{"token": "00ff", "limit": 2}"#,
                r#"{"token": "00ff", "before": 9, "limit": 20}"#
            ]
        );
        assert!(asked
            .iter()
            .all(|(op, room, _)| *op == Operation::History && room == "lobby"));
    }

    #[test]
    fn recent_history_is_shown_before_the_held_live_messages() {
        let (tcp, asked) = fake_daemon(vec![Ok(
            r#"{"messages": [{"seq": 4, "sender": "bob", "text": "m4", "at": 1700000000.0}], "more": false}"#,
        )]);
        let (screen, rec) = screen(true);
        assert_eq!(
            lock(&screen).handle_datagram(&sequenced(4, "m4")).unwrap(),
            Flow::Continue
        );
        assert_eq!(
            lock(&screen).handle_datagram(&sequenced(5, "m5")).unwrap(),
            Flow::Continue
        );
        let (mut commands, inbox) = commands(tcp, &screen);
        commands.show_recent_history();
        assert_eq!(
            rec.lines(),
            [
                "out: [22:13] bob: m4",
                "err: * --- live ---",
                "out: bob: m5"
            ]
        );
        assert_eq!(
            asked.lock().unwrap()[0].2,
            r#"{"token": "00ff", "limit": 20}"#
        );
        assert!(inbox.try_recv().is_err(), "nothing for the main loop");
    }

    /// The page shown at join is where `/history` starts: it is not shown twice.
    #[test]
    fn history_after_a_join_pages_back_from_what_the_join_showed() {
        let (tcp, asked) = fake_daemon(vec![
            Ok(
                r#"{"messages": [{"seq": 9, "sender": "bob", "text": "nine", "at": 1700000000.0}], "more": true}"#,
            ),
            Ok(
                r#"{"messages": [{"seq": 8, "sender": "amy", "text": "eight", "at": 1699999940.0}], "more": false}"#,
            ),
        ]);
        let (screen, rec) = screen(true);
        let (mut commands, _inbox) = commands(tcp, &screen);
        commands.show_recent_history();
        assert!(commands.handle_line("/history 5\n"));
        assert!(commands.handle_line("/history\n"));
        assert_eq!(
            rec.lines(),
            [
                "out: [22:13] bob: nine",
                "err: * --- live ---",
                "out: [22:12] amy: eight",
                "err: * no more history",
                "err: * no more history",
            ]
        );
        let asked = asked.lock().unwrap();
        assert_eq!(
            asked[1].2, r#"{"token": "00ff", "before": 9, "limit": 5}"#,
            "the first /history asks for what precedes the join's page"
        );
        assert_eq!(asked.len(), 2);
    }

    /// A room with nothing said yet at join: `/history` later asks for the latest messages.
    #[test]
    fn history_after_joining_an_empty_room_fetches_what_was_said_since() {
        let (tcp, asked) = fake_daemon(vec![
            Ok(r#"{"messages": [], "more": false}"#),
            Ok(
                r#"{"messages": [{"seq": 1, "sender": "bob", "text": "one", "at": 1700000000.0}], "more": false}"#,
            ),
        ]);
        let (screen, rec) = screen(true);
        let (mut commands, _inbox) = commands(tcp, &screen);
        commands.show_recent_history();
        assert!(commands.handle_line("/history 5\n"));
        assert_eq!(
            rec.lines(),
            [
                "err: * --- live ---",
                "out: [22:13] bob: one",
                "err: * no more history"
            ]
        );
        assert_eq!(
            asked.lock().unwrap()[1].2,
            r#"{"token": "00ff", "limit": 5}"#
        );
    }

    #[test]
    fn a_server_without_history_is_passed_over_in_silence() {
        let (tcp, _) = fake_daemon(vec![Err((
            tcrp::ErrorCode::UnsupportedOperation,
            "operation 5 is not supported",
        ))]);
        let (screen, rec) = screen(true);
        assert_eq!(
            lock(&screen).handle_datagram(&sequenced(1, "hi")).unwrap(),
            Flow::Continue
        );
        let (mut commands, _inbox) = commands(tcp, &screen);
        commands.show_recent_history();
        assert_eq!(rec.lines(), ["out: bob: hi"]);
    }

    /// With `--original`, `/who` and `/history` are answered on the spot and nothing is asked
    /// over TCP: the original server has no such request and would hold the input up to the
    /// handshake timeout before failing.
    #[test]
    fn original_mode_asks_the_server_nothing_for_who_and_history() {
        let (screen, rec) = screen(false);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let (mut commands, _inbox) = commands(listener.local_addr().unwrap(), &screen);
        commands.original = true;
        for line in ["/who", "/history", "/history 5", "/help"] {
            assert!(commands.handle_line(line), "{line}");
        }
        let lines = rec.lines();
        let not = format!("err: {}", input::NOT_ORIGINAL);
        assert_eq!(lines[..3], [not.clone(), not.clone(), not], "{lines:?}");
        assert_eq!(lines[3], format!("err: {}", input::HELP_ORIGINAL));
        assert!(
            matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a connection was made"
        );
    }

    #[test]
    fn other_history_failures_are_told_and_the_chat_goes_on() {
        let (screen, rec) = screen(true);
        assert_eq!(
            lock(&screen).handle_datagram(&sequenced(1, "hi")).unwrap(),
            Flow::Continue
        );
        assert_eq!(
            lock(&screen).handle_datagram(ucrp::ROOM_CLOSED).unwrap(),
            Flow::Continue
        );
        let dead = DeadTcp::new();
        let (mut commands, inbox) = commands(dead.addr, &screen);
        commands.show_recent_history();
        let lines = rec.lines();
        assert!(
            lines[0].starts_with("err: * history unavailable: cannot connect to 127.0.0.1:"),
            "{lines:?}"
        );
        assert_eq!(
            lines[1..],
            ["out: bob: hi", "out: * room lobby was closed by its host"]
        );
        // The room closed while the screen was held: the main loop is told.
        assert!(matches!(inbox.try_recv(), Ok(Event::RoomClosed)));
    }
}
