//! The checks a configuration passes before it is used, at start and at every reload: values
//! within their bounds (each refusal names the key), and TCP listeners that can both be bound.

use std::net::{IpAddr, SocketAddr};

use super::{
    log_level, Config, MAX_DATAGRAMS_PER_WAKEUP, MAX_HISTORY, MAX_HISTORY_BYTES_PER_ROOM,
    MAX_PAYLOAD_BYTES, MAX_ROOM_IDLE_SECS, MAX_SOCKET_BUFFER_BYTES, MAX_TIMER_SECS, MAX_TOMBSTONES,
};

impl Config {
    /// Checks values that parse but make no sense; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        self.check_positive()?;
        self.check_rates()?;
        self.check_upper_bounds()?;
        self.check_the_rest()
    }

    /// Values that must be above 0.
    fn check_positive(&self) -> Result<(), String> {
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
        Ok(())
    }

    /// Token-bucket rates (0: unlimited) and their bursts (at least 1 while the rate is set).
    fn check_rates(&self) -> Result<(), String> {
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
            (
                "rate.password_failures_per_min",
                self.rate.password_failures_per_min,
                "rate.password_failures_burst",
                self.rate.password_failures_burst,
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
        if !self.rate.drop_logs_per_sec.is_finite() || self.rate.drop_logs_per_sec < 0.0 {
            return Err("rate.drop_logs_per_sec must be 0 or a positive number".into());
        }
        Ok(())
    }

    /// Upper bounds: deadlines are `Instant + Duration` (which panics past the clock's
    /// range), read buffers are sized from the payload cap, and the kernel and the journal's
    /// records take values of fixed width.
    fn check_upper_bounds(&self) -> Result<(), String> {
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
        if self.history.messages > MAX_HISTORY {
            return Err(format!("history.messages must be at most {MAX_HISTORY}"));
        }
        Ok(())
    }

    /// A range, addresses, a path and a level.
    fn check_the_rest(&self) -> Result<(), String> {
        let batch = self.udp.max_batch_datagram_bytes;
        if !(512..=65507).contains(&batch) {
            return Err(format!(
                "udp.max_batch_datagram_bytes must be between 512 and 65507, got {batch}"
            ));
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
    pub(super) fn check_listeners_where(&self, v6_takes_v4: bool) -> Result<(), String> {
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
pub(super) fn v6_wildcard_takes_ipv4() -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) returns a new descriptor or -1, which is checked.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return true;
    }
    // SAFETY: `fd` is the fresh descriptor above, which nothing else owns; dropping the
    // `OwnedFd` closes it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    crate::sockopt::get_int(socket.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
        .map_or(true, |only| only == 0)
}
