//! The loop's timers: how long a pass may wait for events, and what is due when it wakes
//! (a retried accept, the liveness sweep, the connections' deadlines, the history
//! checkpoint, the status line and the watchdog).

use std::time::{Duration, Instant};

use log::debug;

use super::{unix_now, ConnId, Server, DEADLINE_CHECK, STATUS_INTERVAL};
use crate::conn::{CloseReason, Kind};
use crate::plural::Count;

impl Server {
    pub(super) fn poll_timeout(&self, now: Instant) -> Duration {
        if self.udp_ready || !self.revisit.is_empty() || !self.accept_again.is_empty() {
            return Duration::ZERO;
        }
        let mut next = self
            .next_sweep
            .min(self.next_status)
            .min(self.next_checkpoint);
        if !self.conns.is_empty() {
            next = next.min(self.next_deadline_check);
        }
        if let Some((every, last)) = self.watchdog {
            next = next.min(last + every);
        }
        if let Some(retry) = self.accept_retry {
            next = next.min(retry);
        }
        if let Some(retry) = self.notifier.retry_at() {
            next = next.min(retry);
        }
        if let Some(retry) = self.udp_output.retry_at() {
            next = next.min(retry);
        }
        next.saturating_duration_since(now)
    }

    /// Runs what is due at `now`: a retried accept, the liveness sweep, the connections'
    /// deadlines, the history checkpoint, the status and the watchdog.
    pub(super) fn timers(&mut self, now: Instant) {
        if self.accept_retry.is_some_and(|at| now >= at) {
            self.accept_retry = None;
            self.accept_soon(Kind::Tcrp);
            self.accept_soon(Kind::Http);
        }
        if now >= self.next_sweep {
            self.sweep_liveness(now);
            self.next_sweep = now + Duration::from_millis(self.config.liveness.sweep_interval_ms);
        }
        if now >= self.next_deadline_check {
            self.next_deadline_check = now + DEADLINE_CHECK;
            self.close_late_connections(now);
        }
        if now >= self.next_checkpoint {
            self.checkpoint();
            self.next_checkpoint = now + Duration::from_secs(self.config.history.checkpoint_secs);
        }
        self.notifier.retry(now);
        if now >= self.next_status {
            self.next_status = now + STATUS_INTERVAL;
            self.periodic_status(now);
        }
        if let Some((every, last)) = self.watchdog {
            if now >= last + every {
                self.notifier.send_periodic("WATCHDOG=1");
                self.watchdog = Some((every, now));
            }
        }
    }

    /// Expires members whose keepalives stopped and closes rooms idle for too long.
    pub(super) fn sweep_liveness(&mut self, now: Instant) {
        let expired = self.registry.poll_expired(now, &mut self.outbox);
        self.metrics.keepalive_expiries += expired as u64;
        let idle = self.registry.close_idle_rooms(now, &mut self.outbox);
        self.metrics.idle_rooms_closed += idle as u64;
    }

    /// Closes the connections past their deadline, each with the reason it ran out of time
    /// (none that waits for the disk or for a password check: those have their own limits).
    pub(super) fn close_late_connections(&mut self, now: Instant) {
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now && !c.has_held() && c.awaiting_password.is_none())
            .map(|(k, _)| ConnId(k))
            .collect();
        for id in late {
            let mut reason = CloseReason::Timeout;
            if let Some(conn) = self.conns.get(id.0) {
                if conn.lingering {
                    // Its last reply was sent: the peer just never closed its side.
                    reason = CloseReason::Protocol;
                } else if conn.paused {
                    // It ran out of time with its replies unread.
                    reason = CloseReason::OutputOverflow;
                    debug!("{}: replies not read in time", conn.peer);
                } else {
                    debug!("{}: no complete request in time", conn.peer);
                }
            }
            self.close(id, reason);
        }
    }

    /// Every [`STATUS_INTERVAL`]: the wall clock read again, the kernel's drop count, and the
    /// `STATUS=` line for systemd.
    pub(super) fn periodic_status(&mut self, now: Instant) {
        // History times are the wall clock read at start plus monotonic time since: read
        // it again, so that a step (NTP's first sync after an early start, a resume from
        // suspend, which the monotonic clock does not count) shows within an interval.
        self.registry.set_wall_clock(now, unix_now());
        self.check_kernel_drops();
        if self.notifier.enabled() {
            let status = self.status_line();
            self.notifier.send_periodic(&status);
        }
    }

    /// The `STATUS=` line `systemctl status` shows: rooms, members, connections, and a
    /// journal that the disk does not take, where an operator looks first.
    pub(super) fn status_line(&mut self) -> String {
        let s = self.registry.stats();
        let failures = self
            .persister
            .as_ref()
            .map_or(0, |p| p.compactions().write_failures);
        let failing = if failures > self.status_write_failures {
            format!(
                "; the journal cannot be written ({} since the last status): creates and joins \
                 wait",
                Count(
                    (failures - self.status_write_failures) as usize,
                    "failed attempt"
                )
            )
        } else {
            String::new()
        };
        self.status_write_failures = failures;
        format!(
            "STATUS={}, {} ({} registered), {}{failing}",
            Count(s.rooms, "room"),
            Count(s.members, "member"),
            s.registered,
            Count(self.conns.len(), "TCP connection")
        )
    }
}
