//! systemd's notification protocol: `READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=…` and
//! `WATCHDOG=1`, sent as datagrams to the Unix socket named by `NOTIFY_SOCKET`.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op. Failures are logged once and
//! never stop the daemon, nor hold its loop: the socket's queue is shared by every service
//! and fills while the manager is busy, so the periodic messages (`STATUS=`, `WATCHDOG=1`)
//! are dropped when it is full, and the rarer ones it acts on wait at most
//! [`LIFECYCLE_WAIT`] for room.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use log::warn;

/// How long a `READY=1`, `RELOADING=1` or `STOPPING=1` waits for room in a full queue: the
/// manager acts on them (a start waits for `READY=1`), so they are worth a short stall.
pub const LIFECYCLE_WAIT: Duration = Duration::from_secs(1);

/// A handle on the service manager's notification socket.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    warned: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; a path, or `@name` for an abstract socket.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
                None => SocketAddr::from_pathname(&path),
            };
            let socket = UnixDatagram::unbound()
                .and_then(|s| s.set_write_timeout(Some(LIFECYCLE_WAIT)).map(|()| s));
            match (socket, addr) {
                (Ok(s), Ok(a)) => Some((s, a)),
                (Err(e), _) | (_, Err(e)) => {
                    warn!("NOTIFY_SOCKET {path:?} unusable: {e}");
                    None
                }
            }
        });
        Notifier {
            target,
            warned: false,
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification the manager acts on (newline-separated `KEY=value` lines),
    /// waiting at most [`LIFECYCLE_WAIT`] for room in its queue.
    pub fn send(&mut self, state: &str) {
        self.send_waiting(state, true);
    }

    /// Sends a periodic notification (`STATUS=`, `WATCHDOG=1`), dropped at once if the queue
    /// is full: the next one comes soon, and the loop must not wait for the manager.
    pub fn send_periodic(&mut self, state: &str) {
        self.send_waiting(state, false);
    }

    fn send_waiting(&mut self, state: &str, wait: bool) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        let sent = socket
            .set_nonblocking(!wait)
            .and_then(|()| socket.send_to_addr(state.as_bytes(), addr));
        if let Err(e) = sent {
            if !self.warned {
                warn!("cannot notify the service manager: {e}");
                self.warned = true;
            }
        }
    }
}

/// Half the watchdog interval systemd asks for (`WATCHDOG_USEC`), if it asks and it is us.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
