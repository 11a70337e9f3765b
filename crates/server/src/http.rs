//! A minimal HTTP/1.x responder for `/metrics`, `/healthz` and `/readyz`, served from the
//! event loop.
//!
//! It reads one request head (at most [`MAX_REQUEST_BYTES`]), answers it and closes: enough for
//! Prometheus and health checks, nothing more. Rendering is a few microseconds, so it never
//! stalls relaying.

/// Largest request head accepted.
pub const MAX_REQUEST_BYTES: usize = 8192;

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`
    Metrics,
    /// `GET /healthz`
    Health,
    /// `GET /readyz`
    Ready,
    /// Any other path.
    NotFound,
    /// Not a GET/HEAD, or not HTTP.
    BadRequest,
    /// No end of the request head within [`MAX_REQUEST_BYTES`] (never returned by [`parse`]:
    /// the caller tells it by the bytes it holds).
    TooLarge,
}

/// Parses the request head in `input`; `None` until the blank line has arrived.
///
/// Lines may end in CRLF or in a bare LF (RFC 9112 §2.2 lets a recipient take a lone LF as a
/// line's end and ignore a CR before it), so the head ends at an LF followed by an empty
/// line: `\n\n` or `\n\r\n` (the end of `\r\n\r\n`, and of mixed endings). Some clients
/// and hand-typed requests (`printf 'GET /healthz HTTP/1.1\n\n'`) end lines with LF only.
///
/// `searched` is how much of `input` is known to hold no end of the head (what an earlier call
/// returned `None` for); the search starts `END_LEN_MAX` − 1 (2) bytes before it, where an end
/// split across two reads begins. Searching everything at every read would make a head sent
/// a few bytes at a time cost the square of its length.
///
/// Empty lines before the request line are passed over (RFC 9112 §2.2: a server should ignore
/// at least one). The request line must be `METHOD TARGET HTTP/1.0` or `HTTP/1.1`, one space
/// apart; the target may be in origin form (`/healthz`) or absolute form
/// (`http://host:port/healthz`, which RFC 9112 §3.2.2 says a server must accept).
pub fn parse(input: &[u8], searched: usize) -> Option<(Route, bool)> {
    let start = input.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let (input, searched) = (&input[start..], searched.saturating_sub(start));
    let from = searched.saturating_sub(END_LEN_MAX - 1).min(input.len());
    let end = from + end_of_head(&input[from..])?;
    let head = String::from_utf8_lossy(&input[..end]);
    // The head ends before its last LF: a CR before it is still there.
    let request_line = head.lines().next().unwrap_or("").trim_end_matches('\r');
    let parts: Vec<&str> = request_line.split(' ').collect();
    let (method, target, version) = match parts[..] {
        [method, target, version] => (method, target, version),
        _ => return Some((Route::BadRequest, false)),
    };
    let head_only = method == "HEAD";
    let route = match (method, version) {
        ("GET" | "HEAD", "HTTP/1.1" | "HTTP/1.0") => match path_of(target) {
            "/metrics" => Route::Metrics,
            "/healthz" => Route::Health,
            "/readyz" => Route::Ready,
            _ => Route::NotFound,
        },
        _ => Route::BadRequest,
    };
    Some((route, head_only))
}

/// The path a request target names, without its query: the target itself in origin form,
/// what follows the authority in absolute form (`/` when nothing does).
fn path_of(target: &str) -> &str {
    let target = target.split('?').next().unwrap_or("");
    let scheme_end = target
        .split_once("://")
        .filter(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")
        })
        .map(|(scheme, _)| scheme.len() + 3);
    match scheme_end {
        Some(at) => target[at..]
            .find('/')
            .map_or("/", |slash| &target[at + slash..]),
        None => target,
    }
}

/// The longest end of a head: `\n\r\n`.
const END_LEN_MAX: usize = 3;

/// Where the end of a head begins in `bytes`: the first LF followed by an empty line (`\n` or
/// `\r\n`). The head's last line ends there.
fn end_of_head(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        at += bytes.get(at..)?.iter().position(|&b| b == b'\n')?;
        match bytes.get(at + 1..) {
            Some([b'\n', ..] | [b'\r', b'\n', ..]) => return Some(at),
            _ => at += 1,
        }
    }
}

/// A complete response with `Connection: close`.
pub fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 0),
            Some((Route::Metrics, false))
        );
        assert_eq!(
            parse(b"HEAD /healthz HTTP/1.0\r\n\r\n", 0),
            Some((Route::Health, true))
        );
        assert_eq!(
            parse(b"GET /readyz?verbose HTTP/1.1\r\n\r\n", 0),
            Some((Route::Ready, false))
        );
        assert_eq!(
            parse(b"GET /x HTTP/1.1\r\n\r\n", 0),
            Some((Route::NotFound, false))
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n", 0),
            Some((Route::BadRequest, false))
        );
        assert_eq!(
            parse(b"\x00\xff\r\n\r\n", 0),
            Some((Route::BadRequest, false))
        );
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\n", 0), None);
    }

    #[test]
    fn a_request_that_is_not_http_1_is_a_bad_request() {
        for head in [
            &b"GET /metrics HTTP/2.0\r\n\r\n"[..],
            b"GET /metrics SPDY/3\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            // Not request lines of HTTP/1.0 or 1.1, however close.
            b"GET /healthz HTTP/1.1 extra\r\n\r\n",
            b"GET /healthz HTTP/1.9\r\n\r\n",
            b"GET  /healthz HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse(head, 0), Some((Route::BadRequest, false)), "{head:?}");
        }
    }

    /// A target in absolute form is routed by its path (RFC 9112 §3.2.2), and empty lines
    /// before the request line are passed over (§2.2), wherever the reads split.
    #[test]
    fn absolute_targets_and_empty_lines_before_the_request_are_taken() {
        for (head, route) in [
            (
                &b"GET http://127.0.0.1:9092/healthz HTTP/1.1\r\n\r\n"[..],
                Route::Health,
            ),
            (
                b"GET HTTP://example/readyz?x=1 HTTP/1.1\r\n\r\n",
                Route::Ready,
            ),
            (b"GET https://h/metrics HTTP/1.0\r\n\r\n", Route::Metrics),
            (b"GET http://h HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET ftp://h/healthz HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"\r\nGET /healthz HTTP/1.1\r\n\r\n", Route::Health),
            (b"\r\n\n\r\nGET /healthz HTTP/1.1\n\n", Route::Health),
        ] {
            assert_eq!(parse(head, 0), Some((route, false)), "{head:?}");
            for split in 0..head.len() {
                assert_eq!(parse(&head[..split], 0), None, "{head:?} cut at {split}");
                assert_eq!(
                    parse(head, split),
                    Some((route, false)),
                    "{head:?} at {split}"
                );
            }
        }
    }

    /// An end of the head split between two reads is found when searching from where the
    /// first read left off, and bytes already searched are not searched again.
    #[test]
    fn the_search_resumes_where_the_last_one_ended() {
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 0..request.len() {
            assert_eq!(parse(&request[..split], 0), None, "{split}");
            assert_eq!(
                parse(request, split),
                Some((Route::Health, false)),
                "split at {split}"
            );
        }
        // An end wholly within what was searched is not looked for again.
        assert_eq!(parse(request, request.len()), None);
        assert_eq!(parse(request, request.len() + 10), None);
    }

    /// A head whose lines end in a bare LF, or in a mix of LF and CRLF, is a request like
    /// any other (RFC 9112 §2.2).
    #[test]
    fn a_head_with_bare_lf_line_ends_is_parsed() {
        for head in [
            &b"GET /healthz HTTP/1.1\n\n"[..],
            b"GET /healthz HTTP/1.1\nHost: x\n\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\n\n",
            b"GET /healthz HTTP/1.1\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\n\r\n",
            b"GET /healthz HTTP/1.1\nHost: x\r\n\n",
        ] {
            assert_eq!(parse(head, 0), Some((Route::Health, false)), "{head:?}");
        }
        assert_eq!(
            parse(b"HEAD /metrics HTTP/1.0\n\n", 0),
            Some((Route::Metrics, true))
        );
        // The first blank line ends the head; what follows is not looked at.
        assert_eq!(
            parse(b"GET /readyz HTTP/1.1\n\nGET /x HTTP/1.1\n\n", 0),
            Some((Route::Ready, false))
        );
        // Lone CRs, and a single LF, end nothing.
        for unfinished in [
            &b"GET /healthz HTTP/1.1\n"[..],
            b"GET /healthz HTTP/1.1\r\n",
            b"GET /healthz HTTP/1.1\nHost: x\n",
            b"GET /healthz HTTP/1.1\nHost: x\n\r",
            b"GET /healthz HTTP/1.1\r\r\r\r",
            b"GET /healthz HTTP/1.1\n\r\r\n",
        ] {
            assert_eq!(parse(unfinished, 0), None, "{unfinished:?}");
        }
    }

    /// Whatever the line ends, and wherever the bytes split between two reads, the end of
    /// the head is found when the search resumes where the first read left off.
    #[test]
    fn every_kind_of_end_is_found_at_every_split() {
        for request in [
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /healthz HTTP/1.1\nHost: x\n\n",
            b"GET /healthz HTTP/1.1\n\n",
            b"GET /healthz HTTP/1.1\nHost: x\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\n",
        ] {
            for split in 0..request.len() {
                assert_eq!(
                    parse(&request[..split], 0),
                    None,
                    "{request:?} cut at {split}"
                );
                assert_eq!(
                    parse(request, split),
                    Some((Route::Health, false)),
                    "{request:?} split at {split}"
                );
                // And over three reads, as a byte-at-a-time sender makes them.
                for second in split..request.len() {
                    assert_eq!(parse(&request[..second], split), None, "{request:?}");
                    assert_eq!(
                        parse(request, second),
                        Some((Route::Health, false)),
                        "{request:?} split at {split} and {second}"
                    );
                }
            }
        }
    }

    #[test]
    fn response_has_length() {
        let r = response("200 OK", "text/plain", "ok\n", false);
        assert!(String::from_utf8(r)
            .unwrap()
            .ends_with("Content-Length: 3\r\nConnection: close\r\n\r\nok\n"));
    }
}
