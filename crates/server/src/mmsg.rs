//! Batched datagram system calls: `recvmmsg(2)` and `sendmmsg(2)` through libc.
//!
//! One call moves up to [`BATCH`] datagrams, which is what lets fan-out approach the kernel's
//! per-datagram cost instead of paying a system call per datagram. All unsafe code of the
//! daemon's data path is here, behind two safe types.

use std::io::{self, IoSlice};
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::RawFd;
use std::time::Duration;

/// Datagrams per system call.
pub const BATCH: usize = 256;

fn to_storage(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_storage(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Control-message space per datagram, in `u64` words (8-byte aligned, as `cmsghdr` needs):
/// room for one `SCM_TIMESTAMPNS` (a 16-byte header and a 16-byte `timespec`) and slack.
const CONTROL_WORDS: usize = 8;

/// Asks the kernel to stamp every datagram received on `fd` with its arrival time
/// (`SO_TIMESTAMPNS`); [`Receiver::arrived`] reads the stamps.
pub fn enable_timestamps(fd: RawFd) -> io::Result<()> {
    crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// Receive buffers for [`BATCH`] datagrams of up to `slot` bytes each.
pub struct Receiver {
    slot: usize,
    buf: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    control: Vec<u64>,
    arrived: Vec<Option<Duration>>,
    count: usize,
}

impl Receiver {
    /// Buffers for datagrams of up to `slot` bytes (longer ones are truncated to `slot`).
    pub fn new(slot: usize) -> Receiver {
        Receiver {
            slot,
            buf: vec![0u8; slot * BATCH],
            // SAFETY: all-zero sockaddr_storage is valid.
            addrs: vec![unsafe { mem::zeroed() }; BATCH],
            lens: vec![0; BATCH],
            control: vec![0; CONTROL_WORDS * BATCH],
            arrived: vec![None; BATCH],
            count: 0,
        }
    }

    /// Receives up to `max` (≤ [`BATCH`]) datagrams without blocking; returns how many.
    pub fn recv(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let n = max.clamp(1, BATCH);
        let mut iovecs: Vec<libc::iovec> = self
            .buf
            .chunks_mut(self.slot)
            .take(n)
            .map(|chunk| libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain old data.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { mem::zeroed() }; n];
        // Each pointer comes from an element's own `&mut` out of one iterator over its
        // buffer, so taking the next one leaves the earlier ones valid.
        let slots = self.addrs.iter_mut().zip(iovecs.iter_mut());
        for ((msg, control), (addr, iov)) in msgs
            .iter_mut()
            .zip(self.control.chunks_mut(CONTROL_WORDS))
            .zip(slots)
        {
            msg.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            msg.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
            msg.msg_hdr.msg_control = control.as_mut_ptr().cast();
            msg.msg_hdr.msg_controllen = mem::size_of_val(control) as _;
        }
        // SAFETY: every pointer in msgs points into buffers that outlive the call, with the
        // lengths given; the kernel writes at most that much.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            self.count = 0;
            return Err(io::Error::last_os_error());
        }
        self.count = rc as usize;
        for (i, msg) in msgs.iter().enumerate().take(self.count) {
            self.lens[i] = (msg.msg_len as usize).min(self.slot);
            self.arrived[i] = timestamp(&msg.msg_hdr);
        }
        Ok(self.count)
    }

    /// When the `i`th datagram of the last [`Receiver::recv`] reached the socket, since the
    /// Unix epoch, if the socket stamps datagrams ([`enable_timestamps`]).
    pub fn arrived(&self, i: usize) -> Option<Duration> {
        if i >= self.count {
            return None;
        }
        self.arrived[i]
    }

    /// The `i`th datagram of the last [`Receiver::recv`]: its source and bytes.
    pub fn datagram(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.count {
            return None;
        }
        let start = i * self.slot;
        Some((
            from_storage(&self.addrs[i])?,
            &self.buf[start..start + self.lens[i]],
        ))
    }
}

/// The `SCM_TIMESTAMPNS` stamp among a received message's control messages.
fn timestamp(hdr: &libc::msghdr) -> Option<Duration> {
    // SAFETY: the kernel filled msg_control up to msg_controllen with well-formed cmsghdrs;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay within it and CMSG_DATA points inside the current one,
    // whose length is checked before the timespec is read (unaligned read: no assumption).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::SOL_SOCKET
                && c.cmsg_type == libc::SCM_TIMESTAMPNS
                && c.cmsg_len as usize
                    >= libc::CMSG_LEN(mem::size_of::<libc::timespec>() as u32) as usize
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                let secs = u64::try_from(ts.tv_sec).ok()?;
                let nanos = u32::try_from(ts.tv_nsec).ok()?;
                return Some(Duration::new(secs, nanos));
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

/// What a [`send`] managed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams the kernel took.
    pub sent: usize,
    /// Datagrams dropped because the socket's send buffer was full.
    pub would_block: usize,
    /// Datagrams dropped for another error.
    pub failed: usize,
}

/// Scratch space for [`send`], kept between calls to avoid allocating per batch.
#[derive(Default)]
pub struct SendScratch {
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    msgs: Vec<libc::mmsghdr>,
    /// For each header in `msgs`, its datagram's index in the call's `datagrams`.
    indices: Vec<usize>,
    failed: Vec<usize>,
}

impl SendScratch {
    /// Indices, in the last [`send`]'s `datagrams`, of those dropped for an error of their own
    /// ([`Sent::failed`] of them, ascending). The kernel took every other datagram before
    /// index `sent + failed`, and none from there on.
    pub fn failed(&self) -> &[usize] {
        &self.failed
    }
}

/// Most byte runs one datagram may be gathered from (the kernel's `UIO_MAXIOV`).
pub const MAX_PARTS: usize = libc::UIO_MAXIOV as usize;

/// Sends every `(destination, range)` with as few `sendmmsg` calls as it takes: a datagram's
/// bytes are those of `parts[range]`, one after the other, which the kernel gathers from
/// where they lie. Never blocks: when the send buffer is full the rest is dropped and
/// counted. A range outside `parts` or of more than [`MAX_PARTS`] runs fails on its own
/// without reaching the kernel (the caller never builds one).
pub fn send(
    fd: RawFd,
    parts: &[IoSlice<'_>],
    datagrams: &[(SocketAddr, Range<usize>)],
    scratch: &mut SendScratch,
) -> Sent {
    let runs = |range: &Range<usize>| {
        parts
            .get(range.clone())
            .filter(|runs| runs.len() <= MAX_PARTS)
    };
    let mut result = Sent::default();
    scratch.failed.clear();
    for (chunk_index, chunk) in datagrams.chunks(BATCH).enumerate() {
        let first = chunk_index * BATCH;
        scratch.addrs.clear();
        scratch.indices.clear();
        for (i, (to, range)) in chunk.iter().enumerate() {
            if runs(range).is_some() {
                scratch.addrs.push(to_storage(to));
                scratch.indices.push(first + i);
            } else {
                scratch.failed.push(first + i);
                result.failed += 1;
            }
        }
        // `addrs` is complete: the headers may now point into it, each through its element's
        // own `&mut` out of one iterator, so taking the next leaves the earlier ones valid.
        scratch.msgs.clear();
        for ((storage, len), &index) in scratch.addrs.iter_mut().zip(&scratch.indices) {
            let iov = runs(&datagrams[index].1).unwrap_or_default();
            // SAFETY: mmsghdr is plain old data.
            let mut msg: libc::mmsghdr = unsafe { mem::zeroed() };
            msg.msg_hdr.msg_name = (storage as *mut libc::sockaddr_storage).cast();
            msg.msg_hdr.msg_namelen = *len;
            // `IoSlice` is ABI-compatible with `iovec` on Unix (std documents it); `sendmmsg`
            // only reads the array.
            msg.msg_hdr.msg_iov = iov.as_ptr().cast::<libc::iovec>().cast_mut();
            msg.msg_hdr.msg_iovlen = iov.len() as _; // size_t on glibc, c_int on musl
            scratch.msgs.push(msg);
        }
        let mut done = 0;
        while done < scratch.msgs.len() {
            let left = scratch.msgs.len() - done;
            // SAFETY: the headers point at addresses in scratch and at the caller's iovecs and
            // bytes, all alive and unchanged for the call; the kernel only reads them.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    scratch.msgs[done..].as_mut_ptr(),
                    left as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                done += rc as usize;
                result.sent += rc as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // Every datagram from this one on is dropped, including any of this chunk
                    // already set aside as failed: count them all as not sent for lack of room.
                    let from = scratch.indices[done];
                    let set_aside = scratch.failed.iter().filter(|&&i| i > from).count();
                    scratch.failed.retain(|&i| i < from);
                    result.failed -= set_aside;
                    result.would_block += datagrams.len() - from;
                    scratch.failed.sort_unstable();
                    return result;
                }
                // The first datagram of the rest failed on its own (e.g. unreachable): skip it.
                _ => {
                    scratch.failed.push(scratch.indices[done]);
                    result.failed += 1;
                    done += 1;
                }
            }
        }
    }
    scratch.failed.sort_unstable();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn addresses_round_trip_through_sockaddr_storage() {
        for addr in ["127.0.0.1:9091", "[::1]:65535", "10.1.2.3:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(from_storage(&to_storage(&addr).0), Some(addr));
        }
    }

    /// Sends each `(destination, bytes)` as one datagram of one run.
    fn send_each(fd: RawFd, datagrams: &[(SocketAddr, &[u8])], scratch: &mut SendScratch) -> Sent {
        let parts: Vec<IoSlice> = datagrams.iter().map(|(_, b)| IoSlice::new(b)).collect();
        let ranges: Vec<(SocketAddr, Range<usize>)> = (0..datagrams.len())
            .map(|i| (datagrams[i].0, i..i + 1))
            .collect();
        send(fd, &parts, &ranges, scratch)
    }

    /// Two loopback sockets; the second with room for a few hundred small datagrams in its
    /// receive queue (the default may hold fewer).
    fn sender_and_receiver() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = crate::sockopt::set_int(b.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        (a, b)
    }

    #[test]
    fn send_and_receive_in_batches() {
        let (a, b) = sender_and_receiver();
        let to = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let datagrams: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, &p[..])).collect();
        let sent = send_each(a.as_raw_fd(), &datagrams, &mut SendScratch::default());
        assert_eq!(sent.sent, 300);
        let mut rx = Receiver::new(16);
        let mut got = Vec::new();
        while got.len() < 300 {
            let n = rx
                .recv(b.as_raw_fd(), BATCH)
                .expect("datagrams are queued on loopback");
            for i in 0..n {
                let (from, bytes) = rx.datagram(i).unwrap();
                assert_eq!(from, a.local_addr().unwrap());
                got.push(u32::from_be_bytes(bytes.try_into().unwrap()));
            }
        }
        assert_eq!(got, (0..300).collect::<Vec<_>>());
        let err = rx.recv(b.as_raw_fd(), BATCH).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_refused_destination_is_skipped_and_named_and_the_rest_still_leave() {
        let (a, b) = sender_and_receiver();
        let to = b.local_addr().unwrap();
        // Port 0 is refused by sendmsg (EINVAL); one in each of two system-call batches.
        let refused: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let datagrams: Vec<(SocketAddr, &[u8])> = (0..300)
            .map(|i| (if i == 3 || i == 270 { refused } else { to }, &b"x"[..]))
            .collect();
        let mut scratch = SendScratch::default();
        let sent = send_each(a.as_raw_fd(), &datagrams, &mut scratch);
        assert_eq!((sent.sent, sent.failed, sent.would_block), (298, 2, 0));
        assert_eq!(scratch.failed(), &[3, 270]);
        // The next send starts with a clean list.
        let sent = send_each(a.as_raw_fd(), &datagrams[..2], &mut scratch);
        assert_eq!(sent.sent, 2);
        assert!(scratch.failed().is_empty());
    }

    #[test]
    fn a_datagram_is_gathered_from_its_runs_and_a_range_it_cannot_send_fails_alone() {
        let (a, b) = sender_and_receiver();
        let to = b.local_addr().unwrap();
        let refused: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (head, body, tail) = (b"ab".as_slice(), b"cde".as_slice(), b"f".as_slice());
        let mut parts = vec![IoSlice::new(head), IoSlice::new(body), IoSlice::new(tail)];
        // Enough runs for a datagram of one more than the kernel takes.
        parts.extend((0..MAX_PARTS + 1).map(|_| IoSlice::new(b"z")));
        let datagrams = vec![
            (to, 0..3),                 // "abcdef"
            (to, 1..2),                 // "cde"
            (refused, 0..1),            // refused by the kernel: failed 2
            (to, 2..9_999),             // outside the runs: failed 3
            (to, 3..3 + MAX_PARTS + 1), // too many runs: failed 4
            (to, 3..3 + MAX_PARTS),     // as many as the kernel takes
            (to, 2..2),                 // an empty datagram is still one
            (to, 0..1),                 // "ab"
        ];
        let mut scratch = SendScratch::default();
        let sent = send(a.as_raw_fd(), &parts, &datagrams, &mut scratch);
        assert_eq!((sent.sent, sent.failed, sent.would_block), (5, 3, 0));
        assert_eq!(scratch.failed(), &[2, 3, 4]);
        let mut rx = Receiver::new(2048);
        let mut got = Vec::new();
        while got.len() < 5 {
            let n = rx.recv(b.as_raw_fd(), BATCH).expect("datagrams are queued");
            got.extend((0..n).map(|i| rx.datagram(i).unwrap().1.to_vec()));
        }
        let zs = vec![b'z'; MAX_PARTS];
        let expected: Vec<&[u8]> = vec![b"abcdef", b"cde", &zs, b"", b"ab"];
        assert_eq!(got, expected);
    }

    #[test]
    fn long_datagrams_are_cut_to_the_slot() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_to(&[7u8; 100], b.local_addr().unwrap()).unwrap();
        let mut rx = Receiver::new(10);
        b.set_nonblocking(false).unwrap();
        assert_eq!(rx.recv(b.as_raw_fd(), 1).unwrap(), 1);
        assert_eq!(rx.datagram(0).unwrap().1.len(), 10);
        assert!(rx.datagram(1).is_none());
    }
}
