//! The server's error types: what can stop start-up, and what can fail in the store.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

/// A failure of the state file or its journal.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The state file or journal exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("cannot parse state file {path}: {source} (the file was left untouched)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        source: serde_json::Error,
    },
    /// A whole journal line (its newline written) does not parse: corruption, not a torn
    /// append.
    #[error("journal {path} is corrupt at line {line}: {reason} (the file was left untouched)")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What the parser said.
        reason: String,
    },
    /// `journal.old` ends in a torn tail. It was synced whole before it was rotated, so the
    /// records from there on were acknowledged and are lost: a disk that dropped synced data,
    /// or mismatched copies.
    #[error(
        "{old} is cut short at line {line}: it was synced whole before it was rotated, so \
         acknowledged records from there on are lost (the files were left untouched)"
    )]
    CutShort {
        /// `journal.old`.
        old: PathBuf,
        /// Where its torn tail begins, 1-based.
        line: usize,
    },
    /// `journal.old` ends in NUL bytes and nothing else, and no journal record after it
    /// shows what they held. A rotated `journal.old` never ends so (the writer cuts the space
    /// it lays ahead of its appends off first), but a live journal moved to that name does,
    /// and so does one whose synced tail the disk lost: `ocmd` cannot tell which.
    #[error(
        "{old} ends in {bytes} NUL bytes from line {line}, and no journal after it shows what \
         they held: either a live journal was moved to this name (the space it lays ahead of \
         its appends, often hundreds of KiB: nothing lost; only if you or a script moved it \
         there, move it back to {journal}), or the disk lost synced records there (the files \
         were left untouched)"
    )]
    OldEndsInNuls {
        /// `journal.old`.
        old: PathBuf,
        /// The line of its first NUL byte, 1-based.
        line: usize,
        /// The NUL bytes from there to its end.
        bytes: u64,
        /// The journal's own name.
        journal: PathBuf,
    },
    /// A record number skips ahead of the last record applied: records are numbered one by
    /// one, so the ones in between, acknowledged, are missing.
    #[error(
        "{path} line {line} holds record {found} where record {expected} was due: {missing} \
         ({hint}; the files were left untouched)",
        missing = missing_records(*expected, *found)
    )]
    Gap {
        /// The journal holding the record.
        path: PathBuf,
        /// Its 1-based line.
        line: usize,
        /// The number due: one more than the last applied (the state file's `journal_seq`
        /// before any record).
        expected: u64,
        /// The number found, larger.
        found: u64,
        /// What most likely happened.
        hint: &'static str,
    },
    /// The record numbers went past [`crate::store::START_LIMIT`]: a hand-edited or corrupt
    /// file, since the daemon counts from 1.
    #[error(
        "the record numbers of {state} and its journals reach {last}, past 2^62, where \
         ocmd stops numbering: the files were edited or are corrupt (they were left untouched)"
    )]
    NumbersExhausted {
        /// The state file.
        state: PathBuf,
        /// The largest number found.
        last: u64,
    },
    /// Writing, syncing or renaming failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Serializing the state failed (should not happen: the model is plain data).
    #[error("cannot serialize state: {0}")]
    Serialize(serde_json::Error),
    /// The state file is a symbolic link: each snapshot is renamed over the state file's
    /// path, which would replace the link, and the lock beside the link does not guard its
    /// target.
    #[error(
        "state file {state} is a symbolic link to {target}: ocmd writes the state file by \
         renaming a new one over it, which would replace the link (and the lock beside the link \
         does not keep another ocmd off its target); give the target itself as --state or \
         [state] path, or link the directory instead"
    )]
    Symlink {
        /// The state file's path, as given.
        state: PathBuf,
        /// Where the link points.
        target: PathBuf,
    },
    /// The state file's directory does not exist: `ocmd` makes its files in it, not the
    /// directory itself (the unit's `StateDirectory=` makes `/var/lib/ocmd`).
    #[error(
        "state directory {dir} does not exist: ocmd makes the state file, its journal and its \
         lock in it but not the directory itself (the systemd unit's StateDirectory= makes \
         /var/lib/ocmd); create it, or give --state or [state] path a file in one that exists"
    )]
    NoStateDirectory {
        /// The missing directory.
        dir: PathBuf,
    },
    /// The state file or the journal is there but cannot hold one: a directory
    /// (`--state /var/lib/ocmd`, a directory for a file), a socket or a device.
    #[error(
        "{what} {file} is {kind}, not a file: --state and [state] path name the state file \
         itself, such as /var/lib/ocmd/room_manager.json (its journal and lock are made \
         beside it)"
    )]
    NotAFile {
        /// `state file` or `journal`.
        what: &'static str,
        /// The path, as the daemon names it.
        file: PathBuf,
        /// What it is instead: `a directory`, `a socket` or `a device`.
        kind: &'static str,
    },
    /// The state file or the journal has more than one name (a hard link made by hand:
    /// `ocmd` never makes one). The lock is the state file's name plus `.lock`, so a second
    /// `ocmd` started on another name would take a lock of its own and write the same file.
    #[error(
        "{what} {file} has {links} names (hard links): a second ocmd started on another of \
         them would take a lock of its own (the lock is the state file's name plus .lock) and \
         both would write this file; ocmd never makes hard links, so remove the other names \
         (find them with `find / -xdev -samefile {file}`), or make them copies (cp, not ln)"
    )]
    HardLinked {
        /// `state file` or `journal`.
        what: &'static str,
        /// The file's path, as the daemon names it.
        file: PathBuf,
        /// How many names it has.
        links: u64,
    },
    /// Another process holds the state file's lock.
    #[error("state file {state} is in use by another ocmd ({holder}); lock file {lock}")]
    Locked {
        /// The state file.
        state: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// What the lock file says about its holder (e.g. `pid 1234`).
        holder: String,
    },
}

/// Anything that stops the daemon from starting or running.
#[derive(Debug, Error)]
pub enum Error {
    /// A listening socket could not be set up.
    #[error("cannot bind {what} socket on {addr}: {source}")]
    Bind {
        /// `TCP`, `UDP` or `metrics`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// The state could not be loaded or saved.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sockets passed by systemd that cannot be used.
    #[error(transparent)]
    Activation(#[from] crate::activation::ActivationError),
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// Another I/O failure during set-up (poll, signals, threads).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The I/O error.
        source: io::Error,
    },
}

/// The records a [`StoreError::Gap`] lacks, `expected` up to the one before `found`, in words.
fn missing_records(expected: u64, found: u64) -> String {
    let last = found.saturating_sub(1);
    if last <= expected {
        format!("record {expected} is missing")
    } else {
        format!("records {expected} to {last} are missing")
    }
}
