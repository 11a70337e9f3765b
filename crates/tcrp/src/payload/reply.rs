//! The COMPLIANCE and COMPLETE payloads of a create or join, written as Python's `json.dumps`
//! writes them and read leniently, and the error codes of a refusal.

use serde_json::Value;

use super::parse_json;
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
    /// The room name is empty, too long, not UTF-8 or holds control characters; or, when the
    /// server refuses invisible characters, a new room's name holds a character that shows as
    /// nothing or reorders the text, or begins or ends with white space.
    InvalidRoomName,
    /// The username is empty, too long or holds control characters; or, when the server
    /// refuses invisible characters, holds such a character or white space at either end.
    InvalidUsername,
    /// The operation byte is not one this server serves.
    UnsupportedOperation,
    /// The frame or its payload could not be understood: a COMPLIANCE or COMPLETE state sent
    /// to the server, a payload that is not UTF-8 or not of the expected JSON shape, an
    /// out-of-range `max_datagram`, an empty create password; or a password the server could
    /// not hash. A state byte above 2 or an oversized payload also closes the connection.
    MalformedRequest,
    /// A server-wide cap (rooms, members, tokens) is reached.
    ServerFull,
    /// Too many requests or wrong passwords from this source, the rate limiter's table of
    /// sources is full, or the password-checking queue is full. Any operation can get it.
    RateLimited,
    /// A wrong or missing room password.
    BadPassword,
    /// A members-only request (history) without a member token of that room.
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
    let value: Value = parse_json(payload)?;
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
    let value: Value = parse_json(payload)?;
    value
        .get("token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(Error::MissingToken)
}

/// A JSON string literal for `s`, quoted and escaped the way serde does (which matches
/// Python for ASCII).
pub(super) fn json_string(s: &str) -> String {
    Value::from(s).to_string()
}

/// Appends a JSON object with its top-level separators as Python's `json.dumps` writes them
/// (`{"a": 1, "b": "x"}`, one space after `:` and `,`). Nested values are written compactly
/// (`["notices","seq"]`, where Python writes `["notices", "seq"]`).
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
