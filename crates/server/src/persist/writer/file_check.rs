//! The writer's check of the files a start reads: the lock, the journal, `journal.old` and
//! the state file, each still at its name and with one name; whatever went is written again
//! from memory.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::thread;
use std::time::Instant;

use log::{debug, error, warn};

use super::Writer;
use crate::error::StoreError;
use crate::persist::failing::Failing;
use crate::persist::statx::{identity_at, identity_of, link_count};
use crate::persist::{counters, FileError, HardLinks, LockState, RETRY_DELAY};

/// A file's identity: its device and inode.
pub(super) fn file_id(metadata: &fs::Metadata) -> (u64, u64) {
    (metadata.dev(), metadata.ino())
}

/// Whether nothing has the name `path` (an error other than "not found" says nothing: it is
/// taken as there).
pub(super) fn is_missing(path: &Path) -> bool {
    fs::symlink_metadata(path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// How the journal the writer appends to is gone from where a start reads it
/// ([`Writer::replace_journal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JournalGone {
    /// It has no name left: deleted (seen after a sync, or by the file check).
    Deleted,
    /// It still has a name, but not the journal's: renamed away, or the journal's name
    /// removed while the file had another (a hard link). Seen by the file check only, up to
    /// [`super::FILE_CHECK_INTERVAL`] later: appends meanwhile are acknowledged into a file
    /// that a start would not read.
    NotAtItsName,
}

impl Writer {
    /// Checks that the files a start reads are still there, and writes them again from memory
    /// if not: a journal deleted while in use, or no longer the file at its name (renamed
    /// away, or its own name removed while it had another: [`Writer::replace_journal`]), a
    /// `journal.old` kept after a failed compaction and deleted, or a state file deleted (the
    /// journals hold only the changes since it was written). Done when the writer has been
    /// idle for [`super::FILE_CHECK_INTERVAL`], and at most that often between appends (each of
    /// which checks that the journal has a name, but not which).
    ///
    /// Only the journal's identity is compared, because only the journal is kept open: the
    /// state file and `journal.old` are looked for by name, and a state file renamed away or
    /// whose name was removed leaves that name empty, which is what the check finds. (The
    /// state file's inode changes at each compaction, which renames a new file over it, so
    /// an identity kept here would have to follow the compactor's reports for nothing more.)
    pub(in crate::persist) fn check_files(&mut self) {
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
    /// write the same file. A start refuses such a file
    /// ([`crate::persist::refuse_linked_state`]); this catches a link made while the daemon
    /// serves, at first and then once a minute while it lasts, and says at warn when the file
    /// has one name again. (A state file's link breaks by itself at its next write, which
    /// renames a new file over the name.) The counts go to
    /// [`crate::persist::Compactions::hard_links`], each check replacing the last, so that
    /// `/readyz` says not ready for as long as a second name lasts, not only the log.
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
        match crate::persist::take_lock(&self.paths) {
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
    pub(super) fn replace_journal(&mut self, gone: JournalGone) {
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
    /// inode, each from a `statx` that reads no times: [`crate::persist::statx`]). A journal
    /// renamed away, or whose own name was removed while it had another (a hard link), still
    /// has a name, so the count of names after each sync does not see that a start would not
    /// read it; this does, at the file check. A symbolic link at the name is followed, as a start
    /// follows it. An error other than "not found" says nothing and is taken as yes, as
    /// [`is_missing`] takes it.
    pub(super) fn journal_at_its_name(&self) -> bool {
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
}
