//! The writer thread: appends each batch of records to the journal and makes it durable
//! (group commit), wakes the loop, hands durable records to the compactor in lots, rotates
//! the journal when a compaction is due, and writes the journal and state file again when
//! one is deleted while in use.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::backoff::{self, LayBackoff};
use super::compactor::{log_written, remove_journal_old, write_snapshot, Compactor};
use super::statx::{identity_at, identity_of, link_count};
use super::{
    counters, Command, Compactions, Done, FileError, HardLinks, Job, LockState, Options, Report,
    APPLY_LOT, RETRY_DELAY,
};
use crate::error::StoreError;
use crate::plural::Count;
use crate::record::Record;
use crate::store::{self, JournalLine, Loaded, Paths, State, ZeroHole, SPACE_AHEAD_BYTES};

/// What the start-up fold says about a torn tail it ignored: a torn final line, or a
/// zero-filled hole and the lines after it (either is an append that was never acknowledged).
fn torn_tail_note(torn_tail: bool, zero_holes: &[(PathBuf, ZeroHole)]) -> String {
    if zero_holes.is_empty() {
        return if torn_tail {
            " (a torn final line was ignored)".to_owned()
        } else {
            String::new()
        };
    }
    let holes: Vec<String> = zero_holes
        .iter()
        .map(|(path, hole)| {
            format!(
                "{} from line {}: {}, starting at a zero-filled hole",
                path.display(),
                hole.line,
                Count(hole.lines, "line")
            )
        })
        .collect();
    format!(" (a torn tail was ignored: {})", holes.join("; "))
}

/// How long the writer waits idle before it checks that its files are still there, and how
/// often at most it checks between appends ([`Writer::check_files`]).
pub(super) const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A file's identity: its device and inode.
fn file_id(metadata: &fs::Metadata) -> (u64, u64) {
    (metadata.dev(), metadata.ino())
}

/// Whether nothing has the name `path` (an error other than "not found" says nothing: it is
/// taken as there).
fn is_missing(path: &Path) -> bool {
    fs::symlink_metadata(path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// How often a failure that lasts is logged again: a full disk retried every second would
/// otherwise log a line a second for as long as it lasts.
pub(super) const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// One kind of write failure retried every second, logged without flooding the log: the
/// first failure of a run, then at most one line every [`FAILURE_LOG_INTERVAL`] while it
/// lasts, each with the tally so far; and the end of the run, once.
#[derive(Debug, Default)]
pub(super) struct Failing {
    /// The run: when its first failure came, its failures, and when one was last logged.
    run: Option<(Instant, u64, Instant)>,
}

impl Failing {
    /// Counts a failure at `now`. Returns what to add to its log line ("" for the first of
    /// a run, the tally for a reminder), or `None` when it is not to be logged.
    pub(super) fn failed(&mut self, now: Instant) -> Option<String> {
        let Some((since, tries, logged)) = &mut self.run else {
            self.run = Some((now, 1, now));
            return Some(String::new());
        };
        *tries += 1;
        if now.saturating_duration_since(*logged) < FAILURE_LOG_INTERVAL {
            return None;
        }
        *logged = now;
        Some(format!(
            " (still failing: {} over {} s)",
            Count(*tries as usize, "failed attempt"),
            now.saturating_duration_since(*since).as_secs()
        ))
    }

    /// The run ended at `now` (the write worked): returns its tally, if there was one.
    pub(super) fn ended(&mut self, now: Instant) -> Option<String> {
        let (since, tries, _) = self.run.take()?;
        Some(format!(
            "{} over {} s",
            Count(tries as usize, "failed attempt"),
            now.saturating_duration_since(since).as_secs()
        ))
    }
}

/// The writer thread's side: the journal, and the hand-off to the compactor.
pub(super) struct Writer {
    paths: Paths,
    options: Options,
    journal: File,
    /// Bytes of whole lines in the journal: where the next append goes.
    journal_len: u64,
    /// Where the NUL bytes laid down ahead of the appends end (the file's size when they were
    /// laid; at most `journal_len` once the appends have caught up with them).
    ahead_end: u64,
    /// Failures to lay them down: when to try again, and what to log.
    ahead_backoff: LayBackoff,
    /// Size of the last state file written.
    snapshot_len: u64,
    /// A state file was there at start or has been written since: if it goes missing, the
    /// journals alone no longer hold the state ([`Writer::check_files`]).
    state_written: bool,
    /// When [`Writer::check_files`] last looked.
    files_checked_at: Instant,
    /// The lock file the daemon holds (device and inode), once it took it: if another file
    /// takes its name, or none, another `ocmd` could start on this state
    /// ([`Writer::check_lock`]).
    lock_held: Option<(u64, u64)>,
    /// The lock taken again after its file was deleted, held for as long as the writer runs.
    relock: Option<File>,
    /// Failures to take it again, logged without a line at every check.
    relock_failing: Failing,
    /// The state file, and the journal, found with more than one name by the file check
    /// ([`Writer::check_names`]), said without a line at every check.
    state_names: Failing,
    journal_names: Failing,
    next_n: u64,
    line: Vec<u8>,
    /// Durable records not yet handed to the compactor (fewer than [`APPLY_LOT`] between
    /// writes).
    unapplied: Vec<Record>,
    /// `None` once the compactor stopped (at shutdown) or died.
    compactor: Option<Compactor>,
    /// A compaction was asked for and has not reported yet.
    compacting: bool,
    /// `journal.old` exists: its records are in no state file yet, so the journal must not be
    /// rotated onto it.
    journal_old: bool,
    /// After a failure, no compaction starts before this.
    retry_at: Option<Instant>,
    /// Failures to rotate the journal, logged without a line at every retry.
    rotate_failing: Failing,
    stats: Arc<Mutex<Compactions>>,
}

/// What the writer does to its journal: a file it writes at the end of its lines (into the
/// space laid down ahead, or past the file's end) and can cut back. The file is the real one;
/// tests put a file that fails on demand in its place.
pub(super) trait JournalFile {
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
/// durable, and a reply must not say it is ([`Writer::replace_journal`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct JournalDeleted;

/// How the journal the writer appends to is gone from where a start reads it
/// ([`Writer::replace_journal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JournalGone {
    /// It has no name left: deleted (seen after a sync, or by the file check).
    Deleted,
    /// It still has a name, but not the journal's: renamed away, or the journal's name
    /// removed while the file had another (a hard link). Seen by the file check only, up to
    /// [`FILE_CHECK_INTERVAL`] later: appends meanwhile are acknowledged into a file that a
    /// start would not read.
    NotAtItsName,
}

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
pub(super) fn append_durably(
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
            cuts = Failing::default();
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

/// Lays down `bytes` NUL bytes at `offset` of the journal and makes them durable.
pub(super) fn lay_space_ahead(journal: &File, offset: u64, bytes: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut written = 0;
    while written < bytes {
        let n = (bytes - written).min(ZEROS.len() as u64);
        journal.write_all_at(&ZEROS[..n as usize], offset + written)?;
        written += n;
    }
    journal.sync_data()
}

/// Bytes free to an unprivileged writer on the file system holding `file` (`fstatvfs`).
pub(super) fn free_bytes(file: &File) -> io::Result<u64> {
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs fills the buffer for the descriptor `file` keeps open; the buffer is
    // read only when the call succeeded.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialized by the successful fstatvfs above.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Opens (creating it if needed) the journal for writing, and makes its directory entry
/// durable, since a record in it is acknowledged as soon as the record itself is fsync'd.
/// Not with `O_APPEND`: appends go at the end of the lines, into the space laid down ahead.
pub(super) fn open_journal(path: &Path) -> io::Result<File> {
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

/// Records one group commit takes at most (whole batches only, so one batch may bring it
/// over): after a stall, the backlog goes to disk in writes of bounded size, each of which
/// releases its replies, rather than in one write that the disk space freed after an
/// `ENOSPC` may never fit again.
pub(super) const MAX_GROUP_RECORDS: usize = 4096;

/// Bytes of the serialized line buffer kept between writes; a larger one (a big history
/// checkpoint, a group after a stall) is given back.
const LINE_KEEP_BYTES: usize = 1024 * 1024;

/// Group commit: adds the batches already queued behind `first` to its records, until they
/// hold [`MAX_GROUP_RECORDS`]. Returns the last batch taken, the records, and whether a
/// shutdown was queued behind them.
pub(super) fn take_queued(
    rx: &Receiver<Command>,
    first: u64,
    mut records: Vec<Record>,
) -> (u64, Vec<Record>, bool) {
    let mut last = first;
    loop {
        if records.len() >= MAX_GROUP_RECORDS {
            return (last, records, false);
        }
        match rx.try_recv() {
            Ok(Command::Append {
                batch,
                records: more,
            }) => {
                last = batch;
                records.extend(more);
            }
            Ok(Command::Shutdown) => return (last, records, true),
            Err(_) => return (last, records, false),
        }
    }
}

impl Writer {
    pub(super) fn open(
        paths: Paths,
        loaded: Loaded,
        options: Options,
        stats: Arc<Mutex<Compactions>>,
        waker: Arc<mio::Waker>,
    ) -> Result<Writer, StoreError> {
        let journal = open_journal(&paths.journal).map_err(|source| StoreError::Write {
            path: paths.journal.clone(),
            source,
        })?;
        store::restrict_to_owner(&journal, &paths.journal);
        if let Ok(snapshot) = File::open(&paths.state) {
            // Rewritten (0600) only once something changes, which may be long after start.
            store::restrict_to_owner(&snapshot, &paths.state);
        }
        // Folded below if it holds anything but space laid down ahead, which is kept.
        let file_len = journal.metadata().map(|m| m.len()).unwrap_or(0);
        let snapshot = fs::metadata(&paths.state).ok();
        // The daemon took the lock just before: the file at its name is the one it holds.
        let lock_held = fs::metadata(&paths.lock).ok().map(|m| file_id(&m));
        let mut state = loaded.state;
        let mut writer = Writer {
            paths,
            options,
            journal,
            journal_len: loaded.journal_data_bytes,
            ahead_end: file_len,
            ahead_backoff: LayBackoff::default(),
            snapshot_len: snapshot.as_ref().map_or(0, fs::Metadata::len),
            state_written: snapshot.is_some(),
            files_checked_at: Instant::now(),
            lock_held,
            relock: None,
            relock_failing: Failing::default(),
            state_names: Failing::default(),
            journal_names: Failing::default(),
            next_n: loaded.last_seq + 1,
            line: Vec::new(),
            unapplied: Vec::new(),
            compactor: None,
            compacting: false,
            journal_old: loaded.journal_old,
            retry_at: None,
            rotate_failing: Failing::default(),
            stats,
        };
        if loaded.journal_data_bytes > 0 || loaded.journal_old {
            writer.fold(&mut state)?;
            info!(
                "state: folded {} into {}{}",
                Count(loaded.replayed, "journal record"),
                writer.paths.state.display(),
                torn_tail_note(loaded.torn_tail, &loaded.zero_holes)
            );
            if !loaded.zero_holes.is_empty() {
                // Normal after a crash or power cut; after neither, the disk lost synced data.
                warn!(
                    "state: a zero-filled hole ended a journal, and it was ignored with \
                     whatever followed it; this is expected only after a crash or power loss, \
                     otherwise check the disk"
                );
            }
        }
        writer.compactor = Some(Compactor::spawn(
            writer.paths.clone(),
            state,
            Arc::clone(&writer.stats),
            waker,
        )?);
        Ok(writer)
    }

    /// Serves `rx` until it is told to stop or the loop is gone; returns whether the last
    /// act, the final fold, put every change in the state file ([`Writer::finish`]).
    pub(super) fn run(
        &mut self,
        rx: Receiver<Command>,
        done: Sender<Done>,
        waker: Arc<mio::Waker>,
    ) -> bool {
        loop {
            let command = match rx.recv_timeout(FILE_CHECK_INTERVAL) {
                Ok(command) => command,
                Err(RecvTimeoutError::Timeout) => {
                    self.check_files();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return false,
            };
            match command {
                Command::Append { batch, records } => {
                    let started = Instant::now();
                    let (last, records, stop) = take_queued(&rx, batch, records);
                    self.append(&records);
                    let report = Done {
                        batch: last,
                        records: records.len(),
                        elapsed: started.elapsed(),
                    };
                    if done.send(report).is_err() {
                        return false;
                    }
                    if let Err(e) = waker.wake() {
                        error!("cannot wake the event loop: {e}");
                    }
                    self.forward(records);
                    if stop {
                        return self.finish();
                    }
                    self.maybe_compact();
                    self.keep_space_ahead();
                    if self.files_checked_at.elapsed() >= FILE_CHECK_INTERVAL {
                        self.check_files();
                    }
                }
                Command::Shutdown => return self.finish(),
            }
        }
    }

    /// Appends and fsyncs the records, retrying until the disk takes them: a token is only
    /// ever acknowledged once this returns.
    pub(super) fn append(&mut self, records: &[Record]) {
        self.line.clear();
        let first_n = self.next_n;
        for (i, record) in records.iter().enumerate() {
            let line = JournalLine {
                n: first_n + i as u64,
                record,
            };
            // Plain data with string keys: serialization cannot fail.
            let _ = serde_json::to_writer(&mut self.line, &line);
            self.line.push(b'\n');
        }
        let cut = loop {
            match append_durably(
                &mut self.journal,
                self.journal_len,
                &self.line,
                RETRY_DELAY,
                &self.paths.journal,
                &self.stats,
            ) {
                Ok(cut) => break cut,
                // Into the fresh journal, from its start: the state file now holds every
                // record before these.
                Err(JournalDeleted) => self.replace_journal(JournalGone::Deleted),
            }
        };
        self.journal_len += self.line.len() as u64;
        if cut {
            self.ahead_end = self.journal_len;
        }
        // Cannot wrap: the load refuses to start past `store::START_LIMIT`, 2^62 numbers short.
        self.next_n += records.len() as u64;
        if self.line.capacity() > LINE_KEEP_BYTES {
            self.line = Vec::new();
        }
        debug!("journal: {} records durable", records.len());
    }

    /// Checks that the files a start reads are still there, and writes them again from memory
    /// if not: a journal deleted while in use, or no longer the file at its name (renamed
    /// away, or its own name removed while it had another: [`Writer::replace_journal`]), a
    /// `journal.old` kept after a failed compaction and deleted, or a state file deleted (the
    /// journals hold only the changes since it was written). Done when the writer has been
    /// idle for [`FILE_CHECK_INTERVAL`], and at most that often between appends (each of
    /// which checks that the journal has a name, but not which).
    ///
    /// Only the journal's identity is compared, because only the journal is kept open: the
    /// state file and `journal.old` are looked for by name, and a state file renamed away or
    /// whose name was removed leaves that name empty, which is what the check finds. (The
    /// state file's inode changes at each compaction, which renames a new file over it, so
    /// an identity kept here would have to follow the compactor's reports for nothing more.)
    pub(super) fn check_files(&mut self) {
        self.files_checked_at = Instant::now();
        self.check_lock();
        let journal_links = link_count(&self.journal);
        if matches!(journal_links, Ok(0)) {
            self.replace_journal(JournalGone::Deleted);
            return;
        }
        if !self.journal_at_its_name() {
            self.replace_journal(JournalGone::NotAtItsName);
            return;
        }
        self.check_names(journal_links.unwrap_or(1));
        // A running compaction writes the state file from memory whatever became of
        // journal.old (and removes it itself), so only one kept after a failure is looked for.
        self.collect_reports();
        if self.journal_old && !self.compacting && is_missing(&self.paths.journal_old) {
            self.rewrite_after_deletion(
                format!(
                    "{} was deleted while in use: the changes it held since the last state \
                     file, up to its rotation, are on no disk",
                    self.paths.journal_old.display()
                ),
                "journal.old",
            );
            return;
        }
        if !self.state_written || !is_missing(&self.paths.state) {
            return;
        }
        self.rewrite_after_deletion(
            format!(
                "state file {} was deleted while in use: its rooms and tokens are on no disk \
                 (the journal holds only the changes since it was written)",
                self.paths.state.display()
            ),
            "state file",
        );
    }

    /// After `lost` (what was deleted, and what is on no disk since): writes the state file
    /// from memory, with every durable record, and says so once it is on disk again
    /// (`what` names the deleted file there). Creates and joins wait meanwhile.
    fn rewrite_after_deletion(&mut self, lost: String, what: &str) {
        error!("{lost}; writing the state file again from memory");
        counters(&self.stats).files_missing = true;
        if self.rewrite_state() {
            let mut counters = counters(&self.stats);
            counters.files_restored += 1;
            counters.files_missing = false;
            drop(counters);
            warn!(
                "state file {} written again from memory after the {what} was deleted: every \
                 durable change is on disk again",
                self.paths.state.display()
            );
        }
    }

    /// Says, at error, when the state file or the journal has another name (`journal_links`
    /// is the journal's count): a second `ocmd` started on it would take a lock of its own and
    /// write the same file. A start refuses such a file ([`super::refuse_linked_state`]); this
    /// catches a link made while the daemon serves, at first and then once a minute while it
    /// lasts, and says at warn when the file has one name again. (A state file's link breaks
    /// by itself at its next write, which renames a new file over the name.) The counts go to
    /// [`Compactions::hard_links`], each check replacing the last, so that `/readyz` says not
    /// ready for as long as a second name lasts, not only the log.
    fn check_names(&mut self, journal_links: u64) {
        let state_links = fs::symlink_metadata(&self.paths.state).map_or(1, |m| m.nlink());
        let more_than_one = |links: u64| Some(links).filter(|&n| n > 1);
        counters(&self.stats).hard_links = HardLinks {
            state_file: more_than_one(state_links),
            journal: more_than_one(journal_links),
        };
        let now = Instant::now();
        let files = [
            (
                "state file",
                &self.paths.state,
                state_links,
                &mut self.state_names,
            ),
            (
                "journal",
                &self.paths.journal,
                journal_links,
                &mut self.journal_names,
            ),
        ];
        for (what, path, links, failing) in files {
            if links > 1 {
                if failing.failed(now).is_some() {
                    error!(
                        "{what} {} has {links} names (hard links): a second ocmd started on \
                         another of them would take a lock of its own and both would write \
                         this file; ocmd never makes hard links, so remove the other names, or \
                         make them copies (cp, not ln)",
                        path.display()
                    );
                }
            } else if failing.ended(now).is_some() {
                warn!("{what} {} has one name again", path.display());
            }
        }
    }

    /// Takes the lock again when its file was deleted while in use (with its directory, or
    /// alone): the daemon still holds the deleted file's lock, which keeps nobody out, so a
    /// second `ocmd` could start on this state and both would write it. Retried at every
    /// check until it works; a lock another process took meanwhile is an error to act on.
    /// A name that cannot be examined is neither ([`LockState::Unverifiable`] says why).
    fn check_lock(&mut self) {
        let Some(held) = self.lock_held else {
            return;
        };
        let now = Instant::now();
        // Not by the name alone: a second ocmd that started since the deletion has made a
        // file of its own there, and holds its lock.
        match fs::symlink_metadata(&self.paths.lock) {
            Ok(m) if file_id(&m) == held => return self.lock_still_held(now),
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                self.lock_found(LockState::Unverifiable(FileError::from(&e)));
                if let Some(note) = self.relock_failing.failed(now) {
                    error!(
                        "lock file {} cannot be examined: {e}; whether this ocmd still holds \
                         the state's lock is unknown, and if its file is gone another ocmd \
                         could start on this state and write it too (check its \
                         directory's permissions, and the disk){note}",
                        self.paths.lock.display()
                    );
                }
                return;
            }
            _ => {}
        }
        match super::take_lock(&self.paths) {
            Ok(file) => {
                if let Ok(m) = file.metadata() {
                    self.lock_held = Some(file_id(&m));
                }
                self.relock = Some(file);
                self.relock_failing = Failing::default();
                let mut counters = counters(&self.stats);
                counters.files_restored += 1;
                counters.lock = LockState::Held;
                drop(counters);
                warn!(
                    "lock file {} was deleted while in use: taken again",
                    self.paths.lock.display()
                );
            }
            Err(e @ StoreError::Locked { .. }) => {
                self.lock_found(LockState::Taken);
                if let Some(note) = self.relock_failing.failed(now) {
                    error!(
                        "lock file {} was deleted while in use, and another ocmd took it since: \
                         {e}; both write this state: stop one of them{note}",
                        self.paths.lock.display()
                    );
                }
            }
            Err(e) => {
                // A holder found by an earlier check may be gone (with the directory): this
                // failure, not that one, is what `/readyz` says.
                self.lock_found(LockState::Lost);
                if let Some(note) = self.relock_failing.failed(now) {
                    error!(
                        "lock file {} was deleted while in use, and it cannot be taken again: \
                         {e}; another ocmd could start on this state meanwhile{note}",
                        self.paths.lock.display()
                    );
                }
            }
        }
    }

    /// The latest check found the daemon's own lock file at its name: once it could not be
    /// examined before, it is [`LockState::Held`] again, said at warn with the failures'
    /// tally. (After [`LockState::Taken`] or [`LockState::Lost`] the lock is the daemon's
    /// again only by taking it, which says so itself.)
    fn lock_still_held(&mut self, now: Instant) {
        let mut counters = counters(&self.stats);
        if !matches!(counters.lock, LockState::Unverifiable(_)) {
            return;
        }
        counters.lock = LockState::Held;
        drop(counters);
        let tally = self
            .relock_failing
            .ended(now)
            .map(|tally| format!(", after {tally}"))
            .unwrap_or_default();
        warn!(
            "lock file {} can be examined again, and it is still the one this ocmd holds{tally}",
            self.paths.lock.display()
        );
    }

    /// Records what the latest check found of a lock it could not take again, or examine. A
    /// failure of another kind than the last starts a run of its own, so that its first is
    /// logged at once rather than up to a minute later as a reminder of the other.
    fn lock_found(&mut self, state: LockState) {
        let mut counters = counters(&self.stats);
        if counters.lock != state {
            counters.lock = state;
            self.relock_failing = Failing::default();
        }
    }

    /// The journal is not where a start reads it (`gone` says how): the changes since the last
    /// state file are on no disk, or in a file no start reads, though every one made durable
    /// is in the compactor's state (they go there once synced, before their files could go).
    /// Opens a fresh journal at its name and writes the state file from that state, retrying
    /// until both are done: nothing is appended, so no create or join answered, meanwhile. A
    /// start in between reads the old files, as it would have without this. A journal moved
    /// from its name is left where it is (renamed, or under its other name): once the state
    /// file is written, it holds nothing the state file does not.
    ///
    /// A file found at the name is emptied (what it holds is not the daemon's to keep), but
    /// only once the state file is written: it may be a copy of the journal put back (`mv`,
    /// then `cp`), the one place a start would find the records being replaced, and emptied
    /// first it would leave a crash before the state file's write without them. A start
    /// reads a state file and a journal that overlap as it reads them after any compaction
    /// (records already in the state file are skipped by their number). With nothing at the
    /// name the fresh journal comes first, as its directory may have gone with it: it is
    /// made again there, and the lock taken again, before the state file is.
    fn replace_journal(&mut self, gone: JournalGone) {
        let (what, step) = match gone {
            JournalGone::Deleted => (
                "was deleted while in use: the changes since the last state file are on no \
                 disk",
                "replacing a deleted journal",
            ),
            JournalGone::NotAtItsName => (
                "is no longer the file at its name (renamed away, or that name removed while \
                 the file had another, a hard link): the changes since the last state file are \
                 not where a start reads them",
                "replacing a journal gone from its name",
            ),
        };
        error!(
            "journal {} {what}; writing them again from memory (a fresh journal, then the state \
             file), and creates and joins wait until then",
            self.paths.journal.display()
        );
        {
            let mut counters = counters(&self.stats);
            counters.files_missing = true;
            // What the file check found of the file gone is no finding about the fresh one.
            counters.hard_links.journal = None;
        }
        self.journal_names = Failing::default();
        let hint = " (if its directory was removed, create it again)";
        let occupied = fs::symlink_metadata(&self.paths.journal).is_ok();
        if !occupied {
            self.open_fresh_journal(step, hint, true);
        }
        // Gone with the journal if its directory was removed: taken again before the state
        // is there to be read by another ocmd.
        self.check_lock();
        let written = self.rewrite_state();
        if occupied {
            self.open_fresh_journal(step, hint, true);
        }
        if written {
            let mut counters = counters(&self.stats);
            counters.files_restored += 1;
            counters.files_missing = false;
            drop(counters);
            warn!(
                "journal {} replaced and state file {} written again from memory: every \
                 durable change is on disk again",
                self.paths.journal.display(),
                self.paths.state.display()
            );
        }
    }

    /// Whether the file at the journal's name is the one the writer appends to (device and
    /// inode, each from a `statx` that reads no times: [`super::statx`]). A journal renamed
    /// away, or whose own name was removed while it had another (a hard link), still has a
    /// name, so the count of names after each sync does not see that a start would not read
    /// it; this does, at the file check. A symbolic link at the name is followed, as a start
    /// follows it. An error other than "not found" says nothing and is taken as yes, as
    /// [`is_missing`] takes it.
    fn journal_at_its_name(&self) -> bool {
        let open = match identity_of(&self.journal) {
            Ok(Some(open)) => open,
            Ok(None) => return true,
            Err(e) => {
                debug!("cannot tell the open journal's inode: {e}");
                return true;
            }
        };
        match identity_at(&self.paths.journal) {
            Ok(at_name) => at_name.is_none_or(|id| id == open),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                debug!(
                    "cannot tell which file is at {}: {e}",
                    self.paths.journal.display()
                );
                true
            }
        }
    }

    /// Has the compactor write the state file with every durable record (up to the last
    /// appended) and waits for it, retrying until it is written; the compactor logs its
    /// failures. Waits for a compaction already running first. Gives up, returning false,
    /// only if the compactor is gone.
    fn rewrite_state(&mut self) -> bool {
        loop {
            if self.compacting {
                // The running compaction's report (it stops the daemon rather than hang).
                match self.compactor.as_ref().map(|c| c.reports.recv()) {
                    Some(Ok(report)) => self.handle_report(report),
                    _ => self.compactor_gone(),
                }
            }
            self.ask_for_compaction();
            let Some(compactor) = self.compactor.as_ref() else {
                error!(
                    "cannot write {} again: the compactor thread is gone; restart ocmd, and \
                     expect to lose the changes since it was last written",
                    self.paths.state.display()
                );
                return false;
            };
            match compactor.reports.recv() {
                Ok(Some(bytes)) => {
                    self.handle_report(Some(bytes));
                    return true;
                }
                Ok(None) => {
                    self.handle_report(None);
                    thread::sleep(RETRY_DELAY);
                }
                Err(_) => self.compactor_gone(),
            }
        }
    }

    /// Lays down [`SPACE_AHEAD_BYTES`] more NUL bytes past the journal's end, and syncs them,
    /// once less than a quarter of that is left ahead of the appends: an append into blocks
    /// the file already has leaves its size alone, so its `fdatasync` writes the data and
    /// nothing else. Done after a commit's replies are out, so no reply waits for it; a
    /// failure costs only speed (appends go past the file's end meanwhile) and is retried at
    /// doubling intervals up to a minute, or as soon as a full disk has room again
    /// ([`LayBackoff`]), never holding an append back.
    fn keep_space_ahead(&mut self) {
        self.keep_space_ahead_at(Instant::now(), lay_space_ahead, free_bytes);
    }

    /// [`Writer::keep_space_ahead`] at `now`, laying the space with `lay` and asking the file
    /// system's free space with `free`: tests put a full disk and a clock of their own there.
    pub(super) fn keep_space_ahead_at(
        &mut self,
        now: Instant,
        mut lay: impl FnMut(&File, u64, u64) -> io::Result<()>,
        mut free: impl FnMut(&File) -> io::Result<u64>,
    ) {
        if self.ahead_end.saturating_sub(self.journal_len) >= SPACE_AHEAD_BYTES / 4 {
            return;
        }
        let journal = &self.journal;
        if !self
            .ahead_backoff
            .due(now, SPACE_AHEAD_BYTES, || free(journal).ok())
        {
            return;
        }
        let from = self.ahead_end.max(self.journal_len);
        match lay(&self.journal, from, SPACE_AHEAD_BYTES) {
            Ok(()) => {
                self.ahead_end = from + SPACE_AHEAD_BYTES;
                debug!("journal: space laid down ahead to byte {}", self.ahead_end);
                if let Some(tally) = self.ahead_backoff.succeeded(now) {
                    info!(
                        "journal {}: space laid down ahead again, after {tally}",
                        self.paths.journal.display()
                    );
                }
            }
            Err(e) => {
                // A full disk (less free than a lay needs) is tried again as soon as it has
                // room; anything else only by the schedule.
                let short_of_room = free(&self.journal).is_ok_and(|b| b < SPACE_AHEAD_BYTES);
                let (first, delay) = self.ahead_backoff.failed(now, short_of_room);
                if first {
                    warn!(
                        "cannot lay down space ahead in journal {}: {e}; appends go on past \
                         its end; trying again in {delay:?}, then at doubling intervals up to \
                         {:?}, or as soon as the file system has room",
                        self.paths.journal.display(),
                        backoff::MAX_DELAY
                    );
                } else {
                    debug!(
                        "cannot lay down space ahead in journal {}: {e}; trying again in \
                         {delay:?}",
                        self.paths.journal.display()
                    );
                }
            }
        }
    }

    /// Durable records not yet handed to the compactor.
    #[cfg(test)]
    pub(super) fn unapplied(&self) -> usize {
        self.unapplied.len()
    }

    /// Collects durable records for the compactor, handing them over once a lot is full.
    pub(super) fn forward(&mut self, records: Vec<Record>) {
        if self.unapplied.is_empty() {
            self.unapplied = records;
        } else {
            self.unapplied.extend(records);
        }
        if self.unapplied.len() >= APPLY_LOT {
            self.hand_over();
        }
    }

    /// Hands every collected record to the compactor (a move, not a copy).
    fn hand_over(&mut self) {
        let records = std::mem::take(&mut self.unapplied);
        let Some(compactor) = &self.compactor else {
            return;
        };
        if !records.is_empty() && compactor.jobs.send(Job::Apply(records)).is_err() {
            self.compactor_gone();
        }
    }

    fn compactor_gone(&mut self) {
        self.compactor = None;
        self.compacting = false;
        error!(
            "the state compactor thread is gone; {} keeps growing until the next start folds it",
            self.paths.journal.display()
        );
    }

    /// Takes the compactor's reports without waiting.
    fn collect_reports(&mut self) {
        while let Some(compactor) = &self.compactor {
            match compactor.reports.try_recv() {
                Ok(report) => self.handle_report(report),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => self.compactor_gone(),
            }
        }
    }

    fn handle_report(&mut self, report: Report) {
        self.compacting = false;
        match report {
            Some(bytes) => {
                self.journal_old = false;
                self.snapshot_len = bytes;
                self.state_written = true;
                self.retry_at = None;
            }
            None => self.retry_at = Some(Instant::now() + self.options.compact_retry),
        }
    }

    /// Starts a compaction when one is due and none runs: after rotating the journal, or,
    /// when a failed compaction left `journal.old` behind, without rotating (the snapshot then
    /// covers both journals up to the last durable record).
    fn maybe_compact(&mut self) {
        self.collect_reports();
        if self.compacting || self.compactor.is_none() {
            return;
        }
        let now = Instant::now();
        if self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let threshold = self.options.compact_journal_bytes.max(self.snapshot_len);
        if !self.journal_old {
            if self.journal_len <= threshold {
                return;
            }
            if let Err(e) = self.rotate() {
                match self.rotate_failing.failed(now) {
                    Some(note) => error!(
                        "cannot rotate {} to {}: {e}; compaction postponed, the journal keeps \
                         every change{note}",
                        self.paths.journal.display(),
                        self.paths.journal_old.display()
                    ),
                    None => debug!("cannot rotate {}: {e}", self.paths.journal.display()),
                }
                self.retry_at = Some(now + self.options.compact_retry);
                return;
            }
            if let Some(tally) = self.rotate_failing.ended(now) {
                warn!(
                    "journal {} rotated, after {tally}",
                    self.paths.journal.display()
                );
            }
        }
        if let Some(journal_seq) = self.ask_for_compaction() {
            debug!("journal rotated; compacting up to record {journal_seq}");
        }
    }

    /// Hands the compactor every durable record and asks it for a state file holding them all
    /// (the snapshot must hold every record up to the last appended); returns that record's
    /// number, or `None` when the compactor is gone.
    fn ask_for_compaction(&mut self) -> Option<u64> {
        self.hand_over();
        let journal_seq = self.next_n - 1;
        let compactor = self.compactor.as_ref()?;
        if compactor.jobs.send(Job::Compact { journal_seq }).is_err() {
            self.compactor_gone();
            return None;
        }
        self.compacting = true;
        Some(journal_seq)
    }

    /// Cuts the space laid down ahead off the journal, renames it to `journal.old` and goes on
    /// in a fresh journal. A failed cut or rename changes nothing the next start reads
    /// differently. Once it is done, the fresh journal is opened (and the directory
    /// fsync'd, which also makes the rename durable) with retries until it works: nothing is
    /// appended, so nothing acknowledged, meanwhile.
    ///
    /// A failed directory `fsync` stops the daemon ([`super::stop_after_failed_dir_sync`]):
    /// records appended to a journal whose entry may not be on disk must not be acknowledged.
    pub(super) fn rotate(&mut self) -> io::Result<()> {
        // journal.old must end with its last record: NUL bytes at its end are read as a hole
        // (synced records lost), not as space ahead. The file's own size says whether any are
        // there (a failed lay may have left some that `ahead_end` does not count), and the sync
        // is done every time, so that a cut whose sync failed is made durable on the retry.
        if self.journal.metadata()?.len() > self.journal_len {
            self.journal.set_len(self.journal_len)?;
        }
        self.ahead_end = self.journal_len;
        self.journal.sync_data()?;
        fs::rename(&self.paths.journal, &self.paths.journal_old)?;
        self.journal_old = true;
        self.open_fresh_journal("rotating the journal", "", false);
        Ok(())
    }

    /// Opens a fresh, empty journal in place of the one gone (`emptied`: cut to nothing
    /// first, should a file hold the name), retrying every [`RETRY_DELAY`] until it works:
    /// nothing is appended, so nothing acknowledged, meanwhile. `what` names the step for a
    /// failed directory `fsync`, which stops the daemon; `hint` ends the failure's log line.
    fn open_fresh_journal(&mut self, what: &str, hint: &str, emptied: bool) {
        let mut failing = Failing::default();
        loop {
            let fresh = open_journal(&self.paths.journal).and_then(|file| {
                if emptied {
                    file.set_len(0).and_then(|()| file.sync_all())?;
                }
                Ok(file)
            });
            match fresh {
                Ok(file) => {
                    self.journal = file;
                    self.journal_len = 0;
                    self.ahead_end = 0;
                    if let Some(tally) = failing.ended(Instant::now()) {
                        warn!(
                            "fresh journal {} opened, after {tally}",
                            self.paths.journal.display()
                        );
                    }
                    return;
                }
                Err(e) if store::is_failed_dir_sync(&e) => {
                    super::stop_after_failed_dir_sync(what, &e)
                }
                Err(e) => {
                    counters(&self.stats).write_failures += 1;
                    if let Some(note) = failing.failed(Instant::now()) {
                        error!(
                            "cannot open a fresh journal {}: {e}; retrying every \
                             {RETRY_DELAY:?}{hint}{note}",
                            self.paths.journal.display()
                        );
                    }
                    thread::sleep(RETRY_DELAY);
                }
            }
        }
    }

    /// At shutdown: lets a running compaction finish, takes the compactor's state back and
    /// folds what the journals still hold into the state file. Returns whether the state file
    /// then holds every change (if not, the journals do, and the next start folds them).
    pub(super) fn finish(&mut self) -> bool {
        self.hand_over();
        let Some(Compactor {
            jobs,
            reports,
            thread,
        }) = self.compactor.take()
        else {
            error!("no final state file (the compactor is gone); the journals keep every change");
            return false;
        };
        // The compactor applies what is queued, finishes, and hands its state back.
        drop(jobs);
        let joined = thread.join();
        while let Ok(report) = reports.try_recv() {
            self.handle_report(report);
        }
        let Ok(mut state) = joined else {
            error!("the state compactor panicked; the journals keep every change");
            return false;
        };
        // A state file deleted since the last check is written again by the fold.
        let state_there = !self.state_written || !is_missing(&self.paths.state);
        if self.journal_len == 0 && !self.journal_old && state_there {
            debug!("state: the state file already holds every change");
            // Nothing to fold, but the journal may hold space laid down ahead: a clean stop
            // leaves it empty.
            let emptied = self.journal.metadata().and_then(|m| match m.len() {
                0 => Ok(()),
                _ => self
                    .journal
                    .set_len(0)
                    .and_then(|()| self.journal.sync_data()),
            });
            if let Err(e) = emptied {
                warn!(
                    "cannot empty journal {} of its space ahead: {e}",
                    self.paths.journal.display()
                );
            }
            return true;
        }
        match self.fold(&mut state) {
            Ok(()) => true,
            // Deleted (or, for the journal, moved from its name) since the last check: the
            // journal, or the state file it follows.
            Err(e)
                if matches!(link_count(&self.journal), Ok(0))
                    || !self.journal_at_its_name()
                    || (self.state_written && is_missing(&self.paths.state)) =>
            {
                counters(&self.stats).files_missing = true;
                error!(
                    "{e}; the state's files were deleted while in use, so the journal does \
                     not keep the changes"
                );
                false
            }
            Err(e) => {
                error!("{e}; the journals keep every change");
                false
            }
        }
    }

    /// Writes `state` (every record applied) as the state file, then removes `journal.old`
    /// and empties the journal. Only while no compaction runs: at start and at shutdown.
    fn fold(&mut self, state: &mut State) -> Result<(), StoreError> {
        let started = Instant::now();
        // The space laid down ahead holds no record (a start reads it as none), and on a full
        // disk it may be the room the state file needs: given back first.
        let cut = self.journal.metadata().and_then(|m| {
            if m.len() > self.journal_len {
                self.journal.set_len(self.journal_len)
            } else {
                Ok(())
            }
        });
        match cut {
            Ok(()) => self.ahead_end = self.journal_len,
            Err(e) => debug!(
                "cannot cut the space ahead off journal {}: {e}",
                self.paths.journal.display()
            ),
        }
        let bytes = write_snapshot(&self.paths, state, self.next_n - 1)?;
        // The state file now holds every journal record (its journal_seq says so), so a crash
        // before or during what follows replays nothing twice.
        remove_journal_old(&self.paths)?;
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_all())
            .map_err(|source| StoreError::Write {
                path: self.paths.journal.clone(),
                source,
            })?;
        self.journal_len = 0;
        self.ahead_end = 0;
        self.journal_old = false;
        self.snapshot_len = bytes;
        self.state_written = true;
        let elapsed = started.elapsed();
        counters(&self.stats).written(elapsed);
        log_written(&self.paths, state, bytes, elapsed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure retried every second is logged at its first try, then once every
    /// [`FAILURE_LOG_INTERVAL`] with the tally, and its end once; a new run starts afresh.
    #[test]
    fn a_lasting_failure_is_logged_at_first_then_once_a_minute_and_at_its_end() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut failing = Failing::default();
        assert_eq!(failing.ended(at(0)), None, "no run, no end");
        assert_eq!(failing.failed(at(0)), Some(String::new()));
        for second in 1..60 {
            assert_eq!(failing.failed(at(second)), None, "second {second}");
        }
        assert_eq!(
            failing.failed(at(60)),
            Some(" (still failing: 61 failed attempts over 60 s)".to_owned())
        );
        assert_eq!(failing.failed(at(61)), None);
        assert_eq!(
            failing.ended(at(62)),
            Some("62 failed attempts over 62 s".to_owned())
        );
        assert_eq!(failing.ended(at(63)), None, "ended once");
        assert_eq!(failing.failed(at(64)), Some(String::new()), "a new run");
        assert_eq!(
            failing.ended(at(64)),
            Some("1 failed attempt over 0 s".to_owned())
        );
    }

    /// What the start-up fold's log line says about a torn tail: nothing without one, the
    /// torn final line, or each hole with its journal, line and lines ignored.
    #[test]
    fn the_fold_says_which_torn_tail_it_ignored() {
        assert_eq!(torn_tail_note(false, &[]), "");
        assert_eq!(
            torn_tail_note(true, &[]),
            " (a torn final line was ignored)"
        );
        let holes = [
            (PathBuf::from("j.old"), ZeroHole { line: 3, lines: 2 }),
            (PathBuf::from("j"), ZeroHole { line: 7, lines: 1 }),
        ];
        assert_eq!(
            torn_tail_note(true, &holes),
            " (a torn tail was ignored: j.old from line 3: 2 lines, starting at a zero-filled \
             hole; j from line 7: 1 line, starting at a zero-filled hole)"
        );
    }

    /// A writer on a fresh state in `dir` that asks for a compaction at every commit, its
    /// paths, and its compactions' counters.
    fn compacting_at_every_commit(
        dir: &tempfile::TempDir,
    ) -> (Writer, Paths, Arc<Mutex<Compactions>>) {
        let paths = Paths::new(&dir.path().join("s.json"));
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let loaded = store::load(&paths).unwrap();
        let stats = Arc::new(Mutex::new(Compactions::default()));
        let options = Options {
            compact_journal_bytes: 1,
            ..Options::default()
        };
        let writer =
            Writer::open(paths.clone(), loaded, options, Arc::clone(&stats), waker).unwrap();
        (writer, paths, stats)
    }

    /// Once the compactor thread is gone (it panicked: here a stand-in whose ends of the
    /// channels are dropped), the writer lets go of it rather than wait on it for ever: the
    /// commits go on without compactions, and the stop says there is no final state file,
    /// the journal keeping every change for the next start to fold.
    #[test]
    fn a_compactor_gone_is_let_go_and_the_journal_keeps_every_change() {
        use std::sync::mpsc;

        let dir = tempfile::tempdir().unwrap();
        let (mut writer, paths, _) = compacting_at_every_commit(&dir);
        let (jobs, _) = mpsc::channel();
        let (_, reports) = mpsc::channel();
        let gone = Compactor {
            jobs,
            reports,
            thread: thread::spawn(State::default),
        };
        // The real compactor ends once its jobs' sender is dropped.
        drop(writer.compactor.replace(gone));
        let (done, finished) = mpsc::channel();
        thread::spawn(move || {
            let records = vec![Record::CloseRoom { room: "r".into() }];
            writer.append(&records);
            writer.forward(records);
            writer.maybe_compact();
            let _ = done.send((writer.compactor.is_none(), writer.finish()));
        });
        assert_eq!(
            finished.recv_timeout(Duration::from_secs(20)),
            Ok((true, false)),
            "the compactor gone let go of, and no final state file"
        );
        let loaded = store::load(&paths).unwrap();
        assert_eq!((loaded.last_seq, loaded.replayed), (1, 1));
    }

    /// One compaction at a time: a commit while one runs asks for no other, though the
    /// journal is over its threshold again. (One queued behind it would remove a
    /// `journal.old` rotated once the first reported, with records its state file lacks.)
    #[test]
    fn no_compaction_is_asked_for_while_one_runs() {
        use std::sync::mpsc;

        fn commit(writer: &mut Writer, room: &str) {
            let records = vec![Record::CloseRoom { room: room.into() }];
            writer.append(&records);
            writer.forward(records);
        }
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, paths, stats) = compacting_at_every_commit(&dir);
        commit(&mut writer, "a");
        writer.maybe_compact();
        assert!(
            writer.compacting,
            "the journal rotated and a compaction asked for"
        );
        commit(&mut writer, "b");
        // The compaction's report held back, whenever the compactor sends it: to the
        // writer, it still runs.
        let (_held, no_report) = mpsc::channel();
        let compactor = writer.compactor.as_mut().unwrap();
        let reports = std::mem::replace(&mut compactor.reports, no_report);
        writer.maybe_compact();
        writer.compactor.as_mut().unwrap().reports = reports;
        assert!(writer.finish());
        assert_eq!(
            counters(&stats).written,
            2,
            "the compaction, then the final fold, and no state file in between"
        );
        assert_eq!(store::load(&paths).unwrap().state.journal_seq, 2);
    }
}
