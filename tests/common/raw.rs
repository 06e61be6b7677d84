//! A WebSocket client that writes frames byte by byte, for input that no library would send:
//! reserved bits, unknown opcodes, unmasked frames, broken fragmentation, bad close payloads.
//!
//! It keeps a transcript of every frame sent and received, so a failed assertion shows the exact
//! bytes that went to the node and what came back.

use super::http;
use super::EVENT_TIMEOUT;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The sample `Sec-WebSocket-Key` of RFC 6455 section 1.3.
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The `Sec-WebSocket-Accept` that RFC 6455 section 1.3 derives from [`SAMPLE_KEY`].
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Masking key of every masked frame sent; a fixed key keeps transcripts reproducible.
const MASK_KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Frame opcodes (RFC 6455 section 5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A frame to send; every field can be set to a value that breaks the protocol.
#[derive(Clone, Debug)]
pub struct OutFrame {
    pub fin: bool,
    /// RSV1, RSV2 and RSV3 as the three low bits (0b100 is RSV1).
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl OutFrame {
    /// Builds a final, masked frame with no reserved bits.
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> OutFrame {
        OutFrame {
            fin: true,
            rsv: 0,
            opcode,
            masked: true,
            payload: payload.into(),
        }
    }

    pub fn text(payload: impl Into<Vec<u8>>) -> OutFrame {
        Self::new(opcode::TEXT, payload)
    }

    pub fn binary(payload: impl Into<Vec<u8>>) -> OutFrame {
        Self::new(opcode::BINARY, payload)
    }

    pub fn continuation(payload: impl Into<Vec<u8>>) -> OutFrame {
        Self::new(opcode::CONTINUATION, payload)
    }

    pub fn ping(payload: impl Into<Vec<u8>>) -> OutFrame {
        Self::new(opcode::PING, payload)
    }

    /// Builds a close frame whose payload is the 2-byte `code` followed by `reason`.
    pub fn close(code: u16, reason: &[u8]) -> OutFrame {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        Self::new(opcode::CLOSE, payload)
    }

    pub fn fin(mut self, fin: bool) -> OutFrame {
        self.fin = fin;
        self
    }

    pub fn rsv(mut self, bits: u8) -> OutFrame {
        self.rsv = bits;
        self
    }

    pub fn unmasked(mut self) -> OutFrame {
        self.masked = false;
        self
    }

    /// Encodes the frame as RFC 6455 section 5.2 lays it out.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![(u8::from(self.fin) << 7) | ((self.rsv & 0b111) << 4) | self.opcode];
        let mask_bit = if self.masked { 0x80 } else { 0 };
        let len = self.payload.len();
        if len < 126 {
            bytes.push(mask_bit | len as u8);
        } else if len <= usize::from(u16::MAX) {
            bytes.push(mask_bit | 126);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            bytes.push(mask_bit | 127);
            bytes.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if self.masked {
            bytes.extend_from_slice(&MASK_KEY);
            let masked = self.payload.iter().enumerate();
            bytes.extend(masked.map(|(i, byte)| byte ^ MASK_KEY[i % 4]));
        } else {
            bytes.extend_from_slice(&self.payload);
        }
        bytes
    }

    pub fn describe(&self) -> String {
        let mask = if self.masked { "masked" } else { "UNMASKED" };
        format!(
            "fin={} rsv={:03b} opcode={:#x} {mask} len={} payload={}",
            u8::from(self.fin),
            self.rsv,
            self.opcode,
            self.payload.len(),
            describe_payload(&self.payload)
        )
    }
}

/// A frame received from the node.
#[derive(Clone, Debug)]
pub struct InFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl InFrame {
    /// Returns the status code of a close frame, or None when the payload is shorter than 2.
    pub fn close_code(&self) -> Option<u16> {
        let code = self.payload.get(..2)?;
        Some(u16::from_be_bytes([code[0], code[1]]))
    }

    pub fn describe(&self) -> String {
        let mask = if self.masked { " MASKED" } else { "" };
        let code = match self.opcode {
            opcode::CLOSE => format!(" close_code={:?}", self.close_code()),
            _ => String::new(),
        };
        format!(
            "fin={} rsv={:03b} opcode={:#x}{mask} len={}{code} payload={}",
            u8::from(self.fin),
            self.rsv,
            self.opcode,
            self.payload.len(),
            describe_payload(&self.payload)
        )
    }
}

/// Shows a payload as quoted text when it is short UTF-8, otherwise as hex (at most 64 bytes).
fn describe_payload(payload: &[u8]) -> String {
    const SHOWN: usize = 64;
    let shown = &payload[..payload.len().min(SHOWN)];
    let more = if payload.len() > SHOWN { "..." } else { "" };
    match std::str::from_utf8(shown) {
        Ok(text) if text.chars().all(|c| !c.is_control()) => format!("{text:?}{more}"),
        _ => {
            let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}{more}")
        }
    }
}

/// What one [`RawClient::read_frame`] call returned.
#[derive(Debug)]
pub enum ReadOutcome {
    Frame(InFrame),
    /// The node closed the TCP connection.
    Eof,
    /// The read failed, for example with a connection reset.
    Failed(io::ErrorKind),
    TimedOut,
}

/// A WebSocket connection driven frame by frame.
pub struct RawClient {
    stream: TcpStream,
    buffer: Vec<u8>,
    transcript: Vec<String>,
}

impl RawClient {
    /// Connects and completes the handshake, checking the `101` status and the accept key.
    pub fn connect(addr: SocketAddr) -> RawClient {
        Self::connect_with(addr, &http::upgrade_request(addr, "/", ""))
    }

    /// Connects with the handshake `request` (sent as is) and asserts that it is accepted.
    pub fn connect_with(addr: SocketAddr, request: &str) -> RawClient {
        let mut stream = TcpStream::connect_timeout(&addr, EVENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("TCP connect to {addr} failed: {e}"));
        stream
            .set_read_timeout(Some(EVENT_TIMEOUT))
            .expect("set_read_timeout");
        stream
            .set_write_timeout(Some(EVENT_TIMEOUT))
            .expect("set_write_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        stream
            .write_all(request.as_bytes())
            .unwrap_or_else(|e| panic!("sending the handshake failed: {e}"));
        let (response, rest) = http::read_head(&mut stream)
            .unwrap_or_else(|e| panic!("no handshake response to {request:?}: {e}"));
        assert_eq!(
            response.status, 101,
            "handshake {request:?}\nresponse {response:?}"
        );
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some(SAMPLE_ACCEPT),
            "handshake response {response:?}"
        );
        RawClient {
            stream,
            buffer: rest,
            transcript: vec![format!("handshake: {response:?}")],
        }
    }

    /// Returns the client's local address, which the node logs as `remote_addr`.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }

    /// Sends one frame; the error is returned so tests that expect the node to hang up mid-write
    /// can ignore it.
    pub fn send(&mut self, frame: &OutFrame) -> io::Result<()> {
        self.transcript.push(format!("sent: {}", frame.describe()));
        let result = self.stream.write_all(&frame.encode());
        if let Err(e) = &result {
            self.transcript.push(format!("write failed: {e}"));
        }
        result
    }

    /// Sends frames in order and stops at the first write error, which is recorded only.
    pub fn send_all(&mut self, frames: &[OutFrame]) {
        for frame in frames {
            if self.send(frame).is_err() {
                return;
            }
        }
    }

    /// Sends bytes that are not a whole frame (a header alone, a payload alone).
    pub fn send_bytes(&mut self, bytes: &[u8], description: &str) -> io::Result<()> {
        self.transcript.push(format!("sent bytes: {description}"));
        let result = self.stream.write_all(bytes);
        if let Err(e) = &result {
            self.transcript.push(format!("write failed: {e}"));
        }
        result
    }

    /// Reads one frame, waiting up to `timeout`.
    pub fn read_frame(&mut self, timeout: Duration) -> ReadOutcome {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.parse_buffered() {
                self.transcript
                    .push(format!("received: {}", frame.describe()));
                return ReadOutcome::Frame(frame);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return ReadOutcome::TimedOut;
            }
            self.stream
                .set_read_timeout(Some(remaining))
                .expect("set_read_timeout");
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.transcript.push("received: end of stream".to_owned());
                    return ReadOutcome::Eof;
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => {
                    self.transcript.push(format!("read failed: {e}"));
                    return ReadOutcome::Failed(e.kind());
                }
            }
        }
    }

    /// Removes one whole frame from the buffer, if the buffer contains one.
    fn parse_buffered(&mut self) -> Option<InFrame> {
        let buffer = &self.buffer;
        let [first, second, ..] = buffer[..] else {
            return None;
        };
        let masked = second & 0x80 != 0;
        let (len, mut offset) = match second & 0x7f {
            126 => (
                u16::from_be_bytes(buffer.get(2..4)?.try_into().ok()?) as usize,
                4,
            ),
            127 => (
                u64::from_be_bytes(buffer.get(2..10)?.try_into().ok()?) as usize,
                10,
            ),
            len => (usize::from(len), 2),
        };
        let mask: Option<[u8; 4]> = if masked {
            let key = buffer.get(offset..offset + 4)?.try_into().ok()?;
            offset += 4;
            Some(key)
        } else {
            None
        };
        let mut payload = buffer.get(offset..offset + len)?.to_vec();
        if let Some(key) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= key[i % 4]);
        }
        self.buffer.drain(..offset + len);
        Some(InFrame {
            fin: first & 0x80 != 0,
            rsv: (first >> 4) & 0b111,
            opcode: first & 0x0f,
            masked,
            payload,
        })
    }

    /// Reads frames until a close frame and returns it; other frames are only recorded.
    pub fn read_close(&mut self) -> InFrame {
        loop {
            match self.read_frame(EVENT_TIMEOUT) {
                ReadOutcome::Frame(frame) if frame.opcode == opcode::CLOSE => return frame,
                ReadOutcome::Frame(_) => continue,
                other => panic!(
                    "expected a close frame, got {other:?}\n{}",
                    self.transcript()
                ),
            }
        }
    }

    /// Asserts that the node sends a close frame with `code`, replies with the same code as a
    /// client should, and asserts that the node then closes the TCP connection.
    pub fn expect_close(&mut self, code: u16) {
        let frame = self.read_close();
        assert_eq!(
            frame.close_code(),
            Some(code),
            "wrong close code\n{}",
            self.transcript()
        );
        assert!(
            !frame.masked,
            "the node masked its frame\n{}",
            self.transcript()
        );
        let _ = self.send(&OutFrame::close(code, b""));
        self.expect_eof(Duration::from_secs(3));
    }

    /// Waits for the node to close the TCP connection (end of stream or reset), skipping any
    /// frames, and returns how long that took.
    pub fn expect_eof(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let remaining = timeout.saturating_sub(start.elapsed());
            match self.read_frame(remaining) {
                ReadOutcome::Frame(_) => continue,
                ReadOutcome::Eof | ReadOutcome::Failed(_) => return start.elapsed(),
                ReadOutcome::TimedOut => panic!(
                    "the node kept the TCP connection open for {timeout:?}\n{}",
                    self.transcript()
                ),
            }
        }
    }

    /// Formats every frame sent and received so far, one per line.
    pub fn transcript(&self) -> String {
        format!("--- transcript ---\n{}", self.transcript.join("\n"))
    }
}
