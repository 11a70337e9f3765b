//! The mio shell: one thread, one `Poll`, the listeners, the UDP socket and a slab of TCP
//! connections. It maps readiness to calls into the pure modules (`handshake`, `rooms`) and
//! carries out what they decide: replies, datagrams and journal records.
//!
//! Each pass: wait for events (the timeout is the nearest timer); read up to
//! `datagrams_per_wakeup` datagrams (a still-ready socket makes the next wait zero, so a flood
//! cannot starve TCP); accept until `WouldBlock`; read every ready connection and answer its
//! frames; send the outbox; hand the new records to the writer. Datagrams come first because
//! a datagram waiting when the pass begins was sent before anything its TCP events could have
//! answered: a `__REGISTER__` queued before a join's request binds its member first, so the
//! member hears that join's notice however late the daemon wakes. A reply that carries a
//! token is queued on its connection and released only when the writer reports its batch
//! durable.

mod lifecycle;
mod requests;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use mio::event::Event;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::{Config, Overrides};
use crate::conn::{self, Conn, Kind, ReadUntil};
use crate::error::Error;
use crate::local::{self, Locals};
use crate::metrics::Metrics;
use crate::mmsg;
use crate::notify::{self, Notifier};
use crate::outbox::Outbox;
use crate::password;
use crate::persist::{self, Persister};
use crate::rate::{self, KeyedLimiter, TokenBucket};
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
/// Lines about dropped input that may be logged at once, before `drop_logs_per_sec` paces them.
const DROP_LOG_BURST: f64 = 5.0;
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
/// Password jobs (argon2, tens of milliseconds each, one at a time) queued at most, in all and
/// per source (an IPv4 address or an IPv6 /64); past either, a request needing one is refused
/// with `rate_limited`. The total is 32 sources' worth, so a few addresses cannot fill it.
const MAX_PASSWORD_JOBS: usize = 256;
/// See [`MAX_PASSWORD_JOBS`].
const MAX_PASSWORD_JOBS_PER_SOURCE: usize = 8;
/// History bytes a periodic checkpoint writes at most (the rest wait for the next one); the
/// one at shutdown writes everything.
const HISTORY_CHECKPOINT_BYTES: usize = 4 * 1024 * 1024;
/// How soon accepting is tried again after `accept` failed for want of descriptors or memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

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
    /// Password checks in flight: the connection waiting and its source (whose failure token
    /// is given back if the password was right, even when the connection has gone).
    password_tickets: HashMap<u64, (ConnId, IpAddr)>,
    next_ticket: u64,
    next_checkpoint: Instant,
    persister: Option<Persister>,
    outbox: Outbox,
    sender: udp::Sender,
    metrics: Metrics,
    notifier: Notifier,
    receiver: mmsg::Receiver,
    /// Our addresses that datagrams arrived at, numbered (a socket bound to a wildcard
    /// address answers each member from the one it registered with).
    locals: Locals,
    udp_ready: bool,
    /// Whether accepted TCRP connections get TCP_NODELAY from the listener: `None` until the
    /// first accepted connection is checked; `Some(false)` when the listener refused the
    /// option or the connection lacked it, and each connection then sets it itself.
    nodelay_inherited: Option<bool>,
    /// Connections with input left unread by their read budget.
    revisit: Vec<ConnId>,
    /// When to call `accept` again after it failed (EMFILE and friends). The listeners are
    /// edge-triggered: connections left in the backlog raise no new event, so without this
    /// they would wait for the next newcomer however many descriptors were freed meanwhile.
    accept_retry: Option<Instant>,
    next_deadline_check: Instant,
    next_sweep: Instant,
    next_status: Instant,
    watchdog: Option<(Duration, Instant)>,
    drop_log: TokenBucket,
    /// Paces the lines about failed `accept` calls (one a second).
    accept_log: TokenBucket,
    /// The kernel's drop count for the UDP socket at the last periodic check, which warns
    /// when it grew. Kept apart from the metric, which a scrape also refreshes: a scrape
    /// between two checks must not hide the drops from the log.
    kernel_drops_logged: u64,
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
        // Accepted connections inherit TCP_NODELAY; if the listener refuses it, each
        // connection gets it instead.
        let nodelay_inherited = match conn::set_listener_nodelay(&tcp) {
            Ok(()) => None,
            Err(e) => {
                debug!("TCP_NODELAY on the listener refused ({e}); set per connection");
                Some(false)
            }
        };
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
        if let Err(e) = mmsg::enable_timestamps(udp.as_raw_fd()) {
            warn!("UDP arrival timestamps unavailable ({e}); ocm_relay_delay_seconds stays empty");
        }
        if local::needs_arrival_address(config.listen.udp) {
            match local::enable_arrival_address(udp.as_raw_fd(), config.listen.udp) {
                Ok(()) => info!(
                    "UDP bound to a wildcard address: each member is answered from the address \
                     its __REGISTER__ came to"
                ),
                Err(e) => warn!(
                    "UDP arrival addresses unavailable ({e}); on a host with several addresses \
                     replies leave from the address the route picks"
                ),
            }
        }
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
        let persister = Persister::start_with(
            paths,
            loaded,
            persist::Options::from(&config.state),
            Arc::clone(&waker),
        )?;
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
            drop_log: TokenBucket::full(DROP_LOG_BURST, now),
            accept_log: TokenBucket::full(1.0, now),
            kernel_drops_logged: 0,
            next_sweep: now + Duration::from_millis(config.liveness.sweep_interval_ms),
            sender: udp::Sender::new(config.udp.max_batch_datagram_bytes),
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
            metrics: Metrics::new(),
            notifier: Notifier::from_env(),
            receiver: mmsg::Receiver::new(RECV_BUF_LEN),
            locals: Locals::default(),
            udp_ready: true,
            nodelay_inherited,
            revisit: Vec::new(),
            accept_retry: None,
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
            // Datagrams before connections (see the module docs): they may have waited longer.
            if events.iter().any(|event| event.token() == UDP_SOCKET) {
                self.udp_ready = true;
            }
            if self.udp_ready {
                self.udp_ready = self.drain_udp(now);
            }
            for event in events.iter() {
                match event.token() {
                    TCP_LISTENER => self.accept(Kind::Tcrp, now),
                    METRICS_LISTENER => self.accept(Kind::Http, now),
                    UDP_SOCKET => {} // drained above
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
                    let close = self.read_tcrp(id, now, ReadUntil::WouldBlock);
                    self.after_io(id, close);
                }
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
        if let Some(retry) = self.accept_retry {
            next = next.min(retry);
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
                    // EMFILE and friends: count, log, keep serving the connections we have, and
                    // try again shortly for the connections still in the backlog. Not input
                    // from a peer, so not under `drop_logs_per_sec`: at most a line a second.
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    self.metrics.accept_errors += 1;
                    if self.accept_log.take(now, 1.0, 1.0) {
                        warn!("accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                    }
                    return;
                }
            };
            let limits = &self.config.limits;
            let from_ip = self
                .per_ip
                .get(&rate::source(peer.ip()))
                .copied()
                .unwrap_or(0);
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
                if may_log_drop(&mut self.drop_log, now, self.config.rate.drop_logs_per_sec) {
                    warn!("{peer}: connection refused ({reason})");
                }
                continue; // dropping the stream closes it
            }
            if kind == Kind::Tcrp {
                // One getsockopt in the daemon's life checks that the option was inherited.
                let inherited = *self
                    .nodelay_inherited
                    .get_or_insert_with(|| stream.nodelay().unwrap_or(false));
                if !inherited {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!("{peer}: cannot set TCP_NODELAY: {e}");
                    }
                }
            }
            // The stream is never duplicated (no try_clone, no fork, CLOEXEC): `close` relies
            // on its drop being the descriptor's last close.
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
                Kind::Tcrp => *self.per_ip.entry(rate::source(peer.ip())).or_insert(0) += 1,
                Kind::Http => self.http_open += 1,
            }
            self.metrics.tcp_accepted += 1;
            self.metrics.tcp_open += 1;
            debug!("{peer} conn {id:?}: accepted ({kind:?})");
            // The request often came with the connection (a client writes it as soon as
            // its connect returns): reading it now, rather than on the readable edge in a
            // later pass of the loop, takes a pass off every handshake (5% more joins/s in
            // crates/bench/NOTES.md). If it has not come, the read finds nothing and the
            // edge comes as before; an edge for bytes read here finds them gone, which
            // `conn_event` takes in its stride.
            if kind == Kind::Tcrp {
                let close = self.read_tcrp(id, now, ReadUntil::ShortRead);
                self.after_io(id, close);
            }
        }
    }

    fn conn_event(&mut self, id: ConnId, event: &Event, now: Instant) {
        let Some(conn) = self.conns.get_mut(id.0) else {
            return; // spurious: closed earlier in this pass
        };
        let mut close = None;
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            close = match conn.kind {
                Kind::Tcrp => {
                    // A FIN or error that came with this edge raises no later one, so then
                    // the socket is read to the end.
                    let until = if event.is_read_closed() || event.is_error() {
                        ReadUntil::WouldBlock
                    } else {
                        ReadUntil::ShortRead
                    };
                    self.read_tcrp(id, now, until)
                }
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
        let conn = self.conns.remove(id.0);
        // No deregister: epoll drops a descriptor from its interest list when the descriptor
        // is closed (the stream is never duplicated), and mio keeps no per-source state on
        // Linux, so the `epoll_ctl(DEL)` would be a system call per handshake for nothing.
        // Events already returned for this token are skipped or harmless (`conn_event`).
        if conn.kind == Kind::Http {
            self.http_open -= 1;
        }
        let counted = conn.kind == Kind::Tcrp;
        if let Some(count) = self
            .per_ip
            .get_mut(&rate::source(conn.peer.ip()))
            .filter(|_| counted)
        {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&rate::source(conn.peer.ip()));
            }
        }
        self.metrics.tcp_open = self.metrics.tcp_open.saturating_sub(1);
        Metrics::bump(&mut self.metrics.tcp_closed, reason);
        debug!("{} conn {id:?}: closed ({reason})", conn.peer);
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
                    // Not expected: without IP_RECVERR, Linux does not report ICMP errors for
                    // earlier sends on an unconnected socket. Whatever it is concerns one
                    // receive, not the socket, and the budget bounds the retries.
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
                let local = self.locals.id(self.receiver.arrived_at(i));
                let handled =
                    self.registry
                        .handle_datagram(src, local, bytes, now, &mut self.outbox);
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
            self.record_relay_delays(count);
        }
        true
    }

    /// Counts, for each datagram of the last batch read, the time from its arrival on the
    /// socket until now, when everything it caused has been handed to the kernel.
    fn record_relay_delays(&mut self, count: usize) {
        let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) else {
            return;
        };
        for i in 0..count {
            if let Some(arrived) = self.receiver.arrived(i) {
                self.metrics.relay_delay.record(now.saturating_sub(arrived));
            }
        }
    }

    fn flush_outbox(&mut self) {
        if !self.outbox.is_empty() {
            self.sender
                .send_all(&self.udp, &mut self.outbox, &self.locals, &mut self.metrics);
        }
    }

    fn timers(&mut self, now: Instant) {
        if self.accept_retry.is_some_and(|at| now >= at) {
            self.accept_retry = None;
            self.accept(Kind::Tcrp, now);
            self.accept(Kind::Http, now);
        }
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
            self.registry
                .checkpoint_history_within(HISTORY_CHECKPOINT_BYTES);
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
        let before = self.kernel_drops_logged;
        self.kernel_drops_logged = drops;
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
        // The compactor wakes the loop too, with no batch done: its counters still count.
        self.metrics.state_compactions(persister.compactions());
        if done.is_empty() {
            return;
        }
        for d in &done {
            self.metrics.state_write(d.records, d.elapsed);
        }
        let durable = persister.durable();
        let now = Instant::now();
        let waiting: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.has_held())
            .map(|(k, _)| ConnId(k))
            .collect();
        for id in waiting {
            if let Some(conn) = self.conns.get_mut(id.0) {
                conn.release(durable, now, &mut self.metrics.durable_wait);
            }
            self.after_io(id, None);
        }
    }
}

/// Whether a line about dropped input may be logged now: at most `rate` a second after a
/// burst of [`DROP_LOG_BURST`]; none at all when `rate` is 0 (`[rate] drop_logs_per_sec`).
fn may_log_drop(bucket: &mut TokenBucket, now: Instant, rate: f64) -> bool {
    rate > 0.0 && bucket.take(now, rate, DROP_LOG_BURST)
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
            // Only when the line would show: a token spent on a hidden line would be one
            // fewer for the warnings that share the bucket.
            if log::log_enabled!(log::Level::Debug) && may_log_drop(drop_log, now, log_rate) {
                debug!("{src}: datagram dropped ({})", reason.label());
            }
        }
        Handled::Registered { .. } | Handled::Left | Handled::Closed { .. } => {}
    }
}
