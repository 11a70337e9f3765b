//! The real `ocm` acting on its room's closure while a pipe of lines is being paced out.

mod common;

use std::io::Write;
use std::net::UdpSocket;
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
/// loopback (milliseconds), plus at most one line's pace (22 ms). One second is some twenty
/// times that, for a loaded machine, and still well under the 2.9 s; 20 lines are 0.44 s of
/// the pace.
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
        took < Duration::from_secs(1),
        "bob exited {took:?} after the host left; stderr:\n{stderr}"
    );
    assert!(lost <= 20.0, "{lost} lines went into the closed room");
    feeder.join().expect("the feeder");
}
