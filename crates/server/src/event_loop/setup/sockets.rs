//! The daemon's sockets, bound (or taken from systemd) and tuned: the TCRP listener
//! (backlog, send buffer, user timeout, TCP_NODELAY), the UDP socket (buffers, arrival
//! timestamps and addresses, segmented sends) and the metrics listener.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use log::{debug, info, warn};
use mio::net::{TcpListener, UdpSocket};

use crate::config::Config;
use crate::error::Error;
use crate::event_loop::{io_err, METRICS_LISTEN_BACKLOG};
use crate::local;
use crate::{mmsg, sockopt, udp};

/// The kernel send buffer asked for each TCRP connection (Linux doubles it, for its own
/// bookkeeping): room for several of the largest replies (15 KiB), while a peer that sends
/// requests and never reads pins 128 KiB of the host's TCP memory, not up to 4 MiB. The
/// daemon holds up to `limits.max_output_bytes` more before it pauses the connection.
const TCRP_SEND_BUFFER_BYTES: libc::c_int = 64 * 1024;

/// Binds the TCRP listener (or takes the one systemd passed, `inherited`), sets its backlog (`limits.listen_backlog`), its connections'
/// send buffer ([`TCRP_SEND_BUFFER_BYTES`]) and user timeout ([`set_user_timeout`]), and asks
/// it for TCP_NODELAY. Also returns what `nodelay_inherited` starts as: `None` (to be checked
/// on the first connection) when the listener took the option, `Some(false)` (each
/// connection sets it) when it refused.
pub(super) fn bind_tcp(
    config: &Config,
    inherited: Option<std::net::TcpListener>,
) -> Result<(TcpListener, Option<bool>), Error> {
    let tcp = match inherited {
        Some(listener) => TcpListener::from_std(listener),
        None => TcpListener::bind(config.listen.tcp).map_err(|source| Error::Bind {
            what: "TCP",
            addr: config.listen.tcp,
            source,
        })?,
    };
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
    let nodelay_inherited = match sockopt::set_listener_nodelay(&tcp) {
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
pub(in crate::event_loop) fn set_user_timeout(listener: &TcpListener, what: &str, config: &Config) {
    let timeout = Duration::from_secs(config.limits.handshake_timeout_secs.saturating_mul(2));
    if let Err(e) = sockopt::set_listener_user_timeout(listener, timeout) {
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
pub(in crate::event_loop) fn set_listen_backlog(
    listener: &TcpListener,
    backlog: u32,
) -> std::io::Result<()> {
    let granted = listen_again(listener, backlog)?;
    report_backlog("TCP", "limits.listen_backlog", backlog, granted);
    Ok(())
}

/// Says the backlog the kernel granted the `which` listener: a warning when it is less than
/// the `backlog` that `asker` asked for, at debug otherwise.
fn report_backlog(which: &str, asker: &str, backlog: u32, granted: Option<u32>) {
    match granted {
        Some(granted) if granted < backlog => warn!(
            "{which} listen backlog: {asker} asks for {backlog}, the kernel allows {granted} \
             (net.core.somaxconn caps it); raise net.core.somaxconn to at least {backlog}"
        ),
        Some(granted) => debug!("{which} listen backlog: {granted}"),
        None => {}
    }
}

/// Gives the listening `listener` a backlog of `backlog` and returns the one the kernel
/// granted (`None` when it cannot be read back). mio binds (socket, SO_REUSEADDR, bind,
/// listen) with a backlog of 128; Linux takes a second `listen(2)` on a listening socket as a
/// new backlog, so everything else about the socket (its address family, dual-stack or not,
/// SO_REUSEADDR) stays as mio made it.
pub(super) fn listen_again(listener: &TcpListener, backlog: u32) -> std::io::Result<Option<u32>> {
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

/// Binds the UCRP socket (or takes the one systemd passed, `inherited`) and sizes its
/// buffers as `[udp]` asks, warning when the kernel granted less. A passed socket's buffers
/// are only raised: one its unit made larger (`ReceiveBuffer=`, which systemd may set past
/// `net.core.rmem_max`) keeps its size.
pub(super) fn bind_udp(
    config: &Config,
    inherited: Option<std::net::UdpSocket>,
) -> Result<UdpSocket, Error> {
    let passed = inherited.is_some();
    let udp = match inherited {
        Some(socket) => UdpSocket::from_std(socket),
        None => UdpSocket::bind(config.listen.udp).map_err(|source| Error::Bind {
            what: "UDP",
            addr: config.listen.udp,
            source,
        })?,
    };
    let asked = |option, bytes: usize| {
        // Linux reports twice the room it grants.
        let larger = passed
            && sockopt::get_int(udp.as_raw_fd(), libc::SOL_SOCKET, option)
                .is_ok_and(|now| usize::try_from(now).unwrap_or(0) >= bytes.saturating_mul(2));
        if larger {
            0
        } else {
            bytes
        }
    };
    let (rcvbuf, sndbuf) = udp::size_buffers(
        &udp,
        asked(libc::SO_RCVBUF, config.udp.recv_buffer_bytes),
        asked(libc::SO_SNDBUF, config.udp.send_buffer_bytes),
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
pub(super) fn udp_sender(config: &Config, fd: RawFd) -> udp::Sender {
    let mut sender = udp::Sender::new(config.udp.max_batch_datagram_bytes);
    sender.set_ipv6_socket(config.listen.udp.is_ipv6());
    sender.set_segmentation(segmentation(config, fd));
    sender
}

/// Asks the kernel to stamp each datagram's arrival on the UDP socket `fd`, warning of what
/// goes without when it cannot.
pub(super) fn enable_arrival_timestamps(fd: RawFd) {
    if let Err(e) = mmsg::enable_timestamps(fd) {
        warn!(
            "UDP arrival timestamps unavailable ({e}); ocm_relay_delay_seconds stays empty \
             and udp.max_chat_wait_ms drops nothing"
        );
    }
}

/// Whether each datagram on the UDP socket `fd` says which local address it came to: asked
/// for only when `listen.udp` is a wildcard address, and said either way.
pub(super) fn enable_arrival_addresses(config: &Config, fd: RawFd) -> bool {
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

/// Binds the metrics listener, when `listen.metrics` asks for one (or takes the one systemd
/// passed, `inherited`), with a backlog of [`METRICS_LISTEN_BACKLOG`], warning when the
/// kernel granted less.
pub(super) fn bind_metrics(
    config: &Config,
    inherited: Option<std::net::TcpListener>,
) -> Result<Option<TcpListener>, Error> {
    let listener = match (inherited, config.metrics_addr().map_err(Error::Config)?) {
        (Some(listener), _) => TcpListener::from_std(listener),
        (None, None) => return Ok(None),
        (None, Some(addr)) => TcpListener::bind(addr).map_err(|source| Error::Bind {
            what: "metrics",
            addr,
            source,
        })?,
    };
    let granted = listen_again(&listener, METRICS_LISTEN_BACKLOG)
        .map_err(io_err("cannot set the metrics listen backlog"))?;
    report_backlog("metrics", "ocmd", METRICS_LISTEN_BACKLOG, granted);
    set_user_timeout(&listener, "metrics", config);
    Ok(Some(listener))
}

/// Whether segmented sends are on: asked for by `config` and possible on the socket `fd`.
/// Says so when asked for but not possible.
pub(in crate::event_loop) fn segmentation(config: &Config, fd: RawFd) -> bool {
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
