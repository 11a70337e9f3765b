//! Receiver threads: each owns an epoll set over a share of the members' sockets and drains
//! ready sockets with `recvmmsg` (64 datagrams per call) until `EAGAIN`, decoding deliveries
//! and batch frames with `ucrp` and recording latency from the send time carried in the text.
//! After the last datagram a thread keeps polling for [`Draining::poll`] before it sleeps in
//! `epoll_wait`: on loopback the sender's system call wakes a sleeping receiver itself, a
//! cost that remote members would never put on the daemon (see [`Draining`]). While it
//! polls, it reads every socket in turn rather than asking epoll which are ready
//! ([`Draining::sweep`]).
//!
//! The text of every benchmark message is `t<nanos> s<sender> <seq> ` padded with `x`, where
//! `nanos` is the send time since the process-wide [`Clock`] origin (`CLOCK_MONOTONIC` via
//! `Instant`, shared by senders and receivers), written as [`STAMP_DIGITS`] decimal digits so
//! that a receiver reads it at a fixed place, eight digits at a time. Messages sent before a
//! measurement began (a backlog still draining from an earlier step) are counted apart as
//! stale.
//!
//! The first thread may also drive the paced senders' schedule ([`Pacing`]): it looks at the
//! schedule every [`PACE_EVERY`] sockets it reads and before it waits, and sleeps no later
//! than the next slot's due time.

use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ucrp::delivery::{self, Delivery};

use crate::epoll::{self, Epoll};
use crate::error::{Context, Result};
use crate::fanout::{Pacer, Sent, Turn};
use crate::report::histogram;

/// Datagrams per `recvmmsg` call.
const RECV_BATCH: usize = 64;
/// Room for the largest UDP datagram: batch members announce `max_datagram` 65507.
const DATAGRAM_BUF_LEN: usize = 65536;
/// epoll_wait timeout, so the stop flag is seen promptly.
const EPOLL_TIMEOUT_MS: i32 = 20;
/// The same, for the precise wait of a thread that paces senders.
const EPOLL_TIMEOUT: Duration = Duration::from_millis(EPOLL_TIMEOUT_MS as u64);

/// How the receiver threads drain the members' sockets.
///
/// On loopback, a datagram's delivery into a socket runs inside the sender's `sendmmsg`,
/// down to waking the thread asleep in `epoll_wait` on it: a cross-CPU wake-up that took a
/// third of both the daemon's and the ceiling sender's samples in `perf` when the receiver
/// slept between datagrams. Members on other hosts would cost the daemon none of that, so
/// a receiver keeps polling (without sleeping) for `poll` after the last datagram it saw,
/// the way a NAPI busy-poll does. The ceiling and the daemon are drained alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draining {
    /// Receiver threads; each owns a share of the sockets.
    pub threads: usize,
    /// How long a thread polls after its last datagram before it sleeps; zero sleeps at once.
    pub poll: Duration,
    /// Whether a polling thread reads every socket in turn (`recvmmsg` on each, an empty one
    /// answering `EAGAIN`) instead of asking `epoll_wait` which are ready. A relay's pass
    /// sends to every member, so while datagrams flow most sockets hold one, and epoll's
    /// check of each ready socket (a fifth of the receiver's time in `perf`) buys nothing;
    /// read in the order the sockets were joined, which is the order the daemon sends in,
    /// the sweep follows the pass. The notes measure it ("A receiver that sweeps its
    /// sockets while it polls"). Off, it asks epoll, as every run before 2026-12-07 02:30
    /// UTC did.
    pub sweep: bool,
    /// Whether the sockets have the kernel stamp each datagram's arrival, for the read lag
    /// ([`Received::read_lag_ns`]). Paced fan-out runs only: the stamp and its control
    /// message cost the receiver about 2.6% of the datagrams it reads per second (the
    /// ceiling, four alternating pairs), which would lower the ceiling and the flat-out rates.
    pub stamp_arrivals: bool,
}

/// The process-wide time origin, so that send times stay comparable across measurements.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

impl Clock {
    /// The clock (its origin is fixed on first use).
    pub fn new() -> Clock {
        Clock {
            start: *ORIGIN.get_or_init(Instant::now),
        }
    }
    /// Nanoseconds since the start.
    pub fn nanos(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Digits of the send time in a text: 10^16 ns is 115 days of a run's clock.
pub const STAMP_DIGITS: usize = 16;
/// The latest send time a text can carry; later ones are written as this.
const MAX_STAMP: u64 = 10u64.pow(STAMP_DIGITS as u32) - 1;

/// Writes the message text for `(sender, seq)` sent at `nanos`, padded to `len` bytes.
pub fn write_text(out: &mut Vec<u8>, sender: usize, seq: u64, nanos: u64, len: usize) {
    use std::io::Write;
    let start = out.len();
    let _ = write!(out, "t{:016} s{sender} {seq} ", nanos.min(MAX_STAMP));
    let written = out.len() - start;
    if written < len {
        out.resize(start + len, b'x');
    }
}

/// Reads `(sender, seq, nanos)` back out of a message text, as bytes: the text is what
/// this process wrote, so it is not checked for UTF-8. The receivers need only the time
/// ([`read_stamp`]); tests check the rest.
#[cfg(test)]
pub fn read_text(text: &[u8]) -> Option<(usize, u64, u64)> {
    let nanos = read_stamp(text)?;
    let rest = text[STAMP_DIGITS + 2..].strip_prefix(b"s")?;
    let (sender, rest) = number(rest)?;
    let (seq, rest) = number(rest.strip_prefix(b" ")?)?;
    if !(rest.is_empty() || rest.starts_with(b" ")) {
        return None;
    }
    Some((usize::try_from(sender).ok()?, seq, nanos))
}

/// Reads only the send time of a message text (all a latency sample needs), at its fixed
/// place. At millions of deliveries per second the receiver shares the daemon's cores, so
/// every nanosecond spent here is taken from the system under test: reading three numbers
/// a digit at a time was 5.4% of the machine's samples (about a tenth of a core) at 2.8M
/// batch deliveries/s (`perf`, crates/bench/NOTES.md).
pub fn read_stamp(text: &[u8]) -> Option<u64> {
    let (stamp, rest) = text
        .strip_prefix(b"t")?
        .split_first_chunk::<STAMP_DIGITS>()?;
    if rest.first() != Some(&b' ') {
        return None;
    }
    let (high, low) = stamp.split_first_chunk::<8>()?;
    let low: &[u8; 8] = low.try_into().ok()?;
    Some(eight_digits(high)? * 100_000_000 + eight_digits(low)?)
}

/// Eight ASCII decimal digits as a number, or `None` if any byte is not a digit: all eight
/// at once in one word (a few multiplications instead of a chain of eight).
fn eight_digits(bytes: &[u8; 8]) -> Option<u64> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let word = u64::from_le_bytes(*bytes);
    // Every byte is 0x30..=0x39: its high nibble is 3, and adding 6 carries no low nibble
    // past 9 into it.
    let high_nibbles = 0xF0 * ONES;
    if word & high_nibbles != 0x30 * ONES
        || word.wrapping_add(6 * ONES) & high_nibbles != 0x30 * ONES
    {
        return None;
    }
    // The first digit is the lowest byte: fold neighbours into 2-, 4-, then 8-digit lanes.
    let digits = word - 0x30 * ONES;
    let pairs = (digits * 10 + (digits >> 8)) & 0x00FF_00FF_00FF_00FF;
    let quads = (pairs * 100 + (pairs >> 16)) & 0x0000_FFFF_0000_FFFF;
    Some((quads.wrapping_mul(10_000) + (quads >> 32)) & 0xFFFF_FFFF)
}

/// A leading decimal number (1 to 19 digits, so it cannot overflow) and the bytes after it.
#[cfg(test)]
fn number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    let mut digits = 0;
    for &b in bytes {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            break;
        }
        if digits == 19 {
            return None;
        }
        value = value * 10 + u64::from(digit);
        digits += 1;
    }
    (digits > 0).then(|| (value, &bytes[digits..]))
}

/// What the receivers saw.
#[derive(Debug, Clone)]
pub struct Received {
    /// Datagrams read.
    pub datagrams: u64,
    /// Benchmark messages decoded (batch entries counted one by one).
    pub deliveries: u64,
    /// Datagrams or entries that did not decode, or texts that were not benchmark messages.
    pub undecodable: u64,
    /// Benchmark messages sent before this measurement began (an earlier step's backlog).
    pub stale: u64,
    /// Latency of each delivery, nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// How long each delivery's datagram waited in its member's socket, nanoseconds: from
    /// the kernel's receive stamp (`SO_TIMESTAMPNS`, taken as the daemon's send hands it to
    /// loopback) until the receiver read it. The receivers' own share of the latency; empty
    /// when the sockets give no stamps. (The kernel stamps arrivals only once some socket on
    /// the host has asked for stamps for a moment; before that a datagram is stamped as it is
    /// read. In a fan-out, `ocmd` asks for them at its start.)
    pub read_lag_ns: Histogram<u64>,
    /// When the last delivery arrived, nanoseconds on the run's clock.
    pub last_at_ns: u64,
    /// `epoll_wait` calls made without sleeping, inside a polling window.
    pub polls: u64,
    /// Messages sent before this are stale.
    since_ns: u64,
}

impl Received {
    fn new(since_ns: u64) -> Received {
        Received {
            since_ns,
            datagrams: 0,
            deliveries: 0,
            undecodable: 0,
            stale: 0,
            polls: 0,
            latency_ns: histogram(),
            read_lag_ns: histogram(),
            last_at_ns: 0,
        }
    }

    fn merge(&mut self, other: &Received) {
        self.datagrams += other.datagrams;
        self.deliveries += other.deliveries;
        self.undecodable += other.undecodable;
        self.stale += other.stale;
        self.polls += other.polls;
        let _ = self.latency_ns.add(&other.latency_ns);
        let _ = self.read_lag_ns.add(&other.read_lag_ns);
        self.last_at_ns = self.last_at_ns.max(other.last_at_ns);
    }

    fn record_text(&mut self, text: &[u8], now: u64) {
        match read_stamp(text) {
            Some(sent) if sent < self.since_ns => self.stale += 1,
            Some(sent) => {
                self.deliveries += 1;
                let _ = self.latency_ns.record(now.saturating_sub(sent).max(1));
                self.last_at_ns = now;
            }
            // Registration probes start with 'p' and are not counted.
            None if text.starts_with(b"p") => {}
            None => self.undecodable += 1,
        }
    }

    /// Decodes one datagram (an original chat frame, a sequenced frame or a batch). Chat
    /// texts are read as bytes ([`delivery::chat_message_bytes`]): checking 128 bytes of
    /// UTF-8 per delivery was 8% of the receiver's time at 3M deliveries/s (perf).
    pub fn handle(&mut self, bytes: &[u8], now: u64) {
        self.datagrams += 1;
        if let Some(message) = delivery::chat_message_bytes(bytes) {
            return self.record_text(message, now);
        }
        match delivery::parse(bytes) {
            Ok(Delivery::Batch(body)) => {
                for entry in delivery::batch_entries(body) {
                    match entry.ok().and_then(delivery::chat_message_bytes) {
                        Some(message) => self.record_text(message, now),
                        None => self.undecodable += 1,
                    }
                }
            }
            Ok(_) | Err(_) => self.undecodable += 1,
        }
    }
}

/// Running receiver threads.
pub struct Receivers {
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    handles: Vec<JoinHandle<Result<Received>>>,
}

/// A paced schedule for the first receiver thread to drive between its reads, instead of a
/// sender thread of its own, and where to hand over what was sent once it is done.
pub struct Pacing {
    /// The schedule; it starts at the thread's first look.
    pub(crate) pacer: Pacer,
    /// Gets what was sent, once every slot due within the step is sent, tried or skipped.
    pub(crate) done: mpsc::Sender<Sent>,
}

impl Receivers {
    /// Starts `draining.threads` receivers over `sockets` (split round-robin); messages sent
    /// before `since_ns` on `clock` count as stale.
    pub fn spawn(
        sockets: &[Arc<UdpSocket>],
        draining: Draining,
        clock: Clock,
        since_ns: u64,
    ) -> Result<Receivers> {
        Receivers::spawn_pacing(sockets, draining, clock, since_ns, None)
    }

    /// Like [`Receivers::spawn`], the first thread also driving `pacing`.
    pub fn spawn_pacing(
        sockets: &[Arc<UdpSocket>],
        draining: Draining,
        clock: Clock,
        since_ns: u64,
        mut pacing: Option<Pacing>,
    ) -> Result<Receivers> {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let threads = draining.threads.clamp(1, sockets.len().max(1));
        for socket in sockets.iter().filter(|_| draining.stamp_arrivals) {
            // Before any thread reads, so that every datagram from now on is stamped as it
            // lands. Without stamps the read lag just goes unmeasured.
            let _ = stamp_arrivals(socket);
        }
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let mine: Vec<Arc<UdpSocket>> = sockets
                .iter()
                .skip(t)
                .step_by(threads)
                .map(Arc::clone)
                .collect();
            let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
            let pacing = pacing.take();
            let handle = thread::Builder::new()
                .name(format!("recv-{t}"))
                .spawn(move || {
                    let mut pacer = DrivenPacer::new(pacing);
                    receive_loop(
                        &mine, &stop, &progress, clock, since_ns, draining, &mut pacer,
                    )
                })
                .ctx("spawn receiver thread")?;
            handles.push(handle);
        }
        Ok(Receivers {
            stop,
            progress,
            handles,
        })
    }

    /// Deliveries counted so far by all threads (updated after each `recvmmsg`).
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Waits until `expected` deliveries arrived, or nothing arrived for `quiet`, or `max`
    /// passed; then stops the threads and merges what they saw.
    pub fn finish(self, expected: u64, quiet: Duration, max: Duration) -> Result<Received> {
        let started = Instant::now();
        let mut last = self.progress();
        let mut last_change = Instant::now();
        while started.elapsed() < max {
            thread::sleep(Duration::from_millis(10));
            let now = self.progress();
            if now >= expected {
                break;
            }
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() >= quiet {
                break;
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Received::new(0);
        for handle in self.handles {
            match handle.join() {
                Ok(r) => total.merge(&r?),
                Err(_) => {
                    return Err(crate::error::Error::Io {
                        context: "receiver thread".into(),
                        source: std::io::Error::other("panicked"),
                    })
                }
            }
        }
        Ok(total)
    }
}

/// Room for one datagram's control messages: one `SCM_TIMESTAMPNS` (a 16-byte header and a
/// 16-byte `timespec`) with room to spare, in words so that the headers are aligned.
type Control = [u64; 8];

/// `recvmmsg` scratch: buffers, iovecs, control buffers and headers for [`RECV_BATCH`]
/// datagrams.
struct Batch {
    bufs: Vec<u8>,
    iovecs: Vec<libc::iovec>,
    controls: Vec<Control>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Batch {
        let mut bufs = vec![0u8; RECV_BATCH * DATAGRAM_BUF_LEN];
        let iovecs: Vec<libc::iovec> = bufs
            .chunks_mut(DATAGRAM_BUF_LEN)
            .map(|c| libc::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: c.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) value.
        let headers = (0..RECV_BATCH)
            .map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() })
            .collect();
        let mut batch = Batch {
            bufs,
            iovecs,
            controls: vec![[0; 8]; RECV_BATCH],
            headers,
        };
        for (h, iov) in batch.headers.iter_mut().zip(batch.iovecs.iter_mut()) {
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        batch
    }

    /// Reads up to [`RECV_BATCH`] datagrams without blocking; 0 when none is waiting.
    fn recv(&mut self, fd: RawFd) -> usize {
        for (h, control) in self.headers.iter_mut().zip(self.controls.iter_mut()) {
            h.msg_len = 0;
            // The kernel shrinks msg_controllen to what it wrote: give the whole room back.
            h.msg_hdr.msg_control = control.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = std::mem::size_of::<Control>() as _;
        }
        // SAFETY: headers point at iovecs that point into `bufs`, and at control buffers in
        // `controls`, all owned by self and alive for the call; the count matches the headers'
        // length.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(n).unwrap_or(0)
    }

    fn datagram(&self, i: usize) -> &[u8] {
        let len = (self.headers[i].msg_len as usize).min(DATAGRAM_BUF_LEN);
        let start = i * DATAGRAM_BUF_LEN;
        &self.bufs[start..start + len]
    }

    /// When datagram `i` of the last [`Batch::recv`] landed in its socket, nanoseconds since
    /// the Unix epoch: its `SCM_TIMESTAMPNS`, if the socket stamps datagrams.
    fn arrived_ns(&self, i: usize) -> Option<u64> {
        let hdr = &self.headers.get(i)?.msg_hdr;
        // SAFETY: after a successful recvmmsg, msg_control/msg_controllen describe the
        // control messages the kernel wrote into this header's buffer (owned by self), and
        // the CMSG_* macros stay within msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
            while !cmsg.is_null() {
                let c = &*cmsg;
                if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                    let secs = u64::try_from(ts.tv_sec).ok()?;
                    let nanos = u64::try_from(ts.tv_nsec).ok()?;
                    return secs.checked_mul(1_000_000_000)?.checked_add(nanos);
                }
                cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
            }
        }
        None
    }
}

/// The wall clock (`CLOCK_REALTIME`, as the kernel stamps datagrams), nanoseconds since the
/// Unix epoch; 0 if it reads before it.
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One receiver thread until `stop`: asleep in `epoll_wait` until a socket is ready (or, when
/// it paces senders, until their next slot), then, for `draining.poll` after the last
/// datagram, polling, by sweeps of every socket (`draining.sweep`) or by `epoll_wait` with no
/// timeout.
fn receive_loop(
    sockets: &[Arc<UdpSocket>],
    stop: &AtomicBool,
    progress: &AtomicU64,
    clock: Clock,
    since_ns: u64,
    draining: Draining,
    pacer: &mut DrivenPacer,
) -> Result<Received> {
    let poll_ns = u64::try_from(draining.poll.as_nanos()).unwrap_or(u64::MAX);
    let epoll = Epoll::new()?;
    for (i, socket) in sockets.iter().enumerate() {
        epoll.add_readable(socket.as_raw_fd(), i as u64)?;
    }
    let mut reader = Reader {
        batch: Batch::new(),
        seen: Received::new(since_ns),
        last_ready_ns: 0,
    };
    let mut events = epoll::events(sockets.len());
    while !stop.load(Ordering::Relaxed) {
        let until_due = pacer.pace();
        let polling = poll_ns > 0 && clock.nanos().saturating_sub(reader.last_ready_ns) < poll_ns;
        reader.seen.polls += u64::from(polling);
        if polling && draining.sweep {
            // Every socket, in the order they joined: the order a relay's pass sends in.
            for (i, socket) in sockets.iter().enumerate() {
                reader.drain(socket.as_raw_fd(), clock, progress, pacer);
                if i % PACE_EVERY == PACE_EVERY - 1 {
                    pacer.pace();
                }
            }
            continue;
        }
        let ready = match until_due {
            // To the nanosecond, so that a slot due before the timeout leaves on time.
            Some(due) => {
                let timeout = if polling {
                    Duration::ZERO
                } else {
                    due.min(EPOLL_TIMEOUT)
                };
                epoll.wait_precise(&mut events, timeout).count()
            }
            None => {
                let timeout_ms = if polling { 0 } else { EPOLL_TIMEOUT_MS };
                epoll.wait(&mut events, timeout_ms).count()
            }
        };
        for (i, event) in events[..ready].iter().enumerate() {
            if let Some(socket) = sockets.get(event.u64 as usize) {
                reader.drain(socket.as_raw_fd(), clock, progress, pacer);
            }
            if i % PACE_EVERY == PACE_EVERY - 1 {
                pacer.pace();
            }
        }
    }
    if epoll.precise_refused() {
        eprintln!(
            "ocm-bench: warning: the kernel refused epoll_pwait2, so the receiver that paced \
             the senders woke for their slots to the millisecond, not the microsecond"
        );
    }
    Ok(reader.seen)
}

/// How many sockets a receiver that paces senders reads between two looks at their
/// schedule: a look reads the clock (about 20 ns), a socket's `recvmmsg` takes 0.5 µs or more.
/// A socket with a backlog is looked after every full `recvmmsg` too ([`Reader::drain`]).
const PACE_EVERY: usize = 8;

/// The most turns of the schedule one look takes (each sends up to a `sendmmsg` per sender):
/// a schedule faster than the thread can send must not keep it from reading until the step's
/// end.
const TURNS_PER_LOOK: usize = 16;

/// The schedule a receiver thread drives, if it drives one (until it is done).
struct DrivenPacer(Option<Pacing>);

impl DrivenPacer {
    /// Called on the thread that drives it (its timers made precise).
    fn new(pacing: Option<Pacing>) -> DrivenPacer {
        if pacing.is_some() {
            crate::fanout::precise_timers();
        }
        DrivenPacer(pacing)
    }

    /// Sends what is due (all of it: a backlog after a stall goes out within the catch-up
    /// window, as a thread of its own would send it) and says how long until the next slot;
    /// `None` without a schedule, or once it is done and handed over.
    fn pace(&mut self) -> Option<Duration> {
        let pacing = self.0.as_mut()?;
        for _ in 0..TURNS_PER_LOOK {
            match pacing.pacer.turn() {
                Turn::Wait(wait) if wait.is_zero() => {}
                Turn::Wait(wait) => return Some(wait),
                Turn::Done => {
                    let Pacing { pacer, done } = self.0.take()?;
                    let _ = done.send(pacer.finish());
                    return None;
                }
            }
        }
        // More is due: the next look comes after a socket or a batch read, not a wait.
        Some(Duration::ZERO)
    }
}

/// One receiver thread's buffers and tallies.
struct Reader {
    batch: Batch,
    seen: Received,
    /// When a datagram was last read, on the run's clock: the polling window runs from it.
    last_ready_ns: u64,
}

impl Reader {
    /// Reads `fd` until it holds nothing more, recording each delivery; after each full
    /// `recvmmsg` (a backlog) it looks at the schedule it paces, if any, so that its reads
    /// do not hold up the slots due.
    fn drain(&mut self, fd: RawFd, clock: Clock, progress: &AtomicU64, pacer: &mut DrivenPacer) {
        loop {
            let got = self.batch.recv(fd);
            if got == 0 {
                return;
            }
            let now = clock.nanos();
            let wall = wall_ns();
            // The polling window runs from the last datagram, not from the wake-up.
            self.last_ready_ns = now;
            let before = self.seen.deliveries;
            for i in 0..got {
                let earlier = self.seen.deliveries;
                self.seen.handle(self.batch.datagram(i), now);
                // Weighted by its deliveries, as the latency is.
                let carried = self.seen.deliveries - earlier;
                if let (Some(arrived), true) = (self.batch.arrived_ns(i), carried > 0) {
                    let lag = wall.saturating_sub(arrived).max(1);
                    let _ = self.seen.read_lag_ns.record_n(lag, carried);
                }
            }
            progress.fetch_add(self.seen.deliveries - before, Ordering::Relaxed);
            if got < RECV_BATCH {
                return;
            }
            pacer.pace();
        }
    }
}

/// Sum of the kernel's drop counters (full receive buffer) of these sockets, from
/// `/proc/net/udp`: the client-side loss.
pub fn kernel_drops(sockets: &[Arc<UdpSocket>]) -> u64 {
    let inodes: std::collections::HashSet<String> = sockets
        .iter()
        .filter_map(|s| {
            // SAFETY: fstat on a live descriptor into a zeroed stat buffer.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                (libc::fstat(s.as_raw_fd(), &mut st) == 0).then(|| st.st_ino.to_string())
            }
        })
        .collect();
    let Ok(text) = std::fs::read_to_string("/proc/net/udp") else {
        return 0;
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9)?;
            if !inodes.contains(*inode) {
                return None;
            }
            fields.last()?.parse::<u64>().ok()
        })
        .sum()
}

/// Has the kernel stamp each datagram `socket` receives with the time it arrived
/// (`SO_TIMESTAMPNS`), read by [`Batch::arrived_ns`].
fn stamp_arrivals(socket: &UdpSocket) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a live descriptor with a pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Asks for a receive buffer of `bytes`: `SO_RCVBUFFORCE` (root may pass `rmem_max`), else
/// `SO_RCVBUF`. Returns what the kernel granted.
pub fn size_rcvbuf(socket: &UdpSocket, bytes: usize) -> usize {
    let fd = socket.as_raw_fd();
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: live socket; the option value is a c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&value as *const libc::c_int).cast(),
                len,
            )
        };
        if rc == 0 {
            break;
        }
    }
    let mut got: libc::c_int = 0;
    let mut got_len = len;
    // SAFETY: as above, with a c_int out-parameter.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut got as *mut libc::c_int).cast(),
            &mut got_len,
        );
    }
    usize::try_from(got).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_pads() {
        let mut out = Vec::new();
        write_text(&mut out, 3, 42, 123_456_789, 64);
        assert_eq!(out.len(), 64);
        assert_eq!(read_text(&out), Some((3, 42, 123_456_789)));
        assert_eq!(read_stamp(&out), Some(123_456_789));
        assert_eq!(read_text(b"probe 1"), None);
        assert_eq!(read_text(b"t0000000000000003 s1 2"), Some((1, 2, 3)));
        assert_eq!(read_text(b"t0000000000000003 s1"), None);
        assert_eq!(read_text(b"t0000000000000003 s1 2x"), None);
        assert_eq!(read_text(b"t0000000000000003 s 2"), None);
        assert_eq!(read_stamp(b"t000000000000003 s1 2"), None, "15 digits");
        assert_eq!(read_stamp(b"t00000000000000033 s1 2"), None, "17 digits");
        assert_eq!(read_stamp(b"t0000000000000003"), None, "no space after");
        assert_eq!(
            read_text(b"t9999999999999999 s1 2"),
            Some((1, 2, 9_999_999_999_999_999))
        );
        assert_eq!(
            read_text(b"t0000000000000003 s1 2 \xff\xfe"),
            Some((1, 2, 3)),
            "the padding is not read"
        );
        // A time past what 16 digits hold is written as the largest that fits.
        out.clear();
        write_text(&mut out, 0, 0, u64::MAX, 0);
        assert_eq!(read_stamp(&out), Some(MAX_STAMP));
    }

    /// The word-at-a-time digits agree with a digit-by-digit reading on every byte value in
    /// every position, and on random digit strings.
    #[test]
    fn eight_digits_reads_exactly_the_digit_strings() {
        use rand::{RngExt, SeedableRng};
        let slow = |bytes: &[u8; 8]| {
            bytes.iter().try_fold(0u64, |value, &b| {
                b.is_ascii_digit().then(|| value * 10 + u64::from(b - b'0'))
            })
        };
        for position in 0..8 {
            for byte in 0..=255u8 {
                let mut bytes = *b"31415926";
                bytes[position] = byte;
                assert_eq!(eight_digits(&bytes), slow(&bytes), "{bytes:?}");
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for _ in 0..100_000 {
            let value = rng.random_range(0..100_000_000u64);
            let bytes: [u8; 8] = format!("{value:08}").into_bytes().try_into().unwrap();
            assert_eq!(eight_digits(&bytes), Some(value));
        }
    }

    /// Sends `count` benchmark messages round-robin to `targets`, stamped now.
    fn send_messages(from: &UdpSocket, targets: &[std::net::SocketAddr], count: u64) {
        let clock = Clock::new();
        for seq in 0..count {
            let mut text = Vec::new();
            write_text(&mut text, 0, seq, clock.nanos(), 40);
            let mut chat = Vec::new();
            delivery::encode_chat("m0", &text, &mut chat).unwrap();
            let to = targets[seq as usize % targets.len()];
            from.send_to(&chat, to).unwrap();
        }
    }

    /// A receiver thread that paces two senders handles every slot of their schedule (sent, or
    /// skipped after a hold-up past the catch-up window, counted), wakes for
    /// each slot while nothing arrives (500 µs apart, against its 20 ms wait), and still reads
    /// what arrives: here the senders' own datagrams, framed as deliveries, which land in the
    /// sockets it reads. It hands the schedule back once done.
    #[test]
    fn a_receiver_that_paces_senders_handles_every_slot_wakes_for_each_and_reads_them() {
        use crate::fanout::{Lane, Pacer};
        let sockets = crate::fanout::bind_sockets(2, 1 << 20).unwrap();
        let mut prefix = Vec::new();
        delivery::encode_chat("m0", b"", &mut prefix).unwrap();
        let lanes = sockets
            .iter()
            .enumerate()
            .map(|(i, to)| {
                let from = UdpSocket::bind("127.0.0.1:0").unwrap();
                from.connect(to.local_addr().unwrap()).unwrap();
                Lane::new(Arc::new(from), &prefix, i, 64)
            })
            .collect();
        let (rate, step, slots) = (2_000.0, Duration::from_millis(200), 400);
        let clock = Clock::new();
        let (done, handed_back) = mpsc::channel();
        let pacer = Pacer::new(lanes, 64, rate, step, clock);
        let draining = Draining {
            threads: 1,
            poll: Duration::from_micros(20),
            sweep: true,
            stamp_arrivals: true,
        };
        let pacing = Some(Pacing { pacer, done });
        let receivers =
            Receivers::spawn_pacing(&sockets, draining, clock, clock.nanos(), pacing).unwrap();
        let sent = handed_back
            .recv_timeout(Duration::from_secs(20))
            .expect("the schedule is handed back once done");
        assert_eq!(sent.messages + sent.skipped, slots, "{sent:?}");
        assert_eq!(sent.errors, 0, "{sent:?}");
        assert_eq!(sent.lateness_ns.len(), slots, "each slot's lateness, once");
        // Woken by its 20 ms timeout instead of the next slot, half would be ~10 ms late.
        let median = sent.lateness_ns.value_at_quantile(0.5);
        assert!(median < 5_000_000, "median lateness {median} ns");
        let got = receivers
            .finish(
                sent.messages,
                Duration::from_secs(5),
                Duration::from_secs(20),
            )
            .unwrap();
        assert_eq!(got.deliveries, sent.messages, "every datagram read back");
        assert_eq!((got.undecodable, got.stale), (0, 0));
    }

    /// Whether they sleep at once, poll a while or all the time, asking epoll or sweeping.
    /// (A thread with a window of 60 s polls from its start, the run's clock being younger:
    /// with `sweep` it reads by sweeps alone, so a sweep that missed a socket would fail.)
    #[test]
    fn receivers_drain_every_burst_and_stop_whether_they_poll_or_sleep() {
        let polls = [
            Duration::ZERO,
            Duration::from_micros(20),
            Duration::from_secs(60),
        ];
        for (poll, sweep) in polls.into_iter().flat_map(|p| [(p, false), (p, true)]) {
            let sockets = crate::fanout::bind_sockets(4, 1 << 20).unwrap();
            let targets: Vec<_> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
            let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
            let clock = Clock::new();
            let draining = Draining {
                threads: 2,
                poll,
                sweep,
                stamp_arrivals: true,
            };
            let receivers = Receivers::spawn(&sockets, draining, clock, clock.nanos()).unwrap();
            // Two bursts with a pause between, so a receiver that sleeps goes to sleep.
            send_messages(&sender, &targets, 200);
            let deadline = Instant::now() + Duration::from_secs(10);
            while receivers.progress() < 200 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(
                receivers.progress(),
                200,
                "first burst with poll {poll:?}, sweep {sweep}"
            );
            send_messages(&sender, &targets, 300);
            let started = Instant::now();
            let got = receivers
                .finish(500, Duration::from_secs(5), Duration::from_secs(10))
                .unwrap();
            assert_eq!(
                (got.deliveries, got.undecodable),
                (500, 0),
                "poll {poll:?}, sweep {sweep}"
            );
            assert_eq!(got.latency_ns.len(), 500);
            assert_eq!(got.read_lag_ns.len(), 500, "a read lag per delivery");
            // Only a receiver with a window polls; one of 60 s polls after every datagram.
            // (20 µs is not asserted: a preempted thread may find its window gone.)
            if poll.is_zero() {
                assert_eq!(got.polls, 0);
            } else if poll >= Duration::from_secs(1) {
                assert!(got.polls > 0, "poll {poll:?}, sweep {sweep}");
            }
            // A thread still inside its polling window sees the stop flag too.
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "poll {poll:?}, sweep {sweep}"
            );
        }
    }

    /// The read lag is measured from the kernel's stamp of the datagram's arrival, on the
    /// same clock as [`wall_ns`]: a datagram left unread for 30 ms shows at least that.
    #[test]
    fn arrival_stamps_measure_how_long_a_datagram_waited_unread() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = Batch::new();
        sender
            .send_to(b"unstamped", receiver.local_addr().unwrap())
            .unwrap();
        assert_eq!(wait_for(&mut batch, &receiver), 1);
        assert_eq!(batch.arrived_ns(0), None, "no stamp asked for");

        stamp_arrivals(&receiver).unwrap();
        // The kernel turns arrival stamps on for the whole host a moment after the first
        // socket asks (deferred work); until then a datagram is stamped as it is read. In a
        // fan-out run `ocmd`'s socket has them on from its start.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (sent, waited) = send_and_read_after(&sender, &receiver, &mut batch, 30);
            let arrived = batch.arrived_ns(0).expect("stamped");
            if arrived < waited - 20_000_000 || Instant::now() > deadline {
                assert!(
                    sent <= arrived && arrived <= waited,
                    "{sent} ≤ {arrived} ≤ {waited}"
                );
                assert!(
                    waited - arrived >= 30_000_000,
                    "waited {} ns",
                    waited - arrived
                );
                assert_eq!(batch.datagram(0), b"stamped");
                break;
            }
        }
    }

    /// Sends a datagram to `receiver`, leaves it there for `ms` and reads it into `batch`:
    /// the wall clock just before the send and just after the read.
    fn send_and_read_after(
        sender: &UdpSocket,
        receiver: &UdpSocket,
        batch: &mut Batch,
        ms: u64,
    ) -> (u64, u64) {
        let sent = wall_ns();
        sender
            .send_to(b"stamped", receiver.local_addr().unwrap())
            .unwrap();
        // The wait being measured, not a wait for something to happen.
        thread::sleep(Duration::from_millis(ms));
        assert_eq!(wait_for(batch, receiver), 1);
        (sent, wall_ns())
    }

    /// Reads what is waiting on `socket` into `batch`, polling until something is.
    fn wait_for(batch: &mut Batch, socket: &UdpSocket) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = batch.recv(socket.as_raw_fd());
            if got > 0 || Instant::now() > deadline {
                return got;
            }
            thread::yield_now();
        }
    }

    #[test]
    fn batch_frames_are_counted_entry_by_entry() {
        let mut text = Vec::new();
        write_text(&mut text, 1, 7, 10, 40);
        let mut chat = Vec::new();
        delivery::encode_chat("m1", &text, &mut chat).unwrap();
        let mut batch = Vec::new();
        delivery::begin_batch(&mut batch);
        delivery::push_batch_entry(&chat, &mut batch).unwrap();
        delivery::push_batch_entry(&chat, &mut batch).unwrap();
        let mut r = Received::new(5);
        r.handle(&batch, 1_000);
        r.handle(&chat, 1_000);
        r.handle(&[0x00, 0x09], 1_000);
        assert_eq!((r.datagrams, r.deliveries, r.undecodable), (3, 3, 1));
        let mut stale = Vec::new();
        write_text(&mut stale, 1, 8, 2, 40);
        let mut chat = Vec::new();
        delivery::encode_chat("m1", &stale, &mut chat).unwrap();
        r.handle(&chat, 1_000);
        assert_eq!((r.deliveries, r.stale), (3, 1));
        assert_eq!(r.latency_ns.max(), 990);
    }
}
