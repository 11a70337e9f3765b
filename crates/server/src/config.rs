//! Settings: embedded defaults, the TOML file (`--config`), and command-line overrides.
//!
//! Every key has a default, so `ocmd` runs with no file at all. Unknown keys, wrong types and
//! impossible values stop start-up with a message naming the key and the file. Listeners
//! that could not both be bound are checked on the file with the flags applied
//! ([`Config::with_overrides`]), since a flag may move one of them.
//! `config/ocmd.toml` is the annotated example of every key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::handshake::RequestLimits;
use crate::persist::DEFAULT_COMPACT_JOURNAL_BYTES;
use crate::rooms::Limits;

/// Largest `history.messages` accepted.
pub const MAX_HISTORY: usize = 10_000;
/// Largest `limits.max_payload_bytes` accepted (16 MiB): handshake payloads are small JSON.
pub const MAX_PAYLOAD_BYTES: u64 = 16 * 1024 * 1024;
/// Largest timer setting accepted, in seconds (a day), for the keys that set a deadline or an
/// interval: `handshake_timeout_secs`, `sweep_interval_ms` (in ms), `checkpoint_secs`.
pub const MAX_TIMER_SECS: u64 = 86_400;
/// Largest `udp.recv_buffer_bytes` and `send_buffer_bytes` accepted: what Linux takes
/// whatever `net.core.rmem_max` says (`INT_MAX / 2`, since it doubles the value).
pub const MAX_SOCKET_BUFFER_BYTES: u64 = (i32::MAX / 2) as u64;
/// Largest `liveness.room_idle_secs` accepted (a year).
pub const MAX_ROOM_IDLE_SECS: u64 = 366 * 86_400;
/// Largest `history.max_bytes_per_room` accepted (16 MiB).
pub const MAX_HISTORY_BYTES_PER_ROOM: u64 = 16 * 1024 * 1024;
/// Largest `udp.datagrams_per_wakeup` accepted: a budget the loop can spend in well under a
/// second (65,536 datagrams, 256 `recvmmsg` calls of 256), so that a flood cannot hold back
/// accepts, handshakes and the systemd watchdog for long.
pub const MAX_DATAGRAMS_PER_WAKEUP: u64 = 65_536;
/// Largest `liveness.tombstone_capacity` accepted (ten million, about 1.35 GB once full: an
/// index of 2^25 slots of 33 bytes, sized for twice the cap, and 24 bytes a token in the
/// queue): the tables are sized for it at the first closure, so a larger value would fail an
/// allocation there, from the network, rather than at start.
pub const MAX_TOMBSTONES: u64 = 10_000_000;
/// `limits.listen_backlog` by default: the default `net.core.somaxconn` since Linux 5.4, and
/// as many as the default `max_connections`, so that a full table's worth of clients
/// arriving at once waits in the kernel rather than for SYN retransmits (mio binds with 128,
/// the standard library's value).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listening addresses.
    pub listen: Listen,
    /// The state file.
    pub state: StateConfig,
    /// Keepalive and closed-room settings.
    pub liveness: Liveness,
    /// Caps on connections, sizes and counts.
    pub limits: LimitsConfig,
    /// Rate limits.
    pub rate: Rate,
    /// UDP socket tuning.
    pub udp: Udp,
    /// Room history.
    pub history: History,
    /// Rules for new names beyond the protocol's own.
    pub names: Names,
    /// Logging.
    pub log: Log,
}

/// `[listen]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// TCP address for TCRP handshakes.
    #[serde(deserialize_with = "listen_addr")]
    pub tcp: SocketAddr,
    /// UDP address for UCRP datagrams.
    #[serde(deserialize_with = "listen_addr")]
    pub udp: SocketAddr,
    /// HTTP address for `/metrics`, `/healthz` and `/readyz`; `"off"` turns it off.
    pub metrics: String,
}

/// Parses a listening address, `IP:PORT` (an IPv6 address in brackets), saying what is wrong
/// when it is not one: the standard parser's "invalid socket address syntax" does not tell a
/// host name from a port out of range.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        // A port alone (`9090`), or with the address left out (`:9090`, `*:9090`, which
        // other daemons read as every address): the address is what is missing.
        let port_alone = match text.rsplit_once(':') {
            None => text.parse::<u16>().ok(),
            Some(("" | "*", port)) => port.parse::<u16>().ok(),
            Some(_) => None,
        };
        if let Some(port) = port_alone {
            return format!(
                "{text:?} is not an address like 127.0.0.1:9090 or [::1]:9090 (the IP address \
                 is missing: 0.0.0.0:{port} listens on every IPv4 address, [::]:{port} on \
                 every address, 127.0.0.1:{port} on this host only)"
            );
        }
        let why = match text.rsplit_once(':') {
            _ if text.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) => {
                "the :PORT is missing; an IPv6 address with a port goes in brackets, as in \
                 [::1]:9090"
            }
            _ if text.starts_with('[') && !text.contains(']') => {
                "the ] closing the IPv6 address is missing, as in [::1]:9090"
            }
            _ if text.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() => "the :PORT is missing",
            None => "the :PORT is missing",
            Some((_, port)) if port.parse::<u16>().is_err() => {
                "the port must be a number from 0 to 65535"
            }
            Some((ip, _)) if ip.starts_with('[') && ip.ends_with(']') => {
                "the part in brackets is not an IPv6 address"
            }
            Some((ip, _)) if ip.parse::<IpAddr>().is_ok() => {
                "an IPv6 address goes in brackets, as in [::1]:9090"
            }
            Some(_) => "the address must be an IP address: host names are not looked up",
        };
        format!("{text:?} is not an address like 127.0.0.1:9090 or [::1]:9090 ({why})")
    })
}

/// Parses a metrics setting: a listening address, or `off` (also `none`, `false` or empty)
/// for none.
pub fn parse_metrics(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "" | "off" | "false" | "none" => Ok(None),
        addr => parse_listen_addr(addr)
            .map(Some)
            .map_err(|e| format!("{e}, or \"off\"")),
    }
}

/// The `--metrics` flag's side of [`parse_metrics`]: the value as given, checked, so that a
/// bad one is reported as the flag's.
pub fn parse_metrics_flag(text: &str) -> Result<String, String> {
    parse_metrics(text).map(|_| text.to_owned())
}

/// Serde's side of [`parse_listen_addr`].
fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen_addr(&text).map_err(serde::de::Error::custom)
}

/// `[state]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Path of `room_manager.json`; the journal and lock file live beside it.
    pub path: PathBuf,
    /// The journal is compacted (rotated, then folded into the state file on its own thread)
    /// once it is larger than this many bytes and larger than the last state file.
    pub compact_journal_bytes: u64,
}

/// `[liveness]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Liveness {
    /// Missed keepalive intervals after which a member that promised keepalives is expired.
    pub keepalive_misses: u32,
    /// Shortest keepalive interval honoured, seconds.
    pub min_keepalive_secs: u64,
    /// How long tokens of closed rooms are remembered, seconds.
    pub tombstone_ttl_secs: u64,
    /// How many closed-room tokens are remembered.
    pub tombstone_capacity: usize,
    /// The interval, in milliseconds, within which one source (an IPv4 address or an IPv6
    /// /64) gets at most 4 replies to remembered tokens (`__ROOM_CLOSED__` or the timed-out
    /// notice).
    pub closed_reply_interval_ms: u64,
    /// How often silent members are looked for, milliseconds.
    pub sweep_interval_ms: u64,
    /// Seconds after which a room none of whose members has been heard from or joined is
    /// closed (0: never).
    pub room_idle_secs: u64,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest TCRP payload accepted, bytes.
    pub max_payload_bytes: usize,
    /// A TCP connection that does not complete a request within this many seconds of its
    /// accept or its last answer (not counting refusals of junk or of the request rate) is
    /// closed.
    pub handshake_timeout_secs: u64,
    /// Open TCRP (handshake) connections in all; when full, the one idle the longest makes
    /// room for a new one. Metrics connections do not count here; they have their own cap of
    /// 16.
    pub max_connections: usize,
    /// Open TCRP (handshake) connections per source (an IPv4 address or an IPv6 /64).
    pub max_connections_per_ip: usize,
    /// Handshake connections the kernel completes and queues for the daemon to accept
    /// (`listen(2)`'s backlog; the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Unsent reply bytes per connection past which it is paused until the peer reads.
    pub max_output_bytes: usize,
    /// Rooms in all (0: no cap).
    pub max_rooms: usize,
    /// Members per room (0: no cap).
    pub max_members_per_room: usize,
    /// Tokens in all (0: no cap).
    pub max_tokens: usize,
}

/// `[rate]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rate {
    /// Chat datagrams per second per member (0: unlimited).
    pub chat_per_sec: f64,
    /// Chat burst per member.
    pub chat_burst: f64,
    /// TCRP requests of every kind (create, join, list, presence, history) per second per
    /// source (an IPv4 address or an IPv6 /64; 0: unlimited).
    pub requests_per_sec: f64,
    /// Request burst per source.
    pub requests_burst: f64,
    /// Log lines per second about dropped input (the rest are counted, not logged).
    pub drop_logs_per_sec: f64,
    /// Failed password attempts per minute per source (an IPv4 address or an IPv6 /64);
    /// past it, attempts are refused with `rate_limited` without being checked.
    pub password_failures_per_min: f64,
    /// Burst of failed password attempts per source.
    pub password_failures_burst: f64,
}

/// `[udp]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Udp {
    /// `SO_RCVBUF` asked for, bytes (0: the system default).
    pub recv_buffer_bytes: usize,
    /// `SO_SNDBUF` asked for, bytes (0: the system default).
    pub send_buffer_bytes: usize,
    /// Datagrams read per wakeup before TCP gets a turn; fewer are handled when what they
    /// make the daemon send reaches 65,536 first (`event_loop::SENDS_PER_WAKEUP`).
    pub datagrams_per_wakeup: usize,
    /// The daemon's cap on batch frames, bytes (512..=65507). A member's batches are also
    /// capped by the `max_datagram` it announced (4096 if it did not).
    pub max_batch_datagram_bytes: usize,
    /// Accept a token's `__REGISTER__` only from the IP address its join came from over TCP,
    /// so that a forged source cannot aim a room's fan-out at a third party (off by default).
    pub register_only_from_join_ip: bool,
    /// Chat that waited longer than this in the socket's receive queue, milliseconds, is
    /// dropped (`stale`) instead of relayed; 0 (the default) relays everything, however late.
    pub max_chat_wait_ms: u64,
    /// Hand a member's equal-length datagrams of one pass to the kernel as one segmented send
    /// (`UDP_SEGMENT`), where the kernel can: the same datagrams on the wire, for less CPU.
    pub segment_sends: bool,
}

/// `[history]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct History {
    /// Messages kept per room for the History operation (0 turns history off).
    pub messages: usize,
    /// How often changed room histories are written to the journal, seconds.
    pub checkpoint_secs: u64,
    /// Bytes of message text and sender names kept per room; the oldest messages go first.
    pub max_bytes_per_room: usize,
}

impl Default for History {
    fn default() -> History {
        History {
            messages: 100,
            checkpoint_secs: 5,
            max_bytes_per_room: 64 * 1024,
        }
    }
}

/// `[names]`
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Names {
    /// Refuse new room names, and the usernames of creates and joins, that hold a character
    /// showing as nothing or reordering the text, or white space at either end
    /// (`tcrp::names::check_visible`), so that such a name cannot pass for another. Off by
    /// default: the original server accepted them.
    pub refuse_invisible: bool,
    /// Refuse a join whose username looks like a member's of the room
    /// (`tcrp::names::lookalike_keys`: `аlice` with a Cyrillic `а`, or `Alice`, beside `alice`) with
    /// `name_taken`, as the same name is. Off by default: the original server took them.
    pub refuse_lookalike_usernames: bool,
    /// Refuse a create whose room name looks like an open room's
    /// (`tcrp::names::lookalike_keys`) with `room_exists`, as the same name is; the refusal
    /// names the room only if it is listed. Off by default: the original server took them.
    pub refuse_lookalike_room_names: bool,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `off`, `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for Listen {
    fn default() -> Listen {
        Listen {
            tcp: SocketAddr::from(([127, 0, 0, 1], 9090)),
            udp: SocketAddr::from(([127, 0, 0, 1], 9091)),
            metrics: "127.0.0.1:9092".into(),
        }
    }
}

impl Default for StateConfig {
    fn default() -> StateConfig {
        StateConfig {
            path: PathBuf::from("room_manager.json"),
            compact_journal_bytes: DEFAULT_COMPACT_JOURNAL_BYTES,
        }
    }
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness {
            keepalive_misses: 3,
            min_keepalive_secs: 1,
            tombstone_ttl_secs: 3600,
            tombstone_capacity: 100_000,
            closed_reply_interval_ms: 1000,
            sweep_interval_ms: 500,
            room_idle_secs: 0,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        LimitsConfig {
            max_payload_bytes: tcrp::DEFAULT_MAX_PAYLOAD,
            handshake_timeout_secs: 10,
            max_connections: 4096,
            max_connections_per_ip: 256,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            max_output_bytes: 64 * 1024,
            max_rooms: 10_000,
            max_members_per_room: 1024,
            max_tokens: 200_000,
        }
    }
}

impl Default for Rate {
    fn default() -> Rate {
        Rate {
            chat_per_sec: 50.0,
            chat_burst: 100.0,
            requests_per_sec: 100.0,
            requests_burst: 200.0,
            drop_logs_per_sec: 5.0,
            password_failures_per_min: 10.0,
            password_failures_burst: 5.0,
        }
    }
}

impl Default for Udp {
    fn default() -> Udp {
        Udp {
            recv_buffer_bytes: 4 * 1024 * 1024,
            send_buffer_bytes: 4 * 1024 * 1024,
            datagrams_per_wakeup: 1024,
            max_batch_datagram_bytes: 65507,
            register_only_from_join_ip: false,
            max_chat_wait_ms: 0,
            segment_sends: true,
        }
    }
}

impl Default for Log {
    fn default() -> Log {
        Log {
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Config::from_toml(&text)
            .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            (
                "limits.max_payload_bytes",
                self.limits.max_payload_bytes as f64,
            ),
            (
                "limits.handshake_timeout_secs",
                self.limits.handshake_timeout_secs as f64,
            ),
            ("limits.max_connections", self.limits.max_connections as f64),
            (
                "limits.max_connections_per_ip",
                self.limits.max_connections_per_ip as f64,
            ),
            (
                "limits.max_output_bytes",
                self.limits.max_output_bytes as f64,
            ),
            (
                "limits.listen_backlog",
                f64::from(self.limits.listen_backlog),
            ),
            (
                "liveness.keepalive_misses",
                f64::from(self.liveness.keepalive_misses),
            ),
            (
                "liveness.sweep_interval_ms",
                self.liveness.sweep_interval_ms as f64,
            ),
            // 0 would not mean "never": every reply would open a new window, unpaced.
            (
                "liveness.closed_reply_interval_ms",
                self.liveness.closed_reply_interval_ms as f64,
            ),
            (
                "udp.datagrams_per_wakeup",
                self.udp.datagrams_per_wakeup as f64,
            ),
            (
                "state.compact_journal_bytes",
                self.state.compact_journal_bytes as f64,
            ),
            // 0 would make a checkpoint due on every pass: the loop would never sleep.
            (
                "history.checkpoint_secs",
                self.history.checkpoint_secs as f64,
            ),
            (
                "history.max_bytes_per_room",
                self.history.max_bytes_per_room as f64,
            ),
        ];
        for (key, value) in positive {
            if value <= 0.0 {
                return Err(format!("{key} must be greater than 0"));
            }
        }
        let rates = [
            (
                "rate.chat_per_sec",
                self.rate.chat_per_sec,
                "rate.chat_burst",
                self.rate.chat_burst,
            ),
            (
                "rate.requests_per_sec",
                self.rate.requests_per_sec,
                "rate.requests_burst",
                self.rate.requests_burst,
            ),
        ];
        for (key, rate, burst_key, burst) in rates {
            if !rate.is_finite() || rate < 0.0 {
                return Err(format!("{key} must be 0 (unlimited) or a positive number"));
            }
            if rate > 0.0 && (!burst.is_finite() || burst < 1.0) {
                return Err(format!("{burst_key} must be at least 1 when {key} is set"));
            }
        }
        // Upper bounds: deadlines are `Instant + Duration` (which panics past the clock's
        // range) and read buffers are sized from the payload cap.
        let at_most = [
            (
                "limits.max_payload_bytes",
                self.limits.max_payload_bytes as u64,
                MAX_PAYLOAD_BYTES,
            ),
            (
                "limits.handshake_timeout_secs",
                self.limits.handshake_timeout_secs,
                MAX_TIMER_SECS,
            ),
            (
                "liveness.sweep_interval_ms",
                self.liveness.sweep_interval_ms,
                MAX_TIMER_SECS * 1000,
            ),
            (
                "history.checkpoint_secs",
                self.history.checkpoint_secs,
                MAX_TIMER_SECS,
            ),
            (
                "history.max_bytes_per_room",
                self.history.max_bytes_per_room as u64,
                MAX_HISTORY_BYTES_PER_ROOM,
            ),
            (
                "udp.max_chat_wait_ms",
                self.udp.max_chat_wait_ms,
                MAX_TIMER_SECS * 1000,
            ),
            (
                "udp.datagrams_per_wakeup",
                self.udp.datagrams_per_wakeup as u64,
                MAX_DATAGRAMS_PER_WAKEUP,
            ),
            (
                "liveness.room_idle_secs",
                self.liveness.room_idle_secs,
                MAX_ROOM_IDLE_SECS,
            ),
            // A member's interval is journaled as a u32 of seconds, as clients promise it.
            (
                "liveness.min_keepalive_secs",
                self.liveness.min_keepalive_secs,
                u64::from(u32::MAX),
            ),
            (
                "liveness.tombstone_capacity",
                self.liveness.tombstone_capacity as u64,
                MAX_TOMBSTONES,
            ),
            // listen(2) takes an int.
            (
                "limits.listen_backlog",
                u64::from(self.limits.listen_backlog),
                i32::MAX as u64,
            ),
            // The kernel takes at most INT_MAX / 2 (it doubles the value for its bookkeeping).
            (
                "udp.recv_buffer_bytes",
                self.udp.recv_buffer_bytes as u64,
                MAX_SOCKET_BUFFER_BYTES,
            ),
            (
                "udp.send_buffer_bytes",
                self.udp.send_buffer_bytes as u64,
                MAX_SOCKET_BUFFER_BYTES,
            ),
        ];
        for (key, value, max) in at_most {
            if value > max {
                return Err(format!("{key} must be at most {max}, got {value}"));
            }
        }
        let batch = self.udp.max_batch_datagram_bytes;
        if !(512..=65507).contains(&batch) {
            return Err(format!(
                "udp.max_batch_datagram_bytes must be between 512 and 65507, got {batch}"
            ));
        }
        if self.history.messages > MAX_HISTORY {
            return Err(format!("history.messages must be at most {MAX_HISTORY}"));
        }
        let pw = (
            self.rate.password_failures_per_min,
            self.rate.password_failures_burst,
        );
        if !pw.0.is_finite() || pw.0 < 0.0 || (pw.0 > 0.0 && (!pw.1.is_finite() || pw.1 < 1.0)) {
            return Err("rate.password_failures_per_min must be 0 or positive, with rate.password_failures_burst at least 1".into());
        }
        if !self.rate.drop_logs_per_sec.is_finite() || self.rate.drop_logs_per_sec < 0.0 {
            return Err("rate.drop_logs_per_sec must be 0 or a positive number".into());
        }
        self.metrics_addr()?;
        if self.state.path.as_os_str().is_empty() {
            return Err("state.path must not be empty".into());
        }
        if log_level(&self.log.level).is_none() {
            return Err(format!(
                "log.level {:?} is not one of off, error, warn, info, debug, trace",
                self.log.level
            ));
        }
        Ok(())
    }

    /// Refuses TCP listeners that could not both be bound: the handshake and metrics
    /// listeners on the same port, at the same address or with one of them on a wildcard
    /// address. Port 0 asks the system for a free port, so it never clashes; the UDP socket
    /// is another protocol and may share a port number with either. Whether `[::]` takes
    /// the IPv4 addresses too is the host's `net.ipv6.bindv6only` (`ocmd` does not set
    /// `IPV6_V6ONLY`): read here, as the bind will find it.
    pub fn check_listeners(&self) -> Result<(), String> {
        self.check_listeners_where(v6_wildcard_takes_ipv4())
    }

    /// [`Config::check_listeners`] on a host where `[::]` does (`v6_takes_v4`) or does not
    /// take the IPv4 addresses.
    fn check_listeners_where(&self, v6_takes_v4: bool) -> Result<(), String> {
        let metrics = self.metrics_addr()?;
        // An IPv6 socket that takes no IPv4 cannot bind an IPv4-mapped address (EINVAL at
        // start, exit 1, which systemd retries for ever).
        if !v6_takes_v4 {
            let listeners = [
                ("listen.tcp", Some(self.listen.tcp)),
                ("listen.udp", Some(self.listen.udp)),
                ("listen.metrics", metrics),
            ];
            for (key, addr) in listeners {
                if let Some(SocketAddr::V6(v6)) = addr {
                    if let Some(v4) = v6.ip().to_ipv4_mapped() {
                        return Err(format!(
                            "{key} ({v6}) is an IPv4-mapped address, which this host cannot \
                             bind (net.ipv6.bindv6only = 1): write it as {v4}:{}",
                            v6.port()
                        ));
                    }
                }
            }
        }
        let Some(metrics) = metrics else {
            return Ok(());
        };
        let tcp = self.listen.tcp;
        if tcp.port() == 0 || tcp.port() != metrics.port() {
            return Ok(());
        }
        // The same link-local address on two interfaces is two addresses (the kernel reads
        // the scope of link-local addresses only).
        if let (SocketAddr::V6(t), SocketAddr::V6(m)) = (tcp, metrics) {
            let scoped = t.ip().is_unicast_link_local() && t.scope_id() != 0 && m.scope_id() != 0;
            if scoped && t.scope_id() != m.scope_id() && t.ip() == m.ip() {
                return Ok(());
            }
        }
        // An IPv4-mapped IPv6 address is its IPv4 address to the kernel's port table.
        let (a, b) = (tcp.ip().to_canonical(), metrics.ip().to_canonical());
        if a == b {
            return Err(format!(
                "listen.tcp and listen.metrics are both {tcp}: give them different ports"
            ));
        }
        let Some(wildcard) = [a, b]
            .into_iter()
            .find(|&w| takes_port_of(w, a, v6_takes_v4) && takes_port_of(w, b, v6_takes_v4))
        else {
            return Ok(());
        };
        Err(format!(
            "listen.tcp ({tcp}) and listen.metrics ({metrics}) clash: {wildcard} takes TCP port \
             {} on every {}address; give them different ports",
            tcp.port(),
            match wildcard {
                IpAddr::V4(_) => "IPv4 ",
                IpAddr::V6(_) if !v6_takes_v4 => "IPv6 ",
                IpAddr::V6(_) => "",
            },
        ))
    }

    /// This configuration (the file, or the defaults) with the command-line flags applied,
    /// checked as a whole: the flags' values, and the listeners that the file and the flags
    /// set together.
    pub fn with_overrides(&self, overrides: &Overrides) -> Result<Config, String> {
        let mut config = self.clone();
        overrides.apply(&mut config);
        config.validate()?;
        config.check_listeners()?;
        Ok(config)
    }

    /// The metrics address, or `None` when turned off.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, String> {
        parse_metrics(&self.listen.metrics).map_err(|e| format!("listen.metrics: {e}"))
    }

    /// The registry's limits.
    pub fn registry_limits(&self) -> Limits {
        Limits {
            max_rooms: self.limits.max_rooms,
            max_members_per_room: self.limits.max_members_per_room,
            max_tokens: self.limits.max_tokens,
            keepalive_misses: self.liveness.keepalive_misses,
            min_keepalive: Duration::from_secs(self.liveness.min_keepalive_secs),
            tombstone_ttl: Duration::from_secs(self.liveness.tombstone_ttl_secs),
            tombstone_capacity: self.liveness.tombstone_capacity,
            closed_reply_interval: Duration::from_millis(self.liveness.closed_reply_interval_ms),
            chat_rate: self.rate.chat_per_sec,
            chat_burst: self.rate.chat_burst,
            history: self.history.messages,
            history_bytes: self.history.max_bytes_per_room,
            register_only_from_join_ip: self.udp.register_only_from_join_ip,
            room_idle: (self.liveness.room_idle_secs > 0)
                .then(|| Duration::from_secs(self.liveness.room_idle_secs)),
        }
    }

    /// The per-IP request limits.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            rate: self.rate.requests_per_sec,
            burst: self.rate.requests_burst,
            password_failure_rate: self.rate.password_failures_per_min / 60.0,
            password_failure_burst: self.rate.password_failures_burst,
        }
    }

    /// The settings that differ from `self` in `new`, as `section.key old -> new`, sorted by
    /// name: what a reload changed, for its log line.
    /// `None` when they cannot be compared (a state path that is not UTF-8 cannot be
    /// rendered as TOML).
    pub fn changes(&self, new: &Config) -> Option<Vec<String>> {
        let (Ok(old), Ok(new)) = (toml::Table::try_from(self), toml::Table::try_from(new)) else {
            return None;
        };
        let mut changes = Vec::new();
        for (section, old_keys) in &old {
            let (Some(old_keys), Some(new_keys)) = (
                old_keys.as_table(),
                new.get(section).and_then(toml::Value::as_table),
            ) else {
                continue;
            };
            for (key, was) in old_keys {
                match new_keys.get(key) {
                    Some(now) if now != was => {
                        changes.push(format!("{section}.{key} {was} -> {now}"))
                    }
                    _ => {}
                }
            }
        }
        Some(changes)
    }

    /// The effective configuration as TOML, for `--check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Settings given on the command line; they win over the file, at start and at every reload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--tcp`
    pub tcp: Option<SocketAddr>,
    /// `--udp`
    pub udp: Option<SocketAddr>,
    /// `--state`
    pub state: Option<PathBuf>,
    /// `--metrics`
    pub metrics: Option<String>,
}

impl Overrides {
    /// Applies the overrides to `config`.
    pub fn apply(&self, config: &mut Config) {
        if let Some(tcp) = self.tcp {
            config.listen.tcp = tcp;
        }
        if let Some(udp) = self.udp {
            config.listen.udp = udp;
        }
        if let Some(state) = &self.state {
            config.state.path = state.clone();
        }
        if let Some(metrics) = &self.metrics {
            config.listen.metrics = metrics.clone();
        }
    }
}

/// Whether a TCP listener bound to `wildcard` holds its port for `ip` too: `ip` itself,
/// or every address when `wildcard` is unspecified. `0.0.0.0` takes the IPv4 addresses
/// (IPv4-mapped IPv6 ones among them); `::` takes every IPv6 address, and the IPv4 ones
/// too when `v6_takes_v4` (`ocmd` does not set `IPV6_V6ONLY`, so the host's
/// `net.ipv6.bindv6only` decides; it is usually off). Both are canonical (see
/// [`IpAddr::to_canonical`]).
fn takes_port_of(wildcard: IpAddr, ip: IpAddr, v6_takes_v4: bool) -> bool {
    match wildcard {
        IpAddr::V6(w) if w.is_unspecified() => v6_takes_v4 || ip.is_ipv6(),
        IpAddr::V4(w) if w.is_unspecified() => ip.is_ipv4(),
        _ => wildcard == ip,
    }
}

/// Whether a socket bound to `[::]` here takes the IPv4 addresses too: unless the host's
/// `net.ipv6.bindv6only` is 1. Read as a fresh IPv6 socket's `IPV6_V6ONLY`, whose default
/// follows it, rather than from /proc, which the shipped unit hides (`ProcSubset=pid`); a
/// host without IPv6 is taken as the kernel's default, 0.
fn v6_wildcard_takes_ipv4() -> bool {
    // SAFETY: a socket created and closed here; getsockopt writes at most `len` bytes into
    // `only`, whose size `len` gives.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return true;
        }
        let mut only: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let read = libc::getsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&mut only as *mut libc::c_int).cast(),
            &mut len,
        );
        libc::close(fd);
        read != 0 || only == 0
    }
}

/// `RUST_LOG`'s filter, which wins over `[log] level`: `None` when unset, and when not
/// UTF-8 (a stray byte in an `Environment=` line), which then counts as unset everywhere
/// instead of leaving the logger at trace level and the configured level unapplied.
pub fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG").ok()
}

/// Parses a log level name.
pub fn log_level(name: &str) -> Option<log::LevelFilter> {
    name.parse().ok()
}

#[cfg(test)]
mod tests {
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
        let text = include_str!("../../../config/ocmd.toml");
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
                assert_eq!(super::v6_wildcard_takes_ipv4(), v.trim() != "1");
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
                "password_failures",
            ),
            (
                "[rate]\npassword_failures_per_min = inf",
                "password_failures",
            ),
            (
                "[rate]\npassword_failures_per_min = 6.0\npassword_failures_burst = 0.5",
                "password_failures_burst",
            ),
            (
                "[rate]\npassword_failures_per_min = 6.0\npassword_failures_burst = nan",
                "password_failures_burst",
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
}
