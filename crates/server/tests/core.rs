//! The core path against the real daemon: handshakes, relay, leave, close, restart, and the
//! real `ocm` client.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;
use tcrp::payload::{Compliance, ErrorCode};
use tcrp::Operation;

/// The `/metrics` sample counting `ocm`'s reach-check looks (answered Presence requests).
const PRESENCE_LOOKS: &str = "ocm_handshakes_total{operation=\"presence\",result=\"ok\"}";

/// A daemon with default settings and metrics on.
fn daemon_with_metrics() -> Daemon {
    Daemon::start_with(Options {
        metrics: true,
        ..Options::default()
    })
}

/// Starts `ocm create ROOM --name alice` and waits until it says it created the room.
fn alice_hosting(d: &Daemon, room: &str) -> Ocm {
    let alice = Ocm::start(d, &["create", room, "--name", "alice"]);
    alice.wait_stderr(&format!("* created {room} as alice"));
    alice
}

/// Everything `ocm` has written to standard error so far.
fn stderr_of(ocm: &Ocm) -> String {
    ocm.stderr.lock().unwrap().clone()
}

/// Waits for `ocm` to exit; its exit status and everything it wrote to standard error.
fn exit_and_stderr(ocm: &mut Ocm) -> (std::process::ExitStatus, String) {
    let status = ocm.wait();
    (status, stderr_of(ocm))
}

/// Waits for `ocm` to exit and checks that it exited successfully without a word about its
/// standard output.
#[track_caller]
fn assert_exits_quietly(ocm: &mut Ocm) {
    let (status, err) = exit_and_stderr(ocm);
    assert!(
        status.success() && !err.contains("standard output"),
        "{status}: {err}"
    );
}

#[test]
fn original_client_bytes_get_original_reply_bytes() {
    let d = Daemon::start();
    let mut s = connect(&d);
    // Exactly what the original Python client writes for create "lobby" as alice.
    // Header: name size 5, operation 1, state 0, then the 29-byte size written as a zero
    // byte and 28 big-endian bytes (the original's layout); then "lobby" and "\"alice\"".
    let hex_request = format!(
        "050100{}{}{}{}",
        "00",
        "00".repeat(27),
        "07",
        "6c6f62627922616c69636522"
    );
    let request = hex::decode(hex_request).unwrap();
    assert_eq!(request.len(), 32 + 5 + 7);
    std::io::Write::write_all(&mut s, &request).unwrap();
    let mut reader = FrameReader::default();
    let (state, body) = reader.next(&mut s).unwrap();
    assert_eq!(state, tcrp::State::Compliance);
    assert_eq!(body, b"{\"success\": true}");
    let (state, body) = reader.next(&mut s).unwrap();
    assert_eq!(state, tcrp::State::Complete);
    let text = String::from_utf8(body).unwrap();
    let token = text
        .strip_prefix("{\"token\": \"")
        .and_then(|t| t.strip_suffix("\"}"))
        .expect("original COMPLETE layout");
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
}

/// The original client's name read from bytes that were not UTF-8 in its locale, which
/// `json.dumps` writes as lone-surrogate escapes, is the name with U+FFFD for each: so the
/// others see it in chat (it was once the JSON text, quotes and escapes included), and
/// another byte there makes the same name, taken.
#[test]
fn an_original_name_with_lone_surrogates_shows_a_replacement_character_for_each() {
    let d = Daemon::start();
    let host_token = create(&d, "lobby", "alice");
    let eve_token = join(&d, "lobby", r"\udce9ve");
    let host = Member::joined(&d, "lobby", &host_token);
    let eve = Member::new(&d, "lobby", &eve_token);
    eve.registered_with(&host, "\u{fffd}ve");
    let again = request(&d, Operation::JoinRoom, "lobby", br#""\udcffve""#);
    assert_eq!(refused(&again), Some(ErrorCode::NameTaken));
}

#[test]
fn chat_is_relayed_both_ways_and_never_echoed() {
    let d = Daemon::start();
    let (alice, bob) = room_of_two(&d, "lobby");
    alice.send("hi bob");
    assert_eq!(bob.recv(), "alice: hi bob");
    bob.send("hi alice");
    assert_eq!(alice.recv(), "bob: hi alice");
    // Not echoed: the next thing alice gets is bob's next message, not her own.
    alice.send("echo?");
    assert_eq!(bob.recv(), "alice: echo?");
    bob.send("after");
    assert_eq!(alice.recv(), "bob: after");
}

#[test]
fn refusals_name_their_reason() {
    let d = Daemon::start();
    create(&d, "lobby", "alice");
    join(&d, "lobby", "bob");
    let cases: Vec<(Operation, &str, &[u8], ErrorCode)> = vec![
        (
            Operation::CreateRoom,
            "lobby",
            b"\"zed\"",
            ErrorCode::RoomExists,
        ),
        (
            Operation::JoinRoom,
            "nowhere",
            b"\"zed\"",
            ErrorCode::RoomNotFound,
        ),
        (
            Operation::JoinRoom,
            "lobby",
            b"\"bob\"",
            ErrorCode::NameTaken,
        ),
        (
            Operation::JoinRoom,
            "lobby",
            b"\"alice\"",
            ErrorCode::NameTaken,
        ),
        (
            Operation::CreateRoom,
            "bad\nname",
            b"\"zed\"",
            ErrorCode::InvalidRoomName,
        ),
        (
            Operation::CreateRoom,
            "",
            b"\"zed\"",
            ErrorCode::InvalidRoomName,
        ),
        (
            Operation::JoinRoom,
            "lobby",
            b"\"\"",
            ErrorCode::InvalidUsername,
        ),
        (
            Operation::JoinRoom,
            "lobby",
            "\"x\u{7}\"".as_bytes(),
            ErrorCode::InvalidUsername,
        ),
        (
            Operation::Other(0x42),
            "lobby",
            b"\"zed\"",
            ErrorCode::UnsupportedOperation,
        ),
        (
            Operation::JoinRoom,
            "lobby",
            br#"{"username": 1}"#,
            ErrorCode::MalformedRequest,
        ),
    ];
    for (op, room, payload, code) in cases {
        let reply = request(&d, op, room, payload);
        assert_eq!(
            refused(&reply),
            Some(code),
            "{op:?} {room:?} {payload:?}: {reply:?}"
        );
        assert_eq!(reply.token, None);
        if let Compliance::Failure { message, .. } = &reply.compliance {
            assert!(
                message.as_deref().is_some_and(|m| !m.is_empty()),
                "refusal has a message"
            );
        }
    }
    // The JSON-object and plain-text forms of the username work too.
    let r = request(
        &d,
        Operation::JoinRoom,
        "lobby",
        br#"{"username": "carol", "future": true}"#,
    );
    assert!(r.token.is_some());
    let r = request(&d, Operation::JoinRoom, "lobby", b"dave");
    assert!(r.token.is_some());
    let r = request(&d, Operation::JoinRoom, "lobby", b"\"dave\"");
    assert_eq!(
        refused(&r),
        Some(ErrorCode::NameTaken),
        "plain-text dave is the same dave"
    );
}

#[test]
fn several_requests_on_one_connection_are_answered_in_order() {
    let d = Daemon::start();
    let mut s = connect(&d);
    // Pipelined: all three requests in one write.
    let mut bytes = request_bytes(Operation::CreateRoom, "pipe", b"\"h\"");
    bytes.extend(request_bytes(Operation::JoinRoom, "pipe", b"\"h\""));
    bytes.extend(request_bytes(Operation::JoinRoom, "pipe", b"\"m\""));
    std::io::Write::write_all(&mut s, &bytes).unwrap();
    let mut reader = FrameReader::default();
    let first = reader.reply(&mut s);
    let second = reader.reply(&mut s);
    let third = reader.reply(&mut s);
    assert!(first.token.is_some());
    assert_eq!(refused(&second), Some(ErrorCode::NameTaken));
    assert!(third.token.is_some());
    assert_ne!(first.token, third.token);
    // And one after another on the same connection.
    let fourth = exchange(
        &mut s,
        &request_bytes(Operation::JoinRoom, "pipe", b"\"n\""),
    );
    assert!(fourth.token.is_some());
}

#[test]
fn bad_tokens_rooms_and_addresses_are_dropped_and_counted() {
    let d = daemon_with_metrics();
    let (alice, bob) = host_and_member(&d, "a", "host", "bob");
    let other_host = create(&d, "b", "other");

    // Wrong token, token of another room, right token from a foreign address, a member that
    // never registered: none of these may reach alice.
    let intruder = Member::new(&d, "a", "0123456789abcdef0123456789abcdef");
    intruder.send("spoof 1");
    let cross = Member::new(&d, "a", &other_host);
    cross.send("spoof 2");
    let thief = Member::new(&d, "a", &bob.token);
    thief.send("spoof 3");
    let carol_token = join(&d, "a", "carol");
    let carol = Member::new(&d, "a", &carol_token);
    carol.send("spoof 4");
    // Datagrams from one socket arrive in order; the probe after them must be next.
    bob.send("real");
    assert_eq!(alice.recv(), "bob: real");

    wait_until("drop counters", || {
        d.metric("ocm_datagrams_dropped_total{reason=\"unknown_token\"}") >= 1.0
            && d.metric("ocm_datagrams_dropped_total{reason=\"wrong_room\"}") >= 1.0
            && d.metric("ocm_datagrams_dropped_total{reason=\"address_mismatch\"}") >= 1.0
            && d.metric("ocm_datagrams_dropped_total{reason=\"unregistered\"}") >= 1.0
    });
    // Nobody was told anything back: the intruders' sockets stay silent. Prove it by letting
    // the daemon answer a later valid request first (TCP round trip), then checking them.
    join(&d, "a", "dave");
    for m in [&intruder, &cross, &thief, &carol] {
        m.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            m.socket.recv_from(&mut buf).is_err(),
            "no reply to a dropped datagram"
        );
    }
}

#[test]
fn member_leave_and_host_leave_closes_the_room_for_everyone() {
    let d = Daemon::start();
    let host_token = create(&d, "r", "host");
    let host = Member::joined(&d, "r", &host_token);
    let names = ["m1", "m2", "m3"];
    let members: Vec<Member> = names
        .iter()
        .map(|n| {
            let m = Member::new(&d, "r", &join(&d, "r", n));
            m.registered_with(&host, n);
            m
        })
        .collect();
    // Each probe also reached the members registered before it: catch everyone up.
    host.send("sync");
    for m in &members {
        m.recv_until("host: sync");
    }
    // m3 leaves: the others no longer relay to it, and its token is dead.
    members[2].send("__LEAVE__");
    members[0].send("after m3 left");
    assert_eq!(host.recv(), "m1: after m3 left");
    assert_eq!(members[1].recv(), "m1: after m3 left");
    // Its old token relays nothing: the next thing the others hear is m1's later message.
    members[2].send("ghost");
    members[0].send("after the ghost");
    assert_eq!(host.recv(), "m1: after the ghost");
    assert_eq!(members[1].recv(), "m1: after the ghost");
    let r = request(&d, Operation::JoinRoom, "r", b"\"m3\"");
    assert!(
        r.token.is_some(),
        "the name is free again after leaving: {r:?}"
    );

    host.send("__LEAVE__");
    assert_eq!(members[0].recv(), "CLOSED");
    assert_eq!(members[1].recv_raw(), b"__ROOM_CLOSED__");
    // The room is gone: joining fails, creating works.
    let r = request(&d, Operation::JoinRoom, "r", b"\"late\"");
    assert_eq!(refused(&r), Some(ErrorCode::RoomNotFound));
    create(&d, "r", "newhost");
}

/// What a [`refusing_sendmmsg`] library refuses while its switch file exists.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Every datagram, with `EAGAIN`: every send finds the send buffer full.
    FullSendBuffer,
    /// Only `__ROOM_CLOSED__`, with `ENOBUFS` (no buffer memory), as the kernel would; every
    /// other datagram is sent.
    NoMemoryForRoomClosed,
}

impl Refusal {
    /// The environment variable that names the switch file, and the file's name.
    fn switch(self) -> (&'static str, &'static str) {
        match self {
            Refusal::FullSendBuffer => ("OCM_TEST_FULL_SEND_BUFFER", "full-send-buffer"),
            Refusal::NoMemoryForRoomClosed => (
                "OCM_TEST_NO_MEMORY_FOR_ROOM_CLOSED",
                "no-memory-for-room-closed",
            ),
        }
    }
}

/// Builds, in `dir`, a library for `LD_PRELOAD` whose `sendmmsg` (the daemon's only UDP send)
/// refuses what `refusal` says while its switch file exists: a call whose first datagram it
/// refuses fails, adding a byte to the switch's name plus `.refused`; one that reaches such a
/// datagram later sends those before it and returns their count, as the kernel does.
fn refusing_sendmmsg(dir: &Path, refusal: Refusal) -> PathBuf {
    const TEMPLATE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int refused(const struct msghdr *h) {
    return !@ONLY_ROOM_CLOSED@
        || (h->msg_iovlen == 1 && h->msg_iov[0].iov_len == 15
            && memcmp(h->msg_iov[0].iov_base, "__ROOM_CLOSED__", 15) == 0);
}

int sendmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags) {
    static int (*real)(int, struct mmsghdr *, unsigned int, int);
    if (!real) real = (int (*)(int, struct mmsghdr *, unsigned int, int))dlsym(RTLD_NEXT, "sendmmsg");
    const char *flag = getenv("@VARIABLE@");
    if (flag && access(flag, F_OK) == 0) {
        for (unsigned int i = 0; i < n; i++) {
            if (!refused(&msgs[i].msg_hdr)) continue;
            if (i > 0) return real(fd, msgs, i, flags);
            char marks[4096];
            snprintf(marks, sizeof marks, "%s.refused", flag);
            int marker = open(marks, O_WRONLY | O_CREAT | O_APPEND, 0600);
            if (marker >= 0) {
                ssize_t wrote = write(marker, "x", 1);
                (void)wrote;
                close(marker);
            }
            errno = @ERRNO@;
            return -1;
        }
    }
    return real(fd, msgs, n, flags);
}
"#;
    let (only_room_closed, errno, name) = match refusal {
        Refusal::FullSendBuffer => ("0", "EAGAIN", "full_send_buffer"),
        Refusal::NoMemoryForRoomClosed => ("1", "ENOBUFS", "no_memory_for_room_closed"),
    };
    let source = TEMPLATE
        .replace("@ONLY_ROOM_CLOSED@", only_room_closed)
        .replace("@ERRNO@", errno)
        .replace("@VARIABLE@", refusal.switch().0);
    preload_library(dir, name, &source)
}

/// How many sends a [`refusing_sendmmsg`] library switched on by the file `switch` has
/// refused so far (one byte each in the switch's name plus `.refused`).
fn refusals(switch: &Path) -> u64 {
    std::fs::metadata(switch.with_extension("refused")).map_or(0, |m| m.len())
}

/// Starts `ocmd`, with metrics, under a [`refusing_sendmmsg`] library for `refusal`; returns
/// what [`spawn_preloaded`] does.
fn spawn_refusing(refusal: Refusal) -> (Daemon, PathBuf, tempfile::TempDir) {
    spawn_preloaded(
        |dir| refusing_sendmmsg(dir, refusal),
        refusal.switch(),
        Options {
            metrics: true,
            ..Options::default()
        },
    )
}

/// `__ROOM_CLOSED__` is a member's last word from its room: one that only listens would never
/// hear of the close otherwise. A full send buffer when the host leaves holds it, and it is
/// sent once the buffer has room, though the socket raises no event for that here (a refused
/// send leaves it as writable as before); chat the buffer had no room for is still dropped
/// and counted, never held.
#[test]
fn a_full_send_buffer_when_the_host_leaves_delays_room_closed_but_loses_it_for_nobody() {
    let (d, full, _library) = spawn_refusing(Refusal::FullSendBuffer);
    let (host, m1) = host_and_member(&d, "r", "host", "m1");
    let m2 = Member::new(&d, "r", &join(&d, "r", "m2"));
    m2.registered_with(&host, "m2");
    m1.recv_until("m2: probe from m2");

    std::fs::write(&full, b"").unwrap();
    // Chat finds the buffer full: dropped for both its recipients, and counted.
    m1.send("lost");
    let would_block = r#"ocm_send_errors_total{reason="would_block"}"#;
    wait_until("the chat to be dropped", || d.metric(would_block) == 2.0);
    let before_close = refusals(&full);
    host.send("__LEAVE__");
    d.wait_for_log(r#"room "r" closed: host left; 2 members told"#);
    wait_until("the close to find the buffer full", || {
        refusals(&full) > before_close
    });
    std::fs::remove_file(&full).unwrap();

    // Nothing more is sent to them: the close reaches them when the daemon tries again.
    assert_eq!(m1.recv_raw(), b"__ROOM_CLOSED__");
    assert_eq!(
        m2.recv_raw(),
        b"__ROOM_CLOSED__",
        "the chat dropped for a full buffer was not held"
    );
    assert_eq!(d.metric("ocm_last_words_held_total"), 2.0);
    assert_eq!(d.metric(would_block), 2.0, "held, the closes were not lost");
    assert_eq!(
        d.metric(r#"ocm_send_errors_total{reason="last_words_full"}"#),
        0.0
    );
}

/// The held-close tests' rooms: `host` hosting "r" with `m1` registered, and `other`
/// hosting "s".
fn host_and_m1_in_r_other_in_s(d: &Daemon) -> (Member, Member, Member) {
    let (host, m1) = host_and_member(d, "r", "host", "m1");
    let other_host = Member::joined(d, "s", &create(d, "s", "other"));
    (host, m1, other_host)
}

/// `m1`'s socket joins "s" as well, and registers there.
fn m1_joins_s_from_its_socket(d: &Daemon, m1: &Member, other_host: &Member) {
    let m1_in_s = Member {
        socket: m1.socket.try_clone().unwrap(),
        server: d.udp,
        room: "s".into(),
        token: join(d, "s", "m1"),
    };
    m1_in_s.registered_with(other_host, "m1");
}

/// Once the kernel takes it, `m1` hears the held close before anything else, the one chat
/// held back behind it counted as dropped (`would_block`), and chat in "s" after it.
fn assert_close_first_then_chat(d: &Daemon, m1: &Member, other_host: &Member, otherwise: &str) {
    assert_eq!(m1.recv(), "CLOSED", "the held close {otherwise}");
    assert_eq!(
        d.metric(r#"ocm_send_errors_total{reason="would_block"}"#),
        1.0,
        "the chat held back behind the close is dropped and counted"
    );
    other_host.send("after");
    assert_eq!(m1.recv(), "other: after");
}

/// A held `__ROOM_CLOSED__` is not overtaken: while the kernel has no room for it, what the
/// daemon has newer for the same address (here chat from a room the member joined since,
/// from the same socket) is dropped and counted, not sent ahead of it, where the member
/// would take the older close for its new room's. The close comes first once it has room,
/// and chat to the address flows again after it.
#[test]
fn a_held_room_closed_is_not_overtaken_by_newer_datagrams_to_its_address() {
    let (d, switch, _library) = spawn_refusing(Refusal::NoMemoryForRoomClosed);
    let (host, m1, other_host) = host_and_m1_in_r_other_in_s(&d);

    std::fs::write(&switch, b"").unwrap();
    host.send("__LEAVE__");
    d.wait_for_log(r#"room "r" closed: host left; 1 member told"#);
    wait_until("the close to be held", || {
        d.metric("ocm_last_words_held_total") == 1.0
    });
    // The same socket joins another room, and hears its chat.
    m1_joins_s_from_its_socket(&d, &m1, &other_host);
    let relayed = d.metric("ocm_messages_relayed_total");
    other_host.send("newer");
    wait_until("the newer chat to be relayed", || {
        d.metric("ocm_messages_relayed_total") > relayed
    });
    std::fs::remove_file(&switch).unwrap();
    assert_close_first_then_chat(&d, &m1, &other_host, "came after newer chat to its address");
}

/// A `__ROOM_CLOSED__` the kernel has no memory for is not overtaken within its own send
/// either. The host of "r" leaving and chat in "s", where the member's socket has joined too,
/// are read in one batch (they wait while the daemon is stopped), so their datagrams go to
/// the kernel in one `sendmmsg`, which refuses the close and would take the chat after it.
/// The chat is held back (dropped and counted as `would_block`), and the member hears the
/// close first once there is memory for it.
#[test]
fn a_room_closed_refused_for_memory_is_not_overtaken_within_its_send() {
    let (d, switch, _library) = spawn_refusing(Refusal::NoMemoryForRoomClosed);
    let (host, m1, other_host) = host_and_m1_in_r_other_in_s(&d);
    m1_joins_s_from_its_socket(&d, &m1, &other_host);

    std::fs::write(&switch, b"").unwrap();
    d.stop();
    host.send("__LEAVE__");
    other_host.send("newer");
    d.signal(libc::SIGCONT);
    d.wait_for_log(r#"room "r" closed: host left; 1 member told"#);
    // The close and the chat were handled in the same pass.
    wait_until("the close to be held", || {
        d.metric("ocm_last_words_held_total") == 1.0
    });
    std::fs::remove_file(&switch).unwrap();
    assert_close_first_then_chat(&d, &m1, &other_host, "came after newer chat sent with it");
}

/// One socket in two rooms hears room "r" close between two lines of room "s", all three
/// read in one pass (they wait while the daemon is stopped), in the order they were sent:
/// the daemon packs a member's chat of a pass (segmented sends, on by default, or a batch),
/// and must not carry the newer line in a datagram planned before the close, where a client
/// would take the close, read last, for its room "s".
#[test]
fn a_room_closed_is_not_overtaken_by_chat_packed_around_it() {
    for m1_in_s_joins_with in [&b"\"m1\""[..], br#"{"username": "m1", "caps": ["batch"]}"#] {
        let d = Daemon::start();
        let (host, m1, other_host) = host_and_m1_in_r_other_in_s(&d);
        let m1_in_s = Member {
            socket: m1.socket.try_clone().unwrap(),
            server: d.udp,
            room: "s".into(),
            token: request(&d, Operation::JoinRoom, "s", m1_in_s_joins_with)
                .token
                .expect("joined s"),
        };
        m1_in_s.registered_with(&other_host, "m1");

        d.stop();
        // Lines of one length, which one segmented send may carry together.
        other_host.send("before");
        host.send("__LEAVE__");
        other_host.send("behind");
        d.signal(libc::SIGCONT);
        let heard: Vec<String> = (0..3).map(|_| m1.recv()).collect::<Vec<_>>();
        let heard = heard.join(" / ");
        assert_eq!(
            heard,
            "other: before / CLOSED / other: behind",
            "m1 joined s with {}",
            String::from_utf8_lossy(m1_in_s_joins_with)
        );
    }
}

/// The ports picked for a daemon stay claimed while it is down for a restart, so that no
/// other test's daemon picks them meanwhile, and are let go with it.
#[test]
fn picked_ports_stay_claimed_across_a_restart_and_are_let_go_after() {
    if let Some(why) = PortClaim::unavailable() {
        skipped(&format!("no port can be claimed here: {why}"));
        return;
    }
    let mut d = Daemon::start();
    let (tcp, udp) = (d.tcp.port(), d.udp.port());
    let claimed = || PortClaim::held_elsewhere(tcp) && PortClaim::held_elsewhere(udp);
    d.stop_cleanly();
    assert!(
        claimed(),
        "ports {tcp} and {udp} unclaimed while the daemon is down"
    );
    d.restart();
    assert_eq!((d.tcp.port(), d.udp.port()), (tcp, udp));
    assert!(
        claimed(),
        "ports {tcp} and {udp} unclaimed after the restart"
    );
    drop(d);
    assert!(
        !PortClaim::held_elsewhere(tcp) && !PortClaim::held_elsewhere(udp),
        "ports {tcp} and {udp} still claimed after the daemon's end"
    );
}

#[test]
fn restart_keeps_rooms_tokens_and_addresses() {
    let mut d = Daemon::start();
    let (host, bob) = host_and_member(&d, "keep", "host", "bob");

    let took = d.stop_cleanly();
    assert_stopped_promptly(&d, took);
    let saved = std::fs::read_to_string(&d.state).expect("state file written on shutdown");
    assert!(
        saved.contains("\"keep\"") && saved.contains(&host.token) && saved.contains(&bob.token)
    );

    d.restart();
    // Registered addresses survived: bob talks without registering again.
    bob.send("after restart");
    assert_eq!(host.recv(), "bob: after restart");
    // Names are still taken, the room still exists.
    assert_eq!(
        refused(&request(&d, Operation::JoinRoom, "keep", b"\"bob\"")),
        Some(ErrorCode::NameTaken)
    );
    assert_eq!(
        refused(&request(&d, Operation::CreateRoom, "keep", b"\"x\"")),
        Some(ErrorCode::RoomExists)
    );
}

#[test]
fn a_register_queued_before_a_join_binds_its_member_before_the_join_notice() {
    // A datagram and a join request both wait for a daemon that is not running (stopped
    // here; descheduled on a loaded machine): the REGISTER was sent first, so the host is
    // bound when the join is answered and hears its notice. A daemon that answers the join
    // before reading the datagram sends the notice to nobody, and alice's recv times out.
    let d = Daemon::start();
    let created = request(
        &d,
        Operation::CreateRoom,
        "order",
        br#"{"username": "alice", "caps": ["notices"]}"#,
    );
    let alice = Member::new(&d, "order", &created.token.expect("room created"));
    d.stop();
    alice.send("__REGISTER__");
    let mut bob = connect(&d);
    bob.write_all(&request_bytes(Operation::JoinRoom, "order", b"\"bob\""))
        .expect("send the join");
    d.signal(libc::SIGCONT);
    assert!(FrameReader::default().reply(&mut bob).token.is_some());
    assert_eq!(alice.recv(), "* bob Joined");
}

/// A wrong `--udp-port` (here a socket that never reads) looks like an open chat: `ocm`
/// asks the server over TCP whether it has our address, registers again, asks once more and
/// then says so, and the chat goes on.
#[test]
fn ocm_warns_when_the_server_never_hears_its_datagrams() {
    let d = daemon_with_metrics();
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    let mut alice = Ocm::start_at(
        d.tcp.port(),
        sink.local_addr().unwrap().port(),
        &["create", "lobby", "--name", "alice"],
    );
    alice.wait_stderr("* created lobby as alice");
    alice.wait_stderr("the server has not heard this client's UDP datagrams at 127.0.0.1:");
    assert!(alice.stderr.lock().unwrap().contains("--udp-port"));
    // It looked twice, both times with alice listed and unregistered, and registered again
    // in between: the sink got two __REGISTER__s.
    let looks = d.metric(PRESENCE_LOOKS);
    assert_eq!(looks, 2.0);
    sink.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..2 {
        let (len, _) = uninterrupted(|| sink.recv_from(&mut buf)).expect("a __REGISTER__ from ocm");
        let datagram = ucrp::datagram::parse(&buf[..len]).expect("a client datagram");
        assert_eq!(datagram.message, ucrp::datagram::Message::Register);
    }
    alice.quit_cleanly();
}

/// When the server hears it, `ocm` looks once and says nothing.
/// `ocm create lobby --name alice` whose chat debug lines (the reach check's looks) go to its
/// stderr, its datagrams sent to `udp`.
fn host_logging_its_reach_check(tcp: u16, udp: u16) -> Ocm {
    Ocm::start_with_env(
        tcp,
        udp,
        &["create", "lobby", "--name", "alice"],
        &[("RUST_LOG", "ocm::chat=debug")],
    )
}

#[test]
fn ocm_says_nothing_when_the_server_hears_it() {
    let d = daemon_with_metrics();
    let mut alice = host_logging_its_reach_check(d.tcp.port(), d.udp.port());
    alice.wait_stderr("the server hears this client");
    let looks = d.metric(PRESENCE_LOOKS);
    assert_eq!(looks, 1.0);
    alice.quit_cleanly();
    let stderr = stderr_of(&alice);
    assert!(
        !stderr.contains("has not heard"),
        "a warning from a client the server hears:\n{stderr}"
    );
}

/// One lost `__REGISTER__` is no reason to warn: `ocm` registers again and looks once more.
/// A relay between `ocm` and the daemon drops the first datagram and forwards the rest.
#[test]
fn ocm_registers_again_when_its_first_register_is_lost_and_says_nothing() {
    let d = daemon_with_metrics();
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    let relay_port = relay.local_addr().unwrap().port();
    let daemon_udp = d.udp;
    // Detached: it ends with the test process, or after PATIENCE without a datagram.
    std::thread::spawn(move || {
        relay.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0u8; 65536];
        let mut dropped = false;
        while let Ok((len, _)) = uninterrupted(|| relay.recv_from(&mut buf)) {
            if !dropped {
                dropped = true;
                continue;
            }
            let _ = relay.send_to(&buf[..len], daemon_udp);
        }
    });
    let mut alice = host_logging_its_reach_check(d.tcp.port(), relay_port);
    alice.wait_stderr("the server hears us on the second look: Yes");
    let looks = d.metric(PRESENCE_LOOKS);
    assert_eq!(looks, 2.0);
    alice.quit_cleanly();
}

#[test]
fn ocm_clients_chat_and_the_host_closes_the_room() {
    let d = Daemon::start();
    let mut alice = alice_hosting(&d, "lobby");
    // A keepalive far beyond the test: a keepalive's answer from the dead token (which also
    // says the room closed) cannot stand in for the host's close notice below.
    let mut bob = Ocm::start(
        &d,
        &["join", "lobby", "--name", "bob", "--keepalive", "3600"],
    );
    bob.wait_stderr("* joined lobby as bob");
    // ocm announces notices, so alice hears bob join.
    assert_eq!(alice.line(), "* bob joined");
    // ocm sends its __REGISTER__ before it says it joined, so the daemon reads it before
    // anything alice types from here; once bob has shown the history and gone live, her first
    // line reaches him live.
    bob.wait_live();
    alice.type_line("hello");
    assert_eq!(bob.line(), "alice: hello");
    bob.type_line("hi alice");
    alice.lines_until("bob: hi alice");
    alice.quit_cleanly();
    bob.lines_until("* room lobby was closed");
    assert_eq!(
        bob.wait().code(),
        Some(OCM_ROOM_ENDED),
        "bob: the room ended"
    );
}

/// A line of whitespace alone is not sent, whichever kind: the next line bob types with text
/// in it is the next alice sees. (Such a line used to show the others `bob: ` and nothing.)
#[test]
fn ocm_sends_no_line_of_whitespace_alone() {
    let d = Daemon::start();
    let alice = alice_hosting(&d, "lobby");
    let mut bob = Ocm::start(&d, &["join", "lobby", "--name", "bob"]);
    assert_eq!(alice.line(), "* bob joined");
    for blank in ["", "   ", "\t", " \t\u{a0}"] {
        bob.type_line(blank);
    }
    bob.type_line("after the blanks");
    assert_eq!(alice.line(), "bob: after the blanks");
    bob.quit_cleanly();
    assert_eq!(alice.line(), "* bob left");
}

/// A reader of `ocm`'s output that went away (`ocm rooms | head -1`, a chat piped into a
/// program that quit) ends it quietly, with exit status 0 and no error; a member in a chat
/// leaves the room first, as at the end of input.
#[test]
fn ocm_ends_quietly_when_its_output_is_closed_and_leaves_the_room() {
    let d = Daemon::start();
    let mut alice = alice_hosting(&d, "lobby");
    let mut lister = Ocm::start_output_closed(&d, &["rooms"]);
    let (status, err) = exit_and_stderr(&mut lister);
    assert!(status.success() && err.is_empty(), "{status}: {err}");

    let mut bob = Ocm::start_output_closed(
        &d,
        &["join", "lobby", "--name", "bob", "--keepalive", "3600"],
    );
    bob.wait_stderr("* joined lobby as bob");
    assert_eq!(alice.line(), "* bob joined");
    // Bob's ocm cannot print it (live or in the history): it leaves.
    alice.type_line("hello");
    assert_eq!(alice.line(), "* bob left");
    assert_exits_quietly(&mut bob);
}

/// `ocm join lobby | head -1` in a quiet room: once the reader took its line and went away,
/// `ocm` leaves the room and exits 0 then, not at the next line the room says, which may never
/// come (its keepalives kept it in the room, and the shell's pipeline waited for it).
#[test]
fn ocm_whose_reader_took_its_line_and_went_leaves_a_quiet_room() {
    use std::io::BufRead;
    let d = Daemon::start();
    let mut alice = alice_hosting(&d, "quiet");
    let (reader, writer) = std::io::pipe().expect("a pipe");
    let mut bob = Ocm::start_with_stdout(&d, &["join", "quiet", "--name", "bob"], writer.into());
    // `head -1`: one line, then the reader goes.
    let (took, first) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(reader).read_line(&mut line);
        let _ = took.send(line);
    });
    assert_eq!(alice.line(), "* bob joined");
    bob.wait_live();
    alice.type_line("the only line");
    let line = first.recv_timeout(PATIENCE).expect("bob's first line");
    assert_eq!(line, "alice: the only line\n");
    // Nothing more is said in the room.
    alice.lines_until("* bob left");
    assert_exits_quietly(&mut bob);
}

/// With `--original` the closing line is printed as the notice comes (no closure check). A
/// reader of the output that went away must not hide the closure: `ocm` still exits with the
/// room-ended status, not as a user who left. (Standard output is a socket whose far end
/// reads no more: every write fails with `EPIPE`, but nothing says so before one is tried,
/// as when the reader of a pipe goes just as the room closes. A pipe without a reader the
/// output watcher would find at once, and leave.)
#[test]
fn an_original_member_whose_output_is_gone_still_exits_as_the_room_ended() {
    let d = Daemon::start();
    let mut alice = alice_hosting(&d, "shut");
    let (output, far) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
    far.shutdown(std::net::Shutdown::Read)
        .expect("shut the far end for reading");
    let mut bob = Ocm::start_with_stdout(
        &d,
        &[
            "join",
            "shut",
            "--name",
            "bob",
            "--original",
            "--keepalive",
            "3600",
        ],
        std::os::fd::OwnedFd::from(output).into(),
    );
    bob.wait_stderr("* joined shut as bob");
    assert_eq!(alice.line(), "* bob joined");
    alice.quit_cleanly();
    let (status, err) = exit_and_stderr(&mut bob);
    assert_eq!(status.code(), Some(OCM_ROOM_ENDED), "bob: {err}");
    assert!(!err.contains("standard output"), "{err}");
    drop(far);
}

/// How long an `ocm` whose standard error is stuck may take to exit once its chat is over:
/// it waits up to 0.5 s for its last remarks to be written, then goes.
const EXIT_WITH_STDERR_STUCK: std::time::Duration = std::time::Duration::from_secs(5);

/// An `ocm` whose standard error nobody reads (a full pipe: `2>` into a program that
/// stopped reading) still chats, and leaves at the end of its input. Its remarks wait for a
/// reader, 64 at most: one that comes later gets them in order, and is told how many were
/// dropped. It used to block writing its first remark, `* joined ...`, before it sent
/// anything, and to stay in the room on its keepalives until a signal.
#[test]
fn ocm_whose_stderr_is_not_read_chats_and_leaves_at_the_end_of_input() {
    use std::io::BufRead;
    let d = Daemon::start();
    let alice = alice_hosting(&d, "lobby");
    let (reader, writer) = full_pipe();
    let mut bob = Ocm::start_with_stderr(&d, &["join", "lobby", "--name", "bob"], writer.into());
    assert_eq!(alice.line(), "* bob joined");
    bob.type_line("hello");
    assert_eq!(alice.line(), "bob: hello");
    // More remarks than wait for a reader; the line after them is sent once they are made.
    for i in 1..=80 {
        bob.type_line(&format!("/unknown{i}"));
    }
    bob.type_line("after the remarks");
    assert_eq!(alice.line(), "bob: after the remarks");
    // A reader comes: it gets the pipe's filler, then what waited, then what follows.
    let (read, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if read.send(line).is_err() {
                break;
            }
        }
    });
    let mut text = Vec::new();
    let dropped = " remarks not shown (standard error not read)";
    while !text.last().is_some_and(|l: &String| l.ends_with(dropped)) {
        let line = lines.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            panic!("bob never said that remarks were dropped: {text:?}");
        });
        text.push(line.trim_start_matches('.').to_owned());
    }
    let said_dropped = text.len() - 1;
    // Read again, standard error takes each remark as it comes.
    bob.type_line("/last");
    bob.close_stdin();
    let closed = std::time::Instant::now();
    assert_eq!(alice.line(), "* bob left");
    let status = bob.wait();
    assert!(status.success(), "{status:?}");
    let took = closed.elapsed();
    assert!(
        took < EXIT_WITH_STDERR_STUCK,
        "bob exited {took:?} after his input ended"
    );
    // Up to the end of bob's standard error.
    text.extend(lines.iter());
    let at = |said: &str| {
        text.iter()
            .position(|line| line.starts_with(said))
            .unwrap_or_else(|| panic!("{said:?} not in bob's standard error: {text:?}"))
    };
    let order = [
        at("* joined lobby as bob (type /quit"),
        at("* --- live ---"),
        at("* unknown command /unknown1 "),
        said_dropped,
        at("* unknown command /last "),
    ];
    assert!(order.is_sorted(), "{order:?}: {text:?}");
    assert!(!text.iter().any(|l| l.contains("/unknown80 ")), "{text:?}");
}

/// The same at `/quit` and at SIGTERM, with standard error never read: exit status 0, at
/// once. (A signal used to find the main loop stuck, and end the chat itself 3 s later,
/// with exit status 1.)
#[test]
fn ocm_whose_stderr_is_never_read_leaves_at_quit_and_at_a_signal() {
    let d = Daemon::start();
    let alice = alice_hosting(&d, "lobby");
    for by_signal in [false, true] {
        let (reader, writer) = full_pipe();
        let mut bob =
            Ocm::start_with_stderr(&d, &["join", "lobby", "--name", "bob"], writer.into());
        assert_eq!(alice.line(), "* bob joined");
        bob.type_line("hello");
        assert_eq!(alice.line(), "bob: hello");
        if by_signal {
            bob.signal(libc::SIGTERM);
        } else {
            bob.type_line("/quit");
        }
        let left = std::time::Instant::now();
        assert_eq!(alice.line(), "* bob left");
        let status = bob.wait();
        assert!(status.success(), "{status:?}");
        let took = left.elapsed();
        assert!(
            took < EXIT_WITH_STDERR_STUCK,
            "bob exited {took:?} after {}",
            if by_signal { "SIGTERM" } else { "/quit" }
        );
        drop(reader);
    }
}

/// Bound to the wildcard address, `ocmd` answers each member from the address its datagrams
/// came to. Here every `ocm` talks to 127.0.0.2, and the route back to it would answer from
/// 127.0.0.1: `ocm` takes datagrams only from the address it sends to, so without that the
/// members would hear nothing. (The UDP socket binds 0.0.0.0, as the kernel chooses a
/// reply's source only there; every datagram of the test goes to and from 127.0.0.x.)
#[test]
fn a_wildcard_bound_daemon_answers_each_member_from_the_address_it_was_sent_to() {
    members_talking_to_127_0_0_2_chat_through("0.0.0.0:0".parse().unwrap());
}

/// The same through a dual-stack socket (`[::]`): IPv4 datagrams arrive as v4-mapped
/// addresses, and the answer's source is given back the same way.
#[test]
fn a_dual_stack_daemon_answers_ipv4_members_from_the_address_they_sent_to() {
    let wildcard: SocketAddr = "[::]:0".parse().unwrap();
    if dual_stack(wildcard) {
        members_talking_to_127_0_0_2_chat_through(wildcard);
    }
}

/// Whether a UDP socket bound to `wildcard` (`[::]`) here takes IPv4 datagrams too; says why
/// not. A host without IPv6 cannot bind it, and with net.ipv6.bindv6only = 1 it takes no IPv4;
/// the IPv4 tests still run there.
fn dual_stack(wildcard: SocketAddr) -> bool {
    if let Err(e) = std::net::UdpSocket::bind(wildcard) {
        skipped(&format!("this host cannot bind {wildcard}: {e}"));
        return false;
    }
    if std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1") {
        skipped(&format!(
            "net.ipv6.bindv6only = 1, so {wildcard} takes no IPv4"
        ));
        return false;
    }
    true
}

/// A restart that moves the UDP socket from an IPv4 address to the dual-stack wildcard (to
/// serve IPv6 clients too), and back, keeps every member: a dual-stack socket reports an IPv4
/// peer as `[::ffff:a.b.c.d]`, the same peer, and the state file holds it as IPv4 either way.
/// (Members registered behind `127.0.0.1` had their chat dropped as `address_mismatch` behind
/// `[::]`, and an original client registers only once.)
#[test]
fn members_keep_their_addresses_across_restarts_between_ipv4_and_dual_stack() {
    if !dual_stack("[::]:0".parse().unwrap()) {
        return;
    }
    let mut d = daemon_with_metrics();
    let ipv4 = d.udp;
    let (alice, bob) = room_of_two(&d, "lobby");
    let carol_token = join(&d, "lobby", "carol");
    let mut carol = None;
    for udp in [SocketAddr::from(([0u16; 8], ipv4.port())), ipv4] {
        d.stop_cleanly();
        d.restart_on_udp(udp);
        // Both sockets reach IPv4 members: no start warns that they cannot.
        let log = d.log();
        assert!(!log.contains("cannot send to"), "behind {udp}:\n{log}");
        bob.send("hello again");
        assert_eq!(alice.recv(), "bob: hello again", "behind {udp}");
        alice.send("welcome back");
        assert_eq!(bob.recv(), "alice: welcome back", "behind {udp}");
        match &carol {
            // Carol registers behind [::], and is heard behind 127.0.0.1 after the restart.
            None => {
                let mut m = Member::new(&d, "lobby", &carol_token);
                m.server = ipv4;
                m.registered_with(&alice, "carol");
                assert_eq!(bob.recv(), "carol: probe from carol");
                carol = Some(m);
            }
            Some(carol) => {
                carol.send("still here");
                assert_eq!(alice.recv(), "carol: still here");
                assert_eq!(bob.recv(), "carol: still here");
            }
        }
        assert_eq!(
            d.metric("ocm_datagrams_dropped_total{reason=\"address_mismatch\"}"),
            0.0,
            "behind {udp}"
        );
    }
    // The state a clean stop folds names every member by its IPv4 address, Carol's too.
    d.stop_cleanly();
    let text = std::fs::read_to_string(&d.state).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let carol_port = carol.map(|m| m.addr().port()).unwrap();
    let addresses: Vec<_> = state["tokens"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["address"].clone())
        .collect();
    assert_eq!(addresses.len(), 3, "{text}");
    assert!(
        addresses.iter().all(|a| a[0] == "127.0.0.1"),
        "{addresses:?}"
    );
    assert!(
        addresses.iter().any(|a| a[1] == carol_port),
        "{addresses:?}"
    );
}

/// `[::1]:0`, or `None` (and the test says it skipped) on a host that cannot bind it.
fn ipv6_loopback() -> Option<SocketAddr> {
    let loopback6: SocketAddr = "[::1]:0".parse().unwrap();
    match std::net::UdpSocket::bind(loopback6) {
        Ok(_) => Some(loopback6),
        Err(e) => {
            skipped(&format!("this host cannot bind {loopback6}: {e}"));
            None
        }
    }
}

/// A daemon with both sockets on `[::1]` and `options` for the rest, and that address; `None`
/// (the test skipped) on a host without IPv6 loopback.
fn daemon_on_ipv6_loopback(options: Options) -> Option<(Daemon, SocketAddr)> {
    let loopback6 = ipv6_loopback()?;
    let d = Daemon::start_with(Options {
        tcp: Some(loopback6),
        udp: Some(loopback6),
        ..options
    });
    Some((d, loopback6))
}

/// A member of room `lobby` holding `token`, its socket bound to `at`, talking to `server`.
fn lobby_member(token: &str, at: SocketAddr, server: SocketAddr) -> Member {
    let socket = std::net::UdpSocket::bind(at).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    Member {
        socket,
        server,
        room: "lobby".into(),
        token: token.into(),
    }
}

/// Creates "lobby" as alice and joins it as bob, both [`lobby_member`]s with sockets bound to
/// `at`, bob registered and heard by alice; returns the two.
fn lobby_of_two_at(d: &Daemon, at: SocketAddr) -> (Member, Member) {
    let alice = lobby_member(&create(d, "lobby", "alice"), at, d.udp);
    let bob = lobby_member(&join(d, "lobby", "bob"), at, d.udp);
    alice.send("__REGISTER__");
    bob.registered_with(&alice, "bob");
    (alice, bob)
}

/// A state whose members registered from IPv6 addresses, started behind an IPv4 socket that
/// cannot send to them: the daemon says so at start, and keeps their tokens.
#[test]
fn members_behind_ipv6_that_an_ipv4_socket_cannot_reach_are_reported_at_start() {
    let Some((mut d, loopback6)) = daemon_on_ipv6_loopback(Options::default()) else {
        return;
    };
    let (_alice, _bob) = lobby_of_two_at(&d, loopback6);
    d.stop_cleanly();
    d.restart_on_udp(SocketAddr::from(([127, 0, 0, 1], d.udp.port())));
    d.wait_for_log(&format!(
        "2 members registered from IPv6 addresses, which the UDP socket ({}, IPv4 only) cannot \
         send to: they hear nothing until they register from an address the socket reaches",
        d.udp
    ));
    d.wait_for_log("2 tokens loaded");
}

/// The other way round: members registered from IPv4 addresses, and a start behind an IPv6
/// socket that takes no IPv4 (bound to `[::1]`; `[::]` under net.ipv6.bindv6only = 1 is the
/// same). (Nothing was said before a review.)
#[test]
fn members_behind_ipv4_that_an_ipv6_only_socket_cannot_reach_are_reported_at_start() {
    let Some(loopback6) = ipv6_loopback() else {
        return;
    };
    let mut d = Daemon::start();
    let (_alice, _bob) = room_of_two(&d, "lobby");
    d.stop_cleanly();
    d.restart_on_udp(SocketAddr::new(loopback6.ip(), d.udp.port()));
    d.wait_for_log("2 tokens loaded");
    d.wait_for_log(&format!(
        "2 members registered from IPv4 addresses, which the UDP socket ({}, IPv6 only)",
        d.udp
    ));
}

/// A UDP socket bound to an IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) speaks IPv4:
/// members registered over IPv4 are not reported as unreachable at start, and they chat.
#[test]
fn members_behind_ipv4_are_reachable_behind_an_ipv4_mapped_address() {
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:0".parse().unwrap();
    if !dual_stack(mapped) {
        return;
    }
    let mut d = Daemon::start();
    let (alice, bob) = room_of_two(&d, "lobby");
    let udp = SocketAddr::new(mapped.ip(), d.udp.port());
    restart_and_find_both_reachable(&mut d, udp, &alice, &bob);
}

/// Stops `d`, starts it again with its UDP socket on `udp`, and checks that the start loads
/// `alice`'s and `bob`'s tokens without warning that it cannot reach a member, and that they
/// chat.
fn restart_and_find_both_reachable(d: &mut Daemon, udp: SocketAddr, alice: &Member, bob: &Member) {
    d.stop_cleanly();
    d.restart_on_udp(udp);
    let log = d.log();
    assert!(log.contains("2 tokens loaded"), "{log}");
    assert!(!log.contains("cannot send to"), "{log}");
    bob.send("hello again");
    assert_eq!(alice.recv(), "bob: hello again");
}

/// Members registered over IPv6 are not reported as unreachable by a start on an IPv6
/// socket, and they chat after it.
#[test]
fn members_behind_ipv6_are_not_reported_by_a_start_on_ipv6() {
    let Some((mut d, loopback6)) = daemon_on_ipv6_loopback(Options::default()) else {
        return;
    };
    let (alice, bob) = lobby_of_two_at(&d, loopback6);
    let udp = d.udp;
    restart_and_find_both_reachable(&mut d, udp, &alice, &bob);
}

/// With `register_only_from_join_ip`, members that joined over IPv6 cannot register from an
/// IPv4 address behind a daemon restarted on an IPv4 socket (the guard drops it, `not_join_ip`),
/// and the start's warning says they must join again, not register (as it first said; found
/// by a review).
#[test]
fn behind_the_join_ip_guard_ipv6_members_are_told_to_join_again() {
    let Some((mut d, loopback6)) = daemon_on_ipv6_loopback(Options {
        config: Some("[udp]\nregister_only_from_join_ip = true\n".into()),
        metrics: true,
        ..Options::default()
    }) else {
        return;
    };
    let (_alice, bob) = lobby_of_two_at(&d, loopback6);
    d.stop_cleanly();
    let ipv4 = SocketAddr::from(([127, 0, 0, 1], d.udp.port()));
    d.restart_on_udp(ipv4);
    d.wait_for_log("2 members registered from IPv6 addresses, which the UDP socket (127.0.0.1:");
    d.wait_for_log("they hear nothing until they join again");
    let bob = lobby_member(&bob.token, SocketAddr::from(([127, 0, 0, 1], 0)), ipv4);
    bob.send("__REGISTER__");
    wait_until("bob's REGISTER from IPv4 dropped by the guard", || {
        d.metric("ocm_datagrams_dropped_total{reason=\"not_join_ip\"}") >= 1.0
    });
}

/// A daemon with metrics, its TCRP socket on 127.0.0.2 and its UCRP socket bound to `udp`.
fn daemon_at_127_0_0_2(udp: SocketAddr) -> Daemon {
    Daemon::start_with(Options {
        tcp: Some("127.0.0.2:0".parse().unwrap()),
        udp: Some(udp),
        metrics: true,
        ..Options::default()
    })
}

/// Starts `ocm create lobby --name alice ALICE_EXTRA...`, then `ocm join lobby --name bob
/// --keepalive 3600`, both talking to `d` at 127.0.0.2; returns them once bob has gone live.
fn alice_and_bob_via_127_0_0_2(d: &Daemon, alice_extra: &[&str]) -> (Ocm, Ocm) {
    let alice_args = [&["create", "lobby", "--name", "alice"][..], alice_extra].concat();
    let alice = Ocm::start_via(d, "127.0.0.2", &alice_args);
    alice.wait_stderr("* created lobby as alice");
    let bob_args = ["join", "lobby", "--name", "bob", "--keepalive", "3600"];
    let bob = Ocm::start_via(d, "127.0.0.2", &bob_args);
    bob.wait_stderr("* joined lobby as bob");
    bob.wait_live();
    (alice, bob)
}

/// Checks that no `ocm` of `ocms` said it was ignoring datagrams (from an address it does
/// not talk to).
#[track_caller]
fn assert_no_datagrams_ignored(ocms: &[&Ocm]) {
    for ocm in ocms {
        let err = stderr_of(ocm);
        assert!(!err.contains("ignoring datagrams"), "{err}");
    }
}

/// Where each member's datagrams came to is saved with it: after `kill -9` and a start on the
/// same state, a member that does not register again (a keepalive of an hour) still hears the
/// room from the address it talks to, before it sends anything. (Bob, here: Alice's own chat
/// would teach the restarted daemon her address.)
#[test]
fn after_a_crash_a_wildcard_bound_daemon_still_answers_from_the_address_members_sent_to() {
    let mut d = daemon_at_127_0_0_2("0.0.0.0:0".parse().unwrap());
    let (mut alice, mut bob) = alice_and_bob_via_127_0_0_2(&d, &["--keepalive", "3600"]);
    assert_eq!(alice.line(), "* bob joined");
    // Both registrations, with the address they came to, are on disk before the kill.
    let journal = d.state.with_extension("json.journal");
    wait_until("both members saved with 127.0.0.2", || {
        std::fs::read_to_string(&journal)
            .is_ok_and(|j| j.matches(r#""local":"127.0.0.2""#).count() >= 2)
    });
    d.kill9();
    d.restart();
    d.wait_for_log("tokens loaded");
    alice.type_line("still there?");
    assert_eq!(bob.line(), "alice: still there?");
    bob.type_line("yes");
    assert_eq!(alice.line(), "bob: yes");
    assert_eq!(d.metric("ocm_udp_local_addresses"), 1.0);
    assert_no_datagrams_ignored(&[&alice, &bob]);
}

/// A keepalive that comes to another of our addresses moves what the member hears there, and
/// that is saved with the next history checkpoint: after `kill -9` and a start on the same
/// state, the member is answered from the new address before it sends anything.
#[test]
fn a_source_moved_by_a_keepalive_is_saved_at_the_checkpoint_and_survives_a_crash() {
    let mut d = Daemon::start_with(Options {
        udp: Some("0.0.0.0:0".parse().unwrap()),
        config: Some("[history]\ncheckpoint_secs = 1\n".into()),
        ..Options::default()
    });
    let at = |last: u8| SocketAddr::from(([127, 0, 0, last], d.udp.port()));
    let (host, guest) = (create(&d, "r", "alice"), join(&d, "r", "bob"));
    let mut alice = Member::new(&d, "r", &host);
    let mut bob = Member::new(&d, "r", &guest);
    (alice.server, bob.server) = (at(2), at(2));
    alice.send("__REGISTER__");
    bob.registered_with(&alice, "bob");
    bob.server = at(3);
    bob.send("__REGISTER__");
    let journal = d.state.with_extension("json.journal");
    wait_until("bob's new source saved", || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.contains(r#""local":"127.0.0.3""#))
    });
    d.kill9();
    d.restart();
    alice.send("after the crash");
    // `recv` checks that it comes from 127.0.0.3.
    assert_eq!(bob.recv(), "alice: after the crash");
}

fn members_talking_to_127_0_0_2_chat_through(udp: SocketAddr) {
    let d = daemon_at_127_0_0_2(udp);
    let (mut alice, mut bob) = alice_and_bob_via_127_0_0_2(&d, &[]);
    assert_eq!(alice.line(), "* bob joined");
    alice.type_line("hello");
    assert_eq!(bob.line(), "alice: hello");
    bob.quit_cleanly();
    assert_eq!(alice.line(), "* bob left");
    assert_no_datagrams_ignored(&[&alice, &bob]);
    assert_eq!(d.metric("ocm_udp_local_addresses"), 1.0);
    assert_eq!(d.metric("ocm_udp_sources_retired_total"), 0.0);
}

#[test]
fn ocm_reports_a_refused_join_and_exits_non_zero() {
    let d = Daemon::start();
    let mut ocm = Ocm::start(&d, &["join", "ghost-town", "--name", "bob"]);
    let status = ocm.wait();
    assert!(!status.success());
    let err = stderr_of(&ocm);
    assert!(
        err.contains("ghost-town") && err.contains("does not exist"),
        "{err}"
    );
}

/// A held `__ROOM_CLOSED__` is tried again on its own timer (every 100 ms while one is held),
/// not only when something else wakes the daemon: with the liveness sweep and the history
/// checkpoint an hour or more apart, no connection open and nothing else sent, the kernel
/// still sees it again and again (about ten times a second), and takes it once it has room.
#[test]
fn a_held_room_closed_is_tried_again_on_its_own_timer() {
    let refusal = Refusal::FullSendBuffer;
    let (d, full, _library) = spawn_preloaded(
        |dir| refusing_sendmmsg(dir, refusal),
        refusal.switch(),
        Options {
            config: Some(
                "[liveness]\nsweep_interval_ms = 3600000\n[history]\ncheckpoint_secs = 86400\n"
                    .into(),
            ),
            ..Options::default()
        },
    );
    let (host, m1) = host_and_member(&d, "r", "host", "m1");

    std::fs::write(&full, b"").unwrap();
    host.send("__LEAVE__");
    d.wait_for_log(r#"room "r" closed: host left; 1 member told"#);
    wait_until("the close to find the buffer full", || refusals(&full) > 0);
    // Only the retry timer wakes the daemon now; the 5 s status line at most once more
    // within the wait.
    let first = refusals(&full);
    wait_until("the held close to be tried five more times", || {
        refusals(&full) >= first + 5
    });
    std::fs::remove_file(&full).unwrap();
    assert_eq!(m1.recv_raw(), b"__ROOM_CLOSED__");
}
