//! The TCRP side of the loop: reading connections, answering frames (handing password
//! checks to their thread and resuming after); `http_answers` answers the metrics
//! listener's.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use log::{debug, warn};
use tcrp::payload::ErrorCode;
use tcrp::{Operation, HEADER_LEN};

use super::{
    unix_now, ConnId, Server, FRAMES_PER_TURN, MAX_PASSWORD_JOBS, MAX_PASSWORD_JOBS_PER_SOURCE,
    OUTPUT_PER_TURN, READS_PER_EVENT, READ_SLACK, SERVER_FULL_LOG_EVERY,
};
use crate::conn::{CloseReason, Conn, Filled, ReadUntil};
use crate::handshake::{self, Context, Response, Step};
use crate::metrics::{operation_label, Metrics};
use crate::password::{self, Outcome};
use crate::rate;

/// Whether a reply with `result` restarts the handshake timer: any but a refusal of the frame
/// itself (`malformed_request`, `unsupported_operation`) or of the peer's allowances
/// (`rate_limited`: requests, password failures). A `rate_limited` for a full password queue
/// restarts it (the caller knows which): that request passed the request limit.
fn restarts_timer(result: Result<(), ErrorCode>) -> bool {
    !matches!(
        result,
        Err(ErrorCode::MalformedRequest | ErrorCode::UnsupportedOperation | ErrorCode::RateLimited)
    )
}

impl Server {
    /// A create or join refused because a cap of the registry is reached: the operator must
    /// hear of it at the default level, as of the connection caps, but not once a refusal.
    /// Said at warn, naming the caps reached, at most once a [`SERVER_FULL_LOG_EVERY`], with
    /// the refusals since the last such line.
    fn warn_server_full(&mut self, op: &str, peer: std::net::SocketAddr, now: Instant) {
        let (refused, logged_at) = &mut self.server_full;
        *refused += 1;
        if logged_at.is_some_and(|at| now < at + SERVER_FULL_LOG_EVERY) {
            return;
        }
        let limits = &self.config.limits;
        let stats = self.registry.stats();
        let mut caps = Vec::new();
        if limits.max_rooms != 0 && stats.rooms >= limits.max_rooms {
            caps.push(format!("limits.max_rooms ({})", limits.max_rooms));
        }
        if limits.max_tokens != 0 && stats.members >= limits.max_tokens {
            caps.push(format!("limits.max_tokens ({})", limits.max_tokens));
        }
        if caps.is_empty() {
            caps.push(format!(
                "limits.max_members_per_room ({}) in the room asked for",
                limits.max_members_per_room
            ));
        }
        warn!(
            "{peer}: {op} refused (server_full): {} reached; {} since the last such line \
             (ocm_handshakes_total{{result=\"server_full\"}} counts them all)",
            caps.join(" and "),
            crate::plural::Count(*refused as usize, "refusal")
        );
        *refused = 0;
        *logged_at = Some(now);
    }

    /// Reads and answers TCRP frames; returns the close reason if the connection is done (an
    /// I/O failure, a protocol error, its peer's end, a lingering close run out). Reads at
    /// most [`READS_PER_EVENT`] buffers per call so one busy peer cannot hold the loop; a
    /// connection with more to read is revisited at the end of the pass.
    /// `until` says how far the first buffer is read; see [`ReadUntil`].
    pub(super) fn read_tcrp(
        &mut self,
        id: ConnId,
        now: Instant,
        until: ReadUntil,
    ) -> Option<CloseReason> {
        let cap =
            HEADER_LEN + usize::from(u8::MAX) + self.config.limits.max_payload_bytes + READ_SLACK;
        for _ in 0..READS_PER_EVENT {
            let conn = self.conns.get_mut(id.0)?;
            if conn.lingering {
                return conn.discard_input();
            }
            // A paused connection reads nothing until its replies drain (`after_io` resumes).
            if conn.close_after_flush || conn.paused {
                return None;
            }
            let filled = match conn.fill(cap, until) {
                Ok(f) => f,
                Err(e) => {
                    debug!("{}: read failed: {e}", conn.peer);
                    return Some(CloseReason::IoError);
                }
            };
            self.process_input(id, now, None);
            let conn = self.conns.get_mut(id.0)?;
            // While a password is being checked the input waits; reading resumes after.
            if conn.awaiting_password.is_some() {
                return None;
            }
            // Its turn is over: the rest waits for the next pass.
            if conn.more_frames {
                break;
            }
            match filled {
                Filled::Full => continue,
                Filled::Drained | Filled::Eof => return None,
            }
        }
        if self.conns.get_mut(id.0).is_some_and(Conn::list_for_revisit) {
            self.revisit.push(id);
        }
        None
    }

    /// Answers the whole frames in a connection's input, at most [`FRAMES_PER_TURN`] of them
    /// or [`OUTPUT_PER_TURN`] bytes of replies (then [`Conn::more_frames`] is set, and the
    /// caller puts the connection on `revisit`).
    /// `outcome` is the password result the first frame waited for. A frame that needs a
    /// password check stays at the front of the input, and the connection waits for the
    /// check.
    fn process_input(&mut self, id: ConnId, now: Instant, mut outcome: Option<Outcome>) {
        let Some(conn) = self.conns.get_mut(id.0) else {
            return;
        };
        conn.more_frames = false;
        let peer = conn.peer;
        let mut consumed = 0;
        let (mut answered, mut output) = (0, 0);
        loop {
            if answered == FRAMES_PER_TURN || output >= OUTPUT_PER_TURN {
                if let Some(conn) = self.conns.get_mut(id.0) {
                    conn.more_frames = true;
                }
                break;
            }
            match self.answer_next_frame(id, peer, now, consumed, &mut outcome) {
                FrameStep::Gone => return,
                FrameStep::Wait => break,
                FrameStep::CheckPassword(job) => {
                    self.queue_password_check(id, peer, job);
                    break;
                }
                FrameStep::Reply {
                    response,
                    used,
                    queue_full,
                } => {
                    consumed += used;
                    answered += 1;
                    output += response.bytes.len();
                    if !self.queue_reply(id, peer, now, response, queue_full) {
                        return;
                    }
                }
            }
        }
        if let Some(conn) = self.conns.get_mut(id.0) {
            conn.consume(consumed);
        }
        self.prune_holding();
    }

    /// Decodes the next whole frame in the connection's input (from `consumed` on) and
    /// answers it, if it may be answered now (see [`may_answer_next`]). `outcome` is taken by
    /// the frame it was waited for. Kept apart from sending the reply: the frame borrows the
    /// input while the registry answers it.
    fn answer_next_frame(
        &mut self,
        id: ConnId,
        peer: SocketAddr,
        now: Instant,
        consumed: usize,
        outcome: &mut Option<Outcome>,
    ) -> FrameStep {
        let max_payload = self.config.limits.max_payload_bytes;
        let max_output = self.config.limits.max_output_bytes;
        let Some(conn) = self.conns.get_mut(id.0) else {
            return FrameStep::Gone;
        };
        if !may_answer_next(conn, outcome.is_some(), max_output, &mut self.metrics) {
            return FrameStep::Wait;
        }
        conn.awaiting_password = None;
        // In bounds: `consumed` adds up the lengths of frames `tcrp::decode` found whole in
        // this input, and it reports a length only when the input holds that much.
        let (frame, used) = match tcrp::decode(&conn.input[consumed..], max_payload) {
            Ok(None) => return FrameStep::Wait,
            Ok(Some(decoded)) => decoded,
            Err(e) => {
                let header = &conn.input[consumed..];
                let op = Operation::from(header.get(1).copied().unwrap_or(0));
                return FrameStep::Reply {
                    response: self.refuse_bad_frame(peer, op, &e, now),
                    used: 0,
                    queue_full: false,
                };
            }
        };
        let mut ctx = Context {
            registry: &mut self.registry,
            limiter: &mut self.limiter,
            password_failures: &mut self.password_failures,
            limits: self.config.request_limits(),
            names: self.config.names,
            out: &mut self.outbox,
            peer: peer.ip(),
            now,
            unix_now: unix_now(),
        };
        let job = match handshake::handle_frame(&frame, &mut ctx, outcome.take().as_ref()) {
            Step::Reply(response) => {
                return FrameStep::Reply {
                    response,
                    used,
                    queue_full: false,
                }
            }
            Step::Password(job) => job,
        };
        let source = peer.ip();
        let Some(why) = password_queue_full(&self.password_tickets, source) else {
            return FrameStep::CheckPassword(job);
        };
        // Refused unchecked: a check that took a failure token
        // gives it back (nothing was tried).
        if matches!(job, password::Job::Verify { .. }) {
            let limits = self.config.request_limits();
            handshake::give_back_check(&mut self.password_failures, source, now, &limits);
        }
        debug!("{peer}: password check refused: {why}");
        FrameStep::Reply {
            response: handshake::refusal(
                frame.operation,
                frame.room_name,
                ErrorCode::RateLimited,
                "password checks are busy; try again shortly",
                false,
            ),
            used,
            queue_full: true,
        }
    }

    /// The reply to a frame that does not decode, which closes the connection; says so, at
    /// the pace `rate.drop_logs_per_sec` allows.
    fn refuse_bad_frame(
        &mut self,
        peer: SocketAddr,
        op: Operation,
        e: &tcrp::Error,
        now: Instant,
    ) -> Response {
        if super::may_log_drop(&mut self.drop_log, now, self.config.rate.drop_logs_per_sec) {
            warn!("{peer}: bad frame: {e}; closing");
        }
        handshake::refusal(op, &[], ErrorCode::MalformedRequest, &e.to_string(), true)
    }

    /// Hands the password check of the frame at the front of the connection's input to the
    /// hashing thread; the connection waits for its outcome.
    fn queue_password_check(&mut self, id: ConnId, peer: SocketAddr, job: password::Job) {
        let source = peer.ip();
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.password_tickets.insert(ticket, (id, source));
        self.passwords.submit(ticket, job);
        debug!("{peer}: password check queued");
        if let Some(conn) = self.conns.get_mut(id.0) {
            conn.awaiting_password = Some(ticket);
        }
    }

    /// Counts `response`, hands the records it needs durable to the writer, and queues it on
    /// the connection (held until they are). Returns whether more frames may be answered:
    /// not once the connection is gone, or closing after this reply.
    fn queue_reply(
        &mut self,
        id: ConnId,
        peer: SocketAddr,
        now: Instant,
        response: Response,
        queue_full: bool,
    ) -> bool {
        let timeout = Duration::from_secs(self.config.limits.handshake_timeout_secs);
        self.count_reply(&response, peer, now, queue_full);
        let wait_for = match (response.needs_durability, self.persister.as_mut()) {
            (true, Some(p)) => Some(p.submit(self.registry.take_records())),
            _ => None,
        };
        let Some(conn) = self.conns.get_mut(id.0) else {
            return false;
        };
        // The wait starts now, not at the start of the pass: earlier work in the pass
        // (relaying, other requests) is not the disk's.
        conn.queue(
            response.bytes,
            wait_for.map(|batch| (batch, Instant::now())),
        );
        if wait_for.is_some() && !conn.listed_holding {
            conn.listed_holding = true;
            self.holding.push(id);
        }
        // A reply restarts the timer, unless it refused a frame before or at the request
        // limit: junk and refused requests cost a sender nothing, and must not keep its
        // connection (one of `max_connections`) open for ever.
        // A request refused for a full password queue was charged to the request limit.
        if restarts_timer(response.result) || queue_full {
            conn.restart_timer(now + timeout, &mut self.activity);
        }
        if response.close {
            conn.close_after_flush = true;
            conn.input.clear();
            return false;
        }
        true
    }

    /// Counts a reply in the metrics (by operation and result, and a `rate_limited` by
    /// which limit: `queue_full` for the password queue), and warns of a `server_full`.
    fn count_reply(
        &mut self,
        response: &Response,
        peer: SocketAddr,
        now: Instant,
        queue_full: bool,
    ) {
        let op = operation_label(response.operation);
        let result = response.result.map_or_else(|c| c.as_str(), |()| "ok");
        *self.metrics.handshakes.entry((op, result)).or_insert(0) += 1;
        if response.result == Err(ErrorCode::ServerFull) {
            self.warn_server_full(op, peer, now);
        }
        if response.result == Err(ErrorCode::RateLimited) {
            let kind = if queue_full {
                "password_queue"
            } else {
                "request"
            };
            Metrics::bump(&mut self.metrics.rate_limited, kind);
        }
    }

    /// While the disk is stuck no batch completes, and `collect_durable` does not drop the
    /// entries of connections closed meanwhile: they go here, so that the list of connections
    /// holding replies never outgrows the table.
    fn prune_holding(&mut self) {
        if self.holding.len() <= 2 * self.conns.len() + 64 {
            return;
        }
        let conns = &self.conns;
        self.holding
            .retain(|id| conns.get(id.0).is_some_and(|c| c.listed_holding));
        self.holding.sort_unstable_by_key(|id| id.0);
        self.holding.dedup();
    }

    /// Password checks finished: resume the connections that waited for them.
    pub(super) fn collect_passwords(&mut self, now: Instant) {
        for (ticket, outcome) in self.passwords.poll() {
            let Some((id, source)) = self.password_tickets.remove(&ticket) else {
                continue;
            };
            let waiting = self
                .conns
                .get(id.0)
                .is_some_and(|c| c.awaiting_password == Some(ticket));
            if !waiting {
                // The connection closed meanwhile. A right password still gets its failure
                // token back (`handle_frame` would have given it back).
                if let Outcome::Verified { matched: true, .. } = outcome {
                    let limits = self.config.request_limits();
                    handshake::give_back_check(&mut self.password_failures, source, now, &limits);
                    debug!("{source}: right password for a closed connection: token given back");
                }
                continue;
            }
            self.process_input(id, now, Some(outcome));
            // Input that arrived while waiting may hold more frames, and the socket more bytes.
            let close = self.read_tcrp(id, now, ReadUntil::WouldBlock);
            self.after_io(id, close);
        }
    }
}

/// What [`Server::answer_next_frame`] came to.
enum FrameStep {
    /// The connection is gone.
    Gone,
    /// Nothing to answer now: no whole frame yet, or the connection may not answer more
    /// (see [`may_answer_next`]).
    Wait,
    /// The reply to send, the input bytes its frame used (none for a frame that does not
    /// decode: its reply closes the connection), and whether it refused the frame for a full
    /// password queue.
    Reply {
        response: Response,
        used: usize,
        queue_full: bool,
    },
    /// A password check to queue; the frame stays at the front of the input until its
    /// outcome comes.
    CheckPassword(password::Job),
}

/// Whether `conn`'s next frame may be answered now: not while it is closing or waits for a
/// password check whose outcome has not come (`outcome_came`), nor, past `max_output`
/// bytes unsent, while its peer has not read enough: the connection then pauses.
fn may_answer_next(
    conn: &mut Conn,
    outcome_came: bool,
    max_output: usize,
    metrics: &mut Metrics,
) -> bool {
    if conn.close_after_flush || (conn.awaiting_password.is_some() && !outcome_came) {
        return false;
    }
    // Past the output cap, the kernel takes what it will before the next frame is
    // answered; if the peer still has not read enough, the connection pauses (a
    // frame whose password outcome came is answered first: its check was queued
    // under the cap). A write error is found again by the caller's flush.
    if !outcome_came
        && conn.pending_bytes() > max_output
        && (conn.flush().is_err() || conn.pending_bytes() > max_output)
    {
        conn.paused = true;
        metrics.tcp_pauses += 1;
        return false;
    }
    true
}

/// Why a new password job from `source` is refused, if it is: the hashing thread works one
/// job at a time (tens of milliseconds each), so its queue is bounded in all and per source,
/// and a flood of password requests is refused at once rather than making every check wait
/// behind it.
fn password_queue_full(
    tickets: &HashMap<u64, (ConnId, IpAddr)>,
    source: IpAddr,
) -> Option<&'static str> {
    if tickets.len() >= MAX_PASSWORD_JOBS {
        return Some("the queue is full");
    }
    let key = rate::source(source);
    let from_source = tickets
        .values()
        .filter(|(_, ip)| rate::source(*ip) == key)
        .count();
    (from_source >= MAX_PASSWORD_JOBS_PER_SOURCE).then_some("the source has its share queued")
}

#[cfg(test)]
mod tests {
    use super::super::testing::{add_conn, on_loopback};
    use super::*;
    use crate::conn::testing::{loopback, reset};
    use std::io::Write;

    fn tickets(sources: &[&str]) -> HashMap<u64, (ConnId, IpAddr)> {
        sources
            .iter()
            .enumerate()
            .map(|(i, ip)| (i as u64, (ConnId(i), ip.parse().unwrap())))
            .collect()
    }

    #[test]
    fn the_queue_is_bounded_per_source_and_in_all() {
        let source: IpAddr = "2001:db8::1".parse().unwrap();
        let mut same = vec!["2001:db8::2"; MAX_PASSWORD_JOBS_PER_SOURCE - 1];
        assert_eq!(password_queue_full(&tickets(&same), source), None);
        same.push("2001:db8::3");
        assert!(password_queue_full(&tickets(&same), source).is_some());
        let others: Vec<String> = (0..MAX_PASSWORD_JOBS)
            .map(|i| format!("10.{}.{}.1", i / 250, i % 250))
            .collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        assert!(password_queue_full(&tickets(&others), source).is_some());
        assert_eq!(password_queue_full(&tickets(&others[1..]), source), None);
    }

    // Added with the mutation run of 2026-12-05 (docs/SECURITY.md, "The daemon: TCP
    // connections and requests").

    /// Only a refusal of the frame itself or of the peer's allowances leaves the handshake
    /// timer running: any other reply, refusals included, restarts it.
    #[test]
    fn only_refusals_of_the_frame_or_of_the_allowances_leave_the_timer_running() {
        for code in [
            ErrorCode::MalformedRequest,
            ErrorCode::UnsupportedOperation,
            ErrorCode::RateLimited,
        ] {
            assert!(!restarts_timer(Err(code)), "{code:?}");
        }
        assert!(restarts_timer(Ok(())));
        for code in [
            ErrorCode::ServerFull,
            ErrorCode::BadPassword,
            ErrorCode::RoomExists,
        ] {
            assert!(restarts_timer(Err(code)), "{code:?}");
        }
    }

    /// The next frame is answered unless the connection closes, waits for a password check
    /// whose outcome has not come, or holds more than `max_output` unsent bytes after a
    /// flush: only then does it pause, counted once.
    #[test]
    fn a_connection_answers_until_it_closes_waits_for_a_check_or_its_peer_falls_behind() {
        const MAX: usize = 1000;
        let mut metrics = Metrics::new();
        let (_peer, mut c) = loopback();
        assert!(may_answer_next(&mut c, false, MAX, &mut metrics), "idle");
        c.awaiting_password = Some(1);
        assert!(
            !may_answer_next(&mut c, false, MAX, &mut metrics),
            "check in flight"
        );
        assert!(
            may_answer_next(&mut c, true, MAX, &mut metrics),
            "its outcome came"
        );
        c.awaiting_password = None;
        // Exactly the cap held: not over it.
        c.queue(vec![1; MAX], Some((1, Instant::now())));
        assert!(
            may_answer_next(&mut c, false, MAX, &mut metrics),
            "at the cap"
        );
        // Over the cap only before the flush: the socket takes what may leave.
        let (_peer2, mut d) = loopback();
        d.queue(vec![2; 500], None);
        d.queue(vec![1; MAX], Some((1, Instant::now())));
        assert!(
            may_answer_next(&mut d, false, MAX, &mut metrics),
            "flushed to the cap"
        );
        assert!(!d.paused && d.pending_bytes() == MAX);
        assert_eq!(metrics.tcp_pauses, 0);
        // Over it after the flush: a pause, counted, unless a check's outcome came.
        let (_peer3, mut e) = loopback();
        e.queue(vec![1; MAX + 1], Some((1, Instant::now())));
        assert!(
            may_answer_next(&mut e, true, MAX, &mut metrics),
            "outcome first"
        );
        assert!(!e.paused);
        assert!(
            !may_answer_next(&mut e, false, MAX, &mut metrics),
            "over the cap"
        );
        assert!(e.paused);
        assert_eq!(metrics.tcp_pauses, 1);
        // Closing: nothing more, and no pause.
        let (_peer4, mut f) = loopback();
        f.close_after_flush = true;
        assert!(
            !may_answer_next(&mut f, false, MAX, &mut metrics),
            "closing"
        );
        assert!(!f.paused);
        assert_eq!(metrics.tcp_pauses, 1);
    }

    /// At the cap exactly, no flush is tried: a connection whose peer reset is answered (the
    /// caller's flush finds the error), not paused.
    #[test]
    fn a_connection_at_the_cap_is_answered_without_a_flush() {
        const MAX: usize = 1000;
        let mut metrics = Metrics::new();
        let (peer, mut c) = loopback();
        reset(peer);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.fill(1024, ReadUntil::WouldBlock).is_ok() {
            assert!(Instant::now() < deadline, "the reset never came");
            std::thread::yield_now();
        }
        c.queue(vec![1; MAX], None);
        assert!(may_answer_next(&mut c, false, MAX, &mut metrics));
        assert!(!c.paused);
        assert!(c.flush().is_err(), "a write to the reset connection fails");
    }

    /// A lingering connection goes on while the peer has not ended, and is over at its end.
    #[test]
    fn lingering_ends_at_the_peers_end() {
        let (peer, mut c) = loopback();
        assert_eq!(c.linger(), None);
        assert_eq!(c.discard_input(), None, "the peer has not ended");
        drop(peer);
        let deadline = Instant::now() + Duration::from_secs(10);
        let reason = loop {
            if let Some(reason) = c.discard_input() {
                break reason;
            }
            assert!(Instant::now() < deadline, "the peer's end never came");
            std::thread::yield_now();
        };
        assert_eq!(reason, CloseReason::Protocol);
    }

    /// A server on loopback ports of its own, its state in `dir`, without the request limit,
    /// the look-alike check of room names, or a metrics listener; its loop is not run; the
    /// tests below drive its connections by hand.
    fn server(dir: &std::path::Path) -> Server {
        let mut config = crate::Config::default();
        config.rate.requests_per_sec = 0.0;
        config.names.refuse_lookalike_room_names = false;
        on_loopback(dir, config)
    }

    fn request(op: Operation, room: &str, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        tcrp::Frame {
            operation: op,
            state: tcrp::State::Request,
            room_name: room.as_bytes(),
            payload,
        }
        .encode(&mut bytes)
        .unwrap();
        bytes
    }

    /// Frames answered so far of `input` (all of one length `len`) now that `conn` has
    /// consumed what it answered.
    fn answered(conn: &Conn, input: usize, len: usize) -> usize {
        (input - conn.input.len()) / len
    }

    /// A turn answers at most [`FRAMES_PER_TURN`] frames of a connection's pipelined
    /// requests, however small their replies, and leaves the rest for its next turn.
    #[test]
    fn a_turn_answers_at_most_its_share_of_frames() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(dir.path());
        let (_peer, id) = add_conn(&mut s);
        let list = request(Operation::ListRooms, "", b"{}");
        let asked = FRAMES_PER_TURN + 5;
        s.conns[id.0].input = list.repeat(asked);
        s.process_input(id, Instant::now(), None);
        let c = &s.conns[id.0];
        assert_eq!(answered(c, asked * list.len(), list.len()), FRAMES_PER_TURN);
        assert!(c.more_frames);
        s.process_input(id, Instant::now(), None);
        let c = &s.conns[id.0];
        assert!(c.input.is_empty() && !c.more_frames);
    }

    /// A turn ends once its replies hold [`OUTPUT_PER_TURN`] bytes, before its share of
    /// frames when the replies are large.
    #[test]
    fn a_turn_ends_once_its_replies_hold_its_share_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(dir.path());
        // 20 rooms of long names: a room list of about 3 KiB.
        let (_host, hosts) = add_conn(&mut s);
        let creates: Vec<u8> = "abcdefghjkmnpqrstuvw"
            .chars()
            .flat_map(|c| request(Operation::CreateRoom, &c.to_string().repeat(100), b"\"h\""))
            .collect();
        s.conns[hosts.0].input = creates;
        for _ in 0..4 {
            s.process_input(hosts, Instant::now(), None);
        }
        assert!(s.conns[hosts.0].input.is_empty(), "the rooms are created");
        assert_eq!(s.registry.stats().rooms, 20);
        let (_peer, id) = add_conn(&mut s);
        let list = request(Operation::ListRooms, "", b"{}");
        s.conns[id.0].input = list.repeat(FRAMES_PER_TURN);
        s.process_input(id, Instant::now(), None);
        let c = &s.conns[id.0];
        let done = answered(c, FRAMES_PER_TURN * list.len(), list.len());
        let each = c.pending_bytes() / done;
        assert!(
            each > 1024 && each < OUTPUT_PER_TURN / 4,
            "{each} bytes a list"
        );
        assert!(c.more_frames);
        assert!(c.pending_bytes() >= OUTPUT_PER_TURN);
        assert_eq!(done, OUTPUT_PER_TURN.div_ceil(each), "{each} bytes a list");
    }

    /// A reply that carries a token is held, and its connection listed as holding one; a
    /// reply that needs no disk leaves a connection unlisted.
    #[test]
    fn only_a_reply_that_waits_for_the_disk_lists_its_connection_as_holding() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(dir.path());
        let (_peer, id) = add_conn(&mut s);
        s.conns[id.0].input = request(Operation::ListRooms, "", b"{}");
        s.process_input(id, Instant::now(), None);
        let c = &s.conns[id.0];
        assert!(c.pending_bytes() > 0 && !c.has_held());
        assert!(!c.listed_holding && s.holding.is_empty());
        s.conns[id.0].input = request(Operation::CreateRoom, "lobby", b"\"h\"");
        s.process_input(id, Instant::now(), None);
        let c = &s.conns[id.0];
        assert!(c.has_held() && c.listed_holding);
        assert_eq!(s.holding, [id]);
    }

    /// The list of connections holding replies is pruned of connections gone once it is
    /// longer than twice the table and 64 more, not before.
    #[test]
    fn the_list_of_connections_holding_replies_is_pruned_past_twice_the_table_and_64() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(dir.path());
        let _conns: Vec<_> = (0..3).map(|_| add_conn(&mut s)).collect();
        let bound = 2 * 3 + 64;
        // Slots of connections gone, past every open one.
        s.holding = (0..bound).map(|i| ConnId(100 + i)).collect();
        s.prune_holding();
        assert_eq!(s.holding.len(), bound, "not longer than the bound");
        s.holding.push(ConnId(100 + bound));
        s.prune_holding();
        assert!(s.holding.is_empty(), "{} left", s.holding.len());
    }

    /// One read takes in at most a frame of the largest size and [`READ_SLACK`] more, however
    /// much the peer has sent: a peer cannot make the daemon hold its backlog.
    #[test]
    fn a_read_takes_in_at_most_the_largest_frame_and_the_slack() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(dir.path());
        let (mut peer, id) = add_conn(&mut s);
        let list = request(Operation::ListRooms, "", b"{}");
        let sent = list.repeat(64 * 1024 / list.len());
        peer.write_all(&sent).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; sent.len()];
        while s.conns[id.0].stream.peek(&mut buf).unwrap_or(0) < sent.len() {
            assert!(Instant::now() < deadline, "the requests never arrived");
            std::thread::yield_now();
        }
        assert_eq!(s.read_tcrp(id, Instant::now(), ReadUntil::WouldBlock), None);
        let c = &s.conns[id.0];
        let cap = HEADER_LEN + 255 + s.config.limits.max_payload_bytes + READ_SLACK;
        // The first fill stopped at the cap, and the turn answered its share of it.
        assert!(c.more_frames);
        assert_eq!(c.input.len(), cap - FRAMES_PER_TURN * list.len());
    }

    /// A `server_full` refusal is warned about at most once a [`SERVER_FULL_LOG_EVERY`]: the
    /// refusals between are counted for the next line, which starts the count again.
    #[test]
    fn server_full_is_warned_about_once_a_minute_with_the_refusals_since() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(dir.path());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t0 = Instant::now();
        s.warn_server_full("create_room", peer, t0);
        assert_eq!(s.server_full, (0, Some(t0)), "said at once");
        let almost = t0 + SERVER_FULL_LOG_EVERY - Duration::from_millis(1);
        s.warn_server_full("create_room", peer, almost);
        s.warn_server_full("join_room", peer, almost);
        assert_eq!(s.server_full, (2, Some(t0)), "counted for the next line");
        let next = t0 + SERVER_FULL_LOG_EVERY;
        s.warn_server_full("create_room", peer, next);
        assert_eq!(
            s.server_full,
            (0, Some(next)),
            "said again once the minute is over"
        );
    }

    /// Each reply is counted by operation and result, and only a `rate_limited` one by the
    /// limit that refused it.
    #[test]
    fn only_rate_limited_replies_are_counted_by_the_limit_that_refused_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(dir.path());
        s.config.rate.requests_per_sec = 1.0;
        s.config.rate.requests_burst = 1.0;
        let (_peer, id) = add_conn(&mut s);
        s.conns[id.0].input = request(Operation::ListRooms, "", b"{}").repeat(3);
        s.process_input(id, Instant::now(), None);
        let counted = |result| s.metrics.handshakes.get(&("list_rooms", result)).copied();
        assert_eq!((counted("ok"), counted("rate_limited")), (Some(1), Some(2)));
        assert_eq!(
            s.metrics.rate_limited.iter().collect::<Vec<_>>(),
            [(&"request", &2)]
        );
    }
}
