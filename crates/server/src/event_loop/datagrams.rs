//! The UDP side: datagrams read in batches and handed to the registry, the outbox sent after
//! each batch, relay delays and the kernel's drop count recorded.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::{may_log_drop, Server, SENDS_PER_WAKEUP};
use crate::metrics::Metrics;
use crate::rate::TokenBucket;
use crate::rooms::{DropReason, Handled};
use crate::token::Short;
use crate::{mmsg, udp};

/// How long after a forward step of the wall clock arrival stamps are measured against it
/// read back by the step, at least: the relay delay histogram's last bound (5 s).
const STEP_WINDOW: Duration = Duration::from_secs(5);

impl Server {
    /// Reads datagrams (`recvmmsg`, a batch per call) and handles them until the socket is
    /// drained, the per-wakeup budget of datagrams is spent, or what they made the daemon send
    /// reaches [`SENDS_PER_WAKEUP`]. Returns whether the socket may still hold datagrams, or
    /// datagrams read are still to be handled (`udp_unhandled`: the next wakeup begins with
    /// them).
    pub(super) fn drain_udp(&mut self, now: Instant) -> bool {
        let mut budget = self.config.udp.datagrams_per_wakeup;
        let mut sent = 0;
        loop {
            if self.udp_unhandled.is_empty() {
                if budget == 0 {
                    return true;
                }
                let count = match self
                    .receiver
                    .recv(self.udp.as_raw_fd(), budget.min(mmsg::BATCH))
                {
                    Ok(0) => return false,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Not expected: without IP_RECVERR, Linux does not report ICMP errors
                        // for earlier sends on an unconnected socket. Whatever it is concerns
                        // one receive, not the socket, and the budget bounds the retries.
                        debug!("UDP receive error: {e}");
                        budget = budget.saturating_sub(1);
                        continue;
                    }
                };
                budget = budget.saturating_sub(count);
                self.metrics.datagrams_received += count as u64;
                self.udp_unhandled = 0..count;
            }
            let handled = self.handle_read(now, sent);
            sent += self.outbox.datagrams();
            // Send what this batch produced before reading the next: latency stays low and
            // the outbox small.
            self.flush_outbox(now);
            self.record_relay_delays(handled);
            if sent >= SENDS_PER_WAKEUP {
                return true;
            }
        }
    }

    /// Handles the datagrams read and not yet handled, in order, until none is left or the
    /// wakeup's sends (`sent` before, and the outbox) reach [`SENDS_PER_WAKEUP`]: one chat
    /// to a large room is a send per member, and a batch of them must not hold the loop.
    /// Returns the range handled.
    fn handle_read(&mut self, now: Instant, sent: usize) -> Range<usize> {
        let shed = self.shed_chat_arrived_before();
        let from = self.udp_unhandled.start;
        while let Some(i) = self.udp_unhandled.next() {
            let Some((src, bytes)) = self.receiver.datagram(i) else {
                // A source that is neither IPv4 nor IPv6: not on an INET socket, but
                // every datagram read is accounted for.
                Metrics::bump(&mut self.metrics.datagrams_dropped, "bad_source");
                continue;
            };
            let arrival = self.receiver.arrived_at(i);
            let late = shed.is_some_and(|limit| {
                self.receiver
                    .arrived(i)
                    .is_some_and(|arrived| arrived < limit)
            });
            let handled = if late {
                self.registry
                    .handle_late_datagram(src, arrival, bytes, now, &mut self.outbox)
            } else {
                self.registry
                    .handle_datagram(src, arrival, bytes, now, &mut self.outbox)
            };
            if handled == Handled::Dropped(DropReason::Stale) {
                self.shed_in_batch.push(i);
            }
            account(
                &mut self.metrics,
                &mut self.drop_log,
                self.config.rate.drop_logs_per_sec,
                (src, bytes),
                handled,
                now,
            );
            if sent + self.outbox.datagrams() >= SENDS_PER_WAKEUP {
                break;
            }
        }
        from..self.udp_unhandled.start
    }

    /// With `udp.max_chat_wait_ms` set, the arrival time (the kernel's stamp, since the Unix
    /// epoch) before which chat has waited too long to be relayed. Read once per batch: the
    /// datagrams of a batch were all waiting when it was read. A step of the wall clock makes
    /// no chat look older than it is ([`WallClock`](crate::wall_clock::WallClock)).
    fn shed_chat_arrived_before(&mut self) -> Option<Duration> {
        let max_wait = self.config.udp.max_chat_wait_ms;
        if max_wait == 0 {
            return None;
        }
        let now = self.wall_clock_now()?;
        now.checked_sub(Duration::from_millis(max_wait))
    }

    /// The wall clock to measure arrival stamps against, read back by a recent forward step
    /// for as long as the longest age measured: the chat limit, or the relay delay
    /// histogram's last bound.
    fn wall_clock_now(&mut self) -> Option<Duration> {
        let limit = Duration::from_millis(self.config.udp.max_chat_wait_ms);
        self.wall_clock.now(limit.max(STEP_WINDOW))
    }

    /// Counts, for each datagram of the last batch read that was just handled (`handled`),
    /// the time from its arrival on the socket until now, when everything it caused has been
    /// handed to the kernel. Chat dropped as stale is left out: the histogram shows what
    /// relayed chat waited, not the backlog the limit cut.
    fn record_relay_delays(&mut self, handled: Range<usize>) {
        let mut shed = std::mem::take(&mut self.shed_in_batch);
        if let Some(now) = self.wall_clock_now() {
            let mut skip = shed.iter().copied().peekable();
            for i in handled {
                if skip.next_if_eq(&i).is_some() {
                    continue;
                }
                if let Some(arrived) = self.receiver.arrived(i) {
                    self.metrics.relay_delay.record(now.saturating_sub(arrived));
                }
            }
        }
        shed.clear();
        self.shed_in_batch = shed;
    }

    /// Sends what the outbox holds, at `now` (after the last words held, if any).
    pub(super) fn flush_outbox(&mut self, now: Instant) {
        if !self.outbox.is_empty() {
            self.sender.send_all(
                &self.udp,
                &mut self.outbox,
                self.registry.locals_mut(),
                &mut self.metrics,
                now,
            );
        }
    }

    /// Reads the kernel's drop count for the UDP socket and warns when it grew: an overloaded
    /// daemon must never lose datagrams silently.
    pub(super) fn check_kernel_drops(&mut self) {
        let Some(raw) = udp::kernel_drops(&self.udp) else {
            return;
        };
        let drops = self.kernel_drops.observe(raw);
        let before = self.kernel_drops_logged;
        self.kernel_drops_logged = drops;
        self.metrics.udp_kernel_drops = drops;
        if drops > before {
            warn!(
                "the kernel dropped {} datagrams on the UDP socket before they were read (total \
                 {drops}), for a full receive buffer unless memory was short; consider raising \
                 udp.recv_buffer_bytes and net.core.rmem_max",
                drops - before
            );
        }
    }
}

/// Counts what the registry did with the datagram `bytes` from `src` (a free function so that
/// the receive loop can borrow the receive buffer and the counters at once).
fn account(
    metrics: &mut Metrics,
    drop_log: &mut TokenBucket,
    log_rate: f64,
    (src, bytes): (SocketAddr, &[u8]),
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
                debug!(
                    "{src}: datagram dropped ({}){}",
                    reason.label(),
                    claimed(bytes)
                );
            }
        }
        Handled::Registered { .. } | Handled::Left | Handled::Closed { .. } => {}
    }
}

/// The room and token (its prefix only: a bearer secret) a datagram claims, for the line
/// saying it was dropped: the source alone does not tell whose it was when it is not the
/// member's address. Nothing for a datagram too malformed to name them.
fn claimed(bytes: &[u8]) -> String {
    match ucrp::datagram::parse(bytes) {
        Ok(d) => format!(
            " for room {:?}, token {}",
            String::from_utf8_lossy(d.room_name),
            Short::of(d.token)
        ),
        Err(_) => String::new(),
    }
}

/// The receive loop driven by hand on a server whose loop is not run.
#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdpSocket;
    use std::path::Path;

    // Added with the mutation run of 2026-12-06 (docs/SECURITY.md, "The daemon: the loop's
    // datagrams and lifecycle").

    /// A server on loopback ports of its own that reads at most `per_wakeup` datagrams a
    /// wakeup, its state in `dir`, without a metrics listener; its loop is not run.
    fn server(dir: &Path, per_wakeup: usize) -> Server {
        let mut config = crate::Config::default();
        config.udp.datagrams_per_wakeup = per_wakeup;
        super::super::testing::on_loopback(dir, config)
    }

    fn dropped(server: &Server) -> u64 {
        server.metrics.datagrams_dropped.values().sum()
    }

    /// A receive error (here the refusal that a port unreachable leaves on a connected
    /// socket, reported before the datagrams queued after it) costs one datagram of the
    /// wakeup's budget, and the drain goes on: with a budget of 3, the error and two of the
    /// three datagrams behind it are read, and the drain says the socket may hold more.
    #[test]
    fn a_receive_error_costs_one_datagram_of_the_budget_and_the_drain_goes_on() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut server = server(dir.path(), 3);
        let closed = StdUdpSocket::bind("127.0.0.1:0").expect("a socket");
        let port = closed.local_addr().expect("its address");
        drop(closed);
        let socket = StdUdpSocket::bind("127.0.0.1:0").expect("a socket");
        socket.connect(port).expect("connect");
        // Nobody listens: the port unreachable that comes back (on loopback, before the send
        // returns) is the next receive's error.
        socket.send(b"anyone?").expect("send");
        let peer = StdUdpSocket::bind(port).expect("the port bound again");
        let to = socket.local_addr().expect("its address");
        for _ in 0..3 {
            peer.send_to(b"junk", to).expect("send");
        }
        socket.set_nonblocking(true).expect("non-blocking");
        server.udp = mio::net::UdpSocket::from_std(socket);
        assert!(
            server.drain_udp(Instant::now()),
            "a spent budget leaves the socket ready"
        );
        assert_eq!(server.metrics.datagrams_received, 2);
        assert_eq!(dropped(&server), 2);
        // The third is read at the next wakeup.
        assert!(!server.drain_udp(Instant::now()), "drained");
        assert_eq!(server.metrics.datagrams_received, 3);
    }

    /// Once the wakeup's sends reach [`SENDS_PER_WAKEUP`], the datagram being handled is the
    /// last: the rest of the batch waits for the next wakeup, which begins with them.
    #[test]
    fn a_wakeup_whose_sends_reached_the_cap_leaves_the_rest_of_the_batch_for_the_next() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut server = server(dir.path(), 1024);
        let from = StdUdpSocket::bind("127.0.0.1:0").expect("a socket");
        for _ in 0..3 {
            from.send_to(b"junk", server.bound().udp).expect("send");
        }
        // Loopback delivers before the send returns: all three are there.
        let count = server
            .receiver
            .recv(server.udp.as_raw_fd(), 3)
            .expect("three datagrams queued");
        assert_eq!(count, 3);
        server.udp_unhandled = 0..count;
        let now = Instant::now();
        assert_eq!(server.handle_read(now, SENDS_PER_WAKEUP), 0..1);
        assert_eq!(server.udp_unhandled, 1..3);
        assert_eq!(server.handle_read(now, SENDS_PER_WAKEUP - 1), 1..3);
        assert!(server.udp_unhandled.is_empty());
        assert_eq!(dropped(&server), 3);
    }
}
