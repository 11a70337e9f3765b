//! Standard error, written by a thread of its own: no other thread waits for a standard error
//! nobody reads.
//!
//! The client's remarks (`* joined ...`, notices, warnings) and its log lines go to standard
//! error. When that is a pipe whose reader stopped reading (`ocm join ... 2>&1 | program`,
//! the program stopped) and the pipe is full, a write to it blocks. The thread writing a
//! remark then stopped: the main loop at `* joined ...`, before it sent anything, while the
//! keepalive thread kept the member in the room, and the end of input went unheard.
//!
//! So every line is handed to a [`Queue`] of [`QUEUED_LINES`], which the *stderr writer*
//! thread writes in order:
//! - The hand-over waits for the line to be written, up to [`WRITE_THROUGH`]: a standard
//!   error that is read takes it at once, and the remarks keep their order with the chat
//!   lines on standard output (`2>&1`, a terminal) as when they were written directly.
//! - A wait that ends without the write marks standard error *stuck*: no hand-over waits
//!   until the writer has caught up with the queue.
//! - A line that finds the queue full is dropped and counted. Where lines went missing, the
//!   writer says so once it can write again: `* N remarks not shown (standard error not
//!   read)`.
//! - At exit, `main` gives the writer [`EXIT_DRAIN`] to write what is queued ([`drain`]),
//!   so that the last `ocm: ...` line is not lost when standard error is read.
//!
//! The descriptor stays blocking: `O_NONBLOCK` would change its file description, which the
//! shell and the other programs of a pipeline share.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::locks;

/// Most lines waiting to be written; one more is dropped and counted.
pub const QUEUED_LINES: usize = 64;

/// How long a hand-over waits for its line to be written: far longer than a write to a
/// standard error that is read takes, even on a loaded machine, and short enough that a
/// stuck one costs the thread that found it out no more than a moment, once.
pub const WRITE_THROUGH: Duration = Duration::from_millis(100);

/// How long `main` waits, at exit, for the lines queued to be written.
pub const EXIT_DRAIN: Duration = Duration::from_millis(500);

/// Writes `line` and a newline to standard error through the [`Queue`] (see the module
/// docs): best effort, it waits no longer than [`WRITE_THROUGH`] for the line to be written
/// (and as long again, at most, for the queue's lock, should a thread hold it for good: see
/// `Queue::lock_within`), and a line that cannot be shown is dropped.
pub fn write_line(line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    write_bytes(bytes);
}

/// Waits up to `wait` for the lines queued to be written; whether they were.
pub fn drain(wait: Duration) -> bool {
    match STDERR.get() {
        Some(Some(queue)) => queue.drain(wait),
        // Nothing was ever queued, or written directly.
        _ => true,
    }
}

/// Where env_logger writes its lines (`Target::Pipe`): the [`Queue`], one record at a time
/// (env_logger hands each record over whole, in one write).
#[derive(Debug, Default)]
pub struct LogPipe;

impl Write for LogPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_bytes(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Standard error's queue, started on first use; `None` when its thread could not start.
static STDERR: OnceLock<Option<Arc<Queue>>> = OnceLock::new();

fn write_bytes(bytes: Vec<u8>) {
    let queue = STDERR.get_or_init(|| Queue::start(io::stderr(), WRITE_THROUGH).ok());
    match queue {
        Some(queue) => queue.write(bytes),
        // No thread: written here, as before there was one.
        None => {
            let _ = io::stderr().write_all(&bytes);
        }
    }
}

/// What the writer has to write.
#[derive(Debug)]
enum Entry {
    /// A line (or a log record), with its number.
    Line(u64, Vec<u8>),
    /// So many lines dropped here, the queue being full.
    NotShown(u64),
}

/// The line said in place of `count` lines dropped.
fn not_shown(count: u64) -> String {
    let remarks = if count == 1 { "remark" } else { "remarks" };
    format!("* {count} {remarks} not shown (standard error not read)\n")
}

/// What the hand-overs and the writer share. Dropped lines take no place among the lines
/// queued: a count follows them, one per run of drops.
#[derive(Debug, Default)]
struct State {
    entries: VecDeque<Entry>,
    /// The [`Entry::Line`]s in `entries`.
    lines: usize,
    /// The number of the last line queued (lines are numbered from 1).
    queued: u64,
    /// The number of the last line the writer is done with (written, or failed).
    written: u64,
    /// The writer is writing an entry it took from the queue.
    writing: bool,
    /// A hand-over gave up waiting; cleared when the writer has emptied the queue.
    stuck: bool,
}

/// Lines for one writer thread (see the module docs).
#[derive(Debug)]
pub struct Queue {
    state: Mutex<State>,
    changed: Condvar,
    write_through: Duration,
}

impl Queue {
    /// Starts a writer thread writing to `out`; hand-overs wait up to `write_through`.
    pub fn start(
        mut out: impl Write + Send + 'static,
        write_through: Duration,
    ) -> io::Result<Arc<Queue>> {
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            changed: Condvar::new(),
            write_through,
        });
        let writer = Arc::clone(&queue);
        crate::threads::spawn("stderr", move || writer.run(&mut out))?;
        Ok(queue)
    }

    /// Queues `bytes` and waits for them to be written, unless standard error is stuck
    /// (see the module docs).
    pub fn write(&self, bytes: Vec<u8>) {
        if let Some(number) = self.push(bytes) {
            self.wait_written(number);
        }
    }

    /// Waits up to `wait` for everything queued to be written; whether it was.
    pub fn drain(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let Some(mut state) = self.lock_within(wait) else {
            return false;
        };
        while !state.entries.is_empty() || state.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.wait(state, left);
        }
        true
    }

    /// Queues `bytes`; its number, or `None` when the queue is full and they were dropped
    /// (counted), or its lock could not be had within the write-through time (not counted:
    /// see [`Queue::lock_within`]).
    fn push(&self, bytes: Vec<u8>) -> Option<u64> {
        let mut state = self.lock_within(self.write_through)?;
        if state.lines >= QUEUED_LINES {
            match state.entries.back_mut() {
                Some(Entry::NotShown(count)) => *count += 1,
                _ => state.entries.push_back(Entry::NotShown(1)),
            }
            return None;
        }
        state.queued += 1;
        let number = state.queued;
        state.entries.push_back(Entry::Line(number, bytes));
        state.lines += 1;
        self.changed.notify_all();
        Some(number)
    }

    /// Waits until line `number` is written, up to the write-through time, unless standard
    /// error is stuck; a wait that ends without it marks it stuck.
    fn wait_written(&self, number: u64) {
        let deadline = Instant::now() + self.write_through;
        let Some(mut state) = self.lock_within(self.write_through) else {
            return;
        };
        while state.written < number && !state.stuck {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.stuck = true;
                return;
            }
            state = self.wait(state, left);
        }
    }

    /// The writer thread: writes the entries in order, for as long as the process lives.
    /// It logs nothing: its log lines would come back to it.
    fn run(&self, out: &mut dyn Write) {
        loop {
            let entry = {
                let mut state = self.lock();
                loop {
                    if let Some(entry) = state.entries.pop_front() {
                        if matches!(entry, Entry::Line(..)) {
                            state.lines -= 1;
                        }
                        state.writing = true;
                        break entry;
                    }
                    state = locks::wait(&self.changed, state);
                }
            };
            // A line that cannot be written (standard error closed) is dropped, as every
            // write to it is best effort.
            let _ = match &entry {
                Entry::Line(_, bytes) => out.write_all(bytes),
                Entry::NotShown(count) => out.write_all(not_shown(*count).as_bytes()),
            }
            .and_then(|()| out.flush());
            let mut state = self.lock();
            state.writing = false;
            if let Entry::Line(number, _) = entry {
                state.written = number;
            }
            if state.entries.is_empty() {
                state.stuck = false;
            }
            self.changed.notify_all();
        }
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>, wait: Duration) -> MutexGuard<'a, State> {
        locks::wait_timeout(&self.changed, state, wait)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        locks::lock(&self.state)
    }

    /// The lock, for a thread that must not wait for it longer than `within` (a hand-over, or
    /// the drain at exit): a thread stopped for good while it held it (the input thread,
    /// stopped by the terminal's Ctrl+Z in the middle of a remark, then killed from the
    /// shell, waits in its SIGTSTP handler for the process to end) must not keep the chat's
    /// last lines, or its exit, waiting with it. `None` once `within` has passed.
    fn lock_within(&self, within: Duration) -> Option<MutexGuard<'_, State>> {
        locks::lock_within(&self.state, within, LOCK_RETRY)
    }
}

/// How long [`Queue::lock_within`] waits between two tries: the lock is held for a few
/// instructions, as a rule (by the writer, between two lines).
const LOCK_RETRY: Duration = Duration::from_micros(50);

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Long enough that a test never sees it run out by chance, on any machine.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// Stands in for standard error: what was written, and how many more writes it takes
    /// before it stops taking any, as a reader that stopped reading (`usize::MAX`: all).
    #[derive(Clone)]
    struct Gate {
        written: Arc<Mutex<Vec<u8>>>,
        allowed: Arc<(Mutex<usize>, Condvar)>,
    }

    impl Gate {
        /// Takes `allowed` writes, then blocks.
        fn new(allowed: usize) -> Gate {
            Gate {
                written: Arc::default(),
                allowed: Arc::new((Mutex::new(allowed), Condvar::new())),
            }
        }

        fn let_through(&self, writes: usize) {
            let mut allowed = self.allowed.0.lock().unwrap();
            *allowed = allowed.saturating_add(writes);
            self.allowed.1.notify_all();
        }

        fn open(&self) {
            self.let_through(usize::MAX);
        }

        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.written.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_owned).collect()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (allowed, changed) = &*self.allowed;
            let mut allowed = allowed.lock().unwrap();
            while *allowed == 0 {
                allowed = changed.wait(allowed).unwrap();
            }
            if *allowed != usize::MAX {
                *allowed -= 1;
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(text: &str) -> Vec<u8> {
        format!("{text}\n").into_bytes()
    }

    /// Waits until the queue's state is as `wanted`.
    fn wait_for(queue: &Queue, what: &str, wanted: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !wanted(&queue.lock()) {
            assert!(Instant::now() < deadline, "{what}: {:?}", queue.lock());
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// A queue whose writer took a first line and is stuck on it, with `QUEUED_LINES`
    /// queued behind it.
    fn stuck_and_full() -> (Gate, Arc<Queue>) {
        let gate = Gate::new(0);
        let queue = Queue::start(gate.clone(), Duration::ZERO).unwrap();
        queue.write(line("* taken"));
        wait_for(&queue, "the writer taking the line", |s| s.writing);
        for i in 1..=QUEUED_LINES {
            queue.write(line(&format!("* queued {i}")));
        }
        (gate, queue)
    }

    fn taken_and_queued() -> Vec<String> {
        let mut lines = vec!["* taken".to_owned()];
        lines.extend((1..=QUEUED_LINES).map(|i| format!("* queued {i}")));
        lines
    }

    /// env_logger hands a record over with `write_all`, which writes again what a `write`
    /// says it did not take: the pipe says it took the whole record, or the record's tail
    /// would be queued again. (An empty record, so that nothing reaches the test's own
    /// standard error.)
    #[test]
    fn the_log_pipe_takes_a_record_whole() {
        assert_eq!(LogPipe.write(b"").unwrap(), 0);
    }

    /// Read at once, a line is written before its hand-over returns: remarks keep their
    /// place among the chat lines written to standard output after them.
    #[test]
    fn a_line_read_at_once_is_written_before_the_hand_over_returns() {
        let gate = Gate::new(usize::MAX);
        let queue = Queue::start(gate.clone(), PATIENCE).unwrap();
        queue.write(line("* one"));
        assert_eq!(gate.lines(), ["* one"]);
        assert!(!queue.lock().stuck, "the hand-over waited past the write");
        queue.write(line("* two"));
        assert_eq!(gate.lines(), ["* one", "* two"]);
        assert!(queue.drain(PATIENCE));
    }

    /// Stuck, a hand-over waits its time and marks it so; the next ones do not wait, until
    /// the writer has caught up.
    #[test]
    fn once_stuck_nobody_waits_until_the_writer_catches_up() {
        let gate = Gate::new(0);
        let write_through = Duration::from_millis(20);
        let queue = Queue::start(gate.clone(), write_through).unwrap();
        let began = Instant::now();
        queue.write(line("* first"));
        assert!(began.elapsed() >= write_through);
        assert!(queue.lock().stuck);

        // With all the time in the world to wait, a hand-over to a stuck writer takes none.
        let gate = Gate::new(0);
        let queue = Queue::start(gate.clone(), PATIENCE * 100).unwrap();
        queue.push(line("* first"));
        wait_for(&queue, "the writer taking the line", |s| s.writing);
        queue.lock().stuck = true;
        let (done, handed_over) = std::sync::mpsc::channel();
        let writer = Arc::clone(&queue);
        thread::spawn(move || {
            writer.write(line("* second"));
            let _ = done.send(());
        });
        assert_eq!(handed_over.recv_timeout(PATIENCE), Ok(()), "it waited");
        assert!(!queue.drain(Duration::ZERO));
        gate.open();
        assert!(queue.drain(PATIENCE));
        assert!(!queue.lock().stuck);
        assert_eq!(gate.lines(), ["* first", "* second"]);
    }

    /// A full queue drops lines and counts them; the writer says how many where they went
    /// missing, once it can write again, and the lines queued after them follow.
    #[test]
    fn a_full_queue_drops_lines_and_says_how_many_where_they_were() {
        let (gate, queue) = stuck_and_full();
        for i in 1..=3 {
            queue.write(line(&format!("* dropped {i}")));
        }
        assert!(!queue.drain(Duration::ZERO));
        gate.open();
        assert!(queue.drain(PATIENCE));
        let mut expected = taken_and_queued();
        expected.push("* 3 remarks not shown (standard error not read)".into());
        assert_eq!(gate.lines(), expected);
        queue.write(line("* after"));
        assert!(queue.drain(PATIENCE));
        expected.push("* after".into());
        assert_eq!(gate.lines(), expected);
    }

    /// Lines dropped at two moments are told apart, each after the lines queued before it.
    #[test]
    fn drops_at_two_moments_are_said_at_their_places() {
        let (gate, queue) = stuck_and_full();
        queue.write(line("* dropped"));
        // Two lines written; the writer is stuck on the third, and two places are free.
        gate.let_through(2);
        wait_for(&queue, "two places free", |s| {
            s.lines == QUEUED_LINES - 2 && s.writing
        });
        for text in ["* late 1", "* late 2", "* dropped too", "* dropped as well"] {
            queue.write(line(text));
        }
        gate.open();
        assert!(queue.drain(PATIENCE));
        let mut expected = taken_and_queued();
        expected.push("* 1 remark not shown (standard error not read)".into());
        expected.extend(["* late 1".into(), "* late 2".into()]);
        expected.push("* 2 remarks not shown (standard error not read)".into());
        assert_eq!(gate.lines(), expected);
    }

    /// A thread that holds the queue's lock for good (one stopped in a signal handler while
    /// it held it) keeps neither a hand-over nor the drain at exit waiting past their time;
    /// once it lets go, lines are written again.
    #[test]
    fn a_lock_held_for_good_holds_hand_overs_and_the_drain_no_longer_than_their_time() {
        let gate = Gate::new(usize::MAX);
        let queue = Queue::start(gate.clone(), Duration::from_millis(50)).unwrap();
        let (taken, is_taken) = std::sync::mpsc::channel();
        let (let_go, letting_go) = std::sync::mpsc::channel::<()>();
        let holder = {
            let queue = Arc::clone(&queue);
            thread::spawn(move || {
                let _state = queue.lock();
                taken.send(()).unwrap();
                let _ = letting_go.recv();
            })
        };
        is_taken.recv().unwrap();
        let (done, is_done) = std::sync::mpsc::channel();
        {
            let queue = Arc::clone(&queue);
            thread::spawn(move || {
                queue.write(line("* lost"));
                done.send(queue.drain(Duration::from_millis(50))).unwrap();
            });
        }
        let drained = is_done.recv_timeout(PATIENCE);
        drop(let_go);
        holder.join().unwrap();
        assert_eq!(drained, Ok(false), "the hand-over and the drain gave up");
        queue.write(line("* shown"));
        assert!(queue.drain(PATIENCE));
        assert_eq!(gate.lines(), ["* shown"]);
    }
}
