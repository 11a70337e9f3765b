//! What one UCRP datagram does: a register binds or moves a member's address, chat is
//! relayed (or dropped as stale when it waited past `udp.max_chat_wait_ms`), a leave departs;
//! anything else is dropped with a reason, and a late datagram with a dead token may be told
//! so.

use std::net::SocketAddr;
use std::time::Instant;

use log::debug;
use ucrp::delivery::{self, Notice};
use ucrp::Message;

use super::tombstones::Gone;
use super::{DropReason, Handled, MemberId, Registry};
use crate::local::{LocalAddr, LocalId};
use crate::outbox::Outbox;
use crate::record::Record;
use crate::token::Short;

/// Whether a datagram waited in the socket past `udp.max_chat_wait_ms`, which decides what
/// becomes of chat (its token, room and address checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lateness {
    /// In time: chat is relayed, if its size and the member's rate allow.
    OnTime,
    /// Too late: chat is dropped (counted `stale`).
    Late,
}

impl Registry {
    /// Decides what to do with one datagram from `src`, sent to our address `arrival` (`None`
    /// when the socket does not say, being bound to one address).
    pub fn handle_datagram(
        &mut self,
        src: SocketAddr,
        arrival: Option<LocalAddr>,
        bytes: &[u8],
        now: Instant,
        out: &mut Outbox,
    ) -> Handled {
        self.handle(src, arrival, bytes, now, out, Lateness::OnTime)
    }

    /// As [`Registry::handle_datagram`], for a datagram that waited in the socket's receive
    /// queue past `udp.max_chat_wait_ms`: chat is dropped (`stale`) instead of relayed once its
    /// token, room and address are checked (so it still counts as a sign of life of its
    /// member, and an error there is counted as such), before its size and rate are;
    /// `__REGISTER__` and `__LEAVE__` are handled as ever, however late.
    pub fn handle_late_datagram(
        &mut self,
        src: SocketAddr,
        arrival: Option<LocalAddr>,
        bytes: &[u8],
        now: Instant,
        out: &mut Outbox,
    ) -> Handled {
        self.handle(src, arrival, bytes, now, out, Lateness::Late)
    }

    /// One datagram from `src` to our address `arrival`: parsed, its token, room and address
    /// checked, then a `__REGISTER__`, a `__LEAVE__` or chat (see [`Lateness`]).
    fn handle(
        &mut self,
        src: SocketAddr,
        arrival: Option<LocalAddr>,
        bytes: &[u8],
        now: Instant,
        out: &mut Outbox,
        lateness: Lateness,
    ) -> Handled {
        if self.sent_by_us(src, arrival) {
            return Handled::Dropped(DropReason::OwnAddress);
        }
        let datagram = match ucrp::parse(bytes) {
            Ok(d) => d,
            Err(e) => return Handled::Dropped(DropReason::Malformed(e.reason())),
        };
        let Some(id) = self.find_token(datagram.token) else {
            return self.unknown_token(src, arrival, bytes.len(), datagram.token, now, out);
        };
        if *self.rooms[self.members[id.0].room.0].name.as_bytes() != *datagram.room_name {
            return Handled::Dropped(DropReason::WrongRoom);
        }
        // Numbered only for a live token of the room: nobody without one can fill the table.
        let local = self.locals.id(arrival);
        let member = &mut self.members[id.0];
        match datagram.message {
            Message::Register => self.register(id, src, local, now),
            // A member that never registered has no address to hold its datagrams to: its
            // __LEAVE__ is taken on the token alone, as its first __REGISTER__ would be (from
            // the join's IP under the guard). A client whose first __REGISTER__ could not be
            // sent leaves so, instead of staying in the room until it expires, if ever.
            Message::Leave if member.address.is_none() => {
                if self.limits.register_only_from_join_ip
                    && member
                        .joined_from
                        .is_some_and(|ip| ip != src.ip().to_canonical())
                {
                    return Handled::Dropped(DropReason::NotJoinIp);
                }
                member.last_seen = now;
                self.remove_member(id, Notice::Left, now, out)
            }
            _ if member.address.is_none() => Handled::Dropped(DropReason::Unregistered),
            _ if member.address != Some(src) => Handled::Dropped(DropReason::AddressMismatch),
            Message::Leave => {
                member.last_seen = now;
                self.remove_member(id, Notice::Left, now, out)
            }
            Message::Chat(text) => {
                member.last_seen = now;
                self.chat(id, text, local, lateness, now, out)
            }
        }
    }

    /// Chat `text` from member `id` (its token, room and address checked), sent to our
    /// address `local`: relayed to the room, or dropped as late, too large or over the
    /// member's rate.
    fn chat(
        &mut self,
        id: MemberId,
        text: &str,
        local: LocalId,
        lateness: Lateness,
        now: Instant,
        out: &mut Outbox,
    ) -> Handled {
        // Chat sent to another of our addresses moves the member's source too (soft state,
        // free: also for chat dropped below).
        self.move_source(id, local);
        // Late chat is dropped before the checks on the chat itself (size, rate): it is not
        // going to be relayed, so it takes nothing from the allowance.
        if lateness == Lateness::Late {
            return Handled::Dropped(DropReason::Stale);
        }
        let member = &mut self.members[id.0];
        // The original client reads 4096 bytes: a longer relay would reach it cut, perhaps
        // inside a UTF-8 character. (Sequenced frames add 10 bytes; clients that ask for
        // them read more.)
        if 1 + member.username.len() + text.len() > ucrp::MAX_DATAGRAM_LEN {
            return Handled::Dropped(DropReason::TooLargeToRelay);
        }
        if self.limits.chat_rate > 0.0
            && !member
                .chat
                .take(now, self.limits.chat_rate, self.limits.chat_burst)
        {
            return Handled::Dropped(DropReason::RateLimited);
        }
        let deliveries = self.relay(id, text, now, out);
        Handled::Relayed { deliveries }
    }

    /// A `__REGISTER__` from `src` with the token of member `id`, to our address `local`:
    /// binds the member's address, or moves it (a journal record, paid from the member's
    /// chat allowance, and only from its join's IP under the guard); from the address it
    /// has, a keepalive.
    fn register(&mut self, id: MemberId, src: SocketAddr, local: LocalId, now: Instant) -> Handled {
        let member = &mut self.members[id.0];
        // A REGISTER from the member's own address moves nothing: it is a keepalive,
        // even for a member bound elsewhere before the guard was turned on. A token
        // from a file without join IPs is held to the IP of its registered address.
        let changed = member.address != Some(src);
        let bound = member
            .joined_from
            .or(member.address.map(|a| a.ip().to_canonical()));
        if changed
            && self.limits.register_only_from_join_ip
            && bound.is_some_and(|ip| ip != src.ip().to_canonical())
        {
            return Handled::Dropped(DropReason::NotJoinIp);
        }
        // A move writes a journal record: it costs what a chat message costs, or a
        // member flipping between two ports (or anyone forging its token's datagrams)
        // would write one per datagram. The first binding is free: it happens once.
        if changed
            && member.address.is_some()
            && self.limits.chat_rate > 0.0
            && !member
                .chat
                .take(now, self.limits.chat_rate, self.limits.chat_burst)
        {
            return Handled::Dropped(DropReason::RateLimited);
        }
        member.last_seen = now;
        if !changed {
            // A keepalive to another of our addresses moves what the member hears
            // there; it is saved at the next checkpoint.
            self.move_source(id, local);
            return Handled::Registered { changed };
        }
        if member.address.is_none() {
            self.registered += 1;
        }
        member.address = Some(src);
        member.local = local;
        member.local_unsaved = false;
        debug!("token {} registered from {src}", member.token.short());
        let change = Record::Register {
            token: member.token.as_str().to_owned(),
            address: src,
            local: self.locals.get(local),
        };
        self.record(change);
        self.members_changed();
        Handled::Registered { changed }
    }

    /// Sends the member what it hears from our address `local` from now on (a wildcard-bound
    /// socket; the one its datagrams now come to). Saved at the next checkpoint
    /// ([`Registry::save_sources`]), not at once: the address is soft state, a member whose
    /// datagrams alternate between our addresses (a name with several of them, resolved
    /// again for each send) would otherwise write a record per datagram, and one lost to a
    /// crash is learned again from the member's next datagram.
    fn move_source(&mut self, id: MemberId, local: LocalId) {
        let member = &mut self.members[id.0];
        if member.local == local {
            return;
        }
        member.local = local;
        member.local_unsaved = true;
        if !std::mem::replace(&mut member.source_queued, true) {
            self.sources_unsaved.push_back((id, member.serial));
        }
        self.members_changed();
    }

    /// The address of ours that what the member with `token` hears leaves from, if one was
    /// learned (a wildcard-bound socket) and the kernel still takes it as a source.
    pub fn source_of(&self, token: &str) -> Option<LocalAddr> {
        let id = self.find_token(token.as_bytes())?;
        self.locals.get(self.members[id.0].local)
    }

    /// Journals the address of each member whose source moved since it was last saved, with
    /// that source, so that after a restart it is answered from there at once: at most one
    /// record per member per checkpoint. Returns how many. Used at shutdown: everything is
    /// written.
    pub fn save_sources(&mut self) -> usize {
        self.save_sources_within(usize::MAX)
    }

    /// Like [`Registry::save_sources`], but writes at most `budget` records; the members left
    /// wait for the next call. A failover that moves every member to another of our addresses
    /// is then saved over several checkpoints, not as one batch of every member.
    pub fn save_sources_within(&mut self, budget: usize) -> usize {
        let mut written = 0;
        while written < budget {
            let Some((id, serial)) = self.sources_unsaved.pop_front() else {
                break;
            };
            // A member gone since (its slot empty, or another member's) has nothing to save.
            let Some(member) = self
                .members
                .get_mut(id.0)
                .filter(|member| member.serial == serial)
            else {
                continue;
            };
            member.source_queued = false;
            // Nothing, when a move to a new address saved it since (with its own record).
            if !std::mem::replace(&mut member.local_unsaved, false) {
                continue;
            }
            let Some(address) = member.address else {
                continue;
            };
            let change = Record::Register {
                token: member.token.as_str().to_owned(),
                address,
                // Retired or not: a source the kernel refused for now is still the one the
                // member talks to, taken again once a datagram comes to it.
                local: self.locals.address(member.local),
            };
            self.record(change);
            written += 1;
        }
        written
    }

    /// A datagram whose token is not live: if the token died recently, the sender may be told
    /// why, in no more bytes than it sent; anything else is dropped.
    fn unknown_token(
        &mut self,
        src: SocketAddr,
        arrival: Option<LocalAddr>,
        len: usize,
        token: &[u8],
        now: Instant,
        out: &mut Outbox,
    ) -> Handled {
        let mut reply = Vec::new();
        match self.tombstones.get(token) {
            Some(Gone::RoomClosed) => reply.extend_from_slice(delivery::ROOM_CLOSED),
            Some(Gone::Expired { notices: true }) => {
                let _ = delivery::encode_notice(Notice::TimedOut, "", &mut reply);
            }
            Some(Gone::Expired { notices: false }) | None => {}
        }
        // Never answer with more bytes than we were sent (no amplification), and only a few
        // times per window per source.
        if !reply.is_empty()
            && reply.len() <= len
            && self.tombstones.may_reply(src.ip(), now, &self.limits)
        {
            debug!("dead token {} from {src}: told", Short::of(token));
            let bytes = out.payload(|b| b.extend_from_slice(&reply));
            // Answered from the address the token's member last came to, which its live
            // datagrams numbered; a dead token numbers nothing (anyone can have one).
            let local = self.locals.known(arrival);
            out.queue(src, local, bytes);
            return Handled::ClosedReply;
        }
        Handled::Dropped(DropReason::UnknownToken)
    }
}
