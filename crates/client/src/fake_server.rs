//! An in-memory TCRP server for the unit tests of the handshake and the extension requests:
//! it hands out a scripted reply in chunks, one per `read`, then end of stream, and records
//! everything written to it.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Duration;

use crate::handshake::LimitedRead;

pub struct FakeServer {
    chunks: VecDeque<Vec<u8>>,
    /// Everything the client wrote.
    pub written: Vec<u8>,
    /// Makes every read fail with this kind.
    pub fail_reads_with: Option<io::ErrorKind>,
    /// Reads interrupted (`EINTR`) before the first one that returns anything.
    pub interrupted_reads: usize,
}

impl FakeServer {
    /// A server that hands out `chunks`, one per `read` (a chunk larger than the reader's
    /// buffer goes out over several).
    pub fn new(chunks: Vec<Vec<u8>>) -> FakeServer {
        FakeServer {
            chunks: chunks.into(),
            written: Vec::new(),
            fail_reads_with: None,
            interrupted_reads: 0,
        }
    }

    /// A server that hands out `reply` `size` bytes at a time, to exercise reassembly.
    pub fn in_pieces(reply: &[u8], size: usize) -> FakeServer {
        FakeServer::new(reply.chunks(size).map(<[u8]>::to_vec).collect())
    }
}

impl Read for FakeServer {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(kind) = self.fail_reads_with {
            return Err(kind.into());
        }
        if self.interrupted_reads > 0 {
            self.interrupted_reads -= 1;
            return Err(io::ErrorKind::Interrupted.into());
        }
        let Some(mut chunk) = self.chunks.pop_front() else {
            return Ok(0);
        };
        let n = chunk.len().min(out.len());
        out[..n].copy_from_slice(&chunk[..n]);
        if n < chunk.len() {
            self.chunks.push_front(chunk.split_off(n));
        }
        Ok(n)
    }
}

impl LimitedRead for FakeServer {
    fn limit_next_read(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}

impl Write for FakeServer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_its_chunks_in_order_splitting_those_larger_than_the_read() {
        let mut server = FakeServer::in_pieces(b"abcdefg", 3);
        let mut buf = [0u8; 2];
        let mut got = Vec::new();
        loop {
            let n = server.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.push(buf[..n].to_vec());
        }
        let pieces: Vec<&[u8]> = got.iter().map(Vec::as_slice).collect();
        assert_eq!(pieces, [&b"ab"[..], b"c", b"de", b"f", b"g"]);
        server.write_all(b"xy").unwrap();
        assert_eq!(server.written, b"xy");
    }
}
