//! The real `ocm` against the real `ocmd` when its membership ends without a notice it can
//! trust: the room vanished in a restart, the server went away, or a closure notice the
//! server cannot confirm.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

use common::*;

/// Starts the stopped daemon again on the same ports with no state at all: every room and
/// token it had is gone, as after a restart on a lost or fresh state file.
fn restart_with_fresh_state(d: &mut Daemon) {
    for entry in std::fs::read_dir(d.dir.path()).expect("the state directory") {
        let path = entry.expect("a directory entry").path();
        if path.file_name().is_some_and(|name| name != "ocmd.toml") {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove a state directory");
            } else {
                std::fs::remove_file(&path).expect("remove a state file");
            }
        }
    }
    d.restart();
}

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
    assert!(alice.wait().success());
}

/// `/who` answered `room_not_found` (the room vanished in a restart) ends the session with
/// the reason, rather than leaving the member chatting into nothing.
#[test]
fn ocm_ends_when_who_finds_the_room_gone() {
    let mut d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    d.kill9();
    restart_with_fresh_state(&mut d);
    alice.type_line("/who");
    alice.wait_stderr("* you are no longer in room lobby: the server no longer has the room");
    assert!(alice.wait().success());
}

/// The same for `/history`.
#[test]
fn ocm_ends_when_history_finds_the_room_gone() {
    let mut d = Daemon::start();
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    d.kill9();
    restart_with_fresh_state(&mut d);
    alice.type_line("/history");
    alice.wait_stderr("* you are no longer in room lobby: the server no longer has the room");
    assert!(alice.wait().success());
}

/// A UDP relay between `ocm` and the daemon that records what `ocm` sends, and can send
/// `ocm` a datagram from the relay's address (the one `ocm` takes for the server's).
struct Relay {
    socket: UdpSocket,
    /// `ocm`'s address, once it sent something.
    client: Arc<Mutex<Option<SocketAddr>>>,
    /// Every datagram from `ocm`, as sent.
    from_client: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Relay {
    fn start(daemon: SocketAddr) -> Relay {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
        let relay = Relay {
            socket: socket.try_clone().expect("a second handle"),
            client: Arc::default(),
            from_client: Arc::default(),
        };
        let (client, from_client) = (Arc::clone(&relay.client), Arc::clone(&relay.from_client));
        // Detached: it ends with the test process, or after PATIENCE without a datagram.
        std::thread::spawn(move || {
            socket.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut buf = [0u8; 65536];
            while let Ok((len, from)) = socket.recv_from(&mut buf) {
                if from == daemon {
                    if let Some(to) = *client.lock().unwrap() {
                        let _ = socket.send_to(&buf[..len], to);
                    }
                } else {
                    *client.lock().unwrap() = Some(from);
                    from_client.lock().unwrap().push(buf[..len].to_vec());
                    let _ = socket.send_to(&buf[..len], daemon);
                }
            }
        });
        relay
    }

    fn port(&self) -> u16 {
        self.socket.local_addr().unwrap().port()
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
    assert!(alice.wait().success());
    // The relay may not have read it yet when alice exits.
    wait_until("alice's __LEAVE__ at the relay", || relay.leaves() >= 1);
    assert_eq!(relay.leaves(), 1, "{}", alice.stderr.lock().unwrap());
}
