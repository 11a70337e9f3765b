//! The benchmark's one error type. Every failure that stops a run is one of these; `main`
//! prints its `Display` and exits non-zero.

use std::io;

/// Why a benchmark run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket, file or process operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// `ocmd` could not be started, or did not print its `listening` line in time.
    #[error("ocmd did not start: {reason}\n--- last ocmd log lines ---\n{log}")]
    DaemonStart {
        /// What went wrong.
        reason: String,
        /// The daemon's last stderr lines.
        log: String,
    },
    /// `ocmd` exited while the benchmark still needed it.
    #[error("ocmd exited during the run ({status})\n--- last ocmd log lines ---\n{log}")]
    DaemonExited {
        /// The exit status as printed by the OS.
        status: String,
        /// The daemon's last stderr lines.
        log: String,
    },
    /// A TCRP create/join exchange failed or was refused.
    #[error("handshake ({operation} room {room:?}): {reason}")]
    Handshake {
        /// `create` or `join`.
        operation: &'static str,
        /// The room asked for.
        room: String,
        /// The refusal or the protocol error.
        reason: String,
    },
    /// The TCRP codec refused to encode or decode a frame.
    #[error("tcrp: {0}")]
    Tcrp(#[from] tcrp::Error),
    /// The UCRP codec refused to encode a datagram.
    #[error("ucrp: {0}")]
    Ucrp(#[from] ucrp::Error),
    /// Members could not be confirmed as registered (their probe never arrived).
    #[error("registration: {0}")]
    Register(String),
    /// The metrics endpoint could not be read or parsed.
    #[error("metrics scrape from {addr}: {reason}")]
    Metrics {
        /// The metrics address.
        addr: std::net::SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The arguments make no sense together (e.g. fewer than two members).
    #[error("invalid arguments: {0}")]
    Usage(String),
    /// A preload did not build the state asked for (a create or join failed).
    #[error("the preload fell short: {0}")]
    Preload(String),
    /// A soak run found a delivery missing or unexpected, or something left behind.
    #[error("soak failed: {0}")]
    Soak(String),
    /// A smoke check found nothing delivered or no handshake completed.
    #[error("smoke check failed: {0}")]
    Smoke(String),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to an `io::Result`.
pub trait Context<T> {
    /// Wraps the error in [`Error::Io`] with `context`.
    fn ctx(self, context: impl Into<String>) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context.into(),
            source,
        })
    }
}
