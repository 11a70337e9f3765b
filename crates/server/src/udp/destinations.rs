//! The plan's record of the entry last planned to each destination in one pass, which is the
//! only entry to it that may take more datagrams ([`super::plan::Planned::sealed`]), and its
//! check that the members of a block's audiences are at distinct addresses and slots. The
//! record is looked up once per plan entry, which for members without batches is once per
//! datagram, so it hashes an address with a keyed multiply-and-mix of its few words (a few
//! ns) rather than SipHash (~28 ns a datagram here: a planned pass of 63 sends took 2.7 µs
//! against 0.9 µs without the record).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::mem;
use std::net::SocketAddr;

/// Destinations a pass may have without the table being shrunk after it.
const KEPT: usize = 4096;

/// The entry last planned to each destination in the pass under way.
#[derive(Default)]
pub(super) struct LastPlanned {
    entries: HashMap<SocketAddr, u32, Keyed>,
}

impl LastPlanned {
    /// Forgets the pass before (see [`start_over`]).
    pub(super) fn start_pass(&mut self) {
        start_over(&mut self.entries);
    }

    /// Records entry `index` as the last planned to `to`; returns the one planned to it
    /// before, if any.
    pub(super) fn replace(&mut self, to: SocketAddr, index: u32) -> Option<u32> {
        self.entries.insert(to, index)
    }
}

/// Tells whether the addresses, or the member slots, of a block's audiences are all distinct.
#[derive(Default)]
pub(super) struct Distinct {
    seen: HashMap<SocketAddr, (), Keyed>,
    /// For each member slot, the check that last saw it.
    slot_seen: Vec<u32>,
    /// The current slot check's number (never 0, which no slot was seen by).
    slot_check: u32,
}

impl Distinct {
    /// Whether no two of `addresses` are the same.
    pub(super) fn all(&mut self, addresses: impl IntoIterator<Item = SocketAddr>) -> bool {
        start_over(&mut self.seen);
        addresses
            .into_iter()
            .all(|to| self.seen.insert(to, ()).is_none())
    }

    /// Whether no two of `slots` are the same. Slots are dense small numbers, so each is
    /// marked in a vector with the check's number rather than hashed.
    pub(super) fn all_slots(&mut self, slots: impl IntoIterator<Item = u32>) -> bool {
        self.slot_check = self.slot_check.wrapping_add(1);
        if self.slot_check == 0 {
            self.slot_seen.fill(0);
            self.slot_check = 1;
        }
        let check = self.slot_check;
        slots.into_iter().all(|slot| {
            let index = slot as usize;
            if self.slot_seen.len() <= index {
                self.slot_seen.resize(index + 1, 0);
            }
            mem::replace(&mut self.slot_seen[index], check) != check
        })
    }
}

/// Empties `entries`. The table keeps its room, unless it has room for far more destinations
/// than it held (then it shrinks, so that one large pass does not keep a large table, and a
/// run of large passes does not reallocate it every pass).
fn start_over<V>(entries: &mut HashMap<SocketAddr, V, Keyed>) {
    let used = entries.len();
    entries.clear();
    if entries.capacity() > KEPT.max(4 * used) {
        entries.shrink_to(KEPT.max(2 * used));
    }
}

/// Builds [`Mix`] hashers from a key drawn when the table is made: nobody sending to the
/// daemon can choose addresses that collide (and as the table is cleared every pass, a
/// collision could only slow the pass it happens in).
#[derive(Clone)]
struct Keyed(u64);

impl Default for Keyed {
    fn default() -> Keyed {
        Keyed(rand::random::<u64>())
    }
}

impl BuildHasher for Keyed {
    type Hasher = Mix;

    fn build_hasher(&self) -> Mix {
        Mix(self.0)
    }
}

/// Folds each word written into the state with a multiply, and mixes the state's bits when
/// finished, so that the table's low bits (its bucket) and high bits (its tag) both depend
/// on every word.
struct Mix(u64);

/// An odd constant whose bits are well spread (2^64 divided by the golden ratio).
const SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

impl Mix {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(23) ^ word).wrapping_mul(SPREAD);
    }
}

impl Hasher for Mix {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(n.into());
    }

    fn write_u16(&mut self, n: u16) {
        self.add(n.into());
    }

    fn write_u32(&mut self, n: u32) {
        self.add(n.into());
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 32;
        x = x.wrapping_mul(SPREAD);
        x ^ (x >> 29)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Addresses are distinct unless two are the same address and port; each check starts
    /// over.
    #[test]
    fn distinct_addresses_differ_in_address_or_port() {
        let mut distinct = Distinct::default();
        let a = SocketAddr::from(([127, 0, 0, 1], 4000));
        let b = SocketAddr::from(([127, 0, 0, 1], 4001));
        let c = SocketAddr::from(([127, 0, 0, 2], 4000));
        assert!(distinct.all([a, b, c]));
        assert!(!distinct.all([a, b, a]));
        assert!(distinct.all([b]), "the check before is forgotten");
        assert!(distinct.all([]));
    }

    /// Each destination keeps its own last entry, IPv4 and IPv6, and ports apart.
    #[test]
    fn each_destination_keeps_its_own_last_entry() {
        let mut last = LastPlanned::default();
        let a = SocketAddr::from(([127, 0, 0, 1], 4000));
        let b = SocketAddr::from(([127, 0, 0, 1], 4001));
        let c: SocketAddr = "[::1]:4000".parse().unwrap();
        assert_eq!(last.replace(a, 0), None);
        assert_eq!(last.replace(b, 1), None);
        assert_eq!(last.replace(c, 2), None);
        assert_eq!(last.replace(a, 3), Some(0));
        assert_eq!(last.replace(c, 4), Some(2));
        last.start_pass();
        assert_eq!(last.replace(b, 0), None, "forgotten at the next pass");
    }

    /// The hash spreads addresses that differ in one port or one address byte over the
    /// table's buckets and tags: 4,096 consecutive ports, or addresses, take as many distinct
    /// values in the low 12 bits and nearly as many in the top 7 as a random spread would.
    #[test]
    fn near_addresses_spread_over_buckets_and_tags() {
        let keyed = Keyed::default();
        let ports: Vec<u64> = (0..4096u16)
            .map(|p| keyed.hash_one(SocketAddr::from(([10, 0, 0, 1], 20_000 + p))))
            .collect();
        let hosts: Vec<u64> = (0..4096u32)
            .map(|h| {
                keyed.hash_one(SocketAddr::from((
                    std::net::Ipv4Addr::from(0x0a00_0000 + h),
                    9091,
                )))
            })
            .collect();
        for hashes in [ports, hosts] {
            let buckets: std::collections::HashSet<u64> =
                hashes.iter().map(|h| h & 0xfff).collect();
            let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
            // A random spread of 4,096 over 4,096 buckets fills about 63% of them.
            assert!(buckets.len() > 2_300, "{} buckets", buckets.len());
            assert_eq!(tags.len(), 128, "every tag used");
        }
    }

    /// The table keeps its room after a pass that used a quarter of it or more; after one
    /// that used less it shrinks, to room for twice what that pass used, and never below
    /// room for `KEPT`.
    #[test]
    fn the_table_keeps_room_for_four_times_a_pass_and_shrinks_past_that() {
        let mut last = LastPlanned::default();
        let fill = |last: &mut LastPlanned, n: u32| {
            for i in 0..n {
                last.replace(SocketAddr::from((std::net::Ipv4Addr::from(i), 9091)), i);
            }
        };
        fill(&mut last, 20_000);
        last.start_pass();
        let room = last.entries.capacity();
        assert!(room >= 20_000, "a large pass's room is kept: {room}");
        assert_eq!(room % 4, 0, "{room}");
        fill(&mut last, (room / 4) as u32);
        last.start_pass();
        assert_eq!(last.entries.capacity(), room, "a quarter used: kept");
        fill(&mut last, 5_000);
        last.start_pass();
        let shrunk = last.entries.capacity();
        assert!((10_000..room).contains(&shrunk), "{shrunk} of {room}");
        last.start_pass();
        let kept = last.entries.capacity();
        assert!((KEPT..shrunk).contains(&kept), "{kept} of {shrunk}");
    }

    /// Every kind of write is folded into the hash: two values written alike hash apart.
    #[test]
    fn every_kind_of_write_is_folded_in() {
        let keyed = Keyed(0x0123_4567_89ab_cdef);
        /// Writes a value of one kind.
        type Write = fn(&mut Mix, u8);
        let writes: [(&str, Write); 6] = [
            ("bytes", |h, n| h.write(&[n])),
            ("u8", |h, n| h.write_u8(n)),
            ("u16", |h, n| h.write_u16(n.into())),
            ("u32", |h, n| h.write_u32(n.into())),
            ("u64", |h, n| h.write_u64(n.into())),
            ("usize", |h, n| h.write_usize(n.into())),
        ];
        for (name, write) in writes {
            let [one, two] = [1, 2].map(|n| {
                let mut h = keyed.build_hasher();
                write(&mut h, n);
                h.finish()
            });
            assert_ne!(one, two, "{name}");
        }
    }

    /// The finish brings every bit of the state to the buckets (the low bits) and the tags
    /// (the top 7): 4,096 words that differ only in their top 12 bits, or only in their low
    /// 12, take as many buckets and tags as a random spread would, whatever the key.
    #[test]
    fn high_and_low_bits_of_a_word_reach_buckets_and_tags() {
        for key in [0, 1, SPREAD, u64::MAX, 0x0123_4567_89ab_cdef] {
            let keyed = Keyed(key);
            for shift in [0, 52] {
                let hashes: Vec<u64> = (0..4096u64).map(|k| keyed.hash_one(k << shift)).collect();
                let buckets: std::collections::HashSet<u64> =
                    hashes.iter().map(|h| h & 0xfff).collect();
                let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
                assert!(
                    buckets.len() > 2_300,
                    "key {key:#x}, shift {shift}: {} buckets",
                    buckets.len()
                );
                assert_eq!(tags.len(), 128, "key {key:#x}, shift {shift}");
            }
        }
    }
}
