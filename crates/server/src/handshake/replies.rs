//! The bounded JSON replies: the room list, a room's presence and a page of its history, each
//! cut to what fits a client's default payload cap, with `more` saying what was left out.

use tcrp::payload;

use crate::rooms::{Registry, RoomInfo};

/// Largest ListRooms COMPLETE payload: under the default payload cap (16 KiB) that clients
/// read replies with, and far under `limits.max_output_bytes`.
pub const MAX_LIST_BYTES: usize = 15 * 1024;

/// Largest Presence and History COMPLETE payload: the same bound as ListRooms.
pub const MAX_REPLY_BYTES: usize = MAX_LIST_BYTES;

/// Bytes `value` takes as compact JSON (what the reply writes), plus one for the comma
/// before it in a list.
pub(super) fn listed_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |b| b.len().saturating_add(1))
}

/// The Presence COMPLETE payload, cut to [`MAX_REPLY_BYTES`]: the first members (host first)
/// that fit, and `"more": true` if some were left out; and the asking member, `you`, when a
/// member token came with the request. `members` is read only up to the first that does not
/// fit.
pub(super) fn presence_reply(
    room: &str,
    host: &str,
    members: impl IntoIterator<Item = payload::PresentMember>,
    you: Option<payload::PresentMember>,
) -> Vec<u8> {
    let mut body = payload::RoomPresence {
        room: room.to_owned(),
        host: host.to_owned(),
        members: Vec::new(),
        more: true,
        you,
    };
    // The frame with no members and `"more":true`; each member then adds itself and a comma.
    let frame = listed_len(&body);
    (body.members, body.more) = fitting(members, frame, MAX_REPLY_BYTES);
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The leading `items` whose compact JSON, a comma each, fits in `bound` bytes after the
/// `used` ones; and whether any were left out.
pub(super) fn fitting<T: serde::Serialize>(
    items: impl IntoIterator<Item = T>,
    mut used: usize,
    bound: usize,
) -> (Vec<T>, bool) {
    let mut kept = Vec::new();
    for item in items {
        let len = listed_len(&item);
        if used.saturating_add(len) > bound {
            return (kept, true);
        }
        used += len;
        kept.push(item);
    }
    (kept, false)
}

/// The History COMPLETE payload, cut to [`MAX_REPLY_BYTES`]. The page is oldest first; a cut
/// keeps its NEWEST messages (what a joining member wants to see) and drops the oldest, which
/// become "older messages" for `more`, so the client pages back to them with `before`. A
/// newest message too large to fit alone (its text is mostly control characters, escaped as
/// six bytes each) is sent with its text cut short and `"truncated": true`, so that paging
/// never gets stuck on it.
pub(super) fn history_reply(messages: Vec<payload::HistoryMessage>, more: bool) -> Vec<u8> {
    let mut body = payload::HistoryPage {
        messages: Vec::new(),
        more: true,
    };
    let mut size = listed_len(&body);
    let mut kept = Vec::new();
    let mut dropped = false;
    for mut message in messages.into_iter().rev() {
        let mut len = listed_len(&message);
        if size.saturating_add(len) > MAX_REPLY_BYTES {
            if !kept.is_empty() {
                dropped = true;
                break;
            }
            message.truncated = true;
            while size.saturating_add(len) > MAX_REPLY_BYTES && !message.text.is_empty() {
                // Each text byte is at most six bytes of JSON: cutting the excess (at
                // least) converges in a few rounds.
                let excess = (size.saturating_add(len) - MAX_REPLY_BYTES).div_ceil(6);
                let mut end = message.text.len().saturating_sub(excess.max(1));
                while !message.text.is_char_boundary(end) {
                    end -= 1;
                }
                message.text.truncate(end);
                len = listed_len(&message);
            }
        }
        size += len;
        kept.push(message);
    }
    kept.reverse();
    body.messages = kept;
    body.more = more || dropped;
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The ListRooms reply, made again only after a change ([`Registry::room_list`]).
pub(super) fn list_rooms(registry: &mut Registry) -> Vec<u8> {
    registry.room_list(render_room_list)
}

fn render_room_list(registry: &Registry) -> Vec<u8> {
    // No entry is shorter than this one (a one-byte name, one digit of members, the
    // shortest number JSON writes for a float, and `true`, a byte shorter than `false`):
    // one more than fit at that size is enough to fill the reply and to know that more
    // were left out.
    let shortest = listed_len(&payload::ListedRoom {
        name: "r".into(),
        members: 1,
        created_at: 0.0,
        password: true,
    });
    room_list_reply(registry.list_rooms(MAX_LIST_BYTES / shortest + 1))
}

/// The ListRooms COMPLETE payload: the leading `rooms` that fit in [`MAX_LIST_BYTES`], and
/// whether any were left out.
pub(super) fn room_list_reply(rooms: Vec<RoomInfo>) -> Vec<u8> {
    let entries = rooms.into_iter().map(|r| payload::ListedRoom {
        name: r.name,
        members: r.members,
        created_at: r.created_at,
        password: r.has_password,
    });
    // `{"rooms":[...],"more":true}`: 27 bytes of frame, plus a comma per entry.
    let (rooms, more) = fitting(entries, 27, MAX_LIST_BYTES);
    serde_json::to_vec(&payload::RoomList { rooms, more }).unwrap_or_default()
}
