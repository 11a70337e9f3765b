//! What [`Sender::send_all`] would hand the kernel for an outbox, worked out without a socket:
//! the datagrams the plan makes, byte for byte. Tests and the relay's fuzz target compare
//! plans with it, the planner's against the one of every fan-out sent one by one
//! ([`Outbox::expanded`]).

use std::net::SocketAddr;

use super::Sender;
use crate::local::{LocalId, Locals};
use crate::outbox::Outbox;

/// One datagram as the kernel would be handed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDatagram {
    /// Destination, as the socket takes it (an IPv4 peer of an IPv6 socket IPv4-mapped).
    pub to: SocketAddr,
    /// Which of our addresses it leaves from.
    pub from: LocalId,
    /// Its bytes: for a segmented send, every segment's, one after the other.
    pub bytes: Vec<u8>,
    /// The segment size of a segmented send (`UDP_SEGMENT`); 0 for one datagram.
    pub segment: u16,
    /// Messages it carries.
    pub messages: usize,
    /// Whether nothing more may join it (another datagram to its address came after it).
    pub sealed: bool,
    /// Whether it is a last word, held if the kernel has no room for it.
    pub last_word: bool,
}

/// A plan worked out and not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    /// The datagrams, in the order they would be sent.
    pub datagrams: Vec<PlannedDatagram>,
    /// Batch frames planned.
    pub batches: usize,
    /// Segmented sends planned.
    pub segmented_sends: usize,
}

impl Sender {
    /// Plans `outbox` as [`Sender::send_all`] would, every datagram leaving from the address
    /// its send names, and sends nothing; the outbox is left as it was. The sender's state
    /// carried between passes (the destinations kept from segmented sends, its pools) is
    /// what a send would have left, so a sender compared over several passes should dry-run
    /// each of them.
    pub fn dry_run(&mut self, outbox: &Outbox) -> DryRun {
        self.plan(outbox);
        let parts = self.gather(outbox, &Locals::default(), 0);
        let datagrams = self
            .datagrams
            .iter()
            .zip(&self.plan)
            .map(|(datagram, planned)| PlannedDatagram {
                to: datagram.to,
                from: planned.from,
                bytes: parts[datagram.runs.clone()]
                    .iter()
                    .flat_map(|run| run.iter().copied())
                    .collect(),
                segment: datagram.segment,
                messages: planned.messages,
                sealed: planned.sealed,
                last_word: planned.last_word,
            })
            .collect();
        DryRun {
            datagrams,
            batches: self.used_batches,
            segmented_sends: self.used_groups,
        }
    }
}
