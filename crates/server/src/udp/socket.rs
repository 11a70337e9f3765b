//! The UDP socket's kernel side: the buffer sizes asked for and granted, and the count of
//! datagrams the kernel dropped before the daemon read them.

use std::os::fd::AsRawFd;

use mio::net::UdpSocket;

use crate::sockopt;

/// Asks for socket buffer sizes; returns what the kernel granted `(recv, send)`.
pub fn size_buffers(socket: &UdpSocket, recv: usize, send: usize) -> (usize, usize) {
    let fd = socket.as_raw_fd();
    let set = |opt, bytes: usize| {
        if bytes == 0 {
            return;
        }
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // A refusal shows in what `get` then reads back.
        let _ = sockopt::set_int(fd, libc::SOL_SOCKET, opt, value);
    };
    let get = |opt| {
        sockopt::get_int(fd, libc::SOL_SOCKET, opt).map_or(0, |v| usize::try_from(v).unwrap_or(0))
    };
    set(libc::SO_RCVBUF, recv);
    set(libc::SO_SNDBUF, send);
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
}

/// The kernel's drop count for a UDP socket as a 64-bit total. The kernel keeps a 32-bit
/// count (`sk_drops`, printed as `%u`), which wraps after 2^32 drops: read as is, the metric
/// would go backwards.
#[derive(Debug, Default)]
pub struct KernelDrops {
    /// The kernel's count at the last reading.
    raw: u32,
    /// Drops since the socket was made.
    total: u64,
}

impl KernelDrops {
    /// Takes a reading of the kernel's count; returns the total so far.
    pub fn observe(&mut self, raw: u32) -> u64 {
        self.total += u64::from(raw.wrapping_sub(self.raw));
        self.raw = raw;
        self.total
    }

    /// The total so far.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The kernel's count of datagrams dropped on this socket before they were read (a full
/// receive buffer mostly; also bad checksums and memory pressure), 32 bits and wrapping
/// ([`KernelDrops`]): asked of the socket itself ([`sockopt::drops`]), one system call
/// whatever else the host runs. Where the kernel cannot say (before Linux 4.12), from the
/// socket's line in `/proc/self/net/udp` or `/proc/self/net/udp6`, for which the kernel
/// prints every UDP socket of the network namespace: on a host with many, a pause of the
/// event loop, which reads the count every few seconds and at each scrape.
pub fn kernel_drops(socket: &UdpSocket) -> Option<u32> {
    sockopt::drops(socket.as_raw_fd())
        .ok()
        .or_else(|| kernel_drops_listed(socket))
}

/// [`kernel_drops`] from the socket's line in `/proc/self/net/udp` or `/proc/self/net/udp6`.
fn kernel_drops_listed(socket: &UdpSocket) -> Option<u32> {
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
    use super::KernelDrops;

    /// The total goes on through the kernel's 32-bit count wrapping.
    #[test]
    fn the_total_goes_on_when_the_kernels_count_wraps() {
        let mut drops = KernelDrops::default();
        assert_eq!(drops.observe(0), 0);
        assert_eq!(drops.observe(10), 10);
        assert_eq!(drops.observe(u32::MAX - 5), u64::from(u32::MAX) - 5);
        // Wrapped: 6 up to 2^32, then 4 more.
        assert_eq!(drops.observe(4), u64::from(u32::MAX) + 5);
        assert_eq!(drops.observe(4), u64::from(u32::MAX) + 5, "no new drops");
        assert_eq!(drops.total(), u64::from(u32::MAX) + 5);
    }

    /// The count read is this socket's: datagrams that found its receive queue full, and
    /// none for another socket.
    #[test]
    fn the_drops_read_are_those_of_this_socket() {
        use super::kernel_drops;
        use mio::net::UdpSocket;
        use std::os::fd::AsRawFd;
        let localhost = "127.0.0.1:0".parse().unwrap();
        let (quiet, flooded) = (UdpSocket::bind(localhost), UdpSocket::bind(localhost));
        let (quiet, flooded) = (quiet.unwrap(), flooded.unwrap());
        // The smallest receive buffer the kernel allows: room for two or three of these.
        let fd = flooded.as_raw_fd();
        crate::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 1).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        const SENT: usize = 50;
        for _ in 0..SENT {
            // Loopback delivers within the send: queued or dropped by the time it returns.
            sender
                .send_to(&[0x5a; 1000], flooded.local_addr().unwrap())
                .unwrap();
        }
        let mut buf = [0u8; 1024];
        let mut received = 0;
        while flooded.recv_from(&mut buf).is_ok() {
            received += 1;
        }
        let dropped = SENT - received;
        assert!(dropped >= 2, "only {dropped} of {SENT} dropped");
        let dropped = u32::try_from(dropped).ok();
        assert_eq!(kernel_drops(&flooded), dropped);
        assert_eq!(kernel_drops(&quiet), Some(0));
        // Asked of the socket, and read from the kernel's list: the same count.
        assert_eq!(super::kernel_drops_listed(&flooded), dropped);
        assert_eq!(crate::sockopt::drops(flooded.as_raw_fd()).ok(), dropped);
        assert_eq!(super::kernel_drops_listed(&quiet), Some(0));
    }
}
