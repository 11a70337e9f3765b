//! Look-alike names (`[names] refuse_lookalike_usernames`, `refuse_lookalike_room_names`):
//! which member of a room, or which open room, a new name looks like
//! ([`tcrp::names::lookalike_keys`]: the same in lower case, or the same confusable skeleton).
//!
//! Each name's two keys are worked out once and kept as one word of two 32-bit hashes in its
//! member or room (0: not yet). The first check of a room's members files each of them (by
//! the room and each half of its word) in an index; every open room is filed (by each half)
//! when the daemon starts or reloads with room names checked ([`Registry::set_lookalike_checks`]),
//! before any request waits on it (at 100,000 rooms, 56-88 ms the first create after a
//! start used to hold the event loop), or else at the first check. The index is kept up to
//! date from then on: a member or room added is filed, one removed unfiled. A check then
//! reads only the names filed under the new name's two halves, whose keys are compared in
//! full, not every member of the room or every open room (one look-alike create at 100,000
//! rooms was a pass over them all, 1.2 ms of the event loop). A setting turned off drops its
//! index, and a daemon with both settings off never works out a key.

use std::cell::Cell;

use hashbrown::HashTable;
use tcrp::names::{self, LookalikeKeys};

use super::{MemberId, Registry, RoomId};

/// The indexes of look-alike keys.
#[derive(Default)]
pub(super) struct Lookalikes {
    /// The members of the rooms whose members were checked (`Room::members_filed`), filed by
    /// their room and each half of their word.
    members: HashTable<Filed>,
    /// Open rooms, filed by each half of their word, once room names were checked.
    rooms: Option<HashTable<Filed>>,
}

impl Lookalikes {
    /// Entries filed for members and for rooms (each name twice), for the tests' checks.
    #[cfg(test)]
    pub(super) fn filed(&self) -> (usize, Option<usize>) {
        (self.members.len(), self.rooms.as_ref().map(HashTable::len))
    }
}

#[cfg(test)]
impl Registry {
    /// Entries filed for members and for rooms ([`Lookalikes::filed`]), for the tests of
    /// other modules.
    pub(crate) fn lookalikes_filed(&self) -> (usize, Option<usize>) {
        self.lookalikes.filed()
    }

    /// Checks every look-alike entry against the registry, for the tests: each names a live
    /// member of a room whose members are filed (or a live room), under a hash of one half
    /// of that name's word, and each filed name is filed under both halves.
    pub(super) fn check_lookalike_index(&self) {
        let mut seen = std::collections::HashMap::new();
        for entry in &self.lookalikes.members {
            let member = self.members.get(entry.key).expect("a filed member is live");
            assert!(
                self.rooms[member.room.0].members_filed,
                "{:?}",
                member.username
            );
            let word = member.lookalike_hash.get();
            let under = Half::of(word).map(|(h, b)| self.filed_under(Some(member.room), h, b));
            assert!(under.contains(&entry.hash), "{:?}", member.username);
            *seen.entry(entry.key).or_insert(0) += 1;
        }
        for (_, room) in &self.rooms {
            if room.members_filed {
                for m in &room.members {
                    assert_eq!(seen.get(&m.0), Some(&2), "member {m:?} of {:?}", room.name);
                }
            }
        }
        let Some(rooms) = &self.lookalikes.rooms else {
            return;
        };
        let mut seen = std::collections::HashMap::new();
        for entry in rooms {
            let room = self.rooms.get(entry.key).expect("a filed room is open");
            let word = room.lookalike_hash.get();
            let under = Half::of(word).map(|(h, b)| self.filed_under(None, h, b));
            assert!(under.contains(&entry.hash), "{:?}", room.name);
            *seen.entry(entry.key).or_insert(0) += 1;
        }
        for (key, room) in &self.rooms {
            assert_eq!(seen.get(&key), Some(&2), "room {:?}", room.name);
        }
    }
}

/// A member or a room (by its slab key) and the hash it is filed under.
#[derive(Clone, Copy)]
struct Filed {
    hash: u64,
    key: usize,
}

/// Which half of a name's word.
#[derive(Clone, Copy, Hash)]
enum Half {
    Skeleton,
    LowerCase,
}

impl Half {
    /// Both halves, with their bits in `word`.
    fn of(word: u64) -> [(Half, u32); 2] {
        // Truncation is the point: half a word per key.
        [
            (Half::Skeleton, (word >> 32) as u32),
            (Half::LowerCase, word as u32),
        ]
    }
}

/// The keys filed in `table` under either half of `word`, each half hashed by `hash` (a
/// name filed under both halves comes twice).
fn filed_keys<'t>(
    table: &'t HashTable<Filed>,
    word: u64,
    hash: impl Fn(Half, u32) -> u64 + 't,
) -> impl Iterator<Item = usize> + 't {
    Half::of(word).into_iter().flat_map(move |(half, bits)| {
        let hash = hash(half, bits);
        table
            .iter_hash(hash)
            .filter(move |e| e.hash == hash)
            .map(|e| e.key)
    })
}

/// The hash an entry is filed under, for the table's growth.
fn filed_hash(entry: &Filed) -> u64 {
    entry.hash
}

impl Registry {
    /// The name of a member of `room_name` that `username` looks like, if any (the one that
    /// joined first, when several do); asked only when `[names] refuse_lookalike_usernames`
    /// is on.
    pub fn lookalike_member(&mut self, room_name: &str, username: &str) -> Option<&str> {
        let room = *self.room_index.get(room_name)?;
        if !self.rooms[room.0].members_filed {
            self.file_members_of(room);
        }
        let keys = names::lookalike_keys(username);
        let word = self.lookalike_word(&keys);
        let table = &self.lookalikes.members;
        // Join order is serial order counted from the host's, the room's first member: the
        // registry's count wraps after 2^32 members, a room's life would have to see as many.
        let first = self.members[self.rooms[room.0].host.0].serial;
        filed_keys(table, word, |half, bits| {
            self.filed_under(Some(room), half, bits)
        })
        .filter(|&key| {
            let member = &self.members[key];
            // The same name is `join_refusal`'s to refuse, with its own message.
            member.room == room
                && *member.username != *username
                && self.looks_like(&member.username, &member.lookalike_hash, &keys, word)
        })
        .min_by_key(|&key| self.members[key].serial.wrapping_sub(first))
        .map(|key| &*self.members[key].username)
    }

    /// An open room whose name `room_name` looks like, if any (the first in the registry's
    /// order, when several do): its name, and whether it is listed. Asked only when `[names]
    /// refuse_lookalike_room_names` is on.
    pub fn lookalike_room(&mut self, room_name: &str) -> Option<(&str, bool)> {
        if self.lookalikes.rooms.is_none() {
            self.file_all_rooms();
        }
        let keys = names::lookalike_keys(room_name);
        let word = self.lookalike_word(&keys);
        let table = self.lookalikes.rooms.as_ref()?;
        filed_keys(table, word, |half, bits| self.filed_under(None, half, bits))
            .filter(|&key| {
                let room = &self.rooms[key];
                *room.name != *room_name
                    && self.looks_like(&room.name, &room.lookalike_hash, &keys, word)
            })
            .min()
            .map(|key| (&*self.rooms[key].name, self.rooms[key].listed))
    }

    /// Makes the indexes fit the `[names]` settings: with room names checked, every open
    /// room is filed now (at a start, before the daemon is ready, or at the reload that turns
    /// the check on), not by the first create that asks; with a check off, its index is
    /// dropped, and no longer kept up to date. Members are filed a room at a time, by the
    /// first check of each room (bounded by `max_members_per_room`).
    pub fn set_lookalike_checks(&mut self, usernames: bool, room_names: bool) {
        if !room_names {
            self.lookalikes.rooms = None;
        } else if self.lookalikes.rooms.is_none() {
            self.file_all_rooms();
        }
        if !usernames && !self.lookalikes.members.is_empty() {
            self.lookalikes.members = HashTable::new();
            for (_, room) in &mut self.rooms {
                room.members_filed = false;
            }
        }
    }

    /// Files a member just added, if its room's members are filed.
    pub(super) fn file_member(&mut self, id: MemberId) {
        if self.rooms[self.members[id.0].room.0].members_filed {
            let member = &self.members[id.0];
            let word = self.cached_word(&member.username, &member.lookalike_hash);
            let room = member.room;
            self.file(true, Some(room), id.0, word);
        }
    }

    /// Unfiles a member about to be removed (the members of a room removed first were
    /// unfiled with it).
    pub(super) fn unfile_member(&mut self, id: MemberId) {
        let room = self.members[id.0].room;
        if self.rooms.get(room.0).is_some_and(|r| r.members_filed) {
            let member = &self.members[id.0];
            let word = self.cached_word(&member.username, &member.lookalike_hash);
            let room = member.room;
            self.unfile(true, Some(room), id.0, word);
        }
    }

    /// Files a room just opened, once rooms are filed at all.
    pub(super) fn file_room(&mut self, id: RoomId) {
        if self.lookalikes.rooms.is_some() {
            let room = &self.rooms[id.0];
            let word = self.cached_word(&room.name, &room.lookalike_hash);
            self.file(false, None, id.0, word);
        }
    }

    /// Unfiles a room about to be removed, and its members.
    pub(super) fn unfile_room(&mut self, id: RoomId) {
        if self.rooms[id.0].members_filed {
            let members = std::mem::take(&mut self.rooms[id.0].members);
            for &m in &members {
                self.unfile_member(m);
            }
            let room = &mut self.rooms[id.0];
            room.members = members;
            room.members_filed = false;
        }
        if self.lookalikes.rooms.is_some() {
            let room = &self.rooms[id.0];
            let word = self.cached_word(&room.name, &room.lookalike_hash);
            self.unfile(false, None, id.0, word);
        }
    }

    /// Files every member of `room`: the first check of its members after a start or after
    /// the setting was turned on works out the keys of all of them.
    fn file_members_of(&mut self, room: RoomId) {
        let entry = &mut self.rooms[room.0];
        entry.members_filed = true;
        let ids = std::mem::take(&mut entry.members);
        self.lookalikes.members.reserve(2 * ids.len(), filed_hash);
        for &id in &ids {
            self.file_member(id);
        }
        self.rooms[room.0].members = ids;
    }

    /// Files every open room: the first check of room names after a start or after the
    /// setting was turned on works out the keys of all of them.
    fn file_all_rooms(&mut self) {
        self.lookalikes.rooms = Some(HashTable::with_capacity(2 * self.rooms.len()));
        let ids: Vec<usize> = self.rooms.iter().map(|(key, _)| key).collect();
        for key in ids {
            self.file_room(RoomId(key));
        }
    }

    /// The hash a member of `room` (or, for `None`, a room) is filed under for one half.
    fn filed_under(&self, room: Option<RoomId>, half: Half, bits: u32) -> u64 {
        match room {
            Some(room) => self.hasher.hash_one((room.0, half, bits)),
            None => self.hasher.hash_one((half, bits)),
        }
    }

    /// The members' table if `member`, else the rooms' (`None` until room names are checked).
    fn lookalike_table(&mut self, member: bool) -> Option<&mut HashTable<Filed>> {
        if member {
            Some(&mut self.lookalikes.members)
        } else {
            self.lookalikes.rooms.as_mut()
        }
    }

    /// Files `key` (a member of `room` if `member`, else a room) under both halves of `word`.
    fn file(&mut self, member: bool, room: Option<RoomId>, key: usize, word: u64) {
        for (half, bits) in Half::of(word) {
            let hash = self.filed_under(room, half, bits);
            if let Some(table) = self.lookalike_table(member) {
                table.insert_unique(hash, Filed { hash, key }, filed_hash);
            }
        }
    }

    /// Takes `key` out from under both halves of `word` (see [`Registry::file`]).
    fn unfile(&mut self, member: bool, room: Option<RoomId>, key: usize, word: u64) {
        for (half, bits) in Half::of(word) {
            let hash = self.filed_under(room, half, bits);
            if let Some(Ok(entry)) = self
                .lookalike_table(member)
                .map(|t| t.find_entry(hash, |e| e.hash == hash && e.key == key))
            {
                entry.remove();
            }
        }
    }

    /// The word of a name's two look-alike keys: the hashes of each, 32 bits each (skeleton
    /// high, lower case low); never 0, which marks a member's or a room's as not yet worked
    /// out.
    fn lookalike_word(&self, keys: &LookalikeKeys) -> u64 {
        // Truncation is the point: half a word per key.
        let skeleton = self.hasher.hash_one(&keys.skeleton) as u32;
        let lower_case = self.hasher.hash_one(&keys.lower_case) as u32;
        (u64::from(skeleton) << 32 | u64::from(lower_case)).max(1)
    }

    /// The word of `name`, kept in `cached`, worked out the first time.
    fn cached_word(&self, name: &str, cached: &Cell<u64>) -> u64 {
        if cached.get() == 0 {
            cached.set(self.lookalike_word(&names::lookalike_keys(name)));
        }
        cached.get()
    }

    /// Whether `name` (its word kept in `cached`) looks like a name with look-alike `keys`
    /// (whose word is `word`): only when either half matches are the keys compared in full.
    fn looks_like(&self, name: &str, cached: &Cell<u64>, keys: &LookalikeKeys, word: u64) -> bool {
        #[cfg(test)]
        self.lookalike_reads.set(self.lookalike_reads.get() + 1);
        let own = self.cached_word(name, cached);
        let may_match = own >> 32 == word >> 32 || own as u32 == word as u32;
        may_match && names::lookalike_keys(name).look_alike(keys)
    }
}
