//! Integer socket options through `setsockopt`/`getsockopt`, for the few the standard
//! library and mio do not expose (buffer sizes, arrival timestamps, `TCP_NODELAY` on a
//! listener).

use std::io;
use std::mem;
use std::os::fd::RawFd;

/// Sets the integer option `level`/`name` on `fd` to `value`.
pub fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads a c_int of the stated size from a live stack value; an invalid
    // descriptor or option is reported as an error, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::addr_of!(value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
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
    }
}
