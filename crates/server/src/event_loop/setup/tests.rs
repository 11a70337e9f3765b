//! The set-up's sockets, limits and first timers.

use super::open_files::{connection_cap, open_files_needed, FIXED_DESCRIPTORS};
use super::sockets::listen_again;
use super::*;
use crate::event_loop::{MAX_HTTP_CONNECTIONS, METRICS_LISTEN_BACKLOG};

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
    let original = include_str!("../../../tests/data/original_room_manager.json");
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
    assert!(bind_metrics(&config, None).expect("no listener").is_none());
    config.listen.metrics = "127.0.0.1:0".into();
    let l = bind_metrics(&config, None)
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
        ..Overrides::default()
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
    let (l, nodelay_inherited) = bind_tcp(&config, None).expect("a listener");
    assert_eq!(nodelay_inherited, None, "the listener took TCP_NODELAY");
    let fd = l.as_raw_fd();
    assert_eq!(sockopt::accept_queue(fd).expect("TCP_INFO").backlog, 77);
    let sndbuf = sockopt::get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).expect("SO_SNDBUF");
    assert_eq!(sndbuf, 2 * 64 * 1024);
    let nodelay = sockopt::get_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).expect("NODELAY");
    assert_ne!(nodelay, 0);
}
