//! TCRP: the TCP chat-room handshake of Online Chat Messenger, as bytes in and bytes out.
//!
//! A client opens a TCP connection and sends a REQUEST frame to create or join a room; the
//! server answers with a COMPLIANCE frame (success or a refusal) and, on success, a COMPLETE
//! frame carrying the member's secret token. The extension operations 3 (list rooms),
//! 4 (presence) and 5 (history) are answered the same way, with a JSON COMPLETE payload.
//!
//! This crate owns the frame layout ([`frame`]), the JSON payloads carried inside frames
//! ([`payload`]) and the naming rules both ends apply ([`names`]). It does **not** own sockets,
//! clocks, randomness or room state: callers feed it byte slices and get values back, so every
//! rule here is testable without I/O. The byte-level specification is `docs/PROTOCOL.md`.
#![warn(missing_docs)]

mod error;
pub mod frame;
pub mod names;
pub mod payload;

pub use error::Error;
pub use frame::{decode, Frame, Operation, State, DEFAULT_MAX_PAYLOAD, HEADER_LEN};
pub use payload::{Caps, Compliance, ErrorCode, Request};
