//! The state file `room_manager.json` and its journal: the on-disk model, loading, and
//! crash-safe writing.
//!
//! The file keeps the original project's shape so that its files load and its tools can read
//! ours:
//!
//! ```json
//! { "version": 1,
//!   "rooms":  { "lobby": { "host_token": "…", "members": ["…"], "created_at": 1700000000.5 } },
//!   "tokens": { "…": { "username": "alice", "room_name": "lobby", "is_host": true,
//!                      "address": ["127.0.0.1", 50000] } },
//!   "saved_at": "2026-11-21T23:00:00Z", "journal_seq": 42 }
//! ```
//!
//! Beside it, `room_manager.json.journal` holds the changes made since the file was last
//! written, one JSON [`Record`] per line with a sequence number `n`. While a compaction runs,
//! the journal it folds has been renamed `room_manager.json.journal.old` and a fresh journal
//! takes the new records, so every record in `journal.old` precedes every record in `journal`.
//! Loading reads the file, then replays `journal.old` and then `journal`, keeping the lines
//! whose `n` is above the file's `journal_seq` and above every line replayed before. A torn
//! tail (a crash in the middle of an append, which was never acknowledged) is ignored: a last
//! line cut short (no newline), or everything from the first line holding a NUL byte (a
//! zero-filled hole) on; a whole line that does not parse is an error wherever it is.
//! In `journal.old`, which was durable when it was rotated, it is ignored only if the journal
//! goes on from its last record; otherwise records are missing and the load stops, as it does
//! for a bad line anywhere else. See `docs/PERSISTENCE.md`.
//!
//! This module owns the model ([`State`] and its entries, how a [`Record`] changes it, the
//! file's bytes); `load` reads the files back at start, and `files` writes them so that a
//! crash leaves each whole.

mod files;
mod load;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
pub use crate::journal::{
    parse_journal, sync_pieces, Entry, JournalLine, Replay, ZeroHole, MAX_UNSYNCED_BYTES,
    SPACE_AHEAD_BYTES,
};
use crate::local::LocalAddr;
use crate::peer;
use crate::record::{HistoryEntry, MemberRecord, Record};
pub use files::{
    create_private, is_failed_dir_sync, restrict_to_owner, sync_dir, write_atomic,
    write_atomic_with, FailedDirSync,
};
pub use load::{load, Loaded, Paths, START_LIMIT};

/// Version written in the `version` field. Files without one (the original's) are version 0.
pub const STATE_VERSION: u32 = 1;

/// The whole persisted state, in the file's shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Format version; 0 for files written by the original server.
    #[serde(default)]
    pub version: u32,
    /// Rooms by name.
    #[serde(default, deserialize_with = "unique_keys")]
    pub rooms: BTreeMap<String, RoomEntry>,
    /// Members by token.
    #[serde(default, deserialize_with = "unique_keys")]
    pub tokens: BTreeMap<String, TokenEntry>,
    /// When the file was written (RFC 3339); informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_at: Option<String>,
    /// The last journal record this file includes.
    #[serde(default)]
    pub journal_seq: u64,
}

/// Reads a JSON object into a map, refusing a key given twice: a plain map would keep the
/// last copy and drop the first without a word (two rooms of one name, a token listed twice).
fn unique_keys<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueKeys<V>(std::marker::PhantomData<V>);

    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for UniqueKeys<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, V>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format_args!(
                        "the key {key:?} is given twice"
                    )));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_map(UniqueKeys(std::marker::PhantomData))
}

/// One room in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEntry {
    /// The host's token.
    pub host_token: String,
    /// Every member's token, host first.
    pub members: Vec<String>,
    /// Unix time of creation, seconds.
    #[serde(default)]
    pub created_at: f64,
    /// Whether the room shows in listings.
    #[serde(
        default = "crate::serde_skip::yes",
        skip_serializing_if = "crate::serde_skip::is_true"
    )]
    pub listed: bool,
    /// PHC-format password hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// The sequence number the next message gets (0: start at 1).
    #[serde(default, skip_serializing_if = "crate::serde_skip::is_default")]
    pub next_seq: u64,
    /// Recent messages, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
}

/// One member in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// Display name.
    pub username: String,
    /// The room the token belongs to.
    pub room_name: String,
    /// Whether this member hosts its room.
    #[serde(default)]
    pub is_host: bool,
    /// The registered UDP address, written `["ip", port]` as the original does.
    #[serde(default, with = "address_format")]
    pub address: Option<SocketAddr>,
    /// Keepalive interval the member promised, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u32>,
    /// Capability bits.
    #[serde(default, skip_serializing_if = "crate::serde_skip::is_default")]
    pub caps: u8,
    /// The largest datagram the member accepts (`max_datagram` at join), if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_datagram: Option<u16>,
    /// The IP address the member's join came from over TCP (absent in the original's files
    /// and in files from before `ocmd` recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_from: Option<IpAddr>,
    /// Our address the member's datagrams came to (a wildcard-bound socket only), which what
    /// it hears is sent from. Boxed: 8 bytes in every entry instead of 24, which the
    /// compactor's copy of 100,000 members notices, and only wildcard-bound daemons fill it.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "boxed_local")]
    pub local: Option<Box<LocalAddr>>,
}

/// [`crate::local::optional_text`] for the boxed address of [`TokenEntry::local`].
mod boxed_local {
    use super::LocalAddr;
    use crate::local::optional_text;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        addr: &Option<Box<LocalAddr>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        optional_text::serialize(&addr.as_deref().copied(), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Box<LocalAddr>>, D::Error> {
        Ok(optional_text::deserialize(d)?.map(Box::new))
    }
}

/// `address` is `["127.0.0.1", 5000]` in the original's files (a Python tuple); we also read
/// `"127.0.0.1:5000"`, and a value that is neither (or an unparsable IP) counts as no address.
/// An IPv6 address with a zone (a link-local peer) keeps it in the pair's text:
/// `["fe80::3%2", 5000]`.
mod address_format {
    use super::*;
    use serde::{Deserializer, Serializer};
    use std::net::SocketAddrV6;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any {
        Pair(String, u16),
        Text(String),
        Other(serde::de::IgnoredAny),
    }

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(SocketAddr::V6(a)) if a.scope_id() != 0 => {
                (format!("{}%{}", a.ip(), a.scope_id()), a.port()).serialize(s)
            }
            Some(a) => (a.ip().to_string(), a.port()).serialize(s),
            None => s.serialize_none(),
        }
    }

    /// Read in the canonical form ([`peer::canonical`]): an IPv4-mapped address (written by an
    /// older ocmd on a dual-stack socket) as the IPv4 address.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let addr = match Option::<Any>::deserialize(d)? {
            Some(Any::Pair(ip, port)) => pair(&ip, port),
            Some(Any::Text(text)) => text.parse().ok(),
            Some(Any::Other(_)) | None => None,
        };
        Ok(addr.map(peer::canonical))
    }

    /// The pair's IP text (with a zone after `%` for IPv6) and port; `None` if it does not
    /// parse.
    fn pair(ip: &str, port: u16) -> Option<SocketAddr> {
        match ip.split_once('%') {
            None => ip
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, port)),
            Some((ip, zone)) => {
                let ip = ip.parse().ok()?;
                let zone = zone.parse().ok()?;
                Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, zone)))
            }
        }
    }
}

impl State {
    /// Drops the addresses of ours that members were saved with (`local`), for a daemon whose
    /// UDP socket is bound to one address.
    pub fn forget_local_addresses(&mut self) {
        for entry in self.tokens.values_mut() {
            entry.local = None;
        }
    }

    /// Applies one journal record. Records that refer to rooms or tokens that are gone are
    /// no-ops, so replay is safe whatever the file already holds.
    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::CreateRoom {
                room,
                host,
                created_at,
                listed,
                password_hash,
            } => {
                self.close_room(room);
                self.rooms.insert(
                    room.clone(),
                    RoomEntry {
                        host_token: host.token.clone(),
                        members: vec![host.token.clone()],
                        created_at: *created_at,
                        listed: *listed,
                        password_hash: password_hash.clone(),
                        next_seq: 0,
                        history: Vec::new(),
                    },
                );
                self.tokens
                    .insert(host.token.clone(), token_entry(host, room, true));
            }
            Record::Join { room, member } => {
                if let Some(entry) = self.rooms.get_mut(room) {
                    let previous = self
                        .tokens
                        .insert(member.token.clone(), token_entry(member, room, false));
                    // A token this room already held (a replayed join) is listed already. Told
                    // by the insert's own descent: a scan of the room's members would cost N²
                    // over N joins into one room, a second lookup a descent per join.
                    if previous.is_none_or(|held| held.room_name != *room) {
                        entry.members.push(member.token.clone());
                    }
                }
            }
            Record::Register {
                token,
                address,
                local,
            } => {
                if let Some(entry) = self.tokens.get_mut(token) {
                    // Canonical, as the daemon keeps it: an older ocmd on a dual-stack socket
                    // wrote IPv4 peers IPv4-mapped.
                    entry.address = Some(peer::canonical(*address));
                    entry.local = local.map(Box::new);
                }
            }
            Record::Leave { token } => {
                if let Some(entry) = self.tokens.remove(token) {
                    if let Some(room) = self.rooms.get_mut(&entry.room_name) {
                        room.members.retain(|t| t != token);
                    }
                }
            }
            Record::CloseRoom { room } => self.close_room(room),
            Record::History {
                room,
                next_seq,
                messages,
            } => {
                if let Some(entry) = self.rooms.get_mut(room) {
                    entry.next_seq = *next_seq;
                    entry.history = messages.clone();
                }
            }
            Record::HistoryAppend {
                room,
                next_seq,
                kept,
                messages,
            } => {
                if let Some(entry) = self.rooms.get_mut(room) {
                    entry.next_seq = *next_seq;
                    entry.history.extend(messages.iter().cloned());
                    let excess = entry.history.len().saturating_sub(*kept);
                    entry.history.drain(..excess);
                }
            }
        }
    }

    /// Removes a room and the tokens it lists that are in it: a listing of a token whose
    /// entry names another room (a file the registry loaded without it) leaves that token to
    /// its own room.
    fn close_room(&mut self, room: &str) {
        if let Some(entry) = self.rooms.remove(room) {
            for token in &entry.members {
                if self.tokens.get(token).is_some_and(|t| t.room_name == room) {
                    self.tokens.remove(token);
                }
            }
        }
    }

    /// Fixes what the original server wrote differently: it stored the username exactly as
    /// the client sent it, a JSON string with its quotes (`"\"alice\""`).
    ///
    /// Only for the original's files (version 0: no `version` field). `ocmd` stores the name
    /// the client meant, already decoded, so in its own files (version 1) a name that starts
    /// with `"` is exactly what the client chose: decoding it again would change it (`"a"`
    /// would become `a`, the name of another member maybe) or make it unusable (`"\n"`, four
    /// characters, would become a line feed).
    fn normalize(&mut self) {
        if self.version != 0 {
            return;
        }
        for entry in self.tokens.values_mut() {
            if entry.username.len() >= 2 && entry.username.starts_with('"') {
                if let Ok(name) = serde_json::from_str::<String>(&entry.username) {
                    entry.username = name;
                }
            }
        }
    }

    /// Serializes the state for the file into `out`, stamping `version` and `saved_at`.
    ///
    /// The snapshot is streamed, never held whole: at 100,000 tokens it is ~27 MB, and a
    /// buffer that size, freed after each compaction, raised glibc's mmap threshold so that
    /// the next one stayed resident (measured: 20–45 MB more RSS after a compaction).
    pub fn write_file(&mut self, now: SystemTime, mut out: impl Write) -> io::Result<()> {
        self.version = STATE_VERSION;
        self.saved_at = Some(humantime::format_rfc3339_seconds(now).to_string());
        serde_json::to_writer_pretty(&mut out, self)?;
        out.write_all(b"\n")
    }

    /// The file's bytes (see [`State::write_file`]), for tests and tools.
    pub fn to_file_bytes(&mut self, now: SystemTime) -> Result<Vec<u8>, StoreError> {
        let mut bytes = Vec::new();
        self.write_file(now, &mut bytes)
            .map_err(|e| StoreError::Serialize(serde_json::Error::io(e)))?;
        Ok(bytes)
    }
}

fn token_entry(member: &MemberRecord, room: &str, is_host: bool) -> TokenEntry {
    TokenEntry {
        username: member.username.clone(),
        room_name: room.to_owned(),
        is_host,
        address: None,
        keepalive: member.keepalive,
        caps: member.caps,
        max_datagram: member.max_datagram,
        joined_from: member.joined_from,
        local: None,
    }
}

/// Parses the state file's bytes.
///
/// The file must be a JSON object with a `rooms` or `tokens` key (the original server always
/// writes both): anything else is refused rather than taken for an empty state, so pointing
/// `--state` at the wrong JSON file never overwrites it.
pub fn parse_state(bytes: &[u8]) -> Result<State, serde_json::Error> {
    // The shape is checked first by a pass that keeps nothing, then the state is parsed
    // straight into its types. (Parsing into a `serde_json::Value` first cost ~1.5 KB of
    // resident memory per token for the rest of the run: the freed tree's small blocks lay
    // between the kept ones, so the allocator could not give their pages back.)
    let looks_like_state = match serde_json::from_slice::<Shape>(bytes) {
        Ok(shape) => shape.looks_like_state,
        // Valid JSON that is not an object (an array, a number, ...).
        Err(e) if e.classify() == serde_json::error::Category::Data => false,
        Err(e) => return Err(e),
    };
    if !looks_like_state {
        return Err(serde::de::Error::custom(
            "not an ocm state file: expected a JSON object with a \"rooms\" or \"tokens\" key",
        ));
    }
    serde_json::from_slice(bytes)
}

/// Whether a JSON object has a `rooms` or a `tokens` key; parsing it allocates nothing but
/// the keys. Anything but an object is a data error.
struct Shape {
    looks_like_state: bool,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Shape, D::Error> {
        struct ShapeVisitor;
        impl<'de> serde::de::Visitor<'de> for ShapeVisitor {
            type Value = Shape;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Shape, A::Error> {
                let mut looks_like_state = false;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    looks_like_state |= key == "rooms" || key == "tokens";
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(Shape { looks_like_state })
            }
        }
        deserializer.deserialize_map(ShapeVisitor)
    }
}

/// The largest record number (or state file `journal_seq`) a file may hold: `i64::MAX`. The
/// daemon's own numbers start at 1 and go up by one per record; only a hand-edited or hostile
/// file comes near it.
pub const MAX_NUMBER: u64 = i64::MAX as u64;
