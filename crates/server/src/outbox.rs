//! The send list the registry fills and the UDP shell drains.
//!
//! A relayed message is encoded once into the outbox's bytes; each recipient gets a [`QueuedSend`]
//! that points at those bytes, so fan-out to 256 members copies nothing. Each payload lies
//! behind its batch entry prefix (its length), so that a batch frame for a member is the batch
//! header followed by runs of these bytes, handed to the kernel where they lie: packing
//! messages into batches copies nothing either. The shell sends the list after each pass over
//! the socket, batching where it can (see `udp`).

use std::net::SocketAddr;
use std::ops::Range;

use ucrp::delivery;

use crate::local::LocalId;

/// One datagram to send: where, and which bytes of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedSend {
    /// Destination.
    pub to: SocketAddr,
    /// Which of our addresses it leaves from ([`LocalId::ANY`]: the kernel's choice).
    pub from: LocalId,
    /// The payload's range in the outbox's bytes ([`Outbox::payload`] returned it).
    pub bytes: Range<usize>,
    /// The recipient's member slot in the registry, when it is a member (a dense small
    /// number the sender uses to group a member's messages without hashing addresses).
    pub member: Option<u32>,
    /// The largest batch frame (several messages in one datagram) the recipient accepts, in
    /// bytes; 0 when it accepts none.
    pub batch_limit: u16,
    /// Whether it is the recipient's last word from its room (`__ROOM_CLOSED__` as the room
    /// closes): nothing it sends later would bring it again, so a full send buffer holds it
    /// for later rather than dropping it (see `last_words.rs`). It always leaves alone, as a
    /// plain datagram.
    pub last_word: bool,
}

/// Encoded payloads and the datagrams that carry them.
#[derive(Debug, Default)]
#[must_use = "an outbox holds datagrams that must be sent"]
pub struct Outbox {
    /// Every payload, back to back, each behind its batch entry prefix.
    bytes: Vec<u8>,
    /// Datagrams in the order they were decided.
    pub sends: Vec<QueuedSend>,
}

/// Bytes in front of each payload: its length as a batch entry prefix.
const PREFIX_LEN: usize = delivery::BATCH_ENTRY_OVERHEAD;

impl Outbox {
    /// Appends a payload written by `encode` and returns its range.
    pub fn payload(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Range<usize> {
        let prefix_at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; PREFIX_LEN]);
        let start = self.bytes.len();
        encode(&mut self.bytes);
        let end = self.bytes.len();
        // A payload too long for a prefix keeps zeros there: it is never a batch entry
        // ([`Outbox::entry_of`]).
        if let Some(prefix) = delivery::batch_entry_prefix(end - start) {
            self.bytes[prefix_at..start].copy_from_slice(&prefix);
        }
        start..end
    }

    /// The bytes at `range`, a range [`Outbox::payload`] returned (or a part of one). Any
    /// other range is a bug: it fails debug builds, and gives no bytes in release ones.
    pub fn get(&self, range: Range<usize>) -> &[u8] {
        let bytes = self.bytes.get(range.clone());
        debug_assert!(bytes.is_some(), "{range:?} is outside the outbox");
        bytes.unwrap_or_default()
    }

    /// Where the batch entry of one send lies: its payload with the length prefix in front.
    /// `None` when the payload is too long to be a batch entry.
    pub fn entry_of(&self, send: &QueuedSend) -> Option<Range<usize>> {
        let Range { start, end } = send.bytes;
        delivery::batch_entry_prefix(end.checked_sub(start)?)?;
        Some(start.checked_sub(PREFIX_LEN)?..end)
    }

    /// Queues `bytes` (a range returned by [`Outbox::payload`]) for `to`, from our address
    /// `from`, alone in its datagram.
    pub fn queue(&mut self, to: SocketAddr, from: LocalId, bytes: Range<usize>) {
        self.sends.push(QueuedSend {
            to,
            from,
            bytes,
            member: None,
            batch_limit: 0,
            last_word: false,
        });
    }

    /// Queues `bytes` for the member in registry slot `member`, at `to`, from our address
    /// `from`; `batch_limit` is the largest batch frame the member accepts (0: none).
    pub fn queue_to_member(
        &mut self,
        to: SocketAddr,
        from: LocalId,
        bytes: Range<usize>,
        member: u32,
        batch_limit: u16,
    ) {
        self.sends.push(QueuedSend {
            to,
            from,
            bytes,
            member: Some(member),
            batch_limit,
            last_word: false,
        });
    }

    /// Queues `bytes` for the member in registry slot `member`, at `to`, from our address
    /// `from`, as its last word from its room ([`QueuedSend::last_word`]): alone in its datagram,
    /// and held, not dropped, when the send buffer is full.
    pub fn queue_last_word(
        &mut self,
        to: SocketAddr,
        from: LocalId,
        bytes: Range<usize>,
        member: u32,
    ) {
        self.sends.push(QueuedSend {
            to,
            from,
            bytes,
            member: Some(member),
            batch_limit: 0,
            last_word: true,
        });
    }

    /// The bytes of one send.
    pub fn bytes_of(&self, send: &QueuedSend) -> &[u8] {
        self.get(send.bytes.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn to() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn each_payload_lies_behind_its_batch_entry_prefix() {
        let mut out = Outbox::default();
        let a = out.payload(|b| b.extend_from_slice(b"\x01aone"));
        let long = out.payload(|b| b.resize(b.len() + 300, b'x'));
        let empty = out.payload(|_| {});
        for (range, member) in [(a.clone(), Some(0)), (long.clone(), None), (empty, Some(1))] {
            match member {
                Some(m) => out.queue_to_member(to(), LocalId::ANY, range, m, 4096),
                None => out.queue(to(), LocalId::ANY, range),
            }
        }
        assert_eq!(out.bytes_of(&out.sends[0]), b"\x01aone");
        let entries: Vec<&[u8]> = out
            .sends
            .iter()
            .map(|s| out.get(out.entry_of(s).unwrap()))
            .collect();
        assert_eq!(entries[0], b"\x00\x05\x01aone");
        assert_eq!(&entries[1][..2], &[0x01, 0x2c]);
        assert_eq!(&entries[1][2..], out.get(long));
        assert_eq!(entries[2], b"\x00\x00");
        // Two entries laid back to back form a batch body as push_batch_entry builds it.
        let mut built = Vec::new();
        delivery::begin_batch(&mut built);
        delivery::push_batch_entry(out.get(a), &mut built).unwrap();
        delivery::push_batch_entry(out.bytes_of(&out.sends[1]), &mut built).unwrap();
        let mut laid = delivery::BATCH_HEADER.to_vec();
        laid.extend_from_slice(
            out.get(out.entry_of(&out.sends[0]).unwrap().start..out.sends[1].bytes.end),
        );
        assert_eq!(laid, built);
    }

    #[test]
    fn an_outbox_is_empty_until_a_datagram_is_queued() {
        let mut out = Outbox::default();
        assert!(out.is_empty());
        let payload = out.payload(|b| b.push(1));
        assert!(out.is_empty(), "a payload alone is no datagram");
        out.queue_to_member(to(), LocalId::ANY, payload.clone(), 0, 0);
        assert!(!out.is_empty());
        out.clear();
        assert!(out.is_empty());
        let payload = out.payload(|b| b.push(1));
        out.queue(to(), LocalId::ANY, payload);
        assert!(!out.is_empty());
    }

    #[test]
    fn a_payload_too_long_for_a_prefix_is_no_batch_entry() {
        let mut out = Outbox::default();
        let huge = out.payload(|b| b.resize(b.len() + 65_536, 0));
        let fits = out.payload(|b| b.resize(b.len() + 65_535, 0));
        out.queue_to_member(to(), LocalId::ANY, huge, 0, u16::MAX);
        out.queue_to_member(to(), LocalId::ANY, fits.clone(), 0, u16::MAX);
        assert_eq!(out.entry_of(&out.sends[0]), None);
        assert_eq!(out.entry_of(&out.sends[1]), Some(fits.start - 2..fits.end));
        assert_eq!(out.bytes_of(&out.sends[0]).len(), 65_536);
        out.clear();
        assert!(out.is_empty());
        // Cleared: the next payload starts over, behind its prefix.
        assert_eq!(out.payload(|b| b.push(7)), 2..3);
    }
}
