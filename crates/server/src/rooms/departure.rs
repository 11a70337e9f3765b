//! Members leaving: a `__LEAVE__`, a keepalive expiry, and the host's departure, which
//! closes its room and tells everyone still in it; and rooms closed for being idle
//! (`liveness.room_idle_secs`), which tells the host too.

use std::time::{Duration, Instant};

use log::{debug, info};
use tcrp::payload::Caps;
use ucrp::delivery::{self, Notice};

use super::tombstones::Gone;
use super::{Handled, MemberId, Registry, RoomId};
use crate::outbox::Outbox;
use crate::record::Record;

impl Registry {
    /// How long a member with keepalives every `interval` may stay silent.
    pub(super) fn keepalive_limit(&self, interval: Duration) -> Duration {
        interval.saturating_mul(self.limits.keepalive_misses.max(1))
    }

    /// Queues every member with keepalives again at its deadline under the current limits:
    /// after a reload changed `keepalive_misses` (the entries queued before were due under the
    /// old ones), or once departed members' entries outnumber the live ones.
    pub(super) fn requeue_deadlines(&mut self) {
        self.deadlines.clear();
        for (i, member) in &self.members {
            if let Some(interval) = member.keepalive {
                let limit = self.keepalive_limit(interval);
                self.deadlines
                    .queue(MemberId(i), member.serial, member.last_seen, limit);
            }
        }
    }

    /// Removes a member; a host's removal closes its room.
    pub(super) fn remove_member(
        &mut self,
        id: MemberId,
        why: Notice,
        now: Instant,
        out: &mut Outbox,
    ) -> Handled {
        let room = self.members[id.0].room;
        let expired = Gone::Expired {
            notices: self.members[id.0].caps.contains(Caps::NOTICES),
        };
        if self.members[id.0].is_host {
            let host_gone = if why == Notice::TimedOut {
                // Members that read notices learn why the room closes: its host was not
                // heard from, rather than left.
                let name = self.members[id.0].username.to_string();
                self.notify(room, Some(id), Notice::TimedOut, &name, out);
                // The host itself, back later, hears that it timed out if it reads notices,
                // and otherwise that its room is closed, as every other member does.
                match expired {
                    Gone::Expired { notices: true } => expired,
                    _ => Gone::RoomClosed,
                }
            } else {
                Gone::RoomClosed
            };
            let notified = self.close_room(room, host_gone, Closing::HostLeft, now, out);
            return Handled::Closed { notified };
        }
        let member = self.unlink(id);
        if why == Notice::TimedOut {
            self.tombstones
                .insert(member.token.as_str().as_bytes(), expired, now, &self.limits);
        }
        self.take_out(room, id, member.caps.contains(Caps::NOTICES));
        let room_entry = &self.rooms[room.0];
        debug!(
            "room {:?}: {:?} left ({why:?})",
            room_entry.name, member.username
        );
        self.notify(room, None, why, &member.username, out);
        self.record(Record::Leave {
            token: member.token.as_str().to_owned(),
        });
        Handled::Left
    }

    /// Takes member `id` out of its room's list of members (and of notice takers, if it is
    /// one), keeping join order. Looked for from the newest back: a member that joins and
    /// leaves again costs the members that joined after it, not a pass over the whole room
    /// (28 µs at 100,000 members).
    fn take_out(&mut self, room: RoomId, id: MemberId, takes_notices: bool) {
        self.members_changed();
        let room = &mut self.rooms[room.0];
        let takers = takes_notices.then_some(&mut room.notice_takers);
        for list in std::iter::once(&mut room.members).chain(takers) {
            if let Some(at) = list.iter().rposition(|&m| m == id) {
                #[cfg(test)]
                self.departure_reads
                    .set(self.departure_reads.get() + list.len() - at);
                list.remove(at);
            }
        }
    }

    /// Deletes a room, telling its registered members; `host_gone` is what the host's token
    /// will answer later (the room closed, or the host itself was expired).
    fn close_room(
        &mut self,
        room: RoomId,
        host_gone: Gone,
        why: Closing,
        now: Instant,
        out: &mut Outbox,
    ) -> usize {
        let entry = self.remove_room(room);
        // Written with the first send: the loop clears the outbox only when it holds a
        // datagram, so bytes nobody is sent would stay there until some later one.
        let mut closed = None;
        let mut notified = 0;
        for &m in &entry.members {
            let member = self.unlink(m);
            // Only tokens of closed rooms are remembered: a late datagram with one learns the
            // room is gone. A member that left a live room is simply unknown.
            let gone = if m == entry.host {
                host_gone
            } else {
                Gone::RoomClosed
            };
            self.tombstones
                .insert(member.token.as_str().as_bytes(), gone, now, &self.limits);
            // A host that left needs no telling; one still there when the room is closed
            // for it (idle) does.
            let told = m != entry.host || why.tells_host();
            if let (Some(to), true) = (member.address, told) {
                let closed = closed
                    .get_or_insert_with(|| {
                        out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED))
                    })
                    .clone();
                // Its last word from the room: a listening member sends nothing that would
                // bring the tombstone's answer, so a full send buffer must not lose it.
                out.queue_last_word(to, member.local, closed, m.slot());
                notified += 1;
            }
        }
        info!(
            "room {:?} closed: {why}; {notified} member{} told",
            entry.name,
            if notified == 1 { "" } else { "s" }
        );
        self.record(Record::CloseRoom {
            room: entry.name.into_string(),
        });
        notified
    }

    /// With `room_idle` set, closes the rooms none of whose members has been heard from (a
    /// `__REGISTER__`, chat or `__LEAVE__`) or joined for that long: the registered members,
    /// the host included, are told `__ROOM_CLOSED__`, and the close is journaled. Original clients
    /// never promise keepalives, so without this a room whose host vanished without a
    /// `__LEAVE__` (a crash, a lost datagram) stays for good, its name taken. Reads every
    /// member, so at most once per tenth of the limit (between 1 s and 60 s); returns how
    /// many rooms were closed.
    pub fn close_idle_rooms(&mut self, now: Instant, out: &mut Outbox) -> usize {
        let Some(limit) = self.limits.room_idle else {
            return 0;
        };
        if self.next_idle_check.is_some_and(|at| now < at) {
            return 0;
        }
        let every = (limit / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        self.next_idle_check = Some(now + every);
        let members = &self.members;
        let idle: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, room)| {
                room.members
                    .iter()
                    .all(|m| now.saturating_duration_since(members[m.0].last_seen) > limit)
            })
            .map(|(i, _)| RoomId(i))
            .collect();
        for &room in &idle {
            self.close_room(room, Gone::RoomClosed, Closing::Idle(limit), now, out);
        }
        idle.len()
    }

    /// Expires members that promised keepalives and went silent, and old tombstones.
    /// Returns how many members were expired.
    pub fn poll_expired(&mut self, now: Instant, out: &mut Outbox) -> usize {
        self.tombstones.expire(now, &self.limits);
        self.scratch.clear();
        // Only the members whose deadline, as queued, has passed: the others were heard from
        // recently enough whatever they did since.
        if self.deadlines.mostly_stale(self.keepalive_members) {
            self.requeue_deadlines();
        }
        while let Some(entry) = self.deadlines.pop_due(now) {
            let Some(member) = self.members.get(entry.slot) else {
                continue;
            };
            let Some(interval) = member.keepalive.filter(|_| member.serial == entry.serial) else {
                // A member that took the slot since: it has its own entry.
                continue;
            };
            let limit = self.keepalive_limit(interval);
            if now.saturating_duration_since(member.last_seen) > limit {
                self.scratch.push(entry.member());
            } else {
                self.deadlines
                    .queue(entry.member(), member.serial, member.last_seen, limit);
            }
        }
        let mut expired = 0;
        let silent = std::mem::take(&mut self.scratch);
        for &id in &silent {
            // A host's expiry may already have removed this member with its room.
            if let Some(member) = self.members.get(id.0) {
                info!(
                    "token {} ({:?}) expired after missing keepalives",
                    member.token.short(),
                    member.username
                );
                self.remove_member(id, Notice::TimedOut, now, out);
                expired += 1;
            }
        }
        self.scratch = silent;
        expired
    }
}

/// Why a room closes, for the log.
#[derive(Debug, Clone, Copy)]
enum Closing {
    /// Its host sent `__LEAVE__` or was expired.
    HostLeft,
    /// Nobody was heard from for this long.
    Idle(Duration),
}

impl Closing {
    /// Whether the host is sent `__ROOM_CLOSED__` too: it did not leave.
    fn tells_host(self) -> bool {
        matches!(self, Closing::Idle(_))
    }
}

impl std::fmt::Display for Closing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closing::HostLeft => f.write_str("host left"),
            Closing::Idle(limit) => write!(f, "nobody heard from for {} s", limit.as_secs()),
        }
    }
}
