//! The JSON COMPLETE payloads of the extension operations: the room list, a room's presence
//! and a page of its history.

use serde::{Deserialize, Serialize};

/// One room in a ListRooms COMPLETE payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedRoom {
    /// Room name.
    pub name: String,
    /// Members, host included.
    pub members: usize,
    /// Unix time of creation, seconds.
    pub created_at: f64,
    /// Whether joining needs a password.
    pub password: bool,
}

/// COMPLETE payload of ListRooms (operation 3): `{"rooms": [...]}`, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomList {
    /// The listed rooms.
    pub rooms: Vec<ListedRoom>,
    /// More rooms exist than fit in one reply (the reply stays under the default payload cap).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// One member in a Presence COMPLETE payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentMember {
    /// Username.
    pub name: String,
    /// Whether it has registered a UDP address (can receive messages).
    pub registered: bool,
}

/// COMPLETE payload of Presence (operation 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPresence {
    /// Room name.
    pub room: String,
    /// The host's username.
    pub host: String,
    /// Every member, host first; cut at the end when they do not all fit in one reply.
    pub members: Vec<PresentMember>,
    /// More members exist than fit in one reply (the reply stays under the default payload
    /// cap); those listed are the first ones, host first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    /// When the request carried a member token of the room: that member, whether or not the
    /// cut left it out of `members` (a client asking whether the daemon has its UDP address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub you: Option<PresentMember>,
}

/// One message in a History COMPLETE payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryMessage {
    /// The room's sequence number of the message.
    pub seq: u64,
    /// Sender's username.
    pub sender: String,
    /// The text.
    pub text: String,
    /// Unix time it was relayed, seconds.
    pub at: f64,
    /// The text was cut at its end: the message alone does not fit in one reply (only
    /// possible for texts of many control characters, which JSON escapes six bytes each).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// COMPLETE payload of History (operation 5): oldest first; `more` when older messages exist.
/// A page that would not fit in one reply (under the default payload cap) keeps its newest
/// messages and drops the oldest, which then count as older messages (`more`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Messages, oldest first.
    pub messages: Vec<HistoryMessage>,
    /// Whether messages older than the first one exist (kept by the server but not in this
    /// page, whether beyond the page's `limit` or cut to fit the reply).
    pub more: bool,
}
