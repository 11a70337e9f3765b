//! The writer thread: durable group commit of journal records, off the event loop; and the
//! compactor thread, which folds the journal into the state file off the append path.
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

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};

use crate::config::StateConfig;
use crate::error::StoreError;
use crate::record::Record;
use crate::store::{self, JournalLine, Loaded, Paths, State, ZeroHole};

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

/// State files written since start, for the metrics.
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

/// The counters stay usable even if a thread panicked while holding them.
fn counters(stats: &Mutex<Compactions>) -> MutexGuard<'_, Compactions> {
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Command {
    Append { batch: u64, records: Vec<Record> },
    Shutdown,
}

/// Work for the compactor, in journal order.
enum Job {
    /// Durable records to apply to the compactor's state.
    Apply(Vec<Record>),
    /// Write the state, which holds every record up to `journal_seq`, as the state file, then
    /// remove `journal.old`.
    Compact { journal_seq: u64 },
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
    thread: Option<JoinHandle<()>>,
    compactions: Arc<Mutex<Compactions>>,
    pending: Vec<Record>,
    /// The number the next batch handed to the writer gets; every lower one was handed over.
    next_batch: u64,
    durable: u64,
}

/// Takes the advisory lock beside the state file, so that two daemons never share it.
/// The returned file must live as long as the process uses the state.
pub fn lock(paths: &Paths) -> Result<File, StoreError> {
    let write_err = |source| StoreError::Write {
        path: paths.lock.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&paths.lock)
        .map_err(write_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(StoreError::Locked {
                state: paths.state.clone(),
                lock: paths.lock.clone(),
                holder: if holder.is_empty() {
                    "unknown pid".into()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(write_err(e)),
    }
    file.set_len(0).map_err(write_err)?;
    file.rewind().map_err(write_err)?;
    writeln!(file, "pid {}", std::process::id()).map_err(write_err)?;
    Ok(file)
}

impl Persister {
    /// Starts the writer with the default [`Options`]; see [`Persister::start_with`].
    pub fn start(
        paths: Paths,
        loaded: Loaded,
        waker: Arc<mio::Waker>,
    ) -> Result<Persister, StoreError> {
        Persister::start_with(paths, loaded, Options::default(), waker)
    }

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
            pending: Vec::new(),
            next_batch: 1,
            durable: 0,
        })
    }

    /// State files written (and compactions failed) so far. The compactor wakes the loop
    /// when one finishes.
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
            self.next_batch += 1;
        } else {
            error!("state writer thread is gone; changes are no longer persisted");
        }
    }

    /// Collects finished writes (after the waker fired) and hands over what queued meanwhile.
    pub fn poll_done(&mut self) -> Vec<Done> {
        let mut done = Vec::new();
        while let Ok(d) = self.done_rx.try_recv() {
            self.durable = self.durable.max(d.batch);
            done.push(d);
        }
        self.pump();
        done
    }

    /// Writes everything queued, waits for a running compaction, folds the journals into the
    /// state file and stops the threads. Blocks: for shutdown only.
    pub fn shutdown(mut self) {
        while self.busy() {
            self.pump();
            match self.done_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(d) => self.durable = self.durable.max(d.batch),
                Err(_) => {
                    error!("state writer did not finish within 10 s; exiting anyway");
                    return;
                }
            }
        }
        let _ = self.tx.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

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
                "{} from line {}: {} lines, starting at a zero-filled hole",
                path.display(),
                hole.line,
                hole.lines
            )
        })
        .collect();
    format!(" (a torn tail was ignored: {})", holes.join("; "))
}

/// The writer thread's side: the journal, and the hand-off to the compactor.
struct Writer {
    paths: Paths,
    options: Options,
    journal: File,
    journal_len: u64,
    /// Size of the last state file written.
    snapshot_len: u64,
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
    stats: Arc<Mutex<Compactions>>,
}

/// The writer's handle on the compactor thread.
struct Compactor {
    jobs: Sender<Job>,
    reports: Receiver<Report>,
    thread: JoinHandle<State>,
}

/// What the writer does to its journal: an append-only file it can cut back. The file is
/// the real one; tests put a file that fails on demand in its place.
trait JournalFile {
    /// Appends `bytes` at the end.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the appended bytes durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes.
    fn cut(&mut self, len: u64) -> io::Result<()>;
}

impl JournalFile for File {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        // Opened with O_APPEND: every write goes to the end, wherever a cut left it.
        self.write_all(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
    fn cut(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// Appends `bytes` to a journal of `len` whole bytes and makes them durable, retrying every
/// `retry` until the disk takes them: a token is only ever acknowledged once this returns.
///
/// After a failed append (a short write, a failed fsync) the journal is cut back to `len`
/// before anything is written again, and the cut itself is retried until it works: an append
/// behind a fragment would put a broken line in the middle of the journal, which the next
/// start refuses.
fn append_durably(
    journal: &mut impl JournalFile,
    len: u64,
    bytes: &[u8],
    retry: Duration,
    path: &Path,
) {
    while let Err(e) = journal.append(bytes).and_then(|()| journal.sync()) {
        error!(
            "cannot append to journal {}: {e}; retrying in {retry:?}",
            path.display()
        );
        while let Err(e) = journal.cut(len) {
            error!(
                "cannot cut journal {} back to its last whole line: {e}; retrying in {retry:?}",
                path.display()
            );
            thread::sleep(retry);
        }
        thread::sleep(retry);
    }
}

/// Opens (creating it if needed) the journal for appending, and makes its directory entry
/// durable, since a record in it is acknowledged as soon as the record itself is fsync'd.
fn open_journal(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    store::sync_dir(path)?;
    Ok(file)
}

/// Group commit: adds every batch already queued behind `first` to its records. Returns the
/// last batch taken, the records, and whether a shutdown was queued behind them.
fn take_queued(
    rx: &Receiver<Command>,
    first: u64,
    mut records: Vec<Record>,
) -> (u64, Vec<Record>, bool) {
    let mut last = first;
    loop {
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
    fn open(
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
        let journal_len = journal.metadata().map(|m| m.len()).unwrap_or(0);
        let snapshot_len = fs::metadata(&paths.state).map(|m| m.len()).unwrap_or(0);
        let mut state = loaded.state;
        let mut writer = Writer {
            paths,
            options,
            journal,
            journal_len,
            snapshot_len,
            next_n: loaded.last_seq + 1,
            line: Vec::new(),
            unapplied: Vec::new(),
            compactor: None,
            compacting: false,
            journal_old: loaded.journal_old,
            retry_at: None,
            stats,
        };
        if journal_len > 0 || loaded.journal_old {
            writer.fold(&mut state)?;
            info!(
                "state: folded {} journal records into {}{}",
                loaded.replayed,
                writer.paths.state.display(),
                torn_tail_note(loaded.torn_tail, &loaded.zero_holes)
            );
            if !loaded.zero_holes.is_empty() {
                // Normal after a crash or power cut; after neither, the disk lost synced data.
                warn!(
                    "state: journal lines after a zero-filled hole were ignored; this is \
                     expected only after a crash or power loss, otherwise check the disk"
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

    fn run(&mut self, rx: Receiver<Command>, done: Sender<Done>, waker: Arc<mio::Waker>) {
        while let Ok(command) = rx.recv() {
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
                        return;
                    }
                    if let Err(e) = waker.wake() {
                        error!("cannot wake the event loop: {e}");
                    }
                    self.forward(records);
                    if stop {
                        self.finish();
                        return;
                    }
                    self.maybe_compact();
                }
                Command::Shutdown => {
                    self.finish();
                    return;
                }
            }
        }
    }

    /// Appends and fsyncs the records, retrying until the disk takes them: a token is only
    /// ever acknowledged once this returns.
    fn append(&mut self, records: &[Record]) {
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
        append_durably(
            &mut self.journal,
            self.journal_len,
            &self.line,
            RETRY_DELAY,
            &self.paths.journal,
        );
        self.journal_len += self.line.len() as u64;
        self.next_n += records.len() as u64;
        debug!("journal: {} records durable", records.len());
    }

    /// Collects durable records for the compactor, handing them over once a lot is full.
    fn forward(&mut self, records: Vec<Record>) {
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
                error!(
                    "cannot rename {} to {}: {e}; compaction postponed, the journal keeps every change",
                    self.paths.journal.display(),
                    self.paths.journal_old.display()
                );
                self.retry_at = Some(now + self.options.compact_retry);
                return;
            }
        }
        // The snapshot must hold every record up to `journal_seq`.
        self.hand_over();
        let journal_seq = self.next_n - 1;
        let sent = self
            .compactor
            .as_ref()
            .is_some_and(|c| c.jobs.send(Job::Compact { journal_seq }).is_ok());
        if sent {
            self.compacting = true;
            debug!("journal rotated; compacting up to record {journal_seq}");
        } else {
            self.compactor_gone();
        }
    }

    /// Renames the journal to `journal.old` and goes on in a fresh journal. A failed rename
    /// changes nothing. Once it is done, the fresh journal is opened (and the directory
    /// fsync'd, which also makes the rename durable) with retries until it works: nothing is
    /// appended, so nothing acknowledged, meanwhile.
    fn rotate(&mut self) -> io::Result<()> {
        fs::rename(&self.paths.journal, &self.paths.journal_old)?;
        self.journal_old = true;
        loop {
            match open_journal(&self.paths.journal) {
                Ok(file) => {
                    self.journal = file;
                    self.journal_len = 0;
                    return Ok(());
                }
                Err(e) => {
                    error!(
                        "cannot open a fresh journal {}: {e}; retrying in {RETRY_DELAY:?}",
                        self.paths.journal.display()
                    );
                    thread::sleep(RETRY_DELAY);
                }
            }
        }
    }

    /// At shutdown: lets a running compaction finish, takes the compactor's state back and
    /// folds what the journals still hold into the state file.
    fn finish(&mut self) {
        self.hand_over();
        let Some(Compactor {
            jobs,
            reports,
            thread,
        }) = self.compactor.take()
        else {
            error!("no final state file (the compactor is gone); the journals keep every change");
            return;
        };
        // The compactor applies what is queued, finishes, and hands its state back.
        drop(jobs);
        let joined = thread.join();
        while let Ok(report) = reports.try_recv() {
            self.handle_report(report);
        }
        let Ok(mut state) = joined else {
            error!("the state compactor panicked; the journals keep every change");
            return;
        };
        if self.journal_len == 0 && !self.journal_old {
            debug!("state: the state file already holds every change");
            return;
        }
        if let Err(e) = self.fold(&mut state) {
            error!("{e}; the journals keep every change");
        }
    }

    /// Writes `state` (every record applied) as the state file, then removes `journal.old`
    /// and empties the journal. Only while no compaction runs: at start and at shutdown.
    fn fold(&mut self, state: &mut State) -> Result<(), StoreError> {
        let started = Instant::now();
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
        self.journal_old = false;
        self.snapshot_len = bytes;
        let elapsed = started.elapsed();
        counters(&self.stats).written(elapsed);
        log_written(&self.paths, state, bytes, elapsed);
        Ok(())
    }
}

impl Compactor {
    fn spawn(
        paths: Paths,
        state: State,
        stats: Arc<Mutex<Compactions>>,
        waker: Arc<mio::Waker>,
    ) -> Result<Compactor, StoreError> {
        let (jobs, job_rx) = mpsc::channel();
        let (report_tx, reports) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("ocmd-compactor".into())
            .spawn(move || compact_loop(&paths, state, &job_rx, &report_tx, &stats, &waker))
            .map_err(|source| StoreError::Write {
                path: "compactor thread".into(),
                source,
            })?;
        Ok(Compactor {
            jobs,
            reports,
            thread,
        })
    }
}

/// The compactor thread: applies every durable record to its state and, when asked, writes
/// the state file and removes `journal.old`. Returns the state once the writer hangs up.
fn compact_loop(
    paths: &Paths,
    mut state: State,
    jobs: &Receiver<Job>,
    reports: &Sender<Report>,
    stats: &Mutex<Compactions>,
    waker: &mio::Waker,
) -> State {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Apply(records) => records.iter().for_each(|r| state.apply(r)),
            Job::Compact { journal_seq } => {
                let started = Instant::now();
                let result = write_snapshot(paths, &mut state, journal_seq)
                    .and_then(|bytes| remove_journal_old(paths).map(|()| bytes));
                let elapsed = started.elapsed();
                let report = match result {
                    Ok(bytes) => {
                        counters(stats).written(elapsed);
                        log_written(paths, &state, bytes, elapsed);
                        Some(bytes)
                    }
                    Err(e) => {
                        counters(stats).failed += 1;
                        error!(
                            "{e}; compaction failed after {elapsed:?}: {} is kept (its records \
                             are still needed) and compaction is retried later",
                            paths.journal_old.display()
                        );
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

/// Writes `state`, stamped as holding every record up to `journal_seq`, as the state file.
/// Returns its size.
fn write_snapshot(paths: &Paths, state: &mut State, journal_seq: u64) -> Result<u64, StoreError> {
    state.journal_seq = journal_seq;
    let now = SystemTime::now();
    store::write_atomic_with(&paths.state, |file| state.write_file(now, file)).map_err(|source| {
        StoreError::Write {
            path: paths.state.clone(),
            source,
        }
    })
}

/// Removes `journal.old` (whose records a state file now holds), durably.
fn remove_journal_old(paths: &Paths) -> Result<(), StoreError> {
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

fn log_written(paths: &Paths, state: &State, bytes: u64, elapsed: Duration) {
    info!(
        "state: wrote {} ({} rooms, {} tokens, {} bytes, journal record {}) in {:?}",
        paths.state.display(),
        state.rooms.len(),
        state.tokens.len(),
        bytes,
        state.journal_seq,
        elapsed
    );
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command as Process, Stdio};

    use mio::{Events, Poll, Token};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::record::MemberRecord;

    /// The environment variable that turns [`crash_child`] into the process to kill.
    const CRASH_DIR_ENV: &str = "OCM_PERSIST_CRASH_DIR";
    /// Every wait in these tests ends by then.
    const PATIENCE: Duration = Duration::from_secs(20);

    fn member(token: String) -> MemberRecord {
        MemberRecord {
            username: token.clone(),
            token,
            keepalive: None,
            caps: 0,
            max_datagram: None,
            joined_from: None,
        }
    }

    /// Record `n` of a deterministic history (`n` from 1): rooms are created, joined once,
    /// and closed 14 records later, so the state stays small and compactions come often.
    fn record(n: u64) -> Record {
        match n % 3 {
            1 => Record::CreateRoom {
                room: format!("r{n}"),
                host: member(format!("h{n}")),
                created_at: n as f64,
                listed: true,
                password_hash: None,
            },
            2 => Record::Join {
                room: format!("r{}", n - 1),
                member: member(format!("m{n}")),
            },
            _ => Record::CloseRoom {
                room: format!("r{}", n.saturating_sub(14)),
            },
        }
    }

    /// The state after records `1..=last`.
    fn model(last: u64) -> State {
        let mut state = State::default();
        (1..=last).for_each(|n| state.apply(&record(n)));
        state
    }

    fn assert_holds_exactly(loaded: &Loaded, last: u64) {
        let expected = model(last);
        assert_eq!(
            loaded.state.rooms, expected.rooms,
            "rooms after record {last}"
        );
        assert_eq!(loaded.state.tokens, expected.tokens, "tokens after {last}");
    }

    /// Loads the files and checks that they hold the history exactly: the journals (old one
    /// first) carry every record above the state file's `journal_seq`, none missing, and the
    /// loaded state is the history's up to the last of them. (The history's state forgets
    /// old rooms, so a lost old record would not show in it.)
    fn load_complete(paths: &Paths) -> Loaded {
        let loaded = store::load(paths).unwrap();
        let snapshot_seq = fs::read(&paths.state)
            .map_or(0, |bytes| store::parse_state(&bytes).unwrap().journal_seq);
        let mut next = snapshot_seq + 1;
        for path in [&paths.journal_old, &paths.journal] {
            let Ok(bytes) = fs::read(path) else { continue };
            for (n, _) in store::parse_journal(&bytes).unwrap().records {
                if n > snapshot_seq {
                    assert_eq!(n, next, "{}: record {next} missing", path.display());
                    next += 1;
                }
            }
        }
        assert_eq!(loaded.last_seq, next - 1);
        assert_holds_exactly(&loaded, loaded.last_seq);
        loaded
    }

    /// A persister driven the way the event loop drives it.
    struct Driver {
        poll: Poll,
        events: Events,
        persister: Persister,
        paths: Paths,
        next_n: u64,
    }

    impl Driver {
        fn start(dir: &Path, options: Options) -> Driver {
            let paths = Paths::new(&dir.join("s.json"));
            let loaded = store::load(&paths).unwrap();
            let next_n = loaded.last_seq + 1;
            let poll = Poll::new().unwrap();
            let waker = Arc::new(mio::Waker::new(poll.registry(), Token(0)).unwrap());
            let persister = Persister::start_with(paths.clone(), loaded, options, waker).unwrap();
            Driver {
                poll,
                events: Events::with_capacity(8),
                persister,
                paths,
                next_n,
            }
        }

        /// Writes the next `count` records of the history and waits until they are durable;
        /// returns the last one's number.
        fn write(&mut self, count: u64) -> u64 {
            let records = (self.next_n..self.next_n + count).map(record).collect();
            self.next_n += count;
            let batch = self.persister.submit(records);
            self.persister.pump();
            self.wait("the batch to be durable", |p| p.durable() >= batch);
            self.next_n - 1
        }

        fn wait(&mut self, what: &str, mut condition: impl FnMut(&mut Persister) -> bool) {
            let deadline = Instant::now() + PATIENCE;
            loop {
                self.persister.poll_done();
                if condition(&mut self.persister) {
                    return;
                }
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                self.poll
                    .poll(&mut self.events, Some(Duration::from_millis(50)))
                    .unwrap();
            }
        }
    }

    fn tiny(bytes: u64) -> Options {
        Options {
            compact_journal_bytes: bytes,
            compact_retry: Duration::from_millis(20),
        }
    }

    fn journal_len(paths: &Paths) -> u64 {
        fs::metadata(&paths.journal).map_or(0, |m| m.len())
    }

    /// A journal in memory whose appends, fsyncs and cuts fail as scripted: `faults` holds
    /// one entry per call, in order (`true` fails it), and calls past its end work. A failed
    /// append writes the first half of its bytes, as a short write before ENOSPC would.
    #[derive(Default)]
    struct FlakyJournal {
        bytes: Vec<u8>,
        faults: std::collections::VecDeque<bool>,
        calls: Vec<&'static str>,
    }

    impl FlakyJournal {
        fn fails(&mut self, call: &'static str) -> io::Result<()> {
            self.calls.push(call);
            if self.faults.pop_front().unwrap_or(false) {
                return Err(io::Error::other(format!("injected {call} failure")));
            }
            Ok(())
        }
    }

    impl JournalFile for FlakyJournal {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            if let Err(e) = self.fails("append") {
                self.bytes.extend_from_slice(&bytes[..bytes.len() / 2]);
                return Err(e);
            }
            self.bytes.extend_from_slice(bytes);
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            self.fails("sync")
        }
        fn cut(&mut self, len: u64) -> io::Result<()> {
            self.fails("cut")?;
            self.bytes.truncate(len as usize);
            Ok(())
        }
    }

    #[test]
    fn a_failed_append_leaves_no_fragment_whatever_fails_and_how_often() {
        let whole = b"{\"n\":1}\n".to_vec();
        let line = b"{\"n\":2,\"record\":\"x\"}\n".to_vec();
        let cases: [(&[bool], &[&str]); 7] = [
            (&[], &["append", "sync"]),
            // A short write, then everything works.
            (&[true], &["append", "cut", "append", "sync"]),
            // The line was written whole but not synced: it is cut and written once more.
            (&[false, true], &["append", "sync", "cut", "append", "sync"]),
            // The cut fails once: it is retried before anything is appended.
            (&[true, true], &["append", "cut", "cut", "append", "sync"]),
            // The cut fails twice: nothing is appended until it worked.
            (
                &[true, true, true],
                &["append", "cut", "cut", "cut", "append", "sync"],
            ),
            // The line was written whole, its fsync failed, and so did the first cut.
            (
                &[false, true, true],
                &["append", "sync", "cut", "cut", "append", "sync"],
            ),
            // Two failed appends in a row, each cut back.
            (
                &[true, false, true, false],
                &["append", "cut", "append", "cut", "append", "sync"],
            ),
        ];
        for (faults, calls) in cases {
            let mut journal = FlakyJournal {
                bytes: whole.clone(),
                faults: faults.iter().copied().collect(),
                calls: Vec::new(),
            };
            append_durably(
                &mut journal,
                whole.len() as u64,
                &line,
                Duration::ZERO,
                Path::new("journal"),
            );
            assert_eq!(journal.calls, calls, "faults {faults:?}");
            assert_eq!(
                String::from_utf8_lossy(&journal.bytes),
                String::from_utf8_lossy(&[whole.as_slice(), line.as_slice()].concat()),
                "faults {faults:?}: the journal must hold its old lines and the new one once"
            );
        }
    }

    /// The real journal file: opened for appending, so a write after a cut lands at the new
    /// end, not at the old cursor (which would leave a run of NUL bytes behind the cut).
    #[test]
    fn the_journal_file_appends_at_its_end_after_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut journal = open_journal(&path).unwrap();
        JournalFile::append(&mut journal, b"whole\nfragm").unwrap();
        journal.cut(6).unwrap();
        JournalFile::append(&mut journal, b"next\n").unwrap();
        journal.sync().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"whole\nnext\n");
    }

    #[test]
    fn the_writer_takes_every_queued_batch_in_one_write_and_stops_at_a_shutdown() {
        let leave = |t: &str| Record::Leave { token: t.into() };
        let (tx, rx) = mpsc::channel();
        for (batch, token) in [(2, "b"), (3, "c")] {
            let records = vec![leave(token)];
            tx.send(Command::Append { batch, records }).unwrap();
        }
        tx.send(Command::Shutdown).unwrap();
        tx.send(Command::Append {
            batch: 4,
            records: vec![leave("d")],
        })
        .unwrap();

        let (last, records, stop) = take_queued(&rx, 1, vec![leave("a")]);
        assert_eq!((last, stop), (3, true));
        let tokens: Vec<&str> = records
            .iter()
            .map(|r| match r {
                Record::Leave { token } => token.as_str(),
                _ => "?",
            })
            .collect();
        assert_eq!(
            tokens,
            ["a", "b", "c"],
            "in order, nothing after the shutdown"
        );

        assert!(
            matches!(rx.try_recv(), Ok(Command::Append { batch: 4, .. })),
            "what follows the shutdown stays queued"
        );
    }

    #[test]
    fn batches_handed_over_without_waiting_become_durable_in_order_and_none_early() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Driver::start(dir.path(), Options::default());
        let mut last_batch = 0;
        for _ in 0..50 {
            let records = vec![record(d.next_n)];
            d.next_n += 1;
            last_batch = d.persister.submit(records);
            d.persister.pump();
        }
        assert_eq!(last_batch, 50, "each pump hands over its own batch");
        assert!(d.persister.busy());
        let (mut reported, mut records) = (Vec::new(), 0);
        let deadline = Instant::now() + PATIENCE;
        while d.persister.durable() < last_batch {
            assert!(Instant::now() < deadline, "timed out: {reported:?}");
            for done in d.persister.poll_done() {
                reported.push(done.batch);
                records += done.records;
            }
            d.poll
                .poll(&mut d.events, Some(Duration::from_millis(50)))
                .unwrap();
        }
        // However the writer grouped them, every report names a later batch than the one
        // before, none names a batch it was not given, and the records add up.
        assert!(reported.windows(2).all(|w| w[0] < w[1]), "{reported:?}");
        assert_eq!(reported.last(), Some(&last_batch));
        assert_eq!(records, 50, "{reported:?}");
        assert!(!d.persister.busy());
        let last_n = d.next_n - 1;
        let paths = d.paths.clone();
        d.persister.shutdown();
        assert_eq!(load_complete(&paths).state.journal_seq, last_n);
    }

    #[test]
    fn durable_records_reach_the_compactor_in_full_lots_and_all_of_them_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("s.json"));
        let poll = Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), Token(0)).unwrap());
        let loaded = store::load(&paths).unwrap();
        let stats = Arc::new(Mutex::new(Compactions::default()));
        let mut writer = Writer::open(paths.clone(), loaded, Options::default(), stats, waker)
            .expect("a writer on an empty directory");
        let durable = |writer: &mut Writer, numbers: std::ops::RangeInclusive<u64>| {
            let records: Vec<Record> = numbers.map(record).collect();
            writer.append(&records);
            writer.forward(records);
        };
        let lot = APPLY_LOT as u64;
        durable(&mut writer, 1..=lot - 2);
        assert_eq!(
            writer.unapplied.len(),
            APPLY_LOT - 2,
            "short of a lot: kept"
        );
        durable(&mut writer, lot - 1..=lot + 1);
        assert!(writer.unapplied.is_empty(), "a full lot goes over at once");
        durable(&mut writer, lot + 2..=lot + 4);
        assert_eq!(writer.unapplied.len(), 3);
        // The final state file comes from the compactor's state: it holds the lot (most of
        // the rooms still open were created in it) and the three records kept back.
        writer.finish();
        let loaded = load_complete(&paths);
        assert_eq!(loaded.state.journal_seq, lot + 4);
        assert_eq!(loaded.replayed, 0);
    }

    #[test]
    fn appends_go_on_while_the_journal_is_rotated_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Driver::start(dir.path(), tiny(512));
        // 200 batches at least, and on until ten compactions are done and the journal is
        // small again (it holds what was appended while the last one ran): how many fit in
        // 200 depends on how often the compactor thread gets a CPU (6, and once none, in
        // loaded test runs, where the 200 appends took well under a second).
        let (mut last, mut batches) = (0, 0);
        let deadline = Instant::now() + PATIENCE;
        while batches < 200
            || d.persister.compactions().written < 10
            || journal_len(&d.paths) >= 64 * 1024
        {
            assert!(
                Instant::now() < deadline,
                "after {batches} batches, a journal of {} bytes: {:?}",
                journal_len(&d.paths),
                d.persister.compactions()
            );
            last = d.write(1 + batches % 5);
            batches += 1;
        }
        assert_eq!(d.persister.compactions().failed, 0);
        let paths = d.paths.clone();
        d.persister.shutdown();
        assert!(!paths.journal_old.exists());
        assert_eq!(journal_len(&paths), 0, "shutdown empties the journal");
        let loaded = load_complete(&paths);
        assert_eq!(loaded.state.journal_seq, last);
        assert_eq!(loaded.replayed, 0);
    }

    #[test]
    fn a_failed_compaction_keeps_the_old_journal_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Driver::start(dir.path(), tiny(256));
        // The state file's temporary name is taken by a directory: every snapshot fails.
        let blocker = dir.path().join("s.json.tmp");
        fs::create_dir(&blocker).unwrap();
        let mut last = 0;
        while d.persister.compactions().failed < 3 {
            last = d.write(2);
            assert!(last < 100_000, "compactions never failed");
        }
        assert!(d.paths.journal_old.exists(), "journal.old is kept");
        assert!(!d.paths.state.exists());
        // Nothing is lost meanwhile: the two journals hold every record.
        assert_eq!(load_complete(&d.paths).last_seq, last);

        fs::remove_dir(&blocker).unwrap();
        let written = d.persister.compactions().written;
        while d.persister.compactions().written == written || d.paths.journal_old.exists() {
            last = d.write(1);
            assert!(last < 100_000, "compaction never recovered");
        }
        assert_eq!(load_complete(&d.paths).last_seq, last);
        last = d.write(7);
        let paths = d.paths.clone();
        d.persister.shutdown();
        assert!(!paths.journal_old.exists());
        let loaded = load_complete(&paths);
        assert_eq!(loaded.replayed, 0);
        assert_eq!(loaded.last_seq, last);
    }

    /// A crash in the middle of a compaction: the next start folds the snapshot, journal.old
    /// and the journal into a fresh snapshot before anything else.
    #[test]
    fn start_folds_an_interrupted_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("s.json"));
        let mut snapshot = model(2);
        snapshot.journal_seq = 2;
        store::write_atomic(
            &paths.state,
            &snapshot.to_file_bytes(SystemTime::now()).unwrap(),
        )
        .unwrap();
        let lines = |range: std::ops::RangeInclusive<u64>| {
            let mut out = Vec::new();
            for n in range {
                let record = record(n);
                serde_json::to_writer(&mut out, &JournalLine { n, record: &record }).unwrap();
                out.push(b'\n');
            }
            out
        };
        fs::write(&paths.journal_old, lines(1..=20)).unwrap();
        fs::write(&paths.journal, lines(21..=30)).unwrap();
        let mut d = Driver::start(dir.path(), tiny(1 << 20));
        assert!(!paths.journal_old.exists());
        assert_eq!(journal_len(&paths), 0);
        let loaded = load_complete(&paths);
        assert_eq!(loaded.state.journal_seq, 30);
        assert_eq!(loaded.last_seq, 30);
        assert_eq!(d.persister.compactions().written, 1);
        let last = d.write(3);
        assert_eq!(last, 33, "numbering goes on after the folded records");
        d.persister.shutdown();
        assert_eq!(load_complete(&paths).last_seq, 33);
    }

    #[test]
    fn a_state_file_numbered_at_the_end_of_the_range_neither_panics_nor_hides_new_records() {
        // `journal_seq` comes from the file: the largest number must not make the writer
        // panic (debug) or wrap record numbers to 0 (release), which the next load would skip
        // as already folded, losing records whose replies were sent. Refusing the file is
        // fine too.
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("s.json"));
        let mut snapshot = State {
            journal_seq: u64::MAX,
            ..State::default()
        };
        store::write_atomic(
            &paths.state,
            &snapshot.to_file_bytes(SystemTime::now()).unwrap(),
        )
        .unwrap();
        let Ok(loaded) = store::load(&paths) else {
            return; // refused at load: nothing can be lost
        };
        let poll = Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), Token(0)).unwrap());
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Persister::start_with(paths.clone(), loaded, Options::default(), waker)
        }));
        let mut persister = match started {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return, // refused at start: nothing can be lost
            Err(_) => panic!("the writer panicked on a journal_seq read from the file"),
        };
        let batch = persister.submit(vec![record(1)]);
        persister.pump();
        let deadline = Instant::now() + PATIENCE;
        while persister.durable() < batch {
            assert!(Instant::now() < deadline, "never durable");
            thread::sleep(Duration::from_millis(5));
            persister.poll_done();
        }
        // As after a kill -9: the files as they are now.
        let reloaded = store::load(&paths).unwrap();
        assert!(
            reloaded.state.rooms.contains_key("r1"),
            "a durable record is skipped at the next load"
        );
    }

    /// Not a test on its own: the process [`sigkill_at_any_moment_loses_no_durable_record`]
    /// starts and kills. It writes the history in batches of 1 to 6 records with a tiny
    /// compaction threshold, printing `durable N` once record N is durable.
    #[test]
    fn crash_child() {
        let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
            return;
        };
        let mut d = Driver::start(Path::new(&dir), tiny(512));
        for i in 0.. {
            let last = d.write(1 + i % 6);
            println!("durable {last}");
        }
    }

    /// SIGKILL lands anywhere: in an append, a rotation, a snapshot, or between the snapshot
    /// and the removal of journal.old. Every record reported durable must load, the load must
    /// be exactly a prefix of the history, and a restart on the files must fold them.
    #[test]
    fn sigkill_at_any_moment_loses_no_durable_record() {
        const ROUNDS: usize = 10;
        let seed: u64 = std::env::var("OCM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("seed {seed} (replay with OCM_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let exe = std::env::current_exe().unwrap();
        let mut killed_mid_compaction = 0;
        for round in 0..ROUNDS {
            let dir = tempfile::tempdir().unwrap();
            let mut child = Process::new(&exe)
                .args([
                    "persist::tests::crash_child",
                    "--exact",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CRASH_DIR_ENV, dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let (tx, rx) = mpsc::channel();
            let reader = thread::spawn(move || {
                for line in stdout.lines() {
                    let Ok(line) = line else { break };
                    if let Some(n) = line.strip_prefix("durable ") {
                        let _ = tx.send(n.parse::<u64>().unwrap());
                    }
                }
            });
            let kill_after = rng.gen_range(10..=300);
            let mut durable = 0;
            for _ in 0..kill_after {
                durable = rx.recv_timeout(PATIENCE).expect("the child writes");
            }
            child.kill().unwrap();
            child.wait().unwrap();
            reader.join().unwrap();
            // Lines printed before the kill.
            durable = rx.try_iter().last().unwrap_or(durable);

            let paths = Paths::new(&dir.path().join("s.json"));
            let mid_compaction = paths.journal_old.exists();
            killed_mid_compaction += usize::from(mid_compaction);
            let loaded = load_complete(&paths);
            eprintln!(
                "round {round}: killed after record {durable}; loaded up to {}{}",
                loaded.last_seq,
                if mid_compaction {
                    ", with journal.old"
                } else {
                    ""
                }
            );
            assert!(loaded.last_seq >= durable, "durable records lost");

            let mut d = Driver::start(dir.path(), tiny(512));
            assert!(!paths.journal_old.exists());
            assert_eq!(journal_len(&paths), 0);
            let last = d.write(4);
            assert_eq!(last, loaded.last_seq + 4);
            d.persister.shutdown();
            assert_eq!(load_complete(&paths).last_seq, last);
        }
        eprintln!("{killed_mid_compaction} of {ROUNDS} kills left a journal.old");
    }
}
