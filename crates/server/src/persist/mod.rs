//! Durable group commit of journal records, off the event loop: the loop's handle on the
//! writer thread (the [`Persister`]), and through it the compactor thread, which folds the
//! journal into the state file off the append path.
//!
//! The loop hands the registry's records to [`Persister::submit`], which tags them with the
//! batch number that will carry them, and sends each turn's records to the writer at once.
//! While the writer writes and fsyncs, new batches queue in its channel; when the fsync
//! returns it takes every queued batch in one write and one fsync (group commit), so a burst
//! of joins costs one fsync, not one each, and the next fsync starts without a round trip
//! through the loop. The thread wakes the loop through a `mio::Waker` when a write is durable,
//! reporting the highest batch it carried, and the loop then releases the replies (the
//! tokens) that waited for batches up to that one.
//!
//! Durable records then move on to the compactor thread, which keeps the state in the file's
//! model with every record applied. They go in lots of [`APPLY_LOT`] records, not one hand-off
//! per write: the compactor's state is needed only when it writes a snapshot, and a wake-up per
//! fsync cost more than applying the records (see `crates/bench/NOTES.md`). When the
//! journal outgrows both [`Options::compact_journal_bytes`] and the last state file, the writer
//! *rotates* it: it renames the journal to `journal.old`, opens a fresh journal and fsyncs the
//! directory, then asks the compactor for a snapshot up to the last record of `journal.old`.
//! The channel is ordered, so the compactor's state is exactly that far when it gets the
//! request. It writes the state file (temporary file, fsync, rename, directory fsync) and
//! removes `journal.old`, while the writer goes on appending to the fresh journal. One
//! compaction runs at a time; a failed one keeps `journal.old` and is retried later. Neither
//! the loop nor the writer serializes the whole state while the daemon serves.
//!
//! The work is split by thread: this module is the loop's side (the [`Persister`] handle,
//! the state lock, the messages between the threads); `writer` is the writer thread and its
//! journal; `compactor` is the compactor thread and the state files it writes. Beside them:
//! `backoff` (when to lay space ahead again after a failure), `failing` (failures that last,
//! logged without flooding the log), `lock` (the state's lock, and the state paths it
//! refuses) and `statx` (file identities and link counts read
//! without touching times).

mod backoff;
mod compactor;
mod failing;
mod lock;
mod statx;
mod writer;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::error;

use crate::config::StateConfig;
use crate::error::StoreError;
use crate::record::Record;
use crate::store::{Loaded, Paths};
use lock::take_lock;
pub use lock::{lock, refuse_linked_state, refuse_symlinked_state};
use writer::Writer;

/// The most a clean stop waits for the writer's last batches and its final fold, all told,
/// before it exits without them. With the loop's own 1.5 s for the writes in flight, a stop
/// ends within 11.5 s whatever the disk does: inside config/ocmd.service's `TimeoutStopSec`.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// How far a clean stop got with the state ([`Persister::shutdown`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Stopped {
    /// Every change written and folded into the state file.
    Folded,
    /// Every change durable in the journals, but the fold into the state file failed (a full
    /// disk) or did not finish in time: the next start folds them. Nothing is lost.
    Unfolded,
    /// The state's files were deleted while in use (their directory removed, say) and could
    /// not be written again before the exit: what they held is on no disk, and the next start
    /// has only what is left there.
    Lost,
    /// The disk did not take the last batches in time: the changes in them are not durable
    /// (none was acknowledged, since a reply waits for its record to be durable). What was
    /// written without its sync survives the exit, as after a `kill -9`; the rest is lost.
    Unwritten,
}

impl Stopped {
    /// Whether every change the daemon acknowledged is on disk after this stop: false for a
    /// stop that exits without state ([`Stopped::Lost`]) or without the writes the disk did
    /// not take ([`Stopped::Unwritten`]), which `ocmd` reports with a failed exit status.
    pub fn kept_the_state(self) -> bool {
        matches!(self, Stopped::Folded | Stopped::Unfolded)
    }
}

/// Default of `[state] compact_journal_bytes`: the journal is compacted once it is larger than
/// this many bytes and larger than the last state file.
pub const DEFAULT_COMPACT_JOURNAL_BYTES: u64 = 8 * 1024 * 1024;
/// How long the writer waits before retrying a failed write.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Durable records the writer collects before handing them to the compactor in one lot. Every
/// record still waiting goes over before a compaction is asked for and at shutdown.
pub const APPLY_LOT: usize = 4096;

/// How long after a failed compaction (or rotation) the next one may start.
const COMPACT_RETRY_DELAY: Duration = Duration::from_secs(5);

/// How the writer compacts the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The journal is rotated and folded into the state file once it is larger than this
    /// many bytes and larger than the last state file.
    pub compact_journal_bytes: u64,
    /// How long after a failed compaction the next one may start.
    pub compact_retry: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            compact_journal_bytes: DEFAULT_COMPACT_JOURNAL_BYTES,
            compact_retry: COMPACT_RETRY_DELAY,
        }
    }
}

impl From<&StateConfig> for Options {
    fn from(config: &StateConfig) -> Options {
        Options {
            compact_journal_bytes: config.compact_journal_bytes,
            ..Options::default()
        }
    }
}

/// What the writer and the compactor tell the loop: the state files written since start, the
/// failures, and what the writer's latest file check found; for the metrics, `/readyz` and
/// the systemd status line.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Compactions {
    /// State files written: the fold at start (when the journals held records) and every
    /// compaction.
    pub written: u64,
    /// Compactions that failed (`journal.old` was kept; they are retried).
    pub failed: u64,
    /// Time spent writing the state files, seconds.
    pub seconds: f64,
    /// The last one's time, seconds.
    pub last_seconds: f64,
    /// The longest one's time, seconds.
    pub max_seconds: f64,
    /// Failed tries to write the journal, each retried a second later: an append or its
    /// fsync, the cut back to the last whole line after one, or opening a fresh journal after
    /// a rotation. Counted as they happen, so that the metrics show a disk that does not take
    /// writes while the creates and joins wait for it.
    pub write_failures: u64,
    /// Files deleted while in use and put back from memory: a journal (with the state file
    /// written after it), a state file, a lock file, each counted once it is back.
    pub files_restored: u64,
    /// The journal or the state file was deleted while in use and is not written again yet
    /// (its directory may be gone): until it is, what it held is on no disk.
    pub files_missing: bool,
    /// The state's lock as the writer's latest check found it, once its file was deleted
    /// while in use or its name could not be examined (each check replaces it: a holder found
    /// once may be gone by the next).
    pub lock: LockState,
    /// The state file's and the journal's names as the writer's latest check counted them,
    /// each only while it has more than one.
    pub hard_links: HardLinks,
    /// Backup files written on request ([`Persister::backup`]).
    pub backups: u64,
    /// Backups that could not be written (each logged at error).
    pub backups_failed: u64,
}

/// A state file or journal given a second name (a hard link) while the daemon serves, as the
/// writer's latest check found them: a second `ocmd` started on the other name would take a
/// lock of its own beside it, and both would write the same file. A start refuses such a file
/// ([`refuse_linked_state`]); a running daemon cannot undo the link, so it says so, in the
/// log and on `/readyz`, until the other name is removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HardLinks {
    /// The state file's count of names, when more than one.
    pub state_file: Option<u64>,
    /// The journal's count of names, when more than one.
    pub journal: Option<u64>,
}

/// The state's lock, as the writer's latest check of its file found it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LockState {
    /// Held: the file at its name is the one the daemon locked (never deleted, or the lock
    /// taken again since).
    #[default]
    Held,
    /// The lock file was deleted while in use and another process (a second `ocmd`) took a
    /// lock of its own at its name: both may write this state, until one of them stops.
    Taken,
    /// The lock file was deleted while in use and cannot be taken again for another reason
    /// (its directory gone, no permission): nothing keeps a second `ocmd` from starting on
    /// this state and writing it too.
    Lost,
    /// The lock's name cannot be examined: its `stat` failed with an error other than "not
    /// found" (no search permission on its directory, an I/O error, a loop of symbolic links
    /// in its path), so whether the file there is still the one the daemon holds is unknown.
    ///
    /// Not taken as [`LockState::Held`], which the check used to keep (or whatever it had
    /// found last): the check is there because a lock file gone lets a second `ocmd` in, and
    /// a check that cannot look has not passed; keeping the last finding would also go on
    /// naming a holder that may be gone. Nor as [`LockState::Lost`], and the lock is not
    /// taken again: the file may well still be there and held by this daemon, and a new
    /// `flock` on it would then be refused, which would read as another holder. So it is a
    /// state of its own, with the error, that `/readyz` reports as not ready: what cannot
    /// examine the lock's directory will soon fail the state file's next write and the next
    /// start too, so an operator must look anyway, and the error says where. A passing
    /// failure (one `EIO`) costs one check's second of 503: the next check that can look
    /// replaces it.
    Unverifiable(FileError),
}

/// An error from a file system call, kept as its `errno` (or its kind, for an error without
/// one) so that [`Compactions`] stays a plain copy; it displays as the `io::Error` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileError {
    errno: Option<i32>,
    kind: io::ErrorKind,
}

impl From<&io::Error> for FileError {
    fn from(error: &io::Error) -> FileError {
        FileError {
            errno: error.raw_os_error(),
            kind: error.kind(),
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(errno) => io::Error::from_raw_os_error(errno).fmt(f),
            None => self.kind.fmt(f),
        }
    }
}

impl Compactions {
    fn written(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        self.written += 1;
        self.seconds += secs;
        self.last_seconds = secs;
        self.max_seconds = self.max_seconds.max(secs);
    }
}

/// Stops the daemon after a failed directory `fsync` while it serves. The kernel reports a
/// write-back error once, so a retry could not be trusted: a rename or a fresh journal might
/// never reach the disk while records in it were acknowledged. Exiting (status 1, so systemd
/// restarts it) leaves the next start to read what the disk really holds, as PostgreSQL does
/// after a failed `fsync`.
fn stop_after_failed_dir_sync(what: &str, error: &dyn std::fmt::Display) -> ! {
    error!(
        "{what}: {error}; stopping: after a failed directory fsync no retry can be trusted, so \
         the next start reads what the disk holds"
    );
    std::process::exit(1)
}

/// The counters stay usable even if a thread panicked while holding them.
fn counters(stats: &Mutex<Compactions>) -> MutexGuard<'_, Compactions> {
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Command {
    Append {
        batch: u64,
        records: Vec<Record>,
    },
    /// Write a backup holding every record handed over before this command.
    Backup,
    Shutdown,
}

/// Work for the compactor, in journal order.
enum Job {
    /// Durable records to apply to the compactor's state.
    Apply(Vec<Record>),
    /// Write the state, which holds every record up to `journal_seq`, as the state file, then
    /// remove `journal.old`.
    Compact { journal_seq: u64 },
    /// Write the state, which holds every record up to `journal_seq`, as the backup file.
    Backup { journal_seq: u64 },
}

/// The compactor's answer to [`Job::Compact`]: the new state file's size, or `None` when the
/// compaction failed (the compactor logged why).
type Report = Option<u64>;

/// A finished write: one fsync, carrying every batch queued when it started.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// The highest batch now durable (every lower one is too).
    pub batch: u64,
    /// Records the write carried.
    pub records: usize,
    /// Time to write and fsync, from the writer taking the first batch.
    pub elapsed: Duration,
}

/// The loop's handle on the writer thread.
pub struct Persister {
    tx: Sender<Command>,
    done_rx: Receiver<Done>,
    /// The writer thread; it returns whether its final fold put every change in the state
    /// file.
    thread: Option<JoinHandle<bool>>,
    compactions: Arc<Mutex<Compactions>>,
    /// Shared with the compactor: set, backups still queued are skipped.
    stopping: Arc<AtomicBool>,
    pending: Vec<Record>,
    /// The number the next batch handed to the writer gets; every lower one was handed over.
    next_batch: u64,
    durable: u64,
    /// The batches handed over and not yet durable, with when each was, oldest first.
    in_flight: VecDeque<(u64, Instant)>,
    /// Whether records were dropped for want of a writer to take them (its thread gone):
    /// they will never be durable, and a stop must not call the state saved.
    dropped: bool,
}

impl Persister {
    /// Starts the writer and the compactor on a loaded state. If the journals held records,
    /// they are folded into the state file first, so every start begins with an empty journal
    /// and no `journal.old`.
    pub fn start_with(
        paths: Paths,
        loaded: Loaded,
        options: Options,
        waker: Arc<mio::Waker>,
    ) -> Result<Persister, StoreError> {
        let compactions = Arc::new(Mutex::new(Compactions::default()));
        let mut writer = Writer::open(
            paths,
            loaded,
            options,
            Arc::clone(&compactions),
            Arc::clone(&waker),
        )?;
        let stopping = writer.stopping_flag();
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("ocmd-writer".into())
            .spawn(move || writer.run(rx, done_tx, waker))
            .map_err(|source| StoreError::Write {
                path: "writer thread".into(),
                source,
            })?;
        Ok(Persister {
            tx,
            done_rx,
            thread: Some(thread),
            compactions,
            stopping,
            pending: Vec::new(),
            next_batch: 1,
            durable: 0,
            in_flight: VecDeque::new(),
            dropped: false,
        })
    }

    /// The writer's and the compactor's counters and findings so far ([`Compactions`]). The
    /// compactor wakes the loop when a compaction ends, written or failed.
    pub fn compactions(&self) -> Compactions {
        *counters(&self.compactions)
    }

    /// Queues records; returns the batch number that will make them durable.
    pub fn submit(&mut self, records: Vec<Record>) -> u64 {
        if self.pending.is_empty() {
            self.pending = records;
        } else {
            self.pending.extend(records);
        }
        self.next_batch
    }

    /// The highest batch known durable.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// When the oldest batch still waiting for the disk was handed to the writer, if one is:
    /// how long creates and joins have waited (a disk that does not take the journal, or a
    /// `fsync` that hangs, makes it grow).
    pub fn waiting_since(&self) -> Option<Instant> {
        self.in_flight.front().map(|&(_, since)| since)
    }

    /// Whether records are queued or being written.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty() || self.durable + 1 < self.next_batch
    }

    /// Hands the queued records to the writer as one batch. The writer takes every batch
    /// that queued during its last fsync in its next one.
    pub fn pump(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.pending);
        let batch = self.next_batch;
        if self.tx.send(Command::Append { batch, records }).is_ok() {
            self.in_flight.push_back((batch, Instant::now()));
            self.next_batch += 1;
        } else {
            self.dropped = true;
            error!("state writer thread is gone; changes are no longer persisted");
        }
    }

    /// Asks for a backup: the state, with every record submitted so far (every change
    /// acknowledged among them), written as `room_manager.json.backup` beside the state file
    /// (temporary file, fsync, rename, directory fsync), off the loop. The records still queued
    /// go to the writer first, and the writer hands the backup to the compactor once they are
    /// durable, so the backup holds each of them. The result is logged and counted
    /// ([`Compactions::backups`], [`Compactions::backups_failed`]); the compactor wakes the loop
    /// when it is done.
    pub fn backup(&mut self) {
        self.pump();
        if self.tx.send(Command::Backup).is_err() {
            counters(&self.compactions).backups_failed += 1;
            error!("state: backup not written: the state writer thread is gone");
        }
    }

    /// Skips the backups asked for and not yet begun, and any asked for later: for a stop,
    /// whose final fold writes the same state and should not wait for them. Each is logged
    /// and counted as not written.
    pub fn skip_backups(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Collects finished writes (after the waker fired) and hands over what queued meanwhile.
    pub fn poll_done(&mut self) -> Vec<Done> {
        let mut done = Vec::new();
        while let Ok(d) = self.done_rx.try_recv() {
            self.durable = self.durable.max(d.batch);
            done.push(d);
        }
        self.forget_durable_in_flight();
        self.pump();
        done
    }

    /// Hands over what is queued and blocks until every batch is durable; returns whether it
    /// came to that. `false` at `deadline`, or as soon as the writer is gone, or once records
    /// were dropped for want of it (what it had not made durable never will be, and what was
    /// queued for it is dropped by [`Self::pump`]).
    /// What the writes were (their [`Done`]s) is not kept: for a stop, whose counters no
    /// scrape reads.
    pub fn wait_durable(&mut self, deadline: Instant) -> bool {
        let mut all = true;
        while self.busy() {
            self.pump();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done_rx.recv_timeout(left) {
                Ok(d) => self.durable = self.durable.max(d.batch),
                Err(_) => {
                    all = false;
                    break;
                }
            }
        }
        self.forget_durable_in_flight();
        all && !self.dropped
    }

    /// Drops the batches now durable from the ones in flight.
    fn forget_durable_in_flight(&mut self) {
        while self
            .in_flight
            .front()
            .is_some_and(|&(batch, _)| batch <= self.durable)
        {
            self.in_flight.pop_front();
        }
    }

    /// Writes everything queued, waits for a running compaction, folds the journals into the
    /// state file and stops the threads. Blocks: for shutdown only, and at most 10 s
    /// (`SHUTDOWN_WAIT`) in all, so that a disk that stopped answering does not hold the exit
    /// for ever. Leaving the fold behind loses nothing (the journals hold every change it
    /// would have folded, and the next start folds them); leaving batches behind leaves their
    /// changes not durable. Files deleted while in use and not yet written again hold
    /// nothing: the stop then says so ([`Stopped::Lost`]) rather than call them saved.
    pub fn shutdown(mut self) -> Stopped {
        let limit = SHUTDOWN_WAIT.as_secs();
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        // The writer stuck writing deleted files again: neither the journals nor the state
        // file keep what it would have written.
        let lost = |what: &str| {
            error!(
                "state writer did not finish {what} within {limit} s: the state's files were \
                 deleted while in use and cannot be written again (is their directory there?); \
                 exiting without them"
            );
            Stopped::Lost
        };
        if !self.wait_durable(deadline) {
            if counters(&self.compactions).files_missing {
                return lost("its last writes");
            }
            if self.dropped {
                error!(
                    "state writer thread is gone: the changes it did not take (none \
                     acknowledged) are lost; exiting without them"
                );
                return Stopped::Unwritten;
            }
            error!(
                "state writer did not finish its last writes within {limit} s; exiting \
                 without them: the changes they held (none acknowledged) are lost, or kept \
                 only as far as the disk took them"
            );
            return Stopped::Unwritten;
        }
        let _ = self.tx.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() {
                if Instant::now() >= deadline {
                    if counters(&self.compactions).files_missing {
                        return lost("the final fold");
                    }
                    error!(
                        "state writer did not finish the final fold within {limit} s; exiting \
                         without it: the journals keep every change, and the next start \
                         folds them"
                    );
                    return Stopped::Unfolded;
                }
                thread::sleep(Duration::from_millis(5));
            }
            if thread.join().unwrap_or(false) {
                return Stopped::Folded;
            }
        }
        if counters(&self.compactions).files_missing {
            return Stopped::Lost;
        }
        Stopped::Unfolded
    }
}

#[cfg(test)]
mod tests;
