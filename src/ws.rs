//! WebSocket framing on the server side (RFC 6455 section 5), on top of tungstenite's frame codec.
//!
//! Every rule about inbound frames is enforced here, each stated where it is checked. The
//! connection code feeds bytes in and gets whole frames out, with payloads already unmasked.

use std::io::Cursor;

use thiserror::Error;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::codes::close;

/// A broken WebSocket rule; the connection is closed with [`WsError::close_code`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WsError {
    /// A protocol violation (close code 1002).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// A text message or close reason that is not UTF-8 (close code 1007).
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A message longer than the configured maximum (close code 1009).
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    TooBig {
        /// The length announced so far, in bytes.
        len: u64,
        /// The configured `max_message_size`.
        max: usize,
    },
}

impl WsError {
    /// Returns the close code that reports this error to the peer.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => close::PROTOCOL_ERROR,
            WsError::InvalidUtf8 => close::INVALID_PAYLOAD,
            WsError::TooBig { .. } => close::MESSAGE_TOO_BIG,
        }
    }

    /// Returns the close reason sent with the close frame.
    pub fn reason(&self) -> &'static str {
        match self {
            WsError::Protocol(rule) => rule,
            WsError::InvalidUtf8 => "invalid UTF-8",
            WsError::TooBig { .. } => "message too big",
        }
    }
}

/// The kind of a frame, after the header checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// The first frame of a text message.
    Text,
    /// The first frame of a binary message.
    Binary,
    /// A continuation of the message in progress.
    Continuation,
    /// A ping control frame.
    Ping,
    /// A pong control frame.
    Pong,
    /// A close control frame.
    Close,
}

/// One complete frame found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// The frame's kind.
    pub kind: FrameKind,
    /// Whether this frame ends its message.
    pub fin: bool,
    /// Offset of the payload in the buffer.
    pub payload_start: usize,
    /// Offset just past the frame's end in the buffer.
    pub end: usize,
}

/// The outcome of looking for a frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decode {
    /// The whole frame is in the buffer and its payload is unmasked.
    Frame(FrameInfo),
    /// More bytes are needed; `needed` is the whole frame's length when the header is known.
    Incomplete {
        /// The frame's full length, if the header has been read.
        needed: Option<usize>,
    },
}

/// Decodes the frame at the start of `buf`, unmasking its payload in place.
///
/// `fragmented` is the length of the fragmented message in progress, if there is one, and
/// `max_message` is the configured `max_message_size`, which bounds a whole message.
pub fn decode_frame(
    buf: &mut [u8],
    fragmented: Option<usize>,
    max_message: usize,
) -> Result<Decode, WsError> {
    let mut cursor = Cursor::new(&buf[..]);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(Decode::Incomplete { needed: None }),
        // The only error tungstenite's header parser raises on a buffer is a reserved opcode.
        Err(_) => return Err(WsError::Protocol("reserved opcode")),
    };
    let payload_start = cursor.position() as usize;
    let kind = check_header(&header, len, fragmented, max_message)?;

    // The length is at most max_message here, so it fits in usize.
    let end = payload_start + len as usize;
    if buf.len() < end {
        return Ok(Decode::Incomplete { needed: Some(end) });
    }
    if let Some(mask) = header.mask {
        unmask(&mut buf[payload_start..end], mask);
    }
    Ok(Decode::Frame(FrameInfo {
        kind,
        fin: header.is_final,
        payload_start,
        end,
    }))
}

fn check_header(
    header: &FrameHeader,
    len: u64,
    fragmented: Option<usize>,
    max_message: usize,
) -> Result<FrameKind, WsError> {
    // RFC 6455 5.2: RSV1-3 must be 0 unless an extension defines them; none is negotiated.
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    // RFC 6455 5.2: the most significant bit of a 64-bit payload length must be 0.
    if len > i64::MAX as u64 {
        return Err(WsError::Protocol(
            "payload length with the most significant bit set",
        ));
    }
    // RFC 6455 5.1: a server must close the connection when a client frame is not masked.
    if header.mask.is_none() {
        return Err(WsError::Protocol("client frame not masked"));
    }

    let kind = match header.opcode {
        OpCode::Control(control) => {
            // RFC 6455 5.5: control frames are never fragmented and carry at most 125 bytes.
            if !header.is_final {
                return Err(WsError::Protocol("fragmented control frame"));
            }
            if len > 125 {
                return Err(WsError::Protocol("control frame longer than 125 bytes"));
            }
            match control {
                Control::Ping => FrameKind::Ping,
                Control::Pong => FrameKind::Pong,
                Control::Close => FrameKind::Close,
                Control::Reserved(_) => return Err(WsError::Protocol("reserved opcode")),
            }
        }
        OpCode::Data(data) => {
            let kind = match data {
                Data::Text => FrameKind::Text,
                Data::Binary => FrameKind::Binary,
                Data::Continue => FrameKind::Continuation,
                Data::Reserved(_) => return Err(WsError::Protocol("reserved opcode")),
            };
            // RFC 6455 5.4: fragments of one message are not interleaved with another message.
            match (kind, fragmented) {
                (FrameKind::Continuation, None) => {
                    return Err(WsError::Protocol("continuation frame without a message"))
                }
                (FrameKind::Text | FrameKind::Binary, Some(_)) => {
                    return Err(WsError::Protocol("new message inside a fragmented message"))
                }
                _ => {}
            }
            let total = len.saturating_add(fragmented.unwrap_or(0) as u64);
            if total > max_message as u64 {
                return Err(WsError::TooBig {
                    len: total,
                    max: max_message,
                });
            }
            kind
        }
    };
    Ok(kind)
}

/// XORs `payload` with the 4-byte client mask (RFC 6455 5.3).
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("chunk of 8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Checks a close frame's payload (RFC 6455 5.5.1 and 7.4) and returns its code, if any.
pub fn parse_close(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() {
                return Err(WsError::Protocol("close code that may not be sent"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(WsError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// Encodes an unmasked control frame (ping, pong or close) with `payload`.
pub fn encode_control(control: Control, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        opcode: OpCode::Control(control),
        ..FrameHeader::default()
    };
    let mut frame = Vec::with_capacity(2 + payload.len());
    // Writing into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, &mut frame);
    frame.extend_from_slice(payload);
    frame
}

/// Encodes a close frame with `code` and a short `reason` (at most 123 bytes are kept).
pub fn encode_close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_control(Control::Close, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first];
        if payload.len() < 126 {
            frame.push(0x80 | payload.len() as u8);
        } else {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(&MASK);
        let mut masked = payload.to_vec();
        unmask(&mut masked, MASK);
        frame.extend_from_slice(&masked);
        frame
    }

    fn decode(frame: &mut [u8], fragmented: Option<usize>) -> Result<Decode, WsError> {
        decode_frame(frame, fragmented, 1024)
    }

    #[test]
    fn masked_text_is_unmasked() {
        let mut frame = client_frame(0x81, b"hello world!");
        let Decode::Frame(info) = decode(&mut frame, None).unwrap() else {
            panic!("frame expected")
        };
        assert_eq!(info.kind, FrameKind::Text);
        assert_eq!(&frame[info.payload_start..info.end], b"hello world!");
    }

    #[test]
    fn partial_frame_reports_length() {
        let mut frame = client_frame(0x81, &[b'a'; 200]);
        let needed = frame.len();
        let result = decode(&mut frame[..50], None).unwrap();
        assert_eq!(
            result,
            Decode::Incomplete {
                needed: Some(needed)
            }
        );
        let result = decode(&mut frame[..1], None).unwrap();
        assert_eq!(result, Decode::Incomplete { needed: None });
    }

    #[test]
    fn header_rules_are_enforced() {
        let unmasked = &mut [0x81, 0x01, b'a'][..];
        assert_eq!(
            decode(unmasked, None),
            Err(WsError::Protocol("client frame not masked"))
        );
        let cases: [(u8, usize, Option<usize>, &str); 7] = [
            (0xC1, 1, None, "reserved bits set"),
            (0x83, 1, None, "reserved opcode"),
            (0x8B, 1, None, "reserved opcode"),
            (0x09, 1, None, "fragmented control frame"),
            (0x89, 126, None, "control frame longer than 125 bytes"),
            (0x80, 1, None, "continuation frame without a message"),
            (0x81, 1, Some(3), "new message inside a fragmented message"),
        ];
        for (first, len, fragmented, rule) in cases {
            let mut frame = client_frame(first, &vec![b'a'; len]);
            let result = decode(&mut frame, fragmented);
            assert_eq!(
                result,
                Err(WsError::Protocol(rule)),
                "first byte {first:#x}"
            );
        }
    }

    #[test]
    fn oversized_message_is_rejected_early() {
        let mut frame = client_frame(0x81, &[b'a'; 1025]);
        let result = decode(&mut frame[..10], None);
        assert!(matches!(result, Err(WsError::TooBig { len: 1025, .. })));
        let mut frame = client_frame(0x80, &[b'a'; 600]);
        let result = decode(&mut frame, Some(600));
        assert!(matches!(result, Err(WsError::TooBig { len: 1200, .. })));
    }

    #[test]
    fn close_payload_rules() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert_eq!(parse_close(&[3, 232]), Ok(Some(1000)));
        assert!(parse_close(&[3]).is_err());
        for code in [999u16, 1004, 1005, 1006, 1015, 5000] {
            let payload = code.to_be_bytes();
            let result = parse_close(&payload);
            assert_eq!(
                result,
                Err(WsError::Protocol("close code that may not be sent"))
            );
        }
        assert_eq!(parse_close(&[3, 232, 0xff]), Err(WsError::InvalidUtf8));
    }

    #[test]
    fn close_reason_is_cut_on_char_boundary() {
        let reason = "é".repeat(100);
        let frame = encode_close(1001, &reason);
        assert!(frame.len() <= 2 + 125);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
