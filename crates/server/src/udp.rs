//! The UDP socket: buffer sizing, sending an [`Outbox`] (packing batch-capable recipients'
//! messages into batch frames, segmenting the others' when asked, holding the last words the
//! kernel has no room for, `sendmmsg` underneath), and reading the kernel's drop count.

use std::collections::{HashMap, HashSet};
use std::io::{self, IoSlice};
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use ucrp::delivery;

use crate::last_words::{ExpiryLog, LastWords, MAX_HELD_AGE};
use crate::local::{LocalId, Locals};
use crate::metrics::Metrics;
use crate::mmsg::{self, Fate};
use crate::outbox::{Outbox, Send as QueuedSend};
use crate::peer;
use crate::sockopt;

/// Asks for socket buffer sizes; returns what the kernel granted `(recv, send)`.
pub fn size_buffers(socket: &UdpSocket, recv: usize, send: usize) -> (usize, usize) {
    let fd = socket.as_raw_fd();
    let set = |opt, bytes: usize| {
        if bytes == 0 {
            return;
        }
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // A refusal shows in what `get` then reads back.
        let _ = sockopt::set_int(fd, libc::SOL_SOCKET, opt, value);
    };
    let get = |opt| {
        sockopt::get_int(fd, libc::SOL_SOCKET, opt).map_or(0, |v| usize::try_from(v).unwrap_or(0))
    };
    set(libc::SO_RCVBUF, recv);
    set(libc::SO_SNDBUF, send);
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
}

/// Bytes of batch plans kept for reuse between passes (beyond that they are freed).
const POOLED_BATCH_BYTES: usize = 1024 * 1024;

/// Most runs of outbox bytes one batch gathers: the kernel's limit, less the header's run.
const MAX_BATCH_RUNS: usize = mmsg::MAX_PARTS - 1;

/// Bytes one run of a batch plan takes.
const RUN_SIZE: usize = mem::size_of::<Range<usize>>();

/// The largest datagram a segmented send carries: what fits a path of the minimum IPv6 MTU
/// (1280 bytes, less 40 of IPv6 header and 8 of UDP header). The kernel refuses a segmented
/// send whose segments do not fit the path's MTU, where it would fragment a lone datagram.
pub const MAX_SEGMENT_BYTES: usize = 1232;

// A segment size goes to the kernel as a u16.
const _: () = assert!(MAX_SEGMENT_BYTES <= u16::MAX as usize);

/// How long a destination whose segmented send the kernel refused, but whose datagrams it took
/// one at a time, gets one datagram per send: the kernel's default lifetime of a path MTU it
/// learned (`net.ipv4.route.mtu_expires`), the likeliest cause.
pub const UNSEGMENTED_FOR: Duration = Duration::from_secs(600);

/// Most destinations remembered so; past it, the memory starts over.
const MAX_UNSEGMENTED: usize = 4096;

/// Destinations (IP addresses: a path MTU is the route's) whose segmented send the kernel
/// refused but whose datagrams it took one at a time: each gets one datagram per send for
/// [`UNSEGMENTED_FOR`].
#[derive(Default)]
struct Unsegmented {
    until: HashMap<IpAddr, Instant>,
    /// The earliest time in `until`: from then on, a pass drops what is over.
    prune_at: Option<Instant>,
    /// Whether a refusal was logged at level warn (later ones go to debug).
    logged: bool,
}

impl Unsegmented {
    /// The time to check destinations against in this pass; `None`, without reading the
    /// clock, when none is kept.
    fn now(&mut self) -> Option<Instant> {
        if self.until.is_empty() {
            return None;
        }
        let now = Instant::now();
        if self.prune_at.is_some_and(|at| at <= now) {
            self.until.retain(|_, until| *until > now);
            self.prune_at = self.until.values().min().copied();
        }
        Some(now)
    }

    /// Whether `ip` is kept from segmented sends at `now` (from [`Unsegmented::now`]).
    fn keeps(&self, ip: &IpAddr, now: Option<Instant>) -> bool {
        now.is_some_and(|now| self.until.get(ip).is_some_and(|until| now < *until))
    }

    /// Keeps `ip` from segmented sends from `now` on; returns whether it was not kept yet.
    fn keep(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.until.len() >= MAX_UNSEGMENTED {
            self.until.retain(|_, until| *until > now);
            if self.until.len() >= MAX_UNSEGMENTED {
                self.until.clear();
            }
        }
        let until = now + UNSEGMENTED_FOR;
        self.prune_at = Some(self.prune_at.map_or(until, |at| at.min(until)));
        self.until
            .insert(ip, until)
            .is_none_or(|before| before <= now)
    }
}

/// Sends everything in an [`Outbox`]. Messages for a batch-capable member in the same pass
/// are packed into batch frames, never delayed: only what is already in the outbox is packed,
/// and a "batch" of one leaves as the plain frame. A batch frame is never larger than the
/// member's limit (its `max_datagram`, 4096 bytes unless it said) nor the daemon's
/// (`udp.max_batch_datagram_bytes`); a message too large for either leaves alone. Order per
/// member is kept. Nothing is copied: a batch frame is the batch header followed by its
/// entries where the outbox laid them out (each frame behind its length prefix), and the
/// kernel gathers them (`sendmmsg` with several iovecs per datagram, [`mmsg::BATCH`]
/// datagrams per system call). A member that gets every message of a pass but its own gets
/// them as one or two runs of bytes, however many there are.
///
/// Members without batches still get one datagram per message, but when segmentation is on
/// ([`Sender::set_segmentation`]) a member's messages of one pass that are of equal length
/// (the last may be shorter) go to the kernel as one segmented send (`UDP_SEGMENT`): it
/// splits them into the same datagrams, and pays its per-datagram routing once for them all.
///
/// What the kernel has no room for is dropped and counted, but for members' last words from
/// their rooms, which are held ([`LastWords`]) and sent before anything newer: at the next
/// send, or sooner through [`Sender::send_held`]; or let go, and counted, once held for
/// [`MAX_HELD_AGE`]. Nothing newer to a held word's address leaves before it, in a later
/// pass ([`Sender::send_all`]) nor later in the same `sendmmsg` when the kernel refuses it
/// there for want of memory and takes the rest ([`mmsg::Outgoing::in_order`]).
#[derive(Default)]
pub struct Sender {
    /// The daemon's cap on batch frames, in bytes.
    max_batch: usize,
    /// Whether a member's equal-length datagrams go as one segmented send.
    segmenting: bool,
    /// Whether the socket is an IPv6 one: its IPv4 peers, kept as IPv4 addresses, are sent to
    /// as IPv4-mapped ones ([`peer::native`]).
    ipv6_socket: bool,
    /// Destinations kept from segmented sends for a while.
    unsegmented: Unsegmented,
    /// Segmented sends the kernel refused, for tests.
    #[cfg(test)]
    refused_calls: usize,
    /// Datagrams to send, in order.
    plan: Vec<Planned>,
    /// Batch frames being planned, reused between passes.
    batches: Vec<Batch>,
    used_batches: usize,
    /// Segmented sends being planned, reused between passes.
    groups: Vec<Segments>,
    used_groups: usize,
    /// Open batch per member slot: plan index + 1 (0: none). Indexed by slot, so no hashing.
    open: Vec<u32>,
    /// Slots set in `open` during this pass, to reset them after.
    touched: Vec<u32>,
    /// Each planned datagram's runs in the list of byte runs handed to the kernel; kept
    /// between passes (the runs themselves borrow the outbox, so they are not).
    datagrams: Vec<mmsg::Outgoing>,
    scratch: mmsg::SendScratch,
    /// Last words the kernel had no room for, waiting to be sent again.
    held: LastWords,
    /// Paces the lines about held words let go for their age.
    expiry_log: ExpiryLog,
}

#[derive(Clone)]
enum Bytes {
    /// One payload, alone in its datagram.
    Outbox(Range<usize>),
    /// A batch frame: an index into [`Sender::batches`].
    Batch(usize),
    /// Datagrams of equal length for one member: an index into [`Sender::groups`].
    Segments(usize),
}

/// Datagrams going to one member in one segmented send: where their payloads lie in the
/// outbox, and their length.
#[derive(Default)]
struct Segments {
    /// Each datagram's payload, in order.
    runs: Vec<Range<usize>>,
    /// The length of every datagram but the last, which may be shorter.
    size: usize,
    /// Bytes of all of them.
    len: usize,
}

impl Segments {
    /// Whether a datagram of `len` bytes may follow these in the same send.
    fn takes(&self, len: usize) -> bool {
        let last_was_short = self.runs.last().is_some_and(|run| run.len() < self.size);
        !last_was_short
            && len <= self.size
            && self.runs.len() < mmsg::MAX_SEGMENTS
            && self.len + len <= mmsg::MAX_SEGMENTED_BYTES
    }
}

/// A batch frame being planned: where its entries lie in the outbox.
#[derive(Default)]
struct Batch {
    /// Runs of the outbox's bytes, in order, each one or more whole entries (length prefix
    /// and frame) that lie back to back.
    runs: Vec<Range<usize>>,
    /// The frame's length so far: header and entries.
    len: usize,
}

impl Batch {
    /// Whether the entry at `entry` may join this frame under `limit` bytes.
    fn takes(&self, entry: &Range<usize>, limit: usize) -> bool {
        let contiguous = self.runs.last().is_some_and(|run| run.end == entry.start);
        self.len + entry.len() <= limit && (contiguous || self.runs.len() < MAX_BATCH_RUNS)
    }

    /// Adds the entry at `entry`, extending the last run when it follows it.
    fn push(&mut self, entry: Range<usize>) {
        self.len += entry.len();
        match self.runs.last_mut() {
            Some(run) if run.end == entry.start => run.end = entry.end,
            _ => self.runs.push(entry),
        }
    }
}

impl Sender {
    /// A sender with empty scratch space that never builds a batch frame over `max_batch`
    /// bytes.
    pub fn new(max_batch: usize) -> Sender {
        Sender {
            max_batch,
            ..Sender::default()
        }
    }

    /// Changes the cap on batch frames (configuration reload).
    pub fn set_max_batch(&mut self, max_batch: usize) {
        self.max_batch = max_batch;
    }

    /// Says whether the socket the sender sends through is an IPv6 one (dual-stack), whose
    /// IPv4 peers are addressed as IPv4-mapped addresses.
    pub fn set_ipv6_socket(&mut self, ipv6: bool) {
        self.ipv6_socket = ipv6;
    }

    /// Turns segmented sends on or off. Only on for a socket whose kernel can segment
    /// ([`mmsg::can_segment`]): an older kernel would send the whole as one datagram.
    pub fn set_segmentation(&mut self, on: bool) {
        self.segmenting = on;
    }

    /// Sends and clears `outbox` at `now`, after the last words held from earlier sends; each
    /// datagram leaves from the address of `locals` its send names, and an address the kernel
    /// refuses as a source is retired.
    pub fn send_all(
        &mut self,
        socket: &UdpSocket,
        outbox: &mut Outbox,
        locals: &mut Locals,
        metrics: &mut Metrics,
        now: Instant,
    ) {
        // Held words go first: they are older, and a member's last word must not come after
        // what the daemon tells that address later (a room it joined since).
        self.send_held(socket, locals, metrics, now);
        self.plan(outbox);
        // Those the kernel still had no room for must not be overtaken either.
        if self.holds_last_words() {
            self.hold_back_behind_last_words(0, outbox, metrics, now);
        }
        let mut start = 0;
        // A refused segmented send whose datagrams go again one apiece from `start`: the
        // error, and the source it named.
        let mut retrying = None;
        loop {
            let sent = self.send_from(start, socket, outbox, locals, metrics, now);
            if let Some((errno, refused_from)) = retrying.take() {
                // Its first datagram left on its own, from the source the refused send named
                // (not retired meanwhile by another datagram's retry): segmenting was at
                // fault, not the destination nor the source.
                let first_left = sent.sent + sent.failed > 0
                    && self.scratch.failed().first() != Some(&0)
                    && self.scratch.refused_sources().first() != Some(&0)
                    && self.datagrams.first().map(|d| d.from) == refused_from;
                if let (true, Some(planned)) = (first_left, self.plan.get(start)) {
                    let to = planned.to;
                    self.refused_for(to, errno, metrics);
                }
            }
            let Some((refused, errno)) = sent.refused_segmented else {
                break;
            };
            #[cfg(test)]
            {
                self.refused_calls += 1;
            }
            // The kernel refused a segmented send, and nothing after it went. Its datagrams go
            // again one apiece, in order, and the rest after them.
            let refused_from = self.datagrams.get(refused).map(|d| d.from);
            start += refused;
            self.unsegment(start);
            // A last word held in the call just made (no memory for it) holds back what the
            // rest has for its address, as the call itself did.
            if self.holds_last_words() {
                self.hold_back_behind_last_words(start, outbox, metrics, now);
            }
            retrying = Some((errno, refused_from));
        }
        outbox.clear();
        // Keep a bounded pool of batch and segment plans between passes.
        keep_pooled(&mut self.batches, |b| b.runs.capacity());
        keep_pooled(&mut self.groups, |g| g.runs.capacity());
    }

    /// Sends the plan from `start` on, counts in `metrics` what left and what did not, holds
    /// (as of `now`) the last words the kernel had no room for, and retires the sources it
    /// refused.
    fn send_from(
        &mut self,
        start: usize,
        socket: &UdpSocket,
        outbox: &Outbox,
        locals: &mut Locals,
        metrics: &mut Metrics,
        now: Instant,
    ) -> mmsg::Sent {
        let parts = self.gather(outbox, locals, start);
        let plan = &self.plan[start..];
        let sent = send_retiring_refused(
            socket,
            parts,
            &self.datagrams,
            &mut self.scratch,
            locals,
            |i| plan.get(i).map(|planned| planned.from),
        );
        let scratch = &self.scratch;
        let (failed, short_of_memory) = (scratch.failed(), scratch.short_of_memory());
        count(
            plan,
            &sent,
            (failed, short_of_memory, scratch.held_back()),
            metrics,
        );
        // Only when something found no room (anything held back was behind a datagram that
        // found no memory): a pass the kernel took whole reads no plan entry again and copies
        // nothing.
        if sent.would_block > 0 || !short_of_memory.is_empty() {
            self.hold_last_words(start, &sent, outbox, metrics, now);
        }
        sent
    }

    /// Holds, as of `now`, a copy of each last word of the plan from `start` on that the send
    /// which returned `sent` had no room for (or held back behind one), in order; counts
    /// those the full queue cannot take.
    fn hold_last_words(
        &mut self,
        start: usize,
        sent: &mmsg::Sent,
        outbox: &Outbox,
        metrics: &mut Metrics,
        now: Instant,
    ) {
        let plan = self.plan.get(start..).unwrap_or_default();
        // Nothing from a refused segmented send on was tried: it all goes again unsegmented.
        let tried = sent.refused_segmented.map_or(plan.len(), |(at, _)| at);
        for (i, planned) in plan.iter().enumerate().take(tried) {
            let Bytes::Outbox(range) = &planned.bytes else {
                // A last word always leaves alone, as a plain datagram (`plan`).
                continue;
            };
            if !planned.last_word || self.scratch.fate(i, sent) != Fate::NoRoom {
                continue;
            }
            if self
                .held
                .hold(planned.to, planned.from, outbox.get(range.clone()), now)
            {
                metrics.last_words_held += 1;
            } else {
                Metrics::bump(&mut metrics.send_errors, "last_words_full");
            }
        }
    }

    /// Takes out of the plan every datagram to an address whose last word is still held, so
    /// that nothing newer reaches it first: a member that joined another room from the same
    /// address would take the older `__ROOM_CLOSED__` for its new room's. The kernel had no
    /// room for the older datagram, so the newer ones are dropped and counted as
    /// `would_block`, as they would be behind it in a full buffer; a newer last word is held
    /// after it (as of `now`). Only the plan from `start` on is looked at (what is before it
    /// was tried already), and only while words are held: the pass that sends them all costs
    /// nothing here.
    fn hold_back_behind_last_words(
        &mut self,
        start: usize,
        outbox: &Outbox,
        metrics: &mut Metrics,
        now: Instant,
    ) {
        let waiting: HashSet<SocketAddr> = self.held.iter().map(|word| word.to).collect();
        let held = &mut self.held;
        let mut dropped = 0;
        let mut index = 0;
        self.plan.retain(|planned| {
            index += 1;
            if index <= start || !waiting.contains(&planned.to) {
                return true;
            }
            match &planned.bytes {
                // A last word always leaves alone, as a plain datagram (`plan`).
                Bytes::Outbox(range) if planned.last_word => {
                    if held.hold(planned.to, planned.from, outbox.get(range.clone()), now) {
                        metrics.last_words_held += 1;
                    } else {
                        Metrics::bump(&mut metrics.send_errors, "last_words_full");
                    }
                }
                _ => dropped += planned.datagrams(),
            }
            false
        });
        if dropped > 0 {
            *metrics.send_errors.entry("would_block").or_insert(0) += dropped as u64;
        }
    }

    /// Whether last words wait for room in the send buffer: the socket's writability (or a
    /// retry later) is then worth watching.
    pub fn holds_last_words(&self) -> bool {
        !self.held.is_empty()
    }

    /// Sends the last words held for want of room, oldest first, and lets go of those the
    /// kernel takes or refuses for themselves (counted as any datagram is); the others stay
    /// held for the next try, but for those held for [`MAX_HELD_AGE`] at `now`, let go first.
    /// A word the kernel has no memory for holds back those after it to the same address.
    pub fn send_held(
        &mut self,
        socket: &UdpSocket,
        locals: &mut Locals,
        metrics: &mut Metrics,
        now: Instant,
    ) {
        if self.held.is_empty() {
            return;
        }
        self.expire_held(now, metrics);
        if self.held.is_empty() {
            return;
        }
        let parts: Vec<IoSlice<'_>> = self.held.iter().map(|w| IoSlice::new(&w.bytes)).collect();
        self.datagrams.clear();
        for (i, word) in self.held.iter().enumerate() {
            self.datagrams.push(mmsg::Outgoing {
                to: peer::native(word.to, self.ipv6_socket),
                from: locals.get(word.from),
                runs: i..i + 1,
                segment: 0,
                in_order: true,
            });
        }
        let sent = send_retiring_refused(
            socket,
            parts,
            &self.datagrams,
            &mut self.scratch,
            locals,
            |i| self.held.iter().nth(i).map(|word| word.from),
        );
        let scratch = &self.scratch;
        let settled = self.held.settle(|i| scratch.fate(i, &sent));
        metrics.datagrams_sent += settled.sent as u64;
        metrics.deliveries += settled.sent as u64;
        if settled.refused > 0 {
            *metrics.send_errors.entry("other").or_insert(0) += settled.refused as u64;
        }
    }

    /// Lets go of the words held for [`MAX_HELD_AGE`] at `now`: counted as
    /// `last_words_expired`, and logged at most once an
    /// [`EXPIRED_LOG_EVERY`](crate::last_words::EXPIRED_LOG_EVERY).
    fn expire_held(&mut self, now: Instant, metrics: &mut Metrics) {
        let Some(expired) = self.held.expire(now) else {
            return;
        };
        *metrics.send_errors.entry("last_words_expired").or_insert(0) += expired.count as u64;
        if let Some(count) = self.expiry_log.note(expired.count, now) {
            log::warn!(
                "UDP: let go of {} since the last such line (the last to {}): the kernel had \
                 no room for them for {} s, and their members' addresses may be others' by \
                 now (ocm_send_errors_total{{reason=\"last_words_expired\"}} counts them all)",
                crate::plural::Count(count, "held __ROOM_CLOSED__ datagram"),
                expired.last_to,
                MAX_HELD_AGE.as_secs()
            );
        }
    }

    /// Remembers that the kernel refused a segmented send to `to` and took its datagrams one
    /// at a time: a path MTU below the segments (learned, perhaps from a forged ICMP message),
    /// an IPsec policy or a firewall rule for that destination. Its IP address gets one
    /// datagram per send for [`UNSEGMENTED_FOR`]; the others keep their segmented sends.
    fn refused_for(&mut self, to: SocketAddr, errno: i32, metrics: &mut Metrics) {
        if !self.unsegmented.keep(to.ip(), Instant::now()) {
            return;
        }
        metrics.segmentation_refusals += 1;
        let err = io::Error::from_raw_os_error(errno);
        let ip = to.ip();
        if mem::replace(&mut self.unsegmented.logged, true) {
            log::debug!("UDP: segmented sends to {ip} refused ({err}); one datagram per send");
        } else {
            log::warn!(
                "UDP: the kernel refused a segmented send to {to} ({err}) but took its \
                 datagrams one at a time; {ip} gets one datagram per send for {} minutes \
                 (further refusals are logged at debug level and counted in \
                 ocm_udp_segmentation_refusals_total)",
                UNSEGMENTED_FOR.as_secs() / 60
            );
        }
    }

    /// Replaces the segmented send at `at` in the plan by its datagrams, one apiece, and the
    /// later ones to the same IP address: whatever made the kernel refuse one would refuse
    /// them too, and each refusal costs a call and a retry.
    fn unsegment(&mut self, at: usize) {
        let rest = self.plan.split_off(at.min(self.plan.len()));
        let ip = rest.first().map(|planned| planned.to.ip());
        for planned in rest {
            match planned.bytes {
                Bytes::Segments(g) if Some(planned.to.ip()) == ip => {
                    self.plan
                        .extend(self.groups[g].runs.iter().map(|run| Planned {
                            bytes: Bytes::Outbox(run.clone()),
                            messages: 1,
                            ..planned
                        }))
                }
                _ => self.plan.push(planned),
            }
        }
    }

    /// The byte runs of every planned datagram from `start` on, in order; fills
    /// [`Sender::datagrams`] with where each datagram goes, where from, and where its runs are
    /// in the returned list.
    fn gather<'a>(
        &mut self,
        outbox: &'a Outbox,
        locals: &Locals,
        start: usize,
    ) -> Vec<IoSlice<'a>> {
        let plan = self.plan.get(start..).unwrap_or_default();
        let mut parts = Vec::with_capacity(plan.len() * 2);
        self.datagrams.clear();
        for planned in plan {
            let first = parts.len();
            let mut segment = 0;
            match &planned.bytes {
                Bytes::Outbox(range) => parts.push(IoSlice::new(outbox.get(range.clone()))),
                Bytes::Batch(i) => {
                    let runs = &self.batches[*i].runs;
                    if planned.messages == 1 {
                        // A batch of one leaves as its frame, without the length prefix.
                        if let Some(run) = runs.first() {
                            let frame = run.start + delivery::BATCH_ENTRY_OVERHEAD..run.end;
                            parts.push(IoSlice::new(outbox.get(frame)));
                        }
                    } else {
                        parts.push(IoSlice::new(&delivery::BATCH_HEADER));
                        parts.extend(runs.iter().map(|run| IoSlice::new(outbox.get(run.clone()))));
                    }
                }
                Bytes::Segments(i) => {
                    let group = &self.groups[*i];
                    if group.runs.len() > 1 {
                        // At most MAX_SEGMENT_BYTES (a u16): `plan` segments nothing longer.
                        segment = group.size as u16;
                    }
                    parts.extend(
                        group
                            .runs
                            .iter()
                            .map(|run| IoSlice::new(outbox.get(run.clone()))),
                    );
                }
            }
            self.datagrams.push(mmsg::Outgoing {
                to: peer::native(planned.to, self.ipv6_socket),
                from: locals.get(planned.from),
                runs: first..parts.len(),
                segment,
                in_order: planned.last_word,
            });
        }
        parts
    }

    /// Ends the batch or segmented send open for the member in `slot`: what follows for it
    /// goes after.
    fn close_open(&mut self, slot: u32) {
        if let Some(open) = self.open.get_mut(slot as usize) {
            *open = 0;
        }
    }

    /// The plan entry open for the member in `slot`, if it still goes to `to` from `from`: a
    /// member that registered from a new address (or to another of ours) within the pass
    /// starts a new one.
    fn open_for(&mut self, slot: u32, to: SocketAddr, from: LocalId) -> Option<usize> {
        let index = slot as usize;
        if self.open.len() <= index {
            self.open.resize(index + 1, 0);
        }
        let p = (self.open[index] as usize).checked_sub(1)?;
        let planned = self.plan.get(p)?;
        (planned.to == to && planned.from == from).then_some(p)
    }

    /// Appends `planned` to the plan as the entry open for the member in `slot`; returns its
    /// index.
    fn open_new(&mut self, slot: u32, planned: Planned) -> usize {
        self.plan.push(planned);
        if let Some(open) = self.open.get_mut(slot as usize) {
            *open = self.plan.len() as u32;
        }
        self.touched.push(slot);
        self.plan.len() - 1
    }

    /// Decides the datagrams: one per send, batch frames for batch-capable members, and
    /// segmented sends for the others when segmenting is on.
    fn plan(&mut self, outbox: &Outbox) {
        self.plan.clear();
        self.used_batches = 0;
        self.used_groups = 0;
        for slot in self.touched.drain(..) {
            if let Some(open) = self.open.get_mut(slot as usize) {
                *open = 0;
            }
        }
        let now = self.unsegmented.now();
        for send in &outbox.sends {
            let limit = usize::from(send.batch_limit).min(self.max_batch);
            match (send.member, outbox.entry_of(send)) {
                // A last word leaves alone, so that it can be held alone when the kernel has
                // no room for it, and after whatever is packed for its member.
                (member, _) if send.last_word => {
                    if let Some(slot) = member {
                        self.close_open(slot);
                    }
                    self.plan.push(Planned::alone(send));
                }
                (Some(slot), Some(entry)) if limit > 0 => {
                    self.plan_batched(send, slot, entry, limit)
                }
                (Some(slot), _)
                    if self.segmenting
                        && send.batch_limit == 0
                        && (1..=MAX_SEGMENT_BYTES).contains(&send.bytes.len())
                        && !self.unsegmented.keeps(&send.to.ip(), now) =>
                {
                    self.plan_segmented(send, slot)
                }
                (member, _) => {
                    // Whatever is packed for this member stays before this datagram.
                    if let Some(slot) = member {
                        self.close_open(slot);
                    }
                    self.plan.push(Planned::alone(send));
                }
            }
        }
    }

    /// Adds the batch entry at `entry` to the batch open for the member in `slot`, or to a new
    /// one.
    fn plan_batched(&mut self, send: &QueuedSend, slot: u32, entry: Range<usize>, limit: usize) {
        let open = self.open_for(slot, send.to, send.from).filter(|&p| {
            matches!(self.plan[p].bytes, Bytes::Batch(i) if self.batches[i].takes(&entry, limit))
        });
        let p = open.unwrap_or_else(|| {
            let (index, batch) = next_pooled(&mut self.batches, &mut self.used_batches);
            batch.runs.clear();
            batch.len = delivery::BATCH_HEADER_LEN;
            self.open_new(slot, Planned::new(send, Bytes::Batch(index)))
        });
        if let Bytes::Batch(i) = self.plan[p].bytes {
            self.batches[i].push(entry);
            self.plan[p].messages += 1;
        }
    }

    /// Adds the datagram of `send` to the segmented send open for the member in `slot`, or to
    /// a new one.
    fn plan_segmented(&mut self, send: &QueuedSend, slot: u32) {
        let len = send.bytes.len();
        let open = self.open_for(slot, send.to, send.from).filter(
            |&p| matches!(self.plan[p].bytes, Bytes::Segments(i) if self.groups[i].takes(len)),
        );
        let p = open.unwrap_or_else(|| {
            let (index, group) = next_pooled(&mut self.groups, &mut self.used_groups);
            group.runs.clear();
            group.size = len;
            group.len = 0;
            self.open_new(slot, Planned::new(send, Bytes::Segments(index)))
        });
        if let Bytes::Segments(i) = self.plan[p].bytes {
            let group = &mut self.groups[i];
            group.runs.push(send.bytes.clone());
            group.len += len;
            self.plan[p].messages += 1;
        }
    }
}

/// One entry of a send plan: a datagram, or a segmented send of several.
struct Planned {
    to: SocketAddr,
    from: LocalId,
    bytes: Bytes,
    /// Messages carried: the batch frame's entries, or the segmented send's datagrams.
    messages: usize,
    /// Whether it is a member's last word ([`QueuedSend::last_word`]), held when the
    /// kernel has no room for it.
    last_word: bool,
}

impl Planned {
    /// An entry for `send`'s destination and source carrying nothing yet.
    fn new(send: &QueuedSend, bytes: Bytes) -> Planned {
        Planned {
            to: send.to,
            from: send.from,
            bytes,
            messages: 0,
            last_word: false,
        }
    }

    /// A plain datagram carrying `send`'s payload alone.
    fn alone(send: &QueuedSend) -> Planned {
        Planned {
            to: send.to,
            from: send.from,
            bytes: Bytes::Outbox(send.bytes.clone()),
            messages: 1,
            last_word: send.last_word,
        }
    }

    /// Datagrams on the wire.
    fn datagrams(&self) -> usize {
        match self.bytes {
            Bytes::Segments(_) => self.messages,
            Bytes::Outbox(_) | Bytes::Batch(_) => 1,
        }
    }
}

/// Sends `datagrams`, their payloads in `parts`, on `socket`, and retires in `locals` the
/// source addresses the kernel refused ([`mmsg::SendScratch::refused_sources`]: no longer the
/// host's), `source(i)` naming datagram `i`'s.
fn send_retiring_refused(
    socket: &UdpSocket,
    parts: Vec<IoSlice<'_>>,
    datagrams: &[mmsg::Outgoing],
    scratch: &mut mmsg::SendScratch,
    locals: &mut Locals,
    source: impl Fn(usize) -> Option<LocalId>,
) -> mmsg::Sent {
    let sent = mmsg::send(socket.as_raw_fd(), &parts, datagrams, scratch);
    for &i in scratch.refused_sources() {
        if let Some(from) = source(i) {
            locals.retire(from);
        }
    }
    sent
}

/// Counts in `metrics` what one [`mmsg::send`] of `plan` did: `sent`, with the indices in
/// `plan` of the entries that failed on their own, of those among them that failed for want
/// of buffer memory, and of those held back behind a last word that did (all ascending).
/// Last words the kernel had no room for are not counted here: they are held, or counted as
/// `last_words_full` (`hold_last_words`).
fn count(
    plan: &[Planned],
    sent: &mmsg::Sent,
    (failed, short_of_memory, held_back): (&[usize], &[usize], &[usize]),
    metrics: &mut Metrics,
) {
    // They go in order up to a full send buffer, but one refused on its own (an unroutable
    // or forbidden address) leaves a hole that those after it do not fill, and so does one
    // held back.
    let tried = sent.sent + sent.failed + sent.held_back;
    let mut refused = failed.iter().copied().peekable();
    let mut behind = held_back.iter().copied().peekable();
    for (i, planned) in plan.iter().enumerate().take(tried) {
        if refused.next_if_eq(&i).is_some() || behind.next_if_eq(&i).is_some() {
            continue;
        }
        let datagrams = planned.datagrams() as u64;
        metrics.datagrams_sent += datagrams;
        metrics.deliveries += planned.messages as u64;
        if datagrams > 1 {
            metrics.datagrams_segmented += datagrams;
        }
    }
    // What the kernel had no room for (after a full buffer, or held back behind a last word
    // it had no memory for), but last words.
    let mut dropped = 0;
    if sent.would_block > 0 {
        dropped += plan
            .iter()
            .skip(tried)
            .filter(|planned| !planned.last_word)
            .map(Planned::datagrams)
            .sum::<usize>();
    }
    dropped += held_back
        .iter()
        .filter_map(|&i| plan.get(i))
        .filter(|planned| !planned.last_word)
        .map(Planned::datagrams)
        .sum::<usize>();
    if dropped > 0 {
        *metrics.send_errors.entry("would_block").or_insert(0) += dropped as u64;
    }
    if sent.failed > 0 {
        let dropped: usize = failed
            .iter()
            .filter(|&&i| {
                let held = short_of_memory.binary_search(&i).is_ok();
                !(held && plan.get(i).is_some_and(|planned| planned.last_word))
            })
            .filter_map(|&i| plan.get(i))
            .map(Planned::datagrams)
            .sum();
        if dropped > 0 {
            *metrics.send_errors.entry("other").or_insert(0) += dropped as u64;
        }
    }
}

/// The next plan of `pool` not yet `used` in this pass (a new one when all are), and its index.
fn next_pooled<'a, T: Default>(pool: &'a mut Vec<T>, used: &mut usize) -> (usize, &'a mut T) {
    let index = *used;
    *used += 1;
    if pool.len() <= index {
        pool.push(T::default());
    }
    (index, &mut pool[index])
}

/// Keeps the first plans of `pool` up to [`POOLED_BATCH_BYTES`] between passes, counting
/// `runs` ranges of each (their capacity), and frees the rest.
fn keep_pooled<T>(pool: &mut Vec<T>, runs: impl Fn(&T) -> usize) {
    let mut pooled = 0;
    let keep = pool
        .iter()
        .take_while(|plan| {
            pooled += mem::size_of::<T>() + runs(plan) * RUN_SIZE;
            pooled <= POOLED_BATCH_BYTES
        })
        .count();
    pool.truncate(keep);
}

/// The kernel's drop count for a UDP socket as a 64-bit total. The kernel keeps a 32-bit
/// count (`sk_drops`, printed as `%u`), which wraps after 2^32 drops: read as is, the metric
/// would go backwards.
#[derive(Debug, Default)]
pub struct KernelDrops {
    /// The kernel's count at the last reading.
    raw: u32,
    /// Drops since the socket was made.
    total: u64,
}

impl KernelDrops {
    /// Takes a reading of the kernel's count; returns the total so far.
    pub fn observe(&mut self, raw: u32) -> u64 {
        self.total += u64::from(raw.wrapping_sub(self.raw));
        self.raw = raw;
        self.total
    }

    /// The total so far.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The kernel's count of datagrams dropped on this socket before they were read (a full
/// receive buffer mostly; also bad checksums and memory pressure), 32 bits and wrapping
/// ([`KernelDrops`]): asked of the socket itself ([`sockopt::drops`]), one system call
/// whatever else the host runs. Where the kernel cannot say (before Linux 4.12), from the
/// socket's line in `/proc/self/net/udp` or `/proc/self/net/udp6`, for which the kernel
/// prints every UDP socket of the network namespace: on a host with many, a pause of the
/// event loop, which reads the count every few seconds and at each scrape.
pub fn kernel_drops(socket: &UdpSocket) -> Option<u32> {
    sockopt::drops(socket.as_raw_fd())
        .ok()
        .or_else(|| kernel_drops_listed(socket))
}

/// [`kernel_drops`] from the socket's line in `/proc/self/net/udp` or `/proc/self/net/udp6`.
fn kernel_drops_listed(socket: &UdpSocket) -> Option<u32> {
    let fd = socket.as_raw_fd();
    // SAFETY: fstat on a live descriptor into a zeroed stat buffer.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return None;
        }
        st.st_ino
    };
    let inode = inode.to_string();
    // /proc/self/net, not /proc/net: the unit's ProcSubset=pid hides the latter.
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(9) == Some(&inode.as_str()) {
                return fields.last()?.parse().ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod kernel_drop_tests {
    use super::KernelDrops;

    /// The total goes on through the kernel's 32-bit count wrapping.
    #[test]
    fn the_total_goes_on_when_the_kernels_count_wraps() {
        let mut drops = KernelDrops::default();
        assert_eq!(drops.observe(0), 0);
        assert_eq!(drops.observe(10), 10);
        assert_eq!(drops.observe(u32::MAX - 5), u64::from(u32::MAX) - 5);
        // Wrapped: 6 up to 2^32, then 4 more.
        assert_eq!(drops.observe(4), u64::from(u32::MAX) + 5);
        assert_eq!(drops.observe(4), u64::from(u32::MAX) + 5, "no new drops");
        assert_eq!(drops.total(), u64::from(u32::MAX) + 5);
    }

    /// The count read is this socket's: datagrams that found its receive queue full, and
    /// none for another socket.
    #[test]
    fn the_drops_read_are_those_of_this_socket() {
        use super::kernel_drops;
        use mio::net::UdpSocket;
        use std::os::fd::AsRawFd;
        let localhost = "127.0.0.1:0".parse().unwrap();
        let (quiet, flooded) = (UdpSocket::bind(localhost), UdpSocket::bind(localhost));
        let (quiet, flooded) = (quiet.unwrap(), flooded.unwrap());
        // The smallest receive buffer the kernel allows: room for two or three of these.
        let fd = flooded.as_raw_fd();
        crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 1).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        const SENT: usize = 50;
        for _ in 0..SENT {
            // Loopback delivers within the send: queued or dropped by the time it returns.
            sender
                .send_to(&[0x5a; 1000], flooded.local_addr().unwrap())
                .unwrap();
        }
        let mut buf = [0u8; 1024];
        let mut received = 0;
        while flooded.recv_from(&mut buf).is_ok() {
            received += 1;
        }
        let dropped = SENT - received;
        assert!(dropped >= 2, "only {dropped} of {SENT} dropped");
        let dropped = u32::try_from(dropped).ok();
        assert_eq!(kernel_drops(&flooded), dropped);
        assert_eq!(kernel_drops(&quiet), Some(0));
        // Asked of the socket, and read from the kernel's list: the same count.
        assert_eq!(super::kernel_drops_listed(&flooded), dropped);
        assert_eq!(crate::sockopt::drops(flooded.as_raw_fd()).ok(), dropped);
        assert_eq!(super::kernel_drops_listed(&quiet), Some(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ucrp::delivery::Delivery;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn chat(out: &mut Outbox, text: &str) -> Range<usize> {
        out.payload(|b| delivery::encode_chat("s", text.as_bytes(), b).unwrap())
    }

    /// Plans `out` and gathers each planned datagram's runs: destination, the bytes the
    /// kernel would send, messages carried.
    fn planned(sender: &mut Sender, out: &Outbox) -> Vec<(SocketAddr, Vec<u8>, usize)> {
        sender.plan(out);
        let parts = sender.gather(out, &Locals::default(), 0);
        sender
            .datagrams
            .iter()
            .zip(&sender.plan)
            .map(|(datagram, planned)| {
                let bytes = parts[datagram.runs.clone()]
                    .iter()
                    .flat_map(|run| run.iter().copied());
                (datagram.to, bytes.collect(), planned.messages)
            })
            .collect()
    }

    #[test]
    fn batchable_recipients_get_batches_in_order_and_others_single_datagrams() {
        let mut out = Outbox::default();
        let one = chat(&mut out, "one");
        let two = chat(&mut out, "two");
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
        out.send_to_member(addr(1), LocalId::ANY, one.clone(), 1, 4096);
        out.send_to_member(addr(2), LocalId::ANY, one.clone(), 2, 0);
        out.send_to_member(addr(1), LocalId::ANY, two.clone(), 1, 4096);
        out.send_to_member(addr(2), LocalId::ANY, two, 2, 0);
        out.send_to_member(addr(3), LocalId::ANY, one, 3, 4096); // alone: leaves as a plain frame
        out.send_to_member(addr(1), LocalId::ANY, closed, 1, 0);
        let mut sender = Sender::new(65507);
        let shown: Vec<(u16, String, usize)> = planned(&mut sender, &out)
            .iter()
            .map(|(to, b, n)| {
                let text = match delivery::parse(b).unwrap() {
                    Delivery::Batch(body) => {
                        delivery::batch_entries(body).count().to_string() + " in batch"
                    }
                    Delivery::Chat { message, .. } => message.to_owned(),
                    Delivery::RoomClosed => "closed".into(),
                    other => format!("{other:?}"),
                };
                (to.port(), text, *n)
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                (1, "2 in batch".into(), 2),
                (2, "one".into(), 1),
                (2, "two".into(), 1),
                (3, "one".into(), 1),
                (1, "closed".into(), 1),
            ]
        );
    }

    #[test]
    fn a_member_that_moves_within_a_pass_gets_the_rest_at_its_new_address() {
        let mut out = Outbox::default();
        let one = chat(&mut out, "one");
        let two = chat(&mut out, "two");
        let three = chat(&mut out, "three");
        out.send_to_member(addr(1), LocalId::ANY, one.clone(), 1, 4096);
        out.send_to_member(addr(1), LocalId::ANY, two.clone(), 1, 4096);
        // The member re-registered from port 9 between these messages.
        out.send_to_member(addr(9), LocalId::ANY, three.clone(), 1, 4096);
        out.send_to_member(addr(9), LocalId::ANY, one, 1, 4096);
        let mut sender = Sender::new(65507);
        sender.plan(&out);
        let shown: Vec<(u16, usize)> = sender
            .plan
            .iter()
            .map(|planned| (planned.to.port(), planned.messages))
            .collect();
        assert_eq!(shown, vec![(1, 2), (9, 2)]);
    }

    /// A source the kernel refuses (no longer the host's) is retired: later datagrams to its
    /// members leave from the address the route picks.
    #[test]
    fn a_source_the_kernel_refuses_is_retired() {
        let socket = UdpSocket::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = peer.local_addr().unwrap();
        let mut locals = Locals::default();
        let gone = locals.id(Some(crate::local::LocalAddr {
            ip: std::net::IpAddr::from([192, 0, 2, 77]),
            ifindex: 0,
        }));
        assert!(locals.get(gone).is_some());
        let mut out = Outbox::default();
        let one = chat(&mut out, "one");
        out.send_to_member(to, gone, one, 1, 0);
        let mut metrics = Metrics::default();
        let mut sender = Sender::new(65507);
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(metrics.datagrams_sent, 1, "it left without the source");
        assert!(metrics.send_errors.is_empty());
        assert_eq!(locals.get(gone), None);
        let one = chat(&mut out, "one");
        out.send_to_member(to, gone, one, 1, 0);
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(metrics.datagrams_sent, 2);
        let mut buf = [0u8; 16];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        for _ in 0..2 {
            let (_, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(from.ip(), std::net::IpAddr::from([127, 0, 0, 1]));
        }
    }

    /// A socket bound to the wildcard address (so that sources matter), whose segmented sends
    /// the kernel refuses when `refusing` (it sends without UDP checksums, which segmenting
    /// needs); `None` on a kernel that cannot segment.
    fn segmenting_socket(refusing: bool) -> Option<UdpSocket> {
        let socket = UdpSocket::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        if !mmsg::can_segment(socket.as_raw_fd()) {
            crate::test_shared::skipped("this kernel cannot segment UDP sends");
            return None;
        }
        if refusing {
            let fd = socket.as_raw_fd();
            crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
        }
        Some(socket)
    }

    /// A sender with segmented sends on, and the daemon's default cap on batches.
    fn segmenting_sender() -> Sender {
        let mut sender = Sender::new(65507);
        sender.set_segmentation(true);
        sender
    }

    /// A loopback peer with room for many small datagrams.
    fn peer() -> std::net::UdpSocket {
        peer_at("127.0.0.1")
    }

    /// A peer at `ip`, one of the host's, with room for many small datagrams.
    fn peer_at(ip: &str) -> std::net::UdpSocket {
        let peer = std::net::UdpSocket::bind((ip, 0)).unwrap();
        let _ =
            crate::sockopt::set_int(peer.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 1 << 20);
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        peer
    }

    /// The texts of the next `count` datagrams `peer` receives.
    fn texts_received(peer: &std::net::UdpSocket, count: usize) -> Vec<String> {
        let mut buf = [0u8; 2048];
        (0..count)
            .map(|_| {
                let len = peer.recv(&mut buf).unwrap();
                texts(&buf[..len]).concat()
            })
            .collect()
    }

    /// A source address the host does not have.
    fn gone_source(locals: &mut Locals) -> LocalId {
        locals.id(Some(crate::local::LocalAddr {
            ip: std::net::IpAddr::from([192, 0, 2, 77]),
            ifindex: 0,
        }))
    }

    /// Segmented sends the kernel refuses but whose datagrams it takes one at a time: they
    /// and everything after them leave in order, and each IP address refused gets one
    /// datagram per send from then on (counted once), while sources retired on the retry are
    /// the right ones.
    #[test]
    fn a_destination_whose_segmented_send_is_refused_gets_one_datagram_per_send() {
        let Some(socket) = segmenting_socket(true) else {
            return;
        };
        // a and b share an address; c has another one of the host's.
        let (a, b, c) = (peer(), peer(), peer_at("127.0.0.2"));
        let [to_a, to_b, to_c] = [&a, &b, &c].map(|p| p.local_addr().unwrap());
        let mut locals = Locals::default();
        let gone = gone_source(&mut locals);
        let mut out = Outbox::default();
        let messages: Vec<Range<usize>> =
            (0..7).map(|i| chat(&mut out, &format!("m{i}"))).collect();
        let first = chat(&mut out, "first");
        out.send(to_a, LocalId::ANY, first.clone());
        for (i, msg) in messages.iter().enumerate() {
            // Member 0 at a gets m0 m1 m2, member 1 at b m3 m4, member 2 at c m5 m6.
            let (to, member) = match i {
                0..=2 => (to_a, 0),
                3 | 4 => (to_b, 1),
                _ => (to_c, 2),
            };
            out.send_to_member(to, LocalId::ANY, msg.clone(), member, 0);
        }
        // After the refusals, from a source the host does not have: retired, so it leaves
        // from the address the route picks.
        out.send(to_b, gone, first);
        let mut metrics = Metrics::default();
        let mut sender = segmenting_sender();
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(metrics.segmentation_refusals, 2, "127.0.0.1 and 127.0.0.2");
        // One refused call per address: b's send was split with a's, before a's retry.
        assert_eq!(sender.refused_calls, 2);
        assert_eq!((metrics.datagrams_sent, metrics.deliveries), (9, 9));
        assert_eq!(metrics.datagrams_segmented, 0);
        assert!(metrics.send_errors.is_empty(), "{:?}", metrics.send_errors);
        assert_eq!(locals.get(gone), None, "the refused source is retired");
        assert_eq!(texts_received(&a, 4), ["first", "m0", "m1", "m2"]);
        assert_eq!(texts_received(&b, 3), ["m3", "m4", "first"]);
        assert_eq!(texts_received(&c, 2), ["m5", "m6"]);
        // The next pass plans one datagram per message for them, without a refusal.
        let again = chat(&mut out, "again");
        for _ in 0..2 {
            out.send_to_member(to_a, LocalId::ANY, again.clone(), 0, 0);
        }
        assert_eq!(segmenting(&mut sender, &out), vec![(to_a.port(), 1, 0); 2]);
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(
            (metrics.datagrams_sent, metrics.segmentation_refusals),
            (11, 2)
        );
        assert_eq!(texts_received(&a, 2), ["again", "again"]);
        // Once the time is up, a destination gets segmented sends again.
        let again = chat(&mut out, "again");
        for _ in 0..2 {
            out.send_to_member(to_a, LocalId::ANY, again.clone(), 0, 0);
        }
        let long_ago = Instant::now() - UNSEGMENTED_FOR - Duration::from_secs(1);
        let mut unsegmented = Unsegmented::default();
        assert!(unsegmented.keep(to_a.ip(), long_ago));
        sender.unsegmented = unsegmented;
        assert_eq!(segmenting(&mut sender, &out), vec![(to_a.port(), 2, 7)]);
        assert!(sender.unsegmented.until.is_empty(), "dropped once over");
    }

    /// A segmented send refused for its segments from a source the host has: the source is
    /// not blamed (nor retired), and the datagrams, sent one apiece, leave from it.
    #[test]
    fn a_refused_segmented_send_keeps_a_good_source() {
        let Some(socket) = segmenting_socket(true) else {
            return;
        };
        let a = peer();
        let mut locals = Locals::default();
        let ours = locals.id(Some(crate::local::LocalAddr {
            ip: std::net::IpAddr::from([127, 0, 0, 3]),
            ifindex: 0,
        }));
        let mut out = Outbox::default();
        let msg = chat(&mut out, "same");
        for _ in 0..3 {
            out.send_to_member(a.local_addr().unwrap(), ours, msg.clone(), 0, 0);
        }
        let mut metrics = Metrics::default();
        segmenting_sender().send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert!(locals.get(ours).is_some(), "the source is kept");
        assert_eq!(metrics.segmentation_refusals, 1);
        assert_eq!(metrics.datagrams_sent, 3);
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let (_, from) = a.recv_from(&mut buf).unwrap();
            assert_eq!(from.ip(), std::net::IpAddr::from([127, 0, 0, 3]));
        }
    }

    /// Two segmented sends to two addresses from a source the host no longer has, on a socket
    /// that refuses segments: the first one's retry retires the source, so the second one's
    /// datagrams leave without it. That proves nothing against the segments (they were sent
    /// from another source than the refused send named): nobody is kept from segmented sends.
    #[test]
    fn a_source_retired_between_a_refusal_and_its_retry_blames_no_one() {
        let Some(socket) = segmenting_socket(true) else {
            return;
        };
        let (a, b) = (peer(), peer_at("127.0.0.2"));
        let mut locals = Locals::default();
        let gone = gone_source(&mut locals);
        let mut out = Outbox::default();
        let msg = chat(&mut out, "same");
        for (member, to) in [(0, &a), (1, &b)] {
            for _ in 0..3 {
                out.send_to_member(to.local_addr().unwrap(), gone, msg.clone(), member, 0);
            }
        }
        let mut metrics = Metrics::default();
        let mut sender = segmenting_sender();
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(sender.refused_calls, 2);
        assert_eq!(locals.get(gone), None);
        assert_eq!(metrics.segmentation_refusals, 0);
        assert!(sender.unsegmented.until.is_empty());
        assert_eq!(
            (metrics.datagrams_sent, metrics.datagrams_segmented),
            (6, 0)
        );
        for peer in [&a, &b] {
            assert_eq!(texts_received(peer, 3), ["same", "same", "same"]);
        }
    }

    /// An IPv6 source the host does not have makes even a segmented send fail with EINVAL,
    /// which a refusal of its segments also gives: sent again one apiece, the source is
    /// found at fault and retired, and the destination keeps its segmented sends. The member
    /// has two segmented sends in the pass (a shorter datagram ends the first): the second is
    /// split with the first, so that it is not refused in turn once the source is retired,
    /// and taken for a refusal of its segments.
    #[test]
    fn a_segmented_send_from_an_ipv6_source_gone_blames_the_source() {
        let (Ok(socket), Ok(a)) = (
            UdpSocket::bind("[::]:0".parse().unwrap()),
            std::net::UdpSocket::bind("[::1]:0"),
        ) else {
            crate::test_shared::skipped("this host has no IPv6 loopback");
            return;
        };
        if !mmsg::can_segment(socket.as_raw_fd()) {
            crate::test_shared::skipped("this kernel cannot segment UDP sends");
            return;
        }
        a.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut locals = Locals::default();
        let gone = locals.id(Some(crate::local::LocalAddr {
            ip: "2001:db8::77".parse().unwrap(),
            ifindex: 0,
        }));
        let mut out = Outbox::default();
        let (same, short) = (chat(&mut out, "same"), chat(&mut out, "x"));
        for msg in [&same, &same, &short, &same, &same] {
            out.send_to_member(a.local_addr().unwrap(), gone, msg.clone(), 0, 0);
        }
        let mut metrics = Metrics::default();
        let mut sender = segmenting_sender();
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(locals.get(gone), None, "the source is retired");
        assert_eq!(metrics.segmentation_refusals, 0);
        assert!(sender.unsegmented.until.is_empty(), "::1 is not kept");
        assert_eq!(sender.refused_calls, 1);
        // Sent again one apiece: the EINVAL was taken for a refusal of the segments first.
        assert_eq!(
            (metrics.datagrams_sent, metrics.datagrams_segmented),
            (5, 0)
        );
        assert_eq!(texts_received(&a, 5), ["same", "same", "x", "same", "same"]);
    }

    /// A segmented send from a source the host no longer has: the source is dropped and
    /// retired, and the datagrams still go as one segmented send.
    #[test]
    fn a_segmented_send_from_a_source_gone_keeps_its_segments() {
        let Some(socket) = segmenting_socket(false) else {
            return;
        };
        let a = peer();
        let mut locals = Locals::default();
        let gone = gone_source(&mut locals);
        let mut out = Outbox::default();
        let msg = chat(&mut out, "same");
        for _ in 0..3 {
            out.send_to_member(a.local_addr().unwrap(), gone, msg.clone(), 0, 0);
        }
        let mut metrics = Metrics::default();
        let mut sender = segmenting_sender();
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(locals.get(gone), None);
        assert_eq!(metrics.segmentation_refusals, 0);
        assert!(sender.unsegmented.until.is_empty());
        assert_eq!(
            (metrics.datagrams_sent, metrics.datagrams_segmented),
            (3, 3)
        );
        assert_eq!(texts_received(&a, 3), ["same", "same", "same"]);
    }

    /// A segmented send refused for its destination (port 0), whose datagrams are refused one
    /// apiece too: they count as send errors, and the destination is not kept from segmented
    /// sends, nor anyone else.
    #[test]
    fn a_segmented_send_refused_for_its_destination_leaves_segmenting_on() {
        let Some(socket) = segmenting_socket(false) else {
            return;
        };
        // At another address: the rest of the pass to 127.0.0.1 goes one datagram apiece.
        let a = peer_at("127.0.0.2");
        let mut out = Outbox::default();
        let msg = chat(&mut out, "same");
        for _ in 0..3 {
            out.send_to_member(addr(0), LocalId::ANY, msg.clone(), 0, 0);
            out.send_to_member(a.local_addr().unwrap(), LocalId::ANY, msg.clone(), 1, 0);
        }
        let mut metrics = Metrics::default();
        let mut sender = segmenting_sender();
        sender.send_all(
            &socket,
            &mut out,
            &mut Locals::default(),
            &mut metrics,
            Instant::now(),
        );
        assert!(sender.unsegmented.until.is_empty());
        assert_eq!(metrics.segmentation_refusals, 0);
        assert_eq!(metrics.send_errors.get("other"), Some(&3));
        assert_eq!((metrics.datagrams_sent, metrics.deliveries), (3, 3));
        assert_eq!(metrics.datagrams_segmented, 3);
        assert_eq!(texts_received(&a, 3), ["same", "same", "same"]);
    }

    /// Sends that do not leave are counted in datagrams, whatever carried them: a segmented
    /// send of three that failed, and a full buffer before a batch of five and a segmented
    /// send of two.
    #[test]
    fn what_did_not_leave_is_counted_in_datagrams() {
        let planned = |bytes, messages| Planned {
            to: addr(1),
            from: LocalId::ANY,
            bytes,
            messages,
            last_word: false,
        };
        let plan = [
            planned(Bytes::Outbox(0..1), 1),
            planned(Bytes::Segments(0), 3),
            planned(Bytes::Batch(0), 5),
            planned(Bytes::Segments(1), 2),
        ];
        let sent = mmsg::Sent {
            sent: 1,
            failed: 1,
            would_block: 2,
            held_back: 0,
            refused_segmented: None,
        };
        let mut metrics = Metrics::default();
        count(&plan, &sent, (&[1], &[], &[]), &mut metrics);
        assert_eq!((metrics.datagrams_sent, metrics.deliveries), (1, 1));
        assert_eq!(metrics.send_errors.get("other"), Some(&3));
        assert_eq!(metrics.send_errors.get("would_block"), Some(&3));
        // All of it left: the segmented sends' datagrams are counted as such.
        let sent = mmsg::Sent {
            sent: 4,
            ..mmsg::Sent::default()
        };
        let mut metrics = Metrics::default();
        count(&plan, &sent, (&[], &[], &[]), &mut metrics);
        assert_eq!((metrics.datagrams_sent, metrics.deliveries), (7, 11));
        assert_eq!(metrics.datagrams_segmented, 5);
    }

    #[test]
    fn deliveries_count_the_datagrams_that_left_not_a_prefix_of_the_plan() {
        // A destination the kernel refuses on its own (port 0: EINVAL) sits between a plain
        // datagram and a batch of three; the batch still leaves after the refusal.
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = peer.local_addr().unwrap();
        let mut out = Outbox::default();
        let one = chat(&mut out, "one");
        out.send(to, LocalId::ANY, one.clone());
        out.send(addr(0), LocalId::ANY, one.clone());
        for _ in 0..3 {
            out.send_to_member(to, LocalId::ANY, one.clone(), 5, 4096);
        }
        let mut metrics = Metrics::default();
        Sender::new(65507).send_all(
            &socket,
            &mut out,
            &mut Locals::default(),
            &mut metrics,
            Instant::now(),
        );
        assert_eq!(metrics.datagrams_sent, 2);
        assert_eq!(metrics.send_errors.get("other"), Some(&1));
        // One plain message and three in the batch reached the kernel; the refused one did not.
        assert_eq!(metrics.deliveries, 4);
    }

    /// Each planned datagram: where it goes, its messages, and its segment size (0: alone).
    fn segmenting(sender: &mut Sender, out: &Outbox) -> Vec<(u16, usize, u16)> {
        sender.plan(out);
        let _ = sender.gather(out, &Locals::default(), 0);
        sender
            .datagrams
            .iter()
            .zip(&sender.plan)
            .map(|(datagram, planned)| (datagram.to.port(), planned.messages, datagram.segment))
            .collect()
    }

    /// A last word leaves alone, after whatever was packed for its member (a batch frame, a
    /// segmented send), never inside it: held when the kernel has no room, it is held alone.
    #[test]
    fn a_last_word_leaves_alone_after_what_was_packed_for_its_member() {
        let mut out = Outbox::default();
        let hi = chat(&mut out, "hi");
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
        for _ in 0..2 {
            out.send_to_member(addr(1), LocalId::ANY, hi.clone(), 1, 4096);
            out.send_to_member(addr(2), LocalId::ANY, closed.clone(), 2, 0);
        }
        out.send_last_word(addr(1), LocalId::ANY, closed.clone(), 1);
        out.send_last_word(addr(2), LocalId::ANY, closed.clone(), 2);
        let mut sender = segmenting_sender();
        assert_eq!(
            segmenting(&mut sender, &out),
            [(1, 2, 0), (2, 2, 15), (1, 1, 0), (2, 1, 0)]
        );
        let last_words: Vec<bool> = sender.plan.iter().map(|p| p.last_word).collect();
        assert_eq!(last_words, [false, false, true, true]);
    }

    /// Last words the kernel had no room for are not counted as dropped (they are held); the
    /// chat around them is, and so is a last word refused for itself.
    #[test]
    fn last_words_with_no_room_are_not_counted_as_dropped() {
        let planned = |last_word| Planned {
            to: addr(1),
            from: LocalId::ANY,
            bytes: Bytes::Outbox(0..1),
            messages: 1,
            last_word,
        };
        // 0 left; 1, a last word, was refused for itself; 2, a last word, found no memory;
        // the buffer was full from 3 on: a chat and a last word.
        let plan = [
            planned(false),
            planned(true),
            planned(true),
            planned(false),
            planned(true),
        ];
        let sent = mmsg::Sent {
            sent: 1,
            failed: 2,
            would_block: 2,
            held_back: 0,
            refused_segmented: None,
        };
        let mut metrics = Metrics::default();
        count(&plan, &sent, (&[1, 2], &[2], &[]), &mut metrics);
        assert_eq!(metrics.datagrams_sent, 1);
        assert_eq!(metrics.send_errors.get("other"), Some(&1));
        assert_eq!(metrics.send_errors.get("would_block"), Some(&1));
    }

    /// A stand-in for the kernel that has no memory for `__ROOM_CLOSED__` (`ENOBUFS`), as
    /// `core.rs`'s `LD_PRELOAD` stub has, and takes every other datagram.
    fn no_memory_for_room_closed(bytes: &[u8]) -> Option<i32> {
        (bytes == delivery::ROOM_CLOSED).then_some(libc::ENOBUFS)
    }

    /// The raw datagrams `peer` receives next, `count` of them.
    fn received(peer: &std::net::UdpSocket, count: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        (0..count)
            .map(|_| {
                let len = peer.recv(&mut buf).unwrap();
                buf[..len].to_vec()
            })
            .collect()
    }

    /// Whether nothing waits to be read on `peer` (loopback delivers within the send, so
    /// what was sent is there).
    fn got_nothing(peer: &std::net::UdpSocket) -> bool {
        peer.set_nonblocking(true).unwrap();
        let nothing = peer.recv(&mut [0u8; 64]).is_err();
        peer.set_nonblocking(false).unwrap();
        nothing
    }

    /// A last word the kernel has no memory for, within a send that goes on with the rest, is
    /// overtaken by nothing newer to its address in that send: chat to it (a room it joined
    /// from the same socket) is held back and counted as `would_block`, and a later last word
    /// to it (that room closing too) is held after it; the rest leaves. The held words then
    /// reach it in order.
    #[test]
    fn a_last_word_refused_for_memory_is_not_overtaken_within_its_send() {
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (x, y) = (peer(), peer());
        let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
        let mut out = Outbox::default();
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
        let newer = chat(&mut out, "newer");
        // x is member 1 of a room closing, and member 3 of another.
        out.send_last_word(to_x, LocalId::ANY, closed.clone(), 1);
        out.send_to_member(to_y, LocalId::ANY, newer.clone(), 2, 0);
        out.send_to_member(to_x, LocalId::ANY, newer.clone(), 3, 0);
        out.send_last_word(to_x, LocalId::ANY, closed, 3);
        out.send_to_member(to_y, LocalId::ANY, newer, 2, 0);
        let mut sender = Sender::new(65507);
        sender.scratch.refusing = Some(no_memory_for_room_closed);
        let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
        let now = Instant::now();
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, now);
        assert_eq!(texts_received(&y, 2), ["newer", "newer"]);
        assert!(got_nothing(&x), "the chat to x overtook its held close");
        assert_eq!(metrics.datagrams_sent, 2);
        assert_eq!(metrics.last_words_held, 2);
        assert_eq!(metrics.send_errors.get("would_block"), Some(&1));
        assert_eq!(metrics.send_errors.get("other"), None);
        let held: Vec<SocketAddr> = sender.held.iter().map(|word| word.to).collect();
        assert_eq!(held, [to_x, to_x]);

        sender.scratch.refusing = None;
        sender.send_held(&socket, &mut locals, &mut metrics, now);
        assert_eq!(received(&x, 2), [delivery::ROOM_CLOSED; 2]);
        assert!(!sender.holds_last_words());
        assert_eq!(metrics.datagrams_sent, 4);
    }

    /// Held words sent again are not overtaken by those held behind them: the kernel again
    /// without memory for the older one to an address, the newer one to it stays held
    /// (untried), while one to another address leaves.
    #[test]
    fn a_held_word_refused_again_for_memory_is_not_overtaken_by_one_held_behind_it() {
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (x, y) = (peer(), peer());
        let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
        let mut out = Outbox::default();
        let [first, other, second] =
            [b"first", b"other", b"secnd"].map(|w| out.payload(|b| b.extend_from_slice(w)));
        out.send_last_word(to_x, LocalId::ANY, first, 1);
        out.send_last_word(to_y, LocalId::ANY, other, 2);
        out.send_last_word(to_x, LocalId::ANY, second, 3);
        let mut sender = Sender::new(65507);
        // No memory for anything: all three are held, in order.
        sender.scratch.refusing = Some(|_| Some(libc::ENOBUFS));
        let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
        let now = Instant::now();
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, now);
        let held = |sender: &Sender| -> Vec<Vec<u8>> {
            sender.held.iter().map(|word| word.bytes.to_vec()).collect()
        };
        assert_eq!(held(&sender), [b"first", b"other", b"secnd"]);

        // Memory again, but for the first.
        sender.scratch.refusing = Some(|bytes| (bytes == b"first").then_some(libc::ENOBUFS));
        sender.send_held(&socket, &mut locals, &mut metrics, now);
        assert_eq!(received(&y, 1), [b"other"]);
        assert!(got_nothing(&x), "the second word to x overtook the first");
        assert_eq!(held(&sender), [b"first", b"secnd"]);

        sender.scratch.refusing = None;
        sender.send_held(&socket, &mut locals, &mut metrics, now);
        assert_eq!(received(&x, 2), [b"first", b"secnd"]);
        assert_eq!(metrics.datagrams_sent, 3);
        assert!(metrics.send_errors.is_empty(), "{:?}", metrics.send_errors);
    }

    /// A segmented send the kernel refuses stops the call before what a last word refused
    /// for memory earlier in it holds back: the rest, sent again unsegmented in a second
    /// call, still holds back what goes to that word's address.
    #[test]
    fn a_last_word_refused_for_memory_before_a_refused_segmented_send_is_not_overtaken() {
        let Some(socket) = segmenting_socket(true) else {
            return;
        };
        let (x, y) = (peer(), peer());
        let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
        let mut out = Outbox::default();
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
        let newer = chat(&mut out, "newer");
        out.send_last_word(to_x, LocalId::ANY, closed, 1);
        for _ in 0..2 {
            out.send_to_member(to_y, LocalId::ANY, newer.clone(), 2, 0);
        }
        out.send_to_member(to_x, LocalId::ANY, newer, 3, 0);
        let mut sender = segmenting_sender();
        sender.scratch.refusing = Some(no_memory_for_room_closed);
        let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(sender.refused_calls, 1, "y's segmented send was refused");
        assert_eq!(texts_received(&y, 2), ["newer", "newer"]);
        assert!(got_nothing(&x), "the chat to x overtook its held close");
        assert_eq!(metrics.send_errors.get("would_block"), Some(&1));
        assert_eq!(metrics.last_words_held, 1);
    }

    /// A word held for [`MAX_HELD_AGE`] is let go at the next try, counted as
    /// `last_words_expired`, and the sender holds nothing more (so the loop's retries stop);
    /// just before, it is tried again. What goes to its address then flows.
    #[test]
    fn a_word_held_for_the_age_limit_is_let_go_and_counted() {
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let x = peer();
        let to_x = x.local_addr().unwrap();
        let mut out = Outbox::default();
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
        out.send_last_word(to_x, LocalId::ANY, closed, 1);
        let mut sender = Sender::new(65507);
        sender.scratch.refusing = Some(no_memory_for_room_closed);
        let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
        let t0 = Instant::now();
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, t0);
        assert!(sender.holds_last_words());
        let almost = t0 + MAX_HELD_AGE - Duration::from_millis(1);
        sender.send_held(&socket, &mut locals, &mut metrics, almost);
        assert!(
            sender.holds_last_words(),
            "tried again, refused again: held"
        );
        assert_eq!(metrics.send_errors.get("last_words_expired"), None);

        sender.scratch.refusing = None;
        sender.send_held(&socket, &mut locals, &mut metrics, t0 + MAX_HELD_AGE);
        assert!(!sender.holds_last_words());
        assert_eq!(metrics.send_errors.get("last_words_expired"), Some(&1));
        assert_eq!(metrics.datagrams_sent, 0);
        assert!(got_nothing(&x), "let go, not sent");
        // Nothing is held back for it any more.
        let after = chat(&mut out, "after");
        out.send_to_member(to_x, LocalId::ANY, after, 1, 0);
        sender.send_all(
            &socket,
            &mut out,
            &mut locals,
            &mut metrics,
            t0 + MAX_HELD_AGE,
        );
        assert_eq!(texts_received(&x, 1), ["after"]);
    }

    /// What was held back behind a last word refused for memory counts as not sent: chat as
    /// `would_block`, a last word not at all (it is held); what left around it is sent.
    #[test]
    fn what_was_held_back_is_counted_as_would_block_but_last_words() {
        let planned = |last_word| Planned {
            to: addr(1),
            from: LocalId::ANY,
            bytes: Bytes::Outbox(0..1),
            messages: 1,
            last_word,
        };
        // 0, a last word, found no memory; 1 (chat) and 2 (a last word) were held back behind
        // it; 3, to another address, left.
        let plan = [planned(true), planned(false), planned(true), planned(false)];
        let sent = mmsg::Sent {
            sent: 1,
            failed: 1,
            held_back: 2,
            ..mmsg::Sent::default()
        };
        let mut metrics = Metrics::default();
        count(&plan, &sent, (&[0], &[0], &[1, 2]), &mut metrics);
        assert_eq!((metrics.datagrams_sent, metrics.deliveries), (1, 1));
        assert_eq!(metrics.send_errors.get("would_block"), Some(&1));
        assert_eq!(metrics.send_errors.get("other"), None);
    }

    proptest::proptest! {
        /// Over two passes of chat and last words to three addresses, whatever the kernel
        /// does with each (the stand-in decides by its first byte), every datagram is either
        /// received and counted as sent, counted once as a send error, or still held; and at
        /// each address what arrives is in the order it was queued, with nothing queued after
        /// a word still held for that address.
        #[test]
        fn every_datagram_is_sent_counted_or_held_and_none_overtakes_a_held_word(
            // Up to 200 datagrams: few enough for any peer's receive buffer to keep them all.
            passes in proptest::collection::vec(
                proptest::collection::vec((0u8..4, 0usize..3, proptest::bool::ANY), 0..100),
                2,
            )
        ) {
            let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let peers = [peer(), peer(), peer()];
            let to: Vec<SocketAddr> = peers.iter().map(|p| p.local_addr().unwrap()).collect();
            let mut sender = Sender::new(65507);
            sender.scratch.refusing = Some(mmsg::by_first_byte);
            let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
            let mut queued = 0u16;
            for pass in &passes {
                let mut out = Outbox::default();
                for &(code, member, last_word) in pass {
                    queued += 1;
                    let [hi, lo] = queued.to_be_bytes();
                    let bytes = out.payload(|b| b.extend_from_slice(&[code, hi, lo]));
                    let slot = member as u32;
                    if last_word {
                        out.send_last_word(to[member], LocalId::ANY, bytes, slot);
                    } else {
                        out.send_to_member(to[member], LocalId::ANY, bytes, slot, 0);
                    }
                }
                sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
            }
            let held = sender.held.len() as u64;
            let errors: u64 = metrics.send_errors.values().sum();
            proptest::prop_assert_eq!(
                metrics.datagrams_sent + errors + held,
                u64::from(queued),
                "{:?}",
                metrics.send_errors
            );
            let mut received = 0;
            for (peer, &at) in peers.iter().zip(&to) {
                peer.set_nonblocking(true).unwrap();
                let mut order = Vec::new();
                let mut buf = [0u8; 16];
                while let Ok(3) = peer.recv(&mut buf) {
                    order.push(u16::from_be_bytes([buf[1], buf[2]]));
                }
                received += order.len() as u64;
                proptest::prop_assert!(order.is_sorted(), "{:?}", order);
                let first_held = sender
                    .held
                    .iter()
                    .filter(|word| word.to == at)
                    .map(|word| u16::from_be_bytes([word.bytes[1], word.bytes[2]]))
                    .min();
                if let Some(first_held) = first_held {
                    proptest::prop_assert!(
                        order.iter().all(|&n| n < first_held),
                        "{:?} arrived with {} held",
                        order,
                        first_held
                    );
                }
            }
            proptest::prop_assert_eq!(received, metrics.datagrams_sent);
        }
    }

    #[test]
    fn a_members_equal_datagrams_go_as_one_segmented_send_up_to_a_shorter_one() {
        let mut out = Outbox::default();
        // Chat frames of 10 bytes, one of 7, two of 13.
        let [a, b, c, e] = ["a", "b", "c", "e"].map(|t| chat(&mut out, &format!("{t}-------")));
        let short = chat(&mut out, "d----");
        let [f, g] = ["f", "g"].map(|t| chat(&mut out, &format!("{t}----------")));
        let to_member = |out: &mut Outbox, port, msg: &Range<usize>| {
            out.send_to_member(addr(port), LocalId::ANY, msg.clone(), u32::from(port), 0);
        };
        for msg in [&a, &b] {
            to_member(&mut out, 1, msg);
            to_member(&mut out, 2, msg);
            out.send(addr(3), LocalId::ANY, msg.clone()); // not a member: alone
        }
        for msg in [&c, &short, &e, &f, &g] {
            to_member(&mut out, 1, msg);
        }
        let (ten, seven, twelve) = (a.len() as u16, short.len() as u16, f.len() as u16);
        assert_eq!((ten, seven, twelve), (10, 7, 13));
        let mut sender = segmenting_sender();
        assert_eq!(
            segmenting(&mut sender, &out),
            vec![
                (1, 4, ten), // a b c and the shorter d, which ends it
                (2, 2, ten),
                (3, 1, 0),
                (3, 1, 0),
                (1, 1, 0),      // e alone: the send after d
                (1, 2, twelve), // f g: longer, so a send of their own
            ]
        );
        // Split as the kernel splits them, member 1 gets its datagrams in order.
        let parts = sender.gather(&out, &Locals::default(), 0);
        let mut to_one: Vec<Vec<u8>> = Vec::new();
        for datagram in sender.datagrams.iter().filter(|d| d.to.port() == 1) {
            let bytes: Vec<u8> = parts[datagram.runs.clone()]
                .iter()
                .flat_map(|run| run.to_vec())
                .collect();
            match usize::from(datagram.segment) {
                0 => to_one.push(bytes),
                size => to_one.extend(bytes.chunks(size).map(<[u8]>::to_vec)),
            }
        }
        let sent: Vec<Vec<u8>> = [&a, &b, &c, &short, &e, &f, &g]
            .map(|r| out.get(r.clone()).to_vec())
            .to_vec();
        assert_eq!(to_one, sent);
        // Off: one datagram per message.
        sender.set_segmentation(false);
        assert!(segmenting(&mut sender, &out)
            .iter()
            .all(|&(_, n, s)| (n, s) == (1, 0)));
    }

    #[test]
    fn segmented_sends_keep_to_the_kernels_limits_and_leave_batches_alone() {
        let counts = |text_len: usize, count: usize, limit: u16| {
            let mut out = Outbox::default();
            let msg = chat(&mut out, &"x".repeat(text_len));
            for _ in 0..count {
                out.send_to_member(addr(1), LocalId::ANY, msg.clone(), 7, limit);
            }
            segmenting(&mut segmenting_sender(), &out)
                .into_iter()
                .map(|(_, n, segment)| (n, segment))
                .collect::<Vec<_>>()
        };
        // 100-byte datagrams: 64 a send, the kernel's most segments.
        assert_eq!(counts(98, 70, 0), vec![(64, 100), (6, 100)]);
        // 1232-byte datagrams: 53 a send (65,296 bytes; 54 would pass 65,507).
        assert_eq!(counts(1230, 60, 0), vec![(53, 1232), (7, 1232)]);
        // One byte longer than a minimum-MTU path takes: alone.
        assert_eq!(counts(1231, 2, 0), vec![(1, 0), (1, 0)]);
        // A member with batches gets a batch, not segments.
        assert_eq!(counts(98, 3, 4096), vec![(3, 0)]);
    }

    /// Messages per datagram for one member with `limit`, under a daemon cap of `cap`, and
    /// the largest datagram planned.
    fn packing(message_len: usize, count: usize, limit: u16, cap: usize) -> (Vec<usize>, usize) {
        let mut out = Outbox::default();
        let msg = chat(&mut out, &"x".repeat(message_len));
        for _ in 0..count {
            out.send_to_member(addr(1), LocalId::ANY, msg.clone(), 7, limit);
        }
        let datagrams = planned(&mut Sender::new(cap), &out);
        let counts = datagrams.iter().map(|(_, _, n)| *n).collect();
        let largest = datagrams.iter().map(|(_, b, _)| b.len()).max().unwrap_or(0);
        (counts, largest)
    }

    /// The texts of the chat frames in a planned datagram (one frame, or a batch of them).
    fn texts(datagram: &[u8]) -> Vec<String> {
        let frames: Vec<&[u8]> = match delivery::parse(datagram).unwrap() {
            Delivery::Batch(body) => delivery::batch_entries(body).map(Result::unwrap).collect(),
            _ => vec![datagram],
        };
        frames
            .into_iter()
            .map(|frame| match delivery::parse(frame).unwrap() {
                Delivery::Chat { message, .. } => message.to_owned(),
                other => panic!("not chat: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_member_that_gets_a_passs_messages_gets_them_as_one_run_of_the_outbox() {
        // Two senders' messages, in turn: the members who sent neither get every message,
        // laid back to back in the outbox; each sender gets the other's, one run apiece.
        let mut out = Outbox::default();
        let messages: Vec<(u32, Range<usize>)> = (0..6u32)
            .map(|i| (i % 2, chat(&mut out, &format!("m{i}"))))
            .collect();
        for (from, msg) in &messages {
            for member in (0..4u32).filter(|m| m != from) {
                out.send_to_member(
                    addr(member as u16 + 1),
                    LocalId::ANY,
                    msg.clone(),
                    member,
                    4096,
                );
            }
        }
        let mut sender = Sender::new(65507);
        let datagrams = planned(&mut sender, &out);
        let shown: Vec<(u16, Vec<String>)> = datagrams
            .iter()
            .map(|(to, bytes, _)| (to.port(), texts(bytes)))
            .collect();
        let all: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
        assert_eq!(
            shown,
            vec![
                (2, vec!["m0".into(), "m2".into(), "m4".into()]),
                (3, all.clone()),
                (4, all),
                (1, vec!["m1".into(), "m3".into(), "m5".into()]),
            ]
        );
        let runs: Vec<usize> = sender
            .plan
            .iter()
            .map(|planned| match planned.bytes {
                Bytes::Batch(i) => sender.batches[i].runs.len(),
                Bytes::Outbox(_) | Bytes::Segments(_) => 0,
            })
            .collect();
        assert_eq!(runs, vec![3, 1, 1, 3]);
    }

    #[test]
    fn a_batch_of_scattered_entries_stops_at_the_kernels_limit_on_runs() {
        // Each message for member 1 is followed by one for member 2, so none of member 1's
        // entries follows another: each is a run of its own.
        let mut out = Outbox::default();
        let count = MAX_BATCH_RUNS + 10;
        for i in 0..count {
            let mine = chat(&mut out, &format!("{i}"));
            let other = chat(&mut out, "-");
            out.send_to_member(addr(1), LocalId::ANY, mine, 1, 65507);
            out.send(addr(2), LocalId::ANY, other);
        }
        let datagrams = planned(&mut Sender::new(65507), &out);
        let batches: Vec<&(SocketAddr, Vec<u8>, usize)> = datagrams
            .iter()
            .filter(|(to, _, _)| to.port() == 1)
            .collect();
        let counts: Vec<usize> = batches.iter().map(|(_, _, n)| *n).collect();
        assert_eq!(counts, vec![MAX_BATCH_RUNS, 10]);
        let received: Vec<String> = batches.iter().flat_map(|(_, b, _)| texts(b)).collect();
        let sent: Vec<String> = (0..count).map(|i| i.to_string()).collect();
        assert_eq!(received, sent);
    }

    #[test]
    fn buffer_sizes_asked_for_are_granted_and_zero_leaves_them_as_they_are() {
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let fd = socket.as_raw_fd();
        let read = |opt| sockopt::get_int(fd, libc::SOL_SOCKET, opt).unwrap() as usize;
        let defaults = (read(libc::SO_RCVBUF), read(libc::SO_SNDBUF));
        assert_eq!(size_buffers(&socket, 0, 0), defaults);
        assert_eq!((read(libc::SO_RCVBUF), read(libc::SO_SNDBUF)), defaults);
        // Linux grants twice what is asked (room for its bookkeeping), within
        // net.core.rmem_max and wmem_max (212,992 bytes by default).
        let granted = size_buffers(&socket, 40_000, 50_000);
        assert_eq!(granted, (80_000, 100_000));
        assert_eq!(granted, (read(libc::SO_RCVBUF), read(libc::SO_SNDBUF)));
    }

    #[test]
    fn an_ipv6_socket_sends_to_ipv4_peers_at_their_ipv4_mapped_addresses() {
        let mut out = Outbox::default();
        let one = chat(&mut out, "one");
        let v6: SocketAddr = "[2001:db8::1]:6".parse().unwrap();
        out.send(addr(5), LocalId::ANY, one.clone());
        out.send_to_member(v6, LocalId::ANY, one, 0, 0);
        let mut sender = Sender::new(65507);
        let destinations = |sender: &mut Sender| -> Vec<SocketAddr> {
            planned(sender, &out)
                .into_iter()
                .map(|(to, ..)| to)
                .collect()
        };
        assert_eq!(destinations(&mut sender), [addr(5), v6]);
        sender.set_ipv6_socket(true);
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5".parse().unwrap();
        assert_eq!(destinations(&mut sender), [mapped, v6]);
    }

    #[test]
    fn a_reloaded_cap_on_batches_applies_from_the_next_pass() {
        let mut out = Outbox::default();
        let msg = chat(&mut out, &"x".repeat(1500));
        for _ in 0..5 {
            out.send_to_member(addr(1), LocalId::ANY, msg.clone(), 7, 65507);
        }
        let mut sender = Sender::new(65507);
        let counts = |sender: &mut Sender| -> Vec<usize> {
            planned(sender, &out).into_iter().map(|(.., n)| n).collect()
        };
        assert_eq!(counts(&mut sender), [5]);
        sender.set_max_batch(4096);
        assert_eq!(counts(&mut sender), [2, 2, 1]);
    }

    /// Plans kept between passes stop at the first one past the pool's bytes (each counts
    /// its own size and its runs'), and the rest are freed.
    #[test]
    fn the_pool_keeps_plans_up_to_its_bytes_and_frees_the_rest() {
        // A third of the pool's bytes in runs: with the plans' own size, only two fit.
        let runs = POOLED_BATCH_BYTES / 3 / RUN_SIZE;
        assert!(3 * (mem::size_of::<Batch>() + runs * RUN_SIZE) > POOLED_BATCH_BYTES);
        let mut pool: Vec<Batch> = (0..5).map(|_| Batch::default()).collect();
        keep_pooled(&mut pool, |_| runs);
        assert_eq!(pool.len(), 2);
        // About a megabyte: 65 plans of 1,000 runs (16,000 bytes of runs apiece).
        let mut pool: Vec<Segments> = (0..100).map(|_| Segments::default()).collect();
        keep_pooled(&mut pool, |_| 1000);
        assert_eq!(pool.len(), 65);
        // Small plans are all kept.
        let mut pool: Vec<Segments> = (0..100).map(|_| Segments::default()).collect();
        keep_pooled(&mut pool, |_| 100);
        assert_eq!(pool.len(), 100);
    }

    /// A batch of scattered entries, its header included, is gathered from no more runs than
    /// the kernel takes for one datagram.
    #[test]
    fn a_batch_of_scattered_entries_is_gathered_from_as_many_runs_as_the_kernel_takes() {
        let mut out = Outbox::default();
        for i in 0..mmsg::MAX_PARTS + 10 {
            let mine = chat(&mut out, &format!("{i}"));
            let other = chat(&mut out, "-");
            out.send_to_member(addr(1), LocalId::ANY, mine, 1, 65507);
            out.send(addr(2), LocalId::ANY, other);
        }
        let mut sender = Sender::new(65507);
        sender.plan(&out);
        let _ = sender.gather(&out, &Locals::default(), 0);
        let mut parts: Vec<usize> = sender
            .datagrams
            .iter()
            .filter(|d| d.to == addr(1))
            .map(|d| d.runs.len())
            .collect();
        parts.sort_unstable();
        assert_eq!(
            parts.last(),
            Some(&mmsg::MAX_PARTS),
            "the first batch is full"
        );
        assert_eq!(parts.len(), 2);
    }

    /// IP addresses kept from segmented sends: each is kept for its time and then dropped,
    /// counted as new once only while kept; past the most remembered, those over are
    /// dropped first, and only when none is, all are forgotten.
    #[test]
    fn destinations_kept_from_segmented_sends_expire_and_are_bounded() {
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let now = Instant::now();
        let long_ago = now - UNSEGMENTED_FOR - Duration::from_secs(1);
        let mut kept = Unsegmented::default();
        assert_eq!(kept.now(), None, "nothing kept: the clock is not read");
        assert!(kept.keep(ip(1), long_ago));
        assert!(kept.keep(ip(2), now));
        assert!(!kept.keep(ip(2), now), "kept already");
        let at = kept.now();
        assert!(!kept.keeps(&ip(1), at), "its time is up");
        assert!(kept.keeps(&ip(2), at));
        assert!(
            !kept.keeps(&ip(2), Some(now + UNSEGMENTED_FOR)),
            "over at its time"
        );
        assert!(!kept.keeps(&ip(3), at));
        assert_eq!(kept.until.len(), 1, "the one over is dropped");
        assert_eq!(kept.prune_at, Some(now + UNSEGMENTED_FOR));
        assert!(kept.keep(ip(1), now), "new again once dropped");

        // Full, with half of them over (just now): those go, the rest stay.
        let mut kept = Unsegmented::default();
        let half = MAX_UNSEGMENTED as u32 / 2;
        for i in 0..half {
            kept.keep(ip(i), now - UNSEGMENTED_FOR);
            kept.keep(ip(half + i), now);
        }
        assert_eq!(kept.until.len(), MAX_UNSEGMENTED);
        assert!(kept.keep(ip(u32::MAX >> 8), now));
        assert_eq!(kept.until.len(), MAX_UNSEGMENTED / 2 + 1);
        assert!(kept.until.contains_key(&ip(half)) && !kept.until.contains_key(&ip(0)));
        // Full, with none over: all are forgotten but the new one.
        for i in 0..half - 1 {
            kept.keep(ip(2 * half + i), now);
        }
        assert_eq!(kept.until.len(), MAX_UNSEGMENTED);
        assert!(kept.keep(ip(0), now));
        assert_eq!(kept.until.len(), 1);
        assert!(kept.keeps(&ip(0), Some(now)));
    }

    #[test]
    fn batches_never_exceed_the_members_limit_nor_the_daemons() {
        // 1500-byte texts are 1502-byte frames, 1504 bytes as batch entries.
        assert_eq!(packing(1500, 5, 4096, 65507), (vec![2, 2, 1], 2 + 2 * 1504));
        // A member that announced 64 KiB gets 43 per datagram (2 + 43 * 1504 = 64674).
        let (counts, largest) = packing(1500, 100, 65507, 65507);
        assert_eq!(counts, vec![43, 43, 14]);
        assert!(largest <= 65507);
        // The daemon's cap wins over the member's.
        assert_eq!(packing(1500, 5, 65507, 4096), (vec![2, 2, 1], 2 + 2 * 1504));
        // A limit smaller than one message: each leaves alone, as its plain frame.
        assert_eq!(packing(1500, 3, 1024, 65507), (vec![1, 1, 1], 1502));
        // No batches for a member without the capability (limit 0).
        assert_eq!(packing(10, 3, 0, 65507), (vec![1, 1, 1], 12));
    }

    /// A last word queued in a later pass, to an address whose earlier last word is still
    /// held, is held after it (not dropped), and nothing to another address counts as
    /// dropped; once the kernel has room, both reach it, counted as sent and as deliveries.
    #[test]
    fn a_last_word_queued_behind_one_still_held_is_held_after_it() {
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (x, y) = (peer(), peer());
        let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
        let mut out = Outbox::default();
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
        out.send_last_word(to_x, LocalId::ANY, closed, 1);
        let mut sender = Sender::new(65507);
        sender.scratch.refusing = Some(no_memory_for_room_closed);
        let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
        let now = Instant::now();
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, now);
        assert_eq!(metrics.last_words_held, 1);

        // x's other room closes too, while the first word is still held.
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
        let newer = chat(&mut out, "newer");
        out.send_last_word(to_x, LocalId::ANY, closed, 3);
        out.send_to_member(to_y, LocalId::ANY, newer, 2, 0);
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, now);
        let held: Vec<SocketAddr> = sender.held.iter().map(|word| word.to).collect();
        assert_eq!(held, [to_x, to_x]);
        assert_eq!(metrics.last_words_held, 2);
        assert!(metrics.send_errors.is_empty(), "{:?}", metrics.send_errors);
        assert_eq!(texts_received(&y, 1), ["newer"]);
        assert!(got_nothing(&x));

        sender.scratch.refusing = None;
        sender.send_held(&socket, &mut locals, &mut metrics, now);
        assert_eq!(received(&x, 2), [delivery::ROOM_CLOSED; 2]);
        assert!(!sender.holds_last_words());
        assert_eq!((metrics.datagrams_sent, metrics.deliveries), (3, 3));
    }

    /// A segmented send refused whose datagrams, sent again one apiece, find the send buffer
    /// full: nothing proves the segments at fault (the first did not leave), so the
    /// destination is not kept from segmented sends, and the datagrams count as
    /// `would_block`.
    #[test]
    fn a_refused_segmented_send_whose_retry_finds_no_room_blames_no_one() {
        let Some(socket) = segmenting_socket(true) else {
            return;
        };
        let a = peer();
        let mut out = Outbox::default();
        // The stand-in finds the buffer full for these, one apiece (first byte 3); it does
        // not look at a segmented send, which the socket refuses.
        let full = out.payload(|b| b.extend_from_slice(&[3, 0, 1]));
        for _ in 0..3 {
            out.send_to_member(a.local_addr().unwrap(), LocalId::ANY, full.clone(), 0, 0);
        }
        let mut sender = segmenting_sender();
        sender.scratch.refusing = Some(mmsg::by_first_byte);
        let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
        sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        assert_eq!(sender.refused_calls, 1);
        assert_eq!(metrics.segmentation_refusals, 0);
        assert!(sender.unsegmented.until.is_empty());
        assert_eq!(metrics.datagrams_sent, 0);
        assert_eq!(metrics.send_errors.get("would_block"), Some(&3));
        assert!(got_nothing(&a));
    }

    /// A destination whose segmented send was refused gets one datagram per send for the 10
    /// minutes docs/OPERATIONS.md names (the kernel's default lifetime of a path MTU it
    /// learned), and segmented sends again from then on.
    #[test]
    fn a_destination_is_kept_from_segmented_sends_for_ten_minutes() {
        let ip = IpAddr::from([10, 0, 0, 1]);
        let t0 = Instant::now();
        let ten_minutes = t0 + Duration::from_secs(600);
        let mut kept = Unsegmented::default();
        assert!(kept.keep(ip, t0));
        assert!(kept.keeps(&ip, Some(ten_minutes - Duration::from_millis(1))));
        assert!(!kept.keeps(&ip, Some(ten_minutes)));
    }
}

#[cfg(test)]
mod planned_against_push_batch_entry {
    use super::*;
    use rand::{rngs::StdRng, RngExt, SeedableRng};
    use ucrp::delivery::Delivery;

    /// Random outboxes (empty, short and long payloads, members with and without batches,
    /// moves within a pass; segmenting on for odd seeds): every batch is the frame begin_batch
    /// and push_batch_entry build from its entries, within the cap; every segmented send,
    /// split as the kernel splits it, is its datagrams, within the kernel's limits; and each
    /// member gets its messages in order.
    #[test]
    fn random_outboxes_plan_exact_bytes_in_order() {
        let mut segmented_sends = 0;
        for seed in 0..500u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut out = Outbox::default();
            let npay = rng.random_range(1..20);
            let payloads: Vec<Range<usize>> = (0..npay)
                .map(|i| {
                    let len = match rng.random_range(0..10) {
                        0 => 0,
                        1 => rng.random_range(1000..3000),
                        _ => rng.random_range(1..40),
                    };
                    out.payload(|b| {
                        for j in 0..len {
                            b.push((i * 31 + j) as u8 | 1);
                        }
                    })
                })
                .collect();
            let nsend = rng.random_range(0..400);
            let cap = [512usize, 1472, 4096, 65507][rng.random_range(0..4)];
            let mut expected: Vec<(u32, Vec<u8>)> = Vec::new();
            for _ in 0..nsend {
                let p = payloads[rng.random_range(0..npay)].clone();
                let member = rng.random_range(0..5u32);
                let port = 100 + member as u16 * 2 + u16::from(rng.random_range(0..20) == 0);
                let limit = [0u16, 600, 4096, 65507][(member as usize) % 4];
                let limit = if rng.random_range(0..30) == 0 {
                    0
                } else {
                    limit
                };
                expected.push((member, out.get(p.clone()).to_vec()));
                out.send_to_member(
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    LocalId::ANY,
                    p,
                    member,
                    limit,
                );
            }
            let mut sender = Sender::new(cap);
            sender.set_segmentation(seed % 2 == 1);
            sender.plan(&out);
            let parts = sender.gather(&out, &Locals::default(), 0);
            let mut got: Vec<(u32, Vec<u8>)> = Vec::new();
            let mut total = 0;
            for (datagram, planned) in sender.datagrams.iter().zip(&sender.plan) {
                let (to2, n) = (&planned.to, &planned.messages);
                let (to, runs) = (&datagram.to, &datagram.runs);
                assert_eq!(to, to2);
                assert!(runs.len() <= mmsg::MAX_PARTS);
                let bytes: Vec<u8> = parts[runs.clone()]
                    .iter()
                    .flat_map(|r| r.iter().copied())
                    .collect();
                let member = ((to.port() - 100) / 2) as u32;
                let frames: Vec<Vec<u8>> = if datagram.segment > 0 {
                    let size = usize::from(datagram.segment);
                    assert!(size <= MAX_SEGMENT_BYTES, "seed {seed}");
                    assert!(runs.len() <= mmsg::MAX_SEGMENTS, "seed {seed}");
                    assert!(bytes.len() <= mmsg::MAX_SEGMENTED_BYTES, "seed {seed}");
                    segmented_sends += 1;
                    bytes.chunks(size).map(<[u8]>::to_vec).collect()
                } else if *n >= 2 {
                    assert!(bytes.len() <= cap, "seed {seed}");
                    let Ok(Delivery::Batch(body)) = delivery::parse(&bytes) else {
                        panic!("seed {seed}: not a batch")
                    };
                    let f: Vec<Vec<u8>> = delivery::batch_entries(body)
                        .map(|e| e.unwrap().to_vec())
                        .collect();
                    let mut built = Vec::new();
                    delivery::begin_batch(&mut built);
                    for e in &f {
                        delivery::push_batch_entry(e, &mut built).unwrap();
                    }
                    assert_eq!(built, bytes);
                    f
                } else {
                    vec![bytes]
                };
                assert_eq!(frames.len(), *n, "seed {seed}");
                total += n;
                got.extend(frames.into_iter().map(|f| (member, f)));
            }
            assert_eq!(total, nsend);
            for m in 0..5 {
                let e: Vec<&Vec<u8>> = expected.iter().filter(|x| x.0 == m).map(|x| &x.1).collect();
                let g: Vec<&Vec<u8>> = got.iter().filter(|x| x.0 == m).map(|x| &x.1).collect();
                assert_eq!(e, g, "seed {seed} member {m}");
            }
        }
        assert!(
            segmented_sends > 100,
            "only {segmented_sends} segmented sends"
        );
    }
}
