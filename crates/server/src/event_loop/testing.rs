//! What the loop's unit tests share: a server bound on loopback ports of its own, whose loop
//! is not run (the tests call its steps by hand), and connections put in its table.

use std::net::TcpStream;
use std::path::Path;

use super::{ConnId, Server};
use crate::config::{Config, Overrides};
use crate::conn::testing::loopback;

/// A server with `config`, on loopback ports of its own, its state in `dir`, without a
/// metrics listener; its loop is not run.
pub(super) fn on_loopback(dir: &Path, config: Config) -> Server {
    let overrides = Overrides {
        tcp: Some("127.0.0.1:0".parse().expect("an address")),
        udp: Some("127.0.0.1:0".parse().expect("an address")),
        state: Some(dir.join("room_manager.json")),
        metrics: Some("off".into()),
        ..Overrides::default()
    };
    Server::bind(config, None, overrides).expect("a server on loopback")
}

/// A loopback connection put in `server`'s table (not registered with its poll), and its
/// peer's end.
pub(super) fn add_conn(server: &mut Server) -> (TcpStream, ConnId) {
    let (peer, conn) = loopback();
    (peer, ConnId(server.conns.insert(conn)))
}
