//! TCRP requests: from a decoded REQUEST frame to the COMPLIANCE (and COMPLETE) reply bytes.
//!
//! Refusals are replies, not errors: every request gets a COMPLIANCE frame echoing its room
//! name and operation. A success carries both frames in one buffer so that they leave in one
//! write; the event loop holds that buffer until the new token's record is durable.
//!
//! The operations are here; `password_gate` decides who enters a protected room (each check
//! paid for with a failure token up front), and `replies` makes the bounded JSON replies
//! (ListRooms, Presence, History) that the COMPLETE frames carry.

mod password_gate;
mod replies;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::time::Instant;

use log::debug;
use tcrp::names::{check_room_name, check_username, check_visible, NameRule};
use tcrp::payload::{self, ErrorCode, Request};
use tcrp::{Frame, Operation, State};

use crate::config::Names;
use crate::outbox::Outbox;
use crate::password::{self, Outcome};
use crate::rate::{self, KeyedLimiter};
use crate::rooms::{Issued, Registry};
use password_gate::check_password;
pub use password_gate::give_back_check;
use replies::{history_reply, list_rooms, presence_reply};
pub use replies::{MAX_LIST_BYTES, MAX_REPLY_BYTES};

/// Per-source request rate limit settings (a source is an IPv4 address or an IPv6 /64,
/// [`rate::source`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// Requests per second per source (0: unlimited).
    pub rate: f64,
    /// Burst of requests per source.
    pub burst: f64,
    /// Failed password attempts per second per source (0: unlimited).
    pub password_failure_rate: f64,
    /// Burst of failed password attempts.
    pub password_failure_burst: f64,
}

/// Default page size of a History request.
pub const HISTORY_PAGE: usize = 20;
/// Largest page a History request may ask for.
pub const MAX_HISTORY_PAGE: usize = 100;

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

/// The next step for a request.
pub enum Step {
    /// The reply is ready.
    Reply(Response),
    /// A password must be hashed or checked first (off the loop); call [`handle_frame`] again
    /// with the outcome.
    Password(password::Job),
}

/// Everything a request needs besides the frame.
pub struct Context<'a> {
    /// The room registry.
    pub registry: &'a mut Registry,
    /// Per-source request limiter.
    pub limiter: &'a mut KeyedLimiter<IpAddr>,
    /// Per-source failed-password limiter.
    pub password_failures: &'a mut KeyedLimiter<IpAddr>,
    /// Their settings.
    pub limits: RequestLimits,
    /// The `[names]` rules beyond the protocol's own.
    pub names: Names,
    /// Where notices to members go.
    pub out: &'a mut Outbox,
    /// The peer's IP.
    pub peer: IpAddr,
    /// Monotonic now.
    pub now: Instant,
    /// Wall-clock now, Unix seconds (room creation times).
    pub unix_now: f64,
}

/// Answers one decoded frame. `password` is the outcome of the [`Step::Password`] job this
/// frame asked for, on the second call.
pub fn handle_frame(frame: &Frame<'_>, ctx: &mut Context<'_>, password: Option<&Outcome>) -> Step {
    // A right password gives back the failure token its check took (see `check_password`),
    // here, before anything can refuse the request (the room may have closed meanwhile).
    if let Some(Outcome::Verified { matched: true, .. }) = password {
        give_back_check(ctx.password_failures, ctx.peer, ctx.now, &ctx.limits);
    }
    match answer(frame, ctx, password) {
        Ok(Answer::Password(job)) => Step::Password(job),
        Ok(Answer::Token(token)) => {
            let mut body = Vec::new();
            payload::encode_complete(&token, &mut body);
            Step::Reply(success(frame, &body, true))
        }
        Ok(Answer::Json(body)) => Step::Reply(success(frame, &body, false)),
        Err((code, message)) => {
            debug!("{}: {:?} refused: {}", ctx.peer, frame.operation, message);
            Step::Reply(refusal(
                frame.operation,
                frame.room_name,
                code,
                &message,
                false,
            ))
        }
    }
}

fn success(frame: &Frame<'_>, complete: &[u8], needs_durability: bool) -> Response {
    let mut bytes = Vec::with_capacity(96 + 2 * frame.room_name.len() + complete.len());
    let mut body = Vec::new();
    payload::encode_success(&mut body);
    push_frame(frame, State::Compliance, &body, &mut bytes);
    push_frame(frame, State::Complete, complete, &mut bytes);
    Response {
        bytes,
        needs_durability,
        close: false,
        operation: frame.operation,
        result: Ok(()),
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

enum Answer {
    /// A new member's token (create, join).
    Token(String),
    /// A JSON COMPLETE payload (list, presence, history).
    Json(Vec<u8>),
    /// Hash or verify a password first.
    Password(password::Job),
}

type Refusal = (ErrorCode, String);

/// Answers a request: a token, a JSON reply, a password job to run first, or a refusal.
///
/// The checks every request passes, in the order that decides which refusal a client sees
/// (docs/PROTOCOL.md): the frame's state, the operation, the payload and the request rate;
/// then, for every operation but ListRooms, the room name, and the operation's own checks in
/// its function.
fn answer(
    frame: &Frame<'_>,
    ctx: &mut Context<'_>,
    password: Option<&Outcome>,
) -> Result<Answer, Refusal> {
    if frame.state != State::Request {
        return Err((
            ErrorCode::MalformedRequest,
            format!("expected a REQUEST frame, got {:?}", frame.state),
        ));
    }
    let op = frame.operation;
    if let Operation::Other(byte) = op {
        return Err(unsupported(byte));
    }
    let request: Request = payload::parse_request(frame.payload).map_err(|e| {
        (
            ErrorCode::MalformedRequest,
            format!("bad request payload: {e}"),
        )
    })?;
    // A second call (with the password outcome) was already counted.
    if password.is_none()
        && !ctx.limiter.allow(
            rate::source(ctx.peer),
            ctx.now,
            ctx.limits.rate,
            ctx.limits.burst,
        )
    {
        return Err((
            ErrorCode::RateLimited,
            "too many requests; try again shortly".into(),
        ));
    }
    let room_name = || {
        check_room_name(frame.room_name)
            .map_err(|rule| (ErrorCode::InvalidRoomName, format!("room name {rule}")))
    };
    match op {
        Operation::ListRooms => Ok(Answer::Json(list_rooms(ctx.registry))),
        Operation::CreateRoom => create(ctx, room_name()?, &request, password),
        Operation::JoinRoom => join(ctx, room_name()?, &request, password),
        Operation::Presence => presence(ctx, room_name()?, &request, password),
        Operation::History => history(ctx, room_name()?, &request),
        Operation::Other(byte) => Err(unsupported(byte)),
    }
}

fn unsupported(byte: u8) -> Refusal {
    (
        ErrorCode::UnsupportedOperation,
        format!("operation {byte} is not supported"),
    )
}

/// A new name's visibility rule (`[names] refuse_invisible`): only new names are held to it,
/// so a room that already exists can still be joined by name.
fn visible(ctx: &Context<'_>, name: &str) -> Result<(), NameRule> {
    if ctx.names.refuse_invisible {
        check_visible(name)
    } else {
        Ok(())
    }
}

/// The username of a create or join: the protocol's rules, then the visibility rule.
fn checked_username(ctx: &Context<'_>, request: &Request) -> Result<(), Refusal> {
    check_username(&request.username)
        .and_then(|()| visible(ctx, &request.username))
        .map_err(|rule| (ErrorCode::InvalidUsername, format!("username {rule}")))
}

/// CreateRoom: the room is made, with the requester as host, or the request is refused
/// before its password is hashed whenever it can be.
fn create(
    ctx: &mut Context<'_>,
    room_name: &str,
    request: &Request,
    password: Option<&Outcome>,
) -> Result<Answer, Refusal> {
    visible(ctx, room_name)
        .map_err(|rule| (ErrorCode::InvalidRoomName, format!("room name {rule}")))?;
    checked_username(ctx, request)?;
    // Taking "" as no password would open a room its creator believes is protected.
    if request.password.as_deref() == Some("") {
        return Err((
            ErrorCode::MalformedRequest,
            "an empty password protects nothing; leave \"password\" out for a room \
             without one"
                .into(),
        ));
    }
    // A create that will be refused (name taken, server full, or, when asked, a name like an
    // open room's) is refused unhashed.
    let refused = ctx.registry.create_refusal(room_name).is_some();
    if ctx.names.refuse_lookalike_room_names && !refused {
        if let Some((existing, listed)) = ctx.registry.lookalike_room(room_name) {
            // An unlisted room's name is not given away.
            let which = if listed {
                format!("the existing room {existing:?}")
            } else {
                "an existing room".to_owned()
            };
            return Err((
                ErrorCode::RoomExists,
                format!("room {room_name:?} looks like {which}"),
            ));
        }
    }
    let hash = match (&request.password, password) {
        (Some(pw), None) if !refused => {
            return Ok(Answer::Password(password::Job::Hash {
                password: pw.clone(),
            }))
        }
        (Some(_), Some(Outcome::Hashed(Ok(hash)))) => Some(hash.clone()),
        (Some(_), Some(Outcome::Hashed(Err(e)))) => {
            return Err((
                ErrorCode::MalformedRequest,
                format!("cannot hash the password: {e}"),
            ))
        }
        _ => None,
    };
    let created =
        ctx.registry
            .create_room(room_name, request, ctx.peer, hash, ctx.now, ctx.unix_now);
    token_answer(created, room_name, request)
}

/// The answer to a create or join: the new member's token, or the registry's refusal.
fn token_answer(
    issued: Result<Issued, ErrorCode>,
    room_name: &str,
    request: &Request,
) -> Result<Answer, Refusal> {
    issued
        .map(|i| Answer::Token(i.token.as_str().to_owned()))
        .map_err(|code| (code, refusal_text(code, room_name, &request.username)))
}

/// JoinRoom: the requester becomes a member, once the room's password (if any) is verified.
fn join(
    ctx: &mut Context<'_>,
    room_name: &str,
    request: &Request,
    password: Option<&Outcome>,
) -> Result<Answer, Refusal> {
    checked_username(ctx, request)?;
    if let Some(job) = check_password(ctx, room_name, request, password, false)? {
        return Ok(Answer::Password(job));
    }
    // After the password: the refusal names a member. After the cheaper refusals too (a full
    // room is not scanned).
    if ctx.names.refuse_lookalike_usernames {
        if let Some(code) = ctx.registry.join_refusal(room_name, &request.username) {
            return Err(join_refusal_text(ctx, code, room_name, request));
        }
        if let Some(member) = ctx.registry.lookalike_member(room_name, &request.username) {
            return Err((
                ErrorCode::NameTaken,
                format!(
                    "the name {:?} looks like {member:?}, already taken in room {room_name:?}",
                    request.username
                ),
            ));
        }
    }
    let joined = ctx
        .registry
        .join_room(room_name, request, ctx.peer, ctx.now, ctx.out);
    match joined {
        Err(code) => Err(join_refusal_text(ctx, code, room_name, request)),
        issued => token_answer(issued, room_name, request),
    }
}

/// A join's refusal with its words: for `server_full`, which cap it met (the room's or the
/// server's).
fn join_refusal_text(
    ctx: &Context<'_>,
    code: ErrorCode,
    room_name: &str,
    request: &Request,
) -> Refusal {
    match code {
        ErrorCode::ServerFull => (code, ctx.registry.join_full_text(room_name)),
        _ => (code, refusal_text(code, room_name, &request.username)),
    }
}

/// Presence: who is in the room, for anyone who may enter it (password or member token).
fn presence(
    ctx: &mut Context<'_>,
    room_name: &str,
    request: &Request,
    password: Option<&Outcome>,
) -> Result<Answer, Refusal> {
    let not_found = || {
        (
            ErrorCode::RoomNotFound,
            refusal_text(ErrorCode::RoomNotFound, room_name, ""),
        )
    };
    if !ctx.registry.room_exists(room_name) {
        return Err(not_found());
    }
    if let Some(job) = check_password(ctx, room_name, request, password, true)? {
        return Ok(Answer::Password(job));
    }
    let presence = ctx.registry.presence(room_name).ok_or_else(not_found)?;
    let members = presence
        .members()
        .map(|(name, registered)| payload::PresentMember {
            name: name.to_owned(),
            registered,
        });
    let you = request
        .token
        .as_deref()
        .and_then(|token| ctx.registry.member_of(room_name, token.as_bytes()))
        .map(|(name, registered)| payload::PresentMember { name, registered });
    Ok(Answer::Json(presence_reply(
        room_name,
        presence.host(),
        members,
        you,
    )))
}

/// History: a page of the room's kept messages, for its members only.
fn history(ctx: &Context<'_>, room_name: &str, request: &Request) -> Result<Answer, Refusal> {
    let token = request.token.as_deref().unwrap_or("");
    let limit = request
        .limit
        .map_or(HISTORY_PAGE, |l| (l as usize).min(MAX_HISTORY_PAGE));
    let (messages, more) = ctx
        .registry
        .history_page(room_name, token.as_bytes(), request.before, limit)
        .map_err(|code| match code {
            ErrorCode::NotMember => (
                code,
                format!("history of room {room_name:?} is for its members only"),
            ),
            other => (other, refusal_text(other, room_name, "")),
        })?;
    let messages = messages
        .into_iter()
        .map(|m| payload::HistoryMessage {
            seq: m.seq,
            sender: m.sender,
            text: m.text,
            at: m.at,
            truncated: false,
        })
        .collect();
    Ok(Answer::Json(history_reply(messages, more)))
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
