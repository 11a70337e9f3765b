//! Drives one registry through a session of arbitrary TCRP requests and UCRP datagrams, as
//! the event loop would, with small caps so that refusals happen too.
//!
//! Input: the first byte sets the options (bit 0: `[names] refuse_invisible`, bit 1:
//! `refuse_lookalike_usernames`, bit 2: `refuse_lookalike_room_names`, bit 3: segmented
//! sends, bits 4–5: the daemon's cap on batch frames, bit 6: rooms of up to 8 members rather
//! than 3); then steps,
//! each a length byte and that many bytes. A step's first byte picks what it is:
//! - a request: the operation byte, a room name of 0–3 bytes, then the payload, framed as a
//!   REQUEST (password checks are answered without hashing: the payload's last byte says
//!   whether a password matched); a `$t` in the payload, followed by a byte that picks one,
//!   is replaced by a token issued earlier, so that Presence `you` and History replies for
//!   members are reached;
//! - a datagram from one of four sources to one of three addresses of ours (or one the socket
//!   does not say, as when bound to one address): a kind byte (`__REGISTER__`, `__LEAVE__`,
//!   chat, or raw bytes), which token issued earlier it carries, the source and our address,
//!   then the message;
//! - time passing (up to 4 s), then expiry, a history checkpoint and the moved sources saved.
//!
//! What the steps queue stays in one outbox, as datagrams read in one pass do, until time
//! passes, the outbox holds over 256 datagrams, or the session ends; it is then planned and
//! cleared.
//!
//! Properties:
//! - every reply is a COMPLIANCE that parses; a success of a create or join carries a COMPLETE
//!   whose token is a member of that room and is the only case that needs durability; a
//!   refusal carries no COMPLETE; a success of ListRooms, Presence or History carries a
//!   COMPLETE of at most `MAX_REPLY_BYTES` that parses as its reply type and says what the
//!   registry holds (every listed room, sorted by name, with its member count and password
//!   flag; Presence's room, host and members with their registrations, host first, and `you`
//!   exactly when the request carried a token of the room; History's page as
//!   `Registry::history_page` gives it, with its `more`);
//! - the plan of each outbox, chat queued once per room for its audience, is the plan of the
//!   same outbox with every fan-out queued as its sends one by one, datagram for datagram
//!   (`Sender::dry_run`, `Outbox::expanded`); and, as debug assertions are on, an audience
//!   found again for a room is the one built afresh (`Registry`'s relay checks it);
//! - the registry's records, each through its journal line's JSON, keep the state model's
//!   rooms and tokens in step (each room lists exactly the tokens that name it);
//! - at the end, the registry rebuilt from that model has the same rooms, members and
//!   registrations as the live one, and (once the sources are saved) answers every member
//!   from the same address of ours.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ocm_server::config::Names;
use ocm_server::handshake::{
    handle_frame, Context, RequestLimits, Step, HISTORY_PAGE, MAX_HISTORY_PAGE, MAX_REPLY_BYTES,
};
use ocm_server::local::LocalAddr;
use ocm_server::outbox::Outbox;
use ocm_server::password::{Job, Outcome};
use ocm_server::rate::KeyedLimiter;
use ocm_server::record::Record;
use ocm_server::rooms::{Limits, Registry};
use ocm_server::store::State;
use ocm_server::udp::Sender;
use rand::SeedableRng;
use tcrp::payload::{self, Compliance, HistoryPage, RoomList, RoomPresence};
use tcrp::{Frame, Operation, State as FrameState};

/// A PHC string of the right shape; never checked (password outcomes are made up).
const FAKE_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";

/// Small caps, so that refusals happen; `roomy`: rooms of up to 8 members, for audiences
/// worth planning member by member.
fn small_limits(roomy: bool) -> Limits {
    Limits {
        max_rooms: 3,
        max_members_per_room: if roomy { 8 } else { 3 },
        max_tokens: if roomy { 16 } else { 7 },
        history: 4,
        ..Limits::default()
    }
}

/// Datagrams an outbox holds at most before it is planned: a pass's worth.
const PASS_DATAGRAMS: usize = 256;

fn source(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40_000 + u16::from(i % 4)))
}

/// The address of ours a datagram came to: none (a socket bound to one address), or one of
/// three.
fn arrival(i: u8) -> Option<LocalAddr> {
    let last = (i / 4) % 4;
    (last > 0).then(|| LocalAddr {
        ip: IpAddr::from([192, 0, 2, last]),
        ifindex: 0,
    })
}

/// Checks that the model's two indexes agree.
fn check_state(state: &State) {
    for (name, room) in &state.rooms {
        for token in &room.members {
            let entry = state.tokens.get(token).expect("a listed token exists");
            assert_eq!(&entry.room_name, name, "a token names the room listing it");
        }
    }
    for (token, entry) in &state.tokens {
        let room = state
            .rooms
            .get(&entry.room_name)
            .expect("a token's room exists");
        assert!(room.members.contains(token), "a room lists its tokens");
    }
}

struct Session {
    registry: Registry,
    state: State,
    limiter: KeyedLimiter<IpAddr>,
    failures: KeyedLimiter<IpAddr>,
    out: Outbox,
    /// Plans the outbox as it is queued.
    by_fanouts: Sender,
    /// Plans it with every fan-out expanded to its sends: the reference.
    one_by_one: Sender,
    now: Instant,
    names: Names,
    /// Tokens issued, with their rooms.
    issued: Vec<(Vec<u8>, String)>,
}

impl Session {
    fn request(&mut self, step: &[u8]) {
        let Some((&op, rest)) = step.split_first() else {
            return;
        };
        let name_len = usize::from(rest.first().copied().unwrap_or(0) % 4).min(rest.len());
        let (room, payload) = rest.split_at(name_len);
        let matched = payload.last().is_some_and(|b| b & 1 == 1);
        let payload = self.with_token(payload);
        let payload = &payload[..];
        let mut bytes = Vec::new();
        let frame = Frame {
            operation: Operation::from(op % 7),
            state: FrameState::Request,
            room_name: room,
            payload,
        };
        if frame.encode(&mut bytes).is_err() {
            return;
        }
        let Ok(Some((frame, _))) = tcrp::decode(&bytes, tcrp::DEFAULT_MAX_PAYLOAD) else {
            panic!("an encoded frame decodes");
        };
        let mut ctx = Context {
            registry: &mut self.registry,
            limiter: &mut self.limiter,
            password_failures: &mut self.failures,
            limits: RequestLimits {
                rate: 0.0,
                burst: 0.0,
                password_failure_rate: 0.0,
                password_failure_burst: 0.0,
            },
            names: self.names,
            out: &mut self.out,
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
            now: self.now,
            unix_now: 1.0,
        };
        let response = match handle_frame(&frame, &mut ctx, None) {
            Step::Reply(r) => r,
            Step::Password(job) => {
                let outcome = match job {
                    Job::Hash { .. } => Outcome::Hashed(Ok(FAKE_HASH.to_owned())),
                    Job::Verify { hash, .. } => Outcome::Verified { matched, hash },
                };
                match handle_frame(&frame, &mut ctx, Some(&outcome)) {
                    Step::Reply(r) => r,
                    Step::Password(_) => panic!("a password asked for twice"),
                }
            }
        };
        let (first, used) = tcrp::decode(&response.bytes, usize::MAX)
            .expect("a reply decodes")
            .expect("a reply holds a frame");
        assert_eq!(first.state, FrameState::Compliance);
        let compliance = payload::parse_compliance(first.payload).expect("COMPLIANCE parses");
        let rest = &response.bytes[used..];
        let issues = matches!(frame.operation, Operation::CreateRoom | Operation::JoinRoom);
        match compliance {
            Compliance::Success if issues => {
                let (complete, used) = tcrp::decode(rest, usize::MAX)
                    .expect("COMPLETE decodes")
                    .expect("a success carries COMPLETE");
                assert_eq!(complete.state, FrameState::Complete);
                assert_eq!(used, rest.len());
                let token = payload::parse_complete(complete.payload).expect("a token");
                let room = std::str::from_utf8(frame.room_name).expect("a created room's name");
                assert!(self.registry.is_member(room, token.as_bytes()));
                assert!(response.needs_durability);
                self.issued.push((frame.room_name.to_vec(), token));
            }
            Compliance::Success => {
                assert!(!response.needs_durability);
                let (complete, used) = tcrp::decode(rest, usize::MAX)
                    .expect("COMPLETE decodes")
                    .expect("a success carries COMPLETE");
                assert_eq!(complete.state, FrameState::Complete);
                assert_eq!(used, rest.len());
                assert!(complete.payload.len() <= MAX_REPLY_BYTES, "a reply fits");
                self.check_answer(&frame, complete.payload);
            }
            Compliance::Failure { .. } => {
                assert!(rest.is_empty(), "a refusal carries no COMPLETE");
                assert!(!response.needs_durability);
            }
        }
    }

    /// `payload` with its first `$t` and the byte after it replaced by an issued token.
    fn with_token(&self, payload: &[u8]) -> Vec<u8> {
        let Some(at) = payload.windows(2).position(|w| w == b"$t") else {
            return payload.to_vec();
        };
        let (Some(&pick), false) = (payload.get(at + 2), self.issued.is_empty()) else {
            return payload.to_vec();
        };
        let token = &self.issued[usize::from(pick) % self.issued.len()].1;
        [&payload[..at], token.as_bytes(), &payload[at + 3..]].concat()
    }

    /// Checks a ListRooms, Presence or History COMPLETE payload against the registry.
    fn check_answer(&self, frame: &Frame<'_>, payload: &[u8]) {
        let room = std::str::from_utf8(frame.room_name).unwrap_or("");
        let request = payload::parse_request(frame.payload).expect("a request that succeeded");
        let token = request.token.as_deref().unwrap_or("").as_bytes();
        match frame.operation {
            Operation::ListRooms => {
                let list: RoomList = payload::parse_json(payload).expect("a room list");
                let listed: Vec<_> = self
                    .registry
                    .list_rooms(usize::MAX)
                    .into_iter()
                    .map(|r| (r.name, r.members, r.has_password))
                    .collect();
                let answered: Vec<_> = list
                    .rooms
                    .into_iter()
                    .map(|r| (r.name, r.members, r.password))
                    .collect();
                assert_eq!(
                    answered, listed,
                    "every listed room, sorted, as the registry has it"
                );
                assert!(!list.more, "a session's few rooms always fit");
            }
            Operation::Presence => {
                let reply: RoomPresence = payload::parse_json(payload).expect("a presence");
                let presence = self.registry.presence(room).expect("the room exists");
                assert_eq!(reply.room, room);
                assert_eq!(reply.host, presence.host());
                assert!(!reply.more, "a room of this session always fits");
                let members: Vec<_> = reply
                    .members
                    .iter()
                    .map(|m| (m.name.as_str(), m.registered))
                    .collect();
                let registry: Vec<_> = presence.members().collect();
                assert_eq!(members, registry, "every member, host first");
                let you = reply.you.map(|m| (m.name, m.registered));
                assert_eq!(
                    you,
                    self.registry.member_of(room, token),
                    "`you` is the asker"
                );
            }
            Operation::History => {
                let page: HistoryPage = payload::parse_json(payload).expect("a history page");
                let limit = request
                    .limit
                    .map_or(HISTORY_PAGE, |l| (l as usize).min(MAX_HISTORY_PAGE));
                let (kept, more) = self
                    .registry
                    .history_page(room, token, request.before, limit)
                    .expect("a member's page");
                let answered: Vec<_> = page
                    .messages
                    .iter()
                    .map(|m| (m.seq, m.sender.as_str(), m.text.as_str(), m.truncated))
                    .collect();
                let kept: Vec<_> = kept
                    .iter()
                    .map(|m| (m.seq, m.sender.as_str(), m.text.as_str(), false))
                    .collect();
                // No cut: a step's text is under 256 bytes, so even escaped sixfold the
                // kept messages (`history: 4`) fit in one reply.
                assert_eq!(answered, kept, "the page the registry keeps, oldest first");
                assert_eq!(page.more, more);
                assert!(page.messages.iter().all(|m| m.at.is_finite()));
            }
            other => panic!("{other:?} succeeded without issuing a token"),
        }
    }

    fn datagram(&mut self, step: &[u8]) {
        let [kind, which, from, message @ ..] = step else {
            return;
        };
        let mut bytes = Vec::new();
        if self.issued.is_empty() || kind % 8 == 7 {
            bytes.extend_from_slice(message);
        } else {
            let (room, token) = &self.issued[usize::from(*which) % self.issued.len()];
            let message = String::from_utf8_lossy(message);
            let text = match kind % 8 {
                0..=2 => "__REGISTER__",
                3 => "__LEAVE__",
                _ => &message,
            };
            if ucrp::datagram::encode(room, token.as_bytes(), text, &mut bytes).is_err() {
                return;
            }
        }
        self.registry.handle_datagram(
            source(*from),
            arrival(*from),
            &bytes,
            self.now,
            &mut self.out,
        );
    }

    fn time_passes(&mut self, step: &[u8]) {
        self.flush();
        let millis = step.iter().map(|&b| u64::from(b)).sum::<u64>() * 16;
        self.now += Duration::from_millis(millis.min(4_000));
        self.registry.poll_expired(self.now, &mut self.out);
        self.registry.checkpoint_history();
        self.registry.save_sources_within(2);
    }

    /// Plans the outbox both ways, checks the plans agree, and clears it.
    fn flush(&mut self) {
        let planned = self.by_fanouts.dry_run(&self.out);
        let reference = self.one_by_one.dry_run(&self.out.expanded());
        assert_eq!(
            planned, reference,
            "fan-outs planned as their sends would be"
        );
        self.out.clear();
    }

    fn persist(&mut self) {
        if self.out.datagrams() > PASS_DATAGRAMS {
            self.flush();
        }
        for record in self.registry.take_records() {
            let line = serde_json::to_string(&record).expect("a record serializes");
            let again: Record = serde_json::from_str(&line).expect("a record line parses");
            self.state.apply(&again);
        }
        check_state(&self.state);
    }
}

fuzz_target!(|data: &[u8]| {
    assert!(
        cfg!(debug_assertions),
        "the relay checks the audiences it finds again only with debug assertions"
    );
    let Some((&options, mut rest)) = data.split_first() else {
        return;
    };
    let roomy = options & 64 == 64;
    let cap = [512, 1472, 4096, 65507][usize::from(options >> 4) & 3];
    let sender = || {
        let mut sender = Sender::new(cap);
        sender.set_segmentation(options & 8 == 8);
        sender
    };
    let now = Instant::now();
    let mut s = Session {
        registry: Registry::new(
            small_limits(roomy),
            Box::new(rand::rngs::StdRng::seed_from_u64(1)),
        ),
        state: State::default(),
        limiter: KeyedLimiter::new(8),
        failures: KeyedLimiter::new(8),
        out: Outbox::default(),
        by_fanouts: sender(),
        one_by_one: sender(),
        now,
        names: Names {
            refuse_invisible: options & 1 == 1,
            refuse_lookalike_usernames: options & 2 == 2,
            refuse_lookalike_room_names: options & 4 == 4,
        },
        issued: Vec::new(),
    };
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (step, next) = tail.split_at(len);
        rest = next;
        match step.first().map(|b| b % 3) {
            Some(0) => s.request(&step[1..]),
            Some(1) => s.datagram(&step[1..]),
            Some(_) => s.time_passes(&step[1..]),
            None => continue,
        }
        s.persist();
    }
    s.flush();
    s.registry.save_sources();
    s.persist();
    let rebuilt = Registry::from_state(
        &s.state,
        small_limits(roomy),
        Box::new(rand::rngs::StdRng::seed_from_u64(2)),
        s.now,
    );
    let counts = |r: &Registry| {
        let st = r.stats();
        (st.rooms, st.members, st.registered)
    };
    assert_eq!(
        counts(&rebuilt),
        counts(&s.registry),
        "rebuilt from the records"
    );
    for (_, token) in &s.issued {
        assert_eq!(
            rebuilt.source_of(token),
            s.registry.source_of(token),
            "the source saved for a member"
        );
    }
});
