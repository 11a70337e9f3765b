//! Journal records: one per state change that must outlive the process.
//!
//! The registry emits a [`Record`] for every mutation (create, join, register, leave, close),
//! and every few seconds a checkpoint: a `history_append` of each room's new messages, and a
//! `register` for each member whose source address of ours moved. The writer
//! appends them to the journal, and the compactor applies them to its copy of the state
//! file's model ([`crate::store::State::apply`]). Records are JSON objects, one per journal line, tagged by
//! `"op"`.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::local::LocalAddr;

/// A persisted member, as written in a create or join record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member's secret token.
    pub token: String,
    /// The member's display name.
    pub username: String,
    /// Seconds between keepalives the member promised, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u32>,
    /// Capability bits ([`tcrp::Caps::bits`]).
    #[serde(default, skip_serializing_if = "crate::serde_skip::is_default")]
    pub caps: u8,
    /// The largest datagram the member accepts, if it said (`max_datagram`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_datagram: Option<u16>,
    /// The IP address the join (or create) came from over TCP: with
    /// `[udp] register_only_from_join_ip`, the only one the token may register from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_from: Option<IpAddr>,
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// A room was created; `host` is its first member.
    CreateRoom {
        /// Room name.
        room: String,
        /// The host.
        host: MemberRecord,
        /// Unix time of creation, in seconds.
        created_at: f64,
        /// Whether the room shows in listings.
        #[serde(
            default = "crate::serde_skip::yes",
            skip_serializing_if = "crate::serde_skip::is_true"
        )]
        listed: bool,
        /// PHC-format password hash, if the room has a password.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_hash: Option<String>,
    },
    /// A member joined a room.
    Join {
        /// Room name.
        room: String,
        /// The new member.
        member: MemberRecord,
    },
    /// A token's address was bound or changed, or the address of ours it sends to (on a
    /// wildcard-bound socket).
    Register {
        /// The token.
        token: String,
        /// Its address.
        address: SocketAddr,
        /// Our address its datagrams came to, which what it hears is sent from; absent on a
        /// socket bound to one address (and in records from before it was kept).
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "crate::local::optional_text"
        )]
        local: Option<LocalAddr>,
    },
    /// A member (not the host) left or was expired.
    Leave {
        /// The token that is gone.
        token: String,
    },
    /// A room closed; all its tokens are gone.
    CloseRoom {
        /// Room name.
        room: String,
    },
    /// A room's kept messages, whole, replacing what was kept before. Written by `ocmd`
    /// before `history_append`; still read.
    History {
        /// Room name.
        room: String,
        /// The sequence number the room's next message gets.
        next_seq: u64,
        /// The kept messages, oldest first.
        messages: Vec<HistoryEntry>,
    },
    /// A room's history checkpoint (every few seconds when it chatted): the messages kept
    /// since the last one, to append; then only the newest `kept` messages are kept.
    HistoryAppend {
        /// Room name.
        room: String,
        /// The sequence number the room's next message gets.
        next_seq: u64,
        /// How many messages the room keeps, these included. (A count, not a sequence
        /// number: it holds whatever numbers a hand-edited file gave the older messages.)
        kept: usize,
        /// The messages kept since the last checkpoint, oldest first.
        messages: Vec<HistoryEntry>,
    },
}

impl Record {
    /// Whether the change can alter what a room list shows (a room's name, member count,
    /// creation time or password flag): every kind but an address bound or moved and a
    /// history write. A kind added later counts as one until it is said not to.
    pub fn alters_room_list(&self) -> bool {
        !matches!(
            self,
            Record::Register { .. } | Record::History { .. } | Record::HistoryAppend { .. }
        )
    }
}

/// One kept chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The message's sequence number in its room.
    pub seq: u64,
    /// Sender's username.
    pub sender: String,
    /// The text.
    pub text: String,
    /// Unix time it was relayed, seconds.
    pub at: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_serialize_as_tagged_lines() {
        let mut r = Record::Register {
            token: "ab".into(),
            address: "127.0.0.1:5000".parse().unwrap(),
            local: None,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"op":"register","token":"ab","address":"127.0.0.1:5000"}"#
        );
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), r);
        if let Record::Register { local, .. } = &mut r {
            *local = "fe80::1%2".parse().ok();
        }
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"op":"register","token":"ab","address":"127.0.0.1:5000","local":"fe80::1%2"}"#
        );
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), r);
    }

    #[test]
    fn a_local_address_that_does_not_parse_reads_as_none() {
        for value in [r#""not an address""#, "7", "[1, 2]", "null"] {
            let line = format!(
                r#"{{"op":"register","token":"ab","address":"127.0.0.1:5000","local":{value}}}"#
            );
            let record: Record = serde_json::from_str(&line).unwrap();
            assert!(
                matches!(record, Record::Register { local: None, .. }),
                "{line}"
            );
        }
    }

    #[test]
    fn a_member_record_leaves_out_what_the_member_did_not_ask_for() {
        let mut member = MemberRecord {
            token: "ab".into(),
            username: "bob".into(),
            keepalive: None,
            caps: 0,
            max_datagram: None,
            joined_from: None,
        };
        let join = |member: &MemberRecord| Record::Join {
            room: "r".into(),
            member: member.clone(),
        };
        let line = serde_json::to_string(&join(&member)).unwrap();
        assert_eq!(
            line,
            r#"{"op":"join","room":"r","member":{"token":"ab","username":"bob"}}"#
        );
        assert_eq!(
            serde_json::from_str::<Record>(&line).unwrap(),
            join(&member)
        );
        member.keepalive = Some(30);
        member.caps = 1;
        member.max_datagram = Some(1200);
        member.joined_from = Some([127, 0, 0, 1].into());
        let line = serde_json::to_string(&join(&member)).unwrap();
        assert_eq!(
            line,
            r#"{"op":"join","room":"r","member":{"token":"ab","username":"bob","keepalive":30,"caps":1,"max_datagram":1200,"joined_from":"127.0.0.1"}}"#
        );
        assert_eq!(
            serde_json::from_str::<Record>(&line).unwrap(),
            join(&member)
        );
    }

    #[test]
    fn a_create_record_says_listed_only_of_an_unlisted_room() {
        let create = |listed: bool| Record::CreateRoom {
            room: "r".into(),
            host: MemberRecord {
                token: "ab".into(),
                username: "h".into(),
                keepalive: None,
                caps: 0,
                max_datagram: None,
                joined_from: None,
            },
            created_at: 1.5,
            listed,
            password_hash: None,
        };
        let host = r#""host":{"token":"ab","username":"h"},"created_at":1.5"#;
        for (listed, line) in [
            (true, format!(r#"{{"op":"create_room","room":"r",{host}}}"#)),
            (
                false,
                format!(r#"{{"op":"create_room","room":"r",{host},"listed":false}}"#),
            ),
        ] {
            assert_eq!(serde_json::to_string(&create(listed)).unwrap(), line);
            assert_eq!(
                serde_json::from_str::<Record>(&line).unwrap(),
                create(listed)
            );
        }
    }
}
