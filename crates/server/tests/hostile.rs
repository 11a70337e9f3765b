//! "Every malformed frame, flood and spoof gets a clear error or a counted drop, and the
//! daemon keeps serving."
//!
//! Each test sends one class of bad input to the real daemon, then checks (a) the refusal,
//! close or counted drop, (b) that a well-behaved client can still create, join and chat
//! ([`assert_still_serves`]), and (c) that the state file is intact after a clean stop
//! ([`assert_state_intact`]); [`assert_serves_then_state_intact`] checks both.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use tcrp::payload::{self, Compliance, ErrorCode};
use tcrp::{Frame, Operation, State};

/// A daemon with metrics on and `config` as its TOML.
fn daemon(config: &str) -> Daemon {
    Daemon::start_with(Options {
        config: Some(config.into()),
        metrics: true,
        ..Options::default()
    })
}

fn dropped(d: &Daemon, reason: &str) -> f64 {
    d.metric(&format!(
        "ocm_datagrams_dropped_total{{reason=\"{reason}\"}}"
    ))
}

fn closed(d: &Daemon, reason: &str) -> f64 {
    d.metric(&format!(
        "ocm_tcp_connections_closed_total{{reason=\"{reason}\"}}"
    ))
}

/// Connections refused at the accept for `reason` (a cap they were over).
fn rejected(d: &Daemon, reason: &str) -> f64 {
    d.metric(&format!(
        "ocm_tcp_connections_rejected_total{{reason=\"{reason}\"}}"
    ))
}

/// Waits until the metric `sample` is at least `at_least`.
fn wait_for_metric(d: &Daemon, sample: &str, at_least: f64) {
    wait_until(&format!("{sample} >= {at_least}"), || {
        d.metric(sample) >= at_least
    });
}

/// Waits until `count` connections closed as `reason` are counted, then checks that no more
/// were.
#[track_caller]
fn assert_closes_counted(d: &Daemon, reason: &str, count: f64) {
    wait_until(&format!("{count} closes counted as {reason}"), || {
        closed(d, reason) >= count
    });
    assert_eq!(closed(d, reason), count);
}

/// The sum of every `ocm_datagrams_dropped_total{reason=...}` sample.
fn dropped_total(d: &Daemon) -> f64 {
    d.http_get("/metrics")
        .lines()
        .filter(|l| l.starts_with("ocm_datagrams_dropped_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// A well-behaved client can still create a fresh room, join it, register two members and
/// relay a message. Returns the room's name.
#[track_caller]
fn assert_still_serves(d: &Daemon) -> String {
    static ROOMS: AtomicUsize = AtomicUsize::new(0);
    let room = format!("good-{}", ROOMS.fetch_add(1, Ordering::SeqCst));
    let (alice, bob) = room_of_two(d, &room);
    alice.send("still serving");
    assert_eq!(bob.recv(), "alice: still serving");
    room
}

/// Stops the daemon with SIGTERM (exit 0) and checks that the state file parses and holds
/// `rooms`.
#[track_caller]
fn assert_state_intact(mut d: Daemon, rooms: &[String]) {
    let (status, took) = d.terminate();
    assert!(status.success(), "SIGTERM exit status: {status:?}");
    assert_stopped_promptly(&d, took);
    let bytes = std::fs::read(&d.state).expect("state file written on shutdown");
    let state: serde_json::Value =
        serde_json::from_slice(&bytes).expect("state file parses as JSON");
    for room in rooms {
        assert!(
            state["rooms"].get(room).is_some(),
            "room {room} missing from the state file"
        );
    }
}

/// [`assert_still_serves`], then [`assert_state_intact`] with the room it made and `rooms`:
/// (b) and (c) of every test.
#[track_caller]
fn assert_serves_then_state_intact(d: Daemon, rooms: &[&str]) {
    let room = assert_still_serves(&d);
    let mut all = vec![room];
    all.extend(rooms.iter().map(|r| r.to_string()));
    assert_state_intact(d, &all);
}

/// The bytes of one join to `room` per `i` in `members`, as member `m{i}`, back to back.
fn pipelined_joins(room: &str, members: std::ops::Range<usize>) -> Vec<u8> {
    members
        .flat_map(|i| request_bytes(Operation::JoinRoom, room, format!("\"m{i}\"").as_bytes()))
        .collect()
}

/// Sends a room-list request on `s`, leaving its reply unread.
fn ask_for_rooms(s: &mut TcpStream) {
    s.write_all(&request_bytes(Operation::ListRooms, "", b"{}"))
        .unwrap();
}

/// Reads the next frame on `s` with `frames`: a COMPLIANCE that says success (`what` names
/// the reply in a failure).
#[track_caller]
fn expect_success(frames: &mut FrameReader, s: &mut TcpStream, what: &str) {
    let Some((state, body)) = frames.next(s) else {
        panic!("{what}: no COMPLIANCE before the end")
    };
    assert_eq!(state, State::Compliance, "{what}");
    assert_eq!(
        payload::parse_compliance(&body),
        Ok(Compliance::Success),
        "{what}"
    );
}

/// Reads the whole reply to a room list on `s`: a COMPLIANCE that says success, then the
/// COMPLETE with the list (`what` names the reply in a failure).
#[track_caller]
fn read_room_list(s: &mut TcpStream, what: &str) {
    let mut frames = FrameReader::default();
    expect_success(&mut frames, s, what);
    let (state, _) = frames.next(s).expect("the room list");
    assert_eq!(state, State::Complete, "{what}");
}

/// Reads until EOF or reset; returns what arrived before it. Panics after [`PATIENCE`].
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("expected the daemon to close the connection, got {e}"),
        }
    }
}

/// How many COMPLETE frames there are among the whole TCRP frames at the start of `bytes`,
/// and the bytes left after the last of them (a torn frame).
fn complete_frames(bytes: &[u8]) -> (usize, &[u8]) {
    let mut rest = bytes;
    let mut complete = 0;
    while let Some((frame, used)) = tcrp::decode(rest, 1 << 20).expect("valid frames") {
        if frame.state == State::Complete {
            complete += 1;
        }
        rest = &rest[used..];
    }
    (complete, rest)
}

/// Sends `frame` on `s` over and over, reading what comes back (waiting 200 ms at most each
/// time), until the daemon ends the connection; returns how many reads brought replies.
/// Fails if it is still open after 3 × [`PATIENCE`].
#[track_caller]
fn send_until_closed(s: &mut TcpStream, frame: &[u8]) -> usize {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut replies = 0;
    let mut chunk = [0u8; 4096];
    loop {
        assert!(
            started.elapsed() < 3 * PATIENCE,
            "still open after {:?} of sending the same frame",
            started.elapsed()
        );
        if s.write_all(frame).is_err() {
            return replies;
        }
        match uninterrupted(|| s.read(&mut chunk)) {
            Ok(0) => return replies,
            Ok(_) => replies += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return replies,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// The bytes of a 32-byte header announcing `size` payload bytes.
fn header(room_len: u8, op: u8, state: u8, size: u64) -> Vec<u8> {
    let mut h = vec![room_len, op, state];
    h.extend_from_slice(&[0u8; 21]);
    h.extend_from_slice(&size.to_be_bytes());
    assert_eq!(h.len(), tcrp::HEADER_LEN);
    h
}

/// A REQUEST frame with raw room-name bytes.
fn raw_request(op: Operation, state: State, room: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Frame {
        operation: op,
        state,
        room_name: room,
        payload: body,
    }
    .encode(&mut out)
    .unwrap();
    out
}

/// A TCP connection to `to` from the local address `from` (any 127.0.0.0/8 address works on
/// loopback), optionally with a small receive buffer set before connecting.
fn connect_from(from: Ipv4Addr, to: SocketAddr, rcvbuf: Option<i32>) -> TcpStream {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 daemon address expected")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own; the addresses outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        if let Some(bytes) = rcvbuf {
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &bytes as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
            assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        }
        let local = sockaddr(from, 0);
        let rc = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind {from}: {}", std::io::Error::last_os_error());
        let remote = sockaddr(*to.ip(), to.port());
        let rc = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }
}

/// A connection from `from` to `to` that has sent one request, its reply left unread.
fn sent_from(from: Ipv4Addr, to: SocketAddr, op: Operation, room: &str, body: &[u8]) -> TcpStream {
    let mut s = connect_from(from, to, None);
    s.write_all(&request_bytes(op, room, body)).unwrap();
    s
}

/// How many of `replies` gave a token, and how many were refused as `rate_limited`.
fn tokens_and_rate_limited(replies: &[Reply]) -> (usize, usize) {
    let tokens = replies.iter().filter(|r| r.token.is_some()).count();
    let limited = replies
        .iter()
        .filter(|r| refused(r) == Some(ErrorCode::RateLimited))
        .count();
    (tokens, limited)
}

/// Raises this process's open-file limit to at least `want` (up to the hard limit).
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want as libc::rlim_t {
            lim.rlim_cur = (want as libc::rlim_t).min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= want as libc::rlim_t,
        "need {want} open files, the hard limit is {}",
        lim.rlim_max
    );
}

/// A health check's request, head and all.
const HEALTH_CHECK: &[u8] = b"GET /healthz HTTP/1.1\r\n\r\n";

/// A connection to the daemon's metrics listener.
fn metrics_connection(d: &Daemon) -> TcpStream {
    TcpStream::connect(d.metrics.expect("metrics on")).unwrap()
}

/// What the daemon sends on `s` until its end (or a read error, or [`PATIENCE`] of
/// silence), as text.
fn answer_on(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// Sends a health check on the metrics connection `s`; returns the answer ([`answer_on`]).
fn health_check_on(s: &mut TcpStream) -> String {
    s.write_all(HEALTH_CHECK).unwrap();
    answer_on(s)
}

// ---- TCP framing ----

#[test]
fn a_truncated_header_then_close_is_closed_without_a_reply() {
    let d = daemon("");
    let mut s = connect(&d);
    s.write_all(&header(5, 1, 0, 7)[..10]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut s), b"", "no reply to half a header");
    assert_closes_counted(&d, "peer_closed", 1.0);
    assert_serves_then_state_intact(d, &[]);
}

/// The daemon stops reading at a short read and relies on the next readiness edge; a FIN
/// that arrives with the requests raises no later edge, so this checks that requests sent
/// together with their FIN are all answered and the connection is then closed. Each round
/// sends the bytes and the FIN back to back, so both orders of arrival get exercised.
#[test]
fn requests_sent_with_a_fin_are_all_answered_then_the_connection_closes() {
    let d = daemon("");
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let mut s = connect(&d);
        let mut bytes = Vec::new();
        for i in 0..3 {
            let room = format!("fin-{round}-{i}");
            bytes.extend(request_bytes(Operation::CreateRoom, &room, b"\"host\""));
        }
        s.write_all(&bytes).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let got = read_until_closed(&mut s);
        let (tokens, rest) = complete_frames(&got);
        assert!(rest.is_empty(), "round {round}: a torn reply: {rest:?}");
        assert_eq!(
            tokens, 3,
            "round {round}: every request answered before the close"
        );
    }
    assert_closes_counted(&d, "peer_closed", ROUNDS as f64);
    assert_serves_then_state_intact(d, &["fin-19-2"]);
}

/// A request and the FIN behind it that wait together for a daemon busy elsewhere (here
/// stopped) come with one readiness edge, and no later one: that edge is read to the end, so
/// the request is answered and the connection closed at once, not at the handshake timeout.
#[test]
fn a_request_and_its_fin_that_wait_together_are_answered_and_the_connection_closed_at_once() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 600\n");
    let mut s = connect(&d);
    wait_for_metric(&d, "ocm_tcp_connections_accepted_total", 1.0);
    d.stop();
    s.write_all(&request_bytes(Operation::CreateRoom, "fin", b"\"host\""))
        .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    d.signal(libc::SIGCONT);
    let reply = FrameReader::default().reply(&mut s);
    assert!(reply.token.is_some(), "{reply:?}");
    assert_eq!(read_until_closed(&mut s), b"", "closed after the reply");
    wait_until("the close is counted", || closed(&d, "peer_closed") >= 1.0);
    assert_eq!(closed(&d, "timeout"), 0.0);
    assert_serves_then_state_intact(d, &["fin"]);
}

/// A copy of the daemon's descriptor for the TCP connection whose peer is `peer`, taken
/// with `pidfd_getfd` (the test runs as the daemon's parent, so it may).
fn daemon_side_of(d: &Daemon, peer: SocketAddr) -> Option<TcpStream> {
    let pid = d.pid() as libc::pid_t;
    // SAFETY: pidfd_open and pidfd_getfd take plain integers and return a new descriptor
    // or -1; each descriptor returned is owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd is a descriptor we own.
    let _pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(target) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i64>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: as above.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) } as libc::c_int;
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // EBADF: closed meanwhile. EPERM would mean no ptrace access to our own child.
            assert_ne!(e.raw_os_error(), Some(libc::EPERM), "pidfd_getfd: {e}");
            continue;
        }
        // SAFETY: fd is a fresh descriptor we own; a non-TCP socket only fails peer_addr.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        if stream.peer_addr().is_ok_and(|a| a == peer) {
            return Some(stream);
        }
    }
    None
}

/// The daemon's side of our connection `s` ([`daemon_side_of`]).
fn daemon_end_of(d: &Daemon, s: &TcpStream) -> TcpStream {
    daemon_side_of(d, s.local_addr().unwrap()).expect("the daemon's side of our connection")
}

/// A connection on which the daemon has created `room` for a host: the reply proves it
/// accepted the connection, which stays open until dropped.
#[track_caller]
fn answered_connection(d: &Daemon, room: &str) -> TcpStream {
    let mut s = connect(d);
    let reply = exchange(
        &mut s,
        &request_bytes(Operation::CreateRoom, room, b"\"host\""),
    );
    assert!(reply.token.is_some(), "{reply:?}");
    s
}

#[test]
fn handshake_connections_have_tcp_nodelay_in_the_daemon() {
    let d = daemon("");
    let s = answered_connection(&d, "nodelay");
    let theirs = daemon_end_of(&d, &s);
    assert!(
        theirs.nodelay().unwrap(),
        "TCP_NODELAY off on the daemon's socket"
    );
}

/// Handshake connections have a `TCP_USER_TIMEOUT` of twice `handshake_timeout_secs`
/// (inherited from the listener; see
/// `replies_left_unread_after_the_peers_end_are_let_go_after_a_bound`); after a reload that
/// changes the timeout, new connections have the new one and open ones keep theirs.
#[test]
fn handshake_connections_have_a_user_timeout_of_twice_the_handshake_timeout() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 3\n");
    let user_timeout_ms = |s: &TcpStream| {
        int_option(
            &daemon_end_of(&d, s),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
        )
        .unwrap()
    };
    // A metrics connection the daemon took, waiting for the end of its request's head.
    let scraping = || {
        let mut s = metrics_connection(&d);
        s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        let ours = s.local_addr().unwrap();
        wait_until("the daemon to take the metrics connection", || {
            daemon_side_of(&d, ours).is_some()
        });
        s
    };
    let before = answered_connection(&d, "user-timeout-1");
    assert_eq!(user_timeout_ms(&before), 6_000);
    let scraper_before = scraping();
    assert_eq!(user_timeout_ms(&scraper_before), 6_000, "metrics too");
    d.reload("[limits]\nhandshake_timeout_secs = 5\n");
    let after = answered_connection(&d, "user-timeout-2");
    assert_eq!(user_timeout_ms(&after), 10_000);
    assert_eq!(user_timeout_ms(&before), 6_000, "an open one keeps its own");
    assert_eq!(user_timeout_ms(&scraping()), 10_000, "metrics too");
}

/// A `setsockopt` that refuses its first TCP_NODELAY (the daemon sets it on its TCP listener
/// first) with EINVAL, creating the file named by `OCM_TEST_REFUSED_NODELAY` when it does.
fn listener_nodelay_refuser(dir: &std::path::Path) -> std::path::PathBuf {
    const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int setsockopt(int fd, int level, int name, const void *value, socklen_t len) {
    static int (*real_setsockopt)(int, int, int, const void *, socklen_t);
    static int refused;
    if (!real_setsockopt)
        real_setsockopt = (int (*)(int, int, int, const void *, socklen_t))dlsym(RTLD_NEXT, "setsockopt");
    const char *mark = getenv("OCM_TEST_REFUSED_NODELAY");
    if (mark && !refused && level == IPPROTO_TCP && name == TCP_NODELAY) {
        refused = 1;
        int marker = open(mark, O_WRONLY | O_CREAT, 0600);
        if (marker >= 0) close(marker);
        errno = EINVAL;
        return -1;
    }
    return real_setsockopt(fd, level, name, value, len);
}
"#;
    preload_library(dir, "refuse_listener_nodelay", SOURCE)
}

/// Where the listener refuses TCP_NODELAY, so that accepted connections cannot inherit it,
/// the daemon sets it on each handshake connection itself.
#[test]
fn handshake_connections_have_tcp_nodelay_when_the_listener_refused_it() {
    let (d, mark, _library) = spawn_preloaded(
        listener_nodelay_refuser,
        ("OCM_TEST_REFUSED_NODELAY", "nodelay-refused"),
        Options {
            ..Options::default()
        },
    );
    assert!(mark.exists(), "setsockopt(TCP_NODELAY) was not refused");
    d.wait_for_log("TCP_NODELAY on the listener refused");
    for i in 0..2 {
        let s = answered_connection(&d, &format!("nodelay-{i}"));
        let theirs = daemon_end_of(&d, &s);
        assert!(
            theirs.nodelay().unwrap(),
            "TCP_NODELAY off on the daemon's socket of connection {i}"
        );
    }
}

/// Urgent data is taken out of the byte stream, so the frame it was cut from never completes
/// (and a read stops short at the urgent mark): the connection is closed at its deadline and
/// counted, and the daemon goes on serving.
#[test]
fn urgent_data_in_a_request_ends_at_the_handshake_timeout() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 1\n");
    let mut s = connect(&d);
    let bytes = request_bytes(Operation::CreateRoom, "urgent", b"\"host\"");
    s.write_all(&bytes[..10]).unwrap();
    // SAFETY: send on our own connected socket, from a live buffer of the given length.
    let sent = unsafe {
        libc::send(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            bytes[10..].as_ptr().cast(),
            1,
            libc::MSG_OOB,
        )
    };
    assert_eq!(sent, 1, "send MSG_OOB: {}", std::io::Error::last_os_error());
    s.write_all(&bytes[11..]).unwrap();
    assert_eq!(
        read_until_closed(&mut s),
        b"",
        "no reply to a frame missing a byte"
    );
    assert_closes_counted(&d, "timeout", 1.0);
    assert_serves_then_state_intact(d, &[]);
}

#[test]
fn a_truncated_header_then_silence_is_closed_at_the_handshake_timeout() {
    // The other timers far off (the 5 s status aside): only the 100 ms deadline checks,
    // which an open connection brings into the poll timeout, close it on time.
    let d = daemon(
        "[limits]\nhandshake_timeout_secs = 1\n[liveness]\nsweep_interval_ms = 60000\n\
         [history]\ncheckpoint_secs = 3600\n",
    );
    // Before the connect: the daemon starts the timer at the accept, no sooner.
    let t = Instant::now();
    let mut s = connect(&d);
    s.write_all(&header(5, 1, 0, 7)[..10]).unwrap();
    assert_eq!(read_until_closed(&mut s), b"", "no reply to half a header");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before the timeout"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed after {waited:?}, late for a 1 s timeout"
    );
    assert_closes_counted(&d, "timeout", 1.0);
    assert_serves_then_state_intact(d, &[]);
}

/// The message of the `malformed_request` refusal that must come next on `s`.
fn malformed_request_message(s: &mut TcpStream) -> String {
    let (state, body) = FrameReader::default().next(s).expect("a COMPLIANCE frame");
    assert_eq!(state, State::Compliance);
    match payload::parse_compliance(&body).unwrap() {
        Compliance::Failure {
            code: Some(ErrorCode::MalformedRequest),
            message: Some(m),
        } => m,
        other => panic!("not a malformed_request refusal: {other:?}"),
    }
}

/// A connection that sent a header announcing 1 GiB of payload and read the final refusal
/// it drew (`malformed_request`, naming the size); the daemon then waits for our end.
#[track_caller]
fn finally_refused(d: &Daemon) -> TcpStream {
    let mut s = connect(d);
    s.write_all(&header(1, 1, 0, 1 << 30)).unwrap();
    let message = malformed_request_message(&mut s);
    assert!(message.contains(&(1u64 << 30).to_string()), "{message}");
    s
}

/// A create request (room `x`) whose header announces 1 GiB of payload: refused for good.
fn oversized_request() -> Vec<u8> {
    let mut bytes = request_bytes(Operation::CreateRoom, "x", b"");
    bytes[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    bytes
}

#[test]
fn a_huge_payload_size_is_refused_at_once_and_the_connection_closed() {
    let d = daemon("");
    for size in [1u64 << 40, u64::MAX, tcrp::DEFAULT_MAX_PAYLOAD as u64 + 1] {
        let mut s = connect(&d);
        // Only the header: the refusal must come without the payload ever being sent.
        s.write_all(&header(5, 1, 0, size)).unwrap();
        let message = malformed_request_message(&mut s);
        assert!(
            message.contains(&size.to_string()),
            "size {size}: {message}"
        );
        assert_eq!(read_until_closed(&mut s), b"", "closed after the refusal");
    }
    // The original's 29-byte field with high bytes set (over 64 bits: no TCRP writer sends
    // that) is refused the same way, saying so rather than printing a saturated number.
    let mut s = connect(&d);
    let mut h = header(5, 1, 0, 7);
    h[3] = 0xff;
    s.write_all(&h).unwrap();
    let message = malformed_request_message(&mut s);
    assert!(
        message.contains("not a TCRP peer") && !message.contains(&u64::MAX.to_string()),
        "{message}"
    );
    assert_eq!(read_until_closed(&mut s), b"");
    wait_until("the closes are counted", || closed(&d, "protocol") >= 4.0);
    assert_eq!(
        d.metric("ocm_handshakes_total{operation=\"create_room\",result=\"malformed_request\"}"),
        4.0
    );
    assert_serves_then_state_intact(d, &[]);
}

/// The largest request the limits allow, a 255-byte room name and a payload of exactly
/// `max_payload_bytes` (the name, then JSON whitespace), is read whole and answered, twice on
/// one connection: the read cap leaves room for a whole frame and more.
#[test]
fn the_largest_request_the_limits_allow_is_answered() {
    let d = daemon("");
    let room = "r".repeat(usize::from(u8::MAX));
    let padded = |name: &str| {
        let mut body = format!("\"{name}\"").into_bytes();
        body.resize(tcrp::DEFAULT_MAX_PAYLOAD, b' ');
        body
    };
    let mut s = connect(&d);
    let mut both = request_bytes(Operation::CreateRoom, &room, &padded("alice"));
    both.extend(request_bytes(Operation::JoinRoom, &room, &padded("bob")));
    s.write_all(&both).unwrap();
    let mut frames = FrameReader::default();
    let host = frames.reply(&mut s);
    assert_eq!(host.compliance, Compliance::Success, "{host:?}");
    let bob = frames.reply(&mut s);
    assert_eq!(bob.compliance, Compliance::Success, "{bob:?}");
    let alice = Member::joined(&d, &room, &host.token.unwrap());
    Member::new(&d, &room, &bob.token.unwrap()).registered_with(&alice, "bob");
}

#[test]
fn an_unknown_operation_is_refused_and_the_connection_stays_usable() {
    let d = daemon("");
    let mut s = connect(&d);
    for op in [0x00, 0x42, 0xff] {
        let reply = exchange(
            &mut s,
            &request_bytes(Operation::Other(op), "lobby", b"\"zed\""),
        );
        assert_eq!(
            refused(&reply),
            Some(ErrorCode::UnsupportedOperation),
            "op {op}"
        );
    }
    let reply = exchange(
        &mut s,
        &request_bytes(Operation::CreateRoom, "lobby", b"\"zed\""),
    );
    assert!(
        reply.token.is_some(),
        "same connection, next request: {reply:?}"
    );
    assert_serves_then_state_intact(d, &["lobby"]);
}

#[test]
fn a_request_with_a_reply_state_or_an_unknown_state_is_malformed() {
    let d = daemon("");
    // COMPLIANCE (1) and COMPLETE (2) are the server's states, not requests.
    for state in [State::Compliance, State::Complete] {
        let mut s = connect(&d);
        let reply = exchange(
            &mut s,
            &raw_request(Operation::CreateRoom, state, b"lobby", b"\"zed\""),
        );
        assert_eq!(
            refused(&reply),
            Some(ErrorCode::MalformedRequest),
            "{state:?}"
        );
        assert_eq!(reply.token, None);
    }
    // 7 is no state at all: refused, then closed (the stream can no longer be trusted).
    let mut bytes = request_bytes(Operation::CreateRoom, "lobby", b"\"zed\"");
    bytes[2] = 7;
    let mut s = connect(&d);
    let reply = exchange(&mut s, &bytes);
    assert_eq!(refused(&reply), Some(ErrorCode::MalformedRequest));
    assert_eq!(read_until_closed(&mut s), b"");
    // Nothing was created by any of them.
    assert_eq!(d.metric("ocm_rooms"), 0.0);
    assert_serves_then_state_intact(d, &[]);
}

#[test]
fn invalid_utf8_in_the_room_name_or_payload_is_refused() {
    let d = daemon("");
    let cases: [(&[u8], &[u8], ErrorCode); 4] = [
        (&[0xc3, 0x28], b"\"zed\"", ErrorCode::InvalidRoomName),
        (&[b'a', 0xff, b'b'], b"\"zed\"", ErrorCode::InvalidRoomName),
        (b"lobby", &[0xff, 0xfe, 0xfd], ErrorCode::MalformedRequest),
        (b"lobby", b"\"\xff\"", ErrorCode::MalformedRequest),
    ];
    for op in [Operation::CreateRoom, Operation::JoinRoom] {
        for (room, body, code) in cases {
            let reply = request_raw(&d, &raw_request(op, State::Request, room, body));
            assert_eq!(refused(&reply), Some(code), "{op:?} {room:?} {body:?}");
            if let Compliance::Failure { message, .. } = &reply.compliance {
                assert!(message.as_deref().is_some_and(|m| !m.is_empty()));
            }
        }
    }
    assert_eq!(d.metric("ocm_rooms"), 0.0);
    assert_serves_then_state_intact(d, &[]);
}

fn request_raw(d: &Daemon, bytes: &[u8]) -> Reply {
    let mut s = connect(d);
    exchange(&mut s, bytes)
}

// ---- UDP ----

#[test]
fn garbage_datagrams_are_dropped_counted_and_never_answered() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let d = daemon("");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |bytes: &[u8]| {
        sock.send_to(bytes, d.udp).expect("send");
    };
    // Known cases first, each with its reason.
    let known: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "too_short"),
        (vec![5], "too_short"),
        (vec![0, 0, b'x'], "empty_token"),
        (vec![9, 9, b'x'], "length_mismatch"),
        (vec![1, 1, b'r', b't'], "empty_message"),
        (vec![1, 1, b'r', b't', 0xff], "not_utf8"),
        (vec![0x41; 4097], "too_large"),
        (vec![0; 5000], "too_large"),
    ];
    for (bytes, _) in &known {
        send(bytes);
    }
    wait_until("the known garbage is handled", || {
        d.metric("ocm_datagrams_received_total") >= known.len() as f64
    });
    for (bytes, reason) in &known {
        assert!(
            dropped(&d, reason) >= 1.0,
            "{} bytes: no {reason} drop",
            bytes.len()
        );
    }
    assert_eq!(dropped_total(&d), known.len() as f64);
    // Then random bytes, paced so that the kernel's receive buffer never overflows.
    let mut sent = known.len();
    for _ in 0..20 {
        for _ in 0..20 {
            let len = rng.random_range(0..5000);
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            send(&bytes);
            sent += 1;
        }
        wait_until("the daemon reads the garbage", || {
            d.metric("ocm_datagrams_received_total") >= sent as f64
        });
    }
    assert_eq!(d.metric("ocm_datagrams_received_total"), sent as f64);
    assert_eq!(
        dropped_total(&d),
        sent as f64,
        "every datagram is a counted drop"
    );
    assert_eq!(
        d.metric("ocm_datagrams_sent_total"),
        0.0,
        "nothing answered"
    );
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(sock.recv_from(&mut buf).is_err(), "no reply to garbage");
    assert_serves_then_state_intact(d, &[]);
}

#[test]
fn chat_that_would_relay_past_4096_bytes_is_dropped_and_counted_not_cut() {
    let d = daemon("");
    // A 100-byte name (50 characters; names have at most 64): relayed, 1 + 100 + text must
    // fit the 4096 bytes of an original client.
    let long_name = "é".repeat(50);
    let host_token = create(&d, "wide", &long_name);
    let bob_token = join(&d, "wide", "bob");
    let host = Member::joined(&d, "wide", &host_token);
    let bob = Member::new(&d, "wide", &bob_token);
    bob.registered_with(&host, "bob");
    host.registered_with(&bob, &long_name);
    host.send(&"x".repeat(3996));
    host.send(&"y".repeat(3995));
    // Datagrams from one sender are relayed in order: the first to arrive is the one that fit.
    let bytes = bob.recv_raw();
    assert_eq!(bytes.len(), 4096);
    assert_eq!(render(&bytes), format!("{long_name}: {}", "y".repeat(3995)));
    assert_eq!(
        d.metric("ocm_datagrams_dropped_total{reason=\"too_large_to_relay\"}"),
        1.0
    );
}

#[test]
fn with_the_join_ip_guard_a_forged_register_cannot_aim_a_room_at_a_third_party() {
    let mut d = daemon("[udp]\nregister_only_from_join_ip = true\n");
    // Alice uses the real client: the guard changes nothing for a client that joins and
    // registers from one host.
    let mut alice = Ocm::start(
        &d,
        &["create", "guarded", "--name", "alice", "--keepalive", "1"],
    );
    alice.wait_stderr("* created guarded as alice");
    // Mallory joins from 127.0.0.2 and forges REGISTERs from her victim's 127.0.0.3.
    let mallory_ip = Ipv4Addr::new(127, 0, 0, 2);
    let token = exchange(
        &mut connect_from(mallory_ip, d.tcp, None),
        &request_bytes(Operation::JoinRoom, "guarded", b"\"mallory\""),
    )
    .token
    .expect("mallory joins");
    let at = |ip: [u8; 4]| Member {
        socket: UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap(),
        server: d.udp,
        room: "guarded".into(),
        token: token.clone(),
    };
    let victim = at([127, 0, 0, 3]);
    let mallory = at(mallory_ip.octets());
    mallory.socket.set_read_timeout(Some(PATIENCE)).unwrap();
    victim.socket.set_nonblocking(true).unwrap();
    let victim_got_nothing = || {
        let mut buf = [0u8; 4096];
        match victim.socket.recv_from(&mut buf) {
            Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
            Ok((n, _)) => panic!("the victim got {:?}", render(&buf[..n])),
        }
    };

    mallory.send("__REGISTER__");
    wait_until("mallory registered", || {
        d.metric("ocm_members_registered") == 2.0
    });
    // A join acknowledged after her REGISTER makes it durable: the journal keeps order.
    join(&d, "guarded", "witness");
    // Her REGISTER forged from the victim's address would move her deliveries there.
    victim.send("__REGISTER__");
    wait_until("the forged REGISTER is dropped", || {
        dropped(&d, "not_join_ip") == 1.0
    });
    alice.type_line("hello");
    assert_eq!(mallory.recv(), "alice: hello", "she was not moved");
    victim_got_nothing();

    // The join IP is in the journal: after a kill -9 and a restart the guard still holds.
    d.kill9();
    d.restart();
    wait_until("alice (keepalive) and mallory registered", || {
        d.metric("ocm_members_registered") == 2.0
    });
    victim.send("__REGISTER__");
    wait_until("the forged REGISTER is dropped after the restart", || {
        dropped(&d, "not_join_ip") == 1.0
    });
    alice.type_line("after the restart");
    assert_eq!(mallory.recv(), "alice: after the restart");
    victim_got_nothing();

    // And in the state file, written at a clean stop.
    assert!(d.terminate().0.success());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&d.state).unwrap()).unwrap();
    let joined_from = |t: &str| state["tokens"][t]["joined_from"].clone();
    assert_eq!(joined_from(&token), "127.0.0.2");
    let host = state["rooms"]["guarded"]["host_token"].as_str().unwrap();
    assert_eq!(joined_from(host), "127.0.0.1");
    alice.kill9();
}

#[test]
fn spoofed_and_foreign_tokens_are_dropped_and_the_room_stays_open() {
    let d = daemon("");
    let host_token = create(&d, "a", "alice");
    let bob_token = join(&d, "a", "bob");
    let other_host = create(&d, "b", "other");
    let alice = Member::joined(&d, "a", &host_token);
    let bob = Member::new(&d, "a", &bob_token);
    bob.registered_with(&alice, "bob");

    let intruder = Member::new(&d, "a", "0123456789abcdef0123456789abcdef");
    intruder.send("wrong token");
    intruder.send("__LEAVE__");
    let cross = Member::new(&d, "a", &other_host);
    cross.send("token of another room");
    cross.send("__LEAVE__");
    // The right tokens from another socket: chat, and __LEAVE__ as the host and as bob.
    let thief_of_bob = Member::new(&d, "a", &bob_token);
    thief_of_bob.send("spoofed chat");
    thief_of_bob.send("__LEAVE__");
    let thief_of_host = Member::new(&d, "a", &host_token);
    thief_of_host.send("spoofed host chat");
    thief_of_host.send("__LEAVE__");
    // The server's own notice is not chat.
    bob.send("__ROOM_CLOSED__");
    bob.send("real");
    assert_eq!(alice.recv(), "bob: real", "nothing spoofed came first");
    alice.send("still open");
    assert_eq!(bob.recv(), "alice: still open", "the room did not close");
    wait_until("every drop is counted", || dropped_total(&d) >= 9.0);
    assert_eq!(dropped(&d, "unknown_token"), 2.0);
    assert_eq!(dropped(&d, "wrong_room"), 2.0);
    assert_eq!(dropped(&d, "address_mismatch"), 4.0);
    assert_eq!(dropped(&d, "reserved_word"), 1.0);
    assert_eq!(dropped_total(&d), 9.0);
    assert_eq!(d.metric("ocm_rooms"), 2.0);
    assert_eq!(d.metric("ocm_members"), 3.0);
    for m in [&intruder, &cross, &thief_of_bob, &thief_of_host] {
        m.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(m.socket.recv_from(&mut buf).is_err(), "no reply to a spoof");
    }
    assert_serves_then_state_intact(d, &["a", "b"]);
}

#[test]
fn a_member_flipping_its_address_cannot_write_a_journal_record_per_datagram() {
    // Every __REGISTER__ that moves a token writes a journal record (a write and a share of
    // an fdatasync, and later of a compaction). A member, or anyone who forges datagrams
    // with its token, alternating between two source ports moves it every datagram. Chat is
    // limited per member (default 50/s, burst 100); moving the address should not be
    // cheaper than a chat message.
    let d = daemon("");
    let token = create(&d, "flip", "h");
    let a = Member::new(&d, "flip", &token);
    let b = Member::new(&d, "flip", &token);
    let before = d.metric("ocm_state_write_records_total");
    const FLIPS: usize = 2000;
    let started = Instant::now();
    for i in 0..FLIPS {
        if i % 2 == 0 { &a } else { &b }.send("__REGISTER__");
    }
    let elapsed = started.elapsed();
    // Let the daemon take them all, or the kernel drop what overflowed its socket's buffer
    // (sent unpaced, against a buffer that `net.core.rmem_max` may cap; the drop count is
    // read every 5 s, within the wait).
    wait_until("the datagrams are read or dropped", || {
        d.metric("ocm_datagrams_received_total") + d.metric("ocm_udp_receive_buffer_drops_total")
            >= FLIPS as f64
    });
    // A join is answered only once its journal record is durable, batches become durable in
    // order, and a finished write is counted before the replies it releases: once this join
    // is answered, every record the flips caused is written and counted.
    join(&d, "flip", "barrier");
    // Less the barrier's own record.
    let written = d.metric("ocm_state_write_records_total") - before - 1.0;
    eprintln!("{FLIPS} address flips in {elapsed:?}: {written} journal records");
    let allowance = 100.0 + 50.0 * (elapsed.as_secs_f64() + 1.0);
    assert!(
        written <= allowance,
        "{written} journal records for {FLIPS} __REGISTER__ datagrams from one member in \
         {elapsed:?}, more than its chat allowance ({allowance})"
    );
}

#[test]
fn a_chat_flood_is_rate_limited_per_member() {
    let d = daemon("[rate]\nchat_per_sec = 20.0\nchat_burst = 20.0\n");
    let host_token = create(&d, "loud", "alice");
    let alice = Member::joined(&d, "loud", &host_token);
    let bob = Member::new(&d, "loud", &join(&d, "loud", "bob"));
    bob.registered_with(&alice, "bob");
    let carol = Member::new(&d, "loud", &join(&d, "loud", "carol"));
    carol.registered_with(&alice, "carol");
    const FLOOD: usize = 200;
    let t = Instant::now();
    for i in 0..FLOOD {
        bob.send(&format!("flood {i}"));
    }
    let flood_took = t.elapsed();
    carol.send("carol still talks");
    let delivered = alice.recv_until("carol: carol still talks");
    assert!(delivered.iter().all(|m| m.starts_with("bob: flood ")));
    let limited = FLOOD - delivered.len();
    eprintln!(
        "{} of {FLOOD} delivered (sent in {flood_took:?})",
        delivered.len()
    );
    // The burst minus the probe, plus what refilled while the flood was being handled.
    assert!(delivered.len() >= 19, "{} delivered", delivered.len());
    assert!(limited > 0, "nothing was rate limited");
    wait_until("the drops are counted", || {
        dropped(&d, "rate_limited") >= limited as f64
    });
    assert_eq!(dropped(&d, "rate_limited"), limited as f64);
    assert_eq!(
        d.metric("ocm_rate_limited_total{kind=\"chat\"}"),
        limited as f64
    );
    assert_serves_then_state_intact(d, &["loud"]);
}

// ---- TCP floods and caps ----

/// Creates `count` rooms with a host `h` each, room `i` named `name(i)`.
fn create_rooms(d: &Daemon, count: usize, name: impl Fn(usize) -> String) {
    for i in 0..count {
        create(d, &name(i), "h");
    }
}

/// The name of room `i` among rooms whose list is long (several KiB for 200 of them).
fn long_room_name(i: usize) -> String {
    format!("a-room-with-a-rather-long-name-{i:03}")
}

/// The payload of a create with a password: host `h`, password `pw`.
const PASSWORD_ROOM: &[u8] = br#"{"username": "h", "password": "pw"}"#;

/// How many lines the daemon has logged about a password check queued for `source`
/// (`"IP:"`).
fn checks_queued(d: &Daemon, source: &str) -> usize {
    d.log()
        .lines()
        .filter(|l| l.contains(source) && l.contains("password check queued"))
        .count()
}

/// Keeps the daemon's one hashing thread busy (tens of milliseconds a hash): two password
/// rooms created from each source 127.0.0.`last`, `last` in `lasts`, each on a thread and a
/// connection of its own; waits until every check is logged as queued. Returns the threads,
/// each giving its reply.
fn keep_the_hasher_busy(d: &Daemon, lasts: std::ops::Range<u8>) -> Vec<thread::JoinHandle<Reply>> {
    let ahead: Vec<_> = lasts
        .clone()
        .flat_map(|last| (0..2).map(move |n| (last, n)))
        .map(|(last, n)| {
            let tcp = d.tcp;
            thread::spawn(move || {
                let mut s = connect_from(Ipv4Addr::new(127, 0, 0, last), tcp, None);
                let room = format!("busy-{last}-{n}");
                exchange(
                    &mut s,
                    &request_bytes(Operation::CreateRoom, &room, PASSWORD_ROOM),
                )
            })
        })
        .collect();
    wait_until(&format!("{} hashes queued ahead", ahead.len()), || {
        lasts
            .clone()
            .map(|last| checks_queued(d, &format!("127.0.0.{last}:")))
            .sum::<usize>()
            == ahead.len()
    });
    ahead
}

/// Creates room "vault" with the password "right".
fn create_vault(d: &Daemon) {
    let r = request(
        d,
        Operation::CreateRoom,
        "vault",
        br#"{"username": "h", "password": "right"}"#,
    );
    assert!(r.token.is_some(), "{:?}", r.compliance);
}

/// A state file is read from disk: a room password hash edited to ask for 4 GiB of memory is
/// refused (the join gets `bad_password`, the log says why) instead of run, and the daemon
/// goes on serving. The same daemon shows Presence's `you`: the member a token belongs to.
#[test]
fn a_stored_password_hash_asking_for_too_much_is_refused_not_run() {
    let mut d = daemon("");
    create_vault(&d);
    let (status, _) = d.terminate();
    assert!(status.success());
    let state = std::fs::read_to_string(&d.state).expect("the state file");
    assert!(state.contains("m=19456,t=2,p=1"), "{state}");
    std::fs::write(&d.state, state.replace("m=19456", "m=4194304")).unwrap();
    d.restart();
    let r = request(
        &d,
        Operation::JoinRoom,
        "vault",
        br#"{"username": "g", "password": "right"}"#,
    );
    assert_eq!(refused(&r), Some(ErrorCode::BadPassword));
    assert!(r.token.is_none());
    d.wait_for_log("asks for m=4194304 KiB");
    assert_still_serves(&d);
    // A member's own Presence names it.
    let host = create(&d, "seen", "sam");
    let you = presence_of(&d, "seen", format!(r#"{{"token": "{host}"}}"#).as_bytes()).you;
    let you = you.expect("the member asking");
    assert_eq!((you.name.as_str(), you.registered), ("sam", false));
    assert_eq!(presence_of(&d, "seen", b"{}").you, None);
}

/// Resident memory of process `pid` now (`VmRSS`), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// The 19 MiB that each password check takes is given back once the check is done. The
/// allocator kept it instead (glibc raises its mmap threshold past a freed block of that
/// size, so the next ones came from its thread arenas, which it did not trim): a dozen wrong
/// guesses from a dozen addresses, which anyone who can reach the port may send, left the
/// daemon at 166 MB resident for good, from 10 MB (seen with the default limits, 72 checks
/// sent one after another).
#[test]
fn memory_for_password_checks_is_given_back_after_them() {
    let d = daemon("");
    create_vault(&d);
    let before = rss_kib(d.pid());
    for i in 0..16u8 {
        // A source each: the failure allowance (5 a source) must not refuse them unchecked.
        let mut s = connect_from(Ipv4Addr::new(127, 0, 13, 1 + i), d.tcp, None);
        let reply = exchange(
            &mut s,
            &request_bytes(
                Operation::JoinRoom,
                "vault",
                br#"{"username": "guess", "password": "wrong"}"#,
            ),
        );
        assert_eq!(refused(&reply), Some(ErrorCode::BadPassword), "guess {i}");
    }
    // Less than one check's 19 MiB: none of it stays.
    let after = rss_kib(d.pid());
    assert!(
        after < before + 8 * 1024,
        "{before} KiB resident before 16 password checks, {after} KiB after"
    );
    assert_still_serves(&d);
}

/// Sends one join to `vault` per password, each on its own connection from `from`, all of
/// them before reading any reply; the replies' refusal codes (`None`: admitted), in order.
fn parallel_joins(d: &Daemon, from: Ipv4Addr, passwords: &[&str]) -> Vec<Option<ErrorCode>> {
    let mut conns: Vec<TcpStream> = passwords
        .iter()
        .enumerate()
        .map(|(i, pw)| {
            let body = format!(r#"{{"username": "guess{i}", "password": "{pw}"}}"#);
            sent_from(from, d.tcp, Operation::JoinRoom, "vault", body.as_bytes())
        })
        .collect();
    conns
        .iter_mut()
        .map(|s| refused(&FrameReader::default().reply(s)))
        .collect()
}

#[test]
fn parallel_wrong_passwords_cannot_outrun_the_failure_allowance() {
    // Burst 5, and a refill slow enough (one a minute) that the test cannot earn another.
    let d = daemon("[rate]\npassword_failures_per_min = 1.0\npassword_failures_burst = 5.0\n");
    create_vault(&d);

    // 20 wrong guesses at once from one IP: each needs a failure token BEFORE it is checked,
    // so only the burst is checked and the rest are refused unchecked.
    const GUESSES: usize = 20;
    let wrong: Vec<String> = (0..GUESSES).map(|i| format!("wrong{i}")).collect();
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let codes = parallel_joins(&d, Ipv4Addr::new(127, 0, 0, 4), &wrong);
    let count = |code| codes.iter().filter(|c| **c == Some(code)).count();
    let (bad, limited) = (count(ErrorCode::BadPassword), count(ErrorCode::RateLimited));
    eprintln!("{bad} bad_password, {limited} rate_limited");
    assert_eq!(bad + limited, GUESSES, "{codes:?}");
    assert!(bad <= 5, "{bad} guesses checked with a burst of 5");
    assert!(bad >= 1, "nothing was checked");
    // Spent: even the right password is now refused unchecked from that IP.
    assert_eq!(
        parallel_joins(&d, Ipv4Addr::new(127, 0, 0, 4), &["right"]),
        vec![Some(ErrorCode::RateLimited)]
    );

    // From an IP with budget left, a right password among parallel wrong ones is admitted
    // (its token comes back), and the wrong ones are each checked.
    let codes = parallel_joins(
        &d,
        Ipv4Addr::new(127, 0, 0, 5),
        &["no1", "no2", "right", "no3", "no4"],
    );
    assert_eq!(
        codes,
        [
            Some(ErrorCode::BadPassword),
            Some(ErrorCode::BadPassword),
            None,
            Some(ErrorCode::BadPassword),
            Some(ErrorCode::BadPassword)
        ]
    );
    assert_eq!(
        parallel_joins(&d, Ipv4Addr::new(127, 0, 0, 5), &["right"]),
        vec![None],
        "one token was left"
    );
    assert_serves_then_state_intact(d, &["vault"]);
}

#[test]
fn a_flood_of_password_rooms_from_one_source_is_refused_past_its_share_of_the_hasher() {
    let d = daemon("");
    // 20 creates of password rooms at once from one IP: each needs an argon2 hash (tens of
    // milliseconds, one at a time), and a source may have 8 queued.
    const CREATES: usize = 20;
    let from = Ipv4Addr::new(127, 0, 0, 12);
    let mut conns: Vec<TcpStream> = (0..CREATES)
        .map(|i| {
            let room = format!("locked-{i}");
            sent_from(from, d.tcp, Operation::CreateRoom, &room, PASSWORD_ROOM)
        })
        .collect();
    let replies: Vec<Reply> = conns
        .iter_mut()
        .map(|s| FrameReader::default().reply(s))
        .collect();
    let (created, busy) = tokens_and_rate_limited(&replies);
    eprintln!("{created} created, {busy} refused as busy");
    assert_eq!(created + busy, CREATES, "{replies:?}");
    assert!(created >= 8, "the source's share was not served: {created}");
    assert!(busy >= 1, "20 hashes were queued for one source");
    assert_eq!(
        d.metric("ocm_rate_limited_total{kind=\"password_queue\"}"),
        busy as f64,
        "counted apart from the request limit"
    );
    // Another source is served meanwhile and after.
    let r = request(&d, Operation::CreateRoom, "other", PASSWORD_ROOM);
    assert!(r.token.is_some(), "{:?}", r.compliance);
}

#[test]
fn on_a_dual_stack_listener_one_ipv4_source_cannot_take_every_ipv4_clients_share_of_the_hasher() {
    // A listener on an IPv6 socket (here bound to the IPv4-mapped loopback address, as
    // `[::]` would be) sees IPv4 peers as `::ffff:a.b.c.d`. Each is still its own source for
    // the password queue (8 jobs a source), as it is on an IPv4 listener.
    let d = Daemon::start_with(Options {
        config: Some("[rate]\nrequests_per_sec = 0\n".into()),
        metrics: true,
        tcp: Some("[::ffff:127.0.0.1]:0".parse().unwrap()),
        ..Options::default()
    });
    assert!(d.tcp.is_ipv6(), "listening on {}", d.tcp);
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), d.tcp.port());
    // One source keeps its 8 jobs queued: 8 connections, each with password creates
    // pipelined, so each refills its slot as soon as its check is done.
    let mut flood: Vec<TcpStream> = (0..8)
        .map(|c| {
            let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 14), to, None);
            let mut bytes = Vec::new();
            for i in 0..10 {
                bytes.extend(request_bytes(
                    Operation::CreateRoom,
                    &format!("locked-{c}-{i}"),
                    PASSWORD_ROOM,
                ));
            }
            s.write_all(&bytes).unwrap();
            s
        })
        .collect();
    // The hasher is busy with them.
    let first = FrameReader::default().reply(&mut flood[0]);
    assert!(first.token.is_some(), "{:?}", first.compliance);
    // Another IPv4 address asks for one hash.
    let from = Ipv4Addr::new(127, 0, 0, 15);
    let mut bystander = sent_from(from, to, Operation::CreateRoom, "bystander", PASSWORD_ROOM);
    let reply = FrameReader::default().reply(&mut bystander);
    assert!(
        reply.token.is_some(),
        "a client that asked for one hash was refused because another IPv4 address had its \
         share queued: {:?}",
        reply.compliance
    );
}

#[test]
fn password_creates_that_would_be_refused_anyway_are_refused_without_a_hash() {
    let d = daemon("[limits]\nmax_rooms = 1\n");
    create(&d, "only", "h");
    // The server is full and "only" exists: hashing these passwords would be work thrown
    // away, and would fill the source's share of the hasher (8) so that the rest came back
    // as busy instead of with the real reason.
    const CREATES: usize = 20;
    let from = Ipv4Addr::new(127, 0, 0, 13);
    let mut conns: Vec<TcpStream> = (0..CREATES)
        .map(|i| {
            let room = if i == 0 {
                "only".to_owned()
            } else {
                format!("locked-{i}")
            };
            sent_from(from, d.tcp, Operation::CreateRoom, &room, PASSWORD_ROOM)
        })
        .collect();
    let refusals: Vec<Option<ErrorCode>> = conns
        .iter_mut()
        .map(|s| refused(&FrameReader::default().reply(s)))
        .collect();
    assert_eq!(refusals[0], Some(ErrorCode::RoomExists));
    assert!(
        refusals[1..]
            .iter()
            .all(|r| *r == Some(ErrorCode::ServerFull)),
        "{refusals:?}"
    );
    assert_eq!(
        d.metric("ocm_rate_limited_total{kind=\"password_queue\"}"),
        0.0
    );
}

#[test]
fn a_right_password_whose_connection_closed_does_not_spend_the_allowance() {
    // Burst 1 and one a minute: a token kept by mistake would refuse the next check.
    let d = daemon("[rate]\npassword_failures_per_min = 1.0\npassword_failures_burst = 1.0\n");
    create_vault(&d);
    let from = Ipv4Addr::new(127, 0, 0, 6);
    // Sixteen password rooms created from eight other sources keep the (one) hashing thread
    // busy for a good while (tens of milliseconds a hash), so that the join below waits in
    // its queue long enough for the reset to arrive first.
    let ahead = keep_the_hasher_busy(&d, 7..15);
    // The join goes out, then the connection is reset (SO_LINGER 0) while its check
    // waits: the daemon closes its side at once (after a plain FIN it would still answer).
    let body = br#"{"username": "gone", "password": "right"}"#;
    let s = sent_from(from, d.tcp, Operation::JoinRoom, "vault", body);
    wait_until("the join's check is queued", || {
        checks_queued(&d, "127.0.0.6:") == 1
    });
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads the struct we own, for the socket we own.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
    let busy: Vec<bool> = ahead
        .into_iter()
        .map(|t| t.join().unwrap().token.is_some())
        .collect();
    assert_eq!(busy, vec![true; 16], "the rooms ahead were created");
    d.wait_for_log("127.0.0.6: right password for a closed connection: token given back");
    assert_eq!(
        parallel_joins(&d, from, &["right"]),
        vec![None],
        "the closed connection's check kept the only token"
    );
}

/// A frame waiting for its password check stays at the front of the input and is checked
/// once: a request that comes behind it while the check waits is read, answered after it,
/// and does not queue the same check again.
#[test]
fn a_request_behind_a_waiting_password_check_does_not_queue_it_again() {
    let d = daemon("");
    create_vault(&d);
    // Password rooms created from four other sources keep the one hashing thread busy (tens
    // of milliseconds a hash), so that the join below is still waiting when more comes.
    let ahead = keep_the_hasher_busy(&d, 20..24);
    let body = br#"{"username": "g", "password": "right"}"#;
    let from = Ipv4Addr::new(127, 0, 0, 25);
    let mut s = sent_from(from, d.tcp, Operation::JoinRoom, "vault", body);
    wait_until("the join's check is queued", || {
        checks_queued(&d, "127.0.0.25:") >= 1
    });
    ask_for_rooms(&mut s);
    let mut frames = FrameReader::default();
    let joined = frames.reply(&mut s);
    assert!(joined.token.is_some(), "{joined:?}");
    expect_success(&mut frames, &mut s, "the list");
    for t in ahead {
        assert!(t.join().unwrap().token.is_some());
    }
    assert_eq!(checks_queued(&d, "127.0.0.25:"), 1, "{}", d.log());
}

/// More connections than one pass of the loop accepts (64) wait in the listener's queue
/// while the daemon is stopped; once it runs again, every one is accepted and answered, with
/// no newcomer's edge to wake it for the rest: the pass that stops at its bound comes back
/// for them.
#[test]
fn a_backlog_larger_than_one_pass_takes_is_answered_whole() {
    const QUEUED: usize = 200;
    let d = daemon("[rate]\nrequests_per_sec = 0.0\n");
    stop_process(d.pid());
    let list = request_bytes(Operation::ListRooms, "", b"{}");
    let mut waiting: Vec<TcpStream> = (0..QUEUED)
        .map(|_| {
            let mut s = connect(&d);
            s.write_all(&list)
                .expect("the request queued with its connection");
            s
        })
        .collect();
    d.signal(libc::SIGCONT);
    for (i, s) in waiting.iter_mut().enumerate() {
        let what = format!("connection {i} of {QUEUED}");
        expect_success(&mut FrameReader::default(), s, &what);
    }
}

#[test]
fn a_request_flood_from_one_ip_is_rate_limited_and_others_are_served() {
    let d = daemon("[rate]\nrequests_per_sec = 2.0\nrequests_burst = 5.0\n");
    // The flood comes from 127.0.0.2 on one connection, pipelined.
    const FLOOD: usize = 40;
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 2), d.tcp, None);
    let mut bytes = Vec::new();
    for i in 0..FLOOD {
        bytes.extend(request_bytes(
            Operation::CreateRoom,
            &format!("flood-{i}"),
            b"\"f\"",
        ));
    }
    let t = Instant::now();
    s.write_all(&bytes).unwrap();
    let mut reader = FrameReader::default();
    let replies: Vec<Reply> = (0..FLOOD).map(|_| reader.reply(&mut s)).collect();
    let took = t.elapsed();
    let (ok, limited) = tokens_and_rate_limited(&replies);
    eprintln!("{ok} created, {limited} rate limited in {took:?}");
    assert_eq!(ok + limited, FLOOD, "only successes and rate_limited");
    assert!(ok >= 5, "the burst is served: {ok}");
    let allowed = 5.0 + 2.0 * took.as_secs_f64() + 1.0;
    assert!(
        ok as f64 <= allowed,
        "{ok} served, at most {allowed} allowed"
    );
    assert_eq!(
        d.metric("ocm_rate_limited_total{kind=\"request\"}"),
        limited as f64
    );
    // 127.0.0.1 has its own budget.
    assert_serves_then_state_intact(d, &[]);
}

/// One source's connections, each with thousands of requests pipelined, are answered a few
/// frames at a time in turn: a client that comes after them is answered once each has had a
/// turn, not after their whole backlog. (Before, a connection's input was answered to its
/// end in one go, bounded only by the kernel taking the replies: 64 connections of 2,500
/// room lists each, all within one source's allowance of connections and answered with
/// cheap `rate_limited` refusals, held every other client up for seconds.)
#[test]
fn pipelined_floods_on_many_connections_do_not_hold_up_a_newcomer() {
    let d = daemon("");
    const CONNS: usize = 64;
    // 80,000 bytes: what one event's reads (4 × ~20 KiB) take in at once.
    const FRAMES: usize = 2_500;
    let flood = request_bytes(Operation::ListRooms, "", b"").repeat(FRAMES);
    let mut floods: Vec<TcpStream> = (0..CONNS)
        .map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 2), d.tcp, None))
        .collect();
    // Connected first, then written: the requests all wait in the kernel before the
    // newcomer's connection comes behind them.
    for s in &mut floods {
        s.write_all(&flood).unwrap();
    }
    let t = Instant::now();
    create(&d, "newcomer", "alice");
    let took = t.elapsed();
    let answered = d.metric("ocm_handshakes_total{operation=\"list_rooms\",result=\"ok\"}")
        + d.metric("ocm_handshakes_total{operation=\"list_rooms\",result=\"rate_limited\"}");
    let sent = (CONNS * FRAMES) as f64;
    eprintln!("newcomer answered in {took:?}, after {answered} of the {sent} pipelined requests");
    assert!(
        answered < sent / 2.0,
        "the newcomer waited for {answered} of {sent} pipelined requests ({took:?})"
    );
    drop(floods);
    assert_serves_then_state_intact(d, &[]);
}

#[test]
fn a_64_member_room_joining_at_once_is_normal_use() {
    let d = daemon("");
    let host = create(&d, "party", "host");
    let t = Instant::now();
    let d = Arc::new(d);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let d = Arc::clone(&d);
            thread::spawn(move || {
                (0..8)
                    .filter(|i| !(t == 0 && *i == 0))
                    .map(|i| {
                        let name = format!("guest{t}-{i}");
                        let token = join(&d, "party", &name);
                        (name, token)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let tokens: Vec<(String, String)> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("every join succeeds"))
        .collect();
    eprintln!("63 joins in {:?}", t.elapsed());
    assert_eq!(tokens.len(), 63);
    assert_eq!(d.metric("ocm_members"), 64.0);
    assert_eq!(d.metric("ocm_rate_limited_total{kind=\"request\"}"), 0.0);
    // They all chat.
    let hostm = Member::joined(&d, "party", &host);
    for (name, token) in tokens.iter().step_by(9) {
        Member::new(&d, "party", token).registered_with(&hostm, name);
    }
    let d = Arc::into_inner(d).expect("threads are done");
    assert_serves_then_state_intact(d, &["party"]);
}

#[test]
fn five_hundred_slow_connections_do_not_stop_a_good_client() {
    const SLOW: usize = 500;
    raise_fd_limit(4 * SLOW as u64);
    let d = daemon(
        "[limits]\nmax_connections_per_ip = 1000\nmax_connections = 2000\nhandshake_timeout_secs = 5\n",
    );
    // (The timeout must outlast the opening of them all: on a loaded machine the batches
    // below have taken more than a second, and the first would time out before the count.)
    let t = Instant::now();
    let mut slow: Vec<TcpStream> = Vec::with_capacity(SLOW);
    // In batches: the listen backlog is 128, and a SYN dropped for a full backlog is only
    // retried after a second, which would eat the handshake timeout.
    while slow.len() < SLOW {
        for _ in 0..50 {
            let mut s = TcpStream::connect(d.tcp).expect("connect");
            s.write_all(&[5]).unwrap();
            slow.push(s);
        }
        wait_for_metric(&d, "ocm_tcp_connections_accepted_total", slow.len() as f64);
    }
    let opened_in = t.elapsed();
    let open = d.metric("ocm_tcp_connections_open");
    let t = Instant::now();
    let room = assert_still_serves(&d);
    let took = t.elapsed();
    eprintln!("{open} connections open after {opened_in:?}; the good client took {took:?}");
    assert!(open > SLOW as f64, "the slow connections were open: {open}");
    // Well under the 5 s timeout: served while the slow ones are still open, not after they
    // time out.
    assert!(took < Duration::from_secs(3), "good client took {took:?}");
    assert_closes_counted(&d, "timeout", SLOW as f64);
    for s in &mut slow {
        assert_eq!(read_until_closed(s), b"", "closed without a reply");
    }
    assert_state_intact(d, &[room]);
}

/// A connection refused for good (an oversized frame) waits for its peer's end after the
/// refusal, so that the close sends no RST; meanwhile it no longer counts against its
/// source's `max_connections_per_ip`, so a client that reconnects before closing the old
/// socket is served. The old one is closed at the peer's end (or after 2 s), as `protocol`.
#[test]
fn a_connection_waiting_for_its_peers_end_leaves_its_per_ip_share() {
    let d = daemon("[limits]\nmax_connections_per_ip = 1\n");
    let mut old = connect(&d);
    // A frame that announces 1 GiB of payload: refused, and the connection ends.
    old.write_all(&oversized_request()).unwrap();
    let refusal = FrameReader::default().reply(&mut old);
    assert!(refusal.token.is_none(), "{refusal:?}");
    wait_until("the daemon's end of the refused connection", || {
        let mut byte = [0u8; 1];
        matches!(old.read(&mut byte), Ok(0))
    });
    // The old socket is still open on our side: the new connection is served anyway.
    let token = create(&d, "after", "bob");
    assert!(!token.is_empty());
    assert_eq!(rejected(&d, "max_connections_per_ip"), 0.0);
    drop(old);
    wait_until("the refused connection closed as protocol", || {
        closed(&d, "protocol") >= 1.0
    });
    assert_still_serves(&d);
}

#[test]
fn connections_over_the_per_ip_cap_are_closed_at_once() {
    let d = daemon("[limits]\nmax_connections_per_ip = 3\n");
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect(&d)).collect();
    wait_for_metric(&d, "ocm_tcp_connections_accepted_total", 3.0);
    let mut fourth = connect(&d);
    // Whatever it sends, it is closed without an answer.
    let _ = fourth.write_all(&request_bytes(Operation::CreateRoom, "x", b"\"y\""));
    assert_eq!(read_until_closed(&mut fourth), b"");
    assert_eq!(rejected(&d, "max_connections_per_ip"), 1.0);
    // The three held connections still work.
    for (i, s) in held.iter_mut().enumerate() {
        let r = exchange(
            s,
            &request_bytes(Operation::CreateRoom, &format!("held-{i}"), b"\"h\""),
        );
        assert!(r.token.is_some(), "held connection {i}: {r:?}");
    }
    drop(held);
    wait_until("the held connections are closed", || {
        closed(&d, "peer_closed") >= 3.0
    });
    assert_serves_then_state_intact(d, &["held-0"]);
}

/// Asks for the room list on `s` and reads the whole reply (`which` names it in a failure).
#[track_caller]
fn list_rooms_on(s: &mut TcpStream, which: u8) {
    ask_for_rooms(s);
    read_room_list(s, &format!("connection {which}"));
}

/// A connection from `from` that has asked for the room list and read the whole reply
/// ([`list_rooms_on`], `which` naming it in a failure), then left idle.
#[track_caller]
fn answered_from(d: &Daemon, from: Ipv4Addr, which: u8) -> TcpStream {
    let mut s = connect_from(from, d.tcp, None);
    list_rooms_on(&mut s, which);
    s
}

/// A full connection table makes room: the connection idle the longest (answered, then
/// silent) is closed for the newcomer, so sources that hold every slot open with cheap
/// requests cannot lock other clients out.
#[test]
fn a_full_connection_table_closes_the_longest_idle_connection_for_a_new_one() {
    let d = daemon(
        "[limits]\nmax_connections = 8\nmax_connections_per_ip = 4\nhandshake_timeout_secs = 600\n",
    );
    // Eight connections from two other sources, each answered once and then idle, oldest
    // first.
    let mut held: Vec<TcpStream> = (0..8u8)
        .map(|i| answered_from(&d, Ipv4Addr::new(127, 0, 0, 2 + i / 4), i))
        .collect();
    wait_for_metric(&d, "ocm_tcp_connections_open", 8.0);
    // A ninth client is served: the oldest holder made room.
    let token = create(&d, "made-room", "h");
    assert!(!token.is_empty());
    assert_eq!(closed(&d, "evicted"), 1.0);
    assert_eq!(rejected(&d, "max_connections"), 0.0);
    assert_eq!(
        read_until_closed(&mut held[0]),
        b"",
        "the oldest was closed"
    );
    // The others are still open and served.
    for (i, s) in held.iter_mut().enumerate().skip(1) {
        list_rooms_on(s, i as u8);
    }
    assert_serves_then_state_intact(d, &["made-room"]);
}

/// A full table of exactly as many connections as one pass picks (64) makes room like any
/// other: the longest idle goes, and the daemon goes on serving. (All from one source, which
/// may open one more: the newcomer.)
#[test]
fn a_full_table_of_exactly_one_pass_of_picks_closes_the_longest_idle_connection() {
    const PICKS: usize = 64;
    let d = daemon(&format!(
        "[limits]\nmax_connections = {PICKS}\nmax_connections_per_ip = {}\n\
         handshake_timeout_secs = 600\n[rate]\nrequests_per_sec = 0\n",
        PICKS + 1
    ));
    let mut held: Vec<TcpStream> = Vec::new();
    for i in 0..PICKS {
        let mut s = connect(&d);
        list_rooms_on(&mut s, i as u8);
        held.push(s);
    }
    wait_for_metric(&d, "ocm_tcp_connections_open", PICKS as f64);
    let token = create(&d, "made-room", "h");
    assert!(!token.is_empty());
    assert_eq!(closed(&d, "evicted"), 1.0);
    assert_eq!(
        read_until_closed(&mut held[0]),
        b"",
        "the oldest was closed"
    );
    list_rooms_on(&mut held[1], 1);
    assert_serves_then_state_intact(d, &["made-room"]);
}

/// The connections picked to make room are checked again before each is closed: one that
/// was answered since the pick is not the next to go, the next longest idle one is.
#[test]
fn a_connection_answered_since_the_table_filled_is_not_the_next_one_closed() {
    let d = daemon(
        "[limits]\nmax_connections = 4\nmax_connections_per_ip = 4\nhandshake_timeout_secs = 600\n",
    );
    let mut held: Vec<TcpStream> = (0..4u8)
        .map(|i| answered_from(&d, Ipv4Addr::new(127, 0, 0, 2 + i), i))
        .collect();
    wait_for_metric(&d, "ocm_tcp_connections_open", 4.0);
    // A newcomer, which stays, closes the longest idle (0); the others stay picked, 1 first.
    let mut newcomer = answered_from(&d, Ipv4Addr::new(127, 0, 0, 6), 4);
    assert_eq!(closed(&d, "evicted"), 1.0);
    assert_eq!(read_until_closed(&mut held[0]), b"", "0 was closed");
    // 1 asks again: it is now the most recently answered but for the newcomer.
    list_rooms_on(&mut held[1], 1);
    // The table is still full: the next newcomer makes the longest idle, 2, go.
    create(&d, "second-newcomer", "n");
    assert_eq!(closed(&d, "evicted"), 2.0);
    assert_eq!(read_until_closed(&mut held[2]), b"", "2 was closed");
    list_rooms_on(&mut held[1], 1);
    list_rooms_on(&mut held[3], 3);
    list_rooms_on(&mut newcomer, 4);
}

/// A full handshake table makes room among handshake connections only: a metrics
/// connection, however long idle, is not closed for a newcomer.
#[test]
fn a_full_handshake_table_does_not_close_a_metrics_connection_for_a_newcomer() {
    let d = daemon("[limits]\nmax_connections = 2\nhandshake_timeout_secs = 600\n");
    // Idle since before any handshake connection.
    let mut scraper = metrics_connection(&d);
    let mut held: Vec<TcpStream> = (0..2u8)
        .map(|i| answered_from(&d, Ipv4Addr::new(127, 0, 0, 2 + i), i))
        .collect();
    create(&d, "newcomer", "n");
    assert_eq!(closed(&d, "evicted"), 1.0);
    assert_eq!(
        read_until_closed(&mut held[0]),
        b"",
        "the oldest handshake connection was closed"
    );
    // The scraper's connection is still open, and answered.
    let text = health_check_on(&mut scraper);
    assert!(text.ends_with("\r\n\r\nok\n"), "{text:?}");
}

/// Room lists a paused connection of [`a_table_of_two_with_a_paused_connection`] asked for.
const ROOM_LISTS_ASKED: usize = 1000;

/// A daemon whose connection table holds two, and one connection on it (from 127.0.0.2)
/// paused for not reading: it asked for [`ROOM_LISTS_ASKED`] lists of 200 rooms, several KiB
/// each, against a 1 KiB output cap.
fn a_table_of_two_with_a_paused_connection() -> (Daemon, TcpStream) {
    let d = daemon(
        "[limits]\nmax_connections = 2\nmax_output_bytes = 1024\nhandshake_timeout_secs = 600\n\
         [rate]\nrequests_per_sec = 0\n",
    );
    // The rooms are made before the table is filled.
    create_rooms(&d, 200, long_room_name);
    let mut paused = connect_from(Ipv4Addr::new(127, 0, 0, 2), d.tcp, Some(4096));
    paused
        .write_all(&request_bytes(Operation::ListRooms, "", b"{}").repeat(ROOM_LISTS_ASKED))
        .unwrap();
    wait_for_metric(&d, "ocm_tcp_output_pauses_total", 1.0);
    (d, paused)
}

/// Reads `asked` room-list replies (COMPLIANCE, then COMPLETE) from `s`, failing at an EOF.
fn read_room_lists(s: &mut TcpStream, asked: usize) {
    let mut frames = FrameReader::default();
    for i in 0..asked {
        let (state, _) = frames.next(s).expect("COMPLIANCE, not EOF");
        assert_eq!(state, State::Compliance, "reply {i}");
        let (state, _) = frames.next(s).expect("the room list");
        assert_eq!(state, State::Complete, "reply {i}");
    }
}

/// A full table closes an idle connection before one paused on unread replies, even when the
/// paused one was answered longer ago: the paused peer still gets every reply once it reads.
#[test]
fn a_full_table_closes_an_idle_connection_before_a_paused_one() {
    let (d, mut paused) = a_table_of_two_with_a_paused_connection();
    // The idle one, answered after it.
    let mut idle = answered_from(&d, Ipv4Addr::new(127, 0, 0, 3), 1);
    wait_for_metric(&d, "ocm_tcp_connections_open", 2.0);
    // A newcomer makes the idle one go.
    create(&d, "newcomer", "n");
    assert_eq!(closed(&d, "evicted"), 1.0);
    assert_eq!(read_until_closed(&mut idle), b"", "the idle one was closed");
    read_room_lists(&mut paused, ROOM_LISTS_ASKED);
    assert_eq!(closed(&d, "output_overflow"), 0.0);
}

/// The connections a full table picked to close are not kept for when it is full again: a
/// paused connection left among the picks of a first full table is not closed the second
/// time, when a connection answered since is idle and goes first.
#[test]
fn a_table_full_again_chooses_afresh_and_closes_an_idle_connection_before_a_paused_one() {
    let (d, mut paused) = a_table_of_two_with_a_paused_connection();
    let mut first_idle = answered_from(&d, Ipv4Addr::new(127, 0, 0, 3), 1);
    // The table is full: the first newcomer's pass picks the idle one, then the paused one.
    create(&d, "first-newcomer", "n");
    assert_eq!(closed(&d, "evicted"), 1.0);
    assert_eq!(
        read_until_closed(&mut first_idle),
        b"",
        "the first idle one was closed"
    );
    // The newcomer's connection has gone too: only the paused one is open (and this scrape's).
    wait_until("the table is no longer full", || {
        d.metric("ocm_tcp_connections_open") <= 2.0
    });
    // Another idle one fills the table again; the next newcomer makes it go.
    let mut second_idle = answered_from(&d, Ipv4Addr::new(127, 0, 0, 4), 2);
    create(&d, "second-newcomer", "n");
    assert_eq!(closed(&d, "evicted"), 2.0);
    assert_eq!(
        read_until_closed(&mut second_idle),
        b"",
        "the second idle one was closed"
    );
    read_room_lists(&mut paused, ROOM_LISTS_ASKED);
    assert_eq!(closed(&d, "output_overflow"), 0.0);
}

/// A paused connection stays paused, unread, while its replies are over `max_output_bytes`:
/// bytes its peer sends meanwhile raise readiness edges, but neither resume it nor count as
/// pauses again (`ocm_tcp_output_pauses_total` counts pauses, not edges), and every reply
/// still comes once the peer reads.
#[test]
fn more_bytes_from_a_paused_peer_do_not_count_as_more_pauses() {
    let d = daemon(
        "[limits]\nmax_output_bytes = 1024\nhandshake_timeout_secs = 600\n\
         [rate]\nrequests_per_sec = 0\n",
    );
    create_rooms(&d, 200, long_room_name);
    let pauses = || d.metric("ocm_tcp_output_pauses_total");
    let mut paused = connect_from(Ipv4Addr::new(127, 0, 0, 2), d.tcp, Some(4096));
    const ASKED: usize = 1000;
    let list = request_bytes(Operation::ListRooms, "", b"{}");
    paused.write_all(&list.repeat(ASKED)).unwrap();
    wait_until("the connection is paused", || pauses() >= 1.0);
    // Until the kernel's buffers are full the daemon may still resume and pause it again:
    // wait until the count holds for 300 ms.
    let mut settled = pauses();
    let deadline = Instant::now() + PATIENCE;
    loop {
        thread::sleep(Duration::from_millis(300));
        let now = pauses();
        if now == settled {
            break;
        }
        assert!(Instant::now() < deadline, "pauses still rising: {now}");
        settled = now;
    }
    const MORE: usize = 50;
    for _ in 0..MORE {
        paused.write_all(&list).unwrap();
        // Pacing, not a wait for anything: one edge per request.
        thread::sleep(Duration::from_millis(10));
    }
    let after = pauses();
    assert!(
        after - settled < 5.0,
        "{MORE} requests to a paused connection counted {} more pauses",
        after - settled
    );
    read_room_lists(&mut paused, ASKED + MORE);
}

/// Frames refused before the request limit (here COMPLIANCE headers, which a server never
/// takes) are answered but do not restart the handshake timer: a connection that sends
/// only those is closed when it runs out.
#[test]
fn junk_frames_do_not_keep_a_connection_open() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 1\n");
    let mut s = connect(&d);
    let junk = header(0, 1, 1, 0);
    let started = Instant::now();
    let replies = send_until_closed(&mut s, &junk);
    let closed_after = started.elapsed();
    eprintln!("closed after {closed_after:?}, {replies} refusals read");
    assert!(replies >= 1, "the junk was answered");
    assert_closes_counted(&d, "timeout", 1.0);
    assert_serves_then_state_intact(d, &[]);
}

/// An answered request restarts the handshake timer: a client that keeps asking on one
/// connection, each request well within `handshake_timeout_secs` of the last answer, is served
/// for longer than the timeout.
#[test]
fn answered_requests_keep_a_connection_open_past_the_handshake_timeout() {
    // Requests 1 s apart against a 3 s timeout: a test held back for up to 2 s still asks
    // in time.
    let d = daemon("[limits]\nhandshake_timeout_secs = 3\n");
    let mut s = connect(&d);
    let started = Instant::now();
    list_rooms_on(&mut s, 0);
    let mut asked = 1;
    while started.elapsed() < Duration::from_secs(4) {
        // Pacing, not a wait for anything: the next request 1 s after the last answer.
        thread::sleep(Duration::from_secs(1));
        list_rooms_on(&mut s, asked);
        asked += 1;
    }
    assert_eq!(closed(&d, "timeout"), 0.0);
}

/// A reply that waited for the disk restarts the handshake timer when it leaves, as any
/// other reply does: the client may ask again on the same connection afterwards.
#[test]
fn a_client_may_ask_again_after_a_reply_that_waited_for_the_disk() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 2\n");
    let mut s = answered_connection(&d, "durable");
    // Pacing, not a wait for anything: a client that reads, then asks half a second later.
    thread::sleep(Duration::from_millis(500));
    list_rooms_on(&mut s, 1);
    assert_eq!(closed(&d, "timeout"), 0.0);
}

#[test]
fn metrics_connections_do_not_use_up_the_per_ip_handshake_cap() {
    let d = daemon("[limits]\nmax_connections_per_ip = 1\n");
    // A scraper's connection, open and idle (it has not sent its request yet).
    let _scraper = metrics_connection(&d);
    wait_until("the scraper's connection is accepted", || {
        // This query's own connection is open too while it is answered.
        d.metric("ocm_tcp_connections_open") >= 2.0
    });
    let mut s = connect(&d);
    s.write_all(&request_bytes(Operation::CreateRoom, "one", b"\"h\""))
        .unwrap();
    let mut first = [0u8; 1];
    let answered = uninterrupted(|| s.read(&mut first));
    assert!(
        matches!(answered, Ok(1)),
        "the only handshake connection from 127.0.0.1 was refused ({answered:?}); rejected: {}",
        rejected(&d, "max_connections_per_ip")
    );
}

/// Metrics connections neither take nor give back shares of `max_connections_per_ip`: once
/// an idle metrics connection from the same address has been closed by its client, a source
/// holding its cap of handshake connections is still refused another.
#[test]
fn a_closed_metrics_connection_frees_no_share_of_the_per_ip_handshake_cap() {
    let d = daemon("[limits]\nmax_connections_per_ip = 2\n");
    let held: Vec<TcpStream> = (0..2).map(|_| connect(&d)).collect();
    let idle = metrics_connection(&d);
    wait_for_metric(&d, "ocm_tcp_connections_accepted_total", 3.0);
    drop(idle);
    wait_until("the idle metrics connection closed", || {
        closed(&d, "peer_closed") >= 1.0
    });
    let mut third = connect(&d);
    let _ = third.write_all(&request_bytes(Operation::CreateRoom, "x", b"\"y\""));
    assert_eq!(read_until_closed(&mut third), b"", "a third was served");
    assert_eq!(rejected(&d, "max_connections_per_ip"), 1.0);
    drop(held);
}

/// A connection that waited for its peer's end after a final refusal gave its share of
/// `max_connections_per_ip` back when it began to wait, and gives nothing back at its close:
/// a source holding its cap is still refused another afterwards.
#[test]
fn a_connection_that_waited_for_its_peers_end_gives_its_share_back_once() {
    let d = daemon("[limits]\nmax_connections_per_ip = 2\n");
    let mut refused = connect(&d);
    refused.write_all(&oversized_request()).unwrap();
    let refusal = FrameReader::default().reply(&mut refused);
    assert!(refusal.token.is_none(), "{refusal:?}");
    assert_eq!(read_until_closed(&mut refused), b"");
    // Two more, the cap, while it waits; then its end.
    let held: Vec<TcpStream> = (0..2).map(|_| connect(&d)).collect();
    wait_for_metric(&d, "ocm_tcp_connections_accepted_total", 3.0);
    let local = refused.local_addr().unwrap();
    drop(refused);
    d.wait_for_log(&format!("{local}: closed (protocol)"));
    let mut another = connect(&d);
    let _ = another.write_all(&request_bytes(Operation::CreateRoom, "y", b"\"y\""));
    assert_eq!(read_until_closed(&mut another), b"", "a third was served");
    assert_eq!(rejected(&d, "max_connections_per_ip"), 1.0);
    drop(held);
}

/// Metrics connections open at once at most (`MAX_HTTP_CONNECTIONS` in the event loop).
const MAX_METRICS_CONNECTIONS: usize = 16;

#[test]
fn idle_metrics_connections_neither_fill_the_connection_table_nor_lock_out_health_checks() {
    // The handshake timer would close the idle connections; it must not run out mid-test.
    let d = daemon("[limits]\nmax_connections = 4\nhandshake_timeout_secs = 600\n");
    // Idle connections fill the metrics allowance, not the handshake table.
    let mut idle: Vec<TcpStream> = (0..MAX_METRICS_CONNECTIONS)
        .map(|_| metrics_connection(&d))
        .collect();
    // A health check is answered: the oldest idle connection (accepted first, the backlog
    // being in order) is closed to make room for it.
    assert_eq!(d.http_get("/healthz"), "ok\n");
    idle[0].set_read_timeout(Some(PATIENCE)).unwrap();
    let mut byte = [0u8; 1];
    let oldest = uninterrupted(|| idle[0].read(&mut byte));
    assert!(
        matches!(oldest, Ok(0)),
        "the oldest idle connection is still open ({oldest:?})"
    );
    // The others stay.
    idle[1].set_nonblocking(true).unwrap();
    let next = idle[1].read(&mut byte);
    assert!(
        matches!(&next, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the second idle connection was closed too ({next:?})"
    );
    // This scrape fits without closing another: the health check's connection is gone.
    assert_eq!(closed(&d, "evicted"), 1.0);
    assert_eq!(rejected(&d, "max_metrics_connections"), 0.0);
    let room = assert_still_serves(&d);
    drop(idle);
    assert_state_intact(d, &[room]);
}

/// A burst of more metrics connections than the allowance, each with its request already
/// sent, is accepted in one go (the daemon was stopped while they queued): a full table reads
/// the oldest before closing it, so every request is answered and none is evicted.
/// A full metrics table closes a connection that was answered and whose client has not
/// closed it yet (counted as `protocol`) before it evicts one still waiting for its request.
#[test]
fn a_full_metrics_table_closes_an_answered_connection_before_an_idle_one() {
    let d = daemon("");
    let mut idle: Vec<TcpStream> = (0..MAX_METRICS_CONNECTIONS - 1)
        .map(|_| metrics_connection(&d))
        .collect();
    // Answered, then kept open: the daemon waits for its end. Accepted after the idle ones.
    let mut answered = metrics_connection(&d);
    answered.set_read_timeout(Some(PATIENCE)).unwrap();
    answered.write_all(HEALTH_CHECK).unwrap();
    let mut text = String::new();
    answered
        .read_to_string(&mut text)
        .expect("the answer, then our end");
    assert!(text.ends_with("\r\n\r\nok\n"), "{text:?}");
    // The table is full: a new health check makes room by closing the answered one.
    assert_eq!(d.http_get("/healthz"), "ok\n");
    assert_eq!(closed(&d, "evicted"), 0.0, "no idle connection was evicted");
    // Every idle connection is still there, and answered.
    for (i, s) in idle.iter_mut().enumerate() {
        let text = health_check_on(s);
        assert!(text.ends_with("\r\n\r\nok\n"), "idle {i}: {text:?}");
    }
    drop(answered);
}

/// A full metrics table reads its connections before it closes one: one whose request and
/// end were waiting unread is answered and closed, which frees the slot, and no idle
/// connection is evicted for the newcomer.
#[test]
fn a_full_metrics_table_that_frees_a_slot_by_answering_evicts_nobody() {
    let d = daemon("");
    let mut idle: Vec<TcpStream> = (0..MAX_METRICS_CONNECTIONS - 1)
        .map(|_| metrics_connection(&d))
        .collect();
    wait_for_metric(&d, "ocm_tcp_connections_accepted_total", idle.len() as f64);
    // Stopped, the daemon reads nothing: the last slot's request and end, then a newcomer,
    // arrive together and are accepted in one go, before either is read.
    d.stop();
    let mut done = metrics_connection(&d);
    done.write_all(HEALTH_CHECK).unwrap();
    done.shutdown(Shutdown::Write).unwrap();
    let mut newcomer = metrics_connection(&d);
    newcomer.write_all(HEALTH_CHECK).unwrap();
    d.signal(libc::SIGCONT);
    for (which, s) in [
        ("the finished one", &mut done),
        ("the newcomer", &mut newcomer),
    ] {
        let text = answer_on(s);
        assert!(text.ends_with("\r\n\r\nok\n"), "{which}: {text:?}");
    }
    assert_eq!(closed(&d, "evicted"), 0.0);
    for (i, s) in idle.iter_mut().enumerate() {
        let text = health_check_on(s);
        assert!(text.ends_with("\r\n\r\nok\n"), "idle {i}: {text:?}");
    }
}

#[test]
fn a_burst_of_metrics_requests_past_the_allowance_is_answered_whole() {
    let d = daemon("");
    d.stop();
    let mut scrapes: Vec<TcpStream> = (0..MAX_METRICS_CONNECTIONS + 4)
        .map(|_| {
            let mut s = metrics_connection(&d);
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    d.signal(libc::SIGCONT);
    for (i, s) in scrapes.iter_mut().enumerate() {
        let answer = answer_on(s);
        assert!(answer.ends_with("\r\n\r\nok\n"), "scrape {i}: {answer:?}");
    }
    assert_eq!(closed(&d, "evicted"), 0.0);
    assert_eq!(rejected(&d, "max_metrics_connections"), 0.0);
}

/// The daemon's CPU time while `rounds` metrics connections are opened one after another,
/// each sending `head` bytes of a request head that never ends: past the first 16, each new
/// one finds the metrics table full and closes the oldest to make room.
fn cpu_for_unfinished_metrics_requests(head: usize, rounds: usize) -> Duration {
    let d = daemon("[limits]\nhandshake_timeout_secs = 600\n");
    let junk = vec![b'a'; head];
    let before = cpu_time(d.pid());
    // Kept open: a client's end would free its slot, and its newcomer would evict nobody.
    let open: Vec<TcpStream> = (0..rounds)
        .map(|_| {
            let mut s = metrics_connection(&d);
            s.write_all(&junk).unwrap();
            s
        })
        .collect();
    let evicted = (rounds - MAX_METRICS_CONNECTIONS) as f64;
    wait_until("every newcomer made room", || {
        closed(&d, "evicted") >= evicted
    });
    let used = cpu_time(d.pid()).saturating_sub(before);
    drop(open);
    used
}

/// Unfinished request heads cost the daemon the bytes that arrive, not a search of every
/// byte held on each of them. The end of a head was looked for in all of a connection's
/// input at every read, and a full metrics table reads (and so searched) all 16
/// connections for each newcomer: 16 connections holding 8,000 bytes each made every new
/// connection cost a search of 128,000 bytes (seen: 600 newcomers took 1.04 s of the loop's
/// time in a debug build, against 30 ms with 8-byte heads; 0.1 s since).
#[test]
fn unfinished_metrics_requests_cost_no_search_of_what_was_read_before() {
    raise_fd_limit(2 * 600 + 64);
    let control = cpu_for_unfinished_metrics_requests(8, 600);
    let long = cpu_for_unfinished_metrics_requests(8000, 600);
    eprintln!("CPU: {long:?} with 8,000-byte heads, {control:?} with 8-byte heads");
    assert!(
        long < control * 4 + Duration::from_millis(150),
        "8,000-byte heads took {long:?} of CPU, 8-byte heads {control:?}"
    );
}

/// Open sockets of process `pid`: unlike a count of all its descriptors, not thrown off by
/// the files it opens for a moment (its writer folding the journal at start, its read of
/// /proc/self/net/udp).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| {
        dir.flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

/// The lowest descriptor number process `pid` has free: the one its next open takes.
fn lowest_free_fd(pid: u32) -> usize {
    let open: std::collections::HashSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (0..).find(|n| !open.contains(n)).unwrap_or(0)
}

/// Lowers the running daemon's descriptor limit (`prlimit`) to the lowest descriptor number
/// it has free, so that its next `accept` fails with EMFILE. (Not the count of its
/// descriptors: it may hold one far above the others, inherited from the test runner. The
/// lower of two readings: one may see a descriptor the daemon holds only for a moment, such
/// as its read of /proc/self/net/udp.)
fn limit_to_open_descriptors(d: &Daemon) {
    let free = lowest_free_fd(d.pid()).min(lowest_free_fd(d.pid()));
    assert!(free > 0, "cannot read /proc/{}/fd", d.pid());
    set_open_files_limit(d, free);
}

/// Sets the running daemon's open-file limit, soft and hard, to `limit` (`prlimit`).
fn set_open_files_limit(d: &Daemon, limit: usize) {
    let lim = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: prlimit reads the struct we own and writes nothing (no old-limit pointer).
    let rc = unsafe {
        libc::prlimit(
            d.pid() as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Opens `n` connections to the daemon's metrics listener and waits until it has accepted
/// them, then leaves it no descriptor to spare ([`limit_to_open_descriptors`]). Silent
/// metrics connections hold descriptors that a handshake newcomer never closes (they close
/// at the handshake timeout), unlike idle handshake connections, which a failed accept
/// closes to make room.
fn hold_every_descriptor_with_metrics_connections(d: &Daemon, n: usize) -> Vec<TcpStream> {
    let base = open_sockets(d.pid());
    let holders: Vec<TcpStream> = (0..n).map(|_| metrics_connection(d)).collect();
    wait_until("the metrics connections are accepted", || {
        open_sockets(d.pid()) >= base + n
    });
    limit_to_open_descriptors(d);
    holders
}

#[test]
fn connections_left_in_the_backlog_at_emfile_are_served_once_descriptors_free_up() {
    // Lines about dropped input off: a failed accept is not that, and is logged anyway.
    let d = daemon("[rate]\ndrop_logs_per_sec = 0\n");
    // Every descriptor held by a metrics connection, which a handshake newcomer does not
    // close: these wait in the backlog, EMFILE, which the log line below confirms.
    let holders = hold_every_descriptor_with_metrics_connections(&d, 3);
    let mut waiting: Vec<TcpStream> = (0..2).map(|_| connect(&d)).collect();
    for s in &mut waiting {
        ask_for_rooms(s);
    }
    d.wait_for_log("accept failed");
    // Free the descriptors; no new connection arrives to raise another edge on the listener.
    drop(holders);
    for s in &mut waiting {
        read_room_list(s, "a connection left in the backlog");
    }
    assert!(d.metric("ocm_tcp_accept_errors_total") >= 1.0);
}

/// Idle connections cannot hold the descriptors from newcomers when the daemon runs out of
/// them for a reason its connection cap does not know of (the limit lowered while running,
/// the system out of files): a failed accept closes the connection a full table would (the
/// one idle longest) and takes the newcomer at once. Before, idle connections held every
/// descriptor until their handshake timers closed them, and a new client waited that long
/// (60 s here; the test's read timeout is 10 s).
#[test]
fn at_emfile_an_idle_connection_is_closed_for_a_newcomer() {
    let d = daemon("[rate]\ndrop_logs_per_sec = 0\n[limits]\nhandshake_timeout_secs = 60\n");
    let base = open_sockets(d.pid());
    let mut idle: Vec<TcpStream> = (0..3).map(|_| connect(&d)).collect();
    wait_until("the idle connections are accepted", || {
        open_sockets(d.pid()) >= base + 3
    });
    limit_to_open_descriptors(&d);
    // Takes a descriptor left by a count that was one too many, or closes the first idle
    // connection to be accepted.
    let _filler = connect(&d);
    let started = Instant::now();
    let mut s = connect(&d);
    list_rooms_on(&mut s, 0);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "answered after {waited:?}, with a handshake timeout of 60 s"
    );
    // A scrape, out of descriptors too, closes another idle handshake connection (or the
    // first, if descriptors held for a moment when the limit was set let the filler and the
    // client in without one).
    assert!(closed(&d, "evicted") >= 1.0);
    assert!(d.metric("ocm_tcp_accept_errors_total") >= 1.0);
    d.wait_for_log("closed a connection to make room");
    // The one idle longest went first.
    let mut byte = [0u8; 1];
    assert!(
        matches!(uninterrupted(|| idle[0].read(&mut byte)), Ok(0) | Err(_)),
        "the oldest idle connection is still open"
    );
}

/// At EMFILE, the connection closed for a newcomer goes before the newcomer's address is
/// known, so a source at `max_connections_per_ip` costs another source's idle connection; but
/// the descriptor its refused connection frees serves its next attempts, and then the next
/// newcomer, without another closing: one closing per exhaustion, not one per attempt (as
/// docs/OPERATIONS.md says).
#[test]
fn at_emfile_a_source_at_its_cap_costs_one_closing_not_one_per_attempt() {
    let d = daemon(
        "[rate]\ndrop_logs_per_sec = 0\n[limits]\nhandshake_timeout_secs = 60\n\
         max_connections_per_ip = 2\n",
    );
    let capped = Ipv4Addr::new(127, 0, 0, 5);
    let base = open_sockets(d.pid());
    let mut others: Vec<TcpStream> = (2..5)
        .map(|i| connect_from(Ipv4Addr::new(127, 0, 0, i), d.tcp, None))
        .collect();
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect_from(capped, d.tcp, None)).collect();
    wait_until("the idle connections are accepted", || {
        open_sockets(d.pid()) >= base + 5
    });
    // The capped source's answered last: the one idle longest is another source's.
    for (i, s) in others.iter_mut().chain(held.iter_mut()).enumerate() {
        list_rooms_on(s, i as u8);
    }
    limit_to_open_descriptors(&d);
    for attempt in 0..5 {
        let mut refused = connect_from(capped, d.tcp, None);
        refused.set_read_timeout(Some(PATIENCE)).unwrap();
        let end = uninterrupted(|| refused.read(&mut [0u8; 1]));
        assert!(
            matches!(end, Ok(0))
                || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "attempt {attempt} from the capped source: {end:?}"
        );
    }
    d.wait_for_log("closed a connection to make room");
    assert_eq!(closed_by_daemon(&mut others), [true, false, false]);
    assert_eq!(closed_by_daemon(&mut held), [false, false]);
    // The descriptor freed by the last refusal takes a newcomer from another source.
    let _newcomer = answered_from(&d, Ipv4Addr::new(127, 0, 0, 6), 9);
    assert_eq!(closed_by_daemon(&mut others), [true, false, false]);
}

/// Which of `conns` the daemon has closed (read without waiting: an end already sent shows).
fn closed_by_daemon(conns: &mut [TcpStream]) -> Vec<bool> {
    conns
        .iter_mut()
        .map(|s| {
            s.set_nonblocking(true).unwrap();
            let closed = match s.read(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            };
            s.set_nonblocking(false).unwrap();
            closed
        })
        .collect()
}

/// A scrape out of descriptors, with the metrics allowance full, makes room by closing a
/// metrics connection (one a full allowance closes for it once it is in), not a handshake
/// connection as well. It closed the longest idle handshake connection first, to free a
/// descriptor, and then, accepted into a full allowance, the oldest metrics connection:
/// two connections closed for one newcomer, the handshake one for nothing.
#[test]
fn at_emfile_a_scrape_to_a_full_metrics_allowance_closes_no_handshake_connection() {
    let d = daemon("[rate]\ndrop_logs_per_sec = 0\n[limits]\nhandshake_timeout_secs = 60\n");
    let base = open_sockets(d.pid());
    let mut idle: Vec<TcpStream> = (0..3).map(|_| connect(&d)).collect();
    let _silent: Vec<TcpStream> = (0..MAX_METRICS_CONNECTIONS)
        .map(|_| metrics_connection(&d))
        .collect();
    wait_until("the idle connections are accepted", || {
        open_sockets(d.pid()) >= base + 3 + MAX_METRICS_CONNECTIONS
    });
    limit_to_open_descriptors(&d);
    // Takes a descriptor left by a count that was one too many, or closes the first idle
    // connection to be accepted: either way none is left to spare.
    let mut filler = connect(&d);
    list_rooms_on(&mut filler, 0);
    let before = closed_by_daemon(&mut idle);
    let mut scrape = metrics_connection(&d);
    scrape.write_all(HEALTH_CHECK).unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut scrape)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    d.wait_for_log("accept failed");
    assert_eq!(
        closed_by_daemon(&mut idle),
        before,
        "a handshake connection was closed for a scrape"
    );
    assert!(!closed_by_daemon(std::slice::from_mut(&mut filler))[0]);
}

/// A peer that pipelines more than `max_output_bytes` of replies (here held for the disk) is
/// paused, not cut off: its requests wait until its replies drain, and it gets every one.
#[test]
fn a_pipelining_peer_is_paused_until_its_replies_drain_and_gets_every_one() {
    let d = daemon("[limits]\nmax_output_bytes = 1024\n");
    // 200 joins in one write: about 24 KiB of replies against a 1 KiB cap. (From 127.0.0.2,
    // so that the per-IP request budget of 127.0.0.1 stays for the good client.)
    let host = create(&d, "deaf", "host");
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 2), d.tcp, None);
    s.write_all(&pipelined_joins("deaf", 0..200)).unwrap();
    let mut frames = FrameReader::default();
    let mut tokens = std::collections::HashSet::new();
    for i in 0..200 {
        let reply = frames.reply(&mut s);
        let token = reply
            .token
            .unwrap_or_else(|| panic!("join {i} refused: {:?}", reply.compliance));
        tokens.insert(token);
    }
    assert_eq!(tokens.len(), 200);
    assert_eq!(closed(&d, "output_overflow"), 0.0);
    let room = assert_still_serves(&d);
    let hostm = Member::joined(&d, "deaf", &host);
    Member::new(&d, "deaf", &join(&d, "deaf", "late")).registered_with(&hostm, "late");
    assert_state_intact(d, &[room, "deaf".into()]);
}

/// A pipelining peer whose replies its socket cannot all take (a small receive buffer, big
/// room lists) is paused while it does not read and resumed as it reads: it gets every reply.
#[test]
fn a_pipelining_peer_that_reads_late_is_paused_and_then_gets_every_reply() {
    // No request limit: a thousand requests in one write.
    let d = daemon("[limits]\nmax_output_bytes = 1024\n[rate]\nrequests_per_sec = 0\n");
    // Room lists of several KiB each: a thousand of them is more than any socket buffer.
    create_rooms(&d, 200, long_room_name);
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 2), d.tcp, Some(4096));
    const ASKED: usize = 1000;
    s.write_all(&request_bytes(Operation::ListRooms, "", b"{}").repeat(ASKED))
        .unwrap();
    // It reads nothing until the daemon has stopped answering it.
    wait_for_metric(&d, "ocm_tcp_output_pauses_total", 1.0);
    // Paused, the connection is not read (its requests wait in the kernel), nor revisited:
    // the daemon idles until the peer reads.
    let before = cpu_time(d.pid());
    let window = Duration::from_secs(2);
    // A measurement window, not a wait for anything.
    thread::sleep(window);
    let used = cpu_time(d.pid()).saturating_sub(before);
    assert!(used < window / 4, "{used:?} of CPU in {window:?} paused");
    let mut frames = FrameReader::default();
    for i in 0..ASKED {
        expect_success(&mut frames, &mut s, &format!("reply {i}"));
        let (state, list) = frames.next(&mut s).expect("the room list");
        assert_eq!(state, State::Complete, "reply {i}");
        assert!(list.len() > 1024, "reply {i} is {} bytes", list.len());
    }
    assert_eq!(closed(&d, "output_overflow"), 0.0);
    assert_serves_then_state_intact(d, &["a-room-with-a-rather-long-name-000"]);
}

/// The output cap counts what the kernel would not take: a client that pipelines requests
/// whose replies together pass it, and reads them, gets every reply.
#[test]
fn pipelined_replies_over_the_output_cap_all_reach_a_peer_that_reads() {
    let d = daemon("[limits]\nmax_output_bytes = 256\n");
    let mut s = connect(&d);
    // Each refusal is over 100 bytes: five of them are twice the cap.
    s.write_all(&pipelined_joins("nope", 0..5)).unwrap();
    let mut frames = FrameReader::default();
    let mut refused = 0;
    for _ in 0..5 {
        let (state, body) = frames.next(&mut s).expect("a reply, not EOF");
        assert_eq!(state, State::Compliance);
        let compliance = payload::parse_compliance(&body).expect("a compliance payload");
        if let Compliance::Failure { code, .. } = compliance {
            assert_eq!(code, Some(ErrorCode::RoomNotFound));
            refused += 1;
        }
    }
    assert_eq!(refused, 5);
    assert_eq!(closed(&d, "output_overflow"), 0.0);
    // The connection still serves: one more request, one more reply.
    s.write_all(&request_bytes(Operation::JoinRoom, "nope", b"\"m5\""))
        .unwrap();
    assert!(frames.next(&mut s).is_some(), "still open");
}

/// Peak resident memory of a process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM line");
    kb * 1024
}

#[test]
fn a_peer_that_writes_without_reading_is_cut_off_and_others_stay_served() {
    // Refusals need no durability, so their bytes go straight to the output buffer: a peer
    // that keeps writing requests and never reads makes them pile up in the daemon.
    // It is paused at the cap, and closed when its handshake timer runs out.
    let d = daemon("[limits]\nmax_output_bytes = 1024\nhandshake_timeout_secs = 5\n");
    let rss_before = peak_rss(d.pid());
    let s = connect_from(Ipv4Addr::LOCALHOST, d.tcp, Some(4096));
    let one = request_bytes(Operation::Other(0x42), &"r".repeat(255), b"\"x\"");
    let chunk: Vec<u8> = one.repeat((256 << 10) / one.len());
    const MAX_FLOOD: usize = 32 << 20;
    let sent = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut s = s.try_clone().unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        let sent = Arc::clone(&sent);
        let done = Arc::clone(&done);
        thread::spawn(move || {
            while sent.load(Ordering::SeqCst) < MAX_FLOOD {
                if s.write_all(&chunk).is_err() {
                    break;
                }
                sent.fetch_add(chunk.len(), Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // While the flood goes on (or once the daemon cut it short), another client is answered
    // promptly.
    wait_until("the flood is under way", || {
        sent.load(Ordering::SeqCst) >= 1 << 20 || done.load(Ordering::SeqCst)
    });
    let mut other = connect(&d);
    // Generous: with the bug this waits for the whole flood; the assertion comes later.
    other.set_read_timeout(Some(6 * PATIENCE)).unwrap();
    let t = Instant::now();
    other
        .write_all(&request_bytes(Operation::CreateRoom, "meanwhile", b"\"m\""))
        .unwrap();
    let mut first = [0u8; 1];
    let answered = uninterrupted(|| other.read(&mut first));
    let waited = t.elapsed();
    assert!(matches!(answered, Ok(1)), "no answer: {answered:?}");
    // Answered during the flood, not after it: with the bug the answer waited until the
    // peer was cut off (at its handshake timeout, 5 s after it connected). An order of
    // events, not a time limit, so a loaded machine does not fail it.
    assert_eq!(
        closed(&d, "output_overflow"),
        0.0,
        "another client was answered (after {waited:?}) only once the flooding peer was cut off"
    );
    writer.join().unwrap();
    let _ = s.shutdown(Shutdown::Both);
    let flooded = sent.load(Ordering::SeqCst);
    let grew = peak_rss(d.pid()).saturating_sub(rss_before);
    eprintln!(
        "meanwhile answered in {waited:?}; {flooded} bytes written; peak memory grew by {grew} bytes"
    );
    wait_until("the peer is cut off", || {
        closed(&d, "output_overflow") >= 1.0
    });
    assert!(
        flooded < MAX_FLOOD,
        "the daemon read all {flooded} bytes without cutting the peer off"
    );
    assert!(
        grew < 8 << 20,
        "the daemon's memory grew by {grew} bytes for one peer with max_output_bytes = 1024"
    );
    assert_serves_then_state_intact(d, &[]);
}

#[test]
fn room_and_member_caps_answer_server_full() {
    let d = daemon("[limits]\nmax_rooms = 2\n");
    let first = create(&d, "one", "h1");
    create(&d, "two", "h2");
    let r = request(&d, Operation::CreateRoom, "three", b"\"h3\"");
    assert_eq!(refused(&r), Some(ErrorCode::ServerFull), "{r:?}");
    // A room that closes frees its place.
    let h1 = Member::joined(&d, "one", &first);
    h1.send("__LEAVE__");
    wait_until("room one closes", || d.metric("ocm_rooms") == 1.0);
    assert_serves_then_state_intact(d, &["two"]);

    let d = daemon("[limits]\nmax_members_per_room = 2\n");
    create(&d, "pair", "h");
    join(&d, "pair", "m1");
    let r = request(&d, Operation::JoinRoom, "pair", b"\"m2\"");
    assert_eq!(refused(&r), Some(ErrorCode::ServerFull), "{r:?}");
    // Its words name the room's own cap, not the server's.
    assert!(
        matches!(&r.compliance, Compliance::Failure { message: Some(m), .. }
            if m.starts_with("room \"pair\" is full (2 members")),
        "{r:?}"
    );
    assert_serves_then_state_intact(d, &["pair"]);
}

#[test]
fn deeply_nested_json_payloads_are_refused_without_harm() {
    let d = daemon("");
    // Just under the 16 KiB payload cap: nesting far deeper than any parser's stack allows.
    let nested = |open: &str, close: &str, depth: usize| {
        format!("{}{}", open.repeat(depth), close.repeat(depth))
    };
    let payloads = [
        nested("[", "]", 8_000),
        format!(
            "{{\"username\": \"deep\", \"x\": {}}}",
            nested("[", "]", 8_000)
        ),
        format!(
            "{{\"username\": \"deeper\", \"x\": {}}}",
            nested("{\"a\":", "}", 2_500)
        ),
        "[".repeat(16_000),
    ];
    for body in &payloads {
        assert!(body.len() <= tcrp::DEFAULT_MAX_PAYLOAD);
        let reply = request(&d, Operation::CreateRoom, "nest", body.as_bytes());
        assert_eq!(reply.token, None, "{} bytes: {reply:?}", body.len());
    }
    assert_eq!(d.metric("ocm_rooms"), 0.0);
    assert_serves_then_state_intact(d, &[]);
}

/// Datagrams the per-wakeup budget left in the socket are read in the next pass at once,
/// not at the next timer: forty chat lines queued while the daemon was stopped, read two a
/// wakeup, all reach the other member within 4 s: at once on an idle machine, and never
/// with the wakeups waiting for timers, which are 5 s apart or more here (no TCP
/// connection is open to bring the 100 ms deadline checks), so that the twenty wakeups
/// would take minutes.
#[test]
fn datagrams_left_by_the_wakeup_budget_are_read_without_waiting_for_a_timer() {
    let d = Daemon::start_with(Options {
        config: Some(
            "[udp]\ndatagrams_per_wakeup = 2\n[liveness]\nsweep_interval_ms = 60000\n\
             [history]\ncheckpoint_secs = 3600\n"
                .into(),
        ),
        ..Options::default()
    });
    let (alice, bob) = room_of_two(&d, "budget");
    d.stop();
    const LINES: usize = 40;
    for i in 0..LINES {
        bob.send(&format!("m{i}"));
    }
    let resumed = Instant::now();
    d.signal(libc::SIGCONT);
    for i in 0..LINES {
        assert_eq!(alice.recv(), format!("bob: m{i}"));
        let took = resumed.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "line {i} of {LINES} queued came after {took:?}"
        );
    }
}

#[test]
fn a_datagram_flood_does_not_starve_handshakes() {
    let d = daemon("");
    let host = create(&d, "busy", "host");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooded = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..2)
        .map(|i| {
            let stop = Arc::clone(&stop);
            let flooded = Arc::clone(&flooded);
            let to = d.udp;
            thread::spawn(move || {
                let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                let mut bytes = Vec::new();
                let token = format!("{i:032x}");
                ucrp::datagram::encode(b"busy", token.as_bytes(), "flood", &mut bytes).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    for _ in 0..256 {
                        let _ = sock.send_to(&bytes, to);
                    }
                    flooded.fetch_add(256, Ordering::SeqCst);
                }
            })
        })
        .collect();
    wait_until("the flood is under way", || {
        dropped(&d, "unknown_token") >= 10_000.0
    });
    // Starved, a handshake would not finish until the flood stops, and each waits at most
    // PATIENCE (an order of events, not a time limit: a loaded machine does not fail it).
    let before = dropped(&d, "unknown_token");
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        join(&d, "busy", &format!("m{i}"));
        slowest = slowest.max(t.elapsed());
    }
    let t = Instant::now();
    create(&d, "during", "x");
    slowest = slowest.max(t.elapsed());
    // And the daemon went on reading the flood meanwhile: the handshakes shared the loop.
    let after = dropped(&d, "unknown_token");
    assert!(
        after > before,
        "no flood datagram read during the handshakes ({before} dropped before, {after} after)"
    );
    // (Chat is checked after the flood: under it the kernel may drop any datagram, ours too.)
    stop.store(true, Ordering::SeqCst);
    for f in flooders {
        f.join().unwrap();
    }
    let mut last = -1.0;
    wait_until("the daemon drains what the flood left queued", || {
        let received = d.metric("ocm_datagrams_received_total");
        let drained = received == last;
        last = received;
        drained
    });
    let room = assert_still_serves(&d);
    eprintln!(
        "{} datagrams flooded; slowest handshake {slowest:?}",
        flooded.load(Ordering::SeqCst)
    );
    // The room the flood aimed at is unharmed.
    let hostm = Member::joined(&d, "busy", &host);
    Member::new(&d, "busy", &join(&d, "busy", "late")).registered_with(&hostm, "late");
    assert_state_intact(d, &[room, "busy".into(), "during".into()]);
}

/// Chat fanned out to a large room costs a send per member, and the budget of a wakeup
/// counts those sends, not only the datagrams read: a backlog of chat to 512 members is
/// relayed a slice at a time, with accepts and scrapes in between. (Before, a wakeup read up
/// to `datagrams_per_wakeup` chats whatever each fanned out to: 1,024 at the default, half a
/// million sends in a room of 512, and up to 65,536 at its cap, before TCP had a turn.)
#[test]
fn chat_fanned_out_to_a_large_room_does_not_hold_up_handshakes() {
    const MEMBERS: usize = 512;
    const CHATS: usize = 2_000;
    let d = daemon(
        "[rate]\nchat_per_sec = 0.0\nrequests_per_sec = 0.0\n\
         [udp]\ndatagrams_per_wakeup = 65536\n",
    );
    let host = create(&d, "wide", "host");
    // Joined on one connection, pipelined: one journal write for most of them.
    let mut s = connect(&d);
    s.write_all(&pipelined_joins("wide", 1..MEMBERS)).unwrap();
    let mut reader = FrameReader::default();
    let members: Vec<Member> = (1..MEMBERS)
        .map(|_| {
            let token = reader.reply(&mut s).token.expect("joined");
            Member::joined(&d, "wide", &token)
        })
        .collect();
    let sender = Member::joined(&d, "wide", &host);
    wait_until("every member registered", || {
        d.metric("ocm_members_registered") == MEMBERS as f64
    });
    // A backlog of chat waits with a handshake and a scrape behind it.
    d.stop();
    for i in 0..CHATS {
        sender.send(&format!("chat {i}"));
    }
    let mut list = connect(&d);
    list.write_all(&request_bytes(Operation::ListRooms, "", b""))
        .unwrap();
    let mut scrape = metrics_connection(&d);
    scrape.set_read_timeout(Some(PATIENCE)).unwrap();
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    d.signal(libc::SIGCONT);
    let mut text = String::new();
    scrape.read_to_string(&mut text).unwrap();
    let relayed: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ocm_messages_relayed_total "))
        .expect("counter")
        .trim()
        .parse()
        .unwrap();
    // The room list was answered too.
    let (state, _) = FrameReader::default().next(&mut list).expect("COMPLIANCE");
    assert_eq!(state, State::Compliance);
    eprintln!("scrape answered after {relayed} of {CHATS} chats to {MEMBERS} members");
    assert!(
        relayed < (CHATS / 2) as f64,
        "the scrape waited for {relayed} of {CHATS} chats to be relayed to {MEMBERS} members"
    );
    // The rest is relayed after.
    wait_until("the backlog is relayed", || {
        d.metric("ocm_messages_relayed_total") >= CHATS as f64
    });
    drop(members);
    assert_serves_then_state_intact(d, &["wide"]);
}

/// The line of `/proc/<pid>/net/tcp` for the daemon's TCP socket at `local` whose peer is
/// `remote` (a listener: `None`), split into its fields; `None` when there is none.
fn proc_net_tcp(pid: u32, local: SocketAddr, remote: Option<SocketAddr>) -> Option<Vec<String>> {
    let hex = |a: SocketAddr| {
        let SocketAddr::V4(v4) = a else {
            panic!("IPv4 expected")
        };
        format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )
    };
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    let local = hex(local);
    let remote = remote.map_or_else(|| "00000000:0000".to_owned(), hex);
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        (fields.get(1) == Some(&local) && fields.get(2) == Some(&remote)).then_some(fields)
    })
}

/// The daemon's side of the TCP connection from `remote` to `local` in `/proc/<pid>/net/tcp`:
/// its state (`01` established, `04` FIN-WAIT-1, ...) and the bytes in its send queue; `None`
/// once the kernel has let it go.
fn daemon_side(pid: u32, local: SocketAddr, remote: SocketAddr) -> Option<(String, u64)> {
    let fields = proc_net_tcp(pid, local, Some(remote))?;
    let (tx, _) = fields.get(4)?.split_once(':')?;
    Some((fields.get(3)?.clone(), u64::from_str_radix(tx, 16).ok()?))
}

/// A peer that sends requests and never reads makes the daemon's side of its connection
/// hold a small send buffer in the kernel, and once the daemon closes it for that
/// (`output_overflow`, or `timeout` with fewer replies unread), nothing: the close resets
/// the connection. (Before, Linux grew the
/// send buffer up to `net.ipv4.tcp_wmem`'s 4 MiB, 2.1 MB of room lists queued on each such
/// connection, and the closed connection stayed in FIN-WAIT-1 with all of it for as long as
/// the peer acknowledged the kernel's window probes: 1,000 of them, from as many sources each
/// within its request allowance, held 1.5 GB of the host's TCP memory, its pressure mark.)
#[test]
fn a_peer_that_never_reads_holds_little_kernel_memory_and_none_once_closed() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 2\n");
    // Room lists of about 15 KiB.
    create_rooms(&d, 60, |i| format!("{i:02}{}", "x".repeat(240)));
    let mut peer = connect_from(Ipv4Addr::new(127, 0, 0, 2), d.tcp, Some(2048));
    let local = peer.local_addr().unwrap();
    // 150 lists (2.2 MB of replies) within the source's burst of 200 requests.
    peer.write_all(&request_bytes(Operation::ListRooms, "", b"").repeat(150))
        .unwrap();
    wait_for_metric(&d, "ocm_tcp_output_pauses_total", 1.0);
    let (_, queued) = daemon_side(d.pid(), d.tcp, local).expect("the daemon's side");
    eprintln!("{queued} bytes queued in the kernel for a peer that does not read");
    assert!(
        queued <= 256 * 1024,
        "{queued} bytes queued in the kernel for a peer that does not read"
    );
    wait_until("the daemon closes the connection", || {
        closed(&d, "output_overflow") >= 1.0
    });
    wait_until("the kernel lets the daemon's side go", || {
        daemon_side(d.pid(), d.tcp, local).is_none()
    });
    // Six lists (90 KB) fit in the kernel's buffer and under the daemon's output cap: the
    // connection is never paused, and its timer runs out with them unread (`timeout`).
    let mut quiet = connect_from(Ipv4Addr::new(127, 0, 0, 3), d.tcp, Some(2048));
    let quiet_local = quiet.local_addr().unwrap();
    quiet
        .write_all(&request_bytes(Operation::ListRooms, "", b"").repeat(6))
        .unwrap();
    wait_until("the daemon closes the quiet connection", || {
        closed(&d, "timeout") >= 1.0
    });
    wait_until(
        "the kernel lets the daemon's side of the quiet one go",
        || daemon_side(d.pid(), d.tcp, quiet_local).is_none(),
    );
    drop((peer, quiet));
    assert_serves_then_state_intact(d, &[]);
}

/// A peer that sends its requests and its end (FIN) together and then never reads is answered
/// into the kernel's send queue, and closed normally once the daemon has nothing of its own
/// left to send: its replies stay in the kernel, the daemon's side in LAST-ACK. The kernel
/// lets them go once the peer has left them unread for twice `handshake_timeout_secs`
/// (`TCP_USER_TIMEOUT`, set on the listener, which connections inherit). Before, they stayed
/// there for as long as the peer acknowledged the kernel's window probes (about 340 s on
/// loopback). A peer that
/// reads them late, within that time, still gets every reply and the daemon's end.
#[test]
fn replies_left_unread_after_the_peers_end_are_let_go_after_a_bound() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 2\n");
    // Room lists of about 15 KiB.
    create_rooms(&d, 60, |i| format!("{i:02}{}", "x".repeat(240)));
    // Four lists (60 KB) fit in the kernel's send buffer, so the daemon has none left to
    // send once the peer's end has come (six do not: see the test above).
    const LISTS: usize = 4;
    let lists = request_bytes(Operation::ListRooms, "", b"").repeat(LISTS);
    let mut late = connect_from(Ipv4Addr::new(127, 0, 0, 4), d.tcp, Some(2048));
    let mut never = connect_from(Ipv4Addr::new(127, 0, 0, 5), d.tcp, Some(2048));
    for s in [&mut late, &mut never] {
        s.write_all(&lists).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    }
    let (late_local, never_local) = (late.local_addr().unwrap(), never.local_addr().unwrap());
    // LAST-ACK (`09`): the daemon closed its side after the peer's end, its FIN queued
    // behind the replies the peer has not read.
    let closed_unread = |local| {
        daemon_side(d.pid(), d.tcp, local)
            .is_some_and(|(state, queued)| state == "09" && queued > 0)
    };
    wait_until("the daemon closes both with replies unread", || {
        closed_unread(late_local) && closed_unread(never_local)
    });
    let closed_at = Instant::now();

    let got = read_until_closed(&mut late);
    let (complete, rest) = complete_frames(&got);
    assert!(rest.is_empty(), "a torn reply: {} bytes left", rest.len());
    assert_eq!(complete, LISTS, "every list reaches a peer that reads late");

    wait_until("the kernel to let go of the replies never read", || {
        daemon_side(d.pid(), d.tcp, never_local).is_none()
    });
    eprintln!("let go {:?} after the daemon closed", closed_at.elapsed());
    drop(never);
    assert_serves_then_state_intact(d, &[]);
}

/// The daemon-side queue length of a TCP socket of the daemon, from `/proc/<pid>/net/tcp`:
/// for a listener (`remote` None) its accept backlog, for a connection its unread bytes.
fn rx_queue(pid: u32, local: SocketAddr, remote: Option<SocketAddr>) -> Option<u64> {
    let fields = proc_net_tcp(pid, local, remote)?;
    let (_, rx) = fields.get(4)?.split_once(':')?;
    u64::from_str_radix(rx, 16).ok()
}

/// A TCRP connection put on the loop's `revisit` list (its turn ended at `FRAMES_PER_TURN`
/// with more frames waiting) and then closed in the same pass frees its slab slot, which a
/// metrics connection accepted later in the pass takes: here A is closed to free a
/// descriptor for the scraper C, the daemon's open-file limit being reached (EMFILE), and
/// C takes A's slot. The list was once walked by slot number alone, so that HTTP connection
/// was read as TCRP and the scraper's `GET /metrics` answered with a TCRP
/// `malformed_request` frame (found by a review); a slot is now read again only for a
/// connection listed itself (`Conn::revisit_listed`).
///
/// The daemon is stopped (SIGSTOP) while A's burst and C's connection arrive, so that one
/// `poll` reports them in one pass, in the order they happened.
#[test]
fn a_metrics_connection_in_a_reused_slot_is_not_read_as_tcrp() {
    let d = daemon(
        "[limits]\nhandshake_timeout_secs = 600\n[rate]\nrequests_per_sec = 0\n\
         drop_logs_per_sec = 0\n",
    );
    let metrics = d.metrics.expect("metrics on");
    // A: the one TCRP connection, answered once, idle: the one closed for a descriptor.
    let mut a = connect(&d);
    let list = request_bytes(Operation::ListRooms, "", b"{}");
    a.write_all(&list).unwrap();
    let mut frames = FrameReader::default();
    assert_eq!(frames.next(&mut a).map(|f| f.0), Some(State::Compliance));
    assert_eq!(frames.next(&mut a).map(|f| f.0), Some(State::Complete));
    let a_local = a.local_addr().unwrap();
    // Its next `accept` fails for want of a descriptor.
    limit_to_open_descriptors(&d);

    d.stop();
    // 1. A pipelines more room lists than one turn answers.
    let burst = list.repeat(64);
    a.write_all(&burst).unwrap();
    wait_until("the burst queued in the stopped daemon", || {
        rx_queue(d.pid(), d.tcp, Some(a_local)) >= Some(burst.len() as u64)
    });
    // 2. C, a scraper, asks for the metrics.
    let mut c = TcpStream::connect(metrics).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_until("C in the backlog", || {
        rx_queue(d.pid(), metrics, None) == Some(1)
    });
    d.signal(libc::SIGCONT);

    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match uninterrupted(|| c.read(&mut chunk)) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading the metrics answer: {e}"),
        }
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "the scraper got {:?} instead of the metrics",
        String::from_utf8_lossy(&answer[..answer.len().min(60)])
    );
    // A was the one closed for C (so C took its slot), with its turn cut short.
    assert_eq!(
        closed(&d, "evicted"),
        1.0,
        "A closed to free a descriptor for C"
    );
}

/// A datagram forged with the daemon's own address and port as its source is dropped and
/// counted (`own_address`): a `__REGISTER__` taken from there would bind the member to the
/// daemon itself, which would then send the room's chat to its own socket. Forged from a raw
/// socket (`IPPROTO_RAW`, so root or `CAP_NET_RAW`; skipped without), the only way to send
/// from an address and port another socket holds.
#[test]
fn a_register_forged_from_the_daemons_own_address_is_dropped() {
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        skipped(&format!("no raw socket here ({e})"));
        return;
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let raw = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let d = Daemon::start_with(Options {
        metrics: true,
        ..Options::default()
    });
    let SocketAddr::V4(own) = d.udp else {
        panic!("the daemon listens on 127.0.0.1")
    };
    let host = create(&d, "lobby", "alice");
    let guest = join(&d, "lobby", "bob");
    let mut payload = Vec::new();
    ucrp::datagram::encode(b"lobby", host.as_bytes(), "__REGISTER__", &mut payload).unwrap();
    // IPPROTO_RAW implies IP_HDRINCL: the IPv4 header is ours (the kernel fills in its
    // checksum), then UDP from the daemon's port to itself, checksum 0 (none, as IPv4 allows).
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    packet.extend_from_slice(&own.ip().octets());
    packet.extend_from_slice(&own.ip().octets());
    packet.extend_from_slice(&own.port().to_be_bytes());
    packet.extend_from_slice(&own.port().to_be_bytes());
    packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(&payload);
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(own.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    use std::os::fd::AsRawFd;
    // SAFETY: the buffer and address outlive the call, with their lengths given.
    let sent = unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(
        sent,
        packet.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    wait_until("the forged REGISTER dropped as own_address", || {
        d.metric("ocm_datagrams_dropped_total{reason=\"own_address\"}") >= 1.0
    });
    // Nothing was bound to the daemon's address: the host's first REGISTER from its own
    // socket binds it, and chat reaches it.
    let alice = Member::joined(&d, "lobby", &host);
    let bob = Member::new(&d, "lobby", &guest);
    bob.registered_with(&alice, "bob");
    assert_eq!(d.metric("ocm_members_registered"), 2.0);
}

/// While a connection closed after a final refusal waits for its peer's end, what the peer
/// still sends is read and thrown away, and its end closes the connection as `protocol`.
#[test]
fn bytes_after_a_final_refusal_are_thrown_away_until_the_peers_end() {
    let d = daemon("");
    let mut s = finally_refused(&d);
    // The daemon has shut its side: it waits for ours now.
    assert_eq!(read_until_closed(&mut s), b"");
    s.write_all(&[b'x'; 1024]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    d.wait_for_log(&format!("{}: closed (protocol)", s.local_addr().unwrap()));
    // Everything was read before the close: a close with our bytes unread would be an RST.
    let mut rest = [0u8; 16];
    assert_eq!(
        uninterrupted(|| s.read(&mut rest)).map_err(|e| e.kind()),
        Ok(0)
    );
    assert_serves_then_state_intact(d, &[]);
}

/// The wait for the peer's end after a final refusal lasts up to 2 s (`LINGER`): a peer
/// that sends more and its end half a second later still finds the connection waiting, and
/// gets a clean end, not an RST.
#[test]
fn a_peer_that_ends_half_a_second_after_a_final_refusal_is_still_waited_for() {
    let d = daemon("");
    let mut s = finally_refused(&d);
    assert_eq!(read_until_closed(&mut s), b"");
    // Pacing, not a wait for anything: a peer slow to close, well within the 2 s.
    thread::sleep(Duration::from_millis(500));
    // On a connection the daemon had closed, these bytes would draw an RST.
    let ended = s
        .write_all(&[b'x'; 1024])
        .and_then(|()| s.shutdown(Shutdown::Write));
    assert!(
        ended.is_ok(),
        "the connection was closed before the peer's end: {ended:?}"
    );
    d.wait_for_log(&format!("{}: closed (protocol)", s.local_addr().unwrap()));
    let mut rest = [0u8; 16];
    assert_eq!(
        uninterrupted(|| s.read(&mut rest)).map_err(|e| e.kind()),
        Ok(0),
        "the connection was closed before the peer's end"
    );
    assert_eq!(closed(&d, "timeout"), 0.0);
}

/// A connection closed after a final refusal (here a payload size over the cap) is read and
/// thrown away for at most 256 KiB: a peer that goes on sending and never sends its end is
/// cut off then, not read for the whole linger time. (Counted in bytes sent, not time: a
/// daemon that read on for its 2 s of linger would take far more than `ENOUGH`.)
#[test]
fn a_peer_that_keeps_sending_after_a_final_refusal_is_cut_off_after_256_kib() {
    const ENOUGH: usize = 64 << 20;
    let d = daemon("");
    let mut s = finally_refused(&d);
    s.set_write_timeout(Some(PATIENCE)).unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    let cut_off = loop {
        if sent >= ENOUGH {
            break None;
        }
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    eprintln!("{sent} bytes taken after the refusal, then {cut_off:?}");
    assert!(
        cut_off.is_some(),
        "still reading after {sent} bytes past the refusal"
    );
    wait_until("the close is counted", || closed(&d, "protocol") >= 1.0);
    assert_serves_then_state_intact(d, &[]);
}

/// A connection that sends only requests over its source's request allowance is closed at
/// its handshake timeout: a `rate_limited` refusal, like a junk frame, does not restart the
/// timer, so requests the daemon will not serve cannot hold a slot of `max_connections`.
#[test]
fn requests_over_the_allowance_do_not_keep_a_connection_open() {
    let d = daemon(
        "[limits]\nhandshake_timeout_secs = 1\n[rate]\nrequests_per_sec = 0.001\nrequests_burst = 1.0\n",
    );
    let mut s = connect(&d);
    // The one request the allowance holds is served.
    let first = exchange(
        &mut s,
        &request_bytes(Operation::CreateRoom, "mine", b"\"h\""),
    );
    assert!(first.token.is_some(), "{first:?}");
    let list = request_bytes(Operation::ListRooms, "", b"{}");
    send_until_closed(&mut s, &list);
    assert!(d.metric("ocm_rate_limited_total{kind=\"request\"}") >= 1.0);
    assert_closes_counted(&d, "timeout", 1.0);
}

/// With `drop_logs_per_sec = 0`, connections refused at a cap and malformed TCRP frames are
/// only counted in the metrics: no line is logged about them.
#[test]
fn with_drop_logs_off_refused_connections_and_bad_frames_are_counted_not_logged() {
    let d = daemon("[limits]\nmax_connections_per_ip = 1\n[rate]\ndrop_logs_per_sec = 0\n");
    let held = connect(&d);
    wait_for_metric(&d, "ocm_tcp_connections_accepted_total", 1.0);
    for _ in 0..10 {
        let mut s = connect(&d);
        assert_eq!(read_until_closed(&mut s), b"");
    }
    assert_eq!(rejected(&d, "max_connections_per_ip"), 10.0);
    drop(held);
    wait_until("the held connection is closed", || {
        closed(&d, "peer_closed") >= 1.0
    });
    for _ in 0..10 {
        let mut s = connect(&d);
        // An unknown state byte: refused from the header, and the connection closed.
        s.write_all(&header(0, 1, 9, 0)).unwrap();
        malformed_request_message(&mut s);
        read_until_closed(&mut s);
    }
    wait_until("the bad frames are counted", || {
        d.metric("ocm_handshakes_total{operation=\"create_room\",result=\"malformed_request\"}")
            >= 10.0
    });
    // A line logged after them: once it is read, every line about them is too.
    create(&d, "marker", "m");
    d.wait_for_log("\"marker\"");
    let log = d.log();
    assert_eq!(log.matches("connection refused").count(), 0, "{log}");
    assert_eq!(log.matches("bad frame").count(), 0, "{log}");
}

/// An `accept4` that fails the first time it is called with EINTR (as a signal arriving
/// during the call would make it), creating the file named by `OCM_TEST_INTERRUPTED_ACCEPT`
/// when it does.
fn accept_interrupter(dir: &std::path::Path) -> std::path::PathBuf {
    const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
    static int interrupted;
    if (!real_accept4)
        real_accept4 = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    const char *mark = getenv("OCM_TEST_INTERRUPTED_ACCEPT");
    if (mark && !interrupted) {
        interrupted = 1;
        int marker = open(mark, O_WRONLY | O_CREAT, 0600);
        if (marker >= 0) close(marker);
        errno = EINTR;
        return -1;
    }
    return real_accept4(fd, addr, len, flags);
}
"#;
    preload_library(dir, "interrupt_accept", SOURCE)
}

/// A library for `LD_PRELOAD` whose `accept4` fails with ENFILE (the system out of files)
/// while the file named by `OCM_TEST_ENFILE` exists.
fn accept_out_of_files(dir: &std::path::Path) -> std::path::PathBuf {
    const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
    if (!real_accept4)
        real_accept4 = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    const char *out_of_files = getenv("OCM_TEST_ENFILE");
    if (out_of_files && access(out_of_files, F_OK) == 0) {
        errno = ENFILE;
        return -1;
    }
    return real_accept4(fd, addr, len, flags);
}
"#;
    preload_library(dir, "enfile_accept", SOURCE)
}

/// Starts `ocmd` with metrics, drop logs off, the rest of its config from `config`, and an
/// [`accept_out_of_files`] library; returns what [`spawn_preloaded`] does, the switch being
/// the file that runs the system out of files.
fn spawn_out_of_files_at_accept(config: &str) -> (Daemon, std::path::PathBuf, tempfile::TempDir) {
    spawn_preloaded(
        accept_out_of_files,
        ("OCM_TEST_ENFILE", "out-of-files"),
        Options {
            config: Some(format!("[rate]\ndrop_logs_per_sec = 0\n{config}")),
            metrics: true,
            ..Options::default()
        },
    )
}

/// Runs the system out of files for `d`'s accepts (creates `out_of_files`, the switch of
/// [`spawn_out_of_files_at_accept`]), connects a newcomer that asks for the rooms, and waits
/// until the log has `failures` lines of accepts that failed. Returns the newcomer.
fn newcomer_while_out_of_files(
    d: &Daemon,
    out_of_files: &std::path::Path,
    failures: usize,
) -> TcpStream {
    std::fs::write(out_of_files, b"").unwrap();
    let mut newcomer = connect(d);
    ask_for_rooms(&mut newcomer);
    wait_until(&format!("{failures} accept failures logged"), || {
        d.log().matches("accept failed").count() >= failures
    });
    newcomer
}

/// When closing an idle connection does not let the next `accept` succeed (the system, not
/// the daemon, is out of files, and another process took the descriptor), no more are closed
/// for it until an accept succeeds: one is lost, not one per 50 ms retry, and the newcomer
/// is served once files free up.
#[test]
fn out_of_files_system_wide_closes_one_idle_connection_not_one_per_retry() {
    let (d, out_of_files, _library) = spawn_out_of_files_at_accept("");
    let mut idle: Vec<TcpStream> = (0..5).map(|_| connect(&d)).collect();
    // Each answered, so each is in the daemon's table.
    for (i, s) in idle.iter_mut().enumerate() {
        list_rooms_on(s, i as u8);
    }
    // Three lines a second apart: some 40 retries failed meanwhile.
    let mut newcomer = newcomer_while_out_of_files(&d, &out_of_files, 3);
    let closed_idle = idle
        .iter_mut()
        .filter_map(|s| {
            s.set_nonblocking(true).unwrap();
            matches!(s.read(&mut [0u8; 1]), Ok(0)).then_some(())
        })
        .count();
    assert_eq!(
        closed_idle, 1,
        "idle connections closed for a newcomer never taken"
    );
    std::fs::remove_file(&out_of_files).unwrap();
    expect_success(&mut FrameReader::default(), &mut newcomer, "the newcomer");
    assert_eq!(closed(&d, "evicted"), 1.0);
}

/// A storm of ENFILE (the system out of files) that made closing futile does not keep the
/// daemon from closing one for the EMFILE that follows it (its own limit lowered meanwhile),
/// which closing one of its own does cure. The newcomer for whom the first was closed waits
/// in the queue all along (the kernel takes none off it while `accept` fails), so no accept
/// succeeded in between; before, nothing was closed again until one did, and the newcomer
/// waited for the idle connections' handshake timers (60 s here).
#[test]
fn after_futile_closing_at_enfile_an_emfile_closes_an_idle_connection_again() {
    let (d, out_of_files, _library) =
        spawn_out_of_files_at_accept("[limits]\nhandshake_timeout_secs = 60\n");
    let base = open_sockets(d.pid());
    let mut idle: Vec<TcpStream> = Vec::new();
    for i in 0..5 {
        idle.push(connect(&d));
        wait_until("the idle connection is accepted", || {
            open_sockets(d.pid()) > base + i
        });
    }
    // Answered last to first: the last accepted, on the highest descriptor, is idle longest
    // and closed first, so that the limit below leaves the others' descriptors usable.
    for (i, s) in idle.iter_mut().enumerate().rev() {
        list_rooms_on(s, i as u8);
    }
    // The first line says one was closed; the second, a second later, comes from a retry
    // after the accept right after the closing failed too: closing is futile.
    let mut newcomer = newcomer_while_out_of_files(&d, &out_of_files, 2);
    assert!(d.log().contains("closed a connection to make room"));
    // The daemon's own descriptors run out, then the system's files come back: every retry
    // from now on fails with EMFILE.
    limit_to_open_descriptors(&d);
    std::fs::remove_file(&out_of_files).unwrap();
    let started = Instant::now();
    expect_success(&mut FrameReader::default(), &mut newcomer, "the newcomer");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "answered after {waited:?}, with a handshake timeout of 60 s"
    );
    assert_eq!(
        closed_by_daemon(&mut idle),
        [false, false, false, true, true],
        "not one closed at ENFILE, then the one idle longest at EMFILE"
    );
}

/// An `accept` interrupted by a signal is simply called again: the connection is taken in
/// the same pass, and nothing counts or logs it as a failed accept (which would also put
/// the listener off for 50 ms).
#[test]
fn an_interrupted_accept_is_retried_at_once_and_not_counted_as_failed() {
    let (d, mark, _library) = spawn_preloaded(
        accept_interrupter,
        ("OCM_TEST_INTERRUPTED_ACCEPT", "accept-interrupted"),
        Options {
            metrics: true,
            ..Options::default()
        },
    );
    // The first connection meets the interrupted call, and is answered all the same.
    let mut s = connect(&d);
    list_rooms_on(&mut s, 0);
    assert!(mark.exists(), "accept4 was not interrupted");
    assert_eq!(d.metric("ocm_tcp_accept_errors_total"), 0.0);
    let log = d.log();
    assert!(!log.contains("accept failed"), "{log}");
    assert_serves_then_state_intact(d, &[]);
}

/// A failed `accept` (EMFILE) is retried every 50 ms while connections wait in the backlog,
/// not in a spin, and each failure is counted, but logged at most once a second (after the
/// first).
#[test]
fn failed_accepts_are_logged_at_most_once_a_second() {
    let d = daemon("[rate]\ndrop_logs_per_sec = 0\n");
    let started = Instant::now();
    // Held by metrics connections: idle handshake connections would be closed to make room,
    // and the accepts would succeed.
    let holders = hold_every_descriptor_with_metrics_connections(&d, 3);
    let waiting: Vec<TcpStream> = (0..2).map(|_| connect(&d)).collect();
    d.wait_for_log("accept failed");
    let (cpu_before, failing) = (cpu_time(d.pid()), Instant::now());
    // Three lines: the first at once, then one a second; a line per failed retry would
    // come every 50 ms.
    wait_until("three accept failures logged", || {
        d.log().matches("accept failed").count() >= 3
    });
    let lines = d.log().matches("accept failed").count();
    let most = started.elapsed().as_secs() as usize + 1;
    assert!(
        lines <= most,
        "{lines} lines about failed accepts in {:?}",
        started.elapsed()
    );
    // About 2 s of failing accepts, a retry every 50 ms: a retry due at once would keep the
    // poll timeout at zero and the loop on a core.
    let (cpu, failing) = (cpu_time(d.pid()) - cpu_before, failing.elapsed());
    assert!(
        cpu < failing / 4,
        "the daemon used {cpu:?} of CPU in {failing:?} of failing accepts"
    );
    drop(holders);
    drop(waiting);
    wait_until("the failures are counted", || {
        d.metric("ocm_tcp_accept_errors_total") > lines as f64
    });
}

/// A datagram with a dead token is answered only when it was at least as long as the
/// answer: a closed room's token shorter than the 15-byte `__ROOM_CLOSED__` (a token from an
/// original server's file can be one byte) sent in a 5-byte datagram gets nothing, while the
/// same token in a longer datagram is told. Never more bytes out than in.
#[test]
fn a_dead_token_in_a_datagram_shorter_than_the_notice_is_not_answered() {
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    let shorty = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let address = |s: &UdpSocket| {
        let a = s.local_addr().unwrap();
        format!("[\"{}\", {}]", a.ip(), a.port())
    };
    let state = format!(
        r#"{{
  "rooms": {{"r": {{"host_token": "host-token-of-some-length", "members": ["host-token-of-some-length", "m"], "created_at": 1731999999.0}}}},
  "tokens": {{
    "host-token-of-some-length": {{"username": "\"alice\"", "room_name": "r", "is_host": true, "address": {}}},
    "m": {{"username": "\"bob\"", "room_name": "r", "is_host": false, "address": {}}}
  }},
  "saved_at": "2024-11-19T15:46:39.123456"
}}"#,
        address(&host),
        address(&shorty)
    );
    std::fs::write(dir.path().join("room_manager.json"), state).unwrap();
    let d = Daemon::spawn(
        dir,
        Options {
            metrics: true,
            ..Options::default()
        },
    )
    .expect("ocmd starts");
    let mut leave = Vec::new();
    ucrp::datagram::encode(b"r", b"host-token-of-some-length", "__LEAVE__", &mut leave).unwrap();
    host.send_to(&leave, d.udp).unwrap();
    // bob hears the room close: its token is now a tombstone.
    let bob = Member {
        socket: shorty,
        server: d.udp,
        room: "r".into(),
        token: "m".into(),
    };
    bob.socket.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(bob.recv(), "CLOSED");
    let prober = Member::new(&d, "r", "m");
    let mut short = Vec::new();
    ucrp::datagram::encode(b"r", b"m", "x", &mut short).unwrap();
    assert_eq!(short.len(), 5);
    prober.send_raw(&short);
    // Then the same token with room for the answer: told (and, sent after the short one,
    // handled after it).
    prober.send("a message longer than the notice");
    assert_eq!(prober.recv(), "CLOSED");
    assert_eq!(
        dropped(&d, "unknown_token"),
        1.0,
        "the 5-byte datagram was answered with 15 bytes"
    );
    prober.socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        prober.socket.recv_from(&mut buf).is_err(),
        "one answer only"
    );
}

/// Out of its own descriptors because the limit was lowered below what it holds, the daemon
/// closes an idle connection whose descriptor `accept` can reuse (one below the limit), not
/// merely the one idle longest. It closed that one, whose descriptor was above the limit, so
/// the accept failed again; taking that for the system being out of files, it closed no
/// other, and the newcomer waited while a connection below the limit, answered a moment
/// earlier and kept busy, held the descriptor it needed (for 60 s here, its handshake timeout;
/// for good under a client with a request now and then).
#[test]
fn at_emfile_below_what_is_open_the_idle_connection_closed_frees_a_usable_descriptor() {
    let d = daemon("[rate]\ndrop_logs_per_sec = 0\n[limits]\nhandshake_timeout_secs = 60\n");
    let base = open_sockets(d.pid());
    let mut low = connect(&d);
    wait_until("the first connection is accepted", || {
        open_sockets(d.pid()) > base
    });
    let high = connect(&d);
    wait_until("the second connection is accepted", || {
        open_sockets(d.pid()) >= base + 2
    });
    // Answered: `high` is the one idle longest.
    list_rooms_on(&mut low, 0);
    // `high` holds the highest descriptor, one below the lowest free: the limit leaves it out.
    let free = lowest_free_fd(d.pid()).min(lowest_free_fd(d.pid()));
    set_open_files_limit(&d, free - 1);
    let started = Instant::now();
    let mut newcomer = connect(&d);
    list_rooms_on(&mut newcomer, 1);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "answered after {waited:?}, with a handshake timeout of 60 s"
    );
    assert_eq!(
        closed_by_daemon(&mut [low, high]),
        [true, false],
        "the connection closed was not the one below the limit"
    );
}

// Added with the mutation run of 2026-12-06 on the rest of connections.rs (docs/SECURITY.md,
// "The daemon: accepting connections (the rest of connections.rs)").

/// A peer that never reads, whose replies all fit in the kernel's send buffer (the daemon
/// holds none of them itself), is reset when its timer runs out: the kernel drops what it
/// still held for the peer at once, and the peer sees the reset, not the rest of its reply
/// and an end. Closed normally, the daemon's side would stay in FIN-WAIT-1 with those bytes
/// until the user timeout (twice the handshake timeout) ran out.
#[test]
fn a_silent_peer_whose_replies_wait_only_in_the_kernel_is_reset_at_its_timeout() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 2\n");
    // A room list of about 7 KB: more than the peer's receive buffer takes, far less than
    // the kernel's send buffer for the connection (128 KiB).
    create_rooms(&d, 30, |i| format!("{i:02}{}", "x".repeat(240)));
    let mut peer = connect_from(Ipv4Addr::new(127, 0, 0, 7), d.tcp, Some(2048));
    let local = peer.local_addr().unwrap();
    peer.write_all(&request_bytes(Operation::ListRooms, "", b""))
        .unwrap();
    wait_until("the kernel holds a reply the peer has not taken", || {
        daemon_side(d.pid(), d.tcp, local).is_some_and(|(_, queued)| queued > 0)
    });
    wait_until("the daemon gives up on the peer", || {
        closed(&d, "timeout") >= 1.0
    });
    // The scrape that saw the close was answered after it, in a later pass of the loop.
    assert_eq!(
        daemon_side(d.pid(), d.tcp, local),
        None,
        "the daemon's side outlived its close: not reset"
    );
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        match peer.read(&mut chunk) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Some(e.kind()),
        }
    };
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "the peer read {} bytes, then no reset",
        got.len()
    );
}

/// A request answered from memory (no wait for the disk, so the connection's interest never
/// changes) and the FIN behind it, waiting together for a stopped daemon, come with one
/// readiness edge: that edge is read to the end, so the connection is closed at the peer's
/// end, not left open until its handshake timeout.
#[test]
fn a_request_answered_at_once_and_its_fin_on_one_edge_close_the_connection_at_once() {
    let d = daemon("[limits]\nhandshake_timeout_secs = 600\n");
    let base = open_sockets(d.pid());
    let mut s = connect(&d);
    wait_until("the connection is accepted", || {
        open_sockets(d.pid()) > base
    });
    d.stop();
    ask_for_rooms(&mut s);
    s.shutdown(Shutdown::Write).unwrap();
    d.signal(libc::SIGCONT);
    read_room_list(&mut s, "the list");
    assert_eq!(read_until_closed(&mut s), b"", "closed after the reply");
    wait_until("the close is counted", || closed(&d, "peer_closed") >= 1.0);
    assert_eq!(closed(&d, "timeout"), 0.0);
}

/// A metrics request whose head comes in two parts, the first longer than a TCRP header, is
/// answered as HTTP: reading the first part does not hand it to the TCRP reader (which would
/// refuse it as a frame with an impossible size and close the connection).
#[test]
fn a_metrics_request_head_in_two_parts_is_answered_as_http() {
    let d = daemon("");
    let metrics = d.metrics.expect("metrics on");
    let mut s = TcpStream::connect(metrics).unwrap();
    let local = s.local_addr().unwrap();
    let first = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n";
    assert!(first.len() > tcrp::HEADER_LEN);
    s.write_all(first).unwrap();
    // Nothing left in the daemon's receive queue: it has read the first part.
    wait_until("the daemon reads the first part", || {
        proc_net_tcp(d.pid(), metrics, Some(local)).is_some_and(|fields| {
            fields
                .get(4)
                .and_then(|queues| queues.split_once(':'))
                .is_some_and(|(_, rx)| u64::from_str_radix(rx, 16) == Ok(0))
        })
    });
    s.write_all(b"\r\n").unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut s)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// Out of descriptors, with every one held by silent metrics connections (fewer than the
/// allowance of 16), a handshake newcomer closes none of them (it waits in the backlog),
/// while a scrape closes the oldest and is answered: scrapes are not cut off by a flood of
/// handshake connections, nor locked out by idle metrics connections.
#[test]
fn at_emfile_a_handshake_newcomer_closes_no_metrics_connection_but_a_scrape_does() {
    let d = daemon("[rate]\ndrop_logs_per_sec = 0\n[limits]\nhandshake_timeout_secs = 60\n");
    let mut holders = hold_every_descriptor_with_metrics_connections(&d, 3);
    let _waiting = connect(&d);
    d.wait_for_log("accept failed");
    assert_eq!(
        closed_by_daemon(&mut holders),
        [false, false, false],
        "a metrics connection was closed for a handshake newcomer"
    );
    let mut scrape = metrics_connection(&d);
    scrape.write_all(HEALTH_CHECK).unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut scrape)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(closed_by_daemon(&mut holders), [true, false, false]);
}

/// A failed `accept` is retried 50 ms later, not at once: the number of failures counted
/// stays within two (one a listener) per 50 ms of failing. Retried at once, the loop would
/// spin on `accept` (thousands of failures a second).
#[test]
fn a_failed_accept_is_retried_after_50_ms_not_at_once() {
    let d = daemon("[rate]\ndrop_logs_per_sec = 0\n");
    let started = Instant::now();
    let holders = hold_every_descriptor_with_metrics_connections(&d, 3);
    let mut waiting = connect(&d);
    ask_for_rooms(&mut waiting);
    // Two lines a second apart: about 20 retries failed in between.
    wait_until("two accept failures logged", || {
        d.log().matches("accept failed").count() >= 2
    });
    drop(holders);
    let mut frames = FrameReader::default();
    let (state, _) = frames.next(&mut waiting).expect("a reply, not EOF");
    assert_eq!(state, State::Compliance);
    let failures = d.metric("ocm_tcp_accept_errors_total");
    let retries = started.elapsed().as_millis() / 50;
    assert!(
        failures <= (2 * retries + 10) as f64,
        "{failures} failed accepts in {:?}",
        started.elapsed()
    );
}
