//! Parses arbitrary bytes as every handshake payload and name: `parse_request`,
//! `parse_compliance`, `parse_complete`, `names::check_room_name`, `names::check_username`.
//!
//! Properties:
//! - a payload taken whole as a username (`RequestForm::Text`) does not begin with `{` once
//!   white space and the characters that show as nothing are passed over;
//! - a request in JSON-object or JSON-string form survives `Request::encode` then
//!   `parse_request` unchanged (username, keepalive, caps, password, listed, before, limit,
//!   token, form);
//! - a parsed COMPLIANCE or COMPLETE survives `encode_*` then `parse_*` unchanged;
//! - a parsed Presence reply (`RoomPresence`, with its optional `more` and `you`) survives
//!   the daemon's encoding (`serde_json::to_vec`) then `parse_json` unchanged;
//! - an accepted room name is the input bytes, 1..=255 of them, with no control character;
//!   an accepted username has 1..=64 characters in at most 255 bytes, no control character.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcrp::names::{self, MAX_ROOM_NAME_BYTES, MAX_USERNAME_BYTES, MAX_USERNAME_CHARS};
use tcrp::payload::{self, Compliance, RequestForm, RoomPresence};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = payload::parse_request(data) {
        if request.form == RequestForm::Text {
            // Never a JSON object gone wrong taken whole as a name (its password with it),
            // behind white space or characters that show as nothing.
            let text = std::str::from_utf8(data).expect("a parsed payload is UTF-8");
            let shown = text.trim_start_matches(|c: char| {
                c.is_whitespace()
                    || names::is_invisible(c)
                    || names::is_modifier(c)
                    || names::is_reordering(c)
            });
            assert!(!shown.starts_with('{'), "taken as a name: {text:?}");
        }
        if matches!(
            request.form,
            RequestForm::JsonObject | RequestForm::JsonString
        ) {
            let mut out = Vec::new();
            request.encode(&mut out);
            let again = payload::parse_request(&out).expect("an encoded request parses");
            assert_eq!(again, request, "request changed through encode: {out:?}");
        }
    }

    match payload::parse_compliance(data) {
        Ok(Compliance::Success) => {
            let mut out = Vec::new();
            payload::encode_success(&mut out);
            assert_eq!(payload::parse_compliance(&out), Ok(Compliance::Success));
        }
        Ok(Compliance::Failure {
            code: Some(code),
            message: Some(message),
        }) => {
            let mut out = Vec::new();
            payload::encode_failure(code, &message, &mut out);
            assert_eq!(
                payload::parse_compliance(&out),
                Ok(Compliance::Failure {
                    code: Some(code),
                    message: Some(message)
                })
            );
        }
        Ok(Compliance::Failure { .. }) | Err(_) => {}
    }

    if let Ok(token) = payload::parse_complete(data) {
        let mut out = Vec::new();
        payload::encode_complete(&token, &mut out);
        assert_eq!(payload::parse_complete(&out), Ok(token));
    }

    if let Ok(presence) = payload::parse_json::<RoomPresence>(data) {
        let out = serde_json::to_vec(&presence).expect("a presence reply serializes");
        let again = payload::parse_json::<RoomPresence>(&out).expect("an encoded reply parses");
        assert_eq!(again, presence, "presence changed through encode: {out:?}");
    }

    if let Ok(name) = names::check_room_name(data) {
        assert_eq!(name.as_bytes(), data);
        assert!((1..=MAX_ROOM_NAME_BYTES).contains(&name.len()));
        assert!(!name.chars().any(char::is_control));
    }

    if let Ok(text) = std::str::from_utf8(data) {
        if names::check_username(text).is_ok() {
            assert!(!text.is_empty() && text.len() <= MAX_USERNAME_BYTES);
            assert!(text.chars().count() <= MAX_USERNAME_CHARS);
            assert!(!text.chars().any(char::is_control));
        }
    }
});
