//! A room and a member as the registry keeps them. The registry's other modules read and
//! change their fields directly; what a room's kept history does is in [`super::history`].

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tcrp::payload::{self, Caps};

use super::{MemberId, RoomId};
use crate::local::LocalId;
use crate::rate::TokenBucket;
use crate::record::HistoryEntry;
use crate::token::Token;

/// A room: its name, its host, its members in join order and its kept history.
pub(super) struct Room {
    pub(super) name: Box<str>,
    pub(super) host: MemberId,
    pub(super) members: Vec<MemberId>,
    /// The members that asked for notices (`Caps::NOTICES`), in join order: a join or leave
    /// is told to them alone, so it reads these, not every member (one taker among 100,000
    /// members made each join and leave of the room a walk over them all).
    pub(super) notice_takers: Vec<MemberId>,
    pub(super) created_at: f64,
    pub(super) listed: bool,
    pub(super) password_hash: Option<Box<str>>,
    pub(super) next_seq: u64,
    pub(super) history: VecDeque<HistoryEntry>,
    /// The sum of [`history_size`](super::history::history_size) over `history`.
    pub(super) history_bytes: usize,
    /// How many of the newest kept messages are not in the journal yet.
    pub(super) history_unsaved: usize,
    /// The kept history shrank without a new message (lower limits, at a reload or a start),
    /// so the journal's copy is to be trimmed at the next checkpoint.
    pub(super) history_shrunk: bool,
    /// The `next_seq` the journal has: numbers continue across restarts whether or not
    /// history is kept.
    pub(super) seq_saved: u64,
    /// The registry's hashes of the name's [`tcrp::names::lookalike_keys`], worked out the
    /// first time a look-alike check needs them (0: not yet).
    pub(super) lookalike_hash: Cell<u64>,
    /// Whether the members are filed in the registry's look-alike index (from the first
    /// look-alike check of a username in the room on).
    pub(super) members_filed: bool,
}

impl Room {
    /// An empty room; its host is set once the host member exists.
    pub(super) fn new(
        name: &str,
        created_at: f64,
        listed: bool,
        password_hash: Option<Box<str>>,
    ) -> Room {
        Room {
            name: name.into(),
            host: MemberId::NO_HOST,
            members: Vec::new(),
            created_at,
            listed,
            password_hash,
            next_seq: 1,
            history: VecDeque::new(),
            history_bytes: 0,
            history_unsaved: 0,
            history_shrunk: false,
            seq_saved: 1,
            notice_takers: Vec::new(),
            lookalike_hash: Cell::new(0),
            members_filed: false,
        }
    }
}

/// A member: its token and name, its room, its address once registered, and what it asked
/// for at join.
pub(super) struct Member {
    pub(super) token: Token,
    pub(super) username: Box<str>,
    pub(super) room: RoomId,
    pub(super) is_host: bool,
    pub(super) address: Option<SocketAddr>,
    /// Which of our addresses its last accepted `__REGISTER__` or chat came to: what it is
    /// sent from (on a socket bound to a wildcard address; saved with its address).
    pub(super) local: LocalId,
    /// `local` moved since it was last journaled ([`super::Registry::save_sources`]).
    pub(super) local_unsaved: bool,
    /// The member has an entry in the registry's queue of sources to save: a member that
    /// keeps moving is queued once, not once per move.
    pub(super) source_queued: bool,
    pub(super) keepalive: Option<Duration>,
    pub(super) last_seen: Instant,
    /// Told apart from an earlier member of the same slot (set by `insert_member` from one
    /// registry-wide count, which wraps after 2³² members: only if exactly that many joined
    /// between a departed member's entry and its turn could the entry be taken for the slot's
    /// new member, which would then be looked at early and hold a second entry until the
    /// queue is next built again).
    pub(super) serial: u32,
    pub(super) caps: Caps,
    /// The largest datagram the member accepts (`max_datagram` at join), if it said.
    pub(super) max_datagram: Option<u16>,
    /// The IP address the join came from over TCP (canonical: an IPv4-mapped IPv6 address is
    /// kept as IPv4); `None` for a member loaded from a file that did not record it.
    pub(super) joined_from: Option<IpAddr>,
    pub(super) chat: TokenBucket,
    /// The registry's hashes of the username's [`tcrp::names::lookalike_keys`], worked out the
    /// first time a look-alike check needs them (0: not yet).
    pub(super) lookalike_hash: Cell<u64>,
}

impl Member {
    /// The cap on batch frames for this member, in bytes; 0 when it takes no batches.
    pub(super) fn batch_limit(&self) -> u16 {
        if self.caps.contains(Caps::BATCH) {
            self.max_datagram.unwrap_or(payload::DEFAULT_MAX_DATAGRAM)
        } else {
            0
        }
    }
}
