//! The rules for room names and usernames, shared by server and client.
//!
//! A room name is 1 to 255 bytes of UTF-8 (the frame's one-byte size field) without control
//! characters. A username is 1 to 64 characters of UTF-8 without control characters, and at
//! most 255 bytes so that it fits the one-byte sender size of a relayed UCRP datagram.
//!
//! Characters that show as nothing or reorder the text around them ([`hidden_chars`]) pass
//! these rules, as they passed the original server's; a server may refuse them in new names
//! with [`check_visible`], and a client shows them as escapes. Look-alike letters (Cyrillic
//! `а` for Latin `a`, capital `I` for `l`) pass too: a name alone cannot be judged by them,
//! since every script has its own. What can be judged is whether two names look the same:
//! [`lookalike_keys`] tells, so a server may refuse a username that looks like another
//! member's.

use std::fmt;

/// Longest room name, in bytes: what the frame's one-byte room name size can carry.
pub const MAX_ROOM_NAME_BYTES: usize = u8::MAX as usize;
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
    /// The name begins or ends with white space (refused only by [`check_visible`]).
    EdgeSpace(char),
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
            NameRule::EdgeSpace(c) => {
                return write!(
                    f,
                    "begins or ends with white space (U+{:04X})",
                    u32::from(*c)
                )
            }
        })
    }
}

/// Whether a character shows as nothing wherever it stands, so that two names differing
/// only by it look the same: Unicode's default-ignorable code points (soft hyphen, combining
/// grapheme joiner, Arabic letter mark, Hangul fillers, Khmer inherent vowels, Mongolian
/// variation selectors and vowel separator, zero-width space, the left-to-right and
/// right-to-left marks, word joiner and invisible operators, the deprecated format
/// characters, byte-order mark, the reserved specials, shorthand format controls, musical
/// symbol format controls, the unassigned ignorables of plane 14), the line and paragraph
/// separators, the braille blank and the interlinear annotation controls (U+FFF9–U+FFFB,
/// which show as nothing and may hide the text between them). The joiners, the variation
/// selectors and the tag characters are left to [`is_modifier`]: emoji and several scripts
/// need them.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{34f}'
            | '\u{61c}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180f}'
            | '\u{200b}'
            | '\u{200e}'..='\u{200f}'
            | '\u{2028}'..='\u{2029}'
            | '\u{2060}'..='\u{2065}'
            | '\u{206a}'..='\u{206f}'
            | '\u{2800}'
            | '\u{3164}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff0}'..='\u{fffb}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e001f}'
            | '\u{e0080}'..='\u{e00ff}'
            | '\u{e01f0}'..='\u{e0fff}'
    )
}

/// Whether a character is an invisible modifier of what it follows: the zero-width
/// non-joiner and joiner, the variation selectors and the tag characters (emoji sequences,
/// subdivision flags, ideographic variants). They are needed after other scripts' letters
/// and emoji, and show as nothing after an ASCII character.
pub fn is_modifier(c: char) -> bool {
    matches!(
        c,
        '\u{200c}'..='\u{200d}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{e0020}'..='\u{e007f}'
            | '\u{e0100}'..='\u{e01ef}'
    )
}

/// Whether a character reorders the text after it: the bidirectional embeddings, overrides
/// and isolates (U+202A–U+202E, U+2066–U+2069), which can make a name read as another.
pub fn is_reordering(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The characters of `name` (byte offset, character) that show as nothing or reorder the
/// text: [`is_invisible`] and [`is_reordering`] ones anywhere, and [`is_modifier`] ones at
/// the start or after an ASCII character (a joiner also before one, or at the end).
pub fn hidden_chars(name: &str) -> impl Iterator<Item = (usize, char)> + '_ {
    let chars: Vec<(usize, char)> = name.char_indices().collect();
    (0..chars.len()).filter_map(move |i| {
        let (at, c) = chars[i];
        let before = i.checked_sub(1).map(|j| chars[j].1);
        let after = chars.get(i + 1).map(|&(_, c)| c);
        let foreign = |c: Option<char>| c.is_some_and(|c| !c.is_ascii());
        let joiner = matches!(c, '\u{200c}' | '\u{200d}');
        let hidden = is_invisible(c)
            || is_reordering(c)
            || (is_modifier(c) && (!foreign(before) || (joiner && !foreign(after))));
        hidden.then_some((at, c))
    })
}

/// Checks that a name (room or user) cannot pass for another on a client that shows it as
/// is: no character that shows as nothing or reorders the text ([`hidden_chars`]), and no
/// white space at either end. The first offending character is named in the error.
pub fn check_visible(name: &str) -> Result<(), NameRule> {
    let edges = [name.chars().next(), name.chars().next_back()];
    if let Some(c) = edges.into_iter().flatten().find(|c| c.is_whitespace()) {
        return Err(NameRule::EdgeSpace(c));
    }
    match hidden_chars(name).next() {
        Some((_, c)) => Err(NameRule::Invisible(c)),
        None => Ok(()),
    }
}

/// What a name looks like, to find look-alikes: two keys, so that names pass for each other
/// when either key is the same ([`LookalikeKeys::look_alike`]). Both are worked out once the
/// name's [`hidden_chars`] and the white space at either end are taken out:
/// - [`lower_case`](LookalikeKeys::lower_case), the name in lower case: `alice`, `Alice` and
///   `ALICE` share it;
/// - [`skeleton`](LookalikeKeys::skeleton), Unicode's confusable skeleton (UTS #39, section
///   4) of the name, then in lower case: `alice`, `аlice` (Cyrillic `а`), `aIice` (capital
///   `I`), `AIice` and `al\u{200B}ice` (a zero-width space) share it, as do `bob`, `b0b` and
///   `B0B`.
///
/// Comparing without case has a price: a name in capitals matches one whose letters look
/// alike only in lower case (`RNA` beside `ma`, whose skeleton is `rna`). And not every
/// look-alike is caught: the confusables tables do not know them all, and the skeleton reads
/// a capital `I` as `l`, so a name in capitals that also changes script (`ALICE` with a
/// Cyrillic `А`) passes beside `alice` (not beside `ALICE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookalikeKeys {
    /// The name in lower case.
    pub lower_case: String,
    /// The lower case of the name's confusable skeleton.
    pub skeleton: String,
}

impl LookalikeKeys {
    /// Whether two names with these keys can pass for each other.
    pub fn look_alike(&self, other: &LookalikeKeys) -> bool {
        self.lower_case == other.lower_case || self.skeleton == other.skeleton
    }
}

/// The [`LookalikeKeys`] of a name.
pub fn lookalike_keys(name: &str) -> LookalikeKeys {
    let mut hidden = hidden_chars(name).map(|(at, _)| at).peekable();
    let shown: String = name
        .char_indices()
        .filter(|&(at, _)| {
            let is_hidden = hidden.peek() == Some(&at);
            if is_hidden {
                hidden.next();
            }
            !is_hidden
        })
        .map(|(_, c)| c)
        .collect();
    let shown = shown.trim();
    let skeleton: String = unicode_security::skeleton(shown).collect();
    LookalikeKeys {
        lower_case: shown.to_lowercase(),
        skeleton: skeleton.to_lowercase(),
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
        // 255 bytes in 64 characters: the longest name the sender size byte carries.
        let longest = format!("{}€", "😀".repeat(63));
        assert_eq!((longest.len(), longest.chars().count()), (255, 64));
        assert_eq!(check_username(&longest), Ok(()));
        assert_eq!(check_username(""), Err(NameRule::Empty));
        assert_eq!(check_username("a\tb"), Err(NameRule::ControlCharacter));
        assert_eq!(check_username("\u{7f}"), Err(NameRule::ControlCharacter));
        // Invisible characters pass the base rules, as they did on the original server.
        assert_eq!(check_username("ali\u{200b}ce"), Ok(()));
    }

    /// PROTOCOL.md: a control character is any of category Cc, U+0000–U+001F and
    /// U+007F–U+009F. DEL and the C1 controls (U+009B is a terminal's CSI) are refused in
    /// room names and usernames alike. Kills the hand mutants that narrow either check to
    /// `c < ' '` or to `c < ' ' || c == '\u{7f}'` (room names had only a newline tested).
    #[test]
    fn control_characters_are_all_of_category_cc() {
        for c in ['\u{0}', '\u{1f}', '\u{7f}', '\u{80}', '\u{9b}', '\u{9f}'] {
            let name = format!("a{c}b");
            assert_eq!(
                check_room_name(name.as_bytes()),
                Err(NameRule::ControlCharacter),
                "{c:?}"
            );
            assert_eq!(
                check_username(&name),
                Err(NameRule::ControlCharacter),
                "{c:?}"
            );
        }
        // The neighbours of the two ranges are not controls.
        for c in [' ', '~', '\u{a0}', 'é'] {
            let name = format!("a{c}b");
            assert_eq!(check_room_name(name.as_bytes()), Ok(name.as_str()), "{c:?}");
            assert_eq!(check_username(&name), Ok(()), "{c:?}");
        }
    }

    /// The zero-width non-joiner is a joiner for [`hidden_chars`] as the joiner is: after
    /// another script's letter it is hidden when it ends the name or comes before an ASCII
    /// character, and shown between two letters of other scripts. Kills the hand mutant that
    /// takes U+200C out of `joiner` (only U+200D was tested after a non-ASCII letter).
    #[test]
    fn a_non_joiner_after_another_script_is_hidden_unless_one_follows() {
        assert_eq!(
            hidden_chars("部\u{200c}").collect::<Vec<_>>(),
            [(3, '\u{200c}')]
        );
        assert_eq!(
            hidden_chars("部\u{200c}a").collect::<Vec<_>>(),
            [(3, '\u{200c}')]
        );
        assert_eq!(hidden_chars("部\u{200c}屋").next(), None);
        assert_eq!(
            check_visible("部\u{200c}a"),
            Err(NameRule::Invisible('\u{200c}'))
        );
    }

    #[test]
    fn visible_names_pass_and_look_alikes_are_named() {
        let visible = [
            "alice",
            "部屋",
            "a b",
            "👩\u{200d}💻 dev",
            "क\u{94d}\u{200d}ष",
            "❤\u{fe0f}",
            "葛\u{e0100}",
            "🏴\u{e0067}\u{e0062}\u{e0073}\u{e0063}\u{e0074}\u{e007f}",
        ];
        for name in visible {
            assert_eq!(check_visible(name), Ok(()), "{name:?}");
        }
        let hidden = [
            ("ali\u{200b}ce", '\u{200b}'),
            ("\u{feff}alice", '\u{feff}'),
            ("bob\u{ad}", '\u{ad}'),
            ("\u{202e}ecila", '\u{202e}'),
            ("x\u{2066}y\u{200e}", '\u{2066}'),
            ("a\u{2063}b", '\u{2063}'),
            ("ali\u{34f}ce", '\u{34f}'),
            ("ali\u{3164}ce", '\u{3164}'),
            ("\u{115f}alice", '\u{115f}'),
            ("ali\u{ffa0}ce", '\u{ffa0}'),
            ("alice\u{e0041}", '\u{e0041}'),
            ("ali\u{180b}ce", '\u{180b}'),
            ("ali\u{17b4}ce", '\u{17b4}'),
            ("ali\u{2065}ce", '\u{2065}'),
            ("al\u{200d}ice", '\u{200d}'),
            ("al\u{200c}ice", '\u{200c}'),
            ("alice\u{fe0f}", '\u{fe0f}'),
            ("部\u{200d}", '\u{200d}'),
            ("\u{2800}", '\u{2800}'),
        ];
        for (name, first) in hidden {
            assert_eq!(
                check_visible(name),
                Err(NameRule::Invisible(first)),
                "{name:?}"
            );
            assert_eq!(hidden_chars(name).next().map(|(_, c)| c), Some(first));
        }
        for (name, edge) in [
            ("alice ", ' '),
            (" alice", ' '),
            ("\u{3000}部屋", '\u{3000}'),
        ] {
            assert_eq!(
                check_visible(name),
                Err(NameRule::EdgeSpace(edge)),
                "{name:?}"
            );
        }
        assert_eq!(
            NameRule::Invisible('\u{200b}').to_string(),
            "contains U+200B, which shows as nothing or reorders the text"
        );
        assert_eq!(
            hidden_chars("a\u{200b}b\u{200b}").collect::<Vec<_>>(),
            [(1, '\u{200b}'), (5, '\u{200b}')]
        );
    }

    #[test]
    fn lookalike_keys_match_names_that_pass_for_each_other() {
        let alice = lookalike_keys("alice");
        for twin in [
            "аlice",          // Cyrillic а
            "aIice",          // capital I for l
            "AIice",          // and a capital A
            "al\u{200b}ice",  // a zero-width space
            " alice\u{3000}", // white space at both ends
            "\u{202e}alice",  // a bidi override
            "a\u{200d}lice",  // a joiner after an ASCII letter
            "Alice",          // case
            "ALICE",          // case, where the skeleton alone reads capital I as l
        ] {
            assert!(lookalike_keys(twin).look_alike(&alice), "{twin:?}");
            assert!(
                alice.look_alike(&lookalike_keys(twin)),
                "{twin:?} (swapped)"
            );
        }
        for other in ["alice2", "bob", "аліса", "al ice", "alce"] {
            assert!(!lookalike_keys(other).look_alike(&alice), "{other:?}");
        }
        let bob = lookalike_keys("bob");
        for twin in ["b0b", "B0B", "BOB"] {
            assert!(lookalike_keys(twin).look_alike(&bob), "{twin:?}");
        }
        assert!(lookalike_keys("modern").look_alike(&lookalike_keys("modem")));
    }

    /// Unicode's Default_Ignorable_Code_Point ranges, as DerivedCoreProperties.txt lists them,
    /// written out from the Unicode data, not from the tables above.
    const DEFAULT_IGNORABLE: [(char, char); 17] = [
        ('\u{ad}', '\u{ad}'),
        ('\u{34f}', '\u{34f}'),
        ('\u{61c}', '\u{61c}'),
        ('\u{115f}', '\u{1160}'),
        ('\u{17b4}', '\u{17b5}'),
        ('\u{180b}', '\u{180f}'),
        ('\u{200b}', '\u{200f}'),
        ('\u{202a}', '\u{202e}'),
        ('\u{2060}', '\u{206f}'),
        ('\u{3164}', '\u{3164}'),
        ('\u{fe00}', '\u{fe0f}'),
        ('\u{feff}', '\u{feff}'),
        ('\u{ffa0}', '\u{ffa0}'),
        ('\u{fff0}', '\u{fff8}'),
        ('\u{1bca0}', '\u{1bca3}'),
        ('\u{1d173}', '\u{1d17a}'),
        ('\u{e0000}', '\u{e0fff}'),
    ];
    /// Not default-ignorable, but blank wherever they stand (the module docs): the line and
    /// paragraph separators, the braille blank and the interlinear annotation anchor,
    /// separator and terminator.
    const BLANKS: [char; 6] = [
        '\u{2028}', '\u{2029}', '\u{2800}', '\u{fff9}', '\u{fffa}', '\u{fffb}',
    ];

    /// The three tables together hold exactly the documented set: every default-ignorable
    /// code point, the line and paragraph separators, the braille blank and the interlinear
    /// annotation controls, and nothing else. A range cut short, dropped or stretched by one
    /// lets a name pass for another (`al\u{1d173}ice` beside `alice`) or refuses a visible one.
    #[test]
    fn the_hidden_tables_are_the_default_ignorables_and_the_blanks() {
        let documented = |c: char| {
            BLANKS.contains(&c)
                || DEFAULT_IGNORABLE
                    .iter()
                    .any(|&(lo, hi)| (lo..=hi).contains(&c))
        };
        let mut hidden = 0;
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let tabled = is_invisible(c) || is_modifier(c) || is_reordering(c);
            assert_eq!(tabled, documented(c), "U+{:04X}", u32::from(c));
            if tabled {
                hidden += 1;
                // Between ASCII letters every one of them shows as nothing.
                let name = format!("a{c}b");
                assert_eq!(
                    hidden_chars(&name).collect::<Vec<_>>(),
                    [(1, c)],
                    "{name:?}"
                );
                assert_eq!(
                    check_visible(&name),
                    Err(NameRule::Invisible(c)),
                    "{name:?}"
                );
            }
        }
        let documented_count = BLANKS.len()
            + DEFAULT_IGNORABLE
                .iter()
                .map(|&(lo, hi)| (u32::from(hi) - u32::from(lo) + 1) as usize)
                .sum::<usize>();
        assert_eq!(hidden, documented_count);
    }

    /// The reordering table is Unicode's Bidi_Control set less the three marks (ALM, LRM,
    /// RLM), which reorder nothing and are in the invisible table; no character is in two
    /// tables.
    #[test]
    fn reordering_characters_are_the_bidi_controls_that_are_not_marks() {
        let marks = ['\u{61c}', '\u{200e}', '\u{200f}'];
        let bidi_controls = ('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}');
        let reordering: Vec<char> = (0..=u32::from(char::MAX))
            .filter_map(char::from_u32)
            .filter(|&c| is_reordering(c))
            .collect();
        assert_eq!(reordering, bidi_controls.collect::<Vec<_>>());
        for c in marks {
            assert!(
                is_invisible(c) && !is_reordering(c),
                "U+{:04X}",
                u32::from(c)
            );
        }
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let tables = [is_invisible(c), is_modifier(c), is_reordering(c)];
            assert!(
                tables.iter().filter(|&&t| t).count() <= 1,
                "U+{:04X}",
                u32::from(c)
            );
        }
    }
}
