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
}

impl Server {
    /// Sends the last words held for want of room, if the socket reported room or their
    /// retry is due (a pass with datagrams to send sends them first anyway).
    pub(super) fn send_held_last_words(&mut self, now: Instant) {
        let watch = &mut self.udp_output;
        let due = watch.retry_at.is_some_and(|at| now >= at);
        if !std::mem::take(&mut watch.writable) && !due {
            return;
        }
        watch.retry_at = None;
        self.sender
            .send_held(&self.udp, self.registry.locals_mut(), &mut self.metrics);
    }

    /// Watches the socket for room, and schedules a retry, exactly while the sender holds
    /// last words; called at the end of each pass, after its sends.
    pub(super) fn watch_udp_output(&mut self, now: Instant) {
        let holding = self.sender.holds_last_words();
        let watch = &mut self.udp_output;
        watch.retry_at = if holding {
            Some(watch.retry_at.unwrap_or(now + RETRY_HELD))
        } else {
            None
        };
        if holding == watch.writable_interest {
            return;
        }
        watch.writable_interest = holding;
        if !holding {
            watch.writable = false;
        }
        let interest = if holding {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
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
