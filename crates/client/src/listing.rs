//! Turns the extension replies (room list, presence, history) into the lines `ocm` prints.
//!
//! Pure: values in, lines out. Names and texts from the server pass through [`printable`].
//! Times are shown in UTC (the client reads no time-zone database):
//!
//! | reply            | lines                                                              |
//! |------------------|--------------------------------------------------------------------|
//! | room list        | `lobby  3 members  created 2026-11-21 23:10:02 UTC  [password]`, or `no rooms` |
//! | presence         | `host: alice`, then `bob (registered)` / `carol (not registered)`  |
//! | history message  | `[23:10] bob: hi`, `[23:10] bob: hi… (cut: too long for one reply)` |

/// The line after a presence list that the server cut to fit one reply.
pub const MORE_MEMBERS: &str = "(more members than fit in one reply; not all are shown)";

use tcrp::payload::{HistoryMessage, RoomList, RoomPresence};

use crate::render::{printable, printable_name};

/// Seconds in a day.
const SECS_PER_DAY: i64 = 86_400;

/// One line per listed room, or the single line `no rooms`.
pub fn room_list_lines(list: &RoomList) -> Vec<String> {
    if list.rooms.is_empty() {
        return vec!["no rooms".to_owned()];
    }
    let mut lines: Vec<String> = list
        .rooms
        .iter()
        .map(|room| {
            let members = if room.members == 1 {
                "1 member".to_owned()
            } else {
                format!("{} members", room.members)
            };
            let mut line = format!(
                "{}  {members}  created {} UTC",
                printable_name(&room.name),
                utc_date_time(room.created_at)
            );
            if room.password {
                line.push_str("  [password]");
            }
            line
        })
        .collect();
    if list.more {
        lines.push("(more rooms than fit in one reply; not all are shown)".to_owned());
    }
    lines
}

/// `host: NAME`, then every member (host included, as the server lists them) with whether
/// it has registered its chat address.
pub fn presence_lines(presence: &RoomPresence) -> Vec<String> {
    let mut lines = vec![format!("host: {}", printable_name(&presence.host))];
    lines.extend(presence.members.iter().map(|m| {
        format!(
            "{} ({})",
            printable_name(&m.name),
            if m.registered {
                "registered"
            } else {
                "not registered"
            }
        )
    }));
    if presence.more {
        lines.push(MORE_MEMBERS.to_owned());
    }
    lines
}

/// `[hh:mm] sender: text`, the time in UTC.
pub fn history_line(message: &HistoryMessage) -> String {
    let (_, (hour, minute, _)) = civil(message.at);
    format!(
        "[{hour:02}:{minute:02}] {}: {}{}",
        printable_name(&message.sender),
        printable(&message.text),
        if message.truncated {
            "… (cut: too long for one reply)"
        } else {
            ""
        }
    )
}

/// `YYYY-MM-DD hh:mm:ss` for a Unix time in seconds (fractions dropped).
pub fn utc_date_time(unix_secs: f64) -> String {
    let ((year, month, day), (hour, minute, second)) = civil(unix_secs);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}")
}

/// Splits a Unix time into a UTC calendar date and time of day. Times that are not finite
/// count as 0 (1970-01-01); the `as` cast saturates, so no input can overflow.
fn civil(unix_secs: f64) -> ((i64, u32, u32), (u32, u32, u32)) {
    let secs = if unix_secs.is_finite() {
        // Bounded so that the day arithmetic below cannot overflow: ±10^15 s is ±30 million
        // years, far beyond any clock.
        (unix_secs.floor() as i64).clamp(-1_000_000_000_000_000, 1_000_000_000_000_000)
    } else {
        0
    };
    let days = secs.div_euclid(SECS_PER_DAY);
    let of_day = secs.rem_euclid(SECS_PER_DAY);
    // 0 <= of_day < 86400, so these fit in u32.
    let time = (
        (of_day / 3600) as u32,
        (of_day % 3600 / 60) as u32,
        (of_day % 60) as u32,
    );
    (civil_from_days(days), time)
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcrp::payload::{ListedRoom, PresentMember};

    fn room(name: &str, members: usize, created_at: f64, password: bool) -> ListedRoom {
        ListedRoom {
            name: name.into(),
            members,
            created_at,
            password,
        }
    }

    #[test]
    fn rooms_one_line_each() {
        let list = RoomList {
            rooms: vec![
                room("lobby", 3, 1_795_734_602.75, true),
                room("quiet", 1, 0.0, false),
            ],
            more: false,
        };
        assert_eq!(
            room_list_lines(&list),
            [
                "lobby  3 members  created 2026-11-26 23:10:02 UTC  [password]",
                "quiet  1 member  created 1970-01-01 00:00:00 UTC"
            ]
        );
        assert_eq!(
            room_list_lines(&RoomList {
                rooms: vec![],
                more: false
            }),
            ["no rooms"]
        );
        let cut = RoomList {
            rooms: vec![room("a", 1, 0.0, false)],
            more: true,
        };
        assert_eq!(room_list_lines(&cut).len(), 2);
    }

    #[test]
    fn room_names_are_made_safe() {
        let list = RoomList {
            rooms: vec![room("a\u{1b}[2J", 2, 0.0, false)],
            more: false,
        };
        assert!(room_list_lines(&list)[0].starts_with("a\\u{1b}[2J  2 members"));
    }

    #[test]
    fn presence_host_then_members() {
        let p = RoomPresence {
            room: "lobby".into(),
            host: "alice".into(),
            members: vec![
                PresentMember {
                    name: "alice".into(),
                    registered: true,
                },
                PresentMember {
                    name: "carol".into(),
                    registered: false,
                },
            ],
            more: false,
            you: None,
        };
        assert_eq!(
            presence_lines(&p),
            [
                "host: alice",
                "alice (registered)",
                "carol (not registered)"
            ]
        );
        let cut = RoomPresence { more: true, ..p };
        assert_eq!(presence_lines(&cut).last().unwrap(), MORE_MEMBERS);
        assert_eq!(presence_lines(&cut).len(), 4);
    }

    #[test]
    fn history_lines_show_utc_time() {
        let m = HistoryMessage {
            seq: 55,
            sender: "bob".into(),
            text: "hi\nthere".into(),
            at: 1_700_000_000.1,
            truncated: false,
        };
        assert_eq!(history_line(&m), "[22:13] bob: hi\\nthere");
        let cut = HistoryMessage {
            truncated: true,
            ..m
        };
        assert_eq!(
            history_line(&cut),
            "[22:13] bob: hi\\nthere… (cut: too long for one reply)"
        );
    }

    #[test]
    fn calendar_edges() {
        assert_eq!(utc_date_time(0.0), "1970-01-01 00:00:00");
        assert_eq!(utc_date_time(-1.0), "1969-12-31 23:59:59");
        assert_eq!(utc_date_time(951_782_400.0), "2000-02-29 00:00:00");
        assert_eq!(utc_date_time(4_107_542_399.0), "2100-02-28 23:59:59");
        assert_eq!(utc_date_time(4_107_542_400.0), "2100-03-01 00:00:00");
        assert_eq!(utc_date_time(1_700_000_000.999), "2023-11-14 22:13:20");
        assert_eq!(utc_date_time(f64::NAN), "1970-01-01 00:00:00");
        assert_eq!(utc_date_time(f64::INFINITY), "1970-01-01 00:00:00");
        // Absurd values do not panic.
        let _ = utc_date_time(1e300);
        let _ = utc_date_time(-1e300);
    }
}
