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
        if self.room_full(id) || self.tokens_full() {
            return Err(ErrorCode::ServerFull);
        }
        Ok(id)
    }

    /// Whether room `id` holds as many members as `max_members_per_room` allows.
    fn room_full(&self, id: RoomId) -> bool {
        self.limits.max_members_per_room != 0
            && self.rooms[id.0].members.len() >= self.limits.max_members_per_room
    }

    /// The cap a join of `room_name` refused as `server_full` met, in words: the room's own
    /// (`room "lobby" is full: 3 members, limits.max_members_per_room`) or the server's. The
    /// client shows it: "the server is full" for a full room sent users looking elsewhere.
    pub fn join_full_text(&self, room_name: &str) -> String {
        match self.room_index.get(room_name) {
            Some(&id) if self.room_full(id) => format!(
                "room {room_name:?} is full ({} members, the most limits.max_members_per_room \
                 allows)",
                self.rooms[id.0].members.len()
            ),
            _ => "the server is full (its limit of members in all rooms, limits.max_tokens, is \
                  reached)"
                .into(),
        }
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
