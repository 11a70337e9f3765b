//! The journal's lines: a record and its sequence number per line, read back with what a
//! crash can leave at the end (a torn last line, a zero-filled hole), and the pieces the
//! writer syncs one by one so that a crash can leave no more than one unsynced. How the
//! records are replayed on a state file is [`crate::store::load`]'s; see
//! `docs/PERSISTENCE.md`.

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
    /// Bytes from the start of the hole's line to the end of the file (0 without a hole).
    pub hole_tail_bytes: usize,
    /// The number of the last line read: a torn last line's, when the tail was torn there
    /// (with a zero-filled hole, the hole's line: the rest is counted, not read as lines).
    pub last_line: usize,
}

/// Where a journal's zero-filled hole starts: the first line holding a NUL byte. That line and
/// every line after it are a torn tail, ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroHole {
    /// 1-based number of the first line holding a NUL byte.
    pub line: usize,
    /// How many lines were ignored: that line and those after it.
    pub lines: usize,
}

/// The most a journal append leaves unsynced: the writer syncs its bytes in pieces of at most
/// this many ([`sync_pieces`]), so a crash tears at most the last piece. A zero-filled hole
/// with more than this after its start, over more than one line, is not a torn append:
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
/// A NUL byte starts a torn tail wherever it is: the first line holding one and every line
/// after it are ignored. The writer never writes a NUL (records are JSON, which escapes it),
/// so a NUL on disk is a block the file system allocated but whose data never reached the
/// disk: a crash (a power cut) during an append that no `fdatasync` completed for, since an
/// `fdatasync` makes every earlier write of the file durable. Every byte after it was written
/// later and was not made durable either, so nothing from the hole on was ever acknowledged.
///
/// How much follows the hole is kept in [`Replay::hole_tail_bytes`]: [`load`](crate::store::load) refuses a
/// journal whose hole cannot be a torn append ([`MAX_UNSYNCED_BYTES`]).
pub fn parse_journal(bytes: &[u8]) -> Result<Replay, (usize, String)> {
    let mut records = Vec::new();
    let scan = scan_journal(bytes, |entry| {
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
    mut each: impl FnMut(Entry) -> Result<(), E>,
) -> Result<Replay, ScanError<E>> {
    let mut replay = Replay::default();
    let mut line = Vec::new();
    let mut index = 0;
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .map_err(ScanError::Read)?
            == 0
        {
            return Ok(replay);
        }
        index += 1;
        replay.last_line = index;
        if line.contains(&0) {
            // This line and every one after it: the torn tail, counted without being kept
            // (its lines may be as long as the hole). The rest's lines are its newlines, and
            // one more if it ends without one.
            let (mut newlines, mut rest, mut last) = (0, 0, b'\n');
            loop {
                let chunk = match reader.fill_buf() {
                    Ok([]) => break,
                    Ok(chunk) => chunk,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ScanError::Read(e)),
                };
                newlines += chunk.iter().filter(|&&b| b == b'\n').count();
                last = chunk[chunk.len() - 1];
                rest += chunk.len();
                let read = chunk.len();
                reader.consume(read);
            }
            let lines = 1 + newlines + usize::from(last != b'\n');
            let bytes = line.len() + rest;
            replay.torn_tail = true;
            replay.hole_tail_bytes = bytes;
            replay.zero_hole = Some(ZeroHole { line: index, lines });
            return Ok(replay);
        }
        let Some(body) = line.strip_suffix(b"\n") else {
            // The last line, cut short: an append that was never acknowledged. (Only the last
            // line can lack its newline: `read_until` stops only at one or at the end.)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a hole's torn tail is, worked out on the whole bytes: the line number of the first
    /// line holding a NUL, the lines from it to the end, and their bytes.
    fn hole_of(bytes: &[u8]) -> Option<(usize, usize, usize)> {
        let lines: Vec<&[u8]> = bytes.split_inclusive(|&b| b == b'\n').collect();
        let at = lines.iter().position(|line| line.contains(&0))?;
        let tail = lines[at..].iter().map(|line| line.len()).sum();
        Some((at + 1, lines.len() - at, tail))
    }

    proptest! {
        /// The scan counts a hole's tail as the whole bytes split into lines would, whatever
        /// the lines (short, long, blank, cut), wherever the NULs fall and however the reader
        /// cuts the bytes.
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
        ) {
            let bytes = parts.concat();
            let reader = io::BufReader::with_capacity(capacity, &bytes[..]);
            // A whole line without a NUL is no record: the scan stops there, and the case
            // tells nothing about holes.
            if let Ok(replay) = scan_journal(reader, |_| Ok::<(), ()>(())) {
                match hole_of(&bytes) {
                    Some((line, lines, tail)) if replay.zero_hole.is_some() => {
                        prop_assert_eq!(replay.zero_hole, Some(ZeroHole { line, lines }));
                        prop_assert_eq!(replay.hole_tail_bytes, tail);
                    }
                    _ => prop_assert!(replay.zero_hole.is_none()),
                }
            }
        }
    }
}
