//! Fan-out: S members of one room send (paced or flat out), every member's socket is
//! drained, and deliveries, loss and latency are counted. Also the sweep for the highest
//! rate with loss under a threshold.
//!
//! This module runs one measurement (`measure`); `senders` are the sending members, flat out
//! on a thread each or paced on one schedule (driven by the first receiver thread, or by a
//! thread of its own), and `sweep` the search for the highest rate with loss under the
//! threshold.

mod senders;
mod sweep;
#[cfg(test)]
mod tests;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cli::CapsArg;
use crate::daemon::{own_cpu_time, Daemon};
use crate::error::{Context, Error, Result};
use crate::members::Room;
use crate::receivers::{kernel_drops, Clock, Draining, Pacing, Receivers};
use crate::report::{histogram, si, steal_time, CpuUse, DaemonDelay, LossAttribution, Percentiles};
use crate::stalls::{StallMeter, Stalls};
pub use senders::{
    catch_up_ms, paced_by_receiver, paced_senders_note, segmented_sends, set_catch_up,
    set_paced_by_receiver, set_paced_senders_realtime, set_segmented_sends,
};
pub(crate) use senders::{precise_timers, Lane, Pacer, Sent, Turn};
use senders::{send_loop, sender_threads};
pub use sweep::{sweep, SweepResult};

/// Messages per `sendmmsg` call.
const SEND_BATCH: usize = 32;
/// Nothing received for this long after the senders stop ends the drain.
const DRAIN_QUIET: Duration = Duration::from_millis(300);
/// The drain never takes longer than this.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// How long past its step a receiver that paces the senders may take to hand back what they
/// sent before the run gives up on it (its last slots are due by the step's end).
const PACED_BY_RECEIVER_SLACK: Duration = Duration::from_secs(60);
/// The daemon counts as idle once its sent counter holds still this long.
const SETTLE_QUIET: Duration = Duration::from_millis(300);
/// Waiting for an idle daemon gives up after this long.
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// Reads and discards whatever waits in `sockets` until a whole pass finds nothing.
fn discard_backlog(sockets: &[Arc<UdpSocket>]) {
    let mut buf = vec![0u8; ucrp::MAX_DATAGRAM_LEN];
    loop {
        let mut any = false;
        for s in sockets {
            loop {
                // SAFETY: buf is a live, writable buffer of the length passed.
                let n = unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    break;
                }
                any = true;
            }
        }
        if !any {
            return;
        }
    }
}

/// Waits until the daemon has stopped sending (a flat-out step leaves a backlog in its
/// socket buffer that takes seconds to relay), so the next step starts from idle.
fn settle(daemon: &Daemon) -> Result<()> {
    let started = Instant::now();
    let mut last = daemon.scrape()?.total("ocm_datagrams_sent_total");
    let mut since = Instant::now();
    while started.elapsed() < SETTLE_MAX {
        thread::sleep(Duration::from_millis(50));
        let now = daemon.scrape()?.total("ocm_datagrams_sent_total");
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= SETTLE_QUIET {
            break;
        }
    }
    Ok(())
}

/// How fast to send.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Pace {
    /// As fast as the senders can.
    Max,
    /// This many messages per second over all senders.
    Rate(f64),
}

/// One fan-out measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutResult {
    /// Members in each room.
    pub members: usize,
    /// Rooms, each of `members`, sent to in turn (1 in results recorded before there could be
    /// more).
    #[serde(default = "one_room")]
    pub rooms: usize,
    /// Sending members of each room.
    pub senders: usize,
    /// Text bytes per message.
    pub bytes: usize,
    /// Join form of the members.
    pub caps: CapsArg,
    /// Asked-for pace.
    pub pace: Pace,
    /// Seconds of sending.
    pub seconds: f64,
    /// Messages handed to the kernel by the senders.
    pub offered: u64,
    /// Offered messages per second actually achieved.
    pub offered_per_sec: f64,
    /// Sends the bench's own sockets refused (ENOBUFS and the like).
    pub client_send_errors: u64,
    /// offered × (members − 1).
    pub expected: u64,
    /// Deliveries received and decoded.
    pub received: u64,
    /// Datagrams received (fewer than deliveries with batching).
    pub datagrams: u64,
    /// Datagrams or entries that did not decode as benchmark messages.
    pub undecodable: u64,
    /// Messages of an earlier step still arriving (not counted).
    pub stale: u64,
    /// 100 × (1 − received / expected).
    pub loss_pct: f64,
    /// Deliveries per second (first send to last delivery).
    pub deliveries_per_sec: f64,
    /// Delivery latency, microseconds.
    pub latency_us: Percentiles,
    /// Where loss happened.
    pub loss: LossAttribution,
    /// CPU of daemon and bench over the sending window.
    pub cpu: CpuUse,
    /// The sendto ceiling measured in the same run, datagrams/s, if any.
    pub ceiling_per_sec: Option<f64>,
    /// 1-minute load average at the start.
    pub loadavg: f64,
    /// SO_RCVBUF granted to each member socket, bytes.
    pub client_rcvbuf: usize,
    /// What the stall meter saw during the sending window.
    #[serde(default)]
    pub stalls: Option<Stalls>,
    /// The daemon's own share of the latency (`ocm_relay_delay_seconds`), when it reports it.
    #[serde(default)]
    pub daemon_delay: Option<DaemonDelay>,
    /// CPU time the hypervisor stole from the machine's vCPUs during the run, ms.
    #[serde(default)]
    pub steal_ms: f64,
    /// Paced runs: schedule slots the senders skipped after being held up, rather than
    /// sending them late in a burst.
    #[serde(default)]
    pub paced_skips: u64,
    /// Paced runs: how late each message left its sender, µs: from the time its schedule
    /// slot was due (the time it carries) until `sendmmsg` returned, skipped slots counted as
    /// late as they were when skipped. The generator's own share of the latency.
    #[serde(default)]
    pub sender_lateness_us: Option<Percentiles>,
    /// How long each delivery's datagram waited in its member's socket before a receiver
    /// read it, µs (kernel stamp → read; see [`crate::receivers::Received::read_lag_ns`]).
    /// The receivers' own share of the latency; `None` without stamps.
    #[serde(default)]
    pub receiver_lag_us: Option<Percentiles>,
    /// Paced runs: whether every sender thread ran at `SCHED_FIFO` 1
    /// ([`set_paced_senders_realtime`]); `Some(false)` when the receiver paced them (at normal
    /// priority, [`FanoutResult::paced_by_receiver`]); `None` flat out, and in results
    /// recorded before.
    #[serde(default)]
    pub paced_senders_realtime: Option<bool>,
    /// Paced runs: whether the first receiver thread drove the senders' schedule
    /// ([`set_paced_by_receiver`]); `None` flat out, and in results recorded before the
    /// option (a thread of their own).
    #[serde(default)]
    pub paced_by_receiver: Option<bool>,
}

/// The rooms of a result recorded before there could be more than one.
fn one_room() -> usize {
    1
}

impl FanoutResult {
    /// Whether a step paced at `rate` was sustained: [`FanoutResult::shortfall`] found
    /// nothing.
    pub fn sustainable(&self, rate: f64, loss_pct: f64) -> bool {
        self.shortfall(rate, loss_pct).is_none()
    }

    /// Why a step paced at `rate` was not sustained, in words for the reports; `None` when it
    /// was. A sustained step has loss under `loss_pct`; its senders kept the pace (≥ 95% of
    /// it offered); and the daemon kept up in real time, relaying ≥ 97% of the offered
    /// delivery rate, so that an overload cannot hide in a 16 MiB socket buffer over a short
    /// step (with no loss, but seconds of delay). At 97% a step may still end up to 3% of its
    /// length behind (about 60 ms of a 2 s step), so the sustained rate can lie up to 3%
    /// above what the daemon holds indefinitely.
    ///
    /// Loss here is of the schedule ([`FanoutResult::schedule_loss_pct`]): slots a held-up
    /// sender skipped and sends the generator's own socket refused never reach a member
    /// either, and the pace test alone would let 5% of them through. And a step whose members
    /// received more than they were owed (a message twice, or back to its sender) is not
    /// sustained either: the surplus would hide as much loss.
    pub fn shortfall(&self, rate: f64, loss_pct: f64) -> Option<String> {
        let offered_deliveries = self.offered_per_sec * (self.members - 1) as f64;
        if self.received > self.expected {
            return Some(format!(
                "{} deliveries more than owed",
                self.received - self.expected
            ));
        }
        let loss = self.schedule_loss_pct();
        if loss >= loss_pct {
            return Some(format!("loss {loss:.2}%"));
        }
        if self.offered_per_sec < 0.95 * rate {
            return Some(format!(
                "senders kept {:.0}% of the pace",
                100.0 * self.offered_per_sec / rate
            ));
        }
        if self.deliveries_per_sec < 0.97 * offered_deliveries {
            return Some(format!(
                "delivered {:.1}% of the offered rate",
                100.0 * self.deliveries_per_sec / offered_deliveries
            ));
        }
        None
    }

    /// The deliveries missing out of every message the senders were due to send: the ones
    /// offered, the schedule slots skipped and the sends the generator's socket refused, each
    /// owed to M − 1 members. [`FanoutResult::loss_pct`] counts only the offered ones.
    pub fn schedule_loss_pct(&self) -> f64 {
        let due = self.offered + self.paced_skips + self.client_send_errors;
        let owed = due * (self.members as u64).saturating_sub(1);
        if owed == 0 {
            return 0.0;
        }
        100.0 * owed.saturating_sub(self.received) as f64 / owed as f64
    }

    /// The share of the schedule's slots that held-up senders skipped, %: the part of
    /// [`FanoutResult::schedule_loss_pct`] that the generator, not the daemon, failed to send.
    /// A step that fails on it alone says the senders were held up (by the daemon taking the
    /// cores, or by anything else on them), not that the daemon dropped anything.
    pub fn skipped_pct(&self) -> f64 {
        let due = self.offered + self.paced_skips + self.client_send_errors;
        if due == 0 {
            return 0.0;
        }
        100.0 * self.paced_skips as f64 / due as f64
    }

    /// deliveries/s as a percentage of the ceiling.
    pub fn of_ceiling_pct(&self) -> Option<f64> {
        self.ceiling_per_sec
            .filter(|c| *c > 0.0)
            .map(|c| 100.0 * self.deliveries_per_sec / c)
    }

    /// The human-readable report.
    pub fn print(&self) {
        let pace = match self.pace {
            Pace::Max => "max".to_owned(),
            Pace::Rate(r) => format!("{r:.0} msg/s"),
        };
        let rooms = match self.rooms {
            1 => String::new(),
            n => format!(" rooms={n}"),
        };
        println!(
            "fanout M={} S={} B={} caps={} pace={} {:.1}s{rooms}",
            self.members, self.senders, self.bytes, self.caps, pace, self.seconds
        );
        println!(
            "  offered {} msgs ({}/s), expected {} deliveries, received {} in {} datagrams, loss {:.3}% ({:.3}% of the schedule: skipped slots and refused sends count)",
            self.offered,
            si(self.offered_per_sec),
            self.expected,
            self.received,
            self.datagrams,
            self.loss_pct,
            self.schedule_loss_pct()
        );
        let ratio = self
            .of_ceiling_pct()
            .map(|p| {
                format!(
                    " = {p:.1}% of the sendto ceiling ({}/s)",
                    si(self.ceiling_per_sec.unwrap_or(0.0))
                )
            })
            .unwrap_or_default();
        println!("  deliveries/s {}{ratio}", si(self.deliveries_per_sec));
        let l = &self.latency_us;
        println!(
            "  latency µs p50 {:.0} p90 {:.0} p99 {:.0} max {:.0}",
            l.p50, l.p90, l.p99, l.max
        );
        if let Some(l) = &self.sender_lateness_us {
            println!(
                "  senders' lateness µs (slot due → handed to the kernel): p50 {:.0} p90 {:.0} p99 {:.0} max {:.0}",
                l.p50, l.p90, l.p99, l.max
            );
        }
        if let Some(l) = &self.receiver_lag_us {
            println!(
                "  receivers' read lag µs (in the member's socket → read): p50 {:.0} p90 {:.0} p99 {:.0} max {:.0}",
                l.p50, l.p90, l.p99, l.max
            );
        }
        if let Some(d) = &self.daemon_delay {
            println!(
                "  daemon relay delay (arrival on its socket → sent): {}",
                d.summary("datagrams")
            );
        }
        println!("  {}", self.loss.line());
        println!(
            "  cpu: ocmd {:.0}% of a core, ocm-bench {:.0}%, stolen by the hypervisor {:.0} ms; paced slots skipped {}; client send errors {}; undecodable {}; stale {}; client SO_RCVBUF {}; loadavg {:.2}",
            self.cpu.daemon_pct,
            self.cpu.bench_pct,
            self.steal_ms,
            self.paced_skips,
            self.client_send_errors,
            self.undecodable,
            self.stale,
            self.client_rcvbuf,
            self.loadavg
        );
        if let Some(stalls) = &self.stalls {
            println!("  {}", stalls.line());
        }
        if let Some(realtime) = self.paced_senders_realtime {
            let by_receiver = self.paced_by_receiver.unwrap_or(false);
            println!(
                "  paced senders: {}",
                paced_senders_note(by_receiver, realtime)
            );
        }
    }
}

/// Runs one measurement in an already registered room.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    daemon: &mut Daemon,
    room: &Room,
    senders: usize,
    bytes: usize,
    caps: CapsArg,
    pace: Pace,
    duration: Duration,
    draining: Draining,
) -> Result<FanoutResult> {
    let rooms = std::slice::from_ref(room);
    measure_rooms(
        daemon, rooms, senders, bytes, caps, pace, duration, draining,
    )
}

/// Runs one measurement in already registered rooms of equal size, `senders` of each room's
/// members sending; a paced rate is the total over all rooms. The senders take turns in the
/// schedule room by room, so that a pass of the daemon's loop holds messages to several
/// rooms in turn.
#[allow(clippy::too_many_arguments)]
pub fn measure_rooms(
    daemon: &mut Daemon,
    rooms: &[Room],
    senders: usize,
    bytes: usize,
    caps: CapsArg,
    pace: Pace,
    duration: Duration,
    draining: Draining,
) -> Result<FanoutResult> {
    let m = rooms.first().map_or(0, |room| room.members.len());
    if senders == 0 || senders > m {
        return Err(Error::Usage(format!("--senders must be 1..={m}")));
    }
    if rooms.iter().any(|room| room.members.len() != m) {
        return Err(Error::Usage("the rooms must be of one size".into()));
    }
    let (in_room, r) = (senders, rooms.len());
    let member = |k: usize| {
        let (room, place) = seat(k, r);
        &rooms[room].members[place]
    };
    let senders = in_room * r;
    let sockets: Vec<Arc<UdpSocket>> = rooms.iter().flat_map(Room::sockets).collect();
    settle(daemon)?;
    discard_backlog(&sockets);
    let loadavg = crate::report::loadavg();
    let clock = Clock::new();
    let drops_before = kernel_drops(&sockets);
    let before = daemon.scrape()?;
    let draining = Draining {
        stamp_arrivals: matches!(pace, Pace::Rate(_)),
        ..draining
    };
    let prefixes: Vec<Vec<u8>> = (0..senders)
        .map(|k| {
            let (room, place) = seat(k, r);
            rooms[room].prefix(place)
        })
        .collect::<Result<_>>()?;
    let per_sender = match pace {
        Pace::Max => None,
        Pace::Rate(r) => Some(r / senders as f64),
    };
    let lanes = |members: &[usize]| -> Vec<Lane> {
        members
            .iter()
            .map(|&k| Lane::new(Arc::clone(&member(k).socket), &prefixes[k], k, bytes))
            .collect()
    };
    let by_receiver = per_sender.is_some() && paced_by_receiver();
    // Driven by the first receiver, the schedule comes back over this channel once done.
    let (pacing, schedule_done) = match pace {
        Pace::Rate(rate) if by_receiver => {
            let (done, sent) = mpsc::channel();
            let every: Vec<usize> = (0..senders).collect();
            let pacer = Pacer::new(lanes(&every), bytes, rate, duration, clock);
            (Some(Pacing { pacer, done }), Some(sent))
        }
        _ => (None, None),
    };
    // A receiver that paces starts the schedule at its first look, as it starts.
    let receivers = Receivers::spawn_pacing(&sockets, draining, clock, clock.nanos(), pacing)?;
    let cpu0 = (daemon.cpu_time(), own_cpu_time());
    let cpu_from = Instant::now();
    let steal0 = steal_time();
    let meter = StallMeter::start().ctx("spawn the stall meter")?;
    let send_start = clock.nanos();
    let t0 = Instant::now();
    let threads = sender_threads(senders, pace, by_receiver);
    let mut sent: Vec<Sent> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let members: Vec<usize> = (t..senders).step_by(threads).collect();
                let rate = per_sender.map(|r| r * members.len() as f64);
                let lanes = lanes(&members);
                s.spawn(move || send_loop(lanes, bytes, rate, duration, clock))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    if let Some(done) = schedule_done {
        match done.recv_timeout(duration + PACED_BY_RECEIVER_SLACK) {
            Ok(paced) => sent.push(paced),
            Err(lost) => {
                // The receiver stopped (its own error says why) or never finished: stop the
                // threads before giving up on the run.
                meter.finish();
                let lost = Error::Io {
                    context: "the paced senders on the receiver thread".into(),
                    source: std::io::Error::other(lost),
                };
                return Err(receivers
                    .finish(0, Duration::ZERO, Duration::ZERO)
                    .err()
                    .unwrap_or(lost));
            }
        }
    }
    // Paced, the schedules' own span: the main thread may wait for a core before it sees
    // the last one end (12–15 ms at 2 s and 5 s, the receiver pacing, both vCPUs busy).
    let wall = sent
        .iter()
        .filter_map(|s| s.elapsed)
        .max()
        .unwrap_or_else(|| t0.elapsed());
    let stalls = meter.finish();
    let cpu1 = (daemon.cpu_time(), own_cpu_time());
    let cpu_span = cpu_from.elapsed();
    let offered: u64 = sent.iter().map(|s| s.messages).sum();
    let client_send_errors = sent.iter().map(|s| s.errors).sum();
    let paced_skips = sent.iter().map(|s| s.skipped).sum();
    let sender_lateness_us = per_sender.map(|_| {
        let mut all = histogram();
        for s in &sent {
            let _ = all.add(&s.lateness_ns);
        }
        Percentiles::scaled(&all, 1e3)
    });
    let expected = offered * (m as u64 - 1);
    let mut got = receivers.finish(expected, DRAIN_QUIET, DRAIN_MAX)?;
    for late in sent.iter().flat_map(|s| &s.skipped_late_ns) {
        let _ = got.latency_ns.record_n((*late).max(1), m as u64 - 1);
    }
    let steal = steal_time().saturating_sub(steal0);
    daemon.check_alive()?;
    let after = daemon.scrape()?;
    let drops = kernel_drops(&sockets).saturating_sub(drops_before);
    // Paced, from the schedules' start; flat out, from the senders' start.
    let window_start = sent
        .iter()
        .filter_map(|s| s.started_ns)
        .min()
        .unwrap_or(send_start);
    let window_ns = got.last_at_ns.saturating_sub(window_start).max(1);
    Ok(FanoutResult {
        members: m,
        rooms: rooms.len(),
        senders: in_room,
        bytes,
        caps,
        pace,
        seconds: wall.as_secs_f64(),
        offered,
        offered_per_sec: offered as f64 / wall.as_secs_f64().max(1e-9),
        client_send_errors,
        expected,
        received: got.deliveries,
        datagrams: got.datagrams,
        undecodable: got.undecodable,
        stale: got.stale,
        loss_pct: if expected == 0 {
            0.0
        } else {
            100.0 * (1.0 - got.deliveries as f64 / expected as f64)
        },
        deliveries_per_sec: got.deliveries as f64 * 1e9 / window_ns as f64,
        latency_us: Percentiles::scaled(&got.latency_ns, 1e3),
        loss: LossAttribution::between(&before, &after, drops),
        cpu: CpuUse::of((cpu0.0, cpu1.0), (cpu0.1, cpu1.1), cpu_span),
        ceiling_per_sec: None,
        loadavg,
        client_rcvbuf: rooms[0].rcvbuf,
        steal_ms: steal.as_secs_f64() * 1e3,
        stalls: Some(stalls),
        paced_skips,
        sender_lateness_us,
        receiver_lag_us: (!got.read_lag_ns.is_empty())
            .then(|| Percentiles::scaled(&got.read_lag_ns, 1e3)),
        paced_senders_realtime: per_sender.map(|_| sent.iter().all(|s| s.realtime)),
        paced_by_receiver: per_sender.map(|_| by_receiver),
        daemon_delay: DaemonDelay::from_buckets(
            &after.histogram_delta(&before, "ocm_relay_delay_seconds"),
        ),
    })
}

/// Where sender `k` of a run in `rooms` rooms sits: its room, and its place among the room's
/// members. The senders go from room to room (room 0's first, room 1's first, ..., room 0's
/// second), so the schedule does, and so do a sender thread's lanes.
fn seat(k: usize, rooms: usize) -> (usize, usize) {
    (k % rooms, k / rooms)
}

/// Receivers' sockets for the ceiling: `count` sockets bound on loopback.
pub fn bind_sockets(count: usize, rcvbuf: usize) -> Result<Vec<Arc<UdpSocket>>> {
    (0..count)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").ctx("bind socket")?;
            crate::receivers::size_rcvbuf(&s, rcvbuf);
            Ok(Arc::new(s))
        })
        .collect()
}
