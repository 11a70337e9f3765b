//! The *output watcher*: notices that the reader of standard output went away while the
//! room is quiet.
//!
//! A write to a pipe whose reader has gone fails (`EPIPE`), and the chat then leaves the
//! room ([`output_gone`](super::output_gone)). But a chat writes only when the room says
//! something: `ocm join lobby | head -1` in a quiet room stayed in the room after `head`
//! took its line and quit, its keepalives going on, and the shell's pipeline waited with it,
//! until someone spoke. So when standard output is a pipe or a socket, a thread waits in
//! `poll` for the kernel to say that nobody can read it any more (`POLLERR` on a pipe
//! without readers, `POLLHUP` on a socket closed both ways) and tells the main loop, which
//! leaves as at the end of input. (GNU `tail -f` watches its output the same way.) A
//! terminal that hangs up sends `SIGHUP`, which the signal watcher takes; a file never goes
//! away.

use std::io;

use log::debug;

use super::{Ahead, Event};
use crate::error::ClientError;

/// Starts the output watcher if standard output is a pipe or a socket. Best effort: without
/// it, the reader's going away is noticed at the next line written.
pub(super) fn spawn_output_watcher(events: Ahead) {
    if !can_lose_its_reader(libc::STDOUT_FILENO) {
        return;
    }
    let spawned = crate::threads::spawn("output-watcher", move || {
        match wait_for_no_reader(libc::STDOUT_FILENO) {
            // Told as a write that failed with EPIPE would be: the main loop leaves the
            // room and the chat ends as the user leaving (exit status 0).
            Ok(()) => {
                let _ = events.send(Event::Failed(ClientError::Io {
                    context: "writing to standard output",
                    source: io::ErrorKind::BrokenPipe.into(),
                }));
            }
            Err(e) => debug!("cannot watch standard output: {e}"),
        }
    });
    if let Err(e) = spawned {
        debug!("could not start the output watcher: {e}");
    }
}

/// Whether `fd` is a pipe (FIFO) or a socket: what can lose its reader.
fn can_lose_its_reader(fd: libc::c_int) -> bool {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one `struct stat` into live memory of its size; a bad descriptor
    // is reported as an error, and the value is read only after success.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so it filled `stat`.
    let kind = unsafe { stat.assume_init() }.st_mode & libc::S_IFMT;
    kind == libc::S_IFIFO || kind == libc::S_IFSOCK
}

/// Waits until nobody can read what is written to `fd` any more. It asks `poll` for no
/// event at all: `POLLERR` and `POLLHUP` are reported anyway, and a pipe or socket that can
/// be written to does not wake it. An error, or `POLLNVAL`, is returned as such.
fn wait_for_no_reader(fd: libc::c_int) -> io::Result<()> {
    loop {
        let mut watched = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: poll reads and writes one live pollfd; -1 waits without end.
        let ready = unsafe { libc::poll(&mut watched, 1, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if watched.revents & libc::POLLNVAL != 0 {
            return Err(io::Error::other("not an open descriptor"));
        }
        if watched.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn pipes_and_sockets_are_watched_and_files_are_not() {
        let (reader, writer) = std::io::pipe().unwrap();
        assert!(can_lose_its_reader(writer.as_raw_fd()));
        drop(reader);
        let (one, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(can_lose_its_reader(one.as_raw_fd()));
        for path in ["/dev/null".into(), std::env::current_exe().unwrap()] {
            let file = std::fs::File::open(&path).unwrap();
            assert!(!can_lose_its_reader(file.as_raw_fd()), "{}", path.display());
        }
    }

    #[test]
    fn the_wait_ends_when_the_reader_goes_and_not_before() {
        let (reader, writer) = std::io::pipe().unwrap();
        let fd = writer.as_raw_fd();
        let (done, waited) = mpsc::channel();
        thread::spawn(move || done.send(wait_for_no_reader(fd).map_err(|e| e.kind())));
        // The pipe can be written to: that wakes nothing.
        assert!(waited.recv_timeout(Duration::from_millis(200)).is_err());
        drop(reader);
        let result = waited.recv_timeout(Duration::from_secs(10)).expect("woken");
        assert_eq!(result, Ok(()));
        drop(writer);
    }

    /// How often the thread `tid` of this process gave up its core waiting, as the kernel
    /// counts it.
    fn waits_of(tid: libc::pid_t) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            .expect("the thread's status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .expect("voluntary_ctxt_switches")
            .trim()
            .parse()
            .expect("a count")
    }

    /// The wait sleeps in the kernel until the reader goes: it does not wake to look again
    /// (a `poll` with a timeout would, hundreds of times a second).
    #[test]
    fn the_wait_sleeps_until_the_reader_goes_without_waking_to_look() {
        let (reader, writer) = std::io::pipe().unwrap();
        let fd = writer.as_raw_fd();
        let (started, waiter) = mpsc::channel();
        let (done, waited) = mpsc::channel();
        thread::spawn(move || {
            // SAFETY: no precondition.
            let _ = started.send(unsafe { libc::gettid() });
            let _ = done.send(wait_for_no_reader(fd).map_err(|e| e.kind()));
        });
        let tid = waiter
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiting thread started");
        assert!(waited.recv_timeout(Duration::from_millis(100)).is_err());
        let before = waits_of(tid);
        assert!(waited.recv_timeout(Duration::from_millis(300)).is_err());
        let woken = waits_of(tid) - before;
        drop(reader);
        let result = waited.recv_timeout(Duration::from_secs(10)).expect("woken");
        assert_eq!(result, Ok(()));
        assert!(woken < 5, "the waiting thread woke {woken} times in 300 ms");
        drop(writer);
    }

    /// A handler that does nothing, so that a signal interrupts the `poll` it comes in.
    extern "C" fn interrupt(_: libc::c_int) {}

    /// A signal that interrupts the wait (`EINTR`) is no error and no reader gone: the
    /// thread waits on, and still sees the reader go.
    #[test]
    fn a_signal_in_the_wait_neither_ends_it_nor_is_taken_for_the_reader_gone() {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(interrupt),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler does nothing; `poll` it interrupts fails with EINTR.
        unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGWINCH, &action) }
            .expect("a SIGWINCH handler");
        let (reader, writer) = std::io::pipe().unwrap();
        let fd = writer.as_raw_fd();
        let (started, waiter) = mpsc::channel();
        let (done, waited) = mpsc::channel();
        thread::spawn(move || {
            // SAFETY: no precondition.
            let _ = started.send((unsafe { libc::pthread_self() }, unsafe { libc::gettid() }));
            let _ = done.send(wait_for_no_reader(fd).map_err(|e| e.kind()));
        });
        let (waiting, tid) = waiter
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiting thread started");
        // Signalled once it waits in `poll` (or `ppoll`), where the kernel says so.
        let syscall = format!("/proc/self/task/{tid}/syscall");
        let in_poll = [
            format!("{} ", libc::SYS_poll),
            format!("{} ", libc::SYS_ppoll),
        ];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&syscall)
            .is_ok_and(|s| in_poll.iter().any(|p| s.starts_with(p.as_str())))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread never waited in poll"
            );
            thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..5 {
            // SAFETY: the thread waits until the reader goes, below.
            unsafe { libc::pthread_kill(waiting, libc::SIGWINCH) };
            assert!(
                waited.recv_timeout(Duration::from_millis(40)).is_err(),
                "the wait ended on a signal"
            );
        }
        drop(reader);
        let result = waited.recv_timeout(Duration::from_secs(10)).expect("woken");
        assert_eq!(result, Ok(()));
        drop(writer);
    }

    /// A socket's peer gone ends the wait, whether it closed with nothing unread (`POLLHUP`)
    /// or with what we wrote still unread (reset: `POLLERR` and `POLLHUP` at once).
    #[test]
    fn a_socket_whose_peer_closed_ends_the_wait_with_or_without_data_unread() {
        use std::io::Write;
        for unread in [false, true] {
            let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            if unread {
                ours.write_all(b"never read").unwrap();
            }
            drop(theirs);
            let fd = ours.as_raw_fd();
            let (done, waited) = mpsc::channel();
            thread::spawn(move || done.send(wait_for_no_reader(fd).map_err(|e| e.kind())));
            let result = waited.recv_timeout(Duration::from_secs(10));
            assert_eq!(result, Ok(Ok(())), "with data unread: {unread}");
            drop(ours);
        }
    }

    /// A descriptor that is not open is an error (`POLLNVAL`), not a reader gone.
    #[test]
    fn a_descriptor_not_open_is_an_error() {
        // Far above any descriptor a test opens meanwhile.
        let fd = libc::c_int::MAX;
        let (done, waited) = mpsc::channel();
        thread::spawn(move || done.send(wait_for_no_reader(fd).map_err(|e| e.kind())));
        let result = waited.recv_timeout(Duration::from_secs(10)).expect("woken");
        assert_eq!(result, Err(io::ErrorKind::Other));
    }
}
