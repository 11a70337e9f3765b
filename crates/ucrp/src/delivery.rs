//! Server-to-client datagrams.
//!
//! Original frames, the only ones an original client ever receives:
//!
//! | offset | size | field                          |
//! |-------:|------|--------------------------------|
//! | 0      | 1    | sender name size `S` (1..=255) |
//! | 1      | `S`  | sender name, UTF-8             |
//! | 1+`S`  | rest | message, UTF-8                 |
//!
//! and the bare 15-byte notice `__ROOM_CLOSED__` (`5f 5f 52 4f 4f 4d ...`).
//!
//! Extension frames, sent only to members that asked for them with `caps` at join, start with a
//! zero byte (a sender size no real sender has) and a kind byte:
//!
//! | kind | name      | body after `00 kind`                                        |
//! |-----:|-----------|-------------------------------------------------------------|
//! | 0x01 | batch     | repeated `[u16 BE length][an inner non-batch frame]`        |
//! | 0x02 | sequenced | `[u64 BE seq][u8 S][sender][message]`                       |
//! | 0x03 | notice    | `[u8 what: 1 joined, 2 left, 3 timed out][u8 S][name]`      |

use crate::Error;

/// The room-closed notice, as text.
pub const ROOM_CLOSED_STR: &str = "__ROOM_CLOSED__";
/// The room-closed notice, as sent: exactly these 15 bytes.
pub const ROOM_CLOSED: &[u8] = ROOM_CLOSED_STR.as_bytes();
/// First byte of every extension frame.
pub const EXTENSION: u8 = 0x00;
/// Extension kind: several frames in one datagram.
pub const KIND_BATCH: u8 = 0x01;
/// Extension kind: a chat message with a room sequence number.
pub const KIND_SEQUENCED: u8 = 0x02;
/// Extension kind: a membership notice.
pub const KIND_NOTICE: u8 = 0x03;
/// Bytes a batch spends on each entry's length prefix.
pub const BATCH_ENTRY_OVERHEAD: usize = 2;
/// Bytes a batch spends on its own header.
pub const BATCH_HEADER_LEN: usize = 2;

/// What a membership notice says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// 1: the member joined the room.
    Joined,
    /// 2: the member left with `__LEAVE__`.
    Left,
    /// 3: the member was removed after missing its keepalives.
    TimedOut,
}

impl Notice {
    fn byte(self) -> u8 {
        match self {
            Notice::Joined => 0x01,
            Notice::Left => 0x02,
            Notice::TimedOut => 0x03,
        }
    }
}

/// A decoded server datagram, borrowing from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// An original chat frame.
    Chat {
        /// Who sent it.
        sender: &'a str,
        /// The text.
        message: &'a str,
    },
    /// `__ROOM_CLOSED__`: the room is gone (the host left or timed out, the room closed as
    /// idle, or the answer to a token of a room that closed before).
    RoomClosed,
    /// A chat message with the room's sequence number.
    Sequenced {
        /// Per-room sequence number, counting from 1.
        seq: u64,
        /// Who sent it.
        sender: &'a str,
        /// The text.
        message: &'a str,
    },
    /// A membership notice.
    Notice {
        /// What happened.
        what: Notice,
        /// To whom.
        name: &'a str,
    },
    /// Several frames; walk them with [`batch_entries`].
    Batch(&'a [u8]),
}

fn text(bytes: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(bytes).map_err(|_| Error::NotUtf8)
}

/// Splits `[u8 S][S bytes][rest]`, the tail of a frame of `frame_len` bytes that starts
/// at byte `at` (so that errors give the frame's real lengths, not the tail's).
fn sized(d: &[u8], at: usize, frame_len: usize) -> Result<(&[u8], &[u8]), Error> {
    let [len, rest @ ..] = d else {
        return Err(Error::TooShort {
            len: frame_len,
            min: at + 1,
        });
    };
    let len = usize::from(*len);
    if rest.len() < len {
        return Err(Error::LengthMismatch {
            declared: at + 1 + len,
            actual: frame_len,
        });
    }
    Ok(rest.split_at(len))
}

/// Bytes before a sequenced frame's sender size: `00 02` and the 8-byte sequence number.
const SEQUENCED_HEAD: usize = 10;
/// Bytes before a notice's name size: `00 03` and the `what` byte.
const NOTICE_HEAD: usize = 3;

/// Decodes one server datagram (or one batch entry).
pub fn parse(d: &[u8]) -> Result<Delivery<'_>, Error> {
    if d == ROOM_CLOSED {
        return Ok(Delivery::RoomClosed);
    }
    match d {
        [] => Err(Error::TooShort { len: 0, min: 1 }),
        [EXTENSION] => Err(Error::TooShort { len: 1, min: 2 }),
        [EXTENSION, KIND_BATCH, body @ ..] => Ok(Delivery::Batch(body)),
        [EXTENSION, KIND_SEQUENCED, rest @ ..] => {
            let (seq, rest) = rest.split_first_chunk::<8>().ok_or(Error::TooShort {
                len: d.len(),
                min: SEQUENCED_HEAD + 1,
            })?;
            let (sender, message) = sized(rest, SEQUENCED_HEAD, d.len())?;
            Ok(Delivery::Sequenced {
                seq: u64::from_be_bytes(*seq),
                sender: text(sender)?,
                message: text(message)?,
            })
        }
        [EXTENSION, KIND_NOTICE, what, rest @ ..] => {
            let what = match what {
                0x01 => Notice::Joined,
                0x02 => Notice::Left,
                0x03 => Notice::TimedOut,
                _ => return Err(Error::UnknownNotice { what: *what }),
            };
            let (name, _) = sized(rest, NOTICE_HEAD, d.len())?;
            Ok(Delivery::Notice {
                what,
                name: text(name)?,
            })
        }
        // A notice cut before its `what` byte: a known kind, too short.
        [EXTENSION, KIND_NOTICE] => Err(Error::TooShort {
            len: d.len(),
            min: NOTICE_HEAD + 1,
        }),
        [EXTENSION, kind, ..] => Err(Error::UnknownKind { kind: *kind }),
        _ => {
            let (sender, message) = sized(d, 0, d.len())?;
            Ok(Delivery::Chat {
                sender: text(sender)?,
                message: text(message)?,
            })
        }
    }
}

/// Decodes one datagram of the original server, which sends only `__ROOM_CLOSED__` and
/// original chat frames: a first byte of 0 is an empty sender's chat, not an extension (the
/// original server accepts an empty username). For a client that asked for no extension.
pub fn parse_original(d: &[u8]) -> Result<Delivery<'_>, Error> {
    if d == ROOM_CLOSED {
        return Ok(Delivery::RoomClosed);
    }
    let (sender, message) = sized(d, 0, d.len())?;
    Ok(Delivery::Chat {
        sender: text(sender)?,
        message: text(message)?,
    })
}

/// The message of a chat frame, original or sequenced, as bytes not checked for UTF-8;
/// `None` for any other frame or a malformed one. For a receiver that reads back only what
/// it wrote into the text (`ocm-bench`, at millions of messages per second): [`parse`] is
/// the decoder for everything else.
pub fn chat_message_bytes(d: &[u8]) -> Option<&[u8]> {
    match d {
        [EXTENSION, KIND_SEQUENCED, rest @ ..] => {
            let (_seq, rest) = rest.split_first_chunk::<8>()?;
            sized(rest, SEQUENCED_HEAD, d.len())
                .ok()
                .map(|(_, message)| message)
        }
        [EXTENSION, ..] => None,
        _ if d == ROOM_CLOSED => None,
        _ => sized(d, 0, d.len()).ok().map(|(_, message)| message),
    }
}

/// Walks the entries of a batch body; each item is one frame for [`parse`].
pub fn batch_entries(mut body: &[u8]) -> impl Iterator<Item = Result<&[u8], Error>> {
    std::iter::from_fn(move || {
        if body.is_empty() {
            return None;
        }
        let Some((len, rest)) = body.split_first_chunk::<2>() else {
            body = &[];
            return Some(Err(Error::TooShort { len: 1, min: 2 }));
        };
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len {
            let err = Error::LengthMismatch {
                declared: len,
                actual: rest.len(),
            };
            body = &[];
            return Some(Err(err));
        }
        let (entry, rest) = rest.split_at(len);
        body = rest;
        Some(Ok(entry))
    })
}

/// The size byte of a field sent behind one, or why it cannot be sent so.
fn size_byte(field: &[u8]) -> Result<u8, Error> {
    u8::try_from(field.len()).map_err(|_| Error::FieldTooLong { len: field.len() })
}

fn push_sized(field: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    out.push(size_byte(field)?);
    out.extend_from_slice(field);
    Ok(())
}

/// Appends an original chat frame `[S][sender][message]`.
pub fn encode_chat(sender: &str, message: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    push_sized(sender.as_bytes(), out)?;
    out.extend_from_slice(message);
    Ok(())
}

/// Appends a sequenced chat frame. Like every encoder here, appends nothing when it fails.
pub fn encode_sequenced(
    seq: u64,
    sender: &str,
    message: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    size_byte(sender.as_bytes())?;
    out.extend_from_slice(&[EXTENSION, KIND_SEQUENCED]);
    out.extend_from_slice(&seq.to_be_bytes());
    encode_chat(sender, message, out)
}

/// Appends a membership notice.
pub fn encode_notice(what: Notice, name: &str, out: &mut Vec<u8>) -> Result<(), Error> {
    size_byte(name.as_bytes())?;
    out.extend_from_slice(&[EXTENSION, KIND_NOTICE, what.byte()]);
    push_sized(name.as_bytes(), out)
}

/// The header every batch frame starts with: its entries follow it.
pub const BATCH_HEADER: [u8; BATCH_HEADER_LEN] = [EXTENSION, KIND_BATCH];

/// Appends a batch header; follow with [`push_batch_entry`] calls.
pub fn begin_batch(out: &mut Vec<u8>) {
    out.extend_from_slice(&BATCH_HEADER);
}

/// The length prefix of a batch entry `entry_len` bytes long; `None` when no entry can be
/// that long. A sender that lays out each frame behind its prefix can send a batch as the
/// header followed by those runs of bytes, without copying them into a buffer of its own.
pub fn batch_entry_prefix(entry_len: usize) -> Option<[u8; BATCH_ENTRY_OVERHEAD]> {
    u16::try_from(entry_len).ok().map(u16::to_be_bytes)
}

/// Appends one entry (a whole non-batch frame) to a batch begun with [`begin_batch`].
pub fn push_batch_entry(entry: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let prefix = batch_entry_prefix(entry.len()).ok_or(Error::FieldTooLong { len: entry.len() })?;
    out.extend_from_slice(&prefix);
    out.extend_from_slice(entry);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_original_servers_frames_read_a_leading_zero_as_an_empty_sender() {
        assert_eq!(parse_original(ROOM_CLOSED), Ok(Delivery::RoomClosed));
        assert_eq!(
            parse_original(&[0x00, 0x03, 0x03, 0x00]),
            Ok(Delivery::Chat {
                sender: "",
                message: "\u{3}\u{3}\u{0}"
            })
        );
        assert_eq!(
            parse_original(b"\x03bobhi"),
            Ok(Delivery::Chat {
                sender: "bob",
                message: "hi"
            })
        );
        assert!(parse_original(&[]).is_err());
        assert!(parse_original(&[0x05, b'a']).is_err());
        assert_eq!(parse_original(&[0x01, 0xff]), Err(Error::NotUtf8));
    }

    #[test]
    fn truncated_and_unknown_frames_say_what_is_wrong_with_their_real_lengths() {
        // A notice cut before its `what` byte: a known kind, too short.
        assert_eq!(
            parse(&[0x00, 0x03]),
            Err(Error::TooShort { len: 2, min: 4 })
        );
        // Cut before its name's size byte.
        assert_eq!(
            parse(&[0x00, 0x03, 0x01]),
            Err(Error::TooShort { len: 3, min: 4 })
        );
        // A name longer than the frame: the whole frame's lengths.
        assert_eq!(
            parse(&[0x00, 0x03, 0x01, 0x05, b'a']),
            Err(Error::LengthMismatch {
                declared: 9,
                actual: 5
            })
        );
        // A notice type this version does not know is not an unknown frame kind.
        let unknown = parse(&[0x00, 0x03, 0x07, 0x00]);
        assert_eq!(unknown, Err(Error::UnknownNotice { what: 7 }));
        assert_eq!(
            unknown.unwrap_err().to_string(),
            "unknown membership notice 0x07"
        );
        // A sequenced frame of 10 bytes: its sequence number and no sender size.
        let mut ten = vec![0x00, 0x02];
        ten.extend_from_slice(&9u64.to_be_bytes());
        let short = parse(&ten);
        assert_eq!(short, Err(Error::TooShort { len: 10, min: 11 }));
        assert_eq!(
            short.unwrap_err().to_string(),
            "datagram of 10 bytes is shorter than its 11-byte fixed part"
        );
        // Its sender longer than the frame.
        ten.extend_from_slice(&[0x04, b'b']);
        assert_eq!(
            parse(&ten),
            Err(Error::LengthMismatch {
                declared: 15,
                actual: 12
            })
        );
        // Shorter than its sequence number.
        assert_eq!(
            parse(&[0x00, 0x02, 0x00]),
            Err(Error::TooShort { len: 3, min: 11 })
        );
        // A kind this version does not know is still that.
        assert_eq!(parse(&[0x00, 0x09]), Err(Error::UnknownKind { kind: 9 }));
    }

    #[test]
    fn original_chat_golden_vector() {
        let mut out = Vec::new();
        encode_chat("bob", b"hi", &mut out).unwrap();
        assert_eq!(hex::encode(&out), "03626f626869");
        assert_eq!(
            parse(&out),
            Ok(Delivery::Chat {
                sender: "bob",
                message: "hi"
            })
        );
    }

    #[test]
    fn chat_message_bytes_skips_only_the_utf8_check() {
        let mut out = Vec::new();
        encode_sequenced(7, "al", b"yo", &mut out).unwrap();
        assert_eq!(chat_message_bytes(&out), Some(&b"yo"[..]));
        out.clear();
        encode_chat("bob", &[0xff, 0xfe], &mut out).unwrap();
        assert_eq!(parse(&out), Err(Error::NotUtf8));
        assert_eq!(chat_message_bytes(&out), Some(&[0xff, 0xfe][..]));
        out.clear();
        encode_notice(Notice::Joined, "al", &mut out).unwrap();
        assert_eq!(chat_message_bytes(&out), None);
        assert_eq!(chat_message_bytes(ROOM_CLOSED), None);
        assert_eq!(
            chat_message_bytes(&[0x05, b'a']),
            None,
            "sender longer than the frame"
        );
        assert_eq!(chat_message_bytes(&[EXTENSION, KIND_SEQUENCED, 1, 2]), None);
    }

    #[test]
    fn room_closed_is_the_bare_fifteen_bytes() {
        assert_eq!(hex::encode(ROOM_CLOSED), "5f5f524f4f4d5f434c4f5345445f5f");
        assert_eq!(parse(ROOM_CLOSED), Ok(Delivery::RoomClosed));
    }

    #[test]
    fn extension_frames_round_trip() {
        let mut out = Vec::new();
        encode_sequenced(7, "al", b"yo", &mut out).unwrap();
        assert_eq!(hex::encode(&out), "0002000000000000000702616c796f");
        assert_eq!(
            parse(&out),
            Ok(Delivery::Sequenced {
                seq: 7,
                sender: "al",
                message: "yo"
            })
        );
        out.clear();
        encode_notice(Notice::Joined, "bob", &mut out).unwrap();
        assert_eq!(hex::encode(&out), "00030103626f62");
        assert_eq!(
            parse(&out),
            Ok(Delivery::Notice {
                what: Notice::Joined,
                name: "bob"
            })
        );
    }

    /// The sequence number is all eight bytes, big-endian both ways: a number past 2^32 must
    /// not reach the client cut to its low bytes (it would see a gap or a repeat).
    #[test]
    fn sequence_numbers_keep_all_64_bits() {
        for seq in [1 << 32, 0x0102_0304_0506_0708, u64::MAX] {
            let mut out = Vec::new();
            encode_sequenced(seq, "al", b"yo", &mut out).unwrap();
            assert_eq!(out[2..10], seq.to_be_bytes(), "{seq:#x}");
            assert_eq!(
                parse(&out),
                Ok(Delivery::Sequenced {
                    seq,
                    sender: "al",
                    message: "yo"
                })
            );
        }
    }

    #[test]
    fn every_notice_kind_has_its_own_wire_byte() {
        // PROTOCOL.md: 1 joined, 2 left, 3 timed out. A client told "left" for a member who
        // timed out, or "joined" for one who left, shows the room wrongly.
        for (what, hex) in [
            (Notice::Joined, "00030103626f62"),
            (Notice::Left, "00030203626f62"),
            (Notice::TimedOut, "00030303626f62"),
        ] {
            let mut out = Vec::new();
            encode_notice(what, "bob", &mut out).unwrap();
            assert_eq!(hex::encode(&out), hex, "{what:?}");
            assert_eq!(parse(&out), Ok(Delivery::Notice { what, name: "bob" }));
        }
        assert_eq!(
            parse(&[EXTENSION, KIND_NOTICE, 0x00, 0x00]),
            Err(Error::UnknownNotice { what: 0 })
        );
        assert_eq!(
            parse(&[EXTENSION, KIND_NOTICE, 0x04, 0x00]),
            Err(Error::UnknownNotice { what: 4 })
        );
    }

    #[test]
    fn batch_carries_several_frames() {
        let mut a = Vec::new();
        encode_chat("a", b"1", &mut a).unwrap();
        let mut b = Vec::new();
        encode_sequenced(2, "b", b"2", &mut b).unwrap();
        let mut batch = Vec::new();
        begin_batch(&mut batch);
        push_batch_entry(&a, &mut batch).unwrap();
        push_batch_entry(&b, &mut batch).unwrap();
        let Ok(Delivery::Batch(body)) = parse(&batch) else {
            panic!("not a batch")
        };
        let entries: Vec<_> = batch_entries(body).collect::<Result<_, _>>().unwrap();
        assert_eq!(entries, vec![&a[..], &b[..]]);
    }

    /// A batch of one chat frame, byte for byte: `00 01`, then the entry's length `00 03`
    /// and the entry `01 61 31` ("a" says "1"). The other tests build and read batches
    /// through the same constants, so they cannot see the kind byte change. Kills the hand
    /// mutant that moves `KIND_BATCH` off 0x01.
    #[test]
    fn batch_golden_vector() {
        let mut entry = Vec::new();
        encode_chat("a", b"1", &mut entry).unwrap();
        let mut batch = Vec::new();
        begin_batch(&mut batch);
        push_batch_entry(&entry, &mut batch).unwrap();
        assert_eq!(hex::encode(&batch), "00010003016131");
        let bytes = hex::decode("00010003016131").unwrap();
        let Ok(Delivery::Batch(body)) = parse(&bytes) else {
            panic!("not a batch: {:?}", parse(&bytes))
        };
        assert_eq!(
            batch_entries(body).collect::<Vec<_>>(),
            [Ok(&[0x01, 0x61, 0x31][..])]
        );
    }

    #[test]
    fn a_batch_laid_out_from_prefixed_runs_is_the_same_frame() {
        // The daemon sends a batch as the header, then each entry's prefix and bytes taken
        // from where they lie: the frame must be the one push_batch_entry builds.
        let (a, b) = (b"\x01aone".as_slice(), vec![b'x'; 300]);
        let mut built = Vec::new();
        begin_batch(&mut built);
        push_batch_entry(a, &mut built).unwrap();
        push_batch_entry(&b, &mut built).unwrap();
        let mut laid = BATCH_HEADER.to_vec();
        for entry in [a, &b[..]] {
            laid.extend_from_slice(&batch_entry_prefix(entry.len()).unwrap());
            laid.extend_from_slice(entry);
        }
        assert_eq!(laid, built);
        assert_eq!(batch_entry_prefix(0), Some([0, 0]));
        assert_eq!(batch_entry_prefix(300), Some([0x01, 0x2c]));
        assert_eq!(batch_entry_prefix(65_535), Some([0xff, 0xff]));
        assert_eq!(batch_entry_prefix(65_536), None);
        assert_eq!(
            push_batch_entry(&vec![0; 65_536], &mut built),
            Err(Error::FieldTooLong { len: 65_536 })
        );
    }

    #[test]
    fn a_broken_batch_yields_one_error_and_ends() {
        // A receiver walks the entries in a `for` loop: after an entry it cannot split, the
        // walk must end, or a hostile datagram keeps it logging the same error forever.
        // `take` bounds the walk so that a regression fails here instead of hanging.
        let walk = |body: &'static [u8]| batch_entries(body).take(5).collect::<Vec<_>>();
        assert_eq!(
            walk(&[0x00, 0x01, b'x', 0x07]),
            [Ok(&b"x"[..]), Err(Error::TooShort { len: 1, min: 2 })]
        );
        assert_eq!(
            walk(&[0x00, 0x01, b'x', 0x00, 0x05, b'y']),
            [
                Ok(&b"x"[..]),
                Err(Error::LengthMismatch {
                    declared: 5,
                    actual: 1
                })
            ]
        );
        assert_eq!(walk(&[0x00, 0x00]), [Ok(&b""[..])]);
    }

    #[test]
    fn malformed_server_frames() {
        assert_eq!(parse(&[]), Err(Error::TooShort { len: 0, min: 1 }));
        assert_eq!(parse(&[0x00]), Err(Error::TooShort { len: 1, min: 2 }));
        assert_eq!(parse(&[0x00, 0x09]), Err(Error::UnknownKind { kind: 9 }));
        assert_eq!(
            parse(&[0x05, b'a']),
            Err(Error::LengthMismatch {
                declared: 6,
                actual: 2
            })
        );
        assert_eq!(parse(&[0x01, 0xff]), Err(Error::NotUtf8));
        assert!(matches!(
            parse(&[0x00, 0x02, 1, 2]),
            Err(Error::TooShort { .. })
        ));
        assert_eq!(
            parse(&[0x00, 0x03, 0x09, 0x00]),
            Err(Error::UnknownNotice { what: 9 })
        );
        let broken: Vec<_> = batch_entries(&[0x00, 0x05, b'x']).collect();
        assert_eq!(broken.len(), 1);
        assert!(broken[0].is_err());
        // A name too long for its size byte: refused, and nothing appended (the caller's
        // buffer may hold other frames).
        let long = "x".repeat(256);
        let mut out = b"kept".to_vec();
        assert_eq!(
            encode_chat(&long, b"", &mut out),
            Err(Error::FieldTooLong { len: 256 })
        );
        assert_eq!(
            encode_sequenced(7, &long, b"hi", &mut out),
            Err(Error::FieldTooLong { len: 256 })
        );
        assert_eq!(
            encode_notice(Notice::Joined, &long, &mut out),
            Err(Error::FieldTooLong { len: 256 })
        );
        assert_eq!(out, b"kept");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Delivery::Batch(body)) = parse(&bytes) {
                for entry in batch_entries(body).flatten() {
                    let _ = parse(entry);
                }
            }
        }

        #[test]
        fn chat_message_bytes_agrees_with_parse(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            match parse(&bytes) {
                Ok(Delivery::Chat { message, .. }) | Ok(Delivery::Sequenced { message, .. }) => {
                    prop_assert_eq!(chat_message_bytes(&bytes), Some(message.as_bytes()));
                }
                // Frames that are well formed but not chat have no message.
                Ok(_) => prop_assert_eq!(chat_message_bytes(&bytes), None),
                // The bytes version skips only the UTF-8 check, and only for chat.
                Err(Error::NotUtf8) if bytes.starts_with(&[EXTENSION, KIND_NOTICE]) => {
                    prop_assert_eq!(chat_message_bytes(&bytes), None)
                }
                Err(Error::NotUtf8) => prop_assert!(chat_message_bytes(&bytes).is_some()),
                Err(_) => prop_assert_eq!(chat_message_bytes(&bytes), None),
            }
        }

        #[test]
        fn chat_message_bytes_returns_the_message_of_any_chat_frame(
            sender in "[a-z]{1,20}",
            message in proptest::collection::vec(any::<u8>(), 0..100),
            seq in proptest::option::of(any::<u64>()),
        ) {
            let mut out = Vec::new();
            match seq {
                Some(seq) => encode_sequenced(seq, &sender, &message, &mut out).unwrap(),
                None => encode_chat(&sender, &message, &mut out).unwrap(),
            }
            prop_assume!(out != ROOM_CLOSED);
            prop_assert_eq!(chat_message_bytes(&out), Some(&message[..]));
            if let Ok(text) = std::str::from_utf8(&message) {
                let parsed = match parse(&out) {
                    Ok(Delivery::Chat { message, .. }) | Ok(Delivery::Sequenced { message, .. }) => message,
                    other => panic!("{other:?}"),
                };
                prop_assert_eq!(parsed, text);
            }
        }

        #[test]
        fn chat_round_trips(sender in "[a-z]{1,64}", message in ".{0,100}") {
            let mut out = Vec::new();
            encode_chat(&sender, message.as_bytes(), &mut out).unwrap();
            prop_assume!(out != ROOM_CLOSED);
            prop_assert_eq!(parse(&out), Ok(Delivery::Chat { sender: &sender, message: &message }));
        }
    }
}
