//! A worker's cycle: a room built, chatted in, half left and closed, each step checked from
//! every member's side; then junk the daemon must count as dropped, and now and then a
//! silent host it must expire.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tcrp::payload::{Caps, Request, RequestForm};
use ucrp::datagram;
use ucrp::delivery::{self, Delivery, Notice};

use crate::cli::CapsArg;
use crate::error::{Context, Error, Result};
use crate::handshake;
use crate::members::{self, is_probe, recv_before, Room};

use super::{Counters, Plan, JUNK_CLOSE_DEADLINE, RECEIVE_DEADLINE};

/// One worker: cycles until told to stop.
pub(super) fn work(
    worker: usize,
    tcp: SocketAddr,
    udp: SocketAddr,
    plan: Plan,
    counters: &Counters,
    stop: &AtomicBool,
) {
    let mut rng = StdRng::seed_from_u64(0x50a4 + worker as u64);
    let junk = match UdpSocket::bind("127.0.0.1:0").ctx("bind the junk socket") {
        Ok(junk) => junk,
        Err(e) => return counters.failed(&e),
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let result = cycle(worker, n, tcp, udp, plan, counters, &mut rng).and_then(|room| {
            send_junk(&junk, udp, &room, &mut rng, counters)?;
            if n.is_multiple_of(8) {
                send_junk_connections(tcp, &room.name, counters)?;
            }
            if n == 1 || n.is_multiple_of(16) {
                make_silent_host(tcp, &format!("{}-silent", room.name), counters)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                counters.cycles.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => counters.failed(&e),
        }
    }
}

/// One room's life; returns the (closed) room, whose tokens the junk reuses.
fn cycle(
    worker: usize,
    n: u64,
    tcp: SocketAddr,
    udp: SocketAddr,
    plan: Plan,
    counters: &Counters,
    rng: &mut StdRng,
) -> Result<Room> {
    let count = rng.random_range(2..=plan.max_members);
    let caps = if rng.random_bool(0.5) {
        CapsArg::Plain
    } else {
        CapsArg::Batch
    }
    .request();
    // The host hears members leave, so that it speaks again only once they are gone.
    let host_caps = (caps.0.with(Caps::NOTICES), caps.1);
    let name = format!("soak-{worker}-{n}");
    let room = members::build_room_with(tcp, udp, &name, count, (host_caps, caps), plan.rcvbuf)?;
    counters.members.fetch_add(count as u64, Ordering::Relaxed);
    // Everyone speaks once; everyone else must hear it.
    for i in 0..count {
        send(&room, i, &format!("c{n} m{i}"))?;
    }
    counters.messages.fetch_add(count as u64, Ordering::Relaxed);
    for i in 0..count {
        let want = (0..count).filter(|&j| j != i).map(|j| format!("c{n} m{j}"));
        await_texts(&room, i, want.collect(), false, counters)?;
    }
    // The odd members leave; once the host has heard them go, it speaks to those still there.
    let leavers: Vec<usize> = (1..count).step_by(2).collect();
    for &i in &leavers {
        send(&room, i, datagram::LEAVE)?;
    }
    await_left(&room, &leavers)?;
    let after = format!("c{n} after");
    send(&room, 0, &after)?;
    counters.messages.fetch_add(1, Ordering::Relaxed);
    let stayers: Vec<usize> = (2..count).step_by(2).collect();
    for &i in &stayers {
        await_texts(&room, i, HashSet::from([after.clone()]), false, counters)?;
    }
    // The host leaves: the room closes for everyone still in it. A member still there that
    // has the closure shows that the daemon is done with the host's last message and its
    // leave, and it sends in order, so whatever it sent a member that had left is in that
    // member's socket by now. (A room of two keeps no member to show it; the host's dead
    // token would earn a reply, but at most one a second per source address, and the
    // kernel hands the ports of closed sockets out again, so that reply may not come.)
    send(&room, 0, datagram::LEAVE)?;
    for &i in &stayers {
        await_texts(&room, i, HashSet::new(), true, counters)?;
    }
    if !stayers.is_empty() {
        for &i in &leavers {
            let late = drain(&room.members[i].socket)?;
            counters.unexpected.fetch_add(late, Ordering::Relaxed);
        }
    }
    Ok(room)
}

/// Member `i` sends `text` with its token.
fn send(room: &Room, i: usize, text: &str) -> Result<()> {
    let m = &room.members[i];
    let mut d = Vec::new();
    datagram::encode(room.name.as_bytes(), m.token.as_bytes(), text, &mut d)?;
    m.socket.send(&d).ctx("send a datagram")?;
    Ok(())
}

/// Reads member `i`'s socket until every text in `want` has come (and, with `closure`, the
/// room-closed notice), counting deliveries; a text that comes twice or was not wanted, and
/// a room-closed notice not waited for, count as unexpected.
fn await_texts(
    room: &Room,
    i: usize,
    mut want: HashSet<String>,
    mut closure: bool,
    counters: &Counters,
) -> Result<()> {
    let socket = &room.members[i].socket;
    counters
        .expected
        .fetch_add(want.len() as u64, Ordering::Relaxed);
    counters
        .closures_expected
        .fetch_add(u64::from(closure), Ordering::Relaxed);
    let deadline = Instant::now() + RECEIVE_DEADLINE;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    while !want.is_empty() || closure {
        let Some(n) = recv_before(socket, &mut buf, deadline)? else {
            return Err(Error::Soak(format!(
                "member {i} of room {:?}: {} messages{} missing after {RECEIVE_DEADLINE:?}",
                room.name,
                want.len(),
                if closure { " and the closure" } else { "" }
            )));
        };
        if matches!(delivery::parse(&buf[..n]), Ok(Delivery::RoomClosed)) {
            if closure {
                closure = false;
                counters.closures_received.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.unexpected.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        for text in members::texts(&buf[..n])
            .into_iter()
            .filter(|t| !is_probe(t))
        {
            if want.remove(text) {
                counters.received.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Waits until the host (member 0, which asked for notices) has heard every member in
/// `leavers` leave.
fn await_left(room: &Room, leavers: &[usize]) -> Result<()> {
    let mut names: HashSet<String> = leavers.iter().map(|i| format!("m{i}")).collect();
    let deadline = Instant::now() + RECEIVE_DEADLINE;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    while !names.is_empty() {
        let Some(n) = recv_before(&room.members[0].socket, &mut buf, deadline)? else {
            return Err(Error::Soak(format!(
                "the host of room {:?} never heard {} of its members leave",
                room.name,
                names.len()
            )));
        };
        for (what, name) in notices(&buf[..n]) {
            if what == Notice::Left {
                names.remove(name);
            }
        }
    }
    Ok(())
}

/// The notices in one delivery datagram (batches unpacked).
pub(super) fn notices(bytes: &[u8]) -> Vec<(Notice, &str)> {
    let one = |d| match delivery::parse(d) {
        Ok(Delivery::Notice { what, name }) => Some((what, name)),
        _ => None,
    };
    match delivery::parse(bytes) {
        Ok(Delivery::Batch(body)) => delivery::batch_entries(body)
            .filter_map(|e| one(e.ok()?))
            .collect(),
        _ => one(bytes).into_iter().collect(),
    }
}

/// Reads whatever is waiting on `socket` without waiting; returns how many chat messages
/// (probes aside) and room-closed notices it held: for a member that left, none may come.
fn drain(socket: &UdpSocket) -> Result<u64> {
    socket.set_nonblocking(true).ctx("set non-blocking")?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    let mut count = 0;
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let d = &buf[..n];
                let chat = members::texts(d)
                    .into_iter()
                    .filter(|t| !is_probe(t))
                    .count();
                let closed = matches!(delivery::parse(d), Ok(Delivery::RoomClosed));
                count += chat as u64 + u64::from(closed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(count),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).ctx("drain"),
        }
    }
}

/// Datagrams the daemon must drop and count: random bytes, the room's frame with a token one
/// byte off (the room is closed by now, so a real token would earn a reply), and a header
/// that claims more than the datagram holds.
fn send_junk(
    junk: &UdpSocket,
    udp: SocketAddr,
    room: &Room,
    rng: &mut StdRng,
    counters: &Counters,
) -> Result<()> {
    let mut noise = vec![0u8; rng.random_range(0..64)];
    rng.fill(&mut noise[..]);
    junk.send_to(&noise, udp).ctx("send junk")?;
    let mut token = room.members[0].token.clone().into_bytes();
    if let Some(last) = token.last_mut() {
        *last = if *last == b'0' { b'1' } else { b'0' };
    }
    let mut d = Vec::new();
    datagram::encode(room.name.as_bytes(), &token, "junk", &mut d)?;
    junk.send_to(&d, udp).ctx("send junk")?;
    junk.send_to(&[200, 1, b'x'], udp).ctx("send junk")?;
    counters.junk_datagrams.fetch_add(3, Ordering::Relaxed);
    Ok(())
}

/// Two bad handshake connections: one that stops inside a header and is closed by this side,
/// and a whole header of garbage (an HTTP request: operation byte `E`), which the daemon must
/// close of its own accord.
fn send_junk_connections(tcp: SocketAddr, room: &str, counters: &Counters) -> Result<()> {
    let mut half = TcpStream::connect(tcp).ctx("connect for junk")?;
    let _ = half.write_all(&[room.len().min(255) as u8, 1, 1]);
    drop(half);
    let mut garbage = TcpStream::connect(tcp).ctx("connect for junk")?;
    garbage
        .write_all(b"GET /rooms HTTP/1.1\r\nHost: ocmd\r\nAccept: */*\r\n\r\n")
        .ctx("send junk")?;
    let deadline = Instant::now() + JUNK_CLOSE_DEADLINE;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Soak(format!(
                "a connection of garbage was still open after {JUNK_CLOSE_DEADLINE:?}"
            )));
        }
        garbage
            .set_read_timeout(Some(left))
            .ctx("set read timeout")?;
        match garbage.read(&mut buf) {
            // A refusal, if the daemon sends one, comes before the end of the stream.
            Ok(n) if n > 0 => {}
            Ok(_) => break,
            // A reset: the daemon closed with bytes of ours unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).ctx("read from a connection of garbage"),
        }
    }
    counters.junk_connections.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Creates room `name` with a host that promises a keepalive every second and never sends
/// one: the daemon must expire it, which closes the room.
fn make_silent_host(tcp: SocketAddr, name: &str, counters: &Counters) -> Result<()> {
    let host = Request {
        form: RequestForm::JsonObject,
        keepalive_secs: Some(1),
        ..Request::original("m0")
    };
    handshake::send_request(tcp, true, name, &host)?;
    counters.silent_hosts.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
