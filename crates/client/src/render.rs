//! Turns the server's datagrams into the lines `ocm` prints on standard output.
//!
//! Pure: bytes in, lines out, no I/O. [`Renderer`] parses each datagram with
//! [`ucrp::delivery`], walks batches, and keeps a [`SeqTracker`] so that sequenced messages
//! lost on the way are counted (`* 2 messages lost`) and duplicates are dropped. Everything a
//! peer or the server wrote passes through [`printable`] first, so a message cannot move the
//! cursor, clear the screen or span several lines.
//!
//! | delivery                     | line                          |
//! |------------------------------|-------------------------------|
//! | chat / sequenced             | `sender: message`             |
//! | notice joined / left / timed | `* name joined` (`left`, `timed out`) |
//! | `__ROOM_CLOSED__`            | `* room ROOM was closed by its host`   |

use std::borrow::Cow;

use log::{debug, info};
use ucrp::delivery::{self, Delivery, Notice};

/// Whether the chat goes on after a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Flow {
    /// Keep receiving.
    Continue,
    /// The chat is over for us (the host closed the room, or the server removed us after
    /// missed keepalives): print nothing more and exit.
    RoomClosed,
}

/// What to do with a sequenced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// Show it, after reporting `lost` messages that never arrived.
    Deliver {
        /// Messages skipped between the last one shown and this one.
        lost: u64,
    },
    /// Already shown (a duplicate or a late, reordered copy): drop it silently.
    Duplicate,
}

/// The last room sequence number shown, and the gap/duplicate decisions that follow from it.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    last: Option<u64>,
}

impl SeqTracker {
    /// Decides what to do with message `seq` and records it if shown.
    ///
    /// The first number seen is the baseline: a member joining a busy room has lost nothing.
    /// Numbers count from 1, so a 1 after a higher number means the daemon restarted its
    /// count (a restart that did not keep it); that is a new baseline, not a duplicate.
    pub fn observe(&mut self, seq: u64) -> SeqVerdict {
        let lost = match self.last {
            None => 0,
            Some(last) if seq > last => seq - last - 1,
            Some(last) if seq == 1 && last > 1 => {
                info!("room sequence restarted at 1 after {last}");
                0
            }
            Some(_) => return SeqVerdict::Duplicate,
        };
        self.last = Some(seq);
        SeqVerdict::Deliver { lost }
    }

    /// Counts every message up to `seq` as shown (they were printed from the history), so
    /// live copies of them are dropped as duplicates.
    pub fn skip_through(&mut self, seq: u64) {
        self.last = Some(self.last.map_or(seq, |last| last.max(seq)));
    }
}

/// Renders one room's datagrams.
#[derive(Debug, Clone)]
pub struct Renderer {
    room_name: String,
    seq: SeqTracker,
}

impl Renderer {
    /// A renderer for the room `room_name` (named in the room-closed line).
    pub fn new(room_name: &str) -> Renderer {
        Renderer {
            room_name: room_name.to_owned(),
            seq: SeqTracker::default(),
        }
    }

    /// Marks the messages up to `seq` as already shown (see [`SeqTracker::skip_through`]).
    pub fn skip_through(&mut self, seq: u64) {
        self.seq.skip_through(seq);
    }

    /// Handles one datagram from the server, appending the lines to print to `out`.
    /// Malformed datagrams add nothing.
    pub fn handle_datagram(&mut self, bytes: &[u8], out: &mut Vec<String>) -> Flow {
        match delivery::parse(bytes) {
            Ok(Delivery::Batch(body)) => self.handle_batch(body, out),
            Ok(d) => self.handle_delivery(d, out),
            Err(e) => {
                debug!("dropping malformed datagram ({}): {e}", e.reason());
                Flow::Continue
            }
        }
    }

    fn handle_batch(&mut self, body: &[u8], out: &mut Vec<String>) -> Flow {
        for entry in delivery::batch_entries(body) {
            let parsed = entry.and_then(delivery::parse);
            match parsed {
                Ok(Delivery::Batch(_)) => debug!("dropping a batch nested in a batch"),
                Ok(d) => {
                    if self.handle_delivery(d, out) == Flow::RoomClosed {
                        return Flow::RoomClosed;
                    }
                }
                Err(e) => debug!("dropping malformed batch entry ({}): {e}", e.reason()),
            }
        }
        Flow::Continue
    }

    fn handle_delivery(&mut self, d: Delivery<'_>, out: &mut Vec<String>) -> Flow {
        match d {
            Delivery::Chat { sender, message } => out.push(chat_line(sender, message)),
            Delivery::Sequenced {
                seq,
                sender,
                message,
            } => match self.seq.observe(seq) {
                SeqVerdict::Deliver { lost } => {
                    if lost > 0 {
                        out.push(lost_line(lost));
                    }
                    out.push(chat_line(sender, message));
                }
                SeqVerdict::Duplicate => debug!("dropping duplicate message {seq}"),
            },
            // A timed-out notice without a name is about us: the server expired us (our
            // keepalives did not reach it, e.g. a laptop asleep) and no longer knows our token.
            Delivery::Notice {
                what: Notice::TimedOut,
                name: "",
            } => {
                out.push(format!(
                    "* you were removed from room {} after missing keepalives; join again to go on",
                    printable(&self.room_name)
                ));
                return Flow::RoomClosed;
            }
            Delivery::Notice { what, name } => {
                let what = match what {
                    Notice::Joined => "joined",
                    Notice::Left => "left",
                    Notice::TimedOut => "timed out",
                };
                out.push(format!("* {} {what}", printable(name)));
            }
            Delivery::RoomClosed => {
                out.push(format!(
                    "* room {} was closed by its host",
                    printable(&self.room_name)
                ));
                return Flow::RoomClosed;
            }
            // `handle_datagram` and `handle_batch` deal with batches before calling here.
            Delivery::Batch(_) => debug!("dropping a batch nested in a batch"),
        }
        Flow::Continue
    }
}

fn chat_line(sender: &str, message: &str) -> String {
    format!("{}: {}", printable(sender), printable(message))
}

fn lost_line(lost: u64) -> String {
    if lost == 1 {
        "* 1 message lost".to_owned()
    } else {
        format!("* {lost} messages lost")
    }
}

/// Whether a character would change the terminal or the line layout rather than show: the
/// C0/C1 controls (newline, escape, ...) and the bidirectional overrides and isolates.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text from the network made safe for one terminal line: unsafe characters are shown as
/// Rust escapes (`\n`, `\u{1b}`), everything else as is.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(sender: &str, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        delivery::encode_chat(sender, message.as_bytes(), &mut out).unwrap();
        out
    }

    fn sequenced(seq: u64, sender: &str, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        delivery::encode_sequenced(seq, sender, message.as_bytes(), &mut out).unwrap();
        out
    }

    fn notice(what: Notice, name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        delivery::encode_notice(what, name, &mut out).unwrap();
        out
    }

    fn batch(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        delivery::begin_batch(&mut out);
        for entry in entries {
            delivery::push_batch_entry(entry, &mut out).unwrap();
        }
        out
    }

    /// Feeds the datagrams in order and returns all lines and the last flow.
    fn render(datagrams: &[Vec<u8>]) -> (Vec<String>, Flow) {
        let mut renderer = Renderer::new("lobby");
        let mut lines = Vec::new();
        let mut flow = Flow::Continue;
        for d in datagrams {
            flow = renderer.handle_datagram(d, &mut lines);
        }
        (lines, flow)
    }

    #[test]
    fn original_chat_frame() {
        let (lines, flow) = render(&[chat("bob", "hello there")]);
        assert_eq!(lines, ["bob: hello there"]);
        assert_eq!(flow, Flow::Continue);
    }

    #[test]
    fn notices() {
        let (lines, _) = render(&[
            notice(Notice::Joined, "bob"),
            notice(Notice::Left, "bob"),
            notice(Notice::TimedOut, "carol"),
        ]);
        assert_eq!(lines, ["* bob joined", "* bob left", "* carol timed out"]);
    }

    #[test]
    fn sequenced_messages_in_order() {
        let (lines, _) = render(&[sequenced(1, "a", "one"), sequenced(2, "b", "two")]);
        assert_eq!(lines, ["a: one", "b: two"]);
    }

    #[test]
    fn gap_reports_the_lost_messages_first() {
        let (lines, _) = render(&[
            sequenced(3, "a", "three"),
            sequenced(6, "a", "six"),
            sequenced(8, "a", "eight"),
        ]);
        assert_eq!(
            lines,
            [
                "a: three",
                "* 2 messages lost",
                "a: six",
                "* 1 message lost",
                "a: eight"
            ]
        );
    }

    #[test]
    fn duplicates_and_late_copies_are_dropped() {
        let (lines, _) = render(&[
            sequenced(4, "a", "four"),
            sequenced(4, "a", "four"),
            sequenced(5, "a", "five"),
            sequenced(3, "a", "three, late"),
        ]);
        assert_eq!(lines, ["a: four", "a: five"]);
    }

    #[test]
    fn seq_tracker_decisions() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(10), SeqVerdict::Deliver { lost: 0 });
        assert_eq!(t.observe(10), SeqVerdict::Duplicate);
        assert_eq!(t.observe(9), SeqVerdict::Duplicate);
        assert_eq!(t.observe(13), SeqVerdict::Deliver { lost: 2 });
        // A daemon that restarted its count starts again at 1.
        assert_eq!(t.observe(1), SeqVerdict::Deliver { lost: 0 });
        assert_eq!(t.observe(1), SeqVerdict::Duplicate);
        assert_eq!(t.observe(2), SeqVerdict::Deliver { lost: 0 });
    }

    #[test]
    fn history_shown_makes_live_copies_duplicates() {
        let mut renderer = Renderer::new("lobby");
        renderer.skip_through(7);
        let mut lines = Vec::new();
        for d in [
            sequenced(6, "a", "six"),
            sequenced(7, "a", "seven"),
            sequenced(8, "a", "eight"),
        ] {
            let _ = renderer.handle_datagram(&d, &mut lines);
        }
        assert_eq!(lines, ["a: eight"]);
        let mut t = SeqTracker::default();
        t.observe(9);
        t.skip_through(4);
        assert_eq!(t.observe(9), SeqVerdict::Duplicate);
    }

    #[test]
    fn batch_entries_are_handled_in_order() {
        let (lines, flow) = render(&[batch(&[
            notice(Notice::Joined, "bob"),
            sequenced(1, "bob", "hi"),
            sequenced(1, "bob", "hi"),
            sequenced(3, "bob", "anyone?"),
            chat("old", "plain"),
        ])]);
        assert_eq!(
            lines,
            [
                "* bob joined",
                "bob: hi",
                "* 1 message lost",
                "bob: anyone?",
                "old: plain"
            ]
        );
        assert_eq!(flow, Flow::Continue);
    }

    #[test]
    fn broken_batch_keeps_the_entries_before_the_break() {
        let mut d = batch(&[chat("a", "kept")]);
        d.extend_from_slice(&[0x00, 0x09, b'x']);
        let (lines, _) = render(&[d]);
        assert_eq!(lines, ["a: kept"]);
    }

    #[test]
    fn a_nameless_timed_out_notice_means_we_were_removed() {
        let (lines, flow) = render(&[notice(Notice::TimedOut, "")]);
        assert_eq!(
            lines,
            ["* you were removed from room lobby after missing keepalives; join again to go on"]
        );
        assert_eq!(flow, Flow::RoomClosed);
        let (_, flow) = render(&[notice(Notice::TimedOut, "carol")]);
        assert_eq!(
            flow,
            Flow::Continue,
            "another member timing out is only news"
        );
    }

    #[test]
    fn room_closed_ends_the_chat() {
        let (lines, flow) = render(&[chat("bob", "bye"), delivery::ROOM_CLOSED.to_vec()]);
        assert_eq!(lines, ["bob: bye", "* room lobby was closed by its host"]);
        assert_eq!(flow, Flow::RoomClosed);
        let (lines, flow) = render(&[batch(&[
            delivery::ROOM_CLOSED.to_vec(),
            chat("never", "shown"),
        ])]);
        assert_eq!(lines, ["* room lobby was closed by its host"]);
        assert_eq!(flow, Flow::RoomClosed);
    }

    #[test]
    fn malformed_datagrams_print_nothing() {
        let (lines, flow) = render(&[
            vec![],
            vec![0x05, b'a'],
            vec![0x01, 0xff],
            vec![0x00, 0x09],
            vec![0x00, 0x02, 1, 2],
        ]);
        assert!(lines.is_empty(), "{lines:?}");
        assert_eq!(flow, Flow::Continue);
    }

    #[test]
    fn terminal_control_characters_are_escaped() {
        let (lines, _) = render(&[chat("ev\nil", "\u{1b}[2Jgone\u{202e}")]);
        assert_eq!(lines, ["ev\\nil: \\u{1b}[2Jgone\\u{202e}"]);
        assert!(matches!(printable("plain ☃"), Cow::Borrowed("plain ☃")));
    }
}
