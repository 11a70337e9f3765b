//! The registry's token and name indexes: hash tables of member ids, keyed by hashes of
//! the token and of (room, username), under one hasher with random keys.
//!
//! Each entry keeps its hash beside the member id, so that a table growing past its capacity
//! moves its entries without hashing any of them again or reading the members: at 114,688
//! members the doubling took 36 ms of the event loop when it did both, in the middle of the
//! joins that caused it, and takes 4 ms now. The hashes cost 8 bytes per slot: 25 bytes per
//! registered member at 100,000 members (`ocm-bench memory`: 749 before, 774 after).

use std::hash::{BuildHasher, Hash, RandomState};

use tcrp::payload::Caps;

use super::room::Member;
use super::{MemberId, Registry, RoomId};

/// The hasher of the registry's token, name and look-alike indexes: SipHash under random keys.
/// A test can make every value hash alike, so that each lookup rests on the index's own
/// comparison of rooms, names and tokens (a collision cannot be forced otherwise).
#[derive(Default)]
pub(super) struct IndexHasher {
    keys: RandomState,
    #[cfg(test)]
    pub(super) colliding: bool,
    /// Values hashed so far, so that a test can see what a change of the indexes costs.
    #[cfg(test)]
    pub(super) hashed: std::cell::Cell<u64>,
}

impl IndexHasher {
    /// The hash of `value` under the registry's keys.
    pub(super) fn hash_one<T: Hash>(&self, value: T) -> u64 {
        #[cfg(test)]
        self.hashed.set(self.hashed.get() + 1);
        #[cfg(test)]
        if self.colliding {
            return 0x9e37_79b9_7f4a_7c15;
        }
        self.keys.hash_one(value)
    }
}

/// An entry of the token or name index: a member and the hash it is filed under.
#[derive(Clone, Copy)]
pub(super) struct Indexed {
    hash: u64,
    id: MemberId,
}

/// The hash an entry is filed under, for the table's growth.
fn filed_hash(entry: &Indexed) -> u64 {
    entry.hash
}

/// The key of `username` in `room` in the registry's name index.
fn name_key(hasher: &IndexHasher, room: RoomId, username: &str) -> u64 {
    hasher.hash_one((room.0, username))
}

impl Registry {
    /// Adds a member to the slab, the token, name and look-alike indexes and its room's
    /// member list.
    pub(super) fn insert_member(&mut self, mut member: Member) -> MemberId {
        member.serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        self.members_changed();
        let keepalive = member
            .keepalive
            .map(|interval| (interval, member.last_seen, member.serial));
        let hash = self.hasher.hash_one(member.token.as_str().as_bytes());
        let room = member.room;
        if member.address.is_some() {
            self.registered += 1;
        }
        let takes_notices = member.caps.contains(Caps::NOTICES);
        let name_hash = self.name_hash(room, &member.username);
        let id = MemberId(self.members.insert(member));
        if takes_notices {
            self.rooms[room.0].notice_takers.push(id);
        }
        self.token_index
            .insert_unique(hash, Indexed { hash, id }, filed_hash);
        let entry = Indexed {
            hash: name_hash,
            id,
        };
        self.name_index.insert_unique(name_hash, entry, filed_hash);
        self.rooms[room.0].members.push(id);
        self.file_member(id);
        if let Some((interval, last_seen, serial)) = keepalive {
            self.keepalive_members += 1;
            let limit = self.keepalive_limit(interval);
            self.deadlines.queue(id, serial, last_seen, limit);
        }
        id
    }

    /// The hash of `username` in `room` in the name index.
    fn name_hash(&self, room: RoomId, username: &str) -> u64 {
        name_key(&self.hasher, room, username)
    }

    /// Whether `room` has a member called `username`.
    pub(super) fn name_taken(&self, room: RoomId, username: &str) -> bool {
        let hash = self.name_hash(room, username);
        self.name_index
            .find(hash, |e| {
                e.hash == hash && {
                    let member = &self.members[e.id.0];
                    member.room == room && *member.username == *username
                }
            })
            .is_some()
    }

    /// The live member holding `token`; the final comparison is constant-time.
    pub(super) fn find_token(&self, token: &[u8]) -> Option<MemberId> {
        let hash = self.hasher.hash_one(token);
        self.token_index
            .find(hash, |e| {
                e.hash == hash && self.members[e.id.0].token.matches(token)
            })
            .map(|e| e.id)
    }

    /// Takes a member out of the slab, the token, name and look-alike indexes.
    pub(super) fn unlink(&mut self, id: MemberId) -> Member {
        self.unfile_member(id);
        self.members_changed();
        let member = self.members.remove(id.0);
        let hash = self.hasher.hash_one(member.token.as_str().as_bytes());
        if let Ok(entry) = self.token_index.find_entry(hash, |e| e.id == id) {
            entry.remove();
        }
        let hash = self.name_hash(member.room, &member.username);
        if let Ok(entry) = self.name_index.find_entry(hash, |e| e.id == id) {
            entry.remove();
        }
        if member.address.is_some() {
            self.registered -= 1;
        }
        if member.keepalive.is_some() {
            // Its deadline stays queued until it comes due, or the queue is built again.
            self.keepalive_members -= 1;
        }
        member
    }
}
