//! The daemon's own addresses that datagrams arrive at, so that replies leave from the address
//! the client sent to.
//!
//! Bound to a specific address, the UDP socket answers from it. Bound to a wildcard address
//! (`0.0.0.0`, `::`) on a host with several addresses (a second IPv4 address, a floating VIP,
//! several IPv6 addresses), the kernel would pick each reply's source by route, which need not
//! be the address the client sent to; a client that takes datagrams only from the address it
//! sends to (as `ocm` does) would then hear nothing. So on a wildcard socket the kernel is
//! asked for each datagram's destination (`IP_PKTINFO`, `IPV6_RECVPKTINFO`, read by
//! [`crate::mmsg::Receiver::arrived_at`]), the registry remembers for each member the address
//! its `__REGISTER__` or chat came to, and the sender puts it back as the source of what it
//! sends that member ([`crate::mmsg::send`]).
//!
//! The registry holds a [`LocalId`], two bytes, not the address: [`Locals`] numbers the
//! addresses that datagrams with a live token came to. A host has few; the table stops
//! numbering at [`MAX_LOCALS`] (later ones get [`LocalId::ANY`], the kernel's choice, with a
//! warning), and only unicast addresses are numbered (a datagram to a broadcast or multicast
//! address reaches a wildcard socket too, and such an address cannot be a source). An address
//! the kernel refuses as a source (no longer the host's: a VIP that moved) is retired: that
//! datagram and the next leave by route until a datagram comes to the address again.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::str::FromStr;

use log::warn;

use crate::sockopt;

/// Local addresses numbered at most.
pub const MAX_LOCALS: usize = 256;

/// One of the daemon's addresses: the IP a datagram arrived at, and its interface (needed to
/// send from an IPv6 link-local address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalAddr {
    /// The address (canonical: an IPv4-mapped IPv6 address is kept as IPv4).
    pub ip: IpAddr,
    /// The interface it arrived on (0: unknown).
    pub ifindex: u32,
}

impl LocalAddr {
    /// Whether replies may leave from this address: a unicast one.
    pub fn is_source(&self) -> bool {
        match self.ip {
            IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()),
            IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
        }
    }

    /// The address as a source: the interface counts only for an IPv6 link-local address
    /// (the same address may exist on several links); any other is one address whatever
    /// interface a datagram to it came in on.
    fn as_source(self) -> LocalAddr {
        let scoped = matches!(self.ip, IpAddr::V6(ip) if ip.is_unicast_link_local());
        LocalAddr {
            ifindex: if scoped { self.ifindex } else { 0 },
            ..self
        }
    }
}

/// `192.0.2.1`, or `fe80::1%3` for an address whose interface counts (the state file's form).
impl fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ifindex {
            0 => write!(f, "{}", self.ip),
            ifindex => write!(f, "{}%{ifindex}", self.ip),
        }
    }
}

impl FromStr for LocalAddr {
    type Err = std::net::AddrParseError;

    /// Reads what [`LocalAddr`]'s `Display` writes; an interface that is not a number reads as
    /// none.
    fn from_str(text: &str) -> Result<LocalAddr, Self::Err> {
        let (ip, ifindex) = text.split_once('%').unwrap_or((text, ""));
        Ok(LocalAddr {
            ip: ip.parse::<IpAddr>()?.to_canonical(),
            ifindex: ifindex.parse().unwrap_or(0),
        })
    }
}

/// Serde for an optional [`LocalAddr`] as its text, in journal records and the state file. A
/// value that does not parse (a hand-edited file) reads as none: the member is then answered
/// by route until it registers or chats again.
pub mod optional_text {
    use super::LocalAddr;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `Some` as its text (fields that hold `None` are skipped by their attribute).
    pub fn serialize<S: Serializer>(addr: &Option<LocalAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(a) => s.collect_str(a),
            None => s.serialize_none(),
        }
    }

    /// Reads the text, or anything else as `None`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LocalAddr>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            Text(String),
            Other(serde::de::IgnoredAny),
        }
        Ok(match Option::<Any>::deserialize(d)? {
            Some(Any::Text(text)) => text.parse().ok(),
            Some(Any::Other(_)) | None => None,
        })
    }
}

/// The number of a [`LocalAddr`] in [`Locals`]; [`LocalId::ANY`] lets the kernel choose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LocalId(u16);

impl LocalId {
    /// No address known: the kernel picks the source (a socket bound to one address, a
    /// member that has sent nothing to a wildcard-bound one since it was saved).
    pub const ANY: LocalId = LocalId(0);
}

/// The local addresses seen, numbered from 1.
#[derive(Debug, Default)]
pub struct Locals {
    /// Each numbered address, and whether the kernel still takes it as a source.
    addrs: Vec<(LocalAddr, bool)>,
    ids: HashMap<LocalAddr, LocalId>,
    /// The table filled up, and it was said.
    told_full: bool,
    /// Addresses retired so far (one counted again each time it comes back and is refused).
    retired: u64,
}

impl Locals {
    /// The number of `addr`, numbering it if new (and taking it as a source again if it was
    /// retired: a datagram just came to it); [`LocalId::ANY`] for an address that cannot be a
    /// source, none, or one past [`MAX_LOCALS`].
    pub fn id(&mut self, addr: Option<LocalAddr>) -> LocalId {
        let Some(addr) = addr.filter(LocalAddr::is_source).map(LocalAddr::as_source) else {
            return LocalId::ANY;
        };
        if let Some(&id) = self.ids.get(&addr) {
            if let Some((_, live)) = self.addrs.get_mut(usize::from(id.0) - 1) {
                *live = true;
            }
            return id;
        }
        if self.addrs.len() >= MAX_LOCALS {
            if !std::mem::replace(&mut self.told_full, true) {
                warn!(
                    "UDP: {MAX_LOCALS} local addresses numbered; members that register with \
                     another ({}) are answered from the address the route picks",
                    addr.ip
                );
            }
            return LocalId::ANY;
        }
        self.addrs.push((addr, true));
        // At most MAX_LOCALS (256) entries: the count fits.
        let id = LocalId(self.addrs.len() as u16);
        self.ids.insert(addr, id);
        id
    }

    /// The number `addr` already has, without numbering it: [`LocalId::ANY`] if it has none.
    /// For replies to datagrams without a live token, so that they cannot fill the table. A
    /// retired address is taken as a source again, as by [`Locals::id`]: a datagram just came
    /// to it.
    pub fn known(&mut self, addr: Option<LocalAddr>) -> LocalId {
        let Some(addr) = addr.filter(LocalAddr::is_source).map(LocalAddr::as_source) else {
            return LocalId::ANY;
        };
        let Some(&id) = self.ids.get(&addr) else {
            return LocalId::ANY;
        };
        if let Some((_, live)) = self.addrs.get_mut(usize::from(id.0) - 1) {
            *live = true;
        }
        id
    }

    /// The address numbered `id`, if the kernel still takes it as a source; `None` for
    /// [`LocalId::ANY`], a retired address, or a number never given.
    pub fn get(&self, id: LocalId) -> Option<LocalAddr> {
        let (addr, live) = usize::from(id.0)
            .checked_sub(1)
            .and_then(|i| self.addrs.get(i))?;
        live.then_some(*addr)
    }

    /// The address numbered `id`, retired or not; `None` for [`LocalId::ANY`] or a number never
    /// given.
    pub fn address(&self, id: LocalId) -> Option<LocalAddr> {
        let (addr, _) = usize::from(id.0)
            .checked_sub(1)
            .and_then(|i| self.addrs.get(i))?;
        Some(*addr)
    }

    /// Stops sending from `id`'s address: the kernel refused it as a source (it is no longer
    /// one of the host's). Its members are answered by route until a datagram comes to it
    /// again ([`Locals::id`]).
    pub fn retire(&mut self, id: LocalId) {
        let Some((addr, live)) = usize::from(id.0)
            .checked_sub(1)
            .and_then(|i| self.addrs.get_mut(i))
        else {
            return;
        };
        if std::mem::replace(live, false) {
            self.retired += 1;
            warn!(
                "UDP: the kernel refuses {} as a source (no longer an address of this host?); \
                 its members are answered from the address the route picks until a datagram \
                 comes to it again",
                addr.ip
            );
        }
    }

    /// Whether a numbered address, retired or not, is one `matches` accepts.
    pub fn any(&self, matches: impl Fn(LocalAddr) -> bool) -> bool {
        self.addrs.iter().any(|&(addr, _)| matches(addr))
    }

    /// How many addresses are numbered.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// How many numbered addresses are still taken as sources.
    pub fn live(&self) -> usize {
        self.addrs.iter().filter(|(_, live)| *live).count()
    }

    /// How many times an address was retired.
    pub fn retired(&self) -> u64 {
        self.retired
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

/// Whether a socket bound to `addr` needs the arrival address of each datagram to answer from
/// it: a wildcard address.
pub fn needs_arrival_address(addr: SocketAddr) -> bool {
    // `[::ffff:0.0.0.0]` is the IPv4 wildcard to the kernel.
    addr.ip().to_canonical().is_unspecified()
}

/// Asks the kernel to report each datagram's destination address on `fd`, a UDP socket bound
/// to a wildcard address of `addr`'s family (both kinds on an IPv6 socket, which may also
/// receive IPv4 datagrams).
pub fn enable_arrival_address(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    if addr.is_ipv6() {
        sockopt::set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        // An IPv6-only socket refuses the IPv4 option; nothing arrives over IPv4 then.
        let _ = sockopt::set_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
        Ok(())
    } else {
        sockopt::set_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(a: [u8; 4]) -> Option<LocalAddr> {
        Some(LocalAddr {
            ip: IpAddr::from(a),
            ifindex: 1,
        })
    }

    #[test]
    fn unicast_addresses_are_numbered_once_and_others_are_the_kernels_choice() {
        let mut locals = Locals::default();
        let a = locals.id(v4([192, 0, 2, 1]));
        let b = locals.id(v4([192, 0, 2, 2]));
        assert_ne!(a, LocalId::ANY);
        assert_ne!(a, b);
        assert_eq!(locals.id(v4([192, 0, 2, 1])), a);
        assert_eq!(
            locals.get(a).map(|l| l.ip),
            Some(IpAddr::from([192, 0, 2, 1]))
        );
        assert_eq!(
            locals.get(b).map(|l| l.ip),
            Some(IpAddr::from([192, 0, 2, 2]))
        );
        assert_eq!(locals.get(LocalId::ANY), None);
        assert_eq!(locals.get(LocalId(77)), None);
        for not_a_source in [
            v4([255, 255, 255, 255]),
            v4([224, 0, 0, 1]),
            v4([0, 0, 0, 0]),
            Some(LocalAddr {
                ip: IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)),
                ifindex: 2,
            }),
            None,
        ] {
            assert_eq!(locals.id(not_a_source), LocalId::ANY, "{not_a_source:?}");
        }
        assert_eq!(locals.len(), 2);
    }

    #[test]
    fn an_address_is_one_whatever_interface_unless_ipv6_link_local() {
        let mut locals = Locals::default();
        let on = |ip: IpAddr, ifindex| Some(LocalAddr { ip, ifindex });
        let global = IpAddr::from([192, 0, 2, 1]);
        assert_eq!(locals.id(on(global, 1)), locals.id(on(global, 7)));
        assert_eq!(
            locals
                .get(
                    locals.ids[&LocalAddr {
                        ip: global,
                        ifindex: 0
                    }]
                )
                .unwrap()
                .ifindex,
            0
        );
        let link_local = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));
        let (a, b) = (locals.id(on(link_local, 2)), locals.id(on(link_local, 3)));
        assert_ne!(a, b);
        assert_eq!(locals.get(b).map(|l| l.ifindex), Some(3));
    }

    #[test]
    fn a_retired_address_is_sent_from_again_once_a_datagram_comes_to_it() {
        let mut locals = Locals::default();
        let vip = v4([192, 0, 2, 9]);
        let id = locals.id(vip);
        locals.retire(id);
        assert_eq!(locals.get(id), None);
        assert_eq!(locals.address(id), vip.map(LocalAddr::as_source));
        assert_eq!((locals.live(), locals.retired()), (0, 1));
        locals.retire(id);
        locals.retire(LocalId::ANY);
        assert_eq!(locals.retired(), 1, "retired once until it comes back");
        assert_eq!(locals.id(vip), id);
        assert_eq!(locals.get(id), vip.map(LocalAddr::as_source));
        assert_eq!(locals.live(), 1);
        // A datagram with a dead token coming to it does the same, and numbers nothing new.
        locals.retire(id);
        assert_eq!(locals.known(vip), id);
        assert_eq!(locals.get(id), vip.map(LocalAddr::as_source));
        assert_eq!(locals.known(v4([192, 0, 2, 10])), LocalId::ANY);
        assert_eq!(locals.len(), 1);
    }

    #[test]
    fn a_table_is_empty_until_an_address_is_numbered() {
        let mut locals = Locals::default();
        assert!(locals.is_empty());
        locals.id(v4([255, 255, 255, 255]));
        assert!(locals.is_empty(), "a broadcast address is not numbered");
        let id = locals.id(v4([192, 0, 2, 1]));
        assert!(!locals.is_empty());
        locals.retire(id);
        assert!(!locals.is_empty(), "a retired address stays numbered");
    }

    #[test]
    fn numbering_stops_at_the_cap() {
        let mut locals = Locals::default();
        for i in 0..MAX_LOCALS {
            let ip = Ipv4Addr::from(0x0a00_0001 + i as u32);
            let id = locals.id(v4(ip.octets()));
            assert_ne!(id, LocalId::ANY);
            assert_eq!(locals.get(id).map(|a| a.ip), Some(IpAddr::V4(ip)));
        }
        assert_eq!(locals.id(v4([10, 9, 9, 9])), LocalId::ANY);
        assert_eq!(locals.len(), MAX_LOCALS);
    }

    #[test]
    fn addresses_are_written_as_text_and_read_back() {
        let link_local = LocalAddr {
            ip: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
            ifindex: 3,
        };
        for (addr, text) in [
            (v4([192, 0, 2, 1]).map(|a| a.as_source()), "192.0.2.1"),
            (Some(link_local), "fe80::1%3"),
        ] {
            let addr = addr.unwrap();
            assert_eq!(addr.to_string(), text);
            assert_eq!(text.parse::<LocalAddr>(), Ok(addr));
        }
        // A v4-mapped address reads as IPv4, as arrival addresses are kept; a bad interface
        // reads as none.
        assert_eq!(
            "::ffff:127.0.0.2%x".parse::<LocalAddr>(),
            Ok(LocalAddr {
                ip: IpAddr::from([127, 0, 0, 2]),
                ifindex: 0
            })
        );
        assert!("127.0.0.300".parse::<LocalAddr>().is_err());
    }

    #[test]
    fn only_wildcard_binds_ask_for_arrival_addresses() {
        assert!(needs_arrival_address("0.0.0.0:9091".parse().unwrap()));
        assert!(needs_arrival_address("[::]:9091".parse().unwrap()));
        assert!(needs_arrival_address(
            "[::ffff:0.0.0.0]:9091".parse().unwrap()
        ));
        assert!(!needs_arrival_address("127.0.0.1:9091".parse().unwrap()));
        assert!(!needs_arrival_address("[::1]:9091".parse().unwrap()));
    }

    /// The count of retirements starts at 0, and counts each address retired, and each
    /// time one is retired again after a datagram came to it.
    #[test]
    fn each_retirement_of_an_address_is_counted_from_zero() {
        let mut locals = Locals::default();
        assert_eq!(locals.retired(), 0);
        let (a, b) = (locals.id(v4([192, 0, 2, 1])), locals.id(v4([192, 0, 2, 2])));
        assert_eq!(locals.retired(), 0, "numbering retires none");
        locals.retire(a);
        locals.retire(b);
        assert_eq!((locals.retired(), locals.live()), (2, 0));
        assert_eq!(locals.id(v4([192, 0, 2, 1])), a);
        locals.retire(a);
        assert_eq!((locals.retired(), locals.live()), (3, 0));
    }
}
