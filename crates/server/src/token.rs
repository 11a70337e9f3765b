//! Member tokens: generation, constant-time comparison, and the short form used in logs.
//!
//! A token is 128 bits from the operating system's CSPRNG, hex-encoded (32 characters). Tokens
//! loaded from files written by the original server (`token_` + 32 hex digits) are kept as they
//! are: the registry treats a token as opaque bytes.

use std::fmt;

use rand::CryptoRng;
use subtle::ConstantTimeEq;

/// Random bytes in a fresh token.
pub const TOKEN_BYTES: usize = 16;
/// Characters of a token shown in logs: enough to correlate lines, far too few to use.
pub const LOG_PREFIX_CHARS: usize = 6;

/// A member's bearer secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(Box<str>);

impl Token {
    /// Draws a new token from `rng` (the OS CSPRNG in production, a seeded RNG in tests).
    pub fn generate(rng: &mut dyn CryptoRng) -> Token {
        let mut bytes = [0u8; TOKEN_BYTES];
        rng.fill_bytes(&mut bytes);
        Token(hex::encode(bytes).into_boxed_str())
    }

    /// Wraps a token read from the state file.
    pub fn from_stored(text: &str) -> Token {
        Token(text.into())
    }

    /// The token as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares with bytes from the network in time independent of where they differ.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        ct_eq(self.0.as_bytes(), bytes)
    }

    /// A short prefix for logs (never log a whole token).
    pub fn short(&self) -> Short<'_> {
        Short(self.0.as_bytes())
    }
}

/// Constant-time equality for equal lengths; lengths themselves are not secret.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Display adapter printing a token prefix followed by `…`.
pub struct Short<'a>(&'a [u8]);

impl<'a> Short<'a> {
    /// For tokens seen only as bytes (an unknown token in a datagram).
    pub fn of(bytes: &'a [u8]) -> Short<'a> {
        Short(bytes)
    }
}

impl fmt::Display for Short<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(LOG_PREFIX_CHARS)];
        write!(f, "{}…", String::from_utf8_lossy(shown).escape_debug())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn tokens_are_32_hex_digits_and_differ() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = Token::generate(&mut rng);
        let b = Token::generate(&mut rng);
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn matching_and_short_form() {
        let t = Token::from_stored("abcdef0123");
        assert!(t.matches(b"abcdef0123"));
        assert!(!t.matches(b"abcdef0124"));
        assert!(!t.matches(b"abcdef012"));
        assert_eq!(t.short().to_string(), "abcdef…");
        assert_eq!(format!("{t:?}"), "Token(abcdef…)");
    }

    /// A token from a datagram can be any 0 to 255 bytes: the log form of a shorter one is the
    /// whole of it, and control characters in it are escaped, so a peer can neither panic the
    /// daemon (slicing past the end) nor start a forged log line. Kills the hand mutants that
    /// slice `..LOG_PREFIX_CHARS` without `min` and that drop `escape_debug`.
    #[test]
    fn the_log_form_of_peer_bytes_is_short_and_escaped() {
        assert_eq!(Short::of(b"").to_string(), "…");
        assert_eq!(Short::of(b"ab").to_string(), "ab…");
        assert_eq!(Short::of(b"\nINFO: x").to_string(), "\\nINFO:…");
        assert_eq!(Short::of(b"\x1b[2Jab").to_string(), "\\u{1b}[2Jab…");
    }
}
