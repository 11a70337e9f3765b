//! The mio shell: one thread, one `Poll`, the listeners, the UDP socket and a slab of TCP
//! connections. It maps readiness to calls into the pure modules (`handshake`, `rooms`) and
//! carries out what they decide: replies, datagrams and journal records.
//!
//! Each pass: wait for events (the timeout is the nearest timer); read up to
//! `datagrams_per_wakeup` datagrams, handling them until what they make the daemon send
//! reaches `SENDS_PER_WAKEUP` (a still-ready socket, or datagrams read and not handled,
//! make the next wait zero, so a flood cannot starve TCP); accept until `WouldBlock`; read
//! every ready connection and answer up to `FRAMES_PER_TURN` of its frames (the rest on a
//! later pass); send the outbox; hand the new records to the writer. Datagrams come first because
//! a datagram waiting when the pass begins was sent before anything its TCP events could have
//! answered: a `__REGISTER__` queued before a join's request binds its member first, so the
//! member hears that join's notice however late the daemon wakes. A reply that carries a
//! token is queued on its connection and released only when the writer reports its batch
//! durable.
//!
//! Split by job: `setup` binds and loads before the first pass, `connections` accepts and
//! closes TCP connections, `requests` answers what they send, `http_answers` what the metrics
//! listener's send, `datagrams` is the UDP side, `lifecycle` handles signals, reloads and
//! shutdown, `timers` what is due when, `durability` the hand-off of records to the
//! writer, and `udp_output` the wait for room in the UDP socket's send buffer; this module owns the loop itself, its constants and its state. `testing` is what
//! their unit tests share.

mod connections;
mod datagrams;
mod durability;
mod http_answers;
mod lifecycle;
mod requests;
mod setup;
#[cfg(test)]
mod testing;
mod timers;
mod udp_output;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::info;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Poll, Token};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::{Config, Overrides};
use crate::conn::{Conn, Kind, ReadUntil};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::mmsg;
use crate::notify::Notifier;
use crate::outbox::Outbox;
use crate::password;
use crate::persist::{Persister, Stopped};
use crate::rate::{KeyedLimiter, TokenBucket};
use crate::rooms::Registry;
use crate::udp;
use crate::wall_clock::WallClock;

const TCP_LISTENER: Token = Token(0);
const UDP_SOCKET: Token = Token(1);
const WAKER: Token = Token(2);
const SIGNALS: Token = Token(3);
const METRICS_LISTENER: Token = Token(4);
/// Connection tokens are slab keys plus this offset.
const CONN_OFFSET: usize = 16;
/// How often connection deadlines are checked.
const DEADLINE_CHECK: Duration = Duration::from_millis(100);
/// How often the systemd status line is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How often a cap that keeps refusing creates and joins (`server_full`) is logged again.
const SERVER_FULL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Lines about dropped input that may be logged at once, before `drop_logs_per_sec` paces them.
const DROP_LOG_BURST: f64 = 5.0;
/// Per-IP request limiter memory.
const LIMITER_KEYS: usize = 65_536;
/// Largest UDP datagram read (anything longer than a UCRP datagram is truncated, then dropped
/// as too large).
const RECV_BUF_LEN: usize = ucrp::MAX_DATAGRAM_LEN + 1;
/// Open metrics connections at most (they do not count against `limits.max_connections`);
/// when full, a new one closes the oldest that has not sent a complete request.
const MAX_HTTP_CONNECTIONS: usize = 16;
/// The metrics listener's backlog (connections the kernel completes and queues for `accept`):
/// four full allowances of [`MAX_HTTP_CONNECTIONS`]. Scrapers and health checks connect a few
/// times a second at most, and each connection is accepted within a pass of the loop, so the
/// queue fills only while the loop is held up (a long pass, `accept` failing for want of
/// descriptors); past it, a SYN is dropped and retried a second later, well within a scrape's
/// timeout. Fixed rather than `limits.listen_backlog`, which is sized for floods of handshake
/// connections: a metrics port left reachable queues no more than this in the kernel under a
/// flood, and, below 128 (`net.core.somaxconn` before Linux 5.4), no default caps it.
const METRICS_LISTEN_BACKLOG: u32 = 64;
/// Input buffers read from one connection per readiness event.
const READS_PER_EVENT: usize = 4;
/// Datagrams one wakeup may send (relays, notices, replies) before TCP gets a turn, checked
/// after each datagram handled. `udp.datagrams_per_wakeup` counts datagrams read, and one
/// chat to a room of 1,024 members is 1,023 sends: 1,024 such chats (the default budget)
/// held accepts, handshakes and scrapes up for a million sends. About as many as the
/// largest budget of datagrams read ([`crate::config::MAX_DATAGRAMS_PER_WAKEUP`]).
const SENDS_PER_WAKEUP: usize = 65_536;
/// Frames answered from one connection per turn. One read can bring hundreds of pipelined
/// requests (a 32-byte room list request, 2,600 of them in the four reads of an event), and
/// what they cost is bounded only by the kernel taking the replies: answered to the end in
/// one go, a few connections' backlogs held every other client up for seconds. Past this
/// many, or once the turn's replies hold [`OUTPUT_PER_TURN`] bytes, the connection waits for
/// its next turn (`revisit`), after the others.
const FRAMES_PER_TURN: usize = 16;
/// Reply bytes one connection's turn may produce (see [`FRAMES_PER_TURN`]): about one full
/// room list (15 KiB), so that a turn costs the same whatever is asked for.
const OUTPUT_PER_TURN: usize = 16 * 1024;
/// Extra bytes each connection may read beyond one frame.
const READ_SLACK: usize = 4096;
/// Password jobs (argon2, tens of milliseconds each, one at a time) queued at most, in all and
/// per source (an IPv4 address or an IPv6 /64); past either, a request needing one is refused
/// with `rate_limited`. The total is 32 sources' worth, so a few addresses cannot fill it.
const MAX_PASSWORD_JOBS: usize = 256;
/// See [`MAX_PASSWORD_JOBS`].
const MAX_PASSWORD_JOBS_PER_SOURCE: usize = 8;
/// History bytes a periodic checkpoint writes at most (the rest wait for the next one); the
/// one at shutdown writes everything.
const HISTORY_CHECKPOINT_BYTES: usize = 4 * 1024 * 1024;
/// Members' moved sources journaled per periodic checkpoint at most (~150 bytes a record, so
/// ~1.5 MB); the rest wait for the next ones. The one at shutdown writes everything.
const SOURCES_PER_CHECKPOINT: usize = 10_000;
/// How soon accepting is tried again after `accept` failed for want of descriptors or memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Connections one pass takes from a listener's queue (each TCRP newcomer's request read at
/// once, see `accept`); the rest wait for the next pass (`accept_again`), after the datagrams
/// and the connections already open. Taken to the end of the queue, a flood of connects that
/// refilled it as fast as it was drained held the relay up for as long as it lasted. Four
/// times the handshake benchmark's concurrency, so an ordinary burst is taken in one pass.
const ACCEPTS_PER_PASS: usize = 64;

/// Which connections a full table closes first: those already closing, then idle ones with
/// nothing unsent, then those paused on unread replies, then those still sending a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EvictionClass {
    Closing,
    Idle,
    Paused,
    Sending,
}

/// Connections a pass over a full table picks to close, at most: one pass serves that many
/// newcomers, so a flood of connections costs a pass over the table per this many accepts.
const EVICTION_PICKS: usize = 64;

/// A connection's place in the slab, as seen in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConnId(usize);

impl ConnId {
    fn token(self) -> Token {
        Token(self.0 + CONN_OFFSET)
    }
    fn from_token(token: Token) -> Option<ConnId> {
        token.0.checked_sub(CONN_OFFSET).map(ConnId)
    }
}

/// The addresses the daemon actually bound (ports chosen by the OS when 0 was asked).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// TCRP listener.
    pub tcp: SocketAddr,
    /// UCRP socket.
    pub udp: SocketAddr,
    /// Metrics listener, if on.
    pub metrics: Option<SocketAddr>,
}

/// The daemon.
pub struct Server {
    poll: Poll,
    config: Config,
    config_path: Option<PathBuf>,
    /// The configuration file as last read, before command-line overrides.
    file_config: Config,
    overrides: Overrides,
    tcp: Option<TcpListener>,
    udp: UdpSocket,
    metrics_listener: Option<TcpListener>,
    signals: Signals,
    conns: Slab<Conn>,
    /// Open handshake connections per source (an IPv4 address or an IPv6 /64, see
    /// `rate::source`), against `limits.max_connections_per_ip`.
    per_source: HashMap<IpAddr, usize>,
    /// Handshake connections open at most: `limits.max_connections`, or fewer if the
    /// open-file limit cannot fit them (see `setup::fit_open_files`).
    connection_cap: usize,
    /// Open metrics (HTTP) connections, oldest first (at most [`MAX_HTTP_CONNECTIONS`]).
    http_conns: Vec<ConnId>,
    registry: Registry,
    limiter: KeyedLimiter<IpAddr>,
    password_failures: KeyedLimiter<IpAddr>,
    passwords: password::Worker,
    /// Password checks in flight: the connection waiting and its source (whose failure token
    /// is given back if the password was right, even when the connection has gone).
    password_tickets: HashMap<u64, (ConnId, IpAddr)>,
    next_ticket: u64,
    next_checkpoint: Instant,
    /// The batch that carries the last periodic checkpoint's records.
    checkpoint_batch: u64,
    persister: Option<Persister>,
    outbox: Outbox,
    sender: udp::Sender,
    metrics: Metrics,
    notifier: Notifier,
    receiver: mmsg::Receiver,
    /// Datagrams of the receiver's last batch read but not handled yet: a wakeup stopped at
    /// [`SENDS_PER_WAKEUP`] in the middle of it. The next one handles them first.
    udp_unhandled: std::ops::Range<usize>,
    udp_ready: bool,
    /// Whether the UDP socket is watched for room in its send buffer, and when held last
    /// words are tried again (see `udp_output`).
    udp_output: udp_output::Watch,
    /// Whether accepted TCRP connections get TCP_NODELAY from the listener: `None` until the
    /// first accepted connection is checked; `Some(false)` when the listener refused the
    /// option or the connection lacked it, and each connection then sets it itself.
    nodelay_inherited: Option<bool>,
    /// Connections to read and answer again, walked at the end of the pass that listed them:
    /// input left unread by their read budget, frames left unanswered at the end of their turn
    /// ([`FRAMES_PER_TURN`]), or replies that drained under the output cap. A closed
    /// connection's entry stays, and its slot may take a connection accepted later in the
    /// pass, which must not be read for it (a metrics one would be read as TCRP): only a
    /// connection with [`Conn::revisit_listed`] set is read, so a close need not search the
    /// list (closes × listed connections in a pass, up to 4096²).
    revisit: Vec<ConnId>,
    /// Listeners to accept on at the end of the pass (see `accept_soon`): an edge came for
    /// them, a retry is due, or the last pass left their queue at [`ACCEPTS_PER_PASS`] (no
    /// edge comes for connections already queued).
    accept_again: Vec<Kind>,
    /// When the connection table is full: the connections to close for newcomers, the first
    /// choice last (see `evict_for_newcomer`).
    evict_candidates: Vec<(EvictionClass, u64, ConnId)>,
    /// Connections that hold replies for the disk, so that a durable batch reads only
    /// them, not every open connection (one closed since is skipped).
    holding: Vec<ConnId>,
    /// Accepts and answers so far, in order: each connection's last is its
    /// [`Conn::activity`].
    activity: u64,
    /// Which datagrams of the batch being handled were chat dropped as stale (their delay is
    /// left out of `ocm_relay_delay_seconds`).
    shed_in_batch: Vec<usize>,
    /// The wall clock that arrival stamps are measured against, read back after a step.
    wall_clock: WallClock,
    /// When to call `accept` again after it failed (EMFILE and friends). The listeners are
    /// edge-triggered: connections left in the backlog raise no new event, so without this
    /// they would wait for the next newcomer however many descriptors were freed meanwhile.
    accept_retry: Option<Instant>,
    /// The error (EMFILE or ENFILE) with which `accept` failed right after a connection was
    /// closed to free a descriptor: closing did not help (for ENFILE, the system is out of
    /// files and another process took the one freed). No more are closed for a failure with
    /// that same error until an accept succeeds or finds no connection waiting (Linux takes
    /// the descriptor and the file before it looks at the queue, so then neither is short),
    /// so that retries every [`ACCEPT_RETRY`] through a storm of ENFILE do not close every
    /// idle connection for nothing. A failure with the other error is another shortage, which
    /// closing may cure: the daemon's own descriptors running out (EMFILE, the limit lowered)
    /// at the end of a storm of the system's, while the connection closed for still waits, are
    /// freed by closing one of its own; were the flag kept, newcomers would wait until idle
    /// connections' handshake timers ran out. Not an expiry after a time instead: through a
    /// long storm, each expiry would close a connection for nothing. Nor only a queue found
    /// empty: a connection waits all through a storm (the kernel takes none off the queue
    /// while `accept` fails), and through the EMFILE after it.
    eviction_futile: Option<i32>,
    next_deadline_check: Instant,
    next_sweep: Instant,
    next_status: Instant,
    watchdog: Option<(Duration, Instant)>,
    drop_log: TokenBucket,
    /// Paces the lines about failed `accept` calls (one a second).
    accept_log: TokenBucket,
    /// Failed journal writes counted at the last `STATUS=`: more since then are said in it.
    status_write_failures: u64,
    /// Requests refused as `server_full` since the last line saying so, and when that was
    /// (one a [`SERVER_FULL_LOG_EVERY`] at most).
    server_full: (u64, Option<Instant>),
    /// The kernel's drop count for the UDP socket at the last periodic check, which warns
    /// when it grew. Kept apart from the metric, which a scrape also refreshes: a scrape
    /// between two checks must not hide the drops from the log.
    kernel_drops_logged: u64,
    /// The kernel's drop count for the UDP socket, kept as a 64-bit total.
    kernel_drops: udp::KernelDrops,
    bound: Bound,
    _lock: File,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { context, source }
}

impl Server {
    /// The bound addresses.
    pub fn bound(&self) -> Bound {
        self.bound
    }

    /// Serves until SIGTERM or SIGINT, then flushes state and says how far that got.
    pub fn run(mut self) -> Result<Stopped, Error> {
        let metrics = self
            .bound
            .metrics
            .map_or_else(|| "off".to_owned(), |a| a.to_string());
        info!(
            "listening tcp={} udp={} metrics={}",
            self.bound.tcp, self.bound.udp, metrics
        );
        self.notifier.send("READY=1");
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io {
                    context: "poll failed",
                    source: e,
                });
            }
            let now = Instant::now();
            // Datagrams before connections (see the module docs): they may have waited longer.
            self.note_udp_readiness(&events);
            if self.udp_ready {
                self.udp_ready = self.drain_udp(now);
            }
            if self.dispatch(&events, now) == Pass::Stop {
                return Ok(self.shutdown());
            }
            self.come_back(now);
            self.timers(now);
            self.send_held_last_words(now);
            self.flush_outbox(now);
            self.watch_udp_output(now);
            self.persist();
        }
    }
}

/// Whether a pass of the loop goes on or ends the loop for a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Continue,
    Stop,
}

impl Server {
    /// Takes the UDP socket's readiness from `events`: datagrams to read, or room in its send
    /// buffer for held last words.
    fn note_udp_readiness(&mut self, events: &Events) {
        for event in events.iter().filter(|event| event.token() == UDP_SOCKET) {
            // Room in the send buffer alone is no datagram to read.
            if event.is_readable() || !event.is_writable() {
                self.udp_ready = true;
            }
            if event.is_writable() {
                self.udp_output.writable();
            }
        }
    }

    /// Handles the pass's other events: accepts, the writer's and the password thread's
    /// wake-ups, signals and connections' readiness. [`Pass::Stop`] for a stop's signal.
    fn dispatch(&mut self, events: &Events, now: Instant) -> Pass {
        for event in events.iter() {
            match event.token() {
                // Accepted at the end of the pass (`come_back`), once a listener a pass.
                TCP_LISTENER => self.accept_soon(Kind::Tcrp),
                METRICS_LISTENER => self.accept_soon(Kind::Http),
                UDP_SOCKET => {} // drained before
                WAKER => {
                    self.collect_durable();
                    self.collect_passwords(now);
                }
                SIGNALS => {
                    if self.handle_signals() {
                        return Pass::Stop;
                    }
                }
                token => {
                    if let Some(id) = ConnId::from_token(token) {
                        self.conn_event(id, event, now);
                    }
                }
            }
        }
        Pass::Continue
    }

    /// Lists the listener for `kind` to be accepted on at the end of the pass, if it is not
    /// listed already: a listener's edge, a retry and a queue left at [`ACCEPTS_PER_PASS`]
    /// all come to one `accept` a pass, so that a pass takes at most that many connections
    /// from each listener.
    pub(super) fn accept_soon(&mut self, kind: Kind) {
        if !self.accept_again.contains(&kind) {
            self.accept_again.push(kind);
        }
    }

    /// Comes back to what the pass left for its end, with no edge to wait for: listeners
    /// with connections queued (an edge this pass, a retry, or more than one pass's
    /// [`ACCEPTS_PER_PASS`]), and connections to read and answer again (`revisit`).
    fn come_back(&mut self, now: Instant) {
        for kind in std::mem::take(&mut self.accept_again) {
            self.accept(kind, now);
        }
        for id in std::mem::take(&mut self.revisit) {
            // Gone, or a connection in a reused slot that is not listed itself.
            let listed = self
                .conns
                .get_mut(id.0)
                .is_some_and(|conn| std::mem::replace(&mut conn.revisit_listed, false));
            if listed {
                let close = self.read_tcrp(id, now, ReadUntil::WouldBlock);
                self.after_io(id, close);
            }
        }
    }
}

/// Whether a line about dropped input may be logged now: at most `rate` a second after a
/// burst of [`DROP_LOG_BURST`]; none at all when `rate` is 0 (`[rate] drop_logs_per_sec`).
fn may_log_drop(bucket: &mut TokenBucket, now: Instant, rate: f64) -> bool {
    rate > 0.0 && bucket.take(now, rate, DROP_LOG_BURST)
}

/// Tests of the loop's own parts: tokens, timers, deadlines, the status line and the hand-off
/// of records to the writer, on a server whose loop is not run.
#[cfg(test)]
mod tests {
    use super::testing::add_conn;
    use super::*;
    use tcrp::Operation;

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A server on loopback ports of its own, its state in `dir`, without the request limit
    /// or a metrics listener, rooms closed after a minute without a word; its loop is not
    /// run: the tests call its steps by hand.
    fn server(dir: &std::path::Path) -> Server {
        let mut config = Config::default();
        config.rate.requests_per_sec = 0.0;
        config.liveness.room_idle_secs = 60;
        testing::on_loopback(dir, config)
    }

    /// A create of `room` by `payload` (the host's name, or a JSON object), as its bytes.
    fn create(room: &str, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        tcrp::Frame {
            operation: Operation::CreateRoom,
            state: tcrp::State::Request,
            room_name: room.as_bytes(),
            payload,
        }
        .encode(&mut bytes)
        .expect("a frame");
        bytes
    }

    /// Sends `bytes` from `peer` to the connection `id` and has `s` read and answer them
    /// until `answered` holds, for 10 s at most.
    fn ask(
        s: &mut Server,
        peer: &mut std::net::TcpStream,
        id: ConnId,
        bytes: &[u8],
        answered: fn(&Server) -> bool,
    ) {
        use std::io::Write;
        peer.write_all(bytes).expect("the request is sent");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert_eq!(s.read_tcrp(id, Instant::now(), ReadUntil::WouldBlock), None);
            if answered(s) {
                return;
            }
            assert!(Instant::now() < deadline, "the request was never answered");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Calls `step` until `done` holds, for 10 s at most.
    fn wait_for(s: &mut Server, what: &str, step: fn(&mut Server), done: fn(&Server) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            step(s);
            if done(s) {
                return;
            }
            assert!(Instant::now() < deadline, "{what} never came");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A connection's token is its slab key past the fixed tokens, and only tokens past them
    /// name a connection.
    #[test]
    fn connection_tokens_start_past_the_fixed_ones_and_map_back() {
        assert_eq!(ConnId(0).token(), Token(CONN_OFFSET));
        assert_eq!(ConnId(7).token(), Token(CONN_OFFSET + 7));
        assert_eq!(ConnId::from_token(Token(CONN_OFFSET + 7)), Some(ConnId(7)));
        assert_eq!(ConnId::from_token(Token(CONN_OFFSET)), Some(ConnId(0)));
        for fixed in [TCP_LISTENER, UDP_SOCKET, WAKER, SIGNALS, METRICS_LISTENER] {
            assert_eq!(ConnId::from_token(fixed), None, "{fixed:?}");
        }
    }

    /// The wall clock is read as seconds since 1970: after 2026-01-01 on any clock that
    /// runs these tests.
    #[test]
    fn the_wall_clock_is_read_in_seconds_since_1970() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_secs_f64();
        let now = unix_now();
        assert!(now > 1_767_225_600.0, "{now}");
        assert!(now >= before && now - before < 60.0, "{before} then {now}");
    }

    /// Lines about dropped input come in a burst of five, then as the rate refills them; a
    /// rate of 0 turns them off, burst and all.
    #[test]
    fn drop_lines_come_in_a_burst_then_at_the_rate_and_none_at_rate_zero() {
        let now = Instant::now();
        let mut bucket = TokenBucket::full(DROP_LOG_BURST, now);
        assert!(!may_log_drop(&mut bucket, now, 0.0), "off at rate 0");
        let mut bucket = TokenBucket::full(DROP_LOG_BURST, now);
        for i in 0..5 {
            assert!(may_log_drop(&mut bucket, now, 1.0), "line {i} of the burst");
        }
        assert!(!may_log_drop(&mut bucket, now, 1.0), "past the burst");
        assert!(
            !may_log_drop(&mut bucket, now, 0.0),
            "past the burst at rate 0"
        );
        let later = now + Duration::from_secs(1);
        assert!(
            may_log_drop(&mut bucket, later, 1.0),
            "one a second after it"
        );
        assert!(!may_log_drop(&mut bucket, later, 1.0));
    }

    /// The loop waits for the nearest of its timers: the sweep, the status, the checkpoint,
    /// the connections' deadlines (only while there are connections), the watchdog and a
    /// retried accept; not at all while datagrams or connections wait to be read again.
    #[test]
    fn the_loop_waits_until_its_nearest_timer_and_not_while_input_waits() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        let now = Instant::now();
        let ms = Duration::from_millis;
        s.udp_ready = false;
        s.watchdog = None;
        s.accept_retry = None;
        s.next_sweep = now + ms(5000);
        s.next_status = now + ms(4000);
        s.next_checkpoint = now + ms(3000);
        s.next_deadline_check = now + ms(1000);
        assert_eq!(s.poll_timeout(now), ms(3000), "no connection: no deadline");
        s.next_checkpoint = now + ms(6000);
        assert_eq!(s.poll_timeout(now), ms(4000));
        s.next_status = now + ms(7000);
        assert_eq!(s.poll_timeout(now), ms(5000));
        let (_peer, id) = add_conn(&mut s);
        assert_eq!(s.poll_timeout(now), ms(1000), "a connection's deadline");
        s.watchdog = Some((ms(500), now + ms(100)));
        assert_eq!(s.poll_timeout(now), ms(600), "the watchdog's next ping");
        s.accept_retry = Some(now + ms(200));
        assert_eq!(s.poll_timeout(now), ms(200), "the accept retried");
        s.revisit.push(id);
        assert_eq!(
            s.poll_timeout(now),
            Duration::ZERO,
            "a connection to read again"
        );
        s.revisit.clear();
        s.udp_ready = true;
        assert_eq!(s.poll_timeout(now), Duration::ZERO, "datagrams to read");
        s.udp_ready = false;
        assert_eq!(
            s.poll_timeout(now + ms(300)),
            Duration::ZERO,
            "a timer past due"
        );
    }

    /// Each timer runs when it is due, exactly then included, and is set again its interval
    /// after that pass; a timer not due is left alone.
    #[test]
    fn each_timer_runs_when_due_and_is_set_again_its_interval_later() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        let now = Instant::now() + Duration::from_secs(60);
        let every = Duration::from_secs(10);
        let last = now - every;
        s.accept_retry = Some(now);
        s.next_sweep = now;
        s.next_deadline_check = now;
        s.next_checkpoint = now;
        s.next_status = now;
        s.watchdog = Some((every, last));
        s.timers(now);
        let sweep = now + Duration::from_millis(s.config.liveness.sweep_interval_ms);
        let checkpoint = now + Duration::from_secs(s.config.history.checkpoint_secs);
        assert_eq!(s.accept_retry, None, "the accept was retried");
        assert_eq!(
            s.accept_again,
            vec![Kind::Tcrp, Kind::Http],
            "at the end of the next pass"
        );
        assert_eq!(s.next_sweep, sweep);
        assert_eq!(s.next_deadline_check, now + DEADLINE_CHECK);
        assert_eq!(s.next_checkpoint, checkpoint);
        assert_eq!(s.next_status, now + STATUS_INTERVAL);
        assert_eq!(s.watchdog, Some((every, now)), "the watchdog was pinged");
        // A moment later, nothing is due.
        let soon = now + Duration::from_millis(1);
        s.accept_retry = Some(soon + Duration::from_millis(1));
        s.timers(soon);
        assert_eq!(s.accept_retry, Some(soon + Duration::from_millis(1)));
        assert_eq!(s.next_sweep, sweep);
        assert_eq!(s.next_deadline_check, now + DEADLINE_CHECK);
        assert_eq!(s.next_checkpoint, checkpoint);
        assert_eq!(s.next_status, now + STATUS_INTERVAL);
        assert_eq!(s.watchdog, Some((every, now)));
    }

    /// The deadline check closes the connections whose deadline has come, as timed out, but
    /// not one whose reply waits for the disk or whose password is being checked.
    #[test]
    fn late_connections_are_closed_unless_they_wait_for_the_disk_or_a_password() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        let now = Instant::now() + Duration::from_secs(60);
        let (_a, late) = add_conn(&mut s);
        let (_b, early) = add_conn(&mut s);
        let (_c, holding) = add_conn(&mut s);
        let (_d, checking) = add_conn(&mut s);
        s.conns[late.0].deadline = now;
        s.conns[early.0].deadline = now + Duration::from_millis(1);
        s.conns[holding.0].deadline = now;
        s.conns[holding.0].queue(b"held".to_vec(), Some((1, now)));
        s.conns[checking.0].deadline = now;
        s.conns[checking.0].awaiting_password = Some(1);
        s.close_late_connections(now);
        assert!(!s.conns.contains(late.0), "the late one is closed");
        for (id, what) in [
            (early, "early"),
            (holding, "holding"),
            (checking, "checking"),
        ] {
            assert!(s.conns.contains(id.0), "the {what} one stays");
        }
        assert_eq!(s.metrics.tcp_closed.get("timeout"), Some(&1));
        assert_eq!(s.metrics.tcp_closed.values().sum::<u64>(), 1);
    }

    /// The status line counts rooms, members and connections, and says nothing of the
    /// journal while no write has failed.
    #[test]
    fn the_status_line_counts_rooms_members_and_connections() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        assert_eq!(
            s.status_line(),
            "STATUS=0 rooms, 0 members (0 registered), 0 TCP connections"
        );
        let (mut peer, id) = add_conn(&mut s);
        ask(&mut s, &mut peer, id, &create("r", b"\"h\""), |s| {
            s.registry.stats().rooms == 1
        });
        assert_eq!(
            s.status_line(),
            "STATUS=1 room, 1 member (0 registered), 1 TCP connection"
        );
    }

    /// A periodic checkpoint is deferred, and counted, while the last one is not durable,
    /// and made once it is.
    #[test]
    fn a_checkpoint_waits_while_the_last_one_is_not_durable() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        s.checkpoint_batch = 1;
        s.checkpoint();
        s.checkpoint();
        assert_eq!(s.metrics.checkpoints_deferred, 2);
        s.checkpoint_batch = 0;
        s.checkpoint();
        assert_eq!(s.metrics.checkpoints_deferred, 2, "batch 0 is durable");
    }

    /// A periodic checkpoint writes the new history of rooms until it holds
    /// [`HISTORY_CHECKPOINT_BYTES`] (4 MiB), and leaves the rest for the next: of eight rooms
    /// with 600 KB of new messages each, seven.
    #[test]
    fn a_checkpoint_writes_about_4_mib_of_new_history_and_leaves_the_rest() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        let mut config = s.config.clone();
        config.history.messages = 200;
        config.history.max_bytes_per_room = 1024 * 1024;
        config.rate.chat_per_sec = 0.0;
        s.registry.set_limits(config.registry_limits());
        let now = Instant::now();
        let mut out = Outbox::default();
        let text = "x".repeat(3000);
        for i in 0..8u16 {
            let room = format!("room{i}");
            let host = s
                .registry
                .create_room(
                    &room,
                    &tcrp::payload::Request::original("h"),
                    HERE,
                    None,
                    now,
                    1.0,
                )
                .expect("a room")
                .token;
            let guest = s
                .registry
                .join_room(
                    &room,
                    &tcrp::payload::Request::original("g"),
                    HERE,
                    now,
                    &mut out,
                )
                .expect("a member")
                .token;
            let datagram = |token: &crate::token::Token, text: &str| {
                let mut bytes = Vec::new();
                ucrp::datagram::encode(
                    room.as_bytes(),
                    token.as_str().as_bytes(),
                    text,
                    &mut bytes,
                )
                .expect("a datagram");
                bytes
            };
            let (host_at, guest_at) = (
                SocketAddr::new(HERE, 1000 + 2 * i),
                SocketAddr::new(HERE, 1001 + 2 * i),
            );
            for (at, token) in [(host_at, &host), (guest_at, &guest)] {
                s.registry.handle_datagram(
                    at,
                    None,
                    &datagram(token, "__REGISTER__"),
                    now,
                    &mut out,
                );
            }
            // 200 messages of 3,000 bytes and a one-letter sender: 600,200 bytes.
            let chat = datagram(&host, &text);
            for _ in 0..200 {
                s.registry
                    .handle_datagram(host_at, None, &chat, now, &mut out);
            }
        }
        s.registry.take_records();
        s.checkpoint();
        assert_eq!(
            s.registry.checkpoint_history(),
            1,
            "rooms left for the next checkpoint"
        );
    }

    /// The liveness sweep expires members whose keepalives stopped and closes rooms nobody
    /// was heard from, counting both; what they record is handed to the writer by the end
    /// of the pass.
    #[test]
    fn the_sweep_expires_silent_members_and_closes_idle_rooms_and_the_records_go_to_disk() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        let (mut peer, id) = add_conn(&mut s);
        let mut input = create("kept", br#"{"username": "h", "keepalive": 1}"#);
        input.extend(create("idle", b"\"h\""));
        ask(&mut s, &mut peer, id, &input, |s| {
            s.registry.stats().rooms == 2
        });
        assert!(
            !s.registry.has_records(),
            "the creates' records went with their replies"
        );
        s.sweep_liveness(Instant::now() + Duration::from_secs(3600));
        assert_eq!(s.metrics.keepalive_expiries, 1);
        assert_eq!(s.metrics.idle_rooms_closed, 1);
        assert_eq!(s.registry.stats().rooms, 0);
        assert!(s.registry.has_records());
        s.persist();
        assert!(!s.registry.has_records(), "handed to the writer");
        let p = s.persister.as_ref().expect("a writer");
        assert!(p.busy(), "the records are being written");
    }

    /// A connection unpaused for its revisit, with whole requests unread in its input and
    /// its peer's end read, is not closed when a durable batch releases its held reply in
    /// the same pass: the revisit answers the requests, and only then is it finished. It was
    /// closed as `peer_closed` with them unanswered.
    #[test]
    fn a_connection_unpaused_for_its_revisit_answers_its_requests_before_it_closes() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        let (mut peer, id) = add_conn(&mut s);
        ask(&mut s, &mut peer, id, &create("r", b"\"h\""), |s| {
            s.registry.stats().rooms == 1
        });
        assert!(s.conns[id.0].has_held());
        let mut lists = Vec::new();
        for _ in 0..3 {
            tcrp::Frame {
                operation: Operation::ListRooms,
                state: tcrp::State::Request,
                room_name: b"",
                payload: b"{}",
            }
            .encode(&mut lists)
            .expect("a frame");
        }
        // As `after_io` leaves it when its own flush ends a pause: the frames unread, the
        // peer's end read with them.
        let c = &mut s.conns[id.0];
        c.input.extend_from_slice(&lists);
        c.read_closed = true;
        c.paused = true;
        assert!(c.unpause());
        s.revisit.push(id);
        s.persist();
        wait_for(&mut s, "the create's batch", Server::collect_durable, |s| {
            s.persister.as_ref().is_some_and(|p| p.durable() >= 1)
        });
        assert!(s.conns.contains(id.0), "closed before its revisit");
        for id in std::mem::take(&mut s.revisit) {
            s.conns[id.0].revisit_listed = false;
            let close = s.read_tcrp(id, Instant::now(), ReadUntil::WouldBlock);
            s.after_io(id, close);
        }
        assert!(!s.conns.contains(id.0), "finished once answered");
        let mut got = Vec::new();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a timeout");
        std::io::Read::read_to_end(&mut peer, &mut got).expect("the replies, then the end");
        let mut frames = 0;
        let mut at = 0;
        while let Ok(Some((_, used))) = tcrp::decode(&got[at..], 1 << 20) {
            frames += 1;
            at += used;
        }
        assert_eq!(
            frames,
            2 + 3 * 2,
            "the create's two frames and each ListRooms' two"
        );
    }

    /// One pass takes at most [`ACCEPTS_PER_PASS`] connections from the listener's queue,
    /// however many things asked for an accept in it (its edge, a retry), and lists the
    /// listener to be accepted on again, so that the next pass does not wait (no edge comes
    /// for connections already queued); the pass that finds the queue empty lists nothing.
    #[test]
    fn a_pass_accepts_a_bounded_number_and_comes_back_for_the_rest() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        let queued = ACCEPTS_PER_PASS * 2 + 10;
        let clients: Vec<_> = (0..queued)
            .map(|_| std::net::TcpStream::connect(s.bound().tcp).expect("a connection"))
            .collect();
        let now = Instant::now();
        // The listener's edge and a retry in the same pass.
        s.accept_soon(Kind::Tcrp);
        s.accept_soon(Kind::Tcrp);
        s.come_back(now);
        assert_eq!(s.conns.len(), ACCEPTS_PER_PASS, "one pass's worth");
        assert_eq!(s.accept_again, vec![Kind::Tcrp]);
        assert_eq!(
            s.poll_timeout(now),
            Duration::ZERO,
            "the next pass comes at once"
        );
        // The rest, as the loop takes them (the last connects may reach the queue late).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = s.conns.len();
            s.come_back(Instant::now());
            assert!(s.conns.len() - before <= ACCEPTS_PER_PASS);
            if s.conns.len() == queued {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {queued} accepted",
                s.conns.len()
            );
            s.accept_again = vec![Kind::Tcrp];
        }
        assert!(
            s.accept_again.is_empty(),
            "a queue found empty is not listed"
        );
        drop(clients);
    }

    /// When the writer makes a batch durable, the replies that waited for it leave, the
    /// connection's timer restarts from then, and only a connection with replies still
    /// waiting stays listed as holding.
    #[test]
    fn a_durable_batch_releases_its_replies_and_keeps_only_connections_still_holding() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = server(dir.path());
        let (mut x, creator) = add_conn(&mut s);
        ask(&mut s, &mut x, creator, &create("r", b"\"h\""), |s| {
            s.registry.stats().rooms == 1
        });
        assert!(
            s.conns[creator.0].has_held(),
            "the create's reply waits for batch 1"
        );
        // Another connection with a reply for batch 1 and one for batch 2, never written.
        let (_y, waiting) = add_conn(&mut s);
        let y = &mut s.conns[waiting.0];
        y.queue(b"one".to_vec(), Some((1, Instant::now())));
        y.queue(b"two".to_vec(), Some((2, Instant::now())));
        y.listed_holding = true;
        s.holding.push(waiting);
        s.persist();
        let before = Instant::now();
        wait_for(&mut s, "batch 1", Server::collect_durable, |s: &Server| {
            s.persister.as_ref().is_some_and(|p| p.durable() >= 1)
        });
        let timeout = Duration::from_secs(s.config.limits.handshake_timeout_secs);
        let x = &s.conns[creator.0];
        assert!(!x.has_held() && !x.listed_holding, "its reply left");
        assert!(x.deadline >= before + timeout, "its timer restarted");
        let y = &s.conns[waiting.0];
        assert!(y.has_held() && y.listed_holding, "its second reply waits");
        assert_eq!(s.holding, vec![waiting]);
    }
}
