//! The registry rebuilt from a loaded state file, with what a hostile or outdated file may
//! hold left out or kept as stored.

use std::cell::Cell;
use std::time::{Duration, Instant};

use log::warn;
use rand::CryptoRng;
use tcrp::payload::{self, Caps};

use super::room::{Member, Room};
use super::{Limits, Registry, RoomId};
use crate::rate::TokenBucket;
use crate::store::State;
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
            if let Err(rule) = tcrp::names::check_room_name(name.as_bytes()) {
                if unsendable(name, tcrp::names::MAX_ROOM_NAME_BYTES) {
                    warn!("state: room name {name:?} {rule} for any request; room skipped");
                    continue;
                }
                warn!("state: room name {name:?} {rule}; kept as stored");
            }
            let Some(host_entry) = state.tokens.get(&room.host_token) else {
                warn!("state: room {name:?} has no entry for its host token; room skipped");
                continue;
            };
            let mut entry = Room::new(
                name,
                room.created_at,
                room.listed,
                room.password_hash.as_deref().map(Into::into),
            );
            entry.next_seq = room.next_seq.max(1);
            entry.seq_saved = entry.next_seq;
            let (keep, budget) = (registry.limits.history, registry.limits.history_bytes);
            let skip = room.history.len().saturating_sub(keep);
            for message in room.history.iter().skip(skip) {
                entry.keep_in_history(message.clone(), keep, budget);
            }
            // Kept under today's limits; the journal's copy is trimmed at the next checkpoint.
            entry.history_shrunk = entry.history.len() < room.history.len();
            let room_id = RoomId(registry.rooms.insert(entry));
            registry.index_room(room_id);
            let mut tokens = vec![&room.host_token];
            tokens.extend(room.members.iter().filter(|t| **t != room.host_token));
            for token in tokens {
                let entry = if *token == room.host_token {
                    host_entry
                } else if let Some(entry) = state.tokens.get(token) {
                    entry
                } else {
                    warn!("state: room {name:?} lists a token with no entry; skipped");
                    continue;
                };
                // The token's own entry says which room it is in: a listing elsewhere (a
                // stray line, or a room the token left by joining another) is skipped, so
                // that it cannot take the token from the room it belongs to, whichever comes
                // first (for a host, its room is then left out: it has no usable host).
                if entry.room_name != *name {
                    warn!(
                        "state: room {name:?} lists a token whose entry is in room {:?}; \
                         skipped",
                        entry.room_name
                    );
                    continue;
                }
                if registry.find_token(token.as_bytes()).is_some() {
                    warn!("state: room {name:?} lists a token already loaded; skipped");
                    continue;
                }
                if let Err(rule) = tcrp::names::check_username(&entry.username) {
                    let username = &entry.username;
                    if unsendable(username, tcrp::names::MAX_USERNAME_BYTES) {
                        warn!(
                            "state: a member of room {name:?} has a username that {rule} \
                             for a datagram's sender field; skipped"
                        );
                        continue;
                    }
                    warn!(
                        "state: a member of room {name:?} has a username that {rule}; \
                         kept as stored: {username:?}"
                    );
                }
                // Saved with the member on a wildcard-bound socket; the loop forgets these when
                // the socket is now bound to one address (`forget_arrival_addresses`).
                let local = registry.locals.id(entry.local.as_deref().copied());
                let id = registry.insert_member(Member {
                    token: Token::from_stored(token),
                    username: entry.username.as_str().into(),
                    room: room_id,
                    is_host: *token == room.host_token,
                    address: entry.address,
                    local,
                    local_unsaved: false,
                    source_queued: false,
                    // As a request's: `0` promises nothing, and a promise under today's
                    // `min_keepalive_secs` (a hand-edited file, or a minimum raised since) is
                    // raised to it.
                    keepalive: entry
                        .keepalive
                        .filter(|&k| k > 0)
                        .map(|k| Duration::from_secs(k.into()).max(registry.limits.min_keepalive)),
                    last_seen: now,
                    serial: 0,
                    caps: Caps::from_bits(entry.caps),
                    // Checked like a request's: a hand-edited value out of range is dropped.
                    max_datagram: entry.max_datagram.filter(|m| {
                        (payload::MIN_MAX_DATAGRAM..=payload::MAX_MAX_DATAGRAM).contains(m)
                    }),
                    joined_from: entry.joined_from.map(|ip| ip.to_canonical()),
                    chat: TokenBucket::full(registry.limits.chat_burst, now),
                    lookalike_hash: Cell::new(0),
                });
                if *token == room.host_token {
                    registry.rooms[room_id.0].host = id;
                }
            }
            // A room whose host could not be loaded cannot close properly: leave it out.
            if registry.rooms[room_id.0].host.0 == usize::MAX {
                warn!("state: room {name:?} has no usable host; room skipped");
                let entry = registry.remove_room(room_id);
                for m in entry.members {
                    registry.unlink(m);
                }
            }
        }
        registry
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
