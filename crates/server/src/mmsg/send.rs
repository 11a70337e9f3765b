//! Sending a batch of datagrams (`sendmmsg`): gathered from byte runs, segmented by the
//! kernel where it can (`UDP_SEGMENT`), from a chosen source address, never blocking, with
//! what each datagram came to.

use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::RawFd;

use super::{to_storage, BATCH};
use crate::local::LocalAddr;

/// Control-message space per sent datagram, in `u64` words: one `UDP_SEGMENT` (a 16-byte
/// header and a `u16`, padded to 24) and one `IPV6_PKTINFO` (40) or `IP_PKTINFO` (32).
pub(super) const SEND_CONTROL_WORDS: usize = 8;

/// Writes one control message of `level` and `kind` carrying `value` into `control` at byte
/// `at` (a multiple of 8); returns the byte just past it, or `None` when it does not fit.
pub(super) fn put_control<T: Copy>(
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

/// One header's control messages: its segment size first, then its source address.
struct Control {
    words: [u64; SEND_CONTROL_WORDS],
    /// The byte where the source begins: the segment size's message's length (0: not
    /// segmented).
    source_at: usize,
    /// The byte where the messages end (`source_at`: no source).
    end: usize,
}

/// Scratch space for [`send`], kept between calls to avoid allocating per batch.
#[derive(Default)]
pub struct SendScratch {
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    /// Each header's control messages.
    controls: Vec<Control>,
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
                    self.controls.push(Control {
                        words: control,
                        source_at,
                        end,
                    });
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
        for (((storage, len), control), &index) in headers.zip(&self.indices) {
            let iov = runs_of(parts, &datagrams[index].runs).unwrap_or_default();
            // SAFETY: mmsghdr is plain old data.
            let mut msg: libc::mmsghdr = unsafe { mem::zeroed() };
            msg.msg_hdr.msg_name = (storage as *mut libc::sockaddr_storage).cast();
            msg.msg_hdr.msg_namelen = *len;
            // `IoSlice` is ABI-compatible with `iovec` on Unix (std documents it); `sendmmsg`
            // only reads the array.
            msg.msg_hdr.msg_iov = iov.as_ptr().cast::<libc::iovec>().cast_mut();
            msg.msg_hdr.msg_iovlen = iov.len() as _; // size_t on glibc, c_int on musl
            if control.end > 0 {
                msg.msg_hdr.msg_control = control.words.as_mut_ptr().cast();
                msg.msg_hdr.msg_controllen = control.end as _;
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
            io::ErrorKind::WouldBlock => self.drop_rest_for_full_buffer(done, datagrams, result),
            _ if self.source_refused(done, err) => self.retry_without_source(done),
            _ if self.segments_refused(done, err) => {
                self.stop_at_refused_segments(done, err, result)
            }
            _ => self.step_over_failed(done, err, datagrams, result),
        }
    }

    /// Whether the header at `done` was refused for the source address it names: EINVAL for
    /// IPv6, ENETUNREACH for IPv4 when the address is no longer the host's; ENODEV when a
    /// link-local source's interface is gone, or was saved before a reboot renumbered the
    /// interfaces. An unsegmented datagram's EINVAL with control messages is taken as the
    /// source's too; a segmented one's may be the segments' fault instead, which
    /// [`SendScratch::segments_refused`] takes, and the datagrams sent again one apiece tell
    /// which.
    fn source_refused(&self, done: usize, err: &io::Error) -> bool {
        let source_at = self.controls[done].source_at;
        let names_source = control_len(&self.msgs[done].msg_hdr) > source_at;
        let errno = err.raw_os_error();
        let unroutable = matches!(
            errno,
            Some(libc::ENETUNREACH | libc::EADDRNOTAVAIL | libc::ENODEV)
        );
        let invalid_unsegmented = source_at == 0
            && errno == Some(libc::EINVAL)
            && !self.msgs[done].msg_hdr.msg_control.is_null();
        (names_source && unroutable) || invalid_unsegmented
    }

    /// Whether the header at `done` is a segmented datagram refused as such: a path MTU
    /// below its segments, an IPsec policy, a firewall. A lack of memory is no refusal.
    fn segments_refused(&self, done: usize, err: &io::Error) -> bool {
        self.controls[done].source_at > 0
            && matches!(
                err.raw_os_error(),
                Some(libc::EINVAL | libc::EMSGSIZE | libc::EIO | libc::EPERM | libc::EOPNOTSUPP)
            )
    }

    /// `WouldBlock`: every datagram from the one at `done` on is dropped, including any of
    /// the chunk already set aside as failed, all counted as not sent for lack of room.
    fn drop_rest_for_full_buffer(
        &mut self,
        done: usize,
        datagrams: &[Outgoing],
        result: &mut Sent,
    ) -> AfterRefusal {
        let from = self.indices[done];
        let set_aside = self.failed.iter().filter(|&&i| i > from).count();
        self.failed.retain(|&i| i < from);
        self.no_memory.retain(|&i| i < from);
        // A datagram sent again without its source that found the buffer full says nothing
        // about the source.
        self.refused_sources.retain(|&i| i < from);
        result.failed -= set_aside;
        result.would_block += datagrams.len() - from;
        AfterRefusal::Stop
    }

    /// The source refused ([`SendScratch::source_refused`]): the header at `done` goes once
    /// more without it (keeping a segment size), and its datagram is named as refusing its
    /// source if that goes through.
    fn retry_without_source(&mut self, done: usize) -> AfterRefusal {
        let source_at = self.controls[done].source_at;
        let hdr = &mut self.msgs[done].msg_hdr;
        hdr.msg_controllen = source_at as _;
        if source_at == 0 {
            hdr.msg_control = std::ptr::null_mut();
        }
        self.refused_sources.push(self.indices[done]);
        AfterRefusal::Again
    }

    /// The segments refused ([`SendScratch::segments_refused`]): stop here, so that the
    /// caller sends the rest again one datagram per message, in order. A source refused on
    /// the way is not proven at fault. (The socket has no IP_RECVERR, so a send the kernel
    /// took is never reported failed afterwards: the retry cannot send a datagram twice.)
    fn stop_at_refused_segments(
        &mut self,
        done: usize,
        err: &io::Error,
        result: &mut Sent,
    ) -> AfterRefusal {
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

    /// The datagram at `done` failed on its own (unreachable, no buffer memory): it is
    /// counted and stepped over. One the kernel had no memory for is worth sending again, and
    /// an in-order one blocks its destination for the rest of the call.
    fn step_over_failed(
        &mut self,
        done: usize,
        err: &io::Error,
        datagrams: &[Outgoing],
        result: &mut Sent,
    ) -> AfterRefusal {
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
