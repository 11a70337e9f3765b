//! The writer's side of compaction: handing durable records to the compactor in lots, asking
//! it for a state file once the journal has outgrown the last one, rotating the journal to
//! `journal.old` for it, and taking its reports; and asking it for a backup.

use std::fs;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use log::{debug, error, warn};

use super::append::open_journal;
use super::Writer;
use crate::persist::failing::Failing;
use crate::persist::{counters, Job, Report, RETRY_DELAY};
use crate::store;

impl Writer {
    /// Hands every collected record to the compactor (a move, not a copy).
    pub(super) fn hand_over(&mut self) {
        let records = std::mem::take(&mut self.unapplied);
        let Some(compactor) = &self.compactor else {
            return;
        };
        if !records.is_empty() && compactor.jobs.send(Job::Apply(records)).is_err() {
            self.compactor_gone();
        }
    }

    /// Asks the compactor for a backup holding every durable record: those not handed over
    /// yet go first, so its state is exactly as far as the journal when it takes the job.
    pub(super) fn backup(&mut self) {
        self.hand_over();
        let journal_seq = self.next_n - 1;
        let sent = self
            .compactor
            .as_ref()
            .map(|compactor| compactor.jobs.send(Job::Backup { journal_seq }).is_ok());
        if sent != Some(true) {
            counters(&self.stats).backups_failed += 1;
            error!(
                "state: backup {} not written: the state compactor thread is gone",
                self.paths.backup.display()
            );
            if sent == Some(false) {
                self.compactor_gone();
            }
        }
    }

    /// The flag that makes the compactor skip backups ([`Persister::skip_backups`]); a flag
    /// of its own when the compactor is gone.
    ///
    /// [`Persister::skip_backups`]: crate::persist::Persister::skip_backups
    pub(in crate::persist) fn stopping_flag(&self) -> Arc<AtomicBool> {
        self.compactor
            .as_ref()
            .map_or_else(Arc::default, |compactor| Arc::clone(&compactor.stopping))
    }

    pub(super) fn compactor_gone(&mut self) {
        self.compactor = None;
        self.compacting = false;
        error!(
            "the state compactor thread is gone; {} keeps growing until the next start folds it",
            self.paths.journal.display()
        );
    }

    /// Takes the compactor's reports without waiting.
    pub(super) fn collect_reports(&mut self) {
        while let Some(compactor) = &self.compactor {
            match compactor.reports.try_recv() {
                Ok(report) => self.handle_report(report),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => self.compactor_gone(),
            }
        }
    }

    pub(super) fn handle_report(&mut self, report: Report) {
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
    pub(super) fn maybe_compact(&mut self) {
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
    pub(super) fn ask_for_compaction(&mut self) -> Option<u64> {
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
    /// A failed directory `fsync` stops the daemon
    /// ([`crate::persist::stop_after_failed_dir_sync`]): records appended to a journal whose
    /// entry may not be on disk must not be acknowledged.
    pub(in crate::persist) fn rotate(&mut self) -> io::Result<()> {
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
    pub(super) fn open_fresh_journal(&mut self, what: &str, hint: &str, emptied: bool) {
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
                    crate::persist::stop_after_failed_dir_sync(what, &e)
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
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::persist::compactor::Compactor;
    use crate::persist::{counters, Compactions, Options};
    use crate::record::Record;
    use crate::store::{Paths, State};

    /// A writer on a fresh state in `dir` that asks for a compaction at every commit, its
    /// paths, and its compactions' counters.
    fn compacting_at_every_commit(
        dir: &tempfile::TempDir,
    ) -> (Writer, Paths, Arc<Mutex<Compactions>>) {
        let options = Options {
            compact_journal_bytes: 1,
            ..Options::default()
        };
        super::super::on_a_fresh_state(dir, options)
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
            stopping: Arc::default(),
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
