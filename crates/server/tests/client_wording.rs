//! What the real `ocm` says, run against the real `ocmd`: refusals it finds itself, and its
//! remarks.

mod common;

use std::process::Command;

use common::*;

/// A username over the limits names them, and says nothing was sent.
#[test]
fn a_too_long_username_names_the_limits() {
    let d = Daemon::start();
    let name = "a".repeat(65);
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", &name]);
    assert!(!alice.wait().success());
    let stderr = alice.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains(
            "it is too long (at most 64 characters and 255 bytes of UTF-8); nothing was sent"
        ),
        "{stderr}"
    );
}

/// A chat line over the limit says it was not sent, and the limit.
#[test]
fn a_too_long_message_says_it_was_not_sent_and_the_limit() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    alice.type_line(&"x".repeat(5000));
    alice.wait_stderr("* message not sent: too long (at most ");
    alice.wait_stderr(" bytes of UTF-8 fit one message)");
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// With `--original`, `/who` names the flag as the reason, not the server.
#[test]
fn who_with_original_names_the_flag() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice", "--original"]);
    alice.wait_stderr("* created lobby as alice");
    alice.type_line("/who");
    alice.wait_stderr("* /who and /history are off with --original: that flag speaks");
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// `ocm rooms --help` does not offer `--udp-port`, which `rooms` does not use.
#[test]
fn rooms_help_offers_no_udp_port() {
    let out = Command::new(sibling_binary("ocm"))
        .args(["rooms", "--help"])
        .output()
        .expect("run ocm");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--tcp-port"), "{help}");
    assert!(!help.contains("--udp-port <"), "{help}");
}

/// A join refused for too many wrong passwords says what is counted, and that the right
/// password is refused too until the allowance refills.
#[test]
fn a_password_lockout_explains_its_rule() {
    let d = Daemon::start();
    let mut alice = Ocm::start(
        &d,
        &["create", "vault", "--name", "alice", "--password", "right"],
    );
    alice.wait_stderr("* created vault as alice");
    // Wrong guesses until the server stops checking them (5 by default; a slow machine may
    // see the allowance refill one now and then).
    let mut locked = false;
    for i in 0..20 {
        let name = format!("guess{i}");
        let mut guess = Ocm::start(
            &d,
            &["join", "vault", "--name", &name, "--password", "wrong"],
        );
        assert!(!guess.wait().success());
        if guess.stderr.lock().unwrap().contains("rate_limited")
            || guess
                .stderr
                .lock()
                .unwrap()
                .contains("too many wrong passwords")
        {
            locked = true;
            break;
        }
    }
    assert!(locked, "the server never stopped checking wrong passwords");
    let mut bob = Ocm::start(
        &d,
        &["join", "vault", "--name", "bob", "--password", "right"],
    );
    assert!(!bob.wait().success());
    let stderr = bob.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains(
            "per source address (an IPv4 address or an IPv6 /64): after 5, it checks none, \
             the right one included"
        ),
        "{stderr}"
    );
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// A join refused because the name is taken says that a session that ended without leaving
/// (the user's own, crashed a moment ago, perhaps) holds it until it expires, and when.
#[test]
fn a_taken_name_says_how_long_a_vanished_session_holds_it() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    let mut again = Ocm::start(&d, &["join", "lobby", "--name", "alice"]);
    assert!(!again.wait().success());
    let stderr = again.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains(
            "is already taken in room \"lobby\" (a session that ended without leaving keeps \
             its name until the server expires it: after three missed keepalives"
        ),
        "{stderr}"
    );
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// A join with `--original` to a room with a password is refused for the password, which
/// that flag cannot send (the original request is a bare name): the refusal says so, not
/// only "wrong or missing password" when `OCM_PASSWORD` holds the right one.
#[test]
fn a_password_refused_with_original_names_the_flag() {
    let d = Daemon::start();
    let mut alice = Ocm::start(
        &d,
        &["create", "vault", "--name", "alice", "--password", "right"],
    );
    alice.wait_stderr("* created vault as alice");
    let mut bob = Ocm::start_with_env(
        d.tcp.port(),
        d.udp.port(),
        &["join", "vault", "--name", "bob", "--original"],
        &[("OCM_PASSWORD", "right")],
    );
    assert_eq!(bob.wait().code(), Some(2));
    let stderr = bob.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains("wrong or missing password for room \"vault\" (--original sends none:"),
        "{stderr}"
    );
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// An empty `--server`, or a host no resolver can know, is a bad command line: exit status
/// 2 and a word on what is wrong, before anything is looked up or sent. It used to be tried
/// as a name and fail as "cannot resolve server", status 1: a server that cannot be
/// reached.
#[test]
fn an_impossible_server_host_is_a_bad_command_line() {
    for (host, said) in [
        ("", "the host is empty"),
        ("chat example", "a host name holds no spaces"),
        ("chat..example", "empty label"),
    ] {
        for args in NO_DAEMON_NEEDED {
            let (status, stderr) = ocm_at(&["--server", host], args);
            assert_eq!(status, Some(2), "{host:?} {args:?}: {stderr}");
            assert!(stderr.contains(said), "{host:?} {args:?}: {stderr}");
            assert!(stderr.contains("--server"), "{stderr}");
            assert!(!stderr.contains("resolve"), "{stderr}");
        }
    }
}

/// A long host name is the resolver's to judge, not the command line's: a label of 40 `é`
/// (80 bytes of UTF-8) that `/etc/hosts` may hold was refused as a bad command line (status
/// 2, "longer than 63 bytes"). Under `.invalid` (RFC 6761), which no resolver answers, it
/// now passes the check and fails in the lookup: status 1, a server that cannot be reached.
#[test]
fn a_long_server_name_is_looked_up_not_refused() {
    let host = format!("{}.invalid", "\u{e9}".repeat(40));
    for args in NO_DAEMON_NEEDED {
        let (status, stderr) = ocm_at(&["--server", &host], args);
        assert_eq!(status, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot resolve server {host:?}")),
            "{args:?}: {stderr}"
        );
    }
}

/// `RUST_LOG` shows the client's protocol steps on standard error, and `RUST_LOG_STYLE`
/// decides their colours even though they reach standard error through the client's own
/// queue (a pipe to env_logger): `always` colours them into a pipe, `never` does not. Only
/// without `RUST_LOG_STYLE` does the client choose, as env_logger would for standard error
/// (here a pipe: no colours).
#[test]
fn rust_log_shows_the_steps_and_rust_log_style_chooses_their_colours() {
    // Port 1 on the loopback: the connection is refused at once, after the first step.
    for (style, coloured) in [
        (Some("always"), true),
        (Some("never"), false),
        (None, false),
    ] {
        let mut ocm = Command::new(sibling_binary("ocm"));
        ocm.args(["--server", "127.0.0.1", "--tcp-port", "1", "rooms"])
            .env("RUST_LOG", "debug")
            .env_remove("RUST_LOG_STYLE")
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR")
            .env_remove("CLICOLOR_FORCE");
        if let Some(style) = style {
            ocm.env("RUST_LOG_STYLE", style);
        }
        let out = ocm.output().expect("run ocm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{style:?}: {stderr}");
        assert!(
            stderr.contains("connecting to 127.0.0.1:1"),
            "{style:?}: {stderr}"
        );
        assert_eq!(stderr.contains('\u{1b}'), coloured, "{style:?}: {stderr:?}");
    }
}

/// The line editor is for a terminal on both ends: on pipes `ocm` reads plain lines without
/// trying it, whatever `TERM` says, so it says nothing of line editing (trying it printed
/// "line editing unavailable, reading plain lines: ENOTTY" on every piped chat).
#[test]
fn on_pipes_with_an_editable_term_nothing_is_said_of_line_editing() {
    let d = Daemon::start();
    let mut alice = Ocm::start_with_env(
        d.tcp.port(),
        d.udp.port(),
        &["create", "lobby", "--name", "alice"],
        &[("TERM", "xterm")],
    );
    alice.wait_stderr("* created lobby as alice");
    alice.type_line("/quit");
    assert!(alice.wait().success());
    let stderr = alice.stderr.lock().unwrap().clone();
    assert!(!stderr.contains("line editing"), "{stderr}");
    assert!(!stderr.contains("ENOTTY"), "{stderr}");
}

/// The line editor needs a terminal on standard input as well as on standard output: with
/// input from elsewhere (here `/dev/null`, an input at its end at once) and output to a
/// terminal, `ocm` reads plain lines without trying the editor, so it says nothing of line
/// editing, and leaves at the end of its input (status 0).
#[test]
fn with_only_the_output_a_terminal_nothing_is_said_of_line_editing() {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let d = Daemon::start();
    let (_controller, terminal) = open_pty();
    let mut ocm = Command::new(sibling_binary("ocm"))
        .args(["--server", "127.0.0.1", "--tcp-port"])
        .arg(d.tcp.port().to_string())
        .arg("--udp-port")
        .arg(d.udp.port().to_string())
        .args(["create", "lobby", "--name", "alice"])
        .env("TERM", "xterm")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::from(terminal))
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ocm");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = ocm.try_wait().expect("wait for ocm") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ocm did not leave at the end of its input"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    ocm.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("* created lobby as alice"), "{stderr}");
    assert!(!stderr.contains("line editing"), "{stderr}");
    assert!(!stderr.contains("ENOTTY"), "{stderr}");
}

/// Without `--password` or `--password-file`, the password comes from `OCM_PASSWORD`, for
/// `join` and for `who` alike (so that it need not show in `ps`).
#[test]
fn ocm_password_in_the_environment_opens_a_room_with_a_password() {
    let d = Daemon::start();
    let mut alice = Ocm::start(
        &d,
        &["create", "vault", "--name", "alice", "--password", "right"],
    );
    alice.wait_stderr("* created vault as alice");
    let env = [("OCM_PASSWORD", "right")];
    let (tcp, udp) = (d.tcp.port(), d.udp.port());
    let mut who = Ocm::start_with_env(tcp, udp, &["who", "vault"], &env);
    let status = who.wait();
    assert!(status.success(), "{status}: {}", who.stderr.lock().unwrap());
    let mut bob = Ocm::start_with_env(tcp, udp, &["join", "vault", "--name", "bob"], &env);
    bob.wait_stderr("* joined vault as bob");
    alice.lines_until("* bob joined");
    bob.type_line("/quit");
    assert!(bob.wait().success());
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// A member whose name ends like a sender's (`alice: the key is`) is shown in quotes by the
/// other members' `ocm`, so that its line cannot read as one from `alice`.
#[test]
fn a_name_that_ends_like_a_sender_is_shown_in_quotes() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "colon", "--name", "alice"]);
    alice.wait_stderr("* created colon as alice");
    let mut mallory = Ocm::start(&d, &["join", "colon", "--name", "alice: the key is"]);
    mallory.wait_stderr("* joined colon as");
    alice.lines_until("* \"alice: the key is\" joined");
    mallory.type_line("42");
    assert_eq!(alice.line(), "\"alice: the key is\": 42");
    mallory.type_line("/quit");
    assert!(mallory.wait().success());
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// A port where nothing listens: `ocm` says the connection was refused, and what most likely
/// refused it (no daemon there, or not its handshake port), with exit status 1, a server that
/// cannot be reached. The port is held by a TCP socket bound but not listening, so no other
/// test can take it meanwhile.
#[test]
fn a_refused_connection_asks_whether_ocmd_runs_there() {
    let closed = BoundNotListening::new();
    let port = closed.port.to_string();
    for args in NO_DAEMON_NEEDED {
        let (status, stderr) = ocm_at(&["--server", "127.0.0.1", "--tcp-port", &port], args);
        assert_eq!(status, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot connect to 127.0.0.1:{}: ", closed.port)),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("; is ocmd running there, and is that its handshake port?"),
            "{args:?}: {stderr}"
        );
    }
}

/// Two commands that fail before any daemon answers when the server cannot be reached: a
/// room list, and a join.
const NO_DAEMON_NEEDED: [&[&str]; 2] = [&["rooms"], &["join", "lobby", "--name", "bob"]];

/// Runs `ocm SERVER_ARGS... ARGS...` to its end: its exit status and its standard error.
fn ocm_at(server_args: &[&str], args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(sibling_binary("ocm"))
        .args(server_args)
        .args(args)
        .output()
        .expect("run ocm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

/// A TCP socket bound to a loopback port of its own and never listening: a connection to
/// that port is refused for as long as it is held.
struct BoundNotListening {
    _fd: std::os::fd::OwnedFd,
    port: u16,
}

impl BoundNotListening {
    fn new() -> BoundNotListening {
        use std::os::fd::FromRawFd;
        // SAFETY: plain system calls on a descriptor this function owns; each result is
        // checked before the next step.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            use std::os::fd::AsRawFd;
            let bound = libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len);
            assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
            let mut len = len;
            let named = libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &mut len);
            assert_eq!(named, 0, "getsockname: {}", std::io::Error::last_os_error());
            BoundNotListening {
                _fd: fd,
                port: u16::from_be(addr.sin_port),
            }
        }
    }
}
