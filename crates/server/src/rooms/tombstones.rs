//! Tokens that died recently (their room closed, or the member was expired): what a late
//! datagram carrying one is told, and how often one source may be told.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::time::Instant;

use super::Limits;
use crate::rate;

/// Sources remembered as told within the reply interval, at most. Past it, a source not
/// remembered is not told: a flood of dead tokens from ever new sources (other ports, other
/// addresses of an IPv6 /64, spoofed addresses) costs a bounded table, not memory without
/// end, and the sources already told are still held to their interval.
pub(super) const MAX_REPLY_SOURCES: usize = 65_536;

/// Replies one source may get per reply interval: a few clients behind one address (a NAT)
/// whose room closed are each told, while a forger aiming replies at one address gets no
/// more than this many per interval.
pub(super) const REPLIES_PER_SOURCE: u8 = 4;

/// Why a token is no longer live, and so what a late datagram carrying it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gone {
    /// Its room closed: `__ROOM_CLOSED__`.
    RoomClosed,
    /// The member was expired for missed keepalives: a nameless timed-out notice ("you"),
    /// when the member accepts notices; nothing otherwise.
    Expired {
        /// Whether the member asked for notices.
        notices: bool,
    },
}

/// Tokens that died recently (their room closed, or the member was expired), and when each
/// source was last told.
pub(super) struct Tombstones {
    hasher: RandomState,
    by_hash: HashMap<u64, (Instant, Gone)>,
    order: VecDeque<(Instant, u64)>,
    /// For each source (an IPv4 address or an IPv6 /64, as [`rate::source`] counts them)
    /// told within the reply interval: when its interval began, and how often it was told
    /// since.
    last_reply: HashMap<IpAddr, (Instant, u8)>,
    /// The capacity the tables were last sized for ([`Tombstones::reserve_for`]).
    reserved_for: usize,
}

impl Tombstones {
    /// How many tokens are remembered.
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// No token remembered, no reply made.
    pub(super) fn new() -> Tombstones {
        Tombstones {
            hasher: RandomState::new(),
            by_hash: HashMap::new(),
            order: VecDeque::new(),
            last_reply: HashMap::new(),
            reserved_for: 0,
        }
    }

    /// Remembers `token` as gone for `gone`, making room by forgetting the oldest.
    pub(super) fn insert(&mut self, token: &[u8], gone: Gone, now: Instant, limits: &Limits) {
        if limits.tombstone_capacity == 0 {
            return;
        }
        while self.order.len() >= limits.tombstone_capacity {
            self.evict_oldest();
        }
        self.reserve_for(limits.tombstone_capacity);
        let hash = self.hasher.hash_one(token);
        self.by_hash.insert(hash, (now, gone));
        self.order.push_back((now, hash));
    }

    /// Sizes the tables once for `capacity` tokens, the index with room to spare: full, it
    /// takes one token in and lets one go for each closure, and a hash table that holds more
    /// than half its room when its free slots run out doubles (hashbrown rehashes in place
    /// only below half). That doubling came under a steady churn at some moment long after
    /// the tombstones filled, a pause of the loop to move 100,000 entries and a step of
    /// about 4 MiB in resident size (the soak saw it). Sized at twice the cap, the index
    /// only ever rehashes in place. The memory is touched as tokens come, not here.
    ///
    /// Once per capacity: the index's `capacity()` counts its free slots but not the deleted
    /// ones a churn leaves between rehashes, so it falls below the mark, and a `reserve` then
    /// makes hashbrown grow to more than its full size: the very doubling this avoids (the
    /// soak saw it at 2026-12-04, 17 MB at once).
    fn reserve_for(&mut self, capacity: usize) {
        if self.reserved_for == capacity {
            return;
        }
        self.reserved_for = capacity;
        let index = capacity.saturating_mul(2);
        if self.by_hash.capacity() < index {
            self.by_hash.reserve(index - self.by_hash.len());
        }
        if self.order.capacity() < capacity {
            self.order.reserve(capacity - self.order.len());
        }
    }

    /// Forgets the oldest tokens until at most `capacity` are left (a reload lowered
    /// `liveness.tombstone_capacity`; 0 forgets them all, and their memory).
    pub(super) fn shrink_to(&mut self, capacity: usize) {
        while self.order.len() > capacity {
            self.evict_oldest();
        }
        if capacity == 0 {
            self.by_hash = HashMap::new();
            self.order = VecDeque::new();
            self.reserved_for = 0;
        }
    }

    /// Forgets the oldest token, unless it was remembered again since (its entry is newer).
    fn evict_oldest(&mut self) {
        if let Some((at, hash)) = self.order.pop_front() {
            if self.by_hash.get(&hash).map(|(t, _)| *t) == Some(at) {
                self.by_hash.remove(&hash);
            }
        }
    }

    /// Forgets tokens older than the TTL, and replies older than the reply interval.
    pub(super) fn expire(&mut self, now: Instant, limits: &Limits) {
        while let Some(&(at, _)) = self.order.front() {
            if now.saturating_duration_since(at) < limits.tombstone_ttl {
                break;
            }
            self.evict_oldest();
        }
        self.last_reply.retain(|_, (since, _)| {
            now.saturating_duration_since(*since) < limits.closed_reply_interval
        });
        // A flood that filled the table leaves its room behind when it ends; give it back.
        if self.last_reply.capacity() > 1024
            && self.last_reply.capacity() > 4 * self.last_reply.len()
        {
            self.last_reply.shrink_to(2 * self.last_reply.len());
        }
    }

    /// Why `token` is gone, if it is remembered.
    pub(super) fn get(&self, token: &[u8]) -> Option<Gone> {
        self.by_hash
            .get(&self.hasher.hash_one(token))
            .map(|(_, gone)| *gone)
    }

    /// Whether a datagram from `src` may be told now: its source (address, or IPv6 /64) was
    /// told fewer than [`REPLIES_PER_SOURCE`] times within the reply interval, and the table
    /// has room for it. Records the reply if so.
    pub(super) fn may_reply(&mut self, src: IpAddr, now: Instant, limits: &Limits) -> bool {
        let source = rate::source(src);
        let full = self.last_reply.len() >= MAX_REPLY_SOURCES;
        match self.last_reply.get_mut(&source) {
            Some((since, told))
                if now.saturating_duration_since(*since) < limits.closed_reply_interval =>
            {
                if *told >= REPLIES_PER_SOURCE {
                    return false;
                }
                *told += 1;
                true
            }
            Some(entry) => {
                *entry = (now, 1);
                true
            }
            None if full => false,
            None => {
                self.last_reply.insert(source, (now, 1));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use super::*;

    /// A source is an address, whatever the port, or an IPv6 /64: a few replies each per
    /// interval.
    #[test]
    fn a_source_is_told_a_few_times_per_interval_whatever_its_port_or_address_in_a_64() {
        let limits = Limits::default();
        let mut tombstones = Tombstones::new();
        let now = Instant::now();
        // The callers pass only the address: every port of 10.0.0.1 is the same source.
        let v4 = IpAddr::from(Ipv4Addr::new(10, 0, 0, 1));
        let told = (0..1_000)
            .filter(|_| tombstones.may_reply(v4, now, &limits))
            .count();
        assert_eq!(told, usize::from(REPLIES_PER_SOURCE));
        let told = (0..1_000u16)
            .map(|i| IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, i, 1)))
            .filter(|&ip| tombstones.may_reply(ip, now, &limits))
            .count();
        assert_eq!(told, usize::from(REPLIES_PER_SOURCE), "one /64");
        assert_eq!(tombstones.last_reply.len(), 2);
        let later = now + limits.closed_reply_interval;
        assert!(
            tombstones.may_reply(v4, later, &limits),
            "told again after the interval"
        );
    }

    /// A flood from ever new sources fills the table to its cap and no further; once the
    /// interval is over, the sweep empties it and gives its room back.
    #[test]
    fn the_sources_told_are_capped_and_their_room_given_back() {
        let limits = Limits::default();
        let mut tombstones = Tombstones::new();
        let now = Instant::now();
        let sources = MAX_REPLY_SOURCES as u32 + 10_000;
        let told = (0..sources)
            .map(|i| IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i)))
            .filter(|&ip| tombstones.may_reply(ip, now, &limits))
            .count();
        assert_eq!(told, MAX_REPLY_SOURCES);
        assert_eq!(tombstones.last_reply.len(), MAX_REPLY_SOURCES);
        // A source in the table still has its allowance, and is held to it.
        let first = IpAddr::from(Ipv4Addr::from(0x0a00_0000));
        let again = (0..10)
            .filter(|_| tombstones.may_reply(first, now, &limits))
            .count();
        assert_eq!(again, usize::from(REPLIES_PER_SOURCE) - 1);

        tombstones.expire(now + limits.closed_reply_interval, &limits);
        assert!(tombstones.last_reply.is_empty());
        assert!(
            tombstones.last_reply.capacity() <= 1024,
            "{}",
            tombstones.last_reply.capacity()
        );
        let next = now + limits.closed_reply_interval + Duration::from_millis(1);
        assert!(tombstones.may_reply(first, next, &limits));
    }

    /// Tombstones capped at 1,000 holding one token, and the room its index was given then.
    fn sized_for_a_thousand() -> (Tombstones, Limits, Instant, usize) {
        let limits = Limits {
            tombstone_capacity: 1_000,
            ..Limits::default()
        };
        let mut tombstones = Tombstones::new();
        let now = Instant::now();
        tombstones.insert(b"first", Gone::RoomClosed, now, &limits);
        let room = tombstones.by_hash.capacity();
        assert!(room >= 2 * limits.tombstone_capacity, "{room}");
        (tombstones, limits, now, room)
    }

    /// Full and churning, the index keeps the newest tokens and no more, in the room it was
    /// given at the first token. (At this load deleted slots pile up too slowly to matter
    /// here: the next test makes them.)
    #[test]
    fn a_full_churning_index_keeps_the_room_it_was_given_first() {
        let (mut tombstones, limits, now, room) = sized_for_a_thousand();
        for i in 0..50_000u32 {
            tombstones.insert(&i.to_be_bytes(), Gone::RoomClosed, now, &limits);
        }
        assert_eq!(tombstones.len(), limits.tombstone_capacity);
        assert!(tombstones.by_hash.capacity() <= room);
        assert_eq!(
            tombstones.get(&49_999u32.to_be_bytes()),
            Some(Gone::RoomClosed)
        );
        assert_eq!(tombstones.get(b"first"), None);
    }

    /// The index's deleted slots do not make it grow: filled to its last free slot and
    /// emptied again, it is left with deleted marks where its free room was (a long churn
    /// leaves them the same way, more slowly), and the next token is taken by a rehash in
    /// place, not by a table of twice the size.
    #[test]
    fn deleted_slots_in_the_index_do_not_make_it_double() {
        let (mut tombstones, limits, now, room) = sized_for_a_thousand();
        let fillers: Vec<u64> = (0..)
            .map(|i| u64::MAX - i)
            .take(room - tombstones.by_hash.len())
            .collect();
        for &key in &fillers {
            tombstones.by_hash.insert(key, (now, Gone::RoomClosed));
        }
        for key in &fillers {
            tombstones.by_hash.remove(key);
        }
        assert!(
            tombstones.by_hash.capacity() < 2 * limits.tombstone_capacity,
            "the free room left is no lower than the mark: {}",
            tombstones.by_hash.capacity()
        );
        tombstones.insert(b"second", Gone::RoomClosed, now, &limits);
        assert!(
            tombstones.by_hash.capacity() <= room,
            "{} > {room}",
            tombstones.by_hash.capacity()
        );
        assert_eq!(tombstones.get(b"second"), Some(Gone::RoomClosed));
    }

    /// A sweep within the reply interval keeps each source's count: a source told its few
    /// replies is not told again until the interval has passed, however often the sweep runs.
    #[test]
    fn a_sweep_within_the_interval_keeps_each_sources_count() {
        let limits = Limits::default();
        let mut tombstones = Tombstones::new();
        let now = Instant::now();
        let v4 = IpAddr::from(Ipv4Addr::new(10, 0, 0, 1));
        for _ in 0..REPLIES_PER_SOURCE {
            assert!(tombstones.may_reply(v4, now, &limits));
        }
        let within = now + limits.closed_reply_interval / 2;
        tombstones.expire(within, &limits);
        assert!(!tombstones.may_reply(v4, within, &limits));
        tombstones.expire(now + limits.closed_reply_interval, &limits);
        assert!(tombstones.last_reply.is_empty());
    }

    /// Only a table of sources grown past 1,024 gives its room back: a small one keeps it, so
    /// that the sweep does not free it and the next replies grow it again at every interval.
    #[test]
    fn a_small_table_of_sources_keeps_its_room() {
        let limits = Limits::default();
        let mut tombstones = Tombstones::new();
        let now = Instant::now();
        for i in 0..100u32 {
            assert!(tombstones.may_reply(
                IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i)),
                now,
                &limits
            ));
        }
        tombstones.expire(now + limits.closed_reply_interval, &limits);
        assert!(tombstones.last_reply.is_empty());
        // (`capacity` counts free slots, not those its departed entries left deleted.)
        assert_ne!(tombstones.last_reply.capacity(), 0, "its room kept");
    }

    /// Both tables are sized at the first token, the order for the cap and the index for twice
    /// it; a cap raised later (a reload) sizes them as a fresh start at that cap would, not for
    /// the tokens already there on top.
    #[test]
    fn a_raised_capacity_sizes_the_tables_as_a_fresh_start_would() {
        let (mut tombstones, limits, now, _) = sized_for_a_thousand();
        assert!(tombstones.order.capacity() >= limits.tombstone_capacity);
        for i in 1..1_000u32 {
            tombstones.insert(&i.to_be_bytes(), Gone::RoomClosed, now, &limits);
        }
        assert_eq!(tombstones.len(), 1_000);
        let raised = Limits {
            tombstone_capacity: 3_500,
            ..limits
        };
        tombstones.insert(b"more", Gone::RoomClosed, now, &raised);
        let mut fresh = Tombstones::new();
        fresh.insert(b"more", Gone::RoomClosed, now, &raised);
        assert_eq!(tombstones.by_hash.capacity(), fresh.by_hash.capacity());
        assert_eq!(tombstones.order.capacity(), fresh.order.capacity());
        assert_eq!(tombstones.len(), 1_001);
    }

    // Mutation testing, part B
    /// The source of each flood test: 10.0.0.0 plus `i`.
    fn flooder(i: usize) -> IpAddr {
        IpAddr::from(Ipv4Addr::from(0x0a00_0000 + u32::try_from(i).unwrap()))
    }

    /// A table of sources with room for four times the sources in it keeps that room at a
    /// sweep: only more than four times is given back.
    #[test]
    fn a_table_of_sources_with_room_for_four_times_its_sources_keeps_its_room() {
        let limits = Limits::default();
        let mut tombstones = Tombstones::new();
        let now = Instant::now();
        // The room a flood leaves behind, without the deleted slots its departures leave,
        // which `capacity` does not count.
        tombstones.last_reply.reserve(4_096);
        let room = tombstones.last_reply.capacity();
        assert!(room > 1_024 && room.is_multiple_of(4), "{room}");
        for i in 0..room / 4 {
            assert!(tombstones.may_reply(flooder(i), now, &limits));
        }
        tombstones.expire(now, &limits);
        assert_eq!(tombstones.last_reply.len() * 4, room);
        assert_eq!(tombstones.last_reply.capacity(), room);
    }

    /// A flood's room is given back down to room for twice the sources still within their
    /// interval, not less: the next interval's replies do not have to grow it again at once.
    #[test]
    fn a_flood_gives_back_its_room_down_to_twice_the_sources_left() {
        let limits = Limits::default();
        let mut tombstones = Tombstones::new();
        let now = Instant::now();
        for i in 0..20_000 {
            assert!(tombstones.may_reply(flooder(i), now, &limits));
        }
        let later = now + limits.closed_reply_interval / 2;
        for i in 20_000..21_000 {
            assert!(tombstones.may_reply(flooder(i), later, &limits));
        }
        tombstones.expire(now + limits.closed_reply_interval, &limits);
        assert_eq!(tombstones.last_reply.len(), 1_000);
        let room = tombstones.last_reply.capacity();
        assert!((2_000..20_000).contains(&room), "{room}");
    }
}
