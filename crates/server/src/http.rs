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
/// `searched` is how much of `input` is known to hold no end of the head (what an earlier call
/// returned `None` for); the search starts 3 bytes before it, where an end split across two
/// reads begins. Searching everything at every read would make a head sent a few bytes at a
/// time cost the square of its length.
pub fn parse(input: &[u8], searched: usize) -> Option<(Route, bool)> {
    let from = searched.saturating_sub(3).min(input.len());
    let end = from + input[from..].windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&input[..end]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    let head_only = method == Some("HEAD");
    let route = match (method, path, version) {
        (Some("GET" | "HEAD"), Some(path), Some(v)) if v.starts_with("HTTP/1.") => {
            match path.split('?').next() {
                Some("/metrics") => Route::Metrics,
                Some("/healthz") => Route::Health,
                Some("/readyz") => Route::Ready,
                _ => Route::NotFound,
            }
        }
        _ => Route::BadRequest,
    };
    Some((route, head_only))
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
        ] {
            assert_eq!(parse(head, 0), Some((Route::BadRequest, false)), "{head:?}");
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

    #[test]
    fn response_has_length() {
        let r = response("200 OK", "text/plain", "ok\n", false);
        assert!(String::from_utf8(r)
            .unwrap()
            .ends_with("Content-Length: 3\r\nConnection: close\r\n\r\nok\n"));
    }
}
