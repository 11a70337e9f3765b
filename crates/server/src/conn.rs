//! One TCP connection: its buffers, its deadline, and the replies waiting for durability.
//!
//! Input is read into `input` and decoded by the loop frame by frame. Replies are queued in
//! order; a reply that carries a new token waits in `held` until the journal batch holding
//! its record is durable, and every later reply on the same connection waits behind it, so
//! pipelined requests are answered in order. How long each such reply waited for the disk
//! is counted in a [`DelayHistogram`] as it leaves `held`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::Interest;

use crate::delay::{DelayHistogram, DurableWait};

/// Buffer room an idle connection keeps: more, left by a large request or reply, is given
/// back once the buffer empties, so thousands of open connections that each once saw a
/// 15 KiB room list do not hold its room for good.
const IDLE_BUFFER_BYTES: usize = 4096;

/// Room for held replies an idle connection keeps (more is given back once none is held).
const HELD_IDLE_REPLIES: usize = 16;

/// How long a lingering close waits for the peer's end (see [`Conn::linger`]).
pub const LINGER: Duration = Duration::from_secs(2);

/// The most a lingering close reads and throws away before it gives up on the peer.
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Empties `buffer`, giving back room past [`IDLE_BUFFER_BYTES`].
fn empty(buffer: &mut Vec<u8>) {
    buffer.clear();
    if buffer.capacity() > IDLE_BUFFER_BYTES {
        buffer.shrink_to(IDLE_BUFFER_BYTES);
    }
}

/// Why a connection was closed: the `reason` label of `ocm_tcp_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A read, write, shutdown or poll registration failed.
    IoError,
    /// The daemon ended it after its last reply (a refusal, an answered metrics request, a
    /// lingering close run out), or its peer's end came while it lingered.
    Protocol,
    /// Its peer closed its side, and nothing was left to answer.
    PeerClosed,
    /// No complete request within the handshake timeout.
    Timeout,
    /// Its replies went unread past the output cap until its timeout.
    OutputOverflow,
    /// Closed to make room for a newcomer (a full table, or descriptors short).
    Evicted,
}

impl CloseReason {
    /// Every reason, in the order the metric lists them.
    pub const ALL: [CloseReason; 6] = [
        CloseReason::IoError,
        CloseReason::Protocol,
        CloseReason::PeerClosed,
        CloseReason::Timeout,
        CloseReason::OutputOverflow,
        CloseReason::Evicted,
    ];

    /// The metric's label, also written in the debug line of each close.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::IoError => "io_error",
            CloseReason::Protocol => "protocol",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Timeout => "timeout",
            CloseReason::OutputOverflow => "output_overflow",
            CloseReason::Evicted => "evicted",
        }
    }

    /// Whether the daemon closes for this reason on its own, not because its peer or its
    /// last reply ended the connection: its peer ran out of time (`timeout`, or
    /// `output_overflow` while paused on unread replies) or it made room for another
    /// (`evicted`). Such a close gives up on replies still unread, and resets the connection.
    pub fn gives_up(self) -> bool {
        matches!(
            self,
            CloseReason::Timeout | CloseReason::OutputOverflow | CloseReason::Evicted
        )
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCRP handshakes.
    Tcrp,
    /// HTTP for `/metrics` and `/healthz`.
    Http,
}

/// How far [`Conn::fill`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadUntil {
    /// Until the socket reports `WouldBlock` (or EOF): needed when the readiness event said
    /// the peer closed, or when there was no event, since no later edge would report it.
    WouldBlock,
    /// Until a read returns less than asked, which on TCP means the receive queue was empty
    /// at that moment: bytes that arrive later raise a new edge. Saves the `EAGAIN` read
    /// that otherwise ends every handshake. (A read also stops short at TCP urgent data; a
    /// peer that sends some only stalls its own connection until its next bytes or its
    /// handshake deadline.)
    ShortRead,
}

/// Result of reading what the socket has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The socket is drained for now (`WouldBlock`, or a short read under
    /// [`ReadUntil::ShortRead`]).
    Drained,
    /// The input buffer reached its cap; process it and read again.
    Full,
    /// The peer closed its side.
    Eof,
}

/// A TCP connection.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Protocol spoken.
    pub kind: Kind,
    /// Bytes read and not yet decoded.
    pub input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// Replies waiting for a journal batch: the batch, the bytes, and when the reply was
    /// queued if it is the one whose record the batch holds (not one waiting behind it).
    held: VecDeque<(u64, Vec<u8>, Option<Instant>)>,
    /// When the connection is closed unless its timer restarts first
    /// ([`Conn::restart_timer`]): most replies restart it, but not a refusal of a bad frame
    /// or of a request past the rate limit.
    pub deadline: Instant,
    /// When it was accepted or last answered, as the loop's count of such moments: orders
    /// connections by how long they have been idle, which deadlines, read from the clock
    /// once per pass of the loop, cannot within a pass.
    pub activity: u64,
    /// The peer has closed its sending side.
    pub read_closed: bool,
    /// Close once the output is flushed.
    pub close_after_flush: bool,
    /// Our side is shut down after the last reply, and what the peer still sends is read and
    /// thrown away until its end ([`Conn::discard_input`]), so that the close sends no RST
    /// that could destroy the reply before the peer reads it.
    pub lingering: bool,
    /// Bytes thrown away while lingering.
    lingered_bytes: usize,
    /// The connection is in the loop's list of those holding replies for the disk.
    pub listed_holding: bool,
    /// Answering stopped because the replies waiting (held ones included) stayed over
    /// `max_output_bytes` after a write: the peer's requests wait, unread, until they drain
    /// under it. A peer that never reads is closed when its handshake timer runs out.
    pub paused: bool,
    /// Answering stopped at the loop's budget per turn (frames answered or reply bytes) with
    /// whole frames perhaps left in the input: the loop answers them on a later pass, after
    /// the other connections and the listeners have had their turn. Until then the connection
    /// is not finished, even once its peer's end has come.
    pub more_frames: bool,
    /// The connection is on the loop's list of those to read again this pass (`revisit`):
    /// listed once, and read for itself only (a connection later in its slot is not).
    pub revisit_listed: bool,
    /// The interest currently registered with the poll.
    pub interest: Interest,
    /// The ticket of the password check the first buffered frame waits for.
    pub awaiting_password: Option<u64>,
}

impl Conn {
    /// Wraps an accepted stream.
    pub fn new(stream: TcpStream, peer: SocketAddr, kind: Kind, deadline: Instant) -> Conn {
        Conn {
            stream,
            peer,
            kind,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            held: VecDeque::new(),
            deadline,
            activity: 0,
            read_closed: false,
            close_after_flush: false,
            lingering: false,
            lingered_bytes: 0,
            paused: false,
            more_frames: false,
            revisit_listed: false,
            listed_holding: false,
            interest: Interest::READABLE,
            awaiting_password: None,
        }
    }

    /// Restarts the handshake timer at `deadline`: the connection was accepted or answered
    /// just now, or began a lingering close, the next of the loop's moments counted in
    /// `activity`.
    pub fn restart_timer(&mut self, deadline: Instant, activity: &mut u64) {
        *activity += 1;
        self.deadline = deadline;
        self.activity = *activity;
    }

    /// Reads until the socket is drained (see [`ReadUntil`]), the peer closes, or `input`
    /// holds `cap` bytes.
    pub fn fill(&mut self, cap: usize, until: ReadUntil) -> io::Result<Filled> {
        let mut chunk = [0u8; 4096];
        loop {
            if self.input.len() >= cap {
                return Ok(Filled::Full);
            }
            let want = chunk.len().min(cap - self.input.len());
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    self.read_closed = true;
                    return Ok(Filled::Eof);
                }
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    if n < want && until == ReadUntil::ShortRead {
                        return Ok(Filled::Drained);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Filled::Drained),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops the first `n` bytes of the input, decoded; once what is left is small, gives
    /// back room past what an idle connection keeps. (A large request answered, followed by
    /// a byte of the next, would otherwise keep its buffer for as long as the connection.)
    pub fn consume(&mut self, n: usize) {
        if n >= self.input.len() {
            empty(&mut self.input);
        } else {
            self.input.drain(..n);
            if self.input.len() <= IDLE_BUFFER_BYTES / 2
                && self.input.capacity() > IDLE_BUFFER_BYTES
            {
                self.input.shrink_to(IDLE_BUFFER_BYTES);
            }
        }
    }

    /// Queues a reply that may leave now, or, with `wait_for = Some((batch, since))`, once
    /// `batch` is durable (counting its wait from `since`); keeps order.
    pub fn queue(&mut self, bytes: Vec<u8>, wait_for: Option<(u64, Instant)>) {
        match (wait_for, self.held.back()) {
            (Some((batch, since)), _) => self.held.push_back((batch, bytes, Some(since))),
            // Something earlier is held: wait behind it.
            (None, Some(&(batch, _, _))) => self.held.push_back((batch, bytes, None)),
            (None, None) => self.output.extend_from_slice(&bytes),
        }
    }

    /// Moves replies whose batch is durable to the output, counting in `waited` how long
    /// each reply that waited for its own batch took to get there. Returns whether any did:
    /// the reply then counts as sent now, for the handshake timer.
    pub fn release(
        &mut self,
        durable: u64,
        now: Instant,
        waited: &mut DelayHistogram<DurableWait>,
    ) -> bool {
        let before = self.held.len();
        while let Some((batch, _, _)) = self.held.front() {
            if *batch > durable {
                break;
            }
            if let Some((_, bytes, since)) = self.held.pop_front() {
                if let Some(since) = since {
                    waited.record(now.saturating_duration_since(since));
                }
                self.output.extend_from_slice(&bytes);
            }
        }
        // Hundreds of cheap refusals queued behind one held reply would otherwise keep their
        // room for the connection's life, as the byte buffers do not ([`empty`]).
        if self.held.is_empty() && self.held.capacity() > HELD_IDLE_REPLIES {
            self.held = VecDeque::new();
        }
        self.held.len() < before
    }

    /// Whether replies wait for durability.
    pub fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// Unsent bytes, held replies included.
    pub fn pending_bytes(&self) -> usize {
        self.output.len() - self.written + self.held.iter().map(|(_, b, _)| b.len()).sum::<usize>()
    }

    /// Writes queued output until done or the socket would block.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A peer that reads as fast as it asks may never let the output empty:
                    // drop what was written once it is at least half the buffer, so the
                    // buffer stays within twice what is unsent. Moving the unsent rest
                    // costs no more bytes than were written since the last move.
                    if self.written >= self.output.len() / 2 {
                        self.output.drain(..self.written);
                        self.written = 0;
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        empty(&mut self.output);
        self.written = 0;
        Ok(())
    }

    /// Whether output is waiting for the socket.
    pub fn wants_write(&self) -> bool {
        self.written < self.output.len()
    }

    /// Ends a pause whose replies drained under the cap without an edge to come: the frames
    /// it left unread in the input are answered at the loop's `revisit`, and until then the
    /// connection is not finished ([`Conn::more_frames`]), even once its peer's end has come:
    /// a durable batch released in the same pass would otherwise find it finished and close
    /// it with whole requests unanswered. Returns whether the caller must
    /// list it ([`Conn::list_for_revisit`]).
    pub fn unpause(&mut self) -> bool {
        self.paused = false;
        self.more_frames = true;
        self.list_for_revisit()
    }

    /// Lists the connection for the loop's `revisit`: whether it was not listed yet (the
    /// caller then pushes it; a connection is listed once).
    pub fn list_for_revisit(&mut self) -> bool {
        !std::mem::replace(&mut self.revisit_listed, true)
    }

    /// Whether the connection has nothing left to do and should be closed (once a lingering
    /// close has begun, when the peer's end has come).
    pub fn finished(&self) -> bool {
        let idle = !self.wants_write()
            && self.held.is_empty()
            && self.awaiting_password.is_none()
            && !self.more_frames;
        idle && (self.read_closed || (self.close_after_flush && !self.lingering))
    }

    /// Begins a lingering close: shuts our sending side (the peer reads our replies, then our
    /// end) and throws away what has already come. Returns the close reason if the
    /// connection is to be closed now ([`Conn::discard_input`]; a failed shutdown is an
    /// `io_error`).
    pub fn linger(&mut self) -> Option<CloseReason> {
        self.lingering = true;
        self.input = Vec::new();
        if self.stream.shutdown(std::net::Shutdown::Write).is_err() {
            return Some(CloseReason::IoError);
        }
        self.discard_input()
    }

    /// Reads and throws away what the peer sends, until the socket is drained. Returns the
    /// close reason once lingering is over: `protocol` at the peer's end (`read_closed` set)
    /// or past 256 KiB in all (a peer that keeps sending is not waited for),
    /// `io_error` if a read failed; `None` to go on.
    pub fn discard_input(&mut self) -> Option<CloseReason> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.read_closed = true;
                    return Some(CloseReason::Protocol);
                }
                Ok(n) => {
                    self.lingered_bytes += n;
                    if self.lingered_bytes > LINGER_MAX_BYTES {
                        return Some(CloseReason::Protocol);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Some(CloseReason::IoError),
            }
        }
    }

    /// The interest the connection needs now: WRITABLE only while output is queued.
    pub fn desired_interest(&self) -> Interest {
        if self.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }
}

/// Helpers for the tests of the modules that drive connections.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    use super::{Conn, Kind};

    /// A connection on a loopback pair of its own: the peer's std stream, to keep, and our
    /// side as a `Conn`.
    pub(crate) fn loopback() -> (TcpStream, Conn) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, addr) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let stream = mio::net::TcpStream::from_std(ours);
        (peer, Conn::new(stream, addr, Kind::Tcrp, Instant::now()))
    }

    /// Closes `peer` with a reset (a zero linger time, [`crate::sockopt::reset_on_close`]),
    /// not its end.
    pub(crate) fn reset(peer: TcpStream) {
        crate::sockopt::reset_on_close(peer.as_raw_fd()).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testing::reset;
    use super::*;
    use mio::net::TcpListener;
    use std::net::{Shutdown, TcpStream as StdStream};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    /// A loopback pair: the peer's std stream and our accepted mio stream, with the
    /// listener's `TCP_NODELAY` set first when `nodelay` is true.
    fn pair(nodelay: bool) -> (StdStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        if nodelay {
            crate::sockopt::set_listener_nodelay(&listener).unwrap();
        }
        connected(&listener)
    }

    /// A connection to `listener`: the peer's std stream and our accepted mio stream.
    fn connected(listener: &TcpListener) -> (StdStream, TcpStream) {
        let peer = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match listener.accept() {
                Ok((stream, _)) => return (peer, stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::yield_now();
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    fn conn(stream: TcpStream) -> Conn {
        let addr = stream.peer_addr().unwrap();
        Conn::new(stream, addr, Kind::Tcrp, Instant::now())
    }

    #[test]
    fn accepted_connections_inherit_nodelay_from_the_listener() {
        let (_peer, plain) = pair(false);
        assert!(!plain.nodelay().unwrap(), "off unless asked");
        let (_peer, inherited) = pair(true);
        assert!(inherited.nodelay().unwrap(), "copied from the listener");
    }

    #[test]
    fn accepted_connections_inherit_the_user_timeout_from_the_listener() {
        let user_timeout = |s: &TcpStream| {
            crate::sockopt::get_int(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)
                .unwrap()
        };
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (_peer, plain) = connected(&listener);
        assert_eq!(
            user_timeout(&plain),
            0,
            "the kernel's own retries unless asked"
        );
        crate::sockopt::set_listener_user_timeout(&listener, Duration::from_millis(20_500))
            .unwrap();
        let (_peer, inherited) = connected(&listener);
        assert_eq!(user_timeout(&inherited), 20_500, "copied from the listener");
        // Past what the option holds: the most it does, not an error or a wrap.
        crate::sockopt::set_listener_user_timeout(&listener, Duration::from_secs(u64::MAX))
            .unwrap();
        let (_peer, longest) = connected(&listener);
        assert_eq!(user_timeout(&longest), libc::c_int::MAX);
    }

    #[test]
    fn held_replies_leave_in_order_once_durable_and_only_their_own_wait_is_counted() {
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        let t0 = Instant::now();
        c.queue(b"token-1;".to_vec(), Some((1, t0)));
        // A refusal behind it waits too, but for nothing of its own: not counted.
        c.queue(b"refused;".to_vec(), None);
        c.queue(
            b"token-2;".to_vec(),
            Some((2, t0 + Duration::from_millis(1))),
        );
        let mut waited = DelayHistogram::<DurableWait>::default();
        let released = c.release(0, t0 + Duration::from_millis(2), &mut waited);
        assert!(
            !released && c.output.is_empty() && waited.count() == 0,
            "nothing is durable yet"
        );
        assert!(c.release(1, t0 + Duration::from_micros(2700), &mut waited));
        assert_eq!(c.output, b"token-1;refused;");
        assert_eq!(waited.count(), 1);
        // 2.7 ms: above the 2 ms bound, within the 3 ms one.
        assert_eq!(waited.quantile_bound(1.0), Some(0.003));
        assert!(c.release(2, t0 + Duration::from_millis(401), &mut waited));
        assert_eq!(c.output, b"token-1;refused;token-2;");
        assert_eq!(waited.count(), 2);
        // The second waited 400 ms: within the 1 s bound, above 250 ms.
        assert_eq!(waited.quantile_bound(1.0), Some(1.0));
        assert!(!c.has_held());
    }

    /// Hundreds of refusals queued behind a held reply give their room back once it leaves.
    #[test]
    fn the_room_of_many_replies_held_behind_one_is_given_back() {
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        c.queue(b"token;".to_vec(), Some((1, Instant::now())));
        for _ in 0..500 {
            c.queue(b"refused;".to_vec(), None);
        }
        assert!(c.held.capacity() >= 501);
        let mut waited = DelayHistogram::<DurableWait>::default();
        assert!(c.release(1, Instant::now(), &mut waited));
        assert!(!c.has_held());
        assert!(
            c.held.capacity() <= HELD_IDLE_REPLIES,
            "{}",
            c.held.capacity()
        );
        assert_eq!(c.output.len(), 6 + 500 * 8);
    }

    /// Waits until the socket has `n` bytes queued, so a read sees them all at once.
    fn wait_readable(stream: &TcpStream, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; n];
        while stream.peek(&mut buf).unwrap_or(0) < n {
            assert!(Instant::now() < deadline, "{n} bytes never arrived");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_short_read_ends_the_fill_only_when_asked() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        peer.write_all(b"hello").unwrap();
        wait_readable(&c.stream, 5);
        assert_eq!(c.fill(1024, ReadUntil::ShortRead).unwrap(), Filled::Drained);
        assert_eq!(c.input, b"hello");
        // Nothing more is there: reading to WouldBlock also reports the socket drained.
        assert_eq!(
            c.fill(1024, ReadUntil::WouldBlock).unwrap(),
            Filled::Drained
        );
        assert!(!c.read_closed);
    }

    #[test]
    fn a_fin_behind_the_data_is_seen_only_when_reading_to_the_end() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        peer.write_all(b"bye").unwrap();
        peer.shutdown(Shutdown::Write).unwrap();
        wait_readable(&c.stream, 3);
        // A short read stops before the FIN: the caller must not use it when the
        // readiness event reported the peer closed.
        assert_eq!(c.fill(1024, ReadUntil::ShortRead).unwrap(), Filled::Drained);
        assert!(!c.read_closed);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c.fill(1024, ReadUntil::WouldBlock).unwrap() {
                Filled::Eof => break,
                other => {
                    assert_eq!(other, Filled::Drained);
                    assert!(Instant::now() < deadline, "the FIN never arrived");
                    std::thread::yield_now();
                }
            }
        }
        assert!(c.read_closed);
        assert_eq!(c.input, b"bye");
    }

    /// A loopback pair whose peer has a 4 KiB receive buffer from before the handshake (so
    /// that the window it offers is small) and whose accepted stream has a 4 KiB send buffer.
    fn small_buffer_pair() -> (StdStream, TcpStream) {
        use std::os::fd::FromRawFd;
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let SocketAddr::V4(to) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        // SAFETY: plain socket calls on a descriptor we own; the address outlives the call.
        let peer = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let peer = StdStream::from_raw_fd(fd);
            crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4096).unwrap();
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: to.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*to.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len);
            assert_eq!(rc, 0, "connect: {}", io::Error::last_os_error());
            peer
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::yield_now();
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        crate::sockopt::set_int(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, 4096)
            .unwrap();
        (peer, stream)
    }

    #[test]
    fn a_peer_that_reads_as_fast_as_it_asks_but_never_drains_the_output_keeps_it_bounded() {
        // The peer reads a reply's worth for every reply queued, so what is unsent stays
        // about constant and under any `max_output_bytes`; but the output never empties.
        // What was written must not pile up in front of what was not.
        let (mut peer, stream) = small_buffer_pair();
        let mut c = conn(stream);
        c.queue(vec![0u8; 64 * 1024], None);
        c.flush().unwrap();
        assert!(c.wants_write(), "the socket took 64 KiB at once");
        const REPLY: usize = 1024;
        let mut buf = [0u8; REPLY];
        for _ in 0..2000 {
            peer.read_exact(&mut buf).unwrap();
            c.queue(vec![1u8; REPLY], None);
            c.flush().unwrap();
            assert!(c.pending_bytes() <= 64 * 1024 + REPLY);
        }
        assert!(
            c.wants_write(),
            "the output drained: the test proves nothing"
        );
        assert!(
            c.output.capacity() <= 4 * 64 * 1024,
            "{} bytes of output buffer for {} unsent",
            c.output.capacity(),
            c.pending_bytes()
        );
    }

    /// A large reply or request leaves no large buffer behind once it is done with.
    #[test]
    fn emptied_buffers_give_back_what_an_idle_connection_does_not_need() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        c.queue(vec![7u8; 20 * 1024], None);
        c.flush().unwrap();
        assert!(!c.wants_write(), "loopback takes 20 KiB at once");
        assert!(
            c.output.capacity() <= IDLE_BUFFER_BYTES,
            "{}",
            c.output.capacity()
        );

        peer.write_all(&[1u8; 20 * 1024]).unwrap();
        wait_readable(&c.stream, 20 * 1024);
        c.fill(64 * 1024, ReadUntil::WouldBlock).unwrap();
        assert_eq!(c.input.len(), 20 * 1024);
        c.consume(100);
        assert_eq!(
            c.input.len(),
            20 * 1024 - 100,
            "a partial consume keeps the rest"
        );
        // A large request answered with a byte of the next left behind: the room goes back
        // too, not only once the input is empty.
        c.consume(c.input.len() - 1);
        assert_eq!(c.input, [1u8]);
        assert!(
            c.input.capacity() <= IDLE_BUFFER_BYTES,
            "{}",
            c.input.capacity()
        );
        c.consume(c.input.len());
        assert!(c.input.is_empty());
        assert!(
            c.input.capacity() <= IDLE_BUFFER_BYTES,
            "{}",
            c.input.capacity()
        );
    }

    #[test]
    fn restarting_the_timer_counts_a_moment_of_activity() {
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        let mut activity = 41;
        let deadline = Instant::now() + Duration::from_secs(7);
        c.restart_timer(deadline, &mut activity);
        assert_eq!((activity, c.activity, c.deadline), (42, 42, deadline));
    }

    /// What is unsent counts what the socket has not taken and every held reply, and
    /// WRITABLE is asked for only while the socket has output to take.
    #[test]
    fn pending_bytes_and_interest_follow_the_output() {
        let (_peer, stream) = small_buffer_pair();
        let mut c = conn(stream);
        assert_eq!(c.desired_interest(), Interest::READABLE);
        c.queue(vec![1u8; 64 * 1024], None);
        assert_eq!(c.pending_bytes(), 64 * 1024);
        assert_eq!(
            c.desired_interest(),
            Interest::READABLE | Interest::WRITABLE
        );
        c.flush().unwrap();
        let unsent = c.output.len() - c.written;
        assert!(c.written > 0 && unsent > 0, "{} written", c.written);
        c.queue(vec![2u8; 100], Some((1, Instant::now())));
        c.queue(vec![3u8; 10], None);
        assert_eq!(c.pending_bytes(), unsent + 110);
        assert_eq!(
            c.desired_interest(),
            Interest::READABLE | Interest::WRITABLE
        );
        // Held replies alone do not ask for WRITABLE: nothing may leave yet.
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        c.queue(vec![2u8; 100], Some((1, Instant::now())));
        assert_eq!(c.pending_bytes(), 100);
        assert_eq!(c.desired_interest(), Interest::READABLE);
    }

    /// A connection is finished once nothing is left to send, hold or check, and either the
    /// peer closed or it is to close after its replies without lingering.
    #[test]
    fn a_connection_is_finished_only_when_idle_and_closing() {
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        assert!(!c.finished(), "open and idle");
        c.read_closed = true;
        assert!(c.finished(), "the peer closed");
        c.read_closed = false;
        c.close_after_flush = true;
        assert!(c.finished(), "to close after its replies");
        c.lingering = true;
        assert!(!c.finished(), "lingering: until the peer's end");
        c.read_closed = true;
        assert!(c.finished(), "lingering over");
        // Anything left to do keeps it open.
        c.awaiting_password = Some(1);
        assert!(!c.finished(), "a password check in flight");
        c.awaiting_password = None;
        c.queue(b"held".to_vec(), Some((1, Instant::now())));
        assert!(!c.finished(), "a reply held");
        let mut waited = DelayHistogram::<DurableWait>::default();
        assert!(c.release(1, Instant::now(), &mut waited));
        assert!(!c.finished(), "a reply to write");
        c.flush().unwrap();
        assert!(c.finished());
    }

    /// Reads until the peer's bytes have all come (or 10 s have passed), then returns what
    /// `discard_input` says at last.
    fn discard_until_end(c: &mut Conn) -> Option<CloseReason> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(reason) = c.discard_input() {
                return Some(reason);
            }
            assert!(Instant::now() < deadline, "the peer's end never came");
            std::thread::yield_now();
        }
    }

    /// A lingering close shuts our side (the peer reads our replies, then our end), throws
    /// away what the peer sent, and ends at the peer's end.
    #[test]
    fn a_lingering_close_reads_to_the_peers_end_and_throws_it_away() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        c.queue(b"reply".to_vec(), None);
        c.flush().unwrap();
        peer.write_all(b"more requests").unwrap();
        wait_readable(&c.stream, 13);
        c.input.extend_from_slice(b"unread");
        assert_eq!(c.linger(), None, "the peer has not closed");
        assert!(c.lingering && !c.read_closed);
        assert!(c.input.is_empty());
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"reply", "our replies, then our end");
        peer.shutdown(Shutdown::Write).unwrap();
        assert_eq!(discard_until_end(&mut c), Some(CloseReason::Protocol));
        assert!(c.read_closed);
        assert!(c.finished());
    }

    /// A peer that sends no more than 256 KiB while we linger is waited for to its end.
    #[test]
    fn a_lingering_close_waits_for_a_peer_that_sent_at_most_256_kib() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        assert_eq!(c.linger(), None);
        let writer = std::thread::spawn(move || {
            peer.write_all(&[0u8; 256 * 1024]).unwrap();
            peer
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.lingered_bytes < 256 * 1024 {
            assert_eq!(c.discard_input(), None, "after {}", c.lingered_bytes);
            assert!(Instant::now() < deadline, "the peer's bytes never came");
            std::thread::yield_now();
        }
        drop(writer.join().unwrap());
        assert_eq!(discard_until_end(&mut c), Some(CloseReason::Protocol));
        assert!(c.read_closed);
    }

    /// A peer that goes on sending is not waited for past 256 KiB.
    #[test]
    fn a_lingering_close_gives_up_on_a_peer_that_keeps_sending() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        assert_eq!(c.linger(), None);
        let writer = std::thread::spawn(move || {
            // Until our side is closed: a write then fails.
            while peer.write_all(&[0u8; 16 * 1024]).is_ok() {}
        });
        assert_eq!(discard_until_end(&mut c), Some(CloseReason::Protocol));
        assert!(!c.read_closed, "the peer never closed");
        assert!(c.lingered_bytes > 256 * 1024, "{}", c.lingered_bytes);
        assert!(
            c.lingered_bytes <= (256 + 16) * 1024,
            "{}",
            c.lingered_bytes
        );
        drop(c);
        writer.join().unwrap();
    }

    /// A peer that resets the connection while we linger ends it as an I/O error.
    #[test]
    fn a_lingering_close_ends_in_an_io_error_when_the_peer_resets() {
        let (peer, stream) = pair(true);
        let mut c = conn(stream);
        assert_eq!(c.linger(), None);
        reset(peer);
        assert_eq!(discard_until_end(&mut c), Some(CloseReason::IoError));
        assert!(!c.read_closed);
    }

    #[test]
    fn a_fill_reads_no_further_than_the_cap_with_input_already_buffered() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        peer.write_all(&[7u8; 100]).unwrap();
        wait_readable(&c.stream, 100);
        assert_eq!(c.fill(60, ReadUntil::WouldBlock).unwrap(), Filled::Full);
        c.consume(30);
        assert_eq!(c.fill(60, ReadUntil::WouldBlock).unwrap(), Filled::Full);
        assert_eq!(c.input.len(), 60);
    }

    /// A reset is an error of the connection, not the end of its input nor a drained socket.
    #[test]
    fn a_fill_reports_a_reset_as_an_error() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        peer.write_all(b"x").unwrap();
        wait_readable(&c.stream, 1);
        reset(peer);
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match c.fill(1024, ReadUntil::WouldBlock) {
                Err(e) => break e,
                Ok(filled) => {
                    assert_eq!(filled, Filled::Drained);
                    assert!(Instant::now() < deadline, "the reset never came");
                    std::thread::yield_now();
                }
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(!c.read_closed);
    }

    /// Replies still held when some leave stay held, in order, however many there are.
    #[test]
    fn replies_released_in_part_leave_the_rest_held_in_order() {
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        for batch in 1..=20u8 {
            c.queue(vec![batch], Some((u64::from(batch), Instant::now())));
        }
        assert!(c.held.capacity() > HELD_IDLE_REPLIES);
        let mut waited = DelayHistogram::<DurableWait>::default();
        assert!(c.release(2, Instant::now(), &mut waited));
        assert_eq!(c.output, [1, 2]);
        assert_eq!(c.pending_bytes(), 20);
        assert!(c.has_held());
        assert!(c.release(20, Instant::now(), &mut waited));
        assert_eq!(c.output, (1..=20).collect::<Vec<u8>>());
        assert!(!c.has_held());
    }

    /// A partial consume that leaves more than half an idle buffer keeps the room: the rest
    /// of a large request is likely still coming.
    #[test]
    fn a_partial_consume_gives_room_back_only_once_little_is_left() {
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        c.input = vec![1u8; 20 * 1024];
        c.consume(20 * 1024 - 3000);
        assert_eq!(c.input.len(), 3000);
        assert!(c.input.capacity() >= 20 * 1024, "{}", c.input.capacity());
        c.consume(1000);
        assert_eq!(c.input.len(), 2000);
        assert!(
            c.input.capacity() <= IDLE_BUFFER_BYTES,
            "{}",
            c.input.capacity()
        );
    }

    /// A flush the socket stops short leaves the output in place while less than half of it
    /// was written (moving it would cost more than it saves), and drops what was written
    /// once that is half or more.
    #[test]
    fn a_blocked_flush_drops_what_was_written_only_once_it_is_half_the_output() {
        let (mut peer, stream) = small_buffer_pair();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut c = conn(stream);
        c.queue(vec![0u8; 64 * 1024], None);
        c.flush().unwrap();
        let written = c.written;
        assert!(
            written > 0 && written < 32 * 1024,
            "{written} written at once"
        );
        assert_eq!(c.output.len(), 64 * 1024, "left in place");
        let mut buf = [0u8; 4096];
        while c.written > 0 {
            let read = peer.read(&mut buf).unwrap();
            assert!(read > 0, "the output was never moved");
            c.flush().unwrap();
        }
        assert!(c.wants_write(), "all of it was written: nothing was moved");
        assert!(c.output.len() <= 32 * 1024, "{}", c.output.len());
        assert_eq!(c.output.len(), c.pending_bytes());
    }

    /// Output for a peer that reset the connection is an error of the flush.
    #[test]
    fn a_flush_to_a_peer_that_reset_is_an_error() {
        let (peer, stream) = pair(true);
        let mut c = conn(stream);
        reset(peer);
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            c.queue(b"reply".to_vec(), None);
            match c.flush() {
                Err(e) => break e,
                Ok(()) => {
                    assert!(Instant::now() < deadline, "the reset never came");
                    std::thread::yield_now();
                }
            }
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{err}"
        );
    }

    #[test]
    fn a_full_buffer_is_reported_before_the_cap_is_passed() {
        let (mut peer, stream) = pair(true);
        let mut c = conn(stream);
        peer.write_all(&[7u8; 100]).unwrap();
        wait_readable(&c.stream, 100);
        assert_eq!(c.fill(60, ReadUntil::ShortRead).unwrap(), Filled::Full);
        assert_eq!(c.input.len(), 60);
        assert_eq!(c.fill(200, ReadUntil::ShortRead).unwrap(), Filled::Drained);
        assert_eq!(c.input.len(), 100);
    }

    // Added with the mutation run of 2026-12-05 (docs/SECURITY.md, "The daemon: TCP
    // connections and requests").

    /// A connection keeps room for up to [`HELD_IDLE_REPLIES`] held replies once none is
    /// held (the next create or join need not allocate again); only more is given back.
    #[test]
    fn room_for_as_many_held_replies_as_an_idle_connection_keeps_is_not_given_back() {
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        for _ in 0..HELD_IDLE_REPLIES {
            c.queue(b"token;".to_vec(), Some((1, Instant::now())));
        }
        assert_eq!(c.held.capacity(), HELD_IDLE_REPLIES, "the test's premise");
        let mut waited = DelayHistogram::<DurableWait>::default();
        assert!(c.release(1, Instant::now(), &mut waited));
        assert!(!c.has_held());
        assert_eq!(c.held.capacity(), HELD_IDLE_REPLIES);
    }

    /// A connection is listed for the loop's `revisit` once: the first call says to push it,
    /// the next ones do not, until the loop takes it off the list.
    #[test]
    fn a_connection_is_listed_for_revisit_once_until_taken_off() {
        let (_peer, stream) = pair(true);
        let mut c = conn(stream);
        assert!(c.list_for_revisit(), "not listed yet");
        assert!(c.revisit_listed);
        assert!(!c.list_for_revisit(), "listed already");
        assert!(!c.list_for_revisit());
        c.revisit_listed = false;
        assert!(c.list_for_revisit(), "taken off the list");
    }
}
