//! The Redis payload of a cluster message, and the filter that drops repeats of one message.
//!
//! Payload layout: the version byte, the origin node's instance id (8 bytes, big endian), the
//! sequence number the origin gave the message (8 bytes, big endian), then the complete
//! WebSocket text frame of the delivery. The instance id is random per process start, so a node
//! restarted with the same `node_id` starts a new sequence without looking like a replay.
//!
//! Redis can hand one publish to a node several times: classic pub/sub sends one `message` for
//! the channel plus one `pmessage` per matching pattern, and in Redis Cluster mode a message can
//! arrive both on its shard channel and as the classic copy for wildcard subscribers. The
//! [`Deduplicator`] keeps, per origin, a window of recently seen sequence numbers.

use std::time::{Duration, Instant};

use foldhash::HashMap;

/// Version byte of the payload layout.
const VERSION: u8 = 1;

/// Bytes before the frame: version, origin, sequence.
pub const HEADER_LEN: usize = 17;

/// Sequence numbers remembered per origin. Classic pub/sub delivers the copies of one publish
/// back to back, so any window works there. In Redis Cluster mode the shard copy and the classic
/// copy travel on different connections, and this bounds how far apart they may arrive.
const WINDOW: u64 = 16_384;

/// Appends the payload header for a message from `origin` with sequence number `seq`.
pub fn push_header(out: &mut Vec<u8>, origin: u64, seq: u64) {
    out.push(VERSION);
    out.extend_from_slice(&origin.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
}

/// A payload that passed [`parse`].
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Instance id of the node that published the message.
    pub origin: u64,
    /// The origin's sequence number of the message, from 1.
    pub seq: u64,
    /// The WebSocket text frame to queue for subscribers.
    pub frame: &'a [u8],
}

/// Reason a payload from Redis was dropped. Anything can PUBLISH to the link's channels, so a
/// payload is checked before its frame reaches a client.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than the header, or an unknown version byte.
    #[error("payload does not start with a version 1 header")]
    Header,
    /// The frame is not one complete, unmasked, final text frame.
    #[error("payload does not carry exactly one WebSocket text frame")]
    Frame,
}

/// Splits a payload into its origin, sequence number and frame.
pub fn parse(payload: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    if payload.len() < HEADER_LEN || payload[0] != VERSION {
        return Err(EnvelopeError::Header);
    }
    let origin = u64::from_be_bytes(
        payload[1..9]
            .try_into()
            .map_err(|_| EnvelopeError::Header)?,
    );
    let seq = u64::from_be_bytes(
        payload[9..17]
            .try_into()
            .map_err(|_| EnvelopeError::Header)?,
    );
    let frame = &payload[HEADER_LEN..];
    check_text_frame(frame)?;
    Ok(Envelope { origin, seq, frame })
}

/// Checks that `frame` is a final, unmasked text frame whose length field (RFC 6455 5.2: 7 bits,
/// or 126 plus 16 bits, or 127 plus 64 bits) covers exactly the rest of the bytes.
fn check_text_frame(frame: &[u8]) -> Result<(), EnvelopeError> {
    let [first, second, rest @ ..] = frame else {
        return Err(EnvelopeError::Frame);
    };
    // FIN set, no reserved bits, opcode 1 (text); the mask bit must be clear.
    if *first != 0x81 || second & 0x80 != 0 {
        return Err(EnvelopeError::Frame);
    }
    let (len, header) = match second & 0x7f {
        126 if rest.len() >= 2 => (u64::from(u16::from_be_bytes([rest[0], rest[1]])), 4),
        127 if rest.len() >= 8 => {
            let bytes: [u8; 8] = rest[..8].try_into().map_err(|_| EnvelopeError::Frame)?;
            (u64::from_be_bytes(bytes), 10)
        }
        126 | 127 => return Err(EnvelopeError::Frame),
        short => (u64::from(short), 2),
    };
    if len != (frame.len() - header) as u64 {
        return Err(EnvelopeError::Frame);
    }
    Ok(())
}

/// Sequence numbers seen from one origin: the highest one and a bitmap of the last [`WINDOW`].
struct Window {
    top: u64,
    seen: Box<[u64]>,
    last_used: Instant,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            top: 0,
            seen: vec![0; (WINDOW / 64) as usize].into_boxed_slice(),
            last_used: now,
        }
    }

    fn bit(seq: u64) -> (usize, u64) {
        let position = seq % WINDOW;
        ((position / 64) as usize, 1 << (position % 64))
    }

    /// Records `seq` and returns whether it was new.
    fn insert(&mut self, seq: u64) -> bool {
        if seq > self.top {
            if seq - self.top >= WINDOW {
                self.seen.fill(0);
            } else {
                for skipped in self.top + 1..seq {
                    let (word, mask) = Self::bit(skipped);
                    self.seen[word] &= !mask;
                }
            }
            self.top = seq;
            let (word, mask) = Self::bit(seq);
            self.seen[word] |= mask;
            return true;
        }
        if self.top - seq >= WINDOW {
            // NOTE: older than the window, so whether it was seen is unknown. Delivering risks a
            // duplicate and dropping risks a loss. This only happens in Redis Cluster mode, when
            // one shard connection lags more than WINDOW messages of this origin behind another.
            return true;
        }
        let (word, mask) = Self::bit(seq);
        let new = self.seen[word] & mask == 0;
        self.seen[word] |= mask;
        new
    }
}

/// Drops second and later arrivals of one message, per origin.
#[derive(Default)]
pub struct Deduplicator {
    origins: HashMap<u64, Window>,
}

impl Deduplicator {
    /// Records the message and returns whether this is its first arrival.
    pub fn first_arrival(&mut self, origin: u64, seq: u64, now: Instant) -> bool {
        let window = self
            .origins
            .entry(origin)
            .or_insert_with(|| Window::new(now));
        window.last_used = now;
        window.insert(seq)
    }

    /// Forgets origins not heard from for `idle`, such as nodes that stopped.
    pub fn forget_idle(&mut self, now: Instant, idle: Duration) {
        self.origins
            .retain(|_, window| now.duration_since(window.last_used) < idle);
    }

    /// Returns the number of origins remembered.
    #[cfg(test)]
    pub fn origin_count(&self) -> usize {
        self.origins.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode_delivery;

    fn payload(origin: u64, seq: u64, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_header(&mut out, origin, seq);
        out.extend_from_slice(frame);
        out
    }

    #[test]
    fn envelope_round_trips_every_header_size() {
        for data_len in [1, 200, 70_000] {
            let data = format!("\"{}\"", "x".repeat(data_len));
            let frame = encode_delivery("orders.eu", data.as_bytes());
            let bytes = payload(7, 42, &frame);
            let envelope = parse(&bytes).unwrap();
            assert_eq!(envelope.origin, 7);
            assert_eq!(envelope.seq, 42);
            assert_eq!(envelope.frame, &frame[..]);
        }
    }

    #[test]
    fn foreign_payloads_are_rejected() {
        let frame = encode_delivery("a", b"1");
        assert_eq!(parse(b"hello"), Err(EnvelopeError::Header));
        let mut wrong_version = payload(1, 1, &frame);
        wrong_version[0] = 9;
        assert_eq!(parse(&wrong_version), Err(EnvelopeError::Header));
        let truncated = payload(1, 1, &frame[..frame.len() - 1]);
        assert_eq!(parse(&truncated), Err(EnvelopeError::Frame));
        let mut binary = frame.clone();
        binary[0] = 0x82;
        assert_eq!(parse(&payload(1, 1, &binary)), Err(EnvelopeError::Frame));
        assert_eq!(parse(&payload(1, 1, b"")), Err(EnvelopeError::Frame));
    }

    #[test]
    fn repeats_are_dropped_per_origin() {
        let now = Instant::now();
        let mut dedup = Deduplicator::default();
        assert!(dedup.first_arrival(1, 1, now));
        assert!(!dedup.first_arrival(1, 1, now));
        assert!(
            dedup.first_arrival(2, 1, now),
            "another origin has its own sequence"
        );
        assert!(dedup.first_arrival(1, 2, now));
        assert!(!dedup.first_arrival(1, 2, now));
    }

    #[test]
    fn late_copies_inside_the_window_are_dropped() {
        let now = Instant::now();
        let mut dedup = Deduplicator::default();
        for seq in [5, 3, 9, 4] {
            assert!(dedup.first_arrival(1, seq, now), "first {seq}");
        }
        for seq in [3, 4, 5, 9] {
            assert!(!dedup.first_arrival(1, seq, now), "repeat {seq}");
        }
        assert!(dedup.first_arrival(1, 6, now), "a gap stays open");
    }

    #[test]
    fn window_slides_past_its_size() {
        let now = Instant::now();
        let mut dedup = Deduplicator::default();
        assert!(dedup.first_arrival(1, 1, now));
        assert!(dedup.first_arrival(1, 1 + WINDOW, now));
        // Same bit position as seq 1, which the slide cleared.
        assert!(dedup.first_arrival(1, 1 + 2 * WINDOW, now));
        assert!(!dedup.first_arrival(1, 1 + 2 * WINDOW, now));
        assert!(dedup.first_arrival(1, 2 + WINDOW, now));
    }

    #[test]
    fn idle_origins_are_forgotten() {
        let start = Instant::now();
        let mut dedup = Deduplicator::default();
        dedup.first_arrival(1, 1, start);
        dedup.first_arrival(2, 1, start + Duration::from_secs(50));
        dedup.forget_idle(start + Duration::from_secs(70), Duration::from_secs(60));
        assert_eq!(dedup.origin_count(), 1);
    }
}
