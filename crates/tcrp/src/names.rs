//! The rules for room names and usernames, shared by server and client.
//!
//! A room name is 1 to 255 bytes of UTF-8 (the frame's one-byte size field) without control
//! characters. A username is 1 to 64 characters of UTF-8 without control characters, and at
//! most 255 bytes so that it fits the one-byte sender size of a relayed UCRP datagram.
//!
//! Characters that show as nothing or reorder the text around them ([`is_invisible`],
//! [`is_reordering`]) pass these rules, as they passed the original server's; a server may
//! refuse them in new names with [`check_visible`], and a client shows them as escapes.

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
    /// The name holds a character that shows as nothing or reorders the text around it
    /// (refused only by [`check_visible`]).
    Invisible(char),
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameRule::Empty => "is empty",
            NameRule::TooLong => "is too long",
            NameRule::NotUtf8 => "is not valid UTF-8",
            NameRule::ControlCharacter => "contains a control character",
            NameRule::Invisible(c) => {
                return write!(
                    f,
                    "contains U+{:04X}, which shows as nothing or reorders the text",
                    u32::from(*c)
                )
            }
        })
    }
}

/// Whether a character shows as nothing, so that two names differing only by it look the
/// same: soft hyphen, Arabic letter mark, Mongolian vowel separator, zero-width space, the
/// left-to-right and right-to-left marks, the line and paragraph separators, word joiner and
/// invisible operators, the deprecated format characters and the byte-order mark. (The
/// zero-width joiner and non-joiner are left alone: emoji and several scripts need them.)
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{61c}'
            | '\u{180e}'
            | '\u{200b}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{2060}'..='\u{2064}'
            | '\u{206a}'..='\u{206f}'
            | '\u{feff}'
    )
}

/// Whether a character reorders the text after it: the bidirectional embeddings, overrides
/// and isolates (U+202A–U+202E, U+2066–U+2069), which can make a name read as another.
pub fn is_reordering(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Checks that a name (room or user) holds no character that is invisible or reorders text,
/// so that it cannot pass for another name on a client that shows it as is. The first such
/// character is named in the error.
pub fn check_visible(name: &str) -> Result<(), NameRule> {
    match name.chars().find(|&c| is_invisible(c) || is_reordering(c)) {
        Some(c) => Err(NameRule::Invisible(c)),
        None => Ok(()),
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
        // Invisible characters pass the base rules, as they did on the original server.
        assert_eq!(check_username("ali\u{200b}ce"), Ok(()));
    }

    #[test]
    fn visible_names_pass_and_look_alikes_are_named() {
        for name in ["alice", "部屋", "👩\u{200d}💻 dev", "k\u{200c}a", "a b"] {
            assert_eq!(check_visible(name), Ok(()), "{name:?}");
        }
        let cases = [
            ("ali\u{200b}ce", '\u{200b}'),
            ("\u{feff}alice", '\u{feff}'),
            ("bob\u{ad}", '\u{ad}'),
            ("\u{202e}ecila", '\u{202e}'),
            ("x\u{2066}y\u{200e}", '\u{2066}'),
            ("a\u{2063}b", '\u{2063}'),
        ];
        for (name, first) in cases {
            assert_eq!(
                check_visible(name),
                Err(NameRule::Invisible(first)),
                "{name:?}"
            );
        }
        assert_eq!(
            NameRule::Invisible('\u{200b}').to_string(),
            "contains U+200B, which shows as nothing or reorders the text"
        );
    }
}
