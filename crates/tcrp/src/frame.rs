//! TCRP framing: the 32-byte header and the body that follows it.
//!
//! | offset | size          | field                                                        |
//! |-------:|---------------|--------------------------------------------------------------|
//! | 0      | 1             | room name size `R` (u8)                                      |
//! | 1      | 1             | operation (1 create, 2 join, 3 list, 4 presence, 5 history)  |
//! | 2      | 1             | state (0 REQUEST, 1 COMPLIANCE, 2 COMPLETE)                  |
//! | 3      | 29            | payload size `P`, unsigned big-endian                        |
//! | 32     | `R`           | room name, UTF-8                                             |
//! | 32+`R` | `P`           | payload                                                      |
//!
//! The original Python client writes the payload size as a zero byte then a 28-byte
//! big-endian number; reading all 29 bytes as one big-endian number covers that and every
//! other well-formed writer. A size that does not fit in a `u64` is refused as
//! [`Error::PayloadSizeOverflow`]: it comes from a peer speaking another protocol.

use std::fmt;

use crate::Error;

/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 32;
/// Width of the payload size field in bytes.
pub const PAYLOAD_SIZE_LEN: usize = 29;
/// Default cap on a frame's payload, in bytes. Callers choose their own cap in [`decode`].
pub const DEFAULT_MAX_PAYLOAD: usize = 16 * 1024;

/// What a frame asks for. The value is echoed in every reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// 1: create a room and become its host.
    CreateRoom,
    /// 2: join an existing room.
    JoinRoom,
    /// 3: list the rooms (an ocm extension).
    ListRooms,
    /// 4: who is in a room and who hosts it (an ocm extension).
    Presence,
    /// 5: a page of a room's recent messages (an ocm extension).
    History,
    /// Any other value. Kept (not rejected) so that a server can echo it in its refusal.
    Other(u8),
}

impl From<u8> for Operation {
    fn from(byte: u8) -> Self {
        match byte {
            0x01 => Operation::CreateRoom,
            0x02 => Operation::JoinRoom,
            0x03 => Operation::ListRooms,
            0x04 => Operation::Presence,
            0x05 => Operation::History,
            other => Operation::Other(other),
        }
    }
}

impl From<Operation> for u8 {
    fn from(op: Operation) -> u8 {
        match op {
            Operation::CreateRoom => 0x01,
            Operation::JoinRoom => 0x02,
            Operation::ListRooms => 0x03,
            Operation::Presence => 0x04,
            Operation::History => 0x05,
            Operation::Other(other) => other,
        }
    }
}

/// Where a frame stands in the REQUEST → COMPLIANCE → COMPLETE exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// 0: client to server, the request itself.
    Request,
    /// 1: server to client, success or refusal.
    Compliance,
    /// 2: server to client, the result (the token) after a successful COMPLIANCE.
    Complete,
}

impl TryFrom<u8> for State {
    type Error = Error;
    fn try_from(byte: u8) -> Result<Self, Error> {
        match byte {
            0x00 => Ok(State::Request),
            0x01 => Ok(State::Compliance),
            0x02 => Ok(State::Complete),
            state => Err(Error::UnknownState { state }),
        }
    }
}

impl State {
    /// The state's name in the protocol's words: `REQUEST`, `COMPLIANCE` or `COMPLETE`.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Request => "REQUEST",
            State::Compliance => "COMPLIANCE",
            State::Complete => "COMPLETE",
        }
    }
}

/// Writes [`State::as_str`], the name users and logs see.
impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<State> for u8 {
    fn from(state: State) -> u8 {
        match state {
            State::Request => 0x00,
            State::Compliance => 0x01,
            State::Complete => 0x02,
        }
    }
}

/// One TCRP frame, borrowing its room name and payload from the buffer it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Header byte 1.
    pub operation: Operation,
    /// Header byte 2.
    pub state: State,
    /// The room name bytes as sent (not yet checked for UTF-8: see [`crate::names`]).
    pub room_name: &'a [u8],
    /// The payload bytes as sent.
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        let room_name_len =
            u8::try_from(self.room_name.len()).map_err(|_| Error::RoomNameTooLong {
                len: self.room_name.len(),
            })?;
        out.reserve(self.encoded_len());
        out.push(room_name_len);
        out.push(self.operation.into());
        out.push(self.state.into());
        // 29-byte big-endian size: 21 zero bytes, then the length as a u64.
        out.extend_from_slice(&[0u8; PAYLOAD_SIZE_LEN - 8]);
        out.extend_from_slice(&(self.payload.len() as u64).to_be_bytes());
        out.extend_from_slice(self.room_name);
        out.extend_from_slice(self.payload);
        Ok(())
    }

    /// Number of bytes [`Frame::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.room_name.len() + self.payload.len()
    }
}

/// Reads the 29-byte big-endian payload size; `None` if it does not fit in a `u64`.
fn payload_size(field: &[u8]) -> Option<u64> {
    let (high, low) = field.split_at(field.len().saturating_sub(8));
    if high.iter().any(|&b| b != 0) {
        return None;
    }
    Some(low.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(Some((frame, used)))` when a whole frame is there (`used` bytes of `buf`),
/// `Ok(None)` when more bytes are needed, and an error as soon as the header is known to be
/// unacceptable, without waiting for the body: a payload size over `max_payload` is refused
/// before anything is buffered for it.
pub fn decode(buf: &[u8], max_payload: usize) -> Result<Option<(Frame<'_>, usize)>, Error> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let room_name_len = usize::from(header[0]);
    let operation = Operation::from(header[1]);
    let size = payload_size(&header[3..HEADER_LEN]).ok_or(Error::PayloadSizeOverflow)?;
    if size > max_payload as u64 {
        return Err(Error::PayloadTooLarge {
            size,
            max: max_payload,
        });
    }
    let state = State::try_from(header[2])?;
    // `size <= max_payload`, so it fits in a usize.
    let payload_len = size as usize;
    let name_end = HEADER_LEN + room_name_len;
    // With `max_payload` near `usize::MAX` the end itself can overflow: no buffer holds it.
    let Some(frame_end) = name_end.checked_add(payload_len) else {
        return Err(Error::PayloadTooLarge {
            size,
            max: max_payload,
        });
    };
    if buf.len() < frame_end {
        return Ok(None);
    }
    let frame = Frame {
        operation,
        state,
        room_name: &buf[HEADER_LEN..name_end],
        payload: &buf[name_end..frame_end],
    };
    Ok(Some((frame, frame_end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The exact bytes the original Python client sends to create room "lobby" as "alice":
    /// `json.dumps("alice")` is the 7-byte payload `"alice"`.
    const ORIGINAL_CREATE: &str = concat!(
        "05",
        "01",
        "00",
        "00",
        "00000000000000000000000000000000000000000000000000000007",
        "6c6f626279",
        "22616c69636522"
    );

    fn encode(frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out).expect("test frame fits");
        out
    }

    #[test]
    fn decodes_the_original_clients_create_request() {
        let bytes = hex::decode(ORIGINAL_CREATE).unwrap();
        let (frame, used) = decode(&bytes, DEFAULT_MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(frame.operation, Operation::CreateRoom);
        assert_eq!(frame.state, State::Request);
        assert_eq!(frame.room_name, b"lobby");
        assert_eq!(frame.payload, b"\"alice\"");
    }

    #[test]
    fn encodes_the_golden_vector_byte_for_byte() {
        let frame = Frame {
            operation: Operation::CreateRoom,
            state: State::Request,
            room_name: b"lobby",
            payload: b"\"alice\"",
        };
        assert_eq!(hex::encode(encode(&frame)), ORIGINAL_CREATE);
    }

    #[test]
    fn golden_compliance_and_complete_replies() {
        let compliance = Frame {
            operation: Operation::JoinRoom,
            state: State::Compliance,
            room_name: b"r",
            payload: b"{\"success\": true}",
        };
        let bytes = encode(&compliance);
        assert_eq!(
            hex::encode(&bytes[..HEADER_LEN]),
            "0102010000000000000000000000000000000000000000000000000000000011"
        );
        let complete = Frame {
            state: State::Complete,
            ..compliance
        };
        assert_eq!(encode(&complete)[2], 0x02);
    }

    #[test]
    fn need_more_at_every_truncation_length() {
        let bytes = hex::decode(ORIGINAL_CREATE).unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut], DEFAULT_MAX_PAYLOAD),
                Ok(None),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn two_frames_back_to_back_decode_in_turn() {
        let mut bytes = hex::decode(ORIGINAL_CREATE).unwrap();
        let first_len = bytes.len();
        bytes.extend(encode(&Frame {
            operation: Operation::JoinRoom,
            state: State::Request,
            room_name: b"x",
            payload: b"bob",
        }));
        let (_, used) = decode(&bytes, 64).unwrap().unwrap();
        assert_eq!(used, first_len);
        let (second, used2) = decode(&bytes[used..], 64).unwrap().unwrap();
        assert_eq!(second.operation, Operation::JoinRoom);
        assert_eq!(used + used2, bytes.len());
    }

    #[test]
    fn oversize_payload_is_refused_from_the_header_alone() {
        let mut header = vec![0x01, 0x01, 0x00];
        header.extend_from_slice(&[0u8; 21]);
        header.extend_from_slice(&(1_000_000u64).to_be_bytes());
        assert_eq!(
            decode(&header, 16 * 1024),
            Err(Error::PayloadTooLarge {
                size: 1_000_000,
                max: 16 * 1024
            })
        );
    }

    #[test]
    fn payload_size_beyond_u64_is_refused_as_not_tcrp() {
        // The top byte of the 29 set: 2^224.
        let mut header = vec![0x01, 0x01, 0x00, 0x01];
        header.extend_from_slice(&[0u8; 28]);
        assert_eq!(decode(&header, usize::MAX), Err(Error::PayloadSizeOverflow));
        // One bit past u64::MAX: 2^64.
        let mut header = vec![0x01, 0x01, 0x00];
        header.extend_from_slice(&[0u8; 20]);
        header.push(0x01);
        header.extend_from_slice(&[0u8; 8]);
        assert_eq!(decode(&header, 16 * 1024), Err(Error::PayloadSizeOverflow));
        // An HTTP request sent to a TCRP port, as a health checker might.
        let http = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let err = decode(http, DEFAULT_MAX_PAYLOAD).unwrap_err();
        assert_eq!(err, Error::PayloadSizeOverflow);
        assert_eq!(
            err.to_string(),
            "payload size field over 2^64 - 1 (not a TCRP peer?)"
        );
    }

    #[test]
    fn payload_size_at_u64_max_is_refused_with_its_number() {
        let mut header = vec![0x01, 0x01, 0x00];
        header.extend_from_slice(&[0u8; 21]);
        header.extend_from_slice(&u64::MAX.to_be_bytes());
        let err = decode(&header, 16 * 1024).unwrap_err();
        assert_eq!(
            err,
            Error::PayloadTooLarge {
                size: u64::MAX,
                max: 16 * 1024
            }
        );
        assert_eq!(
            err.to_string(),
            "payload of 18446744073709551615 bytes is over the limit of 16384 bytes"
        );
    }

    #[test]
    fn a_frame_end_past_usize_is_refused_even_without_a_cap() {
        // Room name 1 byte, payload size u64::MAX - 10: within a cap of usize::MAX, but the
        // frame's end (header + name + payload) does not fit in a usize.
        let mut header = vec![0x01, 0x01, 0x00];
        header.extend_from_slice(&[0u8; 21]);
        header.extend_from_slice(&(u64::MAX - 10).to_be_bytes());
        assert_eq!(
            decode(&header, usize::MAX),
            Err(Error::PayloadTooLarge {
                size: u64::MAX - 10,
                max: usize::MAX
            })
        );
    }

    #[test]
    fn payload_exactly_at_the_cap_is_accepted() {
        let payload = vec![b'a'; 100];
        let bytes = encode(&Frame {
            operation: Operation::JoinRoom,
            state: State::Request,
            room_name: b"",
            payload: &payload,
        });
        assert!(decode(&bytes, 100).unwrap().is_some());
        assert!(matches!(
            decode(&bytes, 99),
            Err(Error::PayloadTooLarge { size: 100, max: 99 })
        ));
    }

    #[test]
    fn the_default_cap_admits_16_kib_and_not_a_byte_more() {
        // PROTOCOL.md and SECURITY.md: 16 KiB. Clients read every reply with this cap and
        // the server fills ListRooms, Presence and History replies up to 15 KiB, so a smaller
        // default would make clients refuse the server's own replies.
        let payload = vec![b'a'; 16 * 1024 + 1];
        let frame = |payload| Frame {
            operation: Operation::ListRooms,
            state: State::Complete,
            room_name: b"",
            payload,
        };
        let fits = encode(&frame(&payload[..16 * 1024]));
        let (back, used) = decode(&fits, DEFAULT_MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!((back.payload.len(), used), (16 * 1024, fits.len()));
        assert_eq!(
            decode(&encode(&frame(&payload)), DEFAULT_MAX_PAYLOAD),
            Err(Error::PayloadTooLarge {
                size: 16 * 1024 + 1,
                max: 16 * 1024
            })
        );
    }

    #[test]
    fn unknown_state_is_an_error() {
        let mut header = vec![0x01, 0x01, 0x07];
        header.extend_from_slice(&[0u8; 29]);
        assert_eq!(decode(&header, 16), Err(Error::UnknownState { state: 7 }));
    }

    #[test]
    fn unknown_operation_is_kept_for_the_refusal() {
        let bytes = encode(&Frame {
            operation: Operation::Other(0x09),
            state: State::Request,
            room_name: b"r",
            payload: b"",
        });
        let (frame, _) = decode(&bytes, 16).unwrap().unwrap();
        assert_eq!(frame.operation, Operation::Other(0x09));
        assert_eq!(u8::from(frame.operation), 0x09);
    }

    #[test]
    fn room_name_at_255_bytes_round_trips_and_256_is_refused() {
        let name = vec![b'n'; 255];
        let bytes = encode(&Frame {
            operation: Operation::CreateRoom,
            state: State::Request,
            room_name: &name,
            payload: b"\"a\"",
        });
        assert_eq!(bytes[0], 0xff);
        let (frame, _) = decode(&bytes, 16).unwrap().unwrap();
        assert_eq!(frame.room_name.len(), 255);
        let long = vec![b'n'; 256];
        let mut out = Vec::new();
        let err = Frame {
            room_name: &long,
            ..frame
        }
        .encode(&mut out);
        assert_eq!(err, Err(Error::RoomNameTooLong { len: 256 }));
        assert!(out.is_empty());
    }

    #[test]
    fn operation_bytes_are_the_documented_numbers() {
        // PROTOCOL.md: 1 create, 2 join, 3 list, 4 presence, 5 history. The round trip below
        // cannot see a number decoded as `Other` (it encodes back to itself), which would
        // make the server refuse that operation as unsupported.
        let named = [
            (0x01, Operation::CreateRoom),
            (0x02, Operation::JoinRoom),
            (0x03, Operation::ListRooms),
            (0x04, Operation::Presence),
            (0x05, Operation::History),
        ];
        for (byte, operation) in named {
            assert_eq!(Operation::from(byte), operation, "{byte}");
            assert_eq!(u8::from(operation), byte, "{operation:?}");
        }
        for byte in [0x00, 0x06, 0xff] {
            assert_eq!(Operation::from(byte), Operation::Other(byte));
        }
    }

    #[test]
    fn operation_and_state_bytes_round_trip() {
        for byte in 0..=u8::MAX {
            assert_eq!(u8::from(Operation::from(byte)), byte);
        }
        for state in [State::Request, State::Compliance, State::Complete] {
            assert_eq!(State::try_from(u8::from(state)), Ok(state));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes, 256);
        }

        #[test]
        fn decode_inverts_encode(
            op in any::<u8>(),
            state in 0u8..3,
            name in proptest::collection::vec(any::<u8>(), 0..=255),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let frame = Frame {
                operation: Operation::from(op),
                state: State::try_from(state).unwrap(),
                room_name: &name,
                payload: &payload,
            };
            let bytes = encode(&frame);
            prop_assert_eq!(bytes.len(), frame.encoded_len());
            let (back, used) = decode(&bytes, 4096).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, frame);
        }

        #[test]
        fn split_at_any_point_needs_more_then_decodes(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            split in 0usize..400,
        ) {
            let bytes = encode(&Frame {
                operation: Operation::JoinRoom,
                state: State::Request,
                room_name: b"room",
                payload: &payload,
            });
            let split = split.min(bytes.len());
            if split < bytes.len() {
                prop_assert_eq!(decode(&bytes[..split], 4096), Ok(None));
            }
            prop_assert!(decode(&bytes, 4096).unwrap().is_some());
        }
    }
}
