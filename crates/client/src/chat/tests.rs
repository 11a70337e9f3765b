//! The chat's unit tests: sessions against local sockets, fake daemons over TCP.

use super::checks::{AnswerOnDrop, Settled};
use super::commands::{unanswered, waiting, ASKING};
use super::input_thread::{after_a_failed_read, handle_edited, read_lines};
use super::receiver::{answered_from_elsewhere, receive};
use super::*;
use crate::handshake::Token;
use crate::input;
use crate::render::Flow;
use crate::screen::tests::Recorder;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::net::{Ipv4Addr, UdpSocket};
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
    loop {
        match server.recv_from(&mut buf) {
            Ok((n, _)) => return buf[..n].to_vec(),
            // A stop and continue of the test process ends the wait with EINTR.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("no datagram from the client: {e}"),
        }
    }
}

/// [`receive`] on `socket` from `server` onto `screen`, heard just now, with nothing refused
/// (a refusal fails the test): the event that ended it.
fn receive_unrefused(socket: &UdpSocket, server: SocketAddr, screen: &Mutex<Screen>) -> Event {
    let heard = Mutex::new(Instant::now());
    receive(socket, server, screen, &heard, &mut || {
        panic!("nothing was refused")
    })
}

fn screen(hold: bool) -> (Arc<Mutex<Screen>>, Recorder) {
    let rec = Recorder::default();
    let screen = Screen::new("lobby", Box::new(rec.clone()), hold);
    (Arc::new(Mutex::new(screen)), rec)
}

/// Commands for room "lobby" with token "00ff", the daemon's TCP port at `tcp`.
fn commands(tcp: SocketAddr, screen: &Arc<Mutex<Screen>>) -> (Commands, mpsc::Receiver<Event>) {
    let (events, inbox) = mpsc::sync_channel(1024);
    let asker = Asker {
        tcp,
        room_name: "lobby".into(),
        token: Token::new("00ff".into()).unwrap(),
        pager: HistoryPager::default(),
        screen: Arc::clone(screen),
        events: events.clone().into(),
        editor: false,
    };
    let commands = Commands::new(asker, events, 100, false);
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

/// Checks that the fake daemon was asked `count` requests, each an `op` about `lobby` whose
/// payload holds `needle` (the token, in the form the request carries it).
fn assert_asked(asked: &Asked, count: usize, op: Operation, needle: &str) {
    let asked = asked.lock().unwrap();
    assert_eq!(asked.len(), count, "{asked:?}");
    assert!(
        asked
            .iter()
            .all(|(o, room, payload)| *o == op && room == "lobby" && payload.contains(needle)),
        "{asked:?}"
    );
}

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
        io::Cursor::new("/help\n__LEAVE__\nhello\n\n \t \n/shrug\n/history 0\n/quit\nnever sent\n");
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

/// Once the line editor prints, a remark waits for the screen (to be drawn above the line
/// being typed) rather than going around it to standard error: the command's own, and the
/// answer to a question asked on the input thread.
#[test]
fn with_the_line_editor_remarks_wait_for_the_screen() {
    let (screen, rec) = screen(false);
    let dead = DeadTcp::new();
    let (mut commands, _inbox) = commands(dead.addr, &screen);
    commands.editor_prints();
    let (lines, typed) = mpsc::channel::<&'static str>();
    let (done, handled) = mpsc::channel();
    let typing = thread::spawn(move || {
        for line in typed {
            done.send(commands.handle_line(line)).unwrap();
        }
    });
    for line in ["/help\n", "/who\n"] {
        let held = lock(&screen);
        lines.send(line).unwrap();
        assert!(
            handled.recv_timeout(Duration::from_millis(300)).is_err(),
            "{line:?} was answered around the held screen"
        );
        drop(held);
        assert_eq!(handled.recv_timeout(Duration::from_secs(10)), Ok(true));
    }
    drop(lines);
    typing.join().unwrap();
    let shown: Vec<String> = rec
        .lines()
        .into_iter()
        .filter(|l| *l != format!("err: {ASKING}"))
        .collect();
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert_eq!(shown[0], format!("err: {}", input::HELP));
    assert!(
        shown[1].starts_with("err: * cannot connect to 127.0.0.1:"),
        "{shown:?}"
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
            "err: * message not sent: too long (at most 100 bytes of UTF-8 fit one message)",
            "err: * message not sent: too long (at most 100 bytes of UTF-8 fit one message)"
        ]
    );
}

/// A failed read of the terminal: Ctrl+C quits; the end of input, and a terminal hung up
/// (`EIO`, as rustyline reports it either way), end the input; a byte that is not UTF-8 is
/// told of and the reading goes on; any other error ends the input with that error.
#[test]
fn a_failed_read_of_the_terminal_ends_the_input_as_its_error_says() {
    use nix::errno::Errno;
    use rustyline::error::ReadlineError;
    let (screen, rec) = screen(false);
    let dead = DeadTcp::new();
    let (commands, _inbox) = commands(dead.addr, &screen);
    let after = |error| after_a_failed_read(&commands, error);
    let os = |errno| ReadlineError::Io(io::Error::from_raw_os_error(errno));
    assert!(matches!(
        after(ReadlineError::Interrupted),
        Some(Event::Quit)
    ));
    assert!(matches!(after(ReadlineError::Eof), Some(Event::Eof)));
    assert!(matches!(
        after(ReadlineError::Errno(Errno::EIO)),
        Some(Event::Eof)
    ));
    assert!(matches!(after(os(libc::EIO)), Some(Event::Eof)));
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
    for failure in [
        os(libc::EAGAIN),
        os(libc::EBADF),
        ReadlineError::Errno(Errno::EBADF),
    ] {
        let told = format!("{failure:?}");
        let end = after(failure);
        assert!(
            matches!(
                end,
                Some(Event::Failed(ClientError::Io {
                    context: "reading the terminal",
                    ..
                }))
            ),
            "{told}: {end:?}"
        );
    }
    let not_utf8 = io::Error::new(io::ErrorKind::InvalidData, "invalid utf-8");
    assert!(
        after(ReadlineError::Io(not_utf8)).is_none(),
        "the input ended"
    );
    let lines = rec.lines();
    assert!(
        lines.len() == 1 && lines[0].starts_with("err: ") && lines[0].contains("UTF-8"),
        "{lines:?}"
    );
}

/// A block pasted into the line editor comes back as one text with its line breaks: each
/// of its lines is acted on in turn, as piped lines are, up to a `/quit` among them.
#[test]
fn an_edited_paste_is_acted_on_line_by_line() {
    let (screen, rec) = screen(false);
    let dead = DeadTcp::new();
    let (mut commands, inbox) = commands(dead.addr, &screen);
    assert!(handle_edited(&mut commands, "one\ntwo\n\n/help\nthree\n"));
    assert_eq!(sent_texts(&inbox), ["one", "two", "three"]);
    assert_eq!(rec.lines(), [format!("err: {}", input::HELP)]);
    assert!(!handle_edited(&mut commands, "four\n/quit\nnever sent"));
    let events: Vec<Event> = inbox.try_iter().collect();
    assert!(
        matches!(&events[..], [Event::Send(text), Event::Quit] if text == "four"),
        "{events:?}"
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

/// Standard input whose reads give out these results in turn, then its end.
struct ScriptedInput(std::collections::VecDeque<io::Result<&'static [u8]>>);

impl Read for ScriptedInput {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(next) = self.0.pop_front() else {
            return Ok(0);
        };
        let bytes = next?;
        out[..bytes.len()].copy_from_slice(bytes);
        Ok(bytes.len())
    }
}

/// A terminal that hung up (its window closed) answers reads with EIO: that is the end of
/// the input, as the SIGHUP that comes with it says, not a failure.
#[test]
fn a_hung_up_terminal_ends_the_input_as_its_end_does() {
    let (screen, rec) = screen(false);
    let dead = DeadTcp::new();
    let (mut commands, inbox) = commands(dead.addr, &screen);
    let mut input = io::BufReader::new(ScriptedInput(
        [
            Ok(&b"before\n"[..]),
            Err(io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32)),
            Ok(&b"after\n"[..]),
        ]
        .into(),
    ));
    let end = read_lines(&mut commands, &mut input);
    assert!(matches!(end, Some(Event::Eof)), "{end:?}");
    assert_eq!(sent_texts(&inbox), ["before"]);
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
}

/// A read of standard input that fails ends the input with the error: what follows it is
/// not read, let alone sent.
#[test]
fn a_failed_read_of_standard_input_ends_the_input_with_the_error() {
    let (screen, rec) = screen(false);
    let dead = DeadTcp::new();
    let (mut commands, inbox) = commands(dead.addr, &screen);
    let mut input = io::BufReader::new(ScriptedInput(
        [
            Ok(&b"before\n"[..]),
            Err(io::Error::other("device gone")),
            Ok(&b"after\n"[..]),
        ]
        .into(),
    ));
    let end = read_lines(&mut commands, &mut input);
    assert!(
        matches!(
            &end,
            Some(Event::Failed(ClientError::Io {
                context: "reading standard input",
                source,
            })) if source.to_string() == "device gone"
        ),
        "{end:?}"
    );
    assert_eq!(sent_texts(&inbox), ["before"]);
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
}

/// On `ocm join` the input thread shows the recent history before it reads a line; when
/// the server says then that we are not in the room, it tells the main loop and ends
/// without reading any input.
#[test]
fn the_input_thread_reads_nothing_when_the_join_finds_us_gone() {
    let (tcp, asked) = fake_daemon(vec![Err((tcrp::ErrorCode::RoomNotFound, "no room"))]);
    let (screen, rec) = screen(true);
    let (commands, inbox) = commands(tcp, &screen);
    spawn_input(commands, true, None);
    let patience = Duration::from_secs(10);
    let first = inbox.recv_timeout(patience);
    assert!(
        matches!(&first, Ok(Event::Gone(line)) if line.contains("no longer in room lobby")),
        "{first:?}"
    );
    // The thread has ended, and its end of the channel with it: no Eof from a read input.
    let second = inbox.recv_timeout(patience);
    assert!(
        matches!(second, Err(RecvTimeoutError::Disconnected)),
        "{second:?}"
    );
    assert_eq!(asked.lock().unwrap()[0].0, Operation::History);
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
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
    send_own(&own, &screen, || {
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
            send_own(&own, &screen, || session.send_chat("while stalled"));
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
    send_own(&own, &screen, || Err(io::Error::other("refused")));
    assert_eq!(own.pending(), 1, "a failed send is taken back");
    assert_eq!(rec.lines(), ["err: * message not sent: refused"]);
    // Failing while the screen is held, the complaint does not wait for it either.
    let held = lock(&screen);
    let (done_tx, done) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            send_own(&own, &screen, || Err(io::Error::other("refused again")));
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
    assert_eq!(
        session.send_chat(&"x".repeat(max + 1)).unwrap(),
        Err(Unsent::MessageTooLong { len: max + 1, max })
    );
    let (screen, rec) = screen(false);
    let own = lock(&screen).own_sends();
    send_text(&session, &own, &screen, &"y".repeat(max + 1));
    assert_eq!(
        rec.lines(),
        [format!(
            "err: * message not sent: too long (at most {max} bytes of UTF-8 fit one message)"
        )]
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
    assert_eq!(
        rec.lines(),
        ["err: * message not sent: too long (at most 3995 bytes of UTF-8 fit one message)"]
    );
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
    fail_instead_of_waiting_for_ever(&session);
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
    let event = receive_unrefused(&session.socket, server.local_addr().unwrap(), &screen);
    assert!(matches!(event, Event::RoomClosed), "{event:?}");
    assert_eq!(
        rec.lines(),
        ["out: bob: hi", "out: * room lobby was closed"]
    );
}

/// Makes the receiver give up on `session`'s socket after 10 s of silence (its read then fails,
/// and so does the test), for a test whose last datagram should end its `receive`: a receiver
/// that misses the end would otherwise wait on the socket for ever.
fn fail_instead_of_waiting_for_ever(session: &Session) {
    session
        .socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
}

/// Datagrams from the server's port at another of the host's addresses (a daemon bound
/// to a wildcard address answering from the address its route picks) are ignored, and
/// said so once, so that the chat does not just look silent.
#[test]
fn the_servers_port_at_another_address_is_ignored_and_told_once() {
    let (session, server) = pair("lobby", "ab");
    fail_instead_of_waiting_for_ever(&session);
    let server_addr = server.local_addr().unwrap();
    let elsewhere = UdpSocket::bind(("127.0.0.2", server_addr.port())).unwrap();
    let me = session.socket.local_addr().unwrap();
    let me = SocketAddr::from((Ipv4Addr::LOCALHOST, me.port()));
    let mut hi = Vec::new();
    ucrp::delivery::encode_chat("bob", b"hi", &mut hi).unwrap();
    for _ in 0..3 {
        elsewhere.send_to(&hi, me).unwrap();
    }
    server.send_to(&hi, me).unwrap();
    server.send_to(ucrp::ROOM_CLOSED, me).unwrap();
    let (screen, rec) = screen(false);
    let event = receive_unrefused(&session.socket, server_addr, &screen);
    assert!(matches!(event, Event::RoomClosed), "{event:?}");
    let told = format!(
        "err: {}",
        answered_from_elsewhere(server_addr, elsewhere.local_addr().unwrap())
    );
    // Both addresses and the likely cause, so that the silence can be acted on.
    for part in [
        format!("127.0.0.2:{}", server_addr.port()),
        server_addr.to_string(),
        "wildcard".into(),
    ] {
        assert!(told.contains(&part), "{told:?} lacks {part:?}");
    }
    assert_eq!(
        rec.lines(),
        [
            told.as_str(),
            "out: bob: hi",
            "out: * room lobby was closed"
        ]
    );
}

/// A datagram refused by the server's closed UDP port (a daemon down or restarting) is an
/// [`Event::Refused`] for each refusal, and the receiver goes on: the server that comes back
/// on the port is heard, and noted as heard.
#[test]
fn a_closed_server_port_is_reported_and_the_receiver_goes_on() {
    let (session, server) = pair("lobby", "ab");
    let server_addr = server.local_addr().unwrap();
    drop(server);
    let (screen, rec) = screen(false);
    let (events, inbox) = mpsc::sync_channel(16);
    let start = Instant::now();
    let heard = Arc::new(Mutex::new(start));
    spawn_receiver(&session, screen, events.into(), Arc::clone(&heard)).unwrap();
    let patience = Duration::from_secs(10);
    for text in ["hello", "again"] {
        assert!(matches!(session.send_chat(text), Ok(Ok(()))));
        let event = inbox.recv_timeout(patience);
        assert!(matches!(event, Ok(Event::Refused)), "{event:?}");
    }
    // The server is back on its port (nothing else took it meanwhile: else, skip the rest).
    let Ok(server) = UdpSocket::bind(server_addr) else {
        return;
    };
    let me = session.socket.local_addr().unwrap();
    let me = SocketAddr::from((Ipv4Addr::LOCALHOST, me.port()));
    let mut hi = Vec::new();
    ucrp::delivery::encode_chat("bob", b"back", &mut hi).unwrap();
    server.send_to(&hi, me).unwrap();
    server.send_to(ucrp::ROOM_CLOSED, me).unwrap();
    let event = inbox.recv_timeout(patience);
    assert!(matches!(event, Ok(Event::RoomClosed)), "{event:?}");
    assert_eq!(rec.lines()[0], "out: bob: back");
    assert!(*heard.lock().unwrap() > start);
}

/// Sends that meet an ICMP error the receiver has not taken yet go out all the same: the
/// error is about an earlier datagram.
#[test]
fn a_send_after_a_refusal_not_yet_received_still_goes() {
    let (session, server) = pair("lobby", "ab");
    let server_addr = server.local_addr().unwrap();
    drop(server);
    // Nobody receives: each refusal waits on the socket for the next send to meet.
    for _ in 0..3 {
        assert!(matches!(session.send_chat("hello"), Ok(Ok(()))));
        assert!(session.register().unwrap());
    }
    let Ok(server) = UdpSocket::bind(server_addr) else {
        return;
    };
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // A refusal may still be on its way; the send meeting it goes again.
    assert!(matches!(session.send_chat("back"), Ok(Ok(()))));
    let bytes = recv(&server);
    assert_eq!(
        ucrp::parse(&bytes).unwrap().message,
        ucrp::Message::Chat("back")
    );
}

/// A closure is believed when the server says the room is gone or we are out of it, asked
/// again when it is busy, and called forged only when it still takes our token.
/// A terminal whose output fails.
struct FailingOutput;

impl crate::screen::Printer for FailingOutput {
    fn print_out(&mut self, _: &str) -> io::Result<()> {
        Err(io::Error::other("output failed"))
    }
    fn print_err(&mut self, _: &str) {}
}

/// The receiver thread reports a failure once and stops: it does not read on into a chat
/// that is ending.
#[test]
fn the_receiver_thread_stops_after_a_failure() {
    let (session, server) = pair("lobby", "ab");
    let screen = Arc::new(Mutex::new(Screen::new(
        "lobby",
        Box::new(FailingOutput),
        false,
    )));
    let (events, inbox) = mpsc::sync_channel(16);
    spawn_receiver(
        &session,
        screen,
        events.into(),
        Arc::new(Mutex::new(Instant::now())),
    )
    .unwrap();
    let me = session.socket.local_addr().unwrap();
    let me = SocketAddr::from((Ipv4Addr::LOCALHOST, me.port()));
    let mut hi = Vec::new();
    ucrp::delivery::encode_chat("bob", b"hi", &mut hi).unwrap();
    server.send_to(&hi, me).unwrap();
    server.send_to(&hi, me).unwrap();
    let patience = Duration::from_secs(10);
    let first = inbox.recv_timeout(patience);
    assert!(matches!(first, Ok(Event::Failed(_))), "{first:?}");
    // The thread is gone, and its end of the channel with it: nothing for the second one.
    let second = inbox.recv_timeout(patience);
    assert!(
        matches!(second, Err(RecvTimeoutError::Disconnected)),
        "{second:?}"
    );
}

/// A settled notice that could not be printed ends the session with a `__LEAVE__`: as a
/// plain departure when the reader of our output is gone, as an error otherwise.
#[test]
fn a_failed_print_ends_the_session_with_a_leave_and_an_error_unless_the_reader_is_gone() {
    for (kind, reader_gone) in [
        (io::ErrorKind::BrokenPipe, true),
        (io::ErrorKind::Other, false),
    ] {
        let (session, server) = pair("lobby", "ab");
        let (screen, _) = screen(false);
        let ended = end_on(Settled::Failed(kind.into()), &session, &screen, &mut None);
        match ended {
            Some(Ok(Ending::Left)) => assert!(reader_gone, "{kind:?}"),
            Some(Err(ClientError::Io { .. })) => assert!(!reader_gone, "{kind:?}"),
            other => panic!("{kind:?}: {other:?}"),
        }
        let bytes = recv(&server);
        assert_eq!(ucrp::parse(&bytes).unwrap().message, ucrp::Message::Leave);
    }
}

/// A screen whose closing lines are kept, and which a notice has just closed.
fn closed_screen() -> (Arc<Mutex<Screen>>, Recorder) {
    let (screen, rec) = screen(false);
    lock(&screen).defer_closing_lines();
    assert_eq!(
        lock(&screen).handle_datagram(ucrp::ROOM_CLOSED).unwrap(),
        Flow::RoomClosed
    );
    (screen, rec)
}

/// A believed closure ends the session: the kept closing line is taken for printing (on
/// standard output, past the screen's printer), and a `__LEAVE__` goes first only when the
/// server did not confirm it: a room that is gone does not hold us.
#[test]
fn a_believed_closure_prints_its_kept_line_and_leaves_unless_confirmed() {
    for confirmed in [true, false] {
        let (session, server) = pair("lobby", "ab");
        let (screen, rec) = closed_screen();
        let ended = end_on(Settled::Closed { confirmed }, &session, &screen, &mut None);
        assert!(matches!(ended, Some(Ok(Ending::RoomEnded))), "{ended:?}");
        assert_eq!(
            lock(&screen).take_closing(),
            Vec::<String>::new(),
            "the closing line was left unprinted ({confirmed})"
        );
        assert!(rec.lines().is_empty(), "{:?}", rec.lines());
        assert!(!session.register().unwrap(), "the session has ended");
        // UDP on loopback keeps the order: a __LEAVE__, if any, comes before this.
        session.send("marker").unwrap().unwrap();
        let bytes = recv(&server);
        let first = ucrp::parse(&bytes).unwrap().message;
        let expected = if confirmed {
            ucrp::Message::Chat("marker")
        } else {
            ucrp::Message::Leave
        };
        assert_eq!(first, expected, "confirmed: {confirmed}");
    }
}

/// The server says we are no longer in the room: the session ends as at a confirmed
/// closure, the kept lines taken for printing like the reason after them.
#[test]
fn a_session_the_server_no_longer_holds_ends_as_a_confirmed_closure() {
    let (screen, rec) = closed_screen();
    finish_gone(&screen, None, "* you are no longer in room lobby");
    assert_eq!(lock(&screen).take_closing(), Vec::<String>::new());
    // Printing went back to plain standard output and error first.
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
}

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
    assert_asked(&asked, 5, Operation::History, "00ff");
}

/// The closure checks as `run` drives them: a [`Checker`] on `tcp` whose verdicts come
/// back on the returned channel.
fn checker(tcp: SocketAddr) -> (Checker, mpsc::Receiver<Event>) {
    let (events, inbox) = mpsc::sync_channel(EVENT_QUEUE);
    let checker = Checker {
        tcp,
        room_name: "lobby".into(),
        token: Token::new("00ff".into()).unwrap(),
        events: events.into(),
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
        let _answer = AnswerOnDrop {
            events: events.into(),
            answer: Event::Verdict(closure::Verdict::Unknown),
        };
        panic!("the check failed");
    });
    assert!(check.join().is_err(), "the thread panicked");
    assert!(matches!(
        inbox.try_recv(),
        Ok(Event::Verdict(closure::Verdict::Unknown))
    ));
}

/// The idle check starts on the first poll at or past its due time, not before, and its
/// answer comes back to the main loop as an [`Event::Membership`] from the check's thread.
#[test]
fn an_idle_check_starts_when_due_and_its_answer_comes_back_as_an_event() {
    let (tcp, asked) = fake_daemon(vec![Err((tcrp::ErrorCode::NotMember, "not a member"))]);
    let (checker, inbox) = checker(tcp);
    let mut live = Liveness::new(
        Duration::from_secs(60),
        Arc::new(Mutex::new(Instant::now())),
    );
    let due = live.due_at().expect("a check is due in a minute");
    live.poll(due - Duration::from_millis(1), &checker);
    assert_eq!(live.due_at(), Some(due), "not started before it is due");
    live.poll(due, &checker);
    assert_eq!(live.due_at(), None, "started: in flight");
    match inbox.recv_timeout(Duration::from_secs(5)) {
        Ok(Event::Membership(Some(Err(e)))) => assert!(closure::is_gone(&e), "{e}"),
        other => panic!("expected the check's answer, got {other:?}"),
    }
    let asked = asked.lock().unwrap();
    assert_eq!(asked.len(), 1);
    assert!(asked[0].0 == Operation::History && asked[0].2.contains("00ff"));
}

/// Shortly after the join the server is asked whether it hears us; unheard, we register
/// again and ask once more, and a second "no" is a warning on the screen.
#[test]
fn an_unheard_client_registers_again_and_is_warned_after_the_second_look() {
    let unheard =
        Ok(r#"{"room": "lobby", "host": "me", "members": [{"name": "me", "registered": false}]}"#);
    let (tcp, asked) = fake_daemon(vec![unheard, unheard]);
    let (session, server) = pair("lobby", "ab");
    let (screen, rec) = screen(false);
    let options = Options {
        verb: Verb::Join,
        username: "me".into(),
        keepalive: Duration::from_secs(3600),
        tcp,
        join_history: false,
        line_editor: false,
        check_closures: true,
        check_reach: true,
        idle_check: None,
        original: false,
    };
    spawn_reach_check(&session, &options, Arc::clone(&screen));
    server
        .set_read_timeout(Some(crate::reach::FIRST_LOOK + Duration::from_secs(5)))
        .unwrap();
    let again = recv(&server);
    assert!(
        again.ends_with(ucrp::datagram::REGISTER.as_bytes()),
        "{again:?}"
    );
    let warning = format!("err: {}", crate::reach::warning(session.server));
    wait_for_lines(&rec, &[&warning]);
    assert_asked(&asked, 2, Operation::Presence, "\"ab\"");
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
    assert!(matches!(settled, Settled::Closed { confirmed: true }));
    assert_eq!(asked.lock().unwrap().len(), 3);
    assert!(
        !rec.lines().iter().any(|line| line.contains("was closed")),
        "the closure was shown before it was confirmed: {:?}",
        rec.lines()
    );
    assert_eq!(
        lock(&screen).take_closing(),
        ["* room lobby was closed"],
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
    let (mut commands, inbox) = commands(tcp, &screen);
    assert!(commands.handle_line("/who\n"));
    // The room is gone: input stops and the main loop is told to end the session.
    assert!(!commands.handle_line("/who\n"));
    assert_eq!(
        rec.lines(),
        [
            "err: * host: alice",
            "err: * alice (registered)",
            "err: * bob (not registered)",
        ]
    );
    match inbox.try_recv() {
        Ok(Event::Gone(line)) => assert_eq!(
            line,
            "* you are no longer in room lobby: the server no longer has the room (room_not_found)"
        ),
        other => panic!("expected the end of the session, got {other:?}"),
    }
    assert_eq!(
        asked.lock().unwrap()[0],
        (
            Operation::Presence,
            "lobby".into(),
            r#"{"token": "00ff"}"#.into()
        )
    );
}

/// `/history` pages back until nothing older exists, and the one after that shows the latest
/// messages again: what was said since can still be read, rather than `no more history` for
/// good.
#[test]
fn history_pages_back_until_there_is_no_more_then_starts_from_the_latest() {
    let (tcp, asked) = fake_daemon(vec![
        Ok(
            r#"{"messages": [{"seq": 9, "sender": "bob", "text": "nine", "at": 1700000000.0}, {"seq": 10, "sender": "bob", "text": "ten", "at": 1700000060.0}], "more": true}"#,
        ),
        Ok(
            r#"{"messages": [{"seq": 8, "sender": "amy", "text": "eight", "at": 1699999940.0}], "more": false}"#,
        ),
        Ok(
            r#"{"messages": [{"seq": 11, "sender": "cy", "text": "eleven", "at": 1700000120.0}], "more": true}"#,
        ),
    ]);
    let (screen, rec) = screen(false);
    let (mut commands, _inbox) = commands(tcp, &screen);
    assert!(commands.handle_line("/history 2\n"));
    assert!(commands.handle_line("/history\n"));
    assert!(commands.handle_line("/history 1\n"));
    assert_eq!(
        rec.lines(),
        [
            "out: [22:13] bob: nine",
            "out: [22:14] bob: ten",
            "out: [22:12] amy: eight",
            "err: * no more history (/history again starts from the latest)",
            "out: [22:15] cy: eleven",
        ]
    );
    let asked = asked.lock().unwrap();
    let payloads: Vec<&str> = asked.iter().map(|(_, _, p)| p.as_str()).collect();
    assert_eq!(
        payloads,
        [
            r#"{"token": "00ff", "limit": 2}"#,
            r#"{"token": "00ff", "before": 9, "limit": 20}"#,
            r#"{"token": "00ff", "limit": 1}"#
        ]
    );
    assert!(asked
        .iter()
        .all(|(op, room, _)| *op == Operation::History && room == "lobby"));
}

/// A `/who` or `/history` the server does not answer in time, or closes on, is said in plain
/// words, naming the command: not in the handshake's words, which ask whether `--tcp-port` is
/// the handshake port the join has just used. Other errors are shown as they are.
#[test]
fn an_unanswered_question_names_the_command_in_plain_words() {
    let timeout = ClientError::HandshakeTimeout {
        expected: tcrp::State::Compliance,
        after: Duration::from_secs(10),
        silent: true,
    };
    assert_eq!(
        unanswered("/who", &timeout),
        "* /who: the server did not answer within 10 s"
    );
    let closed = ClientError::HandshakeClosed {
        expected: tcrp::State::Complete,
        silent: false,
    };
    assert_eq!(
        unanswered("/history", &closed),
        "* /history: the server closed the connection without an answer"
    );
    let refused = ClientError::QueryRefused {
        what: "history".into(),
        code: Some(tcrp::ErrorCode::RateLimited),
        message: Some("slow down".into()),
    };
    assert_eq!(unanswered("/history", &refused), format!("* {refused}"));
}

/// Waits up to 10 s for `rec` to have shown `lines`.
fn wait_for_lines(rec: &Recorder, lines: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.lines() != lines {
        assert!(Instant::now() < deadline, "{:?}", rec.lines());
        thread::sleep(Duration::from_millis(5));
    }
}

/// A question the server answers at once is not announced; one it is slow to answer is,
/// while it waits, and its answer still comes.
#[test]
fn a_slow_answer_is_announced_and_a_quick_one_is_not() {
    let (screen, rec) = screen(false);
    assert_eq!(waiting(|l| lock(&screen).err(l), || Ok(1)).unwrap(), 1);
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
    let (release, gate) = mpsc::channel::<()>();
    let shared = Arc::clone(&screen);
    let asking = thread::spawn(move || {
        waiting(
            |l| lock(&shared).err(l),
            move || {
                gate.recv().unwrap();
                Ok(2)
            },
        )
    });
    wait_for_lines(&rec, &[&format!("err: {ASKING}")]);
    release.send(()).unwrap();
    assert_eq!(asking.join().unwrap().unwrap(), 2);
    assert_eq!(rec.lines(), [format!("err: {ASKING}")]);
}

/// Once answered elsewhere (with the line editor), `/who` and `/history` return at once and
/// are answered on the asking thread, in the order asked; the server's word that the room
/// is gone ends the session there, and input goes on meanwhile.
#[test]
fn questions_answered_elsewhere_come_in_order() {
    let (tcp, asked) = fake_daemon(vec![
        Ok(r#"{"room": "lobby", "host": "alice", "members": []}"#),
        Ok(
            r#"{"messages": [{"seq": 9, "sender": "bob", "text": "nine", "at": 1700000000.0}], "more": false}"#,
        ),
        Ok(
            r#"{"messages": [{"seq": 10, "sender": "bob", "text": "ten", "at": 1700000060.0}], "more": false}"#,
        ),
        Err((tcrp::ErrorCode::RoomNotFound, "no room \"lobby\"")),
    ]);
    let (screen, rec) = screen(false);
    let (mut commands, inbox) = commands(tcp, &screen);
    commands.answer_elsewhere(false);
    for line in ["/who\n", "/history 2\n", "/history\n", "/who\n", "hi\n"] {
        assert!(commands.handle_line(line), "{line}");
    }
    wait_for_lines(
        &rec,
        &[
            "err: * host: alice",
            "out: [22:13] bob: nine",
            "err: * no more history (/history again starts from the latest)",
            "out: [22:14] bob: ten",
            "err: * no more history (/history again starts from the latest)",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut gone = None;
    while gone.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match inbox.recv_timeout(left) {
            Ok(Event::Gone(line)) => gone = Some(line),
            Ok(Event::Send(text)) => assert_eq!(text, "hi"),
            other => panic!("{other:?}"),
        }
    }
    assert!(gone.unwrap().contains("no longer has the room"));
    assert_eq!(asked.lock().unwrap().len(), 4);
    // The asking thread has ended; the main loop ends the session, and input is not cut.
    assert!(commands.handle_line("/who\n"));
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

/// With the line editor the join's history is fetched on the asking thread, so that the
/// editor reads meanwhile: the input thread goes on at once, and the history (then the live
/// messages held meanwhile) comes before the answer to a question typed while it was asked.
#[test]
fn the_join_history_answered_elsewhere_comes_before_what_is_asked_meanwhile() {
    let (tcp, asked) = fake_daemon(vec![
        Ok(
            r#"{"messages": [{"seq": 4, "sender": "bob", "text": "m4", "at": 1700000000.0}], "more": false}"#,
        ),
        Ok(r#"{"room": "lobby", "host": "alice", "members": []}"#),
    ]);
    let (screen, rec) = screen(true);
    assert_eq!(
        lock(&screen).handle_datagram(&sequenced(5, "m5")).unwrap(),
        Flow::Continue
    );
    let (mut commands, inbox) = commands(tcp, &screen);
    commands.answer_elsewhere(true);
    assert!(commands.show_recent_history(), "taken by the asking thread");
    assert!(commands.handle_line("/who\n"));
    assert!(commands.handle_line("hi\n"));
    wait_for_lines(
        &rec,
        &[
            "out: [22:13] bob: m4",
            "err: * --- live ---",
            "out: bob: m5",
            "err: * host: alice",
        ],
    );
    let asked = asked.lock().unwrap();
    assert_eq!(asked.len(), 2, "the history asked for once");
    assert_eq!(asked[0].2, r#"{"token": "00ff", "limit": 20}"#);
    assert!(matches!(inbox.try_recv(), Ok(Event::Send(text)) if text == "hi"));
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
        Ok(
            r#"{"messages": [{"seq": 9, "sender": "bob", "text": "nine", "at": 1700000000.0}, {"seq": 10, "sender": "bob", "text": "ten", "at": 1700000060.0}], "more": true}"#,
        ),
    ]);
    let (screen, rec) = screen(true);
    let (mut commands, _inbox) = commands(tcp, &screen);
    commands.show_recent_history();
    assert!(commands.handle_line("/history 5\n"));
    assert!(commands.handle_line("/history 2\n"));
    assert_eq!(
        rec.lines(),
        [
            "out: [22:13] bob: nine",
            "err: * --- live ---",
            "out: [22:12] amy: eight",
            "err: * no more history (/history again starts from the latest)",
            "out: [22:13] bob: nine",
            "out: [22:14] bob: ten",
        ]
    );
    let asked = asked.lock().unwrap();
    assert_eq!(
        asked[1].2, r#"{"token": "00ff", "before": 9, "limit": 5}"#,
        "the first /history asks for what precedes the join's page"
    );
    assert_eq!(
        asked[2].2, r#"{"token": "00ff", "limit": 2}"#,
        "past the end, the latest: what was said since the join"
    );
    assert_eq!(asked.len(), 3);
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
            "err: * no more history (/history again starts from the latest)"
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

/// The server says at join that we are no longer a member: the session ends with that
/// line, and the held screen shows nothing of the room (not even "live").
#[test]
fn a_join_whose_history_finds_us_gone_ends_the_session() {
    let (tcp, _) = fake_daemon(vec![Err((tcrp::ErrorCode::NotMember, "members only"))]);
    let (screen, rec) = screen(true);
    assert_eq!(
        lock(&screen).handle_datagram(&sequenced(1, "hi")).unwrap(),
        Flow::Continue
    );
    let (mut commands, inbox) = commands(tcp, &screen);
    assert!(!commands.show_recent_history(), "input goes on");
    match inbox.try_recv() {
        Ok(Event::Gone(line)) => assert_eq!(
            line,
            "* you are no longer in room lobby: the server no longer counts you as a member (not_member)"
        ),
        other => panic!("expected the end of the session, got {other:?}"),
    }
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
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
    let (answered, done) = mpsc::channel();
    thread::spawn(move || {
        for line in ["/who", "/history", "/history 5", "/help"] {
            assert!(commands.handle_line(line), "{line}");
        }
        answered.send(()).unwrap();
    });
    // Asked, this server, which never answers, would hold each question for 10 s.
    done.recv_timeout(Duration::from_secs(5))
        .expect("answered at once, without the server");
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
    assert_eq!(lines[1..], ["out: bob: hi", "out: * room lobby was closed"]);
    // The room closed while the screen was held: the main loop is told.
    assert!(matches!(inbox.try_recv(), Ok(Event::RoomClosed)));
}

/// A signal the main loop acts on: it leaves, and the signal thread has nothing to do.
#[test]
fn a_signal_the_main_loop_acts_on_needs_no_help() {
    let (session, server) = pair("lobby", "ab12");
    let (events, inbox) = mpsc::sync_channel(1);
    let signalled = AtomicI32::new(0);
    let main_loop = session.duplicate().unwrap();
    let main = thread::spawn(move || {
        let event = inbox.recv_timeout(Duration::from_secs(10));
        assert!(matches!(event, Ok(Event::Signal(15))), "{event:?}");
        main_loop.leave();
    });
    let grace = Duration::from_secs(10);
    assert!(!after_signal(15, (&signalled, &events), &session, grace));
    main.join().unwrap();
    assert!(recv(&server).ends_with(b"__LEAVE__"));
    assert_eq!(signalled.load(Ordering::SeqCst), 15);
}

/// A main loop busy with a full queue (lines being paced out) cannot be sent the event: it
/// reads the flag on its next pass and leaves, well within the grace.
#[test]
fn a_busy_main_loop_reads_the_signal_from_the_flag() {
    let (session, server) = pair("lobby", "ab12");
    let (events, inbox) = mpsc::sync_channel(1);
    events.send(Event::Eof).unwrap();
    let signalled = Arc::new(AtomicI32::new(0));
    let (main_loop, seen) = (session.duplicate().unwrap(), Arc::clone(&signalled));
    let main = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.load(Ordering::SeqCst) != 2 {
            assert!(Instant::now() < deadline, "the flag was never set");
            thread::sleep(Duration::from_millis(1));
        }
        main_loop.leave();
        drop(inbox);
    });
    let grace = Duration::from_secs(10);
    assert!(!after_signal(2, (&signalled, &events), &session, grace));
    main.join().unwrap();
    assert!(recv(&server).ends_with(b"__LEAVE__"));
}

/// A main loop stuck (on a standard output nobody reads) with its event queue full: the
/// signal thread leaves for it once the grace has passed, and tells its caller to exit.
#[test]
fn a_stuck_main_loop_is_left_for_after_the_grace() {
    let (session, server) = pair("lobby", "ab12");
    let (events, _inbox) = mpsc::sync_channel(1);
    events.send(Event::Eof).unwrap();
    let signalled = AtomicI32::new(0);
    let started = Instant::now();
    let grace = Duration::from_millis(200);
    assert!(after_signal(2, (&signalled, &events), &session, grace));
    assert!(started.elapsed() >= grace);
    assert!(recv(&server).ends_with(b"__LEAVE__"));
    assert!(!session.register().unwrap(), "the session has ended");
    // A main loop already gone: nothing to do.
    let (events, inbox) = mpsc::sync_channel(1);
    drop(inbox);
    let (other, _server) = pair("lobby", "cd34");
    let grace = Duration::from_secs(10);
    assert!(!after_signal(2, (&signalled, &events), &other, grace));
}

/// Past its burst, a message waits for the pace to let it go.
#[test]
fn a_message_past_the_burst_waits_for_the_pace() {
    let start = Instant::now();
    // On a thread, so that a pacer that never lets the message go fails the test instead of
    // holding it.
    let (done, paced) = mpsc::channel();
    thread::spawn(move || {
        let mut pacer = Pacer::new(20.0, 1.0, start);
        pace(&mut pacer);
        pace(&mut pacer);
        let _ = done.send(pacer);
    });
    let mut pacer = paced
        .recv_timeout(Duration::from_secs(10))
        .expect("the second message never went");
    let waited = start.elapsed();
    // One message's share of a second, less the slack the pacer allows for rounding.
    assert!(waited >= Duration::from_millis(49), "{waited:?}");
    assert!(
        pacer.take(Instant::now()).is_err(),
        "the second token was taken"
    );
}

/// The signal thread's last word, written within the wait, says so.
#[test]
fn a_last_word_written_in_time_says_so() {
    assert!(say_within(
        "the chat did not end within 3s of signal 15: left the room".into(),
        Duration::from_secs(10)
    ));
}

/// What is sent [`Ahead`] does not wait behind a full queue of lines: it goes on a queue of
/// its own, at once, with no wake (the main loop is busy with the lines); behind an empty
/// queue, where the main loop waits, it comes with a wake.
#[test]
fn the_room_word_goes_ahead_of_a_full_queue_of_lines() {
    let (lines, inbox) = mpsc::sync_channel(EVENT_QUEUE);
    let (ahead_events, ahead) = mpsc::sync_channel(EVENT_QUEUE);
    let ahead_events = Ahead {
        ahead: ahead_events,
        wake: Some(lines.clone()),
        notices: Arc::default(),
    };
    for i in 0..EVENT_QUEUE {
        lines.try_send(Event::Send(format!("line {i}"))).unwrap();
    }
    ahead_events.send(Event::RoomClosed).unwrap();
    assert!(matches!(ahead.try_recv(), Ok(Event::RoomClosed)));
    // Counted before it was queued: the main loop holds the chat until it handles it.
    assert_eq!(ahead_events.notices.load(Ordering::SeqCst), 1);
    let queued: Vec<Event> = inbox.try_iter().collect();
    assert_eq!(queued.len(), EVENT_QUEUE, "no wake behind the lines");
    assert!(queued.iter().all(|e| matches!(e, Event::Send(_))));
    ahead_events
        .send(Event::Verdict(closure::Verdict::Confirmed))
        .unwrap();
    assert!(matches!(inbox.try_recv(), Ok(Event::Wake)));
    assert!(matches!(
        ahead.try_recv(),
        Ok(Event::Verdict(closure::Verdict::Confirmed))
    ));
    drop(ahead);
    assert!(
        ahead_events.send(Event::RoomClosed).is_err(),
        "the main loop has gone"
    );
}

/// A main loop holding a line whose hold ran out between `serve`'s look and `next_event`'s
/// (a pass begun just before [`HOLD_LIMIT`]), its check still unanswered: it waits for no
/// event, so that `serve` sends the held line at once. Waiting on the room's queue alone, with
/// the hold's end no longer among its timers, it would wait for the verdict, up to the check's
/// timeouts, with the line, `/quit` and the end of input behind it.
#[test]
fn a_line_whose_hold_ran_out_is_sent_without_waiting_for_the_verdict() {
    let mut closures = closure::Policy::new(true);
    let now = Instant::now();
    // A notice handled, its check in flight (never started: the verdict never comes).
    assert_eq!(closures.notice(now), closure::Action::Check);
    let LoopUnderTest {
        mut chat,
        lines: inbox_events,
        ahead: ahead_events,
        server: _server,
        printed: _printed,
        _dead,
    } = loop_under_test(closures);
    chat.notices.store(1, Ordering::SeqCst);
    chat.notices_handled = 1;
    chat.held = Some("held line".into());
    chat.hold_started = Some(now - HOLD_LIMIT - Duration::from_millis(1));
    let (done, returned) = mpsc::channel();
    thread::spawn(move || {
        let event = chat.next_event();
        let _ = done.send(format!("{event:?}"));
        // Kept until the answer is read: the queues stay open.
        drop((chat, inbox_events, ahead_events));
    });
    let event = returned.recv_timeout(Duration::from_secs(5));
    assert_eq!(
        event.as_deref(),
        Ok("None"),
        "next_event waited for an event with a line held past the hold"
    );
}

/// A main loop as [`Chat::start`] makes it, without its helper threads: the test feeds its
/// queue of lines and its queue of the room's word (the two senders returned), and its
/// closure and idle checks go to a dead TCP port.
fn main_loop(
    session: Session,
    screen: Arc<Mutex<Screen>>,
    closures: closure::Policy,
    tcp: SocketAddr,
) -> (Chat, SyncSender<Event>, SyncSender<Event>) {
    let (lines, inbox) = mpsc::sync_channel(EVENT_QUEUE);
    let (ahead_events, ahead) = mpsc::sync_channel(EVENT_QUEUE);
    let (checker, _verdicts) = checker(tcp);
    let now = Instant::now();
    let own = lock(&screen).own_sends();
    let chat = Chat {
        session,
        inbox,
        ahead,
        signalled: Arc::default(),
        screen,
        own,
        closures,
        last_heard: Arc::new(Mutex::new(now)),
        liveness: None,
        outage: Outage::default(),
        terminal: None,
        checker,
        pacer: Pacer::new(pacing::CHAT_PER_SEC, pacing::CHAT_BURST, now),
        notices: Arc::default(),
        notices_handled: 0,
        held: None,
        hold_started: None,
    };
    (chat, lines, ahead_events)
}

/// A main loop from [`main_loop`] for the room "lobby" (token "ab") on a fresh socket pair,
/// with a screen that holds nothing and its checks going to a dead TCP port, and the ends a
/// test feeds and reads. Each lives as long as the test holds the whole: a sender dropped
/// would read as every helper gone, and the dead port closed as a refusal.
struct LoopUnderTest {
    chat: Chat,
    /// The queue of typed lines.
    lines: SyncSender<Event>,
    /// The queue of the room's word, read ahead of the lines.
    ahead: SyncSender<Event>,
    /// The server's end of the socket pair.
    server: UdpSocket,
    /// What the screen printed.
    printed: Recorder,
    _dead: DeadTcp,
}

/// [`LoopUnderTest`] with `closures` as the chat's policy for closure notices.
fn loop_under_test(closures: closure::Policy) -> LoopUnderTest {
    let (session, server) = pair("lobby", "ab");
    let (screen, printed) = screen(false);
    let dead = DeadTcp::new();
    let (chat, lines, ahead) = main_loop(session, screen, closures, dead.addr);
    LoopUnderTest {
        chat,
        lines,
        ahead,
        server,
        printed,
        _dead: dead,
    }
}

/// Runs `chat`'s main loop on a thread of its own; how it ended, or a failure after
/// `patience` (a loop that never ends fails the test instead of holding it).
fn serve_within(chat: Chat, patience: Duration) -> Result<Ending, ClientError> {
    let (done, ended) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(chat.serve());
    });
    ended
        .recv_timeout(patience)
        .expect("the main loop did not end in time")
}

/// The messages `server` received, parsed, as text: `chat:TEXT` or `leave`.
fn received(server: &UdpSocket, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| match ucrp::parse(&recv(server)).unwrap().message {
            ucrp::Message::Chat(text) => format!("chat:{text}"),
            ucrp::Message::Leave => "leave".into(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// The main loop sends the typed lines in order, then leaves on `/quit` with a
/// `__LEAVE__`: the user's way out.
#[test]
fn the_main_loop_sends_the_lines_in_order_and_leaves_on_quit() {
    let t = loop_under_test(closure::Policy::new(false));
    for event in [
        Event::Send("one".into()),
        Event::Send("two".into()),
        Event::Quit,
    ] {
        t.lines.send(event).unwrap();
    }
    let ended = serve_within(t.chat, Duration::from_secs(10));
    assert!(matches!(ended, Ok(Ending::Left)), "{ended:?}");
    assert_eq!(received(&t.server, 3), ["chat:one", "chat:two", "leave"]);
}

/// A signal's flag is read before the queued lines: the main loop leaves at once, and the
/// lines behind it are not sent, which it says: lines shown as entered are not dropped without
/// a word.
#[test]
fn a_signal_on_the_flag_goes_before_the_queued_lines_and_says_they_were_not_sent() {
    let t = loop_under_test(closure::Policy::new(false));
    t.chat.signalled.store(15, Ordering::SeqCst);
    t.lines.send(Event::Send("never sent".into())).unwrap();
    t.lines.send(Event::Send("nor this".into())).unwrap();
    t.lines.send(Event::Quit).unwrap();
    let ended = serve_within(t.chat, Duration::from_secs(10));
    assert!(matches!(ended, Ok(Ending::Left)), "{ended:?}");
    assert_eq!(received(&t.server, 1), ["leave"]);
    assert_eq!(
        t.printed.lines(),
        ["err: * 2 lines not sent: the chat ended before their turn"]
    );
}

/// A signal that finds no line waiting says nothing of the kind.
#[test]
fn a_signal_with_no_line_waiting_says_nothing_of_unsent_lines() {
    let t = loop_under_test(closure::Policy::new(false));
    t.lines.send(Event::Send("sent".into())).unwrap();
    t.lines.send(Event::Signal(2)).unwrap();
    let ended = serve_within(t.chat, Duration::from_secs(10));
    assert!(matches!(ended, Ok(Ending::Left)), "{ended:?}");
    assert_eq!(received(&t.server, 2), ["chat:sent", "leave"]);
    assert!(
        t.printed.lines().iter().all(|l| !l.contains("not sent")),
        "{:?}",
        t.printed.lines()
    );
}

/// A failure reported ahead ends the chat with a `__LEAVE__`: as a plain departure when it
/// is the reader of our output gone (`EPIPE`), as the error otherwise.
#[test]
fn a_failure_ends_the_chat_as_leaving_only_when_the_reader_of_our_output_is_gone() {
    for (kind, reader_gone) in [
        (io::ErrorKind::BrokenPipe, true),
        (io::ErrorKind::Other, false),
    ] {
        let t = loop_under_test(closure::Policy::new(false));
        t.ahead
            .send(Event::Failed(ClientError::Io {
                context: "writing to standard output",
                source: kind.into(),
            }))
            .unwrap();
        match serve_within(t.chat, Duration::from_secs(10)) {
            Ok(Ending::Left) => assert!(reader_gone, "{kind:?}"),
            Err(ClientError::Io { source, .. }) => {
                assert!(!reader_gone, "{kind:?}");
                assert_eq!(source.kind(), kind);
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        assert_eq!(received(&t.server, 1), ["leave"], "{kind:?}");
    }
}

/// A held line whose hold is over (its notice handled, the room found open) is sent by
/// the main loop before anything queued after it.
#[test]
fn a_held_line_goes_once_its_hold_is_over_before_what_was_queued_after_it() {
    let mut t = loop_under_test(closure::Policy::new(true));
    t.chat.held = Some("held".into());
    t.lines.send(Event::Send("after".into())).unwrap();
    t.lines.send(Event::Quit).unwrap();
    let ended = serve_within(t.chat, Duration::from_secs(10));
    assert!(matches!(ended, Ok(Ending::Left)), "{ended:?}");
    assert_eq!(received(&t.server, 3), ["chat:held", "chat:after", "leave"]);
}

/// The server's word that the room no longer holds us ends the chat as the room's doing,
/// as a confirmed closure does (the closing lines kept are taken to be printed, past the
/// screen's printer), and without a `__LEAVE__`.
#[test]
fn the_servers_word_that_we_are_gone_ends_the_chat_as_a_closure_with_no_leave() {
    let (session, server) = pair("lobby", "ab");
    let ours = session.duplicate().unwrap();
    let (screen, _rec) = closed_screen();
    let dead = DeadTcp::new();
    let (chat, _lines, ahead) = main_loop(
        session,
        Arc::clone(&screen),
        closure::Policy::new(false),
        dead.addr,
    );
    ahead.send(Event::Gone("* you are gone".into())).unwrap();
    let ended = serve_within(chat, Duration::from_secs(10));
    assert!(matches!(ended, Ok(Ending::RoomEnded)), "{ended:?}");
    assert_eq!(
        lock(&screen).take_closing(),
        Vec::<String>::new(),
        "the closing line was left unprinted"
    );
    assert!(!ours.register().unwrap(), "the session has ended");
    server
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    let after = server.recv_from(&mut buf);
    assert!(after.is_err(), "a datagram was sent: {after:?}");
}

/// Whether the chat is held, as the main loop asks: the hold updated first.
fn updated_hold(chat: &mut Chat) -> bool {
    let now = Instant::now();
    chat.update_hold(now);
    chat.holding(now)
}

/// A closure notice handled is counted (the chat is no longer held for it) and, believed
/// without a check, ends the chat; the verdict of a check is taken as a verdict, not as one
/// more notice: a forged notice lets the chat go on, no longer held.
#[test]
fn the_main_loop_counts_the_notices_it_handles_and_takes_a_verdict_as_one() {
    let (session, server) = pair("lobby", "ab");
    let (screen, _rec) = closed_screen();
    let dead = DeadTcp::new();
    let (mut chat, _lines, _ahead) =
        main_loop(session, screen, closure::Policy::new(false), dead.addr);
    chat.notices.store(1, Ordering::SeqCst);
    assert!(
        updated_hold(&mut chat),
        "held while a notice waits to be handled"
    );
    let next = chat.handle(Event::RoomClosed);
    assert!(matches!(next, Next::End(Ok(Ending::RoomEnded))));
    assert_eq!(chat.notices_handled, 1);
    assert!(
        !updated_hold(&mut chat),
        "held after the notice was handled"
    );
    assert_eq!(received(&server, 1), ["leave"]);

    let (session, _server) = pair("lobby", "ab");
    let (screen, _rec) = closed_screen();
    let mut closures = closure::Policy::new(true);
    assert_eq!(closures.notice(Instant::now()), closure::Action::Check);
    let (mut chat, _lines, _ahead) = main_loop(session, screen, closures, dead.addr);
    chat.notices.store(1, Ordering::SeqCst);
    chat.notices_handled = 1;
    assert!(updated_hold(&mut chat), "held while the check is in flight");
    let next = chat.handle(Event::Verdict(closure::Verdict::Forged));
    assert!(matches!(next, Next::GoOn));
    assert!(!chat.closures.confirming(), "the verdict was not taken");
    assert!(!updated_hold(&mut chat), "held after a forged verdict");
}

/// The hold lasts while a notice waits or is being confirmed, for [`HOLD_LIMIT`] at most,
/// and starts afresh for the next notice.
#[test]
fn the_chat_is_held_for_a_waiting_notice_up_to_the_hold_limit() {
    let mut t = loop_under_test(closure::Policy::new(true));
    assert!(!updated_hold(&mut t.chat), "held with no notice");
    t.chat.notices.store(1, Ordering::SeqCst);
    assert!(
        updated_hold(&mut t.chat),
        "not held for a notice not yet handled"
    );
    assert!(t.chat.hold_started.is_some());
    t.chat.hold_started = Some(Instant::now() - HOLD_LIMIT - Duration::from_millis(1));
    assert!(!updated_hold(&mut t.chat), "held past the hold limit");
    t.chat.notices_handled = 1;
    assert!(!updated_hold(&mut t.chat), "held for a notice handled");
    assert_eq!(t.chat.hold_started, None, "the hold's start was kept");
}

/// While a line is held and nothing comes, the main loop sleeps until the hold's end: its
/// wait for the next event ends then, not before (a wake set in the past would have it spin
/// on a core for the whole hold).
#[test]
fn a_held_line_waits_asleep_until_the_holds_end() {
    let mut t = loop_under_test(closure::Policy::new(true));
    t.chat.notices.store(1, Ordering::SeqCst);
    t.chat.held = Some("hi".into());
    // Long enough that a loaded machine's pause before the first look still finds it held.
    let left = Duration::from_secs(1);
    let started = Instant::now();
    t.chat.hold_started = Some(started - HOLD_LIMIT + left);
    assert!(
        updated_hold(&mut t.chat),
        "not held for a notice not yet handled"
    );
    assert!(
        t.chat.next_event().is_none(),
        "an event came, though none was sent"
    );
    let slept = started.elapsed();
    assert!(
        slept >= left,
        "the wait ended {slept:?} into a hold with {left:?} left"
    );
    assert!(
        !updated_hold(&mut t.chat),
        "still held after the hold's end"
    );
}

/// The main loop's timers start an idle check that is due.
#[test]
fn the_main_loops_timers_start_a_due_idle_check() {
    let mut t = loop_under_test(closure::Policy::new(true));
    t.chat.liveness = Some(Liveness::new(
        Duration::ZERO,
        Arc::clone(&t.chat.last_heard),
    ));
    assert!(t.chat.run_timers().is_none());
    let live = t.chat.liveness.as_ref().unwrap();
    assert_eq!(live.due_at(), None, "no check in flight");
}

/// A refusal by the server's UDP port is told once per outage, and a keepalive that cannot
/// be sent is told with the server's address and the error.
#[test]
fn a_refused_datagram_is_told_once_and_an_unsendable_keepalive_with_its_error() {
    let mut t = loop_under_test(closure::Policy::new(true));
    let server = t.server.local_addr().unwrap();
    assert!(matches!(t.chat.handle(Event::Refused), Next::GoOn));
    assert!(matches!(t.chat.handle(Event::Refused), Next::GoOn));
    let error = io::Error::other("no route to host");
    let unsent = unsendable(server, &error);
    for part in [server.to_string(), "no route to host".into()] {
        assert!(unsent.contains(&part), "{unsent:?} lacks {part:?}");
    }
    assert!(matches!(
        t.chat.handle(Event::Unsendable(error)),
        Next::GoOn
    ));
    assert_eq!(
        t.printed.lines(),
        [
            format!("err: {}", port_closed(server)),
            format!("err: {unsent}")
        ]
    );
}

/// A datagram as large as the receive buffer allows (a batch up to the `max_datagram`
/// announced at join) is read whole, not cut to a smaller buffer.
#[test]
fn a_datagram_of_tens_of_kilobytes_is_received_whole() {
    let (session, server) = pair("lobby", "ab");
    fail_instead_of_waiting_for_ever(&session);
    let me = session.socket.local_addr().unwrap();
    let me = SocketAddr::from((Ipv4Addr::LOCALHOST, me.port()));
    let long = "x".repeat(60_000);
    let mut big = Vec::new();
    ucrp::delivery::encode_chat("bob", long.as_bytes(), &mut big).unwrap();
    server.send_to(&big, me).unwrap();
    server.send_to(ucrp::ROOM_CLOSED, me).unwrap();
    let (screen, rec) = screen(false);
    let event = receive_unrefused(&session.socket, server.local_addr().unwrap(), &screen);
    assert!(matches!(event, Event::RoomClosed), "{event:?}");
    assert_eq!(
        rec.lines(),
        [
            format!("out: bob: {long}"),
            "out: * room lobby was closed".into()
        ]
    );
}

/// A signal caught by a handler without `SA_RESTART` interrupts the receiver's wait for a
/// datagram (`EINTR`): the line editor installs such a handler for `SIGWINCH` while it
/// reads, so a resized terminal does it. The receiver reads on; the chat does not end.
#[test]
fn a_signal_that_interrupts_the_receivers_wait_ends_nothing() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    use std::os::unix::thread::JoinHandleExt;
    extern "C" fn caught(_: nix::libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(caught),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing; SIGWINCH is otherwise ignored by the test process.
    unsafe { sigaction(nix::sys::signal::SIGWINCH, &action) }.expect("SIGWINCH handler");
    let (session, server) = pair("lobby", "ab");
    fail_instead_of_waiting_for_ever(&session);
    let socket = session.socket.try_clone().unwrap();
    let server_addr = server.local_addr().unwrap();
    let (screen, rec) = screen(false);
    let receiver = thread::spawn(move || {
        let event = receive_unrefused(&socket, server_addr, &screen);
        format!("{event:?}")
    });
    // Many times over 100 ms, so that most find it waiting: nothing has been sent yet.
    for _ in 0..20 {
        // SAFETY: the thread is not joined yet, so its id is valid; whether it still runs
        // does not matter (the result is not needed).
        unsafe { nix::libc::pthread_kill(receiver.as_pthread_t(), nix::libc::SIGWINCH) };
        thread::sleep(Duration::from_millis(5));
    }
    let me = session.socket.local_addr().unwrap();
    let me = SocketAddr::from((Ipv4Addr::LOCALHOST, me.port()));
    let mut hi = Vec::new();
    ucrp::delivery::encode_chat("bob", b"hi", &mut hi).unwrap();
    server.send_to(&hi, me).unwrap();
    server.send_to(ucrp::ROOM_CLOSED, me).unwrap();
    let event = receiver.join().expect("the receiver panicked");
    assert_eq!(event, "RoomClosed");
    assert_eq!(
        rec.lines(),
        ["out: bob: hi", "out: * room lobby was closed"]
    );
}

/// A receive that fails with no ICMP report queued (here at the socket's read timeout, a
/// failure a test can cause) ends the receiver with the error: it does not try again for
/// ever on a socket that fails. (The timeout is short: a stop of the process ends such a
/// wait with EINTR, which is tried again with the whole timeout, so under
/// `scripts/test-under-stops`, a stop every 30 ms, a 50 ms one never ran out.)
#[test]
fn a_failed_receive_with_no_icmp_report_queued_ends_the_receiver() {
    let (session, server) = pair("lobby", "ab");
    session
        .socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let socket = session.socket.try_clone().unwrap();
    let server_addr = server.local_addr().unwrap();
    let (screen, rec) = screen(false);
    let (done, ended) = mpsc::channel();
    thread::spawn(move || {
        let event = receive_unrefused(&socket, server_addr, &screen);
        let _ = done.send(format!("{event:?}"));
    });
    let event = ended
        .recv_timeout(Duration::from_secs(10))
        .expect("the receiver went on after its receive failed");
    assert!(
        event.starts_with("Failed(Io { context: \"receiving from the server\""),
        "{event}"
    );
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
}
