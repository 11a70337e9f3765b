//! The ocm extension requests: list the rooms, see who is in a room, read a room's history.
//!
//! Each is one TCRP REQUEST on its own short-lived TCP connection, answered like create and
//! join: COMPLIANCE `{"success": true}` then COMPLETE with a JSON payload, or a failed
//! COMPLIANCE. This module builds the request payloads, runs the exchange through
//! [`handshake::round_trip`] (so it is tested against in-memory streams) and decodes the
//! replies into the `tcrp` payload types; it prints nothing.
//!
//! | operation      | room name  | request payload                                   | COMPLETE       |
//! |----------------|------------|---------------------------------------------------|----------------|
//! | 3 ListRooms    | empty      | `{}`                                              | [`RoomList`]   |
//! | 4 Presence     | the room   | `{"token": T}`, `{"password": P}` or `{}`         | [`RoomPresence`] |
//! | 5 History      | the room   | `{"token": T, "before": 57, "limit": 20}`         | [`HistoryPage`] |
//!
//! [`HistoryPager`] is the state behind `/history`: which page to ask for next.

use std::io::Write;
use std::net::SocketAddr;

use tcrp::payload::{self, HistoryPage, RoomList, RoomPresence};
use tcrp::{Operation, Request};

use crate::error::ClientError;
use crate::handshake::{self, LimitedRead, Refusal, Token};
use crate::render::printable;

/// Messages per `/history` page, and at join, unless the user asks for another number.
pub const DEFAULT_HISTORY_LIMIT: u32 = 20;
/// Most messages the server returns in one page.
pub const MAX_HISTORY_LIMIT: u32 = 100;

/// The ListRooms payload: an empty JSON object (no username is needed to list).
pub fn list_rooms_payload() -> Vec<u8> {
    query_payload(Request::query())
}

/// The Presence payload: a member proves membership with its token; anyone else gives the
/// room's password, or nothing for an open room.
pub fn presence_payload(token: Option<&Token>, password: Option<&str>) -> Vec<u8> {
    let mut request = Request::query();
    if let Some(token) = token {
        request.token = Some(token.as_str().to_owned());
    } else {
        request.password = password.map(str::to_owned);
    }
    query_payload(request)
}

/// The History payload: the member's token, the sequence number to page back from (omitted
/// for the latest messages) and the page size.
pub fn history_payload(token: &Token, before: Option<u64>, limit: u32) -> Vec<u8> {
    query_payload(Request {
        token: Some(token.as_str().to_owned()),
        before,
        limit: Some(limit),
        ..Request::query()
    })
}

/// The bytes of an extension request ([`Request::encode_query`]).
fn query_payload(request: Request) -> Vec<u8> {
    let mut out = Vec::new();
    request.encode_query(&mut out);
    out
}

/// Asks for the listed rooms.
pub fn list_rooms<S: LimitedRead + Write>(stream: &mut S) -> Result<RoomList, ClientError> {
    let complete = ask(
        stream,
        Operation::ListRooms,
        "",
        &list_rooms_payload(),
        || "list the rooms".to_owned(),
    )?;
    Ok(payload::parse_json(&complete)?)
}

/// Asks who is in `room_name` (see [`presence_payload`] for the credentials).
pub fn presence<S: LimitedRead + Write>(
    stream: &mut S,
    room_name: &str,
    token: Option<&Token>,
    password: Option<&str>,
) -> Result<RoomPresence, ClientError> {
    let complete = ask(
        stream,
        Operation::Presence,
        room_name,
        &presence_payload(token, password),
        || format!("see who is in room {:?}", printable(room_name)),
    )?;
    Ok(payload::parse_json(&complete)?)
}

/// Asks for up to `limit` messages of `room_name` older than `before` (the latest without).
pub fn history<S: LimitedRead + Write>(
    stream: &mut S,
    room_name: &str,
    token: &Token,
    before: Option<u64>,
    limit: u32,
) -> Result<HistoryPage, ClientError> {
    let complete = ask(
        stream,
        Operation::History,
        room_name,
        &history_payload(token, before, limit),
        || format!("read the history of room {:?}", printable(room_name)),
    )?;
    Ok(payload::parse_json(&complete)?)
}

/// [`presence`] on a connection of its own to the daemon at `tcp`.
pub fn presence_at(
    tcp: SocketAddr,
    room_name: &str,
    token: Option<&Token>,
    password: Option<&str>,
) -> Result<RoomPresence, ClientError> {
    let mut stream = handshake::connect_addr(tcp)?;
    presence(&mut stream, room_name, token, password)
}

/// [`history`] on a connection of its own to the daemon at `tcp`.
pub fn history_at(
    tcp: SocketAddr,
    room_name: &str,
    token: &Token,
    before: Option<u64>,
    limit: u32,
) -> Result<HistoryPage, ClientError> {
    let mut stream = handshake::connect_addr(tcp)?;
    history(&mut stream, room_name, token, before, limit)
}

/// One exchange; a refusal becomes [`ClientError::QueryRefused`] saying what was asked.
fn ask<S: LimitedRead + Write>(
    stream: &mut S,
    operation: Operation,
    room_name: &str,
    payload: &[u8],
    what: impl FnOnce() -> String,
) -> Result<Vec<u8>, ClientError> {
    match handshake::round_trip(stream, operation, room_name, payload)? {
        Ok(complete) => Ok(complete),
        Err(Refusal { code, message }) => Err(ClientError::QueryRefused {
            what: what(),
            code,
            message,
        }),
    }
}

/// Where `/history` stands: the first call asks for the latest messages, each further call
/// for the ones before the oldest seen so far, until the server says there are no more; the
/// call after that starts again from the latest, so that what was said since (or a room
/// that was empty at the first call) can still be paged through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryPager {
    /// The lowest sequence number received since the last start from the latest.
    oldest: Option<u64>,
    /// The server said no older messages exist: the next call starts from the latest.
    exhausted: bool,
}

impl HistoryPager {
    /// The `before` of the next page's request: `None` for the latest messages.
    pub fn next(&self) -> Option<u64> {
        if self.exhausted {
            None
        } else {
            self.oldest
        }
    }

    /// Records a page received for a request with `before` (as [`HistoryPager::next`] gave
    /// it); returns whether older messages remain.
    pub fn observe(&mut self, before: Option<u64>, page: &HistoryPage) -> bool {
        if before.is_none() {
            self.oldest = None;
        }
        if let Some(low) = page.messages.iter().map(|m| m.seq).min() {
            self.oldest = Some(self.oldest.map_or(low, |old| old.min(low)));
        }
        // A page without messages cannot move `before` back, so asking again would repeat it.
        self.exhausted = !page.more || page.messages.is_empty();
        !self.exhausted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_server::FakeServer;
    use tcrp::payload::{HistoryMessage, ListedRoom, PresentMember};
    use tcrp::{ErrorCode, Frame, State};

    impl FakeServer {
        /// A server answering success then COMPLETE `complete`.
        fn completing(complete: &[u8]) -> FakeServer {
            let mut reply = frame(State::Compliance, br#"{"success": true}"#);
            reply.extend(frame(State::Complete, complete));
            FakeServer::in_pieces(&reply, 3)
        }

        /// A server refusing with `code`.
        fn refusing(code: ErrorCode, message: &str) -> FakeServer {
            let mut failure = Vec::new();
            payload::encode_failure(code, message, &mut failure);
            FakeServer::in_pieces(&frame(State::Compliance, &failure), 3)
        }

        /// The one frame the client sent: operation, room name, payload.
        fn sent(&self) -> (Operation, String, String) {
            let (f, used) = tcrp::decode(&self.written, 1 << 16).unwrap().unwrap();
            assert_eq!(used, self.written.len(), "exactly one frame");
            assert_eq!(f.state, State::Request);
            (
                f.operation,
                String::from_utf8(f.room_name.to_vec()).unwrap(),
                String::from_utf8(f.payload.to_vec()).unwrap(),
            )
        }
    }

    fn frame(state: State, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Frame {
            operation: Operation::History,
            state,
            room_name: b"",
            payload,
        }
        .encode(&mut out)
        .unwrap();
        out
    }

    fn token() -> Token {
        Token::new("00ff".into()).unwrap()
    }

    fn message(seq: u64) -> HistoryMessage {
        HistoryMessage {
            seq,
            sender: "bob".into(),
            text: format!("m{seq}"),
            at: 1_700_000_000.0,
            truncated: false,
        }
    }

    #[test]
    fn payloads_for_each_operation() {
        assert_eq!(list_rooms_payload(), b"{}");
        assert_eq!(presence_payload(None, None), b"{}");
        assert_eq!(
            presence_payload(None, Some("s3cret")),
            br#"{"password": "s3cret"}"#
        );
        // A member's token is proof enough; the password is not sent along.
        assert_eq!(
            presence_payload(Some(&token()), Some("s3cret")),
            br#"{"token": "00ff"}"#
        );
        assert_eq!(
            history_payload(&token(), None, 20),
            br#"{"token": "00ff", "limit": 20}"#
        );
        assert_eq!(
            history_payload(&token(), Some(57), 5),
            br#"{"token": "00ff", "before": 57, "limit": 5}"#
        );
        // The server reads them back as requests with the intended fields.
        let r = payload::parse_request(&history_payload(&token(), Some(57), 5)).unwrap();
        assert_eq!(
            (r.token.as_deref(), r.before, r.limit),
            (Some("00ff"), Some(57), Some(5))
        );
        let r = payload::parse_request(&presence_payload(None, Some("pw"))).unwrap();
        assert_eq!(r.password.as_deref(), Some("pw"));
    }

    #[test]
    fn list_rooms_sends_operation_3_with_no_room_name() {
        let mut server = FakeServer::completing(
            br#"{"rooms": [{"name": "lobby", "members": 3, "created_at": 1700000000.5, "password": false}]}"#,
        );
        let list = list_rooms(&mut server).unwrap();
        assert_eq!(
            list.rooms,
            [ListedRoom {
                name: "lobby".into(),
                members: 3,
                created_at: 1_700_000_000.5,
                password: false
            }]
        );
        assert_eq!(
            server.sent(),
            (Operation::ListRooms, String::new(), "{}".into())
        );
    }

    #[test]
    fn presence_sends_operation_4_for_the_room() {
        let mut server = FakeServer::completing(
            br#"{"room": "lobby", "host": "alice", "members": [{"name": "alice", "registered": true}, {"name": "bob", "registered": false}]}"#,
        );
        let p = presence(&mut server, "lobby", None, Some("pw")).unwrap();
        assert_eq!(p.host, "alice");
        assert_eq!(
            p.members[1],
            PresentMember {
                name: "bob".into(),
                registered: false
            }
        );
        assert_eq!(
            server.sent(),
            (
                Operation::Presence,
                "lobby".into(),
                r#"{"password": "pw"}"#.into()
            )
        );
    }

    #[test]
    fn history_sends_operation_5_with_token_before_and_limit() {
        let mut server = FakeServer::completing(
            br#"{"messages": [{"seq": 55, "sender": "bob", "text": "hi", "at": 1700000000.1}], "more": true}"#,
        );
        let page = history(&mut server, "lobby", &token(), Some(57), 20).unwrap();
        assert!(page.more);
        assert_eq!(page.messages[0].seq, 55);
        assert_eq!(
            server.sent(),
            (
                Operation::History,
                "lobby".into(),
                r#"{"token": "00ff", "before": 57, "limit": 20}"#.into()
            )
        );
    }

    #[test]
    fn refusals_say_what_was_asked() {
        let mut server = FakeServer::refusing(ErrorCode::BadPassword, "wrong password");
        let err = presence(&mut server, "vault", None, None).unwrap_err();
        assert!(matches!(
            &err,
            ClientError::QueryRefused {
                code: Some(ErrorCode::BadPassword),
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "cannot see who is in room \"vault\": wrong password"
        );
        let mut server = FakeServer::refusing(ErrorCode::NotMember, "members only");
        let err = history(&mut server, "vault", &token(), None, 20).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read the history of room \"vault\": members only"
        );
        let mut server = FakeServer::refusing(ErrorCode::UnsupportedOperation, "");
        let err = list_rooms(&mut server).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot list the rooms: unsupported_operation"
        );
    }

    #[test]
    fn malformed_complete_is_an_error() {
        let mut server = FakeServer::completing(br#"{"rooms": 3}"#);
        assert!(matches!(
            list_rooms(&mut server),
            Err(ClientError::Handshake(tcrp::Error::MalformedJson { .. }))
        ));
    }

    #[test]
    fn pager_walks_back_until_no_more_then_starts_from_the_latest() {
        let mut pager = HistoryPager::default();
        assert_eq!(pager.next(), None);
        let page = |seqs: &[u64], more| HistoryPage {
            messages: seqs.iter().copied().map(message).collect(),
            more,
        };
        assert!(pager.observe(None, &page(&[58, 59, 60], true)));
        assert_eq!(pager.next(), Some(58));
        assert!(pager.observe(Some(58), &page(&[40, 57], true)));
        assert_eq!(pager.next(), Some(40));
        assert!(!pager.observe(Some(40), &page(&[1, 2], false)));
        // Past the end: the latest again, and back from there.
        assert_eq!(pager.next(), None);
        assert!(pager.observe(None, &page(&[70, 71], true)));
        assert_eq!(pager.next(), Some(70), "not the 1 of the last walk");
    }

    /// An empty page ends a walk, and the next call asks for the latest: a room empty at
    /// the first `/history` is paged through once something is said, rather than saying
    /// `no more history` for good.
    #[test]
    fn an_empty_page_ends_the_walk_not_the_pager() {
        let mut pager = HistoryPager::default();
        assert!(!pager.observe(
            None,
            &HistoryPage {
                messages: vec![],
                more: true
            }
        ));
        assert_eq!(pager.next(), None);
        assert!(!pager.observe(
            None,
            &HistoryPage {
                messages: vec![message(1)],
                more: false
            }
        ));
        assert_eq!(pager.next(), None);
    }
}
