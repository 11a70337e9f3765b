//! Batched datagram system calls: `recvmmsg(2)` and `sendmmsg(2)` through libc.
//!
//! One call moves up to [`BATCH`] datagrams, which is what lets fan-out approach the kernel's
//! per-datagram cost instead of paying a system call per datagram. All unsafe code of the
//! daemon's data path is here, behind two safe types. On a socket bound to a wildcard address
//! they also carry each datagram's local address: the one it arrived at, read from
//! `IP_PKTINFO`/`IPV6_PKTINFO`, and the one a reply leaves from, set the same way (see
//! [`crate::local`]).

use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::local::LocalAddr;
use crate::peer;

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

/// Control-message space per received datagram, in `u64` words (8-byte aligned, as `cmsghdr`
/// needs): room for one `SCM_TIMESTAMPNS` (a 16-byte header and a 16-byte `timespec`), one
/// `IPV6_PKTINFO` (16 and 20, padded to 24) and one `IP_PKTINFO` (16 and 12, padded to 16; a
/// dual-stack socket reports both for an IPv4 datagram): 104 bytes, and slack.
const CONTROL_WORDS: usize = 16;

/// Control-message space per sent datagram, in `u64` words: one `UDP_SEGMENT` (a 16-byte
/// header and a `u16`, padded to 24) and one `IPV6_PKTINFO` (40) or `IP_PKTINFO` (32).
const SEND_CONTROL_WORDS: usize = 8;

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

/// The destination address among a received message's control messages (`IP_PKTINFO`: the
/// local address the kernel routed it to; `IPV6_PKTINFO`: the header's destination), with the
/// interface it came in on. An IPv4 datagram on a dual-stack socket carries both; the first
/// is preferred, as for a datagram to a subnet's broadcast address it is the host's own
/// address where the second is the broadcast address.
fn destination(hdr: &libc::msghdr) -> Option<LocalAddr> {
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

/// Writes one control message of `level` and `kind` carrying `value` into `control` at byte
/// `at` (a multiple of 8); returns the byte just past it, or `None` when it does not fit.
fn put_control<T: Copy>(
    control: &mut [u64; SEND_CONTROL_WORDS],
    at: usize,
    level: libc::c_int,
    kind: libc::c_int,
    value: T,
) -> Option<usize> {
    let len = u32::try_from(mem::size_of::<T>()).ok()?;
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(len) } as usize;
    let end = at.checked_add(space)?;
    if !at.is_multiple_of(mem::align_of::<u64>()) || end > mem::size_of_val(control) {
        return None;
    }
    // SAFETY: the message lies in `control` (checked above), at an 8-byte boundary of an array
    // of u64, which is aligned for cmsghdr; its payload is written unaligned.
    unsafe {
        let cmsg = control
            .as_mut_ptr()
            .cast::<u8>()
            .add(at)
            .cast::<libc::cmsghdr>();
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<T>(), value);
    }
    Some(end)
}

/// Writes into `control` at byte `at` the message that makes a datagram to `to` leave from
/// `from` (`IP_PKTINFO` on an IPv4 socket, `IPV6_PKTINFO` on an IPv6 one, with an IPv4-mapped
/// address for an IPv4 source); returns the byte just past it, `at` when `from` cannot be
/// said to such a socket.
fn source_control(
    to: &SocketAddr,
    from: &LocalAddr,
    control: &mut [u64; SEND_CONTROL_WORDS],
    at: usize,
) -> usize {
    let end = match (to, from.ip) {
        (SocketAddr::V4(_), IpAddr::V4(ip)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            put_control(control, at, libc::IPPROTO_IP, libc::IP_PKTINFO, info)
        }
        (SocketAddr::V6(_), ip) => {
            let (ip, scoped) = match ip {
                IpAddr::V4(ip) => (ip.to_ipv6_mapped(), false),
                IpAddr::V6(ip) => (ip, ip.is_unicast_link_local()),
            };
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                // The interface matters only for a link-local source; otherwise routing
                // picks it, as for any datagram.
                ipi6_ifindex: if scoped { from.ifindex } else { 0 },
            };
            put_control(control, at, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info)
        }
        // An IPv6 source for an IPv4 socket: cannot be.
        (SocketAddr::V4(_), IpAddr::V6(_)) => None,
    };
    end.unwrap_or(at)
}

/// Whether the kernel can split one send into datagrams of equal size (`UDP_SEGMENT`, Linux
/// 4.18 and later). Older kernels ignore the control message and would send the whole as one
/// datagram, so [`Outgoing::segment`] must stay 0 on a socket for which this is false.
pub fn can_segment(fd: RawFd) -> bool {
    crate::sockopt::get_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
}

/// Most datagrams one segmented send may carry (the kernel's `UDP_MAX_SEGMENTS`, 64 before
/// Linux 6.11).
pub const MAX_SEGMENTS: usize = 64;

/// Most bytes one segmented send may carry: the payload of the largest IPv4 datagram.
pub const MAX_SEGMENTED_BYTES: usize = 65_507;

/// One datagram for [`send`]: where it goes, which of our addresses it leaves from (`None`:
/// the kernel's choice), and which of the call's byte runs it is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination.
    pub to: SocketAddr,
    /// Source address, on a socket bound to a wildcard address.
    pub from: Option<LocalAddr>,
    /// Its runs in the call's `parts`.
    pub runs: Range<usize>,
    /// 0 for one datagram; otherwise the kernel splits the bytes into datagrams of this many
    /// bytes each, the last one possibly shorter (`UDP_SEGMENT`; only where [`can_segment`]).
    pub segment: u16,
    /// Whether nothing later in the call may reach `to` before it: the caller sends it again
    /// when the kernel has no buffer memory for it, so those later ones are then held back,
    /// untried ([`SendScratch::held_back`]), instead of overtaking it.
    pub in_order: bool,
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
    /// Datagrams not tried, behind an earlier [`Outgoing::in_order`] one to the same
    /// destination that the kernel had no buffer memory for ([`SendScratch::held_back`]).
    pub held_back: usize,
    /// A segmented datagram the kernel refused (not for a full buffer): its index, and the
    /// error. Nothing from it on was sent, and the counts above are of the datagrams before
    /// it; the caller sends the rest again unsegmented.
    pub refused_segmented: Option<(usize, i32)>,
}

/// Scratch space for [`send`], kept between calls to avoid allocating per batch.
#[derive(Default)]
pub struct SendScratch {
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    /// Each header's control messages: its segment size first, then its source address; the
    /// byte where the source begins (0: not segmented) and where the messages end (the same:
    /// no source).
    controls: Vec<([u64; SEND_CONTROL_WORDS], usize, usize)>,
    msgs: Vec<libc::mmsghdr>,
    /// For each header in `msgs`, its datagram's index in the call's `datagrams`.
    indices: Vec<usize>,
    failed: Vec<usize>,
    /// Those of `failed` the kernel had no buffer memory for (`ENOBUFS`, `ENOMEM`): not
    /// refused for themselves, so worth sending again.
    no_memory: Vec<usize>,
    refused_sources: Vec<usize>,
    /// Destinations of the [`Outgoing::in_order`] datagrams the kernel had no buffer memory
    /// for in this call: nothing more goes to them in it. Empty (and never hashed into)
    /// unless that happened.
    blocked: HashSet<SocketAddr>,
    /// Indices of the datagrams held back behind them, ascending.
    held_back: Vec<usize>,
    /// A stand-in for the kernel in tests, for datagrams of one run (as `core.rs`'s
    /// `LD_PRELOAD` stubs are for the daemon).
    #[cfg(test)]
    pub(crate) refusing: Option<StandIn>,
}

/// A test's stand-in for the kernel: the errno with which it refuses a datagram of these
/// bytes, if it does.
#[cfg(test)]
pub(crate) type StandIn = fn(&[u8]) -> Option<i32>;

/// A [`StandIn`] that decides by a datagram's first byte, each time it is tried: takes it
/// (0), has no memory for it (1, `ENOBUFS`), finds its destination unreachable (2,
/// `EHOSTUNREACH`: refused for itself), or finds the buffer full (3, `EAGAIN`).
#[cfg(test)]
pub(crate) fn by_first_byte(bytes: &[u8]) -> Option<i32> {
    match bytes.first() {
        Some(1) => Some(libc::ENOBUFS),
        Some(2) => Some(libc::EHOSTUNREACH),
        Some(3) => Some(libc::EAGAIN),
        _ => None,
    }
}

impl SendScratch {
    /// Indices, in the last [`send`]'s `datagrams`, of those dropped for an error of their own
    /// ([`Sent::failed`] of them, ascending). The kernel took every other datagram before
    /// index `sent + failed + held_back` but those [`SendScratch::held_back`], and none from
    /// there on.
    pub fn failed(&self) -> &[usize] {
        &self.failed
    }

    /// Indices, in the last [`send`]'s `datagrams`, of those the kernel refused from the
    /// source address they named but took without it (they left from the address the route
    /// picks): that address is no longer one of the host's.
    pub fn refused_sources(&self) -> &[usize] {
        &self.refused_sources
    }

    /// Indices, among [`SendScratch::failed`], of the datagrams that failed for want of
    /// buffer memory ([`Fate::NoRoom`]), ascending.
    pub fn short_of_memory(&self) -> &[usize] {
        &self.no_memory
    }

    /// Indices, in the last [`send`]'s `datagrams`, of those not tried because an earlier
    /// [`Outgoing::in_order`] datagram to the same destination found no buffer memory
    /// ([`Sent::held_back`] of them, ascending; [`Fate::NoRoom`]).
    pub fn held_back(&self) -> &[usize] {
        &self.held_back
    }

    /// What became of the datagram at `index` in the last [`send`]'s `datagrams`, which
    /// returned `sent` (with no refused segmented send: nothing was tried after one).
    pub fn fate(&self, index: usize, sent: &Sent) -> Fate {
        if self.no_memory.binary_search(&index).is_ok() {
            Fate::NoRoom
        } else if self.failed.binary_search(&index).is_ok() {
            Fate::Refused
        } else if self.held_back.binary_search(&index).is_ok() {
            Fate::NoRoom
        } else if index < sent.sent + sent.failed + sent.held_back {
            Fate::Sent
        } else {
            Fate::NoRoom
        }
    }

    /// Hands the headers from `done` on, `count` of them, to one `sendmmsg`: how many the
    /// kernel took (at least one), or its error for the first.
    fn sendmmsg(&mut self, fd: RawFd, done: usize, count: usize) -> io::Result<usize> {
        let msgs = &mut self.msgs[done..done + count];
        #[cfg(test)]
        let msgs = match self
            .refusing
            .map(|refusing| refused_by_stand_in(msgs, refusing))
        {
            Some(Some((0, errno))) => return Err(io::Error::from_raw_os_error(errno)),
            Some(Some((first, _))) => &mut msgs[..first],
            _ => msgs,
        };
        // SAFETY: the headers point at addresses and control messages in scratch and at the
        // caller's iovecs and bytes, all alive and unchanged for the call; the kernel only
        // reads them.
        let rc = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if rc > 0 {
            Ok(rc as usize)
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The first of `msgs` the test stand-in refuses, and its errno.
#[cfg(test)]
fn refused_by_stand_in(msgs: &[libc::mmsghdr], refusing: StandIn) -> Option<(usize, i32)> {
    msgs.iter().enumerate().find_map(|(i, msg)| {
        let hdr = &msg.msg_hdr;
        if hdr.msg_iovlen != 1 {
            return None;
        }
        // SAFETY: a header of one run points at one iovec of the caller's, whose bytes are
        // alive for the call.
        let bytes = unsafe {
            let iov = &*hdr.msg_iov;
            std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
        };
        refusing(bytes).map(|errno| (i, errno))
    })
}

/// What became of one datagram of a [`send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The kernel took it.
    Sent,
    /// It failed on its own (an unroutable or forbidden destination): sent again, it would
    /// fail again.
    Refused,
    /// The kernel had no room for it: the send buffer was full (`EAGAIN`, this datagram or
    /// one before it), or it had no buffer memory (`ENOBUFS`, `ENOMEM`) for it or for an
    /// earlier [`Outgoing::in_order`] datagram to its destination (it was held back). Later,
    /// it may.
    NoRoom,
}

/// A header's control-message length as a `usize` (a `size_t` on glibc, a `socklen_t` on
/// musl).
#[allow(clippy::unnecessary_cast)]
fn control_len(hdr: &libc::msghdr) -> usize {
    hdr.msg_controllen as usize
}

/// Most byte runs one datagram may be gathered from (the kernel's `UIO_MAXIOV`).
pub const MAX_PARTS: usize = libc::UIO_MAXIOV as usize;

/// Sends every [`Outgoing`] datagram with as few `sendmmsg` calls as it takes: a datagram's
/// bytes are those of `parts[runs]`, one after the other, which the kernel gathers from
/// where they lie. Never blocks: when the send buffer is full the rest is dropped and
/// counted. A datagram the kernel refuses on its own (an unroutable destination, no buffer
/// memory) is stepped over and the rest go on, but for those to the destination of an
/// [`Outgoing::in_order`] one refused for want of memory: they are held back, untried, so
/// that nothing newer reaches it before it is sent again. A range outside `parts` or of more
/// than [`MAX_PARTS`] runs fails on its own without reaching the kernel (the caller never
/// builds one).
pub fn send(
    fd: RawFd,
    parts: &[IoSlice<'_>],
    datagrams: &[Outgoing],
    scratch: &mut SendScratch,
) -> Sent {
    let mut result = Sent::default();
    scratch.start();
    for (chunk_index, chunk) in datagrams.chunks(BATCH).enumerate() {
        scratch.prepare(parts, chunk, chunk_index * BATCH, &mut result);
        scratch.point_headers(parts, datagrams);
        if scratch.send_prepared(fd, datagrams, &mut result) == Flow::Stop {
            break;
        }
    }
    scratch.failed.sort_unstable();
    result
}

/// The byte runs of a datagram, if `range` lies in `parts` and holds at most [`MAX_PARTS`].
fn runs_of<'p, 'b>(parts: &'p [IoSlice<'b>], range: &Range<usize>) -> Option<&'p [IoSlice<'b>]> {
    parts
        .get(range.clone())
        .filter(|runs| runs.len() <= MAX_PARTS)
}

/// Whether [`send`] goes on to its next chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Every header of the chunk was handed to the kernel or stepped over.
    Next,
    /// Nothing more is tried: the buffer is full, or a segmented send was refused.
    Stop,
}

/// What [`send`] does after the kernel refused the first header it was handed.
enum AfterRefusal {
    /// Hand it again (interrupted, or it now goes without its source).
    Again,
    /// Step over it: it failed on its own.
    StepOver,
    /// Try nothing more.
    Stop,
}

impl SendScratch {
    /// Clears what the last [`send`] left.
    fn start(&mut self) {
        self.failed.clear();
        self.no_memory.clear();
        self.refused_sources.clear();
        self.held_back.clear();
        if !self.blocked.is_empty() {
            self.blocked.clear();
        }
    }

    /// Takes the destination and control messages of each datagram of `chunk` (the first
    /// at index `first`), or sets aside as failed one whose runs or segment size cannot be.
    fn prepare(
        &mut self,
        parts: &[IoSlice<'_>],
        chunk: &[Outgoing],
        first: usize,
        result: &mut Sent,
    ) {
        self.addrs.clear();
        self.controls.clear();
        self.indices.clear();
        for (i, datagram) in chunk.iter().enumerate() {
            let mut control = [0; SEND_CONTROL_WORDS];
            // A segment size that did not fit would send the datagrams as one: fail instead
            // (it always fits: the buffer is sized for it).
            let source_at = match datagram.segment {
                0 => Some(0),
                size => put_control(&mut control, 0, libc::SOL_UDP, libc::UDP_SEGMENT, size),
            };
            match (runs_of(parts, &datagram.runs), source_at) {
                (Some(_), Some(source_at)) => {
                    self.addrs.push(to_storage(&datagram.to));
                    let end = datagram.from.map_or(source_at, |from| {
                        source_control(&datagram.to, &from, &mut control, source_at)
                    });
                    self.controls.push((control, source_at, end));
                    self.indices.push(first + i);
                }
                _ => {
                    self.failed.push(first + i);
                    result.failed += 1;
                }
            }
        }
    }

    /// Builds a header for each datagram [`SendScratch::prepare`] took, pointing at its
    /// destination, its control messages and its runs in `parts`.
    fn point_headers(&mut self, parts: &[IoSlice<'_>], datagrams: &[Outgoing]) {
        // `addrs` is complete: the headers may now point into it, each through its element's
        // own `&mut` out of one iterator, so taking the next leaves the earlier ones valid.
        self.msgs.clear();
        let headers = self.addrs.iter_mut().zip(self.controls.iter_mut());
        for (((storage, len), (control, _, control_len)), &index) in headers.zip(&self.indices) {
            let iov = runs_of(parts, &datagrams[index].runs).unwrap_or_default();
            // SAFETY: mmsghdr is plain old data.
            let mut msg: libc::mmsghdr = unsafe { mem::zeroed() };
            msg.msg_hdr.msg_name = (storage as *mut libc::sockaddr_storage).cast();
            msg.msg_hdr.msg_namelen = *len;
            // `IoSlice` is ABI-compatible with `iovec` on Unix (std documents it); `sendmmsg`
            // only reads the array.
            msg.msg_hdr.msg_iov = iov.as_ptr().cast::<libc::iovec>().cast_mut();
            msg.msg_hdr.msg_iovlen = iov.len() as _; // size_t on glibc, c_int on musl
            if *control_len > 0 {
                msg.msg_hdr.msg_control = control.as_mut_ptr().cast();
                msg.msg_hdr.msg_controllen = *control_len as _;
            }
            self.msgs.push(msg);
        }
    }

    /// Hands the chunk's headers to the kernel, as few calls as it takes, stepping over those
    /// it refuses on their own and holding back those behind a blocked in-order datagram.
    fn send_prepared(&mut self, fd: RawFd, datagrams: &[Outgoing], result: &mut Sent) -> Flow {
        let mut done = 0;
        while done < self.msgs.len() {
            let mut left = self.msgs.len() - done;
            if !self.blocked.is_empty() {
                // Behind an in-order datagram the kernel had no memory for: not tried, so
                // that it does not overtake it; the call goes up to the next such one.
                let blocked = |&i: &usize| self.blocked.contains(&datagrams[i].to);
                let index = self.indices[done];
                if blocked(&index) {
                    self.held_back.push(index);
                    result.held_back += 1;
                    done += 1;
                    continue;
                }
                left = self.indices[done..]
                    .iter()
                    .position(blocked)
                    .unwrap_or(left);
            }
            match self.sendmmsg(fd, done, left) {
                Ok(taken) => {
                    done += taken;
                    result.sent += taken;
                }
                Err(err) => match self.after_refusal(&err, done, datagrams, result) {
                    AfterRefusal::Again => {}
                    AfterRefusal::StepOver => done += 1,
                    AfterRefusal::Stop => return Flow::Stop,
                },
            }
        }
        Flow::Next
    }

    /// Accounts for the kernel's refusal `err` of the header at `done`, and says what comes
    /// next.
    fn after_refusal(
        &mut self,
        err: &io::Error,
        done: usize,
        datagrams: &[Outgoing],
        result: &mut Sent,
    ) -> AfterRefusal {
        match err.kind() {
            io::ErrorKind::Interrupted => AfterRefusal::Again,
            io::ErrorKind::WouldBlock => {
                // Every datagram from this one on is dropped, including any of this chunk
                // already set aside as failed: count them all as not sent for lack of room.
                let from = self.indices[done];
                let set_aside = self.failed.iter().filter(|&&i| i > from).count();
                self.failed.retain(|&i| i < from);
                self.no_memory.retain(|&i| i < from);
                // A datagram sent again without its source that found the buffer full says
                // nothing about the source.
                self.refused_sources.retain(|&i| i < from);
                result.failed -= set_aside;
                result.would_block += datagrams.len() - from;
                AfterRefusal::Stop
            }
            // Refused with the source it names (EINVAL for IPv6, ENETUNREACH for IPv4 when
            // the address is no longer the host's; ENODEV when a link-local source's
            // interface is gone, or was saved before a reboot renumbered the interfaces):
            // send it once more without (keeping a segment size), and name it if that goes
            // through. A segmented send's EINVAL may be the segments' fault instead: the
            // arm below takes it, and the datagrams sent again one apiece tell which.
            _ if control_len(&self.msgs[done].msg_hdr) > self.controls[done].1
                && matches!(
                    err.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EADDRNOTAVAIL | libc::ENODEV)
                )
                || (self.controls[done].1 == 0
                    && err.raw_os_error() == Some(libc::EINVAL)
                    && !self.msgs[done].msg_hdr.msg_control.is_null()) =>
            {
                let segment_len = self.controls[done].1;
                let hdr = &mut self.msgs[done].msg_hdr;
                hdr.msg_controllen = segment_len as _;
                if segment_len == 0 {
                    hdr.msg_control = std::ptr::null_mut();
                }
                self.refused_sources.push(self.indices[done]);
                AfterRefusal::Again
            }
            // A segmented datagram refused (a path MTU below its segments, an IPsec
            // policy, a firewall): stop here, so that the caller sends the rest again one
            // datagram per message, in order. A source refused on the way is not proven at
            // fault. (The socket has no IP_RECVERR, so a send the kernel took is never
            // reported failed afterwards: the retry cannot send a datagram twice.) A lack
            // of memory is no refusal: the datagrams are dropped, as any others would be.
            _ if self.controls[done].1 > 0
                && matches!(
                    err.raw_os_error(),
                    Some(
                        libc::EINVAL | libc::EMSGSIZE | libc::EIO | libc::EPERM | libc::EOPNOTSUPP
                    )
                ) =>
            {
                let index = self.indices[done];
                if self.refused_sources.last() == Some(&index) {
                    self.refused_sources.pop();
                }
                let errno = err.raw_os_error().unwrap_or(0);
                result.refused_segmented = Some((index, errno));
                self.failed.retain(|&i| i < index);
                self.no_memory.retain(|&i| i < index);
                result.failed = self.failed.len();
                AfterRefusal::Stop
            }
            // The first datagram of the rest failed on its own (e.g. unreachable): skip it.
            _ => {
                let index = self.indices[done];
                // Refused without its source too: the destination is at fault.
                if self.refused_sources.last() == Some(&index) {
                    self.refused_sources.pop();
                }
                self.failed.push(index);
                if matches!(err.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM)) {
                    self.no_memory.push(index);
                    // To be sent again: nothing newer to its destination goes first.
                    if datagrams[index].in_order {
                        self.blocked.insert(datagrams[index].to);
                    }
                }
                result.failed += 1;
                AfterRefusal::StepOver
            }
        }
    }
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
        let ranges: Vec<Outgoing> = (0..datagrams.len())
            .map(|i| Outgoing {
                to: datagrams[i].0,
                from: None,
                runs: i..i + 1,
                segment: 0,
                in_order: false,
            })
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
        let datagrams: Vec<Outgoing> = [
            (to, 0..3),                 // "abcdef"
            (to, 1..2),                 // "cde"
            (refused, 0..1),            // refused by the kernel: failed 2
            (to, 2..9_999),             // outside the runs: failed 3
            (to, 3..3 + MAX_PARTS + 1), // too many runs: failed 4
            (to, 3..3 + MAX_PARTS),     // as many as the kernel takes
            (to, 2..2),                 // an empty datagram is still one
            (to, 0..1),                 // "ab"
        ]
        .into_iter()
        .map(|(to, runs)| Outgoing {
            to,
            from: None,
            runs,
            segment: 0,
            in_order: false,
        })
        .collect();
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

    /// On a socket bound to the wildcard address, a datagram's arrival address is read, and a
    /// reply given it as its source leaves from it, where the kernel alone picks 127.0.0.1.
    /// (The socket must be bound to 0.0.0.0: only there does the kernel choose a reply's
    /// source. Every datagram of the test goes to and from 127.0.0.x.)
    #[test]
    fn a_wildcard_socket_reads_where_a_datagram_came_to_and_answers_from_there() {
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        let bound = server.local_addr().unwrap();
        crate::local::enable_arrival_address(server.as_raw_fd(), bound).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let second = SocketAddr::from(([127, 0, 0, 2], bound.port()));
        client.send_to(b"hi", second).unwrap();
        let mut rx = Receiver::new(16);
        // Loopback delivers within the send: the datagram is queued already.
        assert_eq!(rx.recv(server.as_raw_fd(), BATCH).unwrap(), 1);
        let (from, bytes) = rx.datagram(0).unwrap();
        assert_eq!((from, bytes), (client.local_addr().unwrap(), &b"hi"[..]));
        let arrived = rx.arrived_at(0).expect("the arrival address is reported");
        assert_eq!(arrived.ip, second.ip());
        assert_ne!(arrived.ifindex, 0);
        assert_eq!(rx.arrived_at(1), None);

        let parts = [IoSlice::new(b"answer")];
        let replies = [
            Outgoing {
                to: from,
                from: Some(arrived),
                runs: 0..1,
                segment: 0,
                in_order: false,
            },
            Outgoing {
                to: from,
                from: None,
                runs: 0..1,
                segment: 0,
                in_order: false,
            },
        ];
        let sent = send(
            server.as_raw_fd(),
            &parts,
            &replies,
            &mut SendScratch::default(),
        );
        assert_eq!((sent.sent, sent.failed), (2, 0));
        let mut buf = [0u8; 16];
        let (len, answered_from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..len], answered_from), (&b"answer"[..], second));
        let (_, kernel_choice) = client.recv_from(&mut buf).unwrap();
        assert_eq!(
            kernel_choice,
            SocketAddr::from(([127, 0, 0, 1], bound.port()))
        );
    }

    /// A datagram whose source is not the host's (a VIP that moved) is refused by the kernel:
    /// it leaves without it, from the address the route picks, and is named; a datagram
    /// refused for its destination is not, with or without a source.
    #[test]
    fn a_source_the_host_does_not_have_is_dropped_from_its_datagram_and_named() {
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let to = client.local_addr().unwrap();
        let source = |first| {
            Some(LocalAddr {
                ip: IpAddr::from([first, 0, 2, 77]),
                ifindex: 0,
            })
        };
        let (gone, ours) = (source(192), source(127));
        let refused: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let parts = [IoSlice::new(b"a"), IoSlice::new(b"b"), IoSlice::new(b"c")];
        let outgoing = |to, from, runs| Outgoing {
            to,
            from,
            runs,
            segment: 0,
            in_order: false,
        };
        let datagrams = [
            outgoing(to, None, 0..1),
            outgoing(to, gone, 1..2),
            outgoing(refused, ours, 0..1),
            outgoing(to, ours, 2..3),
        ];
        let mut scratch = SendScratch::default();
        let sent = send(server.as_raw_fd(), &parts, &datagrams, &mut scratch);
        assert_eq!((sent.sent, sent.failed), (3, 1));
        assert_eq!(scratch.failed(), &[2]);
        assert_eq!(scratch.refused_sources(), &[1]);
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        for _ in 0..3 {
            let (len, from) = client.recv_from(&mut buf).unwrap();
            got.push((buf[..len].to_vec(), from));
        }
        let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
        assert_eq!(
            got,
            [
                (b"a".to_vec(), at([127, 0, 0, 1])),
                (b"b".to_vec(), at([127, 0, 0, 1])),
                (b"c".to_vec(), at([127, 0, 2, 77])),
            ]
        );
    }

    /// A link-local source whose interface is gone (ENODEV) is dropped from its datagram and
    /// named, like a source the host does not have.
    #[test]
    fn a_link_local_source_on_a_missing_interface_is_dropped_and_named() {
        let Ok(server) = UdpSocket::bind("[::]:0") else {
            crate::test_shared::skipped("this host cannot bind [::]");
            return;
        };
        let Ok(client) = UdpSocket::bind("[::1]:0") else {
            crate::test_shared::skipped("this host has no ::1");
            return;
        };
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let from = Some(LocalAddr {
            ip: "fe80::1".parse().unwrap(),
            ifindex: u32::MAX - 1,
        });
        let parts = [IoSlice::new(b"hi")];
        let datagrams = [Outgoing {
            to: client.local_addr().unwrap(),
            from,
            runs: 0..1,
            segment: 0,
            in_order: false,
        }];
        let mut scratch = SendScratch::default();
        let sent = send(server.as_raw_fd(), &parts, &datagrams, &mut scratch);
        assert_eq!((sent.sent, sent.failed), (1, 0));
        assert_eq!(scratch.refused_sources(), &[0]);
        let mut buf = [0u8; 4];
        let (len, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"hi");
    }

    /// Receives `count` datagrams on `socket` (waiting up to 10 s for each).
    fn receive(socket: &UdpSocket, count: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 2048];
        (0..count)
            .map(|_| {
                let (len, from) = socket.recv_from(&mut buf).unwrap();
                (from, buf[..len].to_vec())
            })
            .collect()
    }

    /// A segmented datagram arrives as datagrams of the segment's size, the last one shorter,
    /// in order, before the datagram sent after it; with a source it leaves from that source.
    #[test]
    fn a_segmented_send_arrives_as_datagrams_of_the_segment_size() {
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        if !can_segment(server.as_raw_fd()) {
            crate::test_shared::skipped("this kernel cannot segment UDP sends");
            return;
        }
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = client.local_addr().unwrap();
        let parts: Vec<IoSlice> = [&b"aaa"[..], b"bbb", b"ccc", b"dd", b"x"]
            .into_iter()
            .map(IoSlice::new)
            .collect();
        let source = Some(LocalAddr {
            ip: IpAddr::from([127, 0, 0, 3]),
            ifindex: 0,
        });
        let outgoing = |from, runs, segment| Outgoing {
            to,
            from,
            runs,
            segment,
            in_order: false,
        };
        let datagrams = [
            outgoing(None, 0..4, 3),
            outgoing(None, 4..5, 0),
            outgoing(source, 0..3, 3),
        ];
        let sent = send(
            server.as_raw_fd(),
            &parts,
            &datagrams,
            &mut SendScratch::default(),
        );
        assert_eq!(
            sent,
            Sent {
                sent: 3,
                ..Sent::default()
            }
        );
        let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
        let got = receive(&client, 8);
        let expected: Vec<(SocketAddr, &[u8])> = vec![
            (at([127, 0, 0, 1]), b"aaa"),
            (at([127, 0, 0, 1]), b"bbb"),
            (at([127, 0, 0, 1]), b"ccc"),
            (at([127, 0, 0, 1]), b"dd"),
            (at([127, 0, 0, 1]), b"x"),
            (at([127, 0, 0, 3]), b"aaa"),
            (at([127, 0, 0, 3]), b"bbb"),
            (at([127, 0, 0, 3]), b"ccc"),
        ];
        let got: Vec<(SocketAddr, &[u8])> = got.iter().map(|(a, b)| (*a, &b[..])).collect();
        assert_eq!(got, expected);
    }

    /// A segmented send the kernel refuses (here: a socket told to send without UDP
    /// checksums, which segmenting needs) stops the call there; what came before it left.
    #[test]
    fn a_segmented_send_the_kernel_refuses_stops_the_call_there() {
        let (a, b) = sender_and_receiver();
        if !can_segment(a.as_raw_fd()) {
            crate::test_shared::skipped("this kernel cannot segment UDP sends");
            return;
        }
        crate::sockopt::set_int(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
        let to = b.local_addr().unwrap();
        let refused: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let parts = [IoSlice::new(b"a"), IoSlice::new(b"bb"), IoSlice::new(b"cc")];
        let outgoing = |to, runs, segment| Outgoing {
            to,
            from: None,
            runs,
            segment,
            in_order: false,
        };
        let datagrams = [
            outgoing(to, 0..1, 0),
            outgoing(refused, 0..1, 0), // fails on its own
            outgoing(to, 0..1, 0),
            outgoing(to, 1..3, 2), // refused: segmented without checksums
            outgoing(to, 0..1, 0), // not tried
        ];
        let mut scratch = SendScratch::default();
        let sent = send(a.as_raw_fd(), &parts, &datagrams, &mut scratch);
        assert_eq!(
            sent,
            Sent {
                sent: 2,
                failed: 1,
                would_block: 0,
                held_back: 0,
                refused_segmented: Some((3, libc::EINVAL)),
            }
        );
        assert_eq!(scratch.failed(), &[1]);
        // Without the segment size the same bytes leave as one datagram.
        let whole = [outgoing(to, 1..3, 0)];
        assert_eq!(send(a.as_raw_fd(), &parts, &whole, &mut scratch).sent, 1);
        let got: Vec<Vec<u8>> = receive(&b, 3).into_iter().map(|(_, bytes)| bytes).collect();
        assert_eq!(got, [&b"a"[..], b"a", b"bbcc"]);
        b.set_nonblocking(true).unwrap();
        assert!(
            b.recv(&mut [0; 8]).is_err(),
            "nothing after the refused send left"
        );
    }

    /// A destination without a route (a link-local address on an interface that does not
    /// exist: ENETUNREACH, as from a source the host no longer has) fails alone, with or
    /// without a source, and no source is blamed for it.
    #[test]
    fn a_destination_without_a_route_fails_alone_and_blames_no_source() {
        let (Ok(server), Ok(client)) = (UdpSocket::bind("[::]:0"), UdpSocket::bind("[::1]:0"))
        else {
            crate::test_shared::skipped("this host has no IPv6 loopback");
            return;
        };
        let nowhere = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 0, 4242));
        let ours = Some(LocalAddr {
            ip: Ipv6Addr::LOCALHOST.into(),
            ifindex: 0,
        });
        let outgoing = |to, from| Outgoing {
            to,
            from,
            runs: 0..1,
            segment: 0,
            in_order: false,
        };
        let to = client.local_addr().unwrap();
        let datagrams = [
            outgoing(nowhere, None),
            outgoing(nowhere, ours),
            outgoing(to, None),
        ];
        let parts = [IoSlice::new(b"x")];
        let mut scratch = SendScratch::default();
        let sent = send(server.as_raw_fd(), &parts, &datagrams, &mut scratch);
        assert_eq!((sent.sent, sent.failed), (1, 2));
        assert_eq!(scratch.failed(), &[0, 1]);
        assert!(scratch.refused_sources().is_empty());
        assert_eq!(receive(&client, 1)[0].1, b"x");
    }

    /// A socket bound to one address reports no arrival address (none was asked for).
    #[test]
    fn a_socket_bound_to_one_address_reports_no_arrival_address() {
        let (a, b) = sender_and_receiver();
        a.send_to(b"x", b.local_addr().unwrap()).unwrap();
        let mut rx = Receiver::new(16);
        assert_eq!(rx.recv(b.as_raw_fd(), BATCH).unwrap(), 1);
        assert_eq!(rx.arrived_at(0), None);
    }

    /// The seconds since the Unix epoch by the wall clock.
    fn since_epoch() -> Duration {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
    }

    /// A socket asked to stamp datagrams tells when each arrived (between the send and the
    /// receive, by the wall clock), and nothing past the datagrams received; a socket not
    /// asked tells nothing.
    #[test]
    fn a_stamping_socket_tells_when_each_datagram_arrived() {
        let (a, stamping) = sender_and_receiver();
        let (_, plain) = sender_and_receiver();
        enable_timestamps(stamping.as_raw_fd()).unwrap();
        let mut rx = Receiver::new(16);
        let before = since_epoch();
        a.send_to(b"x", stamping.local_addr().unwrap()).unwrap();
        // Loopback delivers within the send: the datagram is queued already.
        assert_eq!(rx.recv(stamping.as_raw_fd(), BATCH).unwrap(), 1);
        let after = since_epoch();
        let arrived = rx.arrived(0).expect("the datagram is stamped");
        assert!(
            before <= arrived && arrived <= after,
            "{arrived:?} is not within {before:?}..={after:?}"
        );
        assert_eq!(rx.arrived(1), None);
        a.send_to(b"y", plain.local_addr().unwrap()).unwrap();
        assert_eq!(rx.recv(plain.as_raw_fd(), BATCH).unwrap(), 1);
        assert_eq!(rx.arrived(0), None);
    }

    /// The bytes of a plain-old-data value.
    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: any initialised `Copy` value may be read as its bytes.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), mem::size_of::<T>()) }
            .to_vec()
    }

    /// A received message's header whose control messages are `messages` (level, type,
    /// payload), in order, laid out in `control` as the kernel lays them out.
    fn received_with(control: &mut Vec<u64>, messages: &[(i32, i32, Vec<u8>)]) -> libc::msghdr {
        // SAFETY: CMSG_SPACE is arithmetic.
        let space = |len: usize| unsafe { libc::CMSG_SPACE(len as u32) } as usize;
        let total: usize = messages
            .iter()
            .map(|(_, _, payload)| space(payload.len()))
            .sum();
        control.clear();
        control.resize(total.div_ceil(8), 0);
        let mut at = 0;
        for (level, kind, payload) in messages {
            // SAFETY: each message lies within `control` (sized for them all above), at an
            // 8-byte boundary of an array of u64, aligned for cmsghdr.
            unsafe {
                let cmsg = control
                    .as_mut_ptr()
                    .cast::<u8>()
                    .add(at)
                    .cast::<libc::cmsghdr>();
                (*cmsg).cmsg_level = *level;
                (*cmsg).cmsg_type = *kind;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload.len() as u32) as _;
                std::ptr::copy_nonoverlapping(
                    payload.as_ptr(),
                    libc::CMSG_DATA(cmsg),
                    payload.len(),
                );
            }
            at += space(payload.len());
        }
        // SAFETY: msghdr is plain old data.
        let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = total as _;
        hdr
    }

    /// Control messages a received datagram may carry besides those read, each a trap for a
    /// check of level, type or length that lets another through: the original destination
    /// at IPv4's level (16 bytes, more than an IPv4 packet information) and at IPv6's (28
    /// bytes, more than an IPv6 one), three stamps at the socket's level (48 bytes, more
    /// than one stamp), and a GRO segment size at UDP's.
    fn others() -> [(i32, i32, Vec<u8>); 4] {
        [
            (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR, vec![0x22; 16]),
            (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR, vec![0x33; 28]),
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPING, vec![0x44; 48]),
            (libc::SOL_UDP, libc::UDP_GRO, vec![0x55, 0x05, 0, 0]),
        ]
    }

    /// An IPv4 packet information for `spec_dst` (the address read) on interface `ifindex`.
    fn ip_pktinfo(spec_dst: [u8; 4], ifindex: i32) -> (i32, i32, Vec<u8>) {
        let info = libc::in_pktinfo {
            ipi_ifindex: ifindex,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from_ne_bytes(spec_dst),
            },
            ipi_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 9]),
            },
        };
        (libc::IPPROTO_IP, libc::IP_PKTINFO, bytes_of(&info))
    }

    /// An IPv6 packet information for `ip` on interface `ifindex`.
    fn ipv6_pktinfo(ip: Ipv6Addr, ifindex: u32) -> (i32, i32, Vec<u8>) {
        let info = libc::in6_pktinfo {
            ipi6_addr: libc::in6_addr {
                s6_addr: ip.octets(),
            },
            ipi6_ifindex: ifindex,
        };
        (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, bytes_of(&info))
    }

    /// A stamp of `secs` seconds and `nanos` nanoseconds since the Unix epoch.
    fn stamp(secs: i64, nanos: i64) -> (i32, i32, Vec<u8>) {
        let stamp = libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        };
        (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, bytes_of(&stamp))
    }

    #[test]
    fn the_arrival_time_is_read_from_its_own_message_among_others() {
        let mut messages = vec![ipv6_pktinfo(Ipv6Addr::LOCALHOST, 1)];
        messages.extend(others());
        messages.push(stamp(1_700_000_000, 5));
        let mut control = Vec::new();
        let hdr = received_with(&mut control, &messages);
        assert_eq!(timestamp(&hdr), Some(Duration::new(1_700_000_000, 5)));
        // Without it: none, whatever else there is.
        messages.pop();
        let hdr = received_with(&mut control, &messages);
        assert_eq!(timestamp(&hdr), None);
    }

    #[test]
    fn the_arrival_address_is_read_from_its_own_message_among_others() {
        let v6: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let (ip, ipv6) = (ip_pktinfo([127, 0, 0, 2], 3), ipv6_pktinfo(v6, 4));
        let from_ip = Some(LocalAddr {
            ip: IpAddr::from([127, 0, 0, 2]),
            ifindex: 3,
        });
        let from_ipv6 = Some(LocalAddr {
            ip: IpAddr::V6(v6),
            ifindex: 4,
        });
        let [origdst4, origdst6, timestamping, gro] = others();
        let mut control = Vec::new();
        let mut destination_of =
            |messages: &[(i32, i32, Vec<u8>)]| destination(&received_with(&mut control, messages));
        // After others (a stamp among them, longer than IPv4's), and before IPv6's.
        let ip_first = [
            stamp(1, 2),
            origdst4.clone(),
            timestamping.clone(),
            ip.clone(),
            ipv6.clone(),
        ];
        assert_eq!(destination_of(&ip_first), from_ip);
        // IPv4's is preferred after IPv6's too.
        assert_eq!(
            destination_of(&[ipv6.clone(), ip, origdst6.clone()]),
            from_ip
        );
        // IPv6's alone, with others after it (read to the end, as IPv4's may follow).
        let ipv6_first = [ipv6, origdst6.clone(), timestamping.clone(), gro.clone()];
        assert_eq!(destination_of(&ipv6_first), from_ipv6);
        let neither = [origdst4, origdst6, timestamping, gro, stamp(1, 2)];
        assert_eq!(destination_of(&neither), None);
    }

    /// A control message goes only where it fits whole, at an 8-byte boundary.
    #[test]
    fn a_control_message_is_written_only_where_it_fits_aligned() {
        let info = libc::in6_pktinfo {
            ipi6_addr: libc::in6_addr { s6_addr: [0; 16] },
            ipi6_ifindex: 0,
        };
        let mut control = [0u64; SEND_CONTROL_WORDS];
        let (udp, ipv6) = (libc::SOL_UDP, libc::IPPROTO_IPV6);
        let segment = put_control(&mut control, 0, udp, libc::UDP_SEGMENT, 100u16);
        assert_eq!(segment, Some(24));
        // A segment size then a source: the largest pair, which fills the space exactly.
        let pktinfo = libc::IPV6_PKTINFO;
        assert_eq!(put_control(&mut control, 24, ipv6, pktinfo, info), Some(64));
        // 40 bytes from byte 32 would pass the end; nothing is written there.
        let before = control;
        assert_eq!(put_control(&mut control, 32, ipv6, pktinfo, info), None);
        assert_eq!(
            put_control(&mut control, 4, udp, libc::UDP_SEGMENT, 7u16),
            None
        );
        assert_eq!(control, before);
    }

    /// `can_segment` says yes on a UDP socket exactly when the kernel splits a segmented
    /// send, and no on a socket of another kind.
    #[test]
    fn can_segment_says_whether_the_kernel_splits_a_segmented_send() {
        let (a, b) = sender_and_receiver();
        let parts = [IoSlice::new(b"aaabbb")];
        let datagrams = [Outgoing {
            to: b.local_addr().unwrap(),
            from: None,
            runs: 0..1,
            segment: 3,
            in_order: false,
        }];
        let sent = send(
            a.as_raw_fd(),
            &parts,
            &datagrams,
            &mut SendScratch::default(),
        );
        // An older kernel refuses the option, or ignores it and sends the bytes whole.
        let split = sent.sent == 1 && receive(&b, 1)[0].1 == b"aaa";
        assert_eq!(can_segment(a.as_raw_fd()), split);
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!can_segment(tcp.as_raw_fd()));
    }

    /// An in-order datagram the kernel has no memory for (`ENOBUFS`, from a stand-in for the
    /// kernel) holds back what follows it to its destination, in this call's later batches
    /// too, last words or not, while the rest leaves; a datagram refused so that is not in
    /// order holds back nothing.
    #[test]
    fn what_follows_an_in_order_datagram_refused_for_memory_to_its_address_is_held_back() {
        let (a, x) = sender_and_receiver();
        let y = UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = crate::sockopt::set_int(y.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
        let parts = [
            IoSlice::new(b"close"),
            IoSlice::new(b"chat"),
            IoSlice::new(b"later"),
        ];
        let (close, chat, later) = (0..1, 1..2, 2..3);
        let outgoing = |to, runs, in_order| Outgoing {
            to,
            from: None,
            runs,
            segment: 0,
            in_order,
        };
        let mut datagrams = vec![
            outgoing(to_x, close.clone(), true), // 0: refused
            outgoing(to_y, chat.clone(), false), // 1: sent
            outgoing(to_x, chat.clone(), false), // 2: held back
            outgoing(to_x, close.clone(), true), // 3: held back, not tried
            outgoing(to_y, close, false),        // 4: refused, holds back nothing
        ];
        // 5 to 264 to y, across the first batch's end; 265 to x, in the second.
        datagrams.extend((0..260).map(|_| outgoing(to_y, chat.clone(), false)));
        datagrams.push(outgoing(to_x, later, false));
        let mut scratch = SendScratch {
            refusing: Some(|bytes| (bytes == b"close").then_some(libc::ENOBUFS)),
            ..SendScratch::default()
        };
        let sent = send(a.as_raw_fd(), &parts, &datagrams, &mut scratch);
        assert_eq!(
            sent,
            Sent {
                sent: 261,
                failed: 2,
                held_back: 3,
                ..Sent::default()
            }
        );
        assert_eq!(scratch.failed(), &[0, 4]);
        assert_eq!(scratch.short_of_memory(), &[0, 4]);
        assert_eq!(scratch.held_back(), &[2, 3, 265]);
        let fates: Vec<Fate> = [0, 1, 2, 3, 4, 5, 264, 265]
            .iter()
            .map(|&i| scratch.fate(i, &sent))
            .collect();
        use Fate::{NoRoom, Sent as Gone};
        assert_eq!(
            fates,
            [NoRoom, Gone, NoRoom, NoRoom, NoRoom, Gone, Gone, NoRoom]
        );
        // Loopback delivers within the send: all that left is queued by now.
        assert_eq!(receive(&y, 261).len(), 261);
        x.set_nonblocking(true).unwrap();
        let err = x.recv_from(&mut [0u8; 16]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "nothing reached x");
        // The next call starts afresh: x is no longer held back.
        scratch.refusing = None;
        let sent = send(a.as_raw_fd(), &parts, &datagrams[2..3], &mut scratch);
        assert_eq!((sent.sent, sent.held_back), (1, 0));
        assert!(scratch.held_back().is_empty());
        x.set_nonblocking(false).unwrap();
        assert_eq!(receive(&x, 1)[0].1, b"chat");
    }

    /// What [`send`] is to do with `datagrams` (each `(code, destination, in order, runs
    /// valid)`, `code` as in [`by_first_byte`]), worked out one datagram at a time: its
    /// result, [`SendScratch::failed`], [`SendScratch::short_of_memory`],
    /// [`SendScratch::held_back`] and each datagram's [`Fate`].
    type Expected = (Sent, Vec<usize>, Vec<usize>, Vec<usize>, Vec<Fate>);
    fn expected(datagrams: &[(u8, usize, bool, bool)]) -> Expected {
        let mut sent = Sent::default();
        let (mut failed, mut no_memory, mut held_back) = (Vec::new(), Vec::new(), Vec::new());
        let mut fates = vec![Fate::NoRoom; datagrams.len()];
        let mut blocked = HashSet::new();
        for (i, &(code, to, in_order, valid)) in datagrams.iter().enumerate() {
            if !valid {
                failed.push(i);
                fates[i] = Fate::Refused;
            } else if blocked.contains(&to) {
                held_back.push(i);
            } else {
                match code {
                    0 => {
                        sent.sent += 1;
                        fates[i] = Fate::Sent;
                    }
                    1 => {
                        failed.push(i);
                        no_memory.push(i);
                        if in_order {
                            blocked.insert(to);
                        }
                    }
                    2 => {
                        failed.push(i);
                        fates[i] = Fate::Refused;
                    }
                    _ => {
                        // All from here on found no room; nothing after it failed on its own.
                        sent.would_block = datagrams.len() - i;
                        fates[i..].fill(Fate::NoRoom);
                        break;
                    }
                }
            }
        }
        sent.failed = failed.len();
        sent.held_back = held_back.len();
        (sent, failed, no_memory, held_back, fates)
    }

    proptest::proptest! {
        /// Whatever the kernel does with each datagram of a call of several batches (the
        /// stand-in decides by its bytes), [`send`]'s counts, its lists of what failed, was
        /// short of memory or was held back, and each datagram's [`Fate`] agree with working
        /// it out one datagram at a time: what follows an in-order datagram refused for want
        /// of memory to its destination is held back, and a full buffer ends the call.
        #[test]
        fn a_send_agrees_with_its_datagrams_taken_one_at_a_time(
            datagrams in proptest::collection::vec(
                (0u8..4, 0usize..3, proptest::bool::ANY, proptest::bool::weighted(0.95)),
                0..2 * BATCH + 50,
            )
        ) {
            let a = UdpSocket::bind("127.0.0.1:0").unwrap();
            let peers: Vec<UdpSocket> =
                (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
            let payloads: Vec<[u8; 1]> = datagrams.iter().map(|&(code, ..)| [code]).collect();
            let parts: Vec<IoSlice> = payloads.iter().map(|p| IoSlice::new(p)).collect();
            let outgoing: Vec<Outgoing> = datagrams
                .iter()
                .enumerate()
                .map(|(i, &(_, to, in_order, valid))| Outgoing {
                    to: peers[to].local_addr().unwrap(),
                    from: None,
                    // Past the parts: fails before the kernel sees it.
                    runs: if valid { i..i + 1 } else { parts.len()..parts.len() + 1 },
                    segment: 0,
                    in_order,
                })
                .collect();
            let mut scratch = SendScratch {
                refusing: Some(by_first_byte),
                ..SendScratch::default()
            };
            let sent = send(a.as_raw_fd(), &parts, &outgoing, &mut scratch);
            let (want, failed, no_memory, held_back, fates) = expected(&datagrams);
            proptest::prop_assert_eq!(sent, want);
            proptest::prop_assert_eq!(scratch.failed(), &failed[..]);
            proptest::prop_assert_eq!(scratch.short_of_memory(), &no_memory[..]);
            proptest::prop_assert_eq!(scratch.held_back(), &held_back[..]);
            let got: Vec<Fate> = (0..datagrams.len()).map(|i| scratch.fate(i, &sent)).collect();
            proptest::prop_assert_eq!(got, fates);
        }
    }

    /// A full send buffer drops the datagram it refused and all after it, in this call's
    /// later batches too, and those after it that had failed on their own count as dropped
    /// for lack of room, not twice. (A UDP socket's buffer does not fill on loopback, where
    /// each datagram is handed over within its send: a TCP connection whose peer reads
    /// nothing stands in, as `sendmmsg` reports its full buffer the same way and it ignores
    /// the destinations.)
    #[test]
    fn a_full_send_buffer_drops_the_rest_and_counts_each_datagram_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        // Accepted connections take the listener's small receive buffer: a small window.
        crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4096).unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_reads_nothing, _) = listener.accept().unwrap();
        let fd = stream.as_raw_fd();
        crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 4096).unwrap();
        let payload = [0x61u8; 1000];
        let parts = [IoSlice::new(&payload)];
        // 0 and 1 fail on their own, before the buffer fills; so does 255, the last of the
        // first system-call batch, after it; 256 on are in the second.
        let datagrams: Vec<Outgoing> = (0..300)
            .map(|i| Outgoing {
                to: "127.0.0.1:9".parse().unwrap(),
                from: None,
                runs: if [0, 1, 255].contains(&i) { 1..2 } else { 0..1 },
                segment: 0,
                in_order: false,
            })
            .collect();
        let mut scratch = SendScratch::default();
        let sent = send(fd, &parts, &datagrams, &mut scratch);
        assert!(
            sent.sent > 0 && sent.sent < 253,
            "{} sent: the buffer did not fill within the first batch",
            sent.sent
        );
        assert_eq!(sent.failed, 2);
        assert_eq!(scratch.failed(), &[0, 1]);
        assert_eq!(sent.would_block, 300 - 2 - sent.sent);
        assert_eq!(sent.refused_segmented, None);
        assert!(scratch.refused_sources().is_empty());
        // What became of each: 255, set aside as failed, found no room like those around it.
        assert_eq!(scratch.fate(0, &sent), Fate::Refused);
        assert_eq!(scratch.fate(2, &sent), Fate::Sent);
        assert_eq!(scratch.fate(255, &sent), Fate::NoRoom);
        assert_eq!(scratch.fate(299, &sent), Fate::NoRoom);
        assert!(scratch.short_of_memory().is_empty());
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

    std::thread_local! {
        /// How many times, on this thread, [`full_after_first_try`] has been asked about a
        /// datagram of `b"full"`.
        static TRIES_OF_FULL: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        /// How many more sends, on this thread, [`interrupted`] says a signal interrupted.
        static INTERRUPTIONS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// A [`StandIn`] that finds the send buffer full (`EAGAIN`) for a datagram of
    /// `b"full"`, but for the first time it is asked about one (on this thread), when it
    /// hands it to the kernel; it hands every other datagram to the kernel.
    fn full_after_first_try(bytes: &[u8]) -> Option<i32> {
        if bytes != b"full" {
            return None;
        }
        let tries = TRIES_OF_FULL.with(|tries| tries.replace(tries.get() + 1));
        (tries > 0).then_some(libc::EAGAIN)
    }

    /// A [`StandIn`] for which a signal interrupts the send (`EINTR`) while
    /// [`INTERRUPTIONS`] lasts; then it hands every datagram to the kernel.
    fn interrupted(_: &[u8]) -> Option<i32> {
        let left = INTERRUPTIONS.with(|left| left.replace(left.get().saturating_sub(1)));
        (left > 0).then_some(libc::EINTR)
    }

    /// A source the kernel refused for a datagram that then left without it stays named when
    /// the buffer fills behind it; a datagram whose source was refused and that then found
    /// the buffer full, sent without it, is not named: its source is not proven gone.
    #[test]
    fn a_full_buffer_forgets_only_the_sources_refused_from_where_it_filled() {
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = client.local_addr().unwrap();
        let gone = Some(LocalAddr {
            ip: IpAddr::from([192, 0, 2, 77]),
            ifindex: 0,
        });
        let parts = [IoSlice::new(b"a"), IoSlice::new(b"full")];
        let outgoing = |from, runs| Outgoing {
            to,
            from,
            runs,
            segment: 0,
            in_order: false,
        };
        let mut scratch = SendScratch {
            refusing: Some(full_after_first_try),
            ..SendScratch::default()
        };
        // "a" is refused from its source and leaves without it; "full" (no source) finds
        // the buffer full.
        TRIES_OF_FULL.with(|tries| tries.set(1));
        let datagrams = [outgoing(gone, 0..1), outgoing(None, 1..2)];
        let sent = send(server.as_raw_fd(), &parts, &datagrams, &mut scratch);
        let dropped = Sent {
            sent: 1,
            would_block: 1,
            ..Sent::default()
        };
        assert_eq!(sent, dropped);
        assert_eq!(scratch.refused_sources(), &[0]);
        assert_eq!(scratch.fate(1, &sent), Fate::NoRoom);
        // "full" is refused from its source, then finds the buffer full without it.
        TRIES_OF_FULL.with(|tries| tries.set(0));
        let datagrams = [outgoing(gone, 1..2)];
        let sent = send(server.as_raw_fd(), &parts, &datagrams, &mut scratch);
        let dropped = Sent {
            would_block: 1,
            ..Sent::default()
        };
        assert_eq!(sent, dropped);
        assert_eq!(TRIES_OF_FULL.with(std::cell::Cell::get), 2, "tried twice");
        assert!(scratch.refused_sources().is_empty());
        assert_eq!(receive(&client, 1)[0].1, b"a");
    }

    /// A send a signal interrupted before the kernel took anything (`EINTR`) is made again:
    /// each datagram leaves once, and none counts as failed or dropped.
    #[test]
    fn a_send_a_signal_interrupted_is_made_again() {
        let (a, b) = sender_and_receiver();
        let to = b.local_addr().unwrap();
        let mut scratch = SendScratch {
            refusing: Some(interrupted),
            ..SendScratch::default()
        };
        INTERRUPTIONS.with(|left| left.set(2));
        let datagrams: [(SocketAddr, &[u8]); 2] = [(to, b"x"), (to, b"y")];
        let sent = send_each(a.as_raw_fd(), &datagrams, &mut scratch);
        assert_eq!(
            sent,
            Sent {
                sent: 2,
                ..Sent::default()
            }
        );
        assert!(scratch.failed().is_empty());
        assert_eq!(INTERRUPTIONS.with(std::cell::Cell::get), 0);
        let got: Vec<Vec<u8>> = receive(&b, 2).into_iter().map(|(_, bytes)| bytes).collect();
        assert_eq!(got, [b"x", b"y"]);
        b.set_nonblocking(true).unwrap();
        assert!(b.recv(&mut [0; 8]).is_err(), "each left once");
    }

    /// A stamp or an arrival address whose message is too short for it (its length says
    /// fewer bytes than the value has) is not read, and the search goes on past it: what
    /// follows its bytes is not taken for their end.
    #[test]
    fn a_message_too_short_for_its_value_is_passed_over() {
        let cut = |(level, kind, mut payload): (i32, i32, Vec<u8>)| {
            payload.pop();
            (level, kind, payload)
        };
        let v6: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut control = Vec::new();
        let hdr = received_with(&mut control, &[cut(stamp(7, 8)), stamp(3, 4)]);
        assert_eq!(timestamp(&hdr), Some(Duration::new(3, 4)));
        let hdr = received_with(&mut control, &[cut(stamp(7, 8))]);
        assert_eq!(timestamp(&hdr), None);
        let short_ip = cut(ip_pktinfo([127, 0, 0, 2], 3));
        let hdr = received_with(&mut control, &[short_ip.clone(), ipv6_pktinfo(v6, 4)]);
        let from_ipv6 = LocalAddr {
            ip: IpAddr::V6(v6),
            ifindex: 4,
        };
        assert_eq!(destination(&hdr), Some(from_ipv6));
        let hdr = received_with(&mut control, &[cut(ipv6_pktinfo(v6, 4)), short_ip]);
        assert_eq!(destination(&hdr), None);
    }

    /// Each datagram of a batch is read with its own source and its own length.
    #[test]
    fn each_datagram_of_a_batch_keeps_its_own_source_and_length() {
        let (a, b) = sender_and_receiver();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        a.send_to(b"one", to).unwrap();
        c.send_to(b"three", to).unwrap();
        a.send_to(b"xy", to).unwrap();
        let mut rx = Receiver::new(16);
        // Loopback delivers within the send: all three are queued already.
        assert_eq!(rx.recv(b.as_raw_fd(), BATCH).unwrap(), 3);
        let got: Vec<(SocketAddr, &[u8])> = (0..3).map(|i| rx.datagram(i).unwrap()).collect();
        let (from_a, from_c) = (a.local_addr().unwrap(), c.local_addr().unwrap());
        let expected: [(SocketAddr, &[u8]); 3] =
            [(from_a, b"one"), (from_c, b"three"), (from_a, b"xy")];
        assert_eq!(got, expected);
    }

    /// An IPv6 address keeps its flow information and its scope (the link of a link-local
    /// peer, which a reply needs) through `sockaddr_storage`, both ways.
    #[test]
    fn an_ipv6_address_keeps_its_scope_and_flow_through_sockaddr_storage() {
        let addr = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 9091, 5, 7));
        assert_eq!(from_storage(&to_storage(&addr).0), Some(addr));
    }

    /// A source that is not link-local leaves with no interface named, whatever interface
    /// it was seen on (here one that does not exist): the route picks the interface.
    #[test]
    fn a_source_not_link_local_names_no_interface() {
        let (Ok(server), Ok(client)) = (UdpSocket::bind("[::]:0"), UdpSocket::bind("[::1]:0"))
        else {
            crate::test_shared::skipped("this host has no IPv6 loopback");
            return;
        };
        let port = server.local_addr().unwrap().port();
        let from = Some(LocalAddr {
            ip: Ipv6Addr::LOCALHOST.into(),
            ifindex: u32::MAX - 1,
        });
        let datagrams = [Outgoing {
            to: client.local_addr().unwrap(),
            from,
            runs: 0..1,
            segment: 0,
            in_order: false,
        }];
        let mut scratch = SendScratch::default();
        let sent = send(
            server.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &datagrams,
            &mut scratch,
        );
        assert_eq!((sent.sent, sent.failed), (1, 0));
        assert!(scratch.refused_sources().is_empty());
        let from_loopback = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        assert_eq!(receive(&client, 1), [(from_loopback, b"x".to_vec())]);
    }
}
