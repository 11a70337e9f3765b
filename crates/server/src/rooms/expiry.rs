//! Keepalive deadlines: which members a sweep has to look at, without reading every member.
//!
//! A member that asked for keepalives (`keepalive_secs` at join) expires once it has been
//! silent for `keepalive_misses` of its intervals. Its datagrams move its `last_seen` and
//! leave this queue alone: the queue holds one entry per such member, with the time the member
//! was due when the entry was made (`last_seen` only moves forward: the loop's clock is
//! monotonic). A sweep takes only the entries now due; it expires the
//! members that really are silent past their limit and queues the others again at their true
//! deadline. So a sweep reads the members whose deadline passed, about once per limit each,
//! where it used to read every member (100,000 of them every 500 ms), and members without
//! keepalives never.
//!
//! An entry names its member by slot and serial: a member that leaves leaves its entry
//! pointing at nobody, and it is dropped when it comes due. A member may ask for keepalives
//! centuries apart, so such entries could pile up: once they outnumber the live ones (and a
//! thousand more), the sweep builds the queue again from the members. A sweep decides on the
//! member's own `last_seen`, never on the entry's time, so an entry taken for the wrong member
//! could only make it looked at early.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::MemberId;

/// Entries beyond twice the live ones that the queue may hold before it is built again.
const STALE_SLACK: usize = 1024;

/// The queue of keepalive deadlines.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    heap: BinaryHeap<Reverse<Entry>>,
}

/// One member's deadline as it stood when queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Entry {
    pub(super) due: Instant,
    /// The member's slot ([`MemberId`]'s index).
    pub(super) slot: usize,
    pub(super) serial: u32,
}

impl Entry {
    /// Its slot as a member id (the member there now may be another: compare serials).
    pub(super) fn member(&self) -> MemberId {
        MemberId(self.slot)
    }
}

impl Deadlines {
    /// Queues `member` (of `serial`) to be looked at once `limit` has passed since
    /// `last_seen`. A deadline past what `Instant` can hold is never due: nothing is queued.
    pub(super) fn queue(
        &mut self,
        member: MemberId,
        serial: u32,
        last_seen: Instant,
        limit: Duration,
    ) {
        if let Some(due) = last_seen.checked_add(limit) {
            self.heap.push(Reverse(Entry {
                due,
                slot: member.0,
                serial,
            }));
        }
    }

    /// The next entry due before `now`, taken off the queue.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<Entry> {
        if self.heap.peek().is_some_and(|Reverse(e)| e.due < now) {
            self.heap.pop().map(|Reverse(e)| e)
        } else {
            None
        }
    }

    /// Entries queued, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether the queue holds so many entries of departed members, next to the `live`
    /// members with keepalives, that it should be built again.
    pub(super) fn mostly_stale(&self, live: usize) -> bool {
        self.heap.len() > live.saturating_mul(2).saturating_add(STALE_SLACK)
    }

    /// Forgets every entry (before queueing every member again).
    pub(super) fn clear(&mut self) {
        self.heap.clear();
        // A queue that grew with departed members gives the memory back.
        self.heap.shrink_to(STALE_SLACK);
    }
}
