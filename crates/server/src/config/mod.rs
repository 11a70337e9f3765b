//! Settings: embedded defaults, the TOML file (`--config`), and command-line overrides.
//!
//! Every key has a default, so `ocmd` runs with no file at all. Unknown keys, wrong types and
//! impossible values stop start-up with a message naming the key and the file. Listeners
//! that could not both be bound are checked on the file with the flags applied
//! ([`Config::with_overrides`]), since a flag may move one of them.
//! `config/ocmd.toml` is the annotated example of every key.
//!
//! This module owns the settings' shape, their defaults and what the rest of the daemon takes
//! from them; `check` refuses values that parse but make no sense, and listeners that could
//! not both be bound; `overrides` holds the command-line flags that win over the file.

mod check;
mod overrides;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::handshake::RequestLimits;
use crate::persist::DEFAULT_COMPACT_JOURNAL_BYTES;
use crate::rooms::Limits;
pub use overrides::{overrider, FromSystemd, Overrides};

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

    /// This configuration (the file, or the defaults) with the command-line flags applied,
    /// checked as a whole: the flags' values, and the listeners that the file and the flags
    /// set together.
    pub fn with_overrides(&self, overrides: &Overrides) -> Result<Config, String> {
        let mut config = self.clone();
        overrides.apply(&mut config);
        config.validate()?;
        // Two listeners systemd passed are bound already: they cannot clash.
        if !(overrides.from_systemd.tcp && overrides.from_systemd.metrics) {
            config.check_listeners()?;
        }
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

/// `RUST_LOG`'s filter, which wins over `[log] level`: `None` when unset, and when set but
/// ignored ([`rust_log_ignored`]), which then counts as unset everywhere.
pub fn rust_log() -> Option<String> {
    read_rust_log().ok().flatten()
}

/// Why a `RUST_LOG` that is set is ignored, if it is, so that `[log] level` applies: not
/// UTF-8 (a stray byte in an `Environment=` line: env_logger would then log everything at
/// trace level), empty (`Environment=RUST_LOG=`), or not a filter (a typo): env_logger would
/// take either for errors only, leaving `[log] level` unapplied without a word.
pub fn rust_log_ignored() -> Option<String> {
    read_rust_log().err()
}

fn read_rust_log() -> Result<Option<String>, String> {
    let Some(value) = std::env::var_os("RUST_LOG") else {
        return Ok(None);
    };
    let Some(spec) = value.to_str() else {
        return Err("is not UTF-8".into());
    };
    if spec.trim().is_empty() {
        return Err("is empty".into());
    }
    env_filter::Builder::new()
        .try_parse(spec)
        .map_err(|e| format!("{spec:?} is not a filter ({e})"))?;
    Ok(Some(spec.to_owned()))
}

/// The daemon's modules that log errors, as `RUST_LOG` names them (`ocmd` is the binary).
const ERROR_TARGETS: [&str; 4] = [
    "ocmd",
    "ocm_server::event_loop",
    "ocm_server::password",
    "ocm_server::persist",
];

/// Which of the daemon's modules that log errors the `RUST_LOG` filter `spec` turns off
/// altogether: a filter for a target that is not the daemon's (`ocmd=info` turns off
/// everything else), or `off`. The daemon still obeys it, but says so once at start.
pub fn errors_filtered_out(spec: &str) -> Vec<&'static str> {
    let mut builder = env_filter::Builder::new();
    builder.parse(spec);
    let filter = builder.build();
    ERROR_TARGETS
        .into_iter()
        .filter(|target| {
            let error = log::Metadata::builder()
                .level(log::Level::Error)
                .target(target)
                .build();
            !filter.enabled(&error)
        })
        .collect()
}

/// Parses a log level name.
pub fn log_level(name: &str) -> Option<log::LevelFilter> {
    name.parse().ok()
}
