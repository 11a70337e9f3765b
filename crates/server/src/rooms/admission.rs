//! Creates and joins: the refusals a request meets before it costs anything, the new
//! member and its token, and the optional refusal of look-alike names.

use std::cell::Cell;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use log::{debug, info};
use tcrp::payload::{ErrorCode, Request};
use ucrp::delivery::Notice;

use super::room::{Member, Room};
use super::{Issued, MemberId, Registry, RoomId};
use crate::local::LocalId;
use crate::outbox::Outbox;
use crate::rate::TokenBucket;
use crate::record::{MemberRecord, Record};
use crate::token::Token;

impl Registry {
    /// A new member of `room` with a fresh token, and the record that makes it durable.
    fn new_member(
        &mut self,
        room: RoomId,
        request: &Request,
        joined_from: IpAddr,
        is_host: bool,
        now: Instant,
    ) -> (MemberId, MemberRecord) {
        let joined_from = joined_from.to_canonical();
        let mut token = Token::generate(&mut *self.rng);
        // 128 random bits do not collide, but a loaded file may hold any string: stay unique.
        while self.find_token(token.as_str().as_bytes()).is_some() {
            token = Token::generate(&mut *self.rng);
        }
        let keepalive = request
            .keepalive_secs
            .filter(|&k| k > 0)
            .map(|k| Duration::from_secs(k.into()).max(self.limits.min_keepalive));
        let record = MemberRecord {
            token: token.as_str().to_owned(),
            username: request.username.clone(),
            keepalive: keepalive.map(|k| k.as_secs() as u32),
            caps: request.caps.bits(),
            max_datagram: request.max_datagram,
            joined_from: Some(joined_from),
        };
        let id = self.insert_member(Member {
            token,
            username: request.username.as_str().into(),
            room,
            is_host,
            address: None,
            local: LocalId::ANY,
            local_unsaved: false,
            source_queued: false,
            keepalive,
            last_seen: now,
            serial: 0,
            caps: request.caps,
            max_datagram: request.max_datagram,
            joined_from: Some(joined_from),
            chat: TokenBucket::full(self.limits.chat_burst, now),
            lookalike_hash: Cell::new(0),
        });
        (id, record)
    }

    /// Whether the registry holds as many tokens as `max_tokens` allows.
    fn tokens_full(&self) -> bool {
        self.limits.max_tokens != 0 && self.members.len() >= self.limits.max_tokens
    }

    /// Why creating `room_name` would be refused now, if it would: asked before hashing a
    /// new room's password, so that a refused create costs no hash.
    pub fn create_refusal(&self, room_name: &str) -> Option<ErrorCode> {
        if self.room_index.contains_key(room_name) {
            return Some(ErrorCode::RoomExists);
        }
        if (self.limits.max_rooms != 0 && self.rooms.len() >= self.limits.max_rooms)
            || self.tokens_full()
        {
            return Some(ErrorCode::ServerFull);
        }
        None
    }

    /// Creates `room_name` with the requester, whose TCP connection comes from `joined_from`,
    /// as host. `password_hash` is already hashed.
    pub fn create_room(
        &mut self,
        room_name: &str,
        request: &Request,
        joined_from: IpAddr,
        password_hash: Option<String>,
        now: Instant,
        unix_now: f64,
    ) -> Result<Issued, ErrorCode> {
        if let Some(refusal) = self.create_refusal(room_name) {
            return Err(refusal);
        }
        let listed = request.listed.unwrap_or(true);
        let room = RoomId(self.rooms.insert(Room::new(
            room_name,
            unix_now,
            listed,
            password_hash.as_deref().map(Into::into),
        )));
        self.index_room(room);
        let (host, record) = self.new_member(room, request, joined_from, true, now);
        self.rooms[room.0].host = host;
        let token = self.members[host.0].token.clone();
        info!(
            "room {room_name:?} created by {:?} (token {})",
            request.username,
            token.short()
        );
        self.record(Record::CreateRoom {
            room: room_name.to_owned(),
            host: record,
            created_at: unix_now,
            listed,
            password_hash,
        });
        Ok(Issued { token })
    }

    /// The name of a member of `room_name` that `username` looks like
    /// ([`tcrp::names::lookalike_keys`]), if any; asked only when `[names]
    /// refuse_lookalike_usernames` is on. Each member's keys are worked out once and kept as
    /// hashes (8 bytes a member), so a check costs the new name's keys and a comparison per
    /// member; the keys of a hash match are compared in full.
    pub fn lookalike_member(&self, room_name: &str, username: &str) -> Option<&str> {
        let room = self.room_index.get(room_name)?;
        let keys = tcrp::names::lookalike_keys(username);
        let hash = self.lookalike_hash(&keys);
        self.rooms[room.0]
            .members
            .iter()
            .map(|m| &self.members[m.0])
            // The same name is `join_refusal`'s to refuse, with its own message.
            .filter(|member| *member.username != *username)
            .find(|member| self.looks_like(&member.username, &member.lookalike_hash, &keys, hash))
            .map(|member| &*member.username)
    }

    /// An open room whose name `room_name` looks like ([`tcrp::names::lookalike_keys`]), if
    /// any: its name, and whether it is listed. Asked only when `[names]
    /// refuse_lookalike_room_names` is on; keys are kept as hashes as for members
    /// ([`Registry::lookalike_member`]), so a check costs the new name's keys and a
    /// comparison per room.
    pub fn lookalike_room(&self, room_name: &str) -> Option<(&str, bool)> {
        let keys = tcrp::names::lookalike_keys(room_name);
        let hash = self.lookalike_hash(&keys);
        self.rooms
            .iter()
            .map(|(_, room)| room)
            .filter(|room| *room.name != *room_name)
            .find(|room| self.looks_like(&room.name, &room.lookalike_hash, &keys, hash))
            .map(|room| (&*room.name, room.listed))
    }

    /// The hashes of a name's two look-alike keys in one word, 32 bits each (skeleton high,
    /// lower case low); never 0, which marks a member's or a room's as not yet worked out.
    fn lookalike_hash(&self, keys: &tcrp::names::LookalikeKeys) -> u64 {
        // Truncation is the point: half a word per key.
        let skeleton = self.hasher.hash_one(&keys.skeleton) as u32;
        let lower_case = self.hasher.hash_one(&keys.lower_case) as u32;
        (u64::from(skeleton) << 32 | u64::from(lower_case)).max(1)
    }

    /// Whether `name` looks like a name with look-alike `keys` (whose hash is `hash`). The
    /// hash of `name`'s own keys is kept in `cached`, worked out here the first time; only
    /// when either half matches are the keys compared in full.
    fn looks_like(
        &self,
        name: &str,
        cached: &Cell<u64>,
        keys: &tcrp::names::LookalikeKeys,
        hash: u64,
    ) -> bool {
        if cached.get() == 0 {
            cached.set(self.lookalike_hash(&tcrp::names::lookalike_keys(name)));
        }
        let own = cached.get();
        let may_match = own >> 32 == hash >> 32 || own as u32 == hash as u32;
        may_match && tcrp::names::lookalike_keys(name).look_alike(keys)
    }

    /// Why a join of `room_name` as `username` would be refused before any look at the
    /// request's other fields, if it would: no such room, the name taken, the room or the
    /// server full.
    pub fn join_refusal(&self, room_name: &str, username: &str) -> Option<ErrorCode> {
        self.joinable(room_name, username).err()
    }

    /// The room a join of `room_name` as `username` would enter, or why it is refused (see
    /// [`Registry::join_refusal`]).
    fn joinable(&self, room_name: &str, username: &str) -> Result<RoomId, ErrorCode> {
        let Some(&id) = self.room_index.get(room_name) else {
            return Err(ErrorCode::RoomNotFound);
        };
        if self.name_taken(id, username) {
            return Err(ErrorCode::NameTaken);
        }
        let room = &self.rooms[id.0];
        let full_room = self.limits.max_members_per_room != 0
            && room.members.len() >= self.limits.max_members_per_room;
        if full_room || self.tokens_full() {
            return Err(ErrorCode::ServerFull);
        }
        Ok(id)
    }

    /// Adds the requester, whose TCP connection comes from `joined_from`, to `room_name`.
    /// Password checks are the caller's (they are slow and belong outside this pure module).
    pub fn join_room(
        &mut self,
        room_name: &str,
        request: &Request,
        joined_from: IpAddr,
        now: Instant,
        out: &mut Outbox,
    ) -> Result<Issued, ErrorCode> {
        let room = self.joinable(room_name, &request.username)?;
        let (id, record) = self.new_member(room, request, joined_from, false, now);
        let token = self.members[id.0].token.clone();
        debug!(
            "room {room_name:?}: {:?} joined (token {})",
            request.username,
            token.short()
        );
        self.notify(room, Some(id), Notice::Joined, &request.username, out);
        self.record(Record::Join {
            room: room_name.to_owned(),
            member: record,
        });
        Ok(Issued { token })
    }
}
