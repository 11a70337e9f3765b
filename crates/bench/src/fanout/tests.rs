//! The fan-out's counting: loss, skipped slots and the sweep's verdicts.

use super::senders::{owed, slot_due_ns, slots_caught_up, Owed};
use super::*;
use crate::receivers::read_text;

/// The batch sweep's sustained step of the 10:46 UTC matrix on 2026-12-04: 515,600 messages
/// offered, all delivered, and 1,181 schedule slots skipped by held-up senders.
const PUBLISHED_STEP: &str = r#"{"members": 64, "senders": 2, "bytes": 128, "caps": "batch",
    "pace": {"Rate": 258403.0382765787}, "seconds": 2.000443646, "offered": 515600,
    "offered_per_sec": 257742.82671295007, "client_send_errors": 0, "expected": 32482800,
    "received": 32482800, "datagrams": 284402, "undecodable": 0, "stale": 0,
    "loss_pct": 0.0, "deliveries_per_sec": 16237416.864218706,
    "latency_us": {"count": 32557203, "p50": 1737.727, "p90": 6168.575,
                   "p99": 10149.887, "max": 16556.031},
    "loss": {"daemon_rcvbuf_drops": 0.0, "daemon_dropped": [], "daemon_send_errors": [],
             "daemon_send_errors_total": 0.0, "client_rcvbuf_drops": 0,
             "daemon_received": 515600.0, "daemon_sent": 284402.0,
             "daemon_deliveries": 32482800.0},
    "cpu": {"daemon_pct": 79.5, "bench_pct": 97.5}, "ceiling_per_sec": null,
    "loadavg": 1.68, "client_rcvbuf": 8388608, "paced_skips": 1181}"#;

/// A socket nobody reads, and a sending member's socket connected to it.
fn sink_and_sender() -> (UdpSocket, Arc<UdpSocket>) {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = UdpSocket::bind("127.0.0.1:0").unwrap();
    from.connect(sink.local_addr().unwrap()).unwrap();
    (sink, Arc::new(from))
}

/// Slots a held-up sender skipped never reach a member: they are loss, and the pace test's
/// 5% would have let them through. That step (0.23% skipped, "loss 0.000%" of what was
/// offered) passed as sustained until a review; so would a run whose own socket refused 4%
/// of its sends.
#[test]
fn skipped_slots_and_refused_sends_are_loss() {
    let step: FanoutResult = serde_json::from_str(PUBLISHED_STEP).unwrap();
    let Pace::Rate(rate) = step.pace else {
        panic!("a paced step")
    };
    assert_eq!(step.loss_pct, 0.0);
    let due = 515_600.0 + 1_181.0;
    let schedule = step.schedule_loss_pct();
    assert!(
        (schedule - 100.0 * 1_181.0 / due).abs() < 1e-9,
        "{schedule}"
    );
    // All of it skipped slots: the daemon relayed every message it was sent.
    assert!((step.skipped_pct() - schedule).abs() < 1e-9);
    assert!(!step.sustainable(rate, 0.1));
    assert!(step.sustainable(rate, 0.3), "passes the other tests");
    let mut refused = step.clone();
    refused.paced_skips = 0;
    refused.client_send_errors = refused.offered / 25;
    assert!(!refused.sustainable(rate, 0.1));
    assert_eq!(refused.skipped_pct(), 0.0, "refused, not skipped");
    let mut clean = refused;
    clean.client_send_errors = 0;
    assert_eq!(clean.schedule_loss_pct(), 0.0);
    assert!(clean.sustainable(rate, 0.1));
    assert_eq!(step.shortfall(rate, 0.1).as_deref(), Some("loss 0.23%"));
}

/// Each way a step can fail is named, the first that applies: members that got more than
/// they were owed (a message twice, or back to its sender, which would hide as much loss),
/// loss, senders that fell behind the pace, deliveries that fell behind the offered rate.
#[test]
fn a_failed_step_says_why() {
    let clean: FanoutResult = serde_json::from_str(PUBLISHED_STEP).unwrap();
    let mut clean = clean;
    clean.paced_skips = 0;
    let Pace::Rate(rate) = clean.pace else {
        panic!("a paced step")
    };
    assert_eq!(clean.shortfall(rate, 0.1), None);

    let mut doubled = clean.clone();
    doubled.received += 63;
    assert_eq!(
        doubled.shortfall(rate, 0.1).as_deref(),
        Some("63 deliveries more than owed")
    );
    assert!(!doubled.sustainable(rate, 0.1));

    let mut slow = clean.clone();
    slow.offered_per_sec = 0.9 * rate;
    assert_eq!(
        slow.shortfall(rate, 0.1).as_deref(),
        Some("senders kept 90% of the pace")
    );

    let mut behind = clean.clone();
    behind.deliveries_per_sec = 0.653 * behind.offered_per_sec * 63.0;
    assert_eq!(
        behind.shortfall(rate, 0.1).as_deref(),
        Some("delivered 65.3% of the offered rate")
    );
}

/// The bounds of the pace and relay tests pass: senders that offered exactly 95% of the
/// pace, and a daemon that relayed exactly 97% of the deliveries offered.
#[test]
fn a_step_exactly_at_the_pace_and_relay_bounds_is_sustained() {
    let mut edge: FanoutResult = serde_json::from_str(PUBLISHED_STEP).unwrap();
    edge.paced_skips = 0;
    let Pace::Rate(rate) = edge.pace else {
        panic!("a paced step")
    };
    edge.offered_per_sec = 0.95 * rate;
    edge.deliveries_per_sec = 0.97 * (edge.offered_per_sec * (edge.members - 1) as f64);
    assert_eq!(edge.shortfall(rate, 0.1), None);
}

/// A paced sender reports the priority it really ran at: `realtime` exactly when its
/// thread's policy is `SCHED_FIFO` (granted as root, unless a container forbids it; refused without the privilege), so a
/// report never claims real-time senders it did not have.
#[test]
fn a_paced_sender_reports_the_priority_it_really_ran_at() {
    let (_sink, from) = sink_and_sender();
    // Its own thread: the policy stays with the thread that asked for it.
    let (sent, policy) = thread::scope(|s| {
        s.spawn(|| {
            let lanes = vec![Lane::new(Arc::clone(&from), b"h:", 1, 64)];
            let sent = send_loop(
                lanes,
                64,
                Some(1_000.0),
                Duration::from_millis(20),
                Clock::new(),
            );
            // SAFETY: reads the calling thread's scheduling policy; no pointers.
            (sent, unsafe { libc::sched_getscheduler(0) })
        })
        .join()
        .unwrap()
    });
    assert!(sent.messages > 0, "{sent:?}");
    assert_eq!(sent.realtime, policy == libc::SCHED_FIFO, "policy {policy}");
}

#[test]
fn a_held_up_sender_catches_up_its_window_and_skips_the_rest() {
    // 2 ms at 10,000 msg/s is 20 slots; 20 ms is 200.
    assert_eq!(slots_caught_up(10_000.0, 0.002), 20);
    assert_eq!(slots_caught_up(10_000.0, 0.020), 200);
    // A partial slot counts whole; low rates and a zero window keep the floor of 4.
    assert_eq!(slots_caught_up(10_001.0, 0.002), 21);
    assert_eq!(slots_caught_up(500.0, 0.002), 4);
    assert_eq!(slots_caught_up(134_594.0, 0.0), 4);
    assert_eq!(slots_caught_up(134_594.0, 0.020), 2_692);
}

/// A sender held up at the very end of its step owes the slots due within it, as a sender
/// held up anywhere else does: the catch-up window's worth sent late, the older ones skipped
/// and counted as loss. Left out, a 50 ms stall at the end of a step at the batch sweep's
/// rate took 6,532 slots out of its loss and lateness, and the step passed where the same
/// stall a moment earlier failed it (a review's simulation of the old loop).
#[test]
fn a_sender_held_up_at_the_end_of_its_step_owes_what_was_due_within_it() {
    let rate = 130_646.0;
    let step = Duration::from_secs(2);
    let catch_up = slots_caught_up(rate, 0.020);
    // Slots due at or before `us` microseconds into the step.
    let due_by = |us: u64| (us as f64 / 1e6 * rate) as u64 + 1;
    let at = Duration::from_micros;
    let within = (2.0 * rate).ceil() as u64;

    // A 50 ms stall from 1,900 ms: woken within the step.
    let handled = due_by(1_900_000);
    let mid = owed(at(1_950_000), step, rate, handled, catch_up);
    assert_eq!(mid.skip + mid.send, due_by(1_950_000) - handled);
    assert_eq!(mid.send, catch_up);
    assert_eq!(mid.skip, 3_919);

    // The same stall from 1,960 ms: woken 10 ms past the end, it still owes every slot due
    // before the end, and skips those beyond the window.
    let handled = due_by(1_960_000);
    let end = owed(at(2_010_000), step, rate, handled, catch_up);
    assert_eq!(end.skip + end.send, within - handled);
    assert_eq!(end.send, catch_up);
    assert_eq!(end.skip, 2_612);

    // On time, the end owes the few slots since the last tick, and none past the step.
    let handled = due_by(1_999_950);
    let last = owed(at(2_000_050), step, rate, handled, catch_up);
    assert_eq!(
        last,
        Owed {
            skip: 0,
            send: within - handled
        }
    );
    assert!(last.send < 10, "{last:?}");
    assert_eq!(
        owed(at(2_100_000), step, rate, within, catch_up),
        Owed { skip: 0, send: 0 }
    );
}

/// A sender that cannot keep its pace (10 million messages a second, for 5 ms) is behind
/// when its step ends: it still sends, late, every slot due within the step that its
/// catch-up window holds (all 50,000 here), and skips none. The loop used to stop at the
/// step's end and leave the slots it had not reached out of every figure.
#[test]
fn a_sender_behind_at_the_end_of_its_step_still_handles_every_slot_due() {
    let _window = CatchUp::lock();
    let (_sink, from) = sink_and_sender();
    let lanes = vec![Lane::new(Arc::clone(&from), b"h:", 1, 16)];
    let sent = send_loop(
        lanes,
        16,
        Some(10_000_000.0),
        Duration::from_millis(5),
        Clock::new(),
    );
    // The sink is never read: what its buffer refused counts as errors, still handled.
    let handled = (sent.messages, sent.errors, sent.skipped);
    assert_eq!(
        sent.messages + sent.errors + sent.skipped,
        50_000,
        "sent, refused, skipped: {handled:?}"
    );
    assert_eq!(sent.skipped, 0, "all within the 20 ms catch-up window");
    assert_eq!(sent.lateness_ns.len(), sent.messages + sent.skipped);
}

/// The catch-up window is the process's (`--catch-up-ms`, set once at start): a test that
/// sets it, and one whose verdict depends on it, hold this while they send; the window is
/// put back as it was when the holder lets go.
struct CatchUp {
    before: Duration,
    _held: std::sync::MutexGuard<'static, ()>,
}

impl CatchUp {
    fn lock() -> CatchUp {
        static WINDOW: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let held = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
        CatchUp {
            before: Duration::from_millis(catch_up_ms()),
            _held: held,
        }
    }
}

impl Drop for CatchUp {
    fn drop(&mut self) {
        set_catch_up(self.before);
    }
}

/// A sender behind by more than its catch-up window sends that much late and skips the
/// rest, oldest first: each slot is still handled once, and each skipped one is counted with
/// how late it was (after its slot was due, and no later than the step's own length). At 10
/// million messages a second and a window of its floor of 4 slots, it falls behind at once.
#[test]
fn a_sender_behind_by_more_than_its_window_skips_the_rest_and_counts_how_late() {
    let _window = CatchUp::lock();
    set_catch_up(Duration::ZERO);
    let (_sink, from) = sink_and_sender();
    let lanes = vec![Lane::new(Arc::clone(&from), b"h:", 1, 16)];
    let clock = Clock::new();
    // The step starts well after the clock's origin, so that no slot is due at its 0.
    while clock.nanos() < 1_000_000 {
        thread::sleep(Duration::from_millis(1));
    }
    let before = clock.nanos();
    let sent = send_loop(
        lanes,
        16,
        Some(10_000_000.0),
        Duration::from_millis(5),
        clock,
    );
    let took = clock.nanos() - before;
    let handled = (sent.messages, sent.errors, sent.skipped);
    assert!(sent.skipped > 0, "sent, refused, skipped: {handled:?}");
    assert_eq!(
        sent.messages + sent.errors + sent.skipped,
        50_000,
        "sent, refused, skipped: {handled:?}"
    );
    assert_eq!(sent.skipped as usize, sent.skipped_late_ns.len());
    assert_eq!(sent.lateness_ns.len(), sent.messages + sent.skipped);
    let out_of_bounds: Vec<u64> = sent
        .skipped_late_ns
        .iter()
        .copied()
        .filter(|&late| late == 0 || late > took)
        .collect();
    assert!(
        out_of_bounds.is_empty(),
        "{} of {} skipped slots late by 0 or more than the {took} ns the step took: {:?}",
        out_of_bounds.len(),
        sent.skipped,
        &out_of_bounds[..out_of_bounds.len().min(5)]
    );
}

/// Flat out, a sender sends until its step is over, and then stops.
#[test]
fn a_flat_out_sender_stops_when_its_step_is_over() {
    let (_sink, from) = sink_and_sender();
    let (done, finished) = std::sync::mpsc::channel();
    // Its own thread, so that a loop that never stops fails the test instead of hanging it.
    thread::spawn(move || {
        let lanes = vec![Lane::new(Arc::clone(&from), b"h:", 1, 16)];
        let sent = send_loop(lanes, 16, None, Duration::from_millis(5), Clock::new());
        let _ = done.send(sent);
    });
    let sent = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the sender stopped");
    assert!(sent.messages + sent.errors > 0, "{sent:?}");
    assert_eq!(sent.skipped, 0, "{sent:?}");
}

/// A paced sender stamps each message with the time its schedule slot was due, so two
/// messages sent in the same call, or one sent late, carry times a whole number of
/// periods apart; a skipped slot's lateness is kept for the latency figures, and every
/// slot, sent or skipped, is counted once in the senders' lateness. Two members sending
/// from one thread share its schedule: slots alternate between them, and each message's
/// number and time name its slot. Every slot due within the step is sent, tried or
/// skipped, the last ones too.
#[test]
fn paced_messages_carry_their_slot_times() {
    let to = UdpSocket::bind("127.0.0.1:0").unwrap();
    let members: Vec<Arc<UdpSocket>> = (0..2)
        .map(|_| {
            let from = UdpSocket::bind("127.0.0.1:0").unwrap();
            from.connect(to.local_addr().unwrap()).unwrap();
            Arc::new(from)
        })
        .collect();
    to.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Room for all 400 even if the reader below gets no core for the whole step.
    crate::receivers::size_rcvbuf(&to, 4 << 20);
    let prefix = b"header:";
    let rate = 2_000.0; // a slot every 500 µs, the two members' together
    let sending = std::sync::atomic::AtomicBool::new(true);
    // Drained while sending, and with room for every message, so no socket buffer size
    // decides what arrives.
    let (sent, stamps) = thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut stamps = Vec::new();
            let mut buf = [0u8; 2048];
            loop {
                match to.recv(&mut buf) {
                    Ok(n) => {
                        let (sender, seq, nanos) = read_text(&buf[prefix.len()..n]).unwrap();
                        let lane = [3, 5].iter().position(|&s| s == sender).unwrap();
                        stamps.push((seq * 2 + lane as u64, nanos));
                    }
                    Err(_) if !sending.load(std::sync::atomic::Ordering::SeqCst) => return stamps,
                    Err(_) => {}
                }
            }
        });
        let lanes = vec![
            Lane::new(Arc::clone(&members[0]), prefix, 3, 64),
            Lane::new(Arc::clone(&members[1]), prefix, 5, 64),
        ];
        let sent = send_loop(
            lanes,
            64,
            Some(rate),
            Duration::from_millis(200),
            Clock::new(),
        );
        sending.store(false, std::sync::atomic::Ordering::SeqCst);
        (sent, reader.join().unwrap())
    });
    // Even a sender stalled for most of the run sends a few.
    assert!(sent.messages >= 3, "{sent:?}");
    // 200 ms at 2,000 msg/s: slots 0 to 399.
    assert_eq!(sent.messages + sent.errors + sent.skipped, 400, "{sent:?}");
    // The offered rate is over the schedule's own span, which ends once the step is over.
    let span = sent.elapsed.expect("a paced schedule records its span");
    assert!(span >= Duration::from_millis(200), "{span:?}");
    assert_eq!(stamps.len() as u64, sent.messages);
    assert_eq!(sent.skipped as usize, sent.skipped_late_ns.len());
    assert_eq!(sent.lateness_ns.len(), sent.messages + sent.skipped);
    let mut stamps = stamps;
    stamps.sort_unstable();
    let slots: Vec<u64> = stamps.iter().map(|&(slot, _)| slot).collect();
    // Both members sent, no slot twice, and every slot up to the last sent or skipped.
    assert!(slots.iter().any(|s| s % 2 == 0) && slots.iter().any(|s| s % 2 == 1));
    assert!(slots.windows(2).all(|w| w[0] < w[1]), "{slots:?}");
    assert_eq!(
        slots.len() as u64 + sent.skipped,
        slots[slots.len() - 1] + 1
    );
    for pair in stamps.windows(2) {
        let ((a, at), (b, bt)) = (pair[0], pair[1]);
        let gap = bt - at;
        let between = slot_due_ns(b, rate) - slot_due_ns(a, rate);
        // Up to float rounding.
        assert!(
            gap.abs_diff(between) <= 1,
            "{gap} ns between slots {a} and {b}"
        );
    }
}

/// The sweep's rate search against a daemon that sustains `capacity` msg/s exactly: the
/// sustained rate is a rate that passed, at most the capacity and within 3% of it, whatever
/// the first guess.
#[test]
fn the_sweep_settles_within_three_percent_below_what_holds() {
    for (first, capacity) in [(10_000.0, 15_181.0), (200_000.0, 130_646.0), (100.0, 99.0)] {
        let mut search = sweep::Search::new(first);
        let mut passed = Vec::new();
        for _ in 0..40 {
            let rate = search.next_rate();
            let ok = rate <= capacity;
            if ok {
                passed.push(rate);
            }
            search.record(rate, ok);
            if search.done() {
                break;
            }
        }
        assert!(search.done(), "from {first} towards {capacity}");
        let sustained = search.sustained();
        assert!(passed.contains(&sustained), "{sustained} never passed");
        assert!(
            sustained <= capacity && sustained >= 0.97 * capacity,
            "{sustained} for {capacity}"
        );
    }
}

/// Steps on a noisy machine do not pass in order of rate: one may fail below a rate that
/// passes. The sustained rate is still the highest that passed, never one that failed.
#[test]
fn the_sweep_reports_a_rate_that_passed_even_when_steps_disagree() {
    let mut search = sweep::Search::new(10_000.0);
    // 10k passes, 15k fails, 12.5k passes, 13.75k fails, 13.125k passes.
    let verdicts = [true, false, true, false, true];
    let mut tried = Vec::new();
    for ok in verdicts {
        let rate = search.next_rate();
        tried.push((rate, ok));
        search.record(rate, ok);
    }
    let rates: Vec<f64> = tried.iter().map(|&(rate, _)| rate).collect();
    assert_eq!(rates, [10_000.0, 15_000.0, 12_500.0, 13_750.0, 13_125.0]);
    assert_eq!(search.sustained(), 13_125.0);
    // A failure below the highest pass (a stall) lowers the bound, not the sustained rate.
    search.record(11_000.0, false);
    assert_eq!(search.sustained(), 13_125.0);
    assert!(tried
        .iter()
        .any(|&(rate, ok)| ok && rate == search.sustained()));
}

/// The search goes on while the highest pass and the lowest failure are 3% apart or more:
/// 97 and 100 are not yet within 3% of each other.
#[test]
fn the_sweep_bisects_on_while_its_bounds_are_three_percent_apart() {
    let mut search = sweep::Search::new(100.0);
    search.record(100.0, false);
    search.record(97.0, true);
    assert!(!search.done(), "{search:?}");
    assert_eq!(search.next_rate(), 98.5);
    search.record(98.5, true);
    assert!(search.done(), "{search:?}");
}

#[test]
fn senders_of_several_rooms_take_turns_room_by_room() {
    let seats = |senders: usize, rooms: usize| -> Vec<(usize, usize)> {
        (0..senders * rooms).map(|k| seat(k, rooms)).collect()
    };
    assert_eq!(seats(3, 1), [(0, 0), (0, 1), (0, 2)]);
    assert_eq!(seats(2, 2), [(0, 0), (1, 0), (0, 1), (1, 1)]);
    assert_eq!(
        seats(2, 3),
        [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    );
}
