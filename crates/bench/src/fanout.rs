//! Fan-out: S members of one room send (paced or flat out), every member's socket is
//! drained, and deliveries, loss and latency are counted. Also the sweep for the highest
//! rate with loss under a threshold.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::cli::CapsArg;
use crate::daemon::{own_cpu_time, Daemon};
use crate::error::{Context, Error, Result};
use crate::members::Room;
use crate::receivers::{kernel_drops, write_text, Clock, Draining, Receivers};
use crate::report::{histogram, si, steal_time, CpuUse, DaemonDelay, LossAttribution, Percentiles};
use crate::stalls::{become_realtime, StallMeter, Stalls};

/// Messages per `sendmmsg` call.
const SEND_BATCH: usize = 32;
/// Nothing received for this long after the senders stop ends the drain.
const DRAIN_QUIET: Duration = Duration::from_millis(300);
/// The drain never takes longer than this.
const DRAIN_MAX: Duration = Duration::from_secs(30);
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

/// Whether paced senders ask for real-time priority (`--sender-priority`, set once at start).
static PACED_SENDERS_REALTIME: AtomicBool = AtomicBool::new(true);

/// Sets whether paced senders run at `SCHED_FIFO` 1 (the default) or at normal priority.
///
/// The senders stand for members on other machines, whose messages leave on time whatever
/// the daemon is doing. At normal priority on two vCPUs that the daemon and the receivers
/// keep ~95% busy, a woken sender can wait milliseconds for a core and then skip slots
/// (counted as loss): 5 of 8 normal-priority runs at 567k–6.3M deliveries/s skipped
/// 0.006–0.22% of their schedule, none of 12 real-time runs did (crates/bench/NOTES.md,
/// "Paced senders at real-time priority"). Flat-out senders never ask: they never sleep,
/// and would take a core outright.
pub fn set_paced_senders_realtime(on: bool) {
    PACED_SENDERS_REALTIME.store(on, Ordering::Relaxed);
}

/// One fan-out measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutResult {
    /// Members in the room.
    pub members: usize,
    /// Sending members.
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
    /// ([`set_paced_senders_realtime`]); `None` flat out, and in results recorded before.
    #[serde(default)]
    pub paced_senders_realtime: Option<bool>,
}

impl FanoutResult {
    /// Whether a step paced at `rate` was sustained: loss under `loss_pct`, the senders kept
    /// the pace, and the daemon kept up in real time: the deliveries were relayed at ≥ 97% of
    /// the offered delivery rate, so no backlog built up in its socket buffer (a short step
    /// can otherwise hide an overload in a 16 MiB buffer, with no loss but seconds of delay).
    ///
    /// Loss here is of the schedule ([`FanoutResult::schedule_loss_pct`]): slots a held-up
    /// sender skipped and sends the generator's own socket refused never reach a member
    /// either, and the pace test alone would let 5% of them through.
    pub fn sustainable(&self, rate: f64, loss_pct: f64) -> bool {
        let offered_deliveries = self.offered_per_sec * (self.members - 1) as f64;
        self.schedule_loss_pct() < loss_pct
            && self.offered_per_sec >= 0.95 * rate
            && self.deliveries_per_sec >= 0.97 * offered_deliveries
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
        println!(
            "fanout M={} S={} B={} caps={} pace={} {:.1}s",
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
            println!("  paced senders: {}", senders_priority_note(realtime));
        }
    }
}

/// How the paced senders ran, in words for the reports.
pub fn senders_priority_note(realtime: bool) -> &'static str {
    if realtime {
        "at real-time priority (`SCHED_FIFO` 1), so they leave on schedule as remote members would, whatever the daemon and receivers take (`--sender-priority`)"
    } else {
        "at normal priority, level with the daemon, which can hold them up past their slots (`--sender-priority normal`, or not permitted to raise it)"
    }
}

/// What one sender thread did.
#[derive(Debug, Clone)]
struct Sent {
    messages: u64,
    errors: u64,
    /// Paced: schedule slots skipped after the thread was held up (see `send_loop`).
    skipped: u64,
    /// Paced: how late each skipped slot already was when it was skipped, nanoseconds.
    skipped_late_ns: Vec<u64>,
    /// Paced: how late each slot left (sent or skipped), nanoseconds.
    lateness_ns: Histogram<u64>,
    /// Paced: the thread ran at real-time priority.
    realtime: bool,
}

impl Default for Sent {
    fn default() -> Sent {
        Sent {
            messages: 0,
            errors: 0,
            skipped: 0,
            skipped_late_ns: Vec::new(),
            lateness_ns: histogram(),
            realtime: false,
        }
    }
}

/// When schedule slot `k` of a sender paced at `rate` msgs/s is due, nanoseconds after its
/// start.
fn slot_due_ns(k: u64, rate: f64) -> u64 {
    (k as f64 * 1e9 / rate) as u64
}

/// `sendmmsg` scratch for one connected socket.
struct SendBatch {
    slot: usize,
    bufs: Vec<u8>,
    lens: [usize; SEND_BATCH],
}

impl SendBatch {
    fn new(prefix: &[u8], text_len: usize) -> SendBatch {
        // Room for the text even when the header words are longer than asked.
        let slot = prefix.len() + text_len.max(64) + 64;
        let mut bufs = vec![0u8; slot * SEND_BATCH];
        for chunk in bufs.chunks_mut(slot) {
            chunk[..prefix.len()].copy_from_slice(prefix);
        }
        SendBatch {
            slot,
            bufs,
            lens: [0; SEND_BATCH],
        }
    }

    /// Writes message `i` of this batch.
    fn fill(&mut self, i: usize, prefix_len: usize, text: &[u8]) {
        let start = i * self.slot + prefix_len;
        let len = text.len().min(self.slot - prefix_len);
        self.bufs[start..start + len].copy_from_slice(&text[..len]);
        self.lens[i] = prefix_len + len;
    }

    /// Sends the first `n` messages; returns how many the kernel took.
    fn send(&mut self, fd: i32, n: usize) -> std::io::Result<usize> {
        let base = self.bufs.as_mut_ptr();
        let mut iovecs: [libc::iovec; SEND_BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_BATCH];
        // SAFETY: mmsghdr is plain data; all-zero is valid.
        let mut headers: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            // SAFETY: i * slot is within bufs (SEND_BATCH slots).
            iovecs[i].iov_base = unsafe { base.add(i * self.slot) }.cast();
            iovecs[i].iov_len = self.lens[i];
            headers[i].msg_hdr.msg_iov = &mut iovecs[i];
            headers[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the headers point at iovecs into bufs, all alive for the call; the socket is
        // connected, so no address is needed.
        let rc = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), n as libc::c_uint, 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

/// The shortest sleep of a paced sender (its timer slack is set to 1 µs, so sleeps are
/// close to exact).
const PACING_TICK: Duration = Duration::from_micros(100);

/// How much of its schedule, in microseconds, a paced sender that was held up still sends
/// late (see `send_loop`; `--catch-up-ms`, set once at start): 20 ms, past the vCPU stalls of
/// a few ms that the real-time senders still meet (crates/bench/NOTES.md, "A catch-up window
/// past the short stalls").
static CATCH_UP_US: AtomicU64 = AtomicU64::new(20_000);

/// How much of its schedule a held-up paced sender still sends late, milliseconds (see
/// [`set_catch_up`]).
pub fn catch_up_ms() -> u64 {
    CATCH_UP_US.load(Ordering::Relaxed) / 1_000
}

/// Sets how much of its schedule a held-up paced sender still sends late; the slots it
/// missed beyond that are skipped and counted as loss. Either way each slot counts as late
/// as it was (its message carries its slot's due time).
pub fn set_catch_up(window: Duration) {
    CATCH_UP_US.store(
        u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// How many missed slots a held-up sender at `rate` messages/s still sends late: the
/// catch-up window's worth, at least 4 (so that low rates still catch up a few).
fn slots_caught_up(rate: f64, window_secs: f64) -> u64 {
    ((rate * window_secs).ceil() as u64).max(4)
}

/// Sets this thread's timer slack to 1 µs (the default 50 µs would make every paced sleep
/// late by up to that much).
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// One sending member driven by a sender thread: its connected socket and its `sendmmsg`
/// scratch.
struct Lane<'a> {
    socket: &'a UdpSocket,
    prefix_len: usize,
    /// The member's index, written into every text.
    sender: usize,
    batch: SendBatch,
    /// The schedule slots of the messages filled into `batch`, in order.
    slots: [u64; SEND_BATCH],
    filled: usize,
}

impl<'a> Lane<'a> {
    fn new(socket: &'a UdpSocket, prefix: &[u8], sender: usize, text_len: usize) -> Lane<'a> {
        Lane {
            socket,
            prefix_len: prefix.len(),
            sender,
            batch: SendBatch::new(prefix, text_len),
            slots: [0; SEND_BATCH],
            filled: 0,
        }
    }
}

/// Sends from the members of `lanes` until `duration` is over, flat out or paced at `rate`
/// msgs/s in all. Paced, the lanes share one schedule: slot `k` is lane `k % lanes`'s
/// message number `k / lanes`, so one thread's wake-up sends what is due from every lane.
fn send_loop(
    lanes: &mut [Lane<'_>],
    text_len: usize,
    rate: Option<f64>,
    duration: Duration,
    clock: Clock,
) -> Sent {
    let count = lanes.len() as u64;
    let mut sent = Sent::default();
    let catch_up_secs = CATCH_UP_US.load(Ordering::Relaxed) as f64 / 1e6;
    if rate.is_some() {
        precise_timers();
        sent.realtime = PACED_SENDERS_REALTIME.load(Ordering::Relaxed) && become_realtime();
    }
    let mut text = Vec::with_capacity(text_len + 64);
    // Slots sent or tried (`attempted`) and skipped: the next slot is their sum.
    let mut attempted = 0u64;
    let start_ns = clock.nanos();
    let start = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration || count == 0 {
            break;
        }
        let due = match rate {
            None => SEND_BATCH as u64 * count,
            Some(r) => {
                // Schedule slot `k` (counting from 0) is due at k / r; `attempted + skipped`
                // slots are behind us.
                let target = (elapsed.as_secs_f64() * r) as u64 + 1;
                let mut due = target.saturating_sub(attempted + sent.skipped);
                // A constant-rate source that was held up (its vCPU stopped: on a shared
                // 2-core VM, a few ms often, 10–200 ms now and then) sends what it missed
                // within the catch-up window late, each message stamped with its slot's due
                // time, as remote members' messages would wait in a stopped daemon's socket.
                // A longer backlog is not sent in one burst, which would measure the stall,
                // not the rate: slots missed beyond the window are skipped, and counted.
                let catch_up = slots_caught_up(r, catch_up_secs);
                if due > catch_up {
                    // Not sent, but not left out of the latency either: each skipped slot
                    // counts as deliveries at least as late as it is now.
                    let now = clock.nanos();
                    let first = attempted + sent.skipped;
                    for slot in first..first + (due - catch_up) {
                        let late = now.saturating_sub(start_ns + slot_due_ns(slot, r));
                        sent.skipped_late_ns.push(late);
                        let _ = sent.lateness_ns.record(late.max(1));
                    }
                    sent.skipped += due - catch_up;
                    due = catch_up;
                }
                if due == 0 {
                    // Sleep, never spin: a spinning pacer takes a core the daemon needs.
                    // Above 1 / PACING_TICK msgs/s the due messages leave together once a
                    // tick, in one sendmmsg per lane.
                    let next = Duration::from_secs_f64((attempted + sent.skipped) as f64 / r);
                    let wait = next.saturating_sub(start.elapsed());
                    thread::sleep(wait.max(PACING_TICK));
                    continue;
                }
                due
            }
        };
        let n = due.min(SEND_BATCH as u64 * count);
        let now = clock.nanos();
        let first = attempted + sent.skipped;
        for slot in first..first + n {
            let lane = &mut lanes[(slot % count) as usize];
            // A paced message carries the time its slot was due, not the time it left: a
            // sender held up (by the daemon or by anything else on the machine) then shows as
            // latency instead of hiding it (coordinated omission).
            let stamp = match rate {
                Some(r) => start_ns + slot_due_ns(slot, r),
                None => now,
            };
            text.clear();
            write_text(&mut text, lane.sender, slot / count, stamp, text_len);
            let i = lane.filled;
            lane.batch.fill(i, lane.prefix_len, &text);
            lane.slots[i] = slot;
            lane.filled += 1;
        }
        for lane in lanes.iter_mut().filter(|lane| lane.filled > 0) {
            let filled = std::mem::take(&mut lane.filled);
            let result = loop {
                match lane.batch.send(lane.socket.as_raw_fd(), filled) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            match result {
                Ok(k) => {
                    sent.messages += k as u64;
                    sent.errors += (filled - k) as u64;
                    if let Some(r) = rate {
                        let left = clock.nanos();
                        for &slot in &lane.slots[..k] {
                            let due = start_ns + slot_due_ns(slot, r);
                            let _ = sent.lateness_ns.record(left.saturating_sub(due).max(1));
                        }
                    }
                }
                // Refused: pacing never retries a slot.
                Err(_) => sent.errors += filled as u64,
            }
        }
        // Slots advance for every attempt so pacing does not retry forever.
        attempted += n;
    }
    sent
}

/// How many threads send for `senders` members: flat out, one each (each sends as fast as
/// its socket takes); paced, one for all, on one schedule. Each paced thread wakes every
/// [`PACING_TICK`] at high rates, and every wake-up can switch the daemon's loop out: with
/// the two senders of the standard matrix on one thread instead of two (2026-12-04, 19:00
/// UTC, batch members at 3M and 6.3M deliveries/s, alternating pairs), the generator took
/// 5–10% of a core less and the p50 and p90 came out lower in every pair.
fn sender_threads(senders: usize, pace: Pace) -> usize {
    match pace {
        Pace::Max => senders,
        Pace::Rate(_) => senders.min(1),
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
    let m = room.members.len();
    if senders == 0 || senders > m {
        return Err(Error::Usage(format!("--senders must be 1..={m}")));
    }
    let sockets = room.sockets();
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
    let receivers = Receivers::spawn(&sockets, draining, clock, clock.nanos())?;
    let prefixes: Vec<Vec<u8>> = (0..senders)
        .map(|s| room.prefix(s))
        .collect::<Result<_>>()?;
    let per_sender = match pace {
        Pace::Max => None,
        Pace::Rate(r) => Some(r / senders as f64),
    };
    let cpu0 = (daemon.cpu_time(), own_cpu_time());
    let steal0 = steal_time();
    let meter = StallMeter::start().ctx("spawn the stall meter")?;
    let send_start = clock.nanos();
    let t0 = Instant::now();
    let threads = sender_threads(senders, pace);
    let sent: Vec<Sent> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let members: Vec<usize> = (t..senders).step_by(threads).collect();
                let rate = per_sender.map(|r| r * members.len() as f64);
                let (room, prefixes) = (&room, &prefixes);
                s.spawn(move || {
                    let mut lanes: Vec<Lane<'_>> = members
                        .iter()
                        .map(|&i| Lane::new(&room.members[i].socket, &prefixes[i], i, bytes))
                        .collect();
                    send_loop(&mut lanes, bytes, rate, duration, clock)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = t0.elapsed();
    let stalls = meter.finish();
    let cpu1 = (daemon.cpu_time(), own_cpu_time());
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
    let window_ns = got.last_at_ns.saturating_sub(send_start).max(1);
    Ok(FanoutResult {
        members: m,
        senders,
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
        cpu: CpuUse::of((cpu0.0, cpu1.0), (cpu0.1, cpu1.1), wall),
        ceiling_per_sec: None,
        loadavg,
        client_rcvbuf: room.rcvbuf,
        steal_ms: steal.as_secs_f64() * 1e3,
        stalls: Some(stalls),
        paced_skips,
        sender_lateness_us,
        receiver_lag_us: (!got.read_lag_ns.is_empty())
            .then(|| Percentiles::scaled(&got.read_lag_ns, 1e3)),
        paced_senders_realtime: per_sender.map(|_| sent.iter().all(|s| s.realtime)),
        daemon_delay: DaemonDelay::from_buckets(
            &after.histogram_delta(&before, "ocm_relay_delay_seconds"),
        ),
    })
}

/// Result of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepResult {
    /// The flat-out probe.
    pub max: FanoutResult,
    /// Every paced step, in order.
    pub steps: Vec<FanoutResult>,
    /// The highest offered rate (msgs/s) whose step lost less than the threshold.
    pub sustained_rate: f64,
    /// That step.
    pub sustained: Option<FanoutResult>,
    /// The run at half the sustained rate.
    pub half: Option<FanoutResult>,
    /// Loss threshold, percent.
    pub loss_pct: f64,
    /// The sendto ceiling for the same M and B, datagrams/s: in the matrix, the mean of
    /// `ceiling_around`.
    pub ceiling_per_sec: f64,
    /// The ceiling measured right before and right after the sweep, when it was: the
    /// machine's speed drifts within minutes, so one measurement taken earlier is not the
    /// ceiling the sweep ran under.
    #[serde(default)]
    pub ceiling_around: Option<(f64, f64)>,
}

impl SweepResult {
    /// The human-readable summary.
    pub fn print(&self) {
        let m = &self.max;
        println!(
            "sweep M={} S={} B={} caps={}: loss < {}%",
            m.members, m.senders, m.bytes, m.caps, self.loss_pct
        );
        for s in &self.steps {
            if let Pace::Rate(r) = s.pace {
                println!(
                    "  step {:>9.0} msg/s: loss {:.3}% of the schedule ({:.3}% skipped by the senders), deliveries/s {} p99 {:.0} µs",
                    r,
                    s.schedule_loss_pct(),
                    s.skipped_pct(),
                    si(s.deliveries_per_sec),
                    s.latency_us.p99
                );
            }
        }
        match &self.sustained {
            Some(s) => println!(
                "  sustained: {:.0} msg/s offered = {} deliveries/s = {:.1}% of the sendto ceiling ({}/s{})",
                self.sustained_rate,
                si(s.deliveries_per_sec),
                100.0 * s.deliveries_per_sec / self.ceiling_per_sec.max(1.0),
                si(self.ceiling_per_sec),
                self.ceiling_around.map_or(String::new(), |(before, after)| format!(
                    ", the mean of {}/s before the sweep and {}/s after",
                    si(before),
                    si(after)
                ))
            ),
            None => println!("  no step met the loss threshold"),
        }
        if let Some(h) = &self.half {
            println!(
                "  at half ({:.0} msg/s): loss {:.3}% of the schedule, p50 {:.0} µs p99 {:.0} µs max {:.0} µs",
                self.sustained_rate / 2.0,
                h.schedule_loss_pct(),
                h.latency_us.p50,
                h.latency_us.p99,
                h.latency_us.max
            );
        }
    }
}

/// Flat-out probe, then a binary search over the offered rate, then half the best rate.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    daemon: &mut Daemon,
    room: &Room,
    senders: usize,
    bytes: usize,
    caps: CapsArg,
    step: Duration,
    steps: usize,
    loss_pct: f64,
    draining: Draining,
    ceiling_per_sec: f64,
) -> Result<SweepResult> {
    let fanout = room.members.len().saturating_sub(1).max(1) as f64;
    let max = measure(
        daemon,
        room,
        senders,
        bytes,
        caps,
        Pace::Max,
        step,
        draining,
    )?;
    // Upper bound: what went through flat out (a bit more, in case the probe was unlucky),
    // and never more than was offered.
    let delivered_msgs = max.deliveries_per_sec / fanout;
    let mut hi = (delivered_msgs * 1.3).min(max.offered_per_sec).max(100.0);
    let mut lo = 0.0;
    let mut best: Option<FanoutResult> = None;
    let mut all = Vec::new();
    // Until a step fails, each passing step raises the bound by half; then bisect.
    let mut bracketed = false;
    for _ in 0..steps {
        let rate = if bracketed { (lo + hi) / 2.0 } else { hi };
        let r = measure(
            daemon,
            room,
            senders,
            bytes,
            caps,
            Pace::Rate(rate),
            step,
            draining,
        )?;
        if r.sustainable(rate, loss_pct) {
            lo = rate;
            best = Some(r.clone());
            if !bracketed {
                hi = rate * 1.5;
            }
        } else {
            hi = rate;
            bracketed = true;
        }
        all.push(r);
        if bracketed && (hi - lo) / hi.max(1.0) < 0.03 {
            break;
        }
    }
    let sustained_rate = lo;
    let half = if sustained_rate > 0.0 {
        Some(measure(
            daemon,
            room,
            senders,
            bytes,
            caps,
            Pace::Rate(sustained_rate / 2.0),
            step.max(Duration::from_secs(2)),
            draining,
        )?)
    } else {
        None
    };
    Ok(SweepResult {
        max,
        steps: all,
        sustained_rate,
        sustained: best,
        half,
        loss_pct,
        ceiling_per_sec,
        ceiling_around: None,
    })
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

#[cfg(test)]
mod tests {
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
    }

    /// A paced sender stamps each message with the time its schedule slot was due, so two
    /// messages sent in the same call, or one sent late, carry times a whole number of
    /// periods apart; a skipped slot's lateness is kept for the latency figures, and every
    /// slot, sent or skipped, is counted once in the senders' lateness. Two members sending
    /// from one thread share its schedule: slots alternate between them, and each message's
    /// number and time name its slot.
    /// A paced sender reports the priority it really ran at: `realtime` exactly when its
    /// thread's policy is `SCHED_FIFO` (granted as root, unless a container forbids it; refused without the privilege), so a
    /// report never claims real-time senders it did not have.
    #[test]
    fn a_paced_sender_reports_the_priority_it_really_ran_at() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        from.connect(sink.local_addr().unwrap()).unwrap();
        // Its own thread: the policy stays with the thread that asked for it.
        let (sent, policy) = thread::scope(|s| {
            s.spawn(|| {
                let mut lanes = vec![Lane::new(&from, b"h:", 1, 64)];
                let sent = send_loop(
                    &mut lanes,
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

    #[test]
    fn paced_messages_carry_their_slot_times() {
        let to = UdpSocket::bind("127.0.0.1:0").unwrap();
        let members: Vec<UdpSocket> = (0..2)
            .map(|_| {
                let from = UdpSocket::bind("127.0.0.1:0").unwrap();
                from.connect(to.local_addr().unwrap()).unwrap();
                from
            })
            .collect();
        to.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let prefix = b"header:";
        let rate = 2_000.0; // a slot every 500 µs, the two members' together
        let sending = std::sync::atomic::AtomicBool::new(true);
        // Drained while sending, so no socket buffer size decides what arrives.
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
                        Err(_) if !sending.load(std::sync::atomic::Ordering::SeqCst) => {
                            return stamps
                        }
                        Err(_) => {}
                    }
                }
            });
            let mut lanes = vec![
                Lane::new(&members[0], prefix, 3, 64),
                Lane::new(&members[1], prefix, 5, 64),
            ];
            let sent = send_loop(
                &mut lanes,
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
}
