//! Random histories of the registry, replayed from its records: whatever a run of creates,
//! joins, registers, chat, leaves, expiries, idle closes, limit changes and checkpoints did,
//! the records it handed to the journal rebuild the same registry.
//!
//! The file model ([`State::apply`]) stands for the disk. At random points the run "crashes":
//! the registry is rebuilt from the model alone ([`Registry::from_state`]) and the run goes
//! on with the rebuilt one, as a restarted daemon does. What every record carries at once
//! (rooms, members, tokens, registered addresses) must match at every crash; what waits for
//! a checkpoint (history, sequence numbers, the address of ours each member sends to) must
//! match after a full one, as at a clean stop.
//!
//! Beside the random sessions in `tests.rs`, which rebuild once at the end and compare what the
//! registry answers (`a_registry_rebuilt_from_its_records_answers_as_the_live_one_...`) or
//! its indexes against a model through restarts (`the_registry_keeps_every_index_in_step_...`),
//! this one compares every saved field itself and keeps going on each rebuilt registry, so
//! it also holds a restored registry's own records to account: a restore that took every
//! member's source for queued already never saved a later move, and only this test fails.

use super::*;
use std::collections::BTreeMap;
use tcrp::payload::RequestForm;

/// A member as a restart must give it back.
#[derive(Debug, PartialEq)]
struct MemberView {
    token: String,
    username: String,
    is_host: bool,
    address: Option<SocketAddr>,
    keepalive: Option<Duration>,
    caps: Caps,
    max_datagram: Option<u16>,
    joined_from: Option<IpAddr>,
}

/// What a checkpoint saves of a room and its members.
#[derive(Debug, PartialEq)]
struct Checkpointed {
    next_seq: u64,
    history: Vec<HistoryEntry>,
    sources: Vec<Option<LocalAddr>>,
}

/// A room as a restart must give it back, members in their order (host first).
#[derive(Debug, PartialEq)]
struct RoomView {
    created_at: f64,
    listed: bool,
    password_hash: Option<String>,
    members: Vec<MemberView>,
}

/// Every room of `reg` by name, with what its records carry at once.
fn rooms_of(reg: &Registry) -> BTreeMap<String, RoomView> {
    reg.rooms
        .iter()
        .map(|(_, room)| {
            let members = room
                .members
                .iter()
                .map(|id| {
                    let m = &reg.members[id.0];
                    MemberView {
                        token: m.token.as_str().to_owned(),
                        username: m.username.to_string(),
                        is_host: m.is_host,
                        address: m.address,
                        keepalive: m.keepalive,
                        caps: m.caps,
                        max_datagram: m.max_datagram,
                        joined_from: m.joined_from,
                    }
                })
                .collect();
            let view = RoomView {
                created_at: room.created_at,
                listed: room.listed,
                password_hash: room.password_hash.as_deref().map(str::to_owned),
                members,
            };
            (room.name.to_string(), view)
        })
        .collect()
}

/// Every room of `reg` by name, with what its checkpoints carry.
fn checkpointed_of(reg: &Registry) -> BTreeMap<String, Checkpointed> {
    reg.rooms
        .iter()
        .map(|(_, room)| {
            let sources = room
                .members
                .iter()
                .map(|id| reg.source_of(reg.members[id.0].token.as_str()))
                .collect();
            let saved = Checkpointed {
                next_seq: room.next_seq,
                history: room.history.iter().cloned().collect(),
                sources,
            };
            (room.name.to_string(), saved)
        })
        .collect()
}

const ROOMS: [&str; 4] = ["a", "b", "c", "d"];
const NAMES: [&str; 5] = ["ann", "bob", "cy", "dee", "eve"];

/// One run: a seeded registry, its file model, and every token it ever issued.
struct Run {
    reg: Registry,
    state: State,
    rng: StdRng,
    now: Instant,
    unix: f64,
    issued: Vec<(&'static str, Token)>,
    out: Outbox,
    restarts: usize,
    full_checkpoints: usize,
    seen: Seen,
}

/// What the runs did, to show that they did what they are for.
#[derive(Debug, Default)]
struct Seen {
    created: usize,
    joined: usize,
    moved: usize,
    relayed: usize,
    left: usize,
    closed: usize,
    expired: usize,
    idle_closed: usize,
    kept_history: usize,
    saved_sources: usize,
}

impl Seen {
    fn add(&mut self, other: &Seen) {
        let Seen {
            created,
            joined,
            moved,
            relayed,
            left,
            closed,
            expired,
            idle_closed,
            kept_history,
            saved_sources,
        } = other;
        self.created += created;
        self.joined += joined;
        self.moved += moved;
        self.relayed += relayed;
        self.left += left;
        self.closed += closed;
        self.expired += expired;
        self.idle_closed += idle_closed;
        self.kept_history += kept_history;
        self.saved_sources += saved_sources;
    }

    /// The fewest times any of them happened.
    fn least(&self) -> usize {
        [
            self.created,
            self.joined,
            self.moved,
            self.relayed,
            self.left,
            self.closed,
            self.expired,
            self.idle_closed,
            self.kept_history,
            self.saved_sources,
        ]
        .into_iter()
        .min()
        .unwrap_or(0)
    }
}

impl Run {
    fn new(seed: u64) -> Run {
        let mut reg = Registry::new(
            Self::limits_for(5, 300, None),
            Box::new(StdRng::seed_from_u64(seed)),
        );
        let now = Instant::now();
        reg.set_wall_clock(now, 1_700_000_000.0);
        Run {
            reg,
            state: State::default(),
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            now,
            unix: 1_700_000_000.0,
            issued: Vec::new(),
            out: Outbox::default(),
            restarts: 0,
            full_checkpoints: 0,
            seen: Seen::default(),
        }
    }

    fn limits_for(history: usize, history_bytes: usize, room_idle: Option<Duration>) -> Limits {
        Limits {
            max_rooms: 3,
            max_members_per_room: 4,
            max_tokens: 10,
            history,
            history_bytes,
            room_idle,
            ..Limits::default()
        }
    }

    /// Hands the registry's records to the file model, as the writer does with a batch.
    fn write_records(&mut self) {
        for record in self.reg.take_records() {
            self.state.apply(&record);
        }
    }

    fn request(&mut self) -> Request {
        let mut request = Request::original(NAMES[self.rng.random_range(0..NAMES.len())]);
        if self.rng.random_bool(0.5) {
            let all = ["notices", "seq", "batch"];
            request.caps = Caps::from_names(all.into_iter().filter(|_| self.rng.random_bool(0.5)));
            request.keepalive_secs = self
                .rng
                .random_bool(0.5)
                .then(|| self.rng.random_range(0..4));
            request.max_datagram = self
                .rng
                .random_bool(0.3)
                .then(|| self.rng.random_range(512..=65507));
            request.listed = self.rng.random_bool(0.5).then(|| self.rng.random_bool(0.5));
            request.form = RequestForm::JsonObject;
        }
        request
    }

    /// Any token issued so far, live or not, and the port it usually sends from.
    fn any_token(&mut self) -> Option<(&'static str, Token, u16)> {
        if self.issued.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.issued.len());
        let (room, token) = self.issued[i].clone();
        Some((room, token, 1 + i as u16))
    }

    fn datagram(&mut self, text: &str) {
        let Some((room, token, home)) = self.any_token() else {
            return;
        };
        // Mostly from its own address; sometimes from another (a move, or a forgery).
        let from = if self.rng.random_bool(0.8) {
            addr(home)
        } else {
            addr(self.rng.random_range(1..8))
        };
        let arrival = match self.rng.random_range(0..3) {
            0 => None,
            n => ours(n),
        };
        let bytes = dgram(room, &token, text);
        let handled = self
            .reg
            .handle_datagram(from, arrival, &bytes, self.now, &mut self.out);
        let seen = &mut self.seen;
        match handled {
            Handled::Registered { changed: true } => seen.moved += 1,
            Handled::Relayed { .. } => seen.relayed += 1,
            Handled::Left => seen.left += 1,
            Handled::Closed { .. } => seen.closed += 1,
            _ => {}
        }
    }

    fn step(&mut self) {
        let room = ROOMS[self.rng.random_range(0..ROOMS.len())];
        let from_ip = IpAddr::from([10, 0, 0, self.rng.random_range(1..4)]);
        match self.rng.random_range(0..100) {
            0..10 => {
                let request = self.request();
                let hash = self
                    .rng
                    .random_bool(0.2)
                    .then(|| format!("$argon2id$hash-{}", self.rng.random_range(0..9)));
                let created = self
                    .reg
                    .create_room(room, &request, from_ip, hash, self.now, self.unix);
                if let Ok(issued) = created {
                    self.seen.created += 1;
                    self.issued.push((room, issued.token));
                }
            }
            10..30 => {
                let request = self.request();
                let joined = self
                    .reg
                    .join_room(room, &request, from_ip, self.now, &mut self.out);
                if let Ok(issued) = joined {
                    self.seen.joined += 1;
                    self.issued.push((room, issued.token));
                }
            }
            30..50 => self.datagram("__REGISTER__"),
            50..70 => {
                let text = "m".repeat(self.rng.random_range(1..40));
                self.datagram(&text);
            }
            70..78 => self.datagram("__LEAVE__"),
            78..85 => {
                let secs = self.rng.random_range(0..4_000);
                self.now += Duration::from_millis(secs);
                self.unix += secs as f64 / 1000.0;
                self.reg.set_wall_clock(self.now, self.unix);
                self.seen.expired += self.reg.poll_expired(self.now, &mut self.out);
                self.seen.idle_closed += self.reg.close_idle_rooms(self.now, &mut self.out);
            }
            85..90 => {
                let budget = self.rng.random_range(0..80);
                self.reg.checkpoint_history_within(budget);
                let budget = self.rng.random_range(0..3);
                self.reg.save_sources_within(budget);
            }
            90..93 => {
                let idle = self
                    .rng
                    .random_bool(0.5)
                    .then(|| Duration::from_secs(self.rng.random_range(5..30)));
                let limits = Self::limits_for(
                    self.rng.random_range(0..6),
                    self.rng.random_range(0..300),
                    idle,
                );
                self.reg.set_limits(limits);
            }
            93..97 => self.write_records(),
            _ => self.crash(),
        }
        self.out.clear();
    }

    /// A `kill -9` after the last batch the writer took: the registry is rebuilt from the file
    /// model, and what the records carry at once must have come through.
    fn crash(&mut self) {
        self.write_records();
        let restored = self.restored();
        assert_eq!(rooms_of(&restored), rooms_of(&self.reg), "after a crash");
        self.reg = restored;
        self.restarts += 1;
    }

    /// A clean stop: the final checkpoint, then the same, checkpointed parts included.
    fn stop_and_start(&mut self) {
        self.reg.checkpoint_history();
        self.seen.saved_sources += self.reg.save_sources();
        self.write_records();
        let saved = checkpointed_of(&self.reg);
        self.seen.kept_history += saved.values().filter(|r| !r.history.is_empty()).count();
        let restored = self.restored();
        assert_eq!(rooms_of(&restored), rooms_of(&self.reg), "after a stop");
        assert_eq!(
            checkpointed_of(&restored),
            saved,
            "checkpointed parts after a stop"
        );
        check_indexes(&restored);
        self.reg = restored;
        self.restarts += 1;
        self.full_checkpoints += 1;
    }

    fn restored(&self) -> Registry {
        let seed = self.restarts as u64;
        let mut reg = Registry::from_state(
            &self.state,
            self.reg.limits.clone(),
            Box::new(StdRng::seed_from_u64(seed)),
            self.now,
        );
        reg.set_wall_clock(self.now, self.unix);
        reg
    }
}

/// Hundreds of seeded runs of random operations, each checked at every crash and at a clean
/// stop every 50 steps and at its end; the indexes are checked after every step.
#[test]
fn random_histories_rebuild_the_same_registry_from_their_records() {
    let (mut restarts, mut stops, mut members_seen) = (0, 0, 0);
    let mut seen = Seen::default();
    for seed in 0..300 {
        let mut run = Run::new(seed);
        for step in 1..=400 {
            run.step();
            check_indexes(&run.reg);
            members_seen = members_seen.max(run.reg.members.len());
            if step % 50 == 0 {
                run.stop_and_start();
            }
        }
        restarts += run.restarts;
        stops += run.full_checkpoints;
        seen.add(&run.seen);
    }
    // The runs did what they are for: every kind of change happened often, rooms filled to
    // their limits, and the registry was restarted often.
    assert!(seen.least() >= 100, "{seen:?}");
    assert_eq!(stops, 300 * 8);
    assert!(restarts > stops + 3_000, "{restarts} restarts");
    assert_eq!(members_seen, 10, "the token limit was reached");
}
