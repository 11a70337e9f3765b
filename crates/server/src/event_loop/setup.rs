//! Everything before the first pass: the state locked and loaded, every socket bound and
//! tuned, the writer and password threads started.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, UdpSocket};
use mio::{Interest, Poll, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::{
    io_err, unix_now, Bound, Server, DEADLINE_CHECK, DROP_LOG_BURST, LIMITER_KEYS,
    MAX_HTTP_CONNECTIONS, METRICS_LISTENER, METRICS_LISTEN_BACKLOG, RECV_BUF_LEN, SIGNALS,
    TCP_LISTENER, UDP_SOCKET, WAKER,
};
use crate::config::{Config, Overrides};
use crate::error::Error;
use crate::local;
use crate::metrics::Metrics;
use crate::notify::{self, Notifier};
use crate::outbox::Outbox;
use crate::persist::{self, Persister};
use crate::plural::Count;
use crate::rate::{KeyedLimiter, TokenBucket};
use crate::rooms::Registry;
use crate::store::{self, Paths};
use crate::wall_clock::WallClock;
use crate::{conn, mmsg, password, sockopt, udp};

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
        let config = file_config
            .with_overrides(&overrides)
            .map_err(Error::Config)?;
        let mut signals = hold_signals()?;
        let paths = Paths::new(&config.state.path);
        let lock = persist::lock(&paths)?;
        let (loaded, mut registry, now) = load_registry(&paths, &config)?;
        let connection_cap = fit_open_files(&config);
        let poll = Poll::new().map_err(io_err("cannot create poll"))?;
        let (mut tcp, nodelay_inherited) = bind_tcp(&config)?;
        let mut udp = bind_udp(&config)?;
        warn_of_unreachable_members(registry.registered_addresses(), &config, udp.as_raw_fd());
        let sender = udp_sender(&config, udp.as_raw_fd());
        enable_arrival_timestamps(udp.as_raw_fd());
        if !enable_arrival_addresses(&config, udp.as_raw_fd()) {
            // Only when the kernel refused to say where datagrams arrive: the addresses stay
            // in the state file for a start that can use them.
            registry.forget_arrival_addresses();
        }
        let mut metrics_listener = bind_metrics(&config)?;
        let waker = register_sources(
            &poll,
            &mut tcp,
            &mut udp,
            metrics_listener.as_mut(),
            &mut signals,
        )?;
        let persister = Persister::start_with(
            paths,
            loaded,
            persist::Options::from(&config.state),
            Arc::clone(&waker),
        )?;
        let passwords =
            password::Worker::start(waker).map_err(io_err("cannot start the password thread"))?;
        let bound = bound_addresses(&tcp, &udp, metrics_listener.as_ref())?;
        registry.set_own_address(bound.udp);
        Ok(Server::assemble(Parts {
            config,
            config_path,
            file_config,
            overrides,
            poll,
            tcp,
            udp,
            metrics_listener,
            signals,
            nodelay_inherited,
            sender,
            registry,
            persister,
            passwords,
            bound,
            lock,
            now,
            connection_cap,
        }))
    }

    /// The server over what [`Server::bind`] set up, every counter, timer and list at its
    /// first value: kept apart so that `bind` reads as its steps.
    fn assemble(parts: Parts) -> Server {
        let Parts {
            config,
            config_path,
            file_config,
            overrides,
            poll,
            tcp,
            udp,
            metrics_listener,
            signals,
            nodelay_inherited,
            sender,
            registry,
            persister,
            passwords,
            bound,
            lock,
            now,
            connection_cap,
        } = parts;
        let watchdog = notify::watchdog_interval().map(|every| (every, now));
        Server {
            poll,
            limiter: KeyedLimiter::new(LIMITER_KEYS),
            password_failures: KeyedLimiter::new(LIMITER_KEYS),
            passwords,
            password_tickets: HashMap::new(),
            next_ticket: 0,
            next_checkpoint: now + Duration::from_secs(config.history.checkpoint_secs),
            checkpoint_batch: 0,
            drop_log: TokenBucket::full(DROP_LOG_BURST, now),
            accept_log: TokenBucket::full(1.0, now),
            status_write_failures: 0,
            server_full: (0, None),
            kernel_drops_logged: 0,
            kernel_drops: udp::KernelDrops::default(),
            next_sweep: now + Duration::from_millis(config.liveness.sweep_interval_ms),
            sender,
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
            http_conns: Vec::new(),
            connection_cap,
            registry,
            persister: Some(persister),
            outbox: Outbox::default(),
            metrics: Metrics::new(),
            notifier: Notifier::from_env(),
            receiver: mmsg::Receiver::new(RECV_BUF_LEN),
            udp_unhandled: 0..0,
            udp_ready: true,
            udp_output: Default::default(),
            nodelay_inherited,
            revisit: Vec::new(),
            evict_candidates: Vec::new(),
            holding: Vec::new(),
            activity: 0,
            shed_in_batch: Vec::new(),
            wall_clock: WallClock::new(),
            accept_retry: None,
            eviction_futile: None,
            next_deadline_check: now + DEADLINE_CHECK,
            next_status: now,
            watchdog,
            bound,
            _lock: lock,
        }
    }
}

/// What [`Server::bind`] sets up before the server is assembled from it.
struct Parts {
    config: Config,
    config_path: Option<PathBuf>,
    file_config: Config,
    overrides: Overrides,
    poll: Poll,
    tcp: TcpListener,
    udp: UdpSocket,
    metrics_listener: Option<TcpListener>,
    signals: Signals,
    nodelay_inherited: Option<bool>,
    sender: udp::Sender,
    registry: Registry,
    persister: Persister,
    passwords: password::Worker,
    bound: Bound,
    /// The state's lock, held for as long as the server runs.
    lock: File,
    /// When the registry was built: the loop's first timers count from it.
    now: Instant,
    /// Handshake connections open at most (see [`fit_open_files`]).
    connection_cap: usize,
}

/// Installs the handlers for SIGTERM, SIGINT and SIGHUP. Done first: a SIGHUP (a log rotation
/// script, an early reload) or a SIGTERM during a long load would otherwise kill the process
/// with its default action. They wait in the handle and are acted on once the loop runs.
fn hold_signals() -> Result<Signals, Error> {
    Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(io_err("cannot install signal handlers"))
}

/// Reads the state (whose lock the caller holds) and builds the registry from it, saying what
/// was loaded and how long it took. Also returns when the registry was built.
fn load_registry(
    paths: &Paths,
    config: &Config,
) -> Result<(store::Loaded, Registry, Instant), Error> {
    let started = Instant::now();
    let mut loaded = store::load(paths)?;
    // Bound to one address, the socket sends from it: addresses members were saved with
    // on a wildcard-bound socket would override it. Dropped from the writer's copy too, so
    // the next snapshot leaves them out.
    if !local::needs_arrival_address(config.listen.udp) {
        loaded.state.forget_local_addresses();
    }
    let now = Instant::now();
    let mut registry = Registry::from_state(
        &loaded.state,
        config.registry_limits(),
        // Tokens come straight from the kernel (getrandom(2)), one call per token. It fails
        // only where no entropy source exists at all, and a daemon that cannot draw a
        // secret must not hand out a guessable one: that failure panics, as rand's OsRng did.
        Box::new(rand::rand_core::UnwrapErr(rand::rngs::SysRng)),
        now,
    );
    registry.set_wall_clock(now, unix_now());
    let names = &config.names;
    registry.set_lookalike_checks(
        names.refuse_lookalike_usernames,
        names.refuse_lookalike_room_names,
    );
    let stats = registry.stats();
    info!(
        "state {}: {}, {} loaded in {:?}",
        paths.state.display(),
        Count(stats.rooms, "room"),
        Count(stats.members, "token"),
        started.elapsed()
    );
    Ok((loaded, registry, now))
}

/// The kernel send buffer asked for each TCRP connection (Linux doubles it, for its own
/// bookkeeping): room for several of the largest replies (15 KiB), while a peer that sends
/// requests and never reads pins 128 KiB of the host's TCP memory, not up to 4 MiB. The
/// daemon holds up to `limits.max_output_bytes` more before it pauses the connection.
const TCRP_SEND_BUFFER_BYTES: libc::c_int = 64 * 1024;

/// Binds the TCRP listener, sets its backlog (`limits.listen_backlog`), its connections'
/// send buffer ([`TCRP_SEND_BUFFER_BYTES`]) and user timeout ([`set_user_timeout`]), and asks
/// it for TCP_NODELAY. Also returns what `nodelay_inherited` starts as: `None` (to be checked
/// on the first connection) when the listener took the option, `Some(false)` (each
/// connection sets it) when it refused.
fn bind_tcp(config: &Config) -> Result<(TcpListener, Option<bool>), Error> {
    let tcp = TcpListener::bind(config.listen.tcp).map_err(|source| Error::Bind {
        what: "TCP",
        addr: config.listen.tcp,
        source,
    })?;
    set_listen_backlog(&tcp, config.limits.listen_backlog)
        .map_err(io_err("cannot set the TCP listen backlog"))?;
    // Accepted connections inherit the send buffer size: without it, Linux grows each one's
    // up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) for a peer that does not read.
    if let Err(e) = sockopt::set_int(
        tcp.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        TCRP_SEND_BUFFER_BYTES,
    ) {
        warn!("cannot set the TCP send buffer size on the listener: {e}");
    }
    set_user_timeout(&tcp, "TCP", config);
    // Accepted connections inherit TCP_NODELAY; if the listener refuses it, each
    // connection gets it instead.
    let nodelay_inherited = match conn::set_listener_nodelay(&tcp) {
        Ok(()) => None,
        Err(e) => {
            debug!("TCP_NODELAY on the listener refused ({e}); set per connection");
            Some(false)
        }
    };
    Ok((tcp, nodelay_inherited))
}

/// Sets `TCP_USER_TIMEOUT` on the TCRP or metrics listener (`what`), which its connections
/// inherit: twice
/// `limits.handshake_timeout_secs`. Bytes a peer leaves unacknowledged, or refuses with its
/// receive window shut, for that long are given up by the kernel, connection and all. The
/// daemon's own timer (`handshake_timeout_secs` after the last reply, then a reset if replies
/// are unread) ends an open connection first; this bounds the replies of one the daemon
/// closed normally after its peer's end (FIN) while the peer reads none of them: without it,
/// the kernel keeps them (LAST-ACK) for as long as the peer acknowledges its window probes.
/// Twice, so that the kernel does not end a paused connection just before the daemon's
/// timer would (the close would then count as `io_error`). A metrics answer is closed after
/// it is written, so a scraper that never reads it is bounded the same way. Warns when the
/// kernel refuses.
pub(super) fn set_user_timeout(listener: &TcpListener, what: &str, config: &Config) {
    let timeout = Duration::from_secs(config.limits.handshake_timeout_secs.saturating_mul(2));
    if let Err(e) = conn::set_listener_user_timeout(listener, timeout) {
        warn!(
            "cannot set TCP_USER_TIMEOUT on the {what} listener: {e}; replies a peer never \
             reads may stay in the kernel for minutes after its connection is closed"
        );
    }
}

/// Sets the backlog of the TCRP listener to `backlog` (`limits.listen_backlog`), warning when
/// the kernel granted less. Under a flood of connections, clients past the backlog have their
/// SYN dropped and retry it after a second or more; a backlog as large as `max_connections`
/// lets a full table's worth wait in the kernel instead.
pub(super) fn set_listen_backlog(listener: &TcpListener, backlog: u32) -> std::io::Result<()> {
    match listen_again(listener, backlog)? {
        Some(granted) if granted < backlog => warn!(
            "TCP listen backlog: limits.listen_backlog asks for {backlog}, the kernel allows \
             {granted} (net.core.somaxconn caps it); raise net.core.somaxconn to at least \
             {backlog}"
        ),
        Some(granted) => debug!("TCP listen backlog: {granted}"),
        None => {}
    }
    Ok(())
}

/// Gives the listening `listener` a backlog of `backlog` and returns the one the kernel
/// granted (`None` when it cannot be read back). mio binds (socket, SO_REUSEADDR, bind,
/// listen) with a backlog of 128; Linux takes a second `listen(2)` on a listening socket as a
/// new backlog, so everything else about the socket (its address family, dual-stack or not,
/// SO_REUSEADDR) stays as mio made it.
fn listen_again(listener: &TcpListener, backlog: u32) -> std::io::Result<Option<u32>> {
    // Checked by `Config::validate`; a larger value would only be capped by the kernel.
    let asked = libc::c_int::try_from(backlog).unwrap_or(libc::c_int::MAX);
    // SAFETY: listen(2) on a descriptor we own; a failure is reported, not undefined.
    if unsafe { libc::listen(listener.as_raw_fd(), asked) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(match sockopt::accept_queue(listener.as_raw_fd()) {
        Ok(queue) => Some(queue.backlog),
        Err(e) => {
            debug!("listen backlog: cannot read it back: {e}");
            None
        }
    })
}

/// Binds the UCRP socket and sizes its buffers as `[udp]` asks, warning when the kernel
/// granted less.
fn bind_udp(config: &Config) -> Result<UdpSocket, Error> {
    let udp = UdpSocket::bind(config.listen.udp).map_err(|source| Error::Bind {
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
    warn_if_capped(
        "receive",
        "recv_buffer_bytes",
        config.udp.recv_buffer_bytes,
        rcvbuf,
        "net.core.rmem_max",
    );
    warn_if_capped(
        "send",
        "send_buffer_bytes",
        config.udp.send_buffer_bytes,
        sndbuf,
        "net.core.wmem_max",
    );
    Ok(udp)
}

/// The batching sender for the UDP socket `fd`: its batch size, address family and whether
/// it segments.
fn udp_sender(config: &Config, fd: RawFd) -> udp::Sender {
    let mut sender = udp::Sender::new(config.udp.max_batch_datagram_bytes);
    sender.set_ipv6_socket(config.listen.udp.is_ipv6());
    sender.set_segmentation(segmentation(config, fd));
    sender
}

/// Asks the kernel to stamp each datagram's arrival on the UDP socket `fd`, warning of what
/// goes without when it cannot.
fn enable_arrival_timestamps(fd: RawFd) {
    if let Err(e) = mmsg::enable_timestamps(fd) {
        warn!(
            "UDP arrival timestamps unavailable ({e}); ocm_relay_delay_seconds stays empty \
             and udp.max_chat_wait_ms drops nothing"
        );
    }
}

/// Whether each datagram on the UDP socket `fd` says which local address it came to: asked
/// for only when `listen.udp` is a wildcard address, and said either way.
fn enable_arrival_addresses(config: &Config, fd: RawFd) -> bool {
    local::needs_arrival_address(config.listen.udp)
        && match local::enable_arrival_address(fd, config.listen.udp) {
            Ok(()) => {
                info!(
                    "UDP bound to a wildcard address: each member is answered from the \
                     address its __REGISTER__ or chat came to"
                );
                true
            }
            Err(e) => {
                warn!(
                    "UDP arrival addresses unavailable ({e}); on a host with several \
                     addresses replies leave from the address the route picks"
                );
                false
            }
        }
}

/// Binds the metrics listener, when `listen.metrics` asks for one, with a backlog of
/// [`METRICS_LISTEN_BACKLOG`], warning when the kernel granted less.
fn bind_metrics(config: &Config) -> Result<Option<TcpListener>, Error> {
    let Some(addr) = config.metrics_addr().map_err(Error::Config)? else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).map_err(|source| Error::Bind {
        what: "metrics",
        addr,
        source,
    })?;
    match listen_again(&listener, METRICS_LISTEN_BACKLOG)
        .map_err(io_err("cannot set the metrics listen backlog"))?
    {
        Some(granted) if granted < METRICS_LISTEN_BACKLOG => warn!(
            "metrics listen backlog: ocmd asks for {METRICS_LISTEN_BACKLOG}, the kernel allows \
             {granted} (net.core.somaxconn caps it); raise net.core.somaxconn to at least \
             {METRICS_LISTEN_BACKLOG}"
        ),
        Some(granted) => debug!("metrics listen backlog: {granted}"),
        None => {}
    }
    set_user_timeout(&listener, "metrics", config);
    Ok(Some(listener))
}

/// Registers the listeners, the UDP socket and the signals with `poll` under their fixed
/// tokens, then creates the waker that the writer and password threads wake the loop with.
fn register_sources(
    poll: &Poll,
    tcp: &mut TcpListener,
    udp: &mut UdpSocket,
    metrics_listener: Option<&mut TcpListener>,
    signals: &mut Signals,
) -> Result<Arc<Waker>, Error> {
    let registry_handle = poll.registry();
    registry_handle
        .register(tcp, TCP_LISTENER, Interest::READABLE)
        .map_err(io_err("cannot register TCP listener"))?;
    registry_handle
        .register(udp, UDP_SOCKET, Interest::READABLE)
        .map_err(io_err("cannot register UDP socket"))?;
    if let Some(listener) = metrics_listener {
        registry_handle
            .register(listener, METRICS_LISTENER, Interest::READABLE)
            .map_err(io_err("cannot register metrics listener"))?;
    }
    registry_handle
        .register(signals, SIGNALS, Interest::READABLE)
        .map_err(io_err("cannot register signals"))?;
    Ok(Arc::new(
        Waker::new(registry_handle, WAKER).map_err(io_err("cannot create waker"))?,
    ))
}

/// The addresses the sockets were bound to, with the ports the OS chose for those asked as 0.
fn bound_addresses(
    tcp: &TcpListener,
    udp: &UdpSocket,
    metrics_listener: Option<&TcpListener>,
) -> Result<Bound, Error> {
    Ok(Bound {
        tcp: tcp.local_addr().map_err(io_err("TCP local address"))?,
        udp: udp.local_addr().map_err(io_err("UDP local address"))?,
        metrics: match metrics_listener {
            Some(l) => Some(l.local_addr().map_err(io_err("metrics local address"))?),
            None => None,
        },
    })
}

/// Says (level warn) how many members were registered from addresses of a family the UDP
/// socket `fd` cannot send to: IPv6 ones behind an IPv4 socket, IPv4 ones behind an IPv6 socket
/// that takes no IPv4 (bound to a specific IPv6 address, or `[::]` with `IPV6_V6ONLY`), after
/// `listen.udp` moved. They keep their tokens; sends to them fail and are counted.
fn warn_of_unreachable_members(
    registered: impl Iterator<Item = SocketAddr>,
    config: &Config,
    fd: RawFd,
) {
    let udp = config.listen.udp;
    let (reaches_ipv4, reaches_ipv6) = match udp {
        SocketAddr::V4(_) => (true, false),
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => (true, false),
        SocketAddr::V6(v6) if !v6.ip().is_unspecified() => (false, true),
        SocketAddr::V6(_) => {
            let v6_only = sockopt::get_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
                .is_ok_and(|only| only != 0);
            (!v6_only, true)
        }
    };
    let (mut ipv4, mut ipv6) = (0, 0);
    for address in registered {
        match address {
            SocketAddr::V4(_) if !reaches_ipv4 => ipv4 += 1,
            SocketAddr::V6(_) if !reaches_ipv6 => ipv6 += 1,
            _ => {}
        }
    }
    for (count, family, other) in [(ipv4, "IPv4", "IPv6"), (ipv6, "IPv6", "IPv4")] {
        if count == 0 {
            continue;
        }
        let again = if config.udp.register_only_from_join_ip {
            // The guard holds them to the IP they joined from.
            "they hear nothing until they join again (udp.register_only_from_join_ip holds \
             them to the IP they joined from)"
        } else {
            "they hear nothing until they register from an address the socket reaches"
        };
        warn!(
            "{} registered from {family} addresses, which the UDP socket ({udp}, {other} \
             only) cannot send to: {again}, or until listen.udp reaches {family} again",
            Count(count, "member")
        );
    }
}

/// Whether segmented sends are on: asked for by `config` and possible on the socket `fd`.
/// Says so when asked for but not possible.
pub(super) fn segmentation(config: &Config, fd: RawFd) -> bool {
    if !config.udp.segment_sends {
        return false;
    }
    let possible = mmsg::can_segment(fd);
    if !possible {
        info!(
            "UDP: this kernel cannot segment sends (UDP_SEGMENT, Linux 4.18); udp.segment_sends \
             has no effect, one datagram per message"
        );
    }
    possible
}

/// Descriptors the daemon holds besides its connections (standard streams, poll and its
/// waker, the listeners and the UDP socket, the signal pipe, the state's lock, journal,
/// snapshot and directory, the notify socket), with room to spare.
const FIXED_DESCRIPTORS: u64 = 64;

/// Open files `config` may need at once: every connection it allows, and the rest.
fn open_files_needed(config: &Config) -> u64 {
    (config.limits.max_connections as u64)
        .saturating_add(MAX_HTTP_CONNECTIONS as u64 + FIXED_DESCRIPTORS)
}

/// The handshake connections the open-file limit `open_files` leaves room for, besides the
/// metrics connections and [`FIXED_DESCRIPTORS`]: at most `max_connections`, at least one.
fn connection_cap(max_connections: usize, open_files: u64) -> usize {
    let room = open_files.saturating_sub(MAX_HTTP_CONNECTIONS as u64 + FIXED_DESCRIPTORS);
    max_connections
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .max(1)
}

/// Raises the soft open-file limit to what `config` needs, no further than the hard limit,
/// and returns how many handshake connections may be open at once: `limits.max_connections`,
/// or fewer when the limit cannot fit them ([`connection_cap`]). Were the cap left above the
/// descriptors, `accept` would fail (EMFILE) before it was reached, so the idle connections
/// that a full table closes to make room would hold newcomers (and scrapes) off instead:
/// sources keeping their connections open with a request now and then would lock everyone
/// out for good. A shell's soft limit is 1024 on most systems, under the 4096 connections
/// allowed by default; the shipped unit sets both limits to 65536 (`LimitNOFILE=`), and then
/// nothing is changed.
pub(super) fn fit_open_files(config: &Config) -> usize {
    let max_connections = config.limits.max_connections;
    let needed = open_files_needed(config);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return max_connections;
    }
    if limit.rlim_cur >= needed {
        return max_connections;
    }
    let raised = needed.min(limit.rlim_max);
    if raised > limit.rlim_cur {
        let new = libc::rlimit {
            rlim_cur: raised,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit(2) reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            debug!(
                "open files: soft limit raised from {} to {raised}",
                limit.rlim_cur
            );
            limit.rlim_cur = raised;
        } else {
            debug!(
                "open files: cannot raise the soft limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let cap = connection_cap(max_connections, limit.rlim_cur);
    if cap == max_connections {
        return cap;
    }
    // Warned only when the connections alone cannot fit: a hard limit of 4096 (some systems'
    // default) against the default 4096 connections falls short by the spare descriptors
    // alone, and a warning at every start there would teach operators to ignore it.
    if limit.rlim_cur < max_connections as u64 {
        warn!(
            "open files: limits.max_connections = {max_connections} needs about {needed}, but \
             the limit is {} (ulimit -n; LimitNOFILE= under systemd): at most {cap} handshake \
             connections are kept open, and a new one past them closes an idle one to make \
             room; raise the limit to allow more",
            limit.rlim_cur
        );
    } else {
        info!(
            "open files: the limit of {} leaves room for {cap} handshake connections besides \
             the metrics connections and the daemon's own files: limits.max_connections = \
             {max_connections} is taken as {cap}",
            limit.rlim_cur
        );
    }
    cap
}

/// Says (level warn) when the kernel granted a UDP buffer smaller than `[udp] key` asked for:
/// it caps the request at the `sysctl`'s value, silently. Linux reports twice the room it
/// grants (the other half covers its bookkeeping), so `granted` is below twice `asked`
/// exactly when the request was capped.
fn warn_if_capped(what: &str, key: &str, asked: usize, granted: usize, sysctl: &str) {
    if asked == 0 || granted >= asked.saturating_mul(2) {
        return;
    }
    warn!(
        "UDP {what} buffer: udp.{key} asks for {asked} bytes, the kernel allows {} \
         ({sysctl} caps it); raise {sysctl} to at least {asked}{}",
        granted / 2,
        if what == "receive" {
            ", or bursts past it are dropped (ocm_udp_receive_buffer_drops_total)"
        } else {
            ""
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_room_for_metrics_and_the_daemons_own_files() {
        let spare = MAX_HTTP_CONNECTIONS as u64 + FIXED_DESCRIPTORS;
        assert_eq!(connection_cap(4096, 65_536), 4096);
        assert_eq!(connection_cap(4096, 4096 + spare), 4096);
        // A hard limit of 4096, some systems' default: short by the spare alone.
        assert_eq!(connection_cap(4096, 4096), 4096 - spare as usize);
        assert_eq!(connection_cap(4096, 200), 200 - spare as usize);
        // Never none: a limit too low for anything still takes one.
        assert_eq!(connection_cap(4096, 10), 1);
        assert_eq!(connection_cap(100, u64::MAX), 100);
    }

    /// With `refuse_lookalike_room_names` on, the rooms of the state loaded are filed for the
    /// check as the state is loaded, before the daemon serves, not by the first create inside
    /// its request; with it off, nothing is filed.
    #[test]
    fn the_rooms_loaded_are_filed_for_the_lookalike_check_only_when_it_is_on() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let paths = store::Paths::new(&dir.path().join("room_manager.json"));
        let original = include_str!("../../tests/data/original_room_manager.json");
        std::fs::write(&paths.state, original).expect("the state file");
        // One room, `lobby`, filed under each half of its word.
        for (on, filed) in [(true, Some(2)), (false, None)] {
            let mut config = Config::default();
            config.names.refuse_lookalike_room_names = on;
            let (_, registry, _) = load_registry(&paths, &config).expect("the state loads");
            assert_eq!(registry.lookalikes_filed().1, filed, "check on: {on}");
        }
    }
    /// A listener on a loopback port of its own, as mio binds it (a backlog of 128).
    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0".parse().expect("an address")).expect("a listener")
    }

    /// The TCRP listener's backlog is `limits.listen_backlog`, asked for again on the socket
    /// mio made, and read back as the kernel granted it.
    #[test]
    fn the_listen_backlog_asked_for_is_set_and_read_back() {
        let l = listener();
        assert_eq!(listen_again(&l, 50).expect("listen"), Some(50));
        set_listen_backlog(&l, 40).expect("listen");
        let queue = sockopt::accept_queue(l.as_raw_fd()).expect("TCP_INFO");
        assert_eq!(queue.backlog, 40);
    }

    /// A listener that the kernel refuses `listen(2)` on is an error, not a backlog of none.
    #[test]
    fn a_listen_the_kernel_refuses_is_an_error() {
        // A UDP socket: listen(2) fails with EOPNOTSUPP.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        // SAFETY: the descriptor is moved out of `udp` and owned by the listener alone.
        let l = unsafe {
            use std::os::fd::{FromRawFd, IntoRawFd};
            TcpListener::from_raw_fd(udp.into_raw_fd())
        };
        assert!(listen_again(&l, 50).is_err());
        assert!(set_listen_backlog(&l, 50).is_err());
    }

    /// Listeners give their connections a user timeout of twice the handshake timeout.
    #[test]
    fn listeners_get_a_user_timeout_of_twice_the_handshake_timeout() {
        let mut config = Config::default();
        config.limits.handshake_timeout_secs = 7;
        let l = listener();
        set_user_timeout(&l, "TCP", &config);
        let ms = sockopt::get_int(l.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)
            .expect("TCP_USER_TIMEOUT");
        assert_eq!(ms, 14_000);
    }

    /// The metrics listener is bound only when asked for, with a backlog of 64 whatever
    /// `limits.listen_backlog` says.
    #[test]
    fn the_metrics_listener_is_bound_when_asked_for_with_its_own_backlog() {
        let mut config = Config::default();
        config.limits.listen_backlog = 1000;
        config.listen.metrics = "off".into();
        assert!(bind_metrics(&config).expect("no listener").is_none());
        config.listen.metrics = "127.0.0.1:0".into();
        let l = bind_metrics(&config)
            .expect("a listener")
            .expect("one is asked for");
        let queue = sockopt::accept_queue(l.as_raw_fd()).expect("TCP_INFO");
        assert_eq!(queue.backlog, METRICS_LISTEN_BACKLOG);
        assert!(l.local_addr().expect("an address").ip().is_loopback());
    }

    /// Segmented sends are on only when `udp.segment_sends` asks for them and the kernel
    /// can (any kernel these tests run on: Linux 4.18 and later).
    #[test]
    fn segmented_sends_are_on_only_when_asked_for_and_possible() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let mut config = Config::default();
        config.udp.segment_sends = true;
        assert!(
            mmsg::can_segment(udp.as_raw_fd()),
            "a kernel without UDP_SEGMENT"
        );
        assert!(segmentation(&config, udp.as_raw_fd()));
        config.udp.segment_sends = false;
        assert!(!segmentation(&config, udp.as_raw_fd()));
    }

    /// Arrival addresses are asked for only on a wildcard-bound socket.
    #[test]
    fn arrival_addresses_are_asked_for_only_on_a_wildcard_address() {
        let mut config = Config::default();
        for (addr, wanted) in [("127.0.0.1:0", false), ("0.0.0.0:0", true)] {
            config.listen.udp = addr.parse().expect("an address");
            let udp = std::net::UdpSocket::bind(config.listen.udp).expect("a UDP socket");
            assert_eq!(
                enable_arrival_addresses(&config, udp.as_raw_fd()),
                wanted,
                "{addr}"
            );
            let on = sockopt::get_int(udp.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO)
                .expect("IP_PKTINFO");
            assert_eq!(on != 0, wanted, "{addr}");
        }
    }

    /// The open files needed are the connections allowed, the metrics connections and the
    /// daemon's own files.
    #[test]
    fn the_open_files_needed_are_the_connections_and_the_spare() {
        let mut config = Config::default();
        config.limits.max_connections = 100;
        assert_eq!(
            open_files_needed(&config),
            100 + MAX_HTTP_CONNECTIONS as u64 + FIXED_DESCRIPTORS
        );
    }

    /// A server's first sweep, deadline check and checkpoint come their intervals after it
    /// was built, not at once; its connection cap is `limits.max_connections` where the
    /// open-file limit allows them (raised to what they need if it was lower).
    #[test]
    fn a_new_servers_timers_start_their_intervals_after_it_was_built() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = Config::default();
        let overrides = Overrides {
            tcp: Some("127.0.0.1:0".parse().expect("an address")),
            udp: Some("127.0.0.1:0".parse().expect("an address")),
            state: Some(dir.path().join("room_manager.json")),
            metrics: Some("off".into()),
        };
        let before = Instant::now();
        let s = Server::bind(config.clone(), None, overrides).expect("the server binds");
        let after = Instant::now();
        let sweep = Duration::from_millis(config.liveness.sweep_interval_ms);
        let checkpoint = Duration::from_secs(config.history.checkpoint_secs);
        for (what, at, every) in [
            ("sweep", s.next_sweep, sweep),
            ("deadline check", s.next_deadline_check, DEADLINE_CHECK),
            ("checkpoint", s.next_checkpoint, checkpoint),
        ] {
            assert!(at >= before + every && at <= after + every, "{what}");
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) fills the struct we own.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        if limit.rlim_max >= open_files_needed(&config) {
            assert_eq!(s.connection_cap, config.limits.max_connections);
            assert!(limit.rlim_cur >= open_files_needed(&config), "raised");
        }
    }
    /// The TCRP listener gets the backlog asked for, a send buffer of
    /// [`TCRP_SEND_BUFFER_BYTES`] (Linux reports it doubled) and TCP_NODELAY, which its
    /// connections inherit; `nodelay_inherited` then starts unknown.
    #[test]
    fn the_tcrp_listener_gets_its_backlog_send_buffer_and_nodelay() {
        let mut config = Config::default();
        config.listen.tcp = "127.0.0.1:0".parse().expect("an address");
        config.limits.listen_backlog = 77;
        let (l, nodelay_inherited) = bind_tcp(&config).expect("a listener");
        assert_eq!(nodelay_inherited, None, "the listener took TCP_NODELAY");
        let fd = l.as_raw_fd();
        assert_eq!(sockopt::accept_queue(fd).expect("TCP_INFO").backlog, 77);
        let sndbuf = sockopt::get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).expect("SO_SNDBUF");
        assert_eq!(sndbuf, 2 * 64 * 1024);
        let nodelay = sockopt::get_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).expect("NODELAY");
        assert_ne!(nodelay, 0);
    }
}
