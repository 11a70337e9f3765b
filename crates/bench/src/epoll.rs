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
pub struct Epoll {
    fd: RawFd,
    /// Set once the kernel refused `epoll_pwait2` on this set: its precise waits then use
    /// `epoll_wait` ([`Epoll::wait_precise`]).
    precise_refused: AtomicBool,
}

impl Epoll {
    /// An empty set.
    pub fn new() -> Result<Epoll> {
        // SAFETY: epoll_create1 has no memory preconditions.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).ctx("epoll_create1");
        }
        Ok(Epoll {
            fd,
            precise_refused: AtomicBool::new(false),
        })
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
        let rc = unsafe { libc::epoll_ctl(self.fd, op, fd, &mut event) };
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
        let n = unsafe { libc::epoll_wait(self.fd, events.as_mut_ptr(), room, timeout_ms) };
        let n = usize::try_from(n).unwrap_or(0);
        events[..n].iter().map(|event| event.u64)
    }

    /// Like [`Epoll::wait`], with a timeout to the nanosecond (`epoll_pwait2`, Linux 5.11),
    /// for a thread that must wake on time (a receiver that also paces senders). Where the
    /// kernel refuses the call (`ENOSYS` from a kernel too old, `EPERM` or `EACCES` from a
    /// seccomp filter that does not know it), this and every later precise wait on this set
    /// use `epoll_wait`, the timeout rounded up to a millisecond, and
    /// [`Epoll::precise_refused`] says so. Another error falls back for this wait only, and an
    /// interrupted wait returns nothing.
    pub fn wait_precise<'e>(
        &self,
        events: &'e mut [libc::epoll_event],
        timeout: std::time::Duration,
    ) -> impl Iterator<Item = u64> + 'e {
        /// The kernel's `__kernel_timespec`: two 64-bit fields on every architecture, where a
        /// 32-bit C library's `timespec` has a 32-bit `time_t`.
        #[repr(C)]
        struct KernelTimespec {
            tv_sec: i64,
            tv_nsec: i64,
        }
        let room = i32::try_from(events.len()).unwrap_or(i32::MAX);
        let mut n = -1;
        let mut fall_back = self.precise_refused();
        if !fall_back {
            let spec = KernelTimespec {
                tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(timeout.subsec_nanos()),
            };
            // SAFETY: the raw system call (glibc wraps it only from 2.35): events has room for
            // the count passed, spec is a valid `__kernel_timespec`, no signal mask (null,
            // size 0).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.fd,
                    events.as_mut_ptr(),
                    room,
                    &spec as *const KernelTimespec,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            n = i32::try_from(rc).unwrap_or(-1);
            if rc < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::ENOSYS | libc::EPERM | libc::EACCES) => {
                        self.precise_refused.store(true, Ordering::Relaxed);
                        fall_back = true;
                    }
                    _ => fall_back = true,
                }
            }
        }
        if n < 0 && fall_back {
            let ms = i32::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
            // SAFETY: as in `wait`.
            n = unsafe { libc::epoll_wait(self.fd, events.as_mut_ptr(), room, ms) };
        }
        let n = usize::try_from(n).unwrap_or(0);
        events[..n].iter().map(|event| event.u64)
    }

    /// Whether the kernel refused `epoll_pwait2` on this set, so that its precise waits were
    /// rounded up to a millisecond.
    pub fn precise_refused(&self) -> bool {
        self.precise_refused.load(Ordering::Relaxed)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe {
            libc::close(self.fd);
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
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    /// A precise wait on `epoll` for `timeout`: how many descriptors were ready, and how long
    /// it took.
    fn time_a_precise_wait(epoll: &Epoll, timeout: Duration) -> (usize, Duration) {
        let mut events = events(4);
        let started = Instant::now();
        let ready = epoll.wait_precise(&mut events, timeout).count();
        (ready, started.elapsed())
    }

    /// A precise wait on nothing waits out its timeout (a broken one would return at once),
    /// and wakes for it rather than sleeping on.
    #[test]
    fn a_precise_wait_on_nothing_lasts_its_timeout() {
        let epoll = Epoll::new().unwrap();
        let (ready, took) = time_a_precise_wait(&epoll, Duration::from_millis(2));
        assert_eq!(ready, 0);
        assert!(took >= Duration::from_millis(2), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    /// Has the kernel answer `epoll_pwait2` with `errno` on the calling thread, and on it
    /// only: a seccomp filter installed without `SECCOMP_FILTER_FLAG_TSYNC`, after
    /// `no_new_privs` (which an unprivileged filter needs, and which is per thread too).
    fn refuse_precise_waits_on_this_thread(errno: i32) {
        let statement = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let mut filter = [
            // The system call's number: the first field of `seccomp_data` (this test runs
            // its native architecture only, so the number needs no check of `arch`).
            statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
            // epoll_pwait2: go on to the refusal; anything else: skip it.
            libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: libc::SYS_epoll_pwait2 as u32,
            },
            statement(
                libc::BPF_RET | libc::BPF_K,
                libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
            ),
            statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        ];
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        // SAFETY: prctl with integer arguments, then with a pointer to a valid program that
        // outlives the call (the kernel copies it).
        unsafe {
            let (one, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
            assert_eq!(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, one, zero, zero, zero),
                0,
                "no_new_privs: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::c_ulong::from(libc::SECCOMP_MODE_FILTER),
                    &program as *const libc::sock_fprog
                ),
                0,
                "seccomp filter: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Where the kernel refuses `epoll_pwait2` (a seccomp filter on the test's own thread
    /// answers `EPERM`, as a filter that does not know the call may, or `ENOSYS`, as a kernel
    /// before 5.11 does), a precise wait falls back to `epoll_wait`: it still waits out its
    /// timeout, still reports a ready socket, and the set remembers the refusal.
    #[test]
    fn a_refused_precise_wait_falls_back_to_epoll_wait() {
        for errno in [libc::EPERM, libc::ENOSYS] {
            std::thread::spawn(move || {
                refuse_precise_waits_on_this_thread(errno);
                let epoll = Epoll::new().unwrap();
                let (ready, took) = time_a_precise_wait(&epoll, Duration::from_micros(1500));
                assert_eq!(ready, 0, "errno {errno}");
                // Rounded up to 2 ms; without the fallback it returns at once.
                assert!(took >= Duration::from_millis(2), "errno {errno}: {took:?}");
                assert!(epoll.precise_refused(), "errno {errno}");

                let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                epoll.add_readable(socket.as_raw_fd(), 7).unwrap();
                socket.send_to(b"x", socket.local_addr().unwrap()).unwrap();
                let mut events = events(4);
                let keys: Vec<u64> = epoll
                    .wait_precise(&mut events, Duration::from_secs(5))
                    .collect();
                assert_eq!(keys, [7], "errno {errno}");
            })
            .join()
            .unwrap();
        }
    }

    /// Errors that are not a refusal (here from a seccomp filter) leave the set precise: an
    /// interrupted wait (`EINTR`) returns with nothing ready, and another error (`EINVAL`)
    /// falls back to `epoll_wait` for that wait only, which still lasts its timeout.
    #[test]
    fn errors_that_are_not_refusals_leave_the_set_precise() {
        std::thread::spawn(|| {
            refuse_precise_waits_on_this_thread(libc::EINTR);
            let epoll = Epoll::new().unwrap();
            let mut events = events(1);
            let ready = epoll
                .wait_precise(&mut events, Duration::from_secs(5))
                .count();
            assert_eq!(ready, 0);
            assert!(!epoll.precise_refused());
        })
        .join()
        .unwrap();
        std::thread::spawn(|| {
            refuse_precise_waits_on_this_thread(libc::EINVAL);
            let epoll = Epoll::new().unwrap();
            let (ready, took) = time_a_precise_wait(&epoll, Duration::from_micros(1500));
            assert_eq!(ready, 0);
            assert!(took >= Duration::from_millis(2), "{took:?}");
            assert!(!epoll.precise_refused());
        })
        .join()
        .unwrap();
    }
}
