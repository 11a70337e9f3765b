//! The client's one error type, [`ClientError`], and the exit code each error maps to.
//!
//! Every variant carries what a user needs to act on it (the address that did not answer, the
//! room that was refused, the rule a name broke). `main` prints `ocm: {error}` and exits with
//! [`ClientError::exit_code`]: 2 when the request itself was wrong or refused (including an
//! unreadable `--password-file`), 1 for everything else (network, protocol and local I/O
//! failures). A chat that ends without an error exits 0, or [`EXIT_ROOM_ENDED`] when the
//! room ended it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tcrp::names::{self, NameRule};
use tcrp::ErrorCode;
use thiserror::Error;

use crate::handshake::Verb;

/// Exit code for a request the server refused or that was invalid before it was sent.
pub const EXIT_REFUSED: u8 = 2;
/// Exit code for every other failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a chat that the room ended rather than the user: the room was closed, or
/// the server no longer holds the member (removed after missing keepalives, or the room gone
/// when asked). A script can tell it from `/quit` or the end of its input, which exit 0.
pub const EXIT_ROOM_ENDED: u8 = 3;

/// Everything that stops `ocm`.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The room name given on the command line breaks the naming rules; found before any
    /// connection is made.
    #[error("invalid room name {room:?}: it {rule}")]
    InvalidRoomName {
        /// The name as given.
        room: String,
        /// The rule it broke.
        rule: NameRule,
    },
    /// The username given with `--name` breaks the naming rules; found before any connection
    /// is made.
    #[error("invalid username {name:?}: it {rule}{}; nothing was sent", username_limits(*.rule))]
    InvalidUsername {
        /// The name as given.
        name: String,
        /// The rule it broke.
        rule: NameRule,
    },
    /// The server host name could not be resolved, or resolved to no address.
    #[error("cannot resolve server {host:?}: {source}")]
    Resolve {
        /// The `--server` value.
        host: String,
        /// Why resolution failed.
        source: io::Error,
    },
    /// No resolved address accepted the TCP connection (refused, unreachable or timed out).
    #[error(
        "cannot connect to {addr}: {source}{}",
        if *first && source.kind() == io::ErrorKind::ConnectionRefused {
            "; is ocmd running there, and is that its handshake port?"
        } else {
            ""
        }
    )]
    Connect {
        /// The last address tried, as `host:port`.
        addr: String,
        /// The error of that last attempt.
        source: io::Error,
        /// Whether it was the run's first connection, to `--server` and `--tcp-port` as
        /// given: a refusal then most likely means no daemon there, or the wrong port. A
        /// later one (`/who`, `/history`, the checks) goes where the handshake went.
        first: bool,
    },
    /// The server's handshake bytes could not be decoded (oversized payload, malformed JSON,
    /// COMPLETE without a token). A header no TCRP server sends is [`ClientError::NotTcrp`].
    #[error("bad handshake reply from the server: {0}")]
    Handshake(#[from] tcrp::Error),
    /// The server's reply has a header no TCRP server sends (a payload size over 64 bits, an
    /// unknown state byte): the address most likely serves another protocol.
    #[error(
        "the reply is not TCRP ({0}): is --server an ocm server, and --tcp-port its handshake \
         port (not its UDP or metrics port)?"
    )]
    NotTcrp(tcrp::Error),
    /// The server closed the TCP connection before sending a whole frame.
    #[error(
        "the server closed the connection before sending its {expected} frame{}",
        if *silent { " (it sent nothing at all: is --tcp-port its handshake port, or the server at its connection limit?)" } else { "" }
    )]
    HandshakeClosed {
        /// The frame that was awaited: COMPLIANCE or COMPLETE.
        expected: tcrp::State,
        /// Not a byte came back: an ocmd answers every whole request, so the port may serve
        /// something else (the metrics port waits for an HTTP request, then closes).
        silent: bool,
    },
    /// The server did not send a whole frame within the handshake timeout
    /// ([`HANDSHAKE_TIMEOUT`](crate::handshake::HANDSHAKE_TIMEOUT) for a query,
    /// [`ROOM_HANDSHAKE_TIMEOUT`](crate::handshake::ROOM_HANDSHAKE_TIMEOUT) for a create or
    /// join).
    #[error(
        "the server did not send its {expected} frame within {} s{}",
        .after.as_secs(),
        if *silent {
            " (it sent nothing at all: the server may be busy, or --tcp-port may not be its \
             handshake port)"
        } else {
            ""
        }
    )]
    HandshakeTimeout {
        /// The frame that was awaited: COMPLIANCE or COMPLETE.
        expected: tcrp::State,
        /// How long the client waited.
        after: Duration,
        /// Not a byte came back (the metrics port, say, waits for an HTTP request).
        silent: bool,
    },
    /// The server sent a frame in a state other than the one the exchange is at.
    #[error("the server sent a {got} frame where {expected} was expected")]
    UnexpectedFrame {
        /// The state the exchange expected.
        expected: tcrp::State,
        /// The state received.
        got: tcrp::State,
    },
    /// The server answered with a failed COMPLIANCE.
    #[error("cannot {verb} room {room:?}: {}", refusal_text(*.code, .message.as_deref()))]
    Refused {
        /// Whether the request was to create or to join.
        verb: Verb,
        /// The room asked for.
        room: String,
        /// The machine-readable reason, when the server sent one this version knows.
        code: Option<ErrorCode>,
        /// The server's own words, when it sent some (already made safe to print).
        message: Option<String>,
    },
    /// The server answered a list, presence or history request with a failed COMPLIANCE.
    #[error("cannot {what}: {}", refusal_text(*.code, .message.as_deref()))]
    QueryRefused {
        /// What was asked, e.g. `list the rooms` or `see who is in room "lobby"`.
        what: String,
        /// The machine-readable reason, when the server sent one this version knows.
        code: Option<ErrorCode>,
        /// The server's own words, when it sent some (already made safe to print).
        message: Option<String>,
    },
    /// The file named by `--password-file` cannot be read.
    #[error("cannot read the password file {}: {source}", .path.display())]
    PasswordFile {
        /// The path as given.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// The password given cannot be used: it is empty (the server refuses it for a new room
    /// and takes it for no password at all on a join) or, from the environment, not UTF-8
    /// (JSON cannot carry it).
    #[error("the password from {from} {problem}")]
    UnusablePassword {
        /// Where it came from: `--password`, `--password-file` or `OCM_PASSWORD`.
        from: &'static str,
        /// What is wrong with it: `is empty` or `is not UTF-8`.
        problem: &'static str,
    },
    /// The file named by `--password-file` holds more than one request can carry.
    #[error(
        "the password from --password-file is longer than a request can carry ({} KiB)",
        .max / 1024
    )]
    PasswordFileTooLong {
        /// The most a password file may hold, in bytes.
        max: usize,
    },
    /// The COMPLETE token cannot be carried in a UCRP datagram (empty or over 255 bytes), or
    /// holds a byte that is not printable ASCII (ocmd's tokens are hex digits, or `token_` and
    /// hex digits from an original server's state file).
    #[error(
        "the server issued an unusable token of {len} bytes (must be 1 to 255 visible ASCII characters, no spaces)"
    )]
    BadToken {
        /// The token's length in bytes.
        len: usize,
    },
    /// A file that could not be written (`ocm generate man`).
    #[error("cannot write {}: {source}", .path.display())]
    WriteFile {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// An I/O error on a socket, on standard input or output, or while setting up signals.
    #[error("{context}: {source}")]
    Io {
        /// What the client was doing, e.g. "sending the request".
        context: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

/// The limits a username broke, when it broke one: `--name` may hold at most
/// [`MAX_USERNAME_CHARS`](names::MAX_USERNAME_CHARS) characters and
/// [`MAX_USERNAME_BYTES`](names::MAX_USERNAME_BYTES) bytes of UTF-8.
fn username_limits(rule: NameRule) -> String {
    match rule {
        NameRule::TooLong => format!(
            " (at most {} characters and {} bytes of UTF-8)",
            names::MAX_USERNAME_CHARS,
            names::MAX_USERNAME_BYTES
        ),
        _ => String::new(),
    }
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::InvalidRoomName { .. }
            | ClientError::InvalidUsername { .. }
            | ClientError::Refused { .. }
            | ClientError::QueryRefused { .. }
            | ClientError::PasswordFile { .. }
            | ClientError::UnusablePassword { .. }
            | ClientError::PasswordFileTooLong { .. } => EXIT_REFUSED,
            _ => EXIT_FAILURE,
        }
    }

    /// Wraps an I/O error with what the client was doing.
    pub fn io(context: &'static str) -> impl FnOnce(io::Error) -> ClientError {
        move |source| ClientError::Io { context, source }
    }
}

/// The reason shown for a refusal: the server's message, else its error code, else a generic
/// text (the original server sends a bare `{"success": 0}`).
fn refusal_text(code: Option<ErrorCode>, message: Option<&str>) -> String {
    match (message, code) {
        (Some(message), _) if !message.is_empty() => message.to_owned(),
        (_, Some(code)) => code.as_str().to_owned(),
        _ => "the server refused the request".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_prefers_the_message_then_the_code() {
        let refused = |code, message: Option<&str>| ClientError::Refused {
            verb: Verb::Create,
            room: "lobby".into(),
            code,
            message: message.map(str::to_owned),
        };
        assert_eq!(
            refused(Some(ErrorCode::RoomExists), Some("room lobby exists")).to_string(),
            "cannot create room \"lobby\": room lobby exists"
        );
        assert_eq!(
            refused(Some(ErrorCode::RoomExists), None).to_string(),
            "cannot create room \"lobby\": room_exists"
        );
        assert_eq!(
            refused(None, Some("")).to_string(),
            "cannot create room \"lobby\": the server refused the request"
        );
        assert_eq!(refused(None, None).exit_code(), EXIT_REFUSED);
    }

    #[test]
    fn query_refusals_and_password_errors_are_refusals() {
        let refused = ClientError::QueryRefused {
            what: "list the rooms".into(),
            code: Some(ErrorCode::UnsupportedOperation),
            message: None,
        };
        assert_eq!(
            refused.to_string(),
            "cannot list the rooms: unsupported_operation"
        );
        assert_eq!(refused.exit_code(), EXIT_REFUSED);
        let file = ClientError::PasswordFile {
            path: "/nope/pw".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(file
            .to_string()
            .starts_with("cannot read the password file /nope/pw: "));
        assert_eq!(file.exit_code(), EXIT_REFUSED);
        let empty = ClientError::UnusablePassword {
            from: "OCM_PASSWORD",
            problem: "is empty",
        };
        assert_eq!(empty.to_string(), "the password from OCM_PASSWORD is empty");
        assert_eq!(empty.exit_code(), EXIT_REFUSED);
    }

    #[test]
    fn exit_codes_split_bad_requests_from_failures() {
        let invalid = ClientError::InvalidUsername {
            name: "a\tb".into(),
            rule: NameRule::ControlCharacter,
        };
        assert_eq!(
            invalid.to_string(),
            "invalid username \"a\\tb\": it contains a control character; nothing was sent"
        );
        let long = ClientError::InvalidUsername {
            name: "a".repeat(65),
            rule: NameRule::TooLong,
        };
        assert!(
            long.to_string().ends_with(
                ": it is too long (at most 64 characters and 255 bytes of UTF-8); nothing was sent"
            ),
            "{long}"
        );
        assert_eq!(invalid.exit_code(), EXIT_REFUSED);
        let connect = ClientError::Connect {
            addr: "127.0.0.1:9".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
            first: true,
        };
        assert!(connect
            .to_string()
            .starts_with("cannot connect to 127.0.0.1:9: "));
        assert!(
            connect
                .to_string()
                .ends_with("; is ocmd running there, and is that its handshake port?"),
            "a refused connection says what most likely refused it: {connect}"
        );
        let timed_out = ClientError::Connect {
            addr: "192.0.2.1:9".into(),
            source: io::Error::from(io::ErrorKind::TimedOut),
            first: true,
        };
        assert!(
            !timed_out.to_string().contains("is ocmd running"),
            "only a refusal means nothing listens: {timed_out}"
        );
        let later = ClientError::Connect {
            addr: "127.0.0.1:9".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
            first: false,
        };
        assert!(
            !later.to_string().contains("is ocmd running"),
            "a later connection goes where the handshake went: {later}"
        );
        assert_eq!(connect.exit_code(), EXIT_FAILURE);
    }
}
