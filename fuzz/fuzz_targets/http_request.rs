//! Parses arbitrary bytes as a request head for the metrics listener (`http::parse`), as they
//! may arrive over any number of reads.
//!
//! Properties:
//! - parsing never panics, and a head found is found whatever the reads were: for every
//!   split `k` before which no end was found, resuming the search at `k` gives what parsing
//!   the whole input at once gives (the search skips what an earlier read searched);
//! - what a parse answers depends only on the head: bytes after its end change nothing;
//! - empty lines before the request line change nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocm_server::http;

fuzz_target!(|data: &[u8]| {
    let whole = http::parse(data, 0);
    // Every split of a short input; a sample of a long one's (each parse reads it all).
    for split in (0..=data.len()).step_by(1 + data.len() / 256) {
        if http::parse(&data[..split], 0).is_some() {
            // An end within the first `split` bytes: a caller would have stopped there.
            continue;
        }
        assert_eq!(http::parse(data, split), whole, "resumed at {split}");
    }
    if whole.is_some() {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(http::parse(&longer, 0), whole, "bytes after the head");
    }
    let mut padded = b"\r\n\n".to_vec();
    padded.extend_from_slice(data);
    assert_eq!(http::parse(&padded, 0), whole, "empty lines before the request");
});
