//! Room in the UDP send buffer, watched only while last words wait for it.
//!
//! The sender holds a member's last words from its room when the kernel has no room for them
//! (`last_words.rs`). They are sent again, before anything newer, with the next pass's
//! datagrams; and, so that they need not wait for traffic that may never come, sooner:
//!
//! - when the socket reports room in its send buffer: while words are held, it is registered
//!   for `WRITABLE` as well as `READABLE`, and for `READABLE` alone again once none are, so
//!   that a socket with room (nearly always) does not wake the loop for nothing;
//! - and every [`RETRY_HELD`] while words are held, whatever the socket says: the kernel
//!   raises no event when buffer memory it lacked (`ENOBUFS`) frees up, nor when a send
//!   failed with the buffer not full at all (a send the kernel refused with `EAGAIN` for
//!   another reason makes the socket neither more nor less writable).
//!
//! A word held for `last_words::MAX_HELD_AGE` (30 s) is let go at the next try instead of
//! sent; once none is left, the socket is watched for `READABLE` alone and the retries stop.

use std::time::{Duration, Instant};

use log::warn;
use mio::Interest;

use super::{Server, UDP_SOCKET};

/// How often held last words are tried again while the socket reports no room. Short enough
/// that a member hears its room close without a noticeable wait once the kernel has room,
/// long enough that a send buffer that stays full costs the loop ten tries a second.
const RETRY_HELD: Duration = Duration::from_millis(100);

/// What the loop watches the UDP socket's output for.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// Whether the socket is registered for `WRITABLE`.
    writable_interest: bool,
    /// Whether it reported room since the last try.
    writable: bool,
    /// When held words are tried again without a report (while some are held).
    retry_at: Option<Instant>,
}

impl Watch {
    /// The socket reported room in its send buffer.
    pub(super) fn writable(&mut self) {
        self.writable = true;
    }

    /// When the loop must wake to try held words again, if it must.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether held words are to be tried at `now`: the socket reported room, or their retry
    /// is due. Clears both: the try is made.
    fn take_due(&mut self, now: Instant) -> bool {
        let due = self.retry_at.is_some_and(|at| now >= at);
        if !std::mem::take(&mut self.writable) && !due {
            return false;
        }
        self.retry_at = None;
        true
    }

    /// After a pass at `now`, with words `holding` or not: schedules a retry exactly while
    /// some are held, and returns what the socket must now be watched for, when that
    /// changed.
    fn update(&mut self, holding: bool, now: Instant) -> Option<Interest> {
        self.retry_at = if holding {
            Some(self.retry_at.unwrap_or(now + RETRY_HELD))
        } else {
            None
        };
        if holding == self.writable_interest {
            return None;
        }
        self.writable_interest = holding;
        if !holding {
            self.writable = false;
        }
        Some(if holding {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        })
    }
}

impl Server {
    /// Sends the last words held for want of room, if the socket reported room or their
    /// retry is due (a pass with datagrams to send sends them first anyway).
    pub(super) fn send_held_last_words(&mut self, now: Instant) {
        if !self.udp_output.take_due(now) {
            return;
        }
        self.sender.send_held(
            &self.udp,
            self.registry.locals_mut(),
            &mut self.metrics,
            now,
        );
    }

    /// Watches the socket for room, and schedules a retry, exactly while the sender holds
    /// last words (none once the last is sent, refused or let go for its age); called at the
    /// end of each pass, after its sends.
    pub(super) fn watch_udp_output(&mut self, now: Instant) {
        let holding = self.sender.holds_last_words();
        let Some(interest) = self.udp_output.update(holding, now) else {
            return;
        };
        // A refusal (no memory for epoll) leaves the retries to the timer, or the socket
        // watched for room a while longer than needed: either way nothing is lost.
        if let Err(e) = self
            .poll
            .registry()
            .reregister(&mut self.udp, UDP_SOCKET, interest)
        {
            warn!("UDP: cannot change what the socket is watched for ({e})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While words are held, the socket is watched for room and a retry is scheduled (not
    /// pushed back by later passes); a try clears both marks; once nothing is held (the last
    /// word sent, or let go for its age), the retries stop and the socket is watched for
    /// reading alone.
    #[test]
    fn retries_are_scheduled_exactly_while_words_are_held() {
        let t0 = Instant::now();
        let mut watch = Watch::default();
        assert_eq!(
            watch.update(false, t0),
            None,
            "nothing held: nothing changes"
        );
        assert_eq!(watch.retry_at(), None);
        assert!(!watch.take_due(t0 + RETRY_HELD));

        assert_eq!(
            watch.update(true, t0),
            Some(Interest::READABLE | Interest::WRITABLE)
        );
        assert_eq!(watch.retry_at(), Some(t0 + RETRY_HELD));
        assert_eq!(watch.update(true, t0 + RETRY_HELD / 2), None);
        assert_eq!(watch.retry_at(), Some(t0 + RETRY_HELD), "not pushed back");
        assert!(!watch.take_due(t0 + RETRY_HELD / 2), "not due yet");
        assert!(watch.take_due(t0 + RETRY_HELD));
        assert_eq!(watch.retry_at(), None);
        watch.writable();
        assert!(watch.take_due(t0 + RETRY_HELD), "room reported");
        assert!(!watch.take_due(t0 + RETRY_HELD), "once");

        // Still held after the try: the next retry is scheduled.
        assert_eq!(watch.update(true, t0 + RETRY_HELD), None);
        assert_eq!(watch.retry_at(), Some(t0 + 2 * RETRY_HELD));
        // The last one went: no more retries.
        watch.writable();
        assert_eq!(
            watch.update(false, t0 + RETRY_HELD),
            Some(Interest::READABLE)
        );
        assert_eq!(watch.retry_at(), None);
        assert!(
            !watch.take_due(t0 + 10 * RETRY_HELD),
            "no stale report of room"
        );
    }

    /// Held words are tried again 100 ms after the pass that left them held, as
    /// docs/OPERATIONS.md says ("or 100 ms later at most"), and not before.
    #[test]
    fn held_words_are_tried_again_100_ms_later() {
        let t0 = Instant::now();
        let mut watch = Watch::default();
        let _ = watch.update(true, t0);
        assert_eq!(watch.retry_at(), Some(t0 + Duration::from_millis(100)));
        assert!(!watch.take_due(t0 + Duration::from_millis(99)));
        assert!(watch.take_due(t0 + Duration::from_millis(100)));
    }
}
