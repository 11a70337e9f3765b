//! The writer's and compactor's tests, down to a `kill -9` at any moment.

use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};

use mio::{Events, Poll, Token};
use rand::{RngExt, SeedableRng};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use super::statx::{identity_at, identity_of, link_count};
use super::writer::{
    append_durably, free_bytes, lay_space_ahead, open_journal, take_queued, After, JournalDeleted,
    JournalFile,
};
use super::*;
use crate::record::MemberRecord;
use crate::store::{self, JournalLine, State, SPACE_AHEAD_BYTES};

/// The environment variable that turns [`crash_child`] into the process to kill.
const CRASH_DIR_ENV: &str = "OCM_PERSIST_CRASH_DIR";
/// Every wait in these tests ends by then.
const PATIENCE: Duration = Duration::from_secs(20);

fn member(token: String) -> MemberRecord {
    MemberRecord {
        username: token.clone(),
        token,
        keepalive: None,
        caps: 0,
        max_datagram: None,
        joined_from: None,
    }
}

/// Record `n` of a deterministic history (`n` from 1): rooms are created, joined once,
/// and closed 14 records later, so the state stays small and compactions come often.
fn record(n: u64) -> Record {
    match n % 3 {
        1 => Record::CreateRoom {
            room: format!("r{n}"),
            host: member(format!("h{n}")),
            created_at: n as f64,
            listed: true,
            password_hash: None,
        },
        2 => Record::Join {
            room: format!("r{}", n - 1),
            member: member(format!("m{n}")),
        },
        _ => Record::CloseRoom {
            room: format!("r{}", n.saturating_sub(14)),
        },
    }
}

/// The state after records `1..=last`.
fn model(last: u64) -> State {
    let mut state = State::default();
    (1..=last).for_each(|n| state.apply(&record(n)));
    state
}

fn assert_holds_exactly(loaded: &Loaded, last: u64) {
    let expected = model(last);
    assert_eq!(
        loaded.state.rooms, expected.rooms,
        "rooms after record {last}"
    );
    assert_eq!(loaded.state.tokens, expected.tokens, "tokens after {last}");
}

/// Loads the files and checks that they hold the history exactly: the journals (old one
/// first) carry every record above the state file's `journal_seq`, none missing, and the
/// loaded state is the history's up to the last of them. (The history's state forgets
/// old rooms, so a lost old record would not show in it.)
///
/// A writer still running may rotate the journal and compact it behind its last commit
/// (after the commit's reply), between the reads of one file and the next: the load and the
/// walk are done again until the files are the same before and after them.
fn load_complete(paths: &Paths) -> Loaded {
    let files = || [&paths.state, &paths.journal_old, &paths.journal].map(|p| fs::read(p).ok());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let before = files();
        let loaded = store::load(paths);
        let walked = last_in_order(paths);
        if files() == before {
            let loaded = loaded.unwrap();
            assert_eq!(loaded.last_seq, walked.unwrap());
            assert_holds_exactly(&loaded, loaded.last_seq);
            return loaded;
        }
        assert!(Instant::now() < deadline, "the files never held still");
    }
}

/// The last record the journals carry above the state file's `journal_seq`, or which one is
/// missing.
fn last_in_order(paths: &Paths) -> Result<u64, String> {
    let snapshot_seq =
        fs::read(&paths.state).map_or(0, |bytes| store::parse_state(&bytes).unwrap().journal_seq);
    let mut next = snapshot_seq + 1;
    for path in [&paths.journal_old, &paths.journal] {
        let Ok(bytes) = fs::read(path) else { continue };
        for n in store::parse_journal(&bytes)
            .unwrap()
            .records
            .iter()
            .map(|e| e.n)
        {
            if n > snapshot_seq {
                if n != next {
                    return Err(format!("{}: record {next} missing", path.display()));
                }
                next += 1;
            }
        }
    }
    Ok(next - 1)
}

/// A persister driven the way the event loop drives it.
struct Driver {
    poll: Poll,
    events: Events,
    persister: Persister,
    paths: Paths,
    next_n: u64,
}

impl Driver {
    fn start(dir: &Path, options: Options) -> Driver {
        let paths = Paths::new(&dir.join("s.json"));
        let loaded = store::load(&paths).unwrap();
        let next_n = loaded.last_seq + 1;
        let (poll, waker) = poll_and_waker();
        let persister = Persister::start_with(paths.clone(), loaded, options, waker).unwrap();
        Driver {
            poll,
            events: Events::with_capacity(8),
            persister,
            paths,
            next_n,
        }
    }

    /// Writes the next `count` records of the history and waits until they are durable;
    /// returns the last one's number.
    fn write(&mut self, count: u64) -> u64 {
        let records = (self.next_n..self.next_n + count).map(record).collect();
        self.next_n += count;
        let batch = self.hand_over(records);
        self.wait("the batch to be durable", |p| p.durable() >= batch);
        self.next_n - 1
    }

    /// Submits `records` and hands them to the writer without waiting; returns their batch.
    fn hand_over(&mut self, records: Vec<Record>) -> u64 {
        let batch = self.persister.submit(records);
        self.persister.pump();
        batch
    }

    fn wait(&mut self, what: &str, mut condition: impl FnMut(&mut Persister) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.persister.poll_done();
            if condition(&mut self.persister) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            crate::test_shared::woken_or_interrupted(
                self.poll
                    .poll(&mut self.events, Some(Duration::from_millis(50))),
            )
            .unwrap();
        }
    }
}

fn tiny(bytes: u64) -> Options {
    Options {
        compact_journal_bytes: bytes,
        compact_retry: Duration::from_millis(20),
    }
}

/// [`tiny`], with a failed compaction or rotation not tried again for an hour.
fn tiny_retried_late(bytes: u64) -> Options {
    Options {
        compact_retry: Duration::from_secs(3600),
        ..tiny(bytes)
    }
}

/// A temporary directory and the state's paths in it (`s.json` and its journals).
fn temp_paths() -> (tempfile::TempDir, Paths) {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(&dir.path().join("s.json"));
    (dir, paths)
}

/// A temporary directory and a [`Driver`] started on state files in it.
fn temp_driver(options: Options) -> (tempfile::TempDir, Driver) {
    let dir = tempfile::tempdir().unwrap();
    let driver = Driver::start(dir.path(), options);
    (dir, driver)
}

/// A temporary directory and an empty `state` directory in it, for the state's files, that
/// a test can remove or move.
fn temp_state_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    fs::create_dir(&state_dir).unwrap();
    (dir, state_dir)
}

/// Removes `state_dir` from under the running writer and waits until it failed to open a
/// fresh journal there.
fn remove_state_dir(d: &mut Driver, state_dir: &Path) {
    fs::remove_dir_all(state_dir).unwrap();
    d.wait("a failed try to open a fresh journal", |p| {
        p.compactions().write_failures > 0
    });
}

/// Puts a directory at the state file's temporary name in `dir`, so that every snapshot
/// fails until it is removed; returns its path.
fn block_snapshots(dir: &Path) -> PathBuf {
    let blocker = dir.join("s.json.tmp");
    fs::create_dir(&blocker).unwrap();
    blocker
}

/// A poll and a waker registered with it, as the event loop hands the persister.
fn poll_and_waker() -> (Poll, Arc<mio::Waker>) {
    let poll = Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), Token(0)).unwrap());
    (poll, waker)
}

/// Writes `state` to the state file on `paths`, saved now.
fn write_state_file(paths: &Paths, mut state: State) {
    store::write_atomic(
        &paths.state,
        &state.to_file_bytes(SystemTime::now()).unwrap(),
    )
    .unwrap();
}

/// The journal lines of records `numbers` of the history, as the writer appends them.
fn journal_lines(numbers: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for n in numbers {
        let record = record(n);
        serde_json::to_writer(&mut out, &JournalLine { n, record: &record }).unwrap();
        out.push(b'\n');
    }
    out
}

/// The journal's bytes before the space written ahead of its appends.
fn journal_len(paths: &Paths) -> u64 {
    let bytes = fs::read(&paths.journal).unwrap_or_default();
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last as u64 + 1)
}

/// A journal in memory whose writes, fsyncs and cuts fail as scripted: `faults` holds
/// one entry per call, in order (`true` fails it), and calls past its end work. A failed
/// write writes the first half of its bytes, as a short write before ENOSPC would.
#[derive(Default)]
struct FlakyJournal {
    bytes: Vec<u8>,
    faults: std::collections::VecDeque<bool>,
    calls: Vec<&'static str>,
    /// The file lost its name: syncs work, and `linked` says so.
    deleted: bool,
    /// How many more times `linked` cannot look (`statx` and `fstat` both failing).
    look_fails: u32,
}

impl FlakyJournal {
    /// A journal holding `bytes` whose writes, fsyncs and cuts fail as `faults` says.
    fn scripted(bytes: Vec<u8>, faults: &[bool]) -> FlakyJournal {
        FlakyJournal {
            bytes,
            faults: faults.iter().copied().collect(),
            ..FlakyJournal::default()
        }
    }

    fn fails(&mut self, call: &'static str) -> io::Result<()> {
        self.calls.push(call);
        if self.faults.pop_front().unwrap_or(false) {
            return Err(io::Error::other(format!("injected {call} failure")));
        }
        Ok(())
    }

    /// Writes `bytes` at `offset`, over what is there and past the end, as `pwrite` does.
    fn put(&mut self, bytes: &[u8], offset: u64) {
        let at = offset as usize;
        if self.bytes.len() < at + bytes.len() {
            self.bytes.resize(at + bytes.len(), 0);
        }
        self.bytes[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

impl JournalFile for FlakyJournal {
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        if let Err(e) = self.fails("write") {
            self.put(&bytes[..bytes.len() / 2], offset);
            return Err(e);
        }
        self.put(bytes, offset);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.fails("sync")
    }
    fn linked(&mut self) -> io::Result<bool> {
        if self.look_fails > 0 {
            self.look_fails -= 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(!self.deleted)
    }
    fn cut(&mut self, len: u64) -> io::Result<()> {
        self.fails("cut")?;
        self.bytes.truncate(len as usize);
        Ok(())
    }
}

/// [`append_durably`] of `bytes` at `offset` of `journal`, retrying at once, counting into
/// `stats`.
fn append_now(
    journal: &mut FlakyJournal,
    offset: u64,
    bytes: &[u8],
    stats: &Mutex<Compactions>,
) -> Result<bool, JournalDeleted> {
    append_durably(
        journal,
        offset,
        bytes,
        Duration::ZERO,
        Path::new("journal"),
        stats,
    )
}

#[test]
fn a_failed_append_leaves_no_fragment_whatever_fails_and_how_often() {
    let whole = b"{\"n\":1}\n".to_vec();
    let line = b"{\"n\":2,\"record\":\"x\"}\n".to_vec();
    let cases: [(&[bool], &[&str]); 7] = [
        (&[], &["write", "sync"]),
        // A short write, then everything works.
        (&[true], &["write", "cut", "write", "sync"]),
        // The line was written whole but not synced: it is cut and written once more.
        (&[false, true], &["write", "sync", "cut", "write", "sync"]),
        // The cut fails once: it is retried before anything is appended.
        (&[true, true], &["write", "cut", "cut", "write", "sync"]),
        // The cut fails twice: nothing is appended until it worked.
        (
            &[true, true, true],
            &["write", "cut", "cut", "cut", "write", "sync"],
        ),
        // The line was written whole, its fsync failed, and so did the first cut.
        (
            &[false, true, true],
            &["write", "sync", "cut", "cut", "write", "sync"],
        ),
        // Two failed appends in a row, each cut back.
        (
            &[true, false, true, false],
            &["write", "cut", "write", "cut", "write", "sync"],
        ),
    ];
    // The journal has space laid down ahead of its appends.
    let ahead = 64;
    for (faults, calls) in cases {
        let mut journal =
            FlakyJournal::scripted([whole.as_slice(), &vec![0; ahead]].concat(), faults);
        let stats = Mutex::default();
        let cut = append_now(&mut journal, whole.len() as u64, &line, &stats).unwrap();
        assert_eq!(journal.calls, calls, "faults {faults:?}");
        // Every failed call is counted for the metrics, as it happens.
        let failed = faults.iter().filter(|&&f| f).count() as u64;
        assert_eq!(
            stats.lock().unwrap().write_failures,
            failed,
            "faults {faults:?}"
        );
        assert_eq!(cut, calls.contains(&"cut"), "faults {faults:?}");
        let expected = [whole.as_slice(), line.as_slice()].concat();
        let data_end = journal.bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
        assert_eq!(
            String::from_utf8_lossy(&journal.bytes[..data_end]),
            String::from_utf8_lossy(&expected),
            "faults {faults:?}: the journal must hold its old lines and the new one once"
        );
        // Written into the space ahead, which is left as it was after it; a cut drops it.
        let len = if cut {
            expected.len()
        } else {
            whole.len() + ahead
        };
        assert_eq!(journal.bytes.len(), len, "faults {faults:?}");
    }
}

/// The log of a failed append and of failed cuts after it: each said once when it begins,
/// and each end said with its own tally, so that the two tallies add up to what
/// `ocm_state_write_failures_total` counted. The appends' tally alone said "1 failed attempt"
/// where the counter said 10, the cut's failures untold (found by an operator's review).
#[test]
fn failed_cuts_are_told_apart_from_the_append_and_their_tallies_add_up_to_the_counter() {
    let whole = b"{\"n\":1}\n".to_vec();
    let line = b"{\"n\":2}\n".to_vec();
    // The write fails, then three cuts, then everything works.
    let mut journal = FlakyJournal::scripted(whole.clone(), &[true, true, true, true]);
    let stats = Mutex::default();
    let lines = crate::test_log::logged(|| {
        append_now(&mut journal, whole.len() as u64, &line, &stats).unwrap();
    });
    assert_eq!(stats.lock().unwrap().write_failures, 4);
    let said: Vec<(log::Level, &str)> = lines
        .iter()
        .map(|(level, text)| (*level, text.split(':').next().unwrap_or("")))
        .collect();
    assert_eq!(
        said,
        [
            (log::Level::Error, "cannot append to journal journal"),
            (
                log::Level::Error,
                "cannot cut journal journal back to its last whole line"
            ),
            (
                log::Level::Warn,
                "journal journal can be cut back again, after 3 failed attempts over 0 s"
            ),
            (
                log::Level::Warn,
                "journal journal takes writes again, after 1 failed attempt over 0 s"
            ),
        ],
        "{lines:?}"
    );
}

/// An append larger than [`store::MAX_UNSYNCED_BYTES`] is written and synced piece by
/// piece, and a failure in a later piece cuts back only to the end of the pieces before it.
#[test]
fn a_large_append_is_synced_piece_by_piece() {
    let line = |n: usize| format!("{{\"n\":{n},\"pad\":\"{}\"}}\n", "x".repeat(200));
    let bytes: Vec<u8> = (1..=700).flat_map(|n| line(n).into_bytes()).collect();
    let pieces: Vec<&[u8]> = store::sync_pieces(&bytes).collect();
    assert!(pieces.len() >= 3, "{} pieces", pieces.len());
    // The second piece's fsync fails once.
    let mut journal = FlakyJournal::scripted(Vec::new(), &[false, false, false, true]);
    let stats = Mutex::default();
    let cut = append_now(&mut journal, 0, &bytes, &stats).unwrap();
    assert!(cut);
    assert_eq!(stats.lock().unwrap().write_failures, 1);
    let mut expected = vec!["write", "sync", "write", "sync", "cut", "write", "sync"];
    for _ in 2..pieces.len() {
        expected.extend(["write", "sync"]);
    }
    assert_eq!(journal.calls, expected);
    assert_eq!(journal.bytes, bytes, "every line once, in order");
}

/// The real journal file: an append goes into the space laid down ahead, which keeps the
/// file's size, and a cut drops the fragment with the space ahead.
#[test]
fn the_journal_file_writes_into_its_space_ahead_and_a_cut_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let mut journal = open_journal(&path).unwrap();
    lay_space_ahead(&journal, 0, 100_000).unwrap();
    journal.write_at(b"whole\n", 0).unwrap();
    journal.sync().unwrap();
    let bytes = fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 100_000, "the size is the space laid down");
    assert_eq!(&bytes[..6], b"whole\n");
    assert!(bytes[6..].iter().all(|&b| b == 0));
    journal.write_at(b"fragm", 6).unwrap();
    journal.cut(6).unwrap();
    journal.write_at(b"next\n", 6).unwrap();
    journal.sync().unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"whole\nnext\n");
}

/// After each commit the writer keeps space laid down ahead of its appends, and the journal
/// with it loads as the records alone: no torn tail, no hole.
#[test]
fn the_writer_keeps_space_ahead_of_its_appends_and_it_loads_as_no_tear() {
    let (_dir, mut d) = temp_driver(Options::default());
    let last = d.write(3);
    let deadline = Instant::now() + PATIENCE;
    let ahead = || {
        let size = fs::metadata(&d.paths.journal).map_or(0, |m| m.len());
        size.saturating_sub(journal_len(&d.paths))
    };
    // The whole of it: it is written 64 KiB at a time, so a size read while it is being laid
    // grows again after.
    while ahead() < SPACE_AHEAD_BYTES {
        assert!(
            Instant::now() < deadline,
            "no space laid down ahead: {} bytes",
            ahead()
        );
        thread::sleep(Duration::from_millis(5));
    }
    // Appends go into it: the file keeps its size.
    let size = fs::metadata(&d.paths.journal).unwrap().len();
    let last = last.max(d.write(2));
    assert_eq!(fs::metadata(&d.paths.journal).unwrap().len(), size);
    let replay = store::parse_journal(&fs::read(&d.paths.journal).unwrap()).unwrap();
    assert_eq!(replay.records.len(), 5);
    assert!(!replay.torn_tail);
    assert_eq!(replay.zero_hole, None);
    let loaded = load_complete(&d.paths);
    assert_eq!(loaded.last_seq, last);
    assert!(!loaded.torn_tail);
    assert_eq!(loaded.journal_data_bytes, journal_len(&d.paths));
}

/// A fold gives the space laid down ahead back before it writes the state file: on a full
/// disk that space (up to 1.25 MiB, the daemon's own) may be all the room the state file
/// needs. Here the fold fails anyway (a directory stands in the state file's place), and the
/// journal is left with its records and without the space.
#[test]
fn a_fold_gives_back_the_space_ahead_before_it_writes_the_state_file() {
    let (_dir, mut d) = temp_driver(Options::default());
    let last = d.write(3);
    let deadline = Instant::now() + PATIENCE;
    while fs::metadata(&d.paths.journal).map_or(0, |m| m.len()) < SPACE_AHEAD_BYTES {
        assert!(Instant::now() < deadline, "no space laid down ahead");
        thread::sleep(Duration::from_millis(5));
    }
    fs::create_dir(&d.paths.state).unwrap();
    assert_eq!(d.persister.shutdown(), Stopped::Unfolded);
    assert_eq!(
        fs::metadata(&d.paths.journal).unwrap().len(),
        journal_len(&d.paths),
        "the space ahead was kept through the fold"
    );
    fs::remove_dir(&d.paths.state).unwrap();
    assert_eq!(load_complete(&d.paths).last_seq, last);
}

/// Once the appends have used the space laid down ahead up to its last quarter, more is laid
/// after it: it is kept ahead however far the journal grows, not laid once.
#[test]
fn the_space_ahead_is_laid_again_once_the_appends_have_used_it() {
    let (_dir, mut d) = temp_driver(Options::default());
    d.write(1);
    // Past the first space laid: the appends alone grow the journal beyond it.
    while journal_len(&d.paths) < SPACE_AHEAD_BYTES + SPACE_AHEAD_BYTES / 2 {
        d.write(2000);
    }
    // The space is laid after a commit's replies: the next commit comes after it (and
    // takes a little of it, so the check leaves room for that).
    d.write(1);
    let size = fs::metadata(&d.paths.journal).unwrap().len();
    let ahead = size - journal_len(&d.paths);
    assert!(ahead >= SPACE_AHEAD_BYTES / 8, "{ahead} bytes ahead");
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert_eq!(load_complete(&d.paths).replayed, 0);
}

/// A journal holding nothing but space laid down ahead (a stop right after a rotation, or a
/// fold): nothing to fold, so no state file is written at the start, and the appends go into
/// it from its first byte.
#[test]
fn a_journal_of_nothing_but_space_ahead_is_not_folded_and_is_written_from_its_start() {
    let (dir, paths) = temp_paths();
    fs::write(&paths.journal, vec![0; 4096]).unwrap();
    let mut d = Driver::start(dir.path(), Options::default());
    assert!(!paths.state.exists(), "no fold");
    let last = d.write(2);
    let bytes = fs::read(&paths.journal).unwrap();
    assert!(
        bytes.starts_with(b"{\"n\":1,"),
        "{:?}",
        String::from_utf8_lossy(&bytes[..40])
    );
    assert_eq!(load_complete(&paths).last_seq, last);
}

#[test]
fn the_writer_takes_every_queued_batch_in_one_write_and_stops_at_a_shutdown() {
    let leave = |t: &str| Record::Leave { token: t.into() };
    let (tx, rx) = mpsc::channel();
    for (batch, token) in [(2, "b"), (3, "c")] {
        let records = vec![leave(token)];
        tx.send(Command::Append { batch, records }).unwrap();
    }
    tx.send(Command::Shutdown).unwrap();
    tx.send(Command::Append {
        batch: 4,
        records: vec![leave("d")],
    })
    .unwrap();

    let (last, records, stop) = take_queued(&rx, 1, vec![leave("a")]);
    assert_eq!((last, stop), (3, After::Shutdown));
    let tokens: Vec<&str> = records
        .iter()
        .map(|r| match r {
            Record::Leave { token } => token.as_str(),
            _ => "?",
        })
        .collect();
    assert_eq!(
        tokens,
        ["a", "b", "c"],
        "in order, nothing after the shutdown"
    );

    assert!(
        matches!(rx.try_recv(), Ok(Command::Append { batch: 4, .. })),
        "what follows the shutdown stays queued"
    );
}

/// A backup asked for behind batches ends their group: it is carried out once they are
/// durable, and the batches queued behind it wait for the next group.
#[test]
fn a_backup_queued_behind_batches_ends_their_group() {
    let leave = |t: &str| Record::Leave { token: t.into() };
    let (tx, rx) = mpsc::channel();
    tx.send(Command::Append {
        batch: 2,
        records: vec![leave("b")],
    })
    .unwrap();
    tx.send(Command::Backup).unwrap();
    tx.send(Command::Append {
        batch: 3,
        records: vec![leave("c")],
    })
    .unwrap();

    let (last, records, after) = take_queued(&rx, 1, vec![leave("a")]);
    assert_eq!((last, records.len(), after), (2, 2, After::Backup));
    assert!(
        matches!(rx.try_recv(), Ok(Command::Append { batch: 3, .. })),
        "what follows the backup stays queued"
    );
}

/// A backlog (after a stalled disk) goes out in groups of bounded size, whole batches each:
/// the batch that brings a group to the cap is the group's last.
#[test]
fn group_commit_takes_whole_batches_up_to_its_cap() {
    use super::writer::MAX_GROUP_RECORDS;
    let leaves = |n: usize| -> Vec<Record> {
        (0..n)
            .map(|i| Record::Leave {
                token: format!("t{i}"),
            })
            .collect()
    };
    let (tx, rx) = mpsc::channel();
    let third = MAX_GROUP_RECORDS / 3 + 1;
    for batch in 2..=5 {
        tx.send(Command::Append {
            batch,
            records: leaves(third),
        })
        .unwrap();
    }
    let (last, records, stop) = take_queued(&rx, 1, leaves(third));
    assert_eq!((last, records.len(), stop), (3, 3 * third, After::Nothing));
    // The writer's next receive, as in `Writer::run`.
    let Ok(Command::Append { batch, records }) = rx.recv() else {
        panic!("batch 4 stays queued")
    };
    assert_eq!(batch, 4);
    let (last, records, _) = take_queued(&rx, batch, records);
    assert_eq!(
        (last, records.len()),
        (5, 2 * third),
        "the rest in the next group"
    );
}

#[test]
fn batches_handed_over_without_waiting_become_durable_in_order_and_none_early() {
    let (_dir, mut d) = temp_driver(Options::default());
    let mut last_batch = 0;
    for _ in 0..50 {
        let records = vec![record(d.next_n)];
        d.next_n += 1;
        last_batch = d.hand_over(records);
    }
    assert_eq!(last_batch, 50, "each pump hands over its own batch");
    assert!(d.persister.busy());
    let (mut reported, mut records) = (Vec::new(), 0);
    let deadline = Instant::now() + PATIENCE;
    while d.persister.durable() < last_batch {
        assert!(Instant::now() < deadline, "timed out: {reported:?}");
        for done in d.persister.poll_done() {
            reported.push(done.batch);
            records += done.records;
        }
        crate::test_shared::woken_or_interrupted(
            d.poll.poll(&mut d.events, Some(Duration::from_millis(50))),
        )
        .unwrap();
    }
    // However the writer grouped them, every report names a later batch than the one
    // before, none names a batch it was not given, and the records add up.
    assert!(reported.windows(2).all(|w| w[0] < w[1]), "{reported:?}");
    assert_eq!(reported.last(), Some(&last_batch));
    assert_eq!(records, 50, "{reported:?}");
    assert!(!d.persister.busy());
    let last_n = d.next_n - 1;
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert_eq!(load_complete(&d.paths).state.journal_seq, last_n);
}

#[test]
fn durable_records_reach_the_compactor_in_full_lots_and_all_of_them_at_shutdown() {
    let (_dir, paths) = temp_paths();
    let mut writer = writer_by_hand(&paths);
    let durable = |writer: &mut Writer, numbers: std::ops::RangeInclusive<u64>| {
        let records: Vec<Record> = numbers.map(record).collect();
        writer.append(&records);
        writer.forward(records);
    };
    let lot = APPLY_LOT as u64;
    durable(&mut writer, 1..=lot - 2);
    assert_eq!(writer.unapplied(), APPLY_LOT - 2, "short of a lot: kept");
    durable(&mut writer, lot - 1..=lot + 1);
    assert_eq!(writer.unapplied(), 0, "a full lot goes over at once");
    durable(&mut writer, lot + 2..=lot + 4);
    assert_eq!(writer.unapplied(), 3);
    // The final state file comes from the compactor's state: it holds the lot (most of
    // the rooms still open were created in it) and the three records kept back.
    assert!(writer.finish(), "folded");
    let loaded = load_complete(&paths);
    assert_eq!(loaded.state.journal_seq, lot + 4);
    assert_eq!(loaded.replayed, 0);
}

/// A writer on `paths` driven by hand (no thread): appends, rotations and the final fold
/// happen when the test calls them.
fn writer_by_hand(paths: &Paths) -> Writer {
    writer_and_stats(paths).0
}

/// Appends the records `numbers` to the journal and collects them for the compactor, as a
/// commit does.
fn journal(writer: &mut Writer, numbers: std::ops::RangeInclusive<u64>) {
    let records: Vec<Record> = numbers.map(record).collect();
    writer.append(&records);
    writer.forward(records);
}

/// [`writer_by_hand`], with the counters it reports to.
fn writer_and_stats(paths: &Paths) -> (Writer, Arc<Mutex<Compactions>>) {
    let (_poll, waker) = poll_and_waker();
    let loaded = store::load(paths).unwrap();
    let stats = Arc::new(Mutex::new(Compactions::default()));
    let writer = Writer::open(
        paths.clone(),
        loaded,
        Options::default(),
        Arc::clone(&stats),
        waker,
    )
    .unwrap();
    (writer, stats)
}

/// A lay of the space ahead that fails (here a disk that stays full for ten minutes of
/// commits, ten a second) is tried again at doubling intervals up to a minute, not at every
/// commit a second after the last: 1 MiB of writes and a log line a second on a full disk
/// buy nothing. Appends go on meanwhile, past the journal's end, and once the file system has
/// room again the space is laid within a second, without waiting out the backoff.
#[test]
fn a_failed_lay_of_the_space_ahead_backs_off_while_appends_go_on() {
    let (_dir, paths) = temp_paths();
    let mut writer = writer_by_hand(&paths);
    let start = Instant::now();
    let tenth = |i: u64| start + Duration::from_millis(100 * i);
    let mut tries = Vec::new();
    let mut last = 0;
    for i in 0..6000 {
        if i % 50 == 0 {
            last += 1;
            writer.append(&[record(last)]);
        }
        writer.keep_space_ahead_at(
            tenth(i),
            |_, _, _| {
                tries.push(i);
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            },
            |_| Ok(0),
        );
    }
    // Doubling from a second up to a minute: at 0, 1, 3, 7, 15, 31 and 63 s, then once a
    // minute (123 s, …, 543 s).
    let gaps: Vec<u64> = tries.windows(2).map(|w| (w[1] - w[0]) / 10).collect();
    assert_eq!(
        gaps,
        [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60, 60, 60],
        "seconds between the tries to lay the space ahead on a full disk"
    );
    // Every append was durable meanwhile, past the journal's end.
    assert_eq!(load_complete(&paths).last_seq, last);
    // What the writer asks of the real file system: its free space, here at least the room
    // for a lay (other tests lay the space ahead on it).
    let journal = fs::File::open(&paths.journal).unwrap();
    assert!(
        free_bytes(&journal).unwrap() >= SPACE_AHEAD_BYTES,
        "a file system with no room for a lay"
    );
    // The disk frees: the space is laid at the next commit a second on, though the backoff
    // had most of a minute left.
    let mut laid_at = None;
    for i in 6000..6020 {
        writer.keep_space_ahead_at(
            tenth(i),
            |file, from, bytes| {
                laid_at.get_or_insert(i);
                lay_space_ahead(file, from, bytes)
            },
            |_| Ok(u64::MAX),
        );
    }
    assert!(
        laid_at.is_some_and(|i| i <= 6000 + 10),
        "laid at {laid_at:?}, not within a second"
    );
    assert!(fs::metadata(&paths.journal).unwrap().len() >= SPACE_AHEAD_BYTES);
    assert_eq!(load_complete(&paths).last_seq, last);
}

/// A lay of the space ahead that failed part way leaves NUL bytes the writer does not count.
/// The rotation goes by the file's size, so `journal.old` still ends with its last record
/// (NUL bytes there would read as synced records lost) and the files load.
#[test]
fn a_rotation_cuts_off_nul_bytes_a_failed_lay_left() {
    let (_dir, paths) = temp_paths();
    let mut writer = writer_by_hand(&paths);
    writer.append(&(1..=3).map(record).collect::<Vec<_>>());
    let mut stray = fs::OpenOptions::new()
        .append(true)
        .open(&paths.journal)
        .unwrap();
    io::Write::write_all(&mut stray, &[0; 100_000]).unwrap();
    writer.rotate().unwrap();
    let old = fs::read(&paths.journal_old).unwrap();
    assert!(
        old.ends_with(b"\n"),
        "journal.old ends with its last record"
    );
    assert_eq!(load_complete(&paths).last_seq, 3);
}

/// A final fold that cannot write the state file (here a directory stands in its place)
/// says so to the stop, which then does not call the state saved in the state file, and
/// leaves the journal whole for the next start.
#[test]
fn a_final_fold_that_fails_says_so_and_keeps_the_journal() {
    let (_dir, paths) = temp_paths();
    let mut writer = writer_by_hand(&paths);
    journal(&mut writer, 1..=3);
    fs::create_dir(&paths.state).unwrap();
    assert!(
        !writer.finish(),
        "a fold that could not write was taken as done"
    );
    fs::remove_dir(&paths.state).unwrap();
    assert_eq!(
        load_complete(&paths).last_seq,
        3,
        "the journal keeps every record"
    );
}

/// A clean stop with nothing to fold (the state file holds every record) still empties a
/// journal that holds space laid down ahead, as after a rotation with no append since.
#[test]
fn a_clean_stop_empties_a_journal_of_space_ahead() {
    let (_dir, paths) = temp_paths();
    fs::write(&paths.journal, vec![0; 4096]).unwrap();
    let mut writer = writer_by_hand(&paths);
    assert!(writer.finish(), "nothing left to fold");
    assert_eq!(fs::metadata(&paths.journal).unwrap().len(), 0);
    assert!(
        !paths.state.exists(),
        "nothing to fold, yet a state file was written"
    );
}

#[test]
fn appends_go_on_while_the_journal_is_rotated_and_compacted() {
    let (_dir, mut d) = temp_driver(tiny(512));
    // 200 batches at least, and on until ten compactions are done and the journal is
    // small again (it holds what was appended while the last one ran): how many fit in
    // 200 depends on how often the compactor thread gets a CPU (6, and once none, in
    // loaded test runs, where the 200 appends took well under a second).
    let (mut last, mut batches) = (0, 0);
    let deadline = Instant::now() + PATIENCE;
    while batches < 200
        || d.persister.compactions().written < 10
        || journal_len(&d.paths) >= 64 * 1024
    {
        assert!(
            Instant::now() < deadline,
            "after {batches} batches, a journal of {} bytes: {:?}",
            journal_len(&d.paths),
            d.persister.compactions()
        );
        last = d.write(1 + batches % 5);
        batches += 1;
    }
    assert_eq!(d.persister.compactions().failed, 0);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert!(!d.paths.journal_old.exists());
    assert_eq!(journal_len(&d.paths), 0, "shutdown empties the journal");
    let loaded = load_complete(&d.paths);
    assert_eq!(loaded.state.journal_seq, last);
    assert_eq!(loaded.replayed, 0);
}

#[test]
fn a_failed_compaction_keeps_the_old_journal_and_is_retried() {
    let (dir, mut d) = temp_driver(tiny(256));
    // The state file's temporary name is taken by a directory: every snapshot fails.
    let blocker = block_snapshots(dir.path());
    let mut last = 0;
    while d.persister.compactions().failed < 3 {
        last = d.write(2);
        assert!(last < 100_000, "compactions never failed");
    }
    assert!(d.paths.journal_old.exists(), "journal.old is kept");
    assert!(!d.paths.state.exists());
    // Its space ahead was cut off before the rotation: NULs at its end would read as a hole.
    let old = fs::read(&d.paths.journal_old).unwrap();
    assert!(
        old.ends_with(b"\n"),
        "journal.old ends with its last record"
    );
    // Nothing is lost meanwhile: the two journals hold every record.
    assert_eq!(load_complete(&d.paths).last_seq, last);

    fs::remove_dir(&blocker).unwrap();
    let written = d.persister.compactions().written;
    while d.persister.compactions().written == written || d.paths.journal_old.exists() {
        last = d.write(1);
        assert!(last < 100_000, "compaction never recovered");
    }
    assert_eq!(load_complete(&d.paths).last_seq, last);
    last = d.write(7);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert!(!d.paths.journal_old.exists());
    let loaded = load_complete(&d.paths);
    assert_eq!(loaded.replayed, 0);
    assert_eq!(loaded.last_seq, last);
}

/// The backup file of `paths`, loaded alone as the state file of a fresh directory (as a
/// restore puts it): checked to hold the history exactly up to its `journal_seq`.
fn load_backup(paths: &Paths) -> Loaded {
    let restore = tempfile::tempdir().unwrap();
    let restored = Paths::new(&restore.path().join("s.json"));
    fs::copy(&paths.backup, &restored.state).unwrap();
    let loaded = store::load(&restored).unwrap();
    assert_eq!(loaded.replayed, 0, "a backup is a state file alone");
    assert_holds_exactly(&loaded, loaded.last_seq);
    loaded
}

/// A backup holds every record handed to the persister before it was asked for, durable or
/// not yet, and none after; it loads alone as a state file, and is written again at the next
/// request. The journal and the state file are left as they were.
#[test]
fn a_backup_holds_every_record_handed_over_before_it_and_loads_alone() {
    let (_dir, mut d) = temp_driver(Options::default());
    d.write(40);
    // Not waited for: still in flight when the backup is asked for.
    let records = (d.next_n..d.next_n + 9).map(record).collect();
    d.next_n += 9;
    d.hand_over(records);
    d.persister.backup();
    let asked_at = d.next_n - 1;
    d.write(5);
    d.wait("the backup", |p| p.compactions().backups == 1);
    let loaded = load_backup(&d.paths);
    assert_eq!(
        loaded.last_seq, asked_at,
        "every record before the backup, none after"
    );
    assert_eq!(loaded.state.journal_seq, asked_at);
    assert!(!d.paths.state.exists(), "no state file written for it");
    assert_eq!(load_complete(&d.paths).last_seq, asked_at + 5);

    let last = d.write(3);
    d.persister.backup();
    d.wait("the second backup", |p| p.compactions().backups == 2);
    assert_eq!(load_backup(&d.paths).last_seq, last);
    assert_eq!(d.persister.compactions().backups_failed, 0);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
}

/// Records submitted and not yet handed to the writer when the backup is asked for (the
/// loop's pass that took the signal) are in it too.
#[test]
fn a_backup_holds_the_records_submitted_with_it() {
    let (_dir, mut d) = temp_driver(Options::default());
    d.write(12);
    let records = (d.next_n..d.next_n + 6).map(record).collect();
    d.next_n += 6;
    let batch = d.persister.submit(records);
    d.persister.backup();
    d.wait("the backup", |p| p.compactions().backups == 1);
    assert!(d.persister.durable() >= batch, "made durable before it");
    assert_eq!(load_backup(&d.paths).last_seq, d.next_n - 1);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
}

/// A backup that cannot be written is counted and changes nothing else: appends go on, and
/// the next backup, once the way is clear, is written.
#[test]
fn a_backup_that_cannot_be_written_is_counted_and_the_next_one_is_written() {
    let (dir, mut d) = temp_driver(Options::default());
    let blocker = dir.path().join("s.json.backup.tmp");
    fs::create_dir(&blocker).unwrap();
    d.write(10);
    d.persister.backup();
    d.wait("the failed backup", |p| p.compactions().backups_failed == 1);
    assert!(!d.paths.backup.exists());
    assert_eq!(d.persister.compactions().backups, 0);
    let last = d.write(4);
    assert_eq!(load_complete(&d.paths).last_seq, last);

    fs::remove_dir(&blocker).unwrap();
    d.persister.backup();
    d.wait("the backup", |p| p.compactions().backups == 1);
    assert_eq!(load_backup(&d.paths).last_seq, last);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
}

/// After a failure, compaction waits for `compact_retry`: a disk that keeps failing is not
/// hammered with a compaction (a whole snapshot written) after every commit.
#[test]
fn a_failed_compaction_is_not_retried_before_its_delay() {
    let (dir, mut d) = temp_driver(tiny_retried_late(256));
    let blocker = block_snapshots(dir.path());
    while d.persister.compactions().failed == 0 {
        let last = d.write(2);
        assert!(last < 100_000, "the compaction never failed");
    }
    // Each commit asks for a compaction if one is due, after handling the last report.
    for _ in 0..20 {
        d.write(2);
    }
    assert_eq!(
        d.persister.compactions().failed,
        1,
        "retried before its delay"
    );
    fs::remove_dir(&blocker).unwrap();
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
}

/// After a failed rotation, compaction waits for `compact_retry` too: the journal is not
/// renamed and a snapshot not started before then, even once the rename would work.
#[test]
fn a_failed_rotation_is_not_retried_before_its_delay() {
    let (_dir, mut d) = temp_driver(tiny_retried_late(256));
    // A directory at journal.old's name: the rename onto it fails.
    fs::create_dir(&d.paths.journal_old).unwrap();
    while journal_len(&d.paths) <= 256 {
        d.write(2);
    }
    // The rotation is tried after that commit: the next one comes after it.
    d.write(2);
    fs::remove_dir(&d.paths.journal_old).unwrap();
    for _ in 0..20 {
        d.write(2);
    }
    // A rotation renames the journal; its compaction writes the state file before it
    // removes journal.old: had one run, one of them would be there.
    assert!(!d.paths.journal_old.exists(), "rotated before the delay");
    assert!(!d.paths.state.exists(), "compacted before the delay");
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert_eq!(load_complete(&d.paths).replayed, 0);
}

/// Removing `journal.old` fails the compaction unless it is already gone: a snapshot
/// reported written while journal.old stays would be folded again and again.
#[test]
fn journal_old_that_cannot_be_removed_fails_and_one_already_gone_does_not() {
    let (_dir, paths) = temp_paths();
    fs::create_dir(&paths.journal_old).unwrap();
    match compactor::remove_journal_old(&paths) {
        Err(StoreError::Write { path, .. }) => assert_eq!(path, paths.journal_old),
        other => panic!("a directory at journal.old: {other:?}"),
    }
    fs::remove_dir(&paths.journal_old).unwrap();
    compactor::remove_journal_old(&paths).expect("nothing to remove");
}

/// The metrics' compaction times: the total adds up, the last and the longest are kept.
#[test]
fn compaction_times_add_up_and_keep_the_last_and_the_longest() {
    let mut stats = Compactions::default();
    stats.written(Duration::from_millis(500));
    stats.written(Duration::from_millis(250));
    assert_eq!(stats.written, 2);
    assert_eq!(
        (stats.seconds, stats.last_seconds, stats.max_seconds),
        (0.75, 0.25, 0.5)
    );
}

/// A journal left with a torn last line by a crash mid-append (and no journal.old): the start
/// folds it away before anything is appended, so that no record lands after the fragment as
/// one garbled whole line, which the next start would refuse.
#[test]
fn a_torn_journal_is_folded_away_before_the_first_append() {
    let (dir, paths) = temp_paths();
    let mut bytes = journal_lines(1..=3);
    bytes.extend_from_slice(br#"{"n":4,"op":"jo"#);
    fs::write(&paths.journal, &bytes).unwrap();
    let mut d = Driver::start(dir.path(), Options::default());
    assert_eq!(journal_len(&paths), 0, "not folded at start");
    assert_eq!(d.write(2), 5);
    assert_eq!(load_complete(&paths).last_seq, 5);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
}

/// A crash in the middle of a compaction: the next start folds the snapshot, journal.old
/// and the journal into a fresh snapshot before anything else.
#[test]
fn start_folds_an_interrupted_compaction() {
    let (dir, paths) = temp_paths();
    let mut snapshot = model(2);
    snapshot.journal_seq = 2;
    write_state_file(&paths, snapshot);
    fs::write(&paths.journal_old, journal_lines(1..=20)).unwrap();
    fs::write(&paths.journal, journal_lines(21..=30)).unwrap();
    let mut d = Driver::start(dir.path(), tiny(1 << 20));
    assert!(!paths.journal_old.exists());
    assert_eq!(journal_len(&paths), 0);
    let loaded = load_complete(&paths);
    assert_eq!(loaded.state.journal_seq, 30);
    assert_eq!(loaded.last_seq, 30);
    assert_eq!(d.persister.compactions().written, 1);
    let last = d.write(3);
    assert_eq!(last, 33, "numbering goes on after the folded records");
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert_eq!(load_complete(&paths).last_seq, 33);
}

/// Tokens and password hashes are secrets: a state file and journal left readable by others
/// (the original server's file, a `cp` under umask 022) are made the owner's alone at start,
/// without waiting for a rewrite.
#[test]
fn state_files_readable_by_others_are_restricted_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, paths) = temp_paths();
    write_state_file(&paths, State::default());
    fs::write(&paths.journal, b"").unwrap();
    for path in [&paths.state, &paths.journal] {
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let d = Driver::start(dir.path(), Options::default());
    for path in [&paths.state, &paths.journal] {
        let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
}

#[test]
fn a_state_file_numbered_at_the_end_of_the_range_neither_panics_nor_hides_new_records() {
    // `journal_seq` comes from the file: the largest number must not make the writer
    // panic (debug) or wrap record numbers to 0 (release), which the next load would skip
    // as already folded, losing records whose replies were sent. Refusing the file is
    // fine too.
    for journal_seq in [
        u64::MAX,
        u64::MAX - 1,
        store::MAX_NUMBER + 1,
        store::MAX_NUMBER,
        store::START_LIMIT + 1,
        store::START_LIMIT,
    ] {
        let wrote = starts_and_keeps_its_records_or_is_refused(journal_seq);
        // Refusal is fine past the limit, but the limit itself must start and write: else
        // no value above reaches the writer and the test checks nothing.
        if journal_seq == store::START_LIMIT {
            assert!(
                wrote,
                "journal_seq {journal_seq}: refused, so the writer was never tested"
            );
        }
    }
}

/// Whether the file was loaded, the writer started and a record made durable (false: refused).
fn starts_and_keeps_its_records_or_is_refused(journal_seq: u64) -> bool {
    let (_dir, paths) = temp_paths();
    let snapshot = State {
        journal_seq,
        ..State::default()
    };
    write_state_file(&paths, snapshot);
    let Ok(loaded) = store::load(&paths) else {
        return false; // refused at load: nothing can be lost
    };
    let (_poll, waker) = poll_and_waker();
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Persister::start_with(paths.clone(), loaded, Options::default(), waker)
    }));
    let mut persister = match started {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return false, // refused at start: nothing can be lost
        Err(_) => panic!("the writer panicked on a journal_seq read from the file"),
    };
    let batch = persister.submit(vec![record(1)]);
    persister.pump();
    let deadline = Instant::now() + PATIENCE;
    while persister.durable() < batch {
        assert!(Instant::now() < deadline, "never durable");
        thread::sleep(Duration::from_millis(5));
        persister.poll_done();
    }
    // As after a kill -9: the files as they are now.
    match store::load(&paths) {
        Ok(reloaded) => assert!(
            reloaded.state.rooms.contains_key("r1"),
            "journal_seq {journal_seq}: a durable record is skipped at the next load"
        ),
        // Started right at the limit, the next start is refused, the record kept on disk.
        Err(StoreError::NumbersExhausted { last, .. }) => {
            assert_eq!(last, journal_seq + 1);
            let journal = store::parse_journal(&fs::read(&paths.journal).unwrap()).unwrap();
            assert_eq!(journal.records.last().map(|e| e.n), Some(last));
        }
        Err(e) => panic!("journal_seq {journal_seq}: the next load fails: {e}"),
    }
    true
}

/// Not a test on its own: the process [`sigkill_at_any_moment_loses_no_durable_record`]
/// starts and kills. It writes the history in batches of 1 to 6 records with a tiny
/// compaction threshold, printing `durable N` once record N is durable.
/// Ignored, so that it is not counted as a test that passed: the parent runs it with
/// `--ignored`.
#[test]
#[ignore = "the child process of sigkill_at_any_moment_loses_no_durable_record"]
fn crash_child() {
    let dir = std::env::var_os(CRASH_DIR_ENV)
        .unwrap_or_else(|| panic!("run by sigkill_at_any_moment_loses_no_durable_record only"));
    let mut d = Driver::start(Path::new(&dir), tiny(512));
    for i in 0.. {
        let last = d.write(1 + i % 6);
        println!("durable {last}");
    }
}

/// SIGKILL lands anywhere: in an append, a rotation, a snapshot, or between the snapshot
/// and the removal of journal.old. Every record reported durable must load, the load must
/// be exactly a prefix of the history, and a restart on the files must fold them.
#[test]
fn sigkill_at_any_moment_loses_no_durable_record() {
    const ROUNDS: usize = 10;
    let seed: u64 = std::env::var("OCM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with OCM_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exe = std::env::current_exe().unwrap();
    let mut killed_mid_compaction = 0;
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Process::new(&exe)
            .args([
                "persist::tests::crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("durable ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        let kill_after = rng.random_range(10..=300);
        let mut durable = 0;
        for _ in 0..kill_after {
            durable = rx.recv_timeout(PATIENCE).expect("the child writes");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        // Lines printed before the kill.
        durable = rx.try_iter().last().unwrap_or(durable);

        let paths = Paths::new(&dir.path().join("s.json"));
        let mid_compaction = paths.journal_old.exists();
        killed_mid_compaction += usize::from(mid_compaction);
        let loaded = load_complete(&paths);
        eprintln!(
            "round {round}: killed after record {durable}; loaded up to {}{}",
            loaded.last_seq,
            if mid_compaction {
                ", with journal.old"
            } else {
                ""
            }
        );
        assert!(loaded.last_seq >= durable, "durable records lost");

        let mut d = Driver::start(dir.path(), tiny(512));
        assert!(!paths.journal_old.exists());
        assert_eq!(journal_len(&paths), 0);
        let last = d.write(4);
        assert_eq!(last, loaded.last_seq + 4);
        assert_eq!(d.persister.shutdown(), Stopped::Folded);
        assert_eq!(load_complete(&paths).last_seq, last);
    }
    eprintln!("{killed_mid_compaction} of {ROUNDS} kills left a journal.old");
}

/// The check behind refusing appends to a deleted journal: a file's names, counted without
/// reading its times (see `link_count`).
#[test]
fn link_count_sees_a_journal_deleted_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let file = open_journal(&path).unwrap();
    assert_eq!(link_count(&file).unwrap(), 1);
    fs::hard_link(&path, dir.path().join("j2")).unwrap();
    assert_eq!(link_count(&file).unwrap(), 2);
    fs::remove_file(&path).unwrap();
    fs::remove_file(dir.path().join("j2")).unwrap();
    assert_eq!(link_count(&file).unwrap(), 0);
}

/// The check behind replacing a journal moved from its name: the open file's identity and the
/// one at its name, each asked of `statx` without reading times, agree until the journal is
/// renamed away (nothing at the name), loses its own name while it has another, or another
/// file takes the name; a second name alone changes nothing.
#[test]
fn identity_tells_the_open_journal_from_what_is_at_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let file = open_journal(&path).unwrap();
    let open = identity_of(&file)
        .unwrap()
        .expect("this file system gives inodes");
    assert_eq!(identity_at(&path).unwrap(), Some(open));
    let copy = dir.path().join("j2");
    fs::hard_link(&path, &copy).unwrap();
    assert_eq!(identity_at(&path).unwrap(), Some(open), "a second name");
    fs::remove_file(&path).unwrap();
    let missing = identity_at(&path).unwrap_err();
    assert_eq!(
        missing.kind(),
        io::ErrorKind::NotFound,
        "its own name removed"
    );
    assert_eq!(
        identity_of(&file).unwrap(),
        Some(open),
        "the open file is the same"
    );
    fs::rename(&copy, &path).unwrap();
    assert_eq!(identity_at(&path).unwrap(), Some(open), "back at its name");
    fs::rename(&path, &copy).unwrap();
    assert_eq!(
        identity_at(&path).unwrap_err().kind(),
        io::ErrorKind::NotFound,
        "renamed away"
    );
    fs::write(&path, b"").unwrap();
    assert_ne!(
        identity_at(&path).unwrap(),
        Some(open),
        "another file at its name"
    );
}

/// A piece synced into a journal that lost its name is not durable: the append stops at once
/// (no cut, no retry into the same file), counted as a failed write, for the writer to put a
/// fresh journal in its place.
#[test]
fn an_append_synced_into_a_deleted_journal_is_not_durable() {
    let mut journal = FlakyJournal {
        deleted: true,
        ..FlakyJournal::default()
    };
    let stats = Mutex::default();
    let appended = append_now(&mut journal, 0, b"{\"n\":1}\n", &stats);
    assert_eq!(appended, Err(JournalDeleted));
    assert_eq!(journal.calls, ["write", "sync"]);
    assert_eq!(stats.lock().unwrap().write_failures, 1);
}

/// A piece synced into a journal whose names cannot be counted (`statx` and then `fstat`
/// failing) is not acknowledged: no one can tell that a start will read it. It is retried as a
/// failed write is (cut back, written and synced again) until a look says the journal has a
/// name, and counted as a failed write.
#[test]
fn an_append_whose_names_cannot_be_counted_is_retried_not_acknowledged() {
    let mut journal = FlakyJournal {
        look_fails: 1,
        ..FlakyJournal::default()
    };
    let stats = Mutex::default();
    let appended = append_now(&mut journal, 0, b"{\"n\":1}\n", &stats);
    assert_eq!(appended, Ok(true), "appended after a cut");
    assert_eq!(journal.calls, ["write", "sync", "cut", "write", "sync"]);
    assert_eq!(journal.bytes, b"{\"n\":1}\n");
    assert_eq!(stats.lock().unwrap().write_failures, 1);
}

/// Deletes the journal by its name, as `rm` would. A rotation that the last commit started
/// may have renamed it without having opened the fresh one yet: the name is then free for a
/// moment, and the deletion is tried again until it finds the fresh journal.
fn delete_journal(d: &mut Driver) {
    let journal = d.paths.journal.clone();
    d.wait("a journal to delete", |_| match fs::remove_file(&journal) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => panic!("cannot delete {}: {e}", journal.display()),
    });
}

/// Waits until the files on `paths` load with every record up to `last`, as a start after a
/// `kill -9` would read them.
fn wait_for_files_holding(d: &mut Driver, last: u64, what: &str) {
    let paths = d.paths.clone();
    d.wait(what, |_| {
        paths.journal.exists() && store::load(&paths).is_ok_and(|l| l.last_seq == last)
    });
    assert_eq!(load_complete(&paths).last_seq, last);
}

/// A journal deleted while in use (here by a name, as `rm` would) takes no append that a
/// start could not read back: the writer opens a fresh journal and writes the state file from
/// memory before it appends again, so the records acknowledged into the deleted journal are
/// on disk again, and so are the ones after. With compactions running (a tiny threshold),
/// `journal.old` may be there too, and a compaction under way.
#[test]
fn a_journal_deleted_while_in_use_is_replaced_and_no_durable_record_is_lost() {
    for options in [Options::default(), tiny(512)] {
        let (_dir, mut d) = temp_driver(options);
        let mut last = 0;
        for _ in 0..5 {
            d.write(20);
            delete_journal(&mut d);
            last = d.write(3);
            assert_eq!(
                load_complete(&d.paths).last_seq,
                last,
                "after an append answered as durable"
            );
        }
        // Deleted while idle: the writer's check puts the files back without an append.
        delete_journal(&mut d);
        wait_for_files_holding(&mut d, last, "a fresh journal and state file");
        assert_eq!(d.persister.shutdown(), Stopped::Folded);
        assert_eq!(load_complete(&d.paths).last_seq, last);
    }
}

/// A journal moved from its name while in use, renamed away (`mv`) or given a second name
/// whose first is then removed (`ln`, then `rm` of the wrong one), still has a name, so the
/// appends after each sync go on into it, and no start would read them. The writer's file
/// check (within a second, idle or not) sees that the file at the journal's name is not its
/// own, puts a fresh journal there and writes the state file from memory, so that what a start
/// reads holds every durable record, including those acknowledged into the moved file. The
/// moved file is left as it is.
#[test]
fn a_journal_renamed_away_or_whose_own_name_was_removed_is_replaced() {
    type Move = fn(&Path, &Path);
    let rename: Move = |journal, elsewhere| fs::rename(journal, elsewhere).unwrap();
    let link_and_remove: Move = |journal, elsewhere| {
        fs::hard_link(journal, elsewhere).unwrap();
        fs::remove_file(journal).unwrap();
    };
    for (how, move_away) in [
        ("renamed away", rename),
        ("its name removed", link_and_remove),
    ] {
        let (dir, mut d) = temp_driver(Options::default());
        d.write(20);
        let elsewhere = dir.path().join("elsewhere");
        move_away(&d.paths.journal, &elsewhere);
        // Into the moved file, unless a check came first.
        let last = d.write(3);
        wait_for_files_holding(&mut d, last, &format!("a journal {how} to be replaced"));
        assert!(
            fs::metadata(&elsewhere).unwrap().len() > 0,
            "{how}: the moved file is left as it is"
        );
        let last = d.write(4);
        assert_eq!(d.persister.shutdown(), Stopped::Folded);
        assert_eq!(load_complete(&d.paths).last_seq, last, "{how}");
    }
}

/// A `journal.old` kept by a failed compaction (here a snapshot that cannot be written) and
/// deleted before the retry holds the only copy on disk of the records up to the rotation:
/// the writer's file check sees it gone and has the state file written from memory at once,
/// not at the retry, which may be long in coming (a disk that stays full). Before, nothing
/// looked, and a crash until the retry worked started on a gap.
#[test]
fn a_journal_old_deleted_while_kept_is_written_into_the_state_file_at_once() {
    let (dir, mut d) = temp_driver(tiny_retried_late(256));
    let blocker = block_snapshots(dir.path());
    while d.persister.compactions().failed == 0 {
        assert!(d.write(2) < 100_000, "no compaction failed");
    }
    assert!(d.paths.journal_old.exists(), "journal.old is kept");
    let mut last = d.write(3);
    fs::remove_dir(&blocker).unwrap();
    fs::remove_file(&d.paths.journal_old).unwrap();
    // An idle writer's check, long before the retry is due.
    wait_for_files_holding(&mut d, last, "the state file written from memory");
    assert!(!d.paths.journal_old.exists());
    last = d.write(4);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert_eq!(load_complete(&d.paths).last_seq, last);
}

/// A state file deleted while in use leaves the journals with only the changes since it was
/// written; the writer notices (idle, or between appends) and writes it again from memory.
/// A clean stop right after a deletion writes it too.
#[test]
fn a_state_file_deleted_while_in_use_is_written_again() {
    let (dir, mut d) = temp_driver(Options::default());
    let last = d.write(30);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert!(d.paths.state.exists(), "the stop wrote the state file");

    let mut d = Driver::start(dir.path(), Options::default());
    let mut last = d.write(4).max(last);
    fs::remove_file(&d.paths.state).unwrap();
    wait_for_files_holding(&mut d, last, "the state file written again");
    // Between appends too.
    fs::remove_file(&d.paths.state).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !d.paths.state.exists() {
        assert!(Instant::now() < deadline, "the state file never came back");
        last = d.write(1);
    }
    assert_eq!(load_complete(&d.paths).last_seq, last);

    fs::remove_file(&d.paths.state).unwrap();
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert_eq!(load_complete(&d.paths).last_seq, last);
    assert!(
        d.paths.state.exists(),
        "the stop wrote the state file again"
    );
}

/// `/readyz` reads how long creates and joins have waited for the disk from `waiting_since`:
/// nothing before a batch is handed over, the oldest batch's hand-over while any waits, and
/// nothing once the writer reported every one durable, whenever its reports come.
#[test]
fn waiting_since_is_the_oldest_batch_not_yet_reported_durable() {
    let (_dir, mut d) = temp_driver(Options::default());
    assert_eq!(d.persister.waiting_since(), None, "nothing handed over");
    let before = Instant::now();
    d.hand_over(vec![record(1)]);
    let handed = Instant::now();
    let since = d
        .persister
        .waiting_since()
        .expect("a batch handed over waits");
    assert!(before <= since && since <= handed);
    let second = d.hand_over(vec![record(2)]);
    d.next_n = 3;
    assert_eq!(
        d.persister.waiting_since(),
        Some(since),
        "the oldest batch's hand-over"
    );
    d.wait("both batches to be durable", |p| {
        assert_eq!(
            p.waiting_since().is_some(),
            p.durable() < second,
            "waiting while batch {} of {second} is durable",
            p.durable()
        );
        p.durable() >= second
    });
    assert_eq!(d.persister.waiting_since(), None, "every batch durable");
    assert_eq!(d.write(1), 3);
    assert_eq!(d.persister.waiting_since(), None);
}

/// A state file written by hand with a saved time no writer gives one now, so that its
/// bytes tell whether it was written again; returns them.
fn state_file_of_long_ago(paths: &Paths) -> Vec<u8> {
    let bytes = State::default()
        .to_file_bytes(SystemTime::UNIX_EPOCH)
        .unwrap();
    store::write_atomic(&paths.state, &bytes).unwrap();
    bytes
}

/// The writer's check of its files writes the state file again only when it went missing:
/// not while it is there, and not when there never was one (the journal then holds every
/// record).
#[test]
fn the_file_check_writes_the_state_file_again_only_when_it_went_missing() {
    let records: Vec<Record> = (1..=3).map(record).collect();
    let (_dir, paths) = temp_paths();
    let mut writer = writer_by_hand(&paths);
    writer.append(&records);
    writer.forward(records.clone());
    writer.check_files();
    assert!(
        !paths.state.exists(),
        "a state file was written though none went missing"
    );
    assert_eq!(load_complete(&paths).last_seq, 3);

    let (_dir, paths) = temp_paths();
    let old = state_file_of_long_ago(&paths);
    let (mut writer, stats) = writer_and_stats(&paths);
    writer.append(&records);
    writer.forward(records);
    writer.check_files();
    assert_eq!(
        fs::read(&paths.state).unwrap(),
        old,
        "a state file that is there was written again"
    );
    assert_eq!(counters(&stats).files_restored, 0);
    fs::remove_file(&paths.state).unwrap();
    writer.check_files();
    let loaded = load_complete(&paths);
    assert_eq!(loaded.state.journal_seq, 3, "written again from memory");
    let restored = *counters(&stats);
    assert_eq!(
        (restored.files_restored, restored.files_missing),
        (1, false),
        "the state file written again is counted as put back"
    );
    assert!(writer.finish());
}

/// A clean stop with nothing to fold leaves the state file that is there as it is: it holds
/// every change already.
#[test]
fn a_clean_stop_with_nothing_to_fold_leaves_the_state_file_alone() {
    let (_dir, paths) = temp_paths();
    let old = state_file_of_long_ago(&paths);
    let mut writer = writer_by_hand(&paths);
    assert!(writer.finish(), "the state file holds every change");
    assert_eq!(
        fs::read(&paths.state).unwrap(),
        old,
        "the state file was written again at the stop"
    );
}

/// The state directory removed while in use (a cleaner let loose on it): no fresh journal
/// can be opened in it, and the writer retries, counting each failed try for the metrics,
/// until the directory is back; then the journal and the state file hold every durable
/// record again, and the appends go on.
#[test]
fn a_state_directory_removed_while_in_use_is_filled_again_once_it_is_back() {
    let (_dir, state_dir) = temp_state_dir();
    let mut d = Driver::start(&state_dir, Options::default());
    let last = d.write(5);
    remove_state_dir(&mut d, &state_dir);
    fs::create_dir(&state_dir).unwrap();
    wait_for_files_holding(&mut d, last, "a fresh journal and state file");
    let last = d.write(2);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    assert_eq!(load_complete(&d.paths).last_seq, last);
}

/// With its writer thread gone, records handed over are dropped and never durable: the
/// wait for them says so at once, and again at the stop, which calls them unwritten, not
/// saved, though nothing is left in flight.
#[test]
fn a_stop_whose_writer_is_gone_reports_its_changes_unwritten() {
    let (_dir, mut d) = temp_driver(Options::default());
    d.write(3);
    // The writer's ends of both channels, gone as with its thread.
    let (tx, rx) = mpsc::channel();
    drop(rx);
    let (done_tx, done_rx) = mpsc::channel();
    drop(done_tx);
    d.persister.tx = tx;
    d.persister.done_rx = done_rx;
    d.persister.submit(vec![record(4)]);
    let asked = Instant::now();
    assert!(!d.persister.wait_durable(asked + PATIENCE));
    assert!(asked.elapsed() < PATIENCE / 2, "said at once");
    assert!(
        !d.persister.busy(),
        "the record was dropped, not kept in flight"
    );
    assert!(
        !d.persister.wait_durable(Instant::now() + PATIENCE),
        "and stays lost"
    );
    assert_eq!(d.persister.shutdown(), Stopped::Unwritten);
}

/// A stop while the state directory is gone (the writer retrying to open a fresh journal
/// in it) does not call the state saved in the journal: there is no journal, and what the
/// files held is on no disk.
#[test]
fn a_stop_while_the_state_directory_is_gone_says_the_state_is_lost() {
    let (_dir, state_dir) = temp_state_dir();
    let mut d = Driver::start(&state_dir, Options::default());
    d.write(5);
    remove_state_dir(&mut d, &state_dir);
    assert!(d.persister.compactions().files_missing);
    assert_eq!(d.persister.shutdown(), Stopped::Lost);
}

/// The same seen by the final fold, when the directory went since the writer's last check:
/// the fold fails, and the stop is told that the journal keeps nothing.
#[test]
fn a_final_fold_with_the_state_directory_gone_says_the_state_is_lost() {
    let (_dir, state_dir) = temp_state_dir();
    let paths = Paths::new(&state_dir.join("s.json"));
    let (mut writer, stats) = writer_and_stats(&paths);
    journal(&mut writer, 1..=3);
    fs::remove_dir_all(&state_dir).unwrap();
    assert!(
        !writer.finish(),
        "a fold into a removed directory was taken as done"
    );
    assert!(
        counters(&stats).files_missing,
        "the stop would say the journal keeps the changes"
    );
}

/// A journal deleted while a compaction has not reported to the writer yet (no commit since
/// the one that asked for it): the writer takes that report, then has the state file written
/// again, and the compactor is still there for the compactions and the fold after.
#[test]
fn a_journal_deleted_before_a_compaction_reported_is_replaced_with_the_compactor_kept() {
    let (_dir, mut d) = temp_driver(tiny(512));
    // Past the threshold, with no state file yet: the commit asks for a compaction.
    let last = d.write(10);
    d.wait("the compaction the commit asked for", |p| {
        p.compactions().written == 1
    });
    fs::remove_file(&d.paths.journal).unwrap();
    d.wait("the state file written again", |p| {
        p.compactions().written == 2
    });
    wait_for_files_holding(&mut d, last, "a fresh journal and state file");
    let last = d.write(3);
    assert_eq!(d.persister.shutdown(), Stopped::Folded);
    let loaded = load_complete(&d.paths);
    assert_eq!(loaded.replayed, 0, "folded at the stop");
    assert_eq!(loaded.last_seq, last);
}

/// The error a lock that cannot be examined is reported with reads as the `io::Error` did:
/// the OS's words and number, or, for an error without a number, its kind.
#[test]
fn a_file_error_displays_as_the_io_error_it_was() {
    let denied = io::Error::from_raw_os_error(libc::EACCES);
    assert_eq!(FileError::from(&denied).to_string(), denied.to_string());
    assert!(denied.to_string().contains("(os error 13)"), "{denied}");
    let other = io::Error::new(io::ErrorKind::TimedOut, "injected");
    assert_eq!(FileError::from(&other).to_string(), "timed out");
    assert_ne!(
        LockState::Unverifiable(FileError::from(&denied)),
        LockState::Unverifiable(FileError::from(&io::Error::from_raw_os_error(libc::EIO))),
        "another error is another finding, logged at once"
    );
}

/// The lock file replaced while in use by another process's (deleted, and a second `ocmd`
/// locked a new file at its name) is not taken for the daemon's own: the file check reports
/// it as taken, and takes the lock again once the other lets go; a lock file deleted with
/// nobody to take it is taken again at the next check. Each lock taken again is counted
/// once, and a check that finds the daemon's own lock there changes nothing.
#[test]
fn a_lock_file_deleted_while_in_use_is_taken_again_unless_another_process_holds_it() {
    let (_dir, paths) = temp_paths();
    let _held = lock(&paths).unwrap();
    let (mut writer, stats) = writer_and_stats(&paths);
    let found = |stats: &Mutex<Compactions>| {
        let c = counters(stats);
        (c.lock, c.files_restored)
    };
    writer.check_files();
    assert_eq!(
        found(&stats),
        (LockState::Held, 0),
        "its own lock, untouched"
    );

    fs::remove_file(&paths.lock).unwrap();
    let other = lock(&paths).unwrap();
    writer.check_files();
    assert_eq!(
        found(&stats),
        (LockState::Taken, 0),
        "another's lock taken for its own"
    );

    drop(other);
    writer.check_files();
    assert_eq!(
        found(&stats),
        (LockState::Held, 1),
        "not taken again once let go"
    );
    writer.check_files();
    assert_eq!(
        found(&stats),
        (LockState::Held, 1),
        "its own new lock, taken again"
    );
    assert!(
        lock(&paths).is_err_and(|e| matches!(e, StoreError::Locked { .. })),
        "the lock taken again keeps a second ocmd out"
    );

    fs::remove_file(&paths.lock).unwrap();
    writer.check_files();
    assert_eq!(
        found(&stats),
        (LockState::Held, 2),
        "deleted, and not taken again"
    );
    assert!(paths.lock.exists());
}

/// A second name given to the state file or the journal while the daemon serves is what the
/// file check counts (for `/readyz`), each only while it has more than one, and the count
/// goes once the other name is removed.
#[test]
fn the_file_check_counts_a_second_name_of_the_state_file_or_journal_while_it_lasts() {
    let (dir, paths) = temp_paths();
    state_file_of_long_ago(&paths);
    let (mut writer, stats) = writer_and_stats(&paths);
    let links = |stats: &Mutex<Compactions>| counters(stats).hard_links;
    writer.check_files();
    assert_eq!(links(&stats), HardLinks::default(), "one name each");

    let journal_too = dir.path().join("journal.copy");
    fs::hard_link(&paths.journal, &journal_too).unwrap();
    writer.check_files();
    assert_eq!(
        links(&stats),
        HardLinks {
            state_file: None,
            journal: Some(2)
        }
    );
    let state_too = dir.path().join("state.copy");
    fs::hard_link(&paths.state, &state_too).unwrap();
    writer.check_files();
    assert_eq!(
        links(&stats),
        HardLinks {
            state_file: Some(2),
            journal: Some(2)
        }
    );
    fs::remove_file(&journal_too).unwrap();
    fs::remove_file(&state_too).unwrap();
    writer.check_files();
    assert_eq!(links(&stats), HardLinks::default(), "one name each again");
}

/// A lock file whose name cannot be examined (its directory moved away and a file put in its
/// place: its `stat` fails with ENOTDIR) is neither held nor taken again: the check says so,
/// with the error, and once the name can be examined and holds the daemon's own file, the
/// lock is held again, with nothing taken again or counted as restored.
#[test]
fn a_lock_file_that_cannot_be_examined_is_unverifiable_until_it_can() {
    let (dir, state_dir) = temp_state_dir();
    let paths = Paths::new(&state_dir.join("s.json"));
    let _held = lock(&paths).unwrap();
    let (mut writer, stats) = writer_and_stats(&paths);
    let moved = dir.path().join("moved");
    fs::rename(&state_dir, &moved).unwrap();
    fs::write(&state_dir, b"").unwrap();
    writer.check_files();
    let not_a_dir = FileError::from(&io::Error::from_raw_os_error(libc::ENOTDIR));
    assert_eq!(counters(&stats).lock, LockState::Unverifiable(not_a_dir));
    fs::remove_file(&state_dir).unwrap();
    fs::rename(&moved, &state_dir).unwrap();
    writer.check_files();
    assert_eq!(counters(&stats).lock, LockState::Held);
    assert_eq!(
        counters(&stats).files_restored,
        0,
        "nothing was taken again"
    );
}

/// A clean stop kept the state when every acknowledged change is on disk (folded, or left in
/// the journals for the next start to fold), not when the files were lost or the last
/// batches never written: `ocmd` then exits with a failed status.
#[test]
fn only_a_stop_with_every_acknowledged_change_on_disk_kept_the_state() {
    assert!(Stopped::Folded.kept_the_state());
    assert!(Stopped::Unfolded.kept_the_state());
    assert!(!Stopped::Lost.kept_the_state());
    assert!(!Stopped::Unwritten.kept_the_state());
}

/// A state file or journal that is not a regular file is refused as what it is, before its
/// count of names: a directory has two or more of its own.
#[test]
fn a_state_path_that_is_not_a_file_is_refused_as_what_it_is() {
    let (_dir, paths) = temp_paths();
    fs::create_dir(&paths.state).unwrap();
    fs::create_dir(paths.state.join("sub")).unwrap();
    match refuse_linked_state(&paths.state) {
        Err(StoreError::NotAFile { what, file, kind }) => {
            assert_eq!(
                (what, &file, kind),
                ("state file", &paths.state, "a directory")
            );
        }
        other => panic!("{other:?}"),
    }
    fs::remove_dir_all(&paths.state).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&paths.journal).unwrap();
    match lock(&paths) {
        Err(StoreError::NotAFile { what, kind, .. }) => {
            assert_eq!((what, kind), ("journal", "a socket"));
        }
        other => panic!("{other:?}"),
    }
    drop(listener);
}

/// A start refuses a state path whose lock would not keep a second `ocmd` off its files: a
/// state file or journal with a second name, or a state file that is a symbolic link; and a
/// lock another process holds, naming the holder its file names.
#[test]
fn a_linked_state_file_or_journal_and_a_held_lock_are_refused() {
    let (dir, paths) = temp_paths();
    refuse_linked_state(&paths.state).expect("nothing there yet");
    fs::write(&paths.state, b"").unwrap();
    fs::write(&paths.journal, b"").unwrap();
    refuse_linked_state(&paths.state).expect("one name each");
    let other = dir.path().join("other");
    for (what, file) in [("state file", &paths.state), ("journal", &paths.journal)] {
        fs::hard_link(file, &other).unwrap();
        match lock(&paths) {
            Err(StoreError::HardLinked {
                what: refused,
                file: named,
                links: 2,
            }) => assert_eq!((refused, &named), (what, file)),
            other => panic!("{what} with two names: {other:?}"),
        }
        fs::remove_file(&other).unwrap();
    }
    let held = lock(&paths).unwrap();
    match lock(&paths) {
        Err(StoreError::Locked { holder, .. }) => {
            assert_eq!(holder, format!("pid {}", std::process::id()));
        }
        other => panic!("a held lock: {other:?}"),
    }
    drop(held);
    fs::rename(&paths.state, &other).unwrap();
    std::os::unix::fs::symlink(&other, &paths.state).unwrap();
    assert!(
        matches!(lock(&paths), Err(StoreError::Symlink { target, .. }) if target == other),
        "a symbolic link taken for the state file"
    );
}

/// A journal deleted while in use, once a fresh one is open and the state file written
/// again, is counted as put back (for the metrics), and the files then hold every durable
/// record.
#[test]
fn a_journal_put_back_after_its_deletion_is_counted() {
    let (_dir, paths) = temp_paths();
    let (mut writer, stats) = writer_and_stats(&paths);
    journal(&mut writer, 1..=3);
    fs::remove_file(&paths.journal).unwrap();
    writer.check_files();
    let restored = *counters(&stats);
    assert_eq!(
        (restored.files_restored, restored.files_missing),
        (1, false),
        "the journal put back is counted once"
    );
    assert_eq!(load_complete(&paths).last_seq, 3);
    assert!(writer.finish());
}

// Mutation testing, 2026-12-05: the rest of `persist/` (see docs/SECURITY.md).

/// A lay of the space ahead that fails with just the room it needs free (a quota, an I/O
/// error: not a full disk) is tried again only by its schedule, though the file system says
/// at every check that it has the room: only a failure for want of room is tried again as
/// soon as room is freed.
#[test]
fn a_lay_that_failed_with_its_room_free_waits_for_its_schedule() {
    let (_dir, paths) = temp_paths();
    let mut writer = writer_by_hand(&paths);
    let start = Instant::now();
    let tenth = |i: u64| start + Duration::from_millis(100 * i);
    let mut tries = Vec::new();
    for i in 0..70 {
        writer.keep_space_ahead_at(
            tenth(i),
            |_, _, _| {
                tries.push(i);
                Err(io::Error::from_raw_os_error(libc::EDQUOT))
            },
            |_| Ok(SPACE_AHEAD_BYTES),
        );
    }
    // At 0, 1 and 3 s; the next at 7 s.
    assert_eq!(tries, [0, 10, 30], "tenths of a second of the tries");
    assert!(writer.finish());
}

/// A final fold that fails with the state's files in place (here a directory put at the
/// state file's name) loses nothing: the journal keeps every change, and the stop is not
/// told that the files were deleted. One that fails after the journal was moved from its
/// name is a loss, though the journal still has a name: no start reads it.
#[test]
fn a_failed_final_fold_is_a_loss_only_when_a_file_left_its_name() {
    let (_dir, paths) = temp_paths();
    state_file_of_long_ago(&paths);
    let (mut writer, stats) = writer_and_stats(&paths);
    journal(&mut writer, 1..=3);
    fs::remove_file(&paths.state).unwrap();
    fs::create_dir(&paths.state).unwrap();
    assert!(
        !writer.finish(),
        "a fold that could not write was taken as done"
    );
    assert!(
        !counters(&stats).files_missing,
        "a failed fold with the files in place was called a loss"
    );
    fs::remove_dir(&paths.state).unwrap();
    assert_eq!(load_complete(&paths).last_seq, 3, "the journal keeps them");

    let (dir, paths) = temp_paths();
    let (mut writer, stats) = writer_and_stats(&paths);
    journal(&mut writer, 1..=3);
    fs::rename(&paths.journal, dir.path().join("elsewhere")).unwrap();
    fs::create_dir(&paths.state).unwrap();
    assert!(
        !writer.finish(),
        "a fold that could not write was taken as done"
    );
    assert!(
        counters(&stats).files_missing,
        "a journal moved from its name was said to keep the changes"
    );
}

/// A stop with a batch still waiting for the writer while the state directory is gone (the
/// writer retrying to open a fresh journal in it) says the state is lost, not merely that
/// the last writes are not durable: what the files held before is on no disk either.
#[test]
fn a_stop_with_a_batch_waiting_while_the_state_directory_is_gone_says_the_state_is_lost() {
    let (_dir, state_dir) = temp_state_dir();
    let mut d = Driver::start(&state_dir, Options::default());
    d.write(5);
    remove_state_dir(&mut d, &state_dir);
    d.hand_over(vec![record(6)]);
    assert!(d.persister.busy(), "the batch went to the writer");
    assert_eq!(d.persister.shutdown(), Stopped::Lost);
}
