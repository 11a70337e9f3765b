//! The rules for room names and usernames, shared by server and client.
//!
//! A room name is 1 to 255 bytes of UTF-8 (the frame's one-byte size field) without control
//! characters. A username is 1 to 64 characters of UTF-8 without control characters, and at
//! most 255 bytes so that it fits the one-byte sender size of a relayed UCRP datagram.

use std::fmt;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME_BYTES: usize = 255;
/// Longest username, in characters.
pub const MAX_USERNAME_CHARS: usize = 64;
/// Longest username, in bytes (the UCRP sender size is one byte).
pub const MAX_USERNAME_BYTES: usize = 255;

/// Which rule a name broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    /// The name is empty.
    Empty,
    /// The name is longer than allowed.
    TooLong,
    /// The name is not valid UTF-8.
    NotUtf8,
    /// The name holds a control character (including newlines and tabs).
    ControlCharacter,
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameRule::Empty => "is empty",
            NameRule::TooLong => "is too long",
            NameRule::NotUtf8 => "is not valid UTF-8",
            NameRule::ControlCharacter => "contains a control character",
        })
    }
}

/// Checks a room name as it came off the wire and returns it as text.
pub fn check_room_name(bytes: &[u8]) -> Result<&str, NameRule> {
    if bytes.is_empty() {
        return Err(NameRule::Empty);
    }
    if bytes.len() > MAX_ROOM_NAME_BYTES {
        return Err(NameRule::TooLong);
    }
    let name = std::str::from_utf8(bytes).map_err(|_| NameRule::NotUtf8)?;
    if name.chars().any(char::is_control) {
        return Err(NameRule::ControlCharacter);
    }
    Ok(name)
}

/// Checks a username (already decoded from its payload).
pub fn check_username(name: &str) -> Result<(), NameRule> {
    if name.is_empty() {
        return Err(NameRule::Empty);
    }
    if name.len() > MAX_USERNAME_BYTES || name.chars().count() > MAX_USERNAME_CHARS {
        return Err(NameRule::TooLong);
    }
    if name.chars().any(char::is_control) {
        return Err(NameRule::ControlCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_at_their_bounds() {
        assert_eq!(check_room_name(b"lobby"), Ok("lobby"));
        assert_eq!(check_room_name(&[b'a'; 255]).map(str::len), Ok(255));
        assert_eq!(check_room_name(&[b'a'; 256]), Err(NameRule::TooLong));
        assert_eq!(check_room_name(b""), Err(NameRule::Empty));
        assert_eq!(check_room_name(&[0xff, 0xfe]), Err(NameRule::NotUtf8));
        assert_eq!(check_room_name(b"a\nb"), Err(NameRule::ControlCharacter));
        assert_eq!(check_room_name("部屋".as_bytes()), Ok("部屋"));
    }

    #[test]
    fn usernames_at_their_bounds() {
        assert_eq!(check_username("alice"), Ok(()));
        assert_eq!(check_username(&"a".repeat(64)), Ok(()));
        assert_eq!(check_username(&"a".repeat(65)), Err(NameRule::TooLong));
        // 64 four-byte characters are 256 bytes: too long for the sender size byte.
        assert_eq!(check_username(&"😀".repeat(64)), Err(NameRule::TooLong));
        assert_eq!(check_username(&"😀".repeat(63)), Ok(()));
        assert_eq!(check_username(""), Err(NameRule::Empty));
        assert_eq!(check_username("a\tb"), Err(NameRule::ControlCharacter));
        assert_eq!(check_username("\u{7f}"), Err(NameRule::ControlCharacter));
    }
}
