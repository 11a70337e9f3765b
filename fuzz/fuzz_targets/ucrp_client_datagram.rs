//! Parses arbitrary bytes as a client datagram with `ucrp::parse`.
//!
//! Properties, when it parses:
//! - `ucrp::datagram::encode(room_name, token, text)` gives back exactly the input;
//! - the token is not empty, the input is at most `MAX_DATAGRAM_LEN` bytes;
//! - chat text is never a control word (`__REGISTER__`, `__LEAVE__`) nor the reserved
//!   `__ROOM_CLOSED__`, so it can never be relayed as the server's notice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ucrp::datagram::{LEAVE, REGISTER};
use ucrp::{Message, MAX_DATAGRAM_LEN, ROOM_CLOSED};

fuzz_target!(|data: &[u8]| {
    let Ok(datagram) = ucrp::parse(data) else {
        return;
    };
    assert!(data.len() <= MAX_DATAGRAM_LEN);
    assert!(!datagram.token.is_empty());
    let text = match datagram.message {
        Message::Register => REGISTER,
        Message::Leave => LEAVE,
        Message::Chat(text) => {
            assert!(!text.is_empty());
            assert_ne!(
                text.as_bytes(),
                ROOM_CLOSED,
                "reserved word accepted as chat"
            );
            assert_ne!(text, REGISTER);
            assert_ne!(text, LEAVE);
            text
        }
    };
    let mut out = Vec::new();
    ucrp::datagram::encode(datagram.room_name, datagram.token, text, &mut out)
        .expect("a parsed datagram re-encodes");
    assert_eq!(out, data, "re-encoding differs from the input");
});
