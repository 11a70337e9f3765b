//! The room registry: rooms, members and tokens, and every decision about them.
//!
//! Pure logic, no I/O: the event loop hands it requests and datagrams with the current time,
//! and it answers with replies, sends queued in an [`Outbox`](crate::outbox::Outbox), and
//! journal [`Record`]s to persist. Its tests run without a socket.
//!
//! Room lifecycle (see also `docs/PROTOCOL.md`):
//! 1. **Created** by a TCRP create: the room exists with its host as only member; the host's
//!    token is issued once its record is durable.
//! 2. **Joined** by TCRP joins: each member gets its own token; names are unique per room.
//! 3. **Registered**: a member's `__REGISTER__` binds its UDP source address to its token (a
//!    later one from another address rebinds). Only registered members receive relays.
//! 4. **Relaying**: chat from a member's registered address goes to every other registered
//!    member, never back to the sender.
//! 5. **Leaving**: a member's `__LEAVE__` (or, for members that promised keepalives, silence
//!    past the timeout) removes it. When the member is the host, the room **closes**: every
//!    other registered member gets `__ROOM_CLOSED__`, the room and all its tokens are deleted,
//!    and the tokens are remembered for a while as tombstones so that a late datagram with one
//!    learns the room is gone. With `liveness.room_idle_secs` set, a room none of whose
//!    members was heard from for that long closes the same way, its host told too.
//!
//! The registry's work is split by job:
//! - `room`: a room and a member as the registry keeps them;
//! - `index`: the token and name indexes, and the hasher they share;
//! - `admission`: creates and joins, and the refusals that come before them;
//! - `lookalike`: the look-alike names a create or join may be refused for, and their index;
//! - `datagrams`: what one UCRP datagram does;
//! - `relay`: chat and notices queued for the other members;
//! - `departure`: leaves, room closures (a host gone, a room idle) and keepalive expiry;
//! - `expiry`: the queue of keepalive deadlines a sweep looks at;
//! - `tombstones`: tokens that died recently, and what a late datagram with one is told;
//! - `history`: kept messages, their pages and their checkpoints;
//! - `restore`: the registry rebuilt from a loaded state file.

mod admission;
mod datagrams;
mod departure;
mod expiry;
mod history;
mod index;
mod lookalike;
mod relay;
mod restore;
mod room;
mod tombstones;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use rand::CryptoRng;
use slab::Slab;

use crate::local::{LocalAddr, LocalId, Locals};
use crate::record::Record;
use crate::token::Token;
use expiry::Deadlines;
use index::IndexHasher;
use room::{Member, Room};
use tombstones::Tombstones;

/// Index of a room in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoomId(usize);

/// Index of a member in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemberId(usize);

impl MemberId {
    /// A room's host while the room is being built, before its host member exists: admission
    /// sets the host at once, and a restore leaves out a room still without one, so no room
    /// in the registry has it.
    pub(super) const NO_HOST: MemberId = MemberId(usize::MAX);

    /// The slab index as a compact number for the send plan (members never number 2^32).
    fn slot(self) -> u32 {
        u32::try_from(self.0).unwrap_or(u32::MAX)
    }
}

/// Caps and timings the registry enforces. `0` turns a cap off.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Rooms in all.
    pub max_rooms: usize,
    /// Members in one room, host included.
    pub max_members_per_room: usize,
    /// Tokens (members) in all.
    pub max_tokens: usize,
    /// Missed keepalive intervals after which a silent member is expired.
    pub keepalive_misses: u32,
    /// Shortest keepalive interval a client may announce; shorter ones are raised to it.
    pub min_keepalive: Duration,
    /// How long tokens of closed rooms are remembered.
    pub tombstone_ttl: Duration,
    /// How many closed-room tokens are remembered at most.
    pub tombstone_capacity: usize,
    /// Least time between two replies to remembered tokens (`__ROOM_CLOSED__` or the
    /// timed-out notice) to one source address.
    pub closed_reply_interval: Duration,
    /// Chat datagrams per second per member (0: unlimited).
    pub chat_rate: f64,
    /// Chat burst per member.
    pub chat_burst: f64,
    /// Messages kept per room for the History operation (0: none).
    pub history: usize,
    /// Bytes of text and sender names kept per room for History; the oldest go first.
    pub history_bytes: usize,
    /// Accept a token's `__REGISTER__` only from the IP address its join came from over TCP
    /// (the amplifier guard, `[udp] register_only_from_join_ip`).
    pub register_only_from_join_ip: bool,
    /// Close a room once none of its members has been heard from or joined for this long
    /// (`[liveness] room_idle_secs`; `None`: never).
    pub room_idle: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_rooms: 10_000,
            max_members_per_room: 1_024,
            max_tokens: 200_000,
            keepalive_misses: 3,
            min_keepalive: Duration::from_secs(1),
            tombstone_ttl: Duration::from_secs(3600),
            tombstone_capacity: 100_000,
            closed_reply_interval: Duration::from_secs(1),
            chat_rate: 50.0,
            chat_burst: 100.0,
            history: 100,
            history_bytes: 64 * 1024,
            register_only_from_join_ip: false,
            room_idle: None,
        }
    }
}

/// Why a datagram was dropped. Each has a stable label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The bytes did not decode (the label is the codec's reason).
    Malformed(&'static str),
    /// No live member has this token.
    UnknownToken,
    /// The token belongs to another room than the datagram names.
    WrongRoom,
    /// Chat or leave from a token that has not registered an address yet.
    Unregistered,
    /// Chat or leave from an address other than the token's registered one.
    AddressMismatch,
    /// The member is over its chat rate.
    RateLimited,
    /// Relayed, the chat would not fit one datagram an original client reads whole: a size
    /// byte, the sender's name and the text come to more than 4096 bytes.
    TooLargeToRelay,
    /// `__REGISTER__` from an IP address other than the one the token joined from, with
    /// `register_only_from_join_ip` on.
    NotJoinIp,
    /// Chat that waited in the socket's receive queue longer than `udp.max_chat_wait_ms`
    /// ([`Registry::handle_late_datagram`]): relayed that late it would only add to the
    /// backlog that delayed it.
    Stale,
    /// A datagram from the daemon's own UDP address (see [`Registry::set_own_address`]).
    OwnAddress,
}

impl DropReason {
    /// Every reason that is not a codec error: the metrics show each from the start, at 0.
    pub const REGISTRY: [DropReason; 9] = [
        DropReason::UnknownToken,
        DropReason::WrongRoom,
        DropReason::Unregistered,
        DropReason::AddressMismatch,
        DropReason::RateLimited,
        DropReason::TooLargeToRelay,
        DropReason::NotJoinIp,
        DropReason::Stale,
        DropReason::OwnAddress,
    ];

    /// Stable label for counters and logs.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed(reason) => reason,
            DropReason::UnknownToken => "unknown_token",
            DropReason::WrongRoom => "wrong_room",
            DropReason::Unregistered => "unregistered",
            DropReason::AddressMismatch => "address_mismatch",
            DropReason::RateLimited => "rate_limited",
            DropReason::TooLargeToRelay => "too_large_to_relay",
            DropReason::NotJoinIp => "not_join_ip",
            DropReason::Stale => "stale",
            DropReason::OwnAddress => "own_address",
        }
    }
}

/// What the registry did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// A `__REGISTER__`; `changed` when the address is new for the token.
    Registered {
        /// Whether the token's address changed (and a record was written).
        changed: bool,
    },
    /// Chat relayed to this many members.
    Relayed {
        /// Datagrams queued.
        deliveries: usize,
    },
    /// A member left.
    Left,
    /// The host left and the room closed; this many members were told.
    Closed {
        /// `__ROOM_CLOSED__` datagrams queued.
        notified: usize,
    },
    /// A token of a closed room: `__ROOM_CLOSED__` was queued back to the sender.
    ClosedReply,
    /// Dropped, for this reason.
    Dropped(DropReason),
}

/// A successful create or join: the token to send once its record is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The new member's token.
    pub token: Token,
}

/// A room as listed to clients.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomInfo {
    /// Room name.
    pub name: String,
    /// Members, host included.
    pub members: usize,
    /// Unix time of creation, seconds.
    pub created_at: f64,
    /// Whether joining needs a password.
    pub has_password: bool,
}

/// Who is in a room, read in place: a reply takes only the members it has room for, so a
/// request costs no copy of a large room's member list.
#[derive(Clone, Copy)]
pub struct Presence<'a> {
    registry: &'a Registry,
    room: &'a Room,
}

impl<'a> Presence<'a> {
    /// The host's username.
    pub fn host(&self) -> &'a str {
        &self.registry.members[self.room.host.0].username
    }

    /// Every member's username (host first) and whether it has registered an address.
    pub fn members(&self) -> impl Iterator<Item = (&'a str, bool)> + 'a {
        let members = &self.registry.members;
        self.room.members.iter().map(move |m| {
            let member = &members[m.0];
            (&*member.username, member.address.is_some())
        })
    }
}

/// Counts for status lines and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live rooms.
    pub rooms: usize,
    /// Live members (tokens).
    pub members: usize,
    /// Members with a registered address.
    pub registered: usize,
    /// Tokens of closed rooms remembered.
    pub tombstones: usize,
    /// Our addresses that members are sent from (a wildcard-bound UDP socket only).
    pub local_addresses: usize,
    /// Times such an address was retired, the kernel no longer taking it as a source.
    pub sources_retired: u64,
}

/// All rooms and members.
pub struct Registry {
    limits: Limits,
    rng: Box<dyn CryptoRng + Send>,
    rooms: Slab<Room>,
    room_index: HashMap<Box<str>, RoomId>,
    /// The listed rooms in name order, so that a room list reads only the rooms it shows.
    listed: BTreeMap<Box<str>, RoomId>,
    /// Rooms read by [`Registry::list_rooms`] so far, so that a test can see what a list
    /// costs.
    #[cfg(test)]
    listing_reads: std::cell::Cell<usize>,
    /// Members read by [`Registry::notify`] so far, for the same reason.
    #[cfg(test)]
    notice_reads: std::cell::Cell<usize>,
    /// Names whose look-alike keys were compared so far, for the same reason.
    #[cfg(test)]
    lookalike_reads: std::cell::Cell<usize>,
    /// Entries of member lists read to take departing members out, for the same reason.
    #[cfg(test)]
    departure_reads: std::cell::Cell<usize>,
    /// Members and rooms by their look-alike keys, once a check asked for them.
    lookalikes: lookalike::Lookalikes,
    members: Slab<Member>,
    token_index: HashTable<index::Indexed>,
    /// Members by room and username, so that a join's name check does not read the room's
    /// whole member list.
    name_index: HashTable<index::Indexed>,
    hasher: IndexHasher,
    tombstones: Tombstones,
    registered: usize,
    records: Vec<Record>,
    /// Changes recorded so far that can alter a room list ([`Record::alters_room_list`]).
    list_changes: u64,
    /// The last rendered room list and the `list_changes` count it was made at
    /// ([`Registry::room_list`]).
    room_list: Option<(u64, Vec<u8>)>,
    scratch: Vec<MemberId>,
    wall_clock: Option<(Instant, f64)>,
    /// The room key a budgeted history checkpoint stopped at; the next one starts there.
    checkpoint_cursor: usize,
    /// Our addresses that datagrams with a live token came to, numbered: each member is sent
    /// from the one it last registered or chatted with (a socket bound to a wildcard address).
    locals: Locals,
    /// Members whose source (`local`) moved since it was last journaled, in the order they
    /// moved, each once, with its serial (a departed member's entry names a slot that may
    /// hold another member since).
    sources_unsaved: VecDeque<(MemberId, u32)>,
    /// When each member with keepalives is next to be looked at.
    deadlines: Deadlines,
    /// The serial of the next member inserted (see [`Deadlines`]).
    next_serial: u32,
    /// Bumped whenever a member joins, leaves, registers or moves to another of our
    /// addresses: a relay's audience in the outbox is its room's while this is unchanged
    /// ([`Outbox::audience`](crate::outbox::Outbox::audience)).
    members_changes: u64,
    /// Members with keepalives.
    keepalive_members: usize,
    /// When the rooms are next looked at for idleness (see [`Registry::close_idle_rooms`]).
    next_idle_check: Option<Instant>,
    /// The address the daemon's UDP socket is bound to (see [`Registry::set_own_address`]).
    own_udp: Option<SocketAddr>,
}

impl Registry {
    /// An empty registry drawing tokens from `rng`, a cryptographic generator (the type says so:
    /// a token is a bearer secret).
    pub fn new(limits: Limits, rng: Box<dyn CryptoRng + Send>) -> Registry {
        Registry {
            limits,
            rng,
            rooms: Slab::new(),
            room_index: HashMap::new(),
            listed: BTreeMap::new(),
            #[cfg(test)]
            listing_reads: std::cell::Cell::new(0),
            #[cfg(test)]
            notice_reads: std::cell::Cell::new(0),
            #[cfg(test)]
            lookalike_reads: std::cell::Cell::new(0),
            #[cfg(test)]
            departure_reads: std::cell::Cell::new(0),
            lookalikes: lookalike::Lookalikes::default(),
            members: Slab::new(),
            token_index: HashTable::new(),
            name_index: HashTable::new(),
            hasher: IndexHasher::default(),
            tombstones: Tombstones::new(),
            registered: 0,
            records: Vec::new(),
            list_changes: 0,
            room_list: None,
            scratch: Vec::new(),
            wall_clock: None,
            checkpoint_cursor: 0,
            locals: Locals::default(),
            sources_unsaved: VecDeque::new(),
            deadlines: Deadlines::default(),
            next_serial: 0,
            members_changes: 0,
            keepalive_members: 0,
            next_idle_check: None,
            own_udp: None,
        }
    }

    /// Tells the registry the address its datagrams arrive at. Datagrams from it are
    /// dropped (`own_address`): they can only be forged (the daemon sends none to itself on
    /// purpose), and a member registered at it would have the daemon read its own relays as
    /// clients' datagrams: a relayed frame `[size][name][text]` parses as a datagram whose
    /// room, token and message are set by whoever chose the name and text, so a forged
    /// `__REGISTER__` would let one chat message act with other tokens, and loop.
    pub fn set_own_address(&mut self, udp: SocketAddr) {
        self.own_udp = Some(udp);
    }

    /// Whether `src`, which sent a datagram to our address `arrival`, is our own UDP socket:
    /// our port, from our bound address or, bound to a wildcard, from an address of ours that
    /// datagrams arrive at (loopback, the one this came to, or one numbered before).
    fn sent_by_us(&self, src: SocketAddr, arrival: Option<LocalAddr>) -> bool {
        let Some(own) = self.own_udp else {
            return false;
        };
        if src.port() != own.port() {
            return false;
        }
        let ip = src.ip().to_canonical();
        // `[::ffff:0.0.0.0]` is the IPv4 wildcard to the kernel.
        if !own.ip().to_canonical().is_unspecified() {
            return ip == own.ip().to_canonical();
        }
        // A link-local address is ours only on its own link: a peer on another link may
        // use the same one.
        let link = match src {
            SocketAddr::V6(v6) if v6.ip().is_unicast_link_local() => Some(v6.scope_id()),
            _ => None,
        };
        let ours = |a: LocalAddr| a.ip.to_canonical() == ip && link.is_none_or(|l| a.ifindex == l);
        ip.is_loopback() || arrival.is_some_and(ours) || self.locals.any(ours)
    }

    /// The numbered local addresses the outbox's sends name as sources, for the sender: it
    /// reads them, and retires those the kernel refuses.
    pub fn locals_mut(&mut self) -> &mut Locals {
        &mut self.locals
    }

    /// Forgets the addresses of ours that members were saved with: the UDP socket is now bound
    /// to one address (or cannot say where datagrams arrive), and a source set per datagram
    /// would override the bound one.
    pub fn forget_arrival_addresses(&mut self) {
        if self.locals.is_empty() {
            return;
        }
        for (_, member) in &mut self.members {
            member.local = LocalId::ANY;
        }
        self.members_changed();
        self.locals = Locals::default();
    }

    /// Tells the registry which wall-clock time (Unix seconds) `now` is, so history entries
    /// carry times without the registry reading a clock.
    pub fn set_wall_clock(&mut self, now: Instant, unix_now: f64) {
        self.wall_clock = Some((now, unix_now));
    }

    /// The wall-clock time of `now` in Unix seconds; 0 until [`Registry::set_wall_clock`].
    fn unix_time(&self, now: Instant) -> f64 {
        match self.wall_clock {
            Some((base, unix)) => unix + now.saturating_duration_since(base).as_secs_f64(),
            None => 0.0,
        }
    }

    /// Applies new limits (a configuration reload). Existing members keep their state; kept
    /// histories over the new history limits are trimmed now, and the trim is journaled at
    /// the next checkpoint; tombstones over a lowered capacity are forgotten now, oldest
    /// first.
    pub fn set_limits(&mut self, limits: Limits) {
        for (_, room) in &mut self.rooms {
            room.shrink_history_to(limits.history, limits.history_bytes);
        }
        let misses_changed = limits.keepalive_misses != self.limits.keepalive_misses;
        if limits.room_idle != self.limits.room_idle {
            // Looked at under the new limit at the next sweep.
            self.next_idle_check = None;
        }
        if limits.tombstone_capacity < self.limits.tombstone_capacity {
            self.tombstones.shrink_to(limits.tombstone_capacity);
        }
        self.limits = limits;
        if misses_changed {
            self.requeue_deadlines();
        }
    }

    /// The addresses members registered from (as loaded, for the start's checks).
    pub fn registered_addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.members.iter().filter_map(|(_, m)| m.address)
    }

    /// Room, member and registration counts.
    pub fn stats(&self) -> Stats {
        Stats {
            rooms: self.rooms.len(),
            members: self.members.len(),
            registered: self.registered,
            tombstones: self.tombstones.len(),
            local_addresses: self.locals.live(),
            sources_retired: self.locals.retired(),
        }
    }

    /// The first `limit` listed rooms by name. Only those are read: a reply holds a few
    /// hundred at most, and a request must not cost a pass over every room.
    pub fn list_rooms(&self, limit: usize) -> Vec<RoomInfo> {
        self.listed
            .values()
            .take(limit)
            .map(|id| {
                #[cfg(test)]
                self.listing_reads.set(self.listing_reads.get() + 1);
                let r = &self.rooms[id.0];
                RoomInfo {
                    name: r.name.to_string(),
                    members: r.members.len(),
                    created_at: r.created_at,
                    has_password: r.password_hash.is_some(),
                }
            })
            .collect()
    }

    /// Files a new room under its name, and among the listed rooms if it is listed.
    fn index_room(&mut self, id: RoomId) {
        let room = &self.rooms[id.0];
        self.room_index.insert(room.name.clone(), id);
        if room.listed {
            self.listed.insert(room.name.clone(), id);
        }
        self.file_room(id);
    }

    /// Takes a room out of the registry and its indexes.
    fn remove_room(&mut self, id: RoomId) -> Room {
        self.unfile_room(id);
        let room = self.rooms.remove(id.0);
        self.room_index.remove(&room.name);
        self.listed.remove(&room.name);
        room
    }

    /// Who is in `room_name`, host first.
    pub fn presence(&self, room_name: &str) -> Option<Presence<'_>> {
        let room = &self.rooms[self.room_index.get(room_name)?.0];
        Some(Presence {
            registry: self,
            room,
        })
    }

    /// The member of `room_name` that `token` belongs to: its name, and whether it has a UDP
    /// address (constant-time token match).
    pub fn member_of(&self, room_name: &str, token: &[u8]) -> Option<(String, bool)> {
        let room = self.room_index.get(room_name)?;
        let member = &self.members[self.find_token(token)?.0];
        (member.room == *room).then(|| (member.username.to_string(), member.address.is_some()))
    }

    /// Whether `token` belongs to a member of `room_name` (constant-time token match).
    pub fn is_member(&self, room_name: &str, token: &[u8]) -> bool {
        match (self.room_index.get(room_name), self.find_token(token)) {
            (Some(room), Some(member)) => self.members[member.0].room == *room,
            _ => false,
        }
    }

    /// Whether a room of that name is open.
    pub fn room_exists(&self, room_name: &str) -> bool {
        self.room_index.contains_key(room_name)
    }

    /// The password hash of a room, for the caller to verify before [`Registry::join_room`].
    pub fn password_hash(&self, room_name: &str) -> Option<&str> {
        let room = self.room_index.get(room_name)?;
        self.rooms[room.0].password_hash.as_deref()
    }

    /// Takes the records of every change since the last call, for the journal.
    pub fn take_records(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.records)
    }

    /// Records `change` for the journal, and counts it if a room list could show it.
    fn record(&mut self, change: Record) {
        if change.alters_room_list() {
            self.list_changes += 1;
        }
        self.records.push(change);
    }

    /// The room list rendered by `render`, made again only when a change that a list can
    /// show (a create, join, leave or close: [`Record::alters_room_list`]) was recorded since
    /// the last one. Rendering reads and encodes the few hundred rooms a reply shows; a flood
    /// of ListRooms from a few sources costs a copy each instead, and members moving their
    /// addresses or history checkpoints do not make the list again.
    pub fn room_list(&mut self, render: impl FnOnce(&Registry) -> Vec<u8>) -> Vec<u8> {
        let changes = self.list_changes;
        if let Some((made_at, list)) = &self.room_list {
            if *made_at == changes {
                return list.clone();
            }
        }
        let list = render(self);
        self.room_list = Some((changes, list.clone()));
        list
    }

    /// Whether changes are waiting to be persisted.
    pub fn has_records(&self) -> bool {
        !self.records.is_empty()
    }
}

#[cfg(test)]
mod tests;
