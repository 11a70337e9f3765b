//! Chat and notices queued for the other registered members of a room: each frame encoded
//! once per kind of member, its bytes shared by every send. Chat is queued once for the room
//! (a fan-out) to an audience, the room's registered members copied into the outbox. The next
//! message to the same room names that audience again while no member anywhere has joined,
//! left, registered or moved since (the registry counts such changes): a run of messages to
//! one room walks its members once, not once per message.

use std::time::Instant;

use tcrp::payload::Caps;
use ucrp::delivery::{self, Notice};

use super::{MemberId, Registry, RoomId};
use crate::outbox::{AudienceKey, Outbox, Recipient};
use crate::record::HistoryEntry;

impl Registry {
    /// Notes that a member joined, left, registered or moved to another of our addresses:
    /// the audiences in the outbox are no longer their rooms'.
    pub(super) fn members_changed(&mut self) {
        self.members_changes = self.members_changes.wrapping_add(1);
    }

    /// Queues `text` from `from` to every other registered member; returns the count.
    pub(super) fn relay(
        &mut self,
        from: MemberId,
        message: &str,
        now: Instant,
        out: &mut Outbox,
    ) -> usize {
        let at = self.unix_time(now);
        let keep = self.limits.history;
        let room_id = self.members[from.0].room;
        let audience = self.audience(room_id, out);
        let sender = &self.members[from.0];
        let room = &mut self.rooms[room_id.0];
        let seq = room.next_seq;
        // Saturating: the number may come from a state file.
        room.next_seq = room.next_seq.saturating_add(1);
        if keep > 0 {
            let entry = HistoryEntry {
                seq,
                sender: sender.username.to_string(),
                text: message.to_owned(),
                at,
            };
            room.keep_in_history(entry, keep, self.limits.history_bytes);
            room.history_unsaved = (room.history_unsaved + 1).min(room.history.len());
        }
        let text = message.as_bytes();
        // Each kind of frame is encoded when a recipient other than the sender takes it. The
        // sender is one of the audience when registered (as it is to chat).
        let sender_kind = sender
            .address
            .is_some()
            .then_some(sender.caps.contains(Caps::SEQ));
        let takers = out.takers(audience, sender_kind);
        let plain = (takers.plain > 0).then(|| {
            out.payload(|b| {
                let _ = delivery::encode_chat(&sender.username, text, b);
            })
        });
        let sequenced = (takers.sequenced > 0).then(|| {
            out.payload(|b| {
                // Usernames are checked to fit the size byte at join.
                let _ = delivery::encode_sequenced(seq, &sender.username, text, b);
            })
        });
        out.queue_fanout(audience, from.slot(), (plain, sequenced), takers)
    }

    /// The outbox's audience for `room`: the one added for it this pass, while no member
    /// anywhere changed since (so messages to several rooms in turn each find their room's),
    /// else a new one of its registered members.
    fn audience(&self, room: RoomId, out: &mut Outbox) -> usize {
        let key: AudienceKey = (room.0, self.members_changes);
        if let Some(audience) = out.audience(key) {
            debug_assert!(
                self.recipients(room)
                    .eq(out.recipients(audience).iter().copied()),
                "an audience outlived a change of its room's members"
            );
            return audience;
        }
        out.add_audience(key, self.recipients(room))
    }

    /// The registered members of `room`, in join order, as recipients of its chat.
    fn recipients(&self, room: RoomId) -> impl Iterator<Item = Recipient> + '_ {
        self.rooms[room.0].members.iter().filter_map(|&m| {
            let member = &self.members[m.0];
            Some(Recipient {
                to: member.address?,
                from: member.local,
                member: m.slot(),
                batch_limit: member.batch_limit(),
                sequenced: member.caps.contains(Caps::SEQ),
            })
        })
    }

    /// Sends a notice about `subject` to the room's notice-capable registered members: reads
    /// those members only.
    pub(super) fn notify(
        &mut self,
        room: RoomId,
        subject: Option<MemberId>,
        what: Notice,
        name: &str,
        out: &mut Outbox,
    ) {
        let subject_takes = subject.is_some_and(|s| self.members[s.0].caps.contains(Caps::NOTICES));
        let takers = &self.rooms[room.0].notice_takers;
        // An empty name (only a state file can hold one) would make its timed-out notice the
        // nameless "you timed out" (PROTOCOL.md): such a member leaves unannounced.
        if takers.len() == usize::from(subject_takes) || name.is_empty() {
            return;
        }
        let mut bytes = None;
        for &m in takers {
            #[cfg(test)]
            self.notice_reads.set(self.notice_reads.get() + 1);
            if Some(m) == subject {
                continue;
            }
            let member = &self.members[m.0];
            let Some(to) = member.address else {
                continue;
            };
            let range = bytes
                .get_or_insert_with(|| {
                    out.payload(|b| {
                        let _ = delivery::encode_notice(what, name, b);
                    })
                })
                .clone();
            out.queue_to_member(to, member.local, range, m.slot(), member.batch_limit());
        }
    }
}
