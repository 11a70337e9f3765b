//! The mio shell: one thread, one `Poll`, the listeners, the UDP socket and a slab of TCP
//! connections. It maps readiness to calls into the pure modules (`handshake`, `rooms`) and
//! carries out what they decide: replies, datagrams and journal records.
//!
//! Each pass: wait for events (the timeout is the nearest timer); accept until `WouldBlock`;
//! read every ready connection and answer its frames; read up to `datagrams_per_wakeup`
//! datagrams (a still-ready socket makes the next wait zero, so a flood cannot starve TCP);
//! send the outbox; hand the new records to the writer. A reply that carries a token is queued
//! on its connection and released only when the writer reports its batch durable.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use mio::event::Event;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tcrp::payload::ErrorCode;
use tcrp::{Operation, HEADER_LEN};

use crate::config::{self, Config, Overrides};
use crate::conn::{Conn, Filled, Kind};
use crate::error::Error;
use crate::handshake::{self, Context, Step};
use crate::http::{self, Route};
use crate::metrics::{operation_label, Metrics};
use crate::mmsg;
use crate::notify::{self, Notifier};
use crate::outbox::Outbox;
use crate::password::{self, Outcome};
use crate::persist::{self, Persister};
use crate::rate::{KeyedLimiter, TokenBucket};
use crate::rooms::{DropReason, Handled, Registry};
use crate::store::{self, Paths};
use crate::udp;

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
/// Per-IP request limiter memory.
const LIMITER_KEYS: usize = 65_536;
/// Largest UDP datagram read (anything longer than a UCRP datagram is truncated, then dropped
/// as too large).
const RECV_BUF_LEN: usize = ucrp::MAX_DATAGRAM_LEN + 1;
/// Open metrics connections at most (they do not count against `limits.max_connections`).
const MAX_HTTP_CONNECTIONS: usize = 16;
/// Input buffers read from one connection per readiness event.
const READS_PER_EVENT: usize = 4;
/// Extra bytes each connection may read beyond one frame.
const READ_SLACK: usize = 4096;

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
    per_ip: HashMap<IpAddr, usize>,
    /// Open metrics (HTTP) connections.
    http_open: usize,
    registry: Registry,
    limiter: KeyedLimiter<IpAddr>,
    password_failures: KeyedLimiter<IpAddr>,
    passwords: password::Worker,
    password_tickets: HashMap<u64, ConnId>,
    next_ticket: u64,
    next_checkpoint: Instant,
    persister: Option<Persister>,
    outbox: Outbox,
    sender: udp::Sender,
    metrics: Metrics,
    notifier: Notifier,
    receiver: mmsg::Receiver,
    udp_ready: bool,
    /// Connections with input left unread by their read budget.
    revisit: Vec<ConnId>,
    next_deadline_check: Instant,
    next_sweep: Instant,
    next_status: Instant,
    watchdog: Option<(Duration, Instant)>,
    drop_log: TokenBucket,
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
    /// Locks and loads the state, binds every socket and starts the writer. Any failure here
    /// stops the daemon before it serves anyone. `file_config` is the configuration file as
    /// read (the defaults when there is none); `overrides` (the command-line flags) are applied
    /// on top of it, now and at every reload.
    pub fn bind(
        file_config: Config,
        config_path: Option<PathBuf>,
        overrides: Overrides,
    ) -> Result<Server, Error> {
        let mut config = file_config.clone();
        overrides.apply(&mut config);
        config.validate().map_err(Error::Config)?;
        let paths = Paths::new(&config.state.path);
        let lock = persist::lock(&paths)?;
        let started = Instant::now();
        let loaded = store::load(&paths)?;
        let now = Instant::now();
        let mut registry = Registry::from_state(
            &loaded.state,
            config.registry_limits(),
            Box::new(rand::rngs::OsRng),
            now,
        );
        registry.set_wall_clock(now, unix_now());
        let stats = registry.stats();
        info!(
            "state {}: {} rooms, {} tokens loaded in {:?}",
            paths.state.display(),
            stats.rooms,
            stats.members,
            started.elapsed()
        );

        let poll = Poll::new().map_err(io_err("cannot create poll"))?;
        let mut tcp = TcpListener::bind(config.listen.tcp).map_err(|source| Error::Bind {
            what: "TCP",
            addr: config.listen.tcp,
            source,
        })?;
        let mut udp = UdpSocket::bind(config.listen.udp).map_err(|source| Error::Bind {
            what: "UDP",
            addr: config.listen.udp,
            source,
        })?;
        let (rcvbuf, sndbuf) = udp::size_buffers(
            &udp,
            config.udp.recv_buffer_bytes,
            config.udp.send_buffer_bytes,
        );
        debug!("UDP buffers: receive {rcvbuf} bytes, send {sndbuf} bytes");
        let mut metrics_listener = match config.metrics_addr().map_err(Error::Config)? {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|source| Error::Bind {
                what: "metrics",
                addr,
                source,
            })?),
            None => None,
        };
        let registry_handle = poll.registry();
        registry_handle
            .register(&mut tcp, TCP_LISTENER, Interest::READABLE)
            .map_err(io_err("cannot register TCP listener"))?;
        registry_handle
            .register(&mut udp, UDP_SOCKET, Interest::READABLE)
            .map_err(io_err("cannot register UDP socket"))?;
        if let Some(listener) = metrics_listener.as_mut() {
            registry_handle
                .register(listener, METRICS_LISTENER, Interest::READABLE)
                .map_err(io_err("cannot register metrics listener"))?;
        }
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
            .map_err(io_err("cannot install signal handlers"))?;
        registry_handle
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(io_err("cannot register signals"))?;
        let waker =
            Arc::new(Waker::new(registry_handle, WAKER).map_err(io_err("cannot create waker"))?);
        let persister = Persister::start(paths, loaded, Arc::clone(&waker))?;
        let passwords =
            password::Worker::start(waker).map_err(io_err("cannot start the password thread"))?;

        let bound = Bound {
            tcp: tcp.local_addr().map_err(io_err("TCP local address"))?,
            udp: udp.local_addr().map_err(io_err("UDP local address"))?,
            metrics: match &metrics_listener {
                Some(l) => Some(l.local_addr().map_err(io_err("metrics local address"))?),
                None => None,
            },
        };
        let watchdog = notify::watchdog_interval().map(|every| (every, now));
        Ok(Server {
            poll,
            limiter: KeyedLimiter::new(LIMITER_KEYS),
            password_failures: KeyedLimiter::new(LIMITER_KEYS),
            passwords,
            password_tickets: HashMap::new(),
            next_ticket: 0,
            next_checkpoint: now + Duration::from_secs(config.history.checkpoint_secs),
            drop_log: TokenBucket::full(config.rate.drop_logs_per_sec.max(1.0), now),
            next_sweep: now + Duration::from_millis(config.liveness.sweep_interval_ms),
            config,
            config_path,
            file_config,
            overrides,
            tcp: Some(tcp),
            udp,
            metrics_listener,
            signals,
            conns: Slab::new(),
            per_ip: HashMap::new(),
            http_open: 0,
            registry,
            persister: Some(persister),
            outbox: Outbox::default(),
            sender: udp::Sender::new(),
            metrics: Metrics::new(),
            notifier: Notifier::from_env(),
            receiver: mmsg::Receiver::new(RECV_BUF_LEN),
            udp_ready: true,
            revisit: Vec::new(),
            next_deadline_check: now + DEADLINE_CHECK,
            next_status: now,
            watchdog,
            bound,
            _lock: lock,
        })
    }

    /// The bound addresses.
    pub fn bound(&self) -> Bound {
        self.bound
    }

    /// Serves until SIGTERM or SIGINT, then flushes state and returns.
    pub fn run(mut self) -> Result<(), Error> {
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
            for event in events.iter() {
                match event.token() {
                    TCP_LISTENER => self.accept(Kind::Tcrp, now),
                    METRICS_LISTENER => self.accept(Kind::Http, now),
                    UDP_SOCKET => self.udp_ready = true,
                    WAKER => {
                        self.collect_durable();
                        self.collect_passwords(now);
                    }
                    SIGNALS => {
                        if self.handle_signals() {
                            self.shutdown();
                            return Ok(());
                        }
                    }
                    token => {
                        if let Some(id) = ConnId::from_token(token) {
                            self.conn_event(id, event, now);
                        }
                    }
                }
            }
            for id in std::mem::take(&mut self.revisit) {
                if self.conns.contains(id.0) {
                    let close = self.read_tcrp(id, now);
                    self.after_io(id, close);
                }
            }
            if self.udp_ready {
                self.udp_ready = self.drain_udp(now);
            }
            self.timers(now);
            self.flush_outbox();
            self.persist();
        }
    }

    fn poll_timeout(&self, now: Instant) -> Duration {
        if self.udp_ready || !self.revisit.is_empty() {
            return Duration::ZERO;
        }
        let mut next = self
            .next_sweep
            .min(self.next_status)
            .min(self.next_checkpoint);
        if !self.conns.is_empty() {
            next = next.min(self.next_deadline_check);
        }
        if let Some((every, last)) = self.watchdog {
            next = next.min(last + every);
        }
        next.saturating_duration_since(now)
    }

    fn accept(&mut self, kind: Kind, now: Instant) {
        loop {
            let listener = match kind {
                Kind::Tcrp => self.tcp.as_ref(),
                Kind::Http => self.metrics_listener.as_ref(),
            };
            let Some(listener) = listener else { return };
            let (mut stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log, keep serving the connections we have.
                    if self
                        .drop_log
                        .take(now, self.config.rate.drop_logs_per_sec, 5.0)
                    {
                        warn!("accept failed: {e}");
                    }
                    return;
                }
            };
            let limits = &self.config.limits;
            let from_ip = self.per_ip.get(&peer.ip()).copied().unwrap_or(0);
            let tcrp_open = self.conns.len() - self.http_open;
            let refusal = match kind {
                Kind::Tcrp if tcrp_open >= limits.max_connections => Some("max_connections"),
                Kind::Tcrp if from_ip >= limits.max_connections_per_ip => {
                    Some("max_connections_per_ip")
                }
                // Scrapers and health checks have their own small allowance, so they can
                // neither fill the handshake table nor be locked out by it.
                Kind::Http if self.http_open >= MAX_HTTP_CONNECTIONS => {
                    Some("max_metrics_connections")
                }
                _ => None,
            };
            if let Some(reason) = refusal {
                Metrics::bump(&mut self.metrics.tcp_rejected, reason);
                if self
                    .drop_log
                    .take(now, self.config.rate.drop_logs_per_sec, 5.0)
                {
                    warn!("{peer}: connection refused ({reason})");
                }
                continue; // dropping the stream closes it
            }
            if let Err(e) = stream.set_nodelay(true) {
                debug!("{peer}: cannot set TCP_NODELAY: {e}");
            }
            let entry = self.conns.vacant_entry();
            let id = ConnId(entry.key());
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut stream, id.token(), Interest::READABLE)
            {
                warn!("{peer}: cannot register connection: {e}");
                continue;
            }
            let deadline = now + Duration::from_secs(self.config.limits.handshake_timeout_secs);
            entry.insert(Conn::new(stream, peer, kind, deadline));
            match kind {
                Kind::Tcrp => *self.per_ip.entry(peer.ip()).or_insert(0) += 1,
                Kind::Http => self.http_open += 1,
            }
            self.metrics.tcp_accepted += 1;
            self.metrics.tcp_open += 1;
            debug!("{peer} conn {id:?}: accepted ({kind:?})");
        }
    }

    fn conn_event(&mut self, id: ConnId, event: &Event, now: Instant) {
        let Some(conn) = self.conns.get_mut(id.0) else {
            return; // spurious: closed earlier in this pass
        };
        let mut close = None;
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            close = match conn.kind {
                Kind::Tcrp => self.read_tcrp(id, now),
                Kind::Http => self.read_http(id),
            };
        }
        self.after_io(id, close);
    }

    /// Flushes, updates interest, and closes the connection if it is done or failed.
    fn after_io(&mut self, id: ConnId, mut close: Option<&'static str>) {
        let Some(conn) = self.conns.get_mut(id.0) else {
            return;
        };
        if close.is_none() {
            if let Err(e) = conn.flush() {
                debug!("{} conn {id:?}: write failed: {e}", conn.peer);
                close = Some("io_error");
            } else if conn.pending_bytes() > self.config.limits.max_output_bytes {
                close = Some("output_overflow");
            } else if conn.finished() {
                close = Some(if conn.close_after_flush {
                    "protocol"
                } else {
                    "peer_closed"
                });
            }
        }
        if let Some(reason) = close {
            self.close(id, reason);
            return;
        }
        let desired = conn.desired_interest();
        if desired != conn.interest {
            if let Err(e) = self
                .poll
                .registry()
                .reregister(&mut conn.stream, id.token(), desired)
            {
                warn!("{} conn {id:?}: cannot reregister: {e}", conn.peer);
                self.close(id, "io_error");
                return;
            }
            conn.interest = desired;
        }
    }

    fn close(&mut self, id: ConnId, reason: &'static str) {
        if !self.conns.contains(id.0) {
            return;
        }
        let mut conn = self.conns.remove(id.0);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if conn.kind == Kind::Http {
            self.http_open -= 1;
        }
        let counted = conn.kind == Kind::Tcrp;
        if let Some(count) = self.per_ip.get_mut(&conn.peer.ip()).filter(|_| counted) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&conn.peer.ip());
            }
        }
        self.metrics.tcp_open = self.metrics.tcp_open.saturating_sub(1);
        Metrics::bump(&mut self.metrics.tcp_closed, reason);
        debug!("{} conn {id:?}: closed ({reason})", conn.peer);
    }

    /// Reads and answers TCRP frames; returns a close reason on I/O failure. Reads at most
    /// [`READS_PER_EVENT`] buffers per call so one busy peer cannot hold the loop; a connection
    /// with more to read is revisited on the next pass.
    fn read_tcrp(&mut self, id: ConnId, now: Instant) -> Option<&'static str> {
        let cap =
            HEADER_LEN + usize::from(u8::MAX) + self.config.limits.max_payload_bytes + READ_SLACK;
        for _ in 0..READS_PER_EVENT {
            let conn = self.conns.get_mut(id.0)?;
            if conn.close_after_flush {
                return None;
            }
            let filled = match conn.fill(cap) {
                Ok(f) => f,
                Err(e) => {
                    debug!("{} conn {id:?}: read failed: {e}", conn.peer);
                    return Some("io_error");
                }
            };
            self.process_input(id, now, None);
            let conn = self.conns.get_mut(id.0)?;
            // A peer that keeps sending requests but does not read the replies.
            if conn.pending_bytes() > self.config.limits.max_output_bytes {
                return Some("output_overflow");
            }
            // While a password is being checked the input waits; reading resumes after.
            if conn.awaiting_password.is_some() {
                return None;
            }
            match filled {
                Filled::Full => continue,
                Filled::WouldBlock | Filled::Eof => return None,
            }
        }
        self.revisit.push(id);
        None
    }

    /// Answers the whole frames in a connection's input. `outcome` is the password result the
    /// first frame waited for. A frame that needs a password check stays at the front of the
    /// input, and the connection waits for the check.
    fn process_input(&mut self, id: ConnId, now: Instant, mut outcome: Option<Outcome>) {
        let max_payload = self.config.limits.max_payload_bytes;
        let timeout = Duration::from_secs(self.config.limits.handshake_timeout_secs);
        let Some(conn) = self.conns.get(id.0) else {
            return;
        };
        let peer = conn.peer;
        let mut consumed = 0;
        loop {
            let Some(conn) = self.conns.get_mut(id.0) else {
                return;
            };
            if conn.close_after_flush || (conn.awaiting_password.is_some() && outcome.is_none()) {
                break;
            }
            conn.awaiting_password = None;
            let decoded = tcrp::decode(&conn.input[consumed..], max_payload);
            let response = match decoded {
                Ok(None) => break,
                Ok(Some((frame, used))) => {
                    let mut ctx = Context {
                        registry: &mut self.registry,
                        limiter: &mut self.limiter,
                        password_failures: &mut self.password_failures,
                        limits: self.config.request_limits(),
                        out: &mut self.outbox,
                        peer: peer.ip(),
                        now,
                        unix_now: unix_now(),
                    };
                    match handshake::handle_frame(&frame, &mut ctx, outcome.take().as_ref()) {
                        Step::Reply(response) => {
                            consumed += used;
                            response
                        }
                        Step::Password(job) => {
                            self.next_ticket += 1;
                            let ticket = self.next_ticket;
                            self.password_tickets.insert(ticket, id);
                            self.passwords.submit(ticket, job);
                            conn.awaiting_password = Some(ticket);
                            break;
                        }
                    }
                }
                Err(e) => {
                    let header = &conn.input[consumed..];
                    let op = Operation::from(header.get(1).copied().unwrap_or(0));
                    if self
                        .drop_log
                        .take(now, self.config.rate.drop_logs_per_sec, 5.0)
                    {
                        warn!("{peer} conn {id:?}: bad frame: {e}; closing");
                    }
                    handshake::refusal(op, &[], ErrorCode::MalformedRequest, &e.to_string(), true)
                }
            };
            let op = operation_label(response.operation);
            let result = response.result.map_or_else(|c| c.as_str(), |()| "ok");
            *self.metrics.handshakes.entry((op, result)).or_insert(0) += 1;
            if response.result == Err(ErrorCode::RateLimited) {
                Metrics::bump(&mut self.metrics.rate_limited, "request");
            }
            let wait_for = match (response.needs_durability, self.persister.as_mut()) {
                (true, Some(p)) => Some(p.submit(self.registry.take_records())),
                _ => None,
            };
            let Some(conn) = self.conns.get_mut(id.0) else {
                return;
            };
            conn.queue(response.bytes, wait_for);
            conn.deadline = now + timeout;
            if response.close {
                conn.close_after_flush = true;
                conn.input.clear();
                return;
            }
        }
        if let Some(conn) = self.conns.get_mut(id.0) {
            conn.input.drain(..consumed);
        }
    }

    /// Password checks finished: resume the connections that waited for them.
    fn collect_passwords(&mut self, now: Instant) {
        for (ticket, outcome) in self.passwords.poll() {
            let Some(id) = self.password_tickets.remove(&ticket) else {
                continue;
            };
            let waiting = self
                .conns
                .get(id.0)
                .is_some_and(|c| c.awaiting_password == Some(ticket));
            if !waiting {
                continue; // the connection closed meanwhile
            }
            self.process_input(id, now, Some(outcome));
            // Input that arrived while waiting may hold more frames, and the socket more bytes.
            let close = self.read_tcrp(id, now);
            self.after_io(id, close);
        }
    }

    fn read_http(&mut self, id: ConnId) -> Option<&'static str> {
        let conn = self.conns.get_mut(id.0)?;
        if conn.close_after_flush {
            return None;
        }
        if let Err(e) = conn.fill(http::MAX_REQUEST_BYTES) {
            debug!("{} metrics conn: read failed: {e}", conn.peer);
            return Some("io_error");
        }
        let parsed = http::parse(&conn.input);
        let reply = match parsed {
            Some((Route::Metrics, head)) => {
                self.metrics.udp_kernel_drops =
                    udp::kernel_drops(&self.udp).unwrap_or(self.metrics.udp_kernel_drops);
                let body = self.metrics.render(self.registry.stats());
                http::response(
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    &body,
                    head,
                )
            }
            Some((Route::Health, head)) => http::response("200 OK", "text/plain", "ok\n", head),
            Some((Route::NotFound, head)) => {
                http::response("404 Not Found", "text/plain", "not found\n", head)
            }
            Some((Route::BadRequest, _)) => {
                http::response("400 Bad Request", "text/plain", "bad request\n", false)
            }
            None if conn.input.len() >= http::MAX_REQUEST_BYTES => http::response(
                "431 Request Header Fields Too Large",
                "text/plain",
                "too large\n",
                false,
            ),
            None if conn.read_closed => return Some("peer_closed"),
            None => return None,
        };
        let conn = self.conns.get_mut(id.0)?;
        conn.queue(reply, None);
        conn.close_after_flush = true;
        None
    }

    /// Reads datagrams (`recvmmsg`, a batch per call) until the socket is drained or the
    /// per-wakeup budget is spent. Returns whether the socket may still hold datagrams.
    fn drain_udp(&mut self, now: Instant) -> bool {
        let mut budget = self.config.udp.datagrams_per_wakeup;
        while budget > 0 {
            let count = match self
                .receiver
                .recv(self.udp.as_raw_fd(), budget.min(mmsg::BATCH))
            {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors for earlier sends surface here on Linux; they concern a peer,
                    // not the socket.
                    debug!("UDP receive error: {e}");
                    budget = budget.saturating_sub(1);
                    continue;
                }
            };
            budget = budget.saturating_sub(count);
            self.metrics.datagrams_received += count as u64;
            for i in 0..count {
                let Some((src, bytes)) = self.receiver.datagram(i) else {
                    continue;
                };
                let handled = self
                    .registry
                    .handle_datagram(src, bytes, now, &mut self.outbox);
                account(
                    &mut self.metrics,
                    &mut self.drop_log,
                    self.config.rate.drop_logs_per_sec,
                    src,
                    handled,
                    now,
                );
            }
            // Send what this batch produced before reading the next: latency stays low and
            // the outbox small.
            self.flush_outbox();
        }
        true
    }

    fn flush_outbox(&mut self) {
        if !self.outbox.is_empty() {
            self.sender
                .send_all(&self.udp, &mut self.outbox, &mut self.metrics);
        }
    }

    fn timers(&mut self, now: Instant) {
        if now >= self.next_sweep {
            let expired = self.registry.poll_expired(now, &mut self.outbox);
            self.metrics.keepalive_expiries += expired as u64;
            self.next_sweep = now + Duration::from_millis(self.config.liveness.sweep_interval_ms);
        }
        if now >= self.next_deadline_check {
            self.next_deadline_check = now + DEADLINE_CHECK;
            let late: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, c)| {
                    c.deadline <= now && !c.has_held() && c.awaiting_password.is_none()
                })
                .map(|(k, _)| ConnId(k))
                .collect();
            for id in late {
                if let Some(conn) = self.conns.get(id.0) {
                    debug!("{} conn {id:?}: no complete frame in time", conn.peer);
                }
                self.close(id, "timeout");
            }
        }
        if now >= self.next_checkpoint {
            self.registry.checkpoint_history();
            self.next_checkpoint = now + Duration::from_secs(self.config.history.checkpoint_secs);
        }
        if now >= self.next_status {
            self.next_status = now + STATUS_INTERVAL;
            self.check_kernel_drops();
            if self.notifier.enabled() {
                let s = self.registry.stats();
                self.notifier.send(&format!(
                    "STATUS={} rooms, {} members ({} registered), {} TCP connections",
                    s.rooms,
                    s.members,
                    s.registered,
                    self.conns.len()
                ));
            }
        }
        if let Some((every, last)) = self.watchdog {
            if now >= last + every {
                self.notifier.send("WATCHDOG=1");
                self.watchdog = Some((every, now));
            }
        }
    }

    /// Reads the kernel's drop count for the UDP socket and warns when it grew: an overloaded
    /// daemon must never lose datagrams silently.
    fn check_kernel_drops(&mut self) {
        let Some(drops) = udp::kernel_drops(&self.udp) else {
            return;
        };
        let before = self.metrics.udp_kernel_drops;
        self.metrics.udp_kernel_drops = drops;
        if drops > before {
            warn!(
                "the kernel dropped {} datagrams for a full UDP receive buffer (total {drops}); \
                 consider raising udp.recv_buffer_bytes and net.core.rmem_max",
                drops - before
            );
        }
    }

    /// Hands new records to the writer (those not tied to a reply: registers, leaves).
    fn persist(&mut self) {
        let Some(persister) = self.persister.as_mut() else {
            return;
        };
        if self.registry.has_records() {
            persister.submit(self.registry.take_records());
        }
        persister.pump();
    }

    /// The writer finished batches: release the replies that waited for them.
    fn collect_durable(&mut self) {
        let Some(persister) = self.persister.as_mut() else {
            return;
        };
        let done = persister.poll_done();
        if done.is_empty() {
            return;
        }
        for d in &done {
            self.metrics.state_write(d.records, d.elapsed);
        }
        let durable = persister.durable();
        let waiting: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.has_held())
            .map(|(k, _)| ConnId(k))
            .collect();
        for id in waiting {
            if let Some(conn) = self.conns.get_mut(id.0) {
                conn.release(durable);
            }
            self.after_io(id, None);
        }
    }

    /// Returns true when the daemon should stop.
    fn handle_signals(&mut self) -> bool {
        let pending: Vec<i32> = self.signals.pending().collect();
        let mut stop = false;
        for signal in pending {
            match signal {
                SIGHUP => self.reload(),
                SIGTERM | SIGINT => stop = true,
                _ => {}
            }
        }
        stop
    }

    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            info!("SIGHUP: no --config file; nothing to reload");
            Metrics::bump(&mut self.metrics.reloads, "no_file");
            return;
        };
        self.notifier
            .send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        match Config::from_file(&path) {
            Ok(file) => {
                // Settings fixed at start: compare the file with what the file said before
                // (not with flag-overridden values), keep the running values, and say so.
                let old = &self.file_config;
                let fixed = [
                    (
                        "listen.tcp",
                        file.listen.tcp != old.listen.tcp,
                        self.overrides.tcp.is_some(),
                    ),
                    (
                        "listen.udp",
                        file.listen.udp != old.listen.udp,
                        self.overrides.udp.is_some(),
                    ),
                    (
                        "listen.metrics",
                        file.listen.metrics != old.listen.metrics,
                        self.overrides.metrics.is_some(),
                    ),
                    (
                        "state.path",
                        file.state.path != old.state.path,
                        self.overrides.state.is_some(),
                    ),
                    (
                        "udp.recv_buffer_bytes",
                        file.udp.recv_buffer_bytes != old.udp.recv_buffer_bytes,
                        false,
                    ),
                    (
                        "udp.send_buffer_bytes",
                        file.udp.send_buffer_bytes != old.udp.send_buffer_bytes,
                        false,
                    ),
                ];
                for (key, changed, overridden) in fixed {
                    match (changed, overridden) {
                        (true, false) => warn!(
                            "SIGHUP: {key} changed in {}; it takes effect only after a restart",
                            path.display()
                        ),
                        (true, true) => warn!(
                            "SIGHUP: {key} changed in {}, but a command-line flag overrides it",
                            path.display()
                        ),
                        _ => {}
                    }
                }
                let mut new = file.clone();
                self.overrides.apply(&mut new);
                self.file_config = file;
                new.listen = self.config.listen.clone();
                new.state = self.config.state.clone();
                new.udp.recv_buffer_bytes = self.config.udp.recv_buffer_bytes;
                new.udp.send_buffer_bytes = self.config.udp.send_buffer_bytes;
                self.registry.set_limits(new.registry_limits());
                if std::env::var_os("RUST_LOG").is_none() {
                    if let Some(level) = config::log_level(&new.log.level) {
                        log::set_max_level(level);
                    }
                }
                self.config = new;
                info!("SIGHUP: configuration reloaded from {}", path.display());
                Metrics::bump(&mut self.metrics.reloads, "ok");
            }
            Err(e) => {
                error!("SIGHUP: {e}; keeping the running configuration");
                Metrics::bump(&mut self.metrics.reloads, "error");
            }
        }
        self.notifier.send("READY=1");
    }

    /// Stops accepting, answers what can be answered, makes every change durable, and folds
    /// the journal into the state file.
    fn shutdown(&mut self) {
        info!("stopping: flushing state");
        self.notifier.send("STOPPING=1");
        if let Some(mut tcp) = self.tcp.take() {
            let _ = self.poll.registry().deregister(&mut tcp);
        }
        self.flush_outbox();
        self.registry.checkpoint_history();
        self.persist();
        if let Some(mut persister) = self.persister.take() {
            // Let waiting joins get their tokens: wait (bounded) for the batches in flight.
            let deadline = Instant::now() + Duration::from_millis(1500);
            while persister.busy() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
                persister.poll_done();
            }
            let durable = persister.durable();
            let ids: Vec<ConnId> = self.conns.iter().map(|(k, _)| ConnId(k)).collect();
            for id in ids {
                if let Some(conn) = self.conns.get_mut(id.0) {
                    conn.release(durable);
                    let _ = conn.flush();
                }
            }
            persister.shutdown();
        }
        let s = self.registry.stats();
        info!("stopped: {} rooms, {} members saved", s.rooms, s.members);
    }
}

/// Counts what the registry did with a datagram (a free function so that the receive loop
/// can borrow the receive buffer and the counters at once).
fn account(
    metrics: &mut Metrics,
    drop_log: &mut TokenBucket,
    log_rate: f64,
    src: SocketAddr,
    handled: Handled,
    now: Instant,
) {
    match handled {
        Handled::Relayed { .. } => metrics.messages_relayed += 1,
        Handled::ClosedReply => metrics.closed_room_replies += 1,
        Handled::Dropped(reason) => {
            Metrics::bump(&mut metrics.datagrams_dropped, reason.label());
            if reason == DropReason::RateLimited {
                Metrics::bump(&mut metrics.rate_limited, "chat");
            }
            if drop_log.take(now, log_rate, 5.0) {
                debug!("{src}: datagram dropped ({})", reason.label());
            }
        }
        Handled::Registered { .. } | Handled::Left | Handled::Closed { .. } => {}
    }
}

fn monotonic_usec() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u128) * 1_000_000 + (ts.tv_nsec as u128) / 1000
}
