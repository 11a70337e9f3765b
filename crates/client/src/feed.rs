//! Lines on their way to the line editor, and the thread that hands them over.
//!
//! rustyline's external printer hands a line to `readline` through a channel that holds one
//! line while `readline` runs in raw mode; in the moment around Enter, as `readline` returns, a
//! line can wait there, and the next print waits for room for as long as the input thread then
//! takes to act on the line just entered. Whoever prints must therefore hold nothing the input
//! thread needs meanwhile: were the receiver to print under the screen's lock, the input
//! thread, acting on `/help`, would wait for that lock before `readline` could run again, and a
//! flood of messages would deadlock the two. So printing only queues ([`Feed::push`], which
//! never waits); a thread of its own hands the lines to the editor, and the receiver, holding
//! no lock, waits while too much is queued ([`Feed::wait_below`]). Memory stays bounded, and a
//! flood is slowed to what the terminal shows: the excess waits in the socket's receive buffer,
//! and what the kernel drops from it shows as lost messages.
//!
//! The same thread hands the editor a request to draw its line again ([`Feed::redraw`]), after
//! a stop it did not see: through the external printer, so that the editor's own thread draws,
//! between two keys, as it does for every line printed above its line.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::debug;
use rustyline::ExternalPrinter;

use crate::locks;

/// Bytes of queued lines past which the receiver waits for the editor to catch up.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;

/// What the external printer is handed to make the editor draw its prompt and line again.
/// rustyline prints a text above the line by clearing the line's rows, writing the text (and a
/// newline if it has none) and drawing the prompt and line after it: this text turns the
/// terminal's bracketed paste on again (as the editor does for each line it reads: a shell
/// may have turned it off meanwhile), then goes up a row and comes back down with its
/// newline, so the prompt is drawn where the line was, with no empty line above it (except on
/// a screen's top row, which has no row above). Written as is should the editor not be reading
/// (rustyline then prints straight to the terminal), it moves the cursor up and back only.
pub const REDRAW: &str = "\x1b[?2004h\x1b[A\n";

/// The queue of lines for the line editor; clones share it.
#[derive(Clone)]
pub struct Feed(Arc<Shared>);

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a line is queued or taken, and when the feed closes.
    changed: Condvar,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<String>,
    bytes: usize,
    closed: bool,
    /// The thread has taken a line and not yet handed it over.
    in_flight: bool,
    /// The editor is to draw its line again once the lines queued are handed over.
    redraw: bool,
}

/// What the thread hands the editor next.
enum Next {
    /// A line to print above the line being typed.
    Line(String),
    /// [`REDRAW`].
    Redraw,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        locks::lock(&self.queue)
    }

    /// The next line to print, or the redraw asked for once none is left, waiting for one;
    /// `None` once the feed is closed.
    fn next(&self) -> Option<Next> {
        let mut queue = self.lock();
        loop {
            if queue.closed {
                return None;
            }
            if let Some(line) = queue.lines.pop_front() {
                queue.bytes -= line.len();
                queue.in_flight = true;
                self.changed.notify_all();
                return Some(Next::Line(line));
            }
            if queue.redraw {
                queue.redraw = false;
                queue.in_flight = true;
                return Some(Next::Redraw);
            }
            queue = locks::wait(&self.changed, queue);
        }
    }
}

impl Feed {
    /// Starts the thread that hands queued lines to `printer`, one at a time, each with its
    /// newline, and [`REDRAW`] when asked.
    pub fn start<P: ExternalPrinter + Send + 'static>(mut printer: P) -> io::Result<Feed> {
        let shared = Arc::new(Shared::default());
        let feeder = Arc::clone(&shared);
        let feed = Feed(shared);
        let closer = feed.clone();
        crate::threads::spawn("printer", move || {
            while let Some(next) = feeder.next() {
                let printed = printer.print(match next {
                    Next::Line(line) => format!("{line}\n"),
                    Next::Redraw => REDRAW.to_owned(),
                });
                feeder.lock().in_flight = false;
                feeder.changed.notify_all();
                if let Err(e) = printed {
                    debug!("the line editor took no more lines: {e}");
                    closer.close();
                    return;
                }
            }
        })?;
        Ok(feed)
    }

    /// Queues a line; never waits. Dropped once the feed is closed.
    pub fn push(&self, line: String) {
        let mut queue = self.0.lock();
        if queue.closed {
            debug!("not shown, the line editor is gone: {line}");
            return;
        }
        queue.bytes += line.len();
        queue.lines.push_back(line);
        self.0.changed.notify_all();
    }

    /// Asks the editor to draw its prompt and line again ([`REDRAW`]), after the lines
    /// queued; never waits. Several requests before the thread takes one make one redraw.
    pub fn redraw(&self) {
        let mut queue = self.0.lock();
        if !queue.closed {
            queue.redraw = true;
            self.0.changed.notify_all();
        }
    }

    /// Waits while more than `bytes` are queued and the feed is open.
    pub fn wait_below(&self, bytes: usize) {
        let mut queue = self.0.lock();
        while !queue.closed && queue.bytes > bytes {
            queue = locks::wait(&self.0.changed, queue);
        }
    }

    /// Lets the editor take every queued line, for at most `within`. The line being handed
    /// over counts as queued, so once this returns with time to spare, no line reaches the
    /// editor after the caller has taken the rest ([`Feed::close`]) to print; past the
    /// deadline (the editor not reading), up to two lines (one handed over, one in the
    /// editor's slot) are drawn whenever the editor reads again, or not at all if the
    /// process ends first.
    pub fn drain(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut queue = self.0.lock();
        while !queue.closed && (!queue.lines.is_empty() || queue.in_flight) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            queue = locks::wait_timeout(&self.0.changed, queue, left);
        }
    }

    /// Closes the feed: the thread stops after the line it is printing, waiters go on, and
    /// the lines not yet handed over are returned, in order.
    pub fn close(&self) -> Vec<String> {
        let mut queue = self.0.lock();
        queue.closed = true;
        queue.bytes = 0;
        self.0.changed.notify_all();
        queue.lines.drain(..).collect()
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
    use std::thread;
    use std::time::Duration;

    /// Like rustyline's printer: a channel of one line, which only `readline` empties.
    struct OneSlot(SyncSender<String>);

    impl ExternalPrinter for OneSlot {
        fn print(&mut self, msg: String) -> rustyline::Result<()> {
            self.0
                .send(msg)
                .map_err(|_| io::Error::other("the editor is gone").into())
        }
    }

    const PATIENCE: Duration = Duration::from_secs(10);

    /// A feed into a [`OneSlot`] editor, and the editor's end: what `readline` would draw.
    pub fn one_slot_feed() -> (Feed, Receiver<String>) {
        let (tx, rx) = sync_channel(1);
        (Feed::start(OneSlot(tx)).unwrap(), rx)
    }

    /// How long [`wait_below_within`] waits: the thread takes a line from the queue in
    /// microseconds, and a broken feed that fails several tests this way still fails the
    /// suite well within the mutation run's 30 s (docs/SECURITY.md, "Mutation testing").
    const WAIT_PATIENCE: Duration = Duration::from_secs(3);

    /// [`Feed::wait_below`], failing the test instead of hanging when it does not return
    /// within [`WAIT_PATIENCE`] (a feed whose thread stopped taking lines, or that counts
    /// them wrong).
    pub fn wait_below_within(feed: &Feed, bytes: usize) {
        let (done, finished) = std::sync::mpsc::channel();
        let waiter = feed.clone();
        thread::spawn(move || {
            waiter.wait_below(bytes);
            let _ = done.send(());
        });
        assert_eq!(
            finished.recv_timeout(WAIT_PATIENCE),
            Ok(()),
            "still more than {bytes} bytes queued"
        );
    }

    #[test]
    fn pushing_never_waits_for_the_editor_and_lines_arrive_in_order() {
        let (feed, readline) = one_slot_feed();
        // Nobody reads: the thread holds one line in the slot and waits with a second.
        for i in 0..100 {
            feed.push(format!("line {i}"));
        }
        for i in 0..100 {
            assert_eq!(
                readline.recv_timeout(PATIENCE).unwrap(),
                format!("line {i}\n")
            );
        }
        assert_eq!(
            readline.recv_timeout(Duration::from_millis(50)),
            Err(RecvTimeoutError::Timeout)
        );
    }

    #[test]
    fn the_receiver_waits_while_too_much_is_queued_until_the_editor_reads() {
        let (feed, readline) = one_slot_feed();
        for i in 0..10 {
            feed.push(format!("line {i}"));
        }
        let (done, finished) = std::sync::mpsc::channel();
        let waiter = {
            let feed = feed.clone();
            thread::spawn(move || {
                feed.wait_below(0);
                let _ = done.send(());
            })
        };
        // Still queued: the waiter cannot have gone on.
        assert_eq!(readline.recv_timeout(PATIENCE).unwrap(), "line 0\n");
        assert!(!waiter.is_finished());
        for i in 1..10 {
            assert_eq!(
                readline.recv_timeout(PATIENCE).unwrap(),
                format!("line {i}\n")
            );
        }
        assert_eq!(finished.recv_timeout(WAIT_PATIENCE), Ok(()));
    }

    /// The receiver goes on while up to a mebibyte of lines is queued for an editor that
    /// does not read: a flood is slowed only past that.
    #[test]
    fn the_receiver_waits_only_past_a_mebibyte_queued() {
        assert_eq!(MAX_QUEUED_BYTES, 1_048_576);
        let (feed, _readline) = one_slot_feed();
        let kib = "k".repeat(1024);
        for _ in 0..1024 {
            feed.push(kib.clone());
        }
        wait_below_within(&feed, MAX_QUEUED_BYTES);
        assert!(feed.0.lock().bytes > MAX_QUEUED_BYTES - 3 * kib.len());
    }

    #[test]
    fn closing_returns_what_was_not_handed_over_and_releases_waiters() {
        let (feed, readline) = one_slot_feed();
        for i in 0..10 {
            feed.push(format!("line {i}"));
        }
        // The thread puts line 0 in the slot and waits to put line 1 there: 8 lines left.
        wait_below_within(&feed, 8 * "line 0".len());
        let (done, finished) = std::sync::mpsc::channel();
        {
            let feed = feed.clone();
            thread::spawn(move || {
                feed.wait_below(0);
                let _ = done.send(());
            });
        }
        let left = feed.close();
        assert_eq!(finished.recv_timeout(WAIT_PATIENCE), Ok(()));
        let expected: Vec<String> = (2..10).map(|i| format!("line {i}")).collect();
        assert_eq!(left, expected);
        // Closed: later lines are dropped.
        feed.push("after".into());
        assert!(feed.close().is_empty());
        assert_eq!(readline.recv_timeout(PATIENCE).unwrap(), "line 0\n");
    }

    /// Reads what the editor would draw, until nothing comes for a moment.
    fn drawn(readline: &Receiver<String>) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = readline.recv_timeout(Duration::from_millis(200)) {
            lines.push(line.trim_end().to_owned());
        }
        lines
    }

    #[test]
    fn draining_lets_a_reading_editor_take_every_line_first() {
        let (feed, readline) = one_slot_feed();
        let reader = thread::spawn(move || {
            (0..50)
                .map(|_| readline.recv_timeout(PATIENCE).unwrap())
                .collect::<Vec<_>>()
        });
        for i in 0..50 {
            feed.push(format!("line {i}"));
        }
        feed.drain(PATIENCE);
        assert!(feed.close().is_empty());
        let expected: Vec<String> = (0..50).map(|i| format!("line {i}\n")).collect();
        assert_eq!(reader.join().unwrap(), expected);
    }

    /// With the editor not reading, draining gives up at its deadline; the editor, reading
    /// later, gets what the thread held, and the caller the rest: every line once, in order.
    #[test]
    fn draining_gives_up_at_its_deadline_and_loses_nothing_once_the_editor_reads() {
        let (feed, readline) = one_slot_feed();
        let all: Vec<String> = (0..5).map(|i| format!("line {i}")).collect();
        for line in &all {
            feed.push(line.clone());
        }
        let started = std::time::Instant::now();
        feed.drain(Duration::from_millis(50));
        let left = feed.close();
        assert!(started.elapsed() < PATIENCE);
        let mut seen = drawn(&readline);
        seen.extend(left);
        assert_eq!(seen, all);
    }

    /// What is queued counts the lines not yet taken, byte for byte: a line taken by the
    /// thread no longer counts, even while the editor has not read it.
    #[test]
    fn queued_bytes_count_the_lines_not_yet_taken() {
        let (feed, readline) = one_slot_feed();
        for line in ["aaaa", "bb", "c"] {
            feed.push(line.into());
        }
        // Nobody reads: "aaaa" goes to the slot, "bb" is taken and waits for it.
        wait_below_within(&feed, 1);
        {
            let queue = feed.0.lock();
            assert_eq!(queue.bytes, "c".len());
            assert_eq!(queue.lines, ["c"]);
        }
        assert_eq!(readline.recv_timeout(PATIENCE).unwrap(), "aaaa\n");
        assert_eq!(readline.recv_timeout(PATIENCE).unwrap(), "bb\n");
        assert_eq!(readline.recv_timeout(PATIENCE).unwrap(), "c\n");
        feed.drain(PATIENCE);
        assert_eq!(feed.0.lock().bytes, 0);
    }

    /// Once the feed is closed, draining has nothing to wait for, even with a line still
    /// being handed to an editor that does not read.
    #[test]
    fn draining_a_closed_feed_returns_at_once() {
        let (feed, _readline) = one_slot_feed();
        feed.push("in the slot".into());
        feed.push("handed over".into());
        wait_below_within(&feed, 0);
        assert!(
            feed.0.lock().in_flight,
            "the second line waits for the slot"
        );
        assert!(feed.close().is_empty());
        let (done, finished) = std::sync::mpsc::channel();
        let drainer = feed.clone();
        thread::spawn(move || {
            drainer.drain(Duration::from_secs(3600));
            let _ = done.send(());
        });
        assert_eq!(finished.recv_timeout(WAIT_PATIENCE), Ok(()));
    }

    /// A redraw goes to the editor after the lines queued before it, once however often it
    /// was asked meanwhile, and again when asked again.
    #[test]
    fn a_redraw_follows_the_lines_queued_before_it_once() {
        let (feed, readline) = one_slot_feed();
        feed.push("in the slot".into());
        feed.push("handed over".into());
        wait_below_within(&feed, 0);
        feed.push("queued".into());
        feed.redraw();
        feed.redraw();
        assert_eq!(
            drawn_raw(&readline),
            ["in the slot\n", "handed over\n", "queued\n", REDRAW]
        );
        feed.redraw();
        assert_eq!(drawn_raw(&readline), [REDRAW]);
        assert!(feed.close().is_empty());
        feed.redraw();
        // Nothing comes: the thread has stopped (its printer dropped) or is stopping.
        assert!(readline.recv_timeout(Duration::from_millis(200)).is_err());
    }

    /// What the editor is handed, as handed, until nothing comes for a moment.
    fn drawn_raw(readline: &Receiver<String>) -> Vec<String> {
        readline
            .recv_timeout(PATIENCE)
            .into_iter()
            .chain(std::iter::from_fn(|| {
                readline.recv_timeout(Duration::from_millis(200)).ok()
            }))
            .collect()
    }

    #[test]
    fn an_editor_that_is_gone_closes_the_feed() {
        let (feed, readline) = one_slot_feed();
        drop(readline);
        feed.push("nobody reads this".into());
        // The thread's print fails and closes the feed, so waiters do not wait forever.
        let deadline = std::time::Instant::now() + PATIENCE;
        while !feed.0.lock().closed {
            assert!(std::time::Instant::now() < deadline, "the feed stayed open");
            thread::sleep(Duration::from_millis(5));
        }
        feed.push("later".into());
        wait_below_within(&feed, 0);
        assert!(feed.close().is_empty());
    }
}
