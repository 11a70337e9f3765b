//! The state file's model, its load and its writes, against real files in temporary
//! directories.

use std::fs::{self, File};
use std::path::Path;

use super::*;
use crate::journal::LAST_NUMBER;

/// A fresh directory (kept alive by the caller) and the state paths inside it.
fn temp_paths() -> (tempfile::TempDir, Paths) {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(&dir.path().join("s.json"));
    (dir, paths)
}

fn member(token: &str, name: &str) -> MemberRecord {
    MemberRecord {
        token: token.into(),
        username: name.into(),
        keepalive: None,
        caps: 0,
        max_datagram: None,
        joined_from: None,
    }
}

fn create(room: &str, token: &str) -> Record {
    Record::CreateRoom {
        room: room.into(),
        host: member(token, "host"),
        created_at: 1.5,
        listed: true,
        password_hash: None,
    }
}

#[test]
fn the_original_servers_file_keeps_loading() {
    let bytes = include_bytes!("../../tests/data/original_room_manager.json");
    let mut state = parse_state(bytes).expect("original file parses");
    state.normalize();
    assert_eq!(state.version, 0);
    let room = &state.rooms["lobby"];
    assert_eq!(room.members.len(), 2);
    let host = &state.tokens[&room.host_token];
    assert!(host.is_host);
    assert_eq!(
        host.username, "alice",
        "quoted JSON-string usernames are unquoted"
    );
    assert_eq!(host.address, Some("127.0.0.1:50001".parse().unwrap()));
    let guest = &state.tokens[&room.members[1]];
    assert_eq!(guest.address, None);
}

/// Names that look like JSON strings, as a client may choose them: `"\n"` (four
/// characters, which decoded would be a line feed), `"a"` beside a member `a`, a lone `"`.
const QUOTED_NAMES: [&str; 5] = ["\"\\n\"", "\"a\"", "a", "\"", "\"\""];

#[test]
fn ocmds_own_file_keeps_names_that_look_like_json_strings() {
    let (_dir, paths) = temp_paths();
    let mut state = State::default();
    state.apply(&Record::CreateRoom {
        room: "r".into(),
        host: member("h", QUOTED_NAMES[0]),
        created_at: 1.5,
        listed: true,
        password_hash: None,
    });
    for (i, name) in QUOTED_NAMES.iter().enumerate().skip(1) {
        state.apply(&Record::Join {
            room: "r".into(),
            member: member(&format!("m{i}"), name),
        });
    }
    write_state(&paths, &state);
    let loaded = load(&paths).unwrap();
    assert_eq!(loaded.state.version, STATE_VERSION);
    assert_eq!(
        loaded.state.tokens, state.tokens,
        "names changed by loading"
    );
    assert_eq!(loaded.state.tokens["h"].username.len(), 4);
    // And again, as after any number of clean restarts.
    write_state(&paths, &loaded.state);
    assert_eq!(load(&paths).unwrap().state.tokens, state.tokens);
}

#[test]
fn the_original_servers_file_is_unquoted_at_load_and_its_journal_is_not() {
    let (_dir, paths) = temp_paths();
    fs::write(
        &paths.state,
        include_bytes!("../../tests/data/original_room_manager.json"),
    )
    .unwrap();
    // ocmd appended to the journal before it ever rewrote the original's file.
    let joins: Vec<(u64, Record)> = QUOTED_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let record = Record::Join {
                room: "lobby".into(),
                member: member(&format!("m{i}"), name),
            };
            (i as u64 + 1, record)
        })
        .collect();
    fs::write(&paths.journal, journal_bytes(&joins)).unwrap();
    let loaded = load(&paths).unwrap();
    assert_eq!(loaded.state.version, 0);
    let names: Vec<&str> = loaded
        .state
        .tokens
        .values()
        .map(|t| t.username.as_str())
        .collect();
    for name in ["alice", "bob"].iter().chain(&QUOTED_NAMES) {
        assert!(names.contains(name), "{name:?} not in {names:?}");
    }
    assert_eq!(names.len(), 2 + QUOTED_NAMES.len());
}

#[test]
fn save_then_load_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(&dir.path().join("room_manager.json"));
    let mut state = State::default();
    state.apply(&create("r", "t1"));
    state.apply(&Record::Join {
        room: "r".into(),
        member: member("t2", "bob"),
    });
    state.apply(&Record::Register {
        token: "t2".into(),
        address: "[::1]:9".parse().unwrap(),
        local: "fe80::1%2".parse().ok(),
    });
    assert!(state.tokens["t2"].local.is_some());
    let bytes = state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap();
    write_atomic(&paths.state, &bytes).unwrap();
    let loaded = load(&paths).unwrap();
    assert_eq!(loaded.state, state);
    let mode = fs::metadata(&paths.state).unwrap().permissions();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.mode() & 0o777, 0o600);
}

/// An older ocmd on a dual-stack socket saved IPv4 peers IPv4-mapped, in the file and in
/// register records; they load as IPv4 addresses, the form the daemon now keeps whichever
/// socket it has, and a real IPv6 address stays as it is.
#[test]
fn ipv4_mapped_addresses_load_as_ipv4() {
    let text = r#"{"rooms": {"r": {"host_token": "h", "members": ["h", "g"]}},
        "tokens": {"h": {"username": "alice", "room_name": "r", "is_host": true,
                         "address": ["::ffff:127.0.0.1", 5000]},
                   "g": {"username": "bob", "room_name": "r", "is_host": false,
                         "address": ["::1", 5001]}}}"#;
    let mut state = parse_state(text.as_bytes()).unwrap();
    assert_eq!(
        state.tokens["h"].address,
        Some("127.0.0.1:5000".parse().unwrap())
    );
    assert_eq!(
        state.tokens["g"].address,
        Some("[::1]:5001".parse().unwrap())
    );
    let journal = br#"{"n":1,"op":"register","token":"g","address":"[::ffff:10.0.0.2]:7"}
"#;
    for entry in parse_journal(journal).unwrap().records {
        state.apply(&entry.record);
    }
    assert_eq!(
        state.tokens["g"].address,
        Some("10.0.0.2:7".parse().unwrap())
    );
}

/// Found by the `state_loader` fuzz target: a link-local peer address registered with its
/// zone (`[fe80::3%2]:5` in the journal) lost the zone in the snapshot's pair form, so a
/// member registered that way was sent to without its interface after a compaction.
#[test]
fn fuzz_regression_scoped_ipv6_address_keeps_its_zone_through_a_snapshot() {
    let bytes = include_bytes!("../../../../fuzz/regressions/state_loader-scoped-ipv6-address");
    let nul = bytes
        .iter()
        .position(|&b| b == 0)
        .expect("state, NUL, journal");
    let mut state = parse_state(&bytes[..nul]).expect("the state parses");
    for entry in parse_journal(&bytes[nul + 1..])
        .expect("the journal parses")
        .records
    {
        state.apply(&entry.record);
    }
    let scoped: SocketAddr = "[fe80::3%2]:5".parse().unwrap();
    assert_eq!(state.tokens["h"].address, Some(scoped));
    let saved = state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap();
    let text = String::from_utf8_lossy(&saved);
    assert!(text.contains(r#""fe80::3%2""#), "{text}");
    let mut loaded = parse_state(&saved).unwrap();
    assert_eq!(loaded.tokens["h"].address, Some(scoped));
    assert_eq!(loaded.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap(), saved);
    // A zone that is not a number reads as no address, like any unparsable IP.
    let bad = text.replace("%2", "%eth0");
    assert_eq!(
        parse_state(bad.as_bytes()).unwrap().tokens["h"].address,
        None
    );
}

#[test]
fn journal_replays_above_the_files_seq_and_ignores_a_torn_tail() {
    let (_dir, paths) = temp_paths();
    let mut file_state = State::default();
    file_state.apply(&create("a", "ta"));
    file_state.journal_seq = 1;
    write_atomic(
        &paths.state,
        &file_state.to_file_bytes(SystemTime::now()).unwrap(),
    )
    .unwrap();
    let mut journal = Vec::new();
    for (n, r) in [
        (1, create("a", "ta")),
        (2, create("b", "tb")),
        (3, Record::Leave { token: "zz".into() }),
    ] {
        serde_json::to_writer(&mut journal, &JournalLine { n, record: r }).unwrap();
        journal.push(b'\n');
    }
    journal.extend_from_slice(br#"{"n":4,"op":"close_ro"#);
    fs::write(&paths.journal, &journal).unwrap();
    let loaded = load(&paths).unwrap();
    assert!(loaded.torn_tail);
    assert_eq!(loaded.replayed, 2);
    assert_eq!(loaded.last_seq, 3);
    assert!(loaded.state.rooms.contains_key("a") && loaded.state.rooms.contains_key("b"));
}

/// Journal bytes holding `records` as lines numbered from their `n`.
fn journal_bytes(records: &[(u64, Record)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, record) in records {
        serde_json::to_writer(&mut out, &JournalLine { n: *n, record }).unwrap();
        out.push(b'\n');
    }
    out
}

fn write_state(paths: &Paths, state: &State) {
    let mut state = state.clone();
    write_atomic(
        &paths.state,
        &state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap(),
    )
    .unwrap();
}

fn join(room: &str, token: &str) -> Record {
    Record::Join {
        room: room.into(),
        member: member(token, token),
    }
}

#[test]
fn the_old_journal_sits_beside_the_journal() {
    let paths = Paths::new(Path::new("/var/lib/ocmd/room_manager.json"));
    assert_eq!(
        paths.journal_old,
        Path::new("/var/lib/ocmd/room_manager.json.journal.old")
    );
}

/// A compaction in progress: the snapshot (seq 2) is older than journal.old (records 1..=4,
/// the first two already in the snapshot), and the fresh journal holds 5..=7. Records are
/// applied old journal first: closing and re-creating `a` in the journal only gives host
/// `h2` if the old journal's create of `a` came before.
#[test]
fn records_split_across_the_old_journal_and_the_journal_replay_in_order() {
    let (_dir, paths) = temp_paths();
    let mut snapshot = State::default();
    snapshot.apply(&create("x", "hx"));
    snapshot.journal_seq = 2;
    write_state(&paths, &snapshot);
    let old = [
        (1, create("x", "hx")),
        // Already in the snapshot: replaying it would close x.
        (2, Record::CloseRoom { room: "x".into() }),
        (3, create("a", "h1")),
        (4, join("a", "m1")),
    ];
    let new = [
        (5, Record::CloseRoom { room: "a".into() }),
        (6, create("a", "h2")),
        (7, join("a", "m2")),
    ];
    fs::write(&paths.journal_old, journal_bytes(&old)).unwrap();
    fs::write(&paths.journal, journal_bytes(&new)).unwrap();
    let loaded = load(&paths).unwrap();
    assert!(loaded.journal_old && !loaded.torn_tail);
    assert_eq!(loaded.replayed, 5);
    assert_eq!(loaded.last_seq, 7);
    let mut expected = snapshot.clone();
    for (_, r) in old.iter().chain(&new).filter(|(n, _)| *n > 2) {
        expected.apply(r);
    }
    assert_eq!(loaded.state.rooms, expected.rooms);
    assert_eq!(loaded.state.tokens, expected.tokens);
    assert!(loaded.state.rooms.contains_key("x"), "record 2 was skipped");
    assert_eq!(loaded.state.rooms["a"].members, ["h2", "m2"]);
    assert!(!loaded.state.tokens.contains_key("m1"));
}

/// A crash after the new snapshot was renamed into place but before journal.old was
/// removed: every record of journal.old is at or below the snapshot's seq and is skipped.
#[test]
fn an_old_journal_the_snapshot_already_holds_is_skipped() {
    let (_dir, paths) = temp_paths();
    let old = [
        (1, create("a", "h1")),
        (2, join("a", "m1")),
        (3, Record::Leave { token: "m1".into() }),
    ];
    let mut snapshot = State::default();
    old.iter().for_each(|(_, r)| snapshot.apply(r));
    // Changed after record 3 in a way replaying 1..=3 would undo.
    snapshot.apply(&join("a", "m1"));
    snapshot.journal_seq = 3;
    write_state(&paths, &snapshot);
    fs::write(&paths.journal_old, journal_bytes(&old)).unwrap();
    fs::write(&paths.journal, journal_bytes(&[(4, join("a", "m4"))])).unwrap();
    let loaded = load(&paths).unwrap();
    assert_eq!(loaded.replayed, 1);
    assert_eq!(loaded.last_seq, 4);
    assert_eq!(loaded.state.rooms["a"].members, ["h1", "m1", "m4"]);
}

/// A live backup copies the journal, then journal.old, then the snapshot; a rotation in
/// between leaves the journal's copy holding records that journal.old's copy holds too,
/// followed there by newer ones. They are replayed once, in order.
#[test]
fn overlapping_journals_replay_each_record_once() {
    let (_dir, paths) = temp_paths();
    let old = [
        (1, create("a", "h1")),
        (2, join("a", "m1")),
        (3, Record::Leave { token: "m1".into() }),
    ];
    fs::write(&paths.journal_old, journal_bytes(&old)).unwrap();
    fs::write(&paths.journal, journal_bytes(&old[..2])).unwrap();
    let loaded = load(&paths).unwrap();
    assert_eq!(loaded.replayed, 3);
    assert_eq!(loaded.last_seq, 3);
    assert_eq!(
        loaded.state.rooms["a"].members,
        ["h1"],
        "m1 left, at record 3"
    );
    assert!(!loaded.state.tokens.contains_key("m1"));
}

/// A crash between the rotation's rename and the creation of the fresh journal.
#[test]
fn an_old_journal_without_a_journal_loads() {
    let (_dir, paths) = temp_paths();
    fs::write(
        &paths.journal_old,
        journal_bytes(&[(1, create("a", "h1")), (2, join("a", "m1"))]),
    )
    .unwrap();
    let loaded = load(&paths).unwrap();
    assert!(loaded.journal_old);
    assert_eq!(loaded.replayed, 2);
    assert_eq!(loaded.state.rooms["a"].members, ["h1", "m1"]);
}

#[test]
fn a_torn_tail_of_either_journal_is_ignored() {
    let torn = br#"{"n":9,"op":"join","room":"a","member":{"tok"#;
    for torn_in_old in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("s.json"));
        let mut old = journal_bytes(&[(1, create("a", "h1")), (2, join("a", "m2"))]);
        let mut new = journal_bytes(&[(3, join("a", "m3"))]);
        if torn_in_old {
            old.extend_from_slice(torn);
        } else {
            new.extend_from_slice(torn);
        }
        fs::write(&paths.journal_old, &old).unwrap();
        fs::write(&paths.journal, &new).unwrap();
        let loaded = load(&paths).unwrap();
        assert!(loaded.torn_tail, "torn in old: {torn_in_old}");
        assert_eq!(loaded.replayed, 3);
        assert_eq!(loaded.last_seq, 3);
        assert_eq!(loaded.state.rooms["a"].members, ["h1", "m2", "m3"]);
    }
}

#[test]
fn a_bad_line_inside_the_old_journal_is_an_error_naming_it() {
    let (_dir, paths) = temp_paths();
    let mut old = journal_bytes(&[(1, create("a", "h1"))]);
    old.extend_from_slice(b"garbage\n");
    old.extend_from_slice(&journal_bytes(&[(3, join("a", "m3"))]));
    fs::write(&paths.journal_old, &old).unwrap();
    fs::write(&paths.journal, journal_bytes(&[(4, join("a", "m4"))])).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(&err, StoreError::Journal { path, line: 2, .. } if *path == paths.journal_old),
        "{err}"
    );
    assert!(err.to_string().contains("s.json.journal.old"), "{err}");
}

#[test]
fn a_bad_line_before_the_end_is_an_error() {
    let bytes = b"{\"n\":1,\"op\":\"leave\",\"token\":\"x\"}\ngarbage\n{\"n\":3,\"op\":\"leave\",\"token\":\"y\"}\n";
    let err = parse_journal(bytes).unwrap_err();
    assert_eq!(err.0, 2);
}

/// A whole last line (its newline written) that does not parse is no torn append: a
/// write cut short ends without its newline. It is corruption, or a record this build
/// does not know, and may have been acknowledged.
#[test]
fn a_whole_last_line_that_does_not_parse_is_an_error_and_a_cut_one_is_a_torn_tail() {
    for last in [&b"garbage\n"[..], b"{\"n\":3,\"op\":\"no_such_op\"}\n"] {
        let mut bytes = two_records();
        bytes.extend_from_slice(last);
        assert_eq!(parse_journal(&bytes).unwrap_err().0, 3, "{last:?}");
        let cut = &bytes[..bytes.len() - 1];
        let replay = parse_journal(cut).unwrap_or_else(|e| panic!("{last:?}: {e:?}"));
        assert!(replay.torn_tail, "{last:?}");
        assert_eq!(replay.records.len(), 2);
    }
}

#[test]
fn a_record_numbered_at_the_end_of_the_range_is_an_error_even_last() {
    let bytes = b"{\"n\":1,\"op\":\"leave\",\"token\":\"x\"}\n{\"n\":18446744073709551615,\"op\":\"leave\",\"token\":\"y\"}\n";
    let err = parse_journal(bytes).unwrap_err();
    assert_eq!(err.0, 2);
}

/// An empty state file whose records run up to `journal_seq`.
fn write_snapshot_at(paths: &Paths, journal_seq: u64) {
    let state = State {
        journal_seq,
        ..State::default()
    };
    fs::write(&paths.state, serde_json::to_vec(&state).unwrap()).unwrap();
}

/// Records 1 (create `a`) and 2 (join `m2`), as journal bytes.
fn two_records() -> Vec<u8> {
    journal_bytes(&[(1, create("a", "h1")), (2, join("a", "m2"))])
}

/// A power cut during an append that was never `fdatasync`'d can leave the append as a
/// zero-filled hole with later bytes after it: the first line holding a NUL and every
/// line after it are a torn tail, wherever the hole starts and whatever follows it.
#[test]
fn a_zero_filled_hole_in_the_middle_and_everything_after_it_are_a_torn_tail() {
    let after = journal_bytes(&[(3, join("a", "m3")), (4, join("a", "m4"))]);
    let hole = |prefix: &[u8], zeros: &[u8]| {
        let mut bytes = two_records();
        bytes.extend_from_slice(prefix);
        bytes.extend_from_slice(zeros);
        bytes.extend_from_slice(&after);
        bytes
    };
    // `ignored` counts lines: a hole without a newline runs into the next record's line.
    for (what, bytes, ignored) in [
        // The hole starts inside an append: 3's line is half there.
        ("mid-line", hole(br#"{"n":3,"op":"jo"#, &[0; 29]), 2),
        ("whole blocks", hole(b"", &[0; 4096]), 2),
        ("holding newlines", hole(b"", b"\0\0\n\0\n"), 4),
        ("a single NUL", hole(b"", b"\0"), 2),
    ] {
        let replay = parse_journal(&bytes).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert!(replay.torn_tail, "{what}");
        let expected = ZeroHole {
            line: 3,
            lines: ignored,
        };
        assert_eq!(replay.zero_hole, Some(expected), "{what}");
        let ns: Vec<u64> = replay.records.iter().map(|entry| entry.n).collect();
        assert_eq!(ns, [1, 2], "{what}: only the records before the hole");
    }
}

/// A key given twice in the rooms or the tokens object is refused, naming it: a plain
/// map kept the last copy and dropped the first without a word.
#[test]
fn a_room_or_token_given_twice_in_the_state_file_is_refused() {
    let host = |token: &str| {
        format!(r#"{{"username":"h","room_name":"a","is_host":true,"token":"{token}"}}"#)
    };
    let room = |token: &str| format!(r#"{{"host_token":"{token}","members":["{token}"]}}"#);
    let twice_rooms = format!(
        r#"{{"rooms":{{"a":{},"a":{}}},"tokens":{{"h1":{},"h2":{}}}}}"#,
        room("h1"),
        room("h2"),
        host("h1"),
        host("h2")
    );
    let twice_tokens = format!(
        r#"{{"rooms":{{"a":{}}},"tokens":{{"h1":{},"h1":{}}}}}"#,
        room("h1"),
        host("h1"),
        host("h1")
    );
    for (what, text, key) in [("rooms", twice_rooms, "a"), ("tokens", twice_tokens, "h1")] {
        let error = parse_state(text.as_bytes()).expect_err(what).to_string();
        assert!(
            error.contains(&format!("the key {key:?} is given twice")),
            "{what}: {error}"
        );
    }
    let once = format!(
        r#"{{"rooms":{{"a":{}}},"tokens":{{"h1":{}}}}}"#,
        room("h1"),
        host("h1")
    );
    let state = parse_state(once.as_bytes()).expect("each key once");
    assert_eq!((state.rooms.len(), state.tokens.len()), (1, 1));
}

/// Only a directory `fsync` that failed is marked as one: a directory that cannot be
/// opened changed nothing and may be retried.
#[test]
fn only_a_failed_directory_fsync_is_marked_as_one() {
    let missing = Path::new("/nonexistent-ocm-dir/state.json");
    let not_opened = sync_dir(missing).expect_err("no such directory");
    assert!(!is_failed_dir_sync(&not_opened));
    let (_dir, paths) = temp_paths();
    sync_dir(&paths.state).expect("a directory that can be synced");
    // procfs refuses an fsync of its directories (EINVAL): a real failed fsync. (Not
    // where /proc is missing.)
    if !Path::new("/proc/self").is_dir() {
        return;
    }
    let failed = sync_dir(Path::new("/proc/self/x")).expect_err("fsync of /proc/self");
    assert_eq!(failed.kind(), io::ErrorKind::InvalidInput, "{failed}");
    assert!(is_failed_dir_sync(&failed), "{failed}");
    assert!(failed.to_string().contains("fsync of the directory failed"));
    assert!(!is_failed_dir_sync(&io::Error::from_raw_os_error(
        libc::EIO
    )));
}

/// A state file from a newer ocmd (a higher format version) is refused rather than loaded
/// and rewritten without what this one does not know.
#[test]
fn a_state_file_of_a_newer_format_is_refused() {
    let (_dir, paths) = temp_paths();
    let file = |version: u32| {
        format!(r#"{{"version":{version},"rooms":{{}},"tokens":{{}},"future":[1]}}"#)
    };
    fs::write(&paths.state, file(STATE_VERSION + 1)).unwrap();
    let error = load(&paths).expect_err("a newer format").to_string();
    assert!(error.contains("written by a newer ocmd"), "{error}");
    fs::write(&paths.state, file(STATE_VERSION)).unwrap();
    assert!(load(&paths).is_ok(), "today's format");
}

/// A join replayed for a token the room already lists (a live backup's overlapping
/// journals) lists it once; its leave takes it out.
#[test]
fn a_join_replayed_twice_lists_the_member_once() {
    let mut state = State::default();
    state.apply(&create("a", "h1"));
    state.apply(&join("a", "m2"));
    state.apply(&join("a", "m2"));
    assert_eq!(state.rooms["a"].members, ["h1", "m2"]);
    state.apply(&Record::Leave { token: "m2".into() });
    assert_eq!(state.rooms["a"].members, ["h1"]);
    assert!(!state.tokens.contains_key("m2"));
}

/// Joins numbered from `first` to `last` into room `a`, as journal lines.
fn joins(first: u64, last: u64) -> Vec<u8> {
    let records: Vec<(u64, Record)> = (first..=last)
        .map(|n| (n, join("a", &format!("m{n}"))))
        .collect();
    journal_bytes(&records)
}

/// More than one append's worth of lines after a hole in the journal cannot be a torn
/// append: records synced after it would be lost, so the load is refused, naming the
/// hole's line. One append's worth, or a single line longer than that (written alone), is
/// a torn append. In journal.old the hole is judged by what vouches for its records: a
/// snapshot that holds them all lets it pass whatever follows it.
#[test]
fn a_hole_followed_by_more_than_one_append_is_damage_not_a_torn_tail() {
    let after = joins(3, 3000);
    assert!(after.len() > MAX_UNSYNCED_BYTES);
    let holed = |tail: &[u8]| [two_records(), tail.to_vec()].concat();
    let damaged = holed(&[vec![0; 4096], after.clone()].concat());
    let (_dir, paths) = temp_paths();
    fs::write(&paths.journal, &damaged).unwrap();
    match load(&paths) {
        Err(StoreError::Journal { line, reason, .. }) => {
            assert_eq!(line, 3);
            assert!(reason.contains("zero-filled hole") && reason.contains("damaged"));
        }
        other => panic!("a hole before 2,998 records: {other:?}"),
    }

    // Just one append's worth from the hole's line: a torn append.
    let mut tail = vec![0u8; 10];
    tail.extend_from_slice(&after);
    let cut = tail[..MAX_UNSYNCED_BYTES]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap();
    fs::write(&paths.journal, holed(&tail[..=cut])).unwrap();
    let loaded = load(&paths).expect("a torn append");
    assert!(loaded.torn_tail);
    assert_eq!(loaded.last_seq, 2);

    // The same with the space the writer laid down ahead after it: its NULs are not
    // counted, or every torn append into it would be taken for damage.
    let ahead = vec![0; SPACE_AHEAD_BYTES as usize];
    fs::write(&paths.journal, holed(&[&tail[..=cut], &ahead].concat())).unwrap();
    let loaded = load(&paths).expect("a torn append before the space ahead");
    assert!(loaded.torn_tail);
    assert_eq!(loaded.last_seq, 2);
    assert_eq!(
        loaded.journal_data_bytes,
        (two_records().len() + cut + 1) as u64
    );
    fs::write(&paths.journal, [damaged.as_slice(), &ahead].concat()).unwrap();
    assert!(matches!(
        load(&paths),
        Err(StoreError::Journal { line: 3, .. })
    ));

    // One line longer than a piece, torn: a torn append too.
    let long = [vec![0u8; MAX_UNSYNCED_BYTES + 1], b"\n".to_vec()].concat();
    fs::write(&paths.journal, holed(&long)).unwrap();
    let loaded = load(&paths).expect("one long torn line");
    assert_eq!(loaded.last_seq, 2);

    // The same damage in journal.old, behind a snapshot that holds all of it: nothing
    // is lost, and the load goes on.
    let mut state = State::default();
    state.apply(&create("a", "h1"));
    state.apply(&join("a", "m2"));
    for n in 3..=3000 {
        state.apply(&join("a", &format!("m{n}")));
    }
    state.journal_seq = 3000;
    write_state(&paths, &state);
    fs::write(&paths.journal_old, &damaged).unwrap();
    fs::write(&paths.journal, joins(3001, 3001)).unwrap();
    let loaded = load(&paths).expect("journal.old vouched for by the snapshot");
    assert_eq!(loaded.last_seq, 3001);
}

/// The bound is the documented 64 KiB (docs/OPERATIONS.md, docs/PERSISTENCE.md), which
/// journals already on disk were written to: a hole with exactly that much data from its
/// line on, over several lines, is a torn append; one byte more is damage.
#[test]
fn a_hole_is_a_torn_append_up_to_exactly_64_kib_after_it() {
    const DOCUMENTED: usize = 64 * 1024;
    let after = joins(3, 40);
    assert!(after.len() < DOCUMENTED / 2);
    let (_dir, paths) = temp_paths();
    for (extra, loads) in [(0, true), (1, false)] {
        // The hole's line: NUL bytes and a newline, filling the tail to the bound.
        let hole_line = [vec![0; DOCUMENTED - after.len() - 1 + extra], vec![b'\n']];
        let tail = [hole_line.concat(), after.clone()].concat();
        assert_eq!(tail.len(), DOCUMENTED + extra);
        fs::write(&paths.journal, [two_records(), tail].concat()).unwrap();
        match load(&paths) {
            Ok(loaded) if loads => {
                assert!(loaded.torn_tail);
                assert_eq!(loaded.last_seq, 2);
            }
            Err(StoreError::Journal { line: 3, .. }) if !loads => {}
            other => panic!("{extra} byte(s) over the bound: {other:?}"),
        }
    }
}

/// The writer's pieces: whole lines, none over the bound unless a single line is, and
/// all of the bytes once, in order.
#[test]
fn sync_pieces_are_whole_lines_within_the_bound() {
    let long_line = [vec![b'x'; MAX_UNSYNCED_BYTES + 5], b"\n".to_vec()].concat();
    let cases = [
        Vec::new(),
        two_records(),
        joins(1, 3000),
        [joins(1, 10), long_line.clone(), joins(11, 2000)].concat(),
        [long_line.clone(), long_line.clone()].concat(),
    ];
    for bytes in cases {
        let pieces: Vec<&[u8]> = sync_pieces(&bytes).collect();
        assert_eq!(pieces.concat(), bytes);
        for piece in &pieces {
            assert!(piece.ends_with(b"\n"), "whole lines");
            let lines = piece.iter().filter(|&&b| b == b'\n').count();
            assert!(
                piece.len() <= MAX_UNSYNCED_BYTES || lines == 1,
                "{} bytes",
                piece.len()
            );
        }
        if bytes.len() > MAX_UNSYNCED_BYTES {
            assert!(pieces.len() > 1);
        }
    }
}

#[test]
fn nuls_at_the_end_are_space_ahead_and_a_hole_only_with_data_after_them() {
    // Zeros alone are the space the writer lays down ahead; zeros with newlines after them
    // (bits of the torn appends that reached the disk) are a hole, up to the last newline.
    for (zeros, lines) in [
        (&[0u8; 1][..], None),
        (&[0; 4096], None),
        (b"\0\0\n", Some(1)),
        (b"\0\n\0\0\n\0", Some(2)),
    ] {
        let mut bytes = two_records();
        bytes.extend_from_slice(zeros);
        let replay = parse_journal(&bytes).unwrap_or_else(|e| panic!("{zeros:?}: {e:?}"));
        assert_eq!(replay.torn_tail, lines.is_some(), "{zeros:?}");
        assert_eq!(
            replay.zero_hole,
            lines.map(|lines| ZeroHole { line: 3, lines }),
            "{zeros:?}"
        );
        assert_eq!(replay.records.len(), 2);
    }
}

/// NUL bytes at the end of journal.old are a hole, not space ahead (the writer cuts that
/// off before it rotates): with no journal after it to vouch for the records they may have
/// held, the load stops. Since nothing but NULs ends it, as a live journal moved to that
/// name would end, the refusal says both what it may be and how to put a moved journal
/// back, not only that records were lost. The same bytes as the journal are its records and
/// space ahead.
#[test]
fn nuls_at_the_end_of_journal_old_are_a_hole_not_space_ahead() {
    let (_dir, paths) = temp_paths();
    let with_nuls = [two_records(), vec![0; 4096]].concat();
    fs::write(&paths.journal_old, &with_nuls).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::OldEndsInNuls { line: 3, bytes: 4096, old, journal }
                if *old == paths.journal_old && *journal == paths.journal
        ),
        "journal.old ending in NUL bytes: {err:?}"
    );
    let said = err.to_string();
    assert!(
        said.contains("a live journal was moved to this name"),
        "{said}"
    );
    assert!(said.contains("or the disk lost synced records"), "{said}");
    // A torn last line before the NULs reads the same: a live journal's torn append and space
    // ahead.
    let torn = [two_records(), b"{\"n\":3,".to_vec(), vec![0; 4096]].concat();
    fs::write(&paths.journal_old, &torn).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::OldEndsInNuls {
                line: 3,
                bytes: 4096,
                ..
            }
        ),
        "a torn line, then NULs, as a live journal's torn append and space ahead: {err:?}"
    );
    // Data after the NULs is a hole in the middle: cut short, records lost.
    let hole = [two_records(), vec![0; 4096], b"{\"n\":4}\n".to_vec()].concat();
    fs::write(&paths.journal_old, &hole).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(&err, StoreError::CutShort { line: 3, .. }),
        "{err:?}"
    );
    fs::write(&paths.journal_old, &with_nuls).unwrap();
    fs::remove_file(&paths.journal_old).unwrap();
    fs::write(&paths.journal, &with_nuls).unwrap();
    let loaded = load(&paths).unwrap();
    assert_eq!(loaded.last_seq, 2);
    assert!(!loaded.torn_tail);
    assert_eq!(loaded.journal_data_bytes, two_records().len() as u64);
}

/// Through [`load`]: a hole in the journal ends it; a hole in journal.old (synced whole
/// before its rotation) is accepted only when the journal goes on from the last record
/// before it, and stops the load when the journal skips records or holds none after it.
#[test]
fn a_zero_filled_hole_ends_the_journal_and_journal_old_only_when_nothing_is_missing() {
    let mut holed = two_records();
    holed.extend_from_slice(&[0; 100]);
    holed.extend_from_slice(&journal_bytes(&[
        (3, join("a", "m3")),
        (4, join("a", "m4")),
    ]));

    let (_dir, paths) = temp_paths();
    fs::write(&paths.journal, &holed).unwrap();
    let loaded = load(&paths).unwrap();
    assert!(loaded.torn_tail);
    assert_eq!(
        loaded.zero_holes,
        [(paths.journal.clone(), ZeroHole { line: 3, lines: 2 })]
    );
    assert_eq!(&loaded.state.rooms["a"].members, &["h1", "m2"]);
    assert_eq!(loaded.last_seq, 2);

    let (_dir, paths) = temp_paths();
    fs::write(&paths.journal_old, &holed).unwrap();
    for journal in [
        None,
        Some(vec![]),
        Some(journal_bytes(&[(5, join("a", "m5"))])),
    ] {
        match &journal {
            Some(bytes) => fs::write(&paths.journal, bytes).unwrap(),
            None => {
                let _ = fs::remove_file(&paths.journal);
            }
        }
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(&err, StoreError::CutShort { line: 3, old } if *old == paths.journal_old),
            "journal {journal:?}: {err}"
        );
    }
    // Record 3 in the journal shows that the hole held no synced record.
    fs::write(&paths.journal, journal_bytes(&[(3, join("a", "m3"))])).unwrap();
    let loaded = load(&paths).unwrap();
    assert_eq!(&loaded.state.rooms["a"].members, &["h1", "m2", "m3"]);
    assert_eq!(
        loaded.zero_holes,
        [(paths.journal_old.clone(), ZeroHole { line: 3, lines: 2 })]
    );
}

#[test]
fn a_torn_journal_old_is_accepted_only_when_the_journal_goes_on_from_its_last_record() {
    let (_dir, paths) = temp_paths();
    let mut torn = two_records();
    torn.extend_from_slice(b"{\"n\":3,\"op\":\"jo");
    fs::write(&paths.journal_old, &torn).unwrap();
    // Only records the old journal already holds (a backup's overlap): nothing vouches
    // for the torn line, which was synced, so it may have held record 3.
    fs::write(&paths.journal, journal_bytes(&[(2, join("a", "m2"))])).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(&err, StoreError::CutShort { line: 3, old } if *old == paths.journal_old),
        "{err}"
    );
    // The record right after the last one applied: no gap, the torn line is ignored.
    fs::write(
        &paths.journal,
        journal_bytes(&[(2, join("a", "m2")), (3, join("a", "m3"))]),
    )
    .unwrap();
    let loaded = load(&paths).unwrap();
    assert_eq!(&loaded.state.rooms["a"].members, &["h1", "m2", "m3"]);
    // A later record would be replayed across a gap: refused, naming the torn line.
    fs::write(&paths.journal, journal_bytes(&[(5, join("a", "m5"))])).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(&err, StoreError::CutShort { line: 3, old } if *old == paths.journal_old),
        "{err}"
    );
    // Without a journal after it, nothing bounds what the torn line held.
    fs::write(&paths.journal, b"").unwrap();
    assert!(matches!(load(&paths), Err(StoreError::CutShort { .. })));
    // After a start that accepted the tail and folded (the snapshot holds every record),
    // cut off before it removed journal.old: the journal, still whole, takes over at 3.
    write_snapshot_at(&paths, 4);
    fs::write(
        &paths.journal,
        journal_bytes(&[(3, join("a", "m3")), (4, join("a", "m4"))]),
    )
    .unwrap();
    assert_eq!(load(&paths).unwrap().last_seq, 4);
    // A journal that takes over at 5 leaves record 3 or 4 to the torn line: a snapshot
    // that holds 4 vouches for it, one that stops at 3 does not.
    fs::write(&paths.journal, journal_bytes(&[(5, join("a", "m5"))])).unwrap();
    assert_eq!(load(&paths).unwrap().last_seq, 5);
    write_snapshot_at(&paths, 3);
    assert!(matches!(
        load(&paths),
        Err(StoreError::CutShort { line: 3, .. })
    ));
}

/// A zero-filled hole can swallow several records, and whole lines after it are ignored:
/// the records it may have held run up to the journal's first, and a snapshot must hold
/// them all to vouch for it.
#[test]
fn a_hole_in_journal_old_is_vouched_for_only_up_to_the_journal_first_record() {
    let (_dir, paths) = temp_paths();
    let mut holed = two_records();
    holed.extend_from_slice(&[0; 64]);
    holed.extend_from_slice(&journal_bytes(&[
        (5, join("a", "m5")),
        (6, join("a", "m6")),
    ]));
    fs::write(&paths.journal_old, &holed).unwrap();
    fs::write(&paths.journal, journal_bytes(&[(7, join("a", "m7"))])).unwrap();
    for (journal_seq, loads) in [(5, false), (6, true)] {
        write_snapshot_at(&paths, journal_seq);
        assert_eq!(load(&paths).is_ok(), loads, "journal_seq {journal_seq}");
    }
}

/// Records are numbered one by one from the state file's `journal_seq` + 1: a record that
/// skips ahead stops the load, naming the file, the line and the missing numbers, whether
/// the gap follows the state file, comes between the journals or within one.
#[test]
fn a_gap_of_one_record_names_that_record_alone() {
    let (_dir, paths) = temp_paths();
    fs::write(&paths.journal, journal_bytes(&[(2, join("a", "m"))])).unwrap();
    let err = load(&paths).unwrap_err().to_string();
    assert!(
        err.contains("holds record 2 where record 1 was due: record 1 is missing ("),
        "{err}"
    );
}

#[test]
fn a_gap_in_the_record_numbers_stops_the_load() {
    // No state file: the journals must start at record 1.
    let (_dir, paths) = temp_paths();
    fs::write(&paths.journal, journal_bytes(&[(1001, join("a", "m"))])).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Gap {
                line: 1,
                expected: 1,
                found: 1001,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("the state file is missing"),
        "{err}"
    );
    // A state file older than the journal.
    write_snapshot_at(&paths, 10);
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Gap {
                expected: 11,
                found: 1001,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("records 11 to 1000 are missing"),
        "{err}"
    );
    // Between journal.old and the journal.
    let (_dir, paths) = temp_paths();
    fs::write(&paths.journal_old, two_records()).unwrap();
    fs::write(&paths.journal, journal_bytes(&[(4, join("a", "m4"))])).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(&err, StoreError::Gap { path, line: 1, expected: 3, found: 4, .. }
            if *path == paths.journal),
        "{err}"
    );
    // Within one journal, after records that followed on.
    fs::remove_file(&paths.journal_old).unwrap();
    let mut bytes = two_records();
    bytes.extend_from_slice(&journal_bytes(&[(7, join("a", "m7"))]));
    fs::write(&paths.journal, bytes).unwrap();
    let err = load(&paths).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Gap {
                line: 3,
                expected: 3,
                found: 7,
                ..
            }
        ),
        "{err}"
    );
    // Numbers that follow on from the state file load.
    write_snapshot_at(&paths, 0);
    fs::write(&paths.journal, two_records()).unwrap();
    assert_eq!(load(&paths).unwrap().last_seq, 2);
}

/// The hint says which file is most likely out of step: a state file older than the
/// journals (the first record due is missing) is told apart from lost data (a gap after
/// records that followed on).
#[test]
fn a_gap_after_the_state_file_blames_its_age_and_a_later_one_the_disk() {
    let (_dir, paths) = temp_paths();
    write_snapshot_at(&paths, 10);
    fs::write(&paths.journal, journal_bytes(&[(13, join("a", "m"))])).unwrap();
    let err = load(&paths).unwrap_err().to_string();
    assert!(
        err.contains("the state file is older than the journals"),
        "{err}"
    );
    fs::write(
        &paths.journal,
        journal_bytes(&[(11, create("a", "h")), (13, join("a", "m"))]),
    )
    .unwrap();
    let err = load(&paths).unwrap_err().to_string();
    assert!(err.contains("the disk lost written data"), "{err}");
}

/// A state file numbered past [`MAX_NUMBER`] is refused as unreadable, naming the bound,
/// before any arithmetic on its number; [`MAX_NUMBER`] itself reads, and is refused only
/// as past [`START_LIMIT`].
#[test]
fn a_state_file_numbered_past_the_range_is_refused_as_unreadable() {
    let (_dir, paths) = temp_paths();
    for journal_seq in [MAX_NUMBER + 1, u64::MAX] {
        write_snapshot_at(&paths, journal_seq);
        match load(&paths) {
            Err(StoreError::Parse { source, .. }) => {
                assert!(source.to_string().contains(LAST_NUMBER), "{source}");
            }
            other => panic!("journal_seq {journal_seq}: {other:?}"),
        }
    }
    write_snapshot_at(&paths, MAX_NUMBER);
    assert!(
        matches!(load(&paths), Err(StoreError::NumbersExhausted { last, .. }) if last == MAX_NUMBER)
    );
}

/// [`START_LIMIT`] is the last record number a daemon starts from, not the first refused:
/// a state file at it loads, and one record past it, in the journal, stops the load.
#[test]
fn a_load_ending_at_the_start_limit_starts_and_one_record_past_it_is_refused() {
    let (_dir, paths) = temp_paths();
    write_snapshot_at(&paths, START_LIMIT);
    assert_eq!(load(&paths).unwrap().last_seq, START_LIMIT);
    fs::write(
        &paths.journal,
        journal_bytes(&[(START_LIMIT + 1, create("a", "h"))]),
    )
    .unwrap();
    assert!(matches!(
        load(&paths),
        Err(StoreError::NumbersExhausted { last, .. }) if last == START_LIMIT + 1
    ));
}

/// `restrict_to_owner` takes the group and other permissions off a state file that has
/// some, keeping the owner's, and leaves a file that has none as it is (a set-user-ID bit
/// included).
#[test]
fn a_state_file_readable_by_others_is_restricted_to_its_owner_and_a_private_one_left_alone() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, paths) = temp_paths();
    let file = File::create(&paths.state).unwrap();
    for (before, after) in [
        (0o644, 0o600),
        (0o777, 0o700),
        (0o640, 0o600),
        (0o604, 0o600),
        (0o600, 0o600),
        (0o4600, 0o4600),
        (0o400, 0o400),
    ] {
        file.set_permissions(fs::Permissions::from_mode(before))
            .unwrap();
        restrict_to_owner(&file, &paths.state);
        let mode = file.metadata().unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, after, "{before:o} became {mode:o}");
    }
}

/// A bad line without a NUL byte is not a crash artifact: acknowledged records may follow
/// it, so it stops the load even when a hole comes later, and in journal.old too.
#[test]
fn a_bad_line_without_a_nul_before_the_end_is_still_an_error() {
    for (bad, later_hole) in [
        (&b"garbage\n"[..], false),
        (b"{\"n\":3,\"op\":\"jo\n", false),
        (b"\x01\xff\n", true),
        (b"{\"n\":3,\"op\":\"jo\n", true),
    ] {
        let mut bytes = two_records();
        bytes.extend_from_slice(bad);
        bytes.extend_from_slice(&journal_bytes(&[(4, join("a", "m4"))]));
        if later_hole {
            bytes.extend_from_slice(&[0; 64]);
        }
        let err = parse_journal(&bytes).unwrap_err();
        assert_eq!(err.0, 3, "{bad:?}, then a hole: {later_hole}");
        let (_dir, paths) = temp_paths();
        fs::write(&paths.journal_old, &bytes).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(
            matches!(&err, StoreError::Journal { path, line: 3, .. } if *path == paths.journal_old),
            "{err}"
        );
    }
}

#[test]
fn corrupt_state_file_is_an_error_naming_the_file() {
    let (_dir, paths) = temp_paths();
    fs::write(&paths.state, b"{ not json").unwrap();
    let err = load(&paths).unwrap_err();
    assert!(err.to_string().contains("s.json"), "{err}");
}

#[test]
fn json_of_another_shape_is_refused() {
    for text in [
        "[]",
        "[1]",
        "[1, {}, {}, null, 0]",
        "{}",
        "{\"unknown\": 1}",
        "{\"version\": 1, \"journal_seq\": 4}",
        "3",
        "-3",
        "2.5",
        "true",
        "null",
        "\"rooms\"",
    ] {
        let err = parse_state(text.as_bytes()).expect_err(text).to_string();
        assert!(err.contains("not an ocm state file"), "{text}: {err}");
        // Either key will do: the message must not ask for both.
        assert!(
            err.contains("with a \"rooms\" or \"tokens\" key"),
            "{text}: {err}"
        );
    }
    // Right shape, wrong contents or syntax: the parser's own message.
    for text in [
        "{\"rooms\": 5}",
        "{\"rooms\": {}} trailing",
        "{\"rooms\": {}, \"rooms\": {}}",
    ] {
        let err = parse_state(text.as_bytes()).expect_err(text).to_string();
        assert!(!err.contains("not an ocm state file"), "{text}: {err}");
    }
    assert!(parse_state(b"{\"rooms\": {}}").is_ok());
    assert!(parse_state(b"{\"tokens\": {}, \"rooms\": {}}").is_ok());
    // Escaped keys are keys too.
    assert!(parse_state(b"{\"r\\u006foms\": {}}").is_ok());
}

#[test]
fn a_failed_atomic_write_leaves_the_old_file_and_no_temporary() {
    let (_dir, paths) = temp_paths();
    write_atomic(&paths.state, b"old").unwrap();
    let err = write_atomic_with(&paths.state, |file| {
        file.write_all(&[b'x'; 100_000])?;
        Err(io::Error::other("disk full"))
    })
    .unwrap_err();
    let mut tmp = paths.state.as_os_str().to_owned();
    tmp.push(".tmp");
    assert_eq!(
        err.to_string(),
        format!("{}: disk full", Path::new(&tmp).display())
    );
    assert_eq!(fs::read(&paths.state).unwrap(), b"old");
    assert!(!Path::new(&tmp).exists(), "the partial file is removed");
    assert_eq!(
        write_atomic_with(&paths.state, |f| f.write_all(b"new")).unwrap(),
        3
    );
    assert_eq!(fs::read(&paths.state).unwrap(), b"new");
}

/// A room and a member that use nothing of ocmd's own are written in the original's
/// shape, none of the optional keys added (the module doc: its tools read our files); an
/// optional key is written when it holds something, and reads back.
#[test]
fn a_plain_room_and_member_are_written_in_the_originals_shape() {
    let mut state = State::default();
    state.apply(&create("r", "h"));
    state.apply(&Record::Register {
        token: "h".into(),
        address: "[::1]:9".parse().unwrap(),
        local: None,
    });
    let bytes = state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap();
    let file: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let keys = |value: &serde_json::Value| {
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(&file["rooms"]["r"]),
        ["created_at", "host_token", "members"]
    );
    assert_eq!(
        keys(&file["tokens"]["h"]),
        ["address", "is_host", "room_name", "username"]
    );
    assert_eq!(
        file["tokens"]["h"]["address"],
        serde_json::json!(["::1", 9])
    );

    let room = state.rooms.get_mut("r").unwrap();
    (room.listed, room.next_seq) = (false, 5);
    state.tokens.get_mut("h").unwrap().caps = 3;
    let bytes = state.to_file_bytes(SystemTime::UNIX_EPOCH).unwrap();
    assert_eq!(parse_state(&bytes).unwrap(), state);
}

/// In the original's file only a name that starts with a quote is taken for a JSON
/// string: one with a space before the quotes is a name a client chose, kept as it is.
#[test]
fn the_originals_names_are_unquoted_only_when_they_start_with_a_quote() {
    let text = r#"{"rooms": {}, "tokens": {
        "a": {"username": " \"x\"", "room_name": "r"},
        "b": {"username": "\"y\" ", "room_name": "r"}}}"#;
    let mut state = parse_state(text.as_bytes()).unwrap();
    state.normalize();
    assert_eq!(state.tokens["a"].username, " \"x\"");
    assert_eq!(state.tokens["b"].username, "y");
}

/// Only a missing file is taken for an empty one: a state file or journal that is there
/// but cannot be opened (here a symlink loop) stops the load, naming it, rather than
/// being skipped with the records it holds.
#[test]
fn a_file_that_cannot_be_opened_stops_the_load_naming_it() {
    for which in 0..3 {
        let (_dir, paths) = temp_paths();
        let path = [&paths.state, &paths.journal_old, &paths.journal][which];
        std::os::unix::fs::symlink(path, path).unwrap();
        match load(&paths) {
            Err(StoreError::Read { path: named, .. }) => assert_eq!(&named, path),
            other => panic!("{}: {other:?}", path.display()),
        }
    }
}

/// A `rooms` value that is not an object is refused, saying what was expected.
#[test]
fn rooms_that_are_not_an_object_are_refused_saying_what_was_expected() {
    let err = parse_state(br#"{"rooms": 5}"#).unwrap_err().to_string();
    assert!(err.contains("expected a JSON object"), "{err}");
}

/// A crash mid-write leaves the temporary file behind: the next write replaces it
/// rather than failing on the exclusive create.
#[test]
fn a_temporary_file_left_by_a_crash_is_replaced() {
    let (_dir, paths) = temp_paths();
    let mut tmp = paths.state.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, b"half a snapshot").unwrap();
    write_atomic(&paths.state, b"whole").expect("the leftover is replaced");
    assert_eq!(fs::read(&paths.state).unwrap(), b"whole");
    assert!(!Path::new(&tmp).exists());
}

/// Something in the way of the temporary file (here a directory, which an exclusive
/// create and the removal of a leftover both refuse) fails the write with an error that
/// names the temporary file: the caller names the state file, which is fine.
#[test]
fn an_error_of_the_temporary_file_names_it() {
    let (_dir, paths) = temp_paths();
    let mut tmp = paths.state.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::create_dir(&tmp).unwrap();
    let err = write_atomic(&paths.state, b"x").unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: ", Path::new(&tmp).display())),
        "{err}"
    );
    assert!(!paths.state.exists(), "nothing was written");
}

/// A temporary file that cannot be created (here in sysfs, which refuses it) fails the
/// write with the creation's own error, not with that of removing a leftover that is
/// not there (`NotFound`, which would send the operator looking for a missing file).
#[test]
fn a_temporary_file_that_cannot_be_created_fails_with_the_reason() {
    if !Path::new("/sys/kernel").is_dir() {
        return crate::test_shared::skipped("this host has no sysfs");
    }
    let err = write_atomic(Path::new("/sys/ocm-state.json"), b"x").unwrap_err();
    assert_ne!(err.kind(), io::ErrorKind::NotFound, "{err}");
}

/// A state path without a directory part (`--state room_manager.json`) lives in the
/// working directory, and that is the directory synced.
#[test]
fn a_bare_file_name_syncs_the_working_directory() {
    sync_dir(Path::new("room_manager.json")).expect("the working directory is synced");
}

#[test]
fn missing_file_is_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load(&Paths::new(&dir.path().join("none.json"))).unwrap();
    assert!(loaded.state.rooms.is_empty());
    assert_eq!(loaded.last_seq, 0);
}

#[test]
fn replaying_twice_changes_nothing() {
    let records = [
        create("a", "h"),
        Record::Join {
            room: "a".into(),
            member: member("m", "bob"),
        },
        Record::Leave { token: "m".into() },
        Record::CloseRoom { room: "a".into() },
        create("a", "h2"),
        Record::Join {
            room: "a".into(),
            member: member("m2", "cy"),
        },
    ];
    let mut once = State::default();
    records.iter().for_each(|r| once.apply(r));
    let mut twice = once.clone();
    records.iter().for_each(|r| twice.apply(r));
    assert_eq!(once, twice);
    assert_eq!(once.rooms["a"].members, vec!["h2", "m2"]);
}
