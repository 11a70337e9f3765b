use super::receive::{destination, timestamp};
use super::send::{put_control, SEND_CONTROL_WORDS};
use super::*;
use crate::local::LocalAddr;
use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

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
    let (Ok(server), Ok(client)) = (UdpSocket::bind("[::]:0"), UdpSocket::bind("[::1]:0")) else {
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
            std::ptr::copy_nonoverlapping(payload.as_ptr(), libc::CMSG_DATA(cmsg), payload.len());
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
    let mut scratch = SendScratch::default();
    scratch.refusing = Some(|bytes| (bytes == b"close").then_some(libc::ENOBUFS));
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
        let mut scratch = SendScratch::default();
        scratch.refusing = Some(by_first_byte);
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
    let mut scratch = SendScratch::default();
    scratch.refusing = Some(full_after_first_try);
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
    let mut scratch = SendScratch::default();
    scratch.refusing = Some(interrupted);
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
    let (Ok(server), Ok(client)) = (UdpSocket::bind("[::]:0"), UdpSocket::bind("[::1]:0")) else {
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
