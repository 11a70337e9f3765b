//! The sender's plans and sends, against real loopback sockets where the kernel decides.

use std::net::IpAddr;
use std::ops::Range;
use std::time::Duration;

use ucrp::delivery::Delivery;

use super::plan::{MAX_BATCH_RUNS, POOLED_BATCH_BYTES, RUN_SIZE};
use super::unsegmented::MAX_UNSEGMENTED;
use super::*;
use crate::sockopt;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn chat(out: &mut Outbox, text: &str) -> Range<usize> {
    out.payload(|b| delivery::encode_chat("s", text.as_bytes(), b).unwrap())
}

/// Puts a `__ROOM_CLOSED__` datagram's bytes in `out`; returns where they are.
fn room_closed(out: &mut Outbox) -> Range<usize> {
    out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED))
}

/// Queues `copies` copies of `msg` for `member` at `to`, from `from`, with batch limit
/// `limit`.
fn queue_copies_to_member(
    out: &mut Outbox,
    copies: usize,
    to: SocketAddr,
    from: LocalId,
    msg: &Range<usize>,
    member: u32,
    limit: u16,
) {
    for _ in 0..copies {
        out.queue_to_member(to, from, msg.clone(), member, limit);
    }
}

/// The daemon's socket, on loopback at a port the kernel picks.
fn loopback_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Sends all that `out` holds with `sender` on `socket` now, from sources in `locals`;
/// returns what the pass counted.
fn send_now(
    sender: &mut Sender,
    socket: &UdpSocket,
    out: &mut Outbox,
    locals: &mut Locals,
) -> Metrics {
    let mut metrics = Metrics::default();
    sender.send_all(socket, out, locals, &mut metrics, Instant::now());
    metrics
}

/// The bytes of a datagram gathered from `runs` of `parts`, as the kernel sends them.
fn datagram_bytes(parts: &[IoSlice], runs: &Range<usize>) -> Vec<u8> {
    parts[runs.clone()]
        .iter()
        .flat_map(|run| run.iter().copied())
        .collect()
}

/// A planned datagram to port 1, from no source in particular, carrying `messages` in
/// `bytes`.
fn planned_to_port_1(bytes: Bytes, messages: usize, last_word: bool) -> Planned {
    Planned {
        to: addr(1),
        from: LocalId::ANY,
        bytes,
        messages,
        last_word,
        sealed: false,
    }
}

/// Plans `out`: each planned datagram's destination, the bytes the kernel would send,
/// messages carried.
fn planned(sender: &mut Sender, out: &Outbox) -> Vec<(SocketAddr, Vec<u8>, usize)> {
    let run = sender.dry_run(out);
    run.datagrams
        .into_iter()
        .map(|d| (d.to, d.bytes, d.messages))
        .collect()
}

#[test]
fn batchable_recipients_get_batches_in_order_and_others_single_datagrams() {
    let mut out = Outbox::default();
    let one = chat(&mut out, "one");
    let two = chat(&mut out, "two");
    let closed = room_closed(&mut out);
    out.queue_to_member(addr(1), LocalId::ANY, one.clone(), 1, 4096);
    out.queue_to_member(addr(2), LocalId::ANY, one.clone(), 2, 0);
    out.queue_to_member(addr(1), LocalId::ANY, two.clone(), 1, 4096);
    out.queue_to_member(addr(2), LocalId::ANY, two, 2, 0);
    out.queue_to_member(addr(3), LocalId::ANY, one, 3, 4096); // alone: leaves as a plain frame
    out.queue_to_member(addr(1), LocalId::ANY, closed, 1, 0);
    let mut sender = Sender::new(65507);
    let shown: Vec<(u16, String, usize)> = planned(&mut sender, &out)
        .iter()
        .map(|(to, b, n)| {
            let text = match delivery::parse(b).unwrap() {
                Delivery::Batch(body) => {
                    delivery::batch_entries(body).count().to_string() + " in batch"
                }
                Delivery::Chat { message, .. } => message.to_owned(),
                Delivery::RoomClosed => "closed".into(),
                other => format!("{other:?}"),
            };
            (to.port(), text, *n)
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            (1, "2 in batch".into(), 2),
            (2, "one".into(), 1),
            (2, "two".into(), 1),
            (3, "one".into(), 1),
            (1, "closed".into(), 1),
        ]
    );
}

#[test]
fn a_member_that_moves_within_a_pass_gets_the_rest_at_its_new_address() {
    let mut out = Outbox::default();
    let one = chat(&mut out, "one");
    let two = chat(&mut out, "two");
    let three = chat(&mut out, "three");
    out.queue_to_member(addr(1), LocalId::ANY, one.clone(), 1, 4096);
    out.queue_to_member(addr(1), LocalId::ANY, two.clone(), 1, 4096);
    // The member re-registered from port 9 between these messages.
    out.queue_to_member(addr(9), LocalId::ANY, three.clone(), 1, 4096);
    out.queue_to_member(addr(9), LocalId::ANY, one, 1, 4096);
    let mut sender = Sender::new(65507);
    sender.plan(&out);
    let shown: Vec<(u16, usize)> = sender
        .plan
        .iter()
        .map(|planned| (planned.to.port(), planned.messages))
        .collect();
    assert_eq!(shown, vec![(1, 2), (9, 2)]);
}

/// The texts of what `sender` planned last (`planned`, its datagrams), with their
/// destinations' ports: a batch's entries each in turn, a segmented send's datagrams each
/// in turn.
fn texts_planned(sender: &Sender, planned: &[(SocketAddr, Vec<u8>, usize)]) -> Vec<(u16, String)> {
    let text = |frame: &[u8]| match delivery::parse(frame).unwrap() {
        Delivery::Chat { message, .. } => message.to_owned(),
        Delivery::RoomClosed => "closed".into(),
        other => format!("{other:?}"),
    };
    let mut texts = Vec::new();
    for ((to, bytes, _), datagram) in planned.iter().zip(&sender.datagrams) {
        if datagram.segment > 0 {
            let segments = bytes.chunks(usize::from(datagram.segment));
            texts.extend(segments.map(|segment| (to.port(), text(segment))));
            continue;
        }
        match delivery::parse(bytes).unwrap() {
            Delivery::Batch(body) => texts.extend(
                delivery::batch_entries(body).map(|entry| (to.port(), text(entry.unwrap()))),
            ),
            _ => texts.push((to.port(), text(bytes))),
        }
    }
    texts
}

/// One socket in two rooms is two members at one address. What the room it stays in sends
/// it after the other room's `__ROOM_CLOSED__` (or after the answer to a datagram for a room
/// gone) leaves after it, batched or segmented as it may be: a client that takes a bare
/// close for its current room must not read the newer room's chat before it.
#[test]
fn nothing_queued_after_a_word_alone_overtakes_it_at_its_address() {
    for (batch_limit, segmenting, member_word) in [
        (4096, false, true),
        (0, true, true),
        (4096, false, false),
        (0, true, false),
    ] {
        let mut out = Outbox::default();
        let before = chat(&mut out, "before");
        let behind = chat(&mut out, "behind");
        let closed = room_closed(&mut out);
        let beyond = chat(&mut out, "beyond");
        // Member 2, at port 1 as member 1 is, and member 3 at port 2, get chat around member
        // 1's last word (or a datagram for no member, to port 1); texts of one length, which
        // a segmented send may carry together.
        out.queue_to_member(addr(1), LocalId::ANY, before.clone(), 2, batch_limit);
        out.queue_to_member(addr(2), LocalId::ANY, before, 3, batch_limit);
        if member_word {
            out.queue_last_word(addr(1), LocalId::ANY, closed, 1);
        } else {
            out.queue(addr(1), LocalId::ANY, closed);
        }
        out.queue_to_member(addr(1), LocalId::ANY, behind.clone(), 2, batch_limit);
        out.queue_to_member(addr(2), LocalId::ANY, behind, 3, batch_limit);
        out.queue_to_member(addr(2), LocalId::ANY, beyond, 3, batch_limit);
        let mut sender = Sender::new(65507);
        sender.set_segmentation(segmenting);
        let planned = planned(&mut sender, &out);
        let case = format!("batch limit {batch_limit}, segmenting {segmenting}");
        let port = |p: u16| -> Vec<String> {
            texts_planned(&sender, &planned)
                .into_iter()
                .filter(|(to, _)| *to == p)
                .map(|(_, text)| text)
                .collect()
        };
        assert_eq!(port(1), ["before", "closed", "behind"], "{case}");
        assert_eq!(port(2), ["before", "behind", "beyond"], "{case}");
        // Port 2, where nothing came between, still gets its three in one datagram.
        let to_port_2: Vec<usize> = planned
            .iter()
            .filter(|(to, _, _)| to.port() == 2)
            .map(|(_, _, messages)| *messages)
            .collect();
        assert_eq!(to_port_2, [3], "{case}");
    }
}

/// A source the kernel refuses (no longer the host's) is retired: later datagrams to its
/// members leave from the address the route picks.
#[test]
fn a_source_the_kernel_refuses_is_retired() {
    let socket = UdpSocket::bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = peer.local_addr().unwrap();
    let mut locals = Locals::default();
    let gone = gone_source(&mut locals);
    assert!(locals.get(gone).is_some());
    let mut out = Outbox::default();
    let one = chat(&mut out, "one");
    out.queue_to_member(to, gone, one, 1, 0);
    let mut sender = Sender::new(65507);
    let mut metrics = send_now(&mut sender, &socket, &mut out, &mut locals);
    assert_eq!(metrics.datagrams_sent, 1, "it left without the source");
    assert!(metrics.send_errors.is_empty());
    assert_eq!(locals.get(gone), None);
    let one = chat(&mut out, "one");
    out.queue_to_member(to, gone, one, 1, 0);
    sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
    assert_eq!(metrics.datagrams_sent, 2);
    let mut buf = [0u8; 16];
    peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    for _ in 0..2 {
        let (_, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(from.ip(), std::net::IpAddr::from([127, 0, 0, 1]));
    }
}

/// A socket bound to the wildcard address (so that sources matter), whose segmented sends
/// the kernel refuses when `refusing` (it sends without UDP checksums, which segmenting
/// needs); `None` on a kernel that cannot segment.
fn segmenting_socket(refusing: bool) -> Option<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0".parse().unwrap()).unwrap();
    if !mmsg::can_segment(socket.as_raw_fd()) {
        crate::test_shared::skipped("this kernel cannot segment UDP sends");
        return None;
    }
    if refusing {
        let fd = socket.as_raw_fd();
        crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
    }
    Some(socket)
}

/// A sender with segmented sends on, and the daemon's default cap on batches.
fn segmenting_sender() -> Sender {
    let mut sender = Sender::new(65507);
    sender.set_segmentation(true);
    sender
}

/// A loopback peer with room for many small datagrams.
fn peer() -> std::net::UdpSocket {
    peer_at("127.0.0.1")
}

/// A peer at `ip`, one of the host's, with room for many small datagrams.
fn peer_at(ip: &str) -> std::net::UdpSocket {
    let peer = std::net::UdpSocket::bind((ip, 0)).unwrap();
    let _ = crate::sockopt::set_int(peer.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 1 << 20);
    peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    peer
}

/// The texts of the next `count` datagrams `peer` receives.
fn texts_received(peer: &std::net::UdpSocket, count: usize) -> Vec<String> {
    let mut buf = [0u8; 2048];
    (0..count)
        .map(|_| {
            let len = peer.recv(&mut buf).unwrap();
            texts(&buf[..len]).concat()
        })
        .collect()
}

/// The id `locals` gives source address `ip`, on no interface in particular.
fn source(locals: &mut Locals, ip: IpAddr) -> LocalId {
    locals.id(Some(crate::local::LocalAddr { ip, ifindex: 0 }))
}

/// A source address the host does not have.
fn gone_source(locals: &mut Locals) -> LocalId {
    source(locals, IpAddr::from([192, 0, 2, 77]))
}

/// Segmented sends the kernel refuses but whose datagrams it takes one at a time: they
/// and everything after them leave in order, and each IP address refused gets one
/// datagram per send from then on (counted once), while sources retired on the retry are
/// the right ones.
#[test]
fn a_destination_whose_segmented_send_is_refused_gets_one_datagram_per_send() {
    let Some(socket) = segmenting_socket(true) else {
        return;
    };
    // a and b share an address; c has another one of the host's.
    let (a, b, c) = (peer(), peer(), peer_at("127.0.0.2"));
    let [to_a, to_b, to_c] = [&a, &b, &c].map(|p| p.local_addr().unwrap());
    let mut locals = Locals::default();
    let gone = gone_source(&mut locals);
    let mut out = Outbox::default();
    let messages: Vec<Range<usize>> = (0..7).map(|i| chat(&mut out, &format!("m{i}"))).collect();
    let first = chat(&mut out, "first");
    out.queue(to_a, LocalId::ANY, first.clone());
    for (i, msg) in messages.iter().enumerate() {
        // Member 0 at a gets m0 m1 m2, member 1 at b m3 m4, member 2 at c m5 m6.
        let (to, member) = match i {
            0..=2 => (to_a, 0),
            3 | 4 => (to_b, 1),
            _ => (to_c, 2),
        };
        out.queue_to_member(to, LocalId::ANY, msg.clone(), member, 0);
    }
    // After the refusals, from a source the host does not have: retired, so it leaves
    // from the address the route picks.
    out.queue(to_b, gone, first);
    let mut sender = segmenting_sender();
    let mut metrics = send_now(&mut sender, &socket, &mut out, &mut locals);
    assert_eq!(metrics.segmentation_refusals, 2, "127.0.0.1 and 127.0.0.2");
    // One refused call per address: b's send was split with a's, before a's retry.
    assert_eq!(sender.refused_calls, 2);
    assert_eq!((metrics.datagrams_sent, metrics.deliveries), (9, 9));
    assert_eq!(metrics.datagrams_segmented, 0);
    assert!(metrics.send_errors.is_empty(), "{:?}", metrics.send_errors);
    assert_eq!(locals.get(gone), None, "the refused source is retired");
    assert_eq!(texts_received(&a, 4), ["first", "m0", "m1", "m2"]);
    assert_eq!(texts_received(&b, 3), ["m3", "m4", "first"]);
    assert_eq!(texts_received(&c, 2), ["m5", "m6"]);
    // The next pass plans one datagram per message for them, without a refusal.
    let again = chat(&mut out, "again");
    queue_copies_to_member(&mut out, 2, to_a, LocalId::ANY, &again, 0, 0);
    assert_eq!(segmenting(&mut sender, &out), vec![(to_a.port(), 1, 0); 2]);
    sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
    assert_eq!(
        (metrics.datagrams_sent, metrics.segmentation_refusals),
        (11, 2)
    );
    assert_eq!(texts_received(&a, 2), ["again", "again"]);
    // Once the time is up, a destination gets segmented sends again.
    let again = chat(&mut out, "again");
    queue_copies_to_member(&mut out, 2, to_a, LocalId::ANY, &again, 0, 0);
    let long_ago = Instant::now() - UNSEGMENTED_FOR - Duration::from_secs(1);
    let mut unsegmented = Unsegmented::default();
    assert!(unsegmented.keep(to_a.ip(), long_ago));
    sender.unsegmented = unsegmented;
    assert_eq!(segmenting(&mut sender, &out), vec![(to_a.port(), 2, 7)]);
    assert!(sender.unsegmented.until.is_empty(), "dropped once over");
}

/// One socket in two rooms is two members at one address. Each one's run of equal
/// datagrams is a segmented send of its own, sealed once the other's is planned after it;
/// when the kernel refuses segmenting, the retry sends them one apiece in the order they
/// were queued, across both members.
#[test]
fn a_refused_segmented_send_to_members_sharing_an_address_keeps_their_order() {
    let Some(socket) = segmenting_socket(true) else {
        return;
    };
    let x = peer();
    let to_x = x.local_addr().unwrap();
    let mut locals = Locals::default();
    let mut out = Outbox::default();
    // Member 0 (room A) gets a0 a1, member 1 (room B) b0 b1, member 0 again a2 a3.
    let mut frame_lens = HashSet::new();
    for (text, member) in [
        ("a0", 0),
        ("a1", 0),
        ("b0", 1),
        ("b1", 1),
        ("a2", 0),
        ("a3", 0),
    ] {
        let msg = chat(&mut out, text);
        frame_lens.insert(msg.len() as u16);
        out.queue_to_member(to_x, LocalId::ANY, msg, member, 0);
    }
    let frame = *frame_lens.iter().next().unwrap();
    assert_eq!(frame_lens.len(), 1, "frames of one length");
    let mut sender = segmenting_sender();
    assert_eq!(
        segmenting(&mut sender, &out),
        vec![(to_x.port(), 2, frame); 3],
        "three segmented sends, in the order queued"
    );
    let metrics = send_now(&mut sender, &socket, &mut out, &mut locals);
    assert_eq!(sender.refused_calls, 1);
    assert_eq!(metrics.segmentation_refusals, 1);
    assert_eq!((metrics.datagrams_sent, metrics.deliveries), (6, 6));
    assert!(metrics.send_errors.is_empty(), "{:?}", metrics.send_errors);
    assert_eq!(texts_received(&x, 6), ["a0", "a1", "b0", "b1", "a2", "a3"]);
}

/// A segmented send refused for its segments from a source the host has: the source is
/// not blamed (nor retired), and the datagrams, sent one apiece, leave from it.
#[test]
fn a_refused_segmented_send_keeps_a_good_source() {
    let Some(socket) = segmenting_socket(true) else {
        return;
    };
    let a = peer();
    let mut locals = Locals::default();
    let ours = source(&mut locals, IpAddr::from([127, 0, 0, 3]));
    let mut out = Outbox::default();
    let msg = chat(&mut out, "same");
    queue_copies_to_member(&mut out, 3, a.local_addr().unwrap(), ours, &msg, 0, 0);
    let metrics = send_now(&mut segmenting_sender(), &socket, &mut out, &mut locals);
    assert!(locals.get(ours).is_some(), "the source is kept");
    assert_eq!(metrics.segmentation_refusals, 1);
    assert_eq!(metrics.datagrams_sent, 3);
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        let (_, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!(from.ip(), std::net::IpAddr::from([127, 0, 0, 3]));
    }
}

/// Two segmented sends to two addresses from a source the host no longer has, on a socket
/// that refuses segments: the first one's retry retires the source, so the second one's
/// datagrams leave without it. That proves nothing against the segments (they were sent
/// from another source than the refused send named): nobody is kept from segmented sends.
#[test]
fn a_source_retired_between_a_refusal_and_its_retry_blames_no_one() {
    let Some(socket) = segmenting_socket(true) else {
        return;
    };
    let (a, b) = (peer(), peer_at("127.0.0.2"));
    let mut locals = Locals::default();
    let gone = gone_source(&mut locals);
    let mut out = Outbox::default();
    let msg = chat(&mut out, "same");
    for (member, to) in [(0, &a), (1, &b)] {
        queue_copies_to_member(&mut out, 3, to.local_addr().unwrap(), gone, &msg, member, 0);
    }
    let mut sender = segmenting_sender();
    let metrics = send_now(&mut sender, &socket, &mut out, &mut locals);
    assert_eq!(sender.refused_calls, 2);
    assert_eq!(locals.get(gone), None);
    assert_eq!(metrics.segmentation_refusals, 0);
    assert!(sender.unsegmented.until.is_empty());
    assert_eq!(
        (metrics.datagrams_sent, metrics.datagrams_segmented),
        (6, 0)
    );
    for peer in [&a, &b] {
        assert_eq!(texts_received(peer, 3), ["same", "same", "same"]);
    }
}

/// An IPv6 source the host does not have makes even a segmented send fail with EINVAL,
/// which a refusal of its segments also gives: sent again one apiece, the source is
/// found at fault and retired, and the destination keeps its segmented sends. The member
/// has two segmented sends in the pass (a shorter datagram ends the first): the second is
/// split with the first, so that it is not refused in turn once the source is retired,
/// and taken for a refusal of its segments.
#[test]
fn a_segmented_send_from_an_ipv6_source_gone_blames_the_source() {
    let (Ok(socket), Ok(a)) = (
        UdpSocket::bind("[::]:0".parse().unwrap()),
        std::net::UdpSocket::bind("[::1]:0"),
    ) else {
        crate::test_shared::skipped("this host has no IPv6 loopback");
        return;
    };
    if !mmsg::can_segment(socket.as_raw_fd()) {
        crate::test_shared::skipped("this kernel cannot segment UDP sends");
        return;
    }
    a.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut locals = Locals::default();
    let gone = source(&mut locals, "2001:db8::77".parse().unwrap());
    let mut out = Outbox::default();
    let (same, short) = (chat(&mut out, "same"), chat(&mut out, "x"));
    for msg in [&same, &same, &short, &same, &same] {
        out.queue_to_member(a.local_addr().unwrap(), gone, msg.clone(), 0, 0);
    }
    let mut sender = segmenting_sender();
    let metrics = send_now(&mut sender, &socket, &mut out, &mut locals);
    assert_eq!(locals.get(gone), None, "the source is retired");
    assert_eq!(metrics.segmentation_refusals, 0);
    assert!(sender.unsegmented.until.is_empty(), "::1 is not kept");
    assert_eq!(sender.refused_calls, 1);
    // Sent again one apiece: the EINVAL was taken for a refusal of the segments first.
    assert_eq!(
        (metrics.datagrams_sent, metrics.datagrams_segmented),
        (5, 0)
    );
    assert_eq!(texts_received(&a, 5), ["same", "same", "x", "same", "same"]);
}

/// A segmented send from a source the host no longer has: the source is dropped and
/// retired, and the datagrams still go as one segmented send.
#[test]
fn a_segmented_send_from_a_source_gone_keeps_its_segments() {
    let Some(socket) = segmenting_socket(false) else {
        return;
    };
    let a = peer();
    let mut locals = Locals::default();
    let gone = gone_source(&mut locals);
    let mut out = Outbox::default();
    let msg = chat(&mut out, "same");
    queue_copies_to_member(&mut out, 3, a.local_addr().unwrap(), gone, &msg, 0, 0);
    let mut sender = segmenting_sender();
    let metrics = send_now(&mut sender, &socket, &mut out, &mut locals);
    assert_eq!(locals.get(gone), None);
    assert_eq!(metrics.segmentation_refusals, 0);
    assert!(sender.unsegmented.until.is_empty());
    assert_eq!(
        (metrics.datagrams_sent, metrics.datagrams_segmented),
        (3, 3)
    );
    assert_eq!(texts_received(&a, 3), ["same", "same", "same"]);
}

/// A segmented send refused for its destination (port 0), whose datagrams are refused one
/// apiece too: they count as send errors, and the destination is not kept from segmented
/// sends, nor anyone else.
#[test]
fn a_segmented_send_refused_for_its_destination_leaves_segmenting_on() {
    let Some(socket) = segmenting_socket(false) else {
        return;
    };
    // At another address: the rest of the pass to 127.0.0.1 goes one datagram apiece.
    let a = peer_at("127.0.0.2");
    let mut out = Outbox::default();
    let msg = chat(&mut out, "same");
    for _ in 0..3 {
        out.queue_to_member(addr(0), LocalId::ANY, msg.clone(), 0, 0);
        out.queue_to_member(a.local_addr().unwrap(), LocalId::ANY, msg.clone(), 1, 0);
    }
    let mut sender = segmenting_sender();
    let metrics = send_now(&mut sender, &socket, &mut out, &mut Locals::default());
    assert!(sender.unsegmented.until.is_empty());
    assert_eq!(metrics.segmentation_refusals, 0);
    assert_eq!(metrics.send_errors.get("other"), Some(&3));
    assert_eq!((metrics.datagrams_sent, metrics.deliveries), (3, 3));
    assert_eq!(metrics.datagrams_segmented, 3);
    assert_eq!(texts_received(&a, 3), ["same", "same", "same"]);
}

/// Sends that do not leave are counted in datagrams, whatever carried them: a segmented
/// send of three that failed, and a full buffer before a batch of five and a segmented
/// send of two.
#[test]
fn what_did_not_leave_is_counted_in_datagrams() {
    let planned = |bytes, messages| planned_to_port_1(bytes, messages, false);
    let plan = [
        planned(Bytes::Outbox(0..1), 1),
        planned(Bytes::Segments(0), 3),
        planned(Bytes::Batch(0), 5),
        planned(Bytes::Segments(1), 2),
    ];
    let sent = mmsg::Sent {
        sent: 1,
        failed: 1,
        would_block: 2,
        held_back: 0,
        refused_segmented: None,
    };
    let mut metrics = Metrics::default();
    count(&plan, &sent, (&[1], &[], &[]), &mut metrics);
    assert_eq!((metrics.datagrams_sent, metrics.deliveries), (1, 1));
    assert_eq!(metrics.send_errors.get("other"), Some(&3));
    assert_eq!(metrics.send_errors.get("would_block"), Some(&3));
    // All of it left: the segmented sends' datagrams are counted as such.
    let sent = mmsg::Sent {
        sent: 4,
        ..mmsg::Sent::default()
    };
    let mut metrics = Metrics::default();
    count(&plan, &sent, (&[], &[], &[]), &mut metrics);
    assert_eq!((metrics.datagrams_sent, metrics.deliveries), (7, 11));
    assert_eq!(metrics.datagrams_segmented, 5);
}

#[test]
fn deliveries_count_the_datagrams_that_left_not_a_prefix_of_the_plan() {
    // A destination the kernel refuses on its own (port 0: EINVAL) sits between a plain
    // datagram and a batch of three; the batch still leaves after the refusal.
    let socket = loopback_socket();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = peer.local_addr().unwrap();
    let mut out = Outbox::default();
    let one = chat(&mut out, "one");
    out.queue(to, LocalId::ANY, one.clone());
    out.queue(addr(0), LocalId::ANY, one.clone());
    queue_copies_to_member(&mut out, 3, to, LocalId::ANY, &one, 5, 4096);
    let metrics = send_now(
        &mut Sender::new(65507),
        &socket,
        &mut out,
        &mut Locals::default(),
    );
    assert_eq!(metrics.datagrams_sent, 2);
    assert_eq!(metrics.send_errors.get("other"), Some(&1));
    // One plain message and three in the batch reached the kernel; the refused one did not.
    assert_eq!(metrics.deliveries, 4);
}

/// Each planned datagram: where it goes, its messages, and its segment size (0: alone).
fn segmenting(sender: &mut Sender, out: &Outbox) -> Vec<(u16, usize, u16)> {
    sender.plan(out);
    let _ = sender.gather(out, &Locals::default(), 0);
    sender
        .datagrams
        .iter()
        .zip(&sender.plan)
        .map(|(datagram, planned)| (datagram.to.port(), planned.messages, datagram.segment))
        .collect()
}

/// A last word leaves alone, after whatever was packed for its member (a batch frame, a
/// segmented send), never inside it: held when the kernel has no room, it is held alone.
#[test]
fn a_last_word_leaves_alone_after_what_was_packed_for_its_member() {
    let mut out = Outbox::default();
    let hi = chat(&mut out, "hi");
    let closed = room_closed(&mut out);
    for _ in 0..2 {
        out.queue_to_member(addr(1), LocalId::ANY, hi.clone(), 1, 4096);
        out.queue_to_member(addr(2), LocalId::ANY, closed.clone(), 2, 0);
    }
    out.queue_last_word(addr(1), LocalId::ANY, closed.clone(), 1);
    out.queue_last_word(addr(2), LocalId::ANY, closed.clone(), 2);
    let mut sender = segmenting_sender();
    assert_eq!(
        segmenting(&mut sender, &out),
        [(1, 2, 0), (2, 2, 15), (1, 1, 0), (2, 1, 0)]
    );
    let last_words: Vec<bool> = sender.plan.iter().map(|p| p.last_word).collect();
    assert_eq!(last_words, [false, false, true, true]);
}

/// Last words the kernel had no room for are not counted as dropped (they are held); the
/// chat around them is, and so is a last word refused for itself.
#[test]
fn last_words_with_no_room_are_not_counted_as_dropped() {
    let planned = |last_word| planned_to_port_1(Bytes::Outbox(0..1), 1, last_word);
    // 0 left; 1, a last word, was refused for itself; 2, a last word, found no memory;
    // the buffer was full from 3 on: a chat and a last word.
    let plan = [
        planned(false),
        planned(true),
        planned(true),
        planned(false),
        planned(true),
    ];
    let sent = mmsg::Sent {
        sent: 1,
        failed: 2,
        would_block: 2,
        held_back: 0,
        refused_segmented: None,
    };
    let mut metrics = Metrics::default();
    count(&plan, &sent, (&[1, 2], &[2], &[]), &mut metrics);
    assert_eq!(metrics.datagrams_sent, 1);
    assert_eq!(metrics.send_errors.get("other"), Some(&1));
    assert_eq!(metrics.send_errors.get("would_block"), Some(&1));
}

/// A stand-in for the kernel that has no memory for `__ROOM_CLOSED__` (`ENOBUFS`), as
/// `core.rs`'s `LD_PRELOAD` stub has, and takes every other datagram.
fn no_memory_for_room_closed(bytes: &[u8]) -> Option<i32> {
    (bytes == delivery::ROOM_CLOSED).then_some(libc::ENOBUFS)
}

/// `sender`, sending through a stand-in for the kernel with no memory for `__ROOM_CLOSED__`
/// ([`no_memory_for_room_closed`]).
fn with_no_memory_for_room_closed(mut sender: Sender) -> Sender {
    sender.scratch.refusing = Some(no_memory_for_room_closed);
    sender
}

/// The raw datagrams `peer` receives next, `count` of them.
fn received(peer: &std::net::UdpSocket, count: usize) -> Vec<Vec<u8>> {
    let mut buf = [0u8; 2048];
    (0..count)
        .map(|_| {
            let len = peer.recv(&mut buf).unwrap();
            buf[..len].to_vec()
        })
        .collect()
}

/// Whether nothing waits to be read on `peer` (loopback delivers within the send, so
/// what was sent is there).
fn got_nothing(peer: &std::net::UdpSocket) -> bool {
    peer.set_nonblocking(true).unwrap();
    let nothing = peer.recv(&mut [0u8; 64]).is_err();
    peer.set_nonblocking(false).unwrap();
    nothing
}

/// A last word the kernel has no memory for, within a send that goes on with the rest, is
/// overtaken by nothing newer to its address in that send: chat to it (a room it joined
/// from the same socket) is held back and counted as `would_block`, and a later last word
/// to it (that room closing too) is held after it; the rest leaves. The held words then
/// reach it in order.
#[test]
fn a_last_word_refused_for_memory_is_not_overtaken_within_its_send() {
    let socket = loopback_socket();
    let (x, y) = (peer(), peer());
    let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
    let mut out = Outbox::default();
    let closed = room_closed(&mut out);
    let newer = chat(&mut out, "newer");
    // x is member 1 of a room closing, and member 3 of another.
    out.queue_last_word(to_x, LocalId::ANY, closed.clone(), 1);
    out.queue_to_member(to_y, LocalId::ANY, newer.clone(), 2, 0);
    out.queue_to_member(to_x, LocalId::ANY, newer.clone(), 3, 0);
    out.queue_last_word(to_x, LocalId::ANY, closed, 3);
    out.queue_to_member(to_y, LocalId::ANY, newer, 2, 0);
    let mut sender = with_no_memory_for_room_closed(Sender::new(65507));
    let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
    let now = Instant::now();
    sender.send_all(&socket, &mut out, &mut locals, &mut metrics, now);
    assert_eq!(texts_received(&y, 2), ["newer", "newer"]);
    assert!(got_nothing(&x), "the chat to x overtook its held close");
    assert_eq!(metrics.datagrams_sent, 2);
    assert_eq!(metrics.last_words_held, 2);
    assert_eq!(metrics.send_errors.get("would_block"), Some(&1));
    assert_eq!(metrics.send_errors.get("other"), None);
    let held: Vec<SocketAddr> = sender.held.iter().map(|word| word.to).collect();
    assert_eq!(held, [to_x, to_x]);

    sender.scratch.refusing = None;
    sender.send_held(&socket, &mut locals, &mut metrics, now);
    assert_eq!(received(&x, 2), [delivery::ROOM_CLOSED; 2]);
    assert!(!sender.holds_last_words());
    assert_eq!(metrics.datagrams_sent, 4);
}

/// Held words sent again are not overtaken by those held behind them: the kernel again
/// without memory for the older one to an address, the newer one to it stays held
/// (untried), while one to another address leaves.
#[test]
fn a_held_word_refused_again_for_memory_is_not_overtaken_by_one_held_behind_it() {
    let socket = loopback_socket();
    let (x, y) = (peer(), peer());
    let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
    let mut out = Outbox::default();
    let [first, other, second] =
        [b"first", b"other", b"secnd"].map(|w| out.payload(|b| b.extend_from_slice(w)));
    out.queue_last_word(to_x, LocalId::ANY, first, 1);
    out.queue_last_word(to_y, LocalId::ANY, other, 2);
    out.queue_last_word(to_x, LocalId::ANY, second, 3);
    let mut sender = Sender::new(65507);
    // No memory for anything: all three are held, in order.
    sender.scratch.refusing = Some(|_| Some(libc::ENOBUFS));
    let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
    let now = Instant::now();
    sender.send_all(&socket, &mut out, &mut locals, &mut metrics, now);
    let held = |sender: &Sender| -> Vec<Vec<u8>> {
        sender.held.iter().map(|word| word.bytes.to_vec()).collect()
    };
    assert_eq!(held(&sender), [b"first", b"other", b"secnd"]);

    // Memory again, but for the first.
    sender.scratch.refusing = Some(|bytes| (bytes == b"first").then_some(libc::ENOBUFS));
    sender.send_held(&socket, &mut locals, &mut metrics, now);
    assert_eq!(received(&y, 1), [b"other"]);
    assert!(got_nothing(&x), "the second word to x overtook the first");
    assert_eq!(held(&sender), [b"first", b"secnd"]);

    sender.scratch.refusing = None;
    sender.send_held(&socket, &mut locals, &mut metrics, now);
    assert_eq!(received(&x, 2), [b"first", b"secnd"]);
    assert_eq!(metrics.datagrams_sent, 3);
    assert!(metrics.send_errors.is_empty(), "{:?}", metrics.send_errors);
}

/// A segmented send the kernel refuses stops the call before what a last word refused
/// for memory earlier in it holds back: the rest, sent again unsegmented in a second
/// call, still holds back what goes to that word's address.
#[test]
fn a_last_word_refused_for_memory_before_a_refused_segmented_send_is_not_overtaken() {
    let Some(socket) = segmenting_socket(true) else {
        return;
    };
    let (x, y) = (peer(), peer());
    let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
    let mut out = Outbox::default();
    let closed = room_closed(&mut out);
    let newer = chat(&mut out, "newer");
    out.queue_last_word(to_x, LocalId::ANY, closed, 1);
    queue_copies_to_member(&mut out, 2, to_y, LocalId::ANY, &newer, 2, 0);
    out.queue_to_member(to_x, LocalId::ANY, newer, 3, 0);
    let mut sender = with_no_memory_for_room_closed(segmenting_sender());
    let metrics = send_now(&mut sender, &socket, &mut out, &mut Locals::default());
    assert_eq!(sender.refused_calls, 1, "y's segmented send was refused");
    assert_eq!(texts_received(&y, 2), ["newer", "newer"]);
    assert!(got_nothing(&x), "the chat to x overtook its held close");
    assert_eq!(metrics.send_errors.get("would_block"), Some(&1));
    assert_eq!(metrics.last_words_held, 1);
}

/// A word held for [`MAX_HELD_AGE`] is let go at the next try, counted as
/// `last_words_expired`, and the sender holds nothing more (so the loop's retries stop);
/// just before, it is tried again. What goes to its address then flows.
#[test]
fn a_word_held_for_the_age_limit_is_let_go_and_counted() {
    let socket = loopback_socket();
    let x = peer();
    let to_x = x.local_addr().unwrap();
    let mut out = Outbox::default();
    let closed = room_closed(&mut out);
    out.queue_last_word(to_x, LocalId::ANY, closed, 1);
    let mut sender = with_no_memory_for_room_closed(Sender::new(65507));
    let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
    let t0 = Instant::now();
    sender.send_all(&socket, &mut out, &mut locals, &mut metrics, t0);
    assert!(sender.holds_last_words());
    let almost = t0 + MAX_HELD_AGE - Duration::from_millis(1);
    sender.send_held(&socket, &mut locals, &mut metrics, almost);
    assert!(
        sender.holds_last_words(),
        "tried again, refused again: held"
    );
    assert_eq!(metrics.send_errors.get("last_words_expired"), None);

    sender.scratch.refusing = None;
    sender.send_held(&socket, &mut locals, &mut metrics, t0 + MAX_HELD_AGE);
    assert!(!sender.holds_last_words());
    assert_eq!(metrics.send_errors.get("last_words_expired"), Some(&1));
    assert_eq!(metrics.datagrams_sent, 0);
    assert!(got_nothing(&x), "let go, not sent");
    // Nothing is held back for it any more.
    let after = chat(&mut out, "after");
    out.queue_to_member(to_x, LocalId::ANY, after, 1, 0);
    sender.send_all(
        &socket,
        &mut out,
        &mut locals,
        &mut metrics,
        t0 + MAX_HELD_AGE,
    );
    assert_eq!(texts_received(&x, 1), ["after"]);
}

/// What was held back behind a last word refused for memory counts as not sent: chat as
/// `would_block`, a last word not at all (it is held); what left around it is sent.
#[test]
fn what_was_held_back_is_counted_as_would_block_but_last_words() {
    let planned = |last_word| planned_to_port_1(Bytes::Outbox(0..1), 1, last_word);
    // 0, a last word, found no memory; 1 (chat) and 2 (a last word) were held back behind
    // it; 3, to another address, left.
    let plan = [planned(true), planned(false), planned(true), planned(false)];
    let sent = mmsg::Sent {
        sent: 1,
        failed: 1,
        held_back: 2,
        ..mmsg::Sent::default()
    };
    let mut metrics = Metrics::default();
    count(&plan, &sent, (&[0], &[0], &[1, 2]), &mut metrics);
    assert_eq!((metrics.datagrams_sent, metrics.deliveries), (1, 1));
    assert_eq!(metrics.send_errors.get("would_block"), Some(&1));
    assert_eq!(metrics.send_errors.get("other"), None);
}

proptest::proptest! {
    /// Over two passes of chat and last words to three addresses, whatever the kernel
    /// does with each (the stand-in decides by its first byte), every datagram is either
    /// received and counted as sent, counted once as a send error, or still held; and at
    /// each address what arrives is in the order it was queued, with nothing queued after
    /// a word still held for that address.
    #[test]
    fn every_datagram_is_sent_counted_or_held_and_none_overtakes_a_held_word(
        // Up to 200 datagrams: few enough for any peer's receive buffer to keep them all.
        passes in proptest::collection::vec(
            proptest::collection::vec((0u8..4, 0usize..3, proptest::bool::ANY), 0..100),
            2,
        )
    ) {
        let socket = loopback_socket();
        let peers = [peer(), peer(), peer()];
        let to: Vec<SocketAddr> = peers.iter().map(|p| p.local_addr().unwrap()).collect();
        let mut sender = Sender::new(65507);
        sender.scratch.refusing = Some(mmsg::by_first_byte);
        let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
        let mut queued = 0u16;
        for pass in &passes {
            let mut out = Outbox::default();
            for &(code, member, last_word) in pass {
                queued += 1;
                let [hi, lo] = queued.to_be_bytes();
                let bytes = out.payload(|b| b.extend_from_slice(&[code, hi, lo]));
                let slot = member as u32;
                if last_word {
                    out.queue_last_word(to[member], LocalId::ANY, bytes, slot);
                } else {
                    out.queue_to_member(to[member], LocalId::ANY, bytes, slot, 0);
                }
            }
            sender.send_all(&socket, &mut out, &mut locals, &mut metrics, Instant::now());
        }
        let held = sender.held.len() as u64;
        let errors: u64 = metrics.send_errors.values().sum();
        proptest::prop_assert_eq!(
            metrics.datagrams_sent + errors + held,
            u64::from(queued),
            "{:?}",
            metrics.send_errors
        );
        let mut received = 0;
        for (peer, &at) in peers.iter().zip(&to) {
            peer.set_nonblocking(true).unwrap();
            let mut order = Vec::new();
            let mut buf = [0u8; 16];
            while let Ok(3) = peer.recv(&mut buf) {
                order.push(u16::from_be_bytes([buf[1], buf[2]]));
            }
            received += order.len() as u64;
            proptest::prop_assert!(order.is_sorted(), "{:?}", order);
            let first_held = sender
                .held
                .iter()
                .filter(|word| word.to == at)
                .map(|word| u16::from_be_bytes([word.bytes[1], word.bytes[2]]))
                .min();
            if let Some(first_held) = first_held {
                proptest::prop_assert!(
                    order.iter().all(|&n| n < first_held),
                    "{:?} arrived with {} held",
                    order,
                    first_held
                );
            }
        }
        proptest::prop_assert_eq!(received, metrics.datagrams_sent);
    }
}

#[test]
fn a_members_equal_datagrams_go_as_one_segmented_send_up_to_a_shorter_one() {
    let mut out = Outbox::default();
    // Chat frames of 10 bytes, one of 7, two of 13.
    let [a, b, c, e] = ["a", "b", "c", "e"].map(|t| chat(&mut out, &format!("{t}-------")));
    let short = chat(&mut out, "d----");
    let [f, g] = ["f", "g"].map(|t| chat(&mut out, &format!("{t}----------")));
    let to_member = |out: &mut Outbox, port, msg: &Range<usize>| {
        out.queue_to_member(addr(port), LocalId::ANY, msg.clone(), u32::from(port), 0);
    };
    for msg in [&a, &b] {
        to_member(&mut out, 1, msg);
        to_member(&mut out, 2, msg);
        out.queue(addr(3), LocalId::ANY, msg.clone()); // not a member: alone
    }
    for msg in [&c, &short, &e, &f, &g] {
        to_member(&mut out, 1, msg);
    }
    let (ten, seven, twelve) = (a.len() as u16, short.len() as u16, f.len() as u16);
    assert_eq!((ten, seven, twelve), (10, 7, 13));
    let mut sender = segmenting_sender();
    assert_eq!(
        segmenting(&mut sender, &out),
        vec![
            (1, 4, ten), // a b c and the shorter d, which ends it
            (2, 2, ten),
            (3, 1, 0),
            (3, 1, 0),
            (1, 1, 0),      // e alone: the send after d
            (1, 2, twelve), // f g: longer, so a send of their own
        ]
    );
    // Split as the kernel splits them, member 1 gets its datagrams in order.
    let parts = sender.gather(&out, &Locals::default(), 0);
    let mut to_one: Vec<Vec<u8>> = Vec::new();
    for datagram in sender.datagrams.iter().filter(|d| d.to.port() == 1) {
        let bytes = datagram_bytes(&parts, &datagram.runs);
        match usize::from(datagram.segment) {
            0 => to_one.push(bytes),
            size => to_one.extend(bytes.chunks(size).map(<[u8]>::to_vec)),
        }
    }
    let sent: Vec<Vec<u8>> = [&a, &b, &c, &short, &e, &f, &g]
        .map(|r| out.get(r.clone()).to_vec())
        .to_vec();
    assert_eq!(to_one, sent);
    // Off: one datagram per message.
    sender.set_segmentation(false);
    assert!(segmenting(&mut sender, &out)
        .iter()
        .all(|&(_, n, s)| (n, s) == (1, 0)));
}

#[test]
fn segmented_sends_keep_to_the_kernels_limits_and_leave_batches_alone() {
    let counts = |text_len: usize, count: usize, limit: u16| {
        let mut out = Outbox::default();
        let msg = chat(&mut out, &"x".repeat(text_len));
        queue_copies_to_member(&mut out, count, addr(1), LocalId::ANY, &msg, 7, limit);
        segmenting(&mut segmenting_sender(), &out)
            .into_iter()
            .map(|(_, n, segment)| (n, segment))
            .collect::<Vec<_>>()
    };
    // 100-byte datagrams: 64 a send, the kernel's most segments.
    assert_eq!(counts(98, 70, 0), vec![(64, 100), (6, 100)]);
    // 1232-byte datagrams: 53 a send (65,296 bytes; 54 would pass 65,507).
    assert_eq!(counts(1230, 60, 0), vec![(53, 1232), (7, 1232)]);
    // One byte longer than a minimum-MTU path takes: alone.
    assert_eq!(counts(1231, 2, 0), vec![(1, 0), (1, 0)]);
    // A member with batches gets a batch, not segments.
    assert_eq!(counts(98, 3, 4096), vec![(3, 0)]);
}

/// Messages per datagram for one member with `limit`, under a daemon cap of `cap`, and
/// the largest datagram planned.
fn packing(message_len: usize, count: usize, limit: u16, cap: usize) -> (Vec<usize>, usize) {
    let mut out = Outbox::default();
    let msg = chat(&mut out, &"x".repeat(message_len));
    queue_copies_to_member(&mut out, count, addr(1), LocalId::ANY, &msg, 7, limit);
    let datagrams = planned(&mut Sender::new(cap), &out);
    let counts = datagrams.iter().map(|(_, _, n)| *n).collect();
    let largest = datagrams.iter().map(|(_, b, _)| b.len()).max().unwrap_or(0);
    (counts, largest)
}

/// The texts of the chat frames in a planned datagram (one frame, or a batch of them).
fn texts(datagram: &[u8]) -> Vec<String> {
    let frames: Vec<&[u8]> = match delivery::parse(datagram).unwrap() {
        Delivery::Batch(body) => delivery::batch_entries(body).map(Result::unwrap).collect(),
        _ => vec![datagram],
    };
    frames
        .into_iter()
        .map(|frame| match delivery::parse(frame).unwrap() {
            Delivery::Chat { message, .. } => message.to_owned(),
            other => panic!("not chat: {other:?}"),
        })
        .collect()
}

#[test]
fn a_member_that_gets_a_passs_messages_gets_them_as_one_run_of_the_outbox() {
    // Two senders' messages, in turn: the members who sent neither get every message,
    // laid back to back in the outbox; each sender gets the other's, one run apiece.
    let mut out = Outbox::default();
    let messages: Vec<(u32, Range<usize>)> = (0..6u32)
        .map(|i| (i % 2, chat(&mut out, &format!("m{i}"))))
        .collect();
    for (from, msg) in &messages {
        for member in (0..4u32).filter(|m| m != from) {
            out.queue_to_member(
                addr(member as u16 + 1),
                LocalId::ANY,
                msg.clone(),
                member,
                4096,
            );
        }
    }
    let mut sender = Sender::new(65507);
    let datagrams = planned(&mut sender, &out);
    let shown: Vec<(u16, Vec<String>)> = datagrams
        .iter()
        .map(|(to, bytes, _)| (to.port(), texts(bytes)))
        .collect();
    let all: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    assert_eq!(
        shown,
        vec![
            (2, vec!["m0".into(), "m2".into(), "m4".into()]),
            (3, all.clone()),
            (4, all),
            (1, vec!["m1".into(), "m3".into(), "m5".into()]),
        ]
    );
    let runs: Vec<usize> = sender
        .plan
        .iter()
        .map(|planned| match planned.bytes {
            Bytes::Batch(i) => sender.batches[i].runs.len(),
            Bytes::Outbox(_) | Bytes::Segments(_) => 0,
        })
        .collect();
    assert_eq!(runs, vec![3, 1, 1, 3]);
}

#[test]
fn a_batch_of_scattered_entries_stops_at_the_kernels_limit_on_runs() {
    // Each message for member 1 is followed by one for member 2, so none of member 1's
    // entries follows another: each is a run of its own.
    let mut out = Outbox::default();
    let count = MAX_BATCH_RUNS + 10;
    for i in 0..count {
        let mine = chat(&mut out, &format!("{i}"));
        let other = chat(&mut out, "-");
        out.queue_to_member(addr(1), LocalId::ANY, mine, 1, 65507);
        out.queue(addr(2), LocalId::ANY, other);
    }
    let datagrams = planned(&mut Sender::new(65507), &out);
    let batches: Vec<&(SocketAddr, Vec<u8>, usize)> = datagrams
        .iter()
        .filter(|(to, _, _)| to.port() == 1)
        .collect();
    let counts: Vec<usize> = batches.iter().map(|(_, _, n)| *n).collect();
    assert_eq!(counts, vec![MAX_BATCH_RUNS, 10]);
    let received: Vec<String> = batches.iter().flat_map(|(_, b, _)| texts(b)).collect();
    let sent: Vec<String> = (0..count).map(|i| i.to_string()).collect();
    assert_eq!(received, sent);
}

#[test]
fn buffer_sizes_asked_for_are_granted_and_zero_leaves_them_as_they_are() {
    let socket = loopback_socket();
    let fd = socket.as_raw_fd();
    let read = |opt| sockopt::get_int(fd, libc::SOL_SOCKET, opt).unwrap() as usize;
    let defaults = (read(libc::SO_RCVBUF), read(libc::SO_SNDBUF));
    assert_eq!(size_buffers(&socket, 0, 0), defaults);
    assert_eq!((read(libc::SO_RCVBUF), read(libc::SO_SNDBUF)), defaults);
    // Linux grants twice what is asked (room for its bookkeeping), within
    // net.core.rmem_max and wmem_max (212,992 bytes by default).
    let granted = size_buffers(&socket, 40_000, 50_000);
    assert_eq!(granted, (80_000, 100_000));
    assert_eq!(granted, (read(libc::SO_RCVBUF), read(libc::SO_SNDBUF)));
}

#[test]
fn an_ipv6_socket_sends_to_ipv4_peers_at_their_ipv4_mapped_addresses() {
    let mut out = Outbox::default();
    let one = chat(&mut out, "one");
    let v6: SocketAddr = "[2001:db8::1]:6".parse().unwrap();
    out.queue(addr(5), LocalId::ANY, one.clone());
    out.queue_to_member(v6, LocalId::ANY, one, 0, 0);
    let mut sender = Sender::new(65507);
    let destinations = |sender: &mut Sender| -> Vec<SocketAddr> {
        planned(sender, &out)
            .into_iter()
            .map(|(to, ..)| to)
            .collect()
    };
    assert_eq!(destinations(&mut sender), [addr(5), v6]);
    sender.set_ipv6_socket(true);
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:5".parse().unwrap();
    assert_eq!(destinations(&mut sender), [mapped, v6]);
}

#[test]
fn a_reloaded_cap_on_batches_applies_from_the_next_pass() {
    let mut out = Outbox::default();
    let msg = chat(&mut out, &"x".repeat(1500));
    queue_copies_to_member(&mut out, 5, addr(1), LocalId::ANY, &msg, 7, 65507);
    let mut sender = Sender::new(65507);
    let counts = |sender: &mut Sender| -> Vec<usize> {
        planned(sender, &out).into_iter().map(|(.., n)| n).collect()
    };
    assert_eq!(counts(&mut sender), [5]);
    sender.set_max_batch(4096);
    assert_eq!(counts(&mut sender), [2, 2, 1]);
}

/// Plans kept between passes stop at the first one past the pool's bytes (each counts
/// its own size and its runs'), and the rest are freed.
#[test]
fn the_pool_keeps_plans_up_to_its_bytes_and_frees_the_rest() {
    // A third of the pool's bytes in runs: with the plans' own size, only two fit.
    let runs = POOLED_BATCH_BYTES / 3 / RUN_SIZE;
    assert!(3 * (mem::size_of::<Batch>() + runs * RUN_SIZE) > POOLED_BATCH_BYTES);
    let mut pool: Vec<Batch> = (0..5).map(|_| Batch::default()).collect();
    keep_pooled(&mut pool, |_| runs);
    assert_eq!(pool.len(), 2);
    // About a megabyte: 65 plans of 1,000 runs (16,000 bytes of runs apiece).
    let mut pool: Vec<Segments> = (0..100).map(|_| Segments::default()).collect();
    keep_pooled(&mut pool, |_| 1000);
    assert_eq!(pool.len(), 65);
    // Small plans are all kept.
    let mut pool: Vec<Segments> = (0..100).map(|_| Segments::default()).collect();
    keep_pooled(&mut pool, |_| 100);
    assert_eq!(pool.len(), 100);
}

/// A batch of scattered entries, its header included, is gathered from no more runs than
/// the kernel takes for one datagram.
#[test]
fn a_batch_of_scattered_entries_is_gathered_from_as_many_runs_as_the_kernel_takes() {
    let mut out = Outbox::default();
    for i in 0..mmsg::MAX_PARTS + 10 {
        let mine = chat(&mut out, &format!("{i}"));
        let other = chat(&mut out, "-");
        out.queue_to_member(addr(1), LocalId::ANY, mine, 1, 65507);
        out.queue(addr(2), LocalId::ANY, other);
    }
    let mut sender = Sender::new(65507);
    sender.plan(&out);
    let _ = sender.gather(&out, &Locals::default(), 0);
    let mut parts: Vec<usize> = sender
        .datagrams
        .iter()
        .filter(|d| d.to == addr(1))
        .map(|d| d.runs.len())
        .collect();
    parts.sort_unstable();
    assert_eq!(
        parts.last(),
        Some(&mmsg::MAX_PARTS),
        "the first batch is full"
    );
    assert_eq!(parts.len(), 2);
}

/// IP addresses kept from segmented sends: each is kept for its time and then dropped,
/// counted as new once only while kept; past the most remembered, those over are
/// dropped first, and only when none is, all are forgotten.
#[test]
fn destinations_kept_from_segmented_sends_expire_and_are_bounded() {
    let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
    let now = Instant::now();
    let long_ago = now - UNSEGMENTED_FOR - Duration::from_secs(1);
    let mut kept = Unsegmented::default();
    assert_eq!(kept.now(), None, "nothing kept: the clock is not read");
    assert!(kept.keep(ip(1), long_ago));
    assert!(kept.keep(ip(2), now));
    assert!(!kept.keep(ip(2), now), "kept already");
    let at = kept.now();
    assert!(!kept.keeps(&ip(1), at), "its time is up");
    assert!(kept.keeps(&ip(2), at));
    assert!(
        !kept.keeps(&ip(2), Some(now + UNSEGMENTED_FOR)),
        "over at its time"
    );
    assert!(!kept.keeps(&ip(3), at));
    assert_eq!(kept.until.len(), 1, "the one over is dropped");
    assert_eq!(kept.prune_at, Some(now + UNSEGMENTED_FOR));
    assert!(kept.keep(ip(1), now), "new again once dropped");

    // Full, with half of them over (just now): those go, the rest stay.
    let mut kept = Unsegmented::default();
    let half = MAX_UNSEGMENTED as u32 / 2;
    for i in 0..half {
        kept.keep(ip(i), now - UNSEGMENTED_FOR);
        kept.keep(ip(half + i), now);
    }
    assert_eq!(kept.until.len(), MAX_UNSEGMENTED);
    assert!(kept.keep(ip(u32::MAX >> 8), now));
    assert_eq!(kept.until.len(), MAX_UNSEGMENTED / 2 + 1);
    assert!(kept.until.contains_key(&ip(half)) && !kept.until.contains_key(&ip(0)));
    // Full, with none over: all are forgotten but the new one.
    for i in 0..half - 1 {
        kept.keep(ip(2 * half + i), now);
    }
    assert_eq!(kept.until.len(), MAX_UNSEGMENTED);
    assert!(kept.keep(ip(0), now));
    assert_eq!(kept.until.len(), 1);
    assert!(kept.keeps(&ip(0), Some(now)));
}

#[test]
fn batches_never_exceed_the_members_limit_nor_the_daemons() {
    // 1500-byte texts are 1502-byte frames, 1504 bytes as batch entries.
    assert_eq!(packing(1500, 5, 4096, 65507), (vec![2, 2, 1], 2 + 2 * 1504));
    // A member that announced 64 KiB gets 43 per datagram (2 + 43 * 1504 = 64674).
    let (counts, largest) = packing(1500, 100, 65507, 65507);
    assert_eq!(counts, vec![43, 43, 14]);
    assert!(largest <= 65507);
    // The daemon's cap wins over the member's.
    assert_eq!(packing(1500, 5, 65507, 4096), (vec![2, 2, 1], 2 + 2 * 1504));
    // A limit smaller than one message: each leaves alone, as its plain frame.
    assert_eq!(packing(1500, 3, 1024, 65507), (vec![1, 1, 1], 1502));
    // No batches for a member without the capability (limit 0).
    assert_eq!(packing(10, 3, 0, 65507), (vec![1, 1, 1], 12));
}

/// A last word queued in a later pass, to an address whose earlier last word is still
/// held, is held after it (not dropped), and nothing to another address counts as
/// dropped; once the kernel has room, both reach it, counted as sent and as deliveries.
#[test]
fn a_last_word_queued_behind_one_still_held_is_held_after_it() {
    let socket = loopback_socket();
    let (x, y) = (peer(), peer());
    let (to_x, to_y) = (x.local_addr().unwrap(), y.local_addr().unwrap());
    let mut out = Outbox::default();
    let closed = room_closed(&mut out);
    out.queue_last_word(to_x, LocalId::ANY, closed, 1);
    let mut sender = with_no_memory_for_room_closed(Sender::new(65507));
    let (mut locals, mut metrics) = (Locals::default(), Metrics::default());
    let now = Instant::now();
    sender.send_all(&socket, &mut out, &mut locals, &mut metrics, now);
    assert_eq!(metrics.last_words_held, 1);

    // x's other room closes too, while the first word is still held.
    let closed = room_closed(&mut out);
    let newer = chat(&mut out, "newer");
    out.queue_last_word(to_x, LocalId::ANY, closed, 3);
    out.queue_to_member(to_y, LocalId::ANY, newer, 2, 0);
    sender.send_all(&socket, &mut out, &mut locals, &mut metrics, now);
    let held: Vec<SocketAddr> = sender.held.iter().map(|word| word.to).collect();
    assert_eq!(held, [to_x, to_x]);
    assert_eq!(metrics.last_words_held, 2);
    assert!(metrics.send_errors.is_empty(), "{:?}", metrics.send_errors);
    assert_eq!(texts_received(&y, 1), ["newer"]);
    assert!(got_nothing(&x));

    sender.scratch.refusing = None;
    sender.send_held(&socket, &mut locals, &mut metrics, now);
    assert_eq!(received(&x, 2), [delivery::ROOM_CLOSED; 2]);
    assert!(!sender.holds_last_words());
    assert_eq!((metrics.datagrams_sent, metrics.deliveries), (3, 3));
}

/// A segmented send refused whose datagrams, sent again one apiece, find the send buffer
/// full: nothing proves the segments at fault (the first did not leave), so the
/// destination is not kept from segmented sends, and the datagrams count as
/// `would_block`.
#[test]
fn a_refused_segmented_send_whose_retry_finds_no_room_blames_no_one() {
    let Some(socket) = segmenting_socket(true) else {
        return;
    };
    let a = peer();
    let mut out = Outbox::default();
    // The stand-in finds the buffer full for these, one apiece (first byte 3); it does
    // not look at a segmented send, which the socket refuses.
    let full = out.payload(|b| b.extend_from_slice(&[3, 0, 1]));
    let to_a = a.local_addr().unwrap();
    queue_copies_to_member(&mut out, 3, to_a, LocalId::ANY, &full, 0, 0);
    let mut sender = segmenting_sender();
    sender.scratch.refusing = Some(mmsg::by_first_byte);
    let metrics = send_now(&mut sender, &socket, &mut out, &mut Locals::default());
    assert_eq!(sender.refused_calls, 1);
    assert_eq!(metrics.segmentation_refusals, 0);
    assert!(sender.unsegmented.until.is_empty());
    assert_eq!(metrics.datagrams_sent, 0);
    assert_eq!(metrics.send_errors.get("would_block"), Some(&3));
    assert!(got_nothing(&a));
}

/// A destination whose segmented send was refused gets one datagram per send for the 10
/// minutes docs/OPERATIONS.md names (the kernel's default lifetime of a path MTU it
/// learned), and segmented sends again from then on.
#[test]
fn a_destination_is_kept_from_segmented_sends_for_ten_minutes() {
    let ip = IpAddr::from([10, 0, 0, 1]);
    let t0 = Instant::now();
    let ten_minutes = t0 + Duration::from_secs(600);
    let mut kept = Unsegmented::default();
    assert!(kept.keep(ip, t0));
    assert!(kept.keeps(&ip, Some(ten_minutes - Duration::from_millis(1))));
    assert!(!kept.keeps(&ip, Some(ten_minutes)));
}

/// Which runs of fan-outs the plan works out member by member, ahead (the same plan, sooner;
/// `random_fanouts_plan_what_their_sends_would` checks the sameness): a run of two or more to
/// an audience at distinct addresses, for its members with batches, or to several rooms'
/// audiences in turn, at distinct addresses and slots; not one fan-out alone, nor one to each
/// audience, not an audience without batch members (nor with batches capped to nothing by the
/// daemon), not one with two members at one address. Rooms whose messages come together, or
/// that share an address, are worked out turn by turn.
#[test]
fn runs_of_fanouts_to_distinct_batch_members_are_worked_out_ahead() {
    let recipient = |port: u16, member: u32, batch_limit: u16| crate::outbox::Recipient {
        to: addr(port),
        from: LocalId::ANY,
        member,
        batch_limit,
        sequenced: false,
    };
    // Members planned ahead for `messages` fan-outs from member 0 to `audience`, with the
    // daemon's cap on batches at `cap`.
    let ahead = |audience: &[crate::outbox::Recipient], messages: usize, cap: usize| {
        let mut out = Outbox::default();
        let a = out.add_audience((0, 0), audience.iter().copied());
        for i in 0..messages {
            let frame = chat(&mut out, &format!("m{i}"));
            let takers = out.takers(a, Some(false));
            out.queue_fanout(a, 0, (Some(frame), None), takers);
        }
        let mut sender = Sender::new(cap);
        sender.plan(&out);
        sender.worked_ahead
    };
    let mixed = [
        recipient(1, 0, 4096),
        recipient(2, 1, 4096),
        recipient(3, 2, 0),
    ];
    assert_eq!(ahead(&mixed, 2, 65507), 2, "the two with batches");
    assert_eq!(ahead(&mixed, 1, 65507), 0, "one fan-out alone");
    assert_eq!(ahead(&mixed, 2, 0), 0, "batches capped to nothing");
    let plain = [recipient(1, 0, 0), recipient(2, 1, 0)];
    assert_eq!(ahead(&plain, 3, 65507), 0, "no batch member");
    let shared = [
        recipient(1, 0, 4096),
        recipient(2, 1, 4096),
        recipient(2, 2, 4096),
    ];
    assert_eq!(ahead(&shared, 3, 65507), 0, "two members at one address");
    // Rooms in turn: fan-outs from the first member of each audience, to the audiences
    // `order` names, one message each.
    let in_turn = |audiences: &[&[crate::outbox::Recipient]], order: &[usize]| {
        let mut out = Outbox::default();
        let keys: Vec<usize> = (0..audiences.len())
            .map(|room| out.add_audience((room, 0), audiences[room].iter().copied()))
            .collect();
        for (i, &room) in order.iter().enumerate() {
            let frame = chat(&mut out, &format!("m{i}"));
            let takers = out.takers(keys[room], Some(false));
            let sender = audiences[room][0].member;
            out.queue_fanout(keys[room], sender, (Some(frame), None), takers);
        }
        let mut sender = Sender::new(65507);
        sender.plan(&out);
        (sender.worked_ahead, sender.mixed_ahead)
    };
    let other = [recipient(4, 3, 4096), recipient(5, 4, 0)];
    let rooms = [&mixed[..], &other[..]];
    assert_eq!(in_turn(&rooms, &[0, 1, 0, 1]), (3, 1), "two rooms in turn");
    assert_eq!(in_turn(&rooms, &[0, 1]), (0, 0), "a message to each");
    assert_eq!(
        in_turn(&rooms, &[0, 0, 1, 1]),
        (3, 0),
        "each room's together"
    );
    let same_slot = [recipient(4, 3, 4096), recipient(5, 1, 4096)];
    let rooms = [&mixed[..], &same_slot[..]];
    assert_eq!(in_turn(&rooms, &[0, 1, 0, 1]), (0, 0), "a slot in both");
    let same_address = [recipient(4, 3, 4096), recipient(2, 4, 4096)];
    let rooms = [&mixed[..], &same_address[..]];
    assert_eq!(in_turn(&rooms, &[0, 1, 0, 1]), (0, 0), "an address in both");
    // Turn by turn then, as each room's messages together.
    assert_eq!(
        in_turn(&rooms, &[0, 0, 1, 1]),
        (4, 0),
        "together, an address in both"
    );
    assert_eq!(
        in_turn(&rooms, &[0, 0, 1, 0, 0]),
        (4, 0),
        "around another's, one in both"
    );
}

#[test]
fn members_that_sent_none_of_a_run_get_copies_of_one_such_members_frames() {
    let recipient = |member: u32, batch_limit: u16| crate::outbox::Recipient {
        to: addr(400 + member as u16),
        from: LocalId::ANY,
        member,
        batch_limit,
        sequenced: false,
    };
    // Members 1–2 and 3–4 take frames of two limits; 5 takes no batches.
    let audience = [
        recipient(0, 4096),
        recipient(1, 4096),
        recipient(2, 4096),
        recipient(3, 600),
        recipient(4, 600),
        recipient(5, 0),
    ];
    // Frames copied for 40 fan-outs of 40-byte texts from `senders` in turn, after a message
    // alone to each member of `before`; the plan must be the one-by-one plan.
    let copied = |senders: &[u32], before: &[u32]| {
        let mut out = Outbox::default();
        for &m in before {
            let alone = chat(&mut out, "before");
            out.queue_to_member(addr(400 + m as u16), LocalId::ANY, alone, m, 4096);
        }
        let a = out.add_audience((0, 0), audience);
        for i in 0..40 {
            let frame = chat(&mut out, &format!("{i:>40}"));
            let takers = out.takers(a, Some(false));
            out.queue_fanout(a, senders[i % senders.len()], (Some(frame), None), takers);
        }
        let mut sender = Sender::new(65507);
        let planned = sender.dry_run(&out);
        assert_eq!(planned, Sender::new(65507).dry_run(&out.expanded()));
        let frames_to = |port: u16| {
            let to_member = planned.datagrams.iter().filter(|d| d.to.port() == port);
            to_member.count()
        };
        let limit_600 = frames_to(403);
        assert!(limit_600 > 1, "{limit_600} frames under 600 bytes");
        (sender.copied_ahead, limit_600)
    };
    let (n, limit_600) = copied(&[0], &[]);
    assert_eq!(
        n,
        1 + limit_600,
        "member 2's of member 1, member 4's of member 3"
    );
    let (n, limit_600) = copied(&[0, 3], &[]);
    assert_eq!(n, 1, "member 3 sent: only member 2's copied");
    assert!(limit_600 > 1);
    let (n, limit_600) = copied(&[0], &[1, 3]);
    assert_eq!(
        n, 0,
        "members 1 and 3 had a batch open, so 2 and 4 were worked out"
    );
    assert!(limit_600 > 1);
    let (n, limit_600) = copied(&[0], &[1]);
    assert_eq!(
        n, limit_600,
        "member 1 had a batch open: only member 4's copied"
    );
}

/// The plan against the batch encoder, on random outboxes.
mod planned_against_push_batch_entry {
    use super::*;
    use crate::outbox::{Queued, Recipient};
    use rand::{rngs::StdRng, RngExt, SeedableRng};
    use ucrp::delivery::Delivery;

    /// Random outboxes (empty, short and long payloads, members with and without batches,
    /// moves within a pass; segmenting on for odd seeds): every batch is the frame begin_batch
    /// and push_batch_entry build from its entries, within the cap; every segmented send,
    /// split as the kernel splits it, is its datagrams, within the kernel's limits; and each
    /// member gets its messages in order.
    #[test]
    fn random_outboxes_plan_exact_bytes_in_order() {
        let mut segmented_sends = 0;
        for seed in 0..500u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut out = Outbox::default();
            let npay = rng.random_range(1..20);
            let payloads: Vec<Range<usize>> = (0..npay)
                .map(|i| {
                    let len = match rng.random_range(0..10) {
                        0 => 0,
                        1 => rng.random_range(1000..3000),
                        _ => rng.random_range(1..40),
                    };
                    out.payload(|b| {
                        for j in 0..len {
                            b.push((i * 31 + j) as u8 | 1);
                        }
                    })
                })
                .collect();
            let nsend = rng.random_range(0..400);
            let cap = [512usize, 1472, 4096, 65507][rng.random_range(0..4)];
            let mut expected: Vec<(u32, Vec<u8>)> = Vec::new();
            for _ in 0..nsend {
                let p = payloads[rng.random_range(0..npay)].clone();
                let member = rng.random_range(0..5u32);
                let port = 100 + member as u16 * 2 + u16::from(rng.random_range(0..20) == 0);
                let limit = [0u16, 600, 4096, 65507][(member as usize) % 4];
                let limit = if rng.random_range(0..30) == 0 {
                    0
                } else {
                    limit
                };
                expected.push((member, out.get(p.clone()).to_vec()));
                out.queue_to_member(
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    LocalId::ANY,
                    p,
                    member,
                    limit,
                );
            }
            let mut sender = Sender::new(cap);
            sender.set_segmentation(seed % 2 == 1);
            sender.plan(&out);
            let parts = sender.gather(&out, &Locals::default(), 0);
            let mut got: Vec<(u32, Vec<u8>)> = Vec::new();
            let mut total = 0;
            for (datagram, planned) in sender.datagrams.iter().zip(&sender.plan) {
                let (to2, n) = (&planned.to, &planned.messages);
                let (to, runs) = (&datagram.to, &datagram.runs);
                assert_eq!(to, to2);
                assert!(runs.len() <= mmsg::MAX_PARTS);
                let bytes = datagram_bytes(&parts, runs);
                let member = ((to.port() - 100) / 2) as u32;
                let frames: Vec<Vec<u8>> = if datagram.segment > 0 {
                    let size = usize::from(datagram.segment);
                    assert!(size <= MAX_SEGMENT_BYTES, "seed {seed}");
                    assert!(runs.len() <= mmsg::MAX_SEGMENTS, "seed {seed}");
                    assert!(bytes.len() <= mmsg::MAX_SEGMENTED_BYTES, "seed {seed}");
                    segmented_sends += 1;
                    bytes.chunks(size).map(<[u8]>::to_vec).collect()
                } else if *n >= 2 {
                    assert!(bytes.len() <= cap, "seed {seed}");
                    let Ok(Delivery::Batch(body)) = delivery::parse(&bytes) else {
                        panic!("seed {seed}: not a batch")
                    };
                    let f: Vec<Vec<u8>> = delivery::batch_entries(body)
                        .map(|e| e.unwrap().to_vec())
                        .collect();
                    let mut built = Vec::new();
                    delivery::begin_batch(&mut built);
                    for e in &f {
                        delivery::push_batch_entry(e, &mut built).unwrap();
                    }
                    assert_eq!(built, bytes);
                    f
                } else {
                    vec![bytes]
                };
                assert_eq!(frames.len(), *n, "seed {seed}");
                total += n;
                got.extend(frames.into_iter().map(|f| (member, f)));
            }
            assert_eq!(total, nsend);
            for m in 0..5 {
                let e: Vec<&Vec<u8>> = expected.iter().filter(|x| x.0 == m).map(|x| &x.1).collect();
                let g: Vec<&Vec<u8>> = got.iter().filter(|x| x.0 == m).map(|x| &x.1).collect();
                assert_eq!(e, g, "seed {seed} member {m}");
            }
        }
        assert!(
            segmented_sends > 100,
            "only {segmented_sends} segmented sends"
        );
    }

    /// Random outboxes of fan-outs (audiences of members with and without batches and
    /// sequenced frames, some with two members at one address, some with a member moved,
    /// senders in the audience or not), sends to one member, last words and datagrams for no
    /// member, payloads short, long and too long for a batch entry, members heard from either
    /// of two addresses of ours; segmenting on for odd seeds; two passes on the same senders):
    /// the plan is exactly the one of every fan-out queued as its sends, one by one, entry for
    /// entry, and uses as many batch and segment plans.
    #[test]
    fn random_fanouts_plan_what_their_sends_would() {
        let (mut apart, mut shared, mut rooms_in_turn) = (0, 0, 0);
        let mut copied = 0;
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            // Two rooms of six: members 0–5 and 6–11.
            let members = 12u32;
            let limits: Vec<u16> = (0..members)
                .map(|_| [0u16, 600, 4096, 65507][rng.random_range(0..4)])
                .collect();
            let sequenced: Vec<bool> = (0..members).map(|_| rng.random_bool(0.3)).collect();
            // Members 0 and 7, of the two rooms, share a socket in a third of the outboxes.
            let sharing = seed % 3 == 0;
            let home = |m: u32| 300 + if sharing && m == 7 { 0 } else { m as u16 };
            let mut keys = 0;
            let payload = |out: &mut Outbox, rng: &mut StdRng, tag: u8| {
                let len = match rng.random_range(0..400) {
                    0 => 70_000,
                    1..=30 => rng.random_range(1000..3000),
                    _ => rng.random_range(1..40),
                };
                out.payload(|b| b.extend((0..len).map(|j| (j as u8 ^ tag) | 1)))
            };
            let mut locals = Locals::default();
            let sources = [
                LocalId::ANY,
                source(&mut locals, "192.0.2.1".parse().unwrap()),
                source(&mut locals, "192.0.2.2".parse().unwrap()),
            ];
            let cap = [512usize, 1472, 4096, 65507][rng.random_range(0..4)];
            let sender = || {
                let mut sender = Sender::new(cap);
                sender.set_segmentation(seed % 2 == 1);
                sender
            };
            let (mut by_fanouts, mut one_by_one) = (sender(), sender());
            for pass in 0..2 {
                let mut out = Outbox::default();
                let mut made = Vec::new();
                for i in 0..rng.random_range(0..300) {
                    let tag = i as u8;
                    match rng.random_range(0..100) {
                        0..=74 => {
                            // Found again by its key, as the registry finds it (an audience
                            // only its sender was in is forgotten): mostly the last one's, or
                            // another room's, as when rooms take turns.
                            let reuse = (!made.is_empty() && rng.random_range(0..10) > 0)
                                .then(|| match rng.random_range(0..3) {
                                    0 => made[rng.random_range(0..made.len())],
                                    _ => made[made.len() - 1],
                                })
                                .and_then(|(key, distinct)| {
                                    Some((out.audience(key)?, distinct, key))
                                });
                            let (audience, distinct, key) = reuse.unwrap_or_else(|| {
                                // One room's members; now and then both rooms' (a slot in two
                                // audiences, as after a member left and a newcomer to the other
                                // room took its slot).
                                let room = rng.random_range(0..2u32);
                                let mut picked: Vec<u32> = match rng.random_range(0..5) {
                                    0 => (0..members).collect(),
                                    _ => (room * 6..room * 6 + 6).collect(),
                                };
                                picked.retain(|_| rng.random_bool(0.6));
                                if picked.is_empty() {
                                    picked.push(rng.random_range(0..members));
                                }
                                let recipients: Vec<Recipient> = picked
                                    .iter()
                                    .map(|&m| {
                                        let moved = rng.random_range(0..20) == 0;
                                        let port = if moved { 320 + m as u16 } else { home(m) };
                                        Recipient {
                                            to: SocketAddr::from(([127, 0, 0, 1], port)),
                                            from: sources[rng.random_range(0..3)],
                                            member: m,
                                            batch_limit: limits[m as usize],
                                            sequenced: sequenced[m as usize],
                                        }
                                    })
                                    .collect();
                                let ports: std::collections::HashSet<SocketAddr> =
                                    recipients.iter().map(|r| r.to).collect();
                                let distinct = ports.len() == recipients.len();
                                let key = (keys, 0);
                                keys += 1;
                                let audience = out.add_audience(key, recipients);
                                (audience, distinct, key)
                            });
                            if made.last() != Some(&(key, distinct)) {
                                made.push((key, distinct));
                            }
                            // Mostly one of the audience; now and then any member (one not
                            // registered is in no audience).
                            let recipients = out.recipients(audience).to_vec();
                            let sender = if rng.random_range(0..10) == 0 {
                                rng.random_range(0..members + 2)
                            } else {
                                recipients[rng.random_range(0..recipients.len())].member
                            };
                            let among = recipients.iter().find(|r| r.member == sender);
                            let takers = out.takers(audience, among.map(|r| r.sequenced));
                            let plain = payload(&mut out, &mut rng, tag);
                            let seq = payload(&mut out, &mut rng, tag ^ 0x80);
                            let before = out.queued().len();
                            out.queue_fanout(audience, sender, (Some(plain), Some(seq)), takers);
                            let follows = before > 0
                                && matches!(&out.queued()[before - 1],
                                    Queued::Fanout(f) if f.audience() == audience);
                            if follows && out.queued().len() > before {
                                if distinct {
                                    apart += 1;
                                } else {
                                    shared += 1;
                                }
                            }
                        }
                        roll => {
                            let m = rng.random_range(0..members);
                            let to = SocketAddr::from(([127, 0, 0, 1], home(m)));
                            let p = payload(&mut out, &mut rng, tag);
                            let limit = limits[m as usize];
                            match roll {
                                75..=89 => out.queue_to_member(to, LocalId::ANY, p, m, limit),
                                90..=94 => out.queue_last_word(to, LocalId::ANY, p, m),
                                _ => out.queue(to, LocalId::ANY, p),
                            }
                        }
                    }
                }
                let (mixed, copies) = (by_fanouts.mixed_ahead, by_fanouts.copied_ahead);
                let got = by_fanouts.dry_run(&out);
                rooms_in_turn += by_fanouts.mixed_ahead - mixed;
                copied += by_fanouts.copied_ahead - copies;
                let want = one_by_one.dry_run(&out.expanded());
                if got != want {
                    let brief = |plan: &DryRun| {
                        let entries: Vec<String> = plan
                            .datagrams
                            .iter()
                            .map(|d| {
                                let (port, from, len) = (d.to.port(), d.from, d.bytes.len());
                                let (segment, n) = (d.segment, d.messages);
                                let (sealed, last) = (d.sealed, d.last_word);
                                format!("{port}/{from:?}:{len}b/{segment}/{n}/{sealed}/{last}")
                            })
                            .collect();
                        format!(
                            "{} (batches {}, groups {})",
                            entries.join(" "),
                            plan.batches,
                            plan.segmented_sends
                        )
                    };
                    panic!(
                        "seed {seed} pass {pass}: planned\n{}\none by one\n{}",
                        brief(&got),
                        brief(&want)
                    );
                }
            }
        }
        assert!(
            apart > 1000,
            "only {apart} fan-outs after one to the same distinct audience"
        );
        assert!(
            shared > 200,
            "only {shared} after one to the same audience sharing an address"
        );
        assert!(
            rooms_in_turn > 100,
            "only {rooms_in_turn} runs to several audiences worked out ahead"
        );
        assert!(
            copied > 1000,
            "only {copied} frames copied from another member's"
        );
    }

    /// What a queued send was, for checking where the plan put it.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Kind {
        /// Chat for a member with this batch limit (0: none).
        Chat(u16),
        LastWord,
        /// A datagram for no member (an answer to a token of a room gone).
        NoMember,
    }

    /// Random outboxes where members share addresses (one socket in several rooms), with
    /// last words and datagrams for no member among the chat; segmenting on for odd seeds.
    /// Each address gets exactly what was queued for it, in the order queued; a batch holds
    /// only chat for members with batches, within each one's limit and the cap; a segmented
    /// send only chat for members without; last words and datagrams for no member leave
    /// alone.
    #[test]
    fn random_outboxes_keep_the_order_at_each_address() {
        let (mut batches, mut segmented_sends) = (0, 0);
        for seed in 0..500u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut out = Outbox::default();
            let payloads: Vec<Range<usize>> = (0..rng.random_range(1..8))
                .map(|i| {
                    let len = match rng.random_range(0..12) {
                        0 => rng.random_range(700..1500),
                        _ => rng.random_range(1..24),
                    };
                    out.payload(|b| b.extend((0..len).map(|j| (i * 37 + j) as u8 | 1)))
                })
                .collect();
            let cap = [512usize, 1472, 4096, 65507][rng.random_range(0..4)];
            // Six members at three ports: 0 and 3 at port 200, 1 and 4 at 201, 2 and 5 at 202.
            let limits = [0u16, 600, 4096, 65507, 0, 1000];
            let mut queued: Vec<(u16, Vec<u8>, Kind)> = Vec::new();
            for _ in 0..rng.random_range(0..300) {
                let p = payloads[rng.random_range(0..payloads.len())].clone();
                let member = rng.random_range(0..6u32);
                let port = if rng.random_range(0..20) == 0 {
                    200 + rng.random_range(0..3u16) // moved within the pass
                } else {
                    200 + (member % 3) as u16
                };
                let to = SocketAddr::from(([127, 0, 0, 1], port));
                let kind = match rng.random_range(0..100) {
                    0..=6 => Kind::LastWord,
                    7..=13 => Kind::NoMember,
                    _ => Kind::Chat(limits[member as usize]),
                };
                queued.push((port, out.get(p.clone()).to_vec(), kind));
                match kind {
                    Kind::Chat(limit) => out.queue_to_member(to, LocalId::ANY, p, member, limit),
                    Kind::LastWord => out.queue_last_word(to, LocalId::ANY, p, member),
                    Kind::NoMember => out.queue(to, LocalId::ANY, p),
                }
            }
            let mut sender = Sender::new(cap);
            sender.set_segmentation(seed % 2 == 1);
            sender.plan(&out);
            let parts = sender.gather(&out, &Locals::default(), 0);
            // Every datagram's frames, with the datagram they left in.
            let mut sent: Vec<(u16, Vec<u8>, usize)> = Vec::new();
            for (d, (datagram, planned)) in sender.datagrams.iter().zip(&sender.plan).enumerate() {
                let bytes = datagram_bytes(&parts, &datagram.runs);
                let frames: Vec<Vec<u8>> = if datagram.segment > 0 {
                    segmented_sends += 1;
                    let size = usize::from(datagram.segment);
                    bytes.chunks(size).map(<[u8]>::to_vec).collect()
                } else if planned.messages >= 2 {
                    batches += 1;
                    assert!(bytes.len() <= cap, "seed {seed}");
                    let Ok(Delivery::Batch(body)) = delivery::parse(&bytes) else {
                        panic!("seed {seed}: not a batch")
                    };
                    delivery::batch_entries(body)
                        .map(|entry| entry.unwrap().to_vec())
                        .collect()
                } else {
                    vec![bytes.clone()]
                };
                assert_eq!(frames.len(), planned.messages, "seed {seed}");
                let port = datagram.to.port();
                sent.extend(frames.into_iter().map(|frame| (port, frame, d)));
            }
            for port in 200..203 {
                let want: Vec<&(u16, Vec<u8>, Kind)> =
                    queued.iter().filter(|q| q.0 == port).collect();
                let got: Vec<&(u16, Vec<u8>, usize)> =
                    sent.iter().filter(|s| s.0 == port).collect();
                let want_bytes: Vec<&[u8]> = want.iter().map(|q| &q.1[..]).collect();
                let got_bytes: Vec<&[u8]> = got.iter().map(|s| &s.1[..]).collect();
                // On a mismatch, each payload is shown by its length and first byte.
                let brief = |frames: &[&[u8]]| -> Vec<(usize, Option<u8>)> {
                    frames
                        .iter()
                        .map(|f| (f.len(), f.first().copied()))
                        .collect()
                };
                assert!(
                    want_bytes == got_bytes,
                    "seed {seed} port {port}: queued {:?}, sent {:?}",
                    brief(&want_bytes),
                    brief(&got_bytes)
                );
                // What each frame was queued as, against the datagram that carried it.
                for (q, s) in want.iter().zip(&got) {
                    let d = s.2;
                    let (datagram, planned) = (&sender.datagrams[d], &sender.plan[d]);
                    let whole: usize = parts[datagram.runs.clone()].iter().map(|r| r.len()).sum();
                    match q.2 {
                        Kind::LastWord | Kind::NoMember => {
                            assert_eq!(planned.messages, 1, "seed {seed}: {:?} packed", q.2);
                            assert_eq!(datagram.segment, 0, "seed {seed}: {:?} segmented", q.2);
                        }
                        Kind::Chat(limit) if datagram.segment > 0 => {
                            assert_eq!(limit, 0, "seed {seed}: a member with batches segmented")
                        }
                        Kind::Chat(limit) if planned.messages >= 2 => {
                            assert!(limit > 0, "seed {seed}: a batch to a member without");
                            assert!(whole <= usize::from(limit), "seed {seed}: over its limit");
                        }
                        Kind::Chat(_) => {}
                    }
                }
            }
        }
        assert!(batches > 100, "only {batches} batches");
        assert!(
            segmented_sends > 100,
            "only {segmented_sends} segmented sends"
        );
    }
}
