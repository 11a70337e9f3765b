//! What a line typed on standard input means: chat to send, a `/command`, or nothing.
//!
//! Pure; the chat loop acts on the returned [`Input`]. Only the trailing newline and carriage
//! return are cut, so leading and trailing spaces are part of the message. A line starting
//! with `/` is a command; `//` escapes it, so `//shrug` sends `/shrug`. The protocol's control
//! words are never sent as chat: the daemon would take `__LEAVE__` for a leave, and an original
//! client receiving `__ROOM_CLOSED__` would think its room had closed.

use ucrp::datagram::{LEAVE, REGISTER};
use ucrp::delivery::ROOM_CLOSED_STR;

/// The `/help` text, printed to standard error.
pub const HELP: &str = "\
* /quit    leave the room (so do end of input and Ctrl+C)
* /help    show this text
* //text   send a message that starts with a slash: /text
* anything else is sent to the room";

/// One line of input, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    /// Text to send as a chat message.
    Send(&'a str),
    /// `/quit`: leave the room.
    Quit,
    /// `/help`: show the commands.
    Help,
    /// A `/command` this client does not know (the command word, with its slash).
    Unknown(&'a str),
    /// One of the protocol's control words, which is not sent.
    Reserved,
    /// An empty line: nothing to do.
    Empty,
}

/// Classifies one line as read, with or without its line ending.
pub fn classify(line: &str) -> Input<'_> {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.is_empty() {
        return Input::Empty;
    }
    if line.starts_with("//") {
        // Drop the first slash (one byte) and keep the second.
        return reserved_or_send(&line[1..]);
    }
    if line.starts_with('/') {
        // `line` is not empty and starts with '/', so there is a first word.
        let word = line.split_whitespace().next().unwrap_or(line);
        return match word {
            "/quit" => Input::Quit,
            "/help" => Input::Help,
            other => Input::Unknown(other),
        };
    }
    reserved_or_send(line)
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
        assert_eq!(classify(" \n"), Input::Send(" "));
    }

    #[test]
    fn empty_lines_do_nothing() {
        assert_eq!(classify("\n"), Input::Empty);
        assert_eq!(classify("\r\n"), Input::Empty);
        assert_eq!(classify(""), Input::Empty);
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
