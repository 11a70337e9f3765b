//! The real `ocm` against the real `ocmd` when its membership ends without a notice it can
//! trust: the room vanished in a restart, the server went away, or a closure notice the
//! server cannot confirm.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// How many times `needle` occurs in `ocm`'s stderr so far.
fn count(ocm: &Ocm, needle: &str) -> usize {
    ocm.stderr.lock().unwrap().matches(needle).count()
}

/// A quiet member whose server went away says so once and chats on; when the server comes
/// back without its room, the next idle check ends the session with the reason.
#[test]
fn ocm_notices_its_room_vanished_in_a_restart_and_an_unreachable_server_once() {
    let mut d = Daemon::start();
    let mut alice = Ocm::start_with_env(
        d.tcp.port(),
        d.udp.port(),
        &["create", "lobby", "--name", "alice", "--idle-check", "1"],
        &[("RUST_LOG", "ocm::chat=debug")],
    );
    alice.wait_stderr("* created lobby as alice");
    // The server still has the room: the idle checks find us a member and say nothing.
    wait_until("an idle check", || count(&alice, "idle check: Ok") >= 1);
    d.kill9();
    alice.wait_stderr("* cannot reach the server: ");
    let seen = count(&alice, "idle check: ");
    wait_until("two more idle checks", || {
        count(&alice, "idle check: ") >= seen + 2
    });
    assert_eq!(
        count(&alice, "cannot reach the server"),
        1,
        "said more than once:\n{}",
        alice.stderr.lock().unwrap()
    );
    restart_with_fresh_state(&mut d);
    alice.wait_stderr(
        "* you are no longer in room lobby: the server no longer has the room (room_not_found)",
    );
    assert_eq!(alice.wait().code(), Some(OCM_ROOM_ENDED));
}

/// A member whose server went down (killed: nothing listens on its UDP port) is told as soon
/// as it sends, by the port's refusal (an ICMP port unreachable), rather than losing its
/// messages in silence until the idle check, which is an hour away here; an idle check is
/// made at once, and says the server cannot be reached. Told once per outage: not again for
/// the next message, but again once the server was heard from in between (back on the same
/// state, it relays bob's message) and then went down again. The session goes on throughout.
#[test]
fn ocm_tells_at_once_that_the_servers_udp_port_refused_a_message_once_per_outage() {
    const NOTICE: &str = "is closed (is the server down or restarting? is --udp-port right?)";
    const REFUSED: &str = "the server's UDP port is closed";
    let mut d = Daemon::start();
    let notice = format!("* the server's UDP port {} {NOTICE}", d.udp);
    // No keepalive and no idle check for an hour: only what alice types goes to the server.
    let mut alice = Ocm::start_with_env(
        d.tcp.port(),
        d.udp.port(),
        &[
            "create",
            "lobby",
            "--name",
            "alice",
            "--keepalive",
            "3600",
            "--idle-check",
            "3600",
        ],
        &[("RUST_LOG", "ocm::chat=debug")],
    );
    alice.wait_stderr("* created lobby as alice");
    let mut bob = Ocm::start(&d, &["join", "lobby", "--name", "bob", "--keepalive", "1"]);
    bob.wait_live();
    alice.lines_until("* bob joined");

    d.kill9();
    let sent = Instant::now();
    alice.type_line("anyone there?");
    alice.wait_stderr(&notice);
    let took = sent.elapsed();
    assert!(took < PATIENCE, "told after {took:?}");
    alice.wait_stderr("* cannot reach the server: ");
    // The next refusal in the same outage is not told again.
    alice.type_line("hello?");
    wait_until("the second refusal", || count(&alice, REFUSED) >= 2);
    assert_eq!(count(&alice, NOTICE), 1, "{}", alice.stderr.lock().unwrap());

    // Back on the same state: bob's keepalives register him again, and his message reaches
    // alice (the server kept her address), which is the server heard from again.
    d.restart();
    let deadline = Instant::now() + PATIENCE;
    loop {
        bob.type_line("back");
        if alice.line_within(Duration::from_millis(200)).as_deref() == Some("bob: back") {
            break;
        }
        assert!(Instant::now() < deadline, "alice never heard bob again");
    }
    // Down again: a new outage, told again.
    d.kill9();
    alice.type_line("gone again?");
    wait_until("the second notice", || count(&alice, NOTICE) >= 2);
    alice.type_line("/quit");
    assert!(alice.wait().success(), "{}", alice.stderr.lock().unwrap());
    bob.kill9();
}

/// With `--original` (no idle check: the original server cannot answer one) the refusal is
/// told all the same, and the chat goes on until the user leaves.
#[test]
fn an_original_member_is_told_of_the_refusal_too() {
    let mut d = Daemon::start();
    let notice = format!("* the server's UDP port {} is closed", d.udp);
    let mut alice = Ocm::start(
        &d,
        &[
            "create",
            "lobby",
            "--name",
            "alice",
            "--keepalive",
            "3600",
            "--original",
        ],
    );
    alice.wait_stderr("* created lobby as alice");
    d.kill9();
    alice.type_line("anyone there?");
    alice.wait_stderr(&notice);
    alice.type_line("/quit");
    assert!(alice.wait().success(), "{}", alice.stderr.lock().unwrap());
    let said = alice.stderr.lock().unwrap().clone();
    assert!(!said.contains("cannot reach the server"), "{said}");
}

/// `/who` or `/history` answered `room_not_found` (the room vanished in a restart) ends the
/// session with the reason, rather than leaving the member chatting into nothing.
#[test]
fn ocm_ends_when_who_or_history_finds_the_room_gone() {
    for command in ["/who", "/history"] {
        let mut d = Daemon::start();
        let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
        alice.wait_stderr("* created lobby as alice");
        d.kill9();
        restart_with_fresh_state(&mut d);
        alice.type_line(command);
        alice.wait_stderr("* you are no longer in room lobby: the server no longer has the room");
        assert_eq!(alice.wait().code(), Some(OCM_ROOM_ENDED), "after {command}");
    }
}

/// A UDP relay between `ocm` and the daemon that records what `ocm` sends, and can send
/// `ocm` a datagram from the relay's address (the one `ocm` takes for the server's).
struct Relay {
    socket: UdpSocket,
    /// `ocm`'s address, once it sent something.
    client: Arc<Mutex<Option<SocketAddr>>>,
    /// Every datagram from `ocm`, as sent.
    from_client: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Set: the way is cut, nothing is forwarded either way (what `ocm` sends is still
    /// recorded).
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(daemon: SocketAddr) -> Relay {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
        let relay = Relay {
            socket: socket.try_clone().expect("a second handle"),
            client: Arc::default(),
            from_client: Arc::default(),
            cut: Arc::default(),
        };
        let (client, from_client) = (Arc::clone(&relay.client), Arc::clone(&relay.from_client));
        let cut = Arc::clone(&relay.cut);
        // Detached: it ends with the test process, or after PATIENCE without a datagram.
        std::thread::spawn(move || {
            socket.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut buf = [0u8; 65536];
            while let Ok((len, from)) = uninterrupted(|| socket.recv_from(&mut buf)) {
                let cut = cut.load(std::sync::atomic::Ordering::SeqCst);
                if from == daemon {
                    if cut {
                        continue;
                    }
                    if let Some(to) = *client.lock().unwrap() {
                        let _ = socket.send_to(&buf[..len], to);
                    }
                } else {
                    *client.lock().unwrap() = Some(from);
                    from_client.lock().unwrap().push(buf[..len].to_vec());
                    if !cut {
                        let _ = socket.send_to(&buf[..len], daemon);
                    }
                }
            }
        });
        relay
    }

    fn port(&self) -> u16 {
        self.socket.local_addr().unwrap().port()
    }

    /// Cuts the way: from now on nothing is forwarded.
    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn leaves(&self) -> usize {
        self.from_client
            .lock()
            .unwrap()
            .iter()
            .filter(|d| {
                ucrp::datagram::parse(d).is_ok_and(|d| d.message == ucrp::datagram::Message::Leave)
            })
            .count()
    }
}

/// A closure notice the server cannot confirm (here it is down when `ocm` asks) still ends
/// the session, but `ocm` says `__LEAVE__` first: the room may still hold it.
#[test]
fn an_unconfirmed_closure_ends_the_session_with_a_leave() {
    let mut d = Daemon::start();
    let relay = Relay::start(d.udp);
    let mut alice = Ocm::start_at(
        d.tcp.port(),
        relay.port(),
        &["create", "lobby", "--name", "alice", "--keepalive", "3600"],
    );
    alice.wait_stderr("* created lobby as alice");
    wait_until("alice's __REGISTER__", || {
        relay.client.lock().unwrap().is_some()
    });
    let client = relay.client.lock().unwrap().expect("alice's address");
    d.kill9();
    relay
        .socket
        .send_to(ucrp::delivery::ROOM_CLOSED, client)
        .expect("send the notice");
    assert_eq!(alice.wait().code(), Some(OCM_ROOM_ENDED));
    // The relay may not have read it yet when alice exits.
    wait_until("alice's __LEAVE__ at the relay", || relay.leaves() >= 1);
    assert_eq!(relay.leaves(), 1, "{}", alice.stderr.lock().unwrap());
}

/// A TCP relay in front of the daemon: the first connection (the join's handshake) goes
/// through at once; later ones (the join's history fetch, then the checks) wait until
/// `open` is set, so the test decides how long `ocm` holds its screen at join.
struct HeldTcp {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl HeldTcp {
    fn start(daemon: SocketAddr) -> HeldTcp {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP port");
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(false));
        let gate = Arc::clone(&open);
        // Detached: it ends with the test process.
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { return };
                let gate = Arc::clone(&gate);
                std::thread::spawn(move || {
                    if n > 0 {
                        wait_until("the test to let the query through", || {
                            gate.load(Ordering::SeqCst)
                        });
                    }
                    let Ok(upstream) = std::net::TcpStream::connect(daemon) else {
                        return;
                    };
                    let (mut c_read, mut u_write) =
                        (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c_read, &mut u_write);
                        let _ = u_write.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut u_read, mut c_write) = (upstream, client);
                    let _ = std::io::copy(&mut u_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        HeldTcp { port, open }
    }

    fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A closure notice that reaches `ocm` while its join's hold is full (1 MiB of chat came
/// before the history) is not lost with the overflow: here it is forged, so at
/// release `ocm` asks the server, which says it is still in, and says so.
#[test]
fn a_closure_notice_after_a_full_join_hold_is_acted_on_at_release() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    let relay = Relay::start(d.udp);
    let tcp = HeldTcp::start(d.tcp);
    // The screen's debug line for each datagram a full hold drops shows that the hold was
    // full: without it (a frame lost in the kernel) the test would prove nothing.
    let mut bob = Ocm::start_with_env(
        tcp.port,
        relay.port(),
        &["join", "lobby", "--name", "bob", "--keepalive", "3600"],
        &[("RUST_LOG", "ocm::screen=debug")],
    );
    bob.wait_stderr("* joined lobby as bob");
    wait_until("bob's __REGISTER__", || {
        relay.client.lock().unwrap().is_some()
    });
    let client = relay.client.lock().unwrap().expect("bob's address");
    // Bob's history fetch waits at the TCP relay: his screen holds. Fill the hold to exactly
    // 1 MiB (16 frames of 62,000 bytes and one of the rest; each sent once bob read the one
    // before, so that his socket's buffer never overflows), send a few more that it drops,
    // then the notice.
    let frame = |len: usize| {
        let mut frame = Vec::new();
        // 1 size byte and "eve" come before the text.
        ucrp::delivery::encode_chat("eve", "z".repeat(len - 4).as_bytes(), &mut frame).unwrap();
        assert_eq!(frame.len(), len);
        frame
    };
    let full = 1 << 20;
    let mut sizes = vec![62_000; 16];
    sizes.push(full - 16 * 62_000);
    sizes.extend([100; 3]);
    for len in sizes {
        wait_until("bob reads the frame before", || {
            udp_queue(client).is_some_and(|(queued, _)| queued == 0)
        });
        relay
            .socket
            .send_to(&frame(len), client)
            .expect("send a frame");
    }
    relay
        .socket
        .send_to(ucrp::delivery::ROOM_CLOSED, client)
        .expect("send the notice");
    const DROPPED: &str = "dropping a datagram: the hold is full";
    wait_until("bob's hold to drop the three frames past it", || {
        bob.stderr.lock().unwrap().matches(DROPPED).count() == 3
    });
    let (_, lost) = udp_queue(client).expect("bob's socket");
    assert_eq!(
        lost, 0,
        "the kernel dropped frames for bob: the hold was not filled"
    );
    tcp.open();
    bob.wait_stderr("* ignored a notice that the room closed");
    let said = bob.stderr.lock().unwrap().clone();
    assert_eq!(said.matches(DROPPED).count(), 3, "{said}");
    bob.type_line("/quit");
    assert!(bob.wait().success());
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// A member cut off from the server's UDP past its keepalive limit (a laptop asleep, a
/// network gone) never hears the notice that it was removed: the server sends it into the
/// void. Its idle check, over TCP, learns it instead: the session ends with the reason,
/// exit status 3, and no `__LEAVE__` to a room that no longer holds it.
#[test]
fn a_member_cut_off_past_its_keepalive_limit_learns_it_from_the_idle_check() {
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    let relay = Relay::start(d.udp);
    let mut bob = Ocm::start_at(
        d.tcp.port(),
        relay.port(),
        &[
            "join",
            "lobby",
            "--name",
            "bob",
            "--keepalive",
            "1",
            "--idle-check",
            "1",
        ],
    );
    bob.wait_stderr("* joined lobby as bob");
    alice.lines_until("* bob joined");
    wait_until("bob's __REGISTER__", || {
        relay.client.lock().unwrap().is_some()
    });
    relay.cut();
    // The server expires him after three silent keepalive periods, and says so to alice.
    alice.lines_until("* bob timed out");
    bob.wait_stderr(
        "* you are no longer in room lobby: the server no longer counts you as a member \
         (not_member)",
    );
    assert_eq!(bob.wait().code(), Some(OCM_ROOM_ENDED));
    // A marker behind anything bob sent before exiting: once the relay has it, it has read
    // (and recorded) every earlier datagram, a last __LEAVE__ included.
    let marker = UdpSocket::bind("127.0.0.1:0").unwrap();
    marker
        .send_to(b"marker", ("127.0.0.1", relay.port()))
        .unwrap();
    wait_until("the relay reads the marker", || {
        relay
            .from_client
            .lock()
            .unwrap()
            .iter()
            .any(|d| d == b"marker")
    });
    assert_eq!(relay.leaves(), 0, "no __LEAVE__ after a confirmed end");
    alice.type_line("/quit");
    assert!(alice.wait().success());
}

/// A library for `LD_PRELOAD` whose first `sendto` on a datagram socket fails with `EPERM`
/// (as a firewall rule makes it fail), and every later one goes through.
const FIRST_UDP_SEND_REFUSED: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>

ssize_t sendto(int fd, const void *buf, size_t len, int flags,
               const struct sockaddr *to, socklen_t tolen) {
    static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    static int refused;
    if (!real_sendto)
        real_sendto = (ssize_t (*)(int, const void *, size_t, int, const struct sockaddr *, socklen_t))
            dlsym(RTLD_NEXT, "sendto");
    int type = 0;
    socklen_t size = sizeof type;
    if (!refused && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) == 0 && type == SOCK_DGRAM) {
        refused = 1;
        errno = EPERM;
        return -1;
    }
    return real_sendto(fd, buf, len, flags, to, tolen);
}
"#;

/// A first `__REGISTER__` that cannot be sent ends `ocm` with the error, and ends its session
/// as every other way out does: the daemon hears a `__LEAVE__` (the socket takes that one), so
/// the room does not keep a member that is gone. `ocm` used to return the error alone, and
/// the room kept bob until he expired.
#[test]
fn a_first_register_that_cannot_be_sent_ends_the_session_with_a_leave() {
    let build = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let library = preload_library(
        build.path(),
        "first_udp_send_refused",
        FIRST_UDP_SEND_REFUSED,
    );
    let d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    let library = library.display().to_string();
    let mut bob = Ocm::start_with_env(
        d.tcp.port(),
        d.udp.port(),
        &["join", "lobby", "--name", "bob"],
        &[("LD_PRELOAD", &library)],
    );
    let status = bob.wait();
    assert!(!status.success(), "{status:?}");
    let said = bob.stderr.lock().unwrap().clone();
    assert!(said.contains("sending __REGISTER__"), "{said}");
    assert!(said.contains("Operation not permitted"), "{said}");
    // The join was acknowledged, so bob was in the room; his __LEAVE__ takes him out.
    alice.lines_until("* bob left");
    let names: Vec<String> = presence_of(&d, "lobby", b"{}")
        .members
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["alice"]);
    alice.type_line("/quit");
    assert!(alice.wait().success());
}
