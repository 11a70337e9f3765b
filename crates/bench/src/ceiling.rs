//! The machine's ceiling: one thread sending delivery-sized datagrams with plain `sendto`
//! (one syscall per datagram) round-robin to M loopback sockets, drained by the same receivers
//! as a fan-out run. No daemon is involved: it is what one thread achieves with one system
//! call per datagram, the yardstick, not a bound on a relay, which can hand the kernel
//! several datagrams per call (`ocmd`'s segmented sends beat it severalfold). Like a relay, it encodes each message once and sends the
//! same bytes to every socket: a datagram built per send would charge the ceiling for work a
//! relay does not do (7–8% of it, measured), and flatter every ratio to it.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ucrp::delivery;

use crate::error::{Context, Result};
use crate::fanout::bind_sockets;
use crate::receivers::{kernel_drops, write_text, Clock, Draining, Receivers};
use crate::report::{si, Percentiles};

/// A ceiling measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CeilingResult {
    /// Receiving sockets.
    pub members: usize,
    /// Chat text bytes (the datagram is a delivery of it from `m0`).
    pub bytes: usize,
    /// Datagram size, bytes.
    pub datagram_bytes: usize,
    /// Seconds of sending.
    pub seconds: f64,
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received.
    pub received: u64,
    /// Sent per second.
    pub sent_per_sec: f64,
    /// Received per second: the ceiling.
    pub received_per_sec: f64,
    /// Drops counted by the receiving sockets' kernel counters.
    pub client_rcvbuf_drops: u64,
    /// Latency, microseconds.
    pub latency_us: Percentiles,
    /// 1-minute load average at the start.
    pub loadavg: f64,
}

impl CeilingResult {
    /// The human-readable report.
    pub fn print(&self) {
        println!(
            "ceiling M={} B={} ({}-byte datagrams, one sendto each) {:.1}s",
            self.members, self.bytes, self.datagram_bytes, self.seconds
        );
        println!(
            "  sent {} ({}/s), received {} = {} datagrams/s; receiver rcvbuf drops {}; p99 {:.0} µs; loadavg {:.2}",
            self.sent,
            si(self.sent_per_sec),
            self.received,
            si(self.received_per_sec),
            self.client_rcvbuf_drops,
            self.latency_us.p99,
            self.loadavg
        );
    }
}

/// Runs the ceiling measurement.
pub fn run(
    members: usize,
    bytes: usize,
    duration: Duration,
    draining: Draining,
    rcvbuf: usize,
) -> Result<CeilingResult> {
    let loadavg = crate::report::loadavg();
    let sockets = bind_sockets(members.max(1), rcvbuf)?;
    let targets: Vec<std::net::SocketAddr> = sockets
        .iter()
        .map(|s| s.local_addr())
        .collect::<std::io::Result<_>>()
        .ctx("local_addr")?;
    let sender = UdpSocket::bind("127.0.0.1:0").ctx("bind ceiling sender")?;
    let clock = Clock::new();
    let drops_before = kernel_drops(&sockets);
    let receivers = Receivers::spawn(&sockets, draining, clock, clock.nanos())?;
    let mut text = Vec::with_capacity(bytes + 64);
    let mut datagram = Vec::with_capacity(bytes + 64);
    let mut sent = 0u64;
    let mut seq = 0u64;
    let start_ns = clock.nanos();
    let t0 = Instant::now();
    while t0.elapsed() < duration {
        // One message per round of the sockets, encoded once, as a relay fans one out.
        text.clear();
        write_text(&mut text, 0, seq, clock.nanos(), bytes);
        datagram.clear();
        delivery::encode_chat("m0", &text, &mut datagram)?;
        seq += 1;
        for to in &targets {
            if sender.send_to(&datagram, to).is_ok() {
                sent += 1;
            }
        }
    }
    let wall = t0.elapsed();
    let got = receivers.finish(sent, Duration::from_millis(300), Duration::from_secs(5))?;
    let window = got.last_at_ns.saturating_sub(start_ns).max(1) as f64 / 1e9;
    Ok(CeilingResult {
        members,
        bytes,
        datagram_bytes: datagram.len(),
        seconds: wall.as_secs_f64(),
        sent,
        received: got.deliveries,
        sent_per_sec: sent as f64 / wall.as_secs_f64().max(1e-9),
        received_per_sec: got.deliveries as f64 / window,
        client_rcvbuf_drops: kernel_drops(&sockets).saturating_sub(drops_before),
        latency_us: Percentiles::scaled(&got.latency_ns, 1e3),
        loadavg,
    })
}
