//! The UDP socket: buffer sizing, sending an [`Outbox`] (packing batch-capable recipients'
//! messages into batch frames, `sendmmsg` underneath), and reading the kernel's drop count.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;

use mio::net::UdpSocket;
use ucrp::delivery;
use ucrp::MAX_DATAGRAM_LEN;

use crate::metrics::Metrics;
use crate::mmsg;
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

/// Batch buffers (4 KiB each) kept for reuse between passes.
const MAX_POOLED_BATCHES: usize = 1024;

/// Sends everything in an [`Outbox`]. Recipients that accept batches and have several
/// messages waiting in this pass get them packed into batch frames, never delayed: only what
/// is already in the outbox is packed. Order per recipient is kept. Datagrams leave through
/// `sendmmsg`, [`mmsg::BATCH`] per system call.
#[derive(Default)]
pub struct Sender {
    /// Datagrams to send, in order: destination, where the bytes are, messages carried.
    plan: Vec<(SocketAddr, Bytes, usize)>,
    /// Batch frames being filled, reused between passes.
    batches: Vec<Vec<u8>>,
    used_batches: usize,
    /// Open batch per recipient: index into `plan`.
    open: HashMap<SocketAddr, usize>,
    counts: HashMap<SocketAddr, usize>,
    scratch: mmsg::SendScratch,
}

#[derive(Clone)]
enum Bytes {
    Outbox(Range<usize>),
    Batch(usize),
}

impl Sender {
    /// A sender with empty scratch space.
    pub fn new() -> Sender {
        Sender::default()
    }

    /// Sends and clears `outbox`.
    pub fn send_all(&mut self, socket: &UdpSocket, outbox: &mut Outbox, metrics: &mut Metrics) {
        self.plan(outbox);
        let datagrams: Vec<(SocketAddr, &[u8])> = self
            .plan
            .iter()
            .map(|(to, bytes, _)| {
                let bytes: &[u8] = match bytes {
                    Bytes::Outbox(range) => &outbox.bytes[range.clone()],
                    Bytes::Batch(i) => &self.batches[*i],
                };
                (*to, bytes)
            })
            .collect();
        let sent = mmsg::send(socket.as_raw_fd(), &datagrams, &mut self.scratch);
        metrics.datagrams_sent += sent.sent as u64;
        // Deliveries: messages carried by the datagrams that went out (they go in order).
        metrics.deliveries += self
            .plan
            .iter()
            .take(sent.sent)
            .map(|(_, _, n)| *n as u64)
            .sum::<u64>();
        if sent.would_block > 0 {
            *metrics.send_errors.entry("would_block").or_insert(0) += sent.would_block as u64;
        }
        if sent.failed > 0 {
            *metrics.send_errors.entry("other").or_insert(0) += sent.failed as u64;
        }
        outbox.clear();
        // Keep a bounded pool of batch buffers between passes.
        self.batches.truncate(MAX_POOLED_BATCHES);
    }

    /// Decides the datagrams: one per send, or batch frames for batchable recipients with
    /// several messages in this pass.
    fn plan(&mut self, outbox: &Outbox) {
        self.plan.clear();
        self.open.clear();
        self.used_batches = 0;
        self.counts.clear();
        for send in outbox.sends.iter().filter(|s| s.batchable) {
            *self.counts.entry(send.to).or_insert(0) += 1;
        }
        for send in &outbox.sends {
            let bytes = outbox.bytes_of(send);
            let worth_batching =
                send.batchable && self.counts.get(&send.to).is_some_and(|&n| n > 1);
            if !worth_batching {
                // Whatever is packed for this recipient stays before this datagram.
                self.open.remove(&send.to);
                self.plan
                    .push((send.to, Bytes::Outbox(send.bytes.clone()), 1));
                continue;
            }
            let entry_len = delivery::BATCH_ENTRY_OVERHEAD + bytes.len();
            let fits = self
                .open
                .get(&send.to)
                .is_some_and(|&p| match &self.plan[p].1 {
                    Bytes::Batch(i) => self.batches[*i].len() + entry_len <= MAX_DATAGRAM_LEN,
                    Bytes::Outbox(_) => false,
                });
            if !fits {
                let index = self.used_batches;
                self.used_batches += 1;
                if self.batches.len() <= index {
                    self.batches.push(Vec::with_capacity(MAX_DATAGRAM_LEN));
                }
                let batch = &mut self.batches[index];
                batch.clear();
                delivery::begin_batch(batch);
                self.open.insert(send.to, self.plan.len());
                self.plan.push((send.to, Bytes::Batch(index), 0));
            }
            let Some(&p) = self.open.get(&send.to) else {
                continue;
            };
            if let (_, Bytes::Batch(i), count) = &mut self.plan[p] {
                let _ = delivery::push_batch_entry(bytes, &mut self.batches[*i]);
                *count += 1;
            }
        }
    }
}

/// The kernel's count of datagrams dropped on this socket (full receive buffer and other
/// receive errors), from its line in `/proc/self/net/udp` or `/proc/self/net/udp6`.
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
    // /proc/self/net, not /proc/net: the unit's ProcSubset=pid hides the latter.
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use ucrp::delivery::Delivery;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn chat(out: &mut Outbox, text: &str) -> Range<usize> {
        out.payload(|b| delivery::encode_chat("s", text.as_bytes(), b).unwrap())
    }

    #[test]
    fn batchable_recipients_get_batches_in_order_and_others_single_datagrams() {
        let mut out = Outbox::default();
        let one = chat(&mut out, "one");
        let two = chat(&mut out, "two");
        let closed = out.payload(|b| b.extend_from_slice(delivery::ROOM_CLOSED));
        out.send(addr(1), one.clone(), true);
        out.send(addr(2), one.clone(), false);
        out.send(addr(1), two.clone(), true);
        out.send(addr(2), two, false);
        out.send(addr(3), one, true); // alone: no batch needed
        out.send(addr(1), closed, false);
        let mut sender = Sender::new();
        sender.plan(&out);
        let shown: Vec<(u16, String, usize)> = sender
            .plan
            .iter()
            .map(|(to, bytes, n)| {
                let b: &[u8] = match bytes {
                    Bytes::Outbox(r) => &out.bytes[r.clone()],
                    Bytes::Batch(i) => &sender.batches[*i],
                };
                let text = match delivery::parse(b).unwrap() {
                    Delivery::Batch(body) => {
                        delivery::batch_entries(body).count().to_string() + " in batch"
                    }
                    Delivery::Chat { message, .. } => message.to_owned(),
                    Delivery::RoomClosed => "closed".into(),
                    other => format!("{other:?}"),
                };
                (to.port(), text, *n)
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                (1, "2 in batch".into(), 2),
                (2, "one".into(), 1),
                (2, "two".into(), 1),
                (3, "one".into(), 1),
                (1, "closed".into(), 1),
            ]
        );
    }

    #[test]
    fn batches_never_exceed_the_datagram_limit() {
        let mut out = Outbox::default();
        let big = chat(&mut out, &"x".repeat(1500));
        for _ in 0..5 {
            out.send(addr(1), big.clone(), true);
        }
        let mut sender = Sender::new();
        sender.plan(&out);
        let sizes: Vec<usize> = sender.plan.iter().map(|(_, _, n)| *n).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        for (_, bytes, _) in &sender.plan {
            if let Bytes::Batch(i) = bytes {
                assert!(sender.batches[*i].len() <= MAX_DATAGRAM_LEN);
            }
        }
    }
}
