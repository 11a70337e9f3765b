//! The JSON payloads carried in TCRP frames.
//!
//! REQUEST payload, three accepted forms, tried in this order:
//! 1. a JSON string, `"alice"`: what the original Python client sends (`json.dumps(name)`);
//! 2. a JSON object, `{"username": "alice", "keepalive": 10, "caps": ["seq"]}`: the door for
//!    ocm extensions; unknown keys are ignored so later clients stay compatible;
//! 3. failing both, the payload's UTF-8 text, taken whole as the username; but a payload
//!    that begins with `{` (after white space) and is not JSON is a JSON object gone wrong
//!    (`{"username": "bob", "password": "pw",}`), refused as malformed: taken as a name, it
//!    would create a room without its password and keep the password as the host's name.
//!
//! Replies are written the way Python's `json.dumps` writes them (`{"success": true}`, one
//! space after `:` and `,`), so that an original client sees the bytes it always saw:
//! - success: COMPLIANCE `{"success": true}` then COMPLETE `{"token": "<hex>"}`;
//! - refusal: COMPLIANCE `{"success": false, "error": CODE, "message": TEXT}`, no COMPLETE.
//!
//! Parsers for replies are lenient the way the original server needs: `success` may be a
//! boolean or the numbers 1/0.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// Why a request was refused: the `error` field of a failed COMPLIANCE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Create: a room of that name exists.
    RoomExists,
    /// Join (and other room operations): no room of that name.
    RoomNotFound,
    /// Join: a member of the room already has that username.
    NameTaken,
    /// The room name is empty, too long, not UTF-8 or holds control characters.
    InvalidRoomName,
    /// The username is empty, too long or holds control characters.
    InvalidUsername,
    /// The operation byte is not one this server serves.
    UnsupportedOperation,
    /// The frame or its payload could not be understood.
    MalformedRequest,
    /// A server-wide cap (rooms, members, tokens) is reached.
    ServerFull,
    /// The peer sent requests faster than its rate limit allows.
    RateLimited,
    /// The room has a password and the request did not give it.
    BadPassword,
    /// A members-only request (history) without a token of that room.
    NotMember,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::RoomExists,
        ErrorCode::RoomNotFound,
        ErrorCode::NameTaken,
        ErrorCode::InvalidRoomName,
        ErrorCode::InvalidUsername,
        ErrorCode::UnsupportedOperation,
        ErrorCode::MalformedRequest,
        ErrorCode::ServerFull,
        ErrorCode::RateLimited,
        ErrorCode::BadPassword,
        ErrorCode::NotMember,
    ];

    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::RoomExists => "room_exists",
            ErrorCode::RoomNotFound => "room_not_found",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::InvalidRoomName => "invalid_room_name",
            ErrorCode::InvalidUsername => "invalid_username",
            ErrorCode::UnsupportedOperation => "unsupported_operation",
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BadPassword => "bad_password",
            ErrorCode::NotMember => "not_member",
        }
    }

    /// Parses a wire code; `None` for codes this version does not know.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

/// Optional capabilities a client asks for in its JSON-object request (`"caps": [...]`).
/// Unknown names are ignored. A client that sends no caps sees only original frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Caps(u8);

impl Caps {
    /// `"notices"`: join/leave notices for the room.
    pub const NOTICES: Caps = Caps(0x01);
    /// `"seq"`: relayed messages carry a per-room sequence number.
    pub const SEQ: Caps = Caps(0x02);
    /// `"batch"`: several messages may arrive in one datagram.
    pub const BATCH: Caps = Caps(0x04);
    const NAMES: [(&'static str, Caps); 3] = [
        ("notices", Caps::NOTICES),
        ("seq", Caps::SEQ),
        ("batch", Caps::BATCH),
    ];

    /// No capabilities: an original client.
    pub const fn none() -> Caps {
        Caps(0)
    }
    /// Whether every capability in `other` is present.
    pub const fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether no capability is present.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The union of two sets.
    pub const fn with(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }
    /// The raw bit set, for persistence.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Rebuilds a set from [`Caps::bits`], dropping unknown bits.
    pub const fn from_bits(bits: u8) -> Caps {
        Caps(bits & 0x07)
    }
    /// Builds a set from wire names, ignoring names it does not know.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Caps {
        names.into_iter().fold(Caps::none(), |caps, name| {
            match Caps::NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, cap)) => caps.with(*cap),
                None => caps,
            }
        })
    }
    /// The wire names of the capabilities present.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Caps::NAMES
            .into_iter()
            .filter(move |(_, cap)| self.contains(*cap))
            .map(|(name, _)| name)
    }
}

/// Which form a REQUEST payload had; the server treats original-form members exactly as the
/// original server did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestForm {
    /// A JSON string: the original client.
    JsonString,
    /// A JSON object: an ocm-aware client.
    JsonObject,
    /// Plain UTF-8 text.
    Text,
}

/// A decoded REQUEST payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The username; may be empty or invalid (check with [`crate::names::check_username`]).
    pub username: String,
    /// The payload's form.
    pub form: RequestForm,
    /// Seconds between the client's keepalive REGISTERs, if it promises them.
    pub keepalive_secs: Option<u32>,
    /// Extensions the client understands.
    pub caps: Caps,
    /// The largest server datagram this client accepts, in bytes (`"max_datagram"`): the cap
    /// on its batch frames. `None`: [`DEFAULT_MAX_DATAGRAM`].
    pub max_datagram: Option<u16>,
    /// Room password (create sets it, join must match it).
    pub password: Option<String>,
    /// Create: whether the room shows in room listings (default true).
    pub listed: Option<bool>,
    /// History: return messages with a sequence number below this.
    pub before: Option<u64>,
    /// History: at most this many messages.
    pub limit: Option<u32>,
    /// History: the requester's member token (history is for members only).
    pub token: Option<String>,
}

impl Request {
    /// A request in the original client's form.
    pub fn original(username: &str) -> Request {
        Request {
            username: username.to_owned(),
            form: RequestForm::JsonString,
            keepalive_secs: None,
            caps: Caps::none(),
            max_datagram: None,
            password: None,
            listed: None,
            before: None,
            limit: None,
            token: None,
        }
    }

    /// Appends the payload bytes for this request: a bare JSON string when nothing but the
    /// username is set (exactly what the original client sends), else a JSON object.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let plain = self.keepalive_secs.is_none()
            && self.caps.is_empty()
            && self.max_datagram.is_none()
            && self.password.is_none()
            && self.listed.is_none()
            && self.before.is_none()
            && self.limit.is_none()
            && self.token.is_none();
        if plain && self.form != RequestForm::JsonObject {
            out.extend_from_slice(json_string(&self.username).as_bytes());
            return;
        }
        let mut fields: Vec<(&str, Value)> =
            vec![("username", Value::from(self.username.as_str()))];
        if let Some(k) = self.keepalive_secs {
            fields.push(("keepalive", Value::from(k)));
        }
        if !self.caps.is_empty() {
            fields.push(("caps", Value::from(self.caps.names().collect::<Vec<_>>())));
        }
        if let Some(m) = self.max_datagram {
            fields.push(("max_datagram", Value::from(m)));
        }
        if let Some(p) = &self.password {
            fields.push(("password", Value::from(p.as_str())));
        }
        if let Some(l) = self.listed {
            fields.push(("listed", Value::from(l)));
        }
        if let Some(b) = self.before {
            fields.push(("before", Value::from(b)));
        }
        if let Some(l) = self.limit {
            fields.push(("limit", Value::from(l)));
        }
        if let Some(t) = &self.token {
            fields.push(("token", Value::from(t.as_str())));
        }
        write_object(&fields, out);
    }
}

#[derive(Deserialize)]
struct ObjectRequest {
    #[serde(default)]
    username: String,
    keepalive: Option<u32>,
    #[serde(default)]
    caps: Vec<String>,
    max_datagram: Option<u64>,
    #[serde(default, deserialize_with = "password_field")]
    password: Option<String>,
    listed: Option<bool>,
    before: Option<u64>,
    limit: Option<u32>,
    token: Option<String>,
}

/// `"password"`: a string, or null for none. Anything else is refused without quoting it (a
/// type error would show the value in the reply and the logs, and it may be a password).
fn password_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::String(password) => Ok(Some(password)),
        Value::Null => Ok(None),
        _ => Err(serde::de::Error::custom("\"password\" must be a string")),
    }
}

/// The largest server datagram a client accepts when it does not say (`"max_datagram"`):
/// the original client reads with a 4096-byte buffer.
pub const DEFAULT_MAX_DATAGRAM: u16 = 4096;
/// The smallest `"max_datagram"` a client may announce.
pub const MIN_MAX_DATAGRAM: u16 = 512;
/// The largest `"max_datagram"` a client may announce: the most an IPv4 UDP datagram carries.
pub const MAX_MAX_DATAGRAM: u16 = 65507;

fn check_max_datagram(value: u64) -> Result<u16, Error> {
    match u16::try_from(value) {
        Ok(v) if (MIN_MAX_DATAGRAM..=MAX_MAX_DATAGRAM).contains(&v) => Ok(v),
        _ => Err(Error::OutOfRange {
            field: "max_datagram",
            min: MIN_MAX_DATAGRAM.into(),
            max: MAX_MAX_DATAGRAM.into(),
            value,
        }),
    }
}

/// Decodes a REQUEST payload (see the module docs for the three forms).
pub fn parse_request(payload: &[u8]) -> Result<Request, Error> {
    let text = std::str::from_utf8(payload).map_err(|_| Error::PayloadNotUtf8)?;
    let mut request = Request::original("");
    match serde_json::from_str::<Value>(text) {
        Ok(Value::String(name)) => request.username = name,
        Ok(object @ Value::Object(_)) => {
            let parsed: ObjectRequest =
                serde_json::from_value(object).map_err(|e| Error::MalformedJson {
                    reason: e.to_string(),
                })?;
            request = Request {
                username: parsed.username,
                form: RequestForm::JsonObject,
                keepalive_secs: parsed.keepalive,
                caps: Caps::from_names(parsed.caps.iter().map(String::as_str)),
                max_datagram: parsed.max_datagram.map(check_max_datagram).transpose()?,
                password: parsed.password,
                listed: parsed.listed,
                before: parsed.before,
                limit: parsed.limit,
                token: parsed.token,
            };
        }
        Err(e) if text.trim_start().starts_with('{') => {
            return Err(Error::MalformedJson {
                reason: format!("the payload begins like a JSON object but is not JSON ({e})"),
            })
        }
        _ => {
            request.username = text.to_owned();
            request.form = RequestForm::Text;
        }
    }
    Ok(request)
}

/// A COMPLIANCE payload as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compliance {
    /// The request will be completed.
    Success,
    /// The request was refused.
    Failure {
        /// The machine-readable code, when the server sent one this version knows.
        code: Option<ErrorCode>,
        /// The human-readable reason, when the server sent one.
        message: Option<String>,
    },
}

/// Appends `{"success": true}`.
pub fn encode_success(out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"success\": true}");
}

/// Appends `{"success": false, "error": CODE, "message": TEXT}`.
pub fn encode_failure(code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    write_object(
        &[
            ("success", Value::Bool(false)),
            ("error", Value::from(code.as_str())),
            ("message", Value::from(message)),
        ],
        out,
    );
}

/// Appends `{"token": "<token>"}`.
pub fn encode_complete(token: &str, out: &mut Vec<u8>) {
    write_object(&[("token", Value::from(token))], out);
}

/// Reads a COMPLIANCE payload; `success` may be `true`/`false` or `1`/`0`.
pub fn parse_compliance(payload: &[u8]) -> Result<Compliance, Error> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| Error::MalformedJson {
        reason: e.to_string(),
    })?;
    let success = match value.get("success") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) if n.as_i64() == Some(1) => true,
        Some(Value::Number(n)) if n.as_i64() == Some(0) => false,
        _ => {
            return Err(Error::MalformedJson {
                reason: "COMPLIANCE has no boolean or 0/1 \"success\"".into(),
            })
        }
    };
    if success {
        return Ok(Compliance::Success);
    }
    Ok(Compliance::Failure {
        code: value
            .get("error")
            .and_then(Value::as_str)
            .and_then(ErrorCode::parse),
        message: value
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// Reads the token out of a COMPLETE payload.
pub fn parse_complete(payload: &[u8]) -> Result<String, Error> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| Error::MalformedJson {
        reason: e.to_string(),
    })?;
    value
        .get("token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(Error::MissingToken)
}

/// One room in a ListRooms COMPLETE payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedRoom {
    /// Room name.
    pub name: String,
    /// Members, host included.
    pub members: usize,
    /// Unix time of creation, seconds.
    pub created_at: f64,
    /// Whether joining needs a password.
    pub password: bool,
}

/// COMPLETE payload of ListRooms (operation 3): `{"rooms": [...]}`, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomList {
    /// The listed rooms.
    pub rooms: Vec<ListedRoom>,
    /// More rooms exist than fit in one reply (the reply stays under the default payload cap).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// One member in a Presence COMPLETE payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentMember {
    /// Username.
    pub name: String,
    /// Whether it has registered a UDP address (can receive messages).
    pub registered: bool,
}

/// COMPLETE payload of Presence (operation 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPresence {
    /// Room name.
    pub room: String,
    /// The host's username.
    pub host: String,
    /// Every member, host first; cut at the end when they do not all fit in one reply.
    pub members: Vec<PresentMember>,
    /// More members exist than fit in one reply (the reply stays under the default payload
    /// cap); those listed are the first ones, host first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    /// When the request carried a member token of the room: that member, whether or not the
    /// cut left it out of `members` (a client asking whether the daemon has its UDP address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub you: Option<PresentMember>,
}

/// One message in a History COMPLETE payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryMessage {
    /// The room's sequence number of the message.
    pub seq: u64,
    /// Sender's username.
    pub sender: String,
    /// The text.
    pub text: String,
    /// Unix time it was relayed, seconds.
    pub at: f64,
    /// The text was cut at its end: the message alone does not fit in one reply (only
    /// possible for texts of many control characters, which JSON escapes six bytes each).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// COMPLETE payload of History (operation 5): oldest first; `more` when older messages exist.
/// A page that would not fit in one reply (under the default payload cap) keeps its newest
/// messages and drops the oldest, which then count as older messages (`more`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Messages, oldest first.
    pub messages: Vec<HistoryMessage>,
    /// Whether messages older than the first one exist (kept by the server but not in this
    /// page, whether beyond the page's `limit` or cut to fit the reply).
    pub more: bool,
}

/// Decodes any JSON COMPLETE payload of an extension operation.
pub fn parse_json<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(payload).map_err(|e| Error::MalformedJson {
        reason: e.to_string(),
    })
}

/// Writes a JSON string the way serde does (which matches Python for ASCII).
fn json_string(s: &str) -> String {
    Value::from(s).to_string()
}

/// Writes a flat JSON object in Python's `json.dumps` layout: `{"a": 1, "b": "x"}`.
pub fn write_object(fields: &[(&str, Value)], out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(json_string(key).as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.to_string().as_bytes());
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_json_string_request() {
        let r = parse_request(b"\"alice\"").unwrap();
        assert_eq!(r.username, "alice");
        assert_eq!(r.form, RequestForm::JsonString);
        assert!(r.caps.is_empty());
        // Python escapes non-ASCII by default: "\u00e9" must decode to é.
        assert_eq!(parse_request(b"\"\\u00e9mile\"").unwrap().username, "émile");
    }

    #[test]
    fn json_object_request_with_extensions() {
        let r = parse_request(
            br#"{"username": "bob", "keepalive": 10, "caps": ["seq", "future", "notices"], "x": 1}"#,
        )
        .unwrap();
        assert_eq!(r.username, "bob");
        assert_eq!(r.form, RequestForm::JsonObject);
        assert_eq!(r.keepalive_secs, Some(10));
        assert!(r.caps.contains(Caps::SEQ.with(Caps::NOTICES)));
        assert!(!r.caps.contains(Caps::BATCH));
    }

    #[test]
    fn plain_text_request_is_the_username() {
        let r = parse_request(b"carol").unwrap();
        assert_eq!(r.username, "carol");
        assert_eq!(r.form, RequestForm::Text);
        // JSON that is neither string nor object is taken as text too.
        assert_eq!(parse_request(b"42").unwrap().username, "42");
        // So is text that begins with a brace but not at its start, or a closing one.
        assert_eq!(parse_request(b"a{b").unwrap().username, "a{b");
        assert_eq!(parse_request(b"}x").unwrap().username, "}x");
    }

    /// A JSON object gone wrong (a trailing comma, a missing quote) is refused, never taken
    /// whole as a name: that would create a room without its password and keep the password
    /// as the host's name, shown to anyone who asks who is in the room.
    #[test]
    fn a_broken_json_object_is_refused_not_taken_as_a_name() {
        for payload in [
            &br#"{"username": "bob", "password": "hunter2",}"#[..],
            br#"  {"username": "bob""#,
            b"{",
            b"\n{x}",
        ] {
            let refused = parse_request(payload);
            let Err(Error::MalformedJson { reason }) = refused else {
                panic!("{:?}: {refused:?}", String::from_utf8_lossy(payload));
            };
            assert!(!reason.contains("hunter2"), "{reason}");
        }
    }

    #[test]
    fn request_errors() {
        assert_eq!(parse_request(&[0xff, 0x00]), Err(Error::PayloadNotUtf8));
        assert!(matches!(
            parse_request(br#"{"username": 5}"#),
            Err(Error::MalformedJson { .. })
        ));
        assert!(matches!(
            parse_request(br#"{"username": "a", "keepalive": -1}"#),
            Err(Error::MalformedJson { .. })
        ));
        assert_eq!(parse_request(br#"{"caps": []}"#).unwrap().username, "");
    }

    #[test]
    fn request_encoding_round_trips_both_forms() {
        let mut out = Vec::new();
        Request::original("alice").encode(&mut out);
        assert_eq!(out, b"\"alice\"");
        let rich = Request {
            keepalive_secs: Some(10),
            caps: Caps::SEQ,
            form: RequestForm::JsonObject,
            ..Request::original("bob")
        };
        out.clear();
        rich.encode(&mut out);
        assert_eq!(
            out,
            br#"{"username": "bob", "keepalive": 10, "caps": ["seq"]}"#
        );
        assert_eq!(parse_request(&out).unwrap(), rich);
    }

    /// A password that is not a string is refused without its value in the message, which
    /// the reply and the logs carry; null is no password.
    #[test]
    fn a_password_of_the_wrong_type_is_refused_without_being_quoted() {
        for payload in [
            &br#"{"username": "bob", "password": 8675309}"#[..],
            br#"{"username": "bob", "password": ["hunter2"]}"#,
            br#"{"username": "bob", "password": {"p": "hunter2"}}"#,
        ] {
            let error = parse_request(payload).expect_err("refused").to_string();
            assert!(error.contains("\"password\" must be a string"), "{error}");
            assert!(
                !error.contains("8675309") && !error.contains("hunter2"),
                "{error}"
            );
        }
        let none = parse_request(br#"{"username": "bob", "password": null}"#).expect("parsed");
        assert_eq!(none.password, None);
        let some = parse_request(br#"{"username": "bob", "password": "pw"}"#).expect("parsed");
        assert_eq!(some.password.as_deref(), Some("pw"));
    }

    #[test]
    fn any_extension_field_makes_the_request_a_json_object() {
        // A bare JSON string carries the username alone: a request in the original form with
        // any other field set must still go out as an object, or the field is silently lost.
        let bob = || Request::original("bob");
        let one_field_each = [
            Request {
                keepalive_secs: Some(10),
                ..bob()
            },
            Request {
                caps: Caps::SEQ,
                ..bob()
            },
            Request {
                max_datagram: Some(1472),
                ..bob()
            },
            Request {
                password: Some("pw".into()),
                ..bob()
            },
            Request {
                listed: Some(false),
                ..bob()
            },
            Request {
                before: Some(7),
                ..bob()
            },
            Request {
                limit: Some(3),
                ..bob()
            },
            Request {
                token: Some("ab".into()),
                ..bob()
            },
        ];
        for request in one_field_each {
            let mut out = Vec::new();
            request.encode(&mut out);
            let sent = Request {
                form: RequestForm::JsonObject,
                ..request.clone()
            };
            assert_eq!(parse_request(&out), Ok(sent), "{request:?}");
        }
        // And the object form is kept when it was asked for, even with the username alone.
        let mut out = Vec::new();
        Request {
            form: RequestForm::JsonObject,
            ..bob()
        }
        .encode(&mut out);
        assert_eq!(out, br#"{"username": "bob"}"#);
    }

    #[test]
    fn max_datagram_is_read_checked_and_written() {
        let r = parse_request(br#"{"username": "bob", "caps": ["batch"], "max_datagram": 65507}"#)
            .unwrap();
        assert_eq!(r.max_datagram, Some(65507));
        assert_eq!(
            parse_request(br#"{"username": "bob"}"#)
                .unwrap()
                .max_datagram,
            None
        );
        for bad in ["511", "65508", "0", "-1", "4294967296", "1.5", "\"4096\""] {
            let payload = format!(r#"{{"username": "bob", "max_datagram": {bad}}}"#);
            let err = parse_request(payload.as_bytes()).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::OutOfRange {
                        field: "max_datagram",
                        ..
                    } | Error::MalformedJson { .. }
                ),
                "{bad}: {err:?}"
            );
        }
        let err = parse_request(br#"{"username": "bob", "max_datagram": 70000}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"max_datagram\" must be between 512 and 65507, got 70000"
        );
        let asked = Request {
            caps: Caps::BATCH,
            max_datagram: Some(1472),
            form: RequestForm::JsonObject,
            ..Request::original("bob")
        };
        let mut out = Vec::new();
        asked.encode(&mut out);
        assert_eq!(
            out,
            br#"{"username": "bob", "caps": ["batch"], "max_datagram": 1472}"#
        );
        assert_eq!(parse_request(&out).unwrap(), asked);
    }

    #[test]
    fn replies_are_written_like_python() {
        let mut out = Vec::new();
        encode_success(&mut out);
        assert_eq!(out, br#"{"success": true}"#);
        out.clear();
        encode_complete("00ff", &mut out);
        assert_eq!(out, br#"{"token": "00ff"}"#);
        out.clear();
        encode_failure(ErrorCode::NameTaken, "say \"hi\"", &mut out);
        assert_eq!(
            out,
            br#"{"success": false, "error": "name_taken", "message": "say \"hi\""}"#
        );
    }

    #[test]
    fn compliance_parsing_accepts_original_forms() {
        assert_eq!(
            parse_compliance(br#"{"success": true}"#),
            Ok(Compliance::Success)
        );
        assert_eq!(
            parse_compliance(br#"{"success": 1}"#),
            Ok(Compliance::Success)
        );
        assert_eq!(
            parse_compliance(br#"{"success": 0}"#),
            Ok(Compliance::Failure {
                code: None,
                message: None
            })
        );
        assert_eq!(
            parse_compliance(br#"{"success": false, "error": "room_not_found", "message": "no"}"#),
            Ok(Compliance::Failure {
                code: Some(ErrorCode::RoomNotFound),
                message: Some("no".into())
            })
        );
        assert!(parse_compliance(br#"{"success": 2}"#).is_err());
        assert!(parse_compliance(b"nope").is_err());
    }

    #[test]
    fn complete_parsing() {
        assert_eq!(
            parse_complete(br#"{"token": "abc", "x": 1}"#),
            Ok("abc".into())
        );
        assert_eq!(
            parse_complete(br#"{"tok": "abc"}"#),
            Err(Error::MissingToken)
        );
        assert!(matches!(
            parse_complete(b"{"),
            Err(Error::MalformedJson { .. })
        ));
    }

    /// The codes as docs/PROTOCOL.md lists them: clients match on these strings, so a
    /// renamed code breaks them even though `parse(as_str())` still round-trips. Kills the
    /// hand mutants that rename a code (`room_exists`, `not_member`, `rate_limited`,
    /// `bad_password` had no test spelling them).
    #[test]
    fn error_codes_are_spelled_as_the_protocol_lists_them() {
        let spelled: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            spelled,
            [
                "room_exists",
                "room_not_found",
                "name_taken",
                "invalid_room_name",
                "invalid_username",
                "unsupported_operation",
                "malformed_request",
                "server_full",
                "rate_limited",
                "bad_password",
                "not_member",
            ]
        );
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }

    #[test]
    fn presence_and_history_flags_are_optional_and_round_trip() {
        // Written only when set; absent reads as false (replies of older daemons).
        let p: RoomPresence =
            parse_json(br#"{"room":"r","host":"a","members":[{"name":"a","registered":true}]}"#)
                .unwrap();
        assert!(!p.more);
        assert!(!serde_json::to_string(&p).unwrap().contains("more"));
        assert_eq!(p.you, None);
        assert!(!serde_json::to_string(&p).unwrap().contains("you"));
        let cut = RoomPresence {
            more: true,
            ..p.clone()
        };
        let text = serde_json::to_string(&cut).unwrap();
        assert!(text.ends_with(r#"],"more":true}"#), "{text}");
        assert_eq!(parse_json::<RoomPresence>(text.as_bytes()).unwrap(), cut);
        let asked = RoomPresence {
            you: Some(PresentMember {
                name: "zed".into(),
                registered: false,
            }),
            ..cut
        };
        let text = serde_json::to_string(&asked).unwrap();
        assert!(
            text.ends_with(r#""more":true,"you":{"name":"zed","registered":false}}"#),
            "{text}"
        );
        assert_eq!(parse_json::<RoomPresence>(text.as_bytes()).unwrap(), asked);

        let m: HistoryMessage =
            parse_json(br#"{"seq":1,"sender":"b","text":"hi","at":2.5}"#).unwrap();
        assert!(!m.truncated);
        assert!(!serde_json::to_string(&m).unwrap().contains("truncated"));
        let cut = HistoryMessage {
            truncated: true,
            ..m
        };
        let text = serde_json::to_string(&cut).unwrap();
        assert!(text.ends_with(r#","truncated":true}"#), "{text}");
        assert_eq!(parse_json::<HistoryMessage>(text.as_bytes()).unwrap(), cut);
    }

    #[test]
    fn caps_bits_round_trip() {
        let caps = Caps::from_names(["batch", "notices"]);
        assert_eq!(Caps::from_bits(caps.bits()), caps);
        assert_eq!(caps.names().collect::<Vec<_>>(), ["notices", "batch"]);
    }

    #[test]
    fn a_capability_named_twice_is_still_asked_for() {
        let r = parse_request(br#"{"username": "bob", "caps": ["seq", "batch", "seq"]}"#).unwrap();
        assert_eq!(r.caps, Caps::SEQ.with(Caps::BATCH));
        assert_eq!(Caps::SEQ.with(Caps::SEQ), Caps::SEQ);
    }

    /// A caps byte read back from the state file keeps only the three known capabilities: an
    /// unknown bit kept would make a set with no capability look non-empty and be written back.
    #[test]
    fn caps_from_bits_drops_unknown_bits() {
        let all = Caps::NOTICES.with(Caps::SEQ).with(Caps::BATCH);
        assert_eq!(Caps::from_bits(0xff), all);
        assert_eq!(Caps::from_bits(0xff).bits(), 0x07);
        assert!(Caps::from_bits(0xf8).is_empty());
        assert_eq!(Caps::from_bits(0x80 | Caps::SEQ.bits()), Caps::SEQ);
    }

    /// PROTOCOL.md: `max_datagram` is 512–65507, both ends included.
    #[test]
    fn max_datagram_accepts_both_ends_of_its_range() {
        for edge in [512, 65507] {
            let payload = format!(r#"{{"username": "bob", "max_datagram": {edge}}}"#);
            let request = parse_request(payload.as_bytes()).unwrap();
            assert_eq!(request.max_datagram, Some(edge), "{edge}");
        }
    }

    /// A client that does not say `"max_datagram"` gets batches of at most 4096 bytes, the
    /// original client's receive buffer (`ocm` says nothing when the daemon is on another
    /// host). Nothing in this crate reads the constant (the daemon does), and the daemon's
    /// own test only bounds its batches from above, so only a test of the value notices a
    /// change. Kills the hand mutants that move `DEFAULT_MAX_DATAGRAM` to 4095 or 4097.
    #[test]
    fn the_default_max_datagram_is_the_original_receive_buffer() {
        assert_eq!(DEFAULT_MAX_DATAGRAM, 4096);
        assert_eq!(
            parse_request(br#"{"username": "a"}"#).unwrap().max_datagram,
            None
        );
    }

    /// As for Presence and History: a listing's `more` is written only when set, and a listing
    /// without it (the reply of an older daemon) reads as complete.
    #[test]
    fn room_list_more_is_optional_and_round_trips() {
        let list: RoomList =
            parse_json(br#"{"rooms":[{"name":"r","members":2,"created_at":1.5,"password":true}]}"#)
                .unwrap();
        assert!(!list.more);
        assert_eq!(
            list.rooms,
            [ListedRoom {
                name: "r".into(),
                members: 2,
                created_at: 1.5,
                password: true,
            }]
        );
        assert!(!serde_json::to_string(&list).unwrap().contains("more"));
        let cut = RoomList { more: true, ..list };
        let text = serde_json::to_string(&cut).unwrap();
        assert!(text.ends_with(r#"],"more":true}"#), "{text}");
        assert_eq!(parse_json::<RoomList>(text.as_bytes()).unwrap(), cut);
    }
}
