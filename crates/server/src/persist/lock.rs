//! The state's advisory lock beside the state file, which keeps a second `ocmd` off the same
//! files; and the state paths refused because a lock could not do that (a state file that is
//! a symbolic link, a state file or journal with another name).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::StoreError;
use crate::store::Paths;

/// Refuses a state file that is a symbolic link ([`StoreError::Symlink`] says why); checked
/// at start and by `--check-config`.
pub fn refuse_symlinked_state(state: &Path) -> Result<(), StoreError> {
    match fs::read_link(state) {
        Ok(target) => Err(StoreError::Symlink {
            state: state.to_owned(),
            target,
        }),
        Err(_) => Ok(()),
    }
}

/// Refuses a state path whose lock would not keep a second `ocmd` off its files: a state
/// file that is a symbolic link ([`refuse_symlinked_state`]), or a state file or journal with
/// another name ([`StoreError::HardLinked`]); and one that is no file at all
/// ([`StoreError::NotAFile`]: a directory has two names or more of its own, and would be
/// called hard-linked). Checked at start (before the lock is taken) and by `--check-config`;
/// the writer's file check says so when a name is added while it serves.
pub fn refuse_linked_state(state: &Path) -> Result<(), StoreError> {
    refuse_symlinked_state(state)?;
    refuse_hard_linked_state(state)
}

/// Refuses a state file or journal with more than one name ([`StoreError::HardLinked`]), or
/// that is not a regular file ([`StoreError::NotAFile`]).
fn refuse_hard_linked_state(state: &Path) -> Result<(), StoreError> {
    let paths = Paths::new(state);
    for (what, file) in [("state file", paths.state), ("journal", paths.journal)] {
        // A file that is not there (a fresh start) or cannot be looked at has no other name
        // to refuse; the load reports what it cannot read.
        let Ok(metadata) = fs::symlink_metadata(&file) else {
            continue;
        };
        if let Some(kind) = not_a_file(metadata.file_type()) {
            return Err(StoreError::NotAFile { what, file, kind });
        }
        let links = metadata.nlink();
        if links > 1 {
            return Err(StoreError::HardLinked { what, file, links });
        }
    }
    Ok(())
}

/// What a path is, in words, when it cannot hold a state file or journal: a directory, a
/// socket or a device. A regular file or a symbolic link (whose own check comes first) can,
/// and so can a named pipe, read as the bytes written to it (the tests feed a slow load so).
fn not_a_file(kind: fs::FileType) -> Option<&'static str> {
    if kind.is_file() || kind.is_symlink() || kind.is_fifo() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("a device")
    }
}

/// Takes the advisory lock beside the state file, so that two daemons never share it.
/// The returned file must live as long as the process uses the state.
pub fn lock(paths: &Paths) -> Result<File, StoreError> {
    refuse_linked_state(&paths.state)?;
    take_lock(paths).map_err(|e| match e {
        // The first file made in the state's directory: a missing directory is named as one.
        StoreError::Write { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            match paths.lock.parent() {
                Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => {
                    StoreError::NoStateDirectory {
                        dir: dir.to_owned(),
                    }
                }
                _ => StoreError::Write {
                    path: paths.lock.clone(),
                    source,
                },
            }
        }
        e => e,
    })
}

/// Takes the lock, refusing only a symbolic link: for the writer too, which takes it again
/// when its file was deleted while in use, and says itself when the state file or journal has
/// another name ([`super::writer::Writer::check_files`]): refusing the lock for that would
/// leave it to whichever `ocmd` comes next.
pub(super) fn take_lock(paths: &Paths) -> Result<File, StoreError> {
    refuse_symlinked_state(&paths.state)?;
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
