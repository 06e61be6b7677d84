//! The HTTP side of the listener: the WebSocket upgrade (RFC 6455 section 4) and `GET /health`.

/// Largest request head the node reads before giving up on a handshake, in bytes.
pub const MAX_REQUEST_HEAD: usize = 8192;

/// The request found in the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// The head is not complete yet.
    Incomplete,
    /// A valid WebSocket upgrade; `head_len` bytes belong to the request head.
    Upgrade {
        /// The value for the `Sec-WebSocket-Accept` header.
        accept_key: String,
        /// Length of the request head; later bytes are WebSocket frames.
        head_len: usize,
    },
    /// `GET /health` without an upgrade.
    Health,
    /// Anything else: the node replies with this status and closes the connection.
    Reject {
        /// HTTP status code.
        status: u16,
        /// Plain-text explanation for the response body.
        reason: &'static str,
    },
}

/// Parses the request head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => {
            return Request::Incomplete
        }
        Ok(httparse::Status::Partial) => return reject(431, "request head too large"),
        Err(httparse::Error::TooManyHeaders) => return reject(431, "too many headers"),
        Err(_) => return reject(400, "malformed HTTP request"),
    };

    if request.method != Some("GET") {
        return reject(405, "only GET is served");
    }
    // RFC 6455 4.1: the opening handshake is an HTTP/1.1 (or later) GET request.
    if request.version != Some(1) {
        return reject(400, "HTTP/1.1 is required");
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|value| {
            value
                .split(|&b| b == b',')
                .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };

    let path = request.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    // /health is plain HTTP for load balancers, even when a client asks to upgrade it.
    if path == "/health" {
        return Request::Health;
    }
    if !has_token("upgrade", "websocket") {
        return reject(
            404,
            "not found; connect with a WebSocket upgrade or GET /health",
        );
    }
    if !has_token("connection", "upgrade") {
        return reject(400, "Connection header must contain Upgrade");
    }
    if header("sec-websocket-version") != Some(b"13".as_slice()) {
        return reject(426, "Sec-WebSocket-Version must be 13");
    }
    match header("sec-websocket-key") {
        Some(key) if !key.is_empty() => Request::Upgrade {
            accept_key: tungstenite::handshake::derive_accept_key(key),
            head_len,
        },
        _ => reject(400, "missing Sec-WebSocket-Key"),
    }
}

fn reject(status: u16, reason: &'static str) -> Request {
    Request::Reject { status, reason }
}

/// Returns the `101 Switching Protocols` response.
pub fn upgrade_response(accept_key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept_key}\r\n\r\n"
    )
    .into_bytes()
}

/// Returns a complete response with a body; the connection closes after it.
pub fn response(status: u16, content_type: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    // RFC 6455 4.4: a response to an unsupported version lists the versions the server supports.
    let version = if status == 426 {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    let text = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n{version}{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn upgrade_derives_rfc_accept_key() {
        let result = parse(UPGRADE.as_bytes());
        // The key and accept value from the example in RFC 6455 section 1.3.
        let expected = Request::Upgrade {
            accept_key: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(),
            head_len: UPGRADE.len(),
        };
        assert_eq!(result, expected);
    }

    #[test]
    fn partial_head_is_incomplete() {
        assert_eq!(parse(&UPGRADE.as_bytes()[..30]), Request::Incomplete);
    }

    #[test]
    fn health_and_rejections() {
        assert_eq!(parse(b"GET /health HTTP/1.1\r\n\r\n"), Request::Health);
        let cases = [
            ("GET / HTTP/1.1\r\n\r\n", 404),
            ("POST / HTTP/1.1\r\n\r\n", 405),
            ("GARBAGE\r\n\r\n", 400),
            ("GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\n", 400),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                426,
            ),
        ];
        for (text, status) in cases {
            assert!(
                matches!(parse(text.as_bytes()), Request::Reject { status: s, .. } if s == status),
                "request {text:?}"
            );
        }
    }
}
