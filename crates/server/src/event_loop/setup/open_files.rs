//! The open-file limit fitted to the connections allowed: raised as far as the hard limit
//! lets it, and the connection cap lowered to what it leaves room for.

use log::{debug, info, warn};

use crate::config::Config;
use crate::event_loop::MAX_HTTP_CONNECTIONS;

/// Descriptors the daemon holds besides its connections (standard streams, poll and its
/// waker, the listeners and the UDP socket, the signal pipe, the state's lock, journal,
/// snapshot and directory, the notify socket), with room to spare.
pub(super) const FIXED_DESCRIPTORS: u64 = 64;

/// Open files `config` may need at once: every connection it allows, and the rest.
pub(super) fn open_files_needed(config: &Config) -> u64 {
    (config.limits.max_connections as u64)
        .saturating_add(MAX_HTTP_CONNECTIONS as u64 + FIXED_DESCRIPTORS)
}

/// The handshake connections the open-file limit `open_files` leaves room for, besides the
/// metrics connections and [`FIXED_DESCRIPTORS`]: at most `max_connections`, at least one.
pub(super) fn connection_cap(max_connections: usize, open_files: u64) -> usize {
    let room = open_files.saturating_sub(MAX_HTTP_CONNECTIONS as u64 + FIXED_DESCRIPTORS);
    max_connections
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .max(1)
}

/// Raises the soft open-file limit to what `config` needs, no further than the hard limit,
/// and returns how many handshake connections may be open at once: `limits.max_connections`,
/// or fewer when the limit cannot fit them ([`connection_cap`]). Were the cap left above the
/// descriptors, `accept` would fail (EMFILE) before it was reached, so the idle connections
/// that a full table closes to make room would hold newcomers (and scrapes) off instead:
/// sources keeping their connections open with a request now and then would lock everyone
/// out for good. A shell's soft limit is 1024 on most systems, under the 4096 connections
/// allowed by default; the shipped unit sets both limits to 65536 (`LimitNOFILE=`), and then
/// nothing is changed.
pub(in crate::event_loop) fn fit_open_files(config: &Config) -> usize {
    let max_connections = config.limits.max_connections;
    let needed = open_files_needed(config);
    let Some(mut limit) = nofile_limit() else {
        return max_connections;
    };
    if limit.rlim_cur >= needed {
        return max_connections;
    }
    let raised = needed.min(limit.rlim_max);
    if raised > limit.rlim_cur {
        let new = libc::rlimit {
            rlim_cur: raised,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit(2) reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            debug!(
                "open files: soft limit raised from {} to {raised}",
                limit.rlim_cur
            );
            limit.rlim_cur = raised;
        } else {
            debug!(
                "open files: cannot raise the soft limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let cap = connection_cap(max_connections, limit.rlim_cur);
    if cap == max_connections {
        return cap;
    }
    // Warned only when the connections alone cannot fit: a hard limit of 4096 (some systems'
    // default) against the default 4096 connections falls short by the spare descriptors
    // alone, and a warning at every start there would teach operators to ignore it.
    if limit.rlim_cur < max_connections as u64 {
        warn!(
            "open files: limits.max_connections = {max_connections} needs about {needed}, but \
             the limit is {} (ulimit -n; LimitNOFILE= under systemd): at most {cap} handshake \
             connections are kept open, and a new one past them closes an idle one to make \
             room; raise the limit to allow more",
            limit.rlim_cur
        );
    } else {
        info!(
            "open files: the limit of {} leaves room for {cap} handshake connections besides \
             the metrics connections and the daemon's own files: limits.max_connections = \
             {max_connections} is taken as {cap}",
            limit.rlim_cur
        );
    }
    cap
}

/// The process's open-file limits (`RLIMIT_NOFILE`), soft and hard; `None` when they cannot
/// be read.
pub(in crate::event_loop) fn nofile_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) fills the struct we own.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}
