//! Socket options and facts the standard library and mio do not expose: integer options
//! through `setsockopt`/`getsockopt` (buffer sizes, arrival timestamps, `TCP_NODELAY` and
//! `TCP_USER_TIMEOUT` on a listener, for its connections to inherit), a reset on close (`SO_LINGER`), a TCP socket's unacknowledged bytes
//! (`SIOCOUTQ`), a listener's accept queue (`TCP_INFO`) and a socket's count of datagrams
//! dropped before they were read (`SO_MEMINFO`).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, RawFd};

/// Sets `TCP_NODELAY` on a listening socket. Linux copies it to every connection the
/// listener accepts, which saves a `setsockopt` per handshake; returns the error when the
/// kernel refuses, and the caller then sets it on each connection.
pub fn set_listener_nodelay(listener: &mio::net::TcpListener) -> io::Result<()> {
    set_int(
        listener.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        1,
    )
}

/// Sets `TCP_USER_TIMEOUT` on a listening socket to `timeout` (rounded down to milliseconds,
/// at most `c_int::MAX` of them): Linux copies it to every connection the listener accepts,
/// at no cost per handshake. A connection whose peer then leaves bytes we sent
/// unacknowledged, or keeps its receive window shut, for that long is dropped by the kernel,
/// and so are the bytes still in its send queue; also once the daemon has closed it, when
/// nothing else would drop them while the peer acknowledges the kernel's window probes.
pub fn set_listener_user_timeout(
    listener: &mio::net::TcpListener,
    timeout: std::time::Duration,
) -> io::Result<()> {
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    set_int(
        listener.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        millis,
    )
}

/// Sets the integer option `level`/`name` on `fd` to `value`.
pub fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    set(fd, level, name, &value)
}

/// Sets the option `level`/`name` on `fd` to `value`, a plain C value of the type the option
/// takes (`c_int`, `linger`).
fn set<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads a `T` of the stated size from a live reference; an invalid
    // descriptor, option or size is reported as an error, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(value).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads the integer option `level`/`name` of `fd`.
pub fn get_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live c_int and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            std::ptr::addr_of_mut!(value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the close of the socket `fd` reset the connection (`SO_LINGER` on, with no time):
/// what its send queue holds is thrown away at once, and the peer gets an RST, not a FIN
/// behind the queued bytes.
pub fn reset_on_close(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// Bytes in the send queue of the TCP socket `fd` (`SIOCOUTQ`): written by us and not yet
/// acknowledged by the peer.
pub fn unacknowledged(fd: RawFd) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int into a live stack value; an invalid descriptor is
    // reported as an error, not undefined behaviour.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, std::ptr::addr_of_mut!(value)) };
    if rc == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening TCP socket's accept queue, from `TCP_INFO`: for a listener, Linux reports the
/// connections waiting to be accepted as `tcpi_unacked` and the queue's length (the listen
/// backlog, as capped by `net.core.somaxconn`) as `tcpi_sacked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Connections that completed their handshake and wait for `accept`.
    pub waiting: u32,
    /// How many may wait at most.
    pub backlog: u32,
}

/// Reads the accept queue of the listening TCP socket `fd`.
pub fn accept_queue(fd: RawFd) -> io::Result<AcceptQueue> {
    // The start of `struct tcp_info`: eight one-byte fields (the array's first two words),
    // then `u32`s of which `tcpi_unacked` is the fifth and `tcpi_sacked` the sixth: words 6
    // and 7 (linux/tcp.h; unchanged since Linux 2.6). Only this much is asked for: the kernel
    // copies at most `len` bytes.
    let info: [u32; 8] = get_words(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?
        .ok_or_else(|| io::Error::other("TCP_INFO shorter than its first fields"))?;
    Ok(AcceptQueue {
        waiting: info[6],
        backlog: info[7],
    })
}

/// The kernel's count of what socket `fd` dropped before it was read (`sk_drops`, 32 bits,
/// wrapping), from `SO_MEMINFO` (Linux 4.12 on): the same count `/proc/net/udp` prints in its
/// last column, for one socket in one system call.
pub fn drops(fd: RawFd) -> io::Result<u32> {
    // `SK_MEMINFO_VARS` words; the drops are the ninth (linux/sock_diag.h). The kernel copies
    // at most `len` bytes and says how many it had.
    const DROPS: usize = libc::SK_MEMINFO_DROPS as usize;
    let info: [u32; DROPS + 1] = get_words(fd, libc::SOL_SOCKET, libc::SO_MEMINFO)?
        .ok_or_else(|| io::Error::other("SO_MEMINFO without a drop count"))?;
    Ok(info[DROPS])
}

/// The first `N` 32-bit words of the option `level`/`name` of `fd`, a structure the kernel
/// copies as far as it is asked; `None` when it had fewer.
fn get_words<const N: usize>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<Option<[u32; N]>> {
    let mut words = [0u32; N];
    let mut len = mem::size_of_val(&words) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live array and updates `len`.
    let rc = unsafe { libc::getsockopt(fd, level, name, words.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((len as usize >= mem::size_of_val(&words)).then_some(words))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn an_option_set_reads_back_and_a_bad_descriptor_is_an_error() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = s.as_raw_fd();
        set_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1).unwrap();
        assert_eq!(
            get_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS).unwrap(),
            1
        );
        set_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0).unwrap();
        assert_eq!(
            get_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS).unwrap(),
            0
        );
        assert!(set_int(-1, libc::SOL_SOCKET, libc::SO_RCVBUF, 1).is_err());
        assert!(get_int(-1, libc::SOL_SOCKET, libc::SO_RCVBUF).is_err());
        assert_eq!(drops(fd).unwrap(), 0);
        assert!(drops(-1).is_err());
    }

    #[test]
    fn a_listeners_accept_queue_counts_connections_not_yet_accepted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let empty = accept_queue(fd).unwrap();
        assert_eq!(empty.waiting, 0);
        // std's listen(2) asks for 128 (the kernel may cap it lower, never to none).
        assert!(empty.backlog > 0 && empty.backlog <= 128, "{empty:?}");
        let addr = listener.local_addr().unwrap();
        let _a = std::net::TcpStream::connect(addr).unwrap();
        let _b = std::net::TcpStream::connect(addr).unwrap();
        // Loopback handshakes complete within connect.
        assert_eq!(accept_queue(fd).unwrap().waiting, 2);
        let _accepted = listener.accept().unwrap();
        assert_eq!(accept_queue(fd).unwrap().waiting, 1);
        assert!(accept_queue(-1).is_err());
    }

    /// A connected TCP socket and the one it is connected to, each end's own.
    fn connected_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        (ours, theirs)
    }

    /// The bytes written and not acknowledged are none on a fresh connection, and some but
    /// not all of those written once a peer that reads nothing has filled its buffer (the
    /// rest it acknowledged); a bad descriptor is an error.
    #[test]
    fn unacknowledged_bytes_are_those_a_peer_has_not_taken() {
        use std::io::Write;
        let (mut ours, _reads_nothing) = connected_pair();
        let fd = ours.as_raw_fd();
        assert_eq!(unacknowledged(fd).unwrap(), 0);
        ours.set_nonblocking(true).unwrap();
        let chunk = [0x61u8; 64 * 1024];
        let mut written = 0;
        // Loopback acknowledges what the peer's buffer takes within the write; the rest
        // waits in our queue once that is full.
        while let Ok(n) = ours.write(&chunk) {
            written += n;
        }
        let queued = unacknowledged(fd).unwrap();
        assert!(queued > 1 && queued < written, "{queued} of {written}");
        assert!(unacknowledged(-1).is_err());
    }

    /// A socket told to reset on close resets its connection: the peer reads an error, not
    /// the end of the stream (which it reads from a socket closed plainly).
    #[test]
    fn a_socket_told_to_reset_on_close_resets_its_connection() {
        use std::io::Read;
        let read_after_close = |reset: bool| {
            let (ours, mut theirs) = connected_pair();
            if reset {
                reset_on_close(ours.as_raw_fd()).unwrap();
            }
            drop(ours);
            theirs
                .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            theirs.read(&mut [0u8; 8]).map_err(|e| e.kind())
        };
        assert_eq!(read_after_close(false), Ok(0));
        assert_eq!(
            read_after_close(true),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        assert!(reset_on_close(-1).is_err());
    }

    /// An option the kernel has fewer bytes of than the words asked for reads as none, not
    /// as words it did not write; asked for no more than it has, it reads whole.
    #[test]
    fn an_option_shorter_than_the_words_asked_for_reads_as_none() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = s.as_raw_fd();
        let rcvbuf = get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        let words = get_words::<1>(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        assert_eq!(words, Some([u32::try_from(rcvbuf).unwrap()]));
        let words = get_words::<2>(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        assert_eq!(words, None, "an int is one word");
    }
}
