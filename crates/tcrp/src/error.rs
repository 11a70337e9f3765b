//! The one error type of the crate.

use thiserror::Error;

/// Everything that can go wrong while decoding or encoding TCRP bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// The header announces a payload larger than the caller's cap. Raised as soon as the
    /// header is complete, before any of the payload is buffered.
    #[error("payload of {size} bytes is over the limit of {max} bytes")]
    PayloadTooLarge {
        /// The size the header announced.
        size: u64,
        /// The cap in force.
        max: usize,
    },
    /// The header's 29-byte payload size field holds a number over `u64::MAX`. No TCRP
    /// writer sends one (every payload cap is far below), so the peer most likely speaks
    /// another protocol: an HTTP request or an SSH banner lands here.
    #[error("payload size field over 2^64 - 1 (not a TCRP peer?)")]
    PayloadSizeOverflow,
    /// Header byte 2 is not one of the three states (0, 1, 2).
    #[error("unknown state {state:#04x} (expected 0 REQUEST, 1 COMPLIANCE or 2 COMPLETE)")]
    UnknownState {
        /// The state byte received.
        state: u8,
    },
    /// An encoder was given a room name longer than the one-byte size field can carry.
    #[error("room name of {len} bytes does not fit the 1-byte size field (max 255)")]
    RoomNameTooLong {
        /// Length of the offending name in bytes.
        len: usize,
    },
    /// A payload that must be UTF-8 text is not.
    #[error("payload is not valid UTF-8")]
    PayloadNotUtf8,
    /// A JSON payload does not parse, or is not of the expected shape.
    #[error("malformed JSON payload: {reason}")]
    MalformedJson {
        /// What was wrong, from the JSON parser.
        reason: String,
    },
    /// A request field holds a number outside the range it allows.
    #[error("\"{field}\" must be between {min} and {max}, got {value}")]
    OutOfRange {
        /// The JSON key.
        field: &'static str,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
        /// What the request held.
        value: u64,
    },
    /// A COMPLETE payload carries no `token` string.
    #[error("COMPLETE payload has no \"token\" string")]
    MissingToken,
}
