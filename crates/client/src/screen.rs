//! Where a chat's lines go, shared by the receiver, the input thread and the main loop.
//!
//! [`Screen`] owns the [`Renderer`] and a [`Printer`]. Lines from the room go to the
//! printer's standard output, the client's own remarks (`* ...`) to its standard error. The
//! printer is [`PlainPrinter`] (standard output and error, line by line) for pipes and tests, or
//! [`EditorPrinter`] when a line editor owns the terminal: it prints above the line being
//! typed instead of through it, through a [`Feed`] that never makes the printing thread wait.
//!
//! On `ocm join` the screen starts *held*: datagrams that arrive while the recent history is
//! being fetched are kept unrendered. [`Screen::release`] then prints the history, marks its
//! sequence numbers as shown and renders the held datagrams, so the room reads in order and a
//! message that is both in the history and live is printed once.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::debug;
use tcrp::payload::HistoryPage;

use crate::feed::Feed;
use crate::listing;
use crate::locks;
use crate::render::{Flow, Renderer};

/// Most datagrams kept while the screen is held. The hold lasts one TCP round trip (at most
/// the handshake timeout); past this, or past [`MAX_HELD_BYTES`], datagrams are dropped and
/// show up as lost messages, except a notice that ends our membership, kept apart.
pub const MAX_HELD_DATAGRAMS: usize = 1024;

/// Most bytes of datagrams kept while the screen is held (a server decides how long the hold
/// lasts and how large its datagrams are).
pub const MAX_HELD_BYTES: usize = 1 << 20;

/// The line printed to standard error between the history and the live messages.
pub const LIVE_LINE: &str = "* --- live ---";

/// Prints whole lines (without their newline).
pub trait Printer: Send {
    /// A line of the room: a message, a history entry, a notice.
    fn print_out(&mut self, line: &str) -> io::Result<()>;
    /// A remark of the client itself. Best effort: a remark that cannot be shown is dropped.
    fn print_err(&mut self, line: &str);
    /// The queue printing goes through, if any, for the receiver to wait on outside the
    /// screen's lock ([`Feed::wait_below`]).
    fn feed(&self) -> Option<Feed> {
        None
    }
    /// Stops printing; returns the lines accepted but not yet shown.
    fn close(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// Writes `line` to standard error through its queue ([`crate::stderr`]), best effort:
/// unlike `eprintln!`, a closed standard error (EPIPE) drops the line instead of panicking,
/// and one nobody reads does not stop the calling thread, so the client still chats and
/// leaves its room properly.
pub fn to_stderr(line: &str) {
    crate::stderr::write_line(line);
}

/// Standard output and standard error, flushed per line so a reader on a pipe sees each line
/// at once.
#[derive(Debug, Default)]
pub struct PlainPrinter;

impl Printer for PlainPrinter {
    fn print_out(&mut self, line: &str) -> io::Result<()> {
        let mut out = io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()
    }

    fn print_err(&mut self, line: &str) {
        to_stderr(line);
    }
}

/// Prints through a line editor's external printer, which redraws the line being typed
/// below the printed text, by way of a [`Feed`]. Remarks take the same way when standard
/// error is the terminal too; when it is redirected they go there as usual.
pub struct EditorPrinter {
    feed: Feed,
    stderr_is_terminal: bool,
}

impl EditorPrinter {
    /// Prints through `feed` (started on `Editor::create_external_printer`).
    pub fn new(feed: Feed) -> EditorPrinter {
        EditorPrinter {
            feed,
            stderr_is_terminal: io::stderr().is_terminal(),
        }
    }
}

impl Printer for EditorPrinter {
    fn print_out(&mut self, line: &str) -> io::Result<()> {
        self.feed.push(line.to_owned());
        Ok(())
    }

    fn print_err(&mut self, line: &str) {
        if self.stderr_is_terminal {
            self.feed.push(line.to_owned());
        } else {
            to_stderr(line);
        }
    }

    fn feed(&self) -> Option<Feed> {
        Some(self.feed.clone())
    }

    fn close(&mut self) -> Vec<String> {
        self.feed.close()
    }
}

impl Drop for EditorPrinter {
    fn drop(&mut self) {
        self.feed.close();
    }
}

/// Our own chat messages sent and not yet counted by the renderer. The main loop notes each
/// here before sending it, without the screen's lock: the receiver holds that lock while it
/// prints, and a write to a stalled standard output (a paused terminal, a full pipe) would
/// otherwise hold the main loop too (its signals and `/quit`). The screen takes the notes before it
/// renders each datagram, so a reply numbered after one of our messages never comes before
/// that message's note.
#[derive(Debug, Clone, Default)]
pub struct OwnSends(Arc<Mutex<Vec<Instant>>>);

impl OwnSends {
    /// Notes a message about to be sent at `at`.
    pub fn note(&self, at: Instant) {
        self.lock().push(at);
    }

    /// Takes back the last note: its send failed. (If the screen took it meanwhile, the
    /// count errs low, like a message the daemon drops.)
    pub fn take_back(&self) {
        self.lock().pop();
    }

    /// Notes not yet taken by the screen.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn take(&self) -> Vec<Instant> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Instant>> {
        locks::lock(&self.0)
    }
}

/// The chat's output: renders datagrams and prints lines (see the module docs).
pub struct Screen {
    printer: Box<dyn Printer>,
    renderer: Renderer,
    /// Our messages sent, noted by the main loop ([`OwnSends`]).
    own: OwnSends,
    /// `Some` while held: the datagrams received since, in order. Held at join until
    /// [`Screen::release`], and after a datagram that closed the room until
    /// [`Screen::reopen`] (if the closure turns out forged).
    held: Option<Vec<Vec<u8>>>,
    /// Their bytes.
    held_bytes: usize,
    /// Held because a datagram closed the room (not for the join).
    closure_pending: bool,
    /// While so, the last bare closure notice that came, kept apart from the hold (a flood
    /// of them must not fill it and push out chat).
    closed_again: Option<Vec<u8>>,
    /// Keep the lines of the datagram that closes the room for [`Screen::take_closing`]
    /// instead of printing them (see [`Screen::set_editor_printer`] and
    /// [`Screen::defer_closing_lines`]).
    defer_closing: bool,
    /// The lines kept that way.
    closing: Vec<String>,
}

impl Screen {
    /// Reads datagrams as the original server's only (see [`Renderer::original_frames_only`]).
    pub fn original_frames_only(&mut self) {
        self.renderer.original_frames_only();
    }

    /// A screen for `room_name`, held until [`Screen::release`] when `hold` is set.
    pub fn new(room_name: &str, printer: Box<dyn Printer>, hold: bool) -> Screen {
        Screen {
            printer,
            renderer: Renderer::new(room_name),
            own: OwnSends::default(),
            held: hold.then(Vec::new),
            held_bytes: 0,
            closure_pending: false,
            closed_again: None,
            defer_closing: false,
            closing: Vec::new(),
        }
    }

    /// Hands printing to the line editor. The editor draws what it is given on its own
    /// thread, and the process exits as soon as the room closes, so the closing lines are
    /// kept for the main thread to print itself after it restored the terminal.
    pub fn set_editor_printer(&mut self, printer: Box<dyn Printer>) {
        self.printer = printer;
        self.defer_closing = true;
    }

    /// Keeps the lines of a datagram that closes the room for [`Screen::take_closing`], so
    /// that nothing says the room closed before the closure is confirmed.
    pub fn defer_closing_lines(&mut self) {
        self.defer_closing = true;
    }

    /// The lines kept when the room closed (empty unless deferred),
    /// after those the editor had not shown yet; printing goes back to plain standard output
    /// and error.
    pub fn take_closing(&mut self) -> Vec<String> {
        let mut lines = self.printer.close();
        self.printer = Box::new(PlainPrinter);
        self.defer_closing = false;
        lines.append(&mut self.closing);
        lines
    }

    /// Opens the screen again after a closure that is not believed (yet): with a `remark`
    /// (the server said the closure was forged) its kept lines are dropped and the remark
    /// shown; without, they are kept in case a later check confirms it. Then the datagrams
    /// held since are shown: [`Flow::RoomClosed`] when one of them closes the room again.
    pub fn reopen(&mut self, remark: Option<&str>) -> io::Result<Flow> {
        if let Some(remark) = remark {
            self.closing.clear();
            self.printer.print_err(remark);
        }
        let held = self.held.take().unwrap_or_default();
        self.held_bytes = 0;
        self.closure_pending = false;
        let closed_again = self.closed_again.take();
        let flow = self.render_held(held)?;
        match closed_again {
            // Closed again by the notice kept apart: its lines are the closing ones now.
            Some(notice) if flow == Flow::Continue => self.render(&notice),
            _ => Ok(flow),
        }
    }

    /// The queue printing goes through, if any: see [`Printer::feed`].
    pub fn feed(&self) -> Option<Feed> {
        self.printer.feed()
    }

    /// Handles one datagram from the server: renders and prints it, or keeps it while held.
    pub fn handle_datagram(&mut self, bytes: &[u8]) -> io::Result<Flow> {
        if self.held.is_some() {
            self.hold(bytes);
            return Ok(Flow::Continue);
        }
        self.render(bytes)
    }

    /// Ends the hold: prints `history` (when it was fetched) and the [`LIVE_LINE`], then the
    /// datagrams held meanwhile, skipping those the history already showed. Returns
    /// [`Flow::RoomClosed`] when one of them closed the room. Does nothing when not held.
    pub fn release(&mut self, history: Option<&HistoryPage>) -> io::Result<Flow> {
        let Some(held) = self.held.take() else {
            return Ok(Flow::Continue);
        };
        self.held_bytes = 0;
        if let Some(page) = history {
            let now = Instant::now();
            for message in &page.messages {
                self.printer.print_out(&listing::history_line(message))?;
                self.renderer.shown_in_history(
                    message.seq,
                    &message.sender,
                    &message.text,
                    message.truncated,
                    now,
                );
            }
            self.printer.print_err(LIVE_LINE);
        }
        let flow = self.render_held(held)?;
        match self.closed_again.take() {
            // A closure kept apart because the hold was full.
            Some(notice) if flow == Flow::Continue => self.render(&notice),
            // Closed by a held datagram: the one kept apart waits for `reopen`.
            kept => {
                self.closed_again = kept;
                Ok(flow)
            }
        }
    }

    /// Keeps a datagram while held, within [`MAX_HELD_DATAGRAMS`] and [`MAX_HELD_BYTES`].
    fn hold(&mut self, bytes: &[u8]) {
        let Some(held) = &mut self.held else {
            return;
        };
        let room =
            held.len() < MAX_HELD_DATAGRAMS && self.held_bytes + bytes.len() <= MAX_HELD_BYTES;
        // Under a closure check, or in a full hold, a notice that ends our membership is kept
        // apart: it must not be lost to a flood of chat, nor fill the hold (a flood of
        // forged ones) and push chat out. `release` and `reopen` act on it after the rest.
        if (self.closure_pending || !room) && self.renderer.ends_membership(bytes) {
            self.closed_again = Some(bytes.to_vec());
            return;
        }
        if room {
            held.push(bytes.to_vec());
            self.held_bytes += bytes.len();
        } else {
            debug!("dropping a datagram: the hold is full");
        }
    }

    /// Renders held datagrams in order; after one that closes the room, the rest are held
    /// again.
    fn render_held(&mut self, held: Vec<Vec<u8>>) -> io::Result<Flow> {
        for (i, bytes) in held.iter().enumerate() {
            if self.render(bytes)? == Flow::RoomClosed {
                for rest in &held[i + 1..] {
                    self.hold(rest);
                }
                return Ok(Flow::RoomClosed);
            }
        }
        Ok(Flow::Continue)
    }

    /// Where the main loop notes our own chat messages, so that the gaps their numbers leave
    /// are not losses.
    pub fn own_sends(&self) -> OwnSends {
        self.own.clone()
    }

    /// Prints a line of the room (a history entry, a `/who` answer).
    pub fn out(&mut self, line: &str) -> io::Result<()> {
        self.printer.print_out(line)
    }

    /// Prints a remark of the client.
    pub fn err(&mut self, line: &str) {
        self.printer.print_err(line);
    }

    fn render(&mut self, bytes: &[u8]) -> io::Result<Flow> {
        for sent in self.own.take() {
            self.renderer.sent_own(sent);
        }
        let mut lines = Vec::new();
        let flow = self
            .renderer
            .handle_datagram(bytes, Instant::now(), &mut lines);
        if flow == Flow::RoomClosed {
            // Whatever comes next waits for the closure to be confirmed or found forged.
            self.held = Some(Vec::new());
            self.held_bytes = 0;
            self.closure_pending = true;
            if self.defer_closing {
                self.closing = lines;
                return Ok(flow);
            }
        }
        for line in &lines {
            match self.printer.print_out(line) {
                Ok(()) => {}
                // The room closed either way, and the exit status says so: a closing line
                // that cannot be printed (the reader of our output gone) is not the end.
                Err(e) if flow == Flow::RoomClosed => debug!("cannot print the closing line: {e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(flow)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tcrp::payload::HistoryMessage;
    use ucrp::delivery;

    /// A printer that records `out: line` and `err: line`.
    #[derive(Clone, Default)]
    pub struct Recorder(pub Arc<Mutex<Vec<String>>>);

    impl Recorder {
        /// Everything printed so far.
        pub fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Printer for Recorder {
        fn print_out(&mut self, line: &str) -> io::Result<()> {
            self.0.lock().unwrap().push(format!("out: {line}"));
            Ok(())
        }
        fn print_err(&mut self, line: &str) {
            self.0.lock().unwrap().push(format!("err: {line}"));
        }
    }

    /// A holding screen sent 40 datagrams of 65,000 bytes: its hold is full in bytes (it
    /// takes 16).
    fn held_past_its_bytes() -> (Recorder, Screen) {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), true);
        let big = "y".repeat(65_000);
        for seq in 1..=40 {
            let flow = screen.handle_datagram(&sequenced(seq, &big)).unwrap();
            assert_eq!(flow, Flow::Continue);
        }
        (rec, screen)
    }

    fn sequenced(seq: u64, text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        delivery::encode_sequenced(seq, "bob", text.as_bytes(), &mut out).unwrap();
        out
    }

    fn notice(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        delivery::encode_notice(delivery::Notice::Joined, name, &mut out).unwrap();
        out
    }

    fn page(seqs: &[u64]) -> HistoryPage {
        HistoryPage {
            messages: seqs
                .iter()
                .map(|&seq| HistoryMessage {
                    seq,
                    sender: "bob".into(),
                    text: format!("m{seq}"),
                    at: 1_700_000_000.0 + seq as f64 * 60.0,
                    truncated: false,
                })
                .collect(),
            more: false,
        }
    }

    /// A printer whose reader has gone away.
    struct Gone;

    impl Printer for Gone {
        fn print_out(&mut self, _: &str) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn print_err(&mut self, _: &str) {}
    }

    #[test]
    fn a_closure_is_reported_when_its_line_cannot_be_printed() {
        let mut screen = Screen::new("lobby", Box::new(Gone), false);
        screen.original_frames_only();
        let chat = screen.handle_datagram(&sequenced(1, "hi"));
        assert_eq!(chat.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        let closed = screen.handle_datagram(delivery::ROOM_CLOSED);
        assert_eq!(closed.unwrap(), Flow::RoomClosed);
    }

    #[test]
    fn unheld_screen_prints_at_once() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), false);
        assert_eq!(
            screen.handle_datagram(&sequenced(1, "hi")).unwrap(),
            Flow::Continue
        );
        screen.err("* note");
        assert_eq!(rec.lines(), ["out: bob: hi", "err: * note"]);
        // Releasing a screen that is not held does nothing.
        assert_eq!(screen.release(Some(&page(&[1]))).unwrap(), Flow::Continue);
        assert_eq!(rec.lines().len(), 2);
    }

    #[test]
    fn held_datagrams_follow_the_history_without_duplicates() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), true);
        for d in [sequenced(5, "m5"), notice("carol"), sequenced(6, "m6")] {
            assert_eq!(screen.handle_datagram(&d).unwrap(), Flow::Continue);
        }
        assert!(rec.lines().is_empty(), "nothing shown while held");
        assert_eq!(
            screen.release(Some(&page(&[4, 5]))).unwrap(),
            Flow::Continue
        );
        assert_eq!(
            rec.lines(),
            [
                "out: [22:17] bob: m4",
                "out: [22:18] bob: m5",
                "err: * --- live ---",
                "out: * carol joined",
                "out: bob: m6",
            ]
        );
        // Live from now on.
        assert_eq!(
            screen.handle_datagram(&sequenced(7, "m7")).unwrap(),
            Flow::Continue
        );
        assert_eq!(rec.lines().last().unwrap(), "out: bob: m7");
    }

    #[test]
    fn release_without_history_prints_no_live_line() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), true);
        assert_eq!(
            screen.handle_datagram(&sequenced(3, "m3")).unwrap(),
            Flow::Continue
        );
        assert_eq!(screen.release(None).unwrap(), Flow::Continue);
        assert_eq!(rec.lines(), ["out: bob: m3"]);
        // An empty history still marks where the live part starts.
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), true);
        assert_eq!(screen.release(Some(&page(&[]))).unwrap(), Flow::Continue);
        assert_eq!(rec.lines(), ["err: * --- live ---"]);
    }

    /// While a closure is checked, nothing says the room closed and what arrives is held;
    /// found forged, the remark and the held datagrams show; not yet settled, the closing
    /// lines are kept for a later confirmation.
    #[test]
    fn a_closure_under_check_holds_what_follows_until_the_screen_reopens() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), false);
        screen.defer_closing_lines();
        let closed = delivery::ROOM_CLOSED;
        assert_eq!(screen.handle_datagram(closed).unwrap(), Flow::RoomClosed);
        assert_eq!(
            screen.handle_datagram(&sequenced(1, "held")).unwrap(),
            Flow::Continue
        );
        assert!(rec.lines().is_empty(), "{:?}", rec.lines());
        assert_eq!(screen.reopen(Some("* forged")).unwrap(), Flow::Continue);
        assert_eq!(rec.lines(), ["err: * forged", "out: bob: held"]);
        // Another closure, and a closure among the datagrams held after it.
        assert_eq!(screen.handle_datagram(closed).unwrap(), Flow::RoomClosed);
        for datagram in [sequenced(2, "two"), closed.to_vec(), sequenced(3, "three")] {
            assert_eq!(screen.handle_datagram(&datagram).unwrap(), Flow::Continue);
        }
        assert_eq!(screen.reopen(None).unwrap(), Flow::RoomClosed);
        assert_eq!(screen.reopen(None).unwrap(), Flow::Continue);
        assert_eq!(
            rec.lines()[2..],
            ["out: bob: two".to_owned(), "out: bob: three".to_owned()]
        );
        // Reopened without a verdict, the closing lines stay for a confirmation.
        assert_eq!(screen.take_closing(), ["* room lobby was closed"]);
    }

    /// A flood of closure notices while one is checked is not kept: chat still fits.
    #[test]
    fn a_flood_of_closures_under_check_does_not_push_out_chat() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), false);
        screen.defer_closing_lines();
        let closed = delivery::ROOM_CLOSED;
        assert_eq!(screen.handle_datagram(closed).unwrap(), Flow::RoomClosed);
        for _ in 0..(MAX_HELD_DATAGRAMS * 3) {
            assert_eq!(screen.handle_datagram(closed).unwrap(), Flow::Continue);
        }
        assert_eq!(
            screen.handle_datagram(&sequenced(1, "still here")).unwrap(),
            Flow::Continue
        );
        // The chat shows; the notices not kept count as one more closure, once.
        assert_eq!(screen.reopen(Some("* forged")).unwrap(), Flow::RoomClosed);
        assert_eq!(rec.lines(), ["err: * forged", "out: bob: still here"]);
        assert_eq!(screen.reopen(Some("* forged")).unwrap(), Flow::Continue);
    }

    #[test]
    fn room_closed_while_held_is_reported_by_release() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), true);
        assert_eq!(
            screen.handle_datagram(&sequenced(1, "bye")).unwrap(),
            Flow::Continue
        );
        assert_eq!(
            screen.handle_datagram(delivery::ROOM_CLOSED).unwrap(),
            Flow::Continue
        );
        assert_eq!(
            screen.handle_datagram(&sequenced(2, "never")).unwrap(),
            Flow::Continue
        );
        assert_eq!(screen.release(None).unwrap(), Flow::RoomClosed);
        assert_eq!(
            rec.lines(),
            ["out: bob: bye", "out: * room lobby was closed"]
        );
        // What comes after is held until the closure is settled.
        assert_eq!(
            screen.handle_datagram(&sequenced(3, "late")).unwrap(),
            Flow::Continue
        );
        assert_eq!(rec.lines().len(), 2);
    }

    #[test]
    fn with_an_editor_the_closing_lines_are_kept_for_the_main_thread() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(PlainPrinter), false);
        screen.set_editor_printer(Box::new(rec.clone()));
        assert_eq!(
            screen.handle_datagram(&sequenced(1, "bye")).unwrap(),
            Flow::Continue
        );
        let mut batch = Vec::new();
        delivery::begin_batch(&mut batch);
        delivery::push_batch_entry(&sequenced(2, "last"), &mut batch).unwrap();
        delivery::push_batch_entry(delivery::ROOM_CLOSED, &mut batch).unwrap();
        assert_eq!(screen.handle_datagram(&batch).unwrap(), Flow::RoomClosed);
        assert_eq!(rec.lines(), ["out: bob: bye"]);
        assert_eq!(
            screen.take_closing(),
            ["bob: last", "* room lobby was closed"]
        );
        assert!(screen.take_closing().is_empty());
    }

    /// Stands in for rustyline's external printer.
    #[derive(Clone, Default)]
    struct FakeExternal(Arc<Mutex<Vec<String>>>);

    impl rustyline::ExternalPrinter for FakeExternal {
        fn print(&mut self, msg: String) -> rustyline::Result<()> {
            self.0.lock().unwrap().push(msg);
            Ok(())
        }
    }

    #[test]
    fn editor_printer_hands_whole_lines_to_the_editor() {
        let external = FakeExternal::default();
        let feed = Feed::start(external.clone()).unwrap();
        let mut printer = EditorPrinter {
            feed: feed.clone(),
            stderr_is_terminal: true,
        };
        printer.print_out("bob: hi").unwrap();
        printer.print_err("* note");
        crate::feed::tests::wait_below_within(&feed, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while external.0.lock().unwrap().len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "lines not handed over"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(*external.0.lock().unwrap(), ["bob: hi\n", "* note\n"]);
        // With standard error redirected, remarks go there instead.
        let mut printer = EditorPrinter {
            feed: feed.clone(),
            stderr_is_terminal: false,
        };
        printer.print_err("* to the log");
        assert!(printer.close().is_empty());
        assert_eq!(external.0.lock().unwrap().len(), 2);
    }

    /// An editor printer let go (its screen dropped, or another printer set) closes its
    /// queue: the lines the editor has not taken are dropped, and nothing more is queued.
    #[test]
    fn an_editor_printer_let_go_closes_its_queue() {
        let (feed, _readline) = crate::feed::tests::one_slot_feed();
        let mut printer = EditorPrinter::new(feed.clone());
        // Nobody reads: the editor's slot and the line being handed over hold two at most.
        for seq in 1..=3 {
            printer.print_out(&format!("bob: {seq}")).unwrap();
        }
        drop(printer);
        feed.push("bob: late".into());
        assert_eq!(feed.close(), Vec::<String>::new());
    }

    /// When the room closes, the editor takes what was queued before it, and the closing
    /// lines follow; lines the editor did not take come back before them.
    #[test]
    fn closing_lines_come_after_every_line_queued_before_them() {
        let (feed, readline) = crate::feed::tests::one_slot_feed();
        let patience = std::time::Duration::from_secs(10);
        let mut screen = Screen::new("lobby", Box::new(PlainPrinter), false);
        screen.set_editor_printer(Box::new(EditorPrinter::new(feed.clone())));
        for seq in 1..=5 {
            let flow = screen
                .handle_datagram(&sequenced(seq, &seq.to_string()))
                .unwrap();
            assert_eq!(flow, Flow::Continue);
        }
        assert_eq!(
            screen.handle_datagram(delivery::ROOM_CLOSED).unwrap(),
            Flow::RoomClosed
        );
        // The editor reads two lines, then stops; draining gives up, the rest is taken.
        for seq in 1..=2 {
            assert_eq!(
                readline.recv_timeout(patience).unwrap(),
                format!("bob: {seq}\n")
            );
        }
        feed.drain(std::time::Duration::from_millis(50));
        let rest = screen.take_closing();
        // The editor, reading again, draws what the thread held for it (one line in its
        // slot, one being handed over); the thread then ends, and with it the channel.
        let mut after = Vec::new();
        while let Ok(line) = readline.recv_timeout(patience) {
            after.push(line.trim_end().to_owned());
        }
        after.extend(rest);
        assert_eq!(
            after,
            ["bob: 3", "bob: 4", "bob: 5", "* room lobby was closed"]
        );
    }

    #[test]
    fn a_closure_reaching_a_full_join_hold_is_kept_for_release() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), true);
        for seq in 1..=(MAX_HELD_DATAGRAMS as u64) {
            assert_eq!(
                screen.handle_datagram(&sequenced(seq, "x")).unwrap(),
                Flow::Continue
            );
        }
        assert_eq!(
            screen.handle_datagram(delivery::ROOM_CLOSED).unwrap(),
            Flow::Continue
        );
        assert_eq!(screen.release(None).unwrap(), Flow::RoomClosed);
        let lines = rec.lines();
        assert_eq!(lines.len(), MAX_HELD_DATAGRAMS + 1);
        assert!(lines[MAX_HELD_DATAGRAMS].contains("room lobby was closed"));
        // The same when the hold is full in bytes.
        let (rec, mut screen) = held_past_its_bytes();
        let flow = screen.handle_datagram(delivery::ROOM_CLOSED).unwrap();
        assert_eq!(flow, Flow::Continue);
        assert_eq!(screen.release(None).unwrap(), Flow::RoomClosed);
        assert!(rec
            .lines()
            .last()
            .unwrap()
            .contains("room lobby was closed"));
    }

    /// A closure kept apart from a full join hold waits, when a held datagram closes the
    /// room first, until that closure is settled; what followed the held one is kept
    /// meanwhile, and shows if it was forged, before the closure kept apart.
    #[test]
    fn a_closure_kept_apart_at_join_waits_behind_a_held_one() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), true);
        let before = MAX_HELD_DATAGRAMS as u64 - 2;
        for seq in 1..=before {
            assert_eq!(
                screen.handle_datagram(&sequenced(seq, "x")).unwrap(),
                Flow::Continue
            );
        }
        // The last two places of the hold, then a closure kept apart from the full hold.
        for datagram in [
            delivery::ROOM_CLOSED.to_vec(),
            sequenced(before + 1, "after"),
            delivery::ROOM_CLOSED.to_vec(),
        ] {
            assert_eq!(screen.handle_datagram(&datagram).unwrap(), Flow::Continue);
        }
        assert_eq!(screen.release(None).unwrap(), Flow::RoomClosed);
        let shown = rec.lines().len();
        assert_eq!(shown, MAX_HELD_DATAGRAMS - 1);
        assert_eq!(screen.reopen(Some("* forged")).unwrap(), Flow::RoomClosed);
        assert_eq!(
            rec.lines()[shown..],
            [
                "err: * forged",
                "out: bob: after",
                "out: * room lobby was closed"
            ]
        );
    }

    /// Reopening meets a held datagram that closes the room again: what came after it is
    /// held for the next verdict, and what came before it is not shown twice.
    #[test]
    fn a_closure_met_again_on_reopening_holds_what_followed_it() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), false);
        screen.defer_closing_lines();
        let closed = delivery::ROOM_CLOSED;
        assert_eq!(screen.handle_datagram(closed).unwrap(), Flow::RoomClosed);
        // A closure in a batch is held in its turn; a bare one is kept apart.
        let mut batch = Vec::new();
        delivery::begin_batch(&mut batch);
        delivery::push_batch_entry(closed, &mut batch).unwrap();
        for datagram in [
            sequenced(1, "one"),
            batch,
            closed.to_vec(),
            sequenced(2, "two"),
        ] {
            assert_eq!(screen.handle_datagram(&datagram).unwrap(), Flow::Continue);
        }
        assert_eq!(screen.reopen(None).unwrap(), Flow::RoomClosed);
        assert_eq!(rec.lines(), ["out: bob: one"]);
        assert_eq!(screen.reopen(Some("* forged")).unwrap(), Flow::Continue);
        assert_eq!(
            rec.lines(),
            ["out: bob: one", "err: * forged", "out: bob: two"]
        );
    }

    /// With `--original`, the screen reads a datagram beginning with a 0 byte as the chat of
    /// a member with an empty name, not as the notice that we were removed.
    #[test]
    fn an_original_screen_shows_a_leading_zero_as_chat() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), false);
        screen.original_frames_only();
        let removed = [0x00, 0x03, 0x03, 0x00];
        assert_eq!(screen.handle_datagram(&removed).unwrap(), Flow::Continue);
        assert_eq!(rec.lines(), ["out: \"\": \\u{3}\\u{3}\\u{0}"]);
    }

    /// The editor's queue is handed out, for the main loop to drain when the room closes;
    /// plain printing has none.
    #[test]
    fn the_screen_hands_out_the_editors_queue() {
        let mut screen = Screen::new("lobby", Box::new(PlainPrinter), false);
        assert!(screen.feed().is_none());
        let external = FakeExternal::default();
        let feed = Feed::start(external.clone()).unwrap();
        screen.set_editor_printer(Box::new(EditorPrinter::new(feed)));
        let given = screen.feed().expect("the editor's queue");
        given.push("bob: hi".into());
        crate::feed::tests::wait_below_within(&given, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while external.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "line not handed over");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(*external.0.lock().unwrap(), ["bob: hi\n"]);
    }

    #[test]
    fn holding_is_bounded() {
        let rec = Recorder::default();
        let mut screen = Screen::new("lobby", Box::new(rec.clone()), true);
        for seq in 1..=(MAX_HELD_DATAGRAMS as u64 + 5) {
            assert_eq!(
                screen.handle_datagram(&sequenced(seq, "x")).unwrap(),
                Flow::Continue
            );
        }
        assert_eq!(screen.release(None).unwrap(), Flow::Continue);
        assert_eq!(rec.lines().len(), MAX_HELD_DATAGRAMS);
        // In bytes too: datagrams of 65,000 bytes fill it after 16.
        let (rec, mut screen) = held_past_its_bytes();
        assert_eq!(screen.release(None).unwrap(), Flow::Continue);
        let kept = rec
            .lines()
            .iter()
            .filter(|l| l.starts_with("out: bob:"))
            .count();
        assert_eq!(
            kept,
            MAX_HELD_BYTES / sequenced(1, &"y".repeat(65_000)).len()
        );
    }
}
