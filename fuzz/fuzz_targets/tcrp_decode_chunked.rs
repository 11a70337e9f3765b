//! Feeds a TCRP byte stream to `tcrp::decode` in chunks, the way the server's connection
//! reader does (append what `read` returned, decode frames in a loop, drain the bytes used,
//! stop at the first error), and checks it against decoding the whole stream at once.
//!
//! Input layout: byte 0 gives the number `n` (1..=16) of chunk-size bytes that follow; each
//! of those is a chunk size (1..=256 bytes), used in turn and cycled; byte `n+1` picks the
//! payload cap; the rest is the stream.
//!
//! Properties:
//! - chunked and whole-stream decoding give the same frames, then the same error (or the same
//!   undecoded tail);
//! - `used` is never zero and never beyond the buffer;
//! - `Frame::encode` of a decoded frame gives back exactly the bytes it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcrp::{Error, Frame, Operation, State};

/// Payload caps the fuzzer chooses between: tiny (cap errors are reachable), the default.
const CAPS: [usize; 4] = [0, 7, 64, tcrp::DEFAULT_MAX_PAYLOAD];

#[derive(Debug, PartialEq, Eq)]
struct Owned {
    operation: Operation,
    state: State,
    room_name: Vec<u8>,
    payload: Vec<u8>,
}

impl Owned {
    fn of(frame: &Frame<'_>) -> Owned {
        Owned {
            operation: frame.operation,
            state: frame.state,
            room_name: frame.room_name.to_vec(),
            payload: frame.payload.to_vec(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The stream ended; these bytes were left undecoded.
    NeedMore(Vec<u8>),
    /// Decoding stopped at this error.
    Failed(Error),
}

/// Checks one decoded frame against the bytes it claims to come from.
fn check_frame(buf: &[u8], frame: &Frame<'_>, used: usize) {
    assert!(used > 0, "a decoded frame consumed no bytes");
    assert!(
        used <= buf.len(),
        "used {used} beyond buffer of {}",
        buf.len()
    );
    assert_eq!(used, frame.encoded_len());
    let mut out = Vec::new();
    frame
        .encode(&mut out)
        .expect("a decoded room name fits the size byte");
    assert_eq!(
        out,
        &buf[..used],
        "re-encoding differs from the consumed bytes"
    );
}

fn whole(stream: &[u8], max_payload: usize) -> (Vec<Owned>, End) {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        match tcrp::decode(&stream[pos..], max_payload) {
            Ok(Some((frame, used))) => {
                check_frame(&stream[pos..], &frame, used);
                frames.push(Owned::of(&frame));
                pos += used;
            }
            Ok(None) => return (frames, End::NeedMore(stream[pos..].to_vec())),
            Err(e) => return (frames, End::Failed(e)),
        }
    }
}

fn chunked(stream: &[u8], sizes: &[u8], max_payload: usize) -> (Vec<Owned>, End) {
    let mut frames = Vec::new();
    let mut buf = Vec::new();
    let mut rest = stream;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let size = sizes
            .next()
            .map_or(1, |&s| usize::from(s) + 1)
            .min(rest.len());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        buf.extend_from_slice(chunk);
        loop {
            match tcrp::decode(&buf, max_payload) {
                Ok(Some((frame, used))) => {
                    check_frame(&buf, &frame, used);
                    frames.push(Owned::of(&frame));
                    buf.drain(..used);
                }
                Ok(None) => break,
                Err(e) => return (frames, End::Failed(e)),
            }
        }
    }
    (frames, End::NeedMore(buf))
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, data)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16) + 1;
    if data.len() < n + 1 {
        return;
    }
    let (sizes, data) = data.split_at(n);
    let max_payload = CAPS[usize::from(data[0] % 4)];
    let stream = &data[1..];
    let at_once = whole(stream, max_payload);
    let in_chunks = chunked(stream, sizes, max_payload);
    assert_eq!(at_once, in_chunks, "chunking changed the outcome");
});
