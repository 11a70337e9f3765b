//! The receive path allocates nothing: `mmsg::Receiver` builds its message headers once, and
//! a receive (with datagrams or without) only refills lengths. Measured with a global
//! allocator that counts this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

use ocm_server::mmsg::{Receiver, BATCH};

/// The system allocator, counting the allocations of each thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn receiving_allocates_nothing_and_survives_a_move() {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let to = socket.local_addr().expect("address");
    let receiver = Receiver::new(4097);
    // Moved (into a box) after it was built: its headers still point at its buffers.
    let mut receiver = Box::new(receiver);
    let messages: Vec<Vec<u8>> = (0..3u8)
        .map(|i| vec![b'a' + i; 100 + usize::from(i)])
        .collect();
    for m in &messages {
        sender.send_to(m, to).expect("send");
    }

    let before = allocations();
    let mut got = 0;
    let mut lengths = [0usize; 3];
    // Loopback delivers inside `send_to`; a few tries cover a scheduler hiccup.
    for _ in 0..1000 {
        match receiver.recv(socket.as_raw_fd(), BATCH) {
            Ok(n) => {
                for i in 0..n {
                    let (from, bytes) = receiver.datagram(i).expect("datagram");
                    assert_eq!(from, sender.local_addr().expect("address"));
                    lengths[got] = bytes.len();
                    assert_eq!(bytes, &messages[got][..]);
                    got += 1;
                }
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        }
        if got == messages.len() {
            break;
        }
    }
    // Then a thousand receives that find nothing.
    for _ in 0..1000 {
        let empty = receiver.recv(socket.as_raw_fd(), BATCH);
        assert!(matches!(&empty, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }
    let allocated = allocations() - before;

    assert_eq!(got, messages.len());
    assert_eq!(lengths, [100, 101, 102]);
    assert_eq!(allocated, 0, "allocations on the receive path");
}
