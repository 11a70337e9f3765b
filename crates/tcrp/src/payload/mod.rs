//! The JSON payloads carried in TCRP frames.
//!
//! REQUEST payload, three accepted forms, tried in this order:
//! 1. a JSON string, `"alice"`: what the original Python client sends (`json.dumps(name)`),
//!    each `\u` escape of a lone surrogate in it read as U+FFFD (Python writes one for each
//!    byte of a name that was not UTF-8 in the client's locale);
//! 2. a JSON object, `{"username": "alice", "keepalive": 10, "caps": ["seq"]}`: the door for
//!    ocm extensions; unknown keys are ignored so later clients stay compatible;
//! 3. failing both, the payload's UTF-8 text, taken whole as the username; but a payload
//!    that begins with `{` (after white space, or characters that show as nothing such as a
//!    byte-order mark) and is not JSON is a JSON object gone wrong
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
//!
//! Split by job: `request` parses a REQUEST payload (and names the capabilities it may ask
//! for), `reply` writes and reads the COMPLIANCE and COMPLETE of a create or join (and names
//! the error codes), `extensions` holds the JSON payloads of the list, presence and history
//! operations.

mod extensions;
mod reply;
mod request;
#[cfg(test)]
mod tests;

pub use extensions::*;
pub use reply::*;
pub use request::*;

use serde::Deserialize;

use crate::Error;

/// Decodes a JSON payload into `T`: a COMPLIANCE or COMPLETE read as a [`serde_json::Value`],
/// or the COMPLETE payload of an extension operation. Bytes that are not JSON, and JSON of
/// another shape, are [`Error::MalformedJson`].
pub fn parse_json<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(payload).map_err(malformed)
}

/// The [`Error::MalformedJson`] for a JSON parser's error.
fn malformed(e: serde_json::Error) -> Error {
    Error::MalformedJson {
        reason: e.to_string(),
    }
}
