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
//! tail (a crash in the middle of an append, which was never acknowledged) is ignored: a bad
//! last line, or everything from the first line holding a NUL byte (a zero-filled hole) on.
//! In `journal.old`, which was durable when it was rotated, it is ignored only if the journal
//! goes on from its last record; otherwise records are missing and the load stops, as it does
//! for a bad line anywhere else. See `docs/PERSISTENCE.md`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
pub use crate::journal::{
    parse_journal, sync_pieces, Entry, JournalLine, Replay, ZeroHole, MAX_UNSYNCED_BYTES,
    SPACE_AHEAD_BYTES,
};
use crate::journal::{scan_journal, Ending, ScanError, LAST_NUMBER};
use crate::local::LocalAddr;
use crate::peer;
use crate::record::{HistoryEntry, MemberRecord, Record};

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
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub listed: bool,
    /// PHC-format password hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// The sequence number the next message gets (0: start at 1).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub next_seq: u64,
    /// Recent messages, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
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
    #[serde(default, skip_serializing_if = "is_zero")]
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

fn yes() -> bool {
    true
}
fn is_true(v: &bool) -> bool {
    *v
}
fn is_zero(v: &u8) -> bool {
    *v == 0
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

/// Where the state file's companions live.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `room_manager.json`.
    pub state: PathBuf,
    /// `room_manager.json.journal`.
    pub journal: PathBuf,
    /// `room_manager.json.journal.old`: the journal being folded into the state file.
    pub journal_old: PathBuf,
    /// `room_manager.json.lock`.
    pub lock: PathBuf,
}

impl Paths {
    /// Derives the companion paths from the state file's path.
    pub fn new(state: &Path) -> Paths {
        let with = |suffix: &str| {
            let mut name = state.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        Paths {
            state: state.to_owned(),
            journal: with(".journal"),
            journal_old: with(".journal.old"),
            lock: with(".lock"),
        }
    }
}

/// What [`load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The state after replaying the journal.
    pub state: State,
    /// The highest journal sequence number seen (file or journal).
    pub last_seq: u64,
    /// Journal records replayed.
    pub replayed: usize,
    /// Whether a torn tail was ignored (in either journal).
    pub torn_tail: bool,
    /// The zero-filled holes that cut a journal short, with the journal's path.
    pub zero_holes: Vec<(PathBuf, ZeroHole)>,
    /// Whether `journal.old` was there: a compaction was interrupted.
    pub journal_old: bool,
    /// The journal's bytes before the space written ahead ([`SPACE_AHEAD_BYTES`]): 0 when
    /// it holds nothing to fold (missing, empty, or nothing but that space).
    pub journal_data_bytes: u64,
}

/// Reads the state file (a missing file is a fresh start) and replays `journal.old`, then the
/// journal (a missing journal is an empty one).
///
/// Records are numbered one by one, from the state file's `journal_seq` + 1, so a record that
/// skips ahead of the last one applied means acknowledged records are missing: the load
/// stops ([`StoreError::Gap`]). A record at or below the last one applied is skipped: the
/// daemon's own files never overlap, but a live backup's can.
///
/// A torn tail (a torn last line, or a zero-filled hole and everything after it: see
/// [`parse_journal`]) is accepted at the end of the journal: it holds an append that no
/// `fdatasync` completed for, never acknowledged. `journal.old` was rotated only after an
/// append to it was synced, so all of it was durable: a torn tail there is accepted only when
/// the journal goes on from the last record before it, which shows that nothing was lost;
/// otherwise the load stops ([`StoreError::CutShort`]).
///
/// A hole in the journal with more data than [`MAX_UNSYNCED_BYTES`] after its line (the space
/// written ahead of the appends not counted), over more than one line, is not a torn append
/// (the writer syncs no more at a time) but damage with acknowledged records behind it: the
/// load stops ([`StoreError::Journal`]).
///
/// Records are applied as they are read, so of several defects in one file the first in file
/// order is the one reported.
pub fn load(paths: &Paths) -> Result<Loaded, StoreError> {
    let (state, state_missing) = read_snapshot(paths)?;
    let mut replayer = Replayer::new(paths, state, state_missing);
    // journal.old holds the older records: replay it first.
    replayer.replay_journal(&paths.journal_old, true)?;
    replayer.replay_journal(&paths.journal, false)?;
    replayer.finish()
}

/// Reads the state file (a missing file is a fresh start, from an empty state) and returns
/// its state, normalized, with whether the file was missing (which [`gap_hint`] names).
fn read_snapshot(paths: &Paths) -> Result<(State, bool), StoreError> {
    let state_bytes = read_if_exists(&paths.state)?;
    let state_missing = state_bytes.is_none();
    let mut state = match state_bytes {
        Some(bytes) => parse_state(&bytes).map_err(|source| StoreError::Parse {
            path: paths.state.clone(),
            source,
        })?,
        None => State::default(),
    };
    check_snapshot(&state, &paths.state)?;
    // Only the snapshot can be the original's: journal records are always ocmd's.
    state.normalize();
    Ok((state, state_missing))
}

/// Refuses a state file this ocmd cannot go on from: one whose `journal_seq` leaves no number
/// for the next record, or one a newer ocmd wrote.
fn check_snapshot(state: &State, path: &Path) -> Result<(), StoreError> {
    // The writer numbers the next record `journal_seq + 1`.
    if state.journal_seq > MAX_NUMBER {
        return Err(StoreError::Parse {
            path: path.to_path_buf(),
            source: serde::de::Error::custom(LAST_NUMBER),
        });
    }
    // A newer ocmd's file may hold what this one would drop at its next snapshot.
    if state.version > STATE_VERSION {
        return Err(StoreError::Parse {
            path: path.to_path_buf(),
            source: serde::de::Error::custom(format_args!(
                "written by a newer ocmd (format version {}; this one reads up to {STATE_VERSION}), \
                 whose data it could drop: start that ocmd, or restore a backup",
                state.version
            )),
        });
    }
    Ok(())
}

/// A [`load`] in progress: the state file's state with the journals replayed into it so far,
/// and what the replay has found. Kept apart so that each journal is replayed by one method
/// and each record applied by another.
struct Replayer<'a> {
    paths: &'a Paths,
    /// The state, with every record applied so far.
    state: State,
    /// Whether the state file was missing (see [`gap_hint`]).
    state_missing: bool,
    /// What the load found so far; its `state` is filled in by [`Replayer::finish`].
    loaded: Loaded,
    /// The state file's `journal_seq`.
    snapshot_seq: u64,
    /// The last record applied (the state file's `journal_seq` before any).
    applied: u64,
    /// journal.old's torn tail, if it has one: the line it begins at, and journal.old's last
    /// whole record (0: none).
    old_tail: Option<(usize, u64)>,
}

impl<'a> Replayer<'a> {
    /// Starts from the state file's `state`, with no record applied.
    fn new(paths: &'a Paths, state: State, state_missing: bool) -> Replayer<'a> {
        let loaded = Loaded {
            last_seq: state.journal_seq,
            ..Loaded::default()
        };
        let snapshot_seq = state.journal_seq;
        Replayer {
            paths,
            state,
            state_missing,
            loaded,
            snapshot_seq,
            applied: snapshot_seq,
            old_tail: None,
        }
    }

    /// Replays the journal at `path` (`is_old`: `journal.old`), if it exists, applying each
    /// record as it is read, then notes what its scan found.
    fn replay_journal(&mut self, path: &Path, is_old: bool) -> Result<(), StoreError> {
        let Some(file) = open_journal(path)? else {
            return Ok(());
        };
        self.loaded.journal_old |= is_old;
        // journal.old's torn tail, when this is the journal after it: vouched for (below) at
        // the journal's first record after journal.old's last whole one.
        let mut unvouched = if is_old { None } else { self.old_tail.take() };
        // This file's last whole record (0: none).
        let mut last_whole = 0;
        // Each record is applied as it is read: a journal that grew for days behind failing
        // compactions replays in the memory of one line, not of the file and its records.
        // journal.old had its space ahead cut off before its rotation.
        let ending = if is_old {
            Ending::Cut
        } else {
            Ending::SpaceAhead
        };
        let reader = io::BufReader::with_capacity(256 * 1024, file);
        let scan = scan_journal(reader, ending, |entry| {
            vouch_for_old_tail(
                &mut unvouched,
                entry.n,
                self.snapshot_seq,
                &self.paths.journal_old,
            )?;
            last_whole = entry.n;
            self.apply_entry(path, &entry)
        });
        let replay = scan.map_err(|e| scan_error(path, e))?;
        if let Some((line, _)) = unvouched {
            // No record in the journal after journal.old's last whole one: nothing shows that
            // no synced record was in its tail.
            return Err(StoreError::CutShort {
                old: self.paths.journal_old.clone(),
                line,
            });
        }
        if !is_old {
            check_zero_hole(path, &replay)?;
        }
        self.note_scan(path, is_old, &replay, last_whole);
        Ok(())
    }

    /// Applies a journal record read from `path`, unless the state holds it already; a record
    /// that skips ahead of the last one applied stops the load ([`StoreError::Gap`]).
    fn apply_entry(&mut self, path: &Path, entry: &Entry) -> Result<(), StoreError> {
        self.loaded.last_seq = self.loaded.last_seq.max(entry.n);
        if entry.n <= self.applied {
            return Ok(());
        }
        if entry.n != self.applied + 1 {
            return Err(StoreError::Gap {
                path: path.to_path_buf(),
                line: entry.line,
                expected: self.applied + 1,
                found: entry.n,
                hint: gap_hint(self.state_missing, self.applied == self.snapshot_seq),
            });
        }
        self.state.apply(&entry.record);
        self.loaded.replayed += 1;
        self.applied = entry.n;
        Ok(())
    }

    /// Adds what the scan of the journal at `path` found to the load's findings, and keeps
    /// journal.old's torn tail, if it has one, for the journal after it to vouch for.
    fn note_scan(&mut self, path: &Path, is_old: bool, replay: &Replay, last_whole: u64) {
        if !is_old {
            self.loaded.journal_data_bytes = replay.data_bytes;
        }
        self.loaded.torn_tail |= replay.torn_tail;
        self.loaded
            .zero_holes
            .extend(replay.zero_hole.map(|hole| (path.to_path_buf(), hole)));
        if is_old && replay.torn_tail {
            // A hole's first line, or else the torn last line.
            let line = replay.zero_hole.map_or(replay.last_line, |hole| hole.line);
            self.old_tail = Some((line, last_whole));
        }
    }

    /// Ends the load: journal.old's torn tail must have been vouched for, and the record
    /// numbers must not be spent.
    fn finish(mut self) -> Result<Loaded, StoreError> {
        if let Some((line, _)) = self.old_tail {
            // No journal after journal.old's torn tail shows that no synced record was in it.
            return Err(StoreError::CutShort {
                old: self.paths.journal_old.clone(),
                line,
            });
        }
        if self.loaded.last_seq > START_LIMIT {
            return Err(StoreError::NumbersExhausted {
                state: self.paths.state.clone(),
                last: self.loaded.last_seq,
            });
        }
        self.loaded.state = self.state;
        Ok(self.loaded)
    }
}

/// The journal at `path`, opened for reading, or `None` when it does not exist.
fn open_journal(path: &Path) -> Result<Option<File>, StoreError> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Checks journal.old's torn tail, while it waits to be vouched for (`unvouched`), against
/// the journal's record `n`: the first record after journal.old's last whole one vouches for
/// the tail if no record is missing between them, and stops the load
/// ([`StoreError::CutShort`]) if one is.
fn vouch_for_old_tail(
    unvouched: &mut Option<(usize, u64)>,
    n: u64,
    snapshot_seq: u64,
    journal_old: &Path,
) -> Result<(), StoreError> {
    if let Some((line, old_last)) = *unvouched {
        if n > old_last {
            // The journal takes over from journal.old's last record, so the tail held
            // the records between journal.old's last whole one and the journal's first
            // after it. It lost nothing if there are none, or if the snapshot holds
            // them all (a start that accepted the tail, folded, and stopped before
            // removing journal.old).
            if n > old_last.max(snapshot_seq) + 1 {
                return Err(StoreError::CutShort {
                    old: journal_old.to_path_buf(),
                    line,
                });
            }
            *unvouched = None;
        }
    }
    Ok(())
}

/// The load's error for a scan of the journal at `path` that failed.
fn scan_error(path: &Path, error: ScanError<StoreError>) -> StoreError {
    match error {
        ScanError::Line(line, reason) => StoreError::Journal {
            path: path.to_path_buf(),
            line,
            reason,
        },
        ScanError::Read(source) => StoreError::Read {
            path: path.to_path_buf(),
            source,
        },
        ScanError::Apply(e) => e,
    }
}

/// Stops the load when the live journal at `path` has a zero-filled hole that cannot be a
/// torn append: too much data after it, over more than one line.
fn check_zero_hole(path: &Path, replay: &Replay) -> Result<(), StoreError> {
    if let Some(hole) = replay.zero_hole {
        // The writer syncs at most MAX_UNSYNCED_BYTES at a time, so a hole with more
        // after it, over more than one line, is not a torn append but damage (a media
        // error, a bad copy) with synced, acknowledged records behind it: taken for a torn
        // tail, they would be dropped and then folded away for good. (journal.old was
        // synced whole: any hole there is judged by what vouches for its records.)
        let tail = replay.hole_tail_bytes;
        if tail > MAX_UNSYNCED_BYTES && hole.lines > 1 {
            return Err(StoreError::Journal {
                path: path.to_path_buf(),
                line: hole.line,
                reason: format!(
                    "a zero-filled hole, with {tail} bytes ({} lines) from its line to the \
                     end of the data: more than one append leaves unsynced ({MAX_UNSYNCED_BYTES}), so \
                     records written and synced after it would be lost; the journal is \
                     damaged (check the disk, and keep a copy before cutting it at this line)",
                    hole.lines
                ),
            });
        }
    }
    Ok(())
}

/// What most likely left a gap in the record numbers.
fn gap_hint(state_missing: bool, first_record: bool) -> &'static str {
    match (state_missing, first_record) {
        (true, true) => {
            "the state file is missing: restore it with the journals of its backup, or move \
             the journals aside too to start empty"
        }
        (false, true) => {
            "the state file is older than the journals: restore the files of one backup together"
        }
        _ => "the disk lost written data, or the journals come from different moments",
    }
}

/// The file's bytes, or `None` when it does not exist.
fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Read {
            path: path.to_owned(),
            source,
        }),
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
            "not an ocm state file: expected a JSON object with \"rooms\" and \"tokens\"",
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

/// The largest last record number a daemon starts from: 2^62. From there the writer would
/// need 2^62 − 1 records more (centuries of appends) to pass [`MAX_NUMBER`], so its count
/// never wraps (a number that wrapped to 0 would be skipped at the next load as already
/// folded). A daemon started right at the limit writes past it, and the next start is
/// refused, the files untouched: only an edited file gets there.
pub const START_LIMIT: u64 = 1 << 62;

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file whole
/// (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes)).map(|_| ())
}

/// Writes `path` through `write` so that a crash leaves either the old or the new file
/// whole: a temporary file created exclusively beside it with mode 0600, written through a
/// buffer, fsync'd, renamed over `path`, and the directory fsync'd. Returns the file's size.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<&File>) -> io::Result<()>,
) -> io::Result<u64> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // The caller names `path`; an error of the temporary file says it was that one.
    let at_tmp = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", tmp.display()));
    let file = match create_private(&tmp) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Left over by a crash mid-write; the lock file guarantees it is not in use.
            fs::remove_file(&tmp).map_err(at_tmp)?;
            create_private(&tmp).map_err(at_tmp)?
        }
        other => other.map_err(at_tmp)?,
    };
    let written = (|| {
        let mut buffered = io::BufWriter::with_capacity(64 * 1024, &file);
        write(&mut buffered)?;
        buffered.flush()?;
        drop(buffered);
        file.sync_all()?;
        file.metadata().map(|m| m.len())
    })();
    drop(file);
    let size = match written {
        Ok(size) => size,
        Err(e) => {
            // A partial file could hold the disk space the journal needs (ENOSPC).
            let _ = fs::remove_file(&tmp);
            return Err(at_tmp(e));
        }
    };
    if let Err(e) = fs::rename(&tmp, path) {
        // A whole copy of the state (tokens, password hashes) left for nothing.
        let _ = fs::remove_file(&tmp);
        return Err(io::Error::new(
            e.kind(),
            format!("renaming {} over it: {e}", tmp.display()),
        ));
    }
    sync_dir(path)?;
    Ok(size)
}

/// Creates a new file with mode 0600, failing if it exists.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Takes group and other permissions off `file` (at `path`), which holds tokens and password
/// hashes: files the daemon creates are 0600 already, but a state file left by the original
/// server or restored with `cp` under a umask of 022 is not. Says so in the log either way.
pub fn restrict_to_owner(file: &File, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(mode) = file.metadata().map(|m| m.permissions().mode() & 0o7777) else {
        return;
    };
    if mode & 0o077 == 0 {
        return;
    }
    let owner_only = mode & 0o700;
    match file.set_permissions(fs::Permissions::from_mode(owner_only)) {
        Ok(()) => log::info!(
            "state: {} was readable by others (mode {mode:o}); now {owner_only:o}",
            path.display()
        ),
        Err(e) => log::warn!(
            "state: {} is readable by others (mode {mode:o}) and cannot be restricted: {e}",
            path.display()
        ),
    }
}

/// Fsyncs the directory holding `path`, making a rename or a creation durable.
///
/// A failed `fsync` itself comes back marked ([`is_failed_dir_sync`]): the kernel reports a
/// write-back error once, so an `fsync` retried through a fresh descriptor may succeed without
/// the entries being on disk. A daemon must not go on as if a retry had made them durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?
        .sync_all()
        .map_err(|e| io::Error::new(e.kind(), FailedDirSync(e)))
}

/// The error of a directory `fsync` that failed (see [`sync_dir`]).
#[derive(Debug, thiserror::Error)]
#[error("fsync of the directory failed: {0}")]
pub struct FailedDirSync(io::Error);

/// Whether `error` is a directory `fsync` that failed, after which entries renamed or created
/// in that directory may not be on disk whatever a retry says.
pub fn is_failed_dir_sync(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<FailedDirSync>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory (kept alive by the caller) and the state paths inside it.
    fn temp_paths() -> (tempfile::TempDir, Paths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("s.json"));
        (dir, paths)
    }

    fn member(token: &str, name: &str) -> MemberRecord {
        MemberRecord {
            token: token.into(),
            username: name.into(),
            keepalive: None,
            caps: 0,
            max_datagram: None,
            joined_from: None,
        }
    }

    fn create(room: &str, token: &str) -> Record {
        Record::CreateRoom {
            room: room.into(),
            host: member(token, "host"),
            created_at: 1.5,
            listed: true,
            password_hash: None,
        }
    }

    #[test]
    fn the_original_servers_file_keeps_loading() {
        let bytes = include_bytes!("../tests/data/original_room_manager.json");
        let mut state = parse_state(bytes).expect("original file parses");
        state.normalize();
        assert_eq!(state.version, 0);
        let room = &state.rooms["lobby"];
        assert_eq!(room.members.len(), 2);
        let host = &state.tokens[&room.host_token];
        assert!(host.is_host);
        assert_eq!(
            host.username, "alice",
            "quoted JSON-string usernames are unquoted"
        );
        assert_eq!(host.address, Some("127.0.0.1:50001".parse().unwrap()));
        let guest = &state.tokens[&room.members[1]];
        assert_eq!(guest.address, None);
    }

    /// Names that look like JSON strings, as a client may choose them: `"\n"` (four
    /// characters, which decoded would be a line feed), `"a"` beside a member `a`, a lone `"`.
    const QUOTED_NAMES: [&str; 5] = ["\"\\n\"", "\"a\"", "a", "\"", "\"\""];

    #[test]
    fn ocmds_own_file_keeps_names_that_look_like_json_strings() {
        let (_dir, paths) = temp_paths();
        let mut state = State::default();
        state.apply(&Record::CreateRoom {
            room: "r".into(),
            host: member("h", QUOTED_NAMES[0]),
            created_at: 1.5,
            listed: true,
            password_hash: None,
        });
        for (i, name) in QUOTED_NAMES.iter().enumerate().skip(1) {
            state.apply(&Record::Join {
                room: "r".into(),
                member: member(&format!("m{i}"), name),
            });
        }
        write_state(&paths, &state);
        let loaded = load(&paths).unwrap();
        assert_eq!(loaded.state.version, STATE_VERSION);
        assert_eq!(
            loaded.state.tokens, state.tokens,
            "names changed by loading"
        );
        assert_eq!(loaded.state.tokens["h"].username.len(), 4);
        // And again, as after any number of clean restarts.
        write_state(&paths, &loaded.state);
        assert_eq!(load(&paths).unwrap().state.tokens, state.tokens);
    }

    #[test]
    fn the_original_servers_file_is_unquoted_at_load_and_its_journal_is_not() {
        let (_dir, paths) = temp_paths();
        fs::write(
            &paths.state,
            include_bytes!("../tests/data/original_room_manager.json"),
        )
        .unwrap();
        // ocmd appended to the journal before it ever rewrote the original's file.
        let joins: Vec<(u64, Record)> = QUOTED_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let record = Record::Join {
                    room: "lobby".into(),
                    member: member(&format!("m{i}"), name),
                };
                (i as u64 + 1, record)
            })
            .collect();
        fs::write(&paths.journal, journal_bytes(&joins)).unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(loaded.state.version, 0);
        let names: Vec<&str> = loaded
            .state
            .tokens
            .values()
            .map(|t| t.username.as_str())
            .collect();
        for name in ["alice", "bob"].iter().chain(&QUOTED_NAMES) {
            assert!(names.contains(name), "{name:?} not in {names:?}");
        }
        assert_eq!(names.len(), 2 + QUOTED_NAMES.len());
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("room_manager.json"));
        let mut state = State::default();
        state.apply(&create("r", "t1"));
        state.apply(&Record::Join {
            room: "r".into(),
            member: member("t2", "bob"),
        });
        state.apply(&Record::Register {
            token: "t2".into(),
            address: "[::1]:9".parse().unwrap(),
            local: "fe80::1%2".parse().ok(),
        });
        assert!(state.tokens["t2"].local.is_some());
        let bytes = state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap();
        write_atomic(&paths.state, &bytes).unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(loaded.state, state);
        let mode = fs::metadata(&paths.state).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    /// An older ocmd on a dual-stack socket saved IPv4 peers IPv4-mapped, in the file and in
    /// register records; they load as IPv4 addresses, the form the daemon now keeps whichever
    /// socket it has, and a real IPv6 address stays as it is.
    #[test]
    fn ipv4_mapped_addresses_load_as_ipv4() {
        let text = r#"{"rooms": {"r": {"host_token": "h", "members": ["h", "g"]}},
            "tokens": {"h": {"username": "alice", "room_name": "r", "is_host": true,
                             "address": ["::ffff:127.0.0.1", 5000]},
                       "g": {"username": "bob", "room_name": "r", "is_host": false,
                             "address": ["::1", 5001]}}}"#;
        let mut state = parse_state(text.as_bytes()).unwrap();
        assert_eq!(
            state.tokens["h"].address,
            Some("127.0.0.1:5000".parse().unwrap())
        );
        assert_eq!(
            state.tokens["g"].address,
            Some("[::1]:5001".parse().unwrap())
        );
        let journal = br#"{"n":1,"op":"register","token":"g","address":"[::ffff:10.0.0.2]:7"}
"#;
        for entry in parse_journal(journal).unwrap().records {
            state.apply(&entry.record);
        }
        assert_eq!(
            state.tokens["g"].address,
            Some("10.0.0.2:7".parse().unwrap())
        );
    }

    /// Found by the `state_loader` fuzz target: a link-local peer address registered with its
    /// zone (`[fe80::3%2]:5` in the journal) lost the zone in the snapshot's pair form, so a
    /// member registered that way was sent to without its interface after a compaction.
    #[test]
    fn fuzz_regression_scoped_ipv6_address_keeps_its_zone_through_a_snapshot() {
        let bytes = include_bytes!("../../../fuzz/regressions/state_loader-scoped-ipv6-address");
        let nul = bytes
            .iter()
            .position(|&b| b == 0)
            .expect("state, NUL, journal");
        let mut state = parse_state(&bytes[..nul]).expect("the state parses");
        for entry in parse_journal(&bytes[nul + 1..])
            .expect("the journal parses")
            .records
        {
            state.apply(&entry.record);
        }
        let scoped: SocketAddr = "[fe80::3%2]:5".parse().unwrap();
        assert_eq!(state.tokens["h"].address, Some(scoped));
        let saved = state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap();
        let text = String::from_utf8_lossy(&saved);
        assert!(text.contains(r#""fe80::3%2""#), "{text}");
        let mut loaded = parse_state(&saved).unwrap();
        assert_eq!(loaded.tokens["h"].address, Some(scoped));
        assert_eq!(loaded.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap(), saved);
        // A zone that is not a number reads as no address, like any unparsable IP.
        let bad = text.replace("%2", "%eth0");
        assert_eq!(
            parse_state(bad.as_bytes()).unwrap().tokens["h"].address,
            None
        );
    }

    #[test]
    fn journal_replays_above_the_files_seq_and_ignores_a_torn_tail() {
        let (_dir, paths) = temp_paths();
        let mut file_state = State::default();
        file_state.apply(&create("a", "ta"));
        file_state.journal_seq = 1;
        write_atomic(
            &paths.state,
            &file_state.to_file_bytes(SystemTime::now()).unwrap(),
        )
        .unwrap();
        let mut journal = Vec::new();
        for (n, r) in [
            (1, create("a", "ta")),
            (2, create("b", "tb")),
            (3, Record::Leave { token: "zz".into() }),
        ] {
            serde_json::to_writer(&mut journal, &JournalLine { n, record: r }).unwrap();
            journal.push(b'\n');
        }
        journal.extend_from_slice(br#"{"n":4,"op":"close_ro"#);
        fs::write(&paths.journal, &journal).unwrap();
        let loaded = load(&paths).unwrap();
        assert!(loaded.torn_tail);
        assert_eq!(loaded.replayed, 2);
        assert_eq!(loaded.last_seq, 3);
        assert!(loaded.state.rooms.contains_key("a") && loaded.state.rooms.contains_key("b"));
    }

    /// Journal bytes holding `records` as lines numbered from their `n`.
    fn journal_bytes(records: &[(u64, Record)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, record) in records {
            serde_json::to_writer(&mut out, &JournalLine { n: *n, record }).unwrap();
            out.push(b'\n');
        }
        out
    }

    fn write_state(paths: &Paths, state: &State) {
        let mut state = state.clone();
        write_atomic(
            &paths.state,
            &state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap(),
        )
        .unwrap();
    }

    fn join(room: &str, token: &str) -> Record {
        Record::Join {
            room: room.into(),
            member: member(token, token),
        }
    }

    #[test]
    fn the_old_journal_sits_beside_the_journal() {
        let paths = Paths::new(Path::new("/var/lib/ocmd/room_manager.json"));
        assert_eq!(
            paths.journal_old,
            Path::new("/var/lib/ocmd/room_manager.json.journal.old")
        );
    }

    /// A compaction in progress: the snapshot (seq 2) is older than journal.old (records 1..=4,
    /// the first two already in the snapshot), and the fresh journal holds 5..=7. Records are
    /// applied old journal first: closing and re-creating `a` in the journal only gives host
    /// `h2` if the old journal's create of `a` came before.
    #[test]
    fn records_split_across_the_old_journal_and_the_journal_replay_in_order() {
        let (_dir, paths) = temp_paths();
        let mut snapshot = State::default();
        snapshot.apply(&create("x", "hx"));
        snapshot.journal_seq = 2;
        write_state(&paths, &snapshot);
        let old = [
            (1, create("x", "hx")),
            // Already in the snapshot: replaying it would close x.
            (2, Record::CloseRoom { room: "x".into() }),
            (3, create("a", "h1")),
            (4, join("a", "m1")),
        ];
        let new = [
            (5, Record::CloseRoom { room: "a".into() }),
            (6, create("a", "h2")),
            (7, join("a", "m2")),
        ];
        fs::write(&paths.journal_old, journal_bytes(&old)).unwrap();
        fs::write(&paths.journal, journal_bytes(&new)).unwrap();
        let loaded = load(&paths).unwrap();
        assert!(loaded.journal_old && !loaded.torn_tail);
        assert_eq!(loaded.replayed, 5);
        assert_eq!(loaded.last_seq, 7);
        let mut expected = snapshot.clone();
        for (_, r) in old.iter().chain(&new).filter(|(n, _)| *n > 2) {
            expected.apply(r);
        }
        assert_eq!(loaded.state.rooms, expected.rooms);
        assert_eq!(loaded.state.tokens, expected.tokens);
        assert!(loaded.state.rooms.contains_key("x"), "record 2 was skipped");
        assert_eq!(loaded.state.rooms["a"].members, ["h2", "m2"]);
        assert!(!loaded.state.tokens.contains_key("m1"));
    }

    /// A crash after the new snapshot was renamed into place but before journal.old was
    /// removed: every record of journal.old is at or below the snapshot's seq and is skipped.
    #[test]
    fn an_old_journal_the_snapshot_already_holds_is_skipped() {
        let (_dir, paths) = temp_paths();
        let old = [
            (1, create("a", "h1")),
            (2, join("a", "m1")),
            (3, Record::Leave { token: "m1".into() }),
        ];
        let mut snapshot = State::default();
        old.iter().for_each(|(_, r)| snapshot.apply(r));
        // Changed after record 3 in a way replaying 1..=3 would undo.
        snapshot.apply(&join("a", "m1"));
        snapshot.journal_seq = 3;
        write_state(&paths, &snapshot);
        fs::write(&paths.journal_old, journal_bytes(&old)).unwrap();
        fs::write(&paths.journal, journal_bytes(&[(4, join("a", "m4"))])).unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(loaded.replayed, 1);
        assert_eq!(loaded.last_seq, 4);
        assert_eq!(loaded.state.rooms["a"].members, ["h1", "m1", "m4"]);
    }

    /// A live backup copies the journal, then journal.old, then the snapshot; a rotation in
    /// between leaves the journal's copy holding records that journal.old's copy holds too,
    /// followed there by newer ones. They are replayed once, in order.
    #[test]
    fn overlapping_journals_replay_each_record_once() {
        let (_dir, paths) = temp_paths();
        let old = [
            (1, create("a", "h1")),
            (2, join("a", "m1")),
            (3, Record::Leave { token: "m1".into() }),
        ];
        fs::write(&paths.journal_old, journal_bytes(&old)).unwrap();
        fs::write(&paths.journal, journal_bytes(&old[..2])).unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(loaded.replayed, 3);
        assert_eq!(loaded.last_seq, 3);
        assert_eq!(
            loaded.state.rooms["a"].members,
            ["h1"],
            "m1 left, at record 3"
        );
        assert!(!loaded.state.tokens.contains_key("m1"));
    }

    /// A crash between the rotation's rename and the creation of the fresh journal.
    #[test]
    fn an_old_journal_without_a_journal_loads() {
        let (_dir, paths) = temp_paths();
        fs::write(
            &paths.journal_old,
            journal_bytes(&[(1, create("a", "h1")), (2, join("a", "m1"))]),
        )
        .unwrap();
        let loaded = load(&paths).unwrap();
        assert!(loaded.journal_old);
        assert_eq!(loaded.replayed, 2);
        assert_eq!(loaded.state.rooms["a"].members, ["h1", "m1"]);
    }

    #[test]
    fn a_torn_tail_of_either_journal_is_ignored() {
        let torn = br#"{"n":9,"op":"join","room":"a","member":{"tok"#;
        for torn_in_old in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let paths = Paths::new(&dir.path().join("s.json"));
            let mut old = journal_bytes(&[(1, create("a", "h1")), (2, join("a", "m2"))]);
            let mut new = journal_bytes(&[(3, join("a", "m3"))]);
            if torn_in_old {
                old.extend_from_slice(torn);
            } else {
                new.extend_from_slice(torn);
            }
            fs::write(&paths.journal_old, &old).unwrap();
            fs::write(&paths.journal, &new).unwrap();
            let loaded = load(&paths).unwrap();
            assert!(loaded.torn_tail, "torn in old: {torn_in_old}");
            assert_eq!(loaded.replayed, 3);
            assert_eq!(loaded.last_seq, 3);
            assert_eq!(loaded.state.rooms["a"].members, ["h1", "m2", "m3"]);
        }
    }

    #[test]
    fn a_bad_line_inside_the_old_journal_is_an_error_naming_it() {
        let (_dir, paths) = temp_paths();
        let mut old = journal_bytes(&[(1, create("a", "h1"))]);
        old.extend_from_slice(b"garbage\n");
        old.extend_from_slice(&journal_bytes(&[(3, join("a", "m3"))]));
        fs::write(&paths.journal_old, &old).unwrap();
        fs::write(&paths.journal, journal_bytes(&[(4, join("a", "m4"))])).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(&err, StoreError::Journal { path, line: 2, .. } if *path == paths.journal_old),
            "{err}"
        );
        assert!(err.to_string().contains("s.json.journal.old"), "{err}");
    }

    #[test]
    fn a_bad_line_before_the_end_is_an_error() {
        let bytes = b"{\"n\":1,\"op\":\"leave\",\"token\":\"x\"}\ngarbage\n{\"n\":3,\"op\":\"leave\",\"token\":\"y\"}\n";
        let err = parse_journal(bytes).unwrap_err();
        assert_eq!(err.0, 2);
    }

    /// A whole last line (its newline written) that does not parse is no torn append: a
    /// write cut short ends without its newline. It is corruption, or a record this build
    /// does not know, and may have been acknowledged.
    #[test]
    fn a_whole_last_line_that_does_not_parse_is_an_error_and_a_cut_one_is_a_torn_tail() {
        for last in [&b"garbage\n"[..], b"{\"n\":3,\"op\":\"no_such_op\"}\n"] {
            let mut bytes = two_records();
            bytes.extend_from_slice(last);
            assert_eq!(parse_journal(&bytes).unwrap_err().0, 3, "{last:?}");
            let cut = &bytes[..bytes.len() - 1];
            let replay = parse_journal(cut).unwrap_or_else(|e| panic!("{last:?}: {e:?}"));
            assert!(replay.torn_tail, "{last:?}");
            assert_eq!(replay.records.len(), 2);
        }
    }

    #[test]
    fn a_record_numbered_at_the_end_of_the_range_is_an_error_even_last() {
        let bytes = b"{\"n\":1,\"op\":\"leave\",\"token\":\"x\"}\n{\"n\":18446744073709551615,\"op\":\"leave\",\"token\":\"y\"}\n";
        let err = parse_journal(bytes).unwrap_err();
        assert_eq!(err.0, 2);
    }

    /// An empty state file whose records run up to `journal_seq`.
    fn write_snapshot_at(paths: &Paths, journal_seq: u64) {
        let state = State {
            journal_seq,
            ..State::default()
        };
        fs::write(&paths.state, serde_json::to_vec(&state).unwrap()).unwrap();
    }

    /// Records 1 (create `a`) and 2 (join `m2`), as journal bytes.
    fn two_records() -> Vec<u8> {
        journal_bytes(&[(1, create("a", "h1")), (2, join("a", "m2"))])
    }

    /// A power cut during an append that was never `fdatasync`'d can leave the append as a
    /// zero-filled hole with later bytes after it: the first line holding a NUL and every
    /// line after it are a torn tail, wherever the hole starts and whatever follows it.
    #[test]
    fn a_zero_filled_hole_in_the_middle_and_everything_after_it_are_a_torn_tail() {
        let after = journal_bytes(&[(3, join("a", "m3")), (4, join("a", "m4"))]);
        let hole = |prefix: &[u8], zeros: &[u8]| {
            let mut bytes = two_records();
            bytes.extend_from_slice(prefix);
            bytes.extend_from_slice(zeros);
            bytes.extend_from_slice(&after);
            bytes
        };
        // `ignored` counts lines: a hole without a newline runs into the next record's line.
        for (what, bytes, ignored) in [
            // The hole starts inside an append: 3's line is half there.
            ("mid-line", hole(br#"{"n":3,"op":"jo"#, &[0; 29]), 2),
            ("whole blocks", hole(b"", &[0; 4096]), 2),
            ("holding newlines", hole(b"", b"\0\0\n\0\n"), 4),
            ("a single NUL", hole(b"", b"\0"), 2),
        ] {
            let replay = parse_journal(&bytes).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert!(replay.torn_tail, "{what}");
            let expected = ZeroHole {
                line: 3,
                lines: ignored,
            };
            assert_eq!(replay.zero_hole, Some(expected), "{what}");
            let ns: Vec<u64> = replay.records.iter().map(|entry| entry.n).collect();
            assert_eq!(ns, [1, 2], "{what}: only the records before the hole");
        }
    }

    /// A key given twice in the rooms or the tokens object is refused, naming it: a plain
    /// map kept the last copy and dropped the first without a word.
    #[test]
    fn a_room_or_token_given_twice_in_the_state_file_is_refused() {
        let host = |token: &str| {
            format!(r#"{{"username":"h","room_name":"a","is_host":true,"token":"{token}"}}"#)
        };
        let room = |token: &str| format!(r#"{{"host_token":"{token}","members":["{token}"]}}"#);
        let twice_rooms = format!(
            r#"{{"rooms":{{"a":{},"a":{}}},"tokens":{{"h1":{},"h2":{}}}}}"#,
            room("h1"),
            room("h2"),
            host("h1"),
            host("h2")
        );
        let twice_tokens = format!(
            r#"{{"rooms":{{"a":{}}},"tokens":{{"h1":{},"h1":{}}}}}"#,
            room("h1"),
            host("h1"),
            host("h1")
        );
        for (what, text, key) in [("rooms", twice_rooms, "a"), ("tokens", twice_tokens, "h1")] {
            let error = parse_state(text.as_bytes()).expect_err(what).to_string();
            assert!(
                error.contains(&format!("the key {key:?} is given twice")),
                "{what}: {error}"
            );
        }
        let once = format!(
            r#"{{"rooms":{{"a":{}}},"tokens":{{"h1":{}}}}}"#,
            room("h1"),
            host("h1")
        );
        let state = parse_state(once.as_bytes()).expect("each key once");
        assert_eq!((state.rooms.len(), state.tokens.len()), (1, 1));
    }

    /// Only a directory `fsync` that failed is marked as one: a directory that cannot be
    /// opened changed nothing and may be retried.
    #[test]
    fn only_a_failed_directory_fsync_is_marked_as_one() {
        let missing = Path::new("/nonexistent-ocm-dir/state.json");
        let not_opened = sync_dir(missing).expect_err("no such directory");
        assert!(!is_failed_dir_sync(&not_opened));
        let (_dir, paths) = temp_paths();
        sync_dir(&paths.state).expect("a directory that can be synced");
        // procfs refuses an fsync of its directories (EINVAL): a real failed fsync. (Not
        // where /proc is missing.)
        if !Path::new("/proc/self").is_dir() {
            return;
        }
        let failed = sync_dir(Path::new("/proc/self/x")).expect_err("fsync of /proc/self");
        assert_eq!(failed.kind(), io::ErrorKind::InvalidInput, "{failed}");
        assert!(is_failed_dir_sync(&failed), "{failed}");
        assert!(failed.to_string().contains("fsync of the directory failed"));
        assert!(!is_failed_dir_sync(&io::Error::from_raw_os_error(
            libc::EIO
        )));
    }

    /// A state file from a newer ocmd (a higher format version) is refused rather than loaded
    /// and rewritten without what this one does not know.
    #[test]
    fn a_state_file_of_a_newer_format_is_refused() {
        let (_dir, paths) = temp_paths();
        let file = |version: u32| {
            format!(r#"{{"version":{version},"rooms":{{}},"tokens":{{}},"future":[1]}}"#)
        };
        fs::write(&paths.state, file(STATE_VERSION + 1)).unwrap();
        let error = load(&paths).expect_err("a newer format").to_string();
        assert!(error.contains("written by a newer ocmd"), "{error}");
        fs::write(&paths.state, file(STATE_VERSION)).unwrap();
        assert!(load(&paths).is_ok(), "today's format");
    }

    /// A join replayed for a token the room already lists (a live backup's overlapping
    /// journals) lists it once; its leave takes it out.
    #[test]
    fn a_join_replayed_twice_lists_the_member_once() {
        let mut state = State::default();
        state.apply(&create("a", "h1"));
        state.apply(&join("a", "m2"));
        state.apply(&join("a", "m2"));
        assert_eq!(state.rooms["a"].members, ["h1", "m2"]);
        state.apply(&Record::Leave { token: "m2".into() });
        assert_eq!(state.rooms["a"].members, ["h1"]);
        assert!(!state.tokens.contains_key("m2"));
    }

    /// Joins numbered from `first` to `last` into room `a`, as journal lines.
    fn joins(first: u64, last: u64) -> Vec<u8> {
        let records: Vec<(u64, Record)> = (first..=last)
            .map(|n| (n, join("a", &format!("m{n}"))))
            .collect();
        journal_bytes(&records)
    }

    /// More than one append's worth of lines after a hole in the journal cannot be a torn
    /// append: records synced after it would be lost, so the load is refused, naming the
    /// hole's line. One append's worth, or a single line longer than that (written alone), is
    /// a torn append. In journal.old the hole is judged by what vouches for its records: a
    /// snapshot that holds them all lets it pass whatever follows it.
    #[test]
    fn a_hole_followed_by_more_than_one_append_is_damage_not_a_torn_tail() {
        let after = joins(3, 3000);
        assert!(after.len() > MAX_UNSYNCED_BYTES);
        let holed = |tail: &[u8]| [two_records(), tail.to_vec()].concat();
        let damaged = holed(&[vec![0; 4096], after.clone()].concat());
        let (_dir, paths) = temp_paths();
        fs::write(&paths.journal, &damaged).unwrap();
        match load(&paths) {
            Err(StoreError::Journal { line, reason, .. }) => {
                assert_eq!(line, 3);
                assert!(reason.contains("zero-filled hole") && reason.contains("damaged"));
            }
            other => panic!("a hole before 2,998 records: {other:?}"),
        }

        // Just one append's worth from the hole's line: a torn append.
        let mut tail = vec![0u8; 10];
        tail.extend_from_slice(&after);
        let cut = tail[..MAX_UNSYNCED_BYTES]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap();
        fs::write(&paths.journal, holed(&tail[..=cut])).unwrap();
        let loaded = load(&paths).expect("a torn append");
        assert!(loaded.torn_tail);
        assert_eq!(loaded.last_seq, 2);

        // The same with the space the writer laid down ahead after it: its NULs are not
        // counted, or every torn append into it would be taken for damage.
        let ahead = vec![0; SPACE_AHEAD_BYTES as usize];
        fs::write(&paths.journal, holed(&[&tail[..=cut], &ahead].concat())).unwrap();
        let loaded = load(&paths).expect("a torn append before the space ahead");
        assert!(loaded.torn_tail);
        assert_eq!(loaded.last_seq, 2);
        assert_eq!(
            loaded.journal_data_bytes,
            (two_records().len() + cut + 1) as u64
        );
        fs::write(&paths.journal, [damaged.as_slice(), &ahead].concat()).unwrap();
        assert!(matches!(
            load(&paths),
            Err(StoreError::Journal { line: 3, .. })
        ));

        // One line longer than a piece, torn: a torn append too.
        let long = [vec![0u8; MAX_UNSYNCED_BYTES + 1], b"\n".to_vec()].concat();
        fs::write(&paths.journal, holed(&long)).unwrap();
        let loaded = load(&paths).expect("one long torn line");
        assert_eq!(loaded.last_seq, 2);

        // The same damage in journal.old, behind a snapshot that holds all of it: nothing
        // is lost, and the load goes on.
        let mut state = State::default();
        state.apply(&create("a", "h1"));
        state.apply(&join("a", "m2"));
        for n in 3..=3000 {
            state.apply(&join("a", &format!("m{n}")));
        }
        state.journal_seq = 3000;
        write_state(&paths, &state);
        fs::write(&paths.journal_old, &damaged).unwrap();
        fs::write(&paths.journal, joins(3001, 3001)).unwrap();
        let loaded = load(&paths).expect("journal.old vouched for by the snapshot");
        assert_eq!(loaded.last_seq, 3001);
    }

    /// The bound is the documented 64 KiB (docs/OPERATIONS.md, docs/PERSISTENCE.md), which
    /// journals already on disk were written to: a hole with exactly that much data from its
    /// line on, over several lines, is a torn append; one byte more is damage.
    #[test]
    fn a_hole_is_a_torn_append_up_to_exactly_64_kib_after_it() {
        const DOCUMENTED: usize = 64 * 1024;
        let after = joins(3, 40);
        assert!(after.len() < DOCUMENTED / 2);
        let (_dir, paths) = temp_paths();
        for (extra, loads) in [(0, true), (1, false)] {
            // The hole's line: NUL bytes and a newline, filling the tail to the bound.
            let hole_line = [vec![0; DOCUMENTED - after.len() - 1 + extra], vec![b'\n']];
            let tail = [hole_line.concat(), after.clone()].concat();
            assert_eq!(tail.len(), DOCUMENTED + extra);
            fs::write(&paths.journal, [two_records(), tail].concat()).unwrap();
            match load(&paths) {
                Ok(loaded) if loads => {
                    assert!(loaded.torn_tail);
                    assert_eq!(loaded.last_seq, 2);
                }
                Err(StoreError::Journal { line: 3, .. }) if !loads => {}
                other => panic!("{extra} byte(s) over the bound: {other:?}"),
            }
        }
    }

    /// The writer's pieces: whole lines, none over the bound unless a single line is, and
    /// all of the bytes once, in order.
    #[test]
    fn sync_pieces_are_whole_lines_within_the_bound() {
        let long_line = [vec![b'x'; MAX_UNSYNCED_BYTES + 5], b"\n".to_vec()].concat();
        let cases = [
            Vec::new(),
            two_records(),
            joins(1, 3000),
            [joins(1, 10), long_line.clone(), joins(11, 2000)].concat(),
            [long_line.clone(), long_line.clone()].concat(),
        ];
        for bytes in cases {
            let pieces: Vec<&[u8]> = sync_pieces(&bytes).collect();
            assert_eq!(pieces.concat(), bytes);
            for piece in &pieces {
                assert!(piece.ends_with(b"\n"), "whole lines");
                let lines = piece.iter().filter(|&&b| b == b'\n').count();
                assert!(
                    piece.len() <= MAX_UNSYNCED_BYTES || lines == 1,
                    "{} bytes",
                    piece.len()
                );
            }
            if bytes.len() > MAX_UNSYNCED_BYTES {
                assert!(pieces.len() > 1);
            }
        }
    }

    #[test]
    fn nuls_at_the_end_are_space_ahead_and_a_hole_only_with_data_after_them() {
        // Zeros alone are the space the writer lays down ahead; zeros with newlines after them
        // (bits of the torn appends that reached the disk) are a hole, up to the last newline.
        for (zeros, lines) in [
            (&[0u8; 1][..], None),
            (&[0; 4096], None),
            (b"\0\0\n", Some(1)),
            (b"\0\n\0\0\n\0", Some(2)),
        ] {
            let mut bytes = two_records();
            bytes.extend_from_slice(zeros);
            let replay = parse_journal(&bytes).unwrap_or_else(|e| panic!("{zeros:?}: {e:?}"));
            assert_eq!(replay.torn_tail, lines.is_some(), "{zeros:?}");
            assert_eq!(
                replay.zero_hole,
                lines.map(|lines| ZeroHole { line: 3, lines }),
                "{zeros:?}"
            );
            assert_eq!(replay.records.len(), 2);
        }
    }

    /// NUL bytes at the end of journal.old are a hole, not space ahead (the writer cuts that
    /// off before it rotates): with no journal after it to vouch for the records they may have
    /// held, the load stops. The same bytes as the journal are its records and space ahead.
    #[test]
    fn nuls_at_the_end_of_journal_old_are_a_hole_not_space_ahead() {
        let (_dir, paths) = temp_paths();
        let with_nuls = [two_records(), vec![0; 4096]].concat();
        fs::write(&paths.journal_old, &with_nuls).unwrap();
        match load(&paths) {
            Err(StoreError::CutShort { line, .. }) => assert_eq!(line, 3),
            other => panic!("journal.old ending in NUL bytes: {other:?}"),
        }
        fs::remove_file(&paths.journal_old).unwrap();
        fs::write(&paths.journal, &with_nuls).unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(loaded.last_seq, 2);
        assert!(!loaded.torn_tail);
        assert_eq!(loaded.journal_data_bytes, two_records().len() as u64);
    }

    /// Through [`load`]: a hole in the journal ends it; a hole in journal.old (synced whole
    /// before its rotation) is accepted only when the journal goes on from the last record
    /// before it, and stops the load when the journal skips records or holds none after it.
    #[test]
    fn a_zero_filled_hole_ends_the_journal_and_journal_old_only_when_nothing_is_missing() {
        let mut holed = two_records();
        holed.extend_from_slice(&[0; 100]);
        holed.extend_from_slice(&journal_bytes(&[
            (3, join("a", "m3")),
            (4, join("a", "m4")),
        ]));

        let (_dir, paths) = temp_paths();
        fs::write(&paths.journal, &holed).unwrap();
        let loaded = load(&paths).unwrap();
        assert!(loaded.torn_tail);
        assert_eq!(
            loaded.zero_holes,
            [(paths.journal.clone(), ZeroHole { line: 3, lines: 2 })]
        );
        assert_eq!(&loaded.state.rooms["a"].members, &["h1", "m2"]);
        assert_eq!(loaded.last_seq, 2);

        let (_dir, paths) = temp_paths();
        fs::write(&paths.journal_old, &holed).unwrap();
        for journal in [
            None,
            Some(vec![]),
            Some(journal_bytes(&[(5, join("a", "m5"))])),
        ] {
            match &journal {
                Some(bytes) => fs::write(&paths.journal, bytes).unwrap(),
                None => {
                    let _ = fs::remove_file(&paths.journal);
                }
            }
            let err = load(&paths).unwrap_err();
            assert!(
                matches!(&err, StoreError::CutShort { line: 3, old } if *old == paths.journal_old),
                "journal {journal:?}: {err}"
            );
        }
        // Record 3 in the journal shows that the hole held no synced record.
        fs::write(&paths.journal, journal_bytes(&[(3, join("a", "m3"))])).unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(&loaded.state.rooms["a"].members, &["h1", "m2", "m3"]);
        assert_eq!(
            loaded.zero_holes,
            [(paths.journal_old.clone(), ZeroHole { line: 3, lines: 2 })]
        );
    }

    #[test]
    fn a_torn_journal_old_is_accepted_only_when_the_journal_goes_on_from_its_last_record() {
        let (_dir, paths) = temp_paths();
        let mut torn = two_records();
        torn.extend_from_slice(b"{\"n\":3,\"op\":\"jo");
        fs::write(&paths.journal_old, &torn).unwrap();
        // Only records the old journal already holds (a backup's overlap): nothing vouches
        // for the torn line, which was synced, so it may have held record 3.
        fs::write(&paths.journal, journal_bytes(&[(2, join("a", "m2"))])).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(&err, StoreError::CutShort { line: 3, old } if *old == paths.journal_old),
            "{err}"
        );
        // The record right after the last one applied: no gap, the torn line is ignored.
        fs::write(
            &paths.journal,
            journal_bytes(&[(2, join("a", "m2")), (3, join("a", "m3"))]),
        )
        .unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(&loaded.state.rooms["a"].members, &["h1", "m2", "m3"]);
        // A later record would be replayed across a gap: refused, naming the torn line.
        fs::write(&paths.journal, journal_bytes(&[(5, join("a", "m5"))])).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(&err, StoreError::CutShort { line: 3, old } if *old == paths.journal_old),
            "{err}"
        );
        // Without a journal after it, nothing bounds what the torn line held.
        fs::write(&paths.journal, b"").unwrap();
        assert!(matches!(load(&paths), Err(StoreError::CutShort { .. })));
        // After a start that accepted the tail and folded (the snapshot holds every record),
        // cut off before it removed journal.old: the journal, still whole, takes over at 3.
        write_snapshot_at(&paths, 4);
        fs::write(
            &paths.journal,
            journal_bytes(&[(3, join("a", "m3")), (4, join("a", "m4"))]),
        )
        .unwrap();
        assert_eq!(load(&paths).unwrap().last_seq, 4);
        // A journal that takes over at 5 leaves record 3 or 4 to the torn line: a snapshot
        // that holds 4 vouches for it, one that stops at 3 does not.
        fs::write(&paths.journal, journal_bytes(&[(5, join("a", "m5"))])).unwrap();
        assert_eq!(load(&paths).unwrap().last_seq, 5);
        write_snapshot_at(&paths, 3);
        assert!(matches!(
            load(&paths),
            Err(StoreError::CutShort { line: 3, .. })
        ));
    }

    /// A zero-filled hole can swallow several records, and whole lines after it are ignored:
    /// the records it may have held run up to the journal's first, and a snapshot must hold
    /// them all to vouch for it.
    #[test]
    fn a_hole_in_journal_old_is_vouched_for_only_up_to_the_journal_first_record() {
        let (_dir, paths) = temp_paths();
        let mut holed = two_records();
        holed.extend_from_slice(&[0; 64]);
        holed.extend_from_slice(&journal_bytes(&[
            (5, join("a", "m5")),
            (6, join("a", "m6")),
        ]));
        fs::write(&paths.journal_old, &holed).unwrap();
        fs::write(&paths.journal, journal_bytes(&[(7, join("a", "m7"))])).unwrap();
        for (journal_seq, loads) in [(5, false), (6, true)] {
            write_snapshot_at(&paths, journal_seq);
            assert_eq!(load(&paths).is_ok(), loads, "journal_seq {journal_seq}");
        }
    }

    /// Records are numbered one by one from the state file's `journal_seq` + 1: a record that
    /// skips ahead stops the load, naming the file, the line and the missing numbers, whether
    /// the gap follows the state file, comes between the journals or within one.
    #[test]
    fn a_gap_of_one_record_names_that_record_alone() {
        let (_dir, paths) = temp_paths();
        fs::write(&paths.journal, journal_bytes(&[(2, join("a", "m"))])).unwrap();
        let err = load(&paths).unwrap_err().to_string();
        assert!(
            err.contains("holds record 2 where record 1 was due: record 1 is missing ("),
            "{err}"
        );
    }

    #[test]
    fn a_gap_in_the_record_numbers_stops_the_load() {
        // No state file: the journals must start at record 1.
        let (_dir, paths) = temp_paths();
        fs::write(&paths.journal, journal_bytes(&[(1001, join("a", "m"))])).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Gap {
                    line: 1,
                    expected: 1,
                    found: 1001,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("the state file is missing"),
            "{err}"
        );
        // A state file older than the journal.
        write_snapshot_at(&paths, 10);
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Gap {
                    expected: 11,
                    found: 1001,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("records 11 to 1000 are missing"),
            "{err}"
        );
        // Between journal.old and the journal.
        let (_dir, paths) = temp_paths();
        fs::write(&paths.journal_old, two_records()).unwrap();
        fs::write(&paths.journal, journal_bytes(&[(4, join("a", "m4"))])).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(&err, StoreError::Gap { path, line: 1, expected: 3, found: 4, .. }
                if *path == paths.journal),
            "{err}"
        );
        // Within one journal, after records that followed on.
        fs::remove_file(&paths.journal_old).unwrap();
        let mut bytes = two_records();
        bytes.extend_from_slice(&journal_bytes(&[(7, join("a", "m7"))]));
        fs::write(&paths.journal, bytes).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Gap {
                    line: 3,
                    expected: 3,
                    found: 7,
                    ..
                }
            ),
            "{err}"
        );
        // Numbers that follow on from the state file load.
        write_snapshot_at(&paths, 0);
        fs::write(&paths.journal, two_records()).unwrap();
        assert_eq!(load(&paths).unwrap().last_seq, 2);
    }

    /// The hint says which file is most likely out of step: a state file older than the
    /// journals (the first record due is missing) is told apart from lost data (a gap after
    /// records that followed on).
    #[test]
    fn a_gap_after_the_state_file_blames_its_age_and_a_later_one_the_disk() {
        let (_dir, paths) = temp_paths();
        write_snapshot_at(&paths, 10);
        fs::write(&paths.journal, journal_bytes(&[(13, join("a", "m"))])).unwrap();
        let err = load(&paths).unwrap_err().to_string();
        assert!(
            err.contains("the state file is older than the journals"),
            "{err}"
        );
        fs::write(
            &paths.journal,
            journal_bytes(&[(11, create("a", "h")), (13, join("a", "m"))]),
        )
        .unwrap();
        let err = load(&paths).unwrap_err().to_string();
        assert!(err.contains("the disk lost written data"), "{err}");
    }

    /// A state file numbered past [`MAX_NUMBER`] is refused as unreadable, naming the bound,
    /// before any arithmetic on its number; [`MAX_NUMBER`] itself reads, and is refused only
    /// as past [`START_LIMIT`].
    #[test]
    fn a_state_file_numbered_past_the_range_is_refused_as_unreadable() {
        let (_dir, paths) = temp_paths();
        for journal_seq in [MAX_NUMBER + 1, u64::MAX] {
            write_snapshot_at(&paths, journal_seq);
            match load(&paths) {
                Err(StoreError::Parse { source, .. }) => {
                    assert!(source.to_string().contains(LAST_NUMBER), "{source}");
                }
                other => panic!("journal_seq {journal_seq}: {other:?}"),
            }
        }
        write_snapshot_at(&paths, MAX_NUMBER);
        assert!(
            matches!(load(&paths), Err(StoreError::NumbersExhausted { last, .. }) if last == MAX_NUMBER)
        );
    }

    /// [`START_LIMIT`] is the last record number a daemon starts from, not the first refused:
    /// a state file at it loads, and one record past it, in the journal, stops the load.
    #[test]
    fn a_load_ending_at_the_start_limit_starts_and_one_record_past_it_is_refused() {
        let (_dir, paths) = temp_paths();
        write_snapshot_at(&paths, START_LIMIT);
        assert_eq!(load(&paths).unwrap().last_seq, START_LIMIT);
        fs::write(
            &paths.journal,
            journal_bytes(&[(START_LIMIT + 1, create("a", "h"))]),
        )
        .unwrap();
        assert!(matches!(
            load(&paths),
            Err(StoreError::NumbersExhausted { last, .. }) if last == START_LIMIT + 1
        ));
    }

    /// `restrict_to_owner` takes the group and other permissions off a state file that has
    /// some, keeping the owner's, and leaves a file that has none as it is (a set-user-ID bit
    /// included).
    #[test]
    fn a_state_file_readable_by_others_is_restricted_to_its_owner_and_a_private_one_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, paths) = temp_paths();
        let file = File::create(&paths.state).unwrap();
        for (before, after) in [
            (0o644, 0o600),
            (0o777, 0o700),
            (0o640, 0o600),
            (0o604, 0o600),
            (0o600, 0o600),
            (0o4600, 0o4600),
            (0o400, 0o400),
        ] {
            file.set_permissions(fs::Permissions::from_mode(before))
                .unwrap();
            restrict_to_owner(&file, &paths.state);
            let mode = file.metadata().unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, after, "{before:o} became {mode:o}");
        }
    }

    /// A bad line without a NUL byte is not a crash artifact: acknowledged records may follow
    /// it, so it stops the load even when a hole comes later, and in journal.old too.
    #[test]
    fn a_bad_line_without_a_nul_before_the_end_is_still_an_error() {
        for (bad, later_hole) in [
            (&b"garbage\n"[..], false),
            (b"{\"n\":3,\"op\":\"jo\n", false),
            (b"\x01\xff\n", true),
            (b"{\"n\":3,\"op\":\"jo\n", true),
        ] {
            let mut bytes = two_records();
            bytes.extend_from_slice(bad);
            bytes.extend_from_slice(&journal_bytes(&[(4, join("a", "m4"))]));
            if later_hole {
                bytes.extend_from_slice(&[0; 64]);
            }
            let err = parse_journal(&bytes).unwrap_err();
            assert_eq!(err.0, 3, "{bad:?}, then a hole: {later_hole}");
            let (_dir, paths) = temp_paths();
            fs::write(&paths.journal_old, &bytes).unwrap();
            let err = load(&paths).unwrap_err();
            assert!(
                matches!(&err, StoreError::Journal { path, line: 3, .. } if *path == paths.journal_old),
                "{err}"
            );
        }
    }

    #[test]
    fn corrupt_state_file_is_an_error_naming_the_file() {
        let (_dir, paths) = temp_paths();
        fs::write(&paths.state, b"{ not json").unwrap();
        let err = load(&paths).unwrap_err();
        assert!(err.to_string().contains("s.json"), "{err}");
    }

    #[test]
    fn json_of_another_shape_is_refused() {
        for text in [
            "[]",
            "[1]",
            "[1, {}, {}, null, 0]",
            "{}",
            "{\"unknown\": 1}",
            "{\"version\": 1, \"journal_seq\": 4}",
            "3",
            "-3",
            "2.5",
            "true",
            "null",
            "\"rooms\"",
        ] {
            let err = parse_state(text.as_bytes()).expect_err(text).to_string();
            assert!(err.contains("not an ocm state file"), "{text}: {err}");
        }
        // Right shape, wrong contents or syntax: the parser's own message.
        for text in [
            "{\"rooms\": 5}",
            "{\"rooms\": {}} trailing",
            "{\"rooms\": {}, \"rooms\": {}}",
        ] {
            let err = parse_state(text.as_bytes()).expect_err(text).to_string();
            assert!(!err.contains("not an ocm state file"), "{text}: {err}");
        }
        assert!(parse_state(b"{\"rooms\": {}}").is_ok());
        assert!(parse_state(b"{\"tokens\": {}, \"rooms\": {}}").is_ok());
        // Escaped keys are keys too.
        assert!(parse_state(b"{\"r\\u006foms\": {}}").is_ok());
    }

    #[test]
    fn a_failed_atomic_write_leaves_the_old_file_and_no_temporary() {
        let (_dir, paths) = temp_paths();
        write_atomic(&paths.state, b"old").unwrap();
        let err = write_atomic_with(&paths.state, |file| {
            file.write_all(&[b'x'; 100_000])?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        let mut tmp = paths.state.as_os_str().to_owned();
        tmp.push(".tmp");
        assert_eq!(
            err.to_string(),
            format!("{}: disk full", Path::new(&tmp).display())
        );
        assert_eq!(fs::read(&paths.state).unwrap(), b"old");
        assert!(!Path::new(&tmp).exists(), "the partial file is removed");
        assert_eq!(
            write_atomic_with(&paths.state, |f| f.write_all(b"new")).unwrap(),
            3
        );
        assert_eq!(fs::read(&paths.state).unwrap(), b"new");
    }

    /// A room and a member that use nothing of ocmd's own are written in the original's
    /// shape, none of the optional keys added (the module doc: its tools read our files); an
    /// optional key is written when it holds something, and reads back.
    #[test]
    fn a_plain_room_and_member_are_written_in_the_originals_shape() {
        let mut state = State::default();
        state.apply(&create("r", "h"));
        state.apply(&Record::Register {
            token: "h".into(),
            address: "[::1]:9".parse().unwrap(),
            local: None,
        });
        let bytes = state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap();
        let file: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let keys = |value: &serde_json::Value| {
            let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(
            keys(&file["rooms"]["r"]),
            ["created_at", "host_token", "members"]
        );
        assert_eq!(
            keys(&file["tokens"]["h"]),
            ["address", "is_host", "room_name", "username"]
        );
        assert_eq!(
            file["tokens"]["h"]["address"],
            serde_json::json!(["::1", 9])
        );

        let room = state.rooms.get_mut("r").unwrap();
        (room.listed, room.next_seq) = (false, 5);
        state.tokens.get_mut("h").unwrap().caps = 3;
        let bytes = state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(parse_state(&bytes).unwrap(), state);
    }

    /// In the original's file only a name that starts with a quote is taken for a JSON
    /// string: one with a space before the quotes is a name a client chose, kept as it is.
    #[test]
    fn the_originals_names_are_unquoted_only_when_they_start_with_a_quote() {
        let text = r#"{"rooms": {}, "tokens": {
            "a": {"username": " \"x\"", "room_name": "r"},
            "b": {"username": "\"y\" ", "room_name": "r"}}}"#;
        let mut state = parse_state(text.as_bytes()).unwrap();
        state.normalize();
        assert_eq!(state.tokens["a"].username, " \"x\"");
        assert_eq!(state.tokens["b"].username, "y");
    }

    /// Only a missing file is taken for an empty one: a state file or journal that is there
    /// but cannot be opened (here a symlink loop) stops the load, naming it, rather than
    /// being skipped with the records it holds.
    #[test]
    fn a_file_that_cannot_be_opened_stops_the_load_naming_it() {
        for which in 0..3 {
            let (_dir, paths) = temp_paths();
            let path = [&paths.state, &paths.journal_old, &paths.journal][which];
            std::os::unix::fs::symlink(path, path).unwrap();
            match load(&paths) {
                Err(StoreError::Read { path: named, .. }) => assert_eq!(&named, path),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }

    /// A `rooms` value that is not an object is refused, saying what was expected.
    #[test]
    fn rooms_that_are_not_an_object_are_refused_saying_what_was_expected() {
        let err = parse_state(br#"{"rooms": 5}"#).unwrap_err().to_string();
        assert!(err.contains("expected a JSON object"), "{err}");
    }

    /// A crash mid-write leaves the temporary file behind: the next write replaces it
    /// rather than failing on the exclusive create.
    #[test]
    fn a_temporary_file_left_by_a_crash_is_replaced() {
        let (_dir, paths) = temp_paths();
        let mut tmp = paths.state.as_os_str().to_owned();
        tmp.push(".tmp");
        fs::write(&tmp, b"half a snapshot").unwrap();
        write_atomic(&paths.state, b"whole").expect("the leftover is replaced");
        assert_eq!(fs::read(&paths.state).unwrap(), b"whole");
        assert!(!Path::new(&tmp).exists());
    }

    /// Something in the way of the temporary file (here a directory, which an exclusive
    /// create and the removal of a leftover both refuse) fails the write with an error that
    /// names the temporary file: the caller names the state file, which is fine.
    #[test]
    fn an_error_of_the_temporary_file_names_it() {
        let (_dir, paths) = temp_paths();
        let mut tmp = paths.state.as_os_str().to_owned();
        tmp.push(".tmp");
        fs::create_dir(&tmp).unwrap();
        let err = write_atomic(&paths.state, b"x").unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: ", Path::new(&tmp).display())),
            "{err}"
        );
        assert!(!paths.state.exists(), "nothing was written");
    }

    /// A temporary file that cannot be created (here in sysfs, which refuses it) fails the
    /// write with the creation's own error, not with that of removing a leftover that is
    /// not there (`NotFound`, which would send the operator looking for a missing file).
    #[test]
    fn a_temporary_file_that_cannot_be_created_fails_with_the_reason() {
        if !Path::new("/sys/kernel").is_dir() {
            return crate::test_shared::skipped("this host has no sysfs");
        }
        let err = write_atomic(Path::new("/sys/ocm-state.json"), b"x").unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    /// A state path without a directory part (`--state room_manager.json`) lives in the
    /// working directory, and that is the directory synced.
    #[test]
    fn a_bare_file_name_syncs_the_working_directory() {
        sync_dir(Path::new("room_manager.json")).expect("the working directory is synced");
    }

    #[test]
    fn missing_file_is_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(&Paths::new(&dir.path().join("none.json"))).unwrap();
        assert!(loaded.state.rooms.is_empty());
        assert_eq!(loaded.last_seq, 0);
    }

    #[test]
    fn replaying_twice_changes_nothing() {
        let records = [
            create("a", "h"),
            Record::Join {
                room: "a".into(),
                member: member("m", "bob"),
            },
            Record::Leave { token: "m".into() },
            Record::CloseRoom { room: "a".into() },
            create("a", "h2"),
            Record::Join {
                room: "a".into(),
                member: member("m2", "cy"),
            },
        ];
        let mut once = State::default();
        records.iter().for_each(|r| once.apply(r));
        let mut twice = once.clone();
        records.iter().for_each(|r| twice.apply(r));
        assert_eq!(once, twice);
        assert_eq!(once.rooms["a"].members, vec!["h2", "m2"]);
    }
}
