//! systemd's notification protocol: `READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=…` and
//! `WATCHDOG=1`, sent as datagrams to the Unix socket named by `NOTIFY_SOCKET`.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op. Failures are logged once and
//! never stop the daemon, nor hold its loop: the socket's queue is shared by every service
//! and fills while the manager is busy, so the periodic messages (`STATUS=`, `WATCHDOG=1`)
//! are dropped when it is full. The rarer ones it acts on wait at most [`LIFECYCLE_WAIT`]
//! for room; one still refused is held, in order with any sent after it, and tried again
//! every [`RETRY_EVERY`] until the queue takes it: a lost `READY=1` would make systemd time
//! the start out and kill a daemon that is serving.

use std::collections::VecDeque;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use log::{info, warn};

/// How long a `READY=1`, `RELOADING=1` or `STOPPING=1` waits for room in a full queue: the
/// manager acts on them (a start waits for `READY=1`), so they are worth a short stall.
pub const LIFECYCLE_WAIT: Duration = Duration::from_secs(1);

/// How often held lifecycle notifications are tried again (without waiting).
pub const RETRY_EVERY: Duration = Duration::from_millis(100);

/// Lifecycle notifications held at most; beyond that the oldest is dropped. A reload holds
/// two (`RELOADING=1`, `READY=1`), so this covers a start and a few reloads while the
/// manager does not read.
const HELD_MAX: usize = 8;

/// A handle on the service manager's notification socket.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Lifecycle notifications the full queue refused, oldest first.
    held: VecDeque<String>,
    /// When to try `held` again.
    retry_at: Option<Instant>,
    warned: bool,
}

/// What became of one attempt to send.
enum Sent {
    Delivered,
    /// The manager's queue is full (or stayed full for the whole wait).
    QueueFull,
    /// Anything else (no listener, a vanished socket): trying again will not help.
    Failed(io::Error),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; a path, or `@name` for an abstract socket.
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::off();
        };
        let path = path.to_string_lossy().into_owned();
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&path),
        };
        match addr.and_then(Notifier::to) {
            Ok(notifier) => notifier,
            Err(e) => {
                warn!("NOTIFY_SOCKET {path:?} unusable: {e}");
                Notifier::off()
            }
        }
    }

    /// A notifier that sends nothing.
    fn off() -> Notifier {
        Notifier {
            target: None,
            held: VecDeque::new(),
            retry_at: None,
            warned: false,
        }
    }

    /// A notifier sending to `addr`.
    fn to(addr: SocketAddr) -> io::Result<Notifier> {
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(LIFECYCLE_WAIT))?;
        Ok(Notifier {
            target: Some((socket, addr)),
            ..Notifier::off()
        })
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification the manager acts on (newline-separated `KEY=value` lines),
    /// waiting at most [`LIFECYCLE_WAIT`] for room in its queue, and holds it for
    /// [`Notifier::retry`] if there is none. Behind held ones it is held too, without
    /// waiting: the manager is known to be busy, and order matters (`RELOADING=1` before
    /// `READY=1`).
    pub fn send(&mut self, state: &str) {
        if self.target.is_none() {
            return;
        }
        if self.held.len() == HELD_MAX {
            self.held.pop_front();
        }
        self.held.push_back(state.to_owned());
        let wait = self.held.len() == 1;
        self.flush(wait, Instant::now());
    }

    /// Sends a periodic notification (`STATUS=`, `WATCHDOG=1`), dropped at once if the queue
    /// is full or lifecycle notifications are still held: the next one comes soon, and the
    /// loop must not wait for the manager.
    pub fn send_periodic(&mut self, state: &str) {
        self.retry(Instant::now());
        if !self.held.is_empty() {
            return;
        }
        match self.attempt(state, false) {
            Sent::Delivered => {}
            Sent::QueueFull => self.warn_once(&io::Error::from(io::ErrorKind::WouldBlock)),
            Sent::Failed(e) => self.warn_once(&e),
        }
    }

    /// When held notifications are next due to be tried, if any are held.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Tries the held notifications again, without waiting, if they are due.
    pub fn retry(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|at| now >= at) {
            self.flush(false, now);
        }
    }

    /// Sends held notifications in order until the queue is full again.
    fn flush(&mut self, wait: bool, now: Instant) {
        let retried = self.retry_at.is_some();
        let mut delivered = 0;
        while let Some(state) = self.held.front() {
            match self.attempt(state, wait && delivered == 0) {
                Sent::Delivered => delivered += 1,
                Sent::QueueFull => {
                    if self.retry_at.is_none() {
                        warn!(
                            "the service manager's notification queue is full: holding {:?}, \
                             trying again every {} ms",
                            state,
                            RETRY_EVERY.as_millis()
                        );
                    }
                    self.retry_at = Some(now + RETRY_EVERY);
                    return;
                }
                Sent::Failed(e) => self.warn_once(&e),
            }
            self.held.pop_front();
        }
        self.retry_at = None;
        if retried && delivered > 0 {
            info!("the service manager's notification queue took the held notifications");
        }
    }

    fn attempt(&self, state: &str, wait: bool) -> Sent {
        let Some((socket, addr)) = &self.target else {
            return Sent::Delivered;
        };
        let sent = socket
            .set_nonblocking(!wait)
            .and_then(|()| socket.send_to_addr(state.as_bytes(), addr));
        match sent {
            Ok(_) => Sent::Delivered,
            // A send timed out on SO_SNDTIMEO reports EAGAIN too. One whose wait for room a
            // signal ended reports EINTR: a SIGHUP, or a stop and continue of the daemon
            // (`kill -STOP`, a frozen cgroup), which Linux reports so even with no handler
            // (signal(7)). The queue was full, or the send would not have waited: held.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Sent::QueueFull
            }
            Err(e) => Sent::Failed(e),
        }
    }

    fn warn_once(&mut self, e: &io::Error) {
        if !self.warned {
            // The socket is named: NOTIFY_SOCKET comes from whatever started the daemon, and
            // an error such as ENOENT does not say which file it is about.
            let at = match &self.target {
                Some((_, addr)) => match (addr.as_pathname(), addr.as_abstract_name()) {
                    (Some(path), _) => format!(" at {}", path.display()),
                    (None, Some(name)) => format!(" at @{}", String::from_utf8_lossy(name)),
                    (None, None) => String::new(),
                },
                None => String::new(),
            };
            warn!("cannot notify the service manager{at}: {e}");
            self.warned = true;
        }
    }
}

/// Half the watchdog interval systemd asks for (`WATCHDOG_USEC`), if it asks and it is us.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_of(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from the values of `WATCHDOG_USEC` and `WATCHDOG_PID` (unset: any
/// process, as systemd means it) and our own pid.
fn watchdog_interval_of(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok()?;
    if let Some(pid) = pid {
        if pid.parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manager's socket that does not read until told to.
    struct Manager {
        socket: UnixDatagram,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Manager {
        fn bind() -> Manager {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("notify.sock");
            let socket = UnixDatagram::bind(&path).expect("bind");
            socket.set_nonblocking(true).expect("nonblocking");
            Manager {
                socket,
                path,
                _dir: dir,
            }
        }

        fn notifier(&self) -> Notifier {
            Notifier::to(SocketAddr::from_pathname(&self.path).expect("path")).expect("notifier")
        }

        fn fill(&self) {
            crate::test_shared::fill_datagram_queue(&self.path);
        }

        /// Everything queued, other services' messages left out.
        fn read(&self) -> Vec<String> {
            let mut seen = Vec::new();
            let mut buf = [0u8; 512];
            while let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg != "OTHER=1" {
                    seen.push(msg);
                }
            }
            seen
        }
    }

    /// A `READY=1` the full queue refused was lost, so systemd, never told, would time the
    /// start out and kill a daemon that was serving. It is held instead, with what follows
    /// it, and sent in order once there is room; periodic ones are dropped meanwhile.
    #[test]
    fn lifecycle_notifications_a_full_queue_refused_are_sent_once_it_has_room() {
        let manager = Manager::bind();
        let mut notifier = manager.notifier();
        manager.fill();
        notifier.send("READY=1");
        assert!(notifier.retry_at().is_some(), "READY=1 held");
        notifier.send_periodic("STATUS=busy");
        notifier.send("STOPPING=1");
        // The other services' messages are read: there is room, but no retry is due yet.
        assert_eq!(manager.read(), Vec::<String>::new());
        let due = notifier.retry_at().expect("held");
        notifier.retry(due - Duration::from_millis(1));
        assert_eq!(manager.read(), Vec::<String>::new());
        notifier.retry(due);
        assert_eq!(manager.read(), ["READY=1", "STOPPING=1"]);
        assert_eq!(notifier.retry_at(), None);
        // Nothing is held any more: the next ones go straight out.
        notifier.send_periodic("STATUS=fine");
        notifier.send("READY=1");
        assert_eq!(manager.read(), ["STATUS=fine", "READY=1"]);
    }

    /// Still full at a retry: held again, and tried later.
    #[test]
    fn a_queue_still_full_at_a_retry_keeps_them_held() {
        let manager = Manager::bind();
        let mut notifier = manager.notifier();
        manager.fill();
        notifier.send("READY=1");
        let first = notifier.retry_at().expect("held");
        notifier.retry(first);
        let second = notifier.retry_at().expect("still held");
        assert!(second >= first + RETRY_EVERY, "{second:?} vs {first:?}");
        manager.read();
        notifier.retry(second);
        assert_eq!(manager.read(), ["READY=1"]);
    }

    /// A manager that stays busy through many reloads holds the newest few, in order.
    #[test]
    fn held_notifications_are_bounded_keeping_the_newest() {
        let manager = Manager::bind();
        let mut notifier = manager.notifier();
        manager.fill();
        let sent: Vec<String> = (0..HELD_MAX + 3)
            .map(|i| format!("STATUS={i}\nREADY=1"))
            .collect();
        for state in &sent {
            notifier.send(state);
        }
        manager.read();
        notifier.retry(notifier.retry_at().expect("held"));
        assert_eq!(manager.read(), sent[3..]);
    }

    /// Nobody listening (the socket is gone): nothing to wait for, nothing held.
    #[test]
    fn a_socket_that_is_gone_holds_nothing() {
        let manager = Manager::bind();
        let mut notifier = manager.notifier();
        std::fs::remove_file(&manager.path).expect("remove");
        notifier.send("READY=1");
        assert_eq!(notifier.retry_at(), None);
        assert!(notifier.warned);
    }

    /// Outside systemd nothing is sent, held or waited for, and the loop is told so.
    #[test]
    fn a_notifier_without_a_socket_is_off_and_holds_nothing() {
        let mut off = Notifier::off();
        assert!(!off.enabled());
        off.send("READY=1");
        off.send_periodic("STATUS=fine");
        assert_eq!(off.retry_at(), None);
        assert!(off.held.is_empty());
        let manager = Manager::bind();
        assert!(manager.notifier().enabled());
    }

    /// Only a lifecycle notification with none held before it waits for room in a full queue
    /// (up to [`LIFECYCLE_WAIT`]); one behind it, a retry and a periodic one return at once,
    /// so that a busy manager never stalls the loop for more than one wait.
    #[test]
    fn only_a_lifecycle_notification_with_none_held_waits_for_room() {
        let manager = Manager::bind();
        let mut notifier = manager.notifier();
        manager.fill();
        // Well apart from both: the wait is timed by the kernel (SO_SNDTIMEO).
        let waited = |took: Duration| took >= LIFECYCLE_WAIT / 2;
        let started = Instant::now();
        notifier.send_periodic("STATUS=busy");
        assert!(!waited(started.elapsed()), "{:?}", started.elapsed());
        let started = Instant::now();
        notifier.send("READY=1");
        assert!(waited(started.elapsed()), "{:?}", started.elapsed());
        let started = Instant::now();
        notifier.send("STOPPING=1");
        assert!(!waited(started.elapsed()), "{:?}", started.elapsed());
        let started = Instant::now();
        notifier.retry(notifier.retry_at().expect("held"));
        assert!(!waited(started.elapsed()), "{:?}", started.elapsed());
        assert_eq!(notifier.held, ["READY=1", "STOPPING=1"]);
    }

    /// A signal that ends the wait for room (a SIGHUP; a stop and continue of the daemon,
    /// which Linux reports as EINTR even with no handler) leaves the notification held, to
    /// be tried again: it was taken for a failure and dropped, and a lost `READY=1` gets
    /// the daemon killed at the start timeout.
    #[test]
    fn a_wait_for_room_that_a_signal_ends_holds_the_notification() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        extern "C" fn nothing(_: libc::c_int) {}
        // SAFETY: installs a handler that does nothing for SIGUSR2, which nothing else in
        // this process uses; the struct is zeroed and its mask emptied before use.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
                0
            );
        }
        let manager = Manager::bind();
        let mut notifier = manager.notifier();
        manager.fill();
        // SAFETY: pthread_self has no preconditions.
        let waiting = unsafe { libc::pthread_self() };
        let done = Arc::new(AtomicBool::new(false));
        let ringer = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    // SAFETY: the test thread outlives this one: it joins it below.
                    unsafe { libc::pthread_kill(waiting, libc::SIGUSR2) };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let started = Instant::now();
        notifier.send("READY=1");
        let took = started.elapsed();
        done.store(true, Ordering::SeqCst);
        ringer.join().expect("ringer");
        // The signal, not the timeout, ended the wait.
        assert!(took < LIFECYCLE_WAIT / 2, "the wait took {took:?}");
        let due = notifier.retry_at().expect("READY=1 held");
        manager.read();
        notifier.retry(due);
        assert_eq!(manager.read(), ["READY=1"]);
    }

    /// systemd asks for a ping every `WATCHDOG_USEC`; we ping twice as often, and only if the
    /// request is ours (`WATCHDOG_PID` unset, or our pid).
    #[test]
    fn the_watchdog_pings_at_half_the_interval_asked_and_only_when_asked_of_us() {
        let every = Some(Duration::from_millis(100));
        assert_eq!(watchdog_interval_of(Some("200000"), None, 7), every);
        assert_eq!(watchdog_interval_of(Some("200000"), Some("7"), 7), every);
        assert_eq!(watchdog_interval_of(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_of(Some("200000"), Some("me"), 7), None);
        assert_eq!(watchdog_interval_of(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_of(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_of(None, Some("7"), 7), None);
    }
}
