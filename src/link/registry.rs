//! The node registry entry: a JSON value under `<prefix>node:<node_id>` that lets operators
//! list the nodes of a cluster (`redis-cli --scan --pattern 'nexus:node:*'`).

use crate::protocol::push_json_string;

/// Most patterns listed in one entry; `pattern_count` always has the full number.
pub const MAX_LISTED_PATTERNS: usize = 1000;

/// Fields of one registry entry.
pub struct Entry<'a, I> {
    /// The node's id.
    pub node_id: &'a str,
    /// The address clients connect to.
    pub listen: &'a str,
    /// Start time, in seconds since the Unix epoch.
    pub started_at: u64,
    /// Open WebSocket connections.
    pub connections: usize,
    /// Patterns with at least one local subscriber, sorted.
    pub patterns: I,
    /// Number of such patterns.
    pub pattern_count: usize,
    /// `up` or `down`.
    pub link: &'a str,
}

impl<'a, I: Iterator<Item = &'a str>> Entry<'a, I> {
    /// Encodes the entry as a JSON object.
    pub fn encode(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(br#"{"id":"#);
        push_json_string(&mut out, self.node_id);
        out.extend_from_slice(br#","listen":"#);
        push_json_string(&mut out, self.listen);
        out.extend_from_slice(br#","started_at":"#);
        out.extend_from_slice(itoa::Buffer::new().format(self.started_at).as_bytes());
        out.extend_from_slice(br#","connections":"#);
        out.extend_from_slice(itoa::Buffer::new().format(self.connections).as_bytes());
        out.extend_from_slice(br#","link":"#);
        push_json_string(&mut out, self.link);
        out.extend_from_slice(br#","pattern_count":"#);
        out.extend_from_slice(itoa::Buffer::new().format(self.pattern_count).as_bytes());
        out.extend_from_slice(br#","patterns":["#);
        for (index, pattern) in self.patterns.take(MAX_LISTED_PATTERNS).enumerate() {
            if index > 0 {
                out.push(b',');
            }
            push_json_string(&mut out, pattern);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_is_json_with_every_field() {
        let entry = Entry {
            node_id: "n1",
            listen: "127.0.0.1:3001",
            started_at: 1_700_000_000,
            connections: 3,
            patterns: ["a", "b.*"].into_iter(),
            pattern_count: 2,
            link: "up",
        };
        let text = String::from_utf8(entry.encode()).unwrap();
        assert_eq!(
            text,
            r#"{"id":"n1","listen":"127.0.0.1:3001","started_at":1700000000,"connections":3,"link":"up","pattern_count":2,"patterns":["a","b.*"]}"#
        );
    }
}
