//! Chat and notices queued for the other registered members of a room: each frame encoded
//! once per kind of member, its bytes shared by every send.

use std::time::Instant;

use tcrp::payload::Caps;
use ucrp::delivery::{self, Notice};

use super::{MemberId, Registry, RoomId};
use crate::outbox::Outbox;
use crate::record::HistoryEntry;

impl Registry {
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
        let sender = &self.members[from.0];
        let room = &mut self.rooms[sender.room.0];
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
        let mut plain = None;
        let mut sequenced = None;
        let mut deliveries = 0;
        for &m in &room.members {
            if m == from {
                continue;
            }
            let member = &self.members[m.0];
            let Some(to) = member.address else { continue };
            let bytes = if member.caps.contains(Caps::SEQ) {
                sequenced
                    .get_or_insert_with(|| {
                        out.payload(|b| {
                            // Usernames are checked to fit the size byte at join.
                            let _ = delivery::encode_sequenced(seq, &sender.username, text, b);
                        })
                    })
                    .clone()
            } else {
                plain
                    .get_or_insert_with(|| {
                        out.payload(|b| {
                            let _ = delivery::encode_chat(&sender.username, text, b);
                        })
                    })
                    .clone()
            };
            out.queue_to_member(to, member.local, bytes, m.slot(), member.batch_limit());
            deliveries += 1;
        }
        deliveries
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
