//! The configuration's parsing, checks, defaults and overrides.

/// A reload's changes: each changed key with its old and new value, sorted by name; none
/// for an equal configuration.
#[test]
fn changes_name_each_changed_key_with_both_values() {
    let old = super::Config::default();
    assert_eq!(old.changes(&old.clone()), Some(Vec::new()));
    let new = super::Config::from_toml(
        "[rate]\nchat_per_sec = 20.0\n[log]\nlevel = \"debug\"\n[names]\nrefuse_invisible = true\n",
    )
    .unwrap();
    assert_eq!(
        old.changes(&new).unwrap(),
        [
            "log.level \"info\" -> \"debug\"",
            "names.refuse_invisible false -> true",
            "rate.chat_per_sec 50.0 -> 20.0",
        ]
    );
    // A state path that is not UTF-8 cannot be rendered: not "nothing changed".
    let mut odd = super::Config::default();
    odd.state.path = std::path::PathBuf::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff.json"),
    );
    assert_eq!(odd.changes(&odd.clone()), None);
}

use super::*;

/// Each way an address can be wrong is named, in the file and on the command line.
#[test]
fn a_listen_address_that_does_not_parse_says_why() {
    for (text, why) in [
        (
            "127.0.0.1:70000",
            "the port must be a number from 0 to 65535",
        ),
        ("localhost:9090", "host names are not looked up"),
        ("127.0.0.1", "the :PORT is missing"),
        ("::1", "the :PORT is missing"),
        ("[::1]", "the :PORT is missing"),
        ("::1:9090", "goes in brackets"),
        ("::ffff:10.0.0.1:9090", "an IPv6 address goes in brackets"),
        ("[::g]:9090", "the part in brackets is not an IPv6 address"),
        ("[::1:9090", "the ] closing the IPv6 address is missing"),
        ("[::1", "the ] closing the IPv6 address is missing"),
        ("9090", "the IP address is missing: 0.0.0.0:9090 listens"),
        (":9090", "the IP address is missing"),
        (
            "*:9090",
            "[::]:9090 on every address, 127.0.0.1:9090 on this host only",
        ),
        ("*:x", "the port must be a number from 0 to 65535"),
    ] {
        let e = parse_listen_addr(text).unwrap_err();
        assert!(e.contains(why) && e.contains(text), "{text}: {e}");
    }
    assert_eq!(
        parse_listen_addr("[::1]:9090").unwrap(),
        "[::1]:9090".parse::<SocketAddr>().unwrap()
    );
    let e = Config::from_toml("[listen]\nudp = \"127.0.0.1:70000\"\n").unwrap_err();
    assert!(e.to_string().contains("from 0 to 65535"), "{e}");
}

#[test]
fn empty_file_is_the_defaults() {
    assert_eq!(Config::from_toml("").unwrap(), Config::default());
}

#[test]
fn shipped_example_matches_the_defaults() {
    let text = include_str!("../../../../config/ocmd.toml");
    assert_eq!(Config::from_toml(text).unwrap(), Config::default());
}

#[test]
fn defaults_round_trip_through_toml() {
    let text = Config::default().to_toml();
    assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
}

#[test]
fn errors_name_the_key() {
    let cases = [
        ("[listen]\ntcp = \"127.0.0.1:70000\"", "tcp"),
        (
            "[limits]\nhandshake_timeout_secs = -1",
            "handshake_timeout_secs",
        ),
        ("[limits]\nbogus = 1", "bogus"),
        ("[limits]\nmax_connections = \"many\"", "max_connections"),
        (
            "[limits]\nhandshake_timeout_secs = 0",
            "limits.handshake_timeout_secs",
        ),
        (
            "[rate]\nchat_per_sec = 5.0\nchat_burst = 0.5",
            "rate.chat_burst",
        ),
        ("[listen]\nmetrics = \"nowhere\"", "listen.metrics"),
        ("[log]\nlevel = \"loud\"", "log.level"),
        (
            "[udp]\nmax_batch_datagram_bytes = 65508",
            "udp.max_batch_datagram_bytes",
        ),
        ("[udp]\nmax_chat_wait_ms = 86400001", "udp.max_chat_wait_ms"),
        (
            "[udp]\ndatagrams_per_wakeup = 65537",
            "udp.datagrams_per_wakeup",
        ),
        (
            "[udp]\nmax_batch_datagram_bytes = 100",
            "udp.max_batch_datagram_bytes",
        ),
        ("[history]\ncheckpoint_secs = 0", "history.checkpoint_secs"),
        ("[history]\nmessages = 10001", "history.messages"),
        (
            "[history]\nmax_bytes_per_room = 16777217",
            "history.max_bytes_per_room",
        ),
        (
            "[udp]\ndatagrams_per_wakeup = 0",
            "udp.datagrams_per_wakeup",
        ),
        (
            "[liveness]\nclosed_reply_interval_ms = 0",
            "liveness.closed_reply_interval_ms",
        ),
        (
            "[limits]\nhandshake_timeout_secs = 9223372036854775807",
            "limits.handshake_timeout_secs",
        ),
        (
            "[limits]\nmax_payload_bytes = 9223372036854775807",
            "limits.max_payload_bytes",
        ),
        (
            "[liveness]\nsweep_interval_ms = 9223372036854775807",
            "liveness.sweep_interval_ms",
        ),
        (
            "[history]\ncheckpoint_secs = 9223372036854775807",
            "history.checkpoint_secs",
        ),
        // Sized at the first closure: a huge value failed there, from the network.
        (
            "[liveness]\ntombstone_capacity = 10000001",
            "liveness.tombstone_capacity",
        ),
        // Journaled as a u32: a larger value was cut short there (from a review).
        (
            "[liveness]\nmin_keepalive_secs = 4294967296",
            "liveness.min_keepalive_secs",
        ),
    ];
    for (text, key) in cases {
        let err = Config::from_toml(text).unwrap_err();
        assert!(err.contains(key), "{text:?} gave {err:?}");
    }
}

#[test]
fn the_compaction_threshold_is_read_from_the_state_section() {
    let c = Config::from_toml("[state]\ncompact_journal_bytes = 4096").unwrap();
    assert_eq!(c.state.compact_journal_bytes, 4096);
    assert_eq!(
        crate::persist::Options::from(&c.state).compact_journal_bytes,
        4096
    );
    assert_eq!(
        Config::default().state.compact_journal_bytes,
        8 * 1024 * 1024
    );
}

/// The defaults with these listeners.
fn listening(tcp: &str, metrics: &str) -> Config {
    let mut c = Config::default();
    c.listen.tcp = tcp.parse().unwrap();
    c.listen.metrics = metrics.into();
    c
}

#[test]
fn tcp_and_metrics_listeners_that_clash_are_refused() {
    let clashes = [
        (
            "127.0.0.1:9090",
            "127.0.0.1:9090",
            "are both 127.0.0.1:9090",
        ),
        (
            "0.0.0.0:9090",
            "127.0.0.1:9090",
            "0.0.0.0 takes TCP port 9090",
        ),
        (
            "192.0.2.7:9090",
            "0.0.0.0:9090",
            "0.0.0.0 takes TCP port 9090",
        ),
        ("[::]:9090", "127.0.0.1:9090", ":: takes TCP port 9090"),
        ("[::1]:9090", "[::]:9090", ":: takes TCP port 9090"),
        ("0.0.0.0:9090", "[::]:9090", ":: takes TCP port 9090"),
        ("[::ffff:127.0.0.1]:9090", "127.0.0.1:9090", "are both"),
        // The kernel ignores the scope of an address that needs none.
        ("[2001:db8::1%2]:9090", "[2001:db8::1%3]:9090", "are both"),
    ];
    for (tcp, metrics, says) in clashes {
        let err = listening(tcp, metrics)
            .check_listeners_where(true)
            .unwrap_err();
        for part in ["listen.tcp", "listen.metrics", says] {
            assert!(err.contains(part), "{tcp} / {metrics}: {err:?}");
        }
    }
}

/// A fresh IPv6 socket's `IPV6_V6ONLY` says what the sysctl says.
#[test]
fn the_ipv6_wildcard_default_is_read_as_the_sysctl_says() {
    // Where /proc shows the setting (not under the shipped unit), both ways agree.
    if let Ok(v) = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only") {
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            assert_eq!(super::check::v6_wildcard_takes_ipv4(), v.trim() != "1");
        }
    }
}

/// With `net.ipv6.bindv6only = 1`, `[::]` takes only the IPv6 addresses: beside an IPv4
/// address on the same port it binds, and beside an IPv6 one it still clashes; an
/// IPv4-mapped address cannot be bound at all.
#[test]
fn with_bindv6only_the_ipv6_wildcard_leaves_ipv4_alone() {
    for (tcp, metrics) in [
        ("[::]:9090", "127.0.0.1:9090"),
        ("0.0.0.0:9090", "[::]:9090"),
    ] {
        let c = listening(tcp, metrics);
        assert_eq!(c.check_listeners_where(false), Ok(()), "{tcp} / {metrics}");
        assert!(c.check_listeners_where(true).is_err(), "{tcp} / {metrics}");
    }
    let err = listening("[::1]:9090", "[::]:9090")
        .check_listeners_where(false)
        .unwrap_err();
    assert!(
        err.contains(":: takes TCP port 9090 on every IPv6 address"),
        "{err}"
    );
    for (tcp, metrics, key) in [
        ("[::]:9090", "[::ffff:127.0.0.1]:9090", "listen.metrics"),
        ("[::ffff:127.0.0.1]:9090", "off", "listen.tcp"),
    ] {
        let err = listening(tcp, metrics)
            .check_listeners_where(false)
            .unwrap_err();
        assert!(
            err.contains(key) && err.contains("write it as 127.0.0.1:9090"),
            "{err}"
        );
    }
    let mut c = listening("127.0.0.1:9090", "off");
    c.listen.udp = "[::ffff:127.0.0.1]:9091".parse().unwrap();
    assert!(c
        .check_listeners_where(false)
        .unwrap_err()
        .contains("listen.udp"));
    assert_eq!(c.check_listeners_where(true), Ok(()));
}

#[test]
fn listeners_on_other_ports_or_addresses_do_not_clash() {
    let fine = [
        ("127.0.0.1:9090", "127.0.0.1:9092"),
        ("127.0.0.1:9090", "127.0.0.2:9090"),
        // Port 0: the system picks a free port for each.
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("0.0.0.0:0", "0.0.0.0:0"),
        // An IPv4 wildcard leaves the IPv6 addresses alone.
        ("0.0.0.0:9090", "[::1]:9090"),
        // One link-local address on two links is two addresses.
        ("[fe80::1%2]:9090", "[fe80::1%3]:9090"),
        ("127.0.0.1:9090", "off"),
    ];
    for (tcp, metrics) in fine {
        assert_eq!(
            listening(tcp, metrics).check_listeners_where(true),
            Ok(()),
            "{tcp} / {metrics}"
        );
    }
    // The UDP socket is another protocol: it may share the port number.
    let mut c = listening("127.0.0.1:9090", "127.0.0.1:9092");
    c.listen.udp = "127.0.0.1:9090".parse().unwrap();
    assert_eq!(c.check_listeners_where(true), Ok(()));
    c.listen.udp = "127.0.0.1:9092".parse().unwrap();
    assert_eq!(c.check_listeners_where(true), Ok(()));
}

#[test]
fn listeners_are_checked_with_the_flags_applied() {
    let file = Config::from_toml("[listen]\ntcp = \"127.0.0.1:9092\"").unwrap();
    let err = file.with_overrides(&Overrides::default()).unwrap_err();
    assert!(err.contains("listen.tcp and listen.metrics"), "{err}");
    // A flag that moves one of them makes it fine, and one that moves it onto the other
    // is a clash.
    let moved = Overrides {
        metrics: Some("127.0.0.1:9093".into()),
        ..Overrides::default()
    };
    assert!(file.with_overrides(&moved).is_ok());
    let onto = Overrides {
        tcp: Some("127.0.0.1:9093".parse().unwrap()),
        metrics: Some("0.0.0.0:9093".into()),
        ..Overrides::default()
    };
    let err = Config::default().with_overrides(&onto).unwrap_err();
    assert!(
        err.contains("127.0.0.1:9093") && err.contains("0.0.0.0:9093"),
        "{err}"
    );
    // Two listeners systemd passed are bound already (on a host where the check's reading of
    // the system's settings may not be theirs): not checked against each other. One passed
    // and one to bind still are.
    let passed = |tcp: bool, metrics: bool| Overrides {
        from_systemd: crate::config::FromSystemd {
            tcp,
            metrics,
            udp: false,
        },
        ..onto.clone()
    };
    assert!(Config::default()
        .with_overrides(&passed(true, true))
        .is_ok());
    assert!(Config::default()
        .with_overrides(&passed(true, false))
        .is_err());
    assert!(Config::default()
        .with_overrides(&passed(false, true))
        .is_err());
}

/// A file is read and checked as its text would be, and one that cannot be read or
/// checked is refused with its path.
#[test]
fn a_config_file_is_read_and_checked_and_named_when_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocmd.toml");
    std::fs::write(&path, "[history]\nmessages = 7\n").unwrap();
    assert_eq!(Config::from_file(&path).unwrap().history.messages, 7);
    std::fs::write(&path, "[history]\nmessages = 10001\n").unwrap();
    let err = Config::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("ocmd.toml") && err.contains("history.messages"),
        "{err}"
    );
    let missing = dir.path().join("missing.toml");
    let err = Config::from_file(&missing).unwrap_err().to_string();
    assert!(
        err.contains("cannot read") && err.contains("missing.toml"),
        "{err}"
    );
}

/// What `--check-config` prints is the configuration in effect, not the defaults.
#[test]
fn a_changed_configuration_round_trips_through_its_toml() {
    let c = Config::from_toml("[history]\nmessages = 7\n[udp]\nsegment_sends = false").unwrap();
    assert_ne!(c, Config::default());
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
}

/// Every bound is inclusive: a value at it is accepted.
#[test]
fn values_at_their_bounds_are_accepted() {
    let at_bounds = "
        [limits]
        max_payload_bytes = 16777216
        handshake_timeout_secs = 86400
        listen_backlog = 2147483647
        [liveness]
        sweep_interval_ms = 86400000
        room_idle_secs = 31622400
        min_keepalive_secs = 4294967295
        tombstone_capacity = 10000000
        [history]
        checkpoint_secs = 86400
        max_bytes_per_room = 16777216
        messages = 10000
        [udp]
        max_chat_wait_ms = 86400000
        datagrams_per_wakeup = 65536
        max_batch_datagram_bytes = 65507
        recv_buffer_bytes = 1073741823
        send_buffer_bytes = 1073741823
        [rate]
        chat_per_sec = 0.0
        chat_burst = 0.0
        requests_per_sec = 0.5
        requests_burst = 1.0
        password_failures_per_min = 0.0
        password_failures_burst = 0.0
        drop_logs_per_sec = 0.0
    ";
    let c = Config::from_toml(at_bounds).unwrap();
    assert_eq!(c.udp.recv_buffer_bytes, MAX_SOCKET_BUFFER_BYTES as usize);
    let c = Config::from_toml("[udp]\nmax_batch_datagram_bytes = 512").unwrap();
    assert_eq!(c.udp.max_batch_datagram_bytes, 512);
    let c = "[rate]\npassword_failures_per_min = 6.0\npassword_failures_burst = 1.0";
    assert!(Config::from_toml(c).is_ok());
}

/// One past a bound, or a rate that is no number, is refused by name.
#[test]
fn values_past_their_bounds_are_refused_by_name() {
    let cases = [
        (
            "[liveness]\nroom_idle_secs = 31622401",
            "liveness.room_idle_secs",
        ),
        (
            "[udp]\nrecv_buffer_bytes = 1073741824",
            "udp.recv_buffer_bytes",
        ),
        (
            "[limits]\nlisten_backlog = 2147483648",
            "limits.listen_backlog",
        ),
        (
            "[udp]\nsend_buffer_bytes = 1073741824",
            "udp.send_buffer_bytes",
        ),
        (
            "[udp]\nmax_batch_datagram_bytes = 511",
            "udp.max_batch_datagram_bytes",
        ),
        ("[rate]\nchat_per_sec = -0.5", "rate.chat_per_sec"),
        ("[rate]\nrequests_per_sec = nan", "rate.requests_per_sec"),
        ("[rate]\nrequests_per_sec = inf", "rate.requests_per_sec"),
        (
            "[rate]\nrequests_per_sec = 1.0\nrequests_burst = nan",
            "rate.requests_burst",
        ),
        (
            "[rate]\npassword_failures_per_min = -1.0",
            "rate.password_failures_per_min must be 0 (unlimited) or a positive number",
        ),
        (
            "[rate]\npassword_failures_per_min = inf",
            "rate.password_failures_per_min must be 0 (unlimited) or a positive number",
        ),
        (
            "[rate]\npassword_failures_per_min = 6.0\npassword_failures_burst = 0.5",
            "rate.password_failures_burst must be at least 1 when rate.password_failures_per_min is set",
        ),
        (
            "[rate]\npassword_failures_per_min = 6.0\npassword_failures_burst = nan",
            "rate.password_failures_burst must be at least 1",
        ),
        ("[rate]\ndrop_logs_per_sec = -1.0", "rate.drop_logs_per_sec"),
        ("[rate]\ndrop_logs_per_sec = nan", "rate.drop_logs_per_sec"),
        ("[state]\npath = \"\"", "state.path"),
    ];
    for (text, key) in cases {
        let err = Config::from_toml(text).unwrap_err();
        assert!(err.contains(key), "{text:?} gave {err:?}");
    }
}

/// The registry and the request limiter get the configured values, in their units.
#[test]
fn the_limits_handed_on_are_the_configured_ones() {
    let c = Config::from_toml(
        "
        [limits]
        max_rooms = 11
        max_members_per_room = 12
        max_tokens = 13
        [liveness]
        keepalive_misses = 4
        min_keepalive_secs = 15
        tombstone_ttl_secs = 16
        tombstone_capacity = 17
        closed_reply_interval_ms = 18
        room_idle_secs = 19
        [rate]
        chat_per_sec = 2.5
        chat_burst = 3.5
        requests_per_sec = 4.5
        requests_burst = 5.5
        password_failures_per_min = 30.0
        password_failures_burst = 6.5
        [history]
        messages = 20
        max_bytes_per_room = 21
        [udp]
        register_only_from_join_ip = true
        ",
    )
    .unwrap();
    let l = c.registry_limits();
    assert_eq!(
        (l.max_rooms, l.max_members_per_room, l.max_tokens),
        (11, 12, 13)
    );
    assert_eq!(l.keepalive_misses, 4);
    assert_eq!(l.min_keepalive, Duration::from_secs(15));
    assert_eq!(l.tombstone_ttl, Duration::from_secs(16));
    assert_eq!(l.tombstone_capacity, 17);
    assert_eq!(l.closed_reply_interval, Duration::from_millis(18));
    assert_eq!((l.chat_rate, l.chat_burst), (2.5, 3.5));
    assert_eq!((l.history, l.history_bytes), (20, 21));
    assert!(l.register_only_from_join_ip);
    assert_eq!(l.room_idle, Some(Duration::from_secs(19)));
    let r = c.request_limits();
    assert_eq!((r.rate, r.burst), (4.5, 5.5));
    assert_eq!(
        (r.password_failure_rate, r.password_failure_burst),
        (0.5, 6.5)
    );
    // No idle limit when 0.
    let c = Config::from_toml("[liveness]\nroom_idle_secs = 0").unwrap();
    assert_eq!(c.registry_limits().room_idle, None);
}

/// Each command-line setting replaces the file's, and only that one.
#[test]
fn overrides_replace_only_what_they_name() {
    let file = Config::default();
    let none = Overrides::default();
    assert_eq!(file.with_overrides(&none).unwrap(), file);
    let all = Overrides {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        udp: Some("127.0.0.1:7".parse().unwrap()),
        state: Some(PathBuf::from("/tmp/elsewhere.json")),
        metrics: Some("off".into()),
        ..Overrides::default()
    };
    let c = file.with_overrides(&all).unwrap();
    assert_eq!(c.listen.tcp, "127.0.0.1:0".parse().unwrap());
    assert_eq!(c.listen.udp, "127.0.0.1:7".parse().unwrap());
    assert_eq!(c.state.path, PathBuf::from("/tmp/elsewhere.json"));
    assert_eq!(c.listen.metrics, "off");
    let mut expected = file.clone();
    expected.listen = c.listen.clone();
    expected.state.path = c.state.path.clone();
    assert_eq!(c, expected, "nothing else changed");
    // An override that makes the configuration invalid is refused.
    let bad = Overrides {
        metrics: Some("nowhere".into()),
        ..Overrides::default()
    };
    assert!(file
        .with_overrides(&bad)
        .unwrap_err()
        .contains("listen.metrics"));
}

#[test]
fn metrics_can_be_turned_off() {
    let c = Config::from_toml("[listen]\nmetrics = \"off\"").unwrap();
    assert_eq!(c.metrics_addr(), Ok(None));
}

/// Only an address wholly in brackets (`[…]:PORT`) is called a bad IPv6 address in
/// brackets; one with a bracket at one end only is no IP address at all.
#[test]
fn a_bracket_at_one_end_only_is_not_read_as_a_bracketed_address() {
    for text in ["[::1]x:9090", "1.2.3.4]:9090"] {
        let e = parse_listen_addr(text).unwrap_err();
        assert!(
            e.contains("the address must be an IP address: host names are not looked up"),
            "{text}: {e}"
        );
        assert!(!e.contains("in brackets is not"), "{text}: {e}");
    }
}

/// `--metrics` keeps the value as given (`off` included), once checked, so that the
/// file's `listen.metrics` it replaces reads the same; a bad one is refused.
#[test]
fn the_metrics_flag_keeps_its_value_as_given() {
    for text in ["127.0.0.1:9100", "[::1]:9100", "off", " none "] {
        assert_eq!(parse_metrics_flag(text), Ok(text.to_owned()));
    }
    let e = parse_metrics_flag("nowhere").unwrap_err();
    assert!(
        e.contains("\"nowhere\"") && e.ends_with("or \"off\""),
        "{e}"
    );
}

/// The daemon's modules that log errors, which a `RUST_LOG` filter may turn off: a filter
/// for another target turns off the rest, and a module's own filter keeps its errors.
#[test]
fn errors_filtered_out_names_the_modules_whose_errors_a_filter_drops() {
    assert!(errors_filtered_out("info").is_empty());
    assert!(errors_filtered_out("warn,ocm_server::rooms=debug").is_empty());
    assert!(errors_filtered_out("ocmd=error,ocm_server=error").is_empty());
    assert_eq!(errors_filtered_out("off"), ERROR_TARGETS);
    assert_eq!(errors_filtered_out("OCM_SERVER=debug"), ERROR_TARGETS);
    assert_eq!(errors_filtered_out("ocm_server=info"), ["ocmd"]);
    assert_eq!(
        errors_filtered_out("ocmd=info"),
        [
            "ocm_server::event_loop",
            "ocm_server::password",
            "ocm_server::persist"
        ]
    );
    assert_eq!(
        errors_filtered_out("info,ocm_server::persist=off"),
        ["ocm_server::persist"]
    );
}

/// Every module that logs errors is under one of [`ERROR_TARGETS`], so the start-up warning
/// of a `RUST_LOG` that turns them off names it.
#[test]
fn every_module_that_logs_errors_is_among_the_error_targets() {
    fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if path.is_dir() {
                walk(&path, found);
            } else if name.ends_with(".rs") && name != "tests.rs" && name != "testing.rs" {
                let code = std::fs::read_to_string(&path).unwrap();
                if code.contains("error!(") {
                    found.push(path.to_str().unwrap().to_owned());
                }
            }
        }
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let relative = file.strip_prefix(src.to_str().unwrap()).unwrap();
        let module = relative
            .trim_start_matches('/')
            .trim_end_matches(".rs")
            .trim_end_matches("/mod")
            .replace('/', "::");
        let target = match module.as_str() {
            "main" => "ocmd".to_owned(),
            _ => format!("ocm_server::{module}"),
        };
        assert!(
            ERROR_TARGETS.iter().any(|t| target.starts_with(t)),
            "{target} logs errors and is not in ERROR_TARGETS"
        );
    }
}
