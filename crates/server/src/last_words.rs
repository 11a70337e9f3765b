//! Last words held for a full send buffer: the datagrams a member would never hear again if
//! they were dropped.
//!
//! When the kernel has no room for a datagram (`EAGAIN`: the send buffer is full; `ENOBUFS`:
//! no buffer memory), the UDP shell drops it and counts it: chat is not worth blocking the
//! loop for, and a member that talks learns of anything it missed from what it hears next.
//! `__ROOM_CLOSED__` as a room closes is another matter: it is sent once, the room and its
//! tokens are deleted, and a member that only listens sends nothing that would bring the
//! tombstone's answer. Dropped, it would leave that member in a dead room for good. So such
//! datagrams ([`QueuedSend::last_word`](crate::outbox::QueuedSend::last_word)) are copied here, the outbox
//! being reused each pass, and sent again, in order, once the socket has room (see
//! `Sender::send_held` in `udp`).
//!
//! The queue is bounded in number ([`MAX_HELD`]); past it, a last word is dropped and counted
//! like any other datagram. It is bounded in time too ([`MAX_HELD_AGE`]): a close that
//! arrives long after its room closed is worse than none, as the address may be another
//! client's by then, so a word the kernel kept refusing that long is let go
//! ([`LastWords::expire`]) and counted. A datagram refused for itself (an unroutable
//! destination) is let go at once: sending it again would fail again.
//!
//! Nothing here reads the clock: the time is passed in (`now`), so tests age words without
//! waiting.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::local::LocalId;
use crate::mmsg::Fate;

/// Last words held at most. A room closing tells each of its registered members, up to
/// `limits.max_members_per_room` (1024 by default), so this holds four full rooms closing
/// while the buffer stays full; more than that at once is a daemon far past its send
/// capacity, where one more drop counted is the honest answer. A held `__ROOM_CLOSED__` takes
/// well under a hundred bytes (its 15, the destination and the queue's own), so the queue
/// stays under half a megabyte.
pub const MAX_HELD: usize = 4096;

/// How long a last word is held at most; it is let go at the first try after that (one every
/// 100 ms while words are held). A member that sends keepalives has another way to hear of
/// the close: its next `__REGISTER__` carries a dead token, which the tombstone answers with
/// `__ROOM_CLOSED__` at the address it comes from (`ocm` sends one every 10 s by default).
/// But while the word is held, that answer to the same address is dropped, like anything
/// newer to it (`Sender::hold_back_behind_last_words` in `udp`): holding the word longer
/// delays that member's notice too, and once it is let go, the answer to the member's next
/// `__REGISTER__` is sent. (One that moved to another address gets the answer there at
/// once.) One that only listens has nothing else, but the longer the close waits, the
/// likelier its address is no longer that member's: many NATs forget a UDP mapping the
/// client has not sent through for 30 to 60 s (RFC 4787 asks for 2 minutes; many give less)
/// and hand its port to the next client, which would read the close as its own room's. And
/// the daemon itself takes a member that promised keepalives and stayed silent for 30 s to
/// be gone (three missed keepalives of `ocm`'s 10 s). So 30 s: three keepalive intervals for
/// members that send them, the shortest common NAT lifetime for those that do not. The hour
/// a tombstone lives is no bound here: its answer goes to the address a dead token comes
/// from now, never to an old one. A constant: what it weighs is the clients' and the
/// networks' timing, not the operator's.
pub const MAX_HELD_AGE: Duration = Duration::from_secs(30);

/// How often words let go for their age are logged, at most: a kernel that stays short of
/// memory may see some go at every try (ten a second), and a line a minute, counting those
/// since the last one, says as much; the metric counts each.
pub const EXPIRED_LOG_EVERY: Duration = Duration::from_secs(60);

/// One datagram held: where, from which of our addresses, its bytes (a copy), and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWord {
    /// Destination.
    pub to: SocketAddr,
    /// Which of our addresses it leaves from.
    pub from: LocalId,
    /// The datagram.
    pub bytes: Box<[u8]>,
    /// When it was first held.
    pub since: Instant,
}

/// The last words waiting for room in the send buffer, oldest first.
#[derive(Debug, Default)]
pub struct LastWords {
    held: VecDeque<LastWord>,
}

/// Words [`LastWords::expire`] let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// How many.
    pub count: usize,
    /// The destination of the last one let go (the newest of them), for the log.
    pub last_to: SocketAddr,
}

/// Paces the log lines about words let go for their age ([`EXPIRED_LOG_EVERY`]).
#[derive(Debug, Default)]
pub struct ExpiryLog {
    /// Words let go since the last line.
    unlogged: usize,
    /// When the last line was logged.
    logged_at: Option<Instant>,
}

impl ExpiryLog {
    /// Notes that `count` words were let go at `now`; returns, when a line is due, how many
    /// it reports: these and those since the last line.
    pub fn note(&mut self, count: usize, now: Instant) -> Option<usize> {
        self.unlogged += count;
        if self
            .logged_at
            .is_some_and(|at| now.saturating_duration_since(at) < EXPIRED_LOG_EVERY)
        {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
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

    /// Holds a copy of `bytes` for `to`, from `from`, after the others, as of `now`; returns
    /// `false`, and holds nothing, when [`MAX_HELD`] are held already.
    pub fn hold(&mut self, to: SocketAddr, from: LocalId, bytes: &[u8], now: Instant) -> bool {
        if self.held.len() >= MAX_HELD {
            return false;
        }
        self.held.push_back(LastWord {
            to,
            from,
            bytes: bytes.into(),
            since: now,
        });
        true
    }

    /// Lets go of the words held for [`MAX_HELD_AGE`] or longer at `now`; says how many, if
    /// any. They are held in the order they came, so these are the first ones: those after
    /// them stay, in order (a newer word to the same address still may not be overtaken,
    /// and an older one let go can overtake nothing).
    pub fn expire(&mut self, now: Instant) -> Option<Expired> {
        let mut expired: Option<Expired> = None;
        while let Some(word) = self.held.front() {
            if now.saturating_duration_since(word.since) < MAX_HELD_AGE {
                break;
            }
            let last_to = word.to;
            self.held.pop_front();
            let count = expired.map_or(0, |e| e.count) + 1;
            expired = Some(Expired { count, last_to });
        }
        expired
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

    /// A time to hold words at (the tests that age them pass their own).
    fn now() -> Instant {
        Instant::now()
    }

    fn ports(words: &LastWords) -> Vec<u16> {
        words.iter().map(|w| w.to.port()).collect()
    }

    #[test]
    fn held_words_keep_their_bytes_and_order() {
        let mut words = LastWords::default();
        assert!(words.is_empty());
        let mut bytes = b"__ROOM_CLOSED__".to_vec();
        assert!(words.hold(at(1), LocalId::ANY, &bytes, now()));
        // The outbox is reused: what was copied does not change with it.
        bytes.fill(0);
        assert!(words.hold(at(2), LocalId::ANY, b"x", now()));
        assert_eq!(words.len(), 2);
        assert_eq!(ports(&words), [1, 2]);
        assert_eq!(&*words.iter().next().unwrap().bytes, b"__ROOM_CLOSED__");
    }

    #[test]
    fn past_the_bound_nothing_more_is_held() {
        let mut words = LastWords::default();
        for i in 0..MAX_HELD {
            assert!(words.hold(at(i as u16), LocalId::ANY, b"w", now()), "{i}");
        }
        assert!(!words.hold(at(9), LocalId::ANY, b"w", now()));
        assert_eq!(words.len(), MAX_HELD);
        // Room is made as words leave.
        words.settle(|i| if i == 0 { Fate::Sent } else { Fate::NoRoom });
        assert!(words.hold(at(9), LocalId::ANY, b"w", now()));
    }

    #[test]
    fn settling_lets_go_of_what_left_or_was_refused_and_keeps_the_rest_in_order() {
        let mut words = LastWords::default();
        for port in 1..=5 {
            words.hold(at(port), LocalId::ANY, b"w", now());
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

    /// Words held for the age limit are let go, oldest first, at the first look at or after
    /// it; younger ones stay, in order, even to the same address.
    #[test]
    fn words_held_for_the_age_limit_are_let_go_oldest_first() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut words = LastWords::default();
        assert_eq!(words.expire(t0 + MAX_HELD_AGE), None, "nothing held");
        words.hold(at(1), LocalId::ANY, b"a", t0);
        words.hold(at(2), LocalId::ANY, b"b", t0 + second);
        words.hold(at(1), LocalId::ANY, b"c", t0 + 10 * second);
        let just_before = t0 + MAX_HELD_AGE - Duration::from_millis(1);
        assert_eq!(words.expire(just_before), None);
        assert_eq!(words.len(), 3);
        assert_eq!(
            words.expire(t0 + MAX_HELD_AGE + second),
            Some(Expired {
                count: 2,
                last_to: at(2)
            })
        );
        assert_eq!(ports(&words), [1]);
        assert_eq!(&*words.iter().next().unwrap().bytes, b"c");
        // A time before the words were held (not expected) lets none go.
        assert_eq!(words.expire(t0), None);
        assert_eq!(
            words.expire(t0 + 10 * second + MAX_HELD_AGE),
            Some(Expired {
                count: 1,
                last_to: at(1)
            })
        );
        assert!(words.is_empty());
    }

    /// A word that waited for room keeps the time it was first held: settling it as not sent
    /// does not make it younger.
    #[test]
    fn a_word_kept_by_settling_keeps_its_age() {
        let t0 = Instant::now();
        let mut words = LastWords::default();
        words.hold(at(1), LocalId::ANY, b"a", t0);
        words.hold(at(2), LocalId::ANY, b"b", t0);
        words.settle(|i| if i == 0 { Fate::Sent } else { Fate::NoRoom });
        assert_eq!(words.iter().next().map(|w| w.since), Some(t0));
        assert_eq!(words.expire(t0 + MAX_HELD_AGE).map(|e| e.count), Some(1));
    }

    /// Words let go are logged at once the first time, then at most once an
    /// [`EXPIRED_LOG_EVERY`], each line counting those since the last one.
    #[test]
    fn words_let_go_are_logged_once_a_while_with_the_count_since_the_last_line() {
        let t0 = Instant::now();
        let mut log = ExpiryLog::default();
        assert_eq!(log.note(3, t0), Some(3));
        assert_eq!(log.note(2, t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(4, t0 + EXPIRED_LOG_EVERY / 2), None);
        assert_eq!(log.note(1, t0 + EXPIRED_LOG_EVERY), Some(7));
        assert_eq!(log.note(1, t0 + EXPIRED_LOG_EVERY), None);
        assert_eq!(log.note(5, t0 + 3 * EXPIRED_LOG_EVERY), Some(6));
    }
}
