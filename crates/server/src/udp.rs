//! The UDP socket: buffer sizing, sending an [`Outbox`] (packing batch-capable recipients'
//! messages into batch frames), and reading the kernel's drop count.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use mio::net::UdpSocket;
use ucrp::delivery;
use ucrp::MAX_DATAGRAM_LEN;

use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// Asks for socket buffer sizes; returns what the kernel granted `(recv, send)`.
pub fn size_buffers(socket: &UdpSocket, recv: usize, send: usize) -> (usize, usize) {
    let fd = socket.as_raw_fd();
    let set = |opt, bytes: usize| {
        if bytes == 0 {
            return;
        }
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: fd is a live socket; the option value is a c_int of the given size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    };
    let get = |opt| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as above, with a c_int out-parameter and its length.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            usize::try_from(value).unwrap_or(0)
        } else {
            0
        }
    };
    set(libc::SO_RCVBUF, recv);
    set(libc::SO_SNDBUF, send);
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
}

/// Sends everything in `outbox` and clears it. Recipients that accept batches and have
/// several messages waiting in this pass get them packed into batch frames, never delayed:
/// only what is already in the outbox is packed. Order per recipient is kept.
pub struct Sender {
    batches: HashMap<SocketAddr, Vec<u8>>,
    order: Vec<SocketAddr>,
    counts: HashMap<SocketAddr, usize>,
}

impl Default for Sender {
    fn default() -> Self {
        Sender::new()
    }
}

impl Sender {
    /// A sender with empty scratch space.
    pub fn new() -> Sender {
        Sender {
            batches: HashMap::new(),
            order: Vec::new(),
            counts: HashMap::new(),
        }
    }

    /// Sends and clears `outbox`.
    pub fn send_all(&mut self, socket: &UdpSocket, outbox: &mut Outbox, metrics: &mut Metrics) {
        // How many batchable messages each recipient has in this pass.
        self.counts.clear();
        for send in outbox.sends.iter().filter(|s| s.batchable) {
            *self.counts.entry(send.to).or_insert(0) += 1;
        }
        for send in &outbox.sends {
            let bytes = outbox.bytes_of(send);
            let worth_batching =
                send.batchable && self.counts.get(&send.to).is_some_and(|&n| n > 1);
            if !worth_batching {
                // Keep order: whatever is packed for this recipient goes first.
                self.flush_one(socket, send.to, metrics);
                send_one(socket, send.to, bytes, 1, metrics);
                continue;
            }
            let batch = self.batches.entry(send.to).or_insert_with(|| {
                self.order.push(send.to);
                Vec::with_capacity(MAX_DATAGRAM_LEN)
            });
            let entry_len = delivery::BATCH_ENTRY_OVERHEAD + bytes.len();
            let header = if batch.is_empty() {
                delivery::BATCH_HEADER_LEN
            } else {
                0
            };
            if batch.len() + header + entry_len > MAX_DATAGRAM_LEN && !batch.is_empty() {
                let full = std::mem::take(batch);
                let count = count_entries(&full);
                send_one(socket, send.to, &full, count, metrics);
                batch.clear();
            }
            if batch.is_empty() {
                delivery::begin_batch(batch);
            }
            let _ = delivery::push_batch_entry(bytes, batch);
        }
        for to in std::mem::take(&mut self.order) {
            self.flush_one(socket, to, metrics);
        }
        outbox.clear();
    }

    fn flush_one(&mut self, socket: &UdpSocket, to: SocketAddr, metrics: &mut Metrics) {
        if let Some(batch) = self.batches.remove(&to) {
            if !batch.is_empty() {
                let count = count_entries(&batch);
                send_one(socket, to, &batch, count, metrics);
            }
        }
    }
}

fn count_entries(batch: &[u8]) -> usize {
    batch
        .get(delivery::BATCH_HEADER_LEN..)
        .map_or(0, |body| delivery::batch_entries(body).count())
}

fn send_one(
    socket: &UdpSocket,
    to: SocketAddr,
    bytes: &[u8],
    messages: usize,
    metrics: &mut Metrics,
) {
    loop {
        match socket.send_to(bytes, to) {
            Ok(_) => {
                metrics.datagrams_sent += 1;
                metrics.deliveries += messages as u64;
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // UDP gives no guarantee; a full send buffer drops the datagram, counted, and the
            // loop goes on rather than block.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Metrics::bump(&mut metrics.send_errors, "would_block");
                return;
            }
            Err(_) => {
                Metrics::bump(&mut metrics.send_errors, "other");
                return;
            }
        }
    }
}

/// The kernel's count of datagrams dropped on this socket (full receive buffer and other
/// receive errors), from its line in `/proc/net/udp` or `/proc/net/udp6`.
pub fn kernel_drops(socket: &UdpSocket) -> Option<u64> {
    let fd = socket.as_raw_fd();
    // SAFETY: fstat on a live descriptor into a zeroed stat buffer.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return None;
        }
        st.st_ino
    };
    let inode = inode.to_string();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(9) == Some(&inode.as_str()) {
                return fields.last()?.parse().ok();
            }
        }
    }
    None
}
