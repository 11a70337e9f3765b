//! The one error type of the crate.

use thiserror::Error;

/// Why a datagram could not be decoded or encoded. Every variant has a short stable
/// [`Error::reason`] used as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Error {
    /// Fewer bytes than the fixed part of the layout.
    #[error("datagram of {len} bytes is shorter than its {min}-byte fixed part")]
    TooShort {
        /// Bytes received.
        len: usize,
        /// Bytes the fixed part needs.
        min: usize,
    },
    /// More bytes than a UCRP datagram may have.
    #[error("datagram of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Bytes received or to be sent.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The size fields announce more bytes than the datagram holds.
    #[error("size fields announce {declared} bytes but the datagram holds {actual}")]
    LengthMismatch {
        /// Bytes the size fields add up to.
        declared: usize,
        /// Bytes present.
        actual: usize,
    },
    /// A client datagram with no message after its token.
    #[error("datagram carries no message")]
    EmptyMessage,
    /// A token of zero bytes.
    #[error("datagram carries an empty token")]
    EmptyToken,
    /// The message (or a name) is not valid UTF-8.
    #[error("datagram text is not valid UTF-8")]
    NotUtf8,
    /// A chat message that spells a reserved control word, such as `__ROOM_CLOSED__`, which
    /// the original client would take for the server's notice.
    #[error("message is a reserved control word")]
    ReservedWord,
    /// An encoder was given a name or token longer than its one-byte size field.
    #[error("field of {len} bytes does not fit a 1-byte size field")]
    FieldTooLong {
        /// The field's length.
        len: usize,
    },
    /// An extension frame of a kind this version does not know.
    #[error("unknown extension frame kind {kind:#04x}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// A membership notice (extension kind 0x03) whose `what` byte this version does not
    /// know. Only server datagrams carry notices: a client meets this, the daemon never does.
    #[error("unknown membership notice {what:#04x}")]
    UnknownNotice {
        /// The `what` byte.
        what: u8,
    },
}

impl Error {
    /// A short stable name for the drop reason, for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::TooShort { .. } => "too_short",
            Error::TooLarge { .. } => "too_large",
            Error::LengthMismatch { .. } => "length_mismatch",
            Error::EmptyMessage => "empty_message",
            Error::EmptyToken => "empty_token",
            Error::NotUtf8 => "not_utf8",
            Error::ReservedWord => "reserved_word",
            Error::FieldTooLong { .. } => "field_too_long",
            Error::UnknownKind { .. } => "unknown_kind",
            Error::UnknownNotice { .. } => "unknown_notice",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_metric_labels_operations_md_documents() {
        // `ocm_datagrams_dropped_total{reason=...}` carries these (docs/OPERATIONS.md):
        // renaming one silently breaks every dashboard and alert that counts it.
        let labels = [
            (Error::TooShort { len: 1, min: 2 }, "too_short"),
            (
                Error::TooLarge {
                    len: 5000,
                    max: 4096,
                },
                "too_large",
            ),
            (
                Error::LengthMismatch {
                    declared: 9,
                    actual: 3,
                },
                "length_mismatch",
            ),
            (Error::EmptyMessage, "empty_message"),
            (Error::EmptyToken, "empty_token"),
            (Error::NotUtf8, "not_utf8"),
            (Error::ReservedWord, "reserved_word"),
            (Error::FieldTooLong { len: 256 }, "field_too_long"),
            (Error::UnknownKind { kind: 9 }, "unknown_kind"),
            (Error::UnknownNotice { what: 9 }, "unknown_notice"),
        ];
        for (error, label) in labels {
            assert_eq!(error.reason(), label, "{error:?}");
        }
    }
}
