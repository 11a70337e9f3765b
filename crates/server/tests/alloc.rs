//! The receive path allocates nothing: `mmsg::Receiver` builds its message headers once, and
//! a receive (with datagrams or without) only refills lengths. A start replays its journal in
//! the memory of a line, not of the file. Measured with a global allocator that counts this
//! thread's allocations and the bytes it holds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

use ocm_server::mmsg::{Receiver, BATCH};

/// The system allocator, counting the allocations of each thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Bytes this thread holds (freed on another thread: still counted), and the most it held.
    static HELD: Cell<(i64, i64)> = const { Cell::new((0, 0)) };
}

/// Counts `change` bytes more (or fewer) held by this thread.
fn hold(change: i64) {
    let _ = HELD.try_with(|held| {
        let (now, peak) = held.get();
        held.set((now + change, peak.max(now + change)));
    });
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        hold(layout.size() as i64);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        hold(-(layout.size() as i64));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        hold(new_size as i64 - layout.size() as i64);
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

/// A journal of churn (joins that left) replays in the memory of a line: the most `load` holds
/// at once is far below the file's size. Reading the file whole and parsing every record
/// before applying them held several times its size (105 MB at the peak for a 32 MB journal,
/// against 5 MB now, measured on `ocmd`'s start).
#[test]
fn a_journal_replays_in_far_less_memory_than_its_size() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = ocm_server::store::Paths::new(&dir.path().join("room_manager.json"));
    let mut journal = std::io::BufWriter::new(std::fs::File::create(&paths.journal).unwrap());
    let host = r#"{"token":"00000000000000000000000000000000","username":"host","joined_from":"127.0.0.1"}"#;
    writeln!(
        journal,
        r#"{{"n":1,"op":"create_room","room":"lobby","host":{host},"created_at":1.5}}"#
    )
    .unwrap();
    let pairs = 20_000;
    for k in 0..pairs {
        let token = format!("{:032x}", k + 1);
        let n = 2 + 2 * k;
        writeln!(
            journal,
            r#"{{"n":{n},"op":"join","room":"lobby","member":{{"token":"{token}","username":"user{k}","joined_from":"127.0.0.1"}}}}"#
        )
        .unwrap();
        writeln!(
            journal,
            r#"{{"n":{},"op":"leave","token":"{token}"}}"#,
            n + 1
        )
        .unwrap();
    }
    drop(journal);
    let size = std::fs::metadata(&paths.journal).unwrap().len() as i64;
    assert!(size > 4_000_000, "{size} bytes");

    let (start, _) = HELD.with(Cell::get);
    HELD.with(|held| held.set((start, start)));
    let loaded = ocm_server::store::load(&paths).expect("load");
    let (_, peak) = HELD.with(Cell::get);

    assert_eq!(loaded.last_seq, 1 + 2 * pairs as u64);
    assert_eq!(loaded.state.tokens.len(), 1, "the host alone is left");
    let most = peak - start;
    assert!(
        most < size / 8,
        "held {most} bytes at once for a {size}-byte journal"
    );
}

/// A journal whose record is followed by a long run of NUL bytes (a sparse file: a
/// `truncate -s`, a bad copy or restore) loads in the memory of a read buffer, as a journal of
/// records does: the run is counted, never kept, whether it is the space ahead (NULs to the
/// end) or a hole (a torn line after it). The first line holding a NUL was read whole, up to
/// the next newline or the end of the file: 64 MiB of NULs held 128 MiB, and 1.5 GiB under
/// `ulimit -v 1048576` aborted `ocmd` (found by a review).
#[test]
fn a_long_run_of_nul_bytes_in_the_journal_is_not_read_into_memory_at_once() {
    use std::io::Write;
    for after in [&b""[..], b"{\"n\":2,\"op\""] {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = ocm_server::store::Paths::new(&dir.path().join("room_manager.json"));
        let mut journal = std::fs::File::create(&paths.journal).unwrap();
        let host = r#"{"token":"00000000000000000000000000000000","username":"host"}"#;
        writeln!(
            journal,
            r#"{{"n":1,"op":"create_room","room":"lobby","host":{host},"created_at":1.5}}"#
        )
        .unwrap();
        // 64 MiB of NUL bytes after the record, without writing them (a sparse file).
        let run: u64 = 64 * 1024 * 1024;
        let len = journal.metadata().unwrap().len();
        journal.set_len(len + run).unwrap();
        std::io::Seek::seek(&mut journal, std::io::SeekFrom::End(0)).unwrap();
        journal.write_all(after).unwrap();
        drop(journal);

        let (start, _) = HELD.with(Cell::get);
        HELD.with(|held| held.set((start, start)));
        let loaded = ocm_server::store::load(&paths).expect("load");
        let (_, peak) = HELD.with(Cell::get);

        assert_eq!(loaded.last_seq, 1);
        assert_eq!(
            loaded.torn_tail,
            !after.is_empty(),
            "NULs at the end are the space ahead"
        );
        let most = peak - start;
        assert!(
            most < 8 * 1024 * 1024,
            "held {most} bytes at once for a journal of one record, {run} NUL bytes and {} \
             more",
            after.len()
        );
    }
}
