//! TCP connections: accepted under the caps (or closed at once, counted), their readiness
//! turned into reads and writes, and their closing.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::event::Event;
use mio::net::TcpListener;
use mio::Interest;

use super::{
    may_log_drop, ConnId, EvictionClass, Server, ACCEPTS_PER_PASS, ACCEPT_RETRY, EVICTION_PICKS,
    MAX_HTTP_CONNECTIONS,
};
use crate::conn::{CloseReason, Conn, Kind, ReadUntil, LINGER};
use crate::metrics::Metrics;
use crate::{rate, sockopt};

impl Server {
    /// The listener for connections of `kind`, while it is open (both close at a stop).
    fn listener(&self, kind: Kind) -> Option<&TcpListener> {
        match kind {
            Kind::Tcrp => self.tcp.as_ref(),
            Kind::Http => self.metrics_listener.as_ref(),
        }
    }

    /// Accepts on the listener for `kind` until `WouldBlock`, or [`ACCEPTS_PER_PASS`]
    /// newcomers taken (the rest on the next pass): each is refused (counted) past the caps, or
    /// registered and, for TCRP, read at once. A failure for want of descriptors may close the
    /// connection a full table would close and try again, else schedules a retry ([`ACCEPT_RETRY`]).
    pub(super) fn accept(&mut self, kind: Kind, now: Instant) {
        // Whether a connection was closed for a descriptor since the last accept that
        // succeeded: a second failure after one means closing did not help (for ENFILE, the
        // system is out of files, not us; see `eviction_futile`).
        let mut evicted_for_descriptor = false;
        // Whether this pass closed a connection for a descriptor at all: its picks stay good
        // for the next one (see `evict_for_newcomer`), though the table is not full.
        let mut short_of_descriptors = false;
        // Newcomers taken off the queue. Failed calls do not count: a failure that closed a
        // connection for a descriptor is followed at once by its retry, whose outcome decides
        // whether closing helped (`evicted_for_descriptor`), and a failure that did not
        // returns.
        let mut taken = 0;
        while taken < ACCEPTS_PER_PASS {
            let Some(listener) = self.listener(kind) else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Linux took a descriptor and a file before it found the queue empty:
                    // neither is short now (see `eviction_futile`).
                    self.eviction_futile = None;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if self.accept_failed(kind, &e, evicted_for_descriptor, now) {
                        evicted_for_descriptor = true;
                        short_of_descriptors = true;
                        continue;
                    }
                    // Try again shortly for the connections still in the backlog.
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    return;
                }
            };
            taken += 1;
            evicted_for_descriptor = false;
            self.eviction_futile = None;
            if let Some(reason) = self.make_room_or_refuse(kind, peer, short_of_descriptors) {
                Metrics::bump(&mut self.metrics.tcp_rejected, reason);
                if may_log_drop(&mut self.drop_log, now, self.config.rate.drop_logs_per_sec) {
                    warn!("{peer}: connection refused ({reason})");
                }
                continue; // dropping the stream closes it
            }
            let Some(id) = self.admit(kind, stream, peer, now) else {
                continue;
            };
            // The request often came with the connection (a client writes it as soon as
            // its connect returns): reading it now, rather than on the readable edge in a
            // later pass of the loop, takes a pass off every handshake (5% more joins/s in
            // crates/bench/NOTES.md). If it has not come, the read finds nothing and the
            // edge comes as before; an edge for bytes read here finds them gone, which
            // `conn_event` takes in its stride.
            if kind == Kind::Tcrp {
                let close = self.read_tcrp(id, now, ReadUntil::ShortRead);
                self.after_io(id, close);
            }
        }
        // The queue may hold more: the next pass takes them, with no edge to wait for.
        self.accept_soon(kind);
    }

    /// Handles an `accept` that failed with `e` (EMFILE and friends): counts and logs it (not
    /// input from a peer, so not under `drop_logs_per_sec`: at most a line a second), and
    /// when descriptors are short, closes the connection a full table would close, so
    /// that idle connections do not hold every descriptor until their handshake timers run
    /// out. Once per successful accept at most (`evicted_before`: one was closed since), and
    /// once more when the error changes (see `eviction_futile`). Returns whether one was
    /// closed, and the accept is to be tried again at once.
    fn accept_failed(
        &mut self,
        kind: Kind,
        e: &io::Error,
        evicted_before: bool,
        now: Instant,
    ) -> bool {
        self.metrics.accept_errors += 1;
        let short = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        if short && evicted_before {
            self.eviction_futile = e.raw_os_error();
        }
        // Out of the process's own descriptors, only one below the open-file limit can be
        // reused: closing one at or above it (the limit lowered below what is open) frees
        // nothing `accept` may take.
        let usable_below = (e.raw_os_error() == Some(libc::EMFILE))
            .then(open_file_limit)
            .flatten();
        let evicted = short
            && self.eviction_futile != e.raw_os_error()
            && self.listener(kind).is_some_and(newcomer_waits)
            && self.evict_for_descriptor(kind, usable_below);
        if self.accept_log.take(now, 1.0, 1.0) {
            if evicted {
                warn!("accept failed: {e}; closed a connection to make room");
            } else {
                warn!("accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
            }
        }
        evicted
    }

    /// Makes room for a newcomer from `peer` on the listener for `kind` when its table is
    /// full, by closing the connection a full table closes; or says why it is refused: its
    /// source's connection cap, or a full table no connection may leave.
    fn make_room_or_refuse(
        &mut self,
        kind: Kind,
        peer: SocketAddr,
        short_of_descriptors: bool,
    ) -> Option<&'static str> {
        let limits = &self.config.limits;
        let from_ip = self
            .per_source
            .get(&rate::source(peer.ip()))
            .copied()
            .unwrap_or(0);
        let tcrp_open = self.conns.len() - self.http_conns.len();
        if tcrp_open < self.connection_cap && !short_of_descriptors {
            // Picks from a full table go stale once it is not full.
            self.evict_candidates.clear();
        }
        match kind {
            Kind::Tcrp if from_ip >= limits.max_connections_per_ip => {
                Some("max_connections_per_ip")
            }
            // Full: another connection makes room, if one may go (see `evict_for_newcomer`),
            // so sources holding every slot open cannot lock newcomers out. The cap fits the
            // open-file limit, so the descriptors do not run out first.
            Kind::Tcrp if tcrp_open >= self.connection_cap => {
                let made_room = self.evict_for_newcomer(None);
                (!made_room).then_some("max_connections")
            }
            // Scrapers and health checks have their own small allowance, so they can
            // neither fill the handshake table nor be locked out by it. Full: the oldest
            // connection still without a request makes room (see `evict_idle_http`), so
            // idle connections cannot lock health checks out either.
            Kind::Http if self.http_conns.len() >= MAX_HTTP_CONNECTIONS => {
                let made_room = self.evict_idle_http();
                (!made_room).then_some("max_metrics_connections")
            }
            Kind::Tcrp | Kind::Http => None,
        }
    }

    /// Takes a newcomer in: `TCP_NODELAY` (inherited from the listener, checked once), its
    /// registration with the poll, its handshake timer and its place in the tables. `None`
    /// (counted) when the poll refuses it.
    fn admit(
        &mut self,
        kind: Kind,
        mut stream: mio::net::TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<ConnId> {
        if kind == Kind::Tcrp {
            // One getsockopt in the daemon's life checks that the option was inherited.
            let inherited = *self
                .nodelay_inherited
                .get_or_insert_with(|| stream.nodelay().unwrap_or(false));
            if !inherited {
                if let Err(e) = stream.set_nodelay(true) {
                    debug!("{peer}: cannot set TCP_NODELAY: {e}");
                }
            }
        }
        // The stream is never duplicated (no try_clone, no fork, CLOEXEC): `close` relies
        // on its drop being the descriptor's last close.
        let entry = self.conns.vacant_entry();
        let id = ConnId(entry.key());
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, id.token(), Interest::READABLE)
        {
            warn!("{peer}: cannot register connection: {e}");
            Metrics::bump(&mut self.metrics.tcp_rejected, "poll_register");
            return None;
        }
        let deadline = now + Duration::from_secs(self.config.limits.handshake_timeout_secs);
        let mut conn = Conn::new(stream, peer, kind, deadline);
        conn.restart_timer(deadline, &mut self.activity);
        entry.insert(conn);
        match kind {
            Kind::Tcrp => *self.per_source.entry(rate::source(peer.ip())).or_insert(0) += 1,
            Kind::Http => self.http_conns.push(id),
        }
        self.metrics.tcp_accepted += 1;
        self.metrics.tcp_open += 1;
        debug!("{peer}: accepted ({kind:?})");
        Some(id)
    }

    /// Goes on with a paused connection (see [`crate::conn::Conn::paused`]) once a write
    /// brought its replies under `max_output_bytes`: answers its buffered frames and reads its
    /// socket, whose earlier bytes raised edges that were not acted on (mio is edge-triggered).
    /// Returns a close reason if that failed.
    fn resume(&mut self, id: ConnId) -> Option<CloseReason> {
        let conn = self.conns.get_mut(id.0)?;
        if !conn.paused {
            return None;
        }
        if let Err(e) = conn.flush() {
            debug!("{}: write failed: {e}", conn.peer);
            return Some(CloseReason::IoError);
        }
        if conn.pending_bytes() > self.config.limits.max_output_bytes {
            return None;
        }
        conn.paused = false;
        self.read_tcrp(id, Instant::now(), ReadUntil::WouldBlock)
    }

    /// Closes a TCRP connection to make room for a new one, if one may go: never one whose
    /// reply waits for the disk or a password check. The first choice is one already closing,
    /// then one idle with nothing unsent, then one paused on unread replies, then one still
    /// sending a reply; within each, the one that has waited longest for its next request
    /// (the oldest [`Conn::activity`]). Returns whether one was closed.
    ///
    /// The choice comes from a pass over the table that keeps the best [`EVICTION_PICKS`]; a
    /// pick that was answered since (its activity moved) or that now waits is skipped.
    /// With `usable_below`, only a connection whose descriptor is below it may go (see
    /// `accept`), and the picks are made afresh among those.
    fn evict_for_newcomer(&mut self, usable_below: Option<u64>) -> bool {
        let mut picked = false;
        if usable_below.is_some() {
            self.evict_candidates.clear();
        }
        loop {
            let Some((_, activity, id)) = self.evict_candidates.pop() else {
                // One fresh pass at most: its picks are all valid.
                if !picked && self.pick_evictions(usable_below) {
                    picked = true;
                    continue;
                }
                return false;
            };
            let still = self.conns.get(id.0).is_some_and(|c| {
                c.activity == activity && eviction_class(c).is_some() && usable(c, usable_below)
            });
            if !still {
                continue;
            }
            let mut reason = CloseReason::Evicted;
            if let Some(conn) = self.conns.get(id.0) {
                debug!("{}: closed to make room for a new connection", conn.peer);
                // An answered one was closing anyway: not an eviction of a client.
                if conn.lingering {
                    reason = CloseReason::Protocol;
                }
            }
            self.close(id, reason);
            return true;
        }
    }

    /// Closes a connection to free a descriptor for one that `accept` could not take for
    /// want of them: the handshake connection a full table would close (see `evict_for_newcomer`),
    /// and for a metrics connection, if there is none, the metrics connection a full set of
    /// them would close (see `evict_idle_http`). A handshake newcomer never closes a metrics
    /// connection, so that a flood of handshake connections cannot cut scrapes off. Returns
    /// whether one was closed.
    ///
    /// A metrics newcomer to a full set of metrics connections closes one of them alone: once
    /// accepted, it would close one anyway (see `accept`), so a handshake connection closed
    /// first would have been closed for nothing.
    fn evict_for_descriptor(&mut self, kind: Kind, usable_below: Option<u64>) -> bool {
        if kind == Kind::Http && self.http_conns.len() >= MAX_HTTP_CONNECTIONS {
            return self.evict_idle_http();
        }
        if self.evict_for_newcomer(usable_below) {
            return true;
        }
        kind == Kind::Http && !self.http_conns.is_empty() && self.evict_idle_http()
    }

    /// Makes room for a new metrics connection: closes the oldest one that was answered and
    /// waits for its peer's end (counted as `protocol`), else the oldest that has not sent a
    /// complete request (`evicted`). Each is answered once and closed, so one still without
    /// a request is idle or slow; one whose answer is being sent stays. A request may be
    /// waiting unread (a burst of connections is accepted before their readable events are
    /// handled), so each is read first, oldest first, and answered if it can be; one
    /// answered at once frees its slot. Returns whether a slot was freed.
    fn evict_idle_http(&mut self) -> bool {
        let open = self.http_conns.len();
        for id in self.http_conns.clone() {
            let close = self.read_http(id);
            self.after_io(id, close);
            if self.http_conns.len() < open {
                return true;
            }
        }
        let oldest = |lingering: bool| {
            self.http_conns.iter().copied().find(|id| {
                self.conns.get(id.0).is_some_and(|c| {
                    if lingering {
                        c.lingering
                    } else {
                        // One being answered stays.
                        !c.close_after_flush
                    }
                })
            })
        };
        if let Some(id) = oldest(true) {
            self.close(id, CloseReason::Protocol);
            return true;
        }
        let Some(id) = oldest(false) else {
            return false;
        };
        if let Some(conn) = self.conns.get(id.0) {
            debug!(
                "{}: closed to make room for a new metrics connection",
                conn.peer
            );
        }
        self.close(id, CloseReason::Evicted);
        true
    }

    /// Fills `evict_candidates` with the best [`EVICTION_PICKS`] connections to close (with
    /// `usable_below`, among those whose descriptor is below it), the first choice last.
    /// Returns whether there is any.
    fn pick_evictions(&mut self, usable_below: Option<u64>) -> bool {
        let mut picks: Vec<(EvictionClass, u64, ConnId)> = self
            .conns
            .iter()
            .filter(|(_, c)| usable(c, usable_below))
            .filter_map(|(k, c)| Some((eviction_class(c)?, c.activity, ConnId(k))))
            .collect();
        let by_choice = |p: &(EvictionClass, u64, ConnId)| (p.0, p.1);
        if picks.len() > EVICTION_PICKS {
            picks.select_nth_unstable_by_key(EVICTION_PICKS, by_choice);
            picks.truncate(EVICTION_PICKS);
        }
        picks.sort_unstable_by_key(|p| std::cmp::Reverse(by_choice(p)));
        self.evict_candidates = picks;
        !self.evict_candidates.is_empty()
    }

    pub(super) fn conn_event(&mut self, id: ConnId, event: &Event, now: Instant) {
        let Some(conn) = self.conns.get_mut(id.0) else {
            return; // spurious: closed earlier in this pass
        };
        let mut close = None;
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            close = match conn.kind {
                Kind::Tcrp => {
                    // A FIN or error that came with this edge raises no later one, so then
                    // the socket is read to the end.
                    let until = if event.is_read_closed() || event.is_error() {
                        ReadUntil::WouldBlock
                    } else {
                        ReadUntil::ShortRead
                    };
                    self.read_tcrp(id, now, until)
                }
                Kind::Http => self.read_http(id),
            };
        }
        self.after_io(id, close);
    }

    /// Flushes, resumes a paused connection whose replies drained, updates interest, and
    /// closes the connection if it is done or failed.
    pub(super) fn after_io(&mut self, id: ConnId, mut close: Option<CloseReason>) {
        if close.is_none() {
            close = self.resume(id);
        }
        let Some(conn) = self.conns.get_mut(id.0) else {
            return;
        };
        if close.is_none() {
            if let Err(e) = conn.flush() {
                debug!("{}: write failed: {e}", conn.peer);
                close = Some(CloseReason::IoError);
            } else if conn.paused && conn.pending_bytes() <= self.config.limits.max_output_bytes {
                // This flush, not the one in `resume`, brought the replies under the cap (the
                // peer read in between). No edge would come for it: nothing is left to write.
                if conn.unpause() {
                    self.revisit.push(id);
                }
            } else if conn.finished() {
                close = self.finish(id);
            }
        }
        if let Some(reason) = close {
            self.close(id, reason);
            return;
        }
        self.update_interest(id);
    }

    /// A connection with nothing left to answer or send: the close reason, or `None` when
    /// it begins a lingering close instead. Closing with the peer's bytes unread would send
    /// an RST, which may destroy our last reply before the peer reads it (a refusal of a
    /// request too large to read whole): our side is shut and the peer's read to its end
    /// first.
    fn finish(&mut self, id: ConnId) -> Option<CloseReason> {
        let conn = self.conns.get_mut(id.0)?;
        if !conn.close_after_flush {
            return Some(CloseReason::PeerClosed);
        }
        if conn.read_closed || conn.lingering {
            return Some(CloseReason::Protocol);
        }
        let close = conn.linger();
        // Its source's share of `max_connections_per_ip` is free again: a client that
        // reconnects before closing is not refused for it.
        if conn.kind == Kind::Tcrp {
            release_per_source(&mut self.per_source, conn.peer);
        }
        // No longer than a handshake may take (a shorter timeout is kept).
        let handshake = Duration::from_secs(self.config.limits.handshake_timeout_secs);
        conn.restart_timer(Instant::now() + LINGER.min(handshake), &mut self.activity);
        close
    }

    /// Registers the connection for the readiness it needs now (WRITABLE only while output
    /// is queued); closes it if the poll refuses.
    fn update_interest(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id.0) else {
            return;
        };
        let desired = conn.desired_interest();
        if desired == conn.interest {
            return;
        }
        if let Err(e) = self
            .poll
            .registry()
            .reregister(&mut conn.stream, id.token(), desired)
        {
            warn!("{}: cannot reregister: {e}", conn.peer);
            self.close(id, CloseReason::IoError);
            return;
        }
        conn.interest = desired;
    }

    /// Closes connection `id`, counting it under `reason`; one the daemon gives up on with
    /// replies unread is reset ([`CloseReason::gives_up`]).
    pub(super) fn close(&mut self, id: ConnId, reason: CloseReason) {
        if !self.conns.contains(id.0) {
            return;
        }
        let conn = self.conns.remove(id.0);
        // A connection the daemon gives up on with replies its peer has not read, here or
        // in the kernel, is reset: closed normally, the kernel would keep trying to deliver
        // what its send queue holds (FIN-WAIT-1) while the peer acknowledged its window
        // probes, holding that memory of the host's after the connection is gone from the
        // table, until the user timeout inherited from the listener (twice the handshake
        // timeout, `setup::set_user_timeout`) ran out. One closed normally after its peer's
        // end is not asked about: the timeout alone bounds what it left unread, so the
        // handshake's close costs no `SIOCOUTQ`.
        if reason.gives_up()
            && (conn.pending_bytes() > 0
                || sockopt::unacknowledged(conn.stream.as_raw_fd()).is_ok_and(|n| n > 0))
        {
            if let Err(e) = sockopt::reset_on_close(conn.stream.as_raw_fd()) {
                debug!("{}: cannot reset the connection: {e}", conn.peer);
            }
        }
        // No deregister: epoll drops a descriptor from its interest list when the descriptor
        // is closed (the stream is never duplicated), and mio keeps no per-source state on
        // Linux, so the `epoll_ctl(DEL)` would be a system call per handshake for nothing.
        // Events already returned for this token are skipped or harmless (`conn_event`).
        if conn.kind == Kind::Http {
            self.http_conns.retain(|&open| open != id);
        }
        // Its entry on `revisit`, if any, stays (see that field). A lingering connection gave
        // its share of its source's count back when it began to linger.
        if conn.kind == Kind::Tcrp && !conn.lingering {
            release_per_source(&mut self.per_source, conn.peer);
        }
        self.metrics.tcp_open = self.metrics.tcp_open.saturating_sub(1);
        Metrics::bump(&mut self.metrics.tcp_closed, reason.label());
        debug!("{}: closed ({reason})", conn.peer);
    }
}

/// Whether a connection waits in `listener`'s accept queue. Linux takes the descriptor
/// before it looks at the queue, so `accept` fails for want of one even when none waits
/// (as at every retry): closing a connection then would make room for nobody. Said false
/// when the kernel cannot tell.
fn newcomer_waits(listener: &TcpListener) -> bool {
    sockopt::accept_queue(listener.as_raw_fd()).is_ok_and(|queue| queue.waiting > 0)
}

/// The soft open-file limit: `accept` fails with EMFILE when every descriptor below it is
/// taken. `None` when it cannot be read or there is none.
fn open_file_limit() -> Option<u64> {
    super::setup::nofile_limit()
        .map(|limit| limit.rlim_cur)
        .filter(|&soft| soft != libc::RLIM_INFINITY)
}

/// Whether closing `conn` frees a descriptor below `usable_below` (any, without it).
fn usable(conn: &Conn, usable_below: Option<u64>) -> bool {
    usable_below
        .is_none_or(|below| u64::try_from(conn.stream.as_raw_fd()).is_ok_and(|fd| fd < below))
}

/// Gives back one of `peer`'s source's connections in `max_connections_per_ip`.
fn release_per_source(per_source: &mut HashMap<IpAddr, usize>, peer: SocketAddr) {
    let source = rate::source(peer.ip());
    if let Some(count) = per_source.get_mut(&source) {
        *count -= 1;
        if *count == 0 {
            per_source.remove(&source);
        }
    }
}

/// How readily a full table closes `conn` for a newcomer; `None` if it must not: not a
/// handshake connection, or its reply waits for the disk or a password check.
fn eviction_class(conn: &Conn) -> Option<EvictionClass> {
    if conn.kind != Kind::Tcrp || conn.has_held() || conn.awaiting_password.is_some() {
        return None;
    }
    Some(if conn.close_after_flush {
        EvictionClass::Closing
    } else if conn.paused {
        EvictionClass::Paused
    } else if conn.wants_write() {
        EvictionClass::Sending
    } else {
        EvictionClass::Idle
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::testing::loopback;

    // Added with the mutation run of 2026-12-05 (docs/SECURITY.md, "The daemon: TCP
    // connections and requests").

    /// Closing a connection frees a descriptor `accept` can use only when its own is below
    /// the limit; without a limit, any will do.
    #[test]
    fn only_a_connection_below_the_descriptor_limit_frees_a_usable_one() {
        let (_peer, c) = loopback();
        let fd = u64::try_from(c.stream.as_raw_fd()).unwrap();
        assert!(usable(&c, None));
        assert!(usable(&c, Some(fd + 1)));
        assert!(!usable(&c, Some(fd)), "its own descriptor is at the limit");
        assert!(!usable(&c, Some(fd - 1)));
    }

    /// Only the closes the daemon decides on its own give up on replies (and reset a
    /// connection that left some unread); a close its peer or its last reply ended does not.
    #[test]
    fn the_daemon_gives_up_only_on_timeouts_overflows_and_evictions() {
        let giving_up: Vec<_> = CloseReason::ALL
            .into_iter()
            .filter(|r| r.gives_up())
            .collect();
        assert_eq!(
            giving_up,
            [
                CloseReason::Timeout,
                CloseReason::OutputOverflow,
                CloseReason::Evicted
            ]
        );
    }

    // Added with the mutation run of 2026-12-06 on the rest of this file (docs/SECURITY.md,
    // "The daemon: accepting connections (the rest of connections.rs)").

    /// A server on loopback ports of its own, its state in `dir`, without a metrics
    /// listener; its loop is not run (as in `requests.rs`' tests).
    fn server(dir: &std::path::Path) -> Server {
        super::super::testing::on_loopback(dir, crate::Config::default())
    }

    /// An idle loopback connection, last answered at `activity`, put in `server`'s table
    /// (not registered with its poll).
    fn add_idle(server: &mut Server, activity: u64) -> (std::net::TcpStream, ConnId) {
        let (peer, mut conn) = loopback();
        conn.activity = activity;
        (peer, ConnId(server.conns.insert(conn)))
    }

    /// The picks of a pass over a full table serve the newcomers that come while it stays
    /// full (a pass per [`EVICTION_PICKS`] newcomers, not one each) or while descriptors are
    /// short; they are dropped when a newcomer finds the table not full.
    #[test]
    fn a_full_tables_picks_are_kept_while_it_stays_full_or_descriptors_are_short() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(dir.path());
        let newcomer: SocketAddr = "127.0.0.9:4000".parse().unwrap();
        let (_older_peer, older) = add_idle(&mut s, 1);
        let (_newer_peer, newer) = add_idle(&mut s, 2);
        // Picks kept from an earlier pass: the newer one alone (a fresh pass would put the
        // older one first).
        let kept = vec![(EvictionClass::Idle, 2, newer)];
        s.connection_cap = 3;
        s.evict_candidates = kept.clone();
        assert_eq!(s.make_room_or_refuse(Kind::Tcrp, newcomer, true), None);
        assert_eq!(s.evict_candidates, kept, "short of descriptors: kept");
        assert_eq!(s.make_room_or_refuse(Kind::Tcrp, newcomer, false), None);
        assert!(s.evict_candidates.is_empty(), "not full: dropped");
        s.connection_cap = 2;
        s.evict_candidates = kept;
        assert_eq!(s.make_room_or_refuse(Kind::Tcrp, newcomer, false), None);
        assert!(!s.conns.contains(newer.0), "full: the kept pick made room");
        assert!(
            s.conns.contains(older.0),
            "full: the older one stays (no fresh pass)"
        );
    }
}
