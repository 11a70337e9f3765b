//! Keeps `docs/PROTOCOL.md` exact: every ```` ```hex ```` example in it must decode with the
//! real codecs, as the kind of frame its fence names.

const DOC: &str = include_str!("../../../docs/PROTOCOL.md");

/// `(kind, bytes)` for every hex block.
fn examples() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        let Some(kind) = line.strip_prefix("```hex ") else {
            continue;
        };
        let mut hex = String::new();
        for body in lines.by_ref() {
            if body.starts_with("```") {
                break;
            }
            hex.extend(body.split_whitespace());
        }
        let bytes =
            hex::decode(&hex).unwrap_or_else(|e| panic!("bad hex in a {kind} example: {e}"));
        out.push((kind.trim().to_owned(), bytes));
    }
    out
}

#[test]
fn every_hex_example_decodes_as_what_it_claims() {
    let examples = examples();
    assert!(
        examples.len() >= 12,
        "found only {} examples",
        examples.len()
    );
    for (kind, bytes) in examples {
        match kind.as_str() {
            "tcrp" => {
                let (frame, used) = tcrp::decode(&bytes, 1 << 20)
                    .unwrap_or_else(|e| panic!("{e}: {}", hex::encode(&bytes)))
                    .unwrap_or_else(|| panic!("incomplete frame: {}", hex::encode(&bytes)));
                assert_eq!(used, bytes.len(), "trailing bytes after a frame");
                let mut again = Vec::new();
                frame.encode(&mut again).unwrap();
                assert_eq!(again, bytes);
                if frame.state != tcrp::State::Request {
                    let _: serde_json::Value =
                        serde_json::from_slice(frame.payload).expect("reply payload is JSON");
                }
            }
            "ucrp-client" => {
                ucrp::parse(&bytes).unwrap_or_else(|e| panic!("{e}: {}", hex::encode(&bytes)));
            }
            "ucrp-server" => {
                if let ucrp::Delivery::Batch(body) =
                    ucrp::delivery::parse(&bytes).expect("delivery")
                {
                    for entry in ucrp::delivery::batch_entries(body) {
                        ucrp::delivery::parse(entry.expect("entry")).expect("batch entry");
                    }
                }
            }
            other => panic!("unknown example kind {other:?}"),
        }
    }
}
