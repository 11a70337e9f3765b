//! What a line typed on standard input means: chat to send, a `/command`, or nothing.
//!
//! Pure; the chat loop acts on the returned [`Input`]. Only the trailing newline and carriage
//! return are cut, so leading and trailing spaces are part of the message. A line starting
//! with `/` is a command; `//` escapes it, so `//shrug` sends `/shrug`. The protocol's control
//! words are never sent as chat: the daemon would take `__LEAVE__` for a leave, and an original
//! client receiving `__ROOM_CLOSED__` would think its room had closed.

use ucrp::datagram::{LEAVE, REGISTER};
use ucrp::delivery::ROOM_CLOSED_STR;

use crate::query::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};

/// The `/help` text, printed to standard error.
pub const HELP: &str = "\
* /who           who is in the room, and who hosts it
* /history [N]   N earlier messages (default 20, max 100); repeat to page further back,
*                and past the oldest to start again from the latest
* /quit          leave the room (so do end of input, Ctrl+D and Ctrl+C)
* /help          show this text
* //text         send a message that starts with a slash: /text
* anything else is sent to the room";

/// The help text with `--original`: the original server answers no `/who` or `/history`.
pub const HELP_ORIGINAL: &str = "\
* /quit          leave the room (so do end of input, Ctrl+D and Ctrl+C)
* /help          show this text
* //text         send a message that starts with a slash: /text
* anything else is sent to the room
* (/who and /history need an ocmd server: not with --original)";

/// What `/who` and `/history` answer with `--original`.
pub const NOT_ORIGINAL: &str =
    "* /who and /history are off with --original: that flag speaks the original protocol, which has no such requests";

/// The usage line for a `/history` with a bad count.
pub const HISTORY_USAGE: &str = "* usage: /history [N], N from 1 to 100";

/// One line of input, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    /// Text to send as a chat message.
    Send(&'a str),
    /// `/quit`: leave the room.
    Quit,
    /// `/help`: show the commands.
    Help,
    /// `/who`: show the room's host and members.
    Who,
    /// `/history [N]`: show the next page of `count` older messages.
    History {
        /// Messages to ask for, 1 to [`MAX_HISTORY_LIMIT`].
        count: u32,
    },
    /// A known command used wrongly; the text to show.
    Usage(&'static str),
    /// A `/command` this client does not know (the command word, with its slash).
    Unknown(&'a str),
    /// One of the protocol's control words, which is not sent.
    Reserved,
    /// An empty line, or one of whitespace alone: nothing to do.
    Empty,
}

/// Classifies one line as read, with or without its line ending.
pub fn classify(line: &str) -> Input<'_> {
    let line = line.trim_end_matches(['\n', '\r']);
    // A line of spaces or tabs alone would show the others a sender and nothing after it.
    if line.trim().is_empty() {
        return Input::Empty;
    }
    if line.starts_with("//") {
        // Drop the first slash (one byte) and keep the second.
        return reserved_or_send(&line[1..]);
    }
    if line.starts_with('/') {
        // `line` is not empty and starts with '/', so there is a first word.
        let mut words = line.split_whitespace();
        let word = words.next().unwrap_or(line);
        return match word {
            "/quit" => Input::Quit,
            "/help" => Input::Help,
            "/who" => Input::Who,
            "/history" => history(words.next(), words.next()),
            other => Input::Unknown(other),
        };
    }
    reserved_or_send(line)
}

/// `/history`, `/history N`; anything else is a usage error.
fn history(count: Option<&str>, extra: Option<&str>) -> Input<'static> {
    let count = match (count, extra) {
        (None, _) => Some(DEFAULT_HISTORY_LIMIT),
        (Some(n), None) => n.parse::<u32>().ok(),
        (Some(_), Some(_)) => None,
    };
    match count {
        Some(count) if (1..=MAX_HISTORY_LIMIT).contains(&count) => Input::History { count },
        _ => Input::Usage(HISTORY_USAGE),
    }
}

fn reserved_or_send(text: &str) -> Input<'_> {
    if [REGISTER, LEAVE, ROOM_CLOSED_STR].contains(&text) {
        Input::Reserved
    } else {
        Input::Send(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_keeps_everything_but_the_line_ending() {
        assert_eq!(classify("hello\n"), Input::Send("hello"));
        assert_eq!(classify("hello\r\n"), Input::Send("hello"));
        assert_eq!(classify("  spaced out  \n"), Input::Send("  spaced out  "));
        assert_eq!(classify("no newline"), Input::Send("no newline"));
        assert_eq!(classify(" x\n"), Input::Send(" x"));
    }

    #[test]
    fn empty_lines_do_nothing() {
        assert_eq!(classify("\n"), Input::Empty);
        assert_eq!(classify("\r\n"), Input::Empty);
        assert_eq!(classify(""), Input::Empty);
        // Whitespace alone is empty too, whichever kind. (Hand mutant: `trim()` dropped.)
        for blank in [" \n", "   ", "\t\r\n", " \u{3000}\u{a0}\n"] {
            assert_eq!(classify(blank), Input::Empty, "{blank:?}");
        }
    }

    #[test]
    fn commands() {
        assert_eq!(classify("/quit\n"), Input::Quit);
        assert_eq!(classify("/quit now\n"), Input::Quit);
        assert_eq!(classify("/help\r\n"), Input::Help);
        assert_eq!(classify("/shrug ok\n"), Input::Unknown("/shrug"));
        assert_eq!(classify("/\n"), Input::Unknown("/"));
        assert_eq!(classify("//shrug\n"), Input::Send("/shrug"));
        assert_eq!(classify("//\n"), Input::Send("/"));
    }

    #[test]
    fn who_and_history() {
        assert_eq!(classify("/who\n"), Input::Who);
        assert_eq!(classify("/history\n"), Input::History { count: 20 });
        assert_eq!(classify("/history 5\r\n"), Input::History { count: 5 });
        assert_eq!(classify("/history  100 \n"), Input::History { count: 100 });
        // The smallest count. (Hand mutant: the range `1..=` made `2..=`.)
        assert_eq!(classify("/history 1"), Input::History { count: 1 });
        for bad in [
            "/history 0",
            "/history 101",
            "/history -1",
            "/history x",
            "/history 5 6",
        ] {
            assert_eq!(classify(bad), Input::Usage(HISTORY_USAGE), "{bad}");
        }
        assert_eq!(classify("//who\n"), Input::Send("/who"));
        assert!(HELP.contains("/who") && HELP.contains("/history [N]"));
    }

    /// The help texts name every command and the figures the parser uses. (Hand mutants:
    /// the default or the maximum changed in `HELP` or `HISTORY_USAGE`, `/quit` taken out.)
    #[test]
    fn the_help_texts_name_the_commands_and_the_figures() {
        for command in ["/who", "/history [N]", "/quit", "/help", "//text"] {
            assert!(HELP.contains(&format!("* {command} ")), "{command}");
        }
        let figures = format!("(default {DEFAULT_HISTORY_LIMIT}, max {MAX_HISTORY_LIMIT})");
        assert!(HELP.contains(&figures), "{HELP}");
        let range = format!("N from 1 to {MAX_HISTORY_LIMIT}");
        assert!(HISTORY_USAGE.ends_with(&range), "{HISTORY_USAGE}");
        for command in ["/quit", "/help", "//text"] {
            assert!(
                HELP_ORIGINAL.contains(&format!("* {command} ")),
                "{command}"
            );
        }
        assert!(!HELP_ORIGINAL.contains("* /who") && !HELP_ORIGINAL.contains("* /history"));
    }

    #[test]
    fn control_words_are_not_sent() {
        assert_eq!(classify("__LEAVE__\n"), Input::Reserved);
        assert_eq!(classify("__REGISTER__\n"), Input::Reserved);
        assert_eq!(classify("__ROOM_CLOSED__\n"), Input::Reserved);
        assert_eq!(
            classify("__LEAVE__ please\n"),
            Input::Send("__LEAVE__ please")
        );
        assert_eq!(classify("/__LEAVE__\n"), Input::Unknown("/__LEAVE__"));
    }
}
