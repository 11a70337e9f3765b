//! Peer addresses in one form. A dual-stack (`[::]`-bound) socket reports an IPv4 peer as the
//! IPv4-mapped IPv6 address `[::ffff:a.b.c.d]:port`; an IPv4 socket as `a.b.c.d:port`. The
//! daemon keeps every peer address in the canonical form, IPv4 as IPv4, so that a member
//! registered behind one kind of socket is the same member behind the other (a restart that
//! moves `listen.udp` between `127.0.0.1` and `[::]`, or the original server's state file, which
//! holds IPv4 pairs), and converts at the socket: [`canonical`] for what it reads, [`native`]
//! for where it sends.

use std::net::{SocketAddr, SocketAddrV6};

/// `addr` with an IPv4-mapped IPv6 address given as the IPv4 address (same port); any other
/// address as it is (an IPv6 one keeps its flow label and zone).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `to` as a socket of the given family sends to it: an IPv4 address as IPv4-mapped for an
/// IPv6 socket (dual-stack), anything else as it is. (An IPv6 address cannot be reached from
/// an IPv4 socket; the send fails and is counted.)
pub fn native(to: SocketAddr, ipv6_socket: bool) -> SocketAddr {
    match to {
        SocketAddr::V4(v4) if ipv6_socket => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_peer_is_ipv4_whichever_socket_reported_it() {
        let v4: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:5000".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v4), v4);
        assert_eq!(native(v4, true), mapped);
        assert_eq!(native(v4, false), v4);
        assert_eq!(canonical(native(v4, true)), v4);
    }

    #[test]
    fn an_ipv6_peer_keeps_its_zone_and_flow_label() {
        let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::3".parse().unwrap(), 9, 7, 2));
        assert_eq!(canonical(scoped), scoped);
        assert_eq!(native(scoped, true), scoped);
        assert_eq!(native(scoped, false), scoped);
        // Not mapped: an IPv4-compatible address (deprecated) is an IPv6 address.
        let compatible: SocketAddr = "[::192.0.2.7]:9".parse().unwrap();
        assert_eq!(canonical(compatible), compatible);
    }
}
