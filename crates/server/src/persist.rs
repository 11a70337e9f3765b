//! The writer thread: durable group commit of journal records, off the event loop.
//!
//! The loop hands the registry's records to [`Persister::submit`], which tags them with the
//! batch that will carry them. While one batch is being written and fsync'd, new records
//! gather; when the write completes the next batch takes all of them at once (group commit),
//! so a burst of joins costs one fsync, not one each. The thread wakes the loop through a
//! `mio::Waker` when a batch is durable, and the loop then releases the replies (the tokens)
//! that waited for it.
//!
//! The thread also keeps its own copy of the state, in the file's model, with every record
//! applied. When the journal outgrows the last snapshot it writes that copy as the new state
//! file (temporary file, fsync, rename, directory fsync) and empties the journal. The loop
//! never serializes the whole state.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info};

use crate::error::StoreError;
use crate::record::Record;
use crate::store::{self, JournalLine, Loaded, Paths, State};

/// The journal is folded into the state file once it is larger than this many bytes and
/// larger than the last state file.
pub const COMPACT_MIN_BYTES: u64 = 8 * 1024 * 1024;
/// How long the writer waits before retrying a failed write.
const RETRY_DELAY: Duration = Duration::from_secs(1);

enum Command {
    Append { batch: u64, records: Vec<Record> },
    Shutdown,
}

/// A finished batch.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// The batch now durable.
    pub batch: u64,
    /// Records it carried.
    pub records: usize,
    /// Time from hand-off to durable (write and fsync).
    pub elapsed: Duration,
}

/// The loop's handle on the writer thread.
pub struct Persister {
    tx: Sender<Command>,
    done_rx: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    pending: Vec<Record>,
    in_flight: bool,
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
    /// Starts the writer on a loaded state. If the journal held records, they are folded into
    /// the state file first, so every start begins with an empty journal.
    pub fn start(
        paths: Paths,
        loaded: Loaded,
        waker: Arc<mio::Waker>,
    ) -> Result<Persister, StoreError> {
        let mut writer = Writer::open(paths, loaded)?;
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
            pending: Vec::new(),
            in_flight: false,
            next_batch: 1,
            durable: 0,
        })
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
        self.in_flight || !self.pending.is_empty()
    }

    /// Hands the queued records to the writer if it is idle.
    pub fn pump(&mut self) {
        if self.in_flight || self.pending.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.pending);
        let batch = self.next_batch;
        self.next_batch += 1;
        if self.tx.send(Command::Append { batch, records }).is_ok() {
            self.in_flight = true;
        } else {
            error!("state writer thread is gone; changes are no longer persisted");
        }
    }

    /// Collects finished batches (after the waker fired) and starts the next one.
    pub fn poll_done(&mut self) -> Vec<Done> {
        let mut done = Vec::new();
        while let Ok(d) = self.done_rx.try_recv() {
            self.durable = self.durable.max(d.batch);
            self.in_flight = false;
            done.push(d);
        }
        self.pump();
        done
    }

    /// Writes everything queued, folds the journal into the state file and stops the thread.
    /// Blocks: for shutdown only.
    pub fn shutdown(mut self) {
        while self.busy() {
            self.pump();
            match self.done_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(d) => {
                    self.durable = d.batch;
                    self.in_flight = false;
                }
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

struct Writer {
    paths: Paths,
    state: State,
    journal: File,
    journal_len: u64,
    snapshot_len: u64,
    next_n: u64,
    line: Vec<u8>,
}

impl Writer {
    fn open(paths: Paths, loaded: Loaded) -> Result<Writer, StoreError> {
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&paths.journal)
            .map_err(|source| StoreError::Write {
                path: paths.journal.clone(),
                source,
            })?;
        let journal_len = journal.metadata().map(|m| m.len()).unwrap_or(0);
        let mut writer = Writer {
            paths,
            state: loaded.state,
            journal,
            journal_len,
            snapshot_len: 0,
            next_n: loaded.last_seq + 1,
            line: Vec::new(),
        };
        if journal_len > 0 {
            writer.compact()?;
            info!(
                "state: folded {} journal records into {}{}",
                loaded.replayed,
                writer.paths.state.display(),
                if loaded.torn_tail {
                    " (a torn final line was ignored)"
                } else {
                    ""
                }
            );
        }
        Ok(writer)
    }

    fn run(&mut self, rx: Receiver<Command>, done: Sender<Done>, waker: Arc<mio::Waker>) {
        while let Ok(command) = rx.recv() {
            match command {
                Command::Append { batch, records } => {
                    let started = Instant::now();
                    self.append(&records);
                    let report = Done {
                        batch,
                        records: records.len(),
                        elapsed: started.elapsed(),
                    };
                    if done.send(report).is_err() {
                        return;
                    }
                    if let Err(e) = waker.wake() {
                        error!("cannot wake the event loop: {e}");
                    }
                    if self.journal_len > COMPACT_MIN_BYTES.max(self.snapshot_len) {
                        self.compact_or_log();
                    }
                }
                Command::Shutdown => {
                    self.compact_or_log();
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
        loop {
            let result = self
                .journal
                .write_all(&self.line)
                .and_then(|()| self.journal.sync_data());
            match result {
                Ok(()) => break,
                Err(e) => {
                    error!(
                        "cannot append to journal {}: {e}; retrying in {RETRY_DELAY:?}",
                        self.paths.journal.display()
                    );
                    // Drop a partial append so the retry does not leave a torn line behind.
                    let _ = self.journal.set_len(self.journal_len);
                    thread::sleep(RETRY_DELAY);
                }
            }
        }
        self.journal_len += self.line.len() as u64;
        self.next_n += records.len() as u64;
        for record in records {
            self.state.apply(record);
        }
        debug!("journal: {} records durable", records.len());
    }

    fn compact_or_log(&mut self) {
        if let Err(e) = self.compact() {
            error!("{e}; the journal keeps every change meanwhile");
        }
    }

    /// Writes the state file from the writer's copy, then empties the journal.
    fn compact(&mut self) -> Result<(), StoreError> {
        let started = Instant::now();
        self.state.journal_seq = self.next_n - 1;
        let write_err = |path: &std::path::Path, source| StoreError::Write {
            path: path.to_owned(),
            source,
        };
        let bytes = self.state.to_file_bytes(SystemTime::now())?;
        store::write_atomic(&self.paths.state, &bytes)
            .map_err(|e| write_err(&self.paths.state, e))?;
        self.snapshot_len = bytes.len() as u64;
        // The state file now holds every journal record (its journal_seq says so), so a crash
        // before or during this truncation replays nothing twice.
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_all())
            .map_err(|e| write_err(&self.paths.journal, e))?;
        self.journal_len = 0;
        info!(
            "state: wrote {} ({} rooms, {} tokens, {} bytes) in {:?}",
            self.paths.state.display(),
            self.state.rooms.len(),
            self.state.tokens.len(),
            bytes.len(),
            started.elapsed()
        );
        Ok(())
    }
}
