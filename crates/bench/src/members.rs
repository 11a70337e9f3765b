//! Room members with their own UDP sockets: joining them over TCRP, registering them over
//! UCRP, and confirming the registration with probe messages before any measurement.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tcrp::payload::Caps;
use ucrp::datagram;
use ucrp::delivery::{self, Delivery};

use crate::cli::CapsArg;
use crate::error::{Context, Error, Result};
use crate::handshake::request_token;
use crate::receivers::size_rcvbuf;

/// Registration rounds (REGISTER all, then probe) before giving up.
const REGISTER_ROUNDS: usize = 6;
/// How long a member waits for a probe in one round.
const PROBE_WAIT: Duration = Duration::from_millis(500);
/// Threads joining members concurrently.
const JOIN_THREADS: usize = 8;

/// One member (`m<index>`, host `m0`): its token and its socket.
#[derive(Debug)]
pub struct Member {
    /// The secret token.
    pub token: String,
    /// Its own UDP socket, connected to the daemon once registered.
    pub socket: Arc<UdpSocket>,
}

/// A room whose members are all registered.
#[derive(Debug)]
pub struct Room {
    /// Room name.
    pub name: String,
    /// Members, host first.
    pub members: Vec<Member>,
    /// SO_RCVBUF the kernel granted the members' sockets, bytes.
    pub rcvbuf: usize,
}

impl Room {
    /// Every member's socket.
    pub fn sockets(&self) -> Vec<Arc<UdpSocket>> {
        self.members.iter().map(|m| Arc::clone(&m.socket)).collect()
    }

    /// The datagram prefix member `i` puts before its text: `[R][T][room][token]`.
    pub fn prefix(&self, i: usize) -> Result<Vec<u8>> {
        let member = self
            .members
            .get(i)
            .ok_or_else(|| Error::Usage(format!("member {i} of {}", self.members.len())))?;
        let mut out = Vec::new();
        // A one-byte text stands in for the message; it is cut off again.
        datagram::encode(self.name.as_bytes(), member.token.as_bytes(), "x", &mut out)?;
        out.pop();
        Ok(out)
    }
}

/// Creates room `name` with `count` members (host `m0`, then `m1`...), each with its own
/// socket, registers them all and confirms it.
pub fn build_room(
    tcp: SocketAddr,
    udp: SocketAddr,
    name: &str,
    count: usize,
    caps: CapsArg,
    rcvbuf: usize,
) -> Result<Room> {
    let caps = caps.request();
    build_room_with(tcp, udp, name, count, (caps, caps), rcvbuf)
}

/// [`build_room`] with the host's join capabilities apart from the other members'.
pub fn build_room_with(
    tcp: SocketAddr,
    udp: SocketAddr,
    name: &str,
    count: usize,
    (host_caps, caps): ((Caps, Option<u16>), (Caps, Option<u16>)),
    rcvbuf: usize,
) -> Result<Room> {
    if count < 2 {
        return Err(Error::Usage("a room needs at least 2 members".into()));
    }
    let mut tokens = vec![String::new(); count];
    tokens[0] = request_token(tcp, true, name, "m0", host_caps)?;
    let slots: Vec<Mutex<Option<Result<String>>>> = (0..count).map(|_| Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(1);
    thread::scope(|s| {
        for _ in 0..JOIN_THREADS.min(count - 1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let r = request_token(tcp, false, name, &format!("m{i}"), caps);
                if let Ok(mut slot) = slots[i].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    for (i, slot) in slots.into_iter().enumerate().skip(1) {
        match slot.into_inner().ok().flatten() {
            Some(Ok(token)) => tokens[i] = token,
            Some(Err(e)) => return Err(e),
            None => return Err(Error::Usage(format!("join of m{i} did not run"))),
        }
    }
    let mut granted = 0;
    let mut members = Vec::with_capacity(count);
    for token in tokens {
        let socket = UdpSocket::bind("127.0.0.1:0").ctx("bind member socket")?;
        granted = size_rcvbuf(&socket, rcvbuf);
        members.push(Member {
            token,
            socket: Arc::new(socket),
        });
    }
    let room = Room {
        name: name.to_owned(),
        members,
        rcvbuf: granted,
    };
    register(&room, udp)?;
    for m in &room.members {
        m.socket.connect(udp).ctx("connect member socket")?;
    }
    Ok(room)
}

/// The texts of the chat messages in one delivery datagram (batches unpacked).
pub(crate) fn texts(bytes: &[u8]) -> Vec<&str> {
    match delivery::parse(bytes) {
        Ok(Delivery::Chat { message, .. }) | Ok(Delivery::Sequenced { message, .. }) => {
            vec![message]
        }
        Ok(Delivery::Batch(body)) => delivery::batch_entries(body)
            .filter_map(|e| match delivery::parse(e.ok()?) {
                Ok(Delivery::Chat { message, .. }) | Ok(Delivery::Sequenced { message, .. }) => {
                    Some(message)
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether a chat text is one of the registration probes [`register`] sends (`p<round> from
/// m<i>`): a member that saw its probe early may still hold those of later rounds.
pub(crate) fn is_probe(text: &str) -> bool {
    text.starts_with('p')
}

/// Receives one datagram into `buf` unless `deadline` passes first (`None` then).
pub(crate) fn recv_before(
    socket: &UdpSocket,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<Option<usize>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        socket
            .set_read_timeout(Some(left))
            .ctx("set read timeout")?;
        match socket.recv(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).ctx("receive"),
        }
    }
}

/// Waits up to [`PROBE_WAIT`] for `probe` on `socket`.
fn saw_probe(socket: &UdpSocket, probe: &str) -> Result<bool> {
    let deadline = Instant::now() + PROBE_WAIT;
    let mut buf = vec![0u8; ucrp::MAX_DATAGRAM_LEN];
    while let Some(n) = recv_before(socket, &mut buf, deadline)? {
        if texts(&buf[..n]).contains(&probe) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sends REGISTER from every member, then has `m0` send a probe every other member must
/// receive and `m1` one that `m0` must receive; repeats for members that missed theirs.
fn register(room: &Room, udp: SocketAddr) -> Result<()> {
    let mut missing: Vec<usize> = (0..room.members.len()).collect();
    for round in 0..REGISTER_ROUNDS {
        for &i in &missing {
            let m = &room.members[i];
            let mut d = Vec::new();
            datagram::encode(
                room.name.as_bytes(),
                m.token.as_bytes(),
                datagram::REGISTER,
                &mut d,
            )?;
            m.socket.send_to(&d, udp).ctx("send REGISTER")?;
        }
        let probe_to_others = format!("p{round} from m0");
        let probe_to_host = format!("p{round} from m1");
        for (from, text) in [(0, &probe_to_others), (1, &probe_to_host)] {
            let m = &room.members[from];
            let mut d = Vec::new();
            datagram::encode(room.name.as_bytes(), m.token.as_bytes(), text, &mut d)?;
            m.socket.send_to(&d, udp).ctx("send probe")?;
        }
        let mut still = Vec::new();
        for &i in &missing {
            let probe = if i == 0 {
                &probe_to_host
            } else {
                &probe_to_others
            };
            if !saw_probe(&room.members[i].socket, probe)? {
                still.push(i);
            }
        }
        // m1's probe only reaches m0 if m1 itself is registered, so m0 depends on it.
        if still.is_empty() {
            for m in &room.members {
                m.socket.set_read_timeout(None).ctx("clear read timeout")?;
            }
            return Ok(());
        }
        missing = still;
    }
    Err(Error::Register(format!(
        "{} of {} members never received a probe in room {:?} after {REGISTER_ROUNDS} rounds",
        missing.len(),
        room.members.len(),
        room.name
    )))
}
