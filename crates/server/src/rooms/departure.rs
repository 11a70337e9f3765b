//! Members leaving: a `__LEAVE__`, a keepalive expiry, and the host's departure, which
//! closes its room and tells everyone still in it.

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
        let misses = self.limits.keepalive_misses.max(1);
        for (i, member) in &self.members {
            if let Some(interval) = member.keepalive {
                let limit = interval.saturating_mul(misses);
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
                expired
            } else {
                Gone::RoomClosed
            };
            let notified = self.close_room(room, host_gone, now, out);
            return Handled::Closed { notified };
        }
        let member = self.unlink(id);
        if why == Notice::TimedOut {
            self.tombstones
                .insert(member.token.as_str().as_bytes(), expired, now, &self.limits);
        }
        let room_entry = &mut self.rooms[room.0];
        room_entry.members.retain(|&m| m != id);
        if member.caps.contains(Caps::NOTICES) {
            room_entry.notice_takers -= 1;
        }
        debug!(
            "room {:?}: {:?} left ({why:?})",
            room_entry.name, member.username
        );
        self.notify(room, None, why, &member.username, out);
        self.records.push(Record::Leave {
            token: member.token.as_str().to_owned(),
        });
        Handled::Left
    }

    /// Deletes a room, telling its registered members; `host_gone` is what the host's token
    /// will answer later (the room closed, or the host itself was expired).
    fn close_room(
        &mut self,
        room: RoomId,
        host_gone: Gone,
        now: Instant,
        out: &mut Outbox,
    ) -> usize {
        let entry = self.rooms.remove(room.0);
        self.room_index.remove(&entry.name);
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
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
            if let (Some(to), false) = (member.address, m == entry.host) {
                out.send_to_member(to, member.local, closed.clone(), m.slot(), 0);
                notified += 1;
            }
        }
        info!(
            "room {:?} closed: host left; {notified} member{} told",
            entry.name,
            if notified == 1 { "" } else { "s" }
        );
        self.records.push(Record::CloseRoom {
            room: entry.name.into_string(),
        });
        notified
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
