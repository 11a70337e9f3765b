//! The send list the registry fills and the UDP shell drains.
//!
//! A relayed message is encoded once into [`Outbox::bytes`]; each recipient gets a [`Send`]
//! that points at those bytes, so fan-out to 256 members copies nothing. The shell sends the
//! list after each pass over the socket, batching where it can (see `udp.rs`).

use std::net::SocketAddr;
use std::ops::Range;

/// One datagram to send: where, and which bytes of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    /// Destination.
    pub to: SocketAddr,
    /// The payload's range in [`Outbox::bytes`].
    pub bytes: Range<usize>,
    /// The recipient's member slot in the registry, when it is a member (a dense small
    /// number the sender uses to group a member's messages without hashing addresses).
    pub member: Option<u32>,
    /// The largest batch frame (several messages in one datagram) the recipient accepts, in
    /// bytes; 0 when it accepts none.
    pub batch_limit: u16,
}

/// Encoded payloads and the datagrams that carry them.
#[derive(Debug, Default)]
#[must_use = "an outbox holds datagrams that must be sent"]
pub struct Outbox {
    /// Every payload, back to back.
    pub bytes: Vec<u8>,
    /// Datagrams in the order they were decided.
    pub sends: Vec<Send>,
}

impl Outbox {
    /// Appends a payload written by `encode` and returns its range.
    pub fn payload(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Range<usize> {
        let start = self.bytes.len();
        encode(&mut self.bytes);
        start..self.bytes.len()
    }

    /// Queues `bytes` (a range returned by [`Outbox::payload`]) for `to`, alone in its
    /// datagram.
    pub fn send(&mut self, to: SocketAddr, bytes: Range<usize>) {
        self.sends.push(Send {
            to,
            bytes,
            member: None,
            batch_limit: 0,
        });
    }

    /// Queues `bytes` for the member in registry slot `member`, at `to`; `batch_limit` is the
    /// largest batch frame the member accepts (0: none).
    pub fn send_to_member(
        &mut self,
        to: SocketAddr,
        bytes: Range<usize>,
        member: u32,
        batch_limit: u16,
    ) {
        self.sends.push(Send {
            to,
            bytes,
            member: Some(member),
            batch_limit,
        });
    }

    /// The bytes of one send.
    pub fn bytes_of(&self, send: &Send) -> &[u8] {
        &self.bytes[send.bytes.clone()]
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty()
    }

    /// Forgets everything, keeping the allocations.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.sends.clear();
    }
}
