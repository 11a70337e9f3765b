//! The UDP socket: buffer sizing, sending an [`Outbox`] (packing batch-capable recipients'
//! messages into batch frames, segmenting the others' when asked, holding the last words the
//! kernel has no room for, `sendmmsg` underneath), and reading the kernel's drop count.
//!
//! Its parts: `plan` decides the datagrams of a pass (batch frames, segmented sends, plain
//! datagrams), `dry_run` shows them without sending, `unsegmented` remembers the destinations
//! kept from segmented sends, and `socket` sizes the socket's buffers and reads the kernel's
//! drop count.

mod destinations;
mod dry_run;
mod plan;
mod socket;
#[cfg(test)]
mod tests;
mod unsegmented;

use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::mem;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::net::UdpSocket;
use ucrp::delivery;

use crate::last_words::{ExpiryLog, LastWords, MAX_HELD_AGE};
use crate::local::{LocalId, Locals};
use crate::metrics::Metrics;
use crate::mmsg::{self, Fate};
use crate::outbox::Outbox;
use crate::peer;
use destinations::{Distinct, LastPlanned};
pub use dry_run::{DryRun, PlannedDatagram};
pub use plan::MAX_SEGMENT_BYTES;
use plan::{keep_pooled, Batch, Bytes, Planned, Segments};
pub use socket::{kernel_drops, size_buffers, KernelDrops};
use unsegmented::Unsegmented;
pub use unsegmented::UNSEGMENTED_FOR;

/// Sends everything in an [`Outbox`]. Messages for a batch-capable member in the same pass
/// are packed into batch frames, never delayed: only what is already in the outbox is packed,
/// and a "batch" of one leaves as the plain frame. A batch frame is never larger than the
/// member's limit (its `max_datagram`, 4096 bytes unless it said) nor the daemon's
/// (`udp.max_batch_datagram_bytes`); a message too large for either leaves alone. What goes
/// to one address leaves in the order it was queued, whichever of the members there it is
/// for (one socket may be in several rooms). Nothing is copied: a batch frame is the batch
/// header followed by its entries where the outbox laid them out (each frame behind its
/// length prefix), and the kernel gathers them (`sendmmsg` with several iovecs per datagram,
/// [`mmsg::BATCH`] datagrams per system call). A member that gets every message of a pass but
/// its own gets them as one or two runs of bytes, however many there are.
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
    /// Members whose frames of a run of fan-outs were worked out ahead, for tests.
    #[cfg(test)]
    worked_ahead: usize,
    /// Runs of fan-outs to several audiences worked out ahead, for tests.
    #[cfg(test)]
    mixed_ahead: usize,
    /// Frames copied from another member's, worked out ahead for a run of fan-outs, for tests.
    #[cfg(test)]
    copied_ahead: usize,
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
    /// The plan entry last planned to each address in this pass: the only one to it that may
    /// take more datagrams ([`Planned::sealed`]).
    last_to: LastPlanned,
    /// Slots set in `open` during this pass, to reset them after.
    touched: Vec<u32>,
    /// Checks that the members of a block's audiences are at distinct addresses and slots.
    distinct: Distinct,
    /// A block's fan-outs as (audience, message) pairs, sorted when they name several
    /// audiences in turn, reused between passes.
    by_audience: Vec<(usize, usize)>,
    /// Frames worked out ahead for a run of fan-outs, reused between passes.
    pending: Vec<plan::Pending>,
    /// The senders of a run of fan-outs to one audience, sorted, reused between passes.
    senders: Vec<u32>,
    /// The frames worked out for the first member of each kind (sequenced or not, and batch
    /// limit) that sent none of a run, in `pending`: the others of its kind get copies.
    listeners: Vec<((bool, usize), Range<usize>)>,
    /// Each planned datagram's runs in the list of byte runs handed to the kernel; kept
    /// between passes (the runs themselves borrow the outbox, so they are not).
    datagrams: Vec<mmsg::Outgoing>,
    scratch: mmsg::SendScratch,
    /// Last words the kernel had no room for, waiting to be sent again.
    held: LastWords,
    /// Paces the lines about held words let go for their age.
    expiry_log: ExpiryLog,
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
