//! A member's UDP endpoint: the socket, datagrams built with [`ucrp::datagram`], and the
//! end of the session, after which nothing registers us again.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, warn};
use ucrp::datagram::{self, LEAVE, REGISTER};

use super::{icmp, Event};
use crate::error::ClientError;
use crate::handshake::Token;
use crate::locks;

/// Why [`Session::send_chat`] sent nothing although the socket did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unsent {
    /// The message is longer than [`Session::max_message_len`]: the daemon would drop it.
    MessageTooLong {
        /// The message's length in bytes.
        len: usize,
        /// The longest message that is relayed, in bytes.
        max: usize,
    },
    /// The datagram could not be encoded.
    Encode(ucrp::Error),
}
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
    /// Whether the session has ended, shared with its duplicates, and a condition variable
    /// that wakes the keepalive thread when it does. `__REGISTER__` is sent holding the
    /// lock and only before the end, so none can follow our `__LEAVE__` (a late one would
    /// put us back in the room).
    ended: Arc<(Mutex<bool>, Condvar)>,
}

impl Session {
    /// Binds a UDP socket on an ephemeral port of the server address's family, and asks to
    /// hear of ICMP errors about our datagrams ([`icmp`]): the receiver tells the user when
    /// the server's port is closed.
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
        if let Err(e) = icmp::enable(&socket) {
            // Only a remark the less: the idle check still finds a server that is gone.
            debug!("ICMP errors will not be reported: {e}");
        }
        Ok(Session {
            socket,
            server,
            room_name: room_name.to_owned(),
            token,
            username_len: username.len(),
            ended: Arc::default(),
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
    /// would drop it): then `Ok(Err(Unsent::MessageTooLong))` and nothing is sent.
    pub(super) fn send_chat(&self, text: &str) -> io::Result<Result<(), Unsent>> {
        let max = self.max_message_len();
        if text.len() > max {
            return Ok(Err(Unsent::MessageTooLong {
                len: text.len(),
                max,
            }));
        }
        Ok(self.send(text)?.map_err(Unsent::Encode))
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
        if let Err(e) = self.socket.send_to(&bytes, self.server) {
            // An ICMP error about an earlier datagram, not yet taken by the receiver, fails
            // the next send on the same socket without sending it ([`icmp`]). Taken here, it
            // is gone: send again, once; should the server still be down, this datagram is
            // refused in its turn, and the receiver hears of it.
            if icmp::report_of(&e).is_none() {
                return Err(e);
            }
            debug!(
                "sending to {}: {e} (about an earlier datagram): sending again",
                self.server
            );
            self.socket.send_to(&bytes, self.server)?;
        }
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
            ended: Arc::clone(&self.ended),
        })
    }

    /// Sends a control word. Room name and token were checked to fit, so only the socket can
    /// fail. Only under the lock of the session's end (`_held`): a `__REGISTER__` checked
    /// against the end and sent under one hold cannot follow another thread's `__LEAVE__`.
    fn send_control(&self, _held: &MutexGuard<'_, bool>, word: &str) -> io::Result<()> {
        match self.send(word)? {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        }
    }

    fn ended(&self) -> MutexGuard<'_, bool> {
        locks::lock(&self.ended.0)
    }

    /// Sends `__REGISTER__` (the first, a keepalive, or a repeat for the reach check), unless
    /// the session has ended: then `Ok(false)` and nothing is sent.
    pub(super) fn register(&self) -> io::Result<bool> {
        let ended = self.ended();
        if *ended {
            return Ok(false);
        }
        self.send_control(&ended, REGISTER)?;
        Ok(true)
    }

    /// Best-effort `__LEAVE__`, once, and the end of the session: no `__REGISTER__` follows
    /// it from any thread. The process is exiting either way.
    pub(super) fn leave(&self) {
        self.log_leave(self.leave_unlogged());
    }

    /// Logs what [`Session::leave_unlogged`] did: a `__LEAVE__` that could not be sent is
    /// a warning.
    pub(super) fn log_leave(&self, sent: Option<io::Result<()>>) {
        match sent {
            Some(Ok(())) => debug!("sent {LEAVE} to {}", self.server),
            Some(Err(e)) => warn!("could not send {LEAVE} to {}: {e}", self.server),
            None => {}
        }
    }

    /// [`Session::leave`] without a word in the log, for a caller that says it later (once
    /// the terminal is given back) or in words of its own (the signal thread): what the send
    /// did, or `None` when the session had already ended and nothing was sent.
    pub(super) fn leave_unlogged(&self) -> Option<io::Result<()>> {
        let mut ended = self.ended();
        if std::mem::replace(&mut *ended, true) {
            return None;
        }
        let sent = self.send_control(&ended, LEAVE);
        drop(ended);
        self.ended.1.notify_all();
        Some(sent)
    }

    /// The end of the session without `__LEAVE__`: the server has confirmed that the room no
    /// longer holds us. No `__REGISTER__` follows.
    pub(super) fn end_without_leave(&self) {
        *self.ended() = true;
        self.ended.1.notify_all();
    }

    /// Waits up to `timeout` for the session to end; whether it has.
    pub(super) fn wait_ended(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut ended = self.ended();
        while !*ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            ended = locks::wait_timeout(&self.ended.1, ended, left);
        }
        true
    }
}

/// Sends `__REGISTER__` every `period` from its own thread until the session ends. On its
/// own thread nothing the main loop may wait on (the screen's lock while standard output is
/// blocked, a paced burst of chat) holds a keepalive back past the server's limit.
///
/// A keepalive that cannot be sent (the network gone: no route to the server) is told to
/// the main loop, which shows it through the screen ([`Event::Unsendable`]): a log line
/// would be written through the line being typed. Once per run of failures
/// ([`Failures`]): a network gone fails every keepalive.
pub(super) fn spawn_keepalive(
    session: &Session,
    period: Duration,
    events: SyncSender<Event>,
) -> Result<(), ClientError> {
    let session = session
        .duplicate()
        .map_err(ClientError::io("duplicating the UDP socket for keepalives"))?;
    crate::threads::spawn("keepalive", move || {
        let mut failures = Failures::default();
        while !session.wait_ended(period) {
            match session.register() {
                Ok(true) => {
                    debug!("keepalive to {}", session.server);
                    failures.sent();
                }
                Ok(false) => break,
                Err(e) => {
                    debug!("keepalive to {} failed: {e}", session.server);
                    // Not waited for: a full queue (a paste being paced out) only puts
                    // the word off to the next failure.
                    if failures.failed() && events.try_send(Event::Unsendable(e)).is_err() {
                        failures.sent();
                    }
                }
            }
        }
    })
    .map_err(ClientError::io("starting the keepalive thread"))?;
    Ok(())
}

/// Which failed keepalives are told: the first of a run, and none after it until one goes
/// through again.
#[derive(Debug, Default)]
pub(super) struct Failures {
    told: bool,
}

impl Failures {
    /// A keepalive failed: whether to tell.
    pub(super) fn failed(&mut self) -> bool {
        !std::mem::replace(&mut self.told, true)
    }

    /// A keepalive went through (or the failure could not be told): the next failure is told.
    pub(super) fn sent(&mut self) {
        self.told = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::Token;

    fn session_to(server: &UdpSocket) -> Session {
        let server = server.local_addr().expect("server address");
        Session::open(
            server,
            "lobby",
            "alice",
            Token::new("ab12".into()).expect("token"),
        )
        .expect("session")
    }

    fn words(server: &UdpSocket, until: Instant) -> Vec<String> {
        let mut buf = [0u8; 512];
        let mut seen = Vec::new();
        while let Some(wait) = until.checked_duration_since(Instant::now()) {
            if wait.is_zero() {
                break;
            }
            server.set_read_timeout(Some(wait)).expect("timeout");
            let (n, _) = match server.recv_from(&mut buf) {
                Ok(got) => got,
                // A stop and continue of the test process ends the wait with EINTR.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            let word = [REGISTER, LEAVE].into_iter().find(|w| text.ends_with(w));
            seen.push(word.unwrap_or("chat").to_owned());
        }
        seen
    }

    /// The keepalive thread registers every period, and after `__LEAVE__` no thread
    /// registers again: a late keepalive would put us back in the room.
    #[test]
    fn keepalives_stop_at_the_leave() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let session = session_to(&server);
        let (events, _inbox) = std::sync::mpsc::sync_channel(1);
        spawn_keepalive(&session, Duration::from_millis(20), events).expect("keepalive thread");
        let twin = session.duplicate().expect("duplicate");
        // Two of them, however long a loaded machine keeps the thread waiting.
        let mut before = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while before.iter().filter(|w| *w == REGISTER).count() < 2 {
            assert!(Instant::now() < deadline, "{before:?}");
            before.extend(words(&server, Instant::now() + Duration::from_millis(50)));
        }
        session.leave();
        session.leave();
        assert!(
            !twin.register().expect("register"),
            "ended for the twin too"
        );
        let after = words(&server, Instant::now() + Duration::from_millis(150));
        let leave_at = after.iter().position(|w| w == LEAVE);
        assert_eq!(after.iter().filter(|w| *w == LEAVE).count(), 1, "{after:?}");
        assert!(
            leave_at.is_some_and(|at| at == after.len() - 1),
            "nothing after the leave: {after:?}"
        );
        assert!(session.wait_ended(Duration::ZERO));
    }

    /// A confirmed end sends nothing and stops the keepalives too.
    #[test]
    fn an_end_without_leave_sends_nothing_more() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let session = session_to(&server);
        assert!(session.register().expect("register"));
        session.end_without_leave();
        assert!(!session.register().expect("register"));
        session.leave();
        let seen = words(&server, Instant::now() + Duration::from_millis(100));
        assert_eq!(seen, [REGISTER], "one register, then nothing");
    }

    /// A keepalive that cannot be sent is told once, not again until one went through.
    #[test]
    fn failed_keepalives_are_told_once_per_run() {
        let mut failures = Failures::default();
        assert!(failures.failed());
        assert!(!failures.failed());
        assert!(!failures.failed());
        failures.sent();
        assert!(failures.failed());
    }

    /// A keepalive that cannot be sent (here to a broadcast address, which takes
    /// `SO_BROADCAST`) goes to the main loop as an event, to be shown through the screen.
    #[test]
    fn an_unsendable_keepalive_is_an_event_for_the_main_loop() {
        let session = Session::open(
            "127.255.255.255:9".parse().expect("address"),
            "lobby",
            "alice",
            Token::new("ab12".into()).expect("token"),
        )
        .expect("session");
        let (events, inbox) = std::sync::mpsc::sync_channel(4);
        spawn_keepalive(&session, Duration::from_millis(5), events).expect("keepalive");
        match inbox.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Unsendable(e)) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied),
            other => panic!("{other:?}"),
        }
        session.end_without_leave();
    }
}
