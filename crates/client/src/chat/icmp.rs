//! ICMP errors about our chat datagrams. Our UDP socket is not connected (a connected socket
//! would hear no datagram but the server's, and the receiver could no longer tell the user
//! that the server answers from another address), and Linux reports ICMP errors to an
//! unconnected socket only with `IP_RECVERR` (`IPV6_RECVERR`): then the next receive (or
//! send) fails with the error, `ECONNREFUSED` for a port unreachable, and the report also
//! waits on the socket's error queue. That queue counts against the receive buffer, so
//! whoever sees such an error [`drain`]s it, or a long outage would fill the buffer and the
//! chat would lose what comes after it.
//!
//! Elsewhere these are no-ops: other systems report nothing to an unconnected UDP socket,
//! and the chat goes on as before, learning of a silent server from its idle check.

use std::io;
use std::net::UdpSocket;

/// What an error from the socket reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Report {
    /// ICMP port unreachable (`ECONNREFUSED`): nothing listens on the server's UDP port, so
    /// the server is down or restarting, and the datagram was lost.
    PortClosed,
    /// Another ICMP error (host or network unreachable, ...): the way there, not the server.
    Unreachable,
}

/// The ICMP error `error` reports, if it is one. `ConnectionReset` is how Windows reports a
/// port unreachable; it is kept as "not about the server" as it always was.
pub(super) fn report_of(error: &io::Error) -> Option<Report> {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Some(Report::PortClosed),
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable => Some(Report::Unreachable),
        _ => None,
    }
}

/// Most reports read off the error queue at once: a queue never drained holds at most a
/// receive buffer's worth (a few hundred), and this is only to bound one pass.
#[cfg(target_os = "linux")]
const MAX_DRAINED: usize = 256;

/// Asks the kernel to report ICMP errors about our datagrams on `socket` (Linux).
#[cfg(target_os = "linux")]
pub(super) fn enable(socket: &UdpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name) = match socket.local_addr()? {
        std::net::SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_RECVERR),
        std::net::SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
    };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads a c_int of the stated size from a live stack value; a bad
    // descriptor or option is reported as an error, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere nothing is reported to an unconnected socket: nothing to ask for.
#[cfg(not(target_os = "linux"))]
pub(super) fn enable(_socket: &UdpSocket) -> io::Result<()> {
    Ok(())
}

/// Reads the reports waiting on `socket`'s error queue, without waiting; how many there were.
/// Only their number matters: each carries the start of a datagram we sent to the server.
#[cfg(target_os = "linux")]
pub(super) fn drain(socket: &UdpSocket) -> usize {
    use std::os::fd::AsRawFd;
    let mut quoted = [0u8; 64];
    let mut drained = 0;
    while drained < MAX_DRAINED {
        // SAFETY: recv writes at most `quoted.len()` bytes into a live buffer; MSG_ERRQUEUE
        // takes one report off the queue (truncated: we do not need its bytes), and
        // MSG_DONTWAIT fails with EAGAIN once the queue is empty.
        let rc = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                quoted.as_mut_ptr().cast(),
                quoted.len(),
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            break;
        }
        drained += 1;
    }
    drained
}

/// Elsewhere there is no error queue.
#[cfg(not(target_os = "linux"))]
pub(super) fn drain(_socket: &UdpSocket) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A UDP port on loopback with nothing bound to it (bound, then closed).
    fn closed_port() -> std::net::SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.local_addr().expect("address")
    }

    /// A socket that hears of ICMP errors ([`enable`]), and a closed port to earn some.
    #[cfg(target_os = "linux")]
    fn hearing_errors() -> (UdpSocket, std::net::SocketAddr) {
        let closed = closed_port();
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        enable(&socket).expect("IP_RECVERR");
        (socket, closed)
    }

    #[test]
    fn errors_are_told_apart() {
        let report = |kind: io::ErrorKind| report_of(&kind.into());
        assert_eq!(
            report(io::ErrorKind::ConnectionRefused),
            Some(Report::PortClosed)
        );
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::HostUnreachable,
            io::ErrorKind::NetworkUnreachable,
        ] {
            assert_eq!(report(kind), Some(Report::Unreachable), "{kind:?}");
        }
        assert_eq!(report(io::ErrorKind::PermissionDenied), None);
    }

    /// On Linux an unconnected socket hears of the closed port once asked to, and the report
    /// is taken off the error queue.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_closed_port_is_reported_to_an_unconnected_socket_and_drained() {
        let (socket, closed) = hearing_errors();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        socket.send_to(b"hello", closed).expect("send");
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let error = socket
            .recv_from(&mut buf)
            .expect_err("an ICMP error, not a datagram");
        assert!(started.elapsed() < Duration::from_secs(5), "{error}");
        assert_eq!(report_of(&error), Some(Report::PortClosed), "{error}");
        assert_eq!(drain(&socket), 1);
        assert_eq!(drain(&socket), 0);
    }

    /// Sends datagrams to `closed` from `socket` until `count` went out: each send after a
    /// refusal not yet taken fails with it (`an_error_not_yet_received_fails_the_next_send`).
    #[cfg(target_os = "linux")]
    fn refused_datagrams(
        socket: &UdpSocket,
        closed: std::net::SocketAddr,
        text: &[u8],
        count: usize,
    ) {
        let mut sent = 0;
        for _ in 0..count * 4 {
            if socket.send_to(text, closed).is_ok() {
                sent += 1;
                if sent == count {
                    return;
                }
            }
        }
        panic!("only {sent} of {count} datagrams went out");
    }

    /// One pass reads at most [`MAX_DRAINED`] reports and leaves the rest for the next. (The
    /// receive buffer, made large here, bounds the queue: where the system caps it below
    /// 300 reports, the first pass takes them all.)
    #[cfg(target_os = "linux")]
    #[test]
    fn a_pass_drains_at_most_max_drained_reports() {
        use std::os::fd::AsRawFd;
        let (socket, closed) = hearing_errors();
        let size: libc::c_int = 1 << 20;
        // SAFETY: setsockopt reads a c_int of the stated size from a live stack value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                std::ptr::addr_of!(size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        refused_datagrams(&socket, closed, b"hello", 300);
        let (first, second) = (drain(&socket), drain(&socket));
        assert!(first <= MAX_DRAINED, "{first}");
        assert!(
            first == MAX_DRAINED || second == 0,
            "a pass stopped early: {first}, then {second}"
        );
        assert!(first + second <= 300);
    }

    /// A report quoting an empty datagram (nothing but the headers came back) counts too.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_report_of_an_empty_datagram_is_drained() {
        let (socket, closed) = hearing_errors();
        refused_datagrams(&socket, closed, b"", 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut drained = 0;
        while drained == 0 && Instant::now() < deadline {
            drained = drain(&socket);
            if drained == 0 {
                std::thread::yield_now();
            }
        }
        assert_eq!(drained, 1);
    }

    /// Without asking, an unconnected socket hears nothing: what the client saw before.
    #[cfg(target_os = "linux")]
    #[test]
    fn without_ip_recverr_nothing_is_reported() {
        let closed = closed_port();
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.send_to(b"hello", closed).expect("send");
        let mut buf = [0u8; 16];
        // A stop and continue of the test process ends the wait with EINTR: wait out the
        // rest of the 200 ms.
        let until = Instant::now() + Duration::from_millis(200);
        let error = loop {
            let left = until.saturating_duration_since(Instant::now());
            socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("timeout");
            match socket.recv_from(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break e,
                Ok((n, from)) => panic!("{n} bytes from {from}: nothing should come"),
            }
        };
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{error}"
        );
        assert_eq!(drain(&socket), 0);
    }

    /// The error is handed to whoever asks first: a send, before the receiver has taken it,
    /// fails without sending (so `Session::send` sends again).
    #[cfg(target_os = "linux")]
    #[test]
    fn an_error_not_yet_received_fails_the_next_send() {
        let (socket, closed) = hearing_errors();
        socket.send_to(b"hello", closed).expect("send");
        let mut pending = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&socket),
            events: 0,
            revents: 0,
        };
        // SAFETY: poll reads and writes one live pollfd. POLLERR: the ICMP error is pending.
        let ready = unsafe { libc::poll(&mut pending, 1, 10_000) };
        assert!(
            ready == 1 && pending.revents & libc::POLLERR != 0,
            "no error pending"
        );
        let error = socket
            .send_to(b"again", closed)
            .expect_err("the first one's error");
        assert_eq!(report_of(&error), Some(Report::PortClosed), "{error}");
        socket.send_to(b"again", closed).expect("sent this time");
    }
}
