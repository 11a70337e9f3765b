//! Whether the server hears this client's datagrams.
//!
//! UDP gives no sign that anything reads what `ocm` sends: with a wrong `--udp-port`, or UDP
//! filtered on the way, the chat looks open while nothing typed reaches anyone and nothing
//! comes back. Shortly after registering, `ocm` asks the server over TCP who is in the room
//! (Presence, whose reply says of each member whether the server has its UDP address). If the
//! server has not seen our `__REGISTER__`, `ocm` sends it again and looks once more; if it is
//! still unseen, it warns once and goes on (the server may be restarting). The original
//! server has no Presence request: with `--original` nothing is asked.

use std::net::SocketAddr;
use std::time::Duration;

use log::debug;
use tcrp::payload::RoomPresence;

use crate::handshake::Token;
use crate::query;

/// How long after the first `__REGISTER__` the server is first asked.
pub const FIRST_LOOK: Duration = Duration::from_secs(2);
/// How long after sending `__REGISTER__` again the server is asked a second time.
pub const SECOND_LOOK: Duration = Duration::from_secs(3);

/// What the server says of our registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// The server has our UDP address.
    Yes,
    /// The server lists us without one: our datagrams do not reach it.
    No,
    /// No answer that tells (the request failed, or a long room's reply left us out).
    Unknown,
}

/// What `presence` says of us, `username`: the `you` entry a daemon adds when asked with a
/// member token (whatever the cut), or else our line among the members, if it was not cut.
pub fn heard_in(presence: &RoomPresence, username: &str) -> Heard {
    let us = presence
        .you
        .as_ref()
        .or_else(|| presence.members.iter().find(|m| m.name == username));
    match us {
        Some(member) if member.registered => Heard::Yes,
        Some(_) => Heard::No,
        None => Heard::Unknown,
    }
}

/// Asks the server whether it has `username`'s UDP address in `room_name`.
pub fn ask(tcp: SocketAddr, room_name: &str, token: &Token, username: &str) -> Heard {
    let answer = query::presence_at(tcp, room_name, Some(token), None);
    match answer {
        Ok(presence) => heard_in(&presence, username),
        Err(e) => {
            debug!("cannot ask whether the server hears us: {e}");
            Heard::Unknown
        }
    }
}

/// The warning shown when the server never heard us at `udp`.
pub fn warning(udp: SocketAddr) -> String {
    format!(
        "* the server has not heard this client's UDP datagrams at {udp}: messages will not \
         reach the room nor come back (is --udp-port right? is UDP blocked on the way? or was \
         the server restarting?)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcrp::payload::PresentMember;

    fn room(members: &[(&str, bool)], more: bool) -> RoomPresence {
        RoomPresence {
            room: "r".into(),
            host: members.first().map_or("", |m| m.0).into(),
            members: members
                .iter()
                .map(|&(name, registered)| PresentMember {
                    name: name.into(),
                    registered,
                })
                .collect(),
            more,
            you: None,
        }
    }

    #[test]
    fn the_reply_tells_whether_our_address_is_known() {
        let presence = room(&[("host", true), ("bob", false), ("cy", true)], false);
        assert_eq!(heard_in(&presence, "cy"), Heard::Yes);
        assert_eq!(heard_in(&presence, "bob"), Heard::No);
        // Left out of a long room's reply: nothing to say.
        assert_eq!(
            heard_in(&room(&[("host", true)], true), "zed"),
            Heard::Unknown
        );
        assert_eq!(
            heard_in(&presence, "Bob"),
            Heard::Unknown,
            "names are exact"
        );
        // A long room's reply cut before us still says, in `you`, what the daemon has.
        let cut = room(&[("host", true)], true);
        for registered in [true, false] {
            let asked = RoomPresence {
                you: Some(PresentMember {
                    name: "zed".into(),
                    registered,
                }),
                ..cut.clone()
            };
            let expected = if registered { Heard::Yes } else { Heard::No };
            assert_eq!(heard_in(&asked, "zed"), expected);
        }
    }

    #[test]
    fn the_warning_names_the_address_and_the_flag() {
        let w = warning("127.0.0.1:9".parse().unwrap());
        assert!(w.starts_with("* "), "{w}");
        assert!(w.contains("127.0.0.1:9") && w.contains("--udp-port"), "{w}");
    }

    /// docs/CLIENT.md's figures: the server is asked two seconds after registering, and again
    /// three seconds after registering once more.
    #[test]
    fn the_server_is_asked_two_then_three_seconds_after_registering() {
        assert_eq!(FIRST_LOOK, Duration::from_secs(2));
        assert_eq!(SECOND_LOOK, Duration::from_secs(3));
    }
}
