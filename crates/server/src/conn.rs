//! One TCP connection: its buffers, its deadline, and the replies waiting for durability.
//!
//! Input is read into `input` and decoded by the loop frame by frame. Replies are queued in
//! order; a reply that carries a new token waits in `held` until the journal batch holding
//! its record is durable, and every later reply on the same connection waits behind it, so
//! pipelined requests are answered in order.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;
use mio::Interest;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCRP handshakes.
    Tcrp,
    /// HTTP for `/metrics` and `/healthz`.
    Http,
}

/// Result of reading what the socket has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The socket is drained for now.
    WouldBlock,
    /// The input buffer reached its cap; process it and read again.
    Full,
    /// The peer closed its side.
    Eof,
}

/// A TCP connection.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Protocol spoken.
    pub kind: Kind,
    /// Bytes read and not yet decoded.
    pub input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    held: VecDeque<(u64, Vec<u8>)>,
    /// When the connection is closed unless a frame completes first.
    pub deadline: Instant,
    /// The peer has closed its sending side.
    pub read_closed: bool,
    /// Close once the output is flushed.
    pub close_after_flush: bool,
    /// The interest currently registered with the poll.
    pub interest: Interest,
    /// The ticket of the password check the first buffered frame waits for.
    pub awaiting_password: Option<u64>,
}

impl Conn {
    /// Wraps an accepted stream.
    pub fn new(stream: TcpStream, peer: SocketAddr, kind: Kind, deadline: Instant) -> Conn {
        Conn {
            stream,
            peer,
            kind,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            held: VecDeque::new(),
            deadline,
            read_closed: false,
            close_after_flush: false,
            interest: Interest::READABLE,
            awaiting_password: None,
        }
    }

    /// Reads until the socket would block, the peer closes, or `input` holds `cap` bytes.
    pub fn fill(&mut self, cap: usize) -> io::Result<Filled> {
        let mut chunk = [0u8; 4096];
        loop {
            if self.input.len() >= cap {
                return Ok(Filled::Full);
            }
            let want = chunk.len().min(cap - self.input.len());
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    self.read_closed = true;
                    return Ok(Filled::Eof);
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Filled::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues a reply that may leave now, or after `wait_for` is durable; keeps order.
    pub fn queue(&mut self, bytes: Vec<u8>, wait_for: Option<u64>) {
        match (wait_for, self.held.back()) {
            (Some(batch), _) => self.held.push_back((batch, bytes)),
            // Something earlier is held: wait behind it.
            (None, Some(&(batch, _))) => self.held.push_back((batch, bytes)),
            (None, None) => self.output.extend_from_slice(&bytes),
        }
    }

    /// Moves replies whose batch is durable to the output.
    pub fn release(&mut self, durable: u64) {
        while let Some((batch, _)) = self.held.front() {
            if *batch > durable {
                break;
            }
            if let Some((_, bytes)) = self.held.pop_front() {
                self.output.extend_from_slice(&bytes);
            }
        }
    }

    /// Whether replies wait for durability.
    pub fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// Unsent bytes, held replies included.
    pub fn pending_bytes(&self) -> usize {
        self.output.len() - self.written + self.held.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// Writes queued output until done or the socket would block.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.written = 0;
        Ok(())
    }

    /// Whether output is waiting for the socket.
    pub fn wants_write(&self) -> bool {
        self.written < self.output.len()
    }

    /// Whether the connection has nothing left to do and should be closed.
    pub fn finished(&self) -> bool {
        let idle = !self.wants_write() && self.held.is_empty() && self.awaiting_password.is_none();
        idle && (self.close_after_flush || self.read_closed)
    }

    /// The interest the connection needs now: WRITABLE only while output is queued.
    pub fn desired_interest(&self) -> Interest {
        if self.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }
}
