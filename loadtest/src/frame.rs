//! WebSocket frames (RFC 6455 section 5): a reader for server frames and
//! a writer for masked client frames.
//!
//! The reader parses frames in place from one buffer and hands each complete
//! message to a callback, so a delivery costs no allocation and no copy.

use std::fmt;

/// Smallest buffer a [`FrameReader`] starts with.
const MIN_CAPACITY: usize = 256;

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// One complete message or control frame from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// A close frame with its status code, if it carried one.
    Close(Option<u16>),
}

/// Server frames that break RFC 6455 or our size limit.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A server frame had the mask bit set (forbidden by section 5.1).
    MaskedServerFrame,
    /// RSV1-3 set although no extension was negotiated (section 5.2).
    ReservedBitsSet,
    UnknownOpcode(u8),
    /// A control frame that is fragmented or longer than 125 bytes (section 5.5).
    InvalidControlFrame,
    /// A continuation frame with no message to continue, or a new data frame
    /// inside a fragmented message (section 5.4).
    InvalidFragmentation,
    /// A message longer than the reader's maximum message size.
    MessageTooLong(u64),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::MaskedServerFrame => write!(f, "server sent a masked frame"),
            FrameError::ReservedBitsSet => write!(f, "server frame has reserved bits set"),
            FrameError::UnknownOpcode(opcode) => write!(f, "unknown opcode {opcode:#x}"),
            FrameError::InvalidControlFrame => write!(f, "fragmented or oversized control frame"),
            FrameError::InvalidFragmentation => write!(f, "invalid message fragmentation"),
            FrameError::MessageTooLong(len) => write!(f, "message of {len} bytes is too long"),
        }
    }
}

/// Header fields of one frame.
#[derive(Debug, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: u64,
}

/// Parses a frame header; `Ok(None)` means more bytes are needed.
fn parse_header(bytes: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    let fin = bytes[0] & 0x80 != 0;
    if bytes[0] & 0x70 != 0 {
        return Err(FrameError::ReservedBitsSet);
    }
    let opcode = bytes[0] & 0x0F;
    if bytes[1] & 0x80 != 0 {
        return Err(FrameError::MaskedServerFrame);
    }
    let (header_len, payload_len) = match bytes[1] & 0x7F {
        126 if bytes.len() < 4 => return Ok(None),
        126 => (4, u64::from(u16::from_be_bytes([bytes[2], bytes[3]]))),
        127 if bytes.len() < 10 => return Ok(None),
        127 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&bytes[2..10]);
            (10, u64::from_be_bytes(len))
        }
        len => (2, u64::from(len)),
    };
    match opcode {
        OPCODE_CONTINUATION | OPCODE_TEXT | OPCODE_BINARY => {}
        OPCODE_CLOSE | OPCODE_PING | OPCODE_PONG => {
            if !fin || payload_len > 125 {
                return Err(FrameError::InvalidControlFrame);
            }
        }
        other => return Err(FrameError::UnknownOpcode(other)),
    }
    Ok(Some(FrameHeader {
        fin,
        opcode,
        header_len,
        payload_len,
    }))
}

/// Buffered reader of server frames.
///
/// Call [`spare`](Self::spare), read from the socket into it, report the
/// count with [`filled`](Self::filled), then take the complete messages with
/// [`read_events`](Self::read_events). Text is not checked for valid UTF-8,
/// because the load generator only searches it for byte patterns.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Payload of a fragmented message collected so far.
    message: Vec<u8>,
    /// Opcode of the fragmented message in progress.
    message_opcode: Option<u8>,
    max_message: usize,
    /// Free space below which `spare` compacts or grows the buffer.
    min_read: usize,
}

impl FrameReader {
    /// Creates a reader with `capacity` bytes of buffer (grown when a
    /// frame needs more) that rejects messages longer than `max_message`
    /// bytes.
    pub fn new(capacity: usize, max_message: usize) -> FrameReader {
        let capacity = capacity.max(MIN_CAPACITY);
        FrameReader {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
            message: Vec::new(),
            message_opcode: None,
            max_message,
            min_read: capacity / 2,
        }
    }

    /// Drops buffered bytes and any fragmented message.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.message.clear();
        self.message_opcode = None;
    }

    /// Returns free space to read into, compacting or growing the buffer
    /// when less than half the initial capacity is free.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < self.min_read && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < self.min_read {
            let new_len = self.buf.len() * 2;
            self.buf.resize(new_len, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `count` bytes were read into [`spare`](Self::spare).
    pub fn filled(&mut self, count: usize) {
        self.end += count;
    }

    /// Returns the bytes received and not yet consumed.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Discards the first `count` pending bytes.
    pub fn consume(&mut self, count: usize) {
        self.start += count.min(self.end - self.start);
    }

    /// Passes every complete message and control frame in the buffer to
    /// `on_event`, in order, and keeps an incomplete frame for later.
    pub fn read_events<F>(&mut self, mut on_event: F) -> Result<(), FrameError>
    where
        F: FnMut(Event<'_>),
    {
        loop {
            let pending = &self.buf[self.start..self.end];
            let Some(header) = parse_header(pending)? else {
                return Ok(());
            };
            if header.payload_len > self.max_message as u64 {
                return Err(FrameError::MessageTooLong(header.payload_len));
            }
            let frame_len = header.header_len + header.payload_len as usize;
            if pending.len() < frame_len {
                return Ok(());
            }
            let payload_start = self.start + header.header_len;
            self.start += frame_len;
            self.dispatch(&header, payload_start, &mut on_event)?;
        }
    }

    /// Turns one frame into an event, collecting fragments as needed.
    fn dispatch<F>(
        &mut self,
        header: &FrameHeader,
        payload_start: usize,
        on_event: &mut F,
    ) -> Result<(), FrameError>
    where
        F: FnMut(Event<'_>),
    {
        let payload = &self.buf[payload_start..self.start];
        match header.opcode {
            OPCODE_TEXT | OPCODE_BINARY => {
                if self.message_opcode.is_some() {
                    return Err(FrameError::InvalidFragmentation);
                }
                if header.fin {
                    on_event(data_event(header.opcode, payload));
                } else {
                    self.message.clear();
                    self.message.extend_from_slice(payload);
                    self.message_opcode = Some(header.opcode);
                }
            }
            OPCODE_CONTINUATION => {
                let opcode = self
                    .message_opcode
                    .ok_or(FrameError::InvalidFragmentation)?;
                let total = self.message.len() + payload.len();
                if total > self.max_message {
                    return Err(FrameError::MessageTooLong(total as u64));
                }
                self.message.extend_from_slice(payload);
                if header.fin {
                    on_event(data_event(opcode, &self.message));
                    self.message.clear();
                    self.message_opcode = None;
                }
            }
            OPCODE_PING => on_event(Event::Ping(payload)),
            OPCODE_PONG => on_event(Event::Pong),
            _ => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                on_event(Event::Close(code));
            }
        }
        Ok(())
    }
}

fn data_event(opcode: u8, payload: &[u8]) -> Event<'_> {
    if opcode == OPCODE_TEXT {
        Event::Text(payload)
    } else {
        Event::Binary(payload)
    }
}

/// Source of masking keys and handshake nonces (xorshift64*).
///
/// RFC 6455 section 5.3 requires unpredictable masks, which protect proxies
/// from cache poisoning. A load generator that talks to its own broker on
/// loopback needs only varying masks, so a fast generator seeded from the
/// clock is enough.
pub struct MaskSource(u64);

impl MaskSource {
    /// Creates a source from a seed; equal seeds give equal sequences.
    pub fn new(seed: u64) -> MaskSource {
        MaskSource(seed | 1)
    }

    /// Returns the next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Returns a 4-byte masking key.
    pub fn next_mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_le_bytes()
    }
}

/// Appends one client frame with FIN set and the payload masked.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// XORs `bytes` with the repeating 4-byte `mask` (RFC 6455 section 5.3).
pub fn apply_mask(bytes: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = bytes.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an unmasked server frame.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let len = payload.len();
        if len < 126 {
            out.push(len as u8);
        } else if len <= 65535 {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    /// Feeds `bytes` in pieces of `step` bytes and collects the events.
    fn collect(reader: &mut FrameReader, bytes: &[u8], step: usize) -> Vec<String> {
        let mut events = Vec::new();
        for piece in bytes.chunks(step) {
            let mut rest = piece;
            while !rest.is_empty() {
                let spare = reader.spare();
                let count = rest.len().min(spare.len());
                spare[..count].copy_from_slice(&rest[..count]);
                reader.filled(count);
                rest = &rest[count..];
            }
            reader
                .read_events(|event| events.push(describe(&event)))
                .expect("valid frames");
        }
        events
    }

    fn describe(event: &Event<'_>) -> String {
        match event {
            Event::Text(text) => format!("text:{}", String::from_utf8_lossy(text)),
            Event::Binary(bytes) => format!("binary:{}", bytes.len()),
            Event::Ping(payload) => format!("ping:{}", String::from_utf8_lossy(payload)),
            Event::Pong => "pong".to_string(),
            Event::Close(code) => format!("close:{code:?}"),
        }
    }

    #[test]
    fn reader_splits_several_frames_in_one_read() {
        let mut bytes = server_frame(0x81, b"one");
        bytes.extend(server_frame(0x81, b"two"));
        bytes.extend(server_frame(0x89, b"p"));
        let mut reader = FrameReader::new(4096, 65536);
        let events = collect(&mut reader, &bytes, bytes.len());
        assert_eq!(events, ["text:one", "text:two", "ping:p"]);
    }

    #[test]
    fn reader_joins_frames_split_across_reads() {
        let payload = vec![b'x'; 300];
        let mut bytes = server_frame(0x81, &payload);
        bytes.extend(server_frame(0x81, b"end"));
        for step in [1, 2, 3, 7, 100] {
            let mut reader = FrameReader::new(4096, 65536);
            let events = collect(&mut reader, &bytes, step);
            assert_eq!(events.len(), 2, "step {step}");
            assert_eq!(events[0].len(), "text:".len() + 300, "step {step}");
            assert_eq!(events[1], "text:end", "step {step}");
        }
    }

    #[test]
    fn reader_grows_for_large_messages() {
        let payload = vec![b'y'; 70_000];
        let bytes = server_frame(0x82, &payload);
        let mut reader = FrameReader::new(4096, 100_000);
        let events = collect(&mut reader, &bytes, 5000);
        assert_eq!(events, ["binary:70000"]);
    }

    #[test]
    fn reader_assembles_fragments_around_control_frames() {
        let mut bytes = server_frame(0x01, b"hel");
        bytes.extend(server_frame(0x89, b""));
        bytes.extend(server_frame(0x00, b"lo "));
        bytes.extend(server_frame(0x80, b"world"));
        let mut reader = FrameReader::new(4096, 65536);
        let events = collect(&mut reader, &bytes, 4);
        assert_eq!(events, ["ping:", "text:hello world"]);
    }

    #[test]
    fn reader_reports_close_code() {
        let bytes = server_frame(0x88, &[0x03, 0xE9, b'b', b'y', b'e']);
        let mut reader = FrameReader::new(4096, 65536);
        assert_eq!(collect(&mut reader, &bytes, 64), ["close:Some(1001)"]);
        let empty = server_frame(0x88, b"");
        assert_eq!(collect(&mut reader, &empty, 64), ["close:None"]);
    }

    #[test]
    fn reader_rejects_protocol_violations() {
        let cases: [(Vec<u8>, FrameError); 6] = [
            (vec![0x81, 0x80, 0, 0, 0, 0], FrameError::MaskedServerFrame),
            (vec![0xC1, 0x00], FrameError::ReservedBitsSet),
            (vec![0x83, 0x00], FrameError::UnknownOpcode(3)),
            (vec![0x09, 0x00], FrameError::InvalidControlFrame),
            (vec![0x80, 0x00], FrameError::InvalidFragmentation),
            (
                server_frame(0x81, &[b'z'; 200]),
                FrameError::MessageTooLong(200),
            ),
        ];
        for (bytes, expected) in cases {
            let mut reader = FrameReader::new(4096, 100);
            reader.spare()[..bytes.len()].copy_from_slice(&bytes);
            reader.filled(bytes.len());
            assert_eq!(reader.read_events(|_| {}), Err(expected));
        }
    }

    #[test]
    fn reader_rejects_new_message_inside_fragmented_one() {
        let mut bytes = server_frame(0x01, b"a");
        bytes.extend(server_frame(0x81, b"b"));
        let mut reader = FrameReader::new(4096, 100);
        reader.spare()[..bytes.len()].copy_from_slice(&bytes);
        reader.filled(bytes.len());
        assert_eq!(
            reader.read_events(|_| {}),
            Err(FrameError::InvalidFragmentation)
        );
    }

    #[test]
    fn written_frame_unmasks_to_payload() {
        let payload: Vec<u8> = (0..200u8).collect();
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = Vec::new();
        write_frame(&mut out, OPCODE_TEXT, &payload, mask);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), 200);
        assert_eq!(&out[4..8], &mask);
        let mut body = out[8..].to_vec();
        apply_mask(&mut body, mask);
        assert_eq!(body, payload);
    }
}
