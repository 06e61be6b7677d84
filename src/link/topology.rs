//! Channel placement: every channel on one Redis server, or on the master that owns the
//! channel's hash slot in a Redis Cluster.

use std::fmt;

use super::resp::Reply;

/// Hash slots of a Redis Cluster.
pub const SLOT_COUNT: usize = 16_384;

/// Slot table entry for a slot that no master serves.
const NO_OWNER: u16 = u16::MAX;

/// A Redis server address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Returns the Redis Cluster hash slot of `key`: CRC16 (XMODEM) modulo 16384, over the part
/// between the first `{` and the next `}` when that part is not empty (a hash tag).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(hashed) % SLOT_COUNT as u16
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The Redis servers the link talks to and which of them owns each channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Servers in a stable order; index 0 also carries the classic (non-sharded) subscriptions.
    pub masters: Vec<Endpoint>,
    /// Master index per hash slot; `None` for a single server, which owns every channel.
    slots: Option<Box<[u16]>>,
}

impl Topology {
    /// Creates the topology of a single Redis server.
    pub fn single(endpoint: Endpoint) -> Topology {
        Topology {
            masters: vec![endpoint],
            slots: None,
        }
    }

    /// Returns the index of the master that owns `channel`, or `None` when no master serves
    /// its slot.
    pub fn owner(&self, channel: &[u8]) -> Option<usize> {
        let Some(slots) = &self.slots else {
            return Some(0);
        };
        match slots[usize::from(key_slot(channel))] {
            NO_OWNER => None,
            index => Some(usize::from(index)),
        }
    }

    /// Returns the number of slots without a master (0 for a single server).
    pub fn uncovered_slots(&self) -> usize {
        self.slots.as_ref().map_or(0, |slots| {
            slots.iter().filter(|&&owner| owner == NO_OWNER).count()
        })
    }

    /// Builds the topology from a `CLUSTER SLOTS` reply. A master listed with an empty host is
    /// the node that replied, `queried`.
    pub fn from_cluster_slots(reply: &Reply, queried: &Endpoint) -> Result<Topology, String> {
        let ranges = reply
            .as_array()
            .ok_or_else(|| format!("CLUSTER SLOTS returned {reply:?}, not an array"))?;
        let mut owned = Vec::with_capacity(ranges.len());
        for range in ranges {
            owned.push(parse_range(range, queried)?);
        }
        let mut masters: Vec<Endpoint> =
            owned.iter().map(|(_, _, master)| master.clone()).collect();
        masters.sort();
        masters.dedup();
        if masters.is_empty() {
            return Err("CLUSTER SLOTS lists no master".to_owned());
        }
        let mut slots = vec![NO_OWNER; SLOT_COUNT].into_boxed_slice();
        for (start, end, master) in owned {
            let index = masters.binary_search(&master).unwrap_or_default() as u16;
            slots[start..=end].fill(index);
        }
        Ok(Topology {
            masters,
            slots: Some(slots),
        })
    }
}

/// Parses one `[start, end, [host, port, ...], replicas...]` entry of `CLUSTER SLOTS`.
fn parse_range(range: &Reply, queried: &Endpoint) -> Result<(usize, usize, Endpoint), String> {
    let invalid = || format!("invalid CLUSTER SLOTS entry {range:?}");
    let fields = range.as_array().ok_or_else(invalid)?;
    let [Reply::Integer(start), Reply::Integer(end), Reply::Array(Some(node)), ..] = fields else {
        return Err(invalid());
    };
    let (start, end) = (*start as usize, *end as usize);
    if start > end || end >= SLOT_COUNT {
        return Err(invalid());
    }
    let [host, Reply::Integer(port), ..] = node.as_slice() else {
        return Err(invalid());
    };
    let host = host.as_bytes().ok_or_else(invalid)?;
    let host = String::from_utf8_lossy(host).into_owned();
    let port = u16::try_from(*port).map_err(|_| invalid())?;
    let master = if host.is_empty() {
        queried.clone()
    } else {
        Endpoint { host, port }
    };
    Ok((start, end, master))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1}.a"), key_slot(b"user1"));
        let whole = crc16_xmodem(b"{}x") % SLOT_COUNT as u16;
        assert_eq!(key_slot(b"{}x"), whole, "an empty tag hashes the whole key");
    }

    fn node(host: &str, port: i64) -> Reply {
        Reply::Array(Some(vec![
            Reply::Bulk(Some(host.as_bytes().to_vec())),
            Reply::Integer(port),
            Reply::Bulk(Some(b"id".to_vec())),
        ]))
    }

    fn range(start: i64, end: i64, master: Reply) -> Reply {
        Reply::Array(Some(vec![
            Reply::Integer(start),
            Reply::Integer(end),
            master,
        ]))
    }

    #[test]
    fn cluster_slots_reply_builds_the_slot_table() {
        let queried = Endpoint {
            host: "10.0.0.9".into(),
            port: 7000,
        };
        let reply = Reply::Array(Some(vec![
            range(0, 5460, node("", 7000)),
            range(5461, 10922, node("127.0.0.1", 7001)),
            range(10923, 16382, node("127.0.0.1", 7002)),
        ]));
        let topology = Topology::from_cluster_slots(&reply, &queried).unwrap();
        assert_eq!(topology.masters.len(), 3);
        assert_eq!(topology.uncovered_slots(), 1);
        let owner = topology.owner(b"bar").unwrap();
        assert_eq!(
            topology.masters[owner], queried,
            "slot 5061 belongs to the empty host"
        );
        let owner = topology.owner(b"foo").unwrap();
        assert_eq!(topology.masters[owner].port, 7002);
    }

    #[test]
    fn malformed_cluster_slots_reply_is_an_error() {
        let queried = Endpoint {
            host: "h".into(),
            port: 1,
        };
        let bad = Reply::Array(Some(vec![range(10, 5, node("h", 1))]));
        assert!(Topology::from_cluster_slots(&bad, &queried).is_err());
        assert!(Topology::from_cluster_slots(&Reply::Integer(1), &queried).is_err());
    }
}
