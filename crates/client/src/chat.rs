//! The UDP half of a session: register, chat, keep alive, leave.
//!
//! [`Session`] owns the UDP socket and turns text into datagrams with [`ucrp::datagram`].
//! [`run`] is the chat loop. Three helper threads feed one channel of [`Event`]s and the main
//! thread alone decides what to send:
//! - the *receiver* reads datagrams, ignores any whose source is not the server, renders them
//!   with [`Renderer`] to standard output and reports the room's closing;
//! - the *stdin reader* sends each typed line, then end of input;
//! - the *signal watcher* reports SIGINT, SIGTERM and SIGHUP, so that Ctrl+C, `kill` and a
//!   closed terminal all leave the room properly instead of waiting for the server's timeout.
//!
//! The keepalive needs no thread: the main loop waits on the channel no longer than the next
//! keepalive is due, then resends `__REGISTER__`, which also re-teaches a restarted daemon
//! our address. Every way out sends `__LEAVE__` except the room's closing, where the room is
//! already gone.

use std::io::{self, BufRead, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use ucrp::datagram::{self, LEAVE, REGISTER};

use crate::error::ClientError;
use crate::handshake::{Token, Verb};
use crate::input::{self, Input};
use crate::render::{printable, Flow, Renderer};

/// Receive buffer size, in bytes. The server sends at most [`ucrp::MAX_DATAGRAM_LEN`]; a
/// larger buffer means an oversized datagram is parsed (and likely dropped) rather than cut.
const RECV_BUFFER_LEN: usize = 64 * 1024;

/// What the helper threads tell the main loop.
#[derive(Debug)]
enum Event {
    /// A line from standard input, line ending included.
    Line(String),
    /// Standard input reached its end.
    Eof,
    /// A termination signal arrived.
    Signal(i32),
    /// The server closed the room (already printed).
    RoomClosed,
    /// A helper thread hit an error it cannot go on after.
    Failed(ClientError),
}

/// A member's UDP endpoint: the socket, the server's chat address and the credentials every
/// datagram carries.
#[derive(Debug)]
pub struct Session {
    socket: UdpSocket,
    server: SocketAddr,
    room_name: String,
    token: Token,
}

impl Session {
    /// Binds a UDP socket on an ephemeral port of the server address's family.
    pub fn open(server: SocketAddr, room_name: &str, token: Token) -> Result<Session, ClientError> {
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
        })
    }

    /// Longest chat message that fits one datagram with our room name and token, in bytes.
    pub fn max_message_len(&self) -> usize {
        ucrp::MAX_DATAGRAM_LEN.saturating_sub(
            datagram::FIXED_LEN + self.room_name.len() + self.token.as_bytes().len(),
        )
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

/// Runs the chat until the user leaves or the host closes the room. Prints
/// `* joined ROOM as NAME (type /quit to leave)` to standard error once registered.
pub fn run(
    session: Session,
    verb: Verb,
    username: &str,
    keepalive: Duration,
) -> Result<(), ClientError> {
    let (events, inbox) = mpsc::channel();
    // Signals first: from here on Ctrl+C must not kill us before we can say __LEAVE__.
    spawn_signal_watcher(events.clone())?;
    spawn_receiver(&session, events.clone())?;

    session
        .send_control(REGISTER)
        .map_err(ClientError::io("sending __REGISTER__"))?;
    info!(
        "registered with {} in {:?}",
        session.server, session.room_name
    );
    eprintln!(
        "* {} {} as {} (type /quit to leave)",
        verb.past(),
        printable(&session.room_name),
        printable(username)
    );
    spawn_stdin_reader(events);

    let mut next_keepalive = Instant::now() + keepalive;
    loop {
        let wait = next_keepalive.saturating_duration_since(Instant::now());
        let event = match inbox.recv_timeout(wait) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = session.send_control(REGISTER) {
                    warn!("keepalive to {} failed: {e}", session.server);
                }
                next_keepalive = Instant::now() + keepalive;
                continue;
            }
            // Every helper is gone; nothing more can happen.
            Err(RecvTimeoutError::Disconnected) => Event::Eof,
        };
        match event {
            Event::Line(line) => {
                if handle_line(&session, &line) == LineOutcome::Quit {
                    break;
                }
            }
            Event::Eof => {
                debug!("end of input");
                break;
            }
            Event::Signal(signal) => {
                debug!("signal {signal}");
                break;
            }
            Event::RoomClosed => return Ok(()),
            Event::Failed(error) => {
                session.leave();
                return Err(error);
            }
        }
    }
    session.leave();
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum LineOutcome {
    Continue,
    Quit,
}

/// Acts on one typed line; local feedback goes to standard error.
fn handle_line(session: &Session, line: &str) -> LineOutcome {
    match input::classify(line) {
        Input::Send(text) => match session.send(text) {
            Ok(Ok(())) => {}
            Ok(Err(ucrp::Error::TooLarge { .. })) => {
                eprintln!(
                    "* message too long (max {} bytes)",
                    session.max_message_len()
                )
            }
            Ok(Err(e)) => eprintln!("* message not sent: {e}"),
            Err(e) => eprintln!("* message not sent: {e}"),
        },
        Input::Quit => return LineOutcome::Quit,
        Input::Help => eprintln!("{}", input::HELP),
        Input::Unknown(command) => {
            eprintln!("* unknown command {} (try /help)", printable(command))
        }
        Input::Reserved => eprintln!("* reserved word not sent"),
        Input::Empty => {}
    }
    LineOutcome::Continue
}

fn spawn_signal_watcher(events: Sender<Event>) -> Result<(), ClientError> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
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

fn spawn_receiver(session: &Session, events: Sender<Event>) -> Result<(), ClientError> {
    let socket = session
        .socket
        .try_clone()
        .map_err(ClientError::io("cloning the UDP socket"))?;
    let server = session.server;
    let mut renderer = Renderer::new(&session.room_name);
    thread::Builder::new()
        .name("receiver".into())
        .spawn(move || {
            let event = receive(&socket, server, &mut renderer, &mut io::stdout());
            let _ = events.send(event);
        })
        .map_err(ClientError::io("starting the receiver thread"))?;
    Ok(())
}

/// Receives and prints to `out` until the room closes or an error ends it; returns the event
/// that ended it.
fn receive(
    socket: &UdpSocket,
    server: SocketAddr,
    renderer: &mut Renderer,
    out: &mut impl Write,
) -> Event {
    let mut buf = vec![0u8; RECV_BUFFER_LEN];
    let mut lines = Vec::new();
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
            continue;
        }
        // `len <= buf.len()`: recv_from never reports more than the buffer holds.
        let flow = renderer.handle_datagram(&buf[..len], &mut lines);
        if let Err(source) = print_lines(&lines, out) {
            return Event::Failed(ClientError::Io {
                context: "writing to standard output",
                source,
            });
        }
        lines.clear();
        if flow == Flow::RoomClosed {
            return Event::RoomClosed;
        }
    }
}

/// Prints and flushes, so that a reader on a pipe sees each line at once.
fn print_lines(lines: &[String], out: &mut impl Write) -> io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()
}

fn spawn_stdin_reader(events: Sender<Event>) {
    let spawned = thread::Builder::new().name("stdin".into()).spawn(move || {
        let event = read_stdin(&events);
        let _ = events.send(event);
    });
    if let Err(e) = spawned {
        // Without input we can still receive; leaving is then up to a signal.
        warn!("could not start the input thread: {e}");
    }
}

/// Sends each line of standard input as an event; returns the event that ends the input.
fn read_stdin(events: &Sender<Event>) -> Event {
    let stdin = io::stdin();
    let mut stdin = stdin.lock();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match stdin.read_until(b'\n', &mut raw) {
            Ok(0) => return Event::Eof,
            Ok(_) => {
                let line = String::from_utf8_lossy(&raw).into_owned();
                if events.send(Event::Line(line)).is_err() {
                    return Event::Eof;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Event::Failed(ClientError::Io {
                    context: "reading standard input",
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session aimed at a local socket that plays the server.
    fn pair(room: &str, token: &str) -> (Session, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let session = Session::open(
            server.local_addr().unwrap(),
            room,
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

    #[test]
    fn lines_become_datagrams_and_commands_do_not() {
        let (session, server) = pair("lobby", "00ff");
        assert_eq!(handle_line(&session, "/help\n"), LineOutcome::Continue);
        assert_eq!(handle_line(&session, "__LEAVE__\n"), LineOutcome::Continue);
        assert_eq!(handle_line(&session, "hello\n"), LineOutcome::Continue);
        // Only the chat line went out.
        let bytes = recv(&server);
        let d = ucrp::parse(&bytes).unwrap();
        assert_eq!(d.room_name, b"lobby");
        assert_eq!(d.token, b"00ff");
        assert_eq!(d.message, ucrp::Message::Chat("hello"));
        assert_eq!(handle_line(&session, "/quit\n"), LineOutcome::Quit);
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
        handle_line(&session, &"y".repeat(max + 1));
        session.send(&"z".repeat(max)).unwrap().unwrap();
        // The first datagram to arrive is the one that fits.
        assert_eq!(recv(&server).len(), ucrp::MAX_DATAGRAM_LEN);
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
        let mut renderer = Renderer::new("lobby");
        let mut out = Vec::new();
        let event = receive(
            &session.socket,
            server.local_addr().unwrap(),
            &mut renderer,
            &mut out,
        );
        assert!(matches!(event, Event::RoomClosed), "{event:?}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "bob: hi\n* room lobby was closed by its host\n"
        );
    }
}
