//! TCRP requests: from a decoded REQUEST frame to the COMPLIANCE (and COMPLETE) reply bytes.
//!
//! Refusals are replies, not errors: every request gets a COMPLIANCE frame echoing its room
//! name and operation. A success carries both frames in one buffer so that they leave in one
//! write; the event loop holds that buffer until the new token's record is durable.

use std::net::IpAddr;
use std::time::Instant;

use log::debug;
use tcrp::names::{check_room_name, check_username};
use tcrp::payload::{self, ErrorCode, Request};
use tcrp::{Frame, Operation, State};

use crate::outbox::Outbox;
use crate::rate::KeyedLimiter;
use crate::rooms::Registry;

/// Per-IP request rate limit settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// Create/join requests per second per source IP (0: unlimited).
    pub rate: f64,
    /// Burst of requests per source IP.
    pub burst: f64,
}

/// What the event loop must do with a request's reply.
#[derive(Debug)]
pub struct Response {
    /// COMPLIANCE, plus COMPLETE on success.
    pub bytes: Vec<u8>,
    /// The reply issues a token: send it only once the registry's records are durable.
    pub needs_durability: bool,
    /// Close the connection after the reply (the stream can no longer be trusted).
    pub close: bool,
    /// The operation, for metrics.
    pub operation: Operation,
    /// `Ok` or the refusal code, for metrics.
    pub result: Result<(), ErrorCode>,
}

/// Everything a request needs besides the frame.
pub struct Context<'a> {
    /// The room registry.
    pub registry: &'a mut Registry,
    /// Per-IP request limiter.
    pub limiter: &'a mut KeyedLimiter<IpAddr>,
    /// Its settings.
    pub limits: RequestLimits,
    /// Where notices to members go.
    pub out: &'a mut Outbox,
    /// The peer's IP.
    pub peer: IpAddr,
    /// Monotonic now.
    pub now: Instant,
    /// Wall-clock now, Unix seconds (room creation times).
    pub unix_now: f64,
}

/// Answers one decoded frame.
pub fn handle_frame(frame: &Frame<'_>, ctx: &mut Context<'_>) -> Response {
    match answer(frame, ctx) {
        Ok(token) => {
            let mut bytes = Vec::with_capacity(128 + 2 * frame.room_name.len());
            let mut body = Vec::new();
            payload::encode_success(&mut body);
            push_frame(frame, State::Compliance, &body, &mut bytes);
            body.clear();
            payload::encode_complete(&token, &mut body);
            push_frame(frame, State::Complete, &body, &mut bytes);
            Response {
                bytes,
                needs_durability: true,
                close: false,
                operation: frame.operation,
                result: Ok(()),
            }
        }
        Err((code, message)) => {
            debug!("{}: {:?} refused: {}", ctx.peer, frame.operation, message);
            refusal(frame.operation, frame.room_name, code, &message, false)
        }
    }
}

/// A COMPLIANCE failure frame, for requests refused before or without decoding.
pub fn refusal(
    operation: Operation,
    room_name: &[u8],
    code: ErrorCode,
    message: &str,
    close: bool,
) -> Response {
    let mut body = Vec::new();
    payload::encode_failure(code, message, &mut body);
    let mut bytes = Vec::new();
    let frame = Frame {
        operation,
        state: State::Compliance,
        room_name,
        payload: &[],
    };
    push_frame(&frame, State::Compliance, &body, &mut bytes);
    Response {
        bytes,
        needs_durability: false,
        close,
        operation,
        result: Err(code),
    }
}

fn push_frame(request: &Frame<'_>, state: State, body: &[u8], out: &mut Vec<u8>) {
    let reply = Frame {
        operation: request.operation,
        state,
        room_name: request.room_name,
        payload: body,
    };
    // The room name came in through a one-byte size field, so it fits going out.
    let _ = reply.encode(out);
}

fn answer(frame: &Frame<'_>, ctx: &mut Context<'_>) -> Result<String, (ErrorCode, String)> {
    if frame.state != State::Request {
        return Err((
            ErrorCode::MalformedRequest,
            format!("expected a REQUEST frame, got {:?}", frame.state),
        ));
    }
    if !matches!(frame.operation, Operation::CreateRoom | Operation::JoinRoom) {
        return Err((
            ErrorCode::UnsupportedOperation,
            format!("operation {} is not supported", u8::from(frame.operation)),
        ));
    }
    let room_name = check_room_name(frame.room_name)
        .map_err(|rule| (ErrorCode::InvalidRoomName, format!("room name {rule}")))?;
    let request: Request = payload::parse_request(frame.payload).map_err(|e| {
        (
            ErrorCode::MalformedRequest,
            format!("bad request payload: {e}"),
        )
    })?;
    check_username(&request.username)
        .map_err(|rule| (ErrorCode::InvalidUsername, format!("username {rule}")))?;
    if !ctx
        .limiter
        .allow(ctx.peer, ctx.now, ctx.limits.rate, ctx.limits.burst)
    {
        return Err((
            ErrorCode::RateLimited,
            "too many requests; try again shortly".into(),
        ));
    }
    let issued = if frame.operation == Operation::CreateRoom {
        ctx.registry
            .create_room(room_name, &request, None, ctx.now, ctx.unix_now)
    } else {
        ctx.registry
            .join_room(room_name, &request, ctx.now, ctx.out)
    };
    issued
        .map(|i| i.token.as_str().to_owned())
        .map_err(|code| (code, refusal_text(code, room_name, &request.username)))
}

fn refusal_text(code: ErrorCode, room: &str, user: &str) -> String {
    match code {
        ErrorCode::RoomExists => format!("room {room:?} already exists"),
        ErrorCode::RoomNotFound => format!("room {room:?} does not exist"),
        ErrorCode::NameTaken => format!("the name {user:?} is already taken in room {room:?}"),
        ErrorCode::ServerFull => "the server is full (room, member or token limit reached)".into(),
        other => other.as_str().replace('_', " "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rooms::Limits;
    use rand::{rngs::StdRng, SeedableRng};

    fn run(reg: &mut Registry, limiter: &mut KeyedLimiter<IpAddr>, bytes: &[u8]) -> Response {
        let (frame, _) = tcrp::decode(bytes, 4096).unwrap().unwrap();
        let mut out = Outbox::default();
        let mut ctx = Context {
            registry: reg,
            limiter,
            limits: RequestLimits {
                rate: 0.0,
                burst: 0.0,
            },
            out: &mut out,
            peer: "127.0.0.1".parse().unwrap(),
            now: Instant::now(),
            unix_now: 0.0,
        };
        handle_frame(&frame, &mut ctx)
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
}
