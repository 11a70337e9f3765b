//! The journal's lines: a record and its sequence number per line, read back with what a
//! crash can leave at the end (a torn last line, a zero-filled hole) and with the NUL bytes
//! the writer lays down ahead of its appends, and the pieces the writer syncs one by one so
//! that a crash can leave no more than one unsynced. How the records are replayed on a state
//! file is [`crate::store::load`]'s; see `docs/PERSISTENCE.md`.

use std::io;

use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::store::MAX_NUMBER;

/// Why a number over [`MAX_NUMBER`] is refused.
pub(crate) const LAST_NUMBER: &str =
    "record number over 9223372036854775807 (2^63 - 1): no file of ocmd's numbers that far";

/// One journal line: a sequence number and a record.
#[derive(Serialize, Deserialize)]
pub struct JournalLine<R> {
    /// Sequence number, increasing by one per record.
    pub n: u64,
    /// The record.
    #[serde(flatten)]
    pub record: R,
}

/// One record read from a journal.
#[derive(Debug)]
pub struct Entry {
    /// 1-based line of the journal it was read from.
    pub line: usize,
    /// Its sequence number.
    pub n: u64,
    /// The record.
    pub record: Record,
}

/// The records of a journal, and whether its tail was torn.
#[derive(Debug, Default)]
pub struct Replay {
    /// The records in file order.
    pub records: Vec<Entry>,
    /// The tail was torn and ignored: the last line had no newline, or a zero-filled hole
    /// (see [`ZeroHole`]) cut the journal short.
    pub torn_tail: bool,
    /// The zero-filled hole that cut the journal short, if any.
    pub zero_hole: Option<ZeroHole>,
    /// Bytes from the start of the hole's line to the end of the data, the space written
    /// ahead not counted (0 without a hole).
    pub hole_tail_bytes: usize,
    /// The number of the last line read: a torn last line's, when the tail was torn there
    /// (with a zero-filled hole, the hole's line: the rest is counted, not read as lines).
    pub last_line: usize,
    /// Bytes before the space written ahead: where the next append would go, had the tail
    /// not been torn.
    pub data_bytes: u64,
    /// NUL bytes at the end of the file, after its last byte of anything else: space the
    /// writer laid down ahead of its appends ([`SPACE_AHEAD_BYTES`]), not a tear.
    pub spare_bytes: u64,
    /// [`Ending::Cut`]: when nothing but NUL bytes follows the first one, how many there are.
    /// That is how a live journal's space ahead looks, so a `journal.old` ending so may be a
    /// journal moved to that name, as well as synced data the disk lost.
    pub nul_tail_bytes: Option<u64>,
}

/// How a journal may end, besides its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The live journal: the NUL bytes after its last byte of anything else are the space the
    /// writer laid down ahead of its appends ([`SPACE_AHEAD_BYTES`]).
    SpaceAhead,
    /// `journal.old`: the writer cut the space ahead off and synced the journal before it
    /// rotated it, so NUL bytes at its end are a hole (a tear, or synced data lost).
    Cut,
}

/// What follows the first line holding a NUL byte, counted a chunk at a time.
#[derive(Default)]
struct TailCount {
    /// Bytes counted.
    bytes: usize,
    /// Bytes up to and with the last byte that is not a NUL: the data; the NULs after it are
    /// the writer's space ahead.
    data_end: usize,
    /// Newlines counted (all in the data: a newline is not a NUL).
    newlines: usize,
    /// The data's last byte.
    last_data_byte: u8,
    /// The last byte counted.
    last_byte: u8,
}

impl TailCount {
    fn add(&mut self, chunk: &[u8]) {
        if let Some(last) = chunk.iter().rposition(|&b| b != 0) {
            self.data_end = self.bytes + last + 1;
            self.last_data_byte = chunk[last];
        }
        if let Some(&last) = chunk.last() {
            self.last_byte = last;
        }
        self.newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        self.bytes += chunk.len();
    }

    /// Lines in the data: its newlines, and one more if it ends without one.
    fn lines(&self) -> usize {
        self.newlines + usize::from(self.last_data_byte != b'\n')
    }

    /// Takes every byte counted for data: no space ahead.
    fn all_data(&mut self) {
        self.data_end = self.bytes;
        self.last_data_byte = self.last_byte;
    }
}

/// Where a journal's zero-filled hole starts: the first line holding a NUL byte with data after
/// it. That line and every line after it are a torn tail, ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroHole {
    /// 1-based number of the first line holding a NUL byte.
    pub line: usize,
    /// How many lines were ignored: that line and those after it, up to the space written
    /// ahead.
    pub lines: usize,
}

/// NUL bytes the writer lays down past the end of the journal's lines at a time, and syncs,
/// so that its appends overwrite blocks the file already has: an `fdatasync` then writes the
/// data alone, not the file's new size through the file system's own journal as well
/// (measured in `crates/bench/NOTES.md`, "Space written ahead of the journal").
pub const SPACE_AHEAD_BYTES: u64 = 1024 * 1024;

/// The most a journal append leaves unsynced: the writer syncs its bytes in pieces of at most
/// this many ([`sync_pieces`]), so a crash tears at most the last piece. A zero-filled hole
/// with more data than this from its start, over more than one line, is not a torn append:
/// [`load`](crate::store::load) refuses such a journal.
pub const MAX_UNSYNCED_BYTES: usize = 64 * 1024;

/// `bytes` (whole journal lines) in the pieces the writer syncs one by one: as many whole
/// lines as fit in [`MAX_UNSYNCED_BYTES`], or a single longer line alone.
pub fn sync_pieces(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = &rest[..rest.len().min(MAX_UNSYNCED_BYTES)];
        let end = if window.len() == rest.len() {
            rest.len()
        } else {
            match window.iter().rposition(|&b| b == b'\n') {
                Some(last_newline) => last_newline + 1,
                // One line longer than a piece: it goes alone.
                None => rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |newline| newline + 1),
            }
        };
        let (piece, after) = rest.split_at(end);
        rest = after;
        Some(piece)
    })
}

/// Parses journal bytes. A final line without its newline is a torn append and is ignored; any
/// whole line (newline included) that does not parse is an error `(line, reason)`: neither a
/// crash nor a copy taken during an append leaves one, since a write cut short ends without
/// its newline, and one cut in the middle leaves the NUL bytes below.
///
/// The NUL bytes at the end of the file, after its last byte of anything else, are the space
/// the writer lays down ahead of its appends ([`SPACE_AHEAD_BYTES`]): they end the data and
/// are no tear. A final line cut short before them is a torn append, as at the end of the file.
///
/// A NUL byte with data after it starts a torn tail: the first line holding one and every
/// line after it are ignored. Records are JSON, which escapes a NUL, so a NUL inside the data
/// is a block whose data never reached the disk: the space written ahead, or a block the file
/// system allocated, that a crash (a power cut) left as it was during an append that no
/// `fdatasync` completed for, since an `fdatasync` makes every earlier write of the file
/// durable. Every byte after it was written later and was not made durable either, so nothing
/// from the hole on was ever acknowledged.
///
/// How much data follows the hole is kept in [`Replay::hole_tail_bytes`]:
/// [`load`](crate::store::load) refuses a journal whose hole cannot be a torn append
/// ([`MAX_UNSYNCED_BYTES`]).
///
/// This reads a live journal ([`Ending::SpaceAhead`]); [`load`](crate::store::load) reads
/// `journal.old` as [`Ending::Cut`], where NUL bytes at the end are a hole like any other.
pub fn parse_journal(bytes: &[u8]) -> Result<Replay, (usize, String)> {
    let mut records = Vec::new();
    let scan = scan_journal(bytes, Ending::SpaceAhead, |entry| {
        records.push(entry);
        Ok::<(), std::convert::Infallible>(())
    });
    match scan {
        Ok(mut replay) => {
            replay.records = records;
            Ok(replay)
        }
        Err(ScanError::Line(line, reason)) => Err((line, reason)),
        // Reading a slice cannot fail, nor can the closure above.
        Err(ScanError::Read(e)) => Err((0, e.to_string())),
        Err(ScanError::Apply(never)) => match never {},
    }
}

/// Why [`scan_journal`] stopped.
#[derive(Debug)]
pub(crate) enum ScanError<E> {
    /// A whole line that does not parse: `(line, reason)`.
    Line(usize, String),
    /// The file could not be read.
    Read(io::Error),
    /// `each` refused a record.
    Apply(E),
}

/// [`parse_journal`] on a reader, handing each record to `each` as it is parsed instead of
/// keeping them: a start replays a journal in the memory of one line. The returned
/// [`Replay`] has no records.
pub(crate) fn scan_journal<E>(
    mut reader: impl io::BufRead,
    ending: Ending,
    mut each: impl FnMut(Entry) -> Result<(), E>,
) -> Result<Replay, ScanError<E>> {
    let mut replay = Replay::default();
    let mut line = Vec::new();
    let mut index = 0;
    // Bytes before this line.
    let mut offset = 0;
    loop {
        line.clear();
        if read_line_to_nul(&mut reader, &mut line).map_err(ScanError::Read)? == 0 {
            return Ok(replay);
        }
        index += 1;
        replay.last_line = index;
        if let Some(first_nul) = line.iter().position(|&b| b == 0) {
            let mut tail = count_tail(&mut reader, &line).map_err(ScanError::Read)?;
            if ending == Ending::Cut {
                if tail.data_end <= first_nul {
                    replay.nul_tail_bytes = Some((tail.bytes - first_nul) as u64);
                }
                tail.all_data();
            }
            end_at_nul(&mut replay, &tail, first_nul, index, offset);
            return Ok(replay);
        }
        offset += line.len() as u64;
        replay.data_bytes = offset;
        let Some(body) = line.strip_suffix(b"\n") else {
            // The last line, cut short: an append that was never acknowledged. (Only the last
            // line can lack its newline, or one holding a NUL, handled above.)
            replay.torn_tail = true;
            return Ok(replay);
        };
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<JournalLine<Record>>(body) {
            Ok(parsed) if parsed.n > MAX_NUMBER => {
                return Err(ScanError::Line(index, LAST_NUMBER.to_owned()))
            }
            Ok(parsed) => each(Entry {
                line: index,
                n: parsed.n,
                record: parsed.record,
            })
            .map_err(ScanError::Apply)?,
            Err(e) => return Err(ScanError::Line(index, e.to_string())),
        }
    }
}

/// Counts `line` (which holds a NUL) and everything `reader` holds after it, without keeping
/// any of it: its lines may be as long as the hole.
fn count_tail(reader: &mut impl io::BufRead, line: &[u8]) -> io::Result<TailCount> {
    let mut tail = TailCount::default();
    tail.add(line);
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) => return Ok(tail),
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        tail.add(chunk);
        let read = chunk.len();
        reader.consume(read);
    }
}

/// Ends `replay` at line `index`, the first holding a NUL (at `first_nul` in it, `offset`
/// bytes into the journal), from the `tail` counted from that line on: the writer's space
/// ahead when nothing but NULs follows the first one (after the whole lines, or after a last
/// line cut short), a zero-filled hole when data comes after it.
fn end_at_nul(replay: &mut Replay, tail: &TailCount, first_nul: usize, index: usize, offset: u64) {
    replay.spare_bytes = (tail.bytes - tail.data_end) as u64;
    replay.data_bytes = offset + tail.data_end as u64;
    if tail.data_end <= first_nul {
        if tail.data_end == 0 {
            replay.last_line = index - 1;
        } else {
            replay.torn_tail = true;
        }
        return;
    }
    replay.torn_tail = true;
    replay.hole_tail_bytes = tail.data_end;
    replay.zero_hole = Some(ZeroHole {
        line: index,
        lines: tail.lines(),
    });
}

/// Appends to `line` the bytes up to and including the next newline, as `read_until` does,
/// or up to and including the first NUL byte if one comes first: what follows a NUL is
/// counted by the caller a chunk at a time, not kept, so a run of NULs (or a hole with long
/// lines after it) costs no memory however long it is. Returns the bytes appended (0: at the
/// end).
fn read_line_to_nul(reader: &mut impl io::BufRead, line: &mut Vec<u8>) -> io::Result<usize> {
    let start = line.len();
    loop {
        let chunk = match reader.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(line.len() - start);
        }
        let (taken, done) = match chunk.iter().position(|&b| b == b'\n' || b == 0) {
            Some(at) => (at + 1, true),
            None => (chunk.len(), false),
        };
        line.extend_from_slice(&chunk[..taken]);
        reader.consume(taken);
        if done {
            return Ok(line.len() - start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The bytes before the trailing NULs (the space written ahead).
    fn data_of(bytes: &[u8]) -> &[u8] {
        &bytes[..bytes
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |last| last + 1)]
    }

    /// What a hole's torn tail is, worked out on the whole bytes: the line number of the first
    /// line of the data holding a NUL, the lines from it to the end of the data, and their
    /// bytes.
    fn hole_of(bytes: &[u8], ending: Ending) -> Option<(usize, usize, usize)> {
        let data = match ending {
            Ending::SpaceAhead => data_of(bytes),
            Ending::Cut => bytes,
        };
        let lines: Vec<&[u8]> = data.split_inclusive(|&b| b == b'\n').collect();
        let at = lines.iter().position(|line| line.contains(&0))?;
        let tail = lines[at..].iter().map(|line| line.len()).sum();
        Some((at + 1, lines.len() - at, tail))
    }

    /// Journal lines for records 1 ..= `count`.
    fn record_lines(count: u64) -> Vec<u8> {
        (1..=count)
            .flat_map(|n| {
                let record = Record::Leave {
                    token: format!("token-{n}"),
                };
                let mut line = serde_json::to_vec(&JournalLine { n, record: &record }).unwrap();
                line.push(b'\n');
                line
            })
            .collect()
    }

    fn scan(bytes: &[u8]) -> Replay {
        parse_journal(bytes).unwrap()
    }

    #[test]
    fn whole_lines_then_the_space_written_ahead_are_no_tear() {
        let lines = record_lines(3);
        let bytes = [lines.as_slice(), &[0; 5000]].concat();
        let replay = scan(&bytes);
        assert_eq!(replay.records.len(), 3);
        assert!(!replay.torn_tail);
        assert_eq!(replay.zero_hole, None);
        assert_eq!(replay.data_bytes, lines.len() as u64);
        assert_eq!(replay.spare_bytes, 5000);
        assert_eq!(replay.last_line, 3);
        // Nothing but space ahead: an empty journal.
        let replay = scan(&[0; 300]);
        assert_eq!((replay.records.len(), replay.torn_tail), (0, false));
        assert_eq!((replay.data_bytes, replay.spare_bytes), (0, 300));
    }

    #[test]
    fn a_line_cut_short_before_the_space_written_ahead_is_a_torn_last_line() {
        let lines = record_lines(3);
        let cut = lines.len() - 10;
        let bytes = [&lines[..cut], &[0; 5000]].concat();
        let replay = scan(&bytes);
        assert_eq!(replay.records.len(), 2);
        assert!(replay.torn_tail);
        assert_eq!(replay.zero_hole, None, "no data after the NULs: no hole");
        assert_eq!(replay.last_line, 3);
        assert_eq!(replay.data_bytes, cut as u64);
    }

    /// A page of an append left unwritten in the space ahead, a later page written: the hole is
    /// measured to the end of the data, not to the end of the space ahead, which would take
    /// every torn append for damage once the space ahead is over [`MAX_UNSYNCED_BYTES`].
    #[test]
    fn a_hole_is_measured_to_the_end_of_the_data_before_the_space_written_ahead() {
        let lines = record_lines(40);
        let (kept, torn) = lines.split_at(record_lines(20).len());
        let mut torn = torn.to_vec();
        torn[5..15].fill(0);
        let bytes = [kept, &torn, &[0; 200_000]].concat();
        let replay = scan(&bytes);
        assert_eq!(replay.records.len(), 20);
        assert!(replay.torn_tail);
        assert_eq!(
            replay.zero_hole,
            Some(ZeroHole {
                line: 21,
                lines: 20
            })
        );
        assert_eq!(replay.hole_tail_bytes, torn.len());
        assert_eq!(replay.spare_bytes, 200_000);
    }

    /// The space written ahead is the mebibyte measured in `crates/bench/NOTES.md`, and the
    /// writer tops it up once less than a quarter of it is left: that quarter still holds a
    /// whole synced piece, so an append of up to [`MAX_UNSYNCED_BYTES`] goes into blocks the
    /// file already has, and its `fdatasync` writes no new file size.
    #[test]
    fn a_quarter_of_the_space_written_ahead_holds_a_whole_synced_piece() {
        assert_eq!(SPACE_AHEAD_BYTES, 1024 * 1024);
        assert!(SPACE_AHEAD_BYTES / 4 >= MAX_UNSYNCED_BYTES as u64);
    }

    /// `read_line_to_nul` appends to what the line holds already and counts only what it
    /// appended, ending at a newline, at a NUL, or at the end of the bytes.
    #[test]
    fn reading_a_line_counts_only_the_bytes_it_appends() {
        let mut reader = io::BufReader::with_capacity(2, &b"ab\ncd\0ef"[..]);
        let mut line = b"held".to_vec();
        assert_eq!(read_line_to_nul(&mut reader, &mut line).unwrap(), 3);
        assert_eq!(line, b"heldab\n");
        assert_eq!(read_line_to_nul(&mut reader, &mut line).unwrap(), 3);
        assert_eq!(line, b"heldab\ncd\0");
        assert_eq!(read_line_to_nul(&mut reader, &mut line).unwrap(), 2);
        assert_eq!(line, b"heldab\ncd\0ef");
        assert_eq!(read_line_to_nul(&mut reader, &mut line).unwrap(), 0);
    }

    /// [`MAX_NUMBER`] is the largest number a record may hold, not the first refused.
    #[test]
    fn a_record_numbered_max_number_parses_and_one_more_is_refused() {
        let line = |n: u64| format!("{{\"n\":{n},\"op\":\"leave\",\"token\":\"x\"}}\n");
        let replay = scan(line(MAX_NUMBER).as_bytes());
        assert_eq!(replay.records.last().map(|e| e.n), Some(MAX_NUMBER));
        let refused = parse_journal(line(MAX_NUMBER + 1).as_bytes()).unwrap_err();
        assert_eq!(refused, (1, LAST_NUMBER.to_owned()));
    }

    /// A reader over `bytes`, handing out at most `step` bytes a call, whose `fill_buf`
    /// number `fail_at` (from 0) fails once with `kind`.
    struct FailsOnce<'a> {
        bytes: &'a [u8],
        step: usize,
        calls: usize,
        fail_at: usize,
        kind: io::ErrorKind,
    }

    impl io::Read for FailsOnce<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = io::BufRead::fill_buf(self)?.len().min(out.len());
            out[..n].copy_from_slice(&self.bytes[..n]);
            io::BufRead::consume(self, n);
            Ok(n)
        }
    }

    impl io::BufRead for FailsOnce<'_> {
        fn fill_buf(&mut self) -> io::Result<&[u8]> {
            self.calls += 1;
            if self.calls - 1 == self.fail_at {
                return Err(io::Error::from(self.kind));
            }
            Ok(&self.bytes[..self.bytes.len().min(self.step)])
        }
        fn consume(&mut self, n: usize) {
            self.bytes = &self.bytes[n..];
        }
    }

    /// Records, then a hole with a line after it: read a few bytes at a time, both the line
    /// reader and the count of the hole's tail call `fill_buf` several times.
    fn holed_journal() -> Vec<u8> {
        let lines = record_lines(3);
        let (kept, torn) = lines.split_at(record_lines(2).len());
        let mut torn = torn.to_vec();
        torn[3..9].fill(0);
        [kept, &torn, &record_lines(1), &[0; 40]].concat()
    }

    /// How `scan_journal` ends on `bytes` read through [`FailsOnce`]: the records' numbers
    /// and the hole, or the read error.
    fn scan_failing_once(
        bytes: &[u8],
        fail_at: usize,
        kind: io::ErrorKind,
    ) -> Result<(Vec<u64>, Option<ZeroHole>), io::ErrorKind> {
        let reader = FailsOnce {
            bytes,
            step: 16,
            calls: 0,
            fail_at,
            kind,
        };
        let mut ns = Vec::new();
        match scan_journal(reader, Ending::SpaceAhead, |entry| {
            ns.push(entry.n);
            Ok::<(), ()>(())
        }) {
            Ok(replay) => Ok((ns, replay.zero_hole)),
            Err(ScanError::Read(e)) => Err(e.kind()),
            Err(e) => panic!("fail_at {fail_at}: {e:?}"),
        }
    }

    /// A read interrupted by a signal (`EINTR`) is retried wherever it falls, in a line or in
    /// a hole's tail: it changes nothing.
    #[test]
    fn an_interrupted_read_is_retried_wherever_it_falls() {
        let bytes = holed_journal();
        let clean = scan_failing_once(&bytes, usize::MAX, io::ErrorKind::Other).unwrap();
        assert_eq!(clean.0, [1, 2]);
        assert_eq!(clean.1, Some(ZeroHole { line: 3, lines: 2 }));
        for fail_at in 0..bytes.len() / 16 + 2 {
            let scan = scan_failing_once(&bytes, fail_at, io::ErrorKind::Interrupted);
            assert_eq!(scan, Ok(clean.clone()), "interrupted at call {fail_at}");
        }
    }

    /// Any other read error stops the scan, in a line or in a hole's tail: it is not taken
    /// for the end of the file, nor retried.
    #[test]
    fn a_read_error_stops_the_scan_wherever_it_falls() {
        let bytes = holed_journal();
        for fail_at in 0..bytes.len() / 16 + 1 {
            let scan = scan_failing_once(&bytes, fail_at, io::ErrorKind::PermissionDenied);
            assert_eq!(
                scan,
                Err(io::ErrorKind::PermissionDenied),
                "failed at call {fail_at}"
            );
        }
    }

    proptest! {
        /// NUL bytes added at the end are space written ahead, whatever came before: the
        /// records, the tear, the hole and the data are those of the bytes without them.
        #[test]
        fn nuls_at_the_end_change_nothing_but_the_space_ahead(
            records in 0u64..6,
            cut in 0usize..400,
            hole in proptest::option::of((0usize..400, 1usize..80)),
            ahead in 0usize..3000,
        ) {
            let mut bytes = record_lines(records);
            bytes.truncate(bytes.len().saturating_sub(cut));
            if let Some((at, len)) = hole {
                let at = at.min(bytes.len());
                let end = (at + len).min(bytes.len());
                bytes[at..end].fill(0);
            }
            let with = [bytes.as_slice(), &vec![0; ahead]].concat();
            let (plain, ahead_too) = (scan(&bytes), scan(&with));
            prop_assert_eq!(
                format!("{:?}", plain.records),
                format!("{:?}", ahead_too.records)
            );
            prop_assert_eq!(plain.torn_tail, ahead_too.torn_tail);
            prop_assert_eq!(plain.zero_hole, ahead_too.zero_hole);
            prop_assert_eq!(plain.hole_tail_bytes, ahead_too.hole_tail_bytes);
            prop_assert_eq!(plain.data_bytes, ahead_too.data_bytes);
            prop_assert_eq!(ahead_too.data_bytes, data_of(&with).len() as u64);
            prop_assert_eq!(ahead_too.spare_bytes, (with.len() - data_of(&with).len()) as u64);
        }

        /// The scan finds a hole, and counts its tail, as the whole bytes split into lines
        /// would, whatever the lines (short, long, blank, cut), wherever the NULs fall, however
        /// the reader cuts the bytes, and for either ending (the live journal's NULs at the
        /// end are space ahead, `journal.old`'s a hole).
        #[test]
        fn a_holes_tail_is_counted_as_its_lines(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(b"\n".to_vec()),
                    Just(b"\0".to_vec()),
                    Just(b" \n".to_vec()),
                    proptest::collection::vec(b'a'..=b'z', 1..300),
                ],
                0..40,
            ),
            capacity in 1usize..64,
            cut: bool,
        ) {
            let bytes = parts.concat();
            let reader = io::BufReader::with_capacity(capacity, &bytes[..]);
            // A whole line without a NUL is no record: the scan stops there, and the case
            // tells nothing about holes.
            let ending = if cut { Ending::Cut } else { Ending::SpaceAhead };
            if let Ok(replay) = scan_journal(reader, ending, |_| Ok::<(), ()>(())) {
                let expected = hole_of(&bytes, ending);
                prop_assert_eq!(
                    replay.zero_hole,
                    expected.map(|(line, lines, _)| ZeroHole { line, lines })
                );
                prop_assert_eq!(replay.hole_tail_bytes, expected.map_or(0, |(.., tail)| tail));
            }
        }
    }
}
