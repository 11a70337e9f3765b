//! The space laid down ahead of the journal's appends: NUL bytes written and synced past its
//! end, so that an append's `fdatasync` writes the data and not the file's new size.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use log::{debug, info, warn};

use super::Writer;
use crate::persist::backoff;
use crate::store::SPACE_AHEAD_BYTES;

/// Lays down `bytes` NUL bytes at `offset` of the journal and makes them durable.
pub(in crate::persist) fn lay_space_ahead(
    journal: &File,
    offset: u64,
    bytes: u64,
) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut written = 0;
    while written < bytes {
        let n = (bytes - written).min(ZEROS.len() as u64);
        journal.write_all_at(&ZEROS[..n as usize], offset + written)?;
        written += n;
    }
    journal.sync_data()
}

/// Bytes free to an unprivileged writer on the file system holding `file` (`fstatvfs`).
pub(in crate::persist) fn free_bytes(file: &File) -> io::Result<u64> {
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs fills the buffer for the descriptor `file` keeps open; the buffer is
    // read only when the call succeeded.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialized by the successful fstatvfs above.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

impl Writer {
    /// Lays down [`SPACE_AHEAD_BYTES`] more NUL bytes past the journal's end, and syncs them,
    /// once less than a quarter of that is left ahead of the appends: an append into blocks
    /// the file already has leaves its size alone, so its `fdatasync` writes the data and
    /// nothing else. Done after a commit's replies are out, so no reply waits for it; a
    /// failure costs only speed (appends go past the file's end meanwhile) and is retried at
    /// doubling intervals up to a minute, or as soon as a full disk has room again
    /// ([`backoff::LayBackoff`]), never holding an append back.
    pub(super) fn keep_space_ahead(&mut self) {
        self.keep_space_ahead_at(Instant::now(), lay_space_ahead, free_bytes);
    }

    /// [`Writer::keep_space_ahead`] at `now`, laying the space with `lay` and asking the file
    /// system's free space with `free`: tests put a full disk and a clock of their own there.
    pub(in crate::persist) fn keep_space_ahead_at(
        &mut self,
        now: Instant,
        mut lay: impl FnMut(&File, u64, u64) -> io::Result<()>,
        mut free: impl FnMut(&File) -> io::Result<u64>,
    ) {
        if self.ahead_end.saturating_sub(self.journal_len) >= SPACE_AHEAD_BYTES / 4 {
            return;
        }
        let journal = &self.journal;
        if !self
            .ahead_backoff
            .due(now, SPACE_AHEAD_BYTES, || free(journal).ok())
        {
            return;
        }
        let from = self.ahead_end.max(self.journal_len);
        match lay(&self.journal, from, SPACE_AHEAD_BYTES) {
            Ok(()) => {
                self.ahead_end = from + SPACE_AHEAD_BYTES;
                debug!("journal: space laid down ahead to byte {}", self.ahead_end);
                if let Some(tally) = self.ahead_backoff.succeeded(now) {
                    info!(
                        "journal {}: space laid down ahead again, after {tally}",
                        self.paths.journal.display()
                    );
                }
            }
            Err(e) => {
                // A full disk (less free than a lay needs) is tried again as soon as it has
                // room; anything else only by the schedule.
                let short_of_room = free(&self.journal).is_ok_and(|b| b < SPACE_AHEAD_BYTES);
                let (first, delay) = self.ahead_backoff.failed(now, short_of_room);
                if first {
                    warn!(
                        "cannot lay down space ahead in journal {}: {e}; appends go on past \
                         its end; trying again in {delay:?}, then at doubling intervals up to \
                         {:?}, or as soon as the file system has room",
                        self.paths.journal.display(),
                        backoff::MAX_DELAY
                    );
                } else {
                    debug!(
                        "cannot lay down space ahead in journal {}: {e}; trying again in \
                         {delay:?}",
                        self.paths.journal.display()
                    );
                }
            }
        }
    }
}
