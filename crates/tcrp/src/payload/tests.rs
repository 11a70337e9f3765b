use super::*;
use crate::Error;

#[test]
fn original_json_string_request() {
    let r = parse_request(b"\"alice\"").unwrap();
    assert_eq!(r.username, "alice");
    assert_eq!(r.form, RequestForm::JsonString);
    assert!(r.caps.is_empty());
    // Python escapes non-ASCII by default: "\u00e9" must decode to é.
    assert_eq!(parse_request(b"\"\\u00e9mile\"").unwrap().username, "émile");
}

/// The original client's name read from bytes that were not UTF-8 in its locale: Python
/// keeps each as a lone surrogate and `json.dumps` escapes it. Each lone surrogate is read as
/// U+FFFD and the rest of the string as written; the request keeps the JSON-string form,
/// where it was once taken as text, quotes and escapes included.
#[test]
fn a_json_string_with_lone_surrogates_is_the_name_with_replacement_characters() {
    for (payload, name) in [
        (r#""\udce9t\u00e9""#, "\u{fffd}t\u{e9}"),
        (r#""\ud800""#, "\u{fffd}"),
        (r#" "a\udcff\udcfeb" "#, "a\u{fffd}\u{fffd}b"),
        // A trailing surrogate first, then a leading one with no pair: each alone.
        (r#""\udc00\ud800x""#, "\u{fffd}\u{fffd}x"),
        // A lone surrogate beside a real pair: the pair is still its character.
        (r#""\ud83d\ude00\ud83d""#, "\u{1f600}\u{fffd}"),
    ] {
        let r = parse_request(payload.as_bytes()).unwrap();
        assert_eq!(r.username, name, "{payload}");
        assert_eq!(r.form, RequestForm::JsonString, "{payload}");
    }
    // Anything but one JSON string stays text, as before: more after it, an array.
    for text in [
        r#""\ud800" x"#,
        r#"["\ud800"]"#,
        r#""\ud800"#,
        r#""\uzzzz""#,
    ] {
        let r = parse_request(text.as_bytes()).unwrap();
        assert_eq!((r.username.as_str(), r.form), (text, RequestForm::Text));
    }
}

#[test]
fn json_object_request_with_extensions() {
    let r = parse_request(
        br#"{"username": "bob", "keepalive": 10, "caps": ["seq", "future", "notices"], "x": 1}"#,
    )
    .unwrap();
    assert_eq!(r.username, "bob");
    assert_eq!(r.form, RequestForm::JsonObject);
    assert_eq!(r.keepalive_secs, Some(10));
    assert!(r.caps.contains(Caps::SEQ.with(Caps::NOTICES)));
    assert!(!r.caps.contains(Caps::BATCH));
}

#[test]
fn plain_text_request_is_the_username() {
    let r = parse_request(b"carol").unwrap();
    assert_eq!(r.username, "carol");
    assert_eq!(r.form, RequestForm::Text);
    // JSON that is neither string nor object is taken as text too.
    assert_eq!(parse_request(b"42").unwrap().username, "42");
    // So is text that begins with a brace but not at its start, or a closing one.
    assert_eq!(parse_request(b"a{b").unwrap().username, "a{b");
    assert_eq!(parse_request(b"}x").unwrap().username, "}x");
}

/// A JSON object gone wrong (a trailing comma, a missing quote) is refused, never taken
/// whole as a name: that would create a room without its password and keep the password
/// as the host's name, shown to anyone who asks who is in the room.
#[test]
fn a_broken_json_object_is_refused_not_taken_as_a_name() {
    for payload in [
        &br#"{"username": "bob", "password": "hunter2",}"#[..],
        br#"  {"username": "bob""#,
        b"{",
        b"\n{x}",
        "\u{a0}\u{3000}{x".as_bytes(),
        // JSON allows no byte-order mark, nor anything else that shows as nothing, before
        // its value: a tool that writes one still sent an object.
        "\u{feff}{\"username\": \"bob\", \"password\": \"hunter2\"}".as_bytes(),
        "\u{200b}{\"username\": \"bob\", \"password\": \"hunter2\"}".as_bytes(),
        "\u{2060} \u{202e}\u{200d}{\"password\": \"hunter2\"}".as_bytes(),
    ] {
        let refused = parse_request(payload);
        let Err(Error::MalformedJson { reason }) = refused else {
            panic!("{:?}: {refused:?}", String::from_utf8_lossy(payload));
        };
        assert!(!reason.contains("hunter2"), "{reason}");
        assert!(reason.contains("begins like a JSON object"), "{reason}");
    }
    let Err(Error::MalformedJson { reason }) = parse_request("\u{feff}{}".as_bytes()) else {
        panic!("a byte-order mark before an object is refused");
    };
    assert!(reason.contains("it begins with U+FEFF"), "{reason}");
    // Text that only holds such a character somewhere is still a name.
    let name = "a\u{feff}{b}";
    assert_eq!(parse_request(name.as_bytes()).unwrap().username, name);
}

#[test]
fn request_errors() {
    assert_eq!(parse_request(&[0xff, 0x00]), Err(Error::PayloadNotUtf8));
    assert!(matches!(
        parse_request(br#"{"username": 5}"#),
        Err(Error::MalformedJson { .. })
    ));
    assert!(matches!(
        parse_request(br#"{"username": "a", "keepalive": -1}"#),
        Err(Error::MalformedJson { .. })
    ));
    assert_eq!(parse_request(br#"{"caps": []}"#).unwrap().username, "");
}

#[test]
fn request_encoding_round_trips_both_forms() {
    let mut out = Vec::new();
    Request::original("alice").encode(&mut out);
    assert_eq!(out, b"\"alice\"");
    let rich = Request {
        keepalive_secs: Some(10),
        caps: Caps::SEQ,
        form: RequestForm::JsonObject,
        ..Request::original("bob")
    };
    out.clear();
    rich.encode(&mut out);
    assert_eq!(
        out,
        br#"{"username": "bob", "keepalive": 10, "caps": ["seq"]}"#
    );
    assert_eq!(parse_request(&out).unwrap(), rich);
}

/// A password that is not a string is refused without its value in the message, which
/// the reply and the logs carry; null is no password.
#[test]
fn a_password_of_the_wrong_type_is_refused_without_being_quoted() {
    for payload in [
        &br#"{"username": "bob", "password": 8675309}"#[..],
        br#"{"username": "bob", "password": ["hunter2"]}"#,
        br#"{"username": "bob", "password": {"p": "hunter2"}}"#,
    ] {
        let error = parse_request(payload).expect_err("refused").to_string();
        assert!(error.contains("\"password\" must be a string"), "{error}");
        assert!(
            !error.contains("8675309") && !error.contains("hunter2"),
            "{error}"
        );
    }
    let none = parse_request(br#"{"username": "bob", "password": null}"#).expect("parsed");
    assert_eq!(none.password, None);
    let some = parse_request(br#"{"username": "bob", "password": "pw"}"#).expect("parsed");
    assert_eq!(some.password.as_deref(), Some("pw"));
}

#[test]
fn any_extension_field_makes_the_request_a_json_object() {
    // A bare JSON string carries the username alone: a request in the original form with
    // any other field set must still go out as an object, or the field is silently lost.
    let bob = || Request::original("bob");
    let one_field_each = [
        Request {
            keepalive_secs: Some(10),
            ..bob()
        },
        Request {
            caps: Caps::SEQ,
            ..bob()
        },
        Request {
            max_datagram: Some(1472),
            ..bob()
        },
        Request {
            password: Some("pw".into()),
            ..bob()
        },
        Request {
            listed: Some(false),
            ..bob()
        },
        Request {
            before: Some(7),
            ..bob()
        },
        Request {
            limit: Some(3),
            ..bob()
        },
        Request {
            token: Some("ab".into()),
            ..bob()
        },
    ];
    for request in one_field_each {
        let mut out = Vec::new();
        request.encode(&mut out);
        let sent = Request {
            form: RequestForm::JsonObject,
            ..request.clone()
        };
        assert_eq!(parse_request(&out), Ok(sent), "{request:?}");
    }
    // And the object form is kept when it was asked for, even with the username alone.
    let mut out = Vec::new();
    Request {
        form: RequestForm::JsonObject,
        ..bob()
    }
    .encode(&mut out);
    assert_eq!(out, br#"{"username": "bob"}"#);
}

#[test]
fn max_datagram_is_read_checked_and_written() {
    let r =
        parse_request(br#"{"username": "bob", "caps": ["batch"], "max_datagram": 65507}"#).unwrap();
    assert_eq!(r.max_datagram, Some(65507));
    assert_eq!(
        parse_request(br#"{"username": "bob"}"#)
            .unwrap()
            .max_datagram,
        None
    );
    for bad in ["511", "65508", "0", "-1", "4294967296", "1.5", "\"4096\""] {
        let payload = format!(r#"{{"username": "bob", "max_datagram": {bad}}}"#);
        let err = parse_request(payload.as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::OutOfRange {
                    field: "max_datagram",
                    ..
                } | Error::MalformedJson { .. }
            ),
            "{bad}: {err:?}"
        );
    }
    let err = parse_request(br#"{"username": "bob", "max_datagram": 70000}"#).unwrap_err();
    assert_eq!(
        err.to_string(),
        "\"max_datagram\" must be between 512 and 65507, got 70000"
    );
    let asked = Request {
        caps: Caps::BATCH,
        max_datagram: Some(1472),
        form: RequestForm::JsonObject,
        ..Request::original("bob")
    };
    let mut out = Vec::new();
    asked.encode(&mut out);
    assert_eq!(
        out,
        br#"{"username": "bob", "caps": ["batch"], "max_datagram": 1472}"#
    );
    assert_eq!(parse_request(&out).unwrap(), asked);
}

#[test]
fn replies_are_written_like_python() {
    let mut out = Vec::new();
    encode_success(&mut out);
    assert_eq!(out, br#"{"success": true}"#);
    out.clear();
    encode_complete("00ff", &mut out);
    assert_eq!(out, br#"{"token": "00ff"}"#);
    out.clear();
    encode_failure(ErrorCode::NameTaken, "say \"hi\"", &mut out);
    assert_eq!(
        out,
        br#"{"success": false, "error": "name_taken", "message": "say \"hi\""}"#
    );
}

#[test]
fn compliance_parsing_accepts_original_forms() {
    assert_eq!(
        parse_compliance(br#"{"success": true}"#),
        Ok(Compliance::Success)
    );
    assert_eq!(
        parse_compliance(br#"{"success": 1}"#),
        Ok(Compliance::Success)
    );
    assert_eq!(
        parse_compliance(br#"{"success": 0}"#),
        Ok(Compliance::Failure {
            code: None,
            message: None
        })
    );
    assert_eq!(
        parse_compliance(br#"{"success": false, "error": "room_not_found", "message": "no"}"#),
        Ok(Compliance::Failure {
            code: Some(ErrorCode::RoomNotFound),
            message: Some("no".into())
        })
    );
    assert!(parse_compliance(br#"{"success": 2}"#).is_err());
    assert!(parse_compliance(b"nope").is_err());
}

#[test]
fn complete_parsing() {
    assert_eq!(
        parse_complete(br#"{"token": "abc", "x": 1}"#),
        Ok("abc".into())
    );
    assert_eq!(
        parse_complete(br#"{"tok": "abc"}"#),
        Err(Error::MissingToken)
    );
    assert!(matches!(
        parse_complete(b"{"),
        Err(Error::MalformedJson { .. })
    ));
}

/// The codes as docs/PROTOCOL.md lists them: clients match on these strings, so a
/// renamed code breaks them even though `parse(as_str())` still round-trips. Kills the
/// hand mutants that rename a code (`room_exists`, `not_member`, `rate_limited`,
/// `bad_password` had no test spelling them).
#[test]
fn error_codes_are_spelled_as_the_protocol_lists_them() {
    let spelled: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        spelled,
        [
            "room_exists",
            "room_not_found",
            "name_taken",
            "invalid_room_name",
            "invalid_username",
            "unsupported_operation",
            "malformed_request",
            "server_full",
            "rate_limited",
            "bad_password",
            "not_member",
        ]
    );
}

#[test]
fn error_codes_round_trip() {
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
    }
    assert_eq!(ErrorCode::parse("nope"), None);
}

#[test]
fn presence_and_history_flags_are_optional_and_round_trip() {
    // Written only when set; absent reads as false (replies of older daemons).
    let p: RoomPresence =
        parse_json(br#"{"room":"r","host":"a","members":[{"name":"a","registered":true}]}"#)
            .unwrap();
    assert!(!p.more);
    assert!(!serde_json::to_string(&p).unwrap().contains("more"));
    assert_eq!(p.you, None);
    assert!(!serde_json::to_string(&p).unwrap().contains("you"));
    let cut = RoomPresence {
        more: true,
        ..p.clone()
    };
    let text = serde_json::to_string(&cut).unwrap();
    assert!(text.ends_with(r#"],"more":true}"#), "{text}");
    assert_eq!(parse_json::<RoomPresence>(text.as_bytes()).unwrap(), cut);
    let asked = RoomPresence {
        you: Some(PresentMember {
            name: "zed".into(),
            registered: false,
        }),
        ..cut
    };
    let text = serde_json::to_string(&asked).unwrap();
    assert!(
        text.ends_with(r#""more":true,"you":{"name":"zed","registered":false}}"#),
        "{text}"
    );
    assert_eq!(parse_json::<RoomPresence>(text.as_bytes()).unwrap(), asked);

    let m: HistoryMessage = parse_json(br#"{"seq":1,"sender":"b","text":"hi","at":2.5}"#).unwrap();
    assert!(!m.truncated);
    assert!(!serde_json::to_string(&m).unwrap().contains("truncated"));
    let cut = HistoryMessage {
        truncated: true,
        ..m
    };
    let text = serde_json::to_string(&cut).unwrap();
    assert!(text.ends_with(r#","truncated":true}"#), "{text}");
    assert_eq!(parse_json::<HistoryMessage>(text.as_bytes()).unwrap(), cut);
}

#[test]
fn caps_bits_round_trip() {
    let caps = Caps::from_names(["batch", "notices"]);
    assert_eq!(Caps::from_bits(caps.bits()), caps);
    assert_eq!(caps.names().collect::<Vec<_>>(), ["notices", "batch"]);
}

#[test]
fn a_capability_named_twice_is_still_asked_for() {
    let r = parse_request(br#"{"username": "bob", "caps": ["seq", "batch", "seq"]}"#).unwrap();
    assert_eq!(r.caps, Caps::SEQ.with(Caps::BATCH));
    assert_eq!(Caps::SEQ.with(Caps::SEQ), Caps::SEQ);
}

/// A caps byte read back from the state file keeps only the three known capabilities: an
/// unknown bit kept would make a set with no capability look non-empty and be written back.
#[test]
fn caps_from_bits_drops_unknown_bits() {
    let all = Caps::NOTICES.with(Caps::SEQ).with(Caps::BATCH);
    assert_eq!(Caps::from_bits(0xff), all);
    assert_eq!(Caps::from_bits(0xff).bits(), 0x07);
    assert!(Caps::from_bits(0xf8).is_empty());
    assert_eq!(Caps::from_bits(0x80 | Caps::SEQ.bits()), Caps::SEQ);
}

/// PROTOCOL.md: `max_datagram` is 512–65507, both ends included.
#[test]
fn max_datagram_accepts_both_ends_of_its_range() {
    for edge in [512, 65507] {
        let payload = format!(r#"{{"username": "bob", "max_datagram": {edge}}}"#);
        let request = parse_request(payload.as_bytes()).unwrap();
        assert_eq!(request.max_datagram, Some(edge), "{edge}");
    }
}

/// A client that does not say `"max_datagram"` gets batches of at most 4096 bytes, the
/// original client's receive buffer (`ocm` says nothing when the daemon is on another
/// host). Nothing in this crate reads the constant (the daemon does), and the daemon's
/// own test only bounds its batches from above, so only a test of the value notices a
/// change. Kills the hand mutants that move `DEFAULT_MAX_DATAGRAM` to 4095 or 4097.
#[test]
fn the_default_max_datagram_is_the_original_receive_buffer() {
    assert_eq!(DEFAULT_MAX_DATAGRAM, 4096);
    assert_eq!(
        parse_request(br#"{"username": "a"}"#).unwrap().max_datagram,
        None
    );
}

/// As for Presence and History: a listing's `more` is written only when set, and a listing
/// without it (the reply of an older daemon) reads as complete.
#[test]
fn room_list_more_is_optional_and_round_trips() {
    let list: RoomList =
        parse_json(br#"{"rooms":[{"name":"r","members":2,"created_at":1.5,"password":true}]}"#)
            .unwrap();
    assert!(!list.more);
    assert_eq!(
        list.rooms,
        [ListedRoom {
            name: "r".into(),
            members: 2,
            created_at: 1.5,
            password: true,
        }]
    );
    assert!(!serde_json::to_string(&list).unwrap().contains("more"));
    let cut = RoomList { more: true, ..list };
    let text = serde_json::to_string(&cut).unwrap();
    assert!(text.ends_with(r#"],"more":true}"#), "{text}");
    assert_eq!(parse_json::<RoomList>(text.as_bytes()).unwrap(), cut);
}

#[test]
fn query_requests_write_only_the_keys_set_and_read_back() {
    let mut out = Vec::new();
    Request::query().encode_query(&mut out);
    assert_eq!(out, b"{}");
    let asked = Request {
        token: Some("t0k".into()),
        before: Some(57),
        limit: Some(5),
        ..Request::query()
    };
    out.clear();
    asked.encode_query(&mut out);
    assert_eq!(out, br#"{"token": "t0k", "before": 57, "limit": 5}"#);
    let read = parse_request(&out).unwrap();
    assert_eq!(
        (read.token, read.before, read.limit),
        (asked.token, asked.before, asked.limit)
    );
    let with_password = Request {
        password: Some("pw".into()),
        ..Request::query()
    };
    out.clear();
    with_password.encode_query(&mut out);
    assert_eq!(out, br#"{"password": "pw"}"#);
}
