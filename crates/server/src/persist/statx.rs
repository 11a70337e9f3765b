//! What the writer asks of its journal's inode without reading the file's times: its count of
//! names after each sync, and, at the file check, whether the file at the journal's name is
//! still the one it appends to. Each is a `statx` asking for that one field.
//!
//! Not `fstat`, `stat` or `File::metadata`: reading a file's modification time marks it as
//! looked at, so that the kernel (6.13 on, multigrain timestamps) stamps the next write with a
//! fine-grained time, which dirties the inode on every append; each `fdatasync` then cost
//! ~40–50 µs more here (write + fsync 143–160 µs against 185–206 µs in the join benchmark,
//! and 107–110 µs against 156–160 µs for an 800-byte `pwrite` + `fdatasync` alone; see
//! `crates/bench/NOTES.md`, "A stat that slowed every group commit").
//!
//! Where `statx` fails (a kernel before 4.11, a seccomp filter that refuses it, whatever error
//! it gives), each question goes to `fstat` or `stat` instead, times and all: slower syncs
//! there, rather than no answer; only when that fails too is the question unanswered.
//! `statx` is called through `syscall(2)`, so that every refusal comes back here alike
//! (glibc's wrapper emulates the call after `ENOSYS`, through `fstatat`, but not after
//! `EPERM`).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file's identity as a `statx` that asks for its inode alone gives it: the device (which
/// every `statx` fills in) and the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Identity {
    dev_major: u32,
    dev_minor: u32,
    ino: u64,
}

/// `statx` of `path` relative to `dirfd`, with `flags`, asking for `mask` alone.
fn statx(
    dirfd: libc::c_int,
    path: &CStr,
    flags: libc::c_int,
    mask: u32,
) -> io::Result<libc::statx> {
    let mut stat = std::mem::MaybeUninit::<libc::statx>::uninit();
    // SAFETY: statx fills the buffer for `path` (a NUL-terminated string that outlives the
    // call) relative to `dirfd`; the buffer is read only when the call succeeded. The
    // arguments are the system call's, in its order and types.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            dirfd,
            path.as_ptr(),
            flags,
            mask,
            stat.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialized by the successful statx above.
    Ok(unsafe { stat.assume_init() })
}

/// `statx` of the file `file` keeps open (the empty path with `AT_EMPTY_PATH` names it).
fn statx_open(file: &File, mask: u32) -> io::Result<libc::statx> {
    statx(file.as_raw_fd(), c"", libc::AT_EMPTY_PATH, mask)
}

/// How many names `file` has (`stx_nlink`), from a `statx` that asks for nothing else, or
/// from `fstat` when `statx` fails.
pub(super) fn link_count(file: &File) -> io::Result<u64> {
    match statx_open(file, libc::STATX_NLINK) {
        Ok(stat) => Ok(links(&stat)),
        Err(_) => file.metadata().map(|m| m.nlink()),
    }
}

/// The count of names in `stat`, or 1 when the file system did not give it.
fn links(stat: &libc::statx) -> u64 {
    if stat.stx_mask & libc::STATX_NLINK == 0 {
        // The file system did not say: take it as linked rather than refuse every append.
        return 1;
    }
    u64::from(stat.stx_nlink)
}

/// The identity in `stat`, or `None` when the file system did not give the inode.
fn identity(stat: &libc::statx) -> Option<Identity> {
    (stat.stx_mask & libc::STATX_INO != 0).then_some(Identity {
        dev_major: stat.stx_dev_major,
        dev_minor: stat.stx_dev_minor,
        ino: stat.stx_ino,
    })
}

/// The identity `fstat` or `stat` gave, where there is no `statx`.
fn identity_of_metadata(m: &std::fs::Metadata) -> Identity {
    let dev = m.dev();
    Identity {
        dev_major: libc::major(dev),
        dev_minor: libc::minor(dev),
        ino: m.ino(),
    }
}

/// The identity of the file `file` keeps open; `None` when the file system did not say.
pub(super) fn identity_of(file: &File) -> io::Result<Option<Identity>> {
    match statx_open(file, libc::STATX_INO) {
        Ok(stat) => Ok(identity(&stat)),
        Err(_) => file.metadata().map(|m| Some(identity_of_metadata(&m))),
    }
}

/// The identity of the file at `path`, following a symbolic link as a start's `open` of it
/// would; `None` when the file system did not say.
pub(super) fn identity_at(path: &Path) -> io::Result<Option<Identity>> {
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    match statx(libc::AT_FDCWD, &name, 0, libc::STATX_INO) {
        Ok(stat) => Ok(identity(&stat)),
        Err(_) => std::fs::metadata(path).map(|m| Some(identity_of_metadata(&m))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `statx` whose mask lacks `STATX_INO` (a file system that did not give the inode)
    /// gives no identity, rather than one made of the zeros the kernel left: two such files
    /// would otherwise look the same. With the bit, the identity is its device and inode.
    #[test]
    fn an_inode_the_file_system_did_not_give_is_no_identity() {
        // SAFETY: `libc::statx` is plain integers, for which all zeros is a valid value.
        let mut stat: libc::statx = unsafe { std::mem::zeroed() };
        stat.stx_mask = libc::STATX_BASIC_STATS & !libc::STATX_INO;
        stat.stx_ino = 7;
        assert_eq!(identity(&stat), None);
        stat.stx_mask = 0;
        assert_eq!(identity(&stat), None);
        stat.stx_mask = libc::STATX_INO;
        stat.stx_dev_major = 8;
        stat.stx_dev_minor = 1;
        assert_eq!(
            identity(&stat),
            Some(Identity {
                dev_major: 8,
                dev_minor: 1,
                ino: 7
            })
        );
    }

    /// A `statx` whose mask lacks `STATX_NLINK` counts as one name, not as the 0 the kernel
    /// left there: 0 would read as a journal deleted while in use, and every append would
    /// replace it. With the bit, the count is the file's.
    #[test]
    fn a_count_of_names_the_file_system_did_not_give_is_one() {
        // SAFETY: `libc::statx` is plain integers, for which all zeros is a valid value.
        let mut stat: libc::statx = unsafe { std::mem::zeroed() };
        stat.stx_mask = libc::STATX_BASIC_STATS & !libc::STATX_NLINK;
        assert_eq!(links(&stat), 1);
        stat.stx_mask = 0;
        assert_eq!(links(&stat), 1);
        stat.stx_mask = libc::STATX_NLINK;
        assert_eq!(links(&stat), 0, "a file without a name");
        stat.stx_nlink = 3;
        assert_eq!(links(&stat), 3);
    }
}
