//! The metrics listener's side of the loop: reading a request head on one of its
//! connections and answering it (`/metrics`, `/healthz`, `/readyz`), with the reasons
//! `/readyz` gives when the daemon cannot take new members.

use std::time::{Duration, Instant};

use log::debug;

use super::{ConnId, Server};
use crate::conn::{CloseReason, ReadUntil};
use crate::http::{self, Route};
use crate::metrics::Metrics;
use crate::persist::{HardLinks, LockState};
use crate::store::Paths;
use crate::udp;

/// How long a batch of creates and joins may wait for the disk before `/readyz` answers 503:
/// far above a slow `fsync` (tens of ms) or a group commit behind a compaction (under 30 ms at
/// 100,000 tokens), and five of the writer's one-second retries of a failed append.
const READY_DISK_WAIT: Duration = Duration::from_secs(5);

impl Server {
    /// Why `/readyz` says the daemon cannot take new members, if it cannot. State files
    /// deleted and not written again come first: the writer finds them within a second, idle
    /// or not, and creates and joins wait for them from then on, so there is no need for one
    /// to wait 5 s. Then a lock file deleted and not taken again (another process took it, or
    /// it cannot be taken) or whose name cannot be examined, then a state file or journal
    /// given a second name (a hard link) while the daemon serves, then a disk that has held a
    /// batch too long.
    fn not_ready(&self, now: Instant) -> Option<String> {
        let compactions = self.persister.as_ref().map(|p| p.compactions());
        if compactions.is_some_and(|c| c.files_missing) {
            return Some(
                "the state's files were deleted while in use and are not written again yet, \
                 and creates and joins wait for them (the log says why)"
                    .to_owned(),
            );
        }
        match compactions.map(|c| c.lock) {
            Some(LockState::Taken) => {
                return Some(
                    "the state's lock file was deleted while in use and another process took \
                     it since: both may write the state; stop one of them (the log names it)"
                        .to_owned(),
                )
            }
            Some(LockState::Lost) => {
                return Some(
                    "the state's lock file was deleted while in use and cannot be taken again: \
                     another ocmd could start on the state and write it too (the log says why)"
                        .to_owned(),
                )
            }
            Some(LockState::Unverifiable(error)) => {
                return Some(format!(
                    "the state's lock file cannot be examined: {error}; whether this ocmd still \
                     holds it is unknown, and if not, another ocmd could start on the state and \
                     write it too (the log says more)"
                ))
            }
            Some(LockState::Held) | None => {}
        }
        if let Some(reason) = compactions.and_then(|c| self.hard_links_reason(c.hard_links)) {
            return Some(reason);
        }
        self.disk_wait(now).map(|waited| {
            format!(
                "the journal has taken no write for {} s, and creates and joins wait for it \
                 (the log says why)",
                waited.as_secs()
            )
        })
    }

    /// What `/readyz` says of a state file or journal with more than one name (`links`, as
    /// the writer's latest check counted them), naming each file and its count; `None` while
    /// each has one.
    fn hard_links_reason(&self, links: HardLinks) -> Option<String> {
        let paths = Paths::new(&self.config.state.path);
        let files: Vec<String> = [
            ("state file", &paths.state, links.state_file),
            ("journal", &paths.journal, links.journal),
        ]
        .into_iter()
        .filter_map(|(what, path, names)| {
            names.map(|n| format!("the {what} {} has {n} names", path.display()))
        })
        .collect();
        if files.is_empty() {
            return None;
        }
        Some(format!(
            "{} (hard links): a second ocmd started on another name would take a lock of its own \
             and both would write the same file; remove the other names (the log says more)",
            files.join(" and ")
        ))
    }

    /// How long the oldest create or join has waited for the disk, once that is longer than
    /// [`READY_DISK_WAIT`]: `/readyz` then says the daemon cannot take new members.
    fn disk_wait(&self, now: Instant) -> Option<Duration> {
        let since = self.persister.as_ref()?.waiting_since()?;
        Some(now.saturating_duration_since(since)).filter(|&waited| waited > READY_DISK_WAIT)
    }

    /// The answer to a request for `route` (`head`: a HEAD request, answered without its
    /// body), with the status code to count it under (`None`: counted already, as a scrape
    /// counts itself).
    fn http_reply(&mut self, route: Route, head: bool) -> (Option<&'static str>, Vec<u8>) {
        match route {
            Route::Metrics => {
                if let Some(raw) = udp::kernel_drops(&self.udp) {
                    self.metrics.udp_kernel_drops = self.kernel_drops.observe(raw);
                }
                // The compactor's counters are otherwise copied when it or the writer wakes
                // the loop, and nothing does after the fold at start.
                if let Some(persister) = &self.persister {
                    self.metrics.state_compactions(persister.compactions());
                }
                // Counted before the render, so that a scrape sees itself.
                Metrics::bump(&mut self.metrics.http_responses, "200");
                let body = self.metrics.render(self.registry.stats());
                let reply = http::response(
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    &body,
                    head,
                );
                (None, reply)
            }
            Route::Health => (
                Some("200"),
                http::response("200 OK", "text/plain", "ok\n", head),
            ),
            Route::Ready => match self.not_ready(Instant::now()) {
                Some(reason) => (
                    Some("503"),
                    http::response(
                        "503 Service Unavailable",
                        "text/plain",
                        &format!("not ready: {reason}\n"),
                        head,
                    ),
                ),
                None => (
                    Some("200"),
                    http::response("200 OK", "text/plain", "ready\n", head),
                ),
            },
            Route::NotFound => (
                Some("404"),
                http::response("404 Not Found", "text/plain", "not found\n", head),
            ),
            Route::BadRequest => (
                Some("400"),
                http::response("400 Bad Request", "text/plain", "bad request\n", false),
            ),
            Route::TooLarge => (
                Some("431"),
                http::response(
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    "too large\n",
                    false,
                ),
            ),
        }
    }

    pub(super) fn read_http(&mut self, id: ConnId) -> Option<CloseReason> {
        let conn = self.conns.get_mut(id.0)?;
        if conn.lingering {
            return conn.discard_input();
        }
        if conn.close_after_flush {
            return None;
        }
        // What was read before holds no end of the head (it would have been answered), so
        // only the new bytes are searched: a head sent a byte at a time, or a full table
        // reading its 16 connections for each newcomer, costs the bytes that came.
        let searched = conn.input.len();
        if let Err(e) = conn.fill(http::MAX_REQUEST_BYTES, ReadUntil::WouldBlock) {
            debug!("{} metrics conn: read failed: {e}", conn.peer);
            return Some(CloseReason::IoError);
        }
        let (route, head) = match http::parse(&conn.input, searched) {
            Some(parsed) => parsed,
            None if conn.input.len() >= http::MAX_REQUEST_BYTES => (Route::TooLarge, false),
            None if conn.read_closed => return Some(CloseReason::PeerClosed),
            None => return None,
        };
        let (code, reply) = self.http_reply(route, head);
        if let Some(code) = code {
            Metrics::bump(&mut self.metrics.http_responses, code);
        }
        let conn = self.conns.get_mut(id.0)?;
        conn.queue(reply, None);
        conn.close_after_flush = true;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{add_conn, on_loopback};
    use super::*;
    use std::io::Write;

    /// A metrics client that ends its side before a whole request head has come is closed
    /// at once (`peer_closed`), not left to hold one of the few metrics connections until
    /// its timer runs out.
    #[test]
    fn a_metrics_request_cut_short_by_the_peers_end_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = on_loopback(dir.path(), crate::Config::default());
        let (mut peer, id) = add_conn(&mut s);
        s.conns[id.0].kind = crate::conn::Kind::Http;
        peer.write_all(b"GET /metr").unwrap();
        assert_eq!(s.read_http(id), None, "the rest of the head may come");
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let reason = loop {
            if let Some(reason) = s.read_http(id) {
                break reason;
            }
            assert!(Instant::now() < deadline, "the peer's end never closed it");
            std::thread::yield_now();
        };
        assert_eq!(reason, CloseReason::PeerClosed);
        assert!(s.conns[id.0].pending_bytes() == 0, "nothing was answered");
    }
}
