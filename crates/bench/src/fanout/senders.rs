//! The sending members: flat out, a thread each; or paced on one schedule of slots (each
//! message stamped with its slot's due time, a held-up sender catching up within a window and
//! skipping the rest, counted as loss), driven between the first receiver thread's reads
//! ([`Pacer`], the default) or by a sleeping thread of its own at real-time priority.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::{Pace, SEND_BATCH};
use crate::receivers::{write_text, Clock};
use crate::report::histogram;
use crate::stalls::become_realtime;

/// Whether paced senders ask for real-time priority (`--sender-priority`, set once at start).
static PACED_SENDERS_REALTIME: AtomicBool = AtomicBool::new(true);

/// Sets whether paced senders on a thread of their own run at `SCHED_FIFO` 1 (the default)
/// or at normal priority.
///
/// The senders stand for members on other machines, whose messages leave on time whatever
/// the daemon is doing. At normal priority on two vCPUs that the daemon and the receivers
/// keep ~95% busy, a woken sender can wait milliseconds for a core and then skip slots
/// (counted as loss): 5 of 8 normal-priority runs at 567k–6.3M deliveries/s skipped
/// 0.006–0.22% of their schedule, none of 12 real-time runs did (crates/bench/NOTES.md,
/// "Paced senders at real-time priority"). Flat-out senders never ask: they never sleep,
/// and would take a core outright. Nor does a receiver that paces them ([`set_paced_by_receiver`]):
/// it polls while datagrams come, and at real-time priority it would keep the daemon off
/// its core ("Receivers at real-time priority").
pub fn set_paced_senders_realtime(on: bool) {
    PACED_SENDERS_REALTIME.store(on, Ordering::Relaxed);
}

/// Whether the first receiver thread drives the paced senders' schedule (`--pacer`, set once
/// at start).
static PACED_BY_RECEIVER: AtomicBool = AtomicBool::new(true);

/// Sets whether the paced senders' schedule is driven by the first receiver thread between
/// its reads (the default) or by a thread of its own that sleeps between slots.
///
/// A thread of its own wakes every 100 µs at the high rates, at real-time priority, and
/// takes its vCPU from the daemon's loop or the receiver at each wake-up: with the loop and
/// the receiver busy all the time, the three ask for more than the two vCPUs ("Who waits for
/// a vCPU at the batch rates"). Driven by the receiver, which polls anyway while datagrams
/// come, the generator is one busy thread, and each slot leaves within a few microseconds
/// of its due time instead of at the next tick (crates/bench/NOTES.md, "Paced senders on
/// the receiver's thread").
pub fn set_paced_by_receiver(on: bool) {
    PACED_BY_RECEIVER.store(on, Ordering::Relaxed);
}

/// Whether the first receiver thread drives the paced senders ([`set_paced_by_receiver`]).
pub fn paced_by_receiver() -> bool {
    PACED_BY_RECEIVER.load(Ordering::Relaxed)
}

/// How the paced senders ran, in words for the reports: driven by the receiver, or on a
/// thread of their own at real-time priority or not.
pub fn paced_senders_note(by_receiver: bool, realtime: bool) -> &'static str {
    match (by_receiver, realtime) {
        (true, _) => "from the receiver thread, between its reads, at normal priority (`--pacer receiver`): the generator keeps one busy thread beside the daemon's loop, as remote members would keep none, and each slot leaves as soon as the thread looks again, within microseconds while it polls",
        (false, true) => "on a thread of their own at real-time priority (`SCHED_FIFO` 1), so they leave on schedule as remote members would, whatever the daemon and receivers take (`--pacer own`, `--sender-priority`)",
        (false, false) => "on a thread of their own at normal priority, level with the daemon, which can hold them up past their slots (`--pacer own`, `--sender-priority normal`, or not permitted to raise it)",
    }
}

/// What the senders of one thread, or of one schedule, did.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) messages: u64,
    pub(crate) errors: u64,
    /// Paced: schedule slots skipped after the sender was held up (see [`Pacer::turn`]).
    pub(crate) skipped: u64,
    /// Paced: how late each skipped slot already was when it was skipped, nanoseconds.
    pub(crate) skipped_late_ns: Vec<u64>,
    /// Paced: how late each slot left (sent or skipped), nanoseconds.
    pub(crate) lateness_ns: Histogram<u64>,
    /// Paced: the thread ran at real-time priority.
    pub(crate) realtime: bool,
    /// Paced: from the schedule's first turn to the turn that found it done, the time the
    /// offered rate is over (the thread that drove it may go on with other work after).
    pub(crate) elapsed: Option<Duration>,
    /// Paced: when the schedule started (its first turn), on the run's clock: where the
    /// deliveries' window starts.
    pub(crate) started_ns: Option<u64>,
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
            elapsed: None,
            started_ns: None,
        }
    }
}

/// When schedule slot `k` of a sender paced at `rate` msgs/s is due, nanoseconds after its
/// start.
pub(super) fn slot_due_ns(k: u64, rate: f64) -> u64 {
    (k as f64 * 1e9 / rate) as u64
}

/// Whether a sender hands the kernel a member's messages of one turn as one segmented send
/// (`UDP_SEGMENT`) rather than as a `sendmmsg` entry each (`--sender-segments`, set once at
/// start; see [`set_segmented_sends`]).
static SEGMENTED_SENDS: AtomicBool = AtomicBool::new(true);

/// Sets whether senders hand a member's messages of one turn to the kernel as one segmented
/// send (the default) or one datagram at a time.
///
/// The senders stand for members on other machines, whose sending costs this one nothing. On
/// loopback the kernel splits a segmented send into the same datagrams before `ocmd`'s socket
/// (which does not ask for `UDP_GRO`), so the daemon reads exactly what it read before, but
/// the sender pays its per-datagram route and socket work once a send: at 8M batch
/// deliveries/s the sender thread took 23–24% of a vCPU instead of 29%, left to the receiver
/// and the loop (crates/bench/NOTES.md, "Segmented sends for the generator's senders").
pub fn set_segmented_sends(on: bool) {
    SEGMENTED_SENDS.store(on, Ordering::Relaxed);
}

/// Whether senders make segmented sends ([`set_segmented_sends`]).
pub fn segmented_sends() -> bool {
    SEGMENTED_SENDS.load(Ordering::Relaxed)
}

/// The most payload one segmented send may carry: a UDP datagram's over IPv4.
const MAX_SEGMENTED_BYTES: usize = 65_507;

/// `sendmmsg` scratch for one connected socket.
struct SendBatch {
    slot: usize,
    bufs: Vec<u8>,
    lens: [usize; SEND_BATCH],
    /// Whether a turn's messages of equal length go as one segmented send: on when asked
    /// ([`segmented_sends`]), off for good once the kernel refuses one.
    segmenting: bool,
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
            segmenting: segmented_sends(),
        }
    }

    /// Writes message `i` of this batch.
    fn fill(&mut self, i: usize, prefix_len: usize, text: &[u8]) {
        let start = i * self.slot + prefix_len;
        let len = text.len().min(self.slot - prefix_len);
        self.bufs[start..start + len].copy_from_slice(&text[..len]);
        self.lens[i] = prefix_len + len;
    }

    /// Sends the first `n` messages; returns how many the kernel took. Several of one length
    /// go as one segmented send when [`SendBatch::segmenting`]; the kernel takes them all or
    /// none. One it refuses as such (an old kernel, a socket option in the way) turns
    /// segmenting off and goes one datagram per message.
    fn send(&mut self, fd: i32, n: usize) -> std::io::Result<usize> {
        if let Some(len) = self.segment_len(n) {
            match self.send_segmented(fd, n, len) {
                Err(e) if segments_refused(&e) => self.segmenting = false,
                other => return other,
            }
        }
        self.send_each(fd, n)
    }

    /// The length of the first `n` messages when they can go as one segmented send: several,
    /// all of one length, within a datagram's payload in all.
    fn segment_len(&self, n: usize) -> Option<u16> {
        let len = *self.lens.first()?;
        let fits = n
            .checked_mul(len)
            .is_some_and(|total| total <= MAX_SEGMENTED_BYTES);
        let equal = self.lens[..n].iter().all(|&l| l == len);
        (self.segmenting && n > 1 && fits && equal).then(|| u16::try_from(len).ok())?
    }

    /// Sends the first `n` messages, `len` bytes each, as one segmented send.
    fn send_segmented(&mut self, fd: i32, n: usize, len: u16) -> std::io::Result<usize> {
        let mut iovecs = self.iovecs(n);
        // One cmsghdr and a u16, in words so that the header is aligned.
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = iovecs.as_mut_ptr();
        hdr.msg_iovlen = n as _; // size_t on glibc, c_int on musl
        hdr.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
        // SAFETY: the control buffer (32 bytes) holds CMSG_SPACE(2) (24 bytes on 64-bit
        // Linux), so CMSG_FIRSTHDR is non-null and its data has room for the u16.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), len);
        }
        // SAFETY: the header points at iovecs into bufs and at `control`, all alive for the
        // call; the socket is connected, so no address is needed.
        let rc = unsafe { libc::sendmsg(fd, &hdr, 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n)
    }

    /// Byte runs over the first `n` messages, in order (the rest empty): what either send
    /// hands the kernel.
    fn iovecs(&mut self, n: usize) -> [libc::iovec; SEND_BATCH] {
        let base = self.bufs.as_mut_ptr();
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_BATCH];
        for (i, iov) in iovecs.iter_mut().enumerate().take(n) {
            // SAFETY: i * slot is within bufs (SEND_BATCH slots).
            iov.iov_base = unsafe { base.add(i * self.slot) }.cast();
            iov.iov_len = self.lens[i];
        }
        iovecs
    }

    /// Sends the first `n` messages as one `sendmmsg` entry each.
    fn send_each(&mut self, fd: i32, n: usize) -> std::io::Result<usize> {
        let mut iovecs = self.iovecs(n);
        // SAFETY: mmsghdr is plain data; all-zero is valid.
        let mut headers: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for (header, iov) in headers.iter_mut().zip(iovecs.iter_mut()).take(n) {
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
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

/// Whether the kernel refused a segmented send as such, rather than for want of room.
fn segments_refused(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT | libc::EMSGSIZE)
    )
}

/// The shortest sleep of a paced sender on a thread of its own (`--pacer own`; its timer slack is set to 1 µs, so sleeps are
/// close to exact).
const PACING_TICK: Duration = Duration::from_micros(100);

/// How much of its schedule, in microseconds, a paced sender that was held up still sends
/// late (see [`Pacer::turn`]; `--catch-up-ms`, set once at start): 20 ms, past the vCPU stalls of
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
pub(super) fn slots_caught_up(rate: f64, window_secs: f64) -> u64 {
    ((rate * window_secs).ceil() as u64).max(4)
}

/// What a paced sender owes at one moment of its step: the slots due and not yet handled,
/// the oldest of them past the catch-up window to skip, the rest to send.
#[derive(Debug, PartialEq)]
pub(super) struct Owed {
    /// Slots to skip first (counted as loss), the oldest.
    pub(super) skip: u64,
    /// Slots to send after them.
    pub(super) send: u64,
}

/// The slots a sender paced at `rate` msgs/s owes `elapsed` into a step of `duration`, with
/// `handled` slots sent, tried or skipped so far and `catch_up` slots of window. Slot `k` is
/// due at `k / rate`. Once the step is over, the slots owed are every one due within it, so
/// that a sender held up at the very end catches up or skips them as anywhere else in the
/// step; leaving them out would drop a stall's loss and lateness from the figures, and a
/// step could pass on the stall that would fail it a moment earlier.
pub(super) fn owed(
    elapsed: Duration,
    duration: Duration,
    rate: f64,
    handled: u64,
    catch_up: u64,
) -> Owed {
    let due_by = if elapsed >= duration {
        // Slots due strictly before the end.
        (duration.as_secs_f64() * rate).ceil() as u64
    } else {
        // Slots due at or before now.
        (elapsed.as_secs_f64() * rate) as u64 + 1
    };
    let due = due_by.saturating_sub(handled);
    // A constant-rate source that was held up (its vCPU stopped: on a shared 2-core VM, a
    // few ms often, 10–200 ms now and then) sends what it missed within the catch-up window
    // late, each message stamped with its slot's due time, as remote members' messages would
    // wait in a stopped daemon's socket. A longer backlog is not sent in one burst, which
    // would measure the stall, not the rate: slots missed beyond the window are skipped, and
    // counted.
    let skip = due.saturating_sub(catch_up);
    Owed {
        skip,
        send: due - skip,
    }
}

/// Sets this thread's timer slack to 1 µs (the default 50 µs would make every paced sleep
/// late by up to that much).
pub(crate) fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// One sending member: its connected socket and its `sendmmsg` scratch.
pub(crate) struct Lane {
    socket: Arc<UdpSocket>,
    prefix_len: usize,
    /// The member's index, written into every text.
    sender: usize,
    batch: SendBatch,
    /// The schedule slots of the messages filled into `batch`, in order.
    slots: [u64; SEND_BATCH],
    filled: usize,
}

impl Lane {
    pub(crate) fn new(
        socket: Arc<UdpSocket>,
        prefix: &[u8],
        sender: usize,
        text_len: usize,
    ) -> Lane {
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

/// Fills the messages of slots `first..first + n` into their lanes (slot `k` is lane
/// `k % lanes`'s message `k / lanes`), each stamped with `stamp(slot)`.
fn fill(
    lanes: &mut [Lane],
    text: &mut Vec<u8>,
    text_len: usize,
    first: u64,
    n: u64,
    stamp: impl Fn(u64) -> u64,
) {
    let count = lanes.len() as u64;
    for slot in first..first + n {
        let lane = &mut lanes[(slot % count) as usize];
        text.clear();
        write_text(text, lane.sender, slot / count, stamp(slot), text_len);
        let i = lane.filled;
        lane.batch.fill(i, lane.prefix_len, text);
        lane.slots[i] = slot;
        lane.filled += 1;
    }
}

/// Hands every lane's filled messages to the kernel and counts them into `sent`; paced
/// (`schedule`: the rate and the step's start), each message's lateness too.
fn flush(lanes: &mut [Lane], sent: &mut Sent, schedule: Option<(f64, u64)>, clock: Clock) {
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
                if let Some((r, start_ns)) = schedule {
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
}

/// What a [`Pacer`] asks of its driver after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Come back in this long, when the next slot is due (zero: more is due now).
    Wait(Duration),
    /// Every slot due within the step was sent, tried or skipped.
    Done,
}

/// Members sending on one paced schedule (`rate` messages/s in all, for `duration`): slot
/// `k` is lane `k % lanes`'s message `k / lanes`, due `k / rate` after the schedule's first
/// turn, and every slot due within the step is sent, tried or skipped ([`owed`]). Driven
/// turn by turn: between a receiver's reads ([`crate::receivers::Pacing`]), or by a thread
/// of its own that sleeps until the next slot ([`send_loop`]).
pub(crate) struct Pacer {
    lanes: Vec<Lane>,
    text: Vec<u8>,
    text_len: usize,
    rate: f64,
    duration: Duration,
    clock: Clock,
    catch_up: u64,
    /// When the schedule started (its first turn), on the monotonic clock and on `clock`.
    started: Option<(Instant, u64)>,
    /// Slots sent or tried; the next slot is this plus those skipped.
    attempted: u64,
    sent: Sent,
}

impl Pacer {
    /// A schedule that starts at its first turn.
    pub(crate) fn new(
        lanes: Vec<Lane>,
        text_len: usize,
        rate: f64,
        duration: Duration,
        clock: Clock,
    ) -> Pacer {
        let catch_up_secs = CATCH_UP_US.load(Ordering::Relaxed) as f64 / 1e6;
        Pacer {
            lanes,
            text: Vec::with_capacity(text_len + 64),
            text_len,
            rate,
            duration,
            clock,
            catch_up: slots_caught_up(rate, catch_up_secs),
            started: None,
            attempted: 0,
            sent: Sent::default(),
        }
    }

    /// Skips what is owed beyond the catch-up window, sends up to a `sendmmsg` per lane of
    /// what is due, and says when to come back.
    pub(crate) fn turn(&mut self) -> Turn {
        let clock = self.clock;
        let (start, start_ns) = *self
            .started
            .get_or_insert_with(|| (Instant::now(), clock.nanos()));
        let elapsed = start.elapsed();
        let over = elapsed >= self.duration;
        if self.lanes.is_empty() {
            return Turn::Done;
        }
        let (r, sent) = (self.rate, &mut self.sent);
        let Owed { skip, send } = owed(
            elapsed,
            self.duration,
            r,
            self.attempted + sent.skipped,
            self.catch_up,
        );
        if skip > 0 {
            // Not sent, but not left out of the latency either: each skipped slot counts as
            // deliveries at least as late as it is now.
            let now = self.clock.nanos();
            let first = self.attempted + sent.skipped;
            for slot in first..first + skip {
                let late = now.saturating_sub(start_ns + slot_due_ns(slot, r));
                sent.skipped_late_ns.push(late);
                let _ = sent.lateness_ns.record(late.max(1));
            }
            sent.skipped += skip;
        }
        if send == 0 {
            if over {
                sent.elapsed = Some(start.elapsed());
                return Turn::Done;
            }
            let next = Duration::from_secs_f64((self.attempted + sent.skipped) as f64 / r);
            return Turn::Wait(
                next.saturating_sub(start.elapsed())
                    .max(Duration::from_nanos(1)),
            );
        }
        let n = send.min(SEND_BATCH as u64 * self.lanes.len() as u64);
        let first = self.attempted + sent.skipped;
        // A paced message carries the time its slot was due, not the time it left: a sender
        // held up (by the daemon or by anything else on the machine) then shows as latency
        // instead of hiding it (coordinated omission).
        fill(
            &mut self.lanes,
            &mut self.text,
            self.text_len,
            first,
            n,
            |slot| start_ns + slot_due_ns(slot, r),
        );
        flush(&mut self.lanes, sent, Some((r, start_ns)), self.clock);
        // Slots advance for every attempt so pacing does not retry forever.
        self.attempted += n;
        Turn::Wait(Duration::ZERO)
    }

    /// What the schedule's members sent.
    pub(crate) fn finish(mut self) -> Sent {
        self.sent.started_ns = self.started.map(|(_, at_ns)| at_ns);
        self.sent
    }

    /// Asks for real-time priority for the calling thread, its own, when paced senders should
    /// have it ([`set_paced_senders_realtime`]), and records whether it was granted.
    fn claim_priority(&mut self) {
        self.sent.realtime = PACED_SENDERS_REALTIME.load(Ordering::Relaxed) && become_realtime();
    }
}

/// Sends from the members of `lanes` until `duration` is over, flat out or paced at `rate`
/// msgs/s in all ([`Pacer`], this thread asleep between its turns).
pub(super) fn send_loop(
    lanes: Vec<Lane>,
    text_len: usize,
    rate: Option<f64>,
    duration: Duration,
    clock: Clock,
) -> Sent {
    let Some(rate) = rate else {
        return send_flat_out(lanes, text_len, duration, clock);
    };
    precise_timers();
    let mut pacer = Pacer::new(lanes, text_len, rate, duration, clock);
    pacer.claim_priority();
    loop {
        match pacer.turn() {
            Turn::Done => return pacer.finish(),
            Turn::Wait(wait) if wait.is_zero() => {}
            // Sleep, never spin: a spinning pacer takes a core the daemon needs. Above
            // 1 / PACING_TICK msgs/s the due messages leave together once a tick, in one
            // sendmmsg per lane.
            Turn::Wait(wait) => thread::sleep(wait.max(PACING_TICK)),
        }
    }
}

/// Sends from the members of `lanes` as fast as their sockets take it until `duration` is
/// over, each message stamped with the time it is filled.
fn send_flat_out(mut lanes: Vec<Lane>, text_len: usize, duration: Duration, clock: Clock) -> Sent {
    let mut sent = Sent::default();
    let mut text = Vec::with_capacity(text_len + 64);
    let mut next = 0u64;
    let start = Instant::now();
    while !lanes.is_empty() && start.elapsed() < duration {
        let n = SEND_BATCH as u64 * lanes.len() as u64;
        let now = clock.nanos();
        fill(&mut lanes, &mut text, text_len, next, n, |_| now);
        flush(&mut lanes, &mut sent, None, clock);
        next += n;
    }
    sent
}

/// How many threads of their own send for `senders` members: flat out, one each (each sends
/// as fast as its socket takes); paced, none when the receiver drives them (`by_receiver`),
/// else one for all, on one schedule. Each paced thread wakes every [`PACING_TICK`] at high
/// rates, and every wake-up can switch the daemon's loop out: with the two senders of the
/// standard matrix on one thread instead of two (2026-12-04, 19:00 UTC, batch members at 3M
/// and 6.3M deliveries/s, alternating pairs), the generator took 5–10% of a core less and the
/// p50 and p90 came out lower in every pair.
pub(super) fn sender_threads(senders: usize, pace: Pace, by_receiver: bool) -> usize {
    match pace {
        Pace::Max => senders,
        Pace::Rate(_) if by_receiver => 0,
        Pace::Rate(_) => senders.min(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected sender and its receiver on loopback (the receiver gives up after 10 s).
    fn socket_pair() -> (UdpSocket, UdpSocket) {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        (sender, receiver)
    }

    /// Fills five texts into `batch` behind a prefix of `prefix_len` bytes, all of one length
    /// or each of its own; returns them.
    fn fill_five(batch: &mut SendBatch, prefix_len: usize, equal: bool) -> Vec<Vec<u8>> {
        let texts: Vec<Vec<u8>> = (0..5u8)
            .map(|i| {
                let len = if equal { 40 } else { 30 + usize::from(i) };
                vec![b'a' + i; len]
            })
            .collect();
        for (i, text) in texts.iter().enumerate() {
            batch.fill(i, prefix_len, text);
        }
        texts
    }

    /// Sends the texts filled in `batch` and checks that they arrive as as many datagrams,
    /// in order, each `prefix` and its text.
    fn send_and_read(
        batch: &mut SendBatch,
        prefix: &[u8],
        texts: &[Vec<u8>],
        (sender, receiver): &(UdpSocket, UdpSocket),
    ) {
        let sent = batch.send(sender.as_raw_fd(), texts.len()).unwrap();
        assert_eq!(sent, texts.len());
        let mut buf = [0u8; 256];
        for text in texts {
            let n = receiver.recv(&mut buf).unwrap();
            assert_eq!(&buf[..prefix.len()], prefix);
            assert_eq!(&buf[prefix.len()..n], &text[..]);
        }
    }

    /// A turn's messages arrive as the same datagrams, in order, whether they left as one
    /// segmented send (several of one length) or one at a time (lengths that differ, or
    /// segmenting off).
    #[test]
    fn a_turns_messages_arrive_as_the_same_datagrams_segmented_or_not() {
        let prefix = b"PFX:";
        for (segmenting, equal) in [(true, true), (true, false), (false, true)] {
            let pair = socket_pair();
            let mut batch = SendBatch::new(prefix, 40);
            batch.segmenting = segmenting;
            let texts = fill_five(&mut batch, prefix.len(), equal);
            assert_eq!(
                batch.segment_len(texts.len()).is_some(),
                segmenting && equal,
                "segmenting {segmenting}, equal {equal}"
            );
            send_and_read(&mut batch, prefix, &texts, &pair);
            assert_eq!(
                batch.segmenting, segmenting,
                "the kernel took the segmented send"
            );
        }
    }

    /// A socket whose segmented send the kernel refuses (here one told to send without UDP
    /// checksums, `SO_NO_CHECK`, which segmentation offload cannot honour: `EINVAL`) still
    /// delivers the turn, one datagram per message, and makes no segmented send again.
    #[test]
    fn a_refused_segmented_send_goes_one_datagram_per_message_from_then_on() {
        let prefix = b"PFX:";
        let pair = socket_pair();
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from a live local, for a socket `pair` owns.
        let rc = unsafe {
            libc::setsockopt(
                pair.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                std::ptr::addr_of!(on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_NO_CHECK: {}", std::io::Error::last_os_error());
        let mut batch = SendBatch::new(prefix, 40);
        batch.segmenting = true;
        let texts = fill_five(&mut batch, prefix.len(), true);
        let len = batch
            .segment_len(texts.len())
            .expect("a segmented send is due");
        let refusal = batch
            .send_segmented(pair.0.as_raw_fd(), texts.len(), len)
            .expect_err("the kernel refuses a segmented send without checksums");
        assert!(segments_refused(&refusal), "refused as such: {refusal}");
        send_and_read(&mut batch, prefix, &texts, &pair);
        assert!(!batch.segmenting, "the refusal turned segmenting off");
        assert_eq!(batch.segment_len(texts.len()), None, "and it stays off");
        send_and_read(&mut batch, prefix, &texts, &pair);
    }

    /// Flat out, a thread per sender; paced, one for all, or none when the receiver paces.
    #[test]
    fn paced_senders_get_one_thread_or_none_when_the_receiver_paces() {
        assert_eq!(sender_threads(3, Pace::Max, true), 3);
        assert_eq!(sender_threads(3, Pace::Rate(100.0), false), 1);
        assert_eq!(sender_threads(3, Pace::Rate(100.0), true), 0);
    }

    /// One message, or more than a datagram's payload in all, goes one datagram at a time.
    #[test]
    fn only_several_messages_within_a_datagrams_payload_are_segmented() {
        let mut batch = SendBatch::new(b"", 4000);
        batch.segmenting = true;
        batch.lens = [4000; SEND_BATCH];
        assert_eq!(batch.segment_len(1), None, "one message");
        assert_eq!(batch.segment_len(16), Some(4000), "64,000 bytes");
        assert_eq!(batch.segment_len(17), None, "68,000 bytes");
        batch.segmenting = false;
        assert_eq!(batch.segment_len(16), None, "off");
    }
}
