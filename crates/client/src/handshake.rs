//! The TCP half of a session: connect to the daemon, send one REQUEST, read COMPLIANCE and, on
//! success, COMPLETE with the member's token.
//!
//! [`connect`] and [`connect_addr`] own the socket options (no Nagle, connect/read/write
//! timeouts); [`round_trip`] owns the REQUEST → COMPLIANCE → COMPLETE conversation for any
//! operation (the extensions in [`crate::query`] use it too) and [`exchange`] reads the token
//! out of it. [`round_trip`] and [`exchange`] are generic over [`LimitedRead`] + `Write`, so
//! they are tested against an in-memory server. All bytes go through [`tcrp`].
//!
//! The reply must come whole within [`HANDSHAKE_TIMEOUT`] (a create or join's within
//! [`ROOM_HANDSHAKE_TIMEOUT`]), however the server spreads its bytes. The reader is tolerant
//! the way the original server needs: `{"success": 1}` counts as success, and the COMPLETE
//! that the original server sends even after a refusal is never read.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use log::debug;
use tcrp::payload::{self, Compliance, RequestForm};
use tcrp::{Caps, ErrorCode, Frame, Operation, Request, State};

use crate::error::ClientError;
use crate::render::printable;

/// How long to wait for the TCP connection to be accepted, per resolved address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server has to send its whole reply (COMPLIANCE and COMPLETE) to a query
/// (`rooms`, `who`, `/history`, the checks), and how long one write of a request may block.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server has to send its whole reply to a create or join: longer than
/// [`HANDSHAKE_TIMEOUT`], as a busy server answers those only after a durable write of the
/// token and, for a password, a turn in its password-hashing queue.
pub const ROOM_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server's name may take to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply payload accepted, in bytes. Replies are a few dozen bytes; the cap only
/// stops a broken server from making us buffer without end.
pub const MAX_REPLY_PAYLOAD: usize = tcrp::DEFAULT_MAX_PAYLOAD;
/// Longest token a UCRP datagram can carry (its size field is one byte), in bytes.
pub const MAX_TOKEN_LEN: usize = u8::MAX as usize;

/// Which of the two room operations the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `ocm create`: create the room and become its host.
    Create,
    /// `ocm join`: join an existing room.
    Join,
}

impl Verb {
    /// The TCRP operation for this verb.
    pub fn operation(self) -> Operation {
        match self {
            Verb::Create => Operation::CreateRoom,
            Verb::Join => Operation::JoinRoom,
        }
    }

    /// The past tense, for the "* joined ROOM as NAME" line.
    pub fn past(self) -> &'static str {
        match self {
            Verb::Create => "created",
            Verb::Join => "joined",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Create => "create",
            Verb::Join => "join",
        })
    }
}

/// The member's secret token from COMPLETE. A bearer secret: `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token, refusing one a UCRP datagram cannot carry, and one with anything but
    /// printable ASCII: the token is the server's choice, and goes into logs and requests.
    pub fn new(token: String) -> Result<Token, ClientError> {
        let printable = token.bytes().all(|b| b.is_ascii_graphic());
        if token.is_empty() || token.len() > MAX_TOKEN_LEN || !printable {
            return Err(ClientError::BadToken { len: token.len() });
        }
        Ok(Token(token))
    }

    /// The token bytes as they go into a datagram.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The token as it goes into a JSON request (`/who`, `/history`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({} bytes)", self.0.len())
    }
}

/// Builds the REQUEST payload: the JSON-object form with keepalive and capabilities, or with
/// `original` the bare JSON string the original client sends.
pub fn build_request(username: &str, keepalive_secs: u32, original: bool) -> Request {
    if original {
        return Request::original(username);
    }
    Request {
        form: RequestForm::JsonObject,
        keepalive_secs: Some(keepalive_secs),
        caps: Caps::NOTICES.with(Caps::SEQ).with(Caps::BATCH),
        ..Request::original(username)
    }
}

/// The `max_datagram` to announce to a daemon at `server`: the largest UDP datagram (65507
/// bytes, which the chat socket reads whole) when the daemon is on this host, where loopback's
/// 64 KiB MTU carries it unfragmented; otherwise nothing, so batches stay at the daemon's
/// default of 4096 bytes.
pub fn max_datagram_for(server: IpAddr) -> Option<u16> {
    server.is_loopback().then_some(payload::MAX_MAX_DATAGRAM)
}

/// Opens the TCP connection to `host:port`, trying each resolved address in turn.
pub fn connect(host: &str, port: u16) -> Result<TcpStream, ClientError> {
    let addrs = resolve(host, port, RESOLVE_TIMEOUT, |host, port| {
        (host, port).to_socket_addrs().map(Iterator::collect)
    })?;
    let mut last = Err(ClientError::Resolve {
        host: host.to_owned(),
        source: io::Error::new(io::ErrorKind::NotFound, "no address found"),
    });
    for addr in addrs {
        debug!("connecting to {addr}");
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => {
                last = Ok(stream);
                break;
            }
            Err(source) => {
                // Name the address the user gave, and the one that failed if it differs.
                let addr = if host.parse::<IpAddr>().is_ok() {
                    addr.to_string()
                } else {
                    format!("{host} ({addr})")
                };
                last = Err(ClientError::Connect {
                    addr,
                    source,
                    first: true,
                });
            }
        }
    }
    let stream = last?;
    set_options(&stream)?;
    Ok(stream)
}

/// Resolves `host:port` with `lookup` on a thread of its own, waiting at most `timeout`:
/// the system resolver's own retries can take far longer than a person waits for a chat to
/// start. A lookup still running then is left to finish on its own; the process is ending.
fn resolve<F>(
    host: &str,
    port: u16,
    timeout: Duration,
    lookup: F,
) -> Result<Vec<SocketAddr>, ClientError>
where
    F: FnOnce(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + 'static,
{
    let failed = |source| ClientError::Resolve {
        host: host.to_owned(),
        source,
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    // An IPv6 address may come in brackets, as in a URL: `[::1]`.
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if let Some(ip) = bracketed.and_then(|h| h.parse::<Ipv6Addr>().ok()) {
        return Ok(vec![SocketAddr::new(IpAddr::V6(ip), port)]);
    }
    // One with a zone (`[fe80::1%eth0]`) is the resolver's to read, which takes it without
    // its brackets, as it takes `fe80::1%eth0`.
    let name = match bracketed {
        Some(inner) if inner.contains('%') => inner.to_owned(),
        _ => host.to_owned(),
    };
    let (answer, answered) = mpsc::sync_channel(1);
    crate::threads::spawn("resolve", move || {
        // The caller has given up when this fails.
        let _ = answer.send(lookup(&name, port));
    })
    .map_err(failed)?;
    match answered.recv_timeout(timeout) {
        Ok(addrs) => addrs.map_err(failed),
        Err(_) => Err(failed(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} s", timeout.as_secs_f64()),
        ))),
    }
}

/// Opens a TCP connection to an address already resolved: the short-lived connections of
/// `/who` and `/history` go to the very address the handshake reached.
pub fn connect_addr(addr: SocketAddr) -> Result<TcpStream, ClientError> {
    debug!("connecting to {addr}");
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|source| {
        ClientError::Connect {
            addr: addr.to_string(),
            source,
            first: false,
        }
    })?;
    set_options(&stream)?;
    Ok(stream)
}

fn set_options(stream: &TcpStream) -> Result<(), ClientError> {
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(ClientError::io("setting TCP socket options"))
}

/// Runs the handshake on an open stream and returns the token.
///
/// A refusal is [`ClientError::Refused`] carrying the server's code and message; bytes the
/// server sends after it (the original server's COMPLETE) are left unread.
pub fn exchange<S: LimitedRead + Write>(
    stream: &mut S,
    verb: Verb,
    room_name: &str,
    request: &Request,
) -> Result<Token, ClientError> {
    let mut payload = Vec::new();
    request.encode(&mut payload);
    match round_trip_within(
        stream,
        verb.operation(),
        room_name,
        &payload,
        ROOM_HANDSHAKE_TIMEOUT,
    )? {
        Ok(complete) => {
            let token = Token::new(payload::parse_complete(&complete)?)?;
            debug!("{verb} {room_name:?}: token {token:?}");
            Ok(token)
        }
        Err(Refusal { code, message }) => Err(ClientError::Refused {
            verb,
            room: room_name.to_owned(),
            code,
            message,
        }),
    }
}

/// A failed COMPLIANCE, as the server worded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The machine-readable reason, when the server sent one this version knows.
    pub code: Option<ErrorCode>,
    /// The server's own words, already made safe to print.
    pub message: Option<String>,
}

/// Sends one REQUEST frame and reads its answer: the COMPLETE payload after a successful
/// COMPLIANCE, or the [`Refusal`]. Every TCRP operation (create, join and the extensions)
/// goes through here.
pub fn round_trip<S: LimitedRead + Write>(
    stream: &mut S,
    operation: Operation,
    room_name: &str,
    payload: &[u8],
) -> Result<Result<Vec<u8>, Refusal>, ClientError> {
    round_trip_within(stream, operation, room_name, payload, HANDSHAKE_TIMEOUT)
}

/// [`round_trip`], the whole reply awaited for at most `limit`.
pub fn round_trip_within<S: LimitedRead + Write>(
    stream: &mut S,
    operation: Operation,
    room_name: &str,
    payload: &[u8],
    limit: Duration,
) -> Result<Result<Vec<u8>, Refusal>, ClientError> {
    let mut out = Vec::new();
    Frame {
        operation,
        state: State::Request,
        room_name: room_name.as_bytes(),
        payload,
    }
    .encode(&mut out)?;
    stream
        .write_all(&out)
        .and_then(|()| stream.flush())
        .map_err(ClientError::io("sending the request"))?;

    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let compliance = read_frame(stream, &mut buf, State::Compliance, deadline, limit)?;
    match payload::parse_compliance(&compliance)? {
        Compliance::Success => {}
        Compliance::Failure { code, message } => {
            return Ok(Err(Refusal {
                code,
                message: message.map(|m| printable(&m).into_owned()),
            }))
        }
    }
    Ok(Ok(read_frame(
        stream,
        &mut buf,
        State::Complete,
        deadline,
        limit,
    )?))
}

/// A stream whose next read can be bounded in time, so that one deadline covers a whole
/// reply and not each read: a server that sends a byte every few seconds must not hold a
/// client for hours.
pub trait LimitedRead: Read {
    /// Makes the next read give up (`WouldBlock` or `TimedOut`) after `within`.
    fn limit_next_read(&mut self, within: Duration) -> io::Result<()>;
}

impl LimitedRead for TcpStream {
    fn limit_next_read(&mut self, within: Duration) -> io::Result<()> {
        // A zero timeout means "none" to the socket: never pass one.
        self.set_read_timeout(Some(within.max(Duration::from_millis(1))))
    }
}

/// The error for a reply header that does not decode: [`ClientError::NotTcrp`] when no TCRP
/// server would send it, so the user looks at the address rather than at the server.
fn reply_error(e: tcrp::Error) -> ClientError {
    match e {
        tcrp::Error::PayloadSizeOverflow | tcrp::Error::UnknownState { .. } => {
            ClientError::NotTcrp(e)
        }
        e => ClientError::Handshake(e),
    }
}

/// Reads until one whole frame is buffered, checks its state and returns its payload; past
/// `deadline`, a [`ClientError::HandshakeTimeout`] saying it waited `limit`. Bytes after the
/// frame stay in `buf` for the next call.
fn read_frame<S: LimitedRead>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    expected: State,
    deadline: Instant,
    limit: Duration,
) -> Result<Vec<u8>, ClientError> {
    // Nothing at all came back: see `ClientError::HandshakeClosed`.
    let silent = |buf: &[u8]| buf.is_empty() && expected == State::Compliance;
    let timeout = |buf: &[u8]| ClientError::HandshakeTimeout {
        expected,
        after: limit,
        silent: silent(buf),
    };
    let mut chunk = [0u8; 1024];
    loop {
        if let Some((frame, used)) = tcrp::decode(buf, MAX_REPLY_PAYLOAD).map_err(reply_error)? {
            if frame.state != expected {
                return Err(ClientError::UnexpectedFrame {
                    expected,
                    got: frame.state,
                });
            }
            let payload = frame.payload.to_vec();
            buf.drain(..used);
            return Ok(payload);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout(buf));
        }
        stream
            .limit_next_read(left)
            .map_err(ClientError::io("setting the read timeout"))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(ClientError::HandshakeClosed {
                    expected,
                    silent: silent(buf),
                })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timeout(buf))
            }
            Err(source) => {
                return Err(ClientError::Io {
                    context: "reading the server's reply",
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_server::FakeServer;
    use std::thread;
    use tcrp::ErrorCode;

    #[test]
    fn a_name_that_takes_too_long_to_resolve_fails_at_the_deadline() {
        let started = Instant::now();
        let slow = |_: &str, _: u16| {
            thread::sleep(Duration::from_secs(30));
            Ok(Vec::new())
        };
        let error = resolve("slow.example", 7000, Duration::from_millis(50), slow)
            .expect_err("no answer in time");
        assert!(started.elapsed() < Duration::from_secs(30));
        match error {
            ClientError::Resolve { host, source } => {
                assert_eq!(host, "slow.example");
                assert_eq!(source.kind(), io::ErrorKind::TimedOut);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_resolved_name_gives_the_lookups_answer_and_an_address_needs_none() {
        let one = SocketAddr::from(([192, 0, 2, 1], 7000));
        let found = resolve(
            "chat.example",
            7000,
            Duration::from_secs(60),
            move |host, port| {
                assert_eq!((host, port), ("chat.example", 7000));
                Ok(vec![one])
            },
        );
        assert_eq!(found.unwrap(), vec![one]);
        let refused = resolve("nowhere.example", 7000, Duration::from_secs(60), |_, _| {
            Err(io::Error::new(io::ErrorKind::NotFound, "no such name"))
        });
        assert!(
            matches!(&refused, Err(ClientError::Resolve { source, .. }) if source.kind() == io::ErrorKind::NotFound),
            "{refused:?}"
        );
        let unused = |_: &str, _: u16| -> io::Result<Vec<SocketAddr>> {
            panic!("an address is not looked up")
        };
        assert_eq!(
            resolve("::1", 7000, Duration::ZERO, unused).unwrap(),
            vec![SocketAddr::from((Ipv6Addr::LOCALHOST, 7000))]
        );
        assert_eq!(
            resolve("[::1]", 7000, Duration::ZERO, unused).unwrap(),
            vec![SocketAddr::from((Ipv6Addr::LOCALHOST, 7000))]
        );
        // Brackets hold only an IPv6 address; anything else in them is a name to look up.
        let looked_up = resolve("[127.0.0.1]", 7000, Duration::from_secs(60), |host, _| {
            Err(io::Error::new(io::ErrorKind::NotFound, host.to_owned()))
        });
        assert!(
            matches!(&looked_up, Err(ClientError::Resolve { source, .. }) if source.to_string() == "[127.0.0.1]"),
            "{looked_up:?}"
        );
        // An IPv6 address with a zone goes to the resolver without its brackets, as it is
        // taken without them: the resolver refuses the bracketed form.
        let zoned = SocketAddr::from((Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), 7000));
        for host in ["[fe80::1%lo]", "fe80::1%lo"] {
            let found = resolve(host, 7000, Duration::from_secs(60), move |name, _| {
                assert_eq!(name, "fe80::1%lo");
                Ok(vec![zoned])
            });
            assert_eq!(found.unwrap(), vec![zoned], "{host}");
        }
    }

    fn frame(operation: Operation, state: State, room: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Frame {
            operation,
            state,
            room_name: room.as_bytes(),
            payload,
        }
        .encode(&mut out)
        .expect("test frame fits");
        out
    }

    fn success_reply(op: Operation, room: &str, success: &[u8], token: &str) -> Vec<u8> {
        let mut bytes = frame(op, State::Compliance, room, success);
        let mut complete = Vec::new();
        payload::encode_complete(token, &mut complete);
        bytes.extend(frame(op, State::Complete, room, &complete));
        bytes
    }

    fn join(server: &mut FakeServer, original: bool) -> Result<Token, ClientError> {
        exchange(
            server,
            Verb::Join,
            "lobby",
            &build_request("alice", 10, original),
        )
    }

    #[test]
    fn sends_one_json_object_request_with_keepalive_and_caps() {
        let reply = success_reply(
            Operation::JoinRoom,
            "lobby",
            br#"{"success": true}"#,
            "00ff",
        );
        let mut server = FakeServer::new(vec![reply]);
        assert_eq!(join(&mut server, false).unwrap().as_bytes(), b"00ff");
        let (sent, used) = tcrp::decode(&server.written, 1024).unwrap().unwrap();
        assert_eq!(used, server.written.len(), "exactly one frame is sent");
        assert_eq!(sent.operation, Operation::JoinRoom);
        assert_eq!(sent.state, State::Request);
        assert_eq!(sent.room_name, b"lobby");
        assert!(sent
            .payload
            .starts_with(br#"{"username": "alice", "keepalive": 10, "caps": ["#));
        let parsed = payload::parse_request(sent.payload).unwrap();
        assert_eq!(parsed.form, RequestForm::JsonObject);
        assert_eq!(parsed.username, "alice");
        assert_eq!(parsed.keepalive_secs, Some(10));
        assert_eq!(parsed.caps, Caps::NOTICES.with(Caps::SEQ).with(Caps::BATCH));
    }

    #[test]
    fn large_batches_are_asked_for_only_on_loopback() {
        assert_eq!(max_datagram_for("127.0.0.1".parse().unwrap()), Some(65507));
        assert_eq!(max_datagram_for("::1".parse().unwrap()), Some(65507));
        assert_eq!(max_datagram_for("192.0.2.7".parse().unwrap()), None);
    }

    #[test]
    fn original_flag_sends_the_bare_json_string() {
        let reply = success_reply(Operation::CreateRoom, "lobby", br#"{"success": 1}"#, "ab");
        let mut server = FakeServer::new(vec![reply]);
        let token = exchange(
            &mut server,
            Verb::Create,
            "lobby",
            &build_request("alice", 10, true),
        )
        .unwrap();
        assert_eq!(token.as_bytes(), b"ab");
        let (sent, _) = tcrp::decode(&server.written, 1024).unwrap().unwrap();
        assert_eq!(sent.operation, Operation::CreateRoom);
        assert_eq!(sent.payload, b"\"alice\"");
    }

    #[test]
    fn reply_split_across_many_reads() {
        let reply = success_reply(
            Operation::JoinRoom,
            "lobby",
            br#"{"success": true}"#,
            "c0ffee",
        );
        // Every split point, including one byte per read.
        for cut in 1..reply.len() {
            let mut server = FakeServer::new(vec![reply[..cut].to_vec(), reply[cut..].to_vec()]);
            assert_eq!(
                join(&mut server, false).unwrap().as_bytes(),
                b"c0ffee",
                "cut at {cut}"
            );
        }
        let mut server = FakeServer::new(reply.iter().map(|&b| vec![b]).collect());
        assert_eq!(join(&mut server, false).unwrap().as_bytes(), b"c0ffee");
    }

    #[test]
    fn refusal_carries_the_servers_code_and_message() {
        let mut failure = Vec::new();
        payload::encode_failure(ErrorCode::RoomNotFound, "no room \"lobby\"", &mut failure);
        let reply = frame(Operation::JoinRoom, State::Compliance, "lobby", &failure);
        let mut server = FakeServer::new(vec![reply]);
        let err = join(&mut server, false).unwrap_err();
        assert!(matches!(
            &err,
            ClientError::Refused {
                verb: Verb::Join,
                code: Some(ErrorCode::RoomNotFound),
                message: Some(m),
                ..
            } if m == "no room \"lobby\""
        ));
        assert_eq!(
            err.to_string(),
            "cannot join room \"lobby\": no room \"lobby\""
        );
    }

    #[test]
    fn refusal_message_is_made_safe_to_print() {
        let failure = br#"{"success": false, "message": "bad\u001b[2Jthing"}"#;
        let reply = frame(Operation::JoinRoom, State::Compliance, "lobby", failure);
        let err = join(&mut FakeServer::new(vec![reply]), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot join room \"lobby\": bad\\u{1b}[2Jthing"
        );
    }

    #[test]
    fn original_servers_complete_after_a_failed_compliance_is_ignored() {
        let mut reply = frame(
            Operation::CreateRoom,
            State::Compliance,
            "lobby",
            br#"{"success": 0}"#,
        );
        reply.extend(frame(
            Operation::CreateRoom,
            State::Complete,
            "lobby",
            br#"{"token": "ab"}"#,
        ));
        let mut server = FakeServer::new(vec![reply]);
        let err = exchange(
            &mut server,
            Verb::Create,
            "lobby",
            &build_request("alice", 10, true),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ClientError::Refused {
                verb: Verb::Create,
                code: None,
                message: None,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "cannot create room \"lobby\": the server refused the request"
        );
    }

    #[test]
    fn truncated_stream_is_an_error_at_every_length() {
        let reply = success_reply(
            Operation::JoinRoom,
            "lobby",
            br#"{"success": true}"#,
            "00ff",
        );
        let compliance_len = tcrp::decode(&reply, 1024).unwrap().unwrap().1;
        for cut in 0..reply.len() {
            let mut server = FakeServer::new(vec![reply[..cut].to_vec()]);
            let expected = if cut < compliance_len {
                State::Compliance
            } else {
                State::Complete
            };
            match join(&mut server, false) {
                Err(
                    err @ ClientError::HandshakeClosed {
                        expected: e,
                        silent,
                    },
                ) => {
                    assert_eq!(e, expected, "cut at {cut}");
                    assert_eq!(silent, cut == 0, "cut at {cut}");
                    assert_eq!(
                        err.to_string().contains("is --tcp-port its handshake port"),
                        cut == 0,
                        "cut at {cut}: {err}"
                    );
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    /// A server that sends its reply a byte at a time, each well within a read timeout,
    /// still meets the deadline for the whole frame.
    #[test]
    fn a_reply_dripped_byte_by_byte_times_out_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let reply = frame(
                Operation::JoinRoom,
                State::Compliance,
                "lobby",
                &[b' '; 400],
            );
            // 400 bytes at one per 20 ms: 8 s, unless the client hangs up first.
            for byte in reply {
                if stream.write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut stream = connect_addr(addr).unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(300);
        let got = read_frame(
            &mut stream,
            &mut Vec::new(),
            State::Compliance,
            deadline,
            Duration::from_millis(300),
        );
        assert!(
            matches!(got, Err(ClientError::HandshakeTimeout { .. })),
            "{got:?}"
        );
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(
            waited < Duration::from_secs(5),
            "the drip held us {waited:?}"
        );
        drop(stream);
        server.join().unwrap();
    }

    /// A server that accepts and then says nothing is given up on at the reply's deadline,
    /// not after the socket's own read timeout ([`HANDSHAKE_TIMEOUT`]), which is longer.
    #[test]
    fn a_silent_server_is_given_up_on_at_the_deadline_not_the_sockets_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut stream = connect_addr(listener.local_addr().unwrap()).unwrap();
        let (_silent, _) = listener.accept().unwrap();
        let limit = Duration::from_millis(200);
        let started = Instant::now();
        let got = read_frame(
            &mut stream,
            &mut Vec::new(),
            State::Compliance,
            started + limit,
            limit,
        );
        assert!(
            matches!(got, Err(ClientError::HandshakeTimeout { silent: true, .. })),
            "{got:?}"
        );
        let waited = started.elapsed();
        assert!(waited >= limit, "{waited:?}");
        assert!(waited < HANDSHAKE_TIMEOUT / 2, "held {waited:?}");
    }

    /// Runs `exchange`, which must not take long: a failed read taken for an interrupted one
    /// would be tried again until the reply's 30 s deadline. Fails the test after 5 s.
    fn at_once<T: Send + 'static>(exchange: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, finished) = mpsc::channel();
        thread::spawn(move || {
            let _ = done.send(exchange());
        });
        finished
            .recv_timeout(Duration::from_secs(5))
            .expect("the exchange ends at once")
    }

    #[test]
    fn read_timeout_is_reported_as_such() {
        let mut server = FakeServer::new(vec![]);
        server.fail_reads_with = Some(io::ErrorKind::WouldBlock);
        let err = at_once(move || join(&mut server, false)).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::HandshakeTimeout {
                    expected: State::Compliance,
                    silent: true,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().ends_with(
                "within 30 s (it sent nothing at all: the server may be busy, or --tcp-port may \
                 not be its handshake port)"
            ),
            "{err}"
        );
    }

    /// A read cut short by a signal is tried again; any other failure is reported as what
    /// it is, neither retried nor taken for a timeout.
    #[test]
    fn an_interrupted_read_is_retried_and_a_reset_is_an_error() {
        let reply = success_reply(
            Operation::JoinRoom,
            "lobby",
            br#"{"success": true}"#,
            "c0ffee",
        );
        let mut server = FakeServer::new(vec![reply]);
        server.interrupted_reads = 3;
        assert_eq!(join(&mut server, false).unwrap().as_bytes(), b"c0ffee");

        let mut server = FakeServer::new(vec![]);
        server.fail_reads_with = Some(io::ErrorKind::ConnectionReset);
        let err = at_once(move || join(&mut server, false)).unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionReset
            ),
            "{err:?}"
        );
    }

    /// Handshake connections send small requests at once and give up on a server that
    /// stops reading or answering.
    #[test]
    fn handshake_connections_send_at_once_and_time_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        for stream in [
            connect("127.0.0.1", addr.port()).unwrap(),
            connect_addr(addr).unwrap(),
        ] {
            assert!(stream.nodelay().unwrap());
            assert_eq!(stream.read_timeout().unwrap(), Some(HANDSHAKE_TIMEOUT));
            assert_eq!(stream.write_timeout().unwrap(), Some(HANDSHAKE_TIMEOUT));
        }
    }

    #[test]
    fn protocol_violations_are_errors() {
        // COMPLETE where COMPLIANCE belongs.
        let reply = frame(Operation::JoinRoom, State::Complete, "lobby", b"{}");
        assert!(matches!(
            join(&mut FakeServer::new(vec![reply]), false),
            Err(ClientError::UnexpectedFrame {
                expected: State::Compliance,
                got: State::Complete
            })
        ));
        let unexpected = ClientError::UnexpectedFrame {
            expected: State::Compliance,
            got: State::Complete,
        };
        assert_eq!(
            unexpected.to_string(),
            "the server sent a COMPLETE frame where COMPLIANCE was expected"
        );
        // COMPLIANCE without a success field.
        let reply = frame(Operation::JoinRoom, State::Compliance, "lobby", b"{}");
        assert!(matches!(
            join(&mut FakeServer::new(vec![reply]), false),
            Err(ClientError::Handshake(tcrp::Error::MalformedJson { .. }))
        ));
        // COMPLETE without a token.
        let mut reply = frame(
            Operation::JoinRoom,
            State::Compliance,
            "lobby",
            br#"{"success": true}"#,
        );
        reply.extend(frame(Operation::JoinRoom, State::Complete, "lobby", b"{}"));
        assert!(matches!(
            join(&mut FakeServer::new(vec![reply]), false),
            Err(ClientError::Handshake(tcrp::Error::MissingToken))
        ));
        // An oversized reply is refused from its header alone.
        let mut header = vec![0x05, 0x02, 0x01];
        header.extend_from_slice(&[0x00; 21]);
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(
            join(&mut FakeServer::new(vec![header]), false),
            Err(ClientError::Handshake(tcrp::Error::PayloadTooLarge { .. }))
        ));
    }

    #[test]
    fn a_reply_in_another_protocol_says_the_address_may_be_wrong() {
        // An HTTP server's answer (the metrics port, say), and an unknown state byte.
        let http = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec();
        let mut state = vec![0x05, 0x02, 0x07];
        state.extend_from_slice(&[0x00; 29]);
        for (reply, cause) in [
            (http, tcrp::Error::PayloadSizeOverflow),
            (state, tcrp::Error::UnknownState { state: 0x07 }),
        ] {
            let err = join(&mut FakeServer::new(vec![reply]), false).unwrap_err();
            assert!(
                matches!(&err, ClientError::NotTcrp(e) if *e == cause),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(text.contains(&cause.to_string()), "{text}");
            assert!(text.contains("--tcp-port"), "{text}");
        }
    }

    #[test]
    fn tokens_a_datagram_cannot_carry_or_a_terminal_could_act_on_are_refused() {
        for token in [
            String::new(),
            "a".repeat(256),
            "\u{1b}[31mred".into(),
            "two words".into(),
            "caf\u{e9}".into(),
        ] {
            let reply = success_reply(
                Operation::JoinRoom,
                "lobby",
                br#"{"success": true}"#,
                &token,
            );
            assert!(matches!(
                join(&mut FakeServer::new(vec![reply]), false),
                Err(ClientError::BadToken { len }) if len == token.len()
            ));
        }
    }

    /// The verbs' words, as the "* created ROOM as NAME" line and the refusals use them.
    #[test]
    fn each_verb_has_its_operation_and_its_words() {
        assert_eq!(Verb::Create.operation(), Operation::CreateRoom);
        assert_eq!(Verb::Join.operation(), Operation::JoinRoom);
        assert_eq!(Verb::Create.past(), "created");
        assert_eq!(Verb::Join.past(), "joined");
        assert_eq!(Verb::Create.to_string(), "create");
        assert_eq!(Verb::Join.to_string(), "join");
    }

    /// A token as long as a datagram's one-byte size field allows is taken. (Hand mutant:
    /// the length check made `>=`; cargo mutants leaves functions named `new` alone.)
    #[test]
    fn a_token_of_255_bytes_is_taken() {
        let longest = "a".repeat(255);
        let reply = success_reply(
            Operation::JoinRoom,
            "lobby",
            br#"{"success": true}"#,
            &longest,
        );
        let token = join(&mut FakeServer::new(vec![reply]), false).unwrap();
        assert_eq!(token.as_str(), longest);
    }

    #[test]
    fn token_debug_shows_only_its_length() {
        let token = Token::new("0123456789abcdef".into()).unwrap();
        assert_eq!(format!("{token:?}"), "Token(16 bytes)");
    }
}
