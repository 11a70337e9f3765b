//! The ocm extensions against the real daemon, driven mostly through the real `ocm` client:
//! room listing, presence, room passwords, history, and the guarantee that original-format
//! members never see an extension frame.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tcrp::payload::{self, Compliance, ErrorCode, HistoryPage};
use tcrp::{Operation, State};
use ucrp::delivery::{self, Delivery};

/// A create or join request in the JSON-object form with `fields` inside the braces, e.g.
/// `"username": "a", "listed": false`; the token.
fn token_with(daemon: &Daemon, op: Operation, room: &str, fields: &str) -> String {
    let r = request(daemon, op, room, format!("{{{fields}}}").as_bytes());
    r.token
        .unwrap_or_else(|| panic!("{op:?} {room} refused: {:?}", r.compliance))
}

/// [`token_with`] for a create.
fn create_with(daemon: &Daemon, room: &str, fields: &str) -> String {
    token_with(daemon, Operation::CreateRoom, room, fields)
}

/// [`token_with`] for a join.
fn join_with(daemon: &Daemon, room: &str, fields: &str) -> String {
    token_with(daemon, Operation::JoinRoom, room, fields)
}

/// Runs a one-shot `ocm` command (`rooms`, `who`, a refused join) to its end; returns its
/// exit code, stdout lines and stderr. `ocm` bounds its own waits (connect and handshake
/// timeouts), so this cannot hang.
fn run_ocm(daemon: &Daemon, args: &[&str]) -> (Option<i32>, Vec<String>, String) {
    let output = std::process::Command::new(sibling_binary("ocm"))
        .arg("--server")
        .arg("127.0.0.1")
        .arg("--tcp-port")
        .arg(daemon.tcp.port().to_string())
        .arg("--udp-port")
        .arg(daemon.udp.port().to_string())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ocm");
    let out = String::from_utf8(output.stdout).expect("UTF-8 stdout");
    (
        output.status.code(),
        out.lines().map(str::to_owned).collect(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Reads stdout lines up to and including the first history line (`[hh:mm] ...`) that
/// ends with `text`.
fn history_until(ocm: &Ocm, text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = ocm.line();
        let done = line.starts_with('[') && line.ends_with(&format!("] {text}"));
        lines.push(line);
        if done {
            return lines;
        }
    }
}

#[test]
fn ocm_rooms_lists_rooms_and_hides_unlisted_ones() {
    let d = Daemon::start();
    let (code, out, err) = run_ocm(&d, &["rooms"]);
    assert_eq!((code, out), (Some(0), vec!["no rooms".to_owned()]), "{err}");

    create(&d, "lobby", "alice");
    join(&d, "lobby", "bob");
    create_with(&d, "vault", r#""username": "carol", "password": "pw""#);
    create_with(&d, "secret", r#""username": "dave", "listed": false"#);
    // The client's own --unlisted.
    let mut hidden = Ocm::start(&d, &["create", "hideout", "--name", "erin", "--unlisted"]);
    hidden.wait_stderr("* created hideout as erin");

    let (code, out, err) = run_ocm(&d, &["rooms"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        out[0].starts_with("lobby  2 members  created 20") && out[0].ends_with(" UTC"),
        "{out:?}"
    );
    assert!(
        out[1].starts_with("vault  1 member  created ") && out[1].ends_with(" UTC  [password]"),
        "{out:?}"
    );
    // Unlisted rooms exist all the same.
    join(&d, "secret", "zed");
    join(&d, "hideout", "zed");
    hidden.type_line("/quit");
    assert!(hidden.wait().success());
}

#[test]
fn ocm_who_shows_the_host_and_the_members() {
    let d = Daemon::start();
    let host = create(&d, "lobby", "alice");
    join(&d, "lobby", "bob");
    let carol_token = join(&d, "lobby", "carol");
    let alice = Member::joined(&d, "lobby", &host);
    let carol = Member::new(&d, "lobby", &carol_token);
    carol.registered_with(&alice, "carol");

    let (code, out, err) = run_ocm(&d, &["who", "lobby"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        [
            "host: alice",
            "alice (registered)",
            "bob (not registered)",
            "carol (registered)"
        ]
    );

    let (code, out, err) = run_ocm(&d, &["who", "nowhere"]);
    assert_eq!(code, Some(2));
    assert!(out.is_empty());
    assert!(
        err.contains("cannot see who is in room \"nowhere\""),
        "{err}"
    );

    // A room with a password shows its members to those who know it.
    create_with(&d, "vault", r#""username": "vic", "password": "pw""#);
    let (code, _, err) = run_ocm(&d, &["who", "vault"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, out, err) = run_ocm(&d, &["who", "vault", "--password", "pw"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, ["host: vic", "vic (not registered)"]);
}

/// A create whose JSON object is broken (a trailing comma), or whole but behind a byte-order
/// mark or a zero-width space (JSON allows neither; some tools write the first), is refused
/// as malformed: taken whole as the username, it would make a room without its password and
/// keep the password as the host's name, in the state, the log and every Presence answer.
#[test]
fn a_create_with_a_broken_json_object_is_refused_and_its_password_kept_nowhere() {
    const PASSWORD: &str = "hunter2-8812";
    let mut d = Daemon::start_with(Options {
        metrics: true,
        ..Options::default()
    });
    let object = format!(r#"{{"username": "bob", "password": "{PASSWORD}"}}"#);
    let broken = format!(r#"{{"username": "bob", "password": "{PASSWORD}",}}"#);
    for payload in [
        broken,
        format!("\u{feff}{object}"),
        format!("\u{200b}{object}"),
    ] {
        let reply = request(&d, Operation::CreateRoom, "vault", payload.as_bytes());
        assert_eq!(
            refused(&reply),
            Some(ErrorCode::MalformedRequest),
            "{payload:?}: {reply:?}"
        );
        assert!(reply.token.is_none());
        assert!(
            !format!("{:?}", reply.compliance).contains(PASSWORD),
            "the refusal echoes the payload: {reply:?}"
        );
        // No room was made: a plain join finds none.
        let join = request(&d, Operation::JoinRoom, "vault", b"\"eve\"");
        assert_eq!(refused(&join), Some(ErrorCode::RoomNotFound), "{join:?}");
    }
    // The name is free to create.
    create(&d, "vault", "alice");
    let (status, _) = d.terminate();
    assert!(status.success());
    let state = std::fs::read_to_string(&d.state).expect("state file");
    assert!(!state.contains(PASSWORD), "the password is in the state");
    assert!(!d.log().contains(PASSWORD), "the password is in the log");
}

#[test]
fn passwords_gate_the_join_and_are_never_stored_or_logged() {
    const PASSWORD: &str = "correct-horse-7731";
    let mut d = Daemon::start_with(Options {
        metrics: true,
        ..Options::default()
    });
    let file = d.dir.path().join("pw.txt");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let file = file.to_str().unwrap().to_owned();

    let mut alice = Ocm::start(
        &d,
        &[
            "create",
            "vault",
            "--name",
            "alice",
            "--password-file",
            &file,
        ],
    );
    alice.wait_stderr("* created vault as alice");

    for wrong in [&[][..], &["--password", "battery-staple"][..]] {
        let mut args = vec!["join", "vault", "--name", "bob"];
        args.extend_from_slice(wrong);
        let (code, _, err) = run_ocm(&d, &args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("ocm: cannot join room \"vault\": ") && err.contains("password"),
            "{args:?}: {err}"
        );
    }

    let mut bob = Ocm::start(
        &d,
        &["join", "vault", "--name", "bob", "--password", PASSWORD],
    );
    bob.wait_stderr("* joined vault as bob");
    alice.lines_until("* bob joined");
    // The create and the right join waited for the disk after their password checks; the
    // refused joins had nothing to wait for.
    assert_eq!(
        d.metric("ocm_handshake_durable_wait_seconds_count"),
        2.0,
        "{}",
        d.http_get("/metrics")
    );
    bob.type_line("hello alice");
    alice.lines_until("bob: hello alice");
    bob.type_line("/quit");
    assert!(bob.wait().success());

    let (status, _) = d.terminate();
    assert!(status.success());
    let saved = std::fs::read_to_string(&d.state).expect("state file");
    assert!(saved.contains("\"vault\""), "{saved}");
    assert!(!saved.contains(PASSWORD), "password in the state file");
    let log = d.log();
    assert!(!log.contains(PASSWORD), "password in the daemon log");
    assert!(
        !log.contains("battery-staple"),
        "wrong password in the daemon log"
    );
    // The host's client goes away with the daemon; do not wait for it.
    alice.kill9();
}

/// An empty password protects nothing: a create carrying one is refused and makes no room,
/// and at a protected room it is a missing password. The daemon goes on serving both rooms.
#[test]
fn an_empty_password_neither_makes_a_room_nor_opens_one() {
    let d = Daemon::start();
    let r = request(
        &d,
        Operation::CreateRoom,
        "open",
        br#"{"username": "a", "password": ""}"#,
    );
    assert_eq!(refused(&r), Some(tcrp::ErrorCode::MalformedRequest));
    assert!(r.token.is_none());
    let r = request(&d, Operation::JoinRoom, "open", br#"{"username": "b"}"#);
    assert_eq!(
        refused(&r),
        Some(tcrp::ErrorCode::RoomNotFound),
        "no room was made"
    );

    create_with(&d, "vault", r#""username": "h", "password": "pw""#);
    for payload in [
        &br#"{"username": "g", "password": ""}"#[..],
        br#"{"username": "g"}"#,
    ] {
        let r = request(&d, Operation::JoinRoom, "vault", payload);
        assert_eq!(refused(&r), Some(tcrp::ErrorCode::BadPassword));
    }
    join_with(&d, "vault", r#""username": "g", "password": "pw""#);
    create_with(&d, "open", r#""username": "a""#);
}

/// A `"password"` that is not a string is refused as malformed without its value in the
/// reply or the log (the daemon runs at `debug` here, which logs each refusal's message).
#[test]
fn a_password_that_is_not_a_string_is_refused_without_being_echoed() {
    let d = Daemon::start();
    create_with(&d, "vault", r#""username": "h", "password": "pw""#);
    for payload in [
        &br#"{"username": "g", "password": 8675309}"#[..],
        br#"{"username": "g", "password": ["8675309"]}"#,
    ] {
        let r = request(&d, Operation::JoinRoom, "vault", payload);
        assert_eq!(refused(&r), Some(tcrp::ErrorCode::MalformedRequest));
        let Compliance::Failure { message, .. } = &r.compliance else {
            panic!("not a refusal: {r:?}");
        };
        let message = message.as_deref().unwrap_or_default();
        assert!(
            message.contains("\"password\" must be a string"),
            "{message}"
        );
        assert!(!message.contains("8675309"), "{message}");
    }
    // A TCP round trip later, every refusal above is logged.
    create_with(&d, "after", r#""username": "a""#);
    let log = d.log();
    assert!(
        log.contains("must be a string"),
        "the refusals were not logged"
    );
    assert!(!log.contains("8675309"), "the password reached the log");
}

/// A state file may hold a member with an empty username (another server's file, or one
/// edited by hand); `ocmd` keeps it, relays its chat, and lets it leave without a notice,
/// which would otherwise name nobody. A named member's departure is announced as ever.
#[test]
fn a_member_with_an_empty_stored_name_chats_and_leaves_unannounced() {
    let mut d = Daemon::start();
    let host = create_with(&d, "r", r#""username": "host", "caps": ["notices", "seq"]"#);
    let zed = join_with(&d, "r", r#""username": "zed""#);
    let named = join_with(&d, "r", r#""username": "named""#);
    let (status, _) = d.terminate();
    assert!(status.success());
    let state = std::fs::read_to_string(&d.state).expect("the state file");
    assert_eq!(state.matches(r#""username": "zed""#).count(), 1, "{state}");
    std::fs::write(
        &d.state,
        state.replace(r#""username": "zed""#, r#""username": """#),
    )
    .unwrap();
    d.restart();

    let host = Member::joined(&d, "r", &host);
    let named = Member::joined(&d, "r", &named);
    named.send("probe");
    let zed = Member::joined(&d, "r", &zed);
    zed.send("hi from nobody");
    assert_eq!(host.recv(), "#1 named: probe");
    assert_eq!(host.recv(), "#2 : hi from nobody");
    // An original member gets the chat frame with a sender size of 0 (PROTOCOL.md).
    assert_eq!(named.recv_raw(), b"\x00hi from nobody");
    zed.send("__LEAVE__");
    named.send("after");
    // Had the departure been announced, its notice would come first.
    assert_eq!(host.recv(), "#3 named: after");
    named.send("__LEAVE__");
    assert_eq!(host.recv(), "* named Left");
}

#[test]
fn join_shows_recent_history_and_history_pages_back() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    // A raw member proves the daemon relayed (and so recorded) every message.
    let watcher = Member::joined(&d, "lobby", &join(&d, "lobby", "watcher"));
    // Its REGISTER may still be in flight: repeat until it hears alice, with short waits.
    watcher
        .socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut heard = false;
    for i in 0..50 {
        alice.type_line(&format!("warm-up {i}"));
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = watcher.socket.recv_from(&mut buf) {
            assert!(render(&buf[..n]).starts_with("alice: warm-up"));
            heard = true;
            break;
        }
    }
    assert!(heard, "the watcher hears alice");
    watcher.socket.set_read_timeout(Some(PATIENCE)).unwrap();
    for i in 1..=25 {
        alice.type_line(&format!("m{i}"));
    }
    watcher.recv_until("alice: m25");

    let mut bob = Ocm::start(&d, &["join", "lobby", "--name", "bob"]);
    // The recent history comes first (the last 20 messages), then the live part starts.
    let shown = history_until(&bob, "alice: m25");
    assert!(
        shown.len() == 20
            && shown.iter().all(|l| l.starts_with('['))
            && shown[0].ends_with("] alice: m6"),
        "{shown:?}"
    );
    bob.wait_stderr("* --- live ---");
    alice.type_line("live one");
    assert_eq!(bob.line(), "alice: live one");

    // /history pages back from the oldest message the join showed, oldest first in a page.
    bob.type_line("/history 3");
    let page = [bob.line(), bob.line(), bob.line()];
    assert!(
        page[0].ends_with("] alice: m3")
            && page[1].ends_with("] alice: m4")
            && page[2].ends_with("] alice: m5"),
        "{page:?}"
    );
    // The rest: the warm-up (one line or more, if alice needed more), m1, m2, then the end.
    bob.type_line("/history 100");
    bob.wait_stderr("* no more history");
    alice.type_line("end marker");
    let rest = bob.lines_until("alice: end marker");
    let (warm_up, last_two) = rest.split_at(rest.len().saturating_sub(2));
    assert!(
        !warm_up.is_empty()
            && warm_up.iter().all(|l| l.contains("] alice: warm-up "))
            && last_two[0].ends_with("] alice: m1")
            && last_two[1].ends_with("] alice: m2"),
        "{rest:?}"
    );
    // Past the end, the latest again: what was said since the join (it stayed "no more
    // history" for good).
    bob.type_line("/history 2");
    let latest = [bob.line(), bob.line()];
    assert!(
        latest[0].ends_with("] alice: live one") && latest[1].ends_with("] alice: end marker"),
        "{latest:?}"
    );
    bob.type_line("/who");
    bob.wait_stderr("* host: alice");
    bob.wait_stderr("* bob (registered)");
    bob.type_line("/quit");
    assert!(bob.wait().success());
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// Piped input faster than the network: `ocm` reads it only as fast as it sends, so its
/// memory stays bounded, and a SIGTERM in the middle of the flood still leaves the room at
/// once instead of after every line read so far.
#[test]
fn a_flood_of_piped_lines_neither_grows_ocm_nor_delays_its_leaving() {
    let d = Daemon::start();
    let alice = Ocm::start(&d, &["create", "flood", "--name", "alice"]);
    alice.wait_stderr("* created flood as alice");
    let mut bob = Ocm::start(&d, &["join", "flood", "--name", "bob"]);
    bob.wait_stderr("* joined flood as bob");
    alice.lines_until("* bob joined");
    let mut stdin = bob.take_stdin();
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = Arc::clone(&written);
        thread::spawn(move || {
            let line = format!("{}\n", "x".repeat(1000));
            while stdin.write_all(line.as_bytes()).is_ok() {
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // ocm paces its chat (45 lines a second after 90), so more than 200 lines written is
    // more than its queue, the pipe and its reader hold: it is reading as it sends.
    wait_until("lines flowing into ocm", || {
        written.load(Ordering::Relaxed) > 200
    });
    // The flood's length, not a wait for correctness: an unbounded queue grew ~150 MB in it.
    thread::sleep(Duration::from_secs(1));
    let rss = bob.rss_kib();
    assert!(
        rss < 64 * 1024,
        "ocm holds {rss} KiB after a second of flood"
    );
    bob.signal(libc::SIGTERM);
    // The lines read and waiting their turn are not sent, and that is said.
    bob.wait_stderr("lines not sent: the chat ended before their turn");
    assert!(bob.wait().success());
    alice.lines_until("* bob left");
    writer.join().unwrap();
}

/// The line `watcher` shows for `text` from `sender`, registering and sending until it
/// shows (the first datagrams may come before the watcher is live). A notice on the way must
/// be the sender's join, named as `shown`; copies of earlier senders' lines are passed over.
fn line_for(watcher: &Ocm, sender: &Member, shown: &str, text: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        sender.send("__REGISTER__");
        sender.send(text);
        match watcher.line_within(Duration::from_millis(200)) {
            Some(line) if line.starts_with('*') => assert_eq!(line, format!("* {shown} joined")),
            Some(line) if line.ends_with(text) => return line,
            Some(_) => {}
            None => assert!(Instant::now() < deadline, "never heard {shown}"),
        }
    }
}

/// A member whose name differs from another's only by an invisible character is shown
/// with that character escaped, so it cannot pass for the other in `ocm`.
#[test]
fn ocm_shows_invisible_characters_in_names() {
    let d = Daemon::start();
    let alice = Ocm::start(&d, &["create", "look", "--name", "alice"]);
    alice.wait_stderr("* created look as alice");
    let fake = Member::new(&d, "look", &join(&d, "look", "ali\u{200b}ce"));
    let line = line_for(&alice, &fake, "ali\\u{200b}ce", "it's me");
    assert_eq!(line, "ali\\u{200b}ce: it's me");
}

/// Names whose ends would not show, or that could pass for an escaped or quoted name, are
/// shown by `ocm` in quotes, and a tab in message text prints as a tab, through the real
/// daemon (which keeps such names, as the original server did).
#[test]
fn ocm_quotes_names_that_could_pass_for_others_and_keeps_tabs_in_text() {
    let d = Daemon::start();
    let alice = Ocm::start(&d, &["create", "edges", "--name", "alice"]);
    alice.wait_stderr("* created edges as alice");
    for (n, (name, shown)) in [
        ("bob ", r#""bob ""#),
        (r"ali\u{200b}ce", r#""ali\\u{200b}ce""#),
        (r#""cy""#, r#""\"cy\"""#),
    ]
    .into_iter()
    .enumerate()
    {
        let username = serde_json::to_string(name).unwrap();
        let token = join_with(&d, "edges", &format!(r#""username": {username}"#));
        let member = Member::new(&d, "edges", &token);
        let text = format!("one\ttwo {n}");
        let line = line_for(&alice, &member, shown, &text);
        assert_eq!(line, format!("{shown}: {text}"), "{name:?}");
    }
    // A plain name is shown as it is.
    let plain = Member::new(&d, "edges", &join(&d, "edges", "dora"));
    assert_eq!(line_for(&alice, &plain, "dora", "hi"), "dora: hi");
}

/// `[names] refuse_invisible`, turned on by a reload, refuses new names that hold an invisible
/// or reordering character, naming it, to `ocm`; a room whose name already held one stays
/// joinable under a visible name.
#[test]
fn refuse_invisible_turned_on_at_a_reload_refuses_look_alike_names() {
    let d = Daemon::start_with(Options {
        config: Some("[names]\nrefuse_invisible = false\n".into()),
        ..Options::default()
    });
    // Off, the default: accepted, as the original server accepted them.
    let host = Ocm::start(&d, &["create", "lo\u{200b}ok", "--name", "alice"]);
    host.wait_stderr("* created");

    d.reload("[names]\nrefuse_invisible = true\n");
    let mut fake = Ocm::start(&d, &["join", "lo\u{200b}ok", "--name", "ali\u{200b}ce"]);
    assert_eq!(fake.wait().code(), Some(2), "a refusal");
    fake.wait_stderr("username contains U+200B");
    let mut reversed = Ocm::start(&d, &["create", "new\u{2066}", "--name", "carol"]);
    assert_eq!(reversed.wait().code(), Some(2), "a refusal");
    reversed.wait_stderr("room name contains U+2066");

    let bob = Ocm::start(&d, &["join", "lo\u{200b}ok", "--name", "bob"]);
    bob.wait_stderr("* joined");
    wait_until("alice hears bob join", || {
        host.line_within(Duration::from_millis(100))
            .is_some_and(|line| line == "* bob joined")
    });
}

/// `[names] refuse_lookalike_usernames` and `refuse_lookalike_room_names`, turned on at a
/// reload: a join whose name only looks like a member's (a capital I for an l) is refused as
/// the same name would be, and so is a new room whose name only looks like an open room's
/// (a Cyrillic і); `ocm` says what they look like, and other names still get in.
#[test]
fn lookalike_refusals_turned_on_at_a_reload_refuse_a_members_and_a_rooms_twin() {
    let d = Daemon::start_with(Options {
        config: Some("[names]\nrefuse_lookalike_usernames = false\n".into()),
        ..Options::default()
    });
    let host = Ocm::start(&d, &["create", "twins", "--name", "alice"]);
    host.wait_stderr("* created twins as alice");
    // Off, the default: the twins get in, as they did on the original server.
    let early = Ocm::start(&d, &["join", "twins", "--name", "\u{430}lice"]);
    early.wait_stderr("* joined twins as");
    let early_room = Ocm::start(&d, &["create", "tw\u{456}ns", "--name", "mallory"]);
    early_room.wait_stderr("* created tw");

    d.reload("[names]\nrefuse_lookalike_usernames = true\nrefuse_lookalike_room_names = true\n");
    let mut twin = Ocm::start(&d, &["join", "twins", "--name", "aIice"]);
    assert_eq!(twin.wait().code(), Some(2), "a refusal");
    twin.wait_stderr(r#"looks like "alice""#);
    let mut twin_room = Ocm::start(&d, &["create", "tw\u{456}n\u{455}", "--name", "eve"]);
    assert_eq!(twin_room.wait().code(), Some(2), "a refusal");
    twin_room.wait_stderr("looks like the existing room");
    let bob = Ocm::start(&d, &["join", "twins", "--name", "bob"]);
    bob.wait_stderr("* joined twins as bob");
    wait_until("alice hears bob join", || {
        host.line_within(Duration::from_millis(100))
            .is_some_and(|line| line == "* bob joined")
    });
    let other = Ocm::start(&d, &["create", "triplets", "--name", "carol"]);
    other.wait_stderr("* created triplets as carol");
}

/// Every signal that ends `ocm` (Ctrl+C, a kill, a closed terminal, Ctrl+\\) leaves the room
/// first, so the others hear it leave instead of waiting for a timeout that an `--original`
/// member never has.
#[test]
fn ocm_leaves_its_room_on_every_terminating_signal() {
    let d = Daemon::start();
    let alice = Ocm::start(&d, &["create", "sig", "--name", "alice"]);
    alice.wait_stderr("* created sig as alice");
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
    for (i, signal) in signals.into_iter().enumerate() {
        let name = format!("bob{i}");
        let mut bob = Ocm::start(&d, &["join", "sig", "--name", &name, "--original"]);
        bob.wait_stderr(&format!("* joined sig as {name}"));
        bob.signal(signal);
        assert!(bob.wait().success(), "ocm after signal {signal}");
        alice.lines_until(&format!("* {name} left"));
    }
}

/// Starts `ocm` against `d` with `args` and `env`, its standard input a pipe and its outputs
/// as given.
fn ocm_with_outputs(
    d: &Daemon,
    args: &[&str],
    env: &[(&str, &str)],
    stdout: impl Into<Stdio>,
    stderr: impl Into<Stdio>,
) -> std::process::Child {
    Command::new(sibling_binary("ocm"))
        .envs(env.iter().copied())
        .args(["--server", "127.0.0.1", "--tcp-port"])
        .arg(d.tcp.port().to_string())
        .arg("--udp-port")
        .arg(d.udp.port().to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn ocm")
}

/// Turns `O_NONBLOCK` on or off on a descriptor the caller owns.
fn set_nonblocking(fd: std::os::fd::RawFd, on: bool) {
    // SAFETY: fcntl on a descriptor the caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }, 0);
}

/// Fills the pipe behind `writer` (its reader reads nothing meanwhile), so that every write
/// to it, from any process holding it, blocks.
fn fill(writer: &mut std::io::PipeWriter) {
    use std::os::fd::AsRawFd;
    let fd = writer.as_raw_fd();
    set_nonblocking(fd, true);
    // Pages first, then bytes: a write of up to a page is all or nothing.
    for chunk in [4096, 1] {
        loop {
            match writer.write(&vec![b'x'; chunk]) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling a pipe: {e}"),
            }
        }
    }
    set_nonblocking(fd, false);
}

/// An `ocm` stuck on both its outputs (neither read: a line from the room blocked on the
/// way to standard output, its remarks waiting for standard error) still leaves at once on a signal,
/// with exit status 0: neither holds up the main loop, and on the way out the remarks get
/// half a second. (Its first remark, `* joined ...`, used to stop the main loop for good,
/// and the signal thread said `__LEAVE__` itself after the grace, with exit status 1.)
#[test]
fn ocm_stuck_on_its_output_and_its_errors_still_leaves_at_once_on_a_signal() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "stuck", "--name", "alice"]);
    alice.wait_stderr("* created stuck as alice");
    let (_unread_out, stdout) = full_pipe();
    let (_unread_err, stderr) = full_pipe();
    // The chat's debug lines on: more remarks that nobody reads.
    let mut bob = KillOnDrop(ocm_with_outputs(
        &d,
        &["join", "stuck", "--name", "bob"],
        &[("RUST_LOG", "warn,ocm::chat=debug")],
        stdout,
        stderr,
    ));
    alice.lines_until("* bob joined");
    alice.type_line("for bob, who cannot show it");
    // Shown live by the receiver, or in the history by the input thread: either is then
    // stuck, holding the screen.
    let mut blocked = None;
    wait_until("bob stuck on its output", || {
        let stuck = ["receiver", "input"].map(|name| thread_writing_a_pipe(bob.0.id(), name));
        blocked = stuck.iter().copied().flatten().reduce(|a, b| a || b);
        blocked != Some(false)
    });
    if blocked.is_none() {
        skipped("the kernel does not say where a thread waits (/proc/PID/task/TID/wchan)");
        return;
    }
    let signalled = Instant::now();
    let status = terminate(&mut bob.0, "ocm stuck on its outputs");
    assert_eq!(status.code(), Some(0), "{status}");
    let took = signalled.elapsed();
    assert!(took < OCM_SIGNAL_GRACE, "exited after {took:?}");
    alice.lines_until("* bob left");
}

/// How long `ocm` gives its main loop to end the chat after a termination signal before the
/// signal thread ends it (`SIGNAL_GRACE` in crates/client/src/chat/mod.rs).
const OCM_SIGNAL_GRACE: Duration = Duration::from_secs(3);

/// Sends SIGTERM to `child` and waits for it to exit; kills it and fails if it has not
/// within PATIENCE (`ocm`'s grace is 3 s; the rest is room for a loaded machine).
fn terminate(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit after SIGTERM");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// An `ocm` whose chat ended on a signal, with a last line for standard error (here the
/// `__LEAVE__`'s debug line) just as the reader of its errors stopped reading, exits 0 at
/// once: the line waits for standard error half a second at most. (The main thread used to
/// be stuck writing it, until the signal thread exited with status 1 a grace period later.)
/// The `__LEAVE__` itself was sent, so the room hears that bob left.
#[test]
fn ocm_whose_errors_stop_being_read_as_a_signal_ends_its_chat_exits_at_once() {
    let d = Daemon::start();
    let alice = Ocm::start(&d, &["create", "after", "--name", "alice"]);
    alice.wait_stderr("* created after as alice");
    let (mut unread, mut errors) = std::io::pipe().expect("pipe");
    let mut bob = ocm_with_outputs(
        &d,
        &["join", "after", "--name", "bob"],
        // Nothing between the signal and the __LEAVE__, one line after it.
        &[("RUST_LOG", "warn,ocm::chat::session=debug")],
        Stdio::null(),
        errors.try_clone().expect("dup the pipe"),
    );
    // Bob's errors are read until its main loop runs (it printed its join notice, and it
    // relayed a line from its input), then no more: the line after the __LEAVE__ finds the
    // pipe full.
    use std::io::Read;
    use std::os::fd::AsRawFd;
    set_nonblocking(unread.as_raw_fd(), true);
    let mut said = String::new();
    let mut drain = |said: &mut String| loop {
        let mut chunk = [0u8; 4096];
        match unread.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => said.push_str(&String::from_utf8_lossy(&chunk[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading bob's errors: {e}"),
        }
    };
    wait_until("bob's join notice", || {
        drain(&mut said);
        said.contains("* joined after as bob")
    });
    let mut stdin = bob.stdin.take().expect("stdin");
    writeln!(stdin, "still here").unwrap();
    alice.lines_until("bob: still here");
    drain(&mut said);
    fill(&mut errors);
    let signalled = Instant::now();
    let status = terminate(&mut bob, "ocm whose errors stopped being read");
    // A chat that ends on a signal exits 0 when nothing holds it: standard error does not.
    assert_eq!(status.code(), Some(0), "{status}");
    let took = signalled.elapsed();
    assert!(took < OCM_SIGNAL_GRACE, "exited after {took:?}");
    alice.lines_until("* bob left");
}

/// Whether `ocm` (`pid`)'s thread named `name` is blocked writing to a pipe, from its
/// `/proc/PID/task/TID/wchan`; `None` where the kernel does not say (a wchan of `0`).
fn thread_writing_a_pipe(pid: u32, name: &str) -> Option<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("ocm's tasks");
    for task in tasks {
        let task = task.expect("a task").path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let wchan = std::fs::read_to_string(task.join("wchan")).unwrap_or_default();
        if wchan.is_empty() || wchan == "0" {
            return None;
        }
        return Some(wchan.contains("pipe_write"));
    }
    Some(false)
}

/// Bob, an `ocm` joined to `room` (which alice hosts in `d`) with `args`, stuck on its
/// standard output, which nobody reads: its receiver blocked writing alice's message there,
/// holding the screen. Bob's standard error is collected in the string returned. `None`
/// (the check skipped) where the kernel does not say where a thread waits.
fn bob_stuck_on_its_output(
    d: &Daemon,
    alice: &mut Ocm,
    room: &str,
    args: &[&str],
) -> Option<(
    KillOnDrop,
    std::io::PipeReader,
    Arc<std::sync::Mutex<String>>,
)> {
    let (unread, stdout) = full_pipe();
    let args = [&["join", room, "--name", "bob"], args].concat();
    let mut bob = KillOnDrop(ocm_with_outputs(d, &args, &[], stdout, Stdio::piped()));
    let errors = bob.0.stderr.take().expect("stderr");
    let said = Arc::new(std::sync::Mutex::new(String::new()));
    {
        let said = Arc::clone(&said);
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(errors).lines() {
                let Ok(line) = line else { break };
                said.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
    }
    alice.lines_until("* bob joined");
    wait_until("bob live", || {
        said.lock().unwrap().contains("* --- live ---")
    });
    alice.type_line("for bob, who cannot show it");
    let mut blocked = None;
    wait_until("bob's receiver stuck on its output", || {
        blocked = thread_writing_a_pipe(bob.0.id(), "receiver");
        blocked != Some(false)
    });
    if blocked.is_none() {
        skipped("the kernel does not say where a thread waits (/proc/PID/task/TID/wchan)");
        return None;
    }
    Some((bob, unread, said))
}

/// A remark of the input thread (here `/help`) goes to standard error without waiting for
/// standard output, which nobody reads: the receiver is stuck there with a message, holding
/// the screen. So the lines after the remark are still sent, and the end of the input still
/// leaves the room (the input thread had waited for the screen for good, and the keepalives
/// kept bob in the room).
#[test]
fn ocm_stuck_on_its_output_still_reads_past_a_remark_and_leaves_at_the_end_of_input() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "unread", "--name", "alice"]);
    alice.wait_stderr("* created unread as alice");
    let Some((mut bob, _unread, said)) = bob_stuck_on_its_output(&d, &mut alice, "unread", &[])
    else {
        return;
    };
    let mut stdin = bob.0.stdin.take().expect("stdin");
    writeln!(stdin, "/help\nafter the help").unwrap();
    drop(stdin);
    alice.lines_until("bob: after the help");
    alice.lines_until("* bob left");
    let status = wait_for_exit(&mut bob.0, "ocm at the end of its input");
    assert!(status.success(), "{status:?}");
    wait_until("bob's help", || said.lock().unwrap().contains("* /help "));
}

/// The main loop's remarks do not wait for a standard output nobody reads either: here
/// `* cannot reach the server` (the daemon was killed; the idle check found it gone), after
/// which the main loop had waited for the screen for good, and never acted on the end of
/// the input.
#[test]
fn ocm_stuck_on_its_output_still_tells_of_a_server_gone_and_ends_with_its_input() {
    let mut d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "gone", "--name", "alice"]);
    alice.wait_stderr("* created gone as alice");
    let stuck = bob_stuck_on_its_output(&d, &mut alice, "gone", &["--idle-check", "1"]);
    let Some((mut bob, _unread, said)) = stuck else {
        return;
    };
    d.kill9();
    wait_until("bob told that the server cannot be reached", || {
        said.lock().unwrap().contains("* cannot reach the server")
    });
    drop(bob.0.stdin.take());
    let status = wait_for_exit(&mut bob.0, "ocm at the end of its input");
    assert!(status.success(), "{status:?}");
}

/// An `ocm` whose standard error nobody reads (a closed pipe) loses its remarks, not its
/// session: it still chats, and leaves the room at the end of its input.
#[test]
fn ocm_with_a_closed_stderr_still_chats_and_leaves() {
    let d = Daemon::start();
    let alice = Ocm::start(&d, &["create", "quiet", "--name", "alice"]);
    alice.wait_stderr("* created quiet as alice");
    let (unread, stderr) = std::io::pipe().expect("pipe");
    drop(unread);
    let mut bob = ocm_with_outputs(
        &d,
        &["join", "quiet", "--name", "bob"],
        &[],
        Stdio::null(),
        stderr,
    );
    alice.lines_until("* bob joined");
    let mut stdin = bob.stdin.take().expect("stdin");
    writeln!(stdin, "hi from bob").unwrap();
    alice.lines_until("bob: hi from bob");
    drop(stdin);
    let status = wait_for_exit(&mut bob, "ocm at the end of its input");
    assert!(status.success(), "{status:?}");
    alice.lines_until("* bob left");
}

/// `ocm` with `args`, its standard output `/dev/full` (every write fails: a full disk).
fn ocm_into_dev_full(d: &Daemon, args: &[&str]) -> std::process::Child {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    ocm_with_outputs(d, args, &[], full, Stdio::piped())
}

/// Waits for `ocm` (`what`) to exit and asserts that it failed (exit 1) on its output, saying
/// so on standard error.
fn assert_exits_on_its_full_output(ocm: &mut std::process::Child, what: &str) {
    let status = wait_for_exit(ocm, what);
    let mut said = String::new();
    use std::io::Read;
    ocm.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut said)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status}: {said}");
    assert!(
        said.contains("writing to standard output: No space left on device"),
        "{said}"
    );
}

/// An output that fails for another reason than its reader going away (a full disk, here
/// `/dev/full`) ends the chat as a failure: `ocm` leaves the room, says why and exits 1,
/// unlike a closed pipe, which ends it as the user leaving.
#[test]
fn ocm_whose_output_fails_leaves_and_exits_with_the_error() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "full", "--name", "alice"]);
    alice.wait_stderr("* created full as alice");
    let mut bob = ocm_into_dev_full(&d, &["join", "full", "--name", "bob"]);
    alice.lines_until("* bob joined");
    // Bob's ocm cannot print it.
    alice.type_line("hello");
    alice.lines_until("* bob left");
    assert_exits_on_its_full_output(&mut bob, "ocm whose output failed");
}

/// An answer that cannot be written (a full disk, here `/dev/full`) is an error, exit 1, as
/// in a chat; only a reader that went away (`ocm rooms | head -1`) is not.
#[test]
fn ocm_rooms_into_a_full_output_exits_with_the_error() {
    let d = Daemon::start();
    create(&d, "lobby", "alice");
    let mut rooms = ocm_into_dev_full(&d, &["rooms"]);
    assert_exits_on_its_full_output(&mut rooms, "ocm rooms into /dev/full");
}

#[test]
fn original_members_never_see_an_extension_frame() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "mixed", "--name", "alice"]);
    alice.wait_stderr("* created mixed as alice");
    // An original member: JSON-string join, raw UDP.
    let orig = Member::new(&d, "mixed", &join(&d, "mixed", "orig"));
    let mut registered = false;
    for _ in 0..50 {
        orig.send("__REGISTER__");
        orig.send("probe");
        if alice.line() == "orig: probe" {
            registered = true;
            break;
        }
    }
    assert!(registered, "alice hears the original member");

    let mut bob = Ocm::start(&d, &["join", "mixed", "--name", "bob"]);
    bob.wait_stderr("* joined mixed as bob");
    alice.lines_until("* bob joined");
    bob.type_line("hi from bob");
    alice.lines_until("bob: hi from bob");
    bob.type_line("/quit");
    assert!(bob.wait().success());
    alice.lines_until("* bob left");

    // A second ocm member in the original form, for good measure.
    let mut carol = Ocm::start(&d, &["join", "mixed", "--name", "carol", "--original"]);
    carol.wait_stderr("* joined mixed as carol");
    carol.type_line("hi from carol");
    alice.lines_until("carol: hi from carol");
    carol.type_line("/quit");
    assert!(carol.wait().success());
    assert!(
        !carol.stderr.lock().unwrap().contains("--- live ---"),
        "--original skips the history"
    );

    alice.type_line("bye all");
    alice.type_line("/quit");
    assert!(alice.wait().success());

    let mut texts = Vec::new();
    loop {
        let bytes = orig.recv_raw();
        match delivery::parse(&bytes) {
            Ok(Delivery::Chat { sender, message }) => texts.push(format!("{sender}: {message}")),
            Ok(Delivery::RoomClosed) => break,
            other => panic!("an original member got an extension frame: {other:?} {bytes:02x?}"),
        }
    }
    for expected in ["bob: hi from bob", "carol: hi from carol", "alice: bye all"] {
        assert!(texts.iter().any(|t| t == expected), "{expected}: {texts:?}");
    }
}

#[test]
fn history_entries_carry_the_time_they_were_relayed() {
    let d = Daemon::start();
    let (alice, _bob) = room_of_two(&d, "lobby");
    let body = format!(r#"{{"token": "{}"}}"#, alice.token);
    let page: HistoryPage = payload::parse_json(
        &ask(&d, Operation::History, "lobby", body.as_bytes()).expect("history"),
    )
    .unwrap();
    let message = page.messages.last().expect("the probe is in the history");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - message.at).abs() < Duration::from_secs(600).as_secs_f64(),
        "at = {} for a message relayed just now ({now})",
        message.at
    );
}

/// Members without batches get a burst through segmented sends (`UDP_SEGMENT`): the same
/// datagrams, one per message, in order; `udp.segment_sends` turns it off and on at a reload.
#[test]
fn plain_members_get_a_burst_through_segmented_sends_one_datagram_per_message() {
    segmented_bursts("127.0.0.1:0", &[true, false, true]);
}

/// The same from a daemon on IPv6, to members on IPv6.
#[test]
fn plain_members_on_ipv6_get_a_burst_through_segmented_sends() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        skipped("this host has no IPv6 loopback");
        return;
    }
    segmented_bursts("[::1]:0", &[true]);
}

/// A library for `LD_PRELOAD` that, before `ocmd`'s first `sendmmsg` on a socket, tells the
/// socket to send without UDP checksums (`SO_NO_CHECK`), which segmenting needs: the kernel
/// then refuses every segmented send on it, and takes single datagrams.
const NO_UDP_CHECKSUMS: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/socket.h>

int sendmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags) {
    static int (*real_sendmmsg)(int, struct mmsghdr *, unsigned int, int);
    if (!real_sendmmsg)
        real_sendmmsg = (int (*)(int, struct mmsghdr *, unsigned int, int))dlsym(RTLD_NEXT, "sendmmsg");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_NO_CHECK, &one, sizeof one);
    return real_sendmmsg(fd, msgs, n, flags);
}
"#;

/// A kernel that refuses every segmented send costs no message: a burst still arrives whole,
/// in order, one datagram per message; the address is counted and warned about once, and the
/// next burst goes to it one datagram per send, without another refusal.
#[test]
fn a_kernel_that_refuses_segmented_sends_costs_no_message() {
    let build = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let library = preload_library(build.path(), "no_udp_checksums", NO_UDP_CHECKSUMS);
    let d = Daemon::start_with(Options {
        config: Some("[rate]\nchat_per_sec = 0.0\n".into()),
        metrics: true,
        env: vec![("LD_PRELOAD".into(), library.display().to_string())],
        ..Options::default()
    });
    d.assert_loaded(&library);
    let host = Member::new(&d, "plain", &create(&d, "plain", "host"));
    let bob = roomy(Member::new(&d, "plain", &join(&d, "plain", "bob")));
    let carol = roomy(Member::new(&d, "plain", &join(&d, "plain", "carol")));
    host.send("__REGISTER__");
    bob.registered_with(&host, "bob");
    carol.registered_with(&host, "carol");
    for round in ["a", "b"] {
        plain_burst_arrives_whole(&d, &host, &[&bob, &carol], round);
        assert_eq!(
            d.metric("ocm_udp_segmentation_refusals_total"),
            1.0,
            "{round}"
        );
    }
    assert_eq!(d.metric("ocm_datagrams_segmented_total"), 0.0);
    let log = d.log();
    assert_eq!(
        log.matches("UDP: the kernel refused a segmented send to 127.0.0.1:")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("127.0.0.1 gets one datagram per send for 10 minutes"),
        "{log}"
    );
}

/// Has `host` send a burst of 120 1000-byte messages (tagged `round`), and checks that each of
/// `members` got them whole, in order, one datagram per message.
fn plain_burst_arrives_whole(d: &Daemon, host: &Member, members: &[&Member], round: &str) {
    let expected: Vec<String> = (0..120)
        .map(|i| format!("{i:04} {}", "x".repeat(994)))
        .collect();
    for (sizes, texts) in burst(d, host, members, round, 120) {
        assert_eq!(texts, expected, "{round}: every message, in order");
        // One message a datagram: "host" and a 1000-byte text, as the original frame.
        assert_eq!(sizes, vec![1 + 4 + 1000; 120], "{round}");
    }
}

/// A daemon on `udp` and three members at its loopback address; the host sends a burst of 120
/// 1000-byte messages for each of `rounds` (segmented sends on or off, at a reload after the
/// first), which the two others must get whole, in order, one datagram per message, in two
/// segmented sends each when on.
fn segmented_bursts(udp: &str, rounds: &[bool]) {
    let config = |on: bool| format!("[udp]\nsegment_sends = {on}\n[rate]\nchat_per_sec = 0.0\n");
    let udp: std::net::SocketAddr = udp.parse().unwrap();
    let d = Daemon::start_with(Options {
        config: Some(config(rounds[0])),
        udp: Some(udp),
        metrics: true,
        ..Options::default()
    });
    let member = |token: &str| {
        let socket = std::net::UdpSocket::bind(std::net::SocketAddr::new(udp.ip(), 0)).unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        roomy(Member {
            socket,
            server: d.udp,
            room: "plain".into(),
            token: token.into(),
        })
    };
    let host = member(&create(&d, "plain", "host"));
    let bob = member(&join(&d, "plain", "bob"));
    let carol = member(&join(&d, "plain", "carol"));
    host.send("__REGISTER__");
    bob.registered_with(&host, "bob");
    carol.registered_with(&host, "carol");
    let segmented = || d.metric("ocm_datagrams_segmented_total");
    for (i, &on) in rounds.iter().enumerate() {
        let round = ["a", "b", "c", "d"][i % 4];
        if i > 0 {
            d.reload(&config(on));
        }
        let before = segmented();
        plain_burst_arrives_whole(&d, &host, &[&bob, &carol], round);
        // All 120 were relayed in one pass: each member's went in two segmented sends (64
        // and 56 datagrams: the kernel's most segments), or none at all.
        let expected_segmented = if on { 240.0 } else { 0.0 };
        assert_eq!(segmented() - before, expected_segmented, "{round}");
    }
    assert_eq!(d.metric("ocm_udp_segmentation_refusals_total"), 0.0);
}

/// Gives a test member a 2 MiB receive buffer: a burst for it waits in the kernel while
/// another member's is read.
fn roomy(m: Member) -> Member {
    let bytes: libc::c_int = 2 * 1024 * 1024;
    // SAFETY: a live socket and a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&m.socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF");
    m
}

/// Stops the daemon, has `sender` send `count` 1000-byte messages (so they all wait in the
/// daemon's socket and are relayed in one pass), resumes it, and returns, for each of
/// `members`, the sizes of the datagrams that carried them and the texts in arrival order.
fn burst(
    daemon: &Daemon,
    sender: &Member,
    members: &[&Member],
    tag: &str,
    count: usize,
) -> Vec<(Vec<usize>, Vec<String>)> {
    daemon.stop();
    for i in 0..count {
        sender.send(&format!("{tag}{i:04} {}", "x".repeat(994)));
    }
    daemon.signal(libc::SIGCONT);
    members
        .iter()
        .map(|m| {
            let (mut sizes, mut texts) = (Vec::new(), Vec::new());
            while texts.len() < count {
                let bytes = m.recv_raw();
                let prefix = format!("host: {tag}");
                let ours: Vec<String> = render(&bytes)
                    .split(" | ")
                    .filter_map(|t| t.strip_prefix(&prefix).map(str::to_owned))
                    .collect();
                // Anything else is a late registration probe.
                if !ours.is_empty() {
                    sizes.push(bytes.len());
                    texts.extend(ours);
                }
            }
            (sizes, texts)
        })
        .collect()
}

/// The first `expected` texts a member gets of a burst (the probes of later registrations
/// aside), and in how many datagrams.
fn burst_received(member: &Member, expected: usize) -> (Vec<String>, usize) {
    let (mut texts, mut datagrams) = (Vec::new(), 0);
    while texts.len() < expected {
        let bytes = member.recv_raw();
        let ours: Vec<String> = render(&bytes)
            .split(" | ")
            .filter(|text| !text.contains("probe from"))
            .map(str::to_owned)
            .collect();
        datagrams += usize::from(!ours.is_empty());
        texts.extend(ours);
    }
    (texts, datagrams)
}

/// The lines of `sent` (each `name: text`) that `name` did not send: what it should hear.
fn sent_by_others(sent: &[String], name: &str) -> Vec<String> {
    let own = format!("{name}: ");
    sent.iter()
        .filter(|line| !line.starts_with(&own))
        .cloned()
        .collect()
}

/// A burst from two senders, relayed in one pass, to a room of every kind of member: each
/// gets every message of the others once, in the order the daemon read them, in the frames it
/// asked for: batches for batch members (sequenced frames numbered in the room's order for
/// the one that asked for both), one datagram per message for the original clients.
#[test]
fn a_burst_from_two_senders_reaches_every_kind_of_member_whole_and_in_order() {
    let d = Daemon::start_with(Options {
        config: Some("[rate]\nchat_per_sec = 0.0\n".into()),
        ..Options::default()
    });
    let room = "mixed";
    let joined = |fields: &str| roomy(Member::new(&d, room, &join_with(&d, room, fields)));
    let host = roomy(Member::new(&d, room, &create(&d, room, "host")));
    let bat = joined(r#""username": "bat", "caps": ["batch"]"#);
    let seq = joined(r#""username": "seq", "caps": ["seq", "batch"]"#);
    let plain = roomy(Member::new(&d, room, &join(&d, room, "plain")));
    host.send("__REGISTER__");
    bat.registered_with(&host, "bat");
    seq.registered_with(&host, "seq");
    plain.registered_with(&host, "plain");
    // Both senders' messages wait in the daemon's socket, interleaved, and go out in one pass.
    let count = 40;
    d.stop();
    let mut sent = Vec::new();
    for i in 0..count {
        for (name, member) in [("host", &host), ("bat", &bat)] {
            let text = format!("m{i:03}");
            member.send(&text);
            sent.push(format!("{name}: {text}"));
        }
    }
    d.signal(libc::SIGCONT);
    let received = burst_received;
    let others = |name: &str| sent_by_others(&sent, name);
    let (host_got, host_datagrams) = received(&host, count);
    assert_eq!(host_got, others("host"), "the original host, bat's");
    assert_eq!(host_datagrams, count, "one datagram per message");
    let (bat_got, bat_datagrams) = received(&bat, count);
    assert_eq!(bat_got, others("bat"), "the batch member, the host's");
    assert!(bat_datagrams < count / 2, "{bat_datagrams} datagrams");
    let (plain_got, plain_datagrams) = received(&plain, 2 * count);
    assert_eq!(plain_got, others("plain"), "the original member, both");
    assert_eq!(plain_datagrams, 2 * count);
    let (seq_got, seq_datagrams) = received(&seq, 2 * count);
    assert!(seq_datagrams < count, "{seq_datagrams} datagrams");
    // Numbered in the room's order, one after the other.
    let numbers: Vec<u64> = seq_got
        .iter()
        .map(|t| t[1..t.find(' ').unwrap()].parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "{numbers:?}"
    );
    let unnumbered: Vec<String> = seq_got
        .iter()
        .map(|t| t[t.find(' ').unwrap() + 1..].to_owned())
        .collect();
    assert_eq!(unnumbered, others("seq"), "the member with both, both");
    // Nothing more of the burst: what each hears next is a message sent after it.
    plain.send("end");
    for member in [&host, &bat] {
        assert_eq!(member.recv(), "plain: end");
    }
    assert!(seq.recv().ends_with(" plain: end"));
    host.send("end");
    assert_eq!(plain.recv(), "host: end");
}

/// Chat to two rooms in turn, stopped in the daemon's socket and relayed in one pass: each
/// member gets the messages of the others in its own room once, in order, and nothing of the
/// other room's; batch members get theirs in batches though the rooms' messages alternate,
/// original members one datagram per message.
#[test]
fn two_rooms_in_turn_within_a_pass_each_get_their_own_whole_and_in_order() {
    let d = Daemon::start_with(Options {
        config: Some("[rate]\nchat_per_sec = 0.0\n".into()),
        ..Options::default()
    });
    // Host (original), two batch members, an original member.
    let room_of = |room: &str, p: &str| {
        let host = roomy(Member::new(
            &d,
            room,
            &create(&d, room, &format!("{p}host")),
        ));
        let joined = |name: &str| {
            let fields = format!(r#""username": "{p}{name}", "caps": ["batch"]"#);
            roomy(Member::new(&d, room, &join_with(&d, room, &fields)))
        };
        let (bat, bit) = (joined("bat"), joined("bit"));
        let plain = roomy(Member::new(&d, room, &join(&d, room, &format!("{p}plain"))));
        host.send("__REGISTER__");
        for (member, name) in [(&bat, "bat"), (&bit, "bit"), (&plain, "plain")] {
            member.registered_with(&host, &format!("{p}{name}"));
        }
        [host, bat, bit, plain]
    };
    let east = room_of("east", "e");
    let west = room_of("west", "w");
    let count = 30;
    d.stop();
    // What each room's members sent, east's and west's.
    let mut sent: [Vec<String>; 2] = Default::default();
    for i in 0..count {
        for (member, name, room) in [
            (&east[0], "ehost", 0),
            (&west[0], "whost", 1),
            (&east[1], "ebat", 0),
            (&west[1], "wbat", 1),
        ] {
            let text = format!("m{i:03}");
            member.send(&text);
            sent[room].push(format!("{name}: {text}"));
        }
    }
    d.signal(libc::SIGCONT);
    for (room, sent, p) in [(&east, &sent[0], "e"), (&west, &sent[1], "w")] {
        let others = |name: &str| sent_by_others(sent, &format!("{p}{name}"));
        let [host, bat, bit, plain] = room;
        let (got, datagrams) = burst_received(host, count);
        assert_eq!(got, others("host"), "{p}host");
        assert_eq!(datagrams, count, "{p}host: one datagram per message");
        let (got, datagrams) = burst_received(bat, count);
        assert_eq!(got, others("bat"), "{p}bat");
        assert!(datagrams < count / 2, "{p}bat: {datagrams} datagrams");
        let (got, datagrams) = burst_received(bit, 2 * count);
        assert_eq!(got, others("bit"), "{p}bit");
        assert!(datagrams < count / 2, "{p}bit: {datagrams} datagrams");
        let (got, datagrams) = burst_received(plain, 2 * count);
        assert_eq!(got, others("plain"), "{p}plain");
        assert_eq!(datagrams, 2 * count, "{p}plain");
    }
    // Nothing more of the burst, nor of the other room: what each hears next is its room's
    // message sent after it.
    for (room, p) in [(&east, "e"), (&west, "w")] {
        room[3].send("end");
        for member in &room[..3] {
            assert_eq!(member.recv(), format!("{p}plain: end"));
        }
    }
}

#[test]
fn batch_frames_respect_each_members_max_datagram_and_the_daemons_cap() {
    let mut d = Daemon::start_with(Options {
        // No chat rate limit: the bursts are 120 messages.
        config: Some(
            "[udp]\nmax_batch_datagram_bytes = 16384\n[rate]\nchat_per_sec = 0.0\n".into(),
        ),
        ..Options::default()
    });
    let host = Member::new(&d, "wide", &create(&d, "wide", "host"));
    let big = roomy(Member::new(
        &d,
        "wide",
        &join_with(
            &d,
            "wide",
            r#""username": "big", "caps": ["batch"], "max_datagram": 65507"#,
        ),
    ));
    let small = roomy(Member::new(
        &d,
        "wide",
        &join_with(&d, "wide", r#""username": "small", "caps": ["batch"]"#),
    ));
    host.send("__REGISTER__");
    big.registered_with(&host, "big");
    small.registered_with(&host, "small");
    // Out of range: refused with a clear reason, nothing joined.
    let refused = request(
        &d,
        Operation::JoinRoom,
        "wide",
        br#"{"username": "tiny", "caps": ["batch"], "max_datagram": 100}"#,
    );
    assert!(refused.token.is_none());
    let text = format!("{:?}", refused.compliance);
    assert!(
        text.contains("MalformedRequest") && text.contains("max_datagram"),
        "{text}"
    );

    let expected: Vec<String> = (0..120)
        .map(|i| format!("{i:04} {}", "x".repeat(994)))
        .collect();
    let check = |d: &Daemon, round: &str, cap: usize| {
        let got = burst(d, &host, &[&big, &small], round, 120);
        let (big_sizes, big_texts) = &got[0];
        let (small_sizes, small_texts) = &got[1];
        assert_eq!(big_texts, &expected, "{round}: every message, in order");
        assert_eq!(small_texts, &expected, "{round}: every message, in order");
        assert!(
            big_sizes.iter().all(|&n| n <= cap),
            "{round}: {big_sizes:?}"
        );
        assert!(
            big_sizes.iter().any(|&n| n > cap - 1100),
            "{round}: batches filled to the cap: {big_sizes:?}"
        );
        assert!(
            small_sizes.iter().all(|&n| n <= 4096),
            "{round}: {small_sizes:?}"
        );
        assert!(
            small_sizes.iter().any(|&n| n > 3000),
            "{round}: 4096-byte batches: {small_sizes:?}"
        );
    };
    check(&d, "a", 16384);

    // The daemon's cap is applied on reload.
    d.reload("[udp]\nmax_batch_datagram_bytes = 65507\n[rate]\nchat_per_sec = 0.0\n");
    check(&d, "b", 65507);

    // A member's max_datagram survives a restart (the config file is rewritten with 16384).
    d.terminate();
    d.restart();
    check(&d, "c", 16384);
}

#[test]
fn ocm_on_loopback_asks_for_64_kib_batches_and_original_mode_does_not() {
    let mut d = Daemon::start();
    let alice = Ocm::start(&d, &["create", "big", "--name", "alice"]);
    alice.wait_stderr("* created big as alice");
    let bob = Ocm::start(&d, &["join", "big", "--name", "bob", "--original"]);
    bob.wait_stderr("* joined big as bob");
    let (status, _) = d.terminate();
    assert!(status.success());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&d.state).unwrap()).unwrap();
    let entry = |name: &str| {
        state["tokens"]
            .as_object()
            .unwrap()
            .values()
            .find(|t| t["username"] == name)
            .unwrap_or_else(|| panic!("{name} in {state}"))
            .clone()
    };
    assert_eq!(entry("alice")["max_datagram"], 65507, "{state}");
    assert!(entry("bob").get("max_datagram").is_none(), "{state}");
}

/// The bound the daemon keeps Presence and History COMPLETE payloads under (the one
/// ListRooms uses), below the 16 KiB payload cap `ocm` reads replies with.
const MAX_REPLY_BYTES: usize = 15 * 1024;

/// A History request for `token`'s room; the raw COMPLETE payload.
fn history_payload(
    d: &Daemon,
    room: &str,
    token: &str,
    before: Option<u64>,
    limit: u32,
) -> Vec<u8> {
    let before = before.map_or(String::new(), |b| format!(r#", "before": {b}"#));
    let body = format!(r#"{{"token": "{token}", "limit": {limit}{before}}}"#);
    ask(d, Operation::History, room, body.as_bytes())
        .unwrap_or_else(|r| panic!("history refused: {r:?}"))
}

#[test]
fn a_room_keeps_at_most_its_history_byte_budget_and_that_survives_a_restart() {
    let mut d = Daemon::start_with(Options {
        config: Some("[history]\nmax_bytes_per_room = 10000\n".into()),
        ..Options::default()
    });
    let (alice, bob) = room_of_two(&d, "budget");
    // Text and sender name count: "bob" + 3000 bytes = 3003 a message, so three fit.
    for i in 1..=4 {
        let text = format!("{i}").repeat(3000);
        bob.send(&text);
        assert_eq!(alice.recv(), format!("bob: {text}"));
    }
    let kept = |d: &Daemon| -> Vec<String> {
        let raw = history_payload(d, "budget", &alice.token, None, 100);
        let page: HistoryPage = payload::parse_json(&raw).unwrap();
        page.messages
            .iter()
            .map(|m| m.text[..1].to_owned())
            .collect()
    };
    // The probe, then "1", were pushed out: the newest that fit in 10,000 bytes remain.
    assert_eq!(kept(&d), ["2", "3", "4"]);
    // SIGTERM writes every history; the restart loads it within the same budget.
    d.terminate();
    d.restart();
    assert_eq!(kept(&d), ["2", "3", "4"], "after a restart");
}

/// The journal's `history_append` records, as (kept, texts) pairs, oldest first.
fn history_appends(d: &Daemon, room: &str) -> Vec<(u64, Vec<String>)> {
    let journal = d.state.with_extension("json.journal");
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|r| r["op"] == "history_append" && r["room"] == room)
        .map(|r| {
            let texts = r["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["text"].as_str().unwrap().to_owned())
                .collect();
            (r["kept"].as_u64().unwrap(), texts)
        })
        .collect()
}

/// A periodic checkpoint writes the new history of every room while it stays under its
/// 4 MiB budget (`HISTORY_CHECKPOINT_BYTES`), not only the first room past a few KiB: a room
/// with 6 KB of new messages and the room after it are saved by the same checkpoint.
#[test]
fn one_checkpoint_saves_the_new_history_of_every_room_while_under_4_mib() {
    let d = Daemon::start_with(Options {
        config: Some("[history]\ncheckpoint_secs = 3\n".into()),
        ..Options::default()
    });
    // "big" is made first: a checkpoint takes the rooms in that order.
    let (big_alice, big_bob) = room_of_two(&d, "big");
    let (small_alice, small_bob) = room_of_two(&d, "small");
    small_bob.send("hi");
    assert_eq!(small_alice.recv(), "bob: hi");
    let long = "x".repeat(1000);
    for i in 0..6 {
        let text = format!("{i}{long}");
        big_bob.send(&text);
        assert_eq!(big_alice.recv(), format!("bob: {text}"));
    }
    let last = format!("5{long}");
    wait_until("a checkpoint holds the big room's last message", || {
        history_appends(&d, "big")
            .iter()
            .any(|(_, texts)| texts.contains(&last))
    });
    // In the same batch, or else 3 s later, with the next checkpoint.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !history_appends(&d, "small")
        .iter()
        .any(|(_, texts)| texts.iter().any(|t| t == "hi"))
    {
        assert!(
            Instant::now() < deadline,
            "the small room's message was left for a later checkpoint"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn history_checkpoints_append_only_new_messages_and_survive_kill_9_and_a_clean_stop() {
    let mut d = Daemon::start_with(Options {
        config: Some("[history]\nmessages = 3\ncheckpoint_secs = 1\n".into()),
        ..Options::default()
    });
    let (alice, bob) = room_of_two(&d, "log");
    let say = |text: &str| {
        bob.send(text);
        assert_eq!(alice.recv(), format!("bob: {text}"));
    };
    for i in 1..=5 {
        say(&format!("m{i}"));
    }
    wait_until("a checkpoint holds m5", || {
        history_appends(&d, "log")
            .iter()
            .any(|(_, texts)| texts.iter().any(|t| t == "m5"))
    });
    say("m6");
    wait_until("a checkpoint holds m6", || {
        history_appends(&d, "log")
            .iter()
            .any(|(_, texts)| texts.iter().any(|t| t == "m6"))
    });
    // The room was full (three kept): the checkpoint after m6 carries m6 alone, and says the
    // room keeps three.
    let appends = history_appends(&d, "log");
    assert_eq!(appends.last().unwrap(), &(3, vec!["m6".to_owned()]));
    let mut written: Vec<&String> = appends.iter().flat_map(|(_, texts)| texts).collect();
    let all = written.len();
    written.sort();
    written.dedup();
    assert_eq!(written.len(), all, "each message written once: {appends:?}");
    let kept = |d: &Daemon| -> Vec<String> {
        let raw = history_payload(d, "log", &alice.token, None, 100);
        let page: HistoryPage = payload::parse_json(&raw).unwrap();
        page.messages.into_iter().map(|m| m.text).collect()
    };
    d.kill9();
    d.restart();
    assert_eq!(
        kept(&d),
        ["m4", "m5", "m6"],
        "after kill -9: the journal replayed"
    );
    // SIGTERM writes a snapshot folded from the appends; the next start reads it alone.
    assert!(d.terminate().0.success());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&d.state).unwrap()).unwrap();
    let texts: Vec<&str> = state["rooms"]["log"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m4", "m5", "m6"], "the snapshot's history");
    d.restart();
    assert_eq!(kept(&d), ["m4", "m5", "m6"], "after the snapshot");
}

/// `[history] messages = 0` turns history off at a reload: what rooms kept is no longer
/// served, and a checkpoint trims it from the journal, so it does not come back when history
/// is turned on again after a kill -9.
#[test]
fn turning_history_off_at_a_reload_forgets_the_kept_messages_in_memory_and_on_disk() {
    let mut d = Daemon::start_with(Options {
        config: Some("[history]\nmessages = 5\ncheckpoint_secs = 1\n".into()),
        ..Options::default()
    });
    let (alice, bob) = room_of_two(&d, "off");
    for text in ["m1", "m2", "m3"] {
        bob.send(text);
        assert_eq!(alice.recv(), format!("bob: {text}"));
    }
    let kept = |d: &Daemon| -> Vec<String> {
        let raw = history_payload(d, "off", &alice.token, None, 100);
        let page: HistoryPage = payload::parse_json(&raw).unwrap();
        page.messages.into_iter().map(|m| m.text).collect()
    };
    // (The registration probe is kept as well: the texts end with the three messages.)
    assert!(kept(&d).ends_with(&["m1".into(), "m2".into(), "m3".into()]));
    wait_until("a checkpoint holds m3", || {
        history_appends(&d, "off")
            .iter()
            .any(|(_, texts)| texts.iter().any(|t| t == "m3"))
    });

    let config = d.dir.path().join("ocmd.toml");
    d.reload("[history]\nmessages = 0\ncheckpoint_secs = 1\n");
    assert_eq!(
        kept(&d),
        Vec::<String>::new(),
        "served after history was turned off"
    );
    wait_until("a checkpoint trims the room to nothing", || {
        history_appends(&d, "off")
            .last()
            .is_some_and(|(kept, _)| *kept == 0)
    });

    // Back on, after a crash: the journal replays the trim, and nothing old comes back.
    std::fs::write(&config, "[history]\nmessages = 5\ncheckpoint_secs = 1\n").unwrap();
    d.kill9();
    d.restart();
    assert_eq!(
        kept(&d),
        Vec::<String>::new(),
        "after kill -9 and a restart"
    );
    bob.send("m4");
    assert_eq!(alice.recv(), "bob: m4");
    assert_eq!(kept(&d), ["m4"]);
}

/// A shorter `checkpoint_secs` applies at the reload, not after the day-long wait the old
/// setting had already scheduled.
#[test]
fn a_reload_to_a_shorter_checkpoint_period_checkpoints_soon() {
    let d = Daemon::start_with(Options {
        config: Some("[history]\ncheckpoint_secs = 86400\n".into()),
        ..Options::default()
    });
    let (alice, bob) = room_of_two(&d, "soon");
    bob.send("m1");
    assert_eq!(alice.recv(), "bob: m1");
    assert!(
        history_appends(&d, "soon").is_empty(),
        "no checkpoint is due yet"
    );
    d.reload("[history]\ncheckpoint_secs = 1\n");
    wait_until("a checkpoint holds m1", || {
        history_appends(&d, "soon")
            .iter()
            .any(|(_, texts)| texts.iter().any(|t| t == "m1"))
    });
}

/// After a kill -9 the daemon numbers a room's messages again from its last checkpoint, so
/// numbers come back on new messages, among them numbers of `ocm`'s own messages, which it
/// never saw. It shows every new message, and reports none lost: its own messages' numbers
/// are not losses either.
#[test]
fn ocm_shows_the_messages_whose_numbers_a_crash_reused() {
    let mut d = Daemon::start_with(Options {
        // No periodic checkpoint: only the clean stop below saves the count.
        config: Some("[history]\ncheckpoint_secs = 86400\n".into()),
        ..Options::default()
    });
    let mut alice = Ocm::start(&d, &["create", "renum", "--name", "alice"]);
    alice.wait_stderr("* created renum as alice");
    let bob = Member::new(&d, "renum", &join(&d, "renum", "bob"));
    let deadline = Instant::now() + PATIENCE;
    loop {
        bob.send("__REGISTER__");
        bob.send("probe");
        if alice.line_within(Duration::from_millis(200)).as_deref() == Some("bob: probe") {
            break;
        }
        assert!(Instant::now() < deadline, "alice never heard bob");
    }
    let mut shown = Vec::new();
    let mut say = |alice: &mut Ocm, from_alice: bool, text: &str| {
        if from_alice {
            alice.type_line(text);
            assert_eq!(bob.recv(), format!("alice: {text}"));
        } else {
            bob.send(text);
            shown.extend(alice.lines_until(&format!("bob: {text}")));
        }
    };
    say(&mut alice, false, "m1");
    say(&mut alice, true, "a1");
    say(&mut alice, false, "m2");
    // A clean stop saves everything: the count goes on from m2.
    assert!(d.terminate().0.success());
    d.restart();
    say(&mut alice, true, "a2");
    say(&mut alice, false, "m3");
    // m3 and alice's a2 are not saved: after the crash their numbers come back.
    d.kill9();
    d.restart();
    for text in ["n1", "n2", "n3"] {
        bob.send(text);
    }
    let before = alice.lines_until("bob: n3");
    assert_eq!(before, ["bob: n1", "bob: n2"]);
    assert!(
        !shown.iter().any(|l| l.contains("lost")),
        "alice's own messages reported lost: {shown:?}"
    );
}

/// With history off, a room's count is still saved, so sequence numbers go on across a
/// restart instead of starting again at 1.
#[test]
fn sequence_numbers_go_on_across_a_restart_with_history_off() {
    let mut d = Daemon::start_with(Options {
        config: Some("[history]\nmessages = 0\n".into()),
        ..Options::default()
    });
    let host = Member::joined(&d, "count", &create(&d, "count", "host"));
    let seq = Member::new(
        &d,
        "count",
        &join_with(&d, "count", r#""username": "seq", "caps": ["seq"]"#),
    );
    seq.registered_with(&host, "seq");
    host.send("one");
    let first = seq.recv();
    assert!(first.ends_with(" host: one"), "{first}");
    let number = |line: &str| -> u64 { line[1..line.find(' ').unwrap()].parse().unwrap() };
    assert!(d.terminate().0.success());
    d.restart();
    host.send("two");
    let second = seq.recv();
    assert_eq!(second, format!("#{} host: two", number(&first) + 1));
}

#[test]
fn history_of_long_messages_is_cut_to_one_reply_keeping_the_newest() {
    let d = Daemon::start();
    let (alice, bob) = room_of_two(&d, "big");
    // Five messages of 4000 bytes: 20 KB of text, more than one reply may carry.
    let texts: Vec<String> = (0..5)
        .map(|i| format!("m{i}-{}", "x".repeat(3997)))
        .collect();
    for text in &texts {
        bob.send(text);
        assert_eq!(alice.recv(), format!("bob: {text}"));
    }

    // The default page (20) does not fit: the newest messages come, with more = true.
    let raw = history_payload(&d, "big", &alice.token, None, 20);
    assert!(raw.len() <= MAX_REPLY_BYTES, "{} bytes", raw.len());
    let page: HistoryPage = payload::parse_json(&raw).unwrap();
    assert!(page.more);
    let got: Vec<&str> = page.messages.iter().map(|m| m.text.as_str()).collect();
    let newest = &texts[texts.len() - got.len()..];
    assert!(!got.is_empty() && got.len() < texts.len(), "{}", got.len());
    assert_eq!(got, newest, "the newest messages, oldest first");
    assert!(page.messages.iter().all(|m| !m.truncated));

    // Paging back with `before` reaches every message, each reply under the bound.
    let mut seen: Vec<String> = got.iter().map(|t| t.to_string()).collect();
    let mut before = page.messages[0].seq;
    loop {
        let raw = history_payload(&d, "big", &alice.token, Some(before), 20);
        assert!(raw.len() <= MAX_REPLY_BYTES, "{} bytes", raw.len());
        let page: HistoryPage = payload::parse_json(&raw).unwrap();
        let mut older: Vec<String> = page.messages.iter().map(|m| m.text.clone()).collect();
        older.append(&mut seen);
        seen = older;
        if !page.more {
            break;
        }
        before = page.messages[0].seq;
    }
    assert_eq!(seen[seen.len() - texts.len()..], texts[..]);

    // One message of 4000 control characters is 24 KB of JSON on its own: it comes cut
    // short and marked, not as a reply too large to read (or none at all).
    let control = "\u{1}".repeat(4000);
    bob.send(&control);
    assert!(alice.recv_raw().len() > 4000, "relayed");
    let raw = history_payload(&d, "big", &alice.token, None, 1);
    assert!(raw.len() <= MAX_REPLY_BYTES, "{} bytes", raw.len());
    let page: HistoryPage = payload::parse_json(&raw).unwrap();
    assert_eq!(page.messages.len(), 1);
    let m = &page.messages[0];
    assert!(m.truncated);
    assert!(
        m.text.len() > 1000 && control.starts_with(&m.text),
        "{}",
        m.text.len()
    );
    assert!(page.more);
}

#[test]
fn presence_of_a_crowded_room_is_cut_to_one_reply() {
    let d = Daemon::start();
    // 80 members with 64-character, 247-byte names: about 22 KB of presence.
    let name = |i: usize| format!("{i:03}{}", "\u{1F600}".repeat(61));
    create(&d, "crowd", &name(0));
    const MEMBERS: usize = 80;
    for i in 1..MEMBERS {
        join(&d, "crowd", &name(i));
    }
    let raw = ask(&d, Operation::Presence, "crowd", b"{}").expect("presence");
    assert!(raw.len() <= MAX_REPLY_BYTES, "{} bytes", raw.len());
    let presence: payload::RoomPresence = payload::parse_json(&raw).unwrap();
    assert!(presence.more);
    assert_eq!(presence.host, name(0));
    let names: Vec<String> = presence.members.iter().map(|m| m.name.clone()).collect();
    assert!(names.len() > 10 && names.len() < MEMBERS, "{}", names.len());
    let first: Vec<String> = (0..names.len()).map(name).collect();
    assert_eq!(names, first, "host first, then in join order");

    // `ocm who` reads the reply and says that not everyone is shown.
    let (code, out, err) = run_ocm(&d, &["who", "crowd"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.last().map(String::as_str),
        Some("(more members than fit in one reply; not all are shown)")
    );
    assert_eq!(out.len(), names.len() + 2, "host line, members, the note");
}

/// Everything `source` yields until its end or an error, gathered by a thread of its own as
/// it arrives.
fn gathered(mut source: impl std::io::Read + Send + 'static) -> Arc<std::sync::Mutex<Vec<u8>>> {
    let gathered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = Arc::clone(&gathered);
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n @ 1..) = source.read(&mut buf) {
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    gathered
}

/// A pseudo-terminal pair: `ocm` gets the terminal end, the test the other.
struct Pty {
    controller: std::fs::File,
    terminal: std::os::fd::OwnedFd,
}

impl Pty {
    fn open() -> Pty {
        let (controller, terminal) = open_pty();
        Pty {
            controller,
            terminal,
        }
    }

    fn stdio(&self) -> Stdio {
        Stdio::from(self.terminal.try_clone().expect("dup the terminal"))
    }
}

/// `ocm` in a terminal stays responsive while messages pour in: a command typed meanwhile
/// is answered and `/quit` still leaves. The receiver used to wait for the line editor to
/// take its line while holding the screen's lock, and the input thread, acting on the
/// command, waited for that lock before the editor could read again: both stopped for good.
#[test]
fn ocm_in_a_terminal_answers_commands_while_a_flood_pours_in() {
    let d = Daemon::start_with(Options {
        config: Some("[rate]\nchat_per_sec = 0\n".into()),
        ..Options::default()
    });
    let host = Member::joined(&d, "flood", &create(&d, "flood", "host"));
    let pty = Pty::open();
    let mut ocm = Command::new(sibling_binary("ocm"))
        .args(["--server", "127.0.0.1", "--tcp-port"])
        .arg(d.tcp.port().to_string())
        .arg("--udp-port")
        .arg(d.udp.port().to_string())
        .args(["join", "flood", "--name", "alice"])
        .stdin(pty.stdio())
        .stdout(pty.stdio())
        .stderr(pty.stdio())
        .env_remove("RUST_LOG")
        .spawn()
        .map(KillOnDrop)
        .expect("spawn ocm");
    let controller = pty.controller.try_clone().unwrap();
    let mut keys = pty.controller.try_clone().unwrap();
    drop(pty);
    // Ends with EIO once ocm, the terminal's last holder, has exited.
    let screen = gathered(controller);
    let shown = |needle: &str, from: usize| {
        let screen = screen.lock().unwrap();
        String::from_utf8_lossy(&screen[from.min(screen.len())..]).contains(needle)
    };
    wait_until("ocm joined", || shown("joined flood as alice", 0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                host.send(&format!("flood {i} {}", "x".repeat(100)));
                i += 1;
            }
            i
        })
    };
    wait_until("the flood shows", || shown("host: flood 1", 0));
    let mut typist = |text: &str| {
        keys.write_all(text.as_bytes())
            .expect("type into the terminal")
    };
    let mark = screen.lock().unwrap().len();
    typist("/help\r");
    wait_until("/help answered during the flood", || {
        shown("/history [N]", mark)
    });
    typist("/quit\r");
    let status = wait_for_exit(&mut ocm.0, "ocm on /quit during the flood");
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert!(status.success(), "ocm: {status}");
    assert!(sent > 1, "{sent} messages sent");
}

/// The room closes while the line editor holds the terminal in raw mode, waiting for a
/// line: `ocm` exits with the terminal's mode put back (canonical input and echo), not
/// leaving the shell a raw terminal.
#[test]
fn ocm_in_a_terminal_gives_it_back_cooked_when_the_room_closes() {
    let d = Daemon::start();
    let host = Member::joined(&d, "brief", &create(&d, "brief", "host"));
    let pty = Pty::open();
    assert_eq!(pty.mode(), COOKED, "a new terminal is cooked");
    let mut ocm = pty.ocm(&d, &["join", "brief", "--name", "alice"]);
    wait_until("the line editor reads", || pty.mode() == 0);
    host.send("__LEAVE__");
    let status = wait_for_exit(&mut ocm.0, "ocm after the room closed");
    assert_eq!(status.code(), Some(OCM_ROOM_ENDED), "{status}");
    assert_eq!(pty.mode(), COOKED, "the terminal was left raw");
}

/// In a terminal, the up arrow brings back the last line typed, to be sent again.
#[test]
fn ocm_in_a_terminal_recalls_the_last_line_with_the_up_arrow() {
    let d = Daemon::start();
    let host = Member::joined(&d, "again", &create(&d, "again", "host"));
    let pty = Pty::open();
    let mut ocm = pty.ocm(&d, &["join", "again", "--name", "alice"]);
    wait_until("the line editor reads", || pty.mode() == 0);
    let mut keys = pty.controller.try_clone().unwrap();
    let said = |text: &str| loop {
        if host.recv().ends_with(text) {
            return;
        }
    };
    keys.write_all(b"hello\r").unwrap();
    said("alice: hello");
    wait_until("the line editor reads again", || pty.mode() == 0);
    keys.write_all(b"\x1b[A\r").unwrap();
    said("alice: hello");
    keys.write_all(b"/quit\r").unwrap();
    let status = wait_for_exit(&mut ocm.0, "ocm on /quit");
    assert!(status.success(), "{status}");
}

/// `ocm` typed at in a terminal but writing into a pipe (`ocm join … 2>&1 | tee chat.log`)
/// reads plain lines: the terminal stays cooked, and nothing in the pipe but what was said,
/// neither the escape sequences of a line editor nor a warning that one could not start
/// (rustyline refuses to print above the line when its output is not a terminal).
#[test]
fn ocm_typed_at_in_a_terminal_but_writing_into_a_pipe_reads_plain_lines() {
    let d = Daemon::start();
    let host = Member::joined(&d, "piped", &create(&d, "piped", "host"));
    let pty = Pty::open();
    let (pipe, into_pipe) = std::io::pipe().expect("a pipe");
    let mut ocm = pty.ocm_writing_to(
        &d,
        &["join", "piped", "--name", "alice"],
        Stdio::from(into_pipe.try_clone().expect("dup the pipe")),
        Stdio::from(into_pipe),
    );
    let written = gathered(pipe);
    let output = || String::from_utf8_lossy(&written.lock().unwrap()).into_owned();
    let mut keys = pty.controller.try_clone().unwrap();
    keys.write_all(b"hello\n").unwrap();
    while !host.recv().ends_with("alice: hello") {}
    // Read from now on, by the reader that took "hello": a line editor would be holding
    // the terminal raw for the next line while this shows.
    host.send("are you there?");
    wait_until("ocm shows the host's line", || {
        output().contains("host: are you there?")
    });
    assert_eq!(pty.mode(), COOKED, "the terminal was taken raw");
    keys.write_all(b"/quit\n").unwrap();
    let status = wait_for_exit(&mut ocm.0, "ocm on /quit");
    assert!(status.success(), "{status}");
    let output = output();
    assert!(output.contains("joined piped as alice"), "{output}");
    assert!(
        !output.contains('\x1b'),
        "escape sequences in the pipe: {output:?}"
    );
    assert!(!output.contains("line editing"), "{output}");
}

/// The local-mode flags of a terminal in canonical mode with echo, as a new one is.
const COOKED: libc::tcflag_t = libc::ICANON | libc::ECHO;

impl Pty {
    /// Which of the [`COOKED`] flags the terminal has on: none while a line editor holds it
    /// raw.
    fn mode(&self) -> libc::tcflag_t {
        use std::os::fd::AsRawFd;
        let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills the termios of a terminal descriptor we hold.
        let rc = unsafe { libc::tcgetattr(self.terminal.as_raw_fd(), termios.as_mut_ptr()) };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        // SAFETY: filled by the successful call above.
        unsafe { termios.assume_init() }.c_lflag & COOKED
    }

    /// Starts `ocm` against `d` with `args` in this terminal, its output read and dropped.
    fn ocm(&self, d: &Daemon, args: &[&str]) -> KillOnDrop {
        self.ocm_writing_to(d, args, self.stdio(), self.stdio())
    }

    /// [`Pty::ocm`] with standard output and error sent elsewhere than the terminal.
    fn ocm_writing_to(
        &self,
        d: &Daemon,
        args: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> KillOnDrop {
        use std::io::Read;
        let ocm = Command::new(sibling_binary("ocm"))
            .args(["--server", "127.0.0.1", "--tcp-port"])
            .arg(d.tcp.port().to_string())
            .arg("--udp-port")
            .arg(d.udp.port().to_string())
            .args(args)
            .stdin(self.stdio())
            .stdout(stdout)
            .stderr(stderr)
            .env_remove("RUST_LOG")
            .spawn()
            .map(KillOnDrop)
            .expect("spawn ocm");
        let mut controller = self.controller.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the terminal's last holder is gone.
            while let Ok(1..) = controller.read(&mut buf) {}
        });
        ocm
    }
}

/// The local port of the UDP socket process `pid` holds (its only one), from
/// `/proc/PID/fd` and `/proc/net/udp`.
fn udp_port_of(pid: u32) -> u16 {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's descriptors")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp");
    table
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9)?;
            let port = fields.get(1)?.rsplit_once(':')?.1;
            inodes
                .iter()
                .any(|i| i == inode)
                .then(|| u16::from_str_radix(port, 16).ok())?
        })
        .expect("the process holds a UDP socket")
}

/// Sends `payload` to 127.0.0.1:`to` in a UDP datagram that claims to come from
/// 127.0.0.1:`from`, through a raw socket; `false` without the privilege to open one.
fn send_forged_udp(from: u16, to: u16, payload: &[u8]) -> bool {
    // SAFETY: plain socket calls on a descriptor this function owns and closes; the buffers
    // passed outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
        if fd < 0 {
            return false;
        }
        let len = u16::try_from(8 + payload.len()).expect("a small datagram");
        let mut datagram = Vec::with_capacity(usize::from(len));
        datagram.extend_from_slice(&from.to_be_bytes());
        datagram.extend_from_slice(&to.to_be_bytes());
        datagram.extend_from_slice(&len.to_be_bytes());
        datagram.extend_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
        datagram.extend_from_slice(payload);
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let sent = libc::sendto(
            fd,
            datagram.as_ptr().cast(),
            datagram.len(),
            0,
            std::ptr::addr_of!(address).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        libc::close(fd);
        assert_eq!(
            sent,
            datagram.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        true
    }
}

/// A `__ROOM_CLOSED__` forged with the daemon's address does not end `ocm`'s session: it asks
/// the daemon over TCP, which still takes its token, so it says so and stays. A flood of them
/// costs the daemon a check per cool-down, not one each (and so cannot exhaust the request
/// rate limit, whose refusal would otherwise be taken for an answer). Nothing on standard
/// output says the room closed until it really does. Needs a raw socket (root or
/// `CAP_NET_RAW`).
#[test]
fn ocm_stays_in_its_room_after_forged_room_closed_notices() {
    let d = Daemon::start_with(Options {
        metrics: true,
        ..Options::default()
    });
    let mut alice = Ocm::start(&d, &["create", "forged", "--name", "alice"]);
    alice.wait_stderr("* created forged as alice");
    let mut bob = Ocm::start(&d, &["join", "forged", "--name", "bob"]);
    bob.wait_stderr("* joined forged as bob");
    let port = udp_port_of(bob.pid());
    if !send_forged_udp(d.udp.port(), port, delivery::ROOM_CLOSED) {
        skipped("no raw socket (not root, no CAP_NET_RAW)");
        return;
    }
    bob.wait_stderr("ignored a notice that the room closed");
    let checks = || d.metric("ocm_handshakes_total{operation=\"history\",result=\"ok\"}");
    let before = checks();
    let started = Instant::now();
    for _ in 0..250 {
        assert!(send_forged_udp(d.udp.port(), port, delivery::ROOM_CLOSED));
    }
    alice.type_line("still there?");
    let seen = bob.lines_until("alice: still there?");
    assert!(
        seen.iter().all(|line| !line.contains("closed")),
        "a forged closure reached standard output: {seen:?}"
    );
    alice.close_stdin();
    assert!(alice.wait().success());
    bob.lines_until("* room forged was closed");
    assert_eq!(
        bob.wait().code(),
        Some(OCM_ROOM_ENDED),
        "bob leaves with the real closure"
    );
    // At most one check per 2 s cool-down, and one for the real closure.
    let spent = started.elapsed().as_secs_f64();
    let asked = checks() - before;
    assert!(
        asked <= 2.0 + spent / 2.0,
        "{asked} checks in {spent:.1} s for 250 forged notices"
    );
}

/// While `ocm` asks the server whether a closure notice is true, it goes on: typed lines
/// are sent and `/quit` leaves at once, even when the server accepted the check's connection
/// and never answers (the check would time out after 10 s). The test plays the server
/// itself: it answers the create, then sends `__ROOM_CLOSED__` from its own UDP address,
/// which `ocm` cannot tell from a forgery, and holds the check's connection unanswered.
#[test]
fn ocm_goes_on_while_the_server_is_slow_to_confirm_a_closure() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP port");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut bob = Ocm::start_at(
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
        &["create", "quiet", "--name", "bob"],
    );
    let token = "0123456789abcdef0123456789abcdef";
    let (mut create, _) = uninterrupted(|| tcp.accept()).expect("the create's connection");
    let mut frames = FrameReader::default();
    let (state, _) = frames.next(&mut create).expect("the create request");
    assert_eq!(state, State::Request);
    let mut reply = Vec::new();
    for (state, body) in [
        (State::Compliance, {
            let mut out = Vec::new();
            payload::encode_success(&mut out);
            out
        }),
        (State::Complete, {
            let mut out = Vec::new();
            payload::encode_complete(token, &mut out);
            out
        }),
    ] {
        tcrp::Frame {
            operation: Operation::CreateRoom,
            state,
            room_name: b"quiet",
            payload: &body,
        }
        .encode(&mut reply)
        .unwrap();
    }
    create.write_all(&reply).unwrap();
    // What bob sends: its text, checked to carry the room and the token.
    let from_bob = || {
        let mut buf = [0u8; 4096];
        let (len, from) = uninterrupted(|| udp.recv_from(&mut buf)).expect("a datagram from ocm");
        let datagram = ucrp::datagram::parse(&buf[..len]).expect("a client datagram");
        assert_eq!(datagram.room_name, b"quiet");
        assert_eq!(datagram.token, token.as_bytes());
        let text = match datagram.message {
            ucrp::datagram::Message::Register => "__REGISTER__".to_owned(),
            ucrp::datagram::Message::Leave => "__LEAVE__".to_owned(),
            ucrp::datagram::Message::Chat(text) => text.to_owned(),
        };
        (text, from)
    };
    let (text, bob_addr) = from_bob();
    assert_eq!(text, "__REGISTER__");
    bob.wait_stderr("* created quiet as bob");

    udp.send_to(delivery::ROOM_CLOSED, bob_addr).unwrap();
    tcp.set_nonblocking(true).unwrap();
    let mut check = None;
    wait_until("ocm's closure check connects", || {
        check = tcp.accept().ok();
        check.is_some()
    });
    // Left unanswered from here on.
    let asked = Instant::now();
    bob.type_line("anyone?");
    loop {
        let (text, _) = from_bob();
        if text == "anyone?" {
            break;
        }
        assert_eq!(text, "__REGISTER__", "only keepalives before the line");
    }
    bob.type_line("/quit");
    assert!(bob.wait().success());
    let waited = asked.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "ocm left {waited:?} after the check began: it waited for the check"
    );
    loop {
        let (text, _) = from_bob();
        if text == "__LEAVE__" {
            break;
        }
        assert_eq!(text, "__REGISTER__", "only keepalives before the leave");
    }
    let stderr = bob.stderr.lock().unwrap().clone();
    assert!(!stderr.contains("closed"), "a closure was shown: {stderr}");
    // ocm has exited: its stdout reader ends at EOF, so wait for that, not zero time.
    assert_eq!(
        bob.rest_of_stdout(),
        Vec::<String>::new(),
        "nothing on stdout"
    );
    drop(check);
}
