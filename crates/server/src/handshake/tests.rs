//! TCRP requests from their bytes to their reply bytes, against a real registry.

use super::replies::{fitting, listed_len, room_list_reply};
use super::*;
use crate::rooms::Limits;
use rand::{rngs::StdRng, SeedableRng};

/// A context for requests from 127.0.0.1 now, with no request limit and the given
/// failed-password allowance (per second, burst; 0: none).
fn context<'a>(
    registry: &'a mut Registry,
    limiter: &'a mut KeyedLimiter<IpAddr>,
    password_failures: &'a mut KeyedLimiter<IpAddr>,
    out: &'a mut Outbox,
    (password_failure_rate, password_failure_burst): (f64, f64),
) -> Context<'a> {
    Context {
        registry,
        limiter,
        password_failures,
        limits: RequestLimits {
            rate: 0.0,
            burst: 0.0,
            password_failure_rate,
            password_failure_burst,
        },
        names: Names::default(),
        out,
        peer: "127.0.0.1".parse().unwrap(),
        now: Instant::now(),
        unix_now: 0.0,
    }
}

/// Runs a request to its reply, doing any password job inline.
fn run(reg: &mut Registry, limiter: &mut KeyedLimiter<IpAddr>, bytes: &[u8]) -> Response {
    run_with_names(reg, limiter, bytes, Names::default())
}

/// As [`run`], with the `[names]` rules given.
fn run_with_names(
    reg: &mut Registry,
    limiter: &mut KeyedLimiter<IpAddr>,
    bytes: &[u8],
    names: Names,
) -> Response {
    let (frame, _) = tcrp::decode(bytes, 4096).unwrap().unwrap();
    let mut out = Outbox::default();
    let mut failures = KeyedLimiter::new(8);
    let mut ctx = context(reg, limiter, &mut failures, &mut out, (0.0, 0.0));
    ctx.names = names;
    match handle_frame(&frame, &mut ctx, None) {
        Step::Reply(r) => r,
        Step::Password(job) => {
            let outcome = password::run(job);
            match handle_frame(&frame, &mut ctx, Some(&outcome)) {
                Step::Reply(r) => r,
                Step::Password(_) => panic!("asked for a password twice"),
            }
        }
    }
}

fn request(op: Operation, room: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    Frame {
        operation: op,
        state: State::Request,
        room_name: room,
        payload,
    }
    .encode(&mut b)
    .unwrap();
    b
}

fn frames(bytes: &[u8]) -> Vec<(State, Vec<u8>)> {
    let mut rest = bytes;
    let mut v = Vec::new();
    while let Some((f, used)) = tcrp::decode(rest, 4096).unwrap() {
        assert_eq!(f.room_name, b"lobby");
        v.push((f.state, f.payload.to_vec()));
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    v
}

#[test]
fn original_create_gets_exact_compliance_and_complete_bytes() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(42)));
    let expected_token = crate::token::Token::generate(&mut StdRng::seed_from_u64(42));
    let mut limiter = KeyedLimiter::new(8);
    let r = run(
        &mut reg,
        &mut limiter,
        &request(Operation::CreateRoom, b"lobby", b"\"alice\""),
    );
    assert!(r.needs_durability && !r.close);
    assert_eq!(
        frames(&r.bytes),
        vec![
            (State::Compliance, b"{\"success\": true}".to_vec()),
            (
                State::Complete,
                format!("{{\"token\": \"{}\"}}", expected_token.as_str()).into_bytes()
            ),
        ]
    );
}

#[test]
fn refusals_carry_code_and_message() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(1)));
    let mut limiter = KeyedLimiter::new(8);
    let cases: [(Vec<u8>, ErrorCode); 5] = [
        (
            request(Operation::JoinRoom, b"lobby", b"\"bob\""),
            ErrorCode::RoomNotFound,
        ),
        (
            request(Operation::Other(9), b"lobby", b"\"bob\""),
            ErrorCode::UnsupportedOperation,
        ),
        (
            request(Operation::CreateRoom, b"lobby", b""),
            ErrorCode::InvalidUsername,
        ),
        (
            request(Operation::CreateRoom, b"lobby", &[0xff]),
            ErrorCode::MalformedRequest,
        ),
        (
            request(Operation::CreateRoom, b"lobby", br#"{"username": 3}"#),
            ErrorCode::MalformedRequest,
        ),
    ];
    for (bytes, code) in cases {
        let r = run(&mut reg, &mut limiter, &bytes);
        assert!(!r.needs_durability);
        let replies = frames(&r.bytes);
        assert_eq!(replies.len(), 1);
        assert_eq!(
            payload::parse_compliance(&replies[0].1),
            Ok(payload::Compliance::Failure {
                code: Some(code),
                message: Some(match code {
                    ErrorCode::RoomNotFound => "room \"lobby\" does not exist".into(),
                    ErrorCode::UnsupportedOperation => "operation 9 is not supported".into(),
                    ErrorCode::InvalidUsername => "username is empty".into(),
                    _ => match payload::parse_compliance(&replies[0].1) {
                        Ok(payload::Compliance::Failure {
                            message: Some(m), ..
                        }) => {
                            assert!(m.starts_with("bad request payload"), "{m}");
                            m
                        }
                        other => panic!("{other:?}"),
                    },
                })
            })
        );
    }
}

#[test]
fn invisible_characters_in_new_names_are_refused_only_when_asked() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(3)));
    let mut limiter = KeyedLimiter::new(8);
    let compliance = |r: &Response| {
        let (frame, _) = tcrp::decode(&r.bytes, 4096).unwrap().unwrap();
        payload::parse_compliance(frame.payload).unwrap()
    };
    let create = |room: &str, user: &str| {
        request(
            Operation::CreateRoom,
            room.as_bytes(),
            serde_json::to_string(user).unwrap().as_bytes(),
        )
    };
    let join = |room: &str, user: &str| {
        request(
            Operation::JoinRoom,
            room.as_bytes(),
            serde_json::to_string(user).unwrap().as_bytes(),
        )
    };
    // Off (the default): accepted, as the original server accepted them.
    let r = run(
        &mut reg,
        &mut limiter,
        &create("lob\u{200b}by", "ali\u{200b}ce"),
    );
    assert_eq!(compliance(&r), payload::Compliance::Success);
    // On: new room names and usernames holding one are refused, naming the character.
    let refused = [
        (
            create("new\u{200b}", "alice"),
            ErrorCode::InvalidRoomName,
            "U+200B",
        ),
        (
            create("plain", "ali\u{202e}ce"),
            ErrorCode::InvalidUsername,
            "U+202E",
        ),
        (
            join("lob\u{200b}by", "b\u{ad}ob"),
            ErrorCode::InvalidUsername,
            "U+00AD",
        ),
    ];
    let invisible = Names {
        refuse_invisible: true,
        ..Names::default()
    };
    for (bytes, code, named) in refused {
        let r = run_with_names(&mut reg, &mut limiter, &bytes, invisible);
        assert!(!r.needs_durability);
        match compliance(&r) {
            payload::Compliance::Failure {
                code: Some(c),
                message: Some(m),
            } => {
                assert_eq!(c, code, "{m}");
                assert!(m.contains(named), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!reg.room_exists("new\u{200b}") && !reg.room_exists("plain"));
    // A room that already exists can still be joined by its name, and visible names pass.
    let r = run_with_names(
        &mut reg,
        &mut limiter,
        &join("lob\u{200b}by", "bob"),
        invisible,
    );
    assert_eq!(compliance(&r), payload::Compliance::Success);
    let r = run_with_names(&mut reg, &mut limiter, &create("plain", "alice"), invisible);
    assert_eq!(compliance(&r), payload::Compliance::Success);
}

/// The refusal a reply carries (its code and message), or `None` for a success.
fn refusal(r: &Response) -> Option<(Option<ErrorCode>, Option<String>)> {
    let (frame, _) = tcrp::decode(&r.bytes, 4096).unwrap().unwrap();
    match payload::parse_compliance(frame.payload).unwrap() {
        payload::Compliance::Success => None,
        payload::Compliance::Failure { code, message } => Some((code, message)),
    }
}

#[test]
fn a_username_like_a_members_is_refused_only_when_asked_and_only_after_the_password() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(4)));
    let mut limiter = KeyedLimiter::new(8);
    let join =
        |room: &str, body: &str| request(Operation::JoinRoom, room.as_bytes(), body.as_bytes());
    let lookalikes = Names {
        refuse_lookalike_usernames: true,
        ..Names::default()
    };
    let r = run(
        &mut reg,
        &mut limiter,
        &request(Operation::CreateRoom, b"r", br#""alice""#),
    );
    assert_eq!(refusal(&r), None);
    // Off (the default): a Cyrillic а passes, as the original server let it.
    let r = run(&mut reg, &mut limiter, &join("r", r#""\u0430lice""#));
    assert_eq!(refusal(&r), None);
    // On: a capital I for l, a hidden character, and case are refused, naming the member.
    for twin in [r#""aIice""#, r#""al\u200bice""#, r#""ALICE""#] {
        let r = run_with_names(&mut reg, &mut limiter, &join("r", twin), lookalikes);
        let (code, message) = refusal(&r).expect(twin);
        assert_eq!(code, Some(ErrorCode::NameTaken), "{message:?}");
        assert!(message.unwrap().contains(r#"looks like "alice""#), "{twin}");
        assert!(!r.needs_durability);
    }
    // Other names pass.
    let r = run_with_names(&mut reg, &mut limiter, &join("r", r#""bob""#), lookalikes);
    assert_eq!(refusal(&r), None);
    // In a room with a password, a wrong password is refused first, so the refusal of a
    // look-alike never names a member to someone without the password.
    let r = run(
        &mut reg,
        &mut limiter,
        &request(
            Operation::CreateRoom,
            b"locked",
            br#"{"username": "carol", "password": "pw"}"#,
        ),
    );
    assert_eq!(refusal(&r), None);
    for (password, code) in [("no", ErrorCode::BadPassword), ("pw", ErrorCode::NameTaken)] {
        let body = format!(r#"{{"username": "caroI", "password": "{password}"}}"#);
        let r = run_with_names(&mut reg, &mut limiter, &join("locked", &body), lookalikes);
        assert_eq!(refusal(&r).unwrap().0, Some(code), "password {password:?}");
    }
}

/// A full room is refused as full before its members are compared with the name.
#[test]
fn a_lookalike_join_of_a_full_room_is_refused_as_full() {
    let limits = Limits {
        max_members_per_room: 2,
        ..Limits::default()
    };
    let mut reg = Registry::new(limits, Box::new(StdRng::seed_from_u64(7)));
    let mut limiter = KeyedLimiter::new(8);
    let lookalikes = Names {
        refuse_lookalike_usernames: true,
        ..Names::default()
    };
    for (op, user) in [
        (Operation::CreateRoom, "alice"),
        (Operation::JoinRoom, "bob"),
    ] {
        let body = serde_json::to_string(user).unwrap();
        let r = run(
            &mut reg,
            &mut limiter,
            &request(op, b"full", body.as_bytes()),
        );
        assert_eq!(refusal(&r), None, "{user}");
    }
    let r = run_with_names(
        &mut reg,
        &mut limiter,
        &request(Operation::JoinRoom, b"full", br#""aIice""#),
        lookalikes,
    );
    let full_room = (
        Some(ErrorCode::ServerFull),
        Some(
            "room \"full\" is full (2 members, the most limits.max_members_per_room allows)"
                .to_owned(),
        ),
    );
    assert_eq!(refusal(&r), Some(full_room.clone()));
    // Without the look-alike check too; the message names the room's own cap, where it said
    // "the server is full" (found by a review).
    let r = run(
        &mut reg,
        &mut limiter,
        &request(Operation::JoinRoom, b"full", br#""carol""#),
    );
    assert_eq!(refusal(&r), Some(full_room));
}

/// A join refused because the server holds `max_tokens` members in all says the server is
/// full, naming that cap.
#[test]
fn a_join_refused_at_the_token_cap_names_the_servers_cap() {
    let limits = Limits {
        max_tokens: 2,
        ..Limits::default()
    };
    let mut reg = Registry::new(limits, Box::new(StdRng::seed_from_u64(8)));
    let mut limiter = KeyedLimiter::new(8);
    for (op, user) in [
        (Operation::CreateRoom, "alice"),
        (Operation::JoinRoom, "bob"),
        (Operation::JoinRoom, "carol"),
    ] {
        let body = serde_json::to_string(user).unwrap();
        let r = run(&mut reg, &mut limiter, &request(op, b"r", body.as_bytes()));
        let expected = (user == "carol").then(|| {
            (
                Some(ErrorCode::ServerFull),
                Some(
                    "the server is full (its limit of members in all rooms, limits.max_tokens, \
                     is reached)"
                        .to_owned(),
                ),
            )
        });
        assert_eq!(refusal(&r), expected, "{user}");
    }
}

#[test]
fn a_room_name_like_an_open_rooms_is_refused_only_when_asked_naming_only_listed_rooms() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(6)));
    let mut limiter = KeyedLimiter::new(8);
    let create =
        |room: &str, body: &str| request(Operation::CreateRoom, room.as_bytes(), body.as_bytes());
    let lookalikes = Names {
        refuse_lookalike_room_names: true,
        ..Names::default()
    };
    for (room, body) in [
        ("lobby", r#""host""#),
        ("secret", r#"{"username": "host", "listed": false}"#),
    ] {
        assert_eq!(
            refusal(&run(&mut reg, &mut limiter, &create(room, body))),
            None
        );
    }
    // Off (the default): a Cyrillic о passes, as the original server let it.
    let r = run(&mut reg, &mut limiter, &create("l\u{43e}bby", r#""eve""#));
    assert_eq!(refusal(&r), None);
    // On: look-alikes are refused; a listed room is named, an unlisted one is not.
    // `lob\u{200b}by` looks like both `lobby` and `lоbby`: either may be named.
    for (twin, named) in [
        ("lobbies", None),
        ("IobbY", Some(r#"the existing room "l"#)),
        ("lob\u{200b}by", Some(r#"the existing room "l"#)),
        ("LOBBY", Some(r#"the existing room "l"#)),
        ("s\u{435}cret", Some("an existing room")),
    ] {
        let r = run_with_names(
            &mut reg,
            &mut limiter,
            &create(twin, r#""eve""#),
            lookalikes,
        );
        match named {
            None => assert_eq!(refusal(&r), None, "{twin:?} is no look-alike"),
            Some(text) => {
                let (code, message) = refusal(&r).expect(twin);
                let message = message.unwrap();
                assert_eq!(code, Some(ErrorCode::RoomExists), "{message}");
                assert!(message.contains(text), "{message}");
                assert!(!message.contains("\"secret\""), "{message}");
            }
        }
    }
    assert!(!reg.room_exists("lob\u{200b}by") && !reg.room_exists("s\u{435}cret"));
    // A look-alike create with a password is refused before the password is hashed.
    let bytes = create(
        "l\u{43e}bb\u{443}",
        r#"{"username": "eve", "password": "pw"}"#,
    );
    let (frame, _) = tcrp::decode(&bytes, 4096).unwrap().unwrap();
    let (mut out, mut failures) = (Outbox::default(), KeyedLimiter::new(8));
    let mut ctx = context(&mut reg, &mut limiter, &mut failures, &mut out, (0.0, 0.0));
    ctx.names = lookalikes;
    match handle_frame(&frame, &mut ctx, None) {
        Step::Reply(r) => assert_eq!(refusal(&r).unwrap().0, Some(ErrorCode::RoomExists)),
        Step::Password(_) => panic!("a refused create was sent to be hashed"),
    }
}

/// The COMPLETE payload of a reply (COMPLIANCE then COMPLETE).
fn complete_payload(r: &Response) -> Vec<u8> {
    let (_, used) = tcrp::decode(&r.bytes, 1 << 20).unwrap().unwrap();
    let (complete, _) = tcrp::decode(&r.bytes[used..], 1 << 20).unwrap().unwrap();
    complete.payload.to_vec()
}

fn completion(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&complete_payload(r)).unwrap()
}

/// A registry with no cap on rooms or members per room.
fn uncapped(seed: u64) -> Registry {
    let limits = Limits {
        max_rooms: 0,
        max_members_per_room: 0,
        ..Limits::default()
    };
    Registry::new(limits, Box::new(StdRng::seed_from_u64(seed)))
}

/// A Presence reply reads the members only up to the first that does not fit: a room of
/// 100,000 members costs a request the few hundred it shows, not a copy of them all
/// (measured before: 7.2–8.6 ms a request in the release build, the loop held for it).
#[test]
fn a_presence_reply_reads_the_members_only_up_to_the_cut() {
    let read = std::cell::Cell::new(0usize);
    let members = (0..100_000).map(|i| {
        read.set(read.get() + 1);
        payload::PresentMember {
            name: format!("member{i:06}"),
            registered: true,
        }
    });
    let reply = presence_reply("big", "host", members, None);
    let body: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    let shown = body["members"].as_array().unwrap().len();
    assert_eq!(body["more"], true);
    assert!(reply.len() <= MAX_REPLY_BYTES, "{}", reply.len());
    assert!((300..1_000).contains(&shown), "{shown} shown");
    assert_eq!(read.get(), shown + 1, "read up to the first left out");
}

#[test]
fn presence_names_the_member_asking_even_when_the_cut_leaves_it_out() {
    let mut reg = uncapped(8);
    let mut limiter = KeyedLimiter::new(8);
    let now = Instant::now();
    let host = IpAddr::from([127, 0, 0, 1]);
    reg.create_room("big", &Request::original("h"), host, None, now, 0.0)
        .unwrap();
    let mut out = Outbox::default();
    let mut last = String::new();
    for i in 0..300 {
        let name = format!("{i:03}{}", "m".repeat(60));
        last = reg
            .join_room("big", &Request::original(&name), host, now, &mut out)
            .unwrap()
            .token
            .as_str()
            .to_owned();
    }
    let ask = |reg: &mut Registry, limiter: &mut KeyedLimiter<IpAddr>, payload: &str| {
        completion(&run(
            reg,
            limiter,
            &request(Operation::Presence, b"big", payload.as_bytes()),
        ))
    };
    let p = ask(&mut reg, &mut limiter, &format!(r#"{{"token": "{last}"}}"#));
    assert_eq!(p["more"], true, "the reply is cut");
    let listed = p["members"].as_array().unwrap();
    assert!(listed
        .iter()
        .all(|m| !m["name"].as_str().unwrap().starts_with("299")));
    assert!(p["you"]["name"].as_str().unwrap().starts_with("299"));
    assert_eq!(p["you"]["registered"], false);
    // No token, or a token of no member: no `you`.
    assert!(ask(&mut reg, &mut limiter, "{}").get("you").is_none());
    let stranger = format!(r#"{{"token": "{}"}}"#, "0".repeat(32));
    assert!(ask(&mut reg, &mut limiter, &stranger).get("you").is_none());
}

#[test]
fn passwords_list_presence_and_history() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(5)));
    let mut limiter = KeyedLimiter::new(8);
    let r = run(
        &mut reg,
        &mut limiter,
        &request(
            Operation::CreateRoom,
            b"vault",
            br#"{"username": "h", "password": "pw"}"#,
        ),
    );
    let host_token = completion(&r)["token"].as_str().unwrap().to_owned();
    assert!(reg
        .password_hash("vault")
        .unwrap()
        .starts_with("$argon2id$"));
    for (payload, code) in [
        (&br#"{"username": "m"}"#[..], Some(ErrorCode::BadPassword)),
        (
            br#"{"username": "m", "password": "no"}"#,
            Some(ErrorCode::BadPassword),
        ),
        (b"\"m\"", Some(ErrorCode::BadPassword)),
        (br#"{"username": "m", "password": "pw"}"#, None),
    ] {
        let r = run(
            &mut reg,
            &mut limiter,
            &request(Operation::JoinRoom, b"vault", payload),
        );
        assert_eq!(r.result.err(), code);
    }
    run(
        &mut reg,
        &mut limiter,
        &request(
            Operation::CreateRoom,
            b"hidden",
            br#"{"username": "h", "listed": false}"#,
        ),
    );
    let list = completion(&run(
        &mut reg,
        &mut limiter,
        &request(Operation::ListRooms, b"", b"{}"),
    ));
    assert_eq!(list["rooms"][0]["name"], "vault");
    assert_eq!(list["rooms"][0]["members"], 2);
    assert_eq!(list["rooms"][0]["password"], true);
    assert_eq!(
        list["rooms"].as_array().unwrap().len(),
        1,
        "unlisted room left out"
    );
    // Presence: the password or a member token opens it.
    let r = run(
        &mut reg,
        &mut limiter,
        &request(Operation::Presence, b"vault", b"{}"),
    );
    assert_eq!(r.result, Err(ErrorCode::BadPassword));
    let who = format!(r#"{{"token": "{host_token}"}}"#);
    let p = completion(&run(
        &mut reg,
        &mut limiter,
        &request(Operation::Presence, b"vault", who.as_bytes()),
    ));
    assert_eq!(p["host"], "h");
    assert_eq!(p["members"][1]["name"], "m");
    assert_eq!(p["members"][1]["registered"], false);
    // Asked with a member token, the reply also names the member asking.
    assert_eq!(p["you"]["name"], "h");
    assert_eq!(p["you"]["registered"], false);
    // History: members only.
    let r = run(
        &mut reg,
        &mut limiter,
        &request(Operation::History, b"vault", b"{}"),
    );
    assert_eq!(r.result, Err(ErrorCode::NotMember));
    let h = completion(&run(
        &mut reg,
        &mut limiter,
        &request(Operation::History, b"vault", who.as_bytes()),
    ));
    assert_eq!(h["messages"].as_array().unwrap().len(), 0);
    assert_eq!(h["more"], false);
}

/// Creates `room` with `password` in a fresh registry.
fn room_with_password(room: &str, password: &str) -> Registry {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(3)));
    let mut limiter = KeyedLimiter::new(8);
    let body = format!(r#"{{"username": "h", "password": "{password}"}}"#);
    let r = run(
        &mut reg,
        &mut limiter,
        &request(Operation::CreateRoom, room.as_bytes(), body.as_bytes()),
    );
    assert_eq!(r.result, Ok(()));
    reg
}

#[test]
fn a_create_with_a_password_that_will_be_refused_is_refused_before_any_hash() {
    let mut reg = room_with_password("taken", "pw");
    reg.set_limits(Limits {
        max_rooms: 2,
        ..Limits::default()
    });
    reg.create_room(
        "other",
        &Request::original("h"),
        [127, 0, 0, 1].into(),
        None,
        Instant::now(),
        0.0,
    )
    .unwrap();
    let mut limiter = KeyedLimiter::new(8);
    let mut failures = KeyedLimiter::new(8);
    let mut out = Outbox::default();
    for (room, code) in [
        (&b"taken"[..], ErrorCode::RoomExists),
        (b"third", ErrorCode::ServerFull),
    ] {
        let create = request(
            Operation::CreateRoom,
            room,
            br#"{"username": "x", "password": "p"}"#,
        );
        let (frame, _) = tcrp::decode(&create, 4096).unwrap().unwrap();
        let mut ctx = context(&mut reg, &mut limiter, &mut failures, &mut out, (0.0, 0.0));
        match handle_frame(&frame, &mut ctx, None) {
            Step::Reply(r) => assert_eq!(r.result, Err(code)),
            Step::Password(_) => panic!("a refused create was sent to the hasher"),
        }
    }
}

#[test]
fn a_create_with_an_empty_password_is_refused_not_opened_unprotected() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(3)));
    let mut limiter = KeyedLimiter::new(8);
    let create = |payload: &[u8]| request(Operation::CreateRoom, b"lobby", payload);
    let r = run(
        &mut reg,
        &mut limiter,
        &create(br#"{"username": "x", "password": ""}"#),
    );
    assert_eq!(r.result, Err(ErrorCode::MalformedRequest));
    assert!(!r.needs_durability && !reg.room_exists("lobby"));
    // Leaving the key out is how a room without a password is made.
    let r = run(&mut reg, &mut limiter, &create(br#"{"username": "x"}"#));
    assert_eq!(r.result, Ok(()));
    assert!(reg.room_exists("lobby"));
}

/// An empty password at a protected room is a missing one: refused at once, never sent
/// to the hashing thread (no room has it).
#[test]
fn an_empty_password_at_a_protected_room_is_refused_unhashed() {
    let mut reg = room_with_password("p", "pw");
    let mut limiter = KeyedLimiter::new(8);
    let mut failures = KeyedLimiter::new(8);
    let mut out = Outbox::default();
    for (op, payload) in [
        (
            Operation::JoinRoom,
            &br#"{"username": "y", "password": ""}"#[..],
        ),
        (Operation::Presence, br#"{"password": ""}"#),
    ] {
        let bytes = request(op, b"p", payload);
        let (frame, _) = tcrp::decode(&bytes, 4096).unwrap().unwrap();
        let mut ctx = context(&mut reg, &mut limiter, &mut failures, &mut out, (0.0, 0.0));
        match handle_frame(&frame, &mut ctx, None) {
            Step::Reply(r) => assert_eq!(r.result, Err(ErrorCode::BadPassword), "{op:?}"),
            Step::Password(_) => panic!("{op:?}: an empty password was sent to the hasher"),
        }
    }
}

#[test]
fn a_password_checked_for_a_closed_room_does_not_open_its_successor() {
    // `old` is the room the check was queued for; by the time the outcome comes back the
    // room has been closed and re-created (`new`) with another password.
    let old = room_with_password("vault", "old-pw");
    let mut new = room_with_password("vault", "new-pw");
    let mut limiter = KeyedLimiter::new(8);
    let mut failures = KeyedLimiter::new(8);
    let mut out = Outbox::default();
    let join = request(
        Operation::JoinRoom,
        b"vault",
        br#"{"username": "m", "password": "old-pw"}"#,
    );
    let (frame, _) = tcrp::decode(&join, 4096).unwrap().unwrap();
    let old_hash = old.password_hash("vault").unwrap().to_owned();
    let outcome = password::run(password::Job::Verify {
        password: "old-pw".into(),
        hash: old_hash.clone(),
    });
    assert_eq!(
        outcome,
        Outcome::Verified {
            matched: true,
            hash: old_hash
        }
    );
    let mut ctx = context(&mut new, &mut limiter, &mut failures, &mut out, (1.0, 5.0));
    // Not admitted on the old check: the password is checked again, against the new hash.
    let job = match handle_frame(&frame, &mut ctx, Some(&outcome)) {
        Step::Password(job) => job,
        Step::Reply(r) => panic!("answered without a new check: {:?}", r.result),
    };
    let new_hash = ctx.registry.password_hash("vault").unwrap().to_owned();
    match &job {
        password::Job::Verify { hash, .. } => assert_eq!(*hash, new_hash),
        password::Job::Hash { .. } => panic!("a hash job for a join"),
    }
    let second = password::run(job);
    match handle_frame(&frame, &mut ctx, Some(&second)) {
        Step::Reply(r) => assert_eq!(r.result, Err(ErrorCode::BadPassword)),
        Step::Password(_) => panic!("checked a third time"),
    }
    // The same flow with the new room's password admits.
    let join = request(
        Operation::JoinRoom,
        b"vault",
        br#"{"username": "m", "password": "new-pw"}"#,
    );
    let (frame, _) = tcrp::decode(&join, 4096).unwrap().unwrap();
    let right = password::run(password::Job::Verify {
        password: "new-pw".into(),
        hash: new_hash,
    });
    match handle_frame(&frame, &mut ctx, Some(&right)) {
        Step::Reply(r) => assert_eq!(r.result, Ok(())),
        Step::Password(_) => panic!("checked again although the room did not change"),
    }
}

#[test]
fn a_right_password_gets_its_token_back_even_when_the_room_closed_meanwhile() {
    let mut with_room = room_with_password("vault", "pw");
    // The same daemon once the host has left: no room any more.
    let mut without = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(4)));
    let mut failures = KeyedLimiter::new(8);
    let limits = RequestLimits {
        rate: 0.0,
        burst: 0.0,
        password_failure_rate: 1.0 / 60.0,
        password_failure_burst: 1.0,
    };
    let peer: IpAddr = "127.0.0.1".parse().unwrap();
    let now = Instant::now();
    let bytes = request(Operation::Presence, b"vault", br#"{"password": "pw"}"#);
    let (frame, _) = tcrp::decode(&bytes, 4096).unwrap().unwrap();
    // One request as the loop hands it over: no request limit, the shared failure limiter.
    let handle = |registry: &mut Registry,
                  failures: &mut KeyedLimiter<IpAddr>,
                  outcome: Option<&Outcome>| {
        let mut limiter = KeyedLimiter::new(8);
        let mut out = Outbox::default();
        let mut ctx = Context {
            registry,
            limiter: &mut limiter,
            password_failures: failures,
            limits,
            names: Names::default(),
            out: &mut out,
            peer,
            now,
            unix_now: 0.0,
        };
        handle_frame(&frame, &mut ctx, outcome)
    };
    let Step::Password(job) = handle(&mut with_room, &mut failures, None) else {
        panic!("no check asked for");
    };
    assert!(
        !failures.has_budget(peer, now, 1.0 / 60.0, 1.0),
        "the check took it"
    );
    let outcome = password::run(job);
    let reply = handle(&mut without, &mut failures, Some(&outcome));
    match reply {
        Step::Reply(r) => assert_eq!(r.result, Err(ErrorCode::RoomNotFound)),
        Step::Password(_) => panic!("checked twice"),
    }
    assert!(
        failures.has_budget(peer, now, 1.0 / 60.0, 1.0),
        "the right password's token was not given back"
    );
}

#[test]
fn each_check_in_flight_holds_a_failure_token_until_it_is_right() {
    let mut reg = room_with_password("vault", "pw");
    let mut limiter = KeyedLimiter::new(8);
    let mut failures = KeyedLimiter::new(8);
    let mut out = Outbox::default();
    let mut ctx = context(
        &mut reg,
        &mut limiter,
        &mut failures,
        &mut out,
        (1.0 / 60.0, 3.0),
    );
    let join = |pw: &str| {
        request(
            Operation::JoinRoom,
            b"vault",
            format!(r#"{{"username": "m{pw}", "password": "{pw}"}}"#).as_bytes(),
        )
    };
    // Three guesses queued at once (none answered yet): the fourth is refused unchecked.
    let guesses: Vec<Vec<u8>> = ["a", "b", "pw"].iter().map(|p| join(p)).collect();
    let mut jobs = Vec::new();
    for g in &guesses {
        let (frame, _) = tcrp::decode(g, 4096).unwrap().unwrap();
        match handle_frame(&frame, &mut ctx, None) {
            Step::Password(job) => jobs.push(job),
            Step::Reply(r) => panic!("{:?}", r.result),
        }
    }
    let fourth = join("c");
    let (frame, _) = tcrp::decode(&fourth, 4096).unwrap().unwrap();
    match handle_frame(&frame, &mut ctx, None) {
        Step::Reply(r) => assert_eq!(r.result, Err(ErrorCode::RateLimited)),
        Step::Password(_) => panic!("a check beyond the allowance"),
    }
    // The outcomes: two wrong, one right; the right one gives its token back.
    let mut results = Vec::new();
    for (g, job) in guesses.iter().zip(jobs) {
        let (frame, _) = tcrp::decode(g, 4096).unwrap().unwrap();
        let outcome = password::run(job);
        match handle_frame(&frame, &mut ctx, Some(&outcome)) {
            Step::Reply(r) => results.push(r.result),
            Step::Password(_) => panic!("checked twice"),
        }
    }
    assert_eq!(
        results,
        vec![
            Err(ErrorCode::BadPassword),
            Err(ErrorCode::BadPassword),
            Ok(())
        ]
    );
    let (frame, _) = tcrp::decode(&fourth, 4096).unwrap().unwrap();
    assert!(matches!(
        handle_frame(&frame, &mut ctx, None),
        Step::Password(_)
    ));
    assert!(matches!(
        handle_frame(&frame, &mut ctx, None),
        Step::Reply(Response {
            result: Err(ErrorCode::RateLimited),
            ..
        })
    ));
}

/// The room list of a registry holding rooms of these names, and its payload's length.
fn list_of(names: impl IntoIterator<Item = String>) -> (payload::RoomList, usize) {
    let mut reg = uncapped(3);
    for name in names {
        reg.create_room(
            &name,
            &Request::original("h"),
            IpAddr::from([127, 0, 0, 1]),
            None,
            Instant::now(),
            0.0,
        )
        .unwrap();
    }
    let r = run(
        &mut reg,
        &mut KeyedLimiter::new(8),
        &request(Operation::ListRooms, b"", b"{}"),
    );
    let complete = complete_payload(&r);
    (payload::parse_json(&complete).unwrap(), complete.len())
}

#[test]
fn a_long_room_list_is_cut_to_fit_one_reply() {
    let (list, len) = list_of((0..400).map(|i| format!("{i:03}-{}", "r".repeat(200))));
    assert!(len <= MAX_LIST_BYTES, "{len}");
    assert!(list.more);
    assert!(list.rooms.len() > 10);
    assert!(list.rooms[0].name.starts_with("000-"));
}

/// `count` rooms of short names, created in an order unlike their names'.
fn shuffled_names(count: usize) -> impl Iterator<Item = String> {
    (0..count).map(move |i| format!("r{:05}", (i * 7919) % count))
}

#[test]
fn many_short_rooms_fill_the_reply_with_the_first_names_and_say_there_are_more() {
    let (list, len) = list_of(shuffled_names(5000));
    assert!(list.more);
    let names: Vec<String> = list.rooms.iter().map(|r| r.name.clone()).collect();
    let first: Vec<String> = (0..names.len()).map(|i| format!("r{i:05}")).collect();
    assert_eq!(names, first);
    // Full: one more entry of this size would not have fitted.
    let entry = listed_len(&list.rooms[0]);
    assert!(
        len <= MAX_LIST_BYTES && len + entry > MAX_LIST_BYTES,
        "{len}"
    );
    // Fewer rooms than a reply holds: all of them, and no "more".
    let (all, _) = list_of(shuffled_names(100));
    assert!(!all.more);
    assert_eq!(all.rooms.len(), 100);
    assert!(all.rooms.windows(2).all(|w| w[0].name < w[1].name));
}

#[test]
fn a_list_cut_short_of_the_shortest_entries_still_says_there_are_more() {
    // `"password":true` is a byte shorter than `"password":false`: an entry of a
    // one-byte name, one member, `created_at` 0.0 and a password is 58 bytes with its
    // comma. Every printable one-byte name but `"` and `\` (93) and then two-byte names,
    // all with a password: the reply holds all but the last of 262 rooms, and must say
    // that one was left out, exactly as when every room is sorted.
    let mut reg = uncapped(5);
    let one_byte = (b' '..=b'~')
        .filter(|b| !matches!(b, b'"' | b'\\'))
        .map(|b| char::from(b).to_string());
    let two_bytes =
        (0..169u8).map(|i| format!("{}{}", char::from(b'A' + i / 26), char::from(b'a' + i % 26)));
    let names: Vec<String> = one_byte.chain(two_bytes).collect();
    for name in &names {
        reg.create_room(
            name,
            &Request::original("h"),
            IpAddr::from([127, 0, 0, 1]),
            Some("hash".into()),
            Instant::now(),
            0.0,
        )
        .unwrap();
    }
    assert_eq!(names.len(), 262);
    let sorted_all = room_list_reply(reg.list_rooms(usize::MAX));
    let reply: payload::RoomList = serde_json::from_slice(&list_rooms(&mut reg)).unwrap();
    let expected: payload::RoomList = serde_json::from_slice(&sorted_all).unwrap();
    assert!(expected.more, "the test needs more rooms than fit");
    assert_eq!(reply.rooms.len(), expected.rooms.len());
    assert_eq!(
        reply.more,
        expected.more,
        "{} rooms listed",
        reply.rooms.len()
    );
    assert_eq!(reply, expected);
}

#[test]
fn non_request_state_and_bad_room_names_are_refused() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(1)));
    let mut limiter = KeyedLimiter::new(8);
    let mut b = Vec::new();
    Frame {
        operation: Operation::CreateRoom,
        state: State::Complete,
        room_name: b"x",
        payload: b"\"a\"",
    }
    .encode(&mut b)
    .unwrap();
    assert_eq!(
        run(&mut reg, &mut limiter, &b).result,
        Err(ErrorCode::MalformedRequest)
    );
    let r = run(
        &mut reg,
        &mut limiter,
        &request(Operation::CreateRoom, &[0xc3, 0x28], b"\"a\""),
    );
    assert_eq!(r.result, Err(ErrorCode::InvalidRoomName));
    let r = run(
        &mut reg,
        &mut limiter,
        &request(Operation::CreateRoom, b"", b"\"a\""),
    );
    assert_eq!(r.result, Err(ErrorCode::InvalidRoomName));
}

#[test]
fn a_password_that_cannot_be_hashed_refuses_the_create_and_opens_no_room() {
    let mut reg = Registry::new(Limits::default(), Box::new(StdRng::seed_from_u64(9)));
    let mut limiter = KeyedLimiter::new(8);
    let mut failures = KeyedLimiter::new(8);
    let mut out = Outbox::default();
    let create = request(
        Operation::CreateRoom,
        b"vault",
        br#"{"username": "h", "password": "pw"}"#,
    );
    let (frame, _) = tcrp::decode(&create, 4096).unwrap().unwrap();
    let mut ctx = context(&mut reg, &mut limiter, &mut failures, &mut out, (0.0, 0.0));
    let failed = Outcome::Hashed(Err("out of memory".into()));
    let r = match handle_frame(&frame, &mut ctx, Some(&failed)) {
        Step::Reply(r) => r,
        Step::Password(_) => panic!("hashed again"),
    };
    assert!(!r.needs_durability);
    let (code, message) = refusal(&r).expect("refused");
    assert_eq!(code, Some(ErrorCode::MalformedRequest));
    let message = message.unwrap();
    assert!(
        message.contains("cannot hash the password: out of memory"),
        "{message}"
    );
    assert!(!reg.room_exists("vault"), "opened without its password");
}

#[test]
fn only_the_leading_items_that_fit_are_kept_up_to_the_last_byte() {
    // Each of these takes three bytes: two digits and a comma.
    let items = [10u8, 20, 30];
    assert_eq!(fitting(items, 1, 10), (vec![10, 20, 30], false));
    // 1 + 3 + 3 = 7: the second fills the bound exactly and is kept.
    assert_eq!(fitting(items, 1, 7), (vec![10, 20], true));
    assert_eq!(fitting(items, 1, 6), (vec![10], true));
    assert_eq!(fitting(items, 5, 7), (vec![], true));
    assert_eq!(fitting(Vec::<u8>::new(), 7, 7), (vec![], false));
}

/// A history message from bob with `text`, numbered `seq`.
fn message(seq: u64, text: &str) -> payload::HistoryMessage {
    payload::HistoryMessage {
        seq,
        sender: "bob".into(),
        text: text.into(),
        at: 1.5,
        truncated: false,
    }
}

/// The page `history_reply` makes of `messages`, checked to fit in one reply.
fn history_page_of(messages: Vec<payload::HistoryMessage>, more: bool) -> payload::HistoryPage {
    let raw = history_reply(messages, more);
    assert!(raw.len() <= MAX_REPLY_BYTES, "{} bytes", raw.len());
    payload::parse_json(&raw).unwrap()
}

#[test]
fn a_history_page_too_large_for_one_reply_keeps_its_newest_messages_and_says_more() {
    // Five messages of 4000 bytes: three fit in 15 KiB, the two oldest are left out.
    let texts: Vec<String> = (0..5)
        .map(|i| format!("m{i}-{}", "x".repeat(3997)))
        .collect();
    let all: Vec<_> = (0..5).map(|i| message(i, &texts[i as usize])).collect();
    let page = history_page_of(all.clone(), false);
    assert!(page.more, "the left-out messages are older ones");
    assert_eq!(page.messages, all[2..]);
    // A page that fits comes whole, and says `more` only when the registry did.
    for more in [false, true] {
        let page = history_page_of(all[..3].to_vec(), more);
        assert_eq!(page.messages, all[..3]);
        assert_eq!(page.more, more);
    }
}

/// Bytes a page of one message takes besides the message's JSON, as the cut counts them:
/// the frame `{"messages":[],"more":true}` (27) and a comma each for it and the message.
const ONE_MESSAGE_PAGE: usize = 29;

/// The longest prefix of `text` (whole characters) whose message, marked truncated, fits
/// alone in a reply.
fn longest_fitting_prefix(seq: u64, text: &str) -> String {
    let fits = |end: usize| {
        let mut m = message(seq, &text[..end]);
        m.truncated = true;
        serde_json::to_vec(&m).unwrap().len() + ONE_MESSAGE_PAGE <= MAX_REPLY_BYTES
    };
    // Shorter prefixes are shorter JSON: the prefixes that fit lead the boundaries.
    let ends: Vec<usize> = (0..=text.len())
        .filter(|&end| text.is_char_boundary(end))
        .collect();
    let fitting_prefixes = ends.partition_point(|&end| fits(end));
    text[..ends[fitting_prefixes - 1]].to_owned()
}

#[test]
fn a_newest_message_too_large_alone_is_cut_to_the_longest_text_that_fits_and_marked() {
    for (what, text) in [
        ("ASCII", "a".repeat(20_000)),
        ("control characters", "\u{1}".repeat(4000)),
        ("two-byte characters", "\u{e9}".repeat(9000)),
        ("mixed", "\u{1}\u{e9}z\u{1F600}".repeat(3000)),
    ] {
        let older = message(6, "older");
        let page = history_page_of(vec![older, message(7, &text)], false);
        assert!(page.more, "{what}: the older message is left out");
        assert_eq!(page.messages.len(), 1, "{what}");
        let m = &page.messages[0];
        assert_eq!(m.seq, 7, "{what}");
        assert!(m.truncated, "{what}");
        assert!(!m.text.is_empty(), "{what}");
        assert_eq!(m.text, longest_fitting_prefix(7, &text), "{what}");
    }
}

#[test]
fn a_message_that_fills_the_reply_to_its_last_byte_comes_whole() {
    let json_len = |text: &str| serde_json::to_vec(&message(1, text)).unwrap().len();
    let text = "y".repeat(MAX_REPLY_BYTES - ONE_MESSAGE_PAGE - json_len(""));
    assert_eq!(json_len(&text) + ONE_MESSAGE_PAGE, MAX_REPLY_BYTES);
    let page = history_page_of(vec![message(1, &text)], false);
    assert_eq!(page.messages, vec![message(1, &text)]);
    assert!(!page.more);
    // One byte more and it no longer fits whole: cut to what fits with its mark.
    let longer = format!("{text}y");
    let page = history_page_of(vec![message(1, &longer)], false);
    assert!(page.messages[0].truncated);
    assert_eq!(page.messages[0].text, longest_fitting_prefix(1, &longer));
    assert!(page.messages[0].text.len() < text.len());
}
