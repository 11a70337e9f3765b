//! Turns the server's datagrams into the lines `ocm` prints on standard output.
//!
//! Pure: bytes in, lines out, no I/O. [`Renderer`] parses each datagram with
//! [`ucrp::delivery`], walks batches, and keeps a [`SeqTracker`] so that sequenced messages
//! lost on the way are counted (`* 2 messages lost`, our own messages aside) and duplicates are
//! dropped (a number shown before is a duplicate only with the same sender and text).
//! Everything a peer or the server wrote passes through [`printable`] first, so a message
//! cannot move the cursor, clear the screen or span several lines.
//!
//! | delivery                     | line                          |
//! |------------------------------|-------------------------------|
//! | chat / sequenced             | `sender: message`             |
//! | notice joined / left / timed | `* name joined` (`left`, `timed out`) |
//! | `__ROOM_CLOSED__`            | `* room ROOM was closed`   |

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use log::{debug, info};
use tcrp::names::{hidden_chars, is_reordering};
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

/// How many recently shown messages [`SeqTracker`] remembers by number and content.
const RECENT_SHOWN: usize = 256;

/// A digest of a message's sender and text, to tell a repeated copy from another message
/// that carries the same number.
pub fn content_digest(sender: &str, text: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    sender.hash(&mut hasher);
    text.hash(&mut hasher);
    hasher.finish()
}

/// What the client knows of a room's sequence numbers: the highest shown, the recent
/// messages shown (number and content), and how many of its own messages it sent, which the
/// daemon numbers but never sends back.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    last: Option<u64>,
    /// When each own message was sent whose number has not yet shown up as a gap, oldest
    /// first (at most [`OWN_REMEMBERED`]).
    own_unseen: VecDeque<Instant>,
    /// A number 1 came after higher ones: a daemon that started its count again, or a
    /// late first message; the next number tells which (see [`SeqTracker::observe`]).
    count_again: bool,
    /// `(seq, content digest)` of the last [`RECENT_SHOWN`] messages shown, oldest first.
    recent: VecDeque<(u64, u64)>,
}

/// How long an own message may take to be numbered by the daemon: one sent this long before
/// the first number we see cannot be numbered after it, so its number lies below the
/// baseline and will never show up as a gap.
pub const IN_FLIGHT: Duration = Duration::from_secs(2);

/// Own messages remembered at most; past it the oldest are forgotten (the count errs low).
const OWN_REMEMBERED: usize = 4096;

impl SeqTracker {
    /// Decides what to do with message `seq`, whose content has `digest`
    /// ([`content_digest`]), and records it if shown.
    ///
    /// A duplicate is a message shown recently under the same number with the same sender
    /// and text; everything else is shown. Only a number above the last one shown can
    /// reveal a loss: the first number seen is the baseline (a member joining a busy room has
    /// lost nothing), the numbers of our own messages in a gap are not losses, and a number
    /// at or below the last one is a late message, or a daemon numbering again (from its
    /// last checkpoint after a crash, or from 1 with a new state), never a loss.
    ///
    /// A number 1 after higher ones is a count started again only if the next number goes on
    /// from it at or below the old count (`1, 2`, `1, 3` or `1, 14` after `14`): a first
    /// message that arrives late (`2, 1, 3`) is not. Own messages sent more than [`IN_FLIGHT`]
    /// before the first number seen are numbered below it and never fill a gap: they are
    /// forgotten.
    pub fn observe(&mut self, seq: u64, digest: u64, now: Instant) -> SeqVerdict {
        if self.recent.contains(&(seq, digest)) {
            return SeqVerdict::Duplicate;
        }
        if std::mem::take(&mut self.count_again) {
            if let Some(last) = self.last.filter(|&last| seq > 1 && seq <= last) {
                info!("room sequence restarted at 1 after {last}");
                self.last = Some(1);
            }
        }
        let lost = match self.last {
            Some(last) if seq > last => {
                // Numbers in the gap already shown (late ones from before a count that started
                // again) are not lost.
                let gap = seq - last - 1 - self.shown_between(last, seq);
                let own = gap.min(self.own_unseen.len() as u64);
                // At most OWN_REMEMBERED, so the count fits.
                self.own_unseen.drain(..own as usize);
                gap - own
            }
            _ => 0,
        };
        self.last = Some(match self.last {
            Some(last) if seq == 1 && last > 1 => {
                self.count_again = true;
                last
            }
            Some(last) => last.max(seq),
            None => {
                self.own_unseen
                    .retain(|&sent| now.saturating_duration_since(sent) < IN_FLIGHT);
                seq
            }
        });
        self.remember(seq, digest);
        SeqVerdict::Deliver { lost }
    }

    /// Counts message `seq` as shown (it was printed from the history), so a live copy of
    /// it is dropped as a duplicate and the numbers up to it are not counted as lost.
    pub fn shown_in_history(&mut self, seq: u64, digest: u64) {
        self.last = Some(self.last.map_or(seq, |last| last.max(seq)));
        self.remember(seq, digest);
    }

    /// Notes that we sent a chat message: the daemon numbers it but relays it only to the
    /// others, so the gap it leaves is not a loss. (One the daemon dropped, e.g. rate
    /// limited, leaves no gap and may later hide one real loss: the count errs low.)
    pub fn sent_own(&mut self, now: Instant) {
        if self.own_unseen.len() == OWN_REMEMBERED {
            self.own_unseen.pop_front();
        }
        self.own_unseen.push_back(now);
    }

    /// How many distinct numbers strictly between `low` and `high` were shown recently.
    fn shown_between(&self, low: u64, high: u64) -> u64 {
        if high - low < 2 {
            return 0;
        }
        let mut shown: Vec<u64> = self
            .recent
            .iter()
            .map(|&(seq, _)| seq)
            .filter(|&seq| seq > low && seq < high)
            .collect();
        shown.sort_unstable();
        shown.dedup();
        shown.len() as u64
    }

    fn remember(&mut self, seq: u64, digest: u64) {
        if self.recent.len() == RECENT_SHOWN {
            self.recent.pop_front();
        }
        self.recent.push_back((seq, digest));
    }
}

/// Renders one room's datagrams.
#[derive(Debug, Clone)]
pub struct Renderer {
    room_name: String,
    seq: SeqTracker,
    /// Read only what the original server sends ([`Renderer::original_frames_only`]).
    original: bool,
    /// History entries shown cut short: number, digest of the sender, the text shown, when
    /// ([`Renderer::shown_in_history`]), oldest first.
    cut_shown: Vec<(u64, u64, String, Instant)>,
}

/// Cut-short history entries remembered at most. The server cuts only the newest message
/// of a reply, and only when it does not fit alone, so a few pages' worth is plenty.
const CUT_REMEMBERED: usize = 16;

/// How long a cut-short history entry waits for its live copy: the datagrams held while
/// the join fetched its history are released at once after it, and the fetch gives up after
/// 10 s.
const CUT_WINDOW: Duration = Duration::from_secs(30);

impl Renderer {
    /// A renderer for the room `room_name` (named in the room-closed line).
    pub fn new(room_name: &str) -> Renderer {
        Renderer {
            room_name: room_name.to_owned(),
            seq: SeqTracker::default(),
            original: false,
            cut_shown: Vec::new(),
        }
    }

    /// Reads every datagram as the original server's (`--original`): `__ROOM_CLOSED__` or an
    /// original chat frame, so that the chat of a member with an empty name, which begins
    /// with a 0 byte, is shown as chat and never taken for an extension frame (a notice that
    /// we were removed, or a batch).
    pub fn original_frames_only(&mut self) {
        self.original = true;
    }

    /// Notes one chat message of our own sent at `now` (see [`SeqTracker::sent_own`]).
    pub fn sent_own(&mut self, now: Instant) {
        self.seq.sent_own(now);
    }

    /// Counts a message printed from the history as shown (see
    /// [`SeqTracker::shown_in_history`]). A history entry `truncated` by the server (too
    /// long for one reply) holds only the start of its text: its live copy is known by its
    /// number, its sender and a text that begins with what was shown, for [`CUT_WINDOW`]
    /// after `now`.
    pub fn shown_in_history(
        &mut self,
        seq: u64,
        sender: &str,
        text: &str,
        truncated: bool,
        now: Instant,
    ) {
        self.seq.shown_in_history(seq, content_digest(sender, text));
        // An empty start would match any text of that sender's under that number.
        if truncated && !text.is_empty() {
            if self.cut_shown.len() == CUT_REMEMBERED {
                self.cut_shown.remove(0);
            }
            let sender = content_digest(sender, "");
            self.cut_shown.push((seq, sender, text.to_owned(), now));
        }
    }

    /// Whether message `seq` is the live copy of a history entry shown cut short; forgotten
    /// once matched (a second copy is then a duplicate of what the tracker remembers).
    fn was_shown_cut(&mut self, seq: u64, sender: &str, message: &str, now: Instant) -> bool {
        // The live copy comes with the datagrams held while the history was fetched; one
        // much later is another message under a number used again (a daemon restarted).
        self.cut_shown
            .retain(|&(.., shown)| now.saturating_duration_since(shown) < CUT_WINDOW);
        let sender_digest = content_digest(sender, "");
        let found = self.cut_shown.iter().position(|(at, who, start, _)| {
            *at == seq && *who == sender_digest && message.starts_with(start.as_str())
        });
        if let Some(at) = found {
            self.cut_shown.remove(at);
            self.seq
                .shown_in_history(seq, content_digest(sender, message));
        }
        found.is_some()
    }

    /// Handles one datagram from the server, received at `now`, appending the lines to print
    /// to `out`. Malformed datagrams add nothing.
    pub fn handle_datagram(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<String>) -> Flow {
        match self.parse(bytes) {
            Ok(Delivery::Batch(body)) => self.handle_batch(body, now, out),
            Ok(d) => self.handle_delivery(d, now, out),
            Err(e) => {
                debug!("dropping malformed datagram ({}): {e}", e.reason());
                Flow::Continue
            }
        }
    }

    /// Whether a datagram alone ends our membership ([`ends_membership`]), read as
    /// [`Renderer::handle_datagram`] reads it: with `--original`, a datagram that begins with
    /// a 0 byte is chat, and ends nothing. A batch is not looked into.
    pub fn ends_membership(&self, bytes: &[u8]) -> bool {
        self.parse(bytes).is_ok_and(|d| ends_membership(&d))
    }

    /// Parses a datagram as the server this renderer reads sends it.
    fn parse<'a>(&self, bytes: &'a [u8]) -> Result<Delivery<'a>, ucrp::Error> {
        if self.original {
            delivery::parse_original(bytes)
        } else {
            delivery::parse(bytes)
        }
    }

    fn handle_batch(&mut self, body: &[u8], now: Instant, out: &mut Vec<String>) -> Flow {
        for entry in delivery::batch_entries(body) {
            let parsed = entry.and_then(delivery::parse);
            match parsed {
                Ok(Delivery::Batch(_)) => debug!("dropping a batch nested in a batch"),
                Ok(d) => {
                    if self.handle_delivery(d, now, out) == Flow::RoomClosed {
                        return Flow::RoomClosed;
                    }
                }
                Err(e) => debug!("dropping malformed batch entry ({}): {e}", e.reason()),
            }
        }
        Flow::Continue
    }

    fn handle_delivery(&mut self, d: Delivery<'_>, now: Instant, out: &mut Vec<String>) -> Flow {
        match d {
            Delivery::Chat { sender, message } => out.push(chat_line(sender, message)),
            Delivery::Sequenced {
                seq,
                sender,
                message,
            } if self.was_shown_cut(seq, sender, message, now) => {
                debug!("dropping message {seq}: shown cut short in the history");
            }
            Delivery::Sequenced {
                seq,
                sender,
                message,
            } => match self.seq.observe(seq, content_digest(sender, message), now) {
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
                    printable_name(&self.room_name)
                ));
            }
            Delivery::Notice { what, name } => {
                let what = match what {
                    Notice::Joined => "joined",
                    Notice::Left => "left",
                    Notice::TimedOut => "timed out",
                };
                out.push(format!("* {} {what}", printable_name(name)));
            }
            // The notice does not say why: the host left, timed out or was idle, or an
            // operator closed it. So it blames no one.
            Delivery::RoomClosed => {
                out.push(format!(
                    "* room {} was closed",
                    printable_name(&self.room_name)
                ));
            }
            // `handle_datagram` and `handle_batch` deal with batches before calling here.
            Delivery::Batch(_) => debug!("dropping a batch nested in a batch"),
        }
        if ends_membership(&d) {
            Flow::RoomClosed
        } else {
            Flow::Continue
        }
    }
}

/// Whether a delivery ends our membership: `__ROOM_CLOSED__`, or the timed-out notice without
/// a name, which is about us (the server expired us and no longer knows our token).
fn ends_membership(d: &Delivery<'_>) -> bool {
    matches!(
        d,
        Delivery::RoomClosed
            | Delivery::Notice {
                what: Notice::TimedOut,
                name: "",
            }
    )
}

fn chat_line(sender: &str, message: &str) -> String {
    format!("{}: {}", printable_name(sender), printable(message))
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
    c.is_control() || is_reordering(c)
}

/// Text from the network made safe for one terminal line: unsafe characters are shown as
/// Rust escapes (`\n`, `\u{1b}`), everything else as is. A tab stays a tab: it moves the
/// cursor along the line and no further, and pasted columns keep their shape.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape_where(text, |_, c| c != '\t' && is_unsafe(c))
}

/// A name (sender, member, room) from the network made safe and unmistakable: as
/// [`printable`] (a tab included), and invisible characters are shown as escapes too, so
/// that `ali\u{200b}ce` cannot pass for `alice`. Message text keeps them: there they format,
/// not deceive. A name whose ends would not show (empty, or white space first or last, as
/// the original server allowed: `bob ` for `bob`) is shown in double quotes, as is one that
/// begins with a quote, so that no name passes for a quoted one, and one that holds a
/// backslash, so that `ali\u{200b}ce` typed as is cannot pass for a name with a real
/// zero-width space; inside the quotes `"` and `\` are escaped.
pub fn printable_name(name: &str) -> Cow<'_, str> {
    let hidden: Vec<usize> = hidden_chars(name).map(|(at, _)| at).collect();
    let quoted = needs_quotes(name);
    let shown = escape_where(name, |at, c| {
        is_unsafe(c) || hidden.binary_search(&at).is_ok() || (quoted && matches!(c, '"' | '\\'))
    });
    if quoted {
        Cow::Owned(format!("\"{shown}\""))
    } else {
        shown
    }
}

/// Whether a name is shown in quotes ([`printable_name`]).
fn needs_quotes(name: &str) -> bool {
    name.is_empty()
        || name.starts_with('"')
        || name.contains('\\')
        || name.starts_with(char::is_whitespace)
        || name.ends_with(char::is_whitespace)
        || ends_like_a_sender(name)
}

/// Whether a colon in `name` is followed by white space or ends it: unquoted, `alice: the
/// password is` sending `hunter2` would show as `alice: the password is: hunter2`, a line
/// from `alice`.
fn ends_like_a_sender(name: &str) -> bool {
    name.match_indices(':').any(|(at, _)| {
        // `at` is the offset of an ASCII `:`, so `at + 1` is a character boundary, at most
        // `name.len()`: the slice cannot panic.
        name[at + 1..]
            .chars()
            .next()
            .is_none_or(char::is_whitespace)
    })
}

/// `text` with the characters `escape` picks (by byte offset and character) as escapes.
fn escape_where(text: &str, escape: impl Fn(usize, char) -> bool) -> Cow<'_, str> {
    if !text.char_indices().any(|(at, c)| escape(at, c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for (at, c) in text.char_indices() {
        if escape(at, c) {
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
        let now = Instant::now();
        let mut lines = Vec::new();
        let mut flow = Flow::Continue;
        for d in datagrams {
            flow = renderer.handle_datagram(d, now, &mut lines);
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
    fn duplicates_are_dropped_and_late_messages_shown() {
        let (lines, _) = render(&[
            sequenced(4, "a", "four"),
            sequenced(4, "a", "four"),
            sequenced(5, "a", "five"),
            sequenced(3, "a", "three, late"),
            sequenced(5, "a", "five"),
        ]);
        assert_eq!(lines, ["a: four", "a: five", "a: three, late"]);
    }

    #[test]
    fn seq_tracker_decisions() {
        let d = |text: &str| content_digest("a", text);
        let mut t = SeqTracker::default();
        let now = Instant::now();
        assert_eq!(
            t.observe(10, d("ten"), now),
            SeqVerdict::Deliver { lost: 0 }
        );
        assert_eq!(t.observe(10, d("ten"), now), SeqVerdict::Duplicate);
        assert_eq!(t.observe(13, d("13"), now), SeqVerdict::Deliver { lost: 2 });
        // Late, never shown: shown now, and not a loss.
        assert_eq!(t.observe(12, d("12"), now), SeqVerdict::Deliver { lost: 0 });
        assert_eq!(t.observe(12, d("12"), now), SeqVerdict::Duplicate);
        assert_eq!(t.observe(14, d("14"), now), SeqVerdict::Deliver { lost: 0 });
        // A daemon that started its count again at 1: gaps count from there.
        assert_eq!(t.observe(1, d("one"), now), SeqVerdict::Deliver { lost: 0 });
        assert_eq!(t.observe(1, d("one"), now), SeqVerdict::Duplicate);
        assert_eq!(
            t.observe(3, d("three"), now),
            SeqVerdict::Deliver { lost: 1 }
        );
    }

    /// The losses `t` reports for each message `(seq, text)` from sender "a" seen at `now`, in
    /// order; `None` for one dropped as a duplicate.
    fn losses(t: &mut SeqTracker, messages: &[(u64, &str)], now: Instant) -> Vec<Option<u64>> {
        messages
            .iter()
            .map(
                |&(seq, text)| match t.observe(seq, content_digest("a", text), now) {
                    SeqVerdict::Deliver { lost } => Some(lost),
                    SeqVerdict::Duplicate => None,
                },
            )
            .collect()
    }

    /// A first message that arrives after the second is late, not a daemon counting again:
    /// the third is no loss. A count that does start again goes on below the old one.
    #[test]
    fn a_late_number_one_is_told_from_a_count_started_again() {
        let now = Instant::now();
        let late = [(2, "m2"), (1, "m1"), (3, "m3"), (5, "m5")];
        let shown = losses(&mut SeqTracker::default(), &late, now);
        assert_eq!(shown, [Some(0), Some(0), Some(0), Some(1)]);
        // 3 shown before a late 1 and then 2: 4 follows 3, nothing is lost.
        let shuffled = [(3, "m3"), (1, "m1"), (2, "m2"), (4, "m4")];
        let shown = losses(&mut SeqTracker::default(), &shuffled, now);
        assert_eq!(shown, [Some(0); 4]);
        let again = [(9, "m9"), (1, "n1"), (2, "n2"), (4, "n4")];
        let shown = losses(&mut SeqTracker::default(), &again, now);
        assert_eq!(shown, [Some(0), Some(0), Some(0), Some(1)]);
    }

    /// After a number 1 that came after higher ones, the next number decides: one above the
    /// old count goes on from it (only the numbers above the old last are lost), and another
    /// 1, with a different text, leaves the question open for the number after it.
    #[test]
    fn a_number_above_the_old_count_after_a_one_goes_on_from_the_old_count() {
        let now = Instant::now();
        let above = [(5, "m5"), (1, "m1"), (7, "m7")];
        let shown = losses(&mut SeqTracker::default(), &above, now);
        assert_eq!(shown, [Some(0), Some(0), Some(1)]);
        let two_ones = [(9, "m9"), (1, "n1"), (1, "o1"), (12, "m12")];
        let shown = losses(&mut SeqTracker::default(), &two_ones, now);
        assert_eq!(shown, [Some(0), Some(0), Some(0), Some(2)]);
    }

    /// Once a count started again reaches the numbers shown before it, those numbers are
    /// not lost, however wide the gap; the number of the message itself is no such number.
    #[test]
    fn numbers_shown_before_a_count_started_again_are_not_lost_in_a_wide_gap() {
        let now = Instant::now();
        let mut t = SeqTracker::default();
        let old = [(7, "m7"), (8, "m8"), (9, "m9")];
        assert_eq!(losses(&mut t, &old, now), [Some(0); 3]);
        let again = [
            (1, "n1"),
            (2, "n2"),
            (3, "n3"),
            (4, "n4"),
            (5, "n5"),
            (6, "n6"),
        ];
        assert_eq!(losses(&mut t, &again, now), [Some(0); 6]);
        // 7 and 8 were shown: from 6 to 9 nothing is lost; 9 shown before is not among them.
        let on = [(9, "n9"), (11, "n11")];
        assert_eq!(losses(&mut t, &on, now), [Some(0), Some(1)]);
        // Two apart, with the number between shown before the count started again.
        let mut t = SeqTracker::default();
        let close = [(3, "m3"), (5, "m5"), (1, "n1"), (2, "n2"), (4, "n4")];
        assert_eq!(
            losses(&mut t, &close, now),
            [Some(0), Some(1), Some(0), Some(0), Some(0)]
        );
    }

    /// An own message sent exactly [`IN_FLIGHT`] before the first number we see counts as
    /// numbered before it.
    #[test]
    fn an_own_message_sent_in_flight_before_the_first_number_is_forgotten() {
        let start = Instant::now();
        let mut t = SeqTracker::default();
        t.sent_own(start);
        let shown = losses(&mut t, &[(4, "b4"), (6, "b6")], start + IN_FLIGHT);
        assert_eq!(shown, [Some(0), Some(1)]);
    }

    /// Own messages sent long before the first number we see were numbered below it: they
    /// fill no later gap. One still on its way when that number came may.
    #[test]
    fn own_messages_sent_before_the_first_number_fill_a_gap_only_if_in_flight() {
        let start = Instant::now();
        let mut alone = SeqTracker::default();
        for _ in 0..3 {
            alone.sent_own(start); // 1, 2, 3, talking alone
        }
        let later = start + IN_FLIGHT + Duration::from_secs(8);
        let shown = losses(&mut alone, &[(4, "b4"), (6, "b6")], later);
        assert_eq!(shown, [Some(0), Some(1)]);

        let mut racing = SeqTracker::default();
        racing.sent_own(start); // numbered 5, after bob's 4
        let soon = start + Duration::from_millis(20);
        let shown = losses(&mut racing, &[(4, "b4"), (6, "b6")], soon);
        assert_eq!(shown, [Some(0), Some(0)]);
    }

    /// The tracker remembers the last 256 messages shown, no more: a copy of the oldest of
    /// 256 is still a duplicate, a copy of one 257 back is shown again. (Hand mutants:
    /// `RECENT_SHOWN` 255 or 257.)
    #[test]
    fn the_last_256_messages_shown_are_remembered() {
        let now = Instant::now();
        let d = |seq: u64| content_digest("a", &seq.to_string());
        for (shown, copy_of_first) in [
            (256, SeqVerdict::Duplicate),
            (257, SeqVerdict::Deliver { lost: 0 }),
        ] {
            let mut t = SeqTracker::default();
            for seq in 1..=shown {
                assert_eq!(t.observe(seq, d(seq), now), SeqVerdict::Deliver { lost: 0 });
            }
            assert_eq!(t.observe(1, d(1), now), copy_of_first, "after {shown}");
        }
    }

    /// 4,096 own messages are remembered, no more: a gap of 4,097 after 4,097 sends counts
    /// one lost, and after 4,096 sends a gap of 4,096 counts none. (Hand mutants:
    /// `OWN_REMEMBERED` 4095 or 4097.)
    #[test]
    fn at_most_4096_own_messages_are_remembered() {
        let now = Instant::now();
        for (sent, lost) in [(4096, 0), (4097, 1)] {
            let mut t = SeqTracker::default();
            assert_eq!(t.observe(1, 1, now), SeqVerdict::Deliver { lost: 0 });
            for _ in 0..sent {
                t.sent_own(now);
            }
            let next = 2 + sent;
            assert_eq!(
                t.observe(next, 2, now),
                SeqVerdict::Deliver { lost },
                "{sent} sent"
            );
        }
    }

    /// An own message sent 1.5 s before the first number we see may still be numbered
    /// after it and fills a later gap; one sent 2.5 s before does not. (Hand mutants:
    /// `IN_FLIGHT` 1 s or 3 s.)
    #[test]
    fn own_messages_are_in_flight_for_two_seconds() {
        let start = Instant::now();
        for (before, lost) in [(1500, 0), (2500, 1)] {
            let mut t = SeqTracker::default();
            t.sent_own(start);
            let first = start + Duration::from_millis(before);
            let shown = losses(&mut t, &[(4, "b4"), (6, "b6")], first);
            assert_eq!(shown, [Some(0), Some(lost)], "sent {before} ms before");
        }
    }

    /// 16 history entries shown cut short are remembered, no more: with 17, the live copy
    /// of the first is shown, and of the second is not. (Hand mutants: `CUT_REMEMBERED` 15
    /// or 17.)
    #[test]
    fn sixteen_history_entries_cut_short_are_remembered() {
        let now = Instant::now();
        let mut renderer = Renderer::new("lobby");
        for seq in 1..=17 {
            renderer.shown_in_history(seq, "a", "start", true, now);
        }
        let mut lines = Vec::new();
        for seq in [1, 2] {
            let d = sequenced(seq, "a", &format!("start of {seq}"));
            let _ = renderer.handle_datagram(&d, now, &mut lines);
        }
        assert_eq!(lines, ["a: start of 1"]);
    }

    /// A history entry shown cut short waits 30 s for its live copy: one 29 s later is a
    /// duplicate, one 30 s later is shown. (Hand mutants: `CUT_WINDOW` 29 s or 31 s.)
    #[test]
    fn a_history_entry_cut_short_waits_thirty_seconds_for_its_live_copy() {
        let shown_at = Instant::now();
        for (after, lines_shown) in [(29, 0), (30, 1)] {
            let mut renderer = Renderer::new("lobby");
            renderer.shown_in_history(9, "a", "nin", true, shown_at);
            let mut lines = Vec::new();
            let later = shown_at + Duration::from_secs(after);
            let _ = renderer.handle_datagram(&sequenced(9, "a", "nine"), later, &mut lines);
            assert_eq!(lines.len(), lines_shown, "{after} s later: {lines:?}");
        }
    }

    /// After a number 1 that came after higher ones, a next number equal to the old last
    /// (with another text) is a count started again, like one below it: the numbers
    /// between 1 and it are lost. (Hand mutant: `seq <= last` made `seq < last`.)
    #[test]
    fn the_old_last_number_after_a_one_is_a_count_started_again() {
        let now = Instant::now();
        let again = [(9, "m9"), (1, "n1"), (9, "n9")];
        let shown = losses(&mut SeqTracker::default(), &again, now);
        assert_eq!(shown, [Some(0), Some(0), Some(7)]);
    }

    /// With `--original`, a datagram is the original server's: one that begins with a 0 byte
    /// is the chat of a member with an empty name, never an extension frame.
    #[test]
    fn original_frames_only_reads_a_leading_zero_as_chat() {
        let now = Instant::now();
        let removed = [0x00, 0x03, 0x03, 0x00];
        let mut lines = Vec::new();
        let mut original = Renderer::new("lobby");
        original.original_frames_only();
        assert_eq!(
            original.handle_datagram(&removed, now, &mut lines),
            Flow::Continue
        );
        assert_eq!(lines, ["\"\": \\u{3}\\u{3}\\u{0}"], "an empty name, quoted");
        lines.clear();
        assert_eq!(
            original.handle_datagram(ucrp::ROOM_CLOSED, now, &mut lines),
            Flow::RoomClosed
        );
        let mut extensions = Renderer::new("lobby");
        lines.clear();
        assert_eq!(
            extensions.handle_datagram(&removed, now, &mut lines),
            Flow::RoomClosed,
            "read with extensions, the same bytes are the nameless timed-out notice"
        );
        // The screen's question, whether a datagram ends our membership, gets the same answer.
        assert!(!original.ends_membership(&removed));
        assert!(original.ends_membership(ucrp::ROOM_CLOSED));
        assert!(extensions.ends_membership(&removed));
        assert!(extensions.ends_membership(ucrp::ROOM_CLOSED));
        assert!(!extensions.ends_membership(&[0x00, 0x03, 0x03, 0x01, b'b']));
    }

    /// The daemon numbers our own messages but does not send them back: their numbers are
    /// gaps that are not losses.
    #[test]
    fn our_own_messages_are_not_counted_as_lost() {
        let d = |text: &str| content_digest("bob", text);
        let mut t = SeqTracker::default();
        let now = Instant::now();
        assert_eq!(t.observe(1, d("b1"), now), SeqVerdict::Deliver { lost: 0 });
        t.sent_own(now); // 2
        t.sent_own(now); // 3
        assert_eq!(t.observe(4, d("b4"), now), SeqVerdict::Deliver { lost: 0 });
        t.sent_own(now); // 5
                         // 6 was lost on the way.
        assert_eq!(t.observe(7, d("b7"), now), SeqVerdict::Deliver { lost: 1 });
        // Our message numbered after one that reaches us later: the gap comes later.
        t.sent_own(now); // 9
        assert_eq!(t.observe(8, d("b8"), now), SeqVerdict::Deliver { lost: 0 });
        assert_eq!(
            t.observe(10, d("b10"), now),
            SeqVerdict::Deliver { lost: 0 }
        );
    }

    /// After a crash the daemon numbers again from its last checkpoint: numbers already
    /// used come back on new messages, including the numbers of our own messages, which we
    /// never saw. All of them are shown, true copies are still dropped, and none is a loss.
    #[test]
    fn numbers_used_again_on_other_messages_are_shown() {
        let d = |text: &str| content_digest("a", text);
        let mut t = SeqTracker::default();
        let now = Instant::now();
        for (seq, text) in [(1, "m1"), (2, "m2"), (4, "m4"), (5, "m5")] {
            if seq == 4 {
                t.sent_own(now); // 3 was ours
            }
            assert_eq!(
                t.observe(seq, d(text), now),
                SeqVerdict::Deliver { lost: 0 }
            );
        }
        assert_eq!(t.observe(3, d("n3"), now), SeqVerdict::Deliver { lost: 0 });
        assert_eq!(
            t.observe(3, d("n3"), now),
            SeqVerdict::Duplicate,
            "a copy of n3"
        );
        assert_eq!(t.observe(4, d("n4"), now), SeqVerdict::Deliver { lost: 0 });
        assert_eq!(
            t.observe(4, d("m4"), now),
            SeqVerdict::Duplicate,
            "a late copy of m4"
        );
        assert_eq!(t.observe(5, d("n5"), now), SeqVerdict::Deliver { lost: 0 });
        assert_eq!(t.observe(7, d("n7"), now), SeqVerdict::Deliver { lost: 1 });
        // The same text under the same number from another sender is another message.
        assert_eq!(
            t.observe(7, content_digest("b", "n7"), now),
            SeqVerdict::Deliver { lost: 0 }
        );
    }

    #[test]
    fn history_shown_makes_live_copies_duplicates() {
        let mut renderer = Renderer::new("lobby");
        let now = Instant::now();
        renderer.shown_in_history(6, "a", "six", false, now);
        renderer.shown_in_history(7, "a", "seven", false, now);
        let mut lines = Vec::new();
        for d in [
            sequenced(6, "a", "six"),
            sequenced(7, "a", "seven"),
            sequenced(8, "a", "eight"),
        ] {
            let _ = renderer.handle_datagram(&d, now, &mut lines);
        }
        assert_eq!(lines, ["a: eight"]);
        let mut t = SeqTracker::default();
        let now = Instant::now();
        t.observe(9, content_digest("a", "nine"), now);
        t.shown_in_history(4, content_digest("a", "four"));
        assert_eq!(
            t.observe(9, content_digest("a", "nine"), now),
            SeqVerdict::Duplicate
        );
    }

    /// A history entry the server cut short (too long for one reply) shows only the start
    /// of its text: its live copy, same number and sender and a text that begins with it, is
    /// a duplicate, and so is a second copy; another message under that number is not.
    #[test]
    fn a_live_copy_of_a_history_entry_cut_short_is_a_duplicate() {
        let mut renderer = Renderer::new("lobby");
        let now = Instant::now();
        let long = "x".repeat(300);
        renderer.shown_in_history(5, "a", "five", false, now);
        renderer.shown_in_history(6, "a", &long[..100], true, now);
        let mut lines = Vec::new();
        for d in [
            sequenced(6, "b", &long),
            sequenced(6, "a", &long),
            sequenced(6, "a", &long),
            sequenced(6, "a", "other"),
            sequenced(7, "a", "seven"),
        ] {
            let _ = renderer.handle_datagram(&d, now, &mut lines);
        }
        assert_eq!(
            lines,
            [format!("b: {long}"), "a: other".into(), "a: seven".into()]
        );
        // An empty start matches nothing; a copy long after the history is another message
        // under a number used again.
        renderer.shown_in_history(8, "a", "", true, now);
        renderer.shown_in_history(9, "a", "nin", true, now);
        lines.clear();
        let later = now + CUT_WINDOW;
        for d in [sequenced(8, "a", "eight"), sequenced(9, "a", "nine")] {
            let _ = renderer.handle_datagram(&d, later, &mut lines);
        }
        assert_eq!(lines, ["a: eight", "a: nine"]);
    }

    /// Only an entry the server cut short, with a start to match, is matched by its start:
    /// a whole entry and an empty start leave a longer text under that number to be shown.
    #[test]
    fn only_a_history_entry_cut_short_with_some_text_is_matched_by_its_start() {
        let mut renderer = Renderer::new("lobby");
        let now = Instant::now();
        renderer.shown_in_history(6, "a", "hi", false, now);
        renderer.shown_in_history(8, "a", "", true, now);
        let mut lines = Vec::new();
        for d in [sequenced(6, "a", "hi there"), sequenced(8, "a", "eight")] {
            let _ = renderer.handle_datagram(&d, now, &mut lines);
        }
        assert_eq!(lines, ["a: hi there", "a: eight"]);
    }

    /// A live copy that comes [`CUT_WINDOW`] after its history entry was shown cut short is
    /// another message under a number used again.
    #[test]
    fn a_live_copy_a_whole_window_after_its_entry_cut_short_is_shown() {
        let mut renderer = Renderer::new("lobby");
        let shown_at = Instant::now();
        renderer.shown_in_history(9, "a", "nin", true, shown_at);
        let mut lines = Vec::new();
        let d = sequenced(9, "a", "nine");
        let _ = renderer.handle_datagram(&d, shown_at + CUT_WINDOW, &mut lines);
        assert_eq!(lines, ["a: nine"]);
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
        assert_eq!(lines, ["bob: bye", "* room lobby was closed"]);
        assert_eq!(flow, Flow::RoomClosed);
        let (lines, flow) = render(&[batch(&[
            delivery::ROOM_CLOSED.to_vec(),
            chat("never", "shown"),
        ])]);
        assert_eq!(lines, ["* room lobby was closed"]);
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

    /// Names show invisible characters as escapes, so a look-alike cannot pass for another
    /// member; message text keeps them, and both keep the joiners emoji need.
    #[test]
    fn invisible_characters_are_shown_in_names_only() {
        let (lines, _) = render(&[
            chat("ali\u{200b}ce", "mixed \u{200f}text\u{200e}"),
            notice(Notice::Joined, "bo\u{ad}b"),
            chat("👩\u{200d}💻", "ok"),
            chat("ali\u{3164}ce", "a Hangul filler"),
            chat("al\u{200d}ice", "a joiner between ASCII letters"),
        ]);
        assert_eq!(
            lines,
            [
                "ali\\u{200b}ce: mixed \u{200f}text\u{200e}",
                "* bo\\u{ad}b joined",
                "👩\u{200d}💻: ok",
                "ali\\u{3164}ce: a Hangul filler",
                "al\\u{200d}ice: a joiner between ASCII letters",
            ]
        );
        assert!(matches!(printable_name("alice"), Cow::Borrowed("alice")));
    }

    #[test]
    fn terminal_control_characters_are_escaped() {
        let (lines, _) = render(&[chat("ev\nil", "\u{1b}[2Jgone\u{202e}")]);
        assert_eq!(lines, ["ev\\nil: \\u{1b}[2Jgone\\u{202e}"]);
        assert!(matches!(printable("plain ☃"), Cow::Borrowed("plain ☃")));
    }

    /// Tabs in a message show as tabs (pasted columns), not as `\t`; in a name they are
    /// escaped like every other control character.
    #[test]
    fn tabs_show_in_messages_only() {
        let (lines, _) = render(&[chat("ta\tb", "a\tb\r")]);
        assert_eq!(lines, ["ta\\tb: a\tb\\r"]);
        assert!(matches!(printable("col1\tcol2"), Cow::Borrowed(_)));
    }

    /// A name that could pass for another because its ends do not show is quoted; so is one
    /// that begins with a quote, whose quotes and backslashes are then escaped.
    #[test]
    fn names_with_hidden_ends_are_quoted() {
        let (lines, _) = render(&[
            chat("bob ", "trailing space"),
            chat("\u{3000}bob", "ideographic space"),
            chat("\"bob\"", "quotes"),
            chat("\" x\\", "quote, space, backslash"),
            notice(Notice::Joined, " carol"),
            chat("bob", "plain"),
            chat("b o\"b", "inner space and quote"),
            chat("ali\\u{200b}ce", "a typed escape"),
            chat("ali\u{200b}ce", "a real one"),
        ]);
        assert_eq!(
            lines,
            [
                "\"bob \": trailing space",
                "\"\u{3000}bob\": ideographic space",
                "\"\\\"bob\\\"\": quotes",
                "\"\\\" x\\\\\": quote, space, backslash",
                "* \" carol\" joined",
                "bob: plain",
                "b o\"b: inner space and quote",
                "\"ali\\\\u{200b}ce\": a typed escape",
                "ali\\u{200b}ce: a real one",
            ]
        );
        assert!(matches!(printable_name("bob"), Cow::Borrowed("bob")));
    }

    /// A name that ends in white space other than a space (no-break, ideographic) is
    /// quoted too: its end does not show either. (Hand mutant: `ends_with(char::is_whitespace)`
    /// made `ends_with(' ')`.)
    #[test]
    fn names_ending_in_any_white_space_are_quoted() {
        let (lines, _) = render(&[
            chat("bob\u{a0}", "no-break"),
            chat("bob\u{3000}", "ideographic"),
        ]);
        assert_eq!(
            lines,
            ["\"bob\u{a0}\": no-break", "\"bob\u{3000}\": ideographic"]
        );
    }

    /// A name with a colon before white space, or at its end, is quoted, so that it cannot
    /// pass for another sender's name followed by text; other colons are shown as they are.
    #[test]
    fn names_that_could_end_like_a_sender_are_quoted() {
        let (lines, _) = render(&[
            chat("alice: the password is", "hunter2"),
            chat("alice:\u{a0}x", "no-break space"),
            chat("alice:", "ends in a colon"),
            chat("team:ops", "inner colon"),
            chat("12:30", "time"),
        ]);
        assert_eq!(
            lines,
            [
                "\"alice: the password is\": hunter2",
                "\"alice:\u{a0}x\": no-break space",
                "\"alice:\": ends in a colon",
                "team:ops: inner colon",
                "12:30: time",
            ]
        );
    }

    /// The C1 controls (U+0080 to U+009F) are escaped like the C0 ones, in messages and in
    /// names: U+009B is the one-character CSI of terminals that read 8-bit controls, and
    /// U+0085 a line break. (Hand mutant: `is_control` made `is_ascii_control`.)
    #[test]
    fn c1_control_characters_are_escaped() {
        let (lines, _) = render(&[chat("ev\u{85}il", "\u{9b}2Jgone\u{80}\u{9f}")]);
        assert_eq!(lines, ["ev\\u{85}il: \\u{9b}2Jgone\\u{80}\\u{9f}"]);
    }
}
