//! Parses arbitrary bytes as a server datagram with `ucrp::delivery::parse`, walking the
//! entries of a batch with `batch_entries` and parsing each (nested batches included, to a
//! bounded depth).
//!
//! Properties, when it parses:
//! - chat and sequenced frames re-encode (`encode_chat`, `encode_sequenced`) to exactly the
//!   input;
//! - a notice re-encodes (`encode_notice`) to a prefix of the input (the parser ignores bytes
//!   after the name);
//! - `RoomClosed` only for the exact 15 bytes `__ROOM_CLOSED__`;
//! - a batch whose entries all parse as byte slices re-encodes (`begin_batch` +
//!   `push_batch_entry`) to exactly the input; every entry lies inside the batch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ucrp::delivery::{self, Delivery, ROOM_CLOSED};

const MAX_DEPTH: usize = 4;

fn check(d: &[u8], depth: usize) {
    let Ok(parsed) = delivery::parse(d) else {
        return;
    };
    let mut out = Vec::new();
    match parsed {
        Delivery::RoomClosed => assert_eq!(d, ROOM_CLOSED),
        Delivery::Chat { sender, message } => {
            assert!(!sender.is_empty(), "a chat frame with an empty sender");
            delivery::encode_chat(sender, message.as_bytes(), &mut out).expect("sender fits");
            assert_eq!(out, d);
        }
        Delivery::Sequenced {
            seq,
            sender,
            message,
        } => {
            delivery::encode_sequenced(seq, sender, message.as_bytes(), &mut out)
                .expect("sender fits");
            assert_eq!(out, d);
        }
        Delivery::Notice { what, name } => {
            delivery::encode_notice(what, name, &mut out).expect("name fits");
            assert!(d.starts_with(&out), "notice does not re-encode to a prefix");
        }
        Delivery::Batch(body) => {
            assert_eq!(&d[2..], body);
            let mut entries = Vec::new();
            let mut all_ok = true;
            for entry in delivery::batch_entries(body) {
                match entry {
                    Ok(entry) => {
                        assert!(entry.len() <= body.len());
                        entries.push(entry);
                        if depth < MAX_DEPTH {
                            check(entry, depth + 1);
                        }
                    }
                    Err(_) => all_ok = false,
                }
            }
            if all_ok {
                delivery::begin_batch(&mut out);
                for entry in entries {
                    delivery::push_batch_entry(entry, &mut out).expect("entry under 64 KiB");
                }
                assert_eq!(out, d, "batch re-encoding differs from the input");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, 0);
});
