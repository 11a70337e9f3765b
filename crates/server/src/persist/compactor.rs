//! The compactor thread: keeps the state with every durable record applied and, when the
//! writer asks, writes it as the state file and removes `journal.old`, or writes it as a
//! backup for the operator.

use std::fmt;
use std::fs;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};

use super::failing::Failing;
use super::{counters, Compactions, Job, Report};
use crate::error::StoreError;
use crate::plural::Count;
use crate::store::{self, Paths, State};

/// The writer's handle on the compactor thread.
pub(super) struct Compactor {
    pub(super) jobs: Sender<Job>,
    pub(super) reports: Receiver<Report>,
    pub(super) thread: JoinHandle<State>,
    /// Set when the daemon stops: backups still queued are skipped, so that the stop's final
    /// fold, which writes the same state, does not wait for them.
    pub(super) stopping: Arc<AtomicBool>,
}

impl Compactor {
    pub(super) fn spawn(
        paths: Paths,
        state: State,
        stats: Arc<Mutex<Compactions>>,
        waker: Arc<mio::Waker>,
    ) -> Result<Compactor, StoreError> {
        let (jobs, job_rx) = mpsc::channel();
        let (report_tx, reports) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let threads = Threads {
            stats,
            waker,
            stopping: Arc::clone(&stopping),
        };
        let thread = thread::Builder::new()
            .name("ocmd-compactor".into())
            .spawn(move || compact_loop(&paths, state, &job_rx, &report_tx, &threads))
            .map_err(|source| StoreError::Write {
                path: "compactor thread".into(),
                source,
            })?;
        Ok(Compactor {
            jobs,
            reports,
            thread,
            stopping,
        })
    }
}

/// What the compactor thread shares with the others: the counters, the loop's waker, and
/// the stop's flag.
struct Threads {
    stats: Arc<Mutex<Compactions>>,
    waker: Arc<mio::Waker>,
    stopping: Arc<AtomicBool>,
}

/// The compactor thread: applies every durable record to its state and, when asked, writes
/// the state file and removes `journal.old`. Returns the state once the writer hangs up.
fn compact_loop(
    paths: &Paths,
    mut state: State,
    jobs: &Receiver<Job>,
    reports: &Sender<Report>,
    threads: &Threads,
) -> State {
    let Threads {
        stats,
        waker,
        stopping,
    } = threads;
    // A compaction that keeps failing (a full disk) is retried every few seconds: logged at
    // its first failure, then once a minute, and once it works again.
    let mut failing = Failing::default();
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Apply(records) => records.iter().for_each(|r| state.apply(r)),
            Job::Backup { journal_seq } => {
                if stopping.load(Ordering::Relaxed) {
                    counters(stats).backups_failed += 1;
                    warn!(
                        "state: backup {} not written: the daemon is stopping, and the state \
                         file it writes at the stop holds every change",
                        paths.backup.display()
                    );
                    continue;
                }
                back_up(paths, &mut state, journal_seq, stats);
                // Let the loop update its metrics.
                if let Err(e) = waker.wake() {
                    error!("cannot wake the event loop: {e}");
                }
            }
            Job::Compact { journal_seq } => {
                let started = Instant::now();
                let result = write_snapshot(paths, &mut state, journal_seq)
                    .and_then(|bytes| remove_journal_old(paths).map(|()| bytes));
                let elapsed = started.elapsed();
                let report = match result {
                    Ok(bytes) => {
                        counters(stats).written(elapsed);
                        log_written(paths, &state, bytes, elapsed);
                        if let Some(tally) = failing.ended(Instant::now()) {
                            // At the failure's neighbouring level (journalctl -p warning).
                            warn!(
                                "state: compaction works again, after {tally}; {} is gone",
                                paths.journal_old.display()
                            );
                        }
                        Some(bytes)
                    }
                    // The snapshot's rename, or journal.old's removal, may not be on disk, and
                    // a retried compaction's fsync could say it is: the next start must read
                    // what is.
                    Err(StoreError::Write { source, .. }) if store::is_failed_dir_sync(&source) => {
                        super::stop_after_failed_dir_sync("compacting the journal", &source)
                    }
                    Err(e) => {
                        counters(stats).failed += 1;
                        match failing.failed(Instant::now()) {
                            Some(note) => error!(
                                "{e}; compaction failed after {elapsed:?}: {}{note}",
                                retry_note(paths)
                            ),
                            None => debug!("{e}; compaction failed again"),
                        }
                        None
                    }
                };
                // The writer is gone only if it stopped for good; the files are consistent.
                let _ = reports.send(report);
                // Let the loop update its metrics.
                if let Err(e) = waker.wake() {
                    error!("cannot wake the event loop: {e}");
                }
            }
        }
    }
    state
}

/// What a failed compaction leaves, for its log line: `journal.old` when there is one, but
/// not when the state file was being written again after a deletion, with no rotation.
fn retry_note(paths: &Paths) -> String {
    if paths.journal_old.exists() {
        format!(
            "{} is kept (its records are still needed) and compaction is retried later",
            paths.journal_old.display()
        )
    } else {
        "it is retried later".to_owned()
    }
}

/// Writes `state`, stamped as holding every record up to `journal_seq`, as the state file.
/// Returns its size.
pub(super) fn write_snapshot(
    paths: &Paths,
    state: &mut State,
    journal_seq: u64,
) -> Result<u64, StoreError> {
    state.journal_seq = journal_seq;
    let now = SystemTime::now();
    store::write_atomic_with(&paths.state, |file| state.write_file(now, file)).map_err(|source| {
        StoreError::Write {
            path: paths.state.clone(),
            source,
        }
    })
}

/// Writes `state`, stamped as holding every record up to `journal_seq`, as the backup file
/// (as a state file is written: temporary file, fsync, rename, directory fsync), and logs and
/// counts how that went. A state file in every respect: restored by putting it in the state
/// file's place. A failed directory `fsync` stops the daemon as a compaction's does: the
/// directory is the state's, and the kernel reports such an error once.
fn back_up(paths: &Paths, state: &mut State, journal_seq: u64, stats: &Mutex<Compactions>) {
    let started = Instant::now();
    state.journal_seq = journal_seq;
    let now = SystemTime::now();
    match store::write_atomic_with(&paths.backup, |file| state.write_file(now, file)) {
        Ok(bytes) => {
            counters(stats).backups += 1;
            info!(
                "state: backup written to {} ({}) in {:?}",
                paths.backup.display(),
                Holds(state, bytes),
                started.elapsed()
            );
        }
        Err(e) if store::is_failed_dir_sync(&e) => {
            super::stop_after_failed_dir_sync(&format!("backup {}", paths.backup.display()), &e)
        }
        Err(e) => {
            counters(stats).backups_failed += 1;
            error!(
                "state: backup {} not written: {e}; the state and its journal are as they were",
                paths.backup.display()
            );
        }
    }
}

/// Removes `journal.old` (whose records a state file now holds), durably.
pub(super) fn remove_journal_old(paths: &Paths) -> Result<(), StoreError> {
    let result = match fs::remove_file(&paths.journal_old) {
        Ok(()) => store::sync_dir(&paths.journal_old),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|source| StoreError::Write {
        path: paths.journal_old.clone(),
        source,
    })
}

pub(super) fn log_written(paths: &Paths, state: &State, bytes: u64, elapsed: Duration) {
    info!(
        "state: wrote {} ({}) in {:?}",
        paths.state.display(),
        Holds(state, bytes),
        elapsed
    );
}

/// What a state file of `.1` bytes written from the state `.0` holds, for its log line:
/// `3 rooms, 12 tokens, 4096 bytes, journal record 57`.
struct Holds<'a>(&'a State, u64);

impl fmt::Display for Holds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Holds(state, bytes) = self;
        write!(
            f,
            "{}, {}, {}, journal record {}",
            Count(state.rooms.len(), "room"),
            Count(state.tokens.len(), "token"),
            Count(usize::try_from(*bytes).unwrap_or(usize::MAX), "byte"),
            state.journal_seq
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed compaction names `journal.old` as kept only when there is one: a state file
    /// written again after a deletion has none.
    #[test]
    fn a_failed_compaction_names_journal_old_only_when_there_is_one() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("s.json"));
        assert_eq!(retry_note(&paths), "it is retried later");
        fs::write(&paths.journal_old, b"").unwrap();
        assert_eq!(
            retry_note(&paths),
            format!(
                "{} is kept (its records are still needed) and compaction is retried later",
                paths.journal_old.display()
            )
        );
    }
}
