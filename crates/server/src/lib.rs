//! `ocmd`, the Online Chat Messenger daemon, as a library: the binary in `main.rs` only parses
//! flags and sets up logging.
//!
//! - [`rooms`]: the pure room/token registry and every relay decision;
//! - [`outbox`]: the send list the registry fills and the UDP shell drains;
//! - [`token`]: member tokens;
//! - [`handshake`]: TCRP requests to reply bytes;
//! - [`rate`]: the token-bucket rate limits (chat, requests, failed passwords);
//! - [`password`]: room-password hashing and checks on a worker thread;
//! - [`store`], [`journal`], [`record`], [`persist`]: the state file, its journal and the writer
//!   thread;
//! - [`event_loop`]: the mio shell that owns every socket;
//! - [`conn`], [`udp`], [`last_words`], [`mmsg`], [`local`], [`peer`], [`sockopt`]: what the
//!   loop does with its sockets;
//! - [`wall_clock`]: the wall clock that datagram ages are measured on;
//! - [`config`], [`metrics`], [`delay`], [`notify`], [`http`], [`plural`]: what operators see;
//! - [`activation`]: sockets passed by systemd's socket activation;
//! - [`error`]: what can stop start-up, and what can fail in the store.
//!
//! Wire formats live in the `tcrp` and `ucrp` crates, which know nothing of sockets.

pub mod activation;
pub mod config;
pub mod conn;
pub mod delay;
pub mod error;
pub mod event_loop;
pub mod handshake;
pub mod http;
pub mod journal;
pub mod last_words;
pub mod local;
pub mod metrics;
pub mod mmsg;
pub mod notify;
pub mod outbox;
pub mod panics;
pub mod password;
pub mod peer;
pub mod persist;
pub mod plural;
pub mod rate;
pub mod record;
pub mod rooms;
mod serde_skip;
pub mod sockopt;
pub mod store;
pub mod token;
pub mod udp;
pub mod wall_clock;

/// Test helpers shared with the integration tests: skipped checks reported as they report
/// them, a full notification queue, and waits that a stop of the process interrupts. (Some
/// serve the integration tests alone.)
#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/common/shared.rs"]
mod test_shared;

#[cfg(test)]
mod test_log;

pub use config::Config;
pub use error::Error;
pub use event_loop::Server;
