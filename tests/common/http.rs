//! Plain HTTP/1.1 over a TcpStream: GET /health and handshakes that the node should reject.

use super::EVENT_TIMEOUT;
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Upper bound on a response head; the node's are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// Returns the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads a response head from `stream` and returns it with the bytes read past it.
pub fn read_head(stream: &mut TcpStream) -> Result<(Response, Vec<u8>), String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(format!("response head longer than {MAX_HEAD_BYTES} bytes"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                let text = String::from_utf8_lossy(&buffer);
                return Err(format!(
                    "connection closed before a full response head: {text:?}"
                ));
            }
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading the response head failed: {e}")),
        }
    };

    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("invalid status line {status_line:?}"))?;
    let headers = lines
        .filter(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    Ok((response, buffer[head_end..].to_vec()))
}

/// Sends `request` (the bytes exactly) and reads the response.
///
/// The body is read by Content-Length. Without that header it is read until the node closes
/// the connection, for at most 2 s after the head. A 101 response has no body.
pub fn exchange(addr: SocketAddr, request: &str) -> Response {
    let mut stream = TcpStream::connect_timeout(&addr, EVENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("TCP connect to {addr} failed: {e}"));
    stream
        .set_read_timeout(Some(EVENT_TIMEOUT))
        .expect("set_read_timeout");
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("sending {request:?} failed: {e}"));
    let (mut response, mut body) =
        read_head(&mut stream).unwrap_or_else(|e| panic!("no HTTP response to {request:?}: {e}"));
    if response.status == 101 {
        return response;
    }

    let length = response
        .header("content-length")
        .and_then(|value| value.parse::<usize>().ok());
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut chunk = [0u8; 4096];
    while length.is_none_or(|length| body.len() < length) && Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(_) => break,
        }
    }
    if let Some(length) = length {
        assert!(
            body.len() >= length,
            "body shorter than Content-Length {length}: {body:?}"
        );
        body.truncate(length);
    }
    response.body = body;
    response
}

/// Sends `GET path` with `Connection: close` and returns the response.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    exchange(addr, &request)
}

/// Returns the JSON body of `GET /health` and panics unless the status is 200.
pub fn health(addr: SocketAddr) -> Value {
    let response = get(addr, "/health");
    assert_eq!(response.status, 200, "GET /health: {response:?}");
    serde_json::from_slice(&response.body).unwrap_or_else(|e| {
        panic!(
            "GET /health body is not JSON ({e}): {}",
            response.body_text()
        )
    })
}

/// Returns `connections` from GET /health.
pub fn health_connections(addr: SocketAddr) -> u64 {
    let body = health(addr);
    body["connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("GET /health has no integer `connections`: {body}"))
}

/// Builds a WebSocket upgrade request for `path` with the RFC 6455 sample key plus `extra`
/// header lines (each ending in CRLF).
pub fn upgrade_request(addr: SocketAddr, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        super::raw::SAMPLE_KEY
    )
}
