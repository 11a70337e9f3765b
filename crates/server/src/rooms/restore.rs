//! The registry rebuilt from a loaded state file, with what a hostile or outdated file may
//! hold left out or kept as stored.

use std::cell::Cell;
use std::time::{Duration, Instant};

use log::warn;
use rand::CryptoRng;
use tcrp::payload::{self, Caps};

use super::room::{Member, Room};
use super::{Limits, MemberId, Registry, RoomId};
use crate::rate::TokenBucket;
use crate::store::{RoomEntry, State, TokenEntry};
use crate::token::Token;

impl Registry {
    /// Rebuilds the registry from a loaded state file. Entries that do not hang together (a
    /// member token with no entry, or whose entry names another room; a room whose host is
    /// missing) are skipped with a warning.
    /// Every member counts as seen `now`, so keepalive members get a full timeout to return.
    ///
    /// Names are not checked again with today's rules. Every name in the state was checked
    /// when its create or join was accepted, and the token was acknowledged only after its
    /// record was durable; a stored name that fails today's check (a rule made stricter since,
    /// or a name the original server accepted) still belongs to a client holding a token.
    /// Dropping the member would revoke that token without a word to the client, and dropping
    /// a host drops its whole room; keeping the name as stored harms nobody, so it is kept,
    /// with a warning. The one exception is a name the protocol cannot carry at all (see
    /// `unsendable`): such an entry is skipped, with a warning, as before.
    pub fn from_state(
        state: &State,
        limits: Limits,
        rng: Box<dyn CryptoRng + Send>,
        now: Instant,
    ) -> Registry {
        let mut registry = Registry::new(limits, rng);
        for (name, room) in &state.rooms {
            registry.restore_room(name, room, state, now);
        }
        registry
    }

    /// Rebuilds the room `name` from its `room` entry and its members' entries in `state`,
    /// host first; leaves it out (with a warning) when its name cannot be sent or its host
    /// cannot be loaded.
    fn restore_room(&mut self, name: &str, room: &RoomEntry, state: &State, now: Instant) {
        if let Err(rule) = tcrp::names::check_room_name(name.as_bytes()) {
            if unsendable(name, tcrp::names::MAX_ROOM_NAME_BYTES) {
                warn!("state: room name {name:?} {rule} for any request; room skipped");
                return;
            }
            warn!("state: room name {name:?} {rule}; kept as stored");
        }
        let Some(host_entry) = state.tokens.get(&room.host_token) else {
            warn!("state: room {name:?} has no entry for its host token; room skipped");
            return;
        };
        let room_id = RoomId(self.rooms.insert(self.room_from_entry(name, room)));
        self.index_room(room_id);
        let host = self.restore_member(room_id, name, &room.host_token, host_entry, true, now);
        if let Some(host) = host {
            self.rooms[room_id.0].host = host;
        }
        for token in room.members.iter().filter(|t| **t != room.host_token) {
            let Some(entry) = state.tokens.get(token) else {
                warn!("state: room {name:?} lists a token with no entry; skipped");
                continue;
            };
            self.restore_member(room_id, name, token, entry, false, now);
        }
        // A room whose host could not be loaded cannot close properly: leave it out.
        if self.rooms[room_id.0].host == MemberId::NO_HOST {
            warn!("state: room {name:?} has no usable host; room skipped");
            let entry = self.remove_room(room_id);
            for m in entry.members {
                self.unlink(m);
            }
        }
    }

    /// The room `name` as its `room` entry has it, without members, its history kept under
    /// today's limits.
    fn room_from_entry(&self, name: &str, room: &RoomEntry) -> Room {
        let mut entry = Room::new(
            name,
            room.created_at,
            room.listed,
            room.password_hash.as_deref().map(Into::into),
        );
        entry.next_seq = room.next_seq.max(1);
        entry.seq_saved = entry.next_seq;
        let (keep, budget) = (self.limits.history, self.limits.history_bytes);
        let skip = room.history.len().saturating_sub(keep);
        for message in room.history.iter().skip(skip) {
            entry.keep_in_history(message.clone(), keep, budget);
        }
        // The journal's copy is trimmed at the next checkpoint.
        entry.history_shrunk = entry.history.len() < room.history.len();
        entry
    }

    /// Adds the member holding `token` to room `room_id` (named `name`) from its `entry`;
    /// `None` (with a warning) when the entry belongs to another room, the token is already
    /// loaded, or its name cannot be sent.
    fn restore_member(
        &mut self,
        room_id: RoomId,
        name: &str,
        token: &str,
        entry: &TokenEntry,
        is_host: bool,
        now: Instant,
    ) -> Option<MemberId> {
        // The token's own entry says which room it is in: a listing elsewhere (a stray line,
        // or a room the token left by joining another) is skipped, so that it cannot take the
        // token from the room it belongs to, whichever comes first (for a host, its room is
        // then left out: it has no usable host).
        if entry.room_name != name {
            warn!(
                "state: room {name:?} lists a token whose entry is in room {:?}; skipped",
                entry.room_name
            );
            return None;
        }
        if self.find_token(token.as_bytes()).is_some() {
            warn!("state: room {name:?} lists a token already loaded; skipped");
            return None;
        }
        if let Err(rule) = tcrp::names::check_username(&entry.username) {
            let username = &entry.username;
            if unsendable(username, tcrp::names::MAX_USERNAME_BYTES) {
                warn!(
                    "state: a member of room {name:?} has a username that {rule} for a \
                     datagram's sender field; skipped"
                );
                return None;
            }
            warn!(
                "state: a member of room {name:?} has a username that {rule}; kept as \
                 stored: {username:?}"
            );
        }
        let member = self.member_from_entry(room_id, token, entry, is_host, now);
        Some(self.insert_member(member))
    }

    /// The member of room `room_id` holding `token`, as its `entry` has it, checked like a
    /// request's fields and seen `now`.
    fn member_from_entry(
        &mut self,
        room_id: RoomId,
        token: &str,
        entry: &TokenEntry,
        is_host: bool,
        now: Instant,
    ) -> Member {
        // Saved with the member on a wildcard-bound socket; the loop forgets these when the
        // socket is now bound to one address (`forget_arrival_addresses`).
        let local = self.locals.id(entry.local.as_deref().copied());
        Member {
            token: Token::from_stored(token),
            username: entry.username.as_str().into(),
            room: room_id,
            is_host,
            address: entry.address,
            local,
            local_unsaved: false,
            source_queued: false,
            // As a request's: `0` promises nothing, and a promise under today's
            // `min_keepalive_secs` (a hand-edited file, or a minimum raised since) is raised
            // to it.
            keepalive: entry
                .keepalive
                .filter(|&k| k > 0)
                .map(|k| Duration::from_secs(k.into()).max(self.limits.min_keepalive)),
            last_seen: now,
            serial: 0,
            caps: Caps::from_bits(entry.caps),
            // Checked like a request's: a hand-edited value out of range is dropped.
            max_datagram: entry
                .max_datagram
                .filter(|m| (payload::MIN_MAX_DATAGRAM..=payload::MAX_MAX_DATAGRAM).contains(m)),
            joined_from: entry.joined_from.map(|ip| ip.to_canonical()),
            chat: TokenBucket::full(self.limits.chat_burst, now),
            lookalike_hash: Cell::new(0),
        }
    }
}

/// Whether a stored name is longer than the one-byte size field that carries it (`max`
/// bytes): a room name no request or datagram can name, or a username no chat frame or notice
/// can carry as its sender. `ocmd` never accepted one, and serving it would send malformed
/// frames, so such entries are left out at load (their lines stay in the state file until the
/// room is closed or re-created).
fn unsendable(name: &str, max: usize) -> bool {
    name.len() > max
}
