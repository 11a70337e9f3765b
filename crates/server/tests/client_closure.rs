//! The real `ocm` acting on its room's closure while a pipe of lines is being paced out.

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Lines of bob's that the daemon saw after the room closed: each came with the closed
/// room's token, so each was answered `__ROOM_CLOSED__` (a few per second) or dropped.
fn after_closure(d: &Daemon) -> f64 {
    d.metric("ocm_closed_room_replies_total")
        + d.metric("ocm_datagrams_dropped_total{reason=\"unknown_token\"}")
}

/// Waits until the daemon has read every datagram sent to it so far: a one-byte datagram
/// sent now, which it drops as too short, comes after them in its socket's queue (loopback
/// delivers each send at once, in order).
fn daemon_caught_up(d: &Daemon) {
    let too_short = "ocm_datagrams_dropped_total{reason=\"too_short\"}";
    let before = d.metric(too_short);
    let probe = UdpSocket::bind("127.0.0.1:0").expect("bind the probe");
    probe.send_to(&[0xff], d.udp).expect("send the probe");
    wait_until("the daemon to read the probe", || {
        d.metric(too_short) > before
    });
}

/// The host leaves while bob pipes thousands of lines, paced at 45 a second: bob exits 3
/// (the room ended the chat) at once, not after the lines queued before the closure notice,
/// and sends few lines into the closed room meanwhile.
///
/// Before the fix the notice waited behind the 64 lines the main loop had queued, about
/// 1.4 s at the pace, and the closure check's answer behind 64 more: bob exited some 2.9 s
/// after the host left, having sent about 130 lines into the closed room. Now the room's
/// word overtakes the queued lines: the wait is the closure check, a TCP round trip on
/// loopback (milliseconds), plus at most one line's pace (22 ms). Two seconds are some forty
/// times that, for a loaded machine (six processes and threads hand the news on), and still
/// under the 2.9 s; 20 lines are 0.44 s of the pace, the tighter check.
#[test]
fn a_closure_overtakes_a_pipe_of_lines_being_paced_out() {
    let d = Daemon::start_with(Options {
        metrics: true,
        ..Options::default()
    });
    let mut alice = Ocm::start(&d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    let mut bob = Ocm::start(&d, &["join", "lobby", "--name", "bob"]);
    bob.wait_stderr("* joined lobby as bob");
    assert_eq!(alice.line(), "* bob joined");
    bob.wait_live();
    // 4000 lines take some 90 s at the pace: the room closes long before the last.
    let mut stdin = bob.take_stdin();
    let feeder = thread::spawn(move || {
        for i in 1..=4000 {
            // Fails once bob has exited: the rest is not needed.
            if writeln!(stdin, "line {i}").is_err() {
                return;
            }
        }
    });
    // The first 90 go at once, the rest at the pace: by line 150 bob's queue is full.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = alice.line_within(left).expect("bob's lines reach alice");
        if line == "bob: line 150" {
            break;
        }
    }
    assert_eq!(after_closure(&d), 0.0, "the room is open");
    alice.close_stdin();
    assert!(alice.wait().success());
    // Alice said __LEAVE__ before she exited.
    let left_at = Instant::now();
    let status = bob.wait();
    let took = left_at.elapsed();
    let stderr = bob.stderr.lock().unwrap().clone();
    assert_eq!(
        status.code(),
        Some(3),
        "the room ended the chat; stderr:\n{stderr}"
    );
    let rest = bob.rest_of_stdout();
    assert!(
        rest.iter().any(|l| l == "* room lobby was closed"),
        "{rest:?}"
    );
    daemon_caught_up(&d);
    let lost = after_closure(&d);
    eprintln!("bob exited {took:?} after the host left, with {lost} lines sent after the closure");
    assert!(
        took < Duration::from_secs(2),
        "bob exited {took:?} after the host left; stderr:\n{stderr}"
    );
    assert!(lost <= 20.0, "{lost} lines went into the closed room");
    feeder.join().expect("the feeder");
}

/// The bare notice the daemon sends members when the host leaves.
const ROOM_CLOSED: &[u8] = b"__ROOM_CLOSED__";

/// How long the daemon is kept stopped after a closure notice reached `ocm`: the closure
/// check waits that long for its answer, and every line `ocm` sends meanwhile is counted.
/// Some 45 lines at the chat's pace.
const CHECK_HELD: Duration = Duration::from_secs(1);

/// Whether a datagram of `ocm`'s is one of the piped chat lines (`line N`), not a keepalive.
fn is_chat_line(datagram: &[u8]) -> bool {
    datagram.windows(5).any(|w| w == b"line ")
}

/// What the proxy counted around one closure notice.
#[derive(Debug, Clone, Copy)]
struct Counted {
    /// Chat lines the proxy read after the notice was sent to `ocm` but before `ocm`'s
    /// receiver had taken it from its socket, or at that moment: sent before `ocm` knew.
    before: usize,
    /// Chat lines `ocm` sent once its receiver had taken the notice, while the daemon was
    /// stopped (its closure check unanswered).
    after: usize,
    /// How long after its receiver had taken the notice `ocm` sent the first of those (timed
    /// from the relay's last look that saw the notice still queued: never later than the
    /// receiver took it, however late the relay looked again).
    first_after: Option<Duration>,
}

/// A UDP relay between one `ocm` (given the relay as `--udp-port`) and the daemon, which
/// sees the relay as the member. When a `__ROOM_CLOSED__` comes from the daemon (or when
/// told to forge one), it stops the daemon, hands the notice to `ocm`, waits until `ocm`'s
/// receiver has taken it from its socket's queue, counts the chat lines `ocm` sends for
/// `held` ([`CHECK_HELD`] unless told), then lets the daemon go on and reports what it
/// counted.
struct Relay {
    addr: std::net::SocketAddr,
    forge: std::sync::mpsc::Sender<()>,
    counted: std::sync::mpsc::Receiver<Counted>,
}

impl Relay {
    fn start(d: &Daemon) -> Relay {
        Relay::holding_the_daemon(d, CHECK_HELD)
    }

    /// A relay that keeps the daemon stopped for `held` after each notice.
    fn holding_the_daemon(d: &Daemon, held: Duration) -> Relay {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the relay");
        socket
            .set_read_timeout(Some(Duration::from_millis(5)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("relay address");
        let (forge, forged) = std::sync::mpsc::channel();
        let (report, counted) = std::sync::mpsc::channel();
        let (daemon, pid) = (d.udp, d.pid());
        thread::spawn(move || {
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            loop {
                let notice = match forged.try_recv() {
                    Ok(()) => true,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                    Err(std::sync::mpsc::TryRecvError::Empty) => false,
                };
                let (len, from) = if notice {
                    (0, daemon)
                } else {
                    match socket.recv_from(&mut buf) {
                        Ok(got) => got,
                        Err(_) => continue,
                    }
                };
                if from != daemon {
                    client = Some(from);
                    let _ = socket.send_to(&buf[..len], daemon);
                    continue;
                }
                let Some(to) = client else { continue };
                if !notice && &buf[..len] != ROOM_CLOSED {
                    let _ = socket.send_to(&buf[..len], to);
                    continue;
                }
                stop_process(pid);
                // No later than the receiver took the notice: the last look that still saw
                // it queued, or its send (the hold, which starts after, is timed from here).
                let mut still_queued = Instant::now();
                socket.send_to(ROOM_CLOSED, to).expect("hand the notice on");
                wait_until("ocm to read the notice", || {
                    let looked = Instant::now();
                    let taken = udp_queue(to).is_some_and(|(queued, _)| queued == 0);
                    if !taken {
                        still_queued = looked;
                    }
                    taken
                });
                let mut first_after = None;
                let mut count = |until: Option<Instant>| {
                    let mut lines = 0;
                    socket.set_nonblocking(until.is_none()).expect("blocking");
                    while until.is_none_or(|at| Instant::now() < at) {
                        match socket.recv_from(&mut buf) {
                            Ok((len, from)) if from == to => {
                                if is_chat_line(&buf[..len]) {
                                    lines += 1;
                                    if until.is_some() && first_after.is_none() {
                                        first_after = Some(still_queued.elapsed());
                                    }
                                }
                                let _ = socket.send_to(&buf[..len], daemon);
                            }
                            Ok(_) => {}
                            Err(_) if until.is_none() => break,
                            Err(_) => {}
                        }
                    }
                    socket.set_nonblocking(false).expect("blocking");
                    lines
                };
                let before = count(None);
                let after = count(Some(Instant::now() + held));
                assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGCONT) }, 0);
                let counted = Counted {
                    before,
                    after,
                    first_after,
                };
                if report.send(counted).is_err() {
                    return;
                }
            }
        });
        Relay {
            addr,
            forge,
            counted,
        }
    }

    /// What the relay counted around its next closure notice.
    fn counted(&self) -> Counted {
        self.counted
            .recv_timeout(PATIENCE)
            .expect("the relay saw a closure notice")
    }
}

/// Starts alice hosting `lobby` and bob joining it through `relay`, with `lines` lines
/// piped into bob; returns once alice has seen bob's line `seen`.
fn bob_piping_through(
    d: &Daemon,
    relay: &Relay,
    lines: usize,
    seen: usize,
) -> (Ocm, Ocm, thread::JoinHandle<()>) {
    let alice = Ocm::start(d, &["create", "lobby", "--name", "alice"]);
    alice.wait_stderr("* created lobby as alice");
    let mut bob = Ocm::start_at(
        d.tcp.port(),
        relay.addr.port(),
        &["join", "lobby", "--name", "bob"],
    );
    bob.wait_stderr("* joined lobby as bob");
    assert_eq!(alice.line(), "* bob joined");
    bob.wait_live();
    let mut stdin = bob.take_stdin();
    let feeder = thread::spawn(move || {
        for i in 1..=lines {
            // Fails once bob has exited: the rest is not needed.
            if writeln!(stdin, "line {i}").is_err() {
                return;
            }
        }
    });
    let expected = format!("bob: line {seen}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = alice.line_within(left).expect("bob's lines reach alice");
        if line == expected {
            break;
        }
    }
    (alice, bob, feeder)
}

/// The host leaves while bob pipes lines paced out: from the moment bob's receiver has taken
/// `__ROOM_CLOSED__` from its socket, bob sends no line, while the closure check waits for
/// the daemon (stopped for a second), and then exits 3.
///
/// Before the fix bob went on sending while the check was out: some 45 lines in the second
/// the daemon was stopped (2 with the daemon answering at once, on loopback).
#[test]
fn no_line_is_sent_once_the_closure_notice_came() {
    let d = Daemon::start();
    let relay = Relay::start(&d);
    let (mut alice, mut bob, feeder) = bob_piping_through(&d, &relay, 4000, 150);
    alice.close_stdin();
    assert!(alice.wait().success());
    let counted = relay.counted();
    let status = bob.wait();
    let stderr = bob.stderr.lock().unwrap().clone();
    eprintln!(
        "bob sent {} lines before he read the notice, {} after",
        counted.before, counted.after
    );
    assert_eq!(counted.after, 0, "{counted:?}; bob's stderr:\n{stderr}");
    assert_eq!(status.code(), Some(OCM_ROOM_ENDED), "stderr:\n{stderr}");
    let rest = bob.rest_of_stdout();
    assert!(
        rest.iter().any(|l| l == "* room lobby was closed"),
        "{rest:?}"
    );
    feeder.join().expect("the feeder");
}

/// A forged `__ROOM_CLOSED__` reaches bob while he pipes 300 lines: he holds his lines while
/// the closure check waits for the daemon (stopped for a second), then, the daemon saying he
/// is still a member, sends every one of them: alice gets all 300, in order.
#[test]
fn lines_held_for_a_forged_closure_are_all_sent_after_it() {
    let d = Daemon::start();
    let relay = Relay::start(&d);
    let (alice, mut bob, feeder) = bob_piping_through(&d, &relay, 300, 100);
    relay.forge.send(()).expect("the relay runs");
    let counted = relay.counted();
    eprintln!(
        "bob sent {} lines before he read the notice, {} after",
        counted.before, counted.after
    );
    let bob_stderr = Arc::clone(&bob.stderr);
    let stderr = || bob_stderr.lock().unwrap().clone();
    assert_eq!(counted.after, 0, "{counted:?}; bob's stderr:\n{}", stderr());
    // About 200 lines left at 45 a second: some 5 s; a loaded machine gets more.
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 101..=300 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = alice.line_within(left).unwrap_or_else(|| {
            panic!(
                "alice got bob's lines to {} only; bob's stderr:\n{}",
                i - 1,
                stderr()
            )
        });
        assert_eq!(line, format!("bob: line {i}"));
    }
    feeder.join().expect("the feeder");
    assert!(bob.wait().success(), "stderr:\n{}", stderr());
    assert!(
        stderr().contains("* ignored a notice that the room closed"),
        "{}",
        stderr()
    );
}

/// How long `ocm` holds its lines at most while a closure notice is being checked
/// (`HOLD_LIMIT` in crates/client/src/chat/mod.rs).
const OCM_HOLD_LIMIT: Duration = Duration::from_secs(2);

/// A forged `__ROOM_CLOSED__` reaches bob while he pipes lines, and the daemon, stopped,
/// takes the closure check's connection but does not answer for 5 s: bob holds his lines
/// for `OCM_HOLD_LIMIT`, not for the check's timeouts, then sends them again; once the
/// daemon answers that he is still a member, he stays, and the end of his input ends his
/// chat. (Not every line reaches alice: those sent to the stopped daemon reach it together
/// when it goes on, over its rate limit.)
#[test]
fn a_check_left_unanswered_holds_the_lines_for_the_hold_limit_only() {
    let d = Daemon::start();
    let relay = Relay::holding_the_daemon(&d, Duration::from_secs(5));
    let (_alice, mut bob, feeder) = bob_piping_through(&d, &relay, 400, 100);
    relay.forge.send(()).expect("the relay runs");
    let counted = relay.counted();
    let bob_stderr = Arc::clone(&bob.stderr);
    let stderr = || bob_stderr.lock().unwrap().clone();
    eprintln!("{counted:?}");
    let first = counted
        .first_after
        .unwrap_or_else(|| panic!("no line in 5 s: {counted:?}; stderr:\n{}", stderr()));
    // The hold starts when the receiver hands the notice on, after `first` starts (but for
    // the few instructions between the main loop's reading of the clock and of the notice
    // count, hence 5 ms); a loaded machine may start the lines late, not early.
    assert!(
        first >= OCM_HOLD_LIMIT - Duration::from_millis(5),
        "{counted:?}; stderr:\n{}",
        stderr()
    );
    assert!(
        first < OCM_HOLD_LIMIT + Duration::from_millis(2500),
        "{counted:?}; stderr:\n{}",
        stderr()
    );
    feeder.join().expect("the feeder");
    assert!(bob.wait().success(), "stderr:\n{}", stderr());
    assert!(
        stderr().contains("* ignored a notice that the room closed"),
        "{}",
        stderr()
    );
}
