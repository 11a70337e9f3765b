//! Everything before the first pass: the state locked and loaded, every socket bound and
//! tuned, the writer and password threads started.
//!
//! This module builds the server from its parts; `sockets` binds and tunes the listeners and
//! the UDP socket, and `open_files` fits the open-file limit to the connections allowed.

mod open_files;
mod sockets;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::net::{TcpListener, UdpSocket};
use mio::{Interest, Poll, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::{
    io_err, unix_now, Bound, Server, DEADLINE_CHECK, DROP_LOG_BURST, LIMITER_KEYS,
    METRICS_LISTENER, RECV_BUF_LEN, SIGNALS, TCP_LISTENER, UDP_SOCKET, WAKER,
};
use crate::config::{self, Config, Overrides};
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
use crate::{activation, mmsg, password, sockopt, udp};
pub(super) use open_files::{fit_open_files, nofile_limit};
use sockets::{
    bind_metrics, bind_tcp, bind_udp, enable_arrival_addresses, enable_arrival_timestamps,
    udp_sender,
};
pub(super) use sockets::{segmentation, set_listen_backlog, set_user_timeout};

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
        // First: the variables are read and unset, before any thread starts.
        let inherited = activation::take()?;
        let overrides = with_inherited_addresses(overrides, &inherited, &file_config)?;
        let config = file_config
            .with_overrides(&overrides)
            .map_err(Error::Config)?;
        let mut signals = hold_signals()?;
        let paths = Paths::new(&config.state.path);
        let lock = persist::lock(&paths)?;
        let (loaded, mut registry, now) = load_registry(&paths, &config)?;
        let connection_cap = fit_open_files(&config);
        let poll = Poll::new().map_err(io_err("cannot create poll"))?;
        let (mut tcp, nodelay_inherited) = bind_tcp(&config, inherited.tcp)?;
        let mut udp = bind_udp(&config, inherited.udp)?;
        warn_of_unreachable_members(registry.registered_addresses(), &config, udp.as_raw_fd());
        let sender = udp_sender(&config, udp.as_raw_fd());
        enable_arrival_timestamps(udp.as_raw_fd());
        if !enable_arrival_addresses(&config, udp.as_raw_fd()) {
            // Only when the kernel refused to say where datagrams arrive: the addresses stay
            // in the state file for a start that can use them.
            registry.forget_arrival_addresses();
        }
        let mut metrics_listener = bind_metrics(&config, inherited.metrics)?;
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
            per_source: HashMap::new(),
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
            accept_again: Vec::new(),
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

/// `overrides` with the addresses of the sockets systemd passed in place of the flags' (which
/// a passed socket makes moot: it is bound already); says which were passed, and warns of
/// each that differs from what the flags or `file` ask for, which it overrides.
fn with_inherited_addresses(
    mut overrides: Overrides,
    inherited: &activation::Inherited,
    file: &Config,
) -> Result<Overrides, Error> {
    let address = |local: std::io::Result<SocketAddr>| {
        local.map_err(io_err(
            "socket activation: a passed socket has no local address",
        ))
    };
    let differs = |key: &str, passed: SocketAddr, asked: Option<SocketAddr>| {
        if let Some(asked) = asked.filter(|&asked| asked != passed) {
            warn!(
                "socket activation: systemd passed {passed} where {key} asks for {asked}; \
                 {passed} is served (change the socket unit or the setting to agree)"
            );
        }
    };
    let mut passed = Vec::new();
    if let Some(tcp) = &inherited.tcp {
        let addr = address(tcp.local_addr())?;
        differs(
            "listen.tcp",
            addr,
            Some(overrides.tcp.unwrap_or(file.listen.tcp)),
        );
        overrides.tcp = Some(addr);
        overrides.from_systemd.tcp = true;
        passed.push(format!("tcp={addr}"));
    }
    if let Some(udp) = &inherited.udp {
        let addr = address(udp.local_addr())?;
        differs(
            "listen.udp",
            addr,
            Some(overrides.udp.unwrap_or(file.listen.udp)),
        );
        overrides.udp = Some(addr);
        overrides.from_systemd.udp = true;
        passed.push(format!("udp={addr}"));
    }
    if let Some(metrics) = &inherited.metrics {
        let addr = address(metrics.local_addr())?;
        let asked = overrides.metrics.as_deref().unwrap_or(&file.listen.metrics);
        differs(
            "listen.metrics",
            addr,
            config::parse_metrics(asked).ok().flatten(),
        );
        overrides.metrics = Some(addr.to_string());
        overrides.from_systemd.metrics = true;
        passed.push(format!("metrics={addr}"));
    }
    if !passed.is_empty() {
        info!(
            "socket activation: systemd passed {}; they win over the configuration",
            passed.join(" ")
        );
    }
    Ok(overrides)
}

/// Installs the handlers for SIGTERM, SIGINT, SIGHUP and SIGUSR1. Done first: a SIGHUP (a log
/// rotation script, an early reload), a SIGUSR1 (an early backup) or a SIGTERM during a long
/// load would otherwise kill the process with its default action. They wait in the handle and
/// are acted on once the loop runs.
fn hold_signals() -> Result<Signals, Error> {
    Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .map_err(io_err("cannot install signal handlers"))
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
