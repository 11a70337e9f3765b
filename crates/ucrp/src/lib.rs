//! UCRP: the UDP chat datagrams of Online Chat Messenger, as bytes in and bytes out.
//!
//! Clients send [`datagram`]s (`__REGISTER__`, chat text, `__LEAVE__`) carrying their room
//! name and token; the server relays [`delivery`] datagrams (`[sender size][sender][text]`, or
//! the bare `__ROOM_CLOSED__` notice) to the other members. Members that ask for them at join
//! also get the extension frames of [`delivery`]: batch (several frames in one datagram),
//! sequenced chat (with the room's sequence number) and notice (joined, left, timed out).
//!
//! This crate owns the byte layouts and nothing else: no sockets, no room state, no clocks.
//! Which datagram is relayed to whom is the server's registry's decision. The byte-level
//! specification is `docs/PROTOCOL.md`.
#![warn(missing_docs)]

pub mod datagram;
pub mod delivery;
mod error;

pub use datagram::{parse, Datagram, Message, MAX_DATAGRAM_LEN};
pub use delivery::{Delivery, Notice, ROOM_CLOSED};
pub use error::Error;
