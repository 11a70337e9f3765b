//! Sockets handed over by systemd's socket activation (`sd_listen_fds(3)`): the variables
//! `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` read once at start, the descriptors from 3
//! on checked, and sorted into the TCRP listener, the UCRP socket and the metrics listener.
//!
//! A socket systemd holds outlives the daemon: datagrams and connections that come while
//! `ocmd` restarts wait in it instead of being refused. A descriptor named `tcrp`, `ucrp` or
//! `metrics` (`FileDescriptorName=` in its socket unit) takes that role; an unnamed one (or
//! one named otherwise, as a socket unit names its descriptors after itself by default) is
//! the UCRP socket if it is a datagram socket and the TCRP listener if it is a listening
//! stream socket. Anything else stops the start with an error that says which descriptor
//! and why: a socket ignored would leave its clients waiting on a port nobody reads.

use std::net::{TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, RawFd};

use crate::sockopt;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// `ocmd` takes three sockets at most; more is a mistake in the socket units.
const MAX_FDS: usize = 3;

/// The sockets passed, each at most once.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The TCRP listener.
    pub tcp: Option<TcpListener>,
    /// The UCRP socket.
    pub udp: Option<UdpSocket>,
    /// The metrics listener.
    pub metrics: Option<TcpListener>,
}

/// Why the sockets passed cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    /// `LISTEN_FDS` (or `LISTEN_PID`) is not a number, or out of range.
    #[error("socket activation: {0}")]
    Variables(String),
    /// One descriptor cannot take any role.
    #[error("socket activation: descriptor {fd}{name}: {why}", name = named(.name))]
    Descriptor {
        /// The descriptor.
        fd: RawFd,
        /// Its name in `LISTEN_FDNAMES`, if any.
        name: Option<String>,
        /// What is wrong with it.
        why: String,
    },
    /// Two descriptors for one role.
    #[error(
        "socket activation: descriptors {first} and {second} are both taken for the {role}; \
         name them with FileDescriptorName= (tcrp, ucrp, metrics) in their socket units"
    )]
    Twice {
        /// What both would be.
        role: &'static str,
        /// The first descriptor.
        first: RawFd,
        /// The second.
        second: RawFd,
    },
}

fn named(name: &Option<String>) -> String {
    name.as_ref()
        .map_or_else(String::new, |name| format!(" ({name:?})"))
}

/// What a passed descriptor is, as far as its role goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A listening TCP socket.
    Listener,
    /// A UDP socket.
    Datagram,
    /// Anything else, with why it is of no use.
    Unusable(&'static str),
}

/// A role a descriptor takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The TCRP listener.
    Tcrp,
    /// The UCRP socket.
    Ucrp,
    /// The metrics listener.
    Metrics,
}

impl Role {
    fn describe(self) -> &'static str {
        match self {
            Role::Tcrp => "TCRP listener",
            Role::Ucrp => "UCRP socket",
            Role::Metrics => "metrics listener",
        }
    }
}

/// The descriptors passed to the process `our_pid`, with their names, from the variables'
/// values: none when `LISTEN_PID` is unset or names another process (the variables were
/// meant for a parent, and were inherited).
pub(crate) fn passed(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    our_pid: u32,
) -> Result<Vec<(RawFd, Option<String>)>, ActivationError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::Variables(format!("LISTEN_PID={pid:?} is not a pid")))?;
    if pid != our_pid {
        return Ok(Vec::new());
    }
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::Variables(format!("LISTEN_FDS={fds:?} is not a count")))?;
    if count > MAX_FDS {
        return Err(ActivationError::Variables(format!(
            "LISTEN_FDS={count}: ocmd takes at most {MAX_FDS} sockets (TCRP, UCRP, metrics)"
        )));
    }
    let mut names = names.map(|names| names.split(':'));
    Ok((0..count)
        .map(|i| {
            let name = names
                .as_mut()
                .and_then(Iterator::next)
                .filter(|name| !name.is_empty())
                .map(str::to_owned);
            // At most MAX_FDS: no overflow.
            (FIRST_FD + i as RawFd, name)
        })
        .collect())
}

/// The role of each descriptor, in order, from its name and kind (see the module docs).
pub(crate) fn roles(
    descriptors: &[(RawFd, Option<String>, Kind)],
) -> Result<Vec<(RawFd, Role)>, ActivationError> {
    let mut taken: Vec<(RawFd, Role)> = Vec::new();
    for (fd, name, kind) in descriptors {
        let wrong = |why: String| ActivationError::Descriptor {
            fd: *fd,
            name: name.clone(),
            why,
        };
        let by_name = match name.as_deref() {
            Some("tcrp") => Some(Role::Tcrp),
            Some("ucrp") => Some(Role::Ucrp),
            Some("metrics") => Some(Role::Metrics),
            _ => None,
        };
        let role = match (by_name, kind) {
            (_, Kind::Unusable(why)) => return Err(wrong((*why).to_owned())),
            (Some(Role::Ucrp), Kind::Datagram) | (None, Kind::Datagram) => Role::Ucrp,
            (Some(role @ (Role::Tcrp | Role::Metrics)), Kind::Listener) => role,
            (None, Kind::Listener) => Role::Tcrp,
            (Some(role), _) => {
                return Err(wrong(format!(
                    "named for the {}, but a {}",
                    role.describe(),
                    match kind {
                        Kind::Listener => "listening TCP socket",
                        _ => "UDP socket",
                    }
                )))
            }
        };
        if let Some(&(first, _)) = taken.iter().find(|(_, r)| *r == role) {
            return Err(ActivationError::Twice {
                role: role.describe(),
                first,
                second: *fd,
            });
        }
        taken.push((*fd, role));
    }
    Ok(taken)
}

/// What the descriptor `fd` is: a listening TCP socket, a UDP socket (IPv4 or IPv6 both), or
/// why it is neither.
pub(crate) fn kind_of(fd: RawFd) -> Kind {
    let kind = match sockopt::get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE) {
        Ok(kind) => kind,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return Kind::Unusable("not a socket")
        }
        Err(_) => return Kind::Unusable("not an open descriptor"),
    };
    match sockopt::get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) {
        Ok(libc::AF_INET | libc::AF_INET6) => {}
        _ => return Kind::Unusable("not an IPv4 or IPv6 socket"),
    }
    match kind {
        libc::SOCK_DGRAM => Kind::Datagram,
        libc::SOCK_STREAM => match sockopt::get_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) {
            Ok(1) => Kind::Listener,
            _ => Kind::Unusable("a TCP socket that is not listening (Accept=no is needed)"),
        },
        _ => Kind::Unusable("neither a TCP nor a UDP socket"),
    }
}

/// Takes the sockets systemd passed to this process, if any, and unsets the variables so
/// that nothing started later takes them for its own. Call once, before any other thread
/// starts (the variables are read and changed). Each socket is made non-blocking and
/// close-on-exec, as `ocmd`'s own are.
pub fn take() -> Result<Inherited, ActivationError> {
    let var = |name: &str| std::env::var(name).ok();
    let descriptors = passed(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    if descriptors.is_empty() {
        return Ok(Inherited::default());
    }
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    let kinds: Vec<_> = descriptors
        .into_iter()
        .map(|(fd, name)| (fd, name, kind_of(fd)))
        .collect();
    let mut inherited = Inherited::default();
    for (fd, role) in roles(&kinds)? {
        let name = kinds
            .iter()
            .find(|(passed, _, _)| *passed == fd)
            .and_then(|(_, name, _)| name.clone());
        let adopt_error = |e: std::io::Error| ActivationError::Descriptor {
            fd,
            name: name.clone(),
            why: e.to_string(),
        };
        set_close_on_exec(fd).map_err(adopt_error)?;
        // SAFETY: `fd` was passed to this process for it to own (sd_listen_fds(3)), is an
        // open socket of the right kind (`kind_of`), and is taken once (`roles`).
        match role {
            Role::Tcrp | Role::Metrics => {
                let listener = unsafe { TcpListener::from_raw_fd(fd) };
                listener.set_nonblocking(true).map_err(adopt_error)?;
                if role == Role::Tcrp {
                    inherited.tcp = Some(listener);
                } else {
                    inherited.metrics = Some(listener);
                }
            }
            Role::Ucrp => {
                let socket = unsafe { UdpSocket::from_raw_fd(fd) };
                socket.set_nonblocking(true).map_err(adopt_error)?;
                inherited.udp = Some(socket);
            }
        }
    }
    Ok(inherited)
}

/// Sets `FD_CLOEXEC` on `fd`: systemd passes its sockets without it.
fn set_close_on_exec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor this process owns; no pointer is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
