//! Each room's kept messages: what is kept under the limits, the pages a History request
//! reads, and the checkpoints that write new messages and sequence counts to the journal.

use tcrp::payload::ErrorCode;

use super::room::Room;
use super::Registry;
use crate::record::{HistoryEntry, Record};

/// What a kept message counts against `Limits::history_bytes`.
pub(super) fn history_size(entry: &HistoryEntry) -> usize {
    entry.text.len() + entry.sender.len()
}

impl Room {
    /// Keeps `entry` as the newest message, dropping the oldest until at most `keep` messages
    /// and `budget` bytes are kept (the newest is kept even if alone it is over `budget`).
    pub(super) fn keep_in_history(&mut self, entry: HistoryEntry, keep: usize, budget: usize) {
        if keep == 0 {
            self.trim_history(0, 0);
            return;
        }
        let size = history_size(&entry);
        if size > budget {
            // Over the budget by itself: it is kept, alone.
            self.trim_history(0, 0);
        } else {
            self.trim_history(keep - 1, budget - size);
        }
        self.history_bytes += size;
        self.history.push_back(entry);
    }

    /// Drops the oldest kept messages until at most `keep` remain and they hold at most
    /// `budget` bytes; returns whether any went. The unsaved count never exceeds what is kept.
    fn trim_history(&mut self, keep: usize, budget: usize) -> bool {
        let before = self.history.len();
        while self.history.len() > keep || self.history_bytes > budget {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= history_size(&old);
        }
        self.history_unsaved = self.history_unsaved.min(self.history.len());
        self.history.len() < before
    }

    /// Applies lower history limits now, not at the room's next message: what the operator
    /// no longer wants kept is neither served nor left in the journal's copy.
    pub(super) fn shrink_history_to(&mut self, keep: usize, budget: usize) {
        // The newest message stays even if alone it is over the budget, as when it came.
        let newest = self.history.back().map_or(0, history_size);
        let budget = if keep > 0 { budget.max(newest) } else { budget };
        if self.trim_history(keep, budget) {
            self.history_shrunk = true;
        }
    }
}

impl Registry {
    /// A page of `room_name`'s kept messages with a sequence number below `before`, oldest
    /// first, at most `limit`; and whether older ones exist. Members only.
    pub fn history_page(
        &self,
        room_name: &str,
        token: &[u8],
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<HistoryEntry>, bool), ErrorCode> {
        let room = self
            .room_index
            .get(room_name)
            .ok_or(ErrorCode::RoomNotFound)?;
        if !self.is_member(room_name, token) {
            return Err(ErrorCode::NotMember);
        }
        let history = &self.rooms[room.0].history;
        let before = before.unwrap_or(u64::MAX);
        let end = history.partition_point(|m| m.seq < before);
        let start = end.saturating_sub(limit);
        let page = history.range(start..end).cloned().collect();
        Ok((page, start > 0))
    }

    /// Queues a `history_append` record for each room that relayed messages since its last
    /// checkpoint (kept or not: the record carries the room's `next_seq`), or whose kept
    /// history shrank under lower limits; returns how many. Used at shutdown: everything is
    /// written.
    pub fn checkpoint_history(&mut self) -> usize {
        self.checkpoint_history_within(usize::MAX)
    }

    /// Like [`Registry::checkpoint_history`], but stops once the new messages written hold
    /// `budget` bytes (text and sender names; JSON escaping may grow them up to sixfold), so a
    /// periodic checkpoint writes a bounded amount however many rooms chatted. The rooms left
    /// out keep their new messages, and the next call starts with them.
    ///
    /// A record carries only the messages kept since the room's last checkpoint, and how many
    /// messages the room keeps in all, so its size follows the chat since then, not the
    /// length of the history.
    pub fn checkpoint_history_within(&mut self, budget: usize) -> usize {
        let cursor = self.checkpoint_cursor;
        let mut dirty: Vec<usize> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.history_unsaved > 0 || r.history_shrunk || r.next_seq != r.seq_saved)
            .map(|(k, _)| k)
            .collect();
        // Round robin: the rooms from the cursor on, then those before it.
        dirty.sort_unstable_by_key(|&k| (k < cursor, k));
        self.checkpoint_cursor = 0;
        let (mut written, mut bytes) = (0, 0usize);
        for key in dirty {
            if written > 0 && bytes >= budget {
                self.checkpoint_cursor = key;
                break;
            }
            let room = &mut self.rooms[key];
            let new = room.history.len() - room.history_unsaved.min(room.history.len());
            let messages: Vec<HistoryEntry> = room.history.range(new..).cloned().collect();
            bytes = messages
                .iter()
                .map(history_size)
                .fold(bytes, usize::saturating_add);
            room.history_unsaved = 0;
            room.history_shrunk = false;
            room.seq_saved = room.next_seq;
            let change = Record::HistoryAppend {
                room: room.name.to_string(),
                next_seq: room.next_seq,
                kept: room.history.len(),
                messages,
            };
            self.record(change);
            written += 1;
        }
        written
    }
}
