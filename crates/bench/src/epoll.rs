//! A minimal epoll set over raw descriptors, for the generator's threads that watch many
//! sockets (the receivers, the handshake driver). Each descriptor carries a caller's key.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Context, Result};

/// What a descriptor is watched for. Errors and hang-ups are reported either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    Readable,
    Writable,
}

/// An epoll set that closes itself.
pub struct Epoll(RawFd);

impl Epoll {
    /// An empty set.
    pub fn new() -> Result<Epoll> {
        // SAFETY: epoll_create1 has no memory preconditions.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).ctx("epoll_create1");
        }
        Ok(Epoll(fd))
    }

    /// Watches `fd` for reading (level-triggered); ready events carry `key`. A descriptor
    /// leaves the set by itself when it is closed.
    pub fn add_readable(&self, fd: RawFd, key: u64) -> Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, key, Watch::Readable)
    }

    /// Watches `fd` for `watch` (level-triggered); ready events carry `key`.
    pub fn add(&self, fd: RawFd, key: u64, watch: Watch) -> Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, key, watch)
    }

    /// Watches `fd`, already in the set, for `watch` instead.
    pub fn change(&self, fd: RawFd, key: u64, watch: Watch) -> Result<()> {
        self.control(libc::EPOLL_CTL_MOD, fd, key, watch)
    }

    fn control(&self, op: i32, fd: RawFd, key: u64, watch: Watch) -> Result<()> {
        let events = match watch {
            Watch::Readable => libc::EPOLLIN,
            Watch::Writable => libc::EPOLLOUT,
        };
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: key,
        };
        // SAFETY: both descriptors are live; event is a valid epoll_event.
        let rc = unsafe { libc::epoll_ctl(self.0, op, fd, &mut event) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).ctx("epoll_ctl");
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (0: not at all) and returns the keys of the ready
    /// descriptors, at most `events.len()` of them.
    pub fn wait<'e>(
        &self,
        events: &'e mut [libc::epoll_event],
        timeout_ms: i32,
    ) -> impl Iterator<Item = u64> + 'e {
        let room = i32::try_from(events.len()).unwrap_or(i32::MAX);
        // SAFETY: events has room for the count passed.
        let n = unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), room, timeout_ms) };
        let n = usize::try_from(n).unwrap_or(0);
        events[..n].iter().map(|event| event.u64)
    }

    /// Like [`Epoll::wait`], with a timeout to the nanosecond (`epoll_pwait2`, Linux 5.11),
    /// for a thread that must wake on time (a receiver that also paces senders). Where the
    /// kernel refuses the call (too old, or a seccomp filter that does not know it), this and
    /// every later wait use `epoll_wait`, the timeout rounded up to a millisecond.
    pub fn wait_precise<'e>(
        &self,
        events: &'e mut [libc::epoll_event],
        timeout: std::time::Duration,
    ) -> impl Iterator<Item = u64> + 'e {
        static REFUSED: AtomicBool = AtomicBool::new(false);
        let room = i32::try_from(events.len()).unwrap_or(i32::MAX);
        let mut n = -1;
        if !REFUSED.load(Ordering::Relaxed) {
            let spec = libc::timespec {
                tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_nsec: timeout.subsec_nanos() as _,
            };
            // SAFETY: the raw system call (glibc wraps it only from 2.35): events has room for
            // the count passed, spec is a valid timespec, no signal mask (null, size 0).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.0,
                    events.as_mut_ptr(),
                    room,
                    &spec as *const libc::timespec,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            n = rc as i32;
            let refused =
                rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR);
            if refused {
                REFUSED.store(true, Ordering::Relaxed);
            }
        }
        if REFUSED.load(Ordering::Relaxed) && n < 0 {
            let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: as in `wait`.
            n = unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), room, ms) };
        }
        let n = usize::try_from(n).unwrap_or(0);
        events[..n].iter().map(|event| event.u64)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe {
            libc::close(self.0);
        }
    }
}

/// Scratch for `n` ready events.
pub fn events(n: usize) -> Vec<libc::epoll_event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; n.max(1)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A precise wait on nothing waits out its timeout (a broken one would return at once),
    /// and wakes for it rather than sleeping on.
    #[test]
    fn a_precise_wait_on_nothing_lasts_its_timeout() {
        let epoll = Epoll::new().unwrap();
        let mut events = events(1);
        let started = Instant::now();
        let ready = epoll
            .wait_precise(&mut events, Duration::from_millis(2))
            .count();
        let took = started.elapsed();
        assert_eq!(ready, 0);
        assert!(took >= Duration::from_millis(2), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}
