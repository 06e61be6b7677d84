//! Published payloads and the cheap extraction of their stamp on delivery.
//!
//! Every published `data` value is the JSON object
//! `{"t":<ns>,"s":<seq>,"p":<publisher>,"x":"<padding>"}`, with the fields in
//! that order. `t` is the send time in nanoseconds of `CLOCK_REALTIME`, a
//! clock that all processes on one machine share. `s` is the publisher's
//! message counter and `p` the publisher's index. Subscribers find the stamp
//! with one substring search and parse three integers, never the whole JSON.

use std::io::Write;

use memchr::memmem;

/// Event name used for Pusher publishes.
pub const PUSHER_EVENT: &str = "loadtest";

/// The fields a subscriber reads from each delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, nanoseconds since the Unix epoch.
    pub sent_ns: i64,
    /// The publisher's message counter, starting at 0.
    pub seq: u64,
    /// The publisher's index in the whole run.
    pub publisher: u32,
}

/// Finds the stamp in a delivered message.
pub struct StampFinder {
    time_key: memmem::Finder<'static>,
    seq_key: &'static [u8],
    publisher_key: &'static [u8],
}

impl StampFinder {
    /// Creates a finder for stamps inside a JSON object (`escaped == false`,
    /// NexusNode) or inside a JSON string whose quotes are escaped (Pusher).
    pub fn new(escaped: bool) -> StampFinder {
        if escaped {
            StampFinder {
                time_key: memmem::Finder::new(br#"\"t\":"#),
                seq_key: br#",\"s\":"#,
                publisher_key: br#",\"p\":"#,
            }
        } else {
            StampFinder {
                time_key: memmem::Finder::new(br#""t":"#),
                seq_key: br#","s":"#,
                publisher_key: br#","p":"#,
            }
        }
    }

    /// Returns the stamp, or `None` when the message carries none.
    pub fn find(&self, message: &[u8]) -> Option<Stamp> {
        let at = self.time_key.find(message)? + self.time_key.needle().len();
        let (sent_ns, rest) = parse_u64(&message[at..])?;
        let (seq, rest) = parse_u64(rest.strip_prefix(self.seq_key)?)?;
        let (publisher, _) = parse_u64(rest.strip_prefix(self.publisher_key)?)?;
        Some(Stamp {
            sent_ns: i64::try_from(sent_ns).ok()?,
            seq,
            publisher: u32::try_from(publisher).ok()?,
        })
    }
}

/// Parses leading ASCII digits; returns the value and the rest.
fn parse_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let mut value = 0u64;
    for &digit in &bytes[..digits] {
        value = value * 10 + u64::from(digit - b'0');
    }
    Some((value, &bytes[digits..]))
}

/// Appends the stamped `data` object, padded with `x` so that its JSON text
/// is `size` bytes long (or as short as possible when `size` is smaller).
/// With `escaped`, quotes are written as `\"` for use inside a JSON string;
/// the size counts the unescaped text.
pub fn write_data(out: &mut Vec<u8>, stamp: &Stamp, size: usize, escaped: bool) {
    let quote: &[u8] = if escaped { br#"\""# } else { b"\"" };
    let start = out.len();
    write_key(out, quote, b"{", b"t");
    let _ = write!(out, "{}", stamp.sent_ns);
    write_key(out, quote, b",", b"s");
    let _ = write!(out, "{}", stamp.seq);
    write_key(out, quote, b",", b"p");
    let _ = write!(out, "{}", stamp.publisher);
    write_key(out, quote, b",", b"x");
    out.extend_from_slice(quote);

    // Unescaped length so far, plus the closing `"}`.
    let escapes = if escaped { 9 } else { 0 };
    let written = out.len() - start - escapes + 2;
    let padding = size.saturating_sub(written);
    out.resize(out.len() + padding, b'x');
    out.extend_from_slice(quote);
    out.push(b'}');
}

fn write_key(out: &mut Vec<u8>, quote: &[u8], separator: &[u8], key: &[u8]) {
    out.extend_from_slice(separator);
    out.extend_from_slice(quote);
    out.extend_from_slice(key);
    out.extend_from_slice(quote);
    out.push(b':');
}

/// Appends a NexusNode PUBLISH request (without `id`, so a successful
/// publish gets no reply).
pub fn write_publish(out: &mut Vec<u8>, topic: &str, stamp: &Stamp, size: usize) {
    out.extend_from_slice(br#"{"action":"PUBLISH","topic":""#);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(br#"","data":"#);
    write_data(out, stamp, size, false);
    out.push(b'}');
}

/// Appends the JSON body of a Pusher HTTP API event publish.
pub fn write_pusher_event(out: &mut Vec<u8>, channel: &str, stamp: &Stamp, size: usize) {
    out.extend_from_slice(br#"{"name":""#);
    out.extend_from_slice(PUSHER_EVENT.as_bytes());
    out.extend_from_slice(br#"","channel":""#);
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(br#"","data":""#);
    write_data(out, stamp, size, true);
    out.extend_from_slice(b"\"}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        sent_ns: 1_712_345_678_901_234_567,
        seq: 42,
        publisher: 3,
    };

    #[test]
    fn data_is_padded_to_size() {
        for size in [60, 100, 1000] {
            let mut out = Vec::new();
            write_data(&mut out, &STAMP, size, false);
            assert_eq!(out.len(), size);
            let value: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(value["s"], 42);
        }
    }

    #[test]
    fn small_size_gives_unpadded_data() {
        let mut out = Vec::new();
        write_data(&mut out, &STAMP, 0, false);
        assert_eq!(out, br#"{"t":1712345678901234567,"s":42,"p":3,"x":""}"#);
    }

    #[test]
    fn escaped_data_is_valid_json_string() {
        let mut out = b"\"".to_vec();
        write_data(&mut out, &STAMP, 100, true);
        out.push(b'"');
        let text: String = serde_json::from_slice(&out).expect("valid JSON string");
        assert_eq!(text.len(), 100);
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(value["p"], 3);
    }

    #[test]
    fn finder_reads_nexus_delivery() {
        let mut publish = Vec::new();
        write_publish(&mut publish, "lt.0", &STAMP, 100);
        let request: serde_json::Value = serde_json::from_slice(&publish).expect("valid JSON");
        assert_eq!(request["topic"], "lt.0");

        // The node forwards the data text byte for byte.
        let text = String::from_utf8(publish).expect("UTF-8");
        let data = &text[text.find(r#""data":"#).expect("data field") + 7..text.len() - 1];
        let delivery = format!(r#"{{"type":"message","topic":"lt.0","data":{data}}}"#);
        let found = StampFinder::new(false).find(delivery.as_bytes());
        assert_eq!(found, Some(STAMP));
    }

    #[test]
    fn finder_reads_pusher_delivery() {
        let mut body = Vec::new();
        write_pusher_event(&mut body, "lt.0", &STAMP, 100);
        let event: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(event["channel"], "lt.0");

        let delivery = serde_json::json!({
            "event": PUSHER_EVENT,
            "channel": "lt.0",
            "data": event["data"],
        })
        .to_string();
        let found = StampFinder::new(true).find(delivery.as_bytes());
        assert_eq!(found, Some(STAMP));
    }

    #[test]
    fn finder_ignores_control_messages() {
        let finder = StampFinder::new(false);
        assert_eq!(
            finder.find(br#"{"type":"subscribed","topic":"lt.0","id":1}"#),
            None
        );
        assert_eq!(finder.find(br#"{"t":12,"s":1}"#), None);
        let pusher = StampFinder::new(true);
        let established = br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#;
        assert_eq!(pusher.find(established), None);
    }
}
