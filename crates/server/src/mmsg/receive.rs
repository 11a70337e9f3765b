//! Receiving a batch of datagrams (`recvmmsg`) into buffers built once, with each one's
//! source, arrival time (`SO_TIMESTAMPNS`) and local address (`IP_PKTINFO`/`IPV6_PKTINFO`).

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

use super::{from_storage, BATCH};
use crate::local::LocalAddr;
use crate::peer;

/// Control-message space per received datagram, in `u64` words (8-byte aligned, as `cmsghdr`
/// needs): room for one `SCM_TIMESTAMPNS` (a 16-byte header and a 16-byte `timespec`), one
/// `IPV6_PKTINFO` (16 and 20, padded to 24) and one `IP_PKTINFO` (16 and 12, padded to 16; a
/// dual-stack socket reports both for an IPv4 datagram): 104 bytes, and slack.
const CONTROL_WORDS: usize = 16;

/// Asks the kernel to stamp every datagram received on `fd` with its arrival time
/// (`SO_TIMESTAMPNS`); [`Receiver::arrived`] reads the stamps.
pub fn enable_timestamps(fd: RawFd) -> io::Result<()> {
    crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// Receive buffers for [`BATCH`] datagrams of up to `slot` bytes each, and the headers that
/// point into them, built once: a receive allocates nothing.
pub struct Receiver {
    slot: usize,
    buf: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    /// Control-message space, [`CONTROL_WORDS`] per datagram; read through `msgs`' pointers.
    _control: Vec<u64>,
    /// One per slot of `buf`; read by the kernel through `msgs`' pointers.
    _iovecs: Vec<libc::iovec>,
    /// One per datagram: its name is in `addrs`, its iovec in `_iovecs`, its control space in
    /// `_control`. None of those four vectors is ever resized, so their heap buffers, and
    /// these pointers into them, stay where they are when the receiver moves.
    msgs: Vec<libc::mmsghdr>,
    arrived: Vec<Option<Duration>>,
    arrived_at: Vec<Option<LocalAddr>>,
    count: usize,
}

// SAFETY: the raw pointers in `iovecs` and `msgs` point only into the receiver's own heap
// buffers, which go wherever it goes; nothing else holds them.
unsafe impl Send for Receiver {}

impl Receiver {
    /// Buffers for datagrams of up to `slot` bytes (longer ones are truncated to `slot`).
    pub fn new(slot: usize) -> Receiver {
        let mut buf = vec![0u8; slot.max(1) * BATCH];
        // SAFETY: all-zero sockaddr_storage is valid.
        let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { mem::zeroed() }; BATCH];
        let mut control = vec![0u64; CONTROL_WORDS * BATCH];
        let mut iovecs: Vec<libc::iovec> = buf
            .chunks_mut(slot.max(1))
            .map(|chunk| libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain old data.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { mem::zeroed() }; BATCH];
        // Each pointer comes from an element's own `&mut` out of one iterator over its
        // buffer, so taking the next one leaves the earlier ones valid.
        let slots = addrs.iter_mut().zip(iovecs.iter_mut());
        for ((msg, control), (addr, iov)) in msgs
            .iter_mut()
            .zip(control.chunks_mut(CONTROL_WORDS))
            .zip(slots)
        {
            msg.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
            msg.msg_hdr.msg_control = control.as_mut_ptr().cast();
        }
        Receiver {
            slot: slot.max(1),
            buf,
            addrs,
            lens: vec![0; BATCH],
            _control: control,
            _iovecs: iovecs,
            msgs,
            arrived: vec![None; BATCH],
            arrived_at: vec![None; BATCH],
            count: 0,
        }
    }

    /// Receives up to `max` (≤ [`BATCH`]) datagrams without blocking; returns how many.
    pub fn recv(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let n = max.clamp(1, BATCH);
        // The kernel shortens both lengths to what it wrote: give each its whole room back.
        for msg in &mut self.msgs[..n] {
            msg.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_hdr.msg_controllen = (CONTROL_WORDS * mem::size_of::<u64>()) as _;
        }
        let msgs = &mut self.msgs;
        // SAFETY: every pointer in msgs points into the receiver's buffers, which outlive the
        // call, with the lengths given; the kernel writes at most that much.
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
        for (i, msg) in self.msgs.iter().enumerate().take(self.count) {
            self.lens[i] = (msg.msg_len as usize).min(self.slot);
            self.arrived[i] = timestamp(&msg.msg_hdr);
            self.arrived_at[i] = destination(&msg.msg_hdr);
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

    /// Which of our addresses the `i`th datagram of the last [`Receiver::recv`] was sent to, if
    /// the socket reports it ([`crate::local::enable_arrival_address`]).
    pub fn arrived_at(&self, i: usize) -> Option<LocalAddr> {
        if i >= self.count {
            return None;
        }
        self.arrived_at[i]
    }

    /// The `i`th datagram of the last [`Receiver::recv`]: its source (an IPv4 peer of a
    /// dual-stack socket as its IPv4 address, [`peer::canonical`]) and bytes.
    pub fn datagram(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.count {
            return None;
        }
        let start = i * self.slot;
        Some((
            peer::canonical(from_storage(&self.addrs[i])?),
            &self.buf[start..start + self.lens[i]],
        ))
    }
}

/// The `SCM_TIMESTAMPNS` stamp among a received message's control messages.
pub(super) fn timestamp(hdr: &libc::msghdr) -> Option<Duration> {
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

/// The destination address among a received message's control messages (`IP_PKTINFO`: the
/// local address the kernel routed it to; `IPV6_PKTINFO`: the header's destination), with the
/// interface it came in on. An IPv4 datagram on a dual-stack socket carries both; the first
/// is preferred, as for a datagram to a subnet's broadcast address it is the host's own
/// address where the second is the broadcast address.
pub(super) fn destination(hdr: &libc::msghdr) -> Option<LocalAddr> {
    let mut ipv6 = None;
    // SAFETY: as in `timestamp`: the kernel wrote well-formed cmsghdrs within msg_controllen,
    // and each payload's length is checked before it is read (unaligned).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let holds = |len: usize| c.cmsg_len as usize >= libc::CMSG_LEN(len as u32) as usize;
            if c.cmsg_level == libc::IPPROTO_IP
                && c.cmsg_type == libc::IP_PKTINFO
                && holds(mem::size_of::<libc::in_pktinfo>())
            {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(LocalAddr {
                    ip: IpAddr::V4(Ipv4Addr::from(info.ipi_spec_dst.s_addr.to_ne_bytes())),
                    ifindex: u32::try_from(info.ipi_ifindex).unwrap_or(0),
                });
            }
            if c.cmsg_level == libc::IPPROTO_IPV6
                && c.cmsg_type == libc::IPV6_PKTINFO
                && holds(mem::size_of::<libc::in6_pktinfo>())
            {
                let info: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                ipv6 = Some(LocalAddr {
                    ip: IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)).to_canonical(),
                    ifindex: info.ipi6_ifindex,
                });
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    ipv6
}
