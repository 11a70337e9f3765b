//! The writer thread: appends each batch of records to the journal and makes it durable
//! (group commit), wakes the loop, hands durable records to the compactor in lots, rotates
//! the journal when a compaction is due, and writes the journal and state file again when
//! one is deleted while in use.
//!
//! Its parts: [`append`] (the durable append), [`space_ahead`] (the space laid down ahead
//! of the appends), [`compaction`] (the hand-off to the compactor and the journal's rotation)
//! and [`file_check`] (the files a start reads, checked and written again when they go).

mod append;
mod compaction;
mod file_check;
mod space_ahead;

use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::backoff::LayBackoff;
use super::compactor::{log_written, remove_journal_old, write_snapshot, Compactor};
use super::failing::Failing;
use super::statx::link_count;
use super::{counters, Command, Compactions, Done, Options, APPLY_LOT, RETRY_DELAY};
use crate::error::StoreError;
use crate::plural::Count;
use crate::record::Record;
use crate::store::{self, JournalLine, Loaded, Paths, State, ZeroHole};
pub(super) use append::{append_durably, open_journal, JournalDeleted};
use file_check::{file_id, is_missing, JournalGone};
#[cfg(test)]
pub(super) use {
    append::JournalFile,
    space_ahead::{free_bytes, lay_space_ahead},
};

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

/// Records one group commit takes at most (whole batches only, so one batch may bring it
/// over): after a stall, the backlog goes to disk in writes of bounded size, each of which
/// releases its replies, rather than in one write that the disk space freed after an
/// `ENOSPC` may never fit again.
pub(super) const MAX_GROUP_RECORDS: usize = 4096;

/// Bytes of the serialized line buffer kept between writes; a larger one (a big history
/// checkpoint, a group after a stall) is given back.
const LINE_KEEP_BYTES: usize = 1024 * 1024;

/// What ended a group commit other than its cap or an empty queue: a command queued behind
/// its batches, carried out once their records are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum After {
    Nothing,
    Backup,
    Shutdown,
}

/// Group commit: adds the batches already queued behind `first` to its records, until they
/// hold [`MAX_GROUP_RECORDS`] or another command comes. Returns the last batch taken, the
/// records, and the command that ended the group, if one did (the batches behind it stay
/// queued).
pub(super) fn take_queued(
    rx: &Receiver<Command>,
    first: u64,
    mut records: Vec<Record>,
) -> (u64, Vec<Record>, After) {
    let mut last = first;
    loop {
        if records.len() >= MAX_GROUP_RECORDS {
            return (last, records, After::Nothing);
        }
        match rx.try_recv() {
            Ok(Command::Append {
                batch,
                records: more,
            }) => {
                last = batch;
                records.extend(more);
            }
            Ok(Command::Backup) => return (last, records, After::Backup),
            Ok(Command::Shutdown) => return (last, records, After::Shutdown),
            Err(_) => return (last, records, After::Nothing),
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
                    let (last, records, after) = take_queued(&rx, batch, records);
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
                    match after {
                        After::Shutdown => return self.finish(),
                        After::Backup => self.backup(),
                        After::Nothing => {}
                    }
                    self.maybe_compact();
                    self.keep_space_ahead();
                    self.check_files_when_due(Instant::now());
                }
                Command::Backup => self.backup(),
                Command::Shutdown => return self.finish(),
            }
        }
    }

    /// Checks the files ([`Writer::check_files`]) when the last check is
    /// [`FILE_CHECK_INTERVAL`] old at `now`, or older; returns whether it did. Between appends,
    /// so that a writer never idle that long still checks once a second, and no more often.
    fn check_files_when_due(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.files_checked_at) < FILE_CHECK_INTERVAL {
            return false;
        }
        self.check_files();
        true
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
        debug!("journal: {} durable", Count(records.len(), "record"));
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
    /// At shutdown: lets a running compaction finish, takes the compactor's state back and
    /// folds what the journals still hold into the state file. Returns whether the state file
    /// then holds every change (if not, the journals do, and the next start folds them).
    pub(super) fn finish(&mut self) -> bool {
        self.hand_over();
        let Some(Compactor {
            jobs,
            reports,
            thread,
            stopping,
        }) = self.compactor.take()
        else {
            error!("no final state file (the compactor is gone); the journals keep every change");
            return false;
        };
        // The compactor applies what is queued, skipping backups (the fold below writes the
        // same state), finishes, and hands its state back.
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
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

/// A writer on a fresh state in `dir` with `options`, its paths, and its compactions'
/// counters.
#[cfg(test)]
pub(super) fn on_a_fresh_state(
    dir: &tempfile::TempDir,
    options: Options,
) -> (Writer, Paths, Arc<Mutex<Compactions>>) {
    let paths = Paths::new(&dir.path().join("s.json"));
    let poll = mio::Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
    let loaded = store::load(&paths).unwrap();
    let stats = Arc::new(Mutex::new(Compactions::default()));
    let writer = Writer::open(paths.clone(), loaded, options, Arc::clone(&stats), waker).unwrap();
    (writer, paths, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Between appends the files are checked once the last check is a second old, and not
    /// before: a writer never idle still checks once a second, and a busy one no more often.
    #[test]
    fn between_appends_the_files_are_checked_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _, _) = on_a_fresh_state(&dir, Options::default());
        let checked = writer.files_checked_at;
        let just_short = checked + FILE_CHECK_INTERVAL - Duration::from_nanos(1);
        assert!(
            !writer.check_files_when_due(checked),
            "checked again at once"
        );
        assert!(
            !writer.check_files_when_due(just_short),
            "checked before a second"
        );
        assert_eq!(writer.files_checked_at, checked, "the last check moved");
        assert!(
            writer.check_files_when_due(checked + FILE_CHECK_INTERVAL),
            "not checked a second after the last check"
        );
        assert!(writer.files_checked_at > checked, "the check was not noted");
        assert!(writer.finish());
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
}
