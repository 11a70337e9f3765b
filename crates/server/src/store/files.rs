//! Writing the state's files so that a crash leaves each whole: a temporary file renamed over
//! the old one, the directory synced (a failed directory `fsync` marked as such), and files
//! that hold tokens made private to their owner.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file whole
/// (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes)).map(|_| ())
}

/// Writes `path` through `write` so that a crash leaves either the old or the new file
/// whole: a temporary file created exclusively beside it with mode 0600, written through a
/// buffer, fsync'd, renamed over `path`, and the directory fsync'd. Returns the file's size.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<&File>) -> io::Result<()>,
) -> io::Result<u64> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // The caller names `path`; an error of the temporary file says it was that one.
    let at_tmp = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", tmp.display()));
    let file = match create_private(&tmp) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Left over by a crash mid-write; the lock file guarantees it is not in use.
            fs::remove_file(&tmp).map_err(at_tmp)?;
            create_private(&tmp).map_err(at_tmp)?
        }
        other => other.map_err(at_tmp)?,
    };
    let written = (|| {
        let mut buffered = io::BufWriter::with_capacity(64 * 1024, &file);
        write(&mut buffered)?;
        buffered.flush()?;
        drop(buffered);
        file.sync_all()?;
        file.metadata().map(|m| m.len())
    })();
    drop(file);
    let size = match written {
        Ok(size) => size,
        Err(e) => {
            // A partial file could hold the disk space the journal needs (ENOSPC).
            let _ = fs::remove_file(&tmp);
            return Err(at_tmp(e));
        }
    };
    if let Err(e) = fs::rename(&tmp, path) {
        // A whole copy of the state (tokens, password hashes) left for nothing.
        let _ = fs::remove_file(&tmp);
        return Err(io::Error::new(
            e.kind(),
            format!("renaming {} over it: {e}", tmp.display()),
        ));
    }
    sync_dir(path)?;
    Ok(size)
}

/// Creates a new file with mode 0600, failing if it exists.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Takes group and other permissions off `file` (at `path`), which holds tokens and password
/// hashes: files the daemon creates are 0600 already, but a state file left by the original
/// server or restored with `cp` under a umask of 022 is not. Says so in the log either way.
pub fn restrict_to_owner(file: &File, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(mode) = file.metadata().map(|m| m.permissions().mode() & 0o7777) else {
        return;
    };
    if mode & 0o077 == 0 {
        return;
    }
    let owner_only = mode & 0o700;
    match file.set_permissions(fs::Permissions::from_mode(owner_only)) {
        Ok(()) => log::info!(
            "state: {} was readable by others (mode {mode:o}); now {owner_only:o}",
            path.display()
        ),
        Err(e) => log::warn!(
            "state: {} is readable by others (mode {mode:o}) and cannot be restricted: {e}",
            path.display()
        ),
    }
}

/// Fsyncs the directory holding `path`, making a rename or a creation durable.
///
/// A failed `fsync` itself comes back marked ([`is_failed_dir_sync`]): the kernel reports a
/// write-back error once, so an `fsync` retried through a fresh descriptor may succeed without
/// the entries being on disk. A daemon must not go on as if a retry had made them durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?
        .sync_all()
        .map_err(|e| io::Error::new(e.kind(), FailedDirSync(e)))
}

/// The error of a directory `fsync` that failed (see [`sync_dir`]).
#[derive(Debug, thiserror::Error)]
#[error("fsync of the directory failed: {0}")]
pub struct FailedDirSync(io::Error);

/// Whether `error` is a directory `fsync` that failed, after which entries renamed or created
/// in that directory may not be on disk whatever a retry says.
pub fn is_failed_dir_sync(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<FailedDirSync>())
}
