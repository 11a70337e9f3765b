//! The plan of one pass: which datagrams leave for what the outbox holds. Messages for a
//! batch-capable member go into batch frames under its limit; a member without batches gets
//! its equal-length datagrams as one segmented send when segmenting is on; everything else,
//! and every last word, leaves alone. What goes to one address leaves in the order it was
//! queued, whichever members it is for. The plans' vectors are pooled between passes.

use std::mem;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use ucrp::delivery;

use super::Sender;
use crate::local::LocalId;
use crate::mmsg;
use crate::outbox::{Fanout, Outbox, Queued, QueuedSend, Recipient};

/// Bytes of batch plans kept for reuse between passes (beyond that they are freed).
pub(super) const POOLED_BATCH_BYTES: usize = 1024 * 1024;

/// Most runs of outbox bytes one batch gathers: the kernel's limit, less the header's run.
pub(super) const MAX_BATCH_RUNS: usize = mmsg::MAX_PARTS - 1;

/// Bytes one run of a batch plan takes.
pub(super) const RUN_SIZE: usize = mem::size_of::<Range<usize>>();

/// The largest datagram a segmented send carries: what fits a path of the minimum IPv6 MTU
/// (1280 bytes, less 40 of IPv6 header and 8 of UDP header). The kernel refuses a segmented
/// send whose segments do not fit the path's MTU, where it would fragment a lone datagram.
pub const MAX_SEGMENT_BYTES: usize = 1232;

// A segment size goes to the kernel as a u16.
const _: () = assert!(MAX_SEGMENT_BYTES <= u16::MAX as usize);

#[derive(Clone)]
pub(super) enum Bytes {
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
pub(super) struct Segments {
    /// Each datagram's payload, in order.
    pub(super) runs: Vec<Range<usize>>,
    /// The length of every datagram but the last, which may be shorter.
    pub(super) size: usize,
    /// Bytes of all of them.
    pub(super) len: usize,
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
#[derive(Default, Clone)]
pub(super) struct Batch {
    /// Runs of the outbox's bytes, in order, each one or more whole entries (length prefix
    /// and frame) that lie back to back.
    pub(super) runs: Vec<Range<usize>>,
    /// The frame's length so far: header and entries.
    pub(super) len: usize,
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
    /// Ends the batch or segmented send open for the member in `slot`: what follows for it
    /// goes after, wherever it goes (a member that moved within the pass).
    fn close_open(&mut self, slot: u32) {
        if let Some(open) = self.open.get_mut(slot as usize) {
            *open = 0;
        }
    }

    /// The plan entry open for the member in `slot`, if it may take a datagram to `to` from
    /// `from`: a member that registered from a new address (or to another of ours) within
    /// the pass starts a new one, and so does one whose address was sent anything since (a
    /// last word, or another member's datagram at the same address), which must not be
    /// overtaken.
    fn open_for(&mut self, slot: u32, to: SocketAddr, from: LocalId) -> Option<usize> {
        let index = slot as usize;
        if self.open.len() <= index {
            self.open.resize(index + 1, 0);
        }
        let p = (self.open[index] as usize).checked_sub(1)?;
        let planned = self.plan.get(p)?;
        (planned.to == to && planned.from == from && !planned.sealed).then_some(p)
    }

    /// Appends `planned` to the plan; the entry planned before it to the same address takes
    /// nothing more, so that nothing queued after this one goes ahead of it. Two members
    /// share an address when one socket is in two rooms. Returns the new entry's index.
    fn push(&mut self, planned: Planned) -> usize {
        let index = self.plan.len();
        if let Some(before) = self.last_to.replace(planned.to, index as u32) {
            if let Some(entry) = self.plan.get_mut(before as usize) {
                entry.sealed = true;
            }
        }
        self.plan.push(planned);
        index
    }

    /// Appends `planned` to the plan as the entry open for the member in `slot`; returns its
    /// index.
    fn open_new(&mut self, slot: u32, planned: Planned) -> usize {
        let index = self.push(planned);
        if let Some(open) = self.open.get_mut(slot as usize) {
            *open = index as u32 + 1;
        }
        self.touched.push(slot);
        index
    }

    /// Decides the datagrams: one per send, batch frames for batch-capable members, and
    /// segmented sends for the others when segmenting is on.
    pub(super) fn plan(&mut self, outbox: &Outbox) {
        self.plan.clear();
        self.last_to.start_pass();
        self.used_batches = 0;
        self.used_groups = 0;
        for slot in self.touched.drain(..) {
            if let Some(open) = self.open.get_mut(slot as usize) {
                *open = 0;
            }
        }
        let now = self.unsegmented.now();
        let mut queued = outbox.queued();
        while let Some(first) = queued.first() {
            let block = match first {
                Queued::One(send) => {
                    self.plan_send(send, outbox, now);
                    1
                }
                Queued::Fanout(_) => {
                    let block = queued
                        .iter()
                        .take_while(|q| matches!(q, Queued::Fanout(_)))
                        .count();
                    self.plan_fanouts(&queued[..block], outbox, now);
                    block
                }
            };
            queued = &queued[block..];
        }
    }

    /// Plans `block`, consecutive fan-outs (to one room's audience, or to several rooms' in
    /// turn), as [`Sender::plan_send`] would plan their datagrams one by one, message by
    /// message, recipient by recipient. When the block names an audience more than once and
    /// its audiences' members are at distinct addresses, and at distinct slots when it names
    /// several (one audience names each member once, which `Outbox::add_audience` checks in
    /// debug builds), nothing in the block to one of them bears on another's: each
    /// batch-capable recipient's frames are worked out for the whole block at once, by its
    /// slot, a few nanoseconds a delivery, then put in the plan where the one-by-one plan would
    /// have opened them. The plan is the same, entry for entry (which pooled batch holds which
    /// frame aside), and a send buffer that fills drops the same datagrams. Most members of a
    /// room sent nothing in a pass and get every message of it: one of them of each kind
    /// (sequenced or not, and batch limit) with no batch open is worked out, and the others of
    /// its kind get copies of its frames, a step per frame rather than per message. The
    /// recipients without batches are planned one by one, in their places.
    ///
    /// A block of several audiences is planned turn by turn (each run of messages to one
    /// audience as a block of its own) when each audience's messages come together (sorting
    /// many audiences' frames into place at once costs more than it saves), and when its
    /// audiences share an address (one socket in two rooms) or a slot (a room's audience built
    /// again after a change of members within the pass, or a leaver's slot taken by a newcomer
    /// to another room). A block of one audience that shares an address (one socket in a room
    /// twice) is planned one by one.
    fn plan_fanouts(&mut self, block: &[Queued], outbox: &Outbox, now: Option<Instant>) {
        // Every message of the block is a fan-out (`plan` makes blocks of them only).
        let fanout = |message: usize| match block.get(message) {
            Some(Queued::Fanout(fanout)) => Some(fanout),
            _ => None,
        };
        let same_audience = |a: &Queued, b: &Queued| match (a, b) {
            (Queued::Fanout(a), Queued::Fanout(b)) => a.audience() == b.audience(),
            _ => false,
        };
        // Runs of messages to one audience.
        let turns = block.chunk_by(same_audience).count();
        // The block's messages by audience, each audience's in order.
        let mut by_audience = mem::take(&mut self.by_audience);
        by_audience.clear();
        by_audience.extend((0..block.len()).filter_map(|m| Some((fanout(m)?.audience(), m))));
        if turns > 1 {
            by_audience.sort_unstable();
        }
        let audiences = || {
            by_audience
                .chunk_by(|a, b| a.0 == b.0)
                .map(|run| (run[0].0, run))
        };
        let named = if turns > 1 { audiences().count() } else { 1 };
        let recipients = || audiences().flat_map(|(a, _)| outbox.recipients(a));
        let max_batch = self.max_batch;
        let batched = |r: &Recipient| batch_cap(r.batch_limit, max_batch) > 0;
        let at_once = !(named > 1 && turns == named)
            && block.len() > named
            && recipients().any(batched)
            && self.distinct.all(recipients().map(|r| r.to))
            && (named == 1 || self.distinct.all_slots(recipients().map(|r| r.member)));
        if named > 1 && !at_once {
            self.by_audience = by_audience;
            for turn in block.chunk_by(same_audience) {
                self.plan_fanouts(turn, outbox, now);
            }
            return;
        }
        let mut pending = mem::take(&mut self.pending);
        pending.clear();
        if at_once {
            let mut senders = mem::take(&mut self.senders);
            let mut listeners = mem::take(&mut self.listeners);
            for (audience, run) in audiences() {
                let fanouts = run.iter().filter_map(|&(_, m)| Some((m, fanout(m)?)));
                senders.clear();
                senders.extend(fanouts.clone().map(|(_, f)| f.except()));
                senders.sort_unstable();
                listeners.clear();
                let members = outbox.recipients(audience).iter().enumerate();
                for (place, r) in members.filter(|(_, r)| batched(r)) {
                    #[cfg(test)]
                    {
                        self.worked_ahead += 1;
                    }
                    let open = self.open_batch(r);
                    // A member that sent none of the run and has no batch open gets the same
                    // frames as any other such with its kind of frame and its limit.
                    let listens = open.is_none() && senders.binary_search(&r.member).is_err();
                    let kind = (r.sequenced, batch_cap(r.batch_limit, self.max_batch));
                    if listens {
                        if let Some((_, frames)) = listeners.iter().find(|(k, _)| *k == kind) {
                            self.copy_frames(frames.clone(), place, r, &mut pending);
                            continue;
                        }
                    }
                    let start = pending.len();
                    self.frames_for(place, r, open, fanouts.clone(), outbox, &mut pending);
                    if listens {
                        listeners.push((kind, start..pending.len()));
                    }
                }
            }
            self.senders = senders;
            self.listeners = listeners;
            // Where the one-by-one plan opened them: by message, then by recipient.
            pending.sort_unstable_by_key(|frame| frame.opened);
            #[cfg(test)]
            {
                self.mixed_ahead += usize::from(named > 1);
            }
        }
        let mut frames = pending.drain(..).peekable();
        let one_by_one = |r: &Recipient| !(at_once && batched(r));
        if recipients().any(one_by_one) {
            for (message, fanout) in (0..block.len()).filter_map(|m| Some((m, fanout(m)?))) {
                for (place, r) in outbox.recipients(fanout.audience()).iter().enumerate() {
                    if !one_by_one(r) || r.member == fanout.except() {
                        continue;
                    }
                    while let Some(frame) = frames.next_if(|f| f.opened < (message, place)) {
                        self.place(frame);
                    }
                    if let Some(send) = fanout.send_to(r) {
                        self.plan_send(&send, outbox, now);
                    }
                }
            }
        }
        for frame in frames {
            self.place(frame);
        }
        self.pending = pending;
        self.by_audience = by_audience;
    }

    /// Works out the frames the batch-capable `recipient`, at `place` in its audience, gets of
    /// `fanouts` (each with its message's place in the block; all but those it sent), as
    /// [`Sender::plan_send`] would one by one: into the batch open for it in the plan, then
    /// new ones, which go to `pending` with where they were opened.
    fn frames_for<'a>(
        &mut self,
        place: usize,
        recipient: &Recipient,
        open: Option<(usize, usize)>,
        fanouts: impl Iterator<Item = (usize, &'a Fanout)>,
        outbox: &Outbox,
        pending: &mut Vec<Pending>,
    ) {
        let (slot, limit) = (
            recipient.member,
            batch_cap(recipient.batch_limit, self.max_batch),
        );
        // The batch messages go into: its entry in the plan or in `pending`, and its index.
        let mut open = open.map(|(p, i)| (Entry::Planned(p), i));
        for (message, fanout) in fanouts {
            if fanout.except() == slot {
                continue;
            }
            let Some(bytes) = fanout.bytes_for(recipient) else {
                continue;
            };
            let opened = (message, place);
            let Some(run) = outbox.entry_at(bytes) else {
                // Too long for a batch: alone, after whatever is packed for the member.
                let alone = Bytes::Outbox(bytes.clone());
                let planned = Planned::empty(recipient.to, recipient.from, alone, 1);
                pending.push(Pending {
                    opened,
                    slot,
                    planned,
                });
                open = None;
                continue;
            };
            let (entry, i) = match open {
                Some((entry, i)) if self.batches[i].takes(&run, limit) => (entry, i),
                _ => {
                    let (index, batch) = next_pooled(&mut self.batches, &mut self.used_batches);
                    batch.runs.clear();
                    batch.len = delivery::BATCH_HEADER_LEN;
                    let batch = Bytes::Batch(index);
                    let planned = Planned::empty(recipient.to, recipient.from, batch, 0);
                    pending.push(Pending {
                        opened,
                        slot,
                        planned,
                    });
                    (Entry::Pending(pending.len() - 1), index)
                }
            };
            self.batches[i].push(run);
            match entry {
                Entry::Planned(p) => self.plan[p].messages += 1,
                Entry::Pending(q) => pending[q].planned.messages += 1,
            }
            open = Some((entry, i));
        }
    }

    /// The batch open in the plan for `recipient` that may take more of its messages, if any:
    /// its plan entry and its index in [`Sender::batches`].
    fn open_batch(&mut self, recipient: &Recipient) -> Option<(usize, usize)> {
        let p = self.open_for(recipient.member, recipient.to, recipient.from)?;
        match self.plan[p].bytes {
            Bytes::Batch(i) => Some((p, i)),
            _ => None,
        }
    }

    /// Gives the batch-capable `recipient`, at `place` in its audience, copies of `frames` of
    /// `pending`: those worked out for another member that gets the same ones (neither sent
    /// any of the run, nor has a batch open, and both take the same kind of frame under the
    /// same limit). A copy costs a few runs of the outbox, where working them out again costs a
    /// step per message.
    fn copy_frames(
        &mut self,
        frames: Range<usize>,
        place: usize,
        recipient: &Recipient,
        pending: &mut Vec<Pending>,
    ) {
        for f in frames {
            let Some(frame) = pending.get(f) else {
                continue;
            };
            let (message, messages) = (frame.opened.0, frame.planned.messages);
            let bytes = match frame.planned.bytes {
                Bytes::Batch(i) => {
                    let (index, _) = next_pooled(&mut self.batches, &mut self.used_batches);
                    if let Ok([from, to]) = self.batches.get_disjoint_mut([i, index]) {
                        to.clone_from(from);
                    }
                    Bytes::Batch(index)
                }
                ref alone => alone.clone(),
            };
            let planned = Planned::empty(recipient.to, recipient.from, bytes, messages);
            pending.push(Pending {
                opened: (message, place),
                slot: recipient.member,
                planned,
            });
            #[cfg(test)]
            {
                self.copied_ahead += 1;
            }
        }
    }

    /// Puts a frame worked out ahead in the plan: a batch as the one open for its member, a
    /// datagram alone after whatever is packed for it.
    fn place(&mut self, frame: Pending) {
        match frame.planned.bytes {
            Bytes::Batch(_) => {
                self.open_new(frame.slot, frame.planned);
            }
            Bytes::Outbox(_) | Bytes::Segments(_) => {
                self.close_open(frame.slot);
                self.push(frame.planned);
            }
        }
    }

    /// Plans one datagram of the outbox's, as of `now` (see
    /// [`Unsegmented::now`](super::unsegmented::Unsegmented::now)).
    fn plan_send(&mut self, send: &QueuedSend, outbox: &Outbox, now: Option<Instant>) {
        let limit = batch_cap(send.batch_limit, self.max_batch);
        match (send.member, outbox.entry_of(send)) {
            // A last word leaves alone, so that it can be held alone when the kernel has
            // no room for it, and after whatever is packed for its member or its address.
            (member, _) if send.last_word => {
                if let Some(slot) = member {
                    self.close_open(slot);
                }
                self.push(Planned::alone(send));
            }
            (Some(slot), Some(entry)) if limit > 0 => self.plan_batched(send, slot, entry, limit),
            (Some(slot), _)
                if self.segmenting
                    && send.batch_limit == 0
                    && (1..=MAX_SEGMENT_BYTES).contains(&send.bytes.len())
                    && !self.unsegmented.keeps(&send.to.ip(), now) =>
            {
                self.plan_segmented(send, slot)
            }
            // After whatever is packed for its member or its address.
            (member, _) => {
                if let Some(slot) = member {
                    self.close_open(slot);
                }
                self.push(Planned::alone(send));
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

/// A frame worked out ahead for a member of an audience ([`Sender::plan_fanouts`]), waiting
/// for its place in the plan.
pub(super) struct Pending {
    /// Where the one-by-one plan would have opened it: the message of its block, then the
    /// member's place in the audience.
    opened: (usize, usize),
    /// The member's slot.
    slot: u32,
    planned: Planned,
}

/// Where the messages of a frame being worked out are counted.
#[derive(Clone, Copy)]
enum Entry {
    /// An entry of the plan (a batch opened before the block).
    Planned(usize),
    /// An entry of the frames worked out ahead.
    Pending(usize),
}

/// One entry of a send plan: a datagram, or a segmented send of several.
pub(super) struct Planned {
    pub(super) to: SocketAddr,
    pub(super) from: LocalId,
    pub(super) bytes: Bytes,
    /// Messages carried: the batch frame's entries, or the segmented send's datagrams.
    pub(super) messages: usize,
    /// Whether it is a member's last word ([`QueuedSend::last_word`]), held when the
    /// kernel has no room for it.
    pub(super) last_word: bool,
    /// Something was planned after it to the same address: it takes no more datagrams.
    pub(super) sealed: bool,
}

impl Planned {
    /// An entry for `send`'s destination and source carrying nothing yet.
    fn new(send: &QueuedSend, bytes: Bytes) -> Planned {
        Planned::empty(send.to, send.from, bytes, 0)
    }

    /// An entry to `to` from `from` of `bytes`, `messages` of them so far, not a last word.
    fn empty(to: SocketAddr, from: LocalId, bytes: Bytes, messages: usize) -> Planned {
        Planned {
            to,
            from,
            bytes,
            messages,
            last_word: false,
            sealed: false,
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
            sealed: false,
        }
    }

    /// Datagrams on the wire.
    pub(super) fn datagrams(&self) -> usize {
        match self.bytes {
            Bytes::Segments(_) => self.messages,
            Bytes::Outbox(_) | Bytes::Batch(_) => 1,
        }
    }
}

/// The largest batch frame for a member whose limit is `batch_limit` (0: it takes none), under
/// the daemon's cap `max_batch`, in bytes.
fn batch_cap(batch_limit: u16, max_batch: usize) -> usize {
    usize::from(batch_limit).min(max_batch)
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
pub(super) fn keep_pooled<T>(pool: &mut Vec<T>, runs: impl Fn(&T) -> usize) {
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
