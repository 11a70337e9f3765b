//! The send list the registry fills and the UDP shell drains.
//!
//! A relayed message is encoded once into the outbox's bytes, and queued once for its whole
//! room: a [`Fanout`] names the message's bytes and an audience, the room's registered
//! members as the relay found them, which the next messages to the room name again (whatever
//! other rooms' come between) while the registry's members stay as they were. Anything else
//! (a notice, a reply, a last word) is a [`QueuedSend`] to one destination that points at its
//! bytes. Either way, fan-out to 256
//! members copies nothing. Each payload lies behind its batch entry prefix (its length), so
//! that a batch frame for a member is the batch header followed by runs of these bytes, handed
//! to the kernel where they lie: packing messages into batches copies nothing either. The
//! shell sends the list after each pass over the socket, batching where it can (see `udp`).

use std::collections::HashMap;
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

/// One registered member of an audience: where it is sent to and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipient {
    /// Its address.
    pub to: SocketAddr,
    /// Which of our addresses it hears from.
    pub from: LocalId,
    /// Its member slot in the registry.
    pub member: u32,
    /// The largest batch frame it accepts, in bytes; 0 when it accepts none.
    pub batch_limit: u16,
    /// Whether it gets sequenced frames (`Caps::SEQ`) rather than plain ones.
    pub sequenced: bool,
}

/// A room's registered members as a relay found them, in join order: the recipients of each
/// [`Fanout`] that names it (but the message's sender).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Audience {
    /// What the registry keyed it with: while a relay in the same room finds the same key,
    /// nothing in the room changed since, and this audience is still its room's.
    key: AudienceKey,
    /// Its recipients in [`Outbox::recipients`].
    recipients: Range<usize>,
    /// How many of them take sequenced frames.
    sequenced: usize,
    /// Whether a fan-out names it.
    named: bool,
}

/// The recipients of a message to an audience, but its sender: how many take each kind of
/// frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takers {
    /// Those that take plain frames.
    pub plain: usize,
    /// Those that take sequenced frames.
    pub sequenced: usize,
}

/// The registry's name for a room's audience as of one state of its members: the room's
/// index, and a count the registry bumps whenever any member joins, leaves, registers or
/// moves to another of our addresses.
pub type AudienceKey = (usize, u64);

/// One message for every member of an audience but its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fanout {
    /// The audience's index in the outbox.
    audience: usize,
    /// The sender's member slot: it is not sent its own message.
    except: u32,
    /// The plain frame, for recipients without `sequenced` (`None` when it was not encoded,
    /// nobody but the sender taking it).
    plain: Option<Range<usize>>,
    /// The sequenced frame, for recipients with `sequenced` (`None` when not encoded).
    sequenced: Option<Range<usize>>,
}

impl Fanout {
    /// The index of its audience in the outbox.
    pub fn audience(&self) -> usize {
        self.audience
    }

    /// Its sender's member slot: the one recipient of the audience it is not for.
    pub fn except(&self) -> u32 {
        self.except
    }

    /// The datagram of it to `recipient`; `None` when its kind of frame was not encoded (it
    /// is the sender, or the registry counted the takers wrong: nothing is sent rather than an
    /// empty datagram).
    pub fn send_to(&self, recipient: &Recipient) -> Option<QueuedSend> {
        Some(QueuedSend {
            to: recipient.to,
            from: recipient.from,
            bytes: self.bytes_for(recipient)?.clone(),
            member: Some(recipient.member),
            batch_limit: recipient.batch_limit,
            last_word: false,
        })
    }

    /// The frame `recipient` gets: its payload's range in the outbox's bytes.
    pub fn bytes_for(&self, recipient: &Recipient) -> Option<&Range<usize>> {
        if recipient.sequenced {
            self.sequenced.as_ref()
        } else {
            self.plain.as_ref()
        }
    }
}

/// An entry of the send list, in the order decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    /// One datagram.
    One(QueuedSend),
    /// One message to a room.
    Fanout(Fanout),
}

/// Encoded payloads and the datagrams that carry them.
#[derive(Debug, Default)]
#[must_use = "an outbox holds datagrams that must be sent"]
pub struct Outbox {
    /// Every payload, back to back, each behind its batch entry prefix.
    bytes: Vec<u8>,
    /// Sends and fan-outs in the order they were decided.
    queued: Vec<Queued>,
    /// The recipients of every audience, each audience's back to back.
    recipients: Vec<Recipient>,
    /// The audiences the fan-outs name.
    audiences: Vec<Audience>,
    /// Each audience's index by its key: a pass whose messages go to several rooms in turn
    /// finds each room's again. Hashed once per relayed message, not per recipient.
    by_key: HashMap<AudienceKey, usize>,
    /// Datagrams queued (before any batching): one per send, one per recipient of a fan-out.
    datagrams: usize,
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
        self.entry_at(&send.bytes)
    }

    /// Where the batch entry of the payload at `bytes` (a range [`Outbox::payload`] returned)
    /// lies; `None` when the payload is too long to be a batch entry.
    pub fn entry_at(&self, bytes: &Range<usize>) -> Option<Range<usize>> {
        let Range { start, end } = *bytes;
        delivery::batch_entry_prefix(end.checked_sub(start)?)?;
        Some(start.checked_sub(PREFIX_LEN)?..end)
    }

    /// Queues `send`.
    fn push(&mut self, send: QueuedSend) {
        self.datagrams += 1;
        self.queued.push(Queued::One(send));
    }

    /// Queues `bytes` (a range returned by [`Outbox::payload`]) for `to`, from our address
    /// `from`, alone in its datagram.
    pub fn queue(&mut self, to: SocketAddr, from: LocalId, bytes: Range<usize>) {
        self.push(QueuedSend {
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
        self.push(QueuedSend {
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
        self.push(QueuedSend {
            to,
            from,
            bytes,
            member: Some(member),
            batch_limit: 0,
            last_word: true,
        });
    }

    /// The audience the registry keyed `key`, if this outbox holds one: the room's members
    /// are as it found them then, so a message to the room may name it again.
    pub fn audience(&self, key: AudienceKey) -> Option<usize> {
        // Most often the last added (a run of messages to one room), found without hashing.
        let last = self.audiences.len().checked_sub(1);
        match last {
            Some(last) if self.audiences[last].key == key => Some(last),
            _ => self.by_key.get(&key).copied(),
        }
    }

    /// Adds an audience of `recipients`, keyed `key` ([`Outbox::audience`]); returns its index.
    pub fn add_audience(
        &mut self,
        key: AudienceKey,
        recipients: impl IntoIterator<Item = Recipient>,
    ) -> usize {
        let start = self.recipients.len();
        self.recipients.extend(recipients);
        let added = &self.recipients[start..];
        // The plan works out a member's frames by its slot (`udp::plan`).
        debug_assert!(
            {
                let mut slots: Vec<u32> = added.iter().map(|r| r.member).collect();
                slots.sort_unstable();
                slots.windows(2).all(|pair| pair[0] != pair[1])
            },
            "a member twice in one audience"
        );
        let sequenced = added.iter().filter(|r| r.sequenced).count();
        let index = self.audiences.len();
        debug_assert!(
            !self.by_key.contains_key(&key),
            "two audiences keyed {key:?}"
        );
        self.audiences.push(Audience {
            key,
            recipients: start..self.recipients.len(),
            sequenced,
            named: false,
        });
        self.by_key.insert(key, index);
        index
    }

    /// Who of `audience` takes a message but its sender: `sender_sequenced` says whether the
    /// sender takes sequenced frames when it is one of the audience (a registered member), and
    /// is `None` when it is not.
    pub fn takers(&self, audience: usize, sender_sequenced: Option<bool>) -> Takers {
        let Some(a) = self.audiences.get(audience) else {
            return Takers {
                plain: 0,
                sequenced: 0,
            };
        };
        Takers {
            plain: (a.recipients.len() - a.sequenced)
                .saturating_sub(usize::from(sender_sequenced == Some(false))),
            sequenced: a
                .sequenced
                .saturating_sub(usize::from(sender_sequenced == Some(true))),
        }
    }

    /// The recipients of audience `audience` (an index [`Outbox::add_audience`] returned).
    pub fn recipients(&self, audience: usize) -> &[Recipient] {
        let range = self.audiences.get(audience).map(|a| a.recipients.clone());
        debug_assert!(range.is_some(), "no audience {audience}");
        self.recipients
            .get(range.unwrap_or_default())
            .unwrap_or_default()
    }

    /// Queues a message for every recipient of `audience` but the member in slot `except`,
    /// its sender: `plain` for those without sequenced frames, `sequenced` for the others
    /// (`None` when nobody takes it); `takers` counts them
    /// ([`Outbox::takers`]). Returns the deliveries queued. An audience nobody takes a message
    /// from (its sender alone) is forgotten, unless a fan-out names it already: an outbox that
    /// queues no datagram is not sent, nor cleared.
    pub fn queue_fanout(
        &mut self,
        audience: usize,
        except: u32,
        (plain, sequenced): (Option<Range<usize>>, Option<Range<usize>>),
        takers: Takers,
    ) -> usize {
        let deliveries = takers.plain + takers.sequenced;
        if deliveries == 0 {
            let last = self.audiences.len().checked_sub(1) == Some(audience);
            if last && !self.audiences[audience].named {
                if let Some(unnamed) = self.audiences.pop() {
                    self.recipients.truncate(unnamed.recipients.start);
                    self.by_key.remove(&unnamed.key);
                }
            }
            return 0;
        }
        debug_assert_eq!(
            deliveries,
            self.recipients(audience)
                .iter()
                .filter(|r| r.member != except)
                .count(),
            "takers of audience {audience} but {except}"
        );
        if let Some(a) = self.audiences.get_mut(audience) {
            a.named = true;
        }
        self.datagrams += deliveries;
        self.queued.push(Queued::Fanout(Fanout {
            audience,
            except,
            plain,
            sequenced,
        }));
        deliveries
    }

    /// Recipients kept in audiences, for tests.
    #[cfg(test)]
    pub fn recipients_kept(&self) -> usize {
        self.recipients.len()
    }

    /// Sends and fan-outs, in the order they were decided.
    pub fn queued(&self) -> &[Queued] {
        &self.queued
    }

    /// The datagrams of one fan-out, one per recipient, in its audience's order.
    pub fn sends_of<'a>(&'a self, fanout: &'a Fanout) -> impl Iterator<Item = QueuedSend> + 'a {
        self.recipients(fanout.audience)
            .iter()
            .filter(|r| r.member != fanout.except)
            .filter_map(|r| fanout.send_to(r))
    }

    /// Every datagram queued, one per send and one per recipient of a fan-out, in order.
    pub fn sends(&self) -> impl Iterator<Item = QueuedSend> + '_ {
        self.queued.iter().flat_map(|queued| {
            let (one, fanout) = match queued {
                Queued::One(send) => (Some(send.clone()), None),
                Queued::Fanout(fanout) => (None, Some(self.sends_of(fanout))),
            };
            one.into_iter().chain(fanout.into_iter().flatten())
        })
    }

    /// Datagrams queued, counted before batching: one per send, one per recipient of a
    /// fan-out.
    pub fn datagrams(&self) -> usize {
        self.datagrams
    }

    /// The bytes of one send.
    pub fn bytes_of(&self, send: &QueuedSend) -> &[u8] {
        self.get(send.bytes.clone())
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Forgets everything, keeping the allocations.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.queued.clear();
        self.recipients.clear();
        self.audiences.clear();
        self.by_key.clear();
        self.datagrams = 0;
    }

    /// A copy of this outbox, its bytes where they are, with each fan-out replaced by its
    /// datagrams, one send apiece: what the fan-outs stand for. The plan of a fan-out must be
    /// this copy's, entry for entry; tests and the relay's fuzz target check it
    /// ([`Sender::dry_run`](crate::udp::Sender::dry_run)).
    pub fn expanded(&self) -> Outbox {
        let mut copy = Outbox {
            bytes: self.bytes.clone(),
            ..Outbox::default()
        };
        for send in self.sends() {
            copy.push(send);
        }
        copy
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
        let sends: Vec<QueuedSend> = out.sends().collect();
        assert_eq!(out.bytes_of(&sends[0]), b"\x01aone");
        let entries: Vec<&[u8]> = sends
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
        delivery::push_batch_entry(out.bytes_of(&sends[1]), &mut built).unwrap();
        let mut laid = delivery::BATCH_HEADER.to_vec();
        laid.extend_from_slice(out.get(out.entry_of(&sends[0]).unwrap().start..sends[1].bytes.end));
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

    fn recipient(port: u16, member: u32, sequenced: bool) -> Recipient {
        Recipient {
            to: SocketAddr::from(([127, 0, 0, 1], port)),
            from: LocalId::ANY,
            member,
            batch_limit: 4096,
            sequenced,
        }
    }

    /// A fan-out stands for one send to each recipient of its audience but its sender, each
    /// with the frame of its kind, in the audience's order, between the sends queued before
    /// and after it; it counts as those datagrams.
    #[test]
    fn a_fanout_is_a_send_to_each_recipient_but_its_sender() {
        let mut out = Outbox::default();
        let notice = out.payload(|b| b.push(9));
        out.queue_to_member(to(), LocalId::ANY, notice.clone(), 7, 0);
        let key = (3, 1);
        let audience = out.add_audience(
            key,
            [
                recipient(1, 10, false),
                recipient(2, 11, true),
                recipient(3, 12, false),
            ],
        );
        let plain = out.payload(|b| b.push(1));
        let sequenced = out.payload(|b| b.push(2));
        let frames = (Some(plain.clone()), Some(sequenced.clone()));
        let takers = out.takers(audience, Some(true));
        assert_eq!(
            takers,
            Takers {
                plain: 2,
                sequenced: 0
            }
        );
        assert_eq!(out.queue_fanout(audience, 11, frames.clone(), takers), 2);
        let takers = out.takers(audience, Some(false));
        assert_eq!(
            takers,
            Takers {
                plain: 1,
                sequenced: 1
            }
        );
        assert_eq!(out.queue_fanout(audience, 10, frames, takers), 2);
        out.queue(to(), LocalId::ANY, notice.clone());
        assert_eq!(out.datagrams(), 6);
        let sends: Vec<(u16, Option<u32>, Range<usize>)> = out
            .sends()
            .map(|s| (s.to.port(), s.member, s.bytes))
            .collect();
        assert_eq!(
            sends,
            vec![
                (9, Some(7), notice.clone()),
                (1, Some(10), plain.clone()),
                (3, Some(12), plain.clone()),
                (2, Some(11), sequenced),
                (3, Some(12), plain),
                (9, None, notice),
            ]
        );
        let expanded = out.expanded();
        assert_eq!(
            expanded.sends().collect::<Vec<_>>(),
            out.sends().collect::<Vec<_>>()
        );
        assert_eq!(expanded.datagrams(), 6);
        assert_eq!(
            expanded.get(0..1),
            out.get(0..1),
            "the bytes where they were"
        );
    }

    /// An audience is found again by its own key only, after others were added too (a message
    /// to another room between two to its room): a change of the room's members (a new key)
    /// makes a new one. A cleared outbox has no audience.
    #[test]
    fn an_audience_is_found_again_by_its_key() {
        let mut out = Outbox::default();
        assert_eq!(out.audience((0, 0)), None);
        let a = out.add_audience((0, 5), [recipient(1, 1, false), recipient(2, 2, false)]);
        assert_eq!(out.audience((0, 5)), Some(a));
        assert_eq!(out.audience((0, 6)), None, "the room's members changed");
        assert_eq!(out.audience((1, 5)), None, "another room");
        let b = out.add_audience((1, 5), [recipient(3, 3, false)]);
        assert_ne!(a, b);
        assert_eq!(out.audience((0, 5)), Some(a), "found again after another");
        assert_eq!(out.audience((1, 5)), Some(b));
        assert_eq!(out.recipients(a).len(), 2);
        assert_eq!(out.recipients(b), &[recipient(3, 3, false)]);
        out.clear();
        assert_eq!(out.audience((1, 5)), None);
    }

    /// A message its sender alone would get queues nothing, and its audience is forgotten at
    /// once unless a fan-out names it: an outbox that queues no datagram is never sent, so
    /// never cleared, and lone members chatting in turn in two rooms would fill it.
    #[test]
    fn an_audience_nobody_takes_from_is_forgotten() {
        let mut out = Outbox::default();
        for turn in 0..100 {
            let key = (turn % 2, 0);
            let port = 1 + key.0 as u16;
            let audience = out
                .audience(key)
                .unwrap_or_else(|| out.add_audience(key, [recipient(port, 1, false)]));
            let takers = out.takers(audience, Some(false));
            assert_eq!(
                takers,
                Takers {
                    plain: 0,
                    sequenced: 0
                }
            );
            assert_eq!(out.queue_fanout(audience, 1, (None, None), takers), 0);
        }
        assert!(out.is_empty(), "nobody to send to");
        assert_eq!(out.datagrams(), 0);
        assert_eq!(out.recipients_kept(), 0, "no audience kept");
        assert_eq!(out.audience((0, 0)), None, "nor found again");
        assert_eq!(out.audience((1, 0)), None);
        // An unregistered sender (not in its audience) is no exception; an audience a fan-out
        // names is kept, though its next message, from its only member, goes to nobody.
        let audience = out.add_audience((7, 0), [recipient(1, 1, true)]);
        let takers = out.takers(audience, None);
        assert_eq!(
            takers,
            Takers {
                plain: 0,
                sequenced: 1
            }
        );
        let seq = out.payload(|b| b.push(3));
        assert_eq!(
            out.queue_fanout(audience, 2, (None, Some(seq.clone())), takers),
            1
        );
        let takers = out.takers(audience, Some(true));
        assert_eq!(out.queue_fanout(audience, 1, (None, Some(seq)), takers), 0);
        assert_eq!(out.audience((7, 0)), Some(audience));
        assert_eq!(out.sends().count(), 1);
    }

    #[test]
    fn a_payload_too_long_for_a_prefix_is_no_batch_entry() {
        let mut out = Outbox::default();
        let huge = out.payload(|b| b.resize(b.len() + 65_536, 0));
        let fits = out.payload(|b| b.resize(b.len() + 65_535, 0));
        out.queue_to_member(to(), LocalId::ANY, huge, 0, u16::MAX);
        out.queue_to_member(to(), LocalId::ANY, fits.clone(), 0, u16::MAX);
        let sends: Vec<QueuedSend> = out.sends().collect();
        assert_eq!(out.entry_of(&sends[0]), None);
        assert_eq!(out.entry_of(&sends[1]), Some(fits.start - 2..fits.end));
        assert_eq!(out.bytes_of(&sends[0]).len(), 65_536);
        out.clear();
        assert!(out.is_empty());
        // Cleared: the next payload starts over, behind its prefix.
        assert_eq!(out.payload(|b| b.push(7)), 2..3);
    }
}
