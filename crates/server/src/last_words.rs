//! Last words held for a full send buffer: the datagrams a member would never hear again if
//! they were dropped.
//!
//! When the kernel has no room for a datagram (`EAGAIN`: the send buffer is full; `ENOBUFS`:
//! no buffer memory), the UDP shell drops it and counts it: chat is not worth blocking the
//! loop for, and a member that talks learns of anything it missed from what it hears next.
//! `__ROOM_CLOSED__` as a room closes is another matter: it is sent once, the room and its
//! tokens are deleted, and a member that only listens sends nothing that would bring the
//! tombstone's answer. Dropped, it would leave that member in a dead room for good. So such
//! datagrams ([`Send::last_word`](crate::outbox::Send::last_word)) are copied here, the outbox
//! being reused each pass, and sent again, in order, once the socket has room (see
//! `Sender::send_held` in `udp.rs`).
//!
//! The queue is bounded ([`MAX_HELD`]); past it, a last word is dropped and counted like any
//! other datagram. A datagram refused for itself (an unroutable destination) is let go at
//! once: sending it again would fail again.

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::local::LocalId;
use crate::mmsg::Fate;

/// Last words held at most. A room closing tells each of its registered members, up to
/// `limits.max_members_per_room` (1024 by default), so this holds four full rooms closing
/// while the buffer stays full; more than that at once is a daemon far past its send
/// capacity, where one more drop counted is the honest answer. A held `__ROOM_CLOSED__` takes
/// well under a hundred bytes (its 15, the destination and the queue's own), so the queue
/// stays under half a megabyte.
pub const MAX_HELD: usize = 4096;

/// One datagram held: where, from which of our addresses, and its bytes (a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWord {
    /// Destination.
    pub to: SocketAddr,
    /// Which of our addresses it leaves from.
    pub from: LocalId,
    /// The datagram.
    pub bytes: Box<[u8]>,
}

/// The last words waiting for room in the send buffer, oldest first.
#[derive(Debug, Default)]
pub struct LastWords {
    held: VecDeque<LastWord>,
}

/// What [`LastWords::settle`] did with the words held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Taken by the kernel, and let go.
    pub sent: usize,
    /// Refused on their own, and let go.
    pub refused: usize,
}

impl LastWords {
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// How many datagrams are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Holds a copy of `bytes` for `to`, from `from`, after the others; returns `false`, and
    /// holds nothing, when [`MAX_HELD`] are held already.
    pub fn hold(&mut self, to: SocketAddr, from: LocalId, bytes: &[u8]) -> bool {
        if self.held.len() >= MAX_HELD {
            return false;
        }
        self.held.push_back(LastWord {
            to,
            from,
            bytes: bytes.into(),
        });
        true
    }

    /// The words held, oldest first: the order they are sent in.
    pub fn iter(&self) -> impl Iterator<Item = &LastWord> {
        self.held.iter()
    }

    /// After every held word was handed to the kernel, in [`LastWords::iter`]'s order, with
    /// `fate` saying what became of the one at each index: lets go of those it took or
    /// refused, and keeps the others, in order, for the next try.
    pub fn settle(&mut self, fate: impl Fn(usize) -> Fate) -> Settled {
        let mut settled = Settled::default();
        let mut index = 0;
        self.held.retain(|_| {
            let keep = match fate(index) {
                Fate::Sent => {
                    settled.sent += 1;
                    false
                }
                Fate::Refused => {
                    settled.refused += 1;
                    false
                }
                Fate::NoRoom => true,
            };
            index += 1;
            keep
        });
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn ports(words: &LastWords) -> Vec<u16> {
        words.iter().map(|w| w.to.port()).collect()
    }

    #[test]
    fn held_words_keep_their_bytes_and_order() {
        let mut words = LastWords::default();
        assert!(words.is_empty());
        let mut bytes = b"__ROOM_CLOSED__".to_vec();
        assert!(words.hold(at(1), LocalId::ANY, &bytes));
        // The outbox is reused: what was copied does not change with it.
        bytes.fill(0);
        assert!(words.hold(at(2), LocalId::ANY, b"x"));
        assert_eq!(words.len(), 2);
        assert_eq!(ports(&words), [1, 2]);
        assert_eq!(&*words.iter().next().unwrap().bytes, b"__ROOM_CLOSED__");
    }

    #[test]
    fn past_the_bound_nothing_more_is_held() {
        let mut words = LastWords::default();
        for i in 0..MAX_HELD {
            assert!(words.hold(at(i as u16), LocalId::ANY, b"w"), "{i}");
        }
        assert!(!words.hold(at(9), LocalId::ANY, b"w"));
        assert_eq!(words.len(), MAX_HELD);
        // Room is made as words leave.
        words.settle(|i| if i == 0 { Fate::Sent } else { Fate::NoRoom });
        assert!(words.hold(at(9), LocalId::ANY, b"w"));
    }

    #[test]
    fn settling_lets_go_of_what_left_or_was_refused_and_keeps_the_rest_in_order() {
        let mut words = LastWords::default();
        for port in 1..=5 {
            words.hold(at(port), LocalId::ANY, b"w");
        }
        // 1 left, 2 was refused for itself, 3 found no memory, 4 and 5 a full buffer.
        let fates = [
            Fate::Sent,
            Fate::Refused,
            Fate::NoRoom,
            Fate::NoRoom,
            Fate::NoRoom,
        ];
        let settled = words.settle(|i| fates[i]);
        assert_eq!(
            settled,
            Settled {
                sent: 1,
                refused: 1
            }
        );
        assert_eq!(ports(&words), [3, 4, 5]);
        let settled = words.settle(|_| Fate::Sent);
        assert_eq!(
            settled,
            Settled {
                sent: 3,
                refused: 0
            }
        );
        assert!(words.is_empty());
    }
}
