//! Loading at start: the state file, then `journal.old` and the journal replayed onto it, with
//! the checks that tell a torn append (never acknowledged, ignored) from damage or missing
//! records (the load stops, naming the file and the line).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::{parse_state, State, MAX_NUMBER, STATE_VERSION};
use crate::error::StoreError;
use crate::journal::{
    scan_journal, Ending, Entry, Replay, ScanError, ZeroHole, LAST_NUMBER, MAX_UNSYNCED_BYTES,
};

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
    /// `room_manager.json.backup`: a state file written on request (SIGUSR1) for the operator
    /// to copy; never read by the daemon.
    pub backup: PathBuf,
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
            backup: with(".backup"),
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
    /// The journal's bytes before the space written ahead ([`super::SPACE_AHEAD_BYTES`]): 0 when
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
/// [`super::parse_journal`]) is accepted at the end of the journal: it holds an append that no
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
    /// journal.old's NUL bytes, when nothing else follows its first ([`Replay::nul_tail_bytes`]).
    old_nul_tail: Option<u64>,
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
            old_nul_tail: None,
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
            return Err(self.unvouched_old_tail(line));
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
            self.old_nul_tail = replay.nul_tail_bytes;
        }
    }

    /// The load's error for journal.old's torn tail from `line`, which no journal record after
    /// it vouched for: cut short, or, when nothing but NUL bytes ends it, either a live
    /// journal moved to its name or synced records lost (the start cannot tell which).
    fn unvouched_old_tail(&self, line: usize) -> StoreError {
        match self.old_nul_tail {
            Some(bytes) => StoreError::OldEndsInNuls {
                old: self.paths.journal_old.clone(),
                line,
                bytes,
                journal: self.paths.journal.clone(),
            },
            None => StoreError::CutShort {
                old: self.paths.journal_old.clone(),
                line,
            },
        }
    }

    /// Ends the load: journal.old's torn tail must have been vouched for, and the record
    /// numbers must not be spent.
    fn finish(mut self) -> Result<Loaded, StoreError> {
        if let Some((line, _)) = self.old_tail {
            // No journal after journal.old's torn tail shows that no synced record was in it.
            return Err(self.unvouched_old_tail(line));
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

/// The largest last record number a daemon starts from: 2^62. From there the writer would
/// need 2^62 − 1 records more (centuries of appends) to pass [`MAX_NUMBER`], so its count
/// never wraps (a number that wrapped to 0 would be skipped at the next load as already
/// folded). A daemon started right at the limit writes past it, and the next start is
/// refused, the files untouched: only an edited file gets there.
pub const START_LIMIT: u64 = 1 << 62;
