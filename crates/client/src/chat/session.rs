//! A member's UDP endpoint: the socket, and datagrams built with [`ucrp::datagram`].

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use log::{debug, warn};
use ucrp::datagram::{self, LEAVE};

use crate::error::ClientError;
use crate::handshake::Token;

/// A member's UDP endpoint: the socket, the server's chat address and the credentials every
/// datagram carries.
#[derive(Debug)]
pub struct Session {
    pub(super) socket: UdpSocket,
    pub(super) server: SocketAddr,
    pub(super) room_name: String,
    pub(super) token: Token,
    /// Our username's length: the relayed datagram carries it before the text.
    username_len: usize,
}

impl Session {
    /// Binds a UDP socket on an ephemeral port of the server address's family.
    pub fn open(
        server: SocketAddr,
        room_name: &str,
        username: &str,
        token: Token,
    ) -> Result<Session, ClientError> {
        let local = match server {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = UdpSocket::bind(local).map_err(ClientError::io("binding the UDP socket"))?;
        Ok(Session {
            socket,
            server,
            room_name: room_name.to_owned(),
            token,
            username_len: username.len(),
        })
    }

    /// Longest chat message, in bytes, that fits one datagram with our room name and token,
    /// and that the daemon relays: relayed, a size byte and our name come before the text, and
    /// the whole must fit the 4096 bytes an original client reads (longer chat is dropped).
    pub fn max_message_len(&self) -> usize {
        let ours = ucrp::MAX_DATAGRAM_LEN.saturating_sub(
            datagram::FIXED_LEN + self.room_name.len() + self.token.as_bytes().len(),
        );
        let relayed = ucrp::MAX_DATAGRAM_LEN.saturating_sub(1 + self.username_len);
        ours.min(relayed)
    }

    /// Sends chat `text`, unless it is longer than [`Session::max_message_len`] (the daemon
    /// would drop it): then `Ok(Err(TooLarge))` and nothing is sent.
    pub(super) fn send_chat(&self, text: &str) -> io::Result<Result<(), ucrp::Error>> {
        let max = self.max_message_len();
        if text.len() > max {
            return Ok(Err(ucrp::Error::TooLarge {
                len: text.len(),
                max,
            }));
        }
        self.send(text)
    }

    /// Sends one datagram carrying `message` (chat text or a control word). A message that
    /// does not fit is `Ok(Err(..))` from ucrp; a socket error is `Err`.
    pub(super) fn send(&self, message: &str) -> io::Result<Result<(), ucrp::Error>> {
        let mut bytes = Vec::new();
        if let Err(e) = datagram::encode(
            self.room_name.as_bytes(),
            self.token.as_bytes(),
            message,
            &mut bytes,
        ) {
            return Ok(Err(e));
        }
        self.socket.send_to(&bytes, self.server)?;
        Ok(Ok(()))
    }

    /// The same session on a duplicate of the socket, for another thread to send from.
    pub(super) fn duplicate(&self) -> io::Result<Session> {
        Ok(Session {
            socket: self.socket.try_clone()?,
            server: self.server,
            room_name: self.room_name.clone(),
            token: self.token.clone(),
            username_len: self.username_len,
        })
    }

    /// Sends a control word. Room name and token were checked to fit, so only the socket can
    /// fail.
    pub(super) fn send_control(&self, word: &str) -> io::Result<()> {
        match self.send(word)? {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        }
    }

    /// Best-effort `__LEAVE__`: the process is exiting either way.
    pub(super) fn leave(&self) {
        match self.send_control(LEAVE) {
            Ok(()) => debug!("sent {LEAVE} to {}", self.server),
            Err(e) => warn!("could not send {LEAVE} to {}: {e}", self.server),
        }
    }
}
