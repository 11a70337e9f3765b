//! Destinations kept from segmented sends for a while: those whose segmented send the kernel
//! refused but whose datagrams it took one at a time (a path MTU it learned, likeliest).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a destination whose segmented send the kernel refused, but whose datagrams it took
/// one at a time, gets one datagram per send: the kernel's default lifetime of a path MTU it
/// learned (`net.ipv4.route.mtu_expires`), the likeliest cause.
pub const UNSEGMENTED_FOR: Duration = Duration::from_secs(600);

/// Most destinations remembered so; past it, the memory starts over.
pub(super) const MAX_UNSEGMENTED: usize = 4096;

/// Destinations (IP addresses: a path MTU is the route's) whose segmented send the kernel
/// refused but whose datagrams it took one at a time: each gets one datagram per send for
/// [`UNSEGMENTED_FOR`].
#[derive(Default)]
pub(super) struct Unsegmented {
    pub(super) until: HashMap<IpAddr, Instant>,
    /// The earliest time in `until`: from then on, a pass drops what is over.
    pub(super) prune_at: Option<Instant>,
    /// Whether a refusal was logged at level warn (later ones go to debug).
    pub(super) logged: bool,
}

impl Unsegmented {
    /// The time to check destinations against in this pass; `None`, without reading the
    /// clock, when none is kept.
    pub(super) fn now(&mut self) -> Option<Instant> {
        if self.until.is_empty() {
            return None;
        }
        let now = Instant::now();
        if self.prune_at.is_some_and(|at| at <= now) {
            self.until.retain(|_, until| *until > now);
            self.prune_at = self.until.values().min().copied();
        }
        Some(now)
    }

    /// Whether `ip` is kept from segmented sends at `now` (from [`Unsegmented::now`]).
    pub(super) fn keeps(&self, ip: &IpAddr, now: Option<Instant>) -> bool {
        now.is_some_and(|now| self.until.get(ip).is_some_and(|until| now < *until))
    }

    /// Keeps `ip` from segmented sends from `now` on; returns whether it was not kept yet.
    pub(super) fn keep(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.until.len() >= MAX_UNSEGMENTED {
            self.until.retain(|_, until| *until > now);
            if self.until.len() >= MAX_UNSEGMENTED {
                self.until.clear();
            }
        }
        let until = now + UNSEGMENTED_FOR;
        self.prune_at = Some(self.prune_at.map_or(until, |at| at.min(until)));
        self.until
            .insert(ip, until)
            .is_none_or(|before| before <= now)
    }
}
