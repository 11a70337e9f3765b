//! The receiver thread: datagrams from the server (and only from it) handed to the screen,
//! until the room closes.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use log::debug;

use super::session::Session;
use super::{icmp, lock, Ahead, Event};
use crate::error::ClientError;
use crate::feed::MAX_QUEUED_BYTES;
use crate::render::Flow;
use crate::screen::Screen;

/// Receive buffer size, in bytes: room for the largest UDP datagram, so batch frames up to the
/// `max_datagram` announced at join (65507 bytes on loopback) are read whole.
const RECV_BUFFER_LEN: usize = 64 * 1024;

/// Starts the receiver thread. After a datagram that closes the room it goes on receiving
/// (the screen holds what comes until the closure is settled); it stops on an error. Each
/// port unreachable is an [`Event::Refused`]. All of it is sent [`Ahead`] of queued lines.
pub(super) fn spawn_receiver(
    session: &Session,
    screen: Arc<Mutex<Screen>>,
    events: Ahead,
    last_heard: Arc<Mutex<Instant>>,
) -> Result<(), ClientError> {
    let socket = session
        .socket
        .try_clone()
        .map_err(ClientError::io("cloning the UDP socket"))?;
    let server = session.server;
    crate::threads::spawn("receiver", move || loop {
        // The main loop has gone when this fails: the process is ending.
        let mut refused = || drop(events.send(Event::Refused));
        let event = receive(&socket, server, &screen, &last_heard, &mut refused);
        let go_on = matches!(event, Event::RoomClosed);
        if events.send(event).is_err() || !go_on {
            return;
        }
    })
    .map_err(ClientError::io("starting the receiver thread"))?;
    Ok(())
}

/// The remark shown once when datagrams come from the server's port at another address. A
/// server bound to a wildcard address on a host with several addresses may answer from the
/// one its route picks rather than the one we send to (`ocmd` answers from the address our
/// `__REGISTER__` came to, but the original server does not); we ignore such datagrams
/// (anyone could send them), so without this remark the chat would just look silent.
pub(super) fn answered_from_elsewhere(server: SocketAddr, from: SocketAddr) -> String {
    format!(
        "* ignoring datagrams from {from}, the server's port at another address than {server}: \
         a server bound to a wildcard address may answer from another of its addresses"
    )
}

/// Receives and hands each datagram to the screen (noting when in `last_heard`) until the
/// room closes or an error ends it; returns the event that ended it. ICMP errors about our
/// datagrams ([`icmp`]) end nothing: the server may come back. A port unreachable, the
/// server's UDP port closed, is passed to `refused`.
pub(super) fn receive(
    socket: &UdpSocket,
    server: SocketAddr,
    screen: &Mutex<Screen>,
    last_heard: &Mutex<Instant>,
    refused: &mut dyn FnMut(),
) -> Event {
    let mut buf = vec![0u8; RECV_BUFFER_LEN];
    let mut told_of_elsewhere = false;
    loop {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => match on_recv_error(socket, e, refused) {
                Some(end) => return end,
                None => continue,
            },
        };
        if from.ip() != server.ip() || from.port() != server.port() {
            debug!("ignoring {len} bytes from {from}, not the server {server}");
            if from.port() == server.port() && !std::mem::replace(&mut told_of_elsewhere, true) {
                lock(screen).err(&answered_from_elsewhere(server, from));
            }
            continue;
        }
        *lock(last_heard) = Instant::now();
        // `len <= buf.len()`: recv_from never reports more than the buffer holds.
        let (handled, feed) = {
            let mut screen = lock(screen);
            (screen.handle_datagram(&buf[..len]), screen.feed())
        };
        // Outside the lock, which the input thread needs before the editor reads again.
        if let Some(feed) = feed {
            feed.wait_below(MAX_QUEUED_BYTES);
        }
        match handled {
            Ok(Flow::Continue) => {}
            Ok(Flow::RoomClosed) => return Event::RoomClosed,
            Err(source) => {
                return Event::Failed(ClientError::Io {
                    context: "writing to standard output",
                    source,
                })
            }
        }
    }
}

/// What a failed receive means: `None` for an ICMP error about our datagrams, which ends
/// nothing (the server may come back; a closed UDP port is passed to `refused`), else the
/// event that ends the receiver.
fn on_recv_error(socket: &UdpSocket, e: io::Error, refused: &mut dyn FnMut()) -> Option<Event> {
    // An ICMP error waits on the error queue too: take it, or a long outage fills the
    // receive buffer ([`icmp`]).
    let queued = icmp::drain(socket);
    match icmp::report_of(&e) {
        Some(icmp::Report::PortClosed) => {
            debug!("receive: {e}: the server's UDP port is closed");
            refused();
        }
        // The way to the server, not the server: it may come back, and the keepalives and
        // idle check find it.
        Some(icmp::Report::Unreachable) => debug!("receive: {e}"),
        // Another ICMP error the queue held (`EMSGSIZE`, `EHOSTDOWN`, ...).
        None if queued > 0 => debug!("receive: {e} ({queued} ICMP reports)"),
        None => {
            return Some(Event::Failed(ClientError::Io {
                context: "receiving from the server",
                source: e,
            }))
        }
    }
    None
}
