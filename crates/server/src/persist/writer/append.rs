//! Appending to the journal: the file it writes (behind a trait tests replace), a durable
//! append that retries until the disk takes it, and opening the journal for appends.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use log::{error, warn};

use crate::persist::failing::Failing;
use crate::persist::statx::link_count;
use crate::persist::{counters, Compactions};
use crate::store;

/// What the writer does to its journal: a file it writes at the end of its lines (into the
/// space laid down ahead, or past the file's end) and can cut back. The file is the real one;
/// tests put a file that fails on demand in its place.
pub(in crate::persist) trait JournalFile {
    /// Writes `bytes` at `offset`, the end of the journal's whole lines.
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the appended bytes durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    /// Whether the file still has a name, so that a start will read what was synced into it.
    fn linked(&mut self) -> io::Result<bool>;
    /// Cuts the file back to `len` bytes.
    fn cut(&mut self, len: u64) -> io::Result<()>;
}

impl JournalFile for File {
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(bytes, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
    fn linked(&mut self) -> io::Result<bool> {
        link_count(self).map(|links| links > 0)
    }
    fn cut(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// The journal was deleted while open (its directory removed, a cleaner let loose on it): it
/// still takes writes and syncs, which no start will ever read. Nothing synced into it is
/// durable, and a reply must not say it is ([`super::Writer::replace_journal`]).
#[derive(Debug, PartialEq, Eq)]
pub(in crate::persist) struct JournalDeleted;

/// Appends `bytes` to a journal of `len` whole bytes and makes them durable, retrying every
/// `retry` until the disk takes them: a token is only ever acknowledged once this returns.
/// Returns whether the journal was cut back on the way (which drops the space laid down
/// ahead of the appends), or [`JournalDeleted`] at once when a synced piece went into a
/// journal that no longer has a name: retrying into it would never make the bytes durable.
///
/// After a failed append (a short write, a failed fsync) the journal is cut back to `len`
/// before anything is written again, and the cut itself is retried until it works, so that
/// while the disk fails the journal holds its whole lines and nothing after them. (The retry
/// writes the same piece at the same place, over any fragment; the cut keeps a crash during
/// the retries from leaving one, and drops the space laid down ahead, laid again later.)
///
/// The bytes go in pieces of at most [`store::MAX_UNSYNCED_BYTES`] (whole lines; a longer
/// line alone), each synced before the next is written, so that a crash can leave no more
/// than that unsynced: the bound by which the next start tells a torn append from a damaged
/// journal ([`store::load`]).
pub(in crate::persist) fn append_durably(
    journal: &mut impl JournalFile,
    mut len: u64,
    bytes: &[u8],
    retry: Duration,
    path: &Path,
    stats: &Mutex<Compactions>,
) -> Result<bool, JournalDeleted> {
    let mut cut = false;
    let mut appends = Failing::default();
    let mut cuts = Failing::default();
    for piece in store::sync_pieces(bytes) {
        loop {
            // A piece counts as durable only once synced into a journal seen to have a name:
            // when even the look at its names fails (`statx`, then `fstat`), it is retried
            // as a failed write is, rather than acknowledged into a file a start may not read.
            let appended = journal
                .write_at(piece, len)
                .and_then(|()| journal.sync())
                .and_then(|()| journal.linked());
            let e = match appended {
                Ok(true) => break,
                Ok(false) => {
                    counters(stats).write_failures += 1;
                    return Err(JournalDeleted);
                }
                Err(e) => e,
            };
            counters(stats).write_failures += 1;
            if let Some(note) = appends.failed(Instant::now()) {
                error!(
                    "cannot append to journal {}: {e}; retrying every {retry:?}{note}",
                    path.display()
                );
            }
            while let Err(e) = journal.cut(len) {
                counters(stats).write_failures += 1;
                if let Some(note) = cuts.failed(Instant::now()) {
                    error!(
                        "cannot cut journal {} back to its last whole line: {e}; retrying \
                         every {retry:?}{note}",
                        path.display()
                    );
                }
                thread::sleep(retry);
            }
            if let Some(tally) = cuts.ended(Instant::now()) {
                // Its failures are counted in `write_failures` too: said apart from the
                // appends' own tally, they add up to it.
                warn!(
                    "journal {} can be cut back again, after {tally}",
                    path.display()
                );
            }
            cut = true;
            thread::sleep(retry);
        }
        len += piece.len() as u64;
    }
    if let Some(tally) = appends.ended(Instant::now()) {
        // At the failure's neighbouring level, so that `journalctl -p warning` shows both.
        warn!(
            "journal {} takes writes again, after {tally}",
            path.display()
        );
    }
    Ok(cut)
}

/// Opens (creating it if needed) the journal for writing, and makes its directory entry
/// durable, since a record in it is acknowledged as soon as the record itself is fsync'd.
/// Not with `O_APPEND`: appends go at the end of the lines, into the space laid down ahead.
pub(in crate::persist) fn open_journal(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        // Its records are replayed at start, and it is emptied only once they are folded.
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    store::sync_dir(path)?;
    Ok(file)
}
